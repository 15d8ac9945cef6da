//! Appending to a paged KV cache: the new tokens' K and V rows written into their requests' pages.
//!
//! Token `t` of `k_new`/`v_new` (`[nnz, num_kv_heads, head_dim]`) belongs to request
//! `batch_indices[t]` at position `positions[t]` of its KV; the page table is the one after the
//! append (it already counts the new tokens). Its rows go to page `pages(b)[pos / page_size]`,
//! slot `pos % page_size`, every KV head; nothing else of the pool changes. Where each token goes
//! and every check on the indices is [`crate::layout::append_offsets`], shared with the GPU op
//! (`crate::page`).
//!
//! K and V as two tensors: [`append_paged_kv_cache`]; as one `[pages, 2, ...]` tensor (the
//! description's `v_offset` is set): [`append_paged_kv_cache_combined`], which takes the one buffer
//! once, so that K and V need no aliasing mutable borrows. The same split as
//! [`PagedKv::new`](crate::layout::PagedKv::new) / [`PagedKv::combined`](crate::layout::PagedKv::combined).

use super::check::check_buf;
use crate::dtype::Element;
use crate::error::{ensure, invalid, Result};
use crate::layout::{append_offsets, PageTable, PagedKvDesc};

/// Validates an append and returns each token's K-tensor offset of its head-0 row.
fn check_append<T>(
    k_new: &[T],
    v_new: &[T],
    batch_indices: &[i32],
    positions: &[i32],
    table: &PageTable,
    desc: &PagedKvDesc,
) -> Result<Vec<usize>> {
    let offsets = append_offsets(table, desc, batch_indices, positions)?;
    let dims = [positions.len(), desc.num_kv_heads, desc.head_dim];
    check_buf("k_new", k_new.len(), &dims, "[nnz, num_kv_heads, head_dim]")?;
    check_buf("v_new", v_new.len(), &dims, "[nnz, num_kv_heads, head_dim]")?;
    Ok(offsets)
}

/// Copies the `[nnz, num_kv_heads, head_dim]` rows of `new` to `cache`, token `t`'s head `h` at
/// `offsets[t] + base + h * head_stride` (all checked to lie inside `cache`).
fn scatter<T: Copy>(
    new: &[T],
    offsets: &[usize],
    base: usize,
    desc: &PagedKvDesc,
    cache: &mut [T],
) {
    let d = desc.head_dim;
    let rows = new.chunks_exact(d);
    let dst = offsets
        .iter()
        .flat_map(|&o| (0..desc.num_kv_heads).map(move |h| o + base + h * desc.head_stride()));
    for (row, o) in rows.zip(dst) {
        cache[o..o + d].copy_from_slice(row);
    }
}

/// Writes new tokens into separate K and V page pools.
///
/// - `k_new`, `v_new`: `[nnz, num_kv_heads, head_dim]`, dense
/// - `batch_indices`, `positions`: `[nnz]`, the request of each token and its position in that
///   request's KV (`0..table.kv_len(request)`)
/// - `table`: the page table after the append; `desc`: the pool (separate tensors, `v_offset`
///   `None`), `k_cache`/`v_cache` its buffers
///
/// Everything is validated before anything is written (see [`append_offsets`]); two tokens
/// writing one slot is an error naming `positions`.
#[allow(clippy::too_many_arguments)]
pub fn append_paged_kv_cache<T: Element>(
    k_new: &[T],
    v_new: &[T],
    batch_indices: &[i32],
    positions: &[i32],
    table: &PageTable,
    desc: &PagedKvDesc,
    k_cache: &mut [T],
    v_cache: &mut [T],
) -> Result<()> {
    ensure(desc.v_offset.is_none(), "desc", || {
        "describes a combined [pages, 2, ...] tensor; use append_paged_kv_cache_combined".into()
    })?;
    let offsets = check_append(k_new, v_new, batch_indices, positions, table, desc)?;
    desc.check_buffers(k_cache.len(), v_cache.len())?;
    scatter(k_new, &offsets, 0, desc, k_cache);
    scatter(v_new, &offsets, 0, desc, v_cache);
    Ok(())
}

/// Writes new tokens into one `[pages, 2, ...]` pool holding K then V of each page (`desc` made by
/// [`PagedKvDesc::combined`], `v_offset` set). Arguments and checks as [`append_paged_kv_cache`].
pub fn append_paged_kv_cache_combined<T: Element>(
    k_new: &[T],
    v_new: &[T],
    batch_indices: &[i32],
    positions: &[i32],
    table: &PageTable,
    desc: &PagedKvDesc,
    kv_cache: &mut [T],
) -> Result<()> {
    let Some(v_offset) = desc.v_offset else {
        return Err(invalid(
            "desc",
            "describes separate K and V tensors; use append_paged_kv_cache",
        ));
    };
    let offsets = check_append(k_new, v_new, batch_indices, positions, table, desc)?;
    let need = desc.required_len();
    ensure(kv_cache.len() >= need, "kv_cache", || {
        format!(
            "has {} elements; the pool of {} pages needs {need}",
            kv_cache.len(),
            desc.num_pages
        )
    })?;
    scatter(k_new, &offsets, 0, desc, kv_cache);
    scatter(v_new, &offsets, v_offset, desc, kv_cache);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Error;
    use crate::layout::{KvLayout, PagedKv};
    use crate::random::SplitMix64;
    use half::f16;

    fn arg_of(r: Result<()>) -> &'static str {
        match r {
            Err(Error::InvalidArgument { arg, .. }) => arg,
            r => panic!("expected InvalidArgument, got {r:?}"),
        }
    }

    /// A batch after an append: `old[i]` tokens were cached, `new[i]` are appended.
    struct Batch {
        table: PageTable,
        batch_indices: Vec<i32>,
        positions: Vec<i32>,
    }

    fn batch(
        old: &[usize],
        new: &[usize],
        page_size: usize,
        rng: &mut SplitMix64,
    ) -> (Batch, usize) {
        let lens: Vec<usize> = old.iter().zip(new).map(|(a, b)| a + b).collect();
        let num_pages = PageTable::pages_needed(&lens, page_size) + 2;
        let mut ids: Vec<i32> = (0..num_pages as i32).collect();
        rng.shuffle(&mut ids);
        let table = PageTable::from_kv_lens(&lens, page_size, &ids, num_pages).unwrap();
        let mut tokens: Vec<(i32, i32)> = (0..old.len())
            .flat_map(|b| (old[b]..old[b] + new[b]).map(move |p| (b as i32, p as i32)))
            .collect();
        rng.shuffle(&mut tokens);
        let (batch_indices, positions) = tokens.into_iter().unzip();
        let b = Batch {
            table,
            batch_indices,
            positions,
        };
        (b, num_pages)
    }

    /// Appends, then reads every new token back through `PagedKv::key/value` and checks that
    /// nothing else of the pool changed.
    fn round_trip(layout: KvLayout, combined: bool, page_size: usize, stride_pad: usize) {
        let mut rng = SplitMix64::new(7 + page_size as u64);
        let (heads, dim) = (3, 8);
        // Request 1 is empty; request 3 gets nothing new; the others cross page boundaries.
        let (b, num_pages) = batch(&[3, 0, 9, 4, 0], &[6, 0, 2, 0, 1], page_size, &mut rng);
        let mut desc = if combined {
            PagedKvDesc::combined(layout, num_pages, page_size, heads, dim)
        } else {
            PagedKvDesc::new(layout, num_pages, page_size, heads, dim)
        }
        .unwrap();
        desc = desc
            .with_page_stride(desc.page_stride + stride_pad)
            .unwrap();
        let n = desc.required_len();
        let (k0, v0): (Vec<f16>, Vec<f16>) = (rng.vec(n, 1.0), rng.vec(n, 1.0));
        let nnz = b.positions.len();
        let k_new: Vec<f16> = rng.vec(nnz * heads * dim, 1.0);
        let v_new: Vec<f16> = rng.vec(nnz * heads * dim, 1.0);
        let (mut k, mut v) = (k0.clone(), v0.clone());
        let args = (&b.batch_indices[..], &b.positions[..], &b.table, &desc);
        if combined {
            append_paged_kv_cache_combined(&k_new, &v_new, args.0, args.1, args.2, args.3, &mut k)
        } else {
            append_paged_kv_cache(
                &k_new, &v_new, args.0, args.1, args.2, args.3, &mut k, &mut v,
            )
        }
        .unwrap();

        let pool = if combined {
            PagedKv::combined(desc, &k)
        } else {
            PagedKv::new(desc, &k, &v)
        }
        .unwrap();
        // Every element the new tokens own, marked; the rest must be unchanged.
        let mut written = vec![false; n];
        let row = heads * dim;
        for t in 0..nnz {
            let (page, slot) = b
                .table
                .locate(b.batch_indices[t] as usize, b.positions[t] as usize);
            for h in 0..heads {
                let src = t * row + h * dim;
                assert_eq!(pool.key(page, slot, h), &k_new[src..src + dim]);
                assert_eq!(pool.value(page, slot, h), &v_new[src..src + dim]);
                let (ko, vo) = (
                    desc.k_offset(page, slot, h),
                    desc.v_offset_of(page, slot, h),
                );
                written[ko..ko + dim].fill(true);
                if combined {
                    written[vo..vo + dim].fill(true);
                }
            }
        }
        for i in (0..n).filter(|&i| !written[i]) {
            assert_eq!(k[i].to_bits(), k0[i].to_bits(), "k[{i}] changed");
            if !combined {
                assert_eq!(v[i].to_bits(), v0[i].to_bits(), "v[{i}] changed");
            }
        }
    }

    #[test]
    fn round_trip_every_layout() {
        for layout in [KvLayout::Nhd, KvLayout::Hnd] {
            for combined in [false, true] {
                for page_size in [1, 3, 4, 16] {
                    for pad in [0, 5] {
                        round_trip(layout, combined, page_size, pad);
                    }
                }
            }
        }
    }

    #[test]
    fn empty_append_is_a_no_op() {
        let table = PageTable::from_kv_lens(&[0, 3], 4, &[1], 2).unwrap();
        let desc = PagedKvDesc::new(KvLayout::Nhd, 2, 4, 1, 4).unwrap();
        let (mut k, mut v) = (vec![1.0f32; 32], vec![2.0f32; 32]);
        append_paged_kv_cache::<f32>(&[], &[], &[], &[], &table, &desc, &mut k, &mut v).unwrap();
        assert!(k.iter().all(|&x| x == 1.0) && v.iter().all(|&x| x == 2.0));
    }

    /// One call's arguments, made bad one at a time.
    #[derive(Clone)]
    struct Args {
        k_new: Vec<f32>,
        v_new: Vec<f32>,
        batch_indices: Vec<i32>,
        positions: Vec<i32>,
        table: PageTable,
        desc: PagedKvDesc,
        k_len: usize,
        v_len: usize,
    }

    #[test]
    fn bad_arguments_are_rejected_before_anything_is_written() {
        // Request 0: 5 tokens on pages [2, 0]; request 1: empty; request 2: 1 token on page [1].
        let table = PageTable::new(&[0, 2, 2, 3], &[2, 0, 1], &[1, 0, 1], 4, 3).unwrap();
        let desc = PagedKvDesc::new(KvLayout::Hnd, 3, 4, 2, 4).unwrap();
        let n = desc.required_len();
        let good = Args {
            k_new: vec![9.0; 8],
            v_new: vec![9.0; 8],
            batch_indices: vec![0],
            positions: vec![4],
            table,
            desc,
            k_len: n,
            v_len: n,
        };
        type Change = fn(&mut Args);
        let cases: [(&str, Change, &str); 16] = [
            (
                "batch index -1",
                |a| a.batch_indices[0] = -1,
                "batch_indices",
            ),
            (
                "batch index = batch",
                |a| a.batch_indices[0] = 3,
                "batch_indices",
            ),
            ("negative position", |a| a.positions[0] = -1, "positions"),
            ("position = kv_len", |a| a.positions[0] = 5, "positions"),
            (
                "empty request",
                |a| (a.batch_indices[0], a.positions[0]) = (1, 0),
                "positions",
            ),
            (
                "past the last page",
                |a| (a.batch_indices[0], a.positions[0]) = (2, 1),
                "positions",
            ),
            (
                "two tokens, one slot",
                |a| {
                    a.batch_indices = vec![0, 0];
                    a.positions = vec![4, 4];
                    a.k_new = vec![9.0; 16];
                    a.v_new = vec![9.0; 16];
                },
                "positions",
            ),
            (
                "positions shorter",
                |a| a.batch_indices.push(0),
                "positions",
            ),
            ("k_new too long", |a| a.k_new.push(0.0), "k_new"),
            ("v_new too short", |a| a.v_new.truncate(7), "v_new"),
            ("k_cache too small", |a| a.k_len -= 1, "k_cache"),
            ("v_cache too small", |a| a.v_len -= 1, "v_cache"),
            (
                "a page outside desc's pool",
                |a| a.table = PageTable::new(&[0, 2], &[2, 3], &[4], 4, 4).unwrap(),
                "kv_indices",
            ),
            ("page sizes differ", |a| a.desc.page_size = 2, "desc"),
            ("head_dim differs", |a| a.desc.head_dim = 2, "k_new"),
            (
                "combined desc",
                |a| a.desc.v_offset = Some(a.desc.page_elems()),
                "desc",
            ),
        ];
        let (k0, v0) = (vec![1.0f32; n], vec![2.0f32; n]);
        let (mut k, mut v) = (k0.clone(), v0.clone());
        for (what, change, want) in cases {
            let mut a = good.clone();
            change(&mut a);
            let r = append_paged_kv_cache(
                &a.k_new,
                &a.v_new,
                &a.batch_indices,
                &a.positions,
                &a.table,
                &a.desc,
                &mut k[..a.k_len],
                &mut v[..a.v_len],
            );
            assert_eq!(arg_of(r), want, "{what}");
        }
        assert_eq!((&k, &v), (&k0, &v0));

        let comb = PagedKvDesc::combined(KvLayout::Hnd, 3, 4, 2, 4).unwrap();
        let mut kv = vec![3.0f32; comb.required_len()];
        let kv0 = kv.clone();
        let g = &good;
        let mut combined = |pos: i32, desc: &PagedKvDesc, len: usize| {
            let r = append_paged_kv_cache_combined(
                &g.k_new,
                &g.v_new,
                &g.batch_indices,
                &[pos],
                &g.table,
                desc,
                &mut kv[..len],
            );
            arg_of(r)
        };
        let len = comb.required_len();
        assert_eq!(combined(4, &desc, len), "desc");
        assert_eq!(combined(4, &comb, len - 1), "kv_cache");
        assert_eq!(combined(7, &comb, len), "positions");
        assert_eq!(kv, kv0);

        // And the good call writes.
        let a = good;
        append_paged_kv_cache(
            &a.k_new,
            &a.v_new,
            &a.batch_indices,
            &a.positions,
            &a.table,
            &a.desc,
            &mut k,
            &mut v,
        )
        .unwrap();
        assert_ne!(k, k0);
    }
}
