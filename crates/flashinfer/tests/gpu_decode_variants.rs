//! GPU batch decode with attention variants (RoPE, soft cap, ALiBi, sliding window, sinks: each
//! alone and in combinations) against the CPU backend's definitions
//! (`reference::batch_attention_paged` with one query per request), on both decode kernels (CUDA
//! cores and tensor cores), split and unsplit, GQA 1/4/5, page sizes 1/5/16, f16 and bf16, empty
//! requests, CUDA-graph replays (with RoPE offsets that change every step), and the typed errors
//! of bad variants.

mod support;

use flashinfer::cuda::{DevSlice, DevSliceMut, DeviceRepr, Graph};
use flashinfer::decode::{BatchDecode, DecodeConfig, DecodeTiles, GraphLimits, SingleDecode};
use flashinfer::layout::{HeadConfig, KvLayout, PageTable, PagedKv, PagedKvDesc, Ragged};
use flashinfer::reference::{self, rel_l2_error};
use flashinfer::variant::{alibi_slopes, Rope, Variant};
use flashinfer::{AttentionParams, Element, Error, LseBase, MaskMode};
use support::*;

/// LSE tolerance: fused RoPE rotates the keys in packed 16-bit arithmetic (bf16 cos/sin, each
/// product rounded) and rounds the rotated q for the tensor cores, while the reference rotates in
/// f64; a one-key row's LSE is its logit, which then moves by 2.6e-3 rms at bf16 (a helper's
/// simulation over the tests' input distributions: 6.5e-6 of rows beyond 1e-2, so 1e-2 would fail
/// about one full run in 60). The outputs stay within DESIGN.md's tolerance, checked separately.
fn lse_tolerance(v: &Variant<'_>) -> f32 {
    if v.rope.is_some() {
        2e-2
    } else {
        2e-3
    }
}
/// The per-head tensors of the variants for one head count.
struct HeadTensors {
    slopes: Vec<f32>,
    sinks: Vec<f32>,
}

impl HeadTensors {
    fn new(rng: &mut flashinfer::random::SplitMix64, num_qo_heads: usize) -> Self {
        Self {
            slopes: alibi_slopes(num_qo_heads),
            // Large enough to matter next to a long request's LSE (ln 33000 ~ 10).
            sinks: (0..num_qo_heads).map(|_| 4.0 + rng.sym(4.0)).collect(),
        }
    }

    /// Each built-in alone, then combinations (a soft cap that bends logits of about 1).
    fn variants(&self, window_left: usize) -> Vec<Variant<'_>> {
        let (cap, win) = (Some(2.0), Some(window_left));
        let (slopes, sinks) = (Some(self.slopes.as_slice()), Some(self.sinks.as_slice()));
        vec![
            Variant {
                logits_soft_cap: cap,
                ..Default::default()
            },
            Variant {
                alibi_slopes: slopes,
                ..Default::default()
            },
            Variant {
                window_left: win,
                ..Default::default()
            },
            Variant {
                sinks,
                ..Default::default()
            },
            Variant {
                logits_soft_cap: cap,
                alibi_slopes: slopes,
                ..Default::default()
            },
            Variant {
                window_left: win,
                sinks,
                ..Default::default()
            },
            Variant {
                logits_soft_cap: cap,
                alibi_slopes: slopes,
                window_left: win,
                sinks,
                ..Default::default()
            },
        ]
    }

    /// RoPE alone (Llama 2's base, from position 0 and from large `offsets`), then with every
    /// other built-in (Llama 3's base and a position scale).
    fn rope_variants<'a>(&'a self, window_left: usize, offsets: &'a [i32]) -> Vec<Variant<'a>> {
        let llama3 = Rope {
            theta: 5e5,
            scale: 8.0,
        };
        vec![
            Variant {
                rope: Some(Rope::default()),
                ..Default::default()
            },
            Variant {
                rope: Some(Rope::default()),
                rope_offsets: Some(offsets),
                ..Default::default()
            },
            Variant {
                rope: Some(llama3),
                rope_offsets: Some(offsets),
                logits_soft_cap: Some(2.0),
                alibi_slopes: Some(&self.slopes),
                window_left: Some(window_left),
                sinks: Some(&self.sinks),
            },
        ]
    }
}

#[derive(Clone, Debug)]
struct Case {
    lens: Vec<usize>,
    page_size: usize,
    heads: (usize, usize),
    head_dim: usize,
    layout: KvLayout,
    allow_split: bool,
    /// Whether the plan must split (checked for variants without a window, which shrinks the
    /// planned lengths).
    expect_split: Option<bool>,
    window_left: usize,
    /// Run the RoPE variants instead of the others; each request's offset is this plus up to 999.
    rope_offset: Option<i32>,
}

fn case(lens: Vec<usize>, page_size: usize, heads: (usize, usize), head_dim: usize) -> Case {
    Case {
        lens,
        page_size,
        heads,
        head_dim,
        layout: KvLayout::Nhd,
        allow_split: true,
        expect_split: None,
        window_left: 100,
        rope_offset: None,
    }
}

/// `case` for the RoPE variants, with offsets from `offset`.
fn rope_case(
    lens: Vec<usize>,
    page_size: usize,
    heads: (usize, usize),
    head_dim: usize,
    offset: i32,
) -> Case {
    Case {
        rope_offset: Some(offset),
        ..case(lens, page_size, heads, head_dim)
    }
}

/// Every variant of the case, on both kernels, against the CPU reference.
fn run_case<T: Element + DeviceRepr>(c: &Case, rng: &mut flashinfer::random::SplitMix64) {
    let dev = device();
    let st = dev.stream();
    let heads = HeadConfig::new(c.heads.0, c.heads.1, c.head_dim).unwrap();
    let batch = c.lens.len();
    let num_pages = PageTable::pages_needed(&c.lens, c.page_size) + 2; // pages no request uses
    let mut ids: Vec<i32> = (0..num_pages as i32).collect();
    rng.shuffle(&mut ids);
    let table = PageTable::from_kv_lens(&c.lens, c.page_size, &ids, num_pages).unwrap();
    let desc = PagedKvDesc::new(
        c.layout,
        num_pages,
        c.page_size,
        heads.num_kv_heads,
        c.head_dim,
    )
    .unwrap();
    let k: Vec<T> = rng.vec(desc.required_len(), 1.0);
    let v: Vec<T> = rng.vec(desc.required_len(), 1.0);
    let q: Vec<T> = rng.vec(batch * heads.num_qo_heads * c.head_dim, 3.0);
    let pool = PagedKv::new(desc, &k, &v).unwrap();
    // A non-default scale, so that the soft cap's use of it is checked too.
    let params = AttentionParams {
        sm_scale: Some(0.9 / (c.head_dim as f32).sqrt()),
        lse_base: LseBase::Natural,
    };
    let qo = Ragged::from_lens(&vec![1; batch]);
    let (dq, dk, dv) = (upload(&dev, &q), upload(&dev, &k), upload(&dev, &v));
    let di = upload(&dev, &[table.kv_indices(), &[0]].concat());
    let tensors = HeadTensors::new(rng, heads.num_qo_heads);
    let g = heads.group_size();
    let offsets: Vec<i32> = (0..batch)
        .map(|_| c.rope_offset.unwrap_or(0) + rng.below(1000) as i32)
        .collect();
    let variants = match c.rope_offset {
        Some(_) => tensors.rope_variants(c.window_left, &offsets),
        None => tensors.variants(c.window_left),
    };

    for variant in variants {
        // The CPU backend, with f32 output so that only the GPU's rounding is measured.
        let mut want = vec![0f32; q.len()];
        let mut want_lse = vec![0f32; batch * heads.num_qo_heads];
        reference::batch_attention_paged(
            &to_f32(&q),
            &qo,
            &pool,
            &table,
            heads,
            MaskMode::Causal,
            &params,
            &variant,
            &mut want,
            Some(&mut want_lse),
        )
        .unwrap();
        let cfg = DecodeConfig {
            heads,
            q_dtype: T::DTYPE,
            kv_dtype: T::DTYPE,
            params,
            allow_split: c.allow_split,
        };
        // Every kernel, the producer-warp one included where it fits (set_variant drops the
        // producer warp for RoPE).
        for tiles in decode_kernels(&dev, c.head_dim, g, T::DTYPE, T::DTYPE) {
            let mut op = BatchDecode::with_tiles(&dev, cfg, tiles).unwrap();
            op.set_variant(&variant).unwrap();
            assert_eq!(op.tiles().path, tiles.path, "set_variant keeps the path");
            op.plan(&table).unwrap();
            let what = format!(
                "{} {c:?} {:?} {}",
                variant.key(),
                T::DTYPE,
                op.tiles().name()
            );
            if let (Some(split), None) = (c.expect_split, variant.window_left) {
                assert_eq!(
                    op.schedule().chunk_size.is_some(),
                    split,
                    "{what}: split decision {:?}",
                    op.schedule().chunk_size
                );
            }
            let mut dout = poisoned::<T>(&dev, q.len());
            let mut dlse = poisoned::<f32>(&dev, want_lse.len());
            let run = |o: &mut flashinfer::cuda::CudaSlice<T>,
                       lse: Option<&mut flashinfer::cuda::CudaSlice<f32>>| {
                op.run(
                    DevSlice::new(&dq, st),
                    DevSlice::new(&dk, st),
                    DevSlice::new(&dv, st),
                    &desc,
                    DevSlice::new(&di, st),
                    DevSliceMut::new(o, st),
                    lse.map(|l| DevSliceMut::new(l, st)),
                )
                .unwrap()
            };
            run(&mut dout, Some(&mut dlse));
            let first: Vec<T> = download(&dev, &dout);
            // A second run of the same plan gives the same bits (the split counters reset
            // themselves, and the sink is added once whichever block merges).
            let mut dout2 = poisoned::<T>(&dev, q.len());
            run(&mut dout2, None);
            let second: Vec<T> = download(&dev, &dout2);
            assert!(
                first
                    .iter()
                    .zip(&second)
                    .all(|(a, b)| a.to_f32().to_bits() == b.to_f32().to_bits()),
                "{what}: a second run of the same plan differs"
            );
            let got = to_f32(&first);
            let row = heads.num_qo_heads * c.head_dim;
            for (r, &len) in c.lens.iter().enumerate() {
                let g = &got[r * row..(r + 1) * row];
                if len == 0 {
                    assert!(
                        g.iter().all(|&x| x == 0.0),
                        "{what}: empty request {r} must output zeros"
                    );
                } else {
                    let w: Vec<f64> = want[r * row..(r + 1) * row]
                        .iter()
                        .map(|&x| x as f64)
                        .collect();
                    let err = rel_l2_error(g, &w);
                    assert!(
                        err <= tolerance::<T>(),
                        "{what}: request {r} (kv_len {len}) rel err {err}"
                    );
                }
            }
            // -inf for an empty request, or its sink logit when the variant has sinks.
            check_lse(
                &format!("{what} lse"),
                &download(&dev, &dlse),
                &want_lse,
                lse_tolerance(&variant),
            );
        }
    }
}

/// Batches that forbid splitting (one block per request and KV head), and a large batch.
#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_decode_variants_unsplit() {
    let mut rng = Rng::fresh("decode_variants_unsplit");
    // GQA 4, page boundaries around a 16-key window.
    let mut c = case(vec![0, 1, 15, 16, 17, 33, 300, 1000], 16, (32, 8), 128);
    c.allow_split = false;
    c.expect_split = Some(false);
    c.window_left = 16;
    run_case::<half::bf16>(&c, &mut rng);
    // GQA 5, page size 1, a window of the last key only.
    let mut c = case(vec![17, 0, 1, 511, 64, 5], 1, (10, 2), 64);
    c.allow_split = false;
    c.expect_split = Some(false);
    c.window_left = 0;
    c.layout = KvLayout::Hnd;
    run_case::<half::f16>(&c, &mut rng);
    // GQA 1, head_dim 256, odd page size, a window longer than some requests.
    let mut c = case(vec![100, 3, 0, 257, 99, 101], 5, (8, 8), 256);
    c.allow_split = false;
    c.expect_split = Some(false);
    c.window_left = 99;
    run_case::<half::f16>(&c, &mut rng);
    // A large batch with splitting allowed (the planner may still cut the longest requests into
    // fair-share chunks).
    let lens: Vec<usize> = (0..128).map(|i| [0, 1, 16, 17, 700][i % 5]).collect();
    let mut c = case(lens, 16, (32, 8), 128);
    c.window_left = 64;
    run_case::<half::bf16>(&c, &mut rng);
}

/// Long requests in small batches: split-KV with the partial states merged in the kernel.
#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_decode_variants_split_kv() {
    let mut rng = Rng::fresh("decode_variants_split");
    // GQA 4, a window of 1000 keys split in chunks that start mid-page.
    let mut c = case(vec![33000], 16, (32, 8), 128);
    c.expect_split = Some(true);
    c.window_left = 1000;
    run_case::<half::bf16>(&c, &mut rng);
    // GQA 5, page size 1, with empty and short requests beside the split ones.
    let mut c = case(vec![5000, 0, 3000, 17], 1, (40, 8), 64);
    c.expect_split = Some(true);
    c.window_left = 300;
    run_case::<half::f16>(&c, &mut rng);
    // GQA 1, f16, a window longer than the shorter request.
    let mut c = case(vec![4096, 1], 16, (4, 4), 128);
    c.expect_split = Some(true);
    c.window_left = 2000;
    run_case::<half::f16>(&c, &mut rng);
    // bf16, GQA 5, head_dim 256, HND.
    let mut c = case(vec![20000, 70], 16, (10, 2), 256);
    c.expect_split = Some(true);
    c.window_left = 5000;
    c.layout = KvLayout::Hnd;
    run_case::<half::bf16>(&c, &mut rng);
}

/// Fused RoPE (alone, with large offsets, and with every other built-in) in batches that forbid
/// splitting, and a large batch.
#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_decode_rope_unsplit() {
    let mut rng = Rng::fresh("decode_rope_unsplit");
    // GQA 4, positions past 30000 (the angle reduction), keys across page boundaries.
    let mut c = rope_case(
        vec![0, 1, 15, 16, 17, 33, 300, 1000],
        16,
        (32, 8),
        128,
        30_000,
    );
    c.allow_split = false;
    c.expect_split = Some(false);
    c.window_left = 16;
    run_case::<half::bf16>(&c, &mut rng);
    // GQA 5, page size 1, HND, f16.
    let mut c = rope_case(vec![17, 0, 1, 511, 64, 5], 1, (10, 2), 64, 35_000);
    c.allow_split = false;
    c.expect_split = Some(false);
    c.window_left = 0;
    c.layout = KvLayout::Hnd;
    run_case::<half::f16>(&c, &mut rng);
    // GQA 1, head_dim 256 (the tensor-core kernel's per-n-tile angles), odd page size.
    let mut c = rope_case(vec![100, 3, 0, 257, 99, 101], 5, (8, 8), 256, 20_000);
    c.allow_split = false;
    c.expect_split = Some(false);
    c.window_left = 99;
    run_case::<half::f16>(&c, &mut rng);
    // A large batch with splitting allowed.
    let lens: Vec<usize> = (0..128).map(|i| [0, 1, 16, 17, 700][i % 5]).collect();
    let mut c = rope_case(lens, 16, (32, 8), 128, 1000);
    c.window_left = 64;
    run_case::<half::bf16>(&c, &mut rng);
}

/// Fused RoPE on long requests: split-KV chunks start mid-request, so each chunk's key positions
/// come from its start and the query's from the request's length. Positions reach ~40000.
#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_decode_rope_split_kv() {
    let mut rng = Rng::fresh("decode_rope_split");
    // GQA 4, one long request.
    let mut c = rope_case(vec![33000], 16, (32, 8), 128, 5000);
    c.expect_split = Some(true);
    c.window_left = 1000;
    run_case::<half::bf16>(&c, &mut rng);
    // GQA 5, page size 1, f16, with empty and short requests beside the split ones.
    let mut c = rope_case(vec![5000, 0, 3000, 17], 1, (40, 8), 64, 30_000);
    c.expect_split = Some(true);
    c.window_left = 300;
    run_case::<half::f16>(&c, &mut rng);
    // GQA 1, f16.
    let mut c = rope_case(vec![4096, 1], 16, (4, 4), 128, 30_000);
    c.expect_split = Some(true);
    c.window_left = 2000;
    run_case::<half::f16>(&c, &mut rng);
    // bf16, GQA 5, head_dim 256, HND.
    let mut c = rope_case(vec![20000, 70], 16, (10, 2), 256, 15_000);
    c.expect_split = Some(true);
    c.window_left = 5000;
    c.layout = KvLayout::Hnd;
    run_case::<half::bf16>(&c, &mut rng);
}

/// Contiguous KV of one request, through `SingleDecode::set_variant`: every built-in but RoPE,
/// RoPE alone, and RoPE (with a large offset) with the others.
#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_single_decode_variants() {
    let dev = device();
    let st = dev.stream();
    let mut rng = Rng::fresh("single_decode_variants");
    for (kv_len, (hq, hk), d) in [
        (1usize, (32, 8), 128),
        (4097, (40, 8), 64),
        (0, (8, 8), 128),
        (3000, (8, 8), 256),
    ] {
        let heads = HeadConfig::new(hq, hk, d).unwrap();
        let tensors = HeadTensors::new(&mut rng, hq);
        let q: Vec<half::bf16> = rng.vec(hq * d, 3.0);
        let k: Vec<half::bf16> = rng.vec(kv_len * hk * d, 1.0);
        let v: Vec<half::bf16> = rng.vec(kv_len * hk * d, 1.0);
        // Contiguous KV is a paged cache of one page holding the request.
        let page = kv_len.max(1);
        let pages = usize::from(kv_len > 0);
        let table = PageTable::from_kv_lens(&[kv_len], page, &[0], pages).unwrap();
        let desc = PagedKvDesc::new(KvLayout::Nhd, pages, page, hk, d).unwrap();
        let pool = PagedKv::new(desc, &k, &v).unwrap();
        let params = AttentionParams::default();
        let offset = [30_000 + rng.below(5000) as i32];
        let all = tensors.variants(700).pop().unwrap(); // all four
        let with_rope = tensors.rope_variants(700, &offset);
        let cfg = DecodeConfig {
            heads,
            q_dtype: flashinfer::DType::BF16,
            kv_dtype: flashinfer::DType::BF16,
            params,
            allow_split: true,
        };
        let (dq, dk, dv) = (upload(&dev, &q), upload(&dev, &k), upload(&dev, &v));
        for variant in [all, with_rope[0], with_rope[2]] {
            let mut want = vec![0f32; hq * d];
            let mut want_lse = vec![0f32; hq];
            reference::batch_attention_paged(
                &to_f32(&q),
                &Ragged::from_lens(&[1]),
                &pool,
                &table,
                heads,
                MaskMode::Causal,
                &params,
                &variant,
                &mut want,
                Some(&mut want_lse),
            )
            .unwrap();
            let mut op = SingleDecode::new(&dev, cfg).unwrap();
            op.set_variant(&variant).unwrap();
            let mut dout = poisoned::<half::bf16>(&dev, hq * d);
            let mut dlse = poisoned::<f32>(&dev, hq);
            op.run(
                DevSlice::new(&dq, st),
                DevSlice::new(&dk, st),
                DevSlice::new(&dv, st),
                kv_len,
                DevSliceMut::new(&mut dout, st),
                Some(DevSliceMut::new(&mut dlse, st)),
            )
            .unwrap();
            let what = format!("single decode {} kv_len {kv_len} d{d}", variant.key());
            let got = to_f32(&download(&dev, &dout));
            if kv_len == 0 {
                assert!(got.iter().all(|&x| x == 0.0), "{what}");
            } else {
                let err = rel_l2_error(&got, &want.iter().map(|&x| x as f64).collect::<Vec<_>>());
                assert!(err <= 1e-2, "{what}: rel err {err}");
            }
            check_lse(
                &what,
                &download(&dev, &dlse),
                &want_lse,
                lse_tolerance(&variant),
            );
        }
    }
}

/// CUDA-graph mode with every variant on: `run()` is captured once; each later step re-plans
/// (which rewrites the work list and ALiBi's request lengths in place) and replays the graph.
#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_decode_variants_cuda_graph_replays_after_replan() {
    graph_replays("decode_variants_graph", false);
}

/// The same with RoPE on as well, and every step's own offsets: `set_variant` with only the
/// offsets changed keeps every device address, so the graph captured at the first step replays
/// each later step's offsets after its `plan()`.
#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_decode_rope_cuda_graph_new_offsets_each_step() {
    graph_replays("decode_rope_graph", true);
}

fn graph_replays(test: &str, rope: bool) {
    let dev = device();
    let st = dev.stream();
    let mut rng = Rng::fresh(test);
    let heads = HeadConfig::new(32, 8, 128).unwrap();
    let (page_size, max_batch, max_pages) = (16, 8, 1200);
    let desc = PagedKvDesc::new(KvLayout::Nhd, max_pages, page_size, 8, 128).unwrap();
    let k: Vec<half::bf16> = rng.vec(desc.required_len(), 1.0);
    let v: Vec<half::bf16> = rng.vec(desc.required_len(), 1.0);
    let pool = PagedKv::new(desc, &k, &v).unwrap();
    let (dk, dv) = (upload(&dev, &k), upload(&dev, &v));
    let params = AttentionParams::default();
    let tensors = HeadTensors::new(&mut rng, 32);
    let all = tensors.variants(500).pop().unwrap(); // all four
    let cfg = DecodeConfig {
        heads,
        q_dtype: flashinfer::DType::BF16,
        kv_dtype: flashinfer::DType::BF16,
        params,
        allow_split: true,
    };
    let mut op = BatchDecode::for_cuda_graph(
        &dev,
        cfg,
        GraphLimits {
            max_batch,
            max_pages,
        },
    )
    .unwrap();
    op.set_variant(&all).unwrap();
    let row = 32 * 128;
    let mut dq = upload(&dev, &vec![half::bf16::ZERO; max_batch * row]);
    let mut dout = poisoned::<half::bf16>(&dev, max_batch * row);
    let mut dlse = poisoned::<f32>(&dev, max_batch * 32);
    let mut di = upload(&dev, &vec![0i32; max_pages]);
    let steps: [Vec<usize>; 5] = [
        vec![100, 2000, 0, 17],
        vec![4000, 1, 3, 500, 999, 0, 16, 7],
        vec![15000],
        vec![1],
        vec![0, 0],
    ];
    let mut graph: Option<Graph> = None;
    let mut kernel_name: Option<String> = None;
    for lens in steps {
        let mut ids: Vec<i32> = (0..max_pages as i32).collect();
        rng.shuffle(&mut ids);
        let table = PageTable::from_kv_lens(&lens, page_size, &ids, max_pages).unwrap();
        // Positions up to ~40000 (the longest step has 15000 keys).
        let offsets: Vec<i32> = lens.iter().map(|_| rng.below(25_000) as i32).collect();
        let variant = if rope {
            let v = Variant {
                rope: Some(Rope {
                    theta: 5e5,
                    scale: 8.0,
                }),
                rope_offsets: Some(&offsets),
                ..all
            };
            // The first step switches the kernel (before the capture); the later ones change
            // only the offsets, which the next plan() uploads in place.
            op.set_variant(&v).unwrap();
            let name = op.tiles().name();
            assert_eq!(
                kernel_name.get_or_insert_with(|| name.clone()),
                &name,
                "an offsets change keeps the kernel"
            );
            v
        } else {
            all
        };
        let q: Vec<half::bf16> = rng.vec(lens.len() * row, 3.0);
        st.memcpy_htod(&q, &mut dq).unwrap();
        st.memcpy_htod(table.kv_indices(), &mut di).unwrap();
        st.memcpy_htod(
            &vec![half::bf16::from_f32(f32::NAN); max_batch * row],
            &mut dout,
        )
        .unwrap();
        op.plan(&table).unwrap();
        if graph.is_none() {
            let captured = Graph::capture(st, || {
                op.run(
                    DevSlice::new(&dq, st),
                    DevSlice::new(&dk, st),
                    DevSlice::new(&dv, st),
                    &desc,
                    DevSlice::new(&di, st),
                    DevSliceMut::new(&mut dout, st),
                    Some(DevSliceMut::new(&mut dlse, st)),
                )
            });
            graph = Some(captured.unwrap());
        }
        graph.as_ref().unwrap().replay().unwrap();
        let got = to_f32(&download(&dev, &dout));
        let got_lse = download(&dev, &dlse);
        let mut want = vec![0f32; lens.len() * row];
        let mut want_lse = vec![0f32; lens.len() * 32];
        reference::batch_attention_paged(
            &to_f32(&q),
            &Ragged::from_lens(&vec![1; lens.len()]),
            &pool,
            &table,
            heads,
            MaskMode::Causal,
            &params,
            &variant,
            &mut want,
            Some(&mut want_lse),
        )
        .unwrap();
        for (r, &len) in lens.iter().enumerate() {
            let g = &got[r * row..(r + 1) * row];
            if len == 0 {
                assert!(
                    g.iter().all(|&x| x == 0.0),
                    "{lens:?}: empty request {r} must output zeros"
                );
            } else {
                let w: Vec<f64> = want[r * row..(r + 1) * row]
                    .iter()
                    .map(|&x| x as f64)
                    .collect();
                let err = rel_l2_error(g, &w);
                assert!(
                    err <= 1e-2,
                    "{lens:?}: request {r} (kv_len {len}) rel err {err}"
                );
            }
        }
        check_lse(
            &format!("{lens:?} lse"),
            &got_lse[..lens.len() * 32],
            &want_lse,
            lse_tolerance(&variant),
        );
    }
}

/// Bad variants are typed errors naming the argument, before anything is compiled or launched;
/// a rejected variant leaves the op as it was; RoPE offsets that do not fit the planned batch are
/// refused by `plan()`.
#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_decode_variant_rejects_bad_input() {
    let dev = device();
    let st = dev.stream();
    let heads = HeadConfig::new(8, 2, 64).unwrap();
    let cfg = DecodeConfig {
        heads,
        q_dtype: flashinfer::DType::F16,
        kv_dtype: flashinfer::DType::F16,
        params: AttentionParams::default(),
        allow_split: true,
    };
    let mut op = BatchDecode::new(&dev, cfg).unwrap();
    let plain_name = op.tiles().name();

    let short = [0.5f32; 7];
    let nan = [f32::NAN; 8];
    let negative = [0, -1];
    let two = [0, 1];
    for (arg, v) in [
        (
            "rope_offsets",
            Variant {
                rope: Some(Rope::default()),
                rope_offsets: Some(&negative),
                ..Default::default()
            },
        ),
        (
            "rope_offsets",
            Variant {
                rope_offsets: Some(&two),
                ..Default::default()
            },
        ),
        (
            "rope",
            Variant {
                rope: Some(Rope {
                    theta: 1.0,
                    scale: 1.0,
                }),
                ..Default::default()
            },
        ),
        (
            "rope",
            Variant {
                rope: Some(Rope {
                    theta: 1e4,
                    scale: 0.0,
                }),
                ..Default::default()
            },
        ),
        (
            "alibi_slopes",
            Variant {
                alibi_slopes: Some(&short),
                ..Default::default()
            },
        ),
        (
            "sinks",
            Variant {
                sinks: Some(&nan),
                ..Default::default()
            },
        ),
        (
            "logits_soft_cap",
            Variant {
                logits_soft_cap: Some(0.0),
                ..Default::default()
            },
        ),
        (
            "window_left",
            Variant {
                window_left: Some(usize::MAX),
                ..Default::default()
            },
        ),
    ] {
        let e = op.set_variant(&v).unwrap_err();
        assert!(
            matches!(e, Error::InvalidArgument { arg: a, .. } if a == arg),
            "{arg}: {e}"
        );
    }
    assert_eq!(
        op.tiles().name(),
        plain_name,
        "a rejected variant changes nothing"
    );

    // A variant's kernel only through set_variant (which also passes its values).
    let mut t = DecodeTiles::choose(64, 4, flashinfer::DType::F16, flashinfer::DType::F16);
    t.variant.sinks = true;
    assert!(matches!(
        BatchDecode::with_tiles(&dev, cfg, t).err(),
        Some(Error::InvalidArgument { arg: "tiles", .. })
    ));

    // set_variant drops the plan: run() needs a new plan() (for ALiBi's request lengths).
    let table = PageTable::from_kv_lens(&[20, 3], 16, &[0, 1, 2], 3).unwrap();
    let desc = PagedKvDesc::new(KvLayout::Nhd, 3, 16, 2, 64).unwrap();
    let k = upload(&dev, &vec![half::f16::ONE; desc.required_len()]);
    let q = upload(&dev, &vec![half::f16::ONE; 2 * 8 * 64]);
    let idx = upload(&dev, &[0i32, 1, 2]);
    let mut o = poisoned::<half::f16>(&dev, 2 * 8 * 64);
    op.plan(&table).unwrap();
    let slopes = alibi_slopes(8);
    op.set_variant(&Variant {
        alibi_slopes: Some(&slopes),
        ..Default::default()
    })
    .unwrap();
    assert!(op.tiles().name().ends_with("_alibi"));
    let e = op
        .run(
            DevSlice::new(&q, st),
            DevSlice::new(&k, st),
            DevSlice::new(&k, st),
            &desc,
            DevSlice::new(&idx, st),
            DevSliceMut::new(&mut o, st),
            None,
        )
        .unwrap_err();
    assert!(
        matches!(e, Error::InvalidArgument { arg: "self", .. }),
        "{e}"
    );
    let out = download(&dev, &o);
    assert!(
        out.iter().all(|x| x.to_f32().is_nan()),
        "nothing may be written on a rejected call"
    );

    // RoPE offsets are checked against each plan's batch: one per request, and positions that
    // stay inside i32 (a failed plan leaves nothing to run).
    let three = [0, 1, 2];
    op.set_variant(&Variant {
        rope: Some(Rope::default()),
        rope_offsets: Some(&three),
        ..Default::default()
    })
    .unwrap();
    assert!(op.tiles().name().ends_with("_rope"));
    let e = op.plan(&table).unwrap_err();
    assert!(
        matches!(
            e,
            Error::InvalidArgument {
                arg: "rope_offsets",
                ..
            }
        ),
        "{e}"
    );
    let huge = [i32::MAX - 100, 0];
    op.set_variant(&Variant {
        rope: Some(Rope::default()),
        rope_offsets: Some(&huge),
        ..Default::default()
    })
    .unwrap();
    let e = op.plan(&table).unwrap_err();
    assert!(
        matches!(
            e,
            Error::InvalidArgument {
                arg: "rope_offsets",
                ..
            }
        ),
        "{e}"
    );
    let e = op
        .run(
            DevSlice::new(&q, st),
            DevSlice::new(&k, st),
            DevSlice::new(&k, st),
            &desc,
            DevSlice::new(&idx, st),
            DevSliceMut::new(&mut o, st),
            None,
        )
        .unwrap_err();
    assert!(
        matches!(e, Error::InvalidArgument { arg: "self", .. }),
        "{e}"
    );
    // Offsets that fit: the plan and the run go through.
    op.set_variant(&Variant {
        rope: Some(Rope::default()),
        rope_offsets: Some(&two),
        ..Default::default()
    })
    .unwrap();
    op.plan(&table).unwrap();
    op.run(
        DevSlice::new(&q, st),
        DevSlice::new(&k, st),
        DevSlice::new(&k, st),
        &desc,
        DevSlice::new(&idx, st),
        DevSliceMut::new(&mut o, st),
        None,
    )
    .unwrap();
    let out = download(&dev, &o);
    assert!(out.iter().all(|x| x.to_f32().is_finite()));
}
