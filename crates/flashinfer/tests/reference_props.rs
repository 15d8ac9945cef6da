//! Property tests of the CPU backend against a naive f64 implementation written here.
//!
//! The naive implementation is deliberately plain: per request, dense `q [qo_len, hq, d]`,
//! `k, v [kv_len, hkv, d]` and a boolean visibility matrix `[qo_len, kv_len]` computed from the
//! conventions of DESIGN.md independently of the library (causal from the formula, custom masks
//! packed by hand), then `softmax(q·kᵀ·scale + mask)·v` in f64. The paged / ragged inputs the
//! backend sees are built from those dense tensors; unused pool memory is NaN so that a gather
//! reading outside its request fails, and outputs are NaN-poisoned before every call so that an
//! unwritten element fails.
//!
//! Tolerance (DESIGN.md): relative L2 error against f64 of 2e-3 for f16 outputs, 1e-2 for bf16,
//! and 1e-5 for f32. The f64 reference reads the very same (rounded) input values, so what is
//! measured is the backend's f32 arithmetic plus the rounding of its output.

use flashinfer::layout::{
    CustomMask, HeadConfig, KvLayout, PageTable, PagedKv, PagedKvDesc, Ragged,
};
use flashinfer::reference::{self, rel_l2_error};
use flashinfer::{AttentionParams, DType, Element, LseBase, MaskMode};
use half::{bf16, f16};
use proptest::prelude::*;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{RngExt, SeedableRng};

// ---------------------------------------------------------------------------------------------
// Random cases
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq)]
enum MaskKind {
    None,
    Causal,
    Custom,
}

/// (query/output type, KV type).
#[derive(Clone, Copy, Debug)]
enum Dtypes {
    F32,
    F16,
    Bf16,
    F32QF16Kv,
    Bf16QF32Kv,
}

#[derive(Clone, Debug)]
struct Case {
    seed: u64,
    /// (qo_len, kv_len) per request; 0 means an empty request.
    lens: Vec<(usize, usize)>,
    page_size: usize,
    layout: KvLayout,
    combined: bool,
    /// Extra elements between pages beyond one page's footprint.
    stride_pad: usize,
    /// Pool pages no request uses.
    extra_pages: usize,
    num_kv_heads: usize,
    group: usize,
    head_dim: usize,
    mask: MaskKind,
    base: LseBase,
    dtypes: Dtypes,
    sm_scale: Option<f32>,
    with_lse: bool,
}

impl Case {
    fn heads(&self) -> HeadConfig {
        HeadConfig::new(
            self.num_kv_heads * self.group,
            self.num_kv_heads,
            self.head_dim,
        )
        .unwrap()
    }
    fn params(&self) -> AttentionParams {
        AttentionParams {
            sm_scale: self.sm_scale,
            lse_base: self.base,
        }
    }
}

fn len_strategy(max: usize) -> impl Strategy<Value = usize> {
    prop_oneof![1 => Just(0usize), 5 => 1..=max]
}

fn case_strategy(max_batch: usize, max_qo: usize, max_kv: usize) -> impl Strategy<Value = Case> {
    let structure = (
        any::<u64>(),
        prop::collection::vec((len_strategy(max_qo), len_strategy(max_kv)), 0..=max_batch),
        1usize..=17,
        prop_oneof![Just(KvLayout::Nhd), Just(KvLayout::Hnd)],
        any::<bool>(),
        prop_oneof![Just(0usize), 1usize..=13],
        0usize..=3,
    );
    let shapes = (
        1usize..=2,
        1usize..=8,
        prop_oneof![Just(8usize), Just(16), Just(64)],
        prop_oneof![
            Just(MaskKind::None),
            Just(MaskKind::Causal),
            Just(MaskKind::Custom)
        ],
        prop_oneof![Just(LseBase::Natural), Just(LseBase::Base2)],
        prop_oneof![
            Just(Dtypes::F32),
            Just(Dtypes::F16),
            Just(Dtypes::Bf16),
            Just(Dtypes::F32QF16Kv),
            Just(Dtypes::Bf16QF32Kv)
        ],
        prop_oneof![Just(None), (0.05f32..1.5).prop_map(Some)],
        prop_oneof![4 => Just(true), 1 => Just(false)],
    );
    (structure, shapes).prop_map(
        |(
            (seed, lens, page_size, layout, combined, stride_pad, extra_pages),
            (num_kv_heads, group, head_dim, mask, base, dtypes, sm_scale, with_lse),
        )| Case {
            seed,
            lens,
            page_size,
            layout,
            combined,
            stride_pad,
            extra_pages,
            num_kv_heads,
            group,
            head_dim,
            mask,
            base,
            dtypes,
            sm_scale,
            with_lse,
        },
    )
}

/// Calls `$f::<Q, KV>(args)` for the case's dtypes.
macro_rules! dispatch {
    ($dtypes:expr, $f:ident($($arg:expr),*)) => {
        match $dtypes {
            Dtypes::F32 => $f::<f32, f32>($($arg),*),
            Dtypes::F16 => $f::<f16, f16>($($arg),*),
            Dtypes::Bf16 => $f::<bf16, bf16>($($arg),*),
            Dtypes::F32QF16Kv => $f::<f32, f16>($($arg),*),
            Dtypes::Bf16QF32Kv => $f::<bf16, f32>($($arg),*),
        }
    };
}

/// DESIGN.md's tolerance for outputs of type `Q`.
fn tolerance<Q: Element>() -> f64 {
    match Q::DTYPE {
        DType::F32 => 1e-5,
        DType::F16 => 2e-3,
        DType::BF16 => 1e-2,
    }
}

/// A random nonzero value of magnitude in `[0.05, 1] * amp`, rounded to `T`.
fn rand_val<T: Element>(rng: &mut StdRng, amp: f32) -> T {
    let mag = rng.random_range(0.05f32..=1.0) * amp;
    T::from_f32(if rng.random_bool(0.5) { mag } else { -mag })
}

fn rand_vec<T: Element>(rng: &mut StdRng, n: usize, amp: f32) -> Vec<T> {
    (0..n).map(|_| rand_val(rng, amp)).collect()
}

fn poison<T: Element>(n: usize) -> Vec<T> {
    vec![T::from_f32(f32::NAN); n]
}

// ---------------------------------------------------------------------------------------------
// Dense requests and the naive f64 reference
// ---------------------------------------------------------------------------------------------

/// One request in dense form: `q [qo_len, hq, d]`, `k, v [kv_len, hkv, d]`,
/// `vis [qo_len, kv_len]` (true = query sees key).
#[derive(Clone)]
struct Req<Q, KV> {
    qo_len: usize,
    kv_len: usize,
    q: Vec<Q>,
    k: Vec<KV>,
    v: Vec<KV>,
    vis: Vec<bool>,
}

/// Visibility from the conventions, independent of the library's code.
fn visibility(kind: MaskKind, qo_len: usize, kv_len: usize, rng: &mut StdRng) -> Vec<bool> {
    let mut vis = vec![true; qo_len * kv_len];
    match kind {
        MaskKind::None => {}
        MaskKind::Causal => {
            for i in 0..qo_len {
                for j in 0..kv_len {
                    vis[i * kv_len + j] = j as i64 <= kv_len as i64 - qo_len as i64 + i as i64;
                }
            }
        }
        MaskKind::Custom => {
            let density = rng.random_range(0.1f64..=0.9);
            for i in 0..qo_len {
                // Some rows fully masked, some fully visible, the rest random.
                let row_kind = rng.random_range(0..6);
                for j in 0..kv_len {
                    vis[i * kv_len + j] = match row_kind {
                        0 => false,
                        1 => true,
                        _ => rng.random_bool(density),
                    };
                }
            }
        }
    }
    vis
}

fn make_reqs<Q: Element, KV: Element>(c: &Case, rng: &mut StdRng) -> Vec<Req<Q, KV>> {
    let (hq, hkv, d) = (c.num_kv_heads * c.group, c.num_kv_heads, c.head_dim);
    c.lens
        .iter()
        .map(|&(qo_len, kv_len)| Req {
            qo_len,
            kv_len,
            q: rand_vec(rng, qo_len * hq * d, 4.0),
            k: rand_vec(rng, kv_len * hkv * d, 1.0),
            v: rand_vec(rng, kv_len * hkv * d, 2.0),
            vis: visibility(c.mask, qo_len, kv_len, rng),
        })
        .collect()
}

/// Naive attention of one request in f64: (out `[qo_len, hq, d]`, natural LSE `[qo_len, hq]`).
fn naive<Q: Element, KV: Element>(
    r: &Req<Q, KV>,
    heads: &HeadConfig,
    scale: f64,
) -> (Vec<f64>, Vec<f64>) {
    let (hq, hkv, d) = (heads.num_qo_heads, heads.num_kv_heads, heads.head_dim);
    let group = hq / hkv;
    let mut out = vec![0.0f64; r.qo_len * hq * d];
    let mut lse = vec![f64::NEG_INFINITY; r.qo_len * hq];
    for i in 0..r.qo_len {
        for h in 0..hq {
            let kh = h / group;
            let q = &r.q[(i * hq + h) * d..(i * hq + h + 1) * d];
            let scores: Vec<(usize, f64)> = (0..r.kv_len)
                .filter(|&j| r.vis[i * r.kv_len + j])
                .map(|j| {
                    let k = &r.k[(j * hkv + kh) * d..(j * hkv + kh + 1) * d];
                    let dot: f64 = q.iter().zip(k).map(|(a, b)| a.to_f64() * b.to_f64()).sum();
                    (j, dot * scale)
                })
                .collect();
            if scores.is_empty() {
                continue;
            }
            let m = scores.iter().map(|s| s.1).fold(f64::NEG_INFINITY, f64::max);
            let z: f64 = scores.iter().map(|s| (s.1 - m).exp()).sum();
            let o = &mut out[(i * hq + h) * d..(i * hq + h + 1) * d];
            for &(j, s) in &scores {
                let p = (s - m).exp() / z;
                let v = &r.v[(j * hkv + kh) * d..(j * hkv + kh + 1) * d];
                for (o, x) in o.iter_mut().zip(v) {
                    *o += p * x.to_f64();
                }
            }
            lse[i * hq + h] = m + z.ln();
        }
    }
    (out, lse)
}

/// Naive attention of every request, concatenated in row order.
fn naive_batch<Q: Element, KV: Element>(reqs: &[Req<Q, KV>], c: &Case) -> (Vec<f64>, Vec<f64>) {
    let heads = c.heads();
    let scale = c.params().scale(c.head_dim) as f64;
    let (mut out, mut lse) = (Vec::new(), Vec::new());
    for r in reqs {
        let (o, l) = naive(r, &heads, scale);
        out.extend(o);
        lse.extend(l);
    }
    (out, lse)
}

/// The custom mask of `reqs`, bit-packed by hand (row-major, little-endian within a byte).
fn pack_mask<Q, KV>(reqs: &[Req<Q, KV>]) -> CustomMask {
    let mut bits = Vec::new();
    let mut indptr = vec![0i32];
    for r in reqs {
        let start = bits.len();
        bits.resize(start + (r.qo_len * r.kv_len).div_ceil(8), 0u8);
        for (e, &on) in r.vis.iter().enumerate() {
            if on {
                bits[start + e / 8] |= 1 << (e % 8);
            }
        }
        indptr.push(bits.len() as i32);
    }
    let qo: Vec<usize> = reqs.iter().map(|r| r.qo_len).collect();
    let kv: Vec<usize> = reqs.iter().map(|r| r.kv_len).collect();
    CustomMask::from_packed(&bits, &indptr, &qo, &kv).unwrap()
}

fn mask_mode(kind: MaskKind, custom: &CustomMask) -> MaskMode<'_> {
    match kind {
        MaskKind::None => MaskMode::None,
        MaskKind::Causal => MaskMode::Causal,
        MaskKind::Custom => MaskMode::Custom(custom),
    }
}

// ---------------------------------------------------------------------------------------------
// Checking results
// ---------------------------------------------------------------------------------------------

fn to_f32<T: Element>(x: &[T]) -> Vec<f32> {
    x.iter().map(|v| v.to_f32()).collect()
}

/// Checks `out` (`[rows, hq, d]`) and `lse` (`[rows, hq]`, in `base`) against the naive f64
/// result (natural LSE): relative L2 error within the tolerance of `Q`, rows that see no key
/// exactly zero with LSE exactly -inf, LSE within 1e-4 relative.
#[allow(clippy::too_many_arguments)] // a test assertion: every argument is one thing to compare
fn check<Q: Element>(
    what: &str,
    out: &[Q],
    lse: Option<&[f32]>,
    want_out: &[f64],
    want_lse: &[f64],
    base: LseBase,
    d: usize,
    tol: f64,
) -> Result<(), TestCaseError> {
    let got = to_f32(out);
    let err = rel_l2_error(&got, want_out);
    prop_assert!(
        err <= tol,
        "{what}: rel L2 error {err:e} > {tol:e} ({:?})",
        Q::DTYPE
    );
    for (r, &wl) in want_lse.iter().enumerate() {
        if wl == f64::NEG_INFINITY {
            prop_assert!(
                got[r * d..(r + 1) * d].iter().all(|&x| x == 0.0),
                "{what}: row {r} sees no key but is not all zeros"
            );
        }
    }
    if let Some(lse) = lse {
        prop_assert_eq!(lse.len(), want_lse.len());
        for (r, (&g, &w)) in lse.iter().zip(want_lse).enumerate() {
            if w == f64::NEG_INFINITY {
                prop_assert!(g == f32::NEG_INFINITY, "{what}: lse[{r}] = {g}, want -inf");
            } else {
                let w = match base {
                    LseBase::Natural => w,
                    LseBase::Base2 => w / std::f64::consts::LN_2,
                };
                prop_assert!(
                    (g as f64 - w).abs() <= 1e-4 * (1.0 + w.abs()),
                    "{what}: lse[{r}] = {g}, want {w} ({base:?})"
                );
            }
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Building the backend's inputs
// ---------------------------------------------------------------------------------------------

/// A page pool holding `reqs`' K/V on shuffled pages, everything else NaN.
struct Pool<KV> {
    desc: PagedKvDesc,
    k: Vec<KV>,
    v: Vec<KV>,
    table: PageTable,
}

impl<KV: Element> Pool<KV> {
    fn kv(&self) -> PagedKv<'_, KV> {
        if self.desc.v_offset.is_some() {
            PagedKv::combined(self.desc, &self.k).unwrap()
        } else {
            PagedKv::new(self.desc, &self.k, &self.v).unwrap()
        }
    }
}

fn build_pool<Q, KV: Element>(reqs: &[Req<Q, KV>], c: &Case, rng: &mut StdRng) -> Pool<KV> {
    let (ps, hkv, d) = (c.page_size, c.num_kv_heads, c.head_dim);
    let kv_lens: Vec<usize> = reqs.iter().map(|r| r.kv_len).collect();
    let needed = PageTable::pages_needed(&kv_lens, ps);
    let num_pages = needed + c.extra_pages;
    let mut ids: Vec<i32> = (0..num_pages as i32).collect();
    ids.shuffle(rng);
    let table = PageTable::from_kv_lens(&kv_lens, ps, &ids[..needed], num_pages).unwrap();

    let desc = if c.combined {
        PagedKvDesc::combined(c.layout, num_pages, ps, hkv, d)
    } else {
        PagedKvDesc::new(c.layout, num_pages, ps, hkv, d)
    }
    .unwrap();
    let desc = desc
        .with_page_stride(desc.page_stride + c.stride_pad)
        .unwrap();
    let page_elems = ps * hkv * d;
    let v_base = if c.combined { page_elems } else { 0 };
    let len = num_pages * desc.page_stride;
    let mut k = poison::<KV>(len);
    let mut v = poison::<KV>(if c.combined { 0 } else { len });

    // Offsets computed here from the layout definitions, not with the library's helpers.
    for (r, req) in reqs.iter().enumerate() {
        for t in 0..req.kv_len {
            let page = table.kv_indices()[table.kv_indptr()[r] as usize + t / ps] as usize;
            let slot = t % ps;
            for h in 0..hkv {
                let o = page * desc.page_stride
                    + match c.layout {
                        KvLayout::Nhd => (slot * hkv + h) * d,
                        KvLayout::Hnd => (h * ps + slot) * d,
                    };
                let src = (t * hkv + h) * d;
                k[o..o + d].copy_from_slice(&req.k[src..src + d]);
                let dst = if c.combined { &mut k } else { &mut v };
                dst[o + v_base..o + v_base + d].copy_from_slice(&req.v[src..src + d]);
            }
        }
    }
    Pool { desc, k, v, table }
}

/// Concatenated q `[nnz_qo, hq, d]`, k and v `[nnz_kv, hkv, d]`, and both indptrs.
fn concat<Q: Element, KV: Element>(
    reqs: &[Req<Q, KV>],
) -> (Vec<Q>, Vec<KV>, Vec<KV>, Ragged, Ragged) {
    let q = reqs.iter().flat_map(|r| r.q.iter().copied()).collect();
    let k = reqs.iter().flat_map(|r| r.k.iter().copied()).collect();
    let v = reqs.iter().flat_map(|r| r.v.iter().copied()).collect();
    let qo: Vec<usize> = reqs.iter().map(|r| r.qo_len).collect();
    let kv: Vec<usize> = reqs.iter().map(|r| r.kv_len).collect();
    (q, k, v, Ragged::from_lens(&qo), Ragged::from_lens(&kv))
}

/// Runs `batch_prefill_ragged` over `reqs` with their own visibility as a custom mask (or
/// `kind`'s mask) into poisoned buffers: (out, lse in `params.lse_base`).
fn run_ragged<Q: Element, KV: Element>(
    reqs: &[Req<Q, KV>],
    kind: MaskKind,
    heads: HeadConfig,
    params: &AttentionParams,
) -> (Vec<Q>, Vec<f32>) {
    let (q, k, v, qo, kv) = concat(reqs);
    let custom = pack_mask(reqs);
    let rows = qo.total() * heads.num_qo_heads;
    let mut out = poison::<Q>(rows * heads.head_dim);
    let mut lse = vec![f32::NAN; rows];
    reference::batch_prefill_ragged(
        &q,
        &qo,
        &k,
        &v,
        &kv,
        heads,
        mask_mode(kind, &custom),
        params,
        &mut out,
        Some(&mut lse),
    )
    .unwrap();
    (out, lse)
}

/// The part of `r` over keys `lo..hi`, with its visibility as the mask.
fn key_slice<Q: Clone, KV: Clone>(r: &Req<Q, KV>, lo: usize, hi: usize, row: usize) -> Req<Q, KV> {
    let vis = (0..r.qo_len)
        .flat_map(|i| r.vis[i * r.kv_len + lo..i * r.kv_len + hi].iter().copied())
        .collect();
    Req {
        qo_len: r.qo_len,
        kv_len: hi - lo,
        q: r.q.clone(),
        k: r.k[lo * row..hi * row].to_vec(),
        v: r.v[lo * row..hi * row].to_vec(),
        vis,
    }
}

// ---------------------------------------------------------------------------------------------
// The properties
// ---------------------------------------------------------------------------------------------

fn prop_paged<Q: Element, KV: Element>(c: &Case) -> Result<(), TestCaseError> {
    let mut rng = StdRng::seed_from_u64(c.seed);
    let reqs = make_reqs::<Q, KV>(c, &mut rng);
    let pool = build_pool(&reqs, c, &mut rng);
    let (q, _, _, qo, _) = concat(&reqs);
    let custom = pack_mask(&reqs);
    let heads = c.heads();
    let rows = qo.total() * heads.num_qo_heads;
    let mut out = poison::<Q>(rows * c.head_dim);
    let mut lse = vec![f32::NAN; rows];
    reference::batch_prefill_paged(
        &q,
        &qo,
        &pool.kv(),
        &pool.table,
        heads,
        mask_mode(c.mask, &custom),
        &c.params(),
        &mut out,
        c.with_lse.then_some(&mut lse[..]),
    )
    .map_err(|e| TestCaseError::fail(e.to_string()))?;
    let (want_out, want_lse) = naive_batch(&reqs, c);
    let lse = c.with_lse.then_some(&lse[..]);
    check(
        "batch_prefill_paged",
        &out,
        lse,
        &want_out,
        &want_lse,
        c.base,
        c.head_dim,
        tolerance::<Q>(),
    )
}

fn prop_ragged_and_single<Q: Element, KV: Element>(c: &Case) -> Result<(), TestCaseError> {
    let mut rng = StdRng::seed_from_u64(c.seed);
    let reqs = make_reqs::<Q, KV>(c, &mut rng);
    let heads = c.heads();
    let params = c.params();
    let (q, k, v, qo, kv) = concat(&reqs);
    let custom = pack_mask(&reqs);
    let rows = qo.total() * heads.num_qo_heads;
    let mut out = poison::<Q>(rows * c.head_dim);
    let mut lse = vec![f32::NAN; rows];
    reference::batch_prefill_ragged(
        &q,
        &qo,
        &k,
        &v,
        &kv,
        heads,
        mask_mode(c.mask, &custom),
        &params,
        &mut out,
        c.with_lse.then_some(&mut lse[..]),
    )
    .map_err(|e| TestCaseError::fail(e.to_string()))?;
    let (want_out, want_lse) = naive_batch(&reqs, c);
    let lse_opt = c.with_lse.then_some(&lse[..]);
    let tol = tolerance::<Q>();
    check(
        "batch_prefill_ragged",
        &out,
        lse_opt,
        &want_out,
        &want_lse,
        c.base,
        c.head_dim,
        tol,
    )?;

    // single_prefill on each request alone, its custom mask being request 0 of a one-request mask.
    let scale = params.scale(c.head_dim) as f64;
    for r in &reqs {
        let one = pack_mask(std::slice::from_ref(r));
        let mut out = poison::<Q>(r.qo_len * heads.num_qo_heads * c.head_dim);
        let mut lse = vec![f32::NAN; r.qo_len * heads.num_qo_heads];
        reference::single_prefill(
            &r.q,
            &r.k,
            &r.v,
            r.qo_len,
            r.kv_len,
            heads,
            mask_mode(c.mask, &one),
            &params,
            &mut out,
            Some(&mut lse),
        )
        .map_err(|e| TestCaseError::fail(e.to_string()))?;
        let (wo, wl) = naive(r, &heads, scale);
        check(
            "single_prefill",
            &out,
            Some(&lse),
            &wo,
            &wl,
            c.base,
            c.head_dim,
            tol,
        )?;
    }
    Ok(())
}

fn prop_decode<Q: Element, KV: Element>(c: &Case) -> Result<(), TestCaseError> {
    // Decode: one query per request, every key visible.
    let mut c = c.clone();
    c.mask = MaskKind::None;
    for l in &mut c.lens {
        l.0 = 1;
    }
    let mut rng = StdRng::seed_from_u64(c.seed);
    let reqs = make_reqs::<Q, KV>(&c, &mut rng);
    let pool = build_pool(&reqs, &c, &mut rng);
    let heads = c.heads();
    let params = c.params();
    let (q, ..) = concat(&reqs);
    let rows = reqs.len() * heads.num_qo_heads;
    let mut out = poison::<Q>(rows * c.head_dim);
    let mut lse = vec![f32::NAN; rows];
    reference::batch_decode(
        &q,
        &pool.kv(),
        &pool.table,
        heads,
        &params,
        &mut out,
        c.with_lse.then_some(&mut lse[..]),
    )
    .map_err(|e| TestCaseError::fail(e.to_string()))?;
    let (want_out, want_lse) = naive_batch(&reqs, &c);
    let tol = tolerance::<Q>();
    let lse_opt = c.with_lse.then_some(&lse[..]);
    check(
        "batch_decode",
        &out,
        lse_opt,
        &want_out,
        &want_lse,
        c.base,
        c.head_dim,
        tol,
    )?;

    let scale = params.scale(c.head_dim) as f64;
    for r in &reqs {
        let mut out = poison::<Q>(heads.num_qo_heads * c.head_dim);
        let mut lse = vec![f32::NAN; heads.num_qo_heads];
        reference::single_decode(
            &r.q,
            &r.k,
            &r.v,
            r.kv_len,
            heads,
            &params,
            &mut out,
            Some(&mut lse),
        )
        .map_err(|e| TestCaseError::fail(e.to_string()))?;
        let (wo, wl) = naive(r, &heads, scale);
        check(
            "single_decode",
            &out,
            Some(&lse),
            &wo,
            &wl,
            c.base,
            c.head_dim,
            tol,
        )?;
    }
    Ok(())
}

/// Splits every request's keys in two at a random point, attends each half, merges the two
/// states (out of place, in place under a random mask, and with no mask) and compares with
/// attention over all the keys. Halves that see no key give -inf states, which must pass the
/// other state through bit for bit.
fn prop_merge_two<Q: Element, KV: Element>(c: &Case) -> Result<(), TestCaseError> {
    let mut rng = StdRng::seed_from_u64(c.seed);
    let reqs = make_reqs::<Q, KV>(c, &mut rng);
    let heads = c.heads();
    let params = c.params();
    let (hq, d) = (heads.num_qo_heads, c.head_dim);
    let row = c.num_kv_heads * d;
    let (mut part_a, mut part_b) = (Vec::new(), Vec::new());
    for r in &reqs {
        let cut = rng.random_range(0..=r.kv_len);
        part_a.push(key_slice(r, 0, cut, row));
        part_b.push(key_slice(r, cut, r.kv_len, row));
    }
    let (v_a, s_a) = run_ragged(&part_a, MaskKind::Custom, heads, &params);
    let (v_b, s_b) = run_ragged(&part_b, MaskKind::Custom, heads, &params);
    let (want_out, want_lse) = naive_batch(&reqs, c);
    let tol = tolerance::<Q>();

    let mut v = poison::<Q>(v_a.len());
    let mut s = vec![f32::NAN; s_a.len()];
    reference::merge_state(&v_a, &s_a, &v_b, &s_b, hq, d, c.base, &mut v, &mut s)
        .map_err(|e| TestCaseError::fail(e.to_string()))?;
    check(
        "merge_state",
        &v,
        Some(&s),
        &want_out,
        &want_lse,
        c.base,
        d,
        tol,
    )?;
    for r in 0..s.len() {
        let (va, vb, vm) = (
            &v_a[r * d..(r + 1) * d],
            &v_b[r * d..(r + 1) * d],
            &v[r * d..(r + 1) * d],
        );
        if s_b[r] == f32::NEG_INFINITY {
            prop_assert!(
                s[r].to_bits() == s_a[r].to_bits() && bits_eq(vm, va),
                "row {r}: -inf b"
            );
        } else if s_a[r] == f32::NEG_INFINITY {
            prop_assert!(
                s[r].to_bits() == s_b[r].to_bits() && bits_eq(vm, vb),
                "row {r}: -inf a"
            );
        }
    }

    // In place with no mask: the same as out of place.
    let (mut v, mut s) = (v_a.clone(), s_a.clone());
    reference::merge_state_in_place(&mut v, &mut s, &v_b, &s_b, None, hq, d, c.base)
        .map_err(|e| TestCaseError::fail(e.to_string()))?;
    check(
        "merge_state_in_place",
        &v,
        Some(&s),
        &want_out,
        &want_lse,
        c.base,
        d,
        tol,
    )?;

    // In place under a random per-sequence mask: masked-off rows keep state a exactly.
    let seq = s_a.len() / hq;
    let mask: Vec<u8> = (0..seq).map(|_| rng.random_range(0u8..3)).collect();
    let (mut v, mut s) = (v_a.clone(), s_a.clone());
    reference::merge_state_in_place(&mut v, &mut s, &v_b, &s_b, Some(&mask), hq, d, c.base)
        .map_err(|e| TestCaseError::fail(e.to_string()))?;
    let (mut sel_v, mut sel_want, mut sel_s, mut sel_lse) = (vec![], vec![], vec![], vec![]);
    for (i, &m) in mask.iter().enumerate() {
        let (rows, elems) = (i * hq..(i + 1) * hq, i * hq * d..(i + 1) * hq * d);
        if m == 0 {
            prop_assert!(
                bits_eq(&v[elems.clone()], &v_a[elems]),
                "masked-off seq {i} changed"
            );
            prop_assert!(
                bits_eq(&s[rows.clone()], &s_a[rows]),
                "masked-off seq {i} lse changed"
            );
        } else {
            sel_v.extend_from_slice(&v[elems.clone()]);
            sel_want.extend_from_slice(&want_out[elems]);
            sel_s.extend_from_slice(&s[rows.clone()]);
            sel_lse.extend_from_slice(&want_lse[rows]);
        }
    }
    check(
        "merge_state_in_place(mask)",
        &sel_v,
        Some(&sel_s),
        &sel_want,
        &sel_lse,
        c.base,
        d,
        tol,
    )
}

/// Splits keys into `num_states` consecutive chunks per request, attends each, merges the
/// `[seq, num_states, heads, dim]` stack with `merge_states`.
fn prop_merge_many<Q: Element, KV: Element>(
    c: &Case,
    num_states: usize,
) -> Result<(), TestCaseError> {
    let mut rng = StdRng::seed_from_u64(c.seed);
    let reqs = make_reqs::<Q, KV>(c, &mut rng);
    let heads = c.heads();
    let params = c.params();
    let (hq, d) = (heads.num_qo_heads, c.head_dim);
    let row = c.num_kv_heads * d;
    let mut parts: Vec<Vec<Req<Q, KV>>> = vec![Vec::new(); num_states];
    for r in &reqs {
        let mut cuts: Vec<usize> = (0..num_states.saturating_sub(1))
            .map(|_| rng.random_range(0..=r.kv_len))
            .collect();
        cuts.sort_unstable();
        cuts.insert(0, 0);
        cuts.push(r.kv_len);
        for (s, part) in parts.iter_mut().enumerate() {
            part.push(key_slice(r, cuts[s], cuts[s + 1], row));
        }
    }
    let states: Vec<(Vec<Q>, Vec<f32>)> = parts
        .iter()
        .map(|p| run_ragged(p, MaskKind::Custom, heads, &params))
        .collect();
    let seq: usize = reqs.iter().map(|r| r.qo_len).sum();
    let mut v = Vec::with_capacity(seq * num_states * hq * d);
    let mut s = Vec::with_capacity(seq * num_states * hq);
    for i in 0..seq {
        for (sv, ss) in &states {
            v.extend_from_slice(&sv[i * hq * d..(i + 1) * hq * d]);
            s.extend_from_slice(&ss[i * hq..(i + 1) * hq]);
        }
    }
    let mut v_out = poison::<Q>(seq * hq * d);
    let mut s_out = vec![f32::NAN; seq * hq];
    reference::merge_states(&v, &s, num_states, hq, d, c.base, &mut v_out, &mut s_out)
        .map_err(|e| TestCaseError::fail(e.to_string()))?;
    let (want_out, want_lse) = naive_batch(&reqs, c);
    // Each state was rounded to Q, then the merge rounds again.
    let tol = 1.5 * tolerance::<Q>();
    check(
        "merge_states",
        &v_out,
        Some(&s_out),
        &want_out,
        &want_lse,
        c.base,
        d,
        tol,
    )
}

/// Split-KV decode: every query row's keys are split into 0..=4 chunks, each chunk attended as a
/// request of its own in one batch, and the chunks merged back with `merge_states_varlen`. A row
/// with no chunk merges nothing: zeros and -inf.
fn prop_merge_varlen<Q: Element, KV: Element>(c: &Case) -> Result<(), TestCaseError> {
    let mut rng = StdRng::seed_from_u64(c.seed);
    let reqs = make_reqs::<Q, KV>(c, &mut rng);
    let heads = c.heads();
    let params = c.params();
    let (hq, d) = (heads.num_qo_heads, c.head_dim);
    let row = c.num_kv_heads * d;
    let (mut chunks, mut counts) = (Vec::new(), Vec::new());
    let (mut want_out, mut want_lse) = (Vec::new(), Vec::new());
    let scale = params.scale(d) as f64;
    for r in &reqs {
        for i in 0..r.qo_len {
            // Query row i alone, as a one-query request.
            let one = Req {
                qo_len: 1,
                kv_len: r.kv_len,
                q: r.q[i * hq * d..(i + 1) * hq * d].to_vec(),
                k: r.k.clone(),
                v: r.v.clone(),
                vis: r.vis[i * r.kv_len..(i + 1) * r.kv_len].to_vec(),
            };
            let n = rng.random_range(0..=4usize);
            if n == 0 {
                want_out.extend(std::iter::repeat_n(0.0, hq * d));
                want_lse.extend(std::iter::repeat_n(f64::NEG_INFINITY, hq));
            } else {
                let (o, l) = naive(&one, &heads, scale);
                want_out.extend(o);
                want_lse.extend(l);
            }
            let mut cuts: Vec<usize> = (0..n.saturating_sub(1))
                .map(|_| rng.random_range(0..=r.kv_len))
                .collect();
            cuts.sort_unstable();
            cuts.insert(0, 0);
            cuts.push(r.kv_len);
            for s in 0..n {
                chunks.push(key_slice(&one, cuts[s], cuts[s + 1], row));
            }
            counts.push(n);
        }
    }
    let (v, s) = run_ragged(&chunks, MaskKind::Custom, heads, &params);
    let indptr = Ragged::from_lens(&counts);
    let mut v_out = poison::<Q>(counts.len() * hq * d);
    let mut s_out = vec![f32::NAN; counts.len() * hq];
    reference::merge_states_varlen(&v, &s, &indptr, hq, d, c.base, &mut v_out, &mut s_out)
        .map_err(|e| TestCaseError::fail(e.to_string()))?;
    let tol = 1.5 * tolerance::<Q>();
    check(
        "merge_states_varlen",
        &v_out,
        Some(&s_out),
        &want_out,
        &want_lse,
        c.base,
        d,
        tol,
    )
}

fn bits_eq<T: Element>(a: &[T], b: &[T]) -> bool {
    a.len() == b.len()
        && a.iter()
            .zip(b)
            .all(|(x, y)| x.to_f32().to_bits() == y.to_f32().to_bits())
}

/// Random states, some -inf (with NaN values, which must never be read), merged with
/// `merge_states` and compared with an f64 merge. A row with one live state is that state bit
/// for bit; a row with none is zeros and -inf.
fn prop_merge_neg_inf<Q: Element>(
    seed: u64,
    seq: usize,
    num_states: usize,
    num_heads: usize,
    d: usize,
    base: LseBase,
) -> Result<(), TestCaseError> {
    let mut rng = StdRng::seed_from_u64(seed);
    let n = seq * num_states * num_heads;
    let dead_p = rng.random_range(0.0f64..=0.9);
    let s: Vec<f32> = (0..n)
        .map(|_| {
            if rng.random_bool(dead_p) {
                f32::NEG_INFINITY
            } else {
                rng.random_range(-6.0f32..6.0)
            }
        })
        .collect();
    let mut v: Vec<Q> = rand_vec(&mut rng, n * d, 3.0);
    for (i, &si) in s.iter().enumerate() {
        if si == f32::NEG_INFINITY {
            v[i * d..(i + 1) * d].fill(Q::from_f32(f32::NAN));
        }
    }
    let mut v_out = poison::<Q>(seq * num_heads * d);
    let mut s_out = vec![f32::NAN; seq * num_heads];
    reference::merge_states(
        &v, &s, num_states, num_heads, d, base, &mut v_out, &mut s_out,
    )
    .map_err(|e| TestCaseError::fail(e.to_string()))?;

    let to_nat = |x: f32| match base {
        LseBase::Natural => x as f64,
        LseBase::Base2 => x as f64 * std::f64::consts::LN_2,
    };
    let (mut want_out, mut want_lse) = (Vec::new(), Vec::new());
    for i in 0..seq {
        for h in 0..num_heads {
            let live: Vec<usize> = (0..num_states)
                .map(|k| (i * num_states + k) * num_heads + h)
                .filter(|&idx| s[idx] != f32::NEG_INFINITY)
                .collect();
            let r = i * num_heads + h;
            if live.len() == 1 {
                let idx = live[0];
                prop_assert!(bits_eq(
                    &v_out[r * d..(r + 1) * d],
                    &v[idx * d..(idx + 1) * d]
                ));
                prop_assert_eq!(s_out[r].to_bits(), s[idx].to_bits());
            }
            if live.is_empty() {
                want_out.extend(std::iter::repeat_n(0.0, d));
                want_lse.push(f64::NEG_INFINITY);
                continue;
            }
            let m = live
                .iter()
                .map(|&idx| to_nat(s[idx]))
                .fold(f64::NEG_INFINITY, f64::max);
            let z: f64 = live.iter().map(|&idx| (to_nat(s[idx]) - m).exp()).sum();
            let mut o = vec![0.0f64; d];
            for &idx in &live {
                let w = (to_nat(s[idx]) - m).exp() / z;
                for (o, x) in o.iter_mut().zip(&v[idx * d..(idx + 1) * d]) {
                    *o += w * x.to_f64();
                }
            }
            want_out.extend(o);
            want_lse.push(m + z.ln());
        }
    }
    check(
        "merge_states(-inf)",
        &v_out,
        Some(&s_out),
        &want_out,
        &want_lse,
        base,
        d,
        tolerance::<Q>(),
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn paged_prefill_matches_naive(c in case_strategy(4, 12, 40)) {
        dispatch!(c.dtypes, prop_paged(&c))?;
    }

    #[test]
    fn ragged_and_single_prefill_match_naive(c in case_strategy(4, 12, 40)) {
        dispatch!(c.dtypes, prop_ragged_and_single(&c))?;
    }

    #[test]
    fn decode_matches_naive(c in case_strategy(6, 1, 60)) {
        dispatch!(c.dtypes, prop_decode(&c))?;
    }

    #[test]
    fn merge_of_split_keys_is_attention_over_all(c in case_strategy(4, 8, 40)) {
        dispatch!(c.dtypes, prop_merge_two(&c))?;
    }

    #[test]
    fn merge_states_of_chunks_is_attention_over_all(
        c in case_strategy(3, 8, 40),
        num_states in 0usize..=4,
    ) {
        // With no state at all every row must come out zeros and -inf.
        let mut c = c;
        if num_states == 0 {
            c.mask = MaskKind::Custom;
            for l in &mut c.lens { l.1 = 0; }
        }
        dispatch!(c.dtypes, prop_merge_many(&c, num_states))?;
    }

    #[test]
    fn merge_states_varlen_is_split_kv_decode(c in case_strategy(3, 4, 40)) {
        dispatch!(c.dtypes, prop_merge_varlen(&c))?;
    }

    #[test]
    fn merge_with_neg_inf_states_is_exact(
        seed in any::<u64>(),
        seq in 0usize..=6,
        num_states in 0usize..=5,
        num_heads in 1usize..=4,
        d in prop_oneof![Just(8usize), Just(16), Just(64)],
        base in prop_oneof![Just(LseBase::Natural), Just(LseBase::Base2)],
        dt in 0usize..3,
    ) {
        match dt {
            0 => prop_merge_neg_inf::<f32>(seed, seq, num_states, num_heads, d, base)?,
            1 => prop_merge_neg_inf::<f16>(seed, seq, num_states, num_heads, d, base)?,
            _ => prop_merge_neg_inf::<bf16>(seed, seq, num_states, num_heads, d, base)?,
        }
    }
}

/// One case by hand covering the paper's "append": 3 new queries after 5 cached keys, causal
/// bottom-right, on pages of 2 with a page stride padded past the footprint.
#[test]
fn append_is_bottom_right_causal() {
    let c = Case {
        seed: 7,
        lens: vec![(3, 8), (4, 2), (0, 5), (2, 0)],
        page_size: 2,
        layout: KvLayout::Hnd,
        combined: true,
        stride_pad: 5,
        extra_pages: 2,
        num_kv_heads: 2,
        group: 5,
        head_dim: 16,
        mask: MaskKind::Causal,
        base: LseBase::Natural,
        dtypes: Dtypes::F32,
        sm_scale: None,
        with_lse: true,
    };
    prop_paged::<f32, f32>(&c).unwrap();
    prop_paged::<f16, f16>(&Case {
        layout: KvLayout::Nhd,
        combined: false,
        ..c.clone()
    })
    .unwrap();
    prop_paged::<bf16, bf16>(&Case {
        base: LseBase::Base2,
        group: 7,
        ..c
    })
    .unwrap();
}
