//! Where appended tokens go: the host side of `append_paged_kv_cache`, shared by the CPU backend
//! (`reference::append`) and the GPU op (`page`).
//!
//! New token `t` belongs to request `batch_indices[t]` at position `positions[t]` of that
//! request's KV. The page table is the one *after* the append, so the position is below the
//! request's `kv_len`; the token's rows go to page `pages(b)[pos / page_size]`, slot
//! `pos % page_size`, for every KV head.

use super::{PageTable, PagedKvDesc};
use crate::error::{ensure, invalid, Result};

/// Validates an append against its page table and page pool and returns, for each new token, the
/// element offset in the K tensor of its row of KV head 0: `page * page_stride + slot *
/// token_stride`. Head `h` adds `h * desc.head_stride()`; V adds `desc.v_offset` (combined
/// tensor) or indexes the V tensor with the same offset.
///
/// Checks, naming the argument: `desc` is self-consistent ([`PagedKvDesc::validate`]) and has the
/// table's page size; every page id of the table lies in the pool of `desc.num_pages` pages;
/// `batch_indices` and `positions` have one entry per token; each batch index is a request of the
/// table and each position lies in `0..kv_len` of its request; no two tokens write the same slot
/// (two requests may share a page, so this is checked on (page, slot), not on (request,
/// position)): on the GPU that would be a race, a silently wrong result.
pub fn append_offsets(
    table: &PageTable,
    desc: &PagedKvDesc,
    batch_indices: &[i32],
    positions: &[i32],
) -> Result<Vec<usize>> {
    desc.validate()?;
    ensure(table.page_size() == desc.page_size, "desc", || {
        format!(
            "has page_size {}, the page table {}",
            desc.page_size,
            table.page_size()
        )
    })?;
    for (i, &p) in table.kv_indices().iter().enumerate() {
        ensure(
            p >= 0 && (p as usize) < desc.num_pages,
            "kv_indices",
            || {
                format!(
                    "kv_indices[{i}] = {p} is outside the pool of {} pages",
                    desc.num_pages
                )
            },
        )?;
    }
    ensure(positions.len() == batch_indices.len(), "positions", || {
        format!(
            "has {} entries, batch_indices has {}: one of each per new token",
            positions.len(),
            batch_indices.len()
        )
    })?;

    let batch = table.batch_size();
    // (slot id in the pool, token): sorted, equal neighbours are two tokens writing one slot.
    let mut slots = Vec::with_capacity(positions.len());
    for (t, (&b, &pos)) in batch_indices.iter().zip(positions).enumerate() {
        ensure(b >= 0 && (b as usize) < batch, "batch_indices", || {
            format!("batch_indices[{t}] = {b} is outside the batch of {batch} requests")
        })?;
        let kv_len = table.kv_len(b as usize);
        ensure(pos >= 0 && (pos as usize) < kv_len, "positions", || {
            format!(
                "positions[{t}] = {pos} is outside 0..{kv_len}, the KV length of request {b} \
                 (the page table must already count the appended tokens)"
            )
        })?;
        let (page, slot) = table.locate(b as usize, pos as usize);
        slots.push((page * desc.page_size + slot, t));
    }
    slots.sort_unstable();
    if let Some(w) = slots.windows(2).find(|w| w[0].0 == w[1].0) {
        let (s, a, b) = (w[0].0, w[0].1, w[1].1);
        return Err(invalid(
            "positions",
            format!(
                "tokens {a} (request {}, position {}) and {b} (request {}, position {}) both \
                 write slot {} of page {}",
                batch_indices[a],
                positions[a],
                batch_indices[b],
                positions[b],
                s % desc.page_size,
                s / desc.page_size
            ),
        ));
    }

    Ok(batch_indices
        .iter()
        .zip(positions)
        .map(|(&b, &pos)| {
            let (page, slot) = table.locate(b as usize, pos as usize);
            desc.k_offset(page, slot, 0)
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Error;
    use crate::layout::KvLayout;

    fn arg_of(e: Error) -> &'static str {
        match e {
            Error::InvalidArgument { arg, .. } => arg,
            e => panic!("expected InvalidArgument, got {e}"),
        }
    }

    #[test]
    fn offsets_follow_the_page_table() {
        // Request 0: 7 tokens on pages [3, 0]; request 1: empty; request 2: 2 tokens on page [2].
        let table = PageTable::new(&[0, 2, 2, 3], &[3, 0, 2], &[3, 0, 2], 4, 4).unwrap();
        for layout in [KvLayout::Nhd, KvLayout::Hnd] {
            let desc = PagedKvDesc::combined(layout, 4, 4, 2, 8).unwrap();
            let off = append_offsets(&table, &desc, &[0, 2, 0, 0], &[6, 1, 3, 4]).unwrap();
            let ts = desc.token_stride();
            let ps = desc.page_stride;
            assert_eq!(off, [2 * ts, 2 * ps + ts, 3 * ps + 3 * ts, 0]);
        }
    }

    #[test]
    fn shared_pages_are_checked_by_slot() {
        // Requests 0 and 1 share page 1 (a common prefix): position 0 of both is the same slot.
        let table = PageTable::new(&[0, 1, 2], &[1, 1], &[2, 2], 4, 2).unwrap();
        let desc = PagedKvDesc::new(KvLayout::Nhd, 2, 4, 1, 8).unwrap();
        assert!(append_offsets(&table, &desc, &[0, 1], &[0, 1]).is_ok());
        let e = append_offsets(&table, &desc, &[0, 1], &[1, 1]).unwrap_err();
        assert!(e.to_string().contains("slot 1 of page 1"), "{e}");
        assert_eq!(arg_of(e), "positions");
    }

    #[test]
    fn bad_descriptions_are_rejected() {
        let table = PageTable::from_kv_lens(&[5], 4, &[0, 1], 2).unwrap();
        let good = PagedKvDesc::new(KvLayout::Nhd, 2, 4, 1, 8).unwrap();
        let cases: [(PagedKvDesc, &str); 6] = [
            (
                PagedKvDesc {
                    page_size: 2,
                    ..good
                },
                "desc",
            ),
            (
                PagedKvDesc {
                    num_pages: 1,
                    ..good
                },
                "kv_indices",
            ),
            (
                PagedKvDesc {
                    head_dim: 0,
                    ..good
                },
                "head_dim",
            ),
            (
                PagedKvDesc {
                    page_stride: 31,
                    ..good
                },
                "page_stride",
            ),
            (
                PagedKvDesc {
                    v_offset: Some(16),
                    ..good
                },
                "v_offset",
            ),
            (
                PagedKvDesc {
                    page_stride: usize::MAX / 2,
                    num_pages: 3,
                    ..good
                },
                "page_stride",
            ),
        ];
        for (desc, arg) in cases {
            let e = append_offsets(&table, &desc, &[0], &[4]).unwrap_err();
            assert_eq!(arg_of(e), arg, "{desc:?}");
        }
    }
}
