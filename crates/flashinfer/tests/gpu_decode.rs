//! GPU batch decode against the CPU backend. The cases are chosen to hit every value the decode
//! issue names (batch 1/7/64/256; kv_len 1/15/16/17/511/4096/33000; page 1/5/16/64; GQA 1/4/5/8;
//! NHD and HND; f16 and bf16; head_dim 64/128/256; empty requests; LSE on and off) and the edges
//! between them (page boundaries, split and unsplit, combined K/V, padded page stride), not the
//! full cross product.

mod support;

use flashinfer::cuda::{DevSlice, DevSliceMut, DeviceRepr, Graph};
use flashinfer::decode::{BatchDecode, DecodeConfig, DecodePath, GraphLimits, SingleDecode};
use flashinfer::layout::{HeadConfig, KvLayout, PageTable, PagedKv, PagedKvDesc};
use flashinfer::reference::{self, rel_l2_error};
use flashinfer::{AttentionParams, Element, LseBase};
use support::*;

#[derive(Clone, Debug)]
struct Case {
    lens: Vec<usize>,
    page_size: usize,
    qo_heads: usize,
    kv_heads: usize,
    head_dim: usize,
    layout: KvLayout,
    combined: bool,
    /// Extra elements between pages (a view into a larger pool).
    stride_pad: usize,
    lse: bool,
    allow_split: bool,
    expect_split: Option<bool>,
}

fn case(
    lens: Vec<usize>,
    page_size: usize,
    heads: (usize, usize),
    head_dim: usize,
    layout: KvLayout,
) -> Case {
    Case {
        lens,
        page_size,
        qo_heads: heads.0,
        kv_heads: heads.1,
        head_dim,
        layout,
        combined: false,
        stride_pad: 0,
        lse: true,
        allow_split: true,
        expect_split: None,
    }
}

fn run_case<Q: Element + DeviceRepr, KV: Element + DeviceRepr>(
    c: &Case,
    rng: &mut flashinfer::random::SplitMix64,
) {
    let dev = device();
    let st = dev.stream();
    let heads = HeadConfig::new(c.qo_heads, c.kv_heads, c.head_dim).unwrap();
    let batch = c.lens.len();
    let pages_needed = PageTable::pages_needed(&c.lens, c.page_size);
    let num_pages = pages_needed + 3; // a few pages no request uses
    let mut ids: Vec<i32> = (0..num_pages as i32).collect();
    rng.shuffle(&mut ids);
    let table = PageTable::from_kv_lens(&c.lens, c.page_size, &ids, num_pages).unwrap();
    let mut desc = if c.combined {
        PagedKvDesc::combined(c.layout, num_pages, c.page_size, c.kv_heads, c.head_dim).unwrap()
    } else {
        PagedKvDesc::new(c.layout, num_pages, c.page_size, c.kv_heads, c.head_dim).unwrap()
    };
    if c.stride_pad > 0 {
        desc = desc
            .with_page_stride(desc.page_stride + c.stride_pad)
            .unwrap();
    }
    let n = desc.required_len();
    let k: Vec<KV> = rng.vec(n, 1.0);
    let v: Vec<KV> = if c.combined {
        Vec::new()
    } else {
        rng.vec(n, 1.0)
    };
    let q: Vec<Q> = rng.vec(batch * c.qo_heads * c.head_dim, 1.0);
    let params = AttentionParams {
        sm_scale: Some(0.9 / (c.head_dim as f32).sqrt()),
        lse_base: LseBase::Natural,
    };

    // The CPU backend, with f32 output so that only the GPU's rounding is measured.
    let q32: Vec<f32> = to_f32(&q);
    let pool = if c.combined {
        PagedKv::combined(desc, &k)
    } else {
        PagedKv::new(desc, &k, &v)
    }
    .unwrap();
    let mut want = vec![0f32; q.len()];
    let mut want_lse = vec![0f32; batch * c.qo_heads];
    reference::batch_decode(
        &q32,
        &pool,
        &table,
        heads,
        &params,
        &mut want,
        Some(&mut want_lse),
    )
    .unwrap();

    let cfg = DecodeConfig {
        heads,
        q_dtype: Q::DTYPE,
        kv_dtype: KV::DTYPE,
        params,
        allow_split: c.allow_split,
    };
    // Every kernel (CUDA cores, tensor cores, with its producer warp where it fits) on the same
    // inputs.
    let g = heads.group_size();
    for tiles in decode_kernels(&dev, c.head_dim, g, Q::DTYPE, KV::DTYPE) {
        let mut op = BatchDecode::with_tiles(&dev, cfg, tiles).unwrap();
        op.plan(&table).unwrap();
        eprintln!("  {} ({} items)", tiles.name(), op.schedule().work.len());
        // The split decision depends on how many blocks are resident, so it is stated for the
        // tensor-core kernel (two blocks per SM on the H200); the CUDA-core kernel's different
        // wave may split a batch whose last wave is ragged (the planner simulates it).
        let expect = c
            .expect_split
            .filter(|_| tiles.path == DecodePath::TensorCore);
        if let Some(split) = expect {
            assert_eq!(
                op.schedule().chunk_size.is_some(),
                split,
                "{c:?}: split decision {:?}",
                op.schedule().chunk_size
            );
        }
        let (dq, dk) = (upload(&dev, &q), upload(&dev, &k));
        let dv = if c.combined {
            None
        } else {
            Some(upload(&dev, &v))
        };
        let di = upload(
            &dev,
            table
                .kv_indices()
                .iter()
                .copied()
                .chain([0])
                .collect::<Vec<_>>()
                .as_slice(),
        );
        let mut dout = poisoned::<Q>(&dev, q.len());
        let mut dlse = poisoned::<f32>(&dev, batch * c.qo_heads);
        let kview = DevSlice::new(&dk, st);
        let vview = dv.as_ref().map_or(kview, |dv| DevSlice::new(dv, st));
        op.check_kv_indices(DevSlice::new(&di, st), &desc).unwrap();
        op.run(
            DevSlice::new(&dq, st),
            kview,
            vview,
            &desc,
            DevSlice::new(&di, st),
            DevSliceMut::new(&mut dout, st),
            c.lse.then(|| DevSliceMut::new(&mut dlse, st)),
        )
        .unwrap();
        let got = to_f32(&download(&dev, &dout));
        // A second run of the same plan (the split counters must have reset themselves) gives
        // the same bits: the merge order does not depend on which block finishes last.
        let first: Vec<Q> = download(&dev, &dout);
        let mut dout2 = poisoned::<Q>(&dev, q.len());
        op.run(
            DevSlice::new(&dq, st),
            kview,
            vview,
            &desc,
            DevSlice::new(&di, st),
            DevSliceMut::new(&mut dout2, st),
            None,
        )
        .unwrap();
        let second: Vec<Q> = download(&dev, &dout2);
        assert!(
            first
                .iter()
                .zip(&second)
                .all(|(a, b)| a.to_f32().to_bits() == b.to_f32().to_bits()),
            "{c:?}: a second run of the same plan differs"
        );
        let what = format!("{c:?} {:?}/{:?} {}", Q::DTYPE, KV::DTYPE, tiles.name());

        // Per request: a request's rows are checked on their own, so one bad request can't hide.
        let row = c.qo_heads * c.head_dim;
        for (r, &len) in c.lens.iter().enumerate() {
            let g = &got[r * row..(r + 1) * row];
            let w: Vec<f64> = want[r * row..(r + 1) * row]
                .iter()
                .map(|&x| x as f64)
                .collect();
            if len == 0 {
                assert!(
                    g.iter().all(|&x| x == 0.0),
                    "{what}: empty request {r} must output zeros"
                );
            } else {
                let err = rel_l2_error(g, &w);
                assert!(
                    err <= tolerance::<Q>(),
                    "{what}: request {r} (kv_len {len}) rel err {err}"
                );
            }
        }
        if c.lse {
            check_lse(
                &format!("{what} lse"),
                &download(&dev, &dlse),
                &want_lse,
                1e-3,
            );
        }
    }
}

fn mixed_lens(rng: &mut flashinfer::random::SplitMix64, batch: usize, max: usize) -> Vec<usize> {
    let edges = [0, 1, 15, 16, 17, 511];
    (0..batch)
        .map(|i| {
            if i % 5 == 0 {
                edges[rng.below(edges.len())]
            } else {
                rng.below(max + 1)
            }
        })
        .collect()
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_decode_single_long_request_splits() {
    let mut rng = Rng::fresh("decode_long");
    let mut c = case(vec![33000], 16, (32, 8), 128, KvLayout::Nhd);
    c.expect_split = Some(true);
    run_case::<half::bf16, half::bf16>(&c, &mut rng);
    let mut c = case(
        vec![33000, 4096, 0, 17, 511, 15, 16],
        1,
        (32, 8),
        64,
        KvLayout::Hnd,
    );
    c.expect_split = Some(true);
    run_case::<half::f16, half::bf16>(&c, &mut rng);
    let mut c = case(
        vec![33000, 1, 4096, 0, 16, 17, 15],
        64,
        (8, 8),
        256,
        KvLayout::Nhd,
    );
    c.allow_split = false;
    c.expect_split = Some(false);
    c.lse = false;
    run_case::<half::f16, half::f16>(&c, &mut rng);
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_decode_page_boundaries_and_gqa() {
    let mut rng = Rng::fresh("decode_edges");
    run_case::<half::f16, half::f16>(&case(vec![1], 1, (8, 8), 64, KvLayout::Hnd), &mut rng);
    let mut c = case(
        vec![15, 16, 17, 0, 511, 4096, 1],
        5,
        (10, 2),
        128,
        KvLayout::Nhd,
    );
    c.combined = true;
    run_case::<half::bf16, half::bf16>(&c, &mut rng);
    run_case::<half::bf16, half::bf16>(
        &case(
            vec![15, 16, 17, 0, 511, 4096, 1],
            5,
            (28, 4),
            128,
            KvLayout::Hnd,
        ),
        &mut rng,
    );
    run_case::<half::f16, half::f16>(
        &case(vec![17, 16, 15, 33000], 16, (16, 1), 128, KvLayout::Nhd),
        &mut rng,
    );
    for (q, kv) in [(8, 8), (32, 8), (40, 8), (64, 8)] {
        for d in [64, 128, 256] {
            let c = case(
                vec![17, 0, 511, 1, 16, 15, 4096],
                16,
                (q, kv),
                d,
                KvLayout::Nhd,
            );
            run_case::<half::bf16, half::bf16>(&c, &mut rng);
            let mut c = case(
                vec![1, 15, 511, 0, 17, 16, 700],
                5,
                (q, kv),
                d,
                KvLayout::Hnd,
            );
            c.lse = false;
            run_case::<half::f16, half::f16>(&c, &mut rng);
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_decode_large_batches() {
    let mut rng = Rng::fresh("decode_batches");
    let mut c = case(
        mixed_lens(&mut rng, 64, 4096),
        64,
        (32, 4),
        256,
        KvLayout::Hnd,
    );
    c.stride_pad = 64;
    run_case::<half::f16, half::f16>(&c, &mut rng);
    let mut c = case(
        mixed_lens(&mut rng, 256, 600),
        16,
        (32, 8),
        128,
        KvLayout::Nhd,
    );
    c.stride_pad = 8;
    run_case::<half::bf16, half::bf16>(&c, &mut rng);
    let mut c = case(vec![4096; 64], 16, (32, 8), 128, KvLayout::Nhd);
    c.lse = false;
    c.expect_split = Some(false);
    run_case::<half::bf16, half::bf16>(&c, &mut rng);
    // A full but skewed batch: the long request is split (fair-share chunks), the rest is not.
    let lens: Vec<usize> = [33000].into_iter().chain([256; 63]).collect();
    let mut c = case(lens, 16, (32, 8), 128, KvLayout::Nhd);
    c.expect_split = Some(true);
    run_case::<half::bf16, half::bf16>(&c, &mut rng);
    let mut c = case(
        mixed_lens(&mut rng, 256, 300),
        1,
        (40, 8),
        64,
        KvLayout::Hnd,
    );
    c.combined = true;
    run_case::<half::bf16, half::bf16>(&c, &mut rng);
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_single_decode_contiguous_matches_cpu() {
    let dev = device();
    let st = dev.stream();
    let mut rng = Rng::fresh("single_decode");
    for (kv_len, (hq, hk), d) in [
        (1usize, (32, 8), 128),
        (4097, (32, 8), 128),
        (33000, (8, 8), 64),
        (0, (40, 8), 256),
    ] {
        let heads = HeadConfig::new(hq, hk, d).unwrap();
        let q: Vec<half::bf16> = rng.vec(hq * d, 1.0);
        let k: Vec<half::bf16> = rng.vec(kv_len * hk * d, 1.0);
        let v: Vec<half::bf16> = rng.vec(kv_len * hk * d, 1.0);
        let params = AttentionParams::default();
        let mut want = vec![0f32; hq * d];
        let mut want_lse = vec![0f32; hq];
        reference::single_decode(
            &to_f32(&q),
            &k,
            &v,
            kv_len,
            heads,
            &params,
            &mut want,
            Some(&mut want_lse),
        )
        .unwrap();
        let cfg = DecodeConfig {
            heads,
            q_dtype: flashinfer::DType::BF16,
            kv_dtype: flashinfer::DType::BF16,
            params,
            allow_split: true,
        };
        let mut op = SingleDecode::new(&dev, cfg).unwrap();
        let (dq, dk, dv) = (upload(&dev, &q), upload(&dev, &k), upload(&dev, &v));
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
        let got = to_f32(&download(&dev, &dout));
        if kv_len == 0 {
            assert!(got.iter().all(|&x| x == 0.0));
        } else {
            let err = rel_l2_error(&got, &want.iter().map(|&x| x as f64).collect::<Vec<_>>());
            assert!(err <= 1e-2, "single decode kv_len {kv_len}: rel err {err}");
        }
        check_lse("single lse", &download(&dev, &dlse), &want_lse, 1e-3);
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_decode_rejects_bad_input_before_launch() {
    let dev = device();
    let st = dev.stream();
    let heads = HeadConfig::new(32, 8, 128).unwrap();
    let cfg = DecodeConfig {
        heads,
        q_dtype: flashinfer::DType::BF16,
        kv_dtype: flashinfer::DType::BF16,
        params: AttentionParams::default(),
        allow_split: true,
    };
    let mut op = BatchDecode::new(&dev, cfg).unwrap();
    let table = PageTable::from_kv_lens(&[20, 3], 16, &[0, 1, 2], 3).unwrap();
    let desc = PagedKvDesc::new(KvLayout::Nhd, 3, 16, 8, 128).unwrap();
    let k = upload(&dev, &vec![half::bf16::ONE; desc.required_len()]);
    let short_q = upload(&dev, &vec![half::bf16::ONE; 32 * 128]);
    let idx = upload(&dev, &[0i32, 1, 2]);
    let mut o = poisoned::<half::bf16>(&dev, 2 * 32 * 128);
    let run = |op: &BatchDecode, o: &mut flashinfer::cuda::CudaSlice<half::bf16>| {
        op.run(
            DevSlice::new(&short_q, st),
            DevSlice::new(&k, st),
            DevSlice::new(&k, st),
            &desc,
            DevSlice::new(&idx, st),
            DevSliceMut::new(o, st),
            None,
        )
    };
    let e = run(&op, &mut o).unwrap_err();
    assert!(
        matches!(e, flashinfer::Error::InvalidArgument { arg: "self", .. }),
        "{e}"
    );
    op.plan(&table).unwrap();
    let e = run(&op, &mut o).unwrap_err();
    assert!(
        matches!(e, flashinfer::Error::InvalidArgument { arg: "q", .. }),
        "{e}"
    );
    let bad_idx = upload(&dev, &[0i32, 7, 2]);
    let e = op
        .check_kv_indices(DevSlice::new(&bad_idx, st), &desc)
        .unwrap_err();
    assert!(
        matches!(
            e,
            flashinfer::Error::InvalidArgument {
                arg: "kv_indices",
                ..
            }
        ),
        "{e}"
    );
    let out = download(&dev, &o);
    assert!(
        out.iter().all(|x| x.to_f32().is_nan()),
        "nothing may be written on a rejected call"
    );
}

/// Small cases for compute-sanitizer (memcheck and racecheck run these quickly): a split request,
/// page size 1, a combined HND pool with a padded page stride, GQA 5 and 8, head_dim 64 and 256,
/// an empty request, both kernels.
#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_decode_sanitizer_cases() {
    let mut rng = Rng::fresh("decode_sanitizer");
    let mut c = case(vec![3000], 16, (32, 8), 128, KvLayout::Nhd);
    c.expect_split = Some(true);
    run_case::<half::bf16, half::bf16>(&c, &mut rng);
    run_case::<half::f16, half::f16>(
        &case(vec![0, 17, 1, 100], 1, (40, 8), 64, KvLayout::Hnd),
        &mut rng,
    );
    let mut c = case(vec![33, 0, 5, 64], 5, (64, 8), 256, KvLayout::Hnd);
    c.combined = true;
    c.stride_pad = 16;
    run_case::<half::bf16, half::bf16>(&c, &mut rng);
    // Items of up to eight tiles (the stages are refilled, last tiles partial), more blocks than
    // one wave (40 x 8 = 320 > 264 on the H200) and an empty request: the cases above give the
    // producer warp items of at most two tiles, so no stage was ever refilled under the sanitizer
    // (this case found the one-lane stage release that racecheck could not order, session 13).
    let mut lens = mixed_lens(&mut rng, 40, 200);
    lens[7] = 0;
    run_case::<half::bf16, half::bf16>(&case(lens, 16, (32, 8), 128, KvLayout::Nhd), &mut rng);
}

/// CUDA-graph mode: `run()` is captured once; each later step only re-plans (one host-to-device
/// copy) and replays the graph, for batches shorter, longer, split, and all-empty.
#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_decode_cuda_graph_replays_after_replan() {
    let dev = device();
    let st = dev.stream();
    let mut rng = Rng::fresh("decode_graph");
    let heads = HeadConfig::new(32, 8, 128).unwrap();
    let (page_size, max_batch, max_pages) = (16, 8, 1200);
    let desc = PagedKvDesc::new(KvLayout::Nhd, max_pages, page_size, 8, 128).unwrap();
    let k: Vec<half::bf16> = rng.vec(desc.required_len(), 1.0);
    let v: Vec<half::bf16> = rng.vec(desc.required_len(), 1.0);
    let pool = PagedKv::new(desc, &k, &v).unwrap();
    let (dk, dv) = (upload(&dev, &k), upload(&dev, &v));
    let params = AttentionParams::default();
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
    for lens in steps {
        let mut ids: Vec<i32> = (0..max_pages as i32).collect();
        rng.shuffle(&mut ids);
        let table = PageTable::from_kv_lens(&lens, page_size, &ids, max_pages).unwrap();
        let q: Vec<half::bf16> = rng.vec(lens.len() * row, 1.0);
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
        let q32 = to_f32(&q);
        let mut want = vec![0f32; q.len()];
        let mut want_lse = vec![0f32; lens.len() * 32];
        reference::batch_decode(
            &q32,
            &pool,
            &table,
            heads,
            &params,
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
            1e-3,
        );
    }
}
