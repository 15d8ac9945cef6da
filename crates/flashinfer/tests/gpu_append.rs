//! GPU append_paged_kv_cache against the CPU backend: the same random pool (never zeros) and the
//! same new tokens go through both, and the whole pool must come back bit for bit. Cases: NHD and
//! HND; page sizes 1, 5, 16; separate and combined K/V, with and without a padded page stride;
//! f16, bf16 (and f32); head_dim 64, 128, 256; batches with empty requests, requests with nothing
//! new, and several new tokens per request crossing page boundaries, in shuffled order, on a
//! shuffled page pool.

mod support;

use flashinfer::cuda::{CudaSlice, DevSlice, DevSliceMut, Device, DeviceRepr};
use flashinfer::layout::{KvLayout, PageTable, PagedKvDesc};
use flashinfer::page::{append_paged_kv_cache, append_paged_kv_cache_combined, PagedKvAppend};
use flashinfer::random::SplitMix64;
use flashinfer::{reference, DType, Element, Error};
use half::{bf16, f16};
use support::*;

/// A step of appends: the page table after it and where each new token goes.
struct Step {
    table: PageTable,
    batch_indices: Vec<i32>,
    positions: Vec<i32>,
}

/// Tokens `old[i]..old[i] + new[i]` of each request, in shuffled order, on the pages of `table`.
fn step(table: PageTable, old: &[usize], new: &[usize], rng: &mut SplitMix64) -> Step {
    let mut tokens: Vec<(i32, i32)> = (0..old.len())
        .flat_map(|b| (old[b]..old[b] + new[b]).map(move |p| (b as i32, p as i32)))
        .collect();
    rng.shuffle(&mut tokens);
    let (batch_indices, positions) = tokens.into_iter().unzip();
    Step {
        table,
        batch_indices,
        positions,
    }
}

/// A table over `num_pages` shuffled pages holding `lens` tokens per request.
fn table_for(lens: &[usize], page_size: usize, rng: &mut SplitMix64) -> (PageTable, usize) {
    let num_pages = PageTable::pages_needed(lens, page_size) + 3; // a few pages nobody uses
    let mut ids: Vec<i32> = (0..num_pages as i32).collect();
    rng.shuffle(&mut ids);
    (
        PageTable::from_kv_lens(lens, page_size, &ids, num_pages).unwrap(),
        num_pages,
    )
}

fn make_desc(
    layout: KvLayout,
    combined: bool,
    num_pages: usize,
    page_size: usize,
    kv_heads: usize,
    head_dim: usize,
    stride_pad: usize,
) -> PagedKvDesc {
    let d = if combined {
        PagedKvDesc::combined(layout, num_pages, page_size, kv_heads, head_dim)
    } else {
        PagedKvDesc::new(layout, num_pages, page_size, kv_heads, head_dim)
    }
    .unwrap();
    d.with_page_stride(d.page_stride + stride_pad).unwrap()
}

/// A pool on the host and on the device (V empty when combined).
struct Pool<T: DeviceRepr> {
    k: Vec<T>,
    v: Vec<T>,
    dk: CudaSlice<T>,
    dv: Option<CudaSlice<T>>,
}

impl<T: Element + DeviceRepr> Pool<T> {
    fn random(dev: &Device, desc: &PagedKvDesc, rng: &mut SplitMix64) -> Self {
        let n = desc.required_len();
        let k: Vec<T> = rng.vec(n, 1.0);
        let v: Vec<T> = if desc.v_offset.is_some() {
            Vec::new()
        } else {
            rng.vec(n, 1.0)
        };
        let dk = upload(dev, &k);
        let dv = (!v.is_empty()).then(|| upload(dev, &v));
        Self { k, v, dk, dv }
    }

    /// The CPU backend's append on the host copy.
    fn append_cpu(&mut self, s: &Step, desc: &PagedKvDesc, k_new: &[T], v_new: &[T]) {
        let (bi, pos, t) = (&s.batch_indices[..], &s.positions[..], &s.table);
        if desc.v_offset.is_some() {
            reference::append_paged_kv_cache_combined(k_new, v_new, bi, pos, t, desc, &mut self.k)
        } else {
            reference::append_paged_kv_cache(
                k_new,
                v_new,
                bi,
                pos,
                t,
                desc,
                &mut self.k,
                &mut self.v,
            )
        }
        .unwrap();
    }

    /// Runs a planned append on the device copy.
    fn append_gpu(
        &mut self,
        dev: &Device,
        op: &PagedKvAppend,
        desc: &PagedKvDesc,
        k_new: &CudaSlice<T>,
        v_new: &CudaSlice<T>,
    ) -> Result<(), Error> {
        let st = dev.stream();
        let (kn, vn) = (DevSlice::new(k_new, st), DevSlice::new(v_new, st));
        match &mut self.dv {
            None => op.run_combined(kn, vn, DevSliceMut::new(&mut self.dk, st), desc),
            Some(dv) => op.run(
                kn,
                vn,
                DevSliceMut::new(&mut self.dk, st),
                DevSliceMut::new(dv, st),
                desc,
            ),
        }
    }

    /// The device copy equals the host copy, bit for bit.
    fn assert_same(&self, dev: &Device, what: &str) {
        let bits = |v: &[T]| v.iter().map(|x| x.to_f32().to_bits()).collect::<Vec<_>>();
        let check = |name: &str, got: Vec<T>, want: &[T]| {
            let (g, w) = (bits(&got), bits(want));
            if let Some(i) = (0..w.len()).find(|&i| g[i] != w[i]) {
                panic!(
                    "{what}: {name}[{i}] = {:?}, want {:?} ({} of {} elements differ)",
                    got[i],
                    want[i],
                    (0..w.len()).filter(|&i| g[i] != w[i]).count(),
                    w.len()
                );
            }
        };
        check("k_cache", download(dev, &self.dk), &self.k);
        if let Some(dv) = &self.dv {
            check("v_cache", download(dev, dv), &self.v);
        }
    }
}

#[derive(Clone, Copy, Debug)]
struct Case {
    layout: KvLayout,
    page_size: usize,
    combined: bool,
    head_dim: usize,
    kv_heads: usize,
    stride_pad: usize,
}

/// One append of a random batch through a reused op, GPU against CPU over the whole pool.
fn run_case<T: Element + DeviceRepr>(
    dev: &Device,
    op: &mut PagedKvAppend,
    c: Case,
    rng: &mut SplitMix64,
) {
    let p = c.page_size;
    // Request 0 is empty, request 1 gets nothing new, request 2 starts from nothing; the others
    // have random lengths, old and new, that cross page boundaries.
    let mut old = vec![0, 1 + rng.below(3 * p), 0];
    let mut new = vec![0, 0, 1 + rng.below(2 * p + 2)];
    for _ in 0..3 + rng.below(4) {
        old.push(rng.below(3 * p + 2));
        new.push(1 + rng.below(2 * p + 2));
    }
    let lens: Vec<usize> = old.iter().zip(&new).map(|(a, b)| a + b).collect();
    let (table, num_pages) = table_for(&lens, p, rng);
    let s = step(table, &old, &new, rng);
    let desc = make_desc(
        c.layout,
        c.combined,
        num_pages,
        p,
        c.kv_heads,
        c.head_dim,
        c.stride_pad,
    );
    let what = format!("{c:?} {} lens {lens:?} new {new:?}", T::DTYPE);

    let mut pool = Pool::<T>::random(dev, &desc, rng);
    let nnz = s.positions.len();
    let k_new: Vec<T> = rng.vec(nnz * c.kv_heads * c.head_dim, 1.0);
    let v_new: Vec<T> = rng.vec(nnz * c.kv_heads * c.head_dim, 1.0);
    let (dk_new, dv_new) = (upload(dev, &k_new), upload(dev, &v_new));

    op.plan(&s.table, &s.batch_indices, &s.positions, &desc)
        .unwrap_or_else(|e| panic!("{what}: plan: {e}"));
    pool.append_gpu(dev, op, &desc, &dk_new, &dv_new)
        .unwrap_or_else(|e| panic!("{what}: run: {e}"));
    pool.append_cpu(&s, &desc, &k_new, &v_new);
    pool.assert_same(dev, &what);
}

fn every_case<T: Element + DeviceRepr>(test: &str) {
    let dev = device();
    let mut rng = Rng::fresh(test);
    let mut op = PagedKvAppend::new(&dev, T::DTYPE).unwrap();
    let mut n = 0;
    for layout in [KvLayout::Nhd, KvLayout::Hnd] {
        for page_size in [1, 5, 16] {
            for combined in [false, true] {
                for head_dim in [64, 128, 256] {
                    let c = Case {
                        layout,
                        page_size,
                        combined,
                        head_dim,
                        kv_heads: 1 + rng.below(4),
                        // Half the cases view a larger, layer-interleaved pool (32 bytes apart).
                        stride_pad: (n % 2) * 32 / T::DTYPE.size_bytes(),
                    };
                    run_case::<T>(&dev, &mut op, c, &mut rng);
                    n += 1;
                }
            }
        }
    }
    eprintln!("{test}: {n} cases bit-exact");
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn append_matches_cpu_f16() {
    every_case::<f16>("append_matches_cpu_f16");
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn append_matches_cpu_bf16() {
    every_case::<bf16>("append_matches_cpu_bf16");
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn append_matches_cpu_f32() {
    every_case::<f32>("append_matches_cpu_f32");
}

/// A serving loop on one op and one pool: a chunk of prefill tokens, then decode steps of one
/// token per request (and a request joining late), re-planned each step; the last steps go through
/// the free functions. The workspace grows from the op's initial 512 tokens.
#[test]
#[ignore = "needs a CUDA GPU"]
fn append_over_several_steps() {
    let dev = device();
    let mut rng = Rng::fresh("append_over_several_steps");
    for combined in [false, true] {
        let (page_size, kv_heads, head_dim) = (16, 2, 128);
        // Enough pages for the final lengths, shuffled; each step's table takes a prefix per
        // request of a fixed per-request page list, as a real cache grows.
        let chunk = [300, 0, 500, 17];
        let steps = 4;
        let max_len: Vec<usize> = chunk.iter().map(|&c| c + steps + 1).collect();
        let per_req: Vec<usize> = max_len.iter().map(|&l| l.div_ceil(page_size)).collect();
        let num_pages: usize = per_req.iter().sum::<usize>() + 2;
        let mut ids: Vec<i32> = (0..num_pages as i32).collect();
        rng.shuffle(&mut ids);
        let mut owned = Vec::new();
        let mut at = 0;
        for &n in &per_req {
            owned.push(ids[at..at + n].to_vec());
            at += n;
        }
        let desc = make_desc(
            KvLayout::Hnd,
            combined,
            num_pages,
            page_size,
            kv_heads,
            head_dim,
            0,
        );
        let mut pool = Pool::<bf16>::random(&dev, &desc, &mut rng);
        let mut op = PagedKvAppend::new(&dev, DType::BF16).unwrap();
        let mut lens = vec![0usize; chunk.len()];
        for i in 0..=steps {
            // Step 0 appends the prefill chunks (request 1 has none yet); then one token each.
            let new: Vec<usize> = if i == 0 { chunk.to_vec() } else { vec![1; 4] };
            let old = lens.clone();
            for (l, n) in lens.iter_mut().zip(&new) {
                *l += n;
            }
            let mut indptr = vec![0i32];
            let mut indices = Vec::new();
            let mut last = Vec::new();
            for (b, &l) in lens.iter().enumerate() {
                let pages = l.div_ceil(page_size);
                indices.extend_from_slice(&owned[b][..pages]);
                indptr.push(indices.len() as i32);
                last.push(if l == 0 {
                    0
                } else {
                    (l - (pages - 1) * page_size) as i32
                });
            }
            let table = PageTable::new(&indptr, &indices, &last, page_size, num_pages).unwrap();
            let s = step(table, &old, &new, &mut rng);
            let nnz = s.positions.len();
            let k_new: Vec<bf16> = rng.vec(nnz * kv_heads * head_dim, 1.0);
            let v_new: Vec<bf16> = rng.vec(nnz * kv_heads * head_dim, 1.0);
            let (dk_new, dv_new) = (upload(&dev, &k_new), upload(&dev, &v_new));
            if i < steps {
                op.plan(&s.table, &s.batch_indices, &s.positions, &desc)
                    .unwrap();
                pool.append_gpu(&dev, &op, &desc, &dk_new, &dv_new).unwrap();
            } else {
                let st = dev.stream();
                let (kn, vn) = (DevSlice::new(&dk_new, st), DevSlice::new(&dv_new, st));
                let (bi, pos, t) = (&s.batch_indices[..], &s.positions[..], &s.table);
                match &mut pool.dv {
                    None => {
                        let kv = DevSliceMut::new(&mut pool.dk, st);
                        append_paged_kv_cache_combined(&dev, kn, vn, bi, pos, t, &desc, kv)
                    }
                    Some(dv) => {
                        let k = DevSliceMut::new(&mut pool.dk, st);
                        let v = DevSliceMut::new(dv, st);
                        append_paged_kv_cache(&dev, kn, vn, bi, pos, t, &desc, k, v)
                    }
                }
                .unwrap();
            }
            pool.append_cpu(&s, &desc, &k_new, &v_new);
        }
        pool.assert_same(&dev, &format!("combined {combined}: after {steps} steps"));
    }
}

fn arg_of(r: Result<(), Error>) -> &'static str {
    match r {
        Err(Error::InvalidArgument { arg, .. }) => arg,
        r => panic!("expected InvalidArgument, got {r:?}"),
    }
}

/// Bad input is a typed error naming the argument, and nothing is written.
#[test]
#[ignore = "needs a CUDA GPU"]
fn bad_input_is_a_typed_error_and_nothing_is_written() {
    let dev = device();
    let st = dev.stream();
    let mut rng = Rng::fresh("bad_input_is_a_typed_error_and_nothing_is_written");
    let (page_size, kv_heads, head_dim) = (5, 2, 64);
    let (table, num_pages) = table_for(&[7, 0, 3], page_size, &mut rng);
    let desc = make_desc(
        KvLayout::Nhd,
        false,
        num_pages,
        page_size,
        kv_heads,
        head_dim,
        0,
    );
    let mut pool = Pool::<f16>::random(&dev, &desc, &mut rng);
    let row = kv_heads * head_dim;
    let k_new: Vec<f16> = rng.vec(2 * row, 1.0);
    let (dk_new, dv_new) = (upload(&dev, &k_new), upload(&dev, &k_new));
    let mut op = PagedKvAppend::new(&dev, DType::F16).unwrap();
    let good = (vec![0, 2], vec![6, 2]);

    // Plans that fail: the op then has no plan, so run() refuses too.
    for (bi, pos, want) in [
        (vec![0, 3], vec![6, 2], "batch_indices"),
        (vec![0, -1], vec![6, 2], "batch_indices"),
        (vec![0, 2], vec![7, 2], "positions"),
        (vec![0, 2], vec![6, -1], "positions"),
        (vec![0, 1], vec![6, 0], "positions"),
        (vec![0, 0], vec![6, 6], "positions"),
        (vec![0, 2], vec![6], "positions"),
    ] {
        op.plan(&table, &good.0, &good.1, &desc).unwrap();
        assert_eq!(
            arg_of(op.plan(&table, &bi, &pos, &desc)),
            want,
            "{bi:?} {pos:?}"
        );
        assert_eq!(
            arg_of(pool.append_gpu(&dev, &op, &desc, &dk_new, &dv_new)),
            "self",
            "run after a failed plan"
        );
        let dv = pool.dv.as_mut().unwrap();
        let r = append_paged_kv_cache(
            &dev,
            DevSlice::new(&dk_new, st),
            DevSlice::new(&dv_new, st),
            &bi,
            &pos,
            &table,
            &desc,
            DevSliceMut::new(&mut pool.dk, st),
            DevSliceMut::new(dv, st),
        );
        assert_eq!(arg_of(r), want, "free function: {bi:?} {pos:?}");
    }

    // Runs that fail after a good plan.
    op.plan(&table, &good.0, &good.1, &desc).unwrap();
    let other = make_desc(
        KvLayout::Hnd,
        false,
        num_pages,
        page_size,
        kv_heads,
        head_dim,
        0,
    );
    assert_eq!(
        arg_of(pool.append_gpu(&dev, &op, &other, &dk_new, &dv_new)),
        "desc"
    );
    let short = upload(&dev, &k_new[..row]);
    assert_eq!(
        arg_of(pool.append_gpu(&dev, &op, &desc, &short, &dv_new)),
        "k_new"
    );
    assert_eq!(
        arg_of(pool.append_gpu(&dev, &op, &desc, &dk_new, &short)),
        "v_new"
    );
    {
        // A pool that starts one element (2 bytes) into a larger allocation.
        let n = desc.required_len();
        let mut big: CudaSlice<f16> = upload(&dev, &vec![f16::ZERO; n + 8]);
        let base = DevSliceMut::new(&mut big, st).ptr();
        // SAFETY: n elements from element 1 lie inside the live allocation of n + 8; the op
        // rejects the pointer before any launch.
        let k_off = unsafe { DevSliceMut::<f16>::from_raw(base + 2, n) };
        let dv = pool.dv.as_mut().unwrap();
        let r = op.run(
            DevSlice::new(&dk_new, st),
            DevSlice::new(&dv_new, st),
            k_off,
            DevSliceMut::new(dv, st),
            &desc,
        );
        let msg = format!("{:?}", r);
        assert_eq!(arg_of(r), "k_cache", "misaligned pool");
        assert!(msg.contains("16-byte aligned"), "{msg}");
        assert!(download(&dev, &big).iter().all(|x| *x == f16::ZERO));
    }
    let wrong_type: CudaSlice<bf16> = upload(&dev, &vec![bf16::ZERO; 2 * row]);
    let mut pool_bf16 = Pool::<bf16>::random(&dev, &desc, &mut rng);
    assert_eq!(
        arg_of(pool_bf16.append_gpu(&dev, &op, &desc, &wrong_type, &wrong_type)),
        "k_new"
    );

    // Nothing above reached the pool.
    pool.assert_same(&dev, "after rejected calls");
    pool_bf16.assert_same(&dev, "after rejected calls");

    // And the good plan still runs.
    pool.append_gpu(&dev, &op, &desc, &dk_new, &dv_new).unwrap();
    let s = Step {
        table: table.clone(),
        batch_indices: good.0.clone(),
        positions: good.1.clone(),
    };
    pool.append_cpu(&s, &desc, &k_new, &k_new);
    pool.assert_same(&dev, "after the good run");
}
