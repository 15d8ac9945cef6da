//! GPU batch prefill / append against the CPU backend. The cases hit every value the prefill issue
//! names (batch 1/3/17; qo_len 1/7/128/577; kv_len qo_len, qo_len + 1000, 4096; page 1/5/16;
//! GQA 1/4/7; causal on and off; head_dim 64/128/256; f16 and bf16; paged and ragged) and the
//! edges between them (empty requests, more queries than keys, split and unsplit, the three query
//! tiles, NHD and HND, combined K/V, padded page stride, LSE on and off, custom masks), not the
//! full cross product.

mod support;

use flashinfer::cuda::{DevSlice, DevSliceMut, DeviceRepr};
use flashinfer::layout::{
    CustomMask, HeadConfig, KvLayout, PageTable, PagedKv, PagedKvDesc, Ragged,
};
use flashinfer::prefill::{
    BatchPrefill, PrefillConfig, PrefillKv, PrefillMask, PrefillTiles, SinglePrefill,
};
use flashinfer::random::SplitMix64;
use flashinfer::reference::{self, rel_l2_error};
use flashinfer::{AttentionParams, DType, Element, LseBase, MaskMode};
use support::*;

#[derive(Clone, Debug, PartialEq)]
enum Mask {
    None,
    Causal,
    /// The causal pattern written as a custom mask.
    CustomCausal,
    /// Random bits, with some rows fully masked.
    CustomRandom,
}

#[derive(Clone, Debug)]
struct Case {
    qo_lens: Vec<usize>,
    kv_lens: Vec<usize>,
    /// 0: ragged KV.
    page_size: usize,
    qo_heads: usize,
    kv_heads: usize,
    head_dim: usize,
    layout: KvLayout,
    combined: bool,
    stride_pad: usize,
    mask: Mask,
    lse: bool,
    allow_split: bool,
    expect_split: Option<bool>,
    /// Run only these tiles (no sweep over the other block shapes).
    tiles: Option<PrefillTiles>,
}

fn case(
    qo_lens: Vec<usize>,
    kv_lens: Vec<usize>,
    page_size: usize,
    heads: (usize, usize),
    head_dim: usize,
    mask: Mask,
) -> Case {
    Case {
        qo_lens,
        kv_lens,
        page_size,
        qo_heads: heads.0,
        kv_heads: heads.1,
        head_dim,
        layout: KvLayout::Nhd,
        combined: false,
        stride_pad: 0,
        mask,
        lse: true,
        allow_split: true,
        expect_split: None,
        tiles: None,
    }
}

fn build_mask(c: &Case, rng: &mut SplitMix64) -> Option<CustomMask> {
    if matches!(c.mask, Mask::None | Mask::Causal) {
        return None; // and draw nothing from rng, so a causal case and its custom twin match
    }
    let masks: Vec<Vec<bool>> = c
        .qo_lens
        .iter()
        .zip(&c.kv_lens)
        .map(|(&q, &k)| {
            let mut m = vec![false; q * k];
            for i in 0..q {
                let dead_row = c.mask == Mask::CustomRandom && rng.below(7) == 0;
                for j in 0..k {
                    m[i * k + j] = match c.mask {
                        Mask::CustomCausal => j + q <= k + i,
                        _ => !dead_row && rng.below(3) != 0,
                    };
                }
            }
            m
        })
        .collect();
    Some(CustomMask::pack(&masks, &c.qo_lens, &c.kv_lens).unwrap())
}

/// Runs a case on the GPU and returns the output (as f32) after checking it against the CPU.
fn run_case<T: Element + DeviceRepr>(c: &Case, rng: &mut SplitMix64) -> Vec<f32> {
    let dev = device();
    let st = dev.stream();
    let heads = HeadConfig::new(c.qo_heads, c.kv_heads, c.head_dim).unwrap();
    let batch = c.qo_lens.len();
    let qo = Ragged::from_lens(&c.qo_lens);
    let nnz = qo.total();
    let q: Vec<T> = rng.vec(nnz * c.qo_heads * c.head_dim, 1.0);
    let q32 = to_f32(&q);
    let params = AttentionParams {
        sm_scale: Some(1.1 / (c.head_dim as f32).sqrt()),
        lse_base: LseBase::Natural,
    };
    let cmask = build_mask(c, rng);
    let mask_mode = match c.mask {
        Mask::None => MaskMode::None,
        Mask::Causal => MaskMode::Causal,
        _ => MaskMode::Custom(cmask.as_ref().unwrap()),
    };
    let kind = match c.mask {
        Mask::None => PrefillMask::None,
        Mask::Causal => PrefillMask::Causal,
        _ => PrefillMask::Custom,
    };
    let mut want = vec![0f32; q.len()];
    let mut want_lse = vec![0f32; nnz * c.qo_heads];

    // K/V: a ragged tensor, or a shuffled page pool.
    let kv_ragged = Ragged::from_lens(&c.kv_lens);
    let (k, v, table, desc) = if c.page_size == 0 {
        let n = kv_ragged.total() * c.kv_heads * c.head_dim;
        let (k, v): (Vec<T>, Vec<T>) = (rng.vec(n, 1.0), rng.vec(n, 1.0));
        reference::batch_prefill_ragged(
            &q32,
            &qo,
            &k,
            &v,
            &kv_ragged,
            heads,
            mask_mode,
            &params,
            &mut want,
            Some(&mut want_lse),
        )
        .unwrap();
        (k, v, None, None)
    } else {
        let num_pages = PageTable::pages_needed(&c.kv_lens, c.page_size) + 2;
        let mut ids: Vec<i32> = (0..num_pages as i32).collect();
        rng.shuffle(&mut ids);
        let table = PageTable::from_kv_lens(&c.kv_lens, c.page_size, &ids, num_pages).unwrap();
        let mut desc = if c.combined {
            PagedKvDesc::combined(c.layout, num_pages, c.page_size, c.kv_heads, c.head_dim)
        } else {
            PagedKvDesc::new(c.layout, num_pages, c.page_size, c.kv_heads, c.head_dim)
        }
        .unwrap();
        if c.stride_pad > 0 {
            desc = desc
                .with_page_stride(desc.page_stride + c.stride_pad)
                .unwrap();
        }
        let n = desc.required_len();
        let k: Vec<T> = rng.vec(n, 1.0);
        let v: Vec<T> = if c.combined {
            Vec::new()
        } else {
            rng.vec(n, 1.0)
        };
        let pool = if c.combined {
            PagedKv::combined(desc, &k)
        } else {
            PagedKv::new(desc, &k, &v)
        }
        .unwrap();
        reference::batch_prefill_paged(
            &q32,
            &qo,
            &pool,
            &table,
            heads,
            mask_mode,
            &params,
            &mut want,
            Some(&mut want_lse),
        )
        .unwrap();
        (k, v, Some(table), Some(desc))
    };

    let cfg = PrefillConfig {
        heads,
        q_dtype: T::DTYPE,
        kv_dtype: T::DTYPE,
        params,
        mask: kind,
        allow_split: c.allow_split,
    };
    // The engine's choice, then (on Hopper, when it chose wgmma) the portable backend.
    let mut variants = vec![c.tiles];
    let mut outputs = Vec::new();
    let mut vi = 0;
    while vi < variants.len() {
        let mut op = BatchPrefill::new(&dev, cfg).unwrap();
        op.force_tiles(variants[vi]).unwrap();
        let kv_arg = match &table {
            Some(t) => PrefillKv::Paged(t),
            None => PrefillKv::Ragged(&kv_ragged),
        };
        op.plan(&qo, kv_arg, cmask.as_ref()).unwrap();
        if let Some(split) = c.expect_split {
            assert_eq!(
                op.schedule().kv_chunk.is_some(),
                split,
                "{c:?}: split decision {:?}",
                op.schedule().kv_chunk
            );
        }
        let tiles = op.tiles().unwrap();
        if vi == 0 && tiles.wgmma && c.tiles.is_none() {
            // Hopper chose wgmma: the other wgmma block shapes, with and without a producer
            // warpgroup, and the portable mma.sync tiles must pass the same case.
            for (wg, kt, ns) in [(1, 64, 2), (2, 128, 2), (3, 64, 2), (3, 64, 3), (3, 128, 2)] {
                // (Three stages without the producer: a CUDA-graph op chose the producer's shape,
                // then a variant that cannot have one turned it off.)
                for ws in [false, true] {
                    let mut t = PrefillTiles::wgmma(
                        c.head_dim,
                        heads.group_size(),
                        T::DTYPE,
                        tiles.paged,
                        kind,
                        wg,
                        kt,
                    );
                    t.warp_specialized = ws;
                    t.nstage = ns;
                    if t != tiles {
                        variants.push(Some(t));
                    }
                }
            }
            let big = 1 << 20;
            variants.push(Some(PrefillTiles::mma_sync(
                c.head_dim,
                heads.group_size(),
                T::DTYPE,
                T::DTYPE,
                tiles.paged,
                kind,
                big,
            )));
        }
        let what = format!("{c:?} {:?} {}", T::DTYPE, tiles.name());

        let (dq, dk) = (upload(&dev, &q), upload(&dev, &k));
        let dv = (!c.combined).then(|| upload(&dev, &v));
        let dmask = cmask
            .as_ref()
            .map(|m| upload(&dev, &[m.bits(), &[0u8]].concat()));
        let di = upload(
            &dev,
            &table
                .as_ref()
                .map_or(vec![0], |t| [t.kv_indices(), &[0]].concat()),
        );
        let kview = DevSlice::new(&dk, st);
        let vview = dv.as_ref().map_or(kview, |dv| DevSlice::new(dv, st));
        let run = |out: &mut flashinfer::cuda::CudaSlice<T>,
                   lse: Option<&mut flashinfer::cuda::CudaSlice<f32>>| {
            let o = DevSliceMut::new(out, st);
            let l = lse.map(|l| DevSliceMut::new(l, st));
            let m = dmask.as_ref().map(|m| DevSlice::new(m, st));
            match (&table, &desc) {
                (Some(_), Some(desc)) => op.run_paged(
                    DevSlice::new(&dq, st),
                    kview,
                    vview,
                    desc,
                    DevSlice::new(&di, st),
                    o,
                    l,
                    m,
                ),
                _ => op.run_ragged(DevSlice::new(&dq, st), kview, vview, o, l, m),
            }
            .unwrap()
        };
        let mut dout = poisoned::<T>(&dev, q.len());
        let mut dlse = poisoned::<f32>(&dev, nnz * c.qo_heads);
        run(&mut dout, c.lse.then_some(&mut dlse));
        let first: Vec<T> = download(&dev, &dout);
        // A second run of the same plan gives the same bits (split counters reset themselves, the
        // merge order does not depend on which block finishes last).
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
        let row = c.qo_heads * c.head_dim;
        for r in 0..batch {
            let (s, e) = (qo.start(r) * row, (qo.start(r) + qo.len(r)) * row);
            let w: Vec<f64> = want[s..e].iter().map(|&x| x as f64).collect();
            let err = rel_l2_error(&got[s..e], &w);
            assert!(
                err <= tolerance::<T>(),
                "{what}: request {r} (qo {} kv {}) rel err {err}",
                c.qo_lens[r],
                c.kv_lens[r]
            );
            // Rows that see no key are exact zeros.
            for (i, chunk) in want[s..e].chunks(c.head_dim).enumerate() {
                if chunk.iter().all(|&x| x == 0.0) {
                    let g = &got[s + i * c.head_dim..s + (i + 1) * c.head_dim];
                    assert!(
                        g.iter().all(|&x| x == 0.0),
                        "{what}: request {r} row {i} must be zeros"
                    );
                }
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
        outputs.push(got);
        vi += 1;
    }
    outputs.swap_remove(0)
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_prefill_ragged_and_paged_causal() {
    let mut rng = Rng::fresh("prefill_causal");
    // One long prompt, ragged: the 128-row tile.
    run_case::<half::bf16>(
        &case(vec![577], vec![577], 0, (32, 8), 128, Mask::Causal),
        &mut rng,
    );
    // Appends over longer caches, paged, page 16 (kv = qo, qo + 1000, 4096).
    run_case::<half::bf16>(
        &case(
            vec![1, 7, 128],
            vec![1001, 7, 4096],
            16,
            (32, 8),
            128,
            Mask::Causal,
        ),
        &mut rng,
    );
    // Page 1 and 5, GQA 1 and 7, head_dim 64 and 256, f16.
    let mut c = case(
        vec![7, 128, 1],
        vec![4096, 128, 1001],
        1,
        (4, 4),
        256,
        Mask::Causal,
    );
    c.layout = KvLayout::Hnd;
    run_case::<half::f16>(&c, &mut rng);
    let mut c = case(
        vec![577, 7, 128],
        vec![1577, 4096, 128],
        5,
        (14, 2),
        64,
        Mask::Causal,
    );
    c.combined = true;
    run_case::<half::f16>(&c, &mut rng);
    // More queries than keys: the first rows see nothing (zeros, LSE -inf).
    run_case::<half::bf16>(
        &case(vec![40, 3], vec![10, 0], 16, (8, 2), 128, Mask::Causal),
        &mut rng,
    );
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_prefill_batch_17_without_mask() {
    let mut rng = Rng::fresh("prefill_17");
    let qs = [1usize, 7, 128, 577, 0];
    let qo: Vec<usize> = (0..17).map(|i| qs[i % qs.len()]).collect();
    let kv: Vec<usize> = qo
        .iter()
        .enumerate()
        .map(|(i, &q)| [q, q + 1000, 4096][i % 3])
        .collect();
    for (page, heads, d) in [
        (0, (7, 1), 64),
        (5, (28, 4), 128),
        (16, (8, 8), 256),
        (1, (16, 4), 64),
    ] {
        let mut c = case(qo.clone(), kv.clone(), page, heads, d, Mask::None);
        c.lse = page != 5;
        c.layout = if page == 16 {
            KvLayout::Hnd
        } else {
            KvLayout::Nhd
        };
        run_case::<half::bf16>(&c, &mut rng);
        c.mask = Mask::Causal;
        run_case::<half::f16>(&c, &mut rng);
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_prefill_splits_short_appends_over_long_caches() {
    let mut rng = Rng::fresh("prefill_split");
    for d in [64, 128, 256] {
        let mut c = case(vec![7], vec![4096], 16, (32, 8), d, Mask::Causal);
        c.expect_split = Some(true);
        run_case::<half::bf16>(&c, &mut rng);
        let mut c = case(
            vec![1, 0, 3],
            vec![33000, 0, 5000],
            5,
            (28, 4),
            d,
            Mask::None,
        );
        c.expect_split = Some(true);
        c.stride_pad = 24;
        run_case::<half::f16>(&c, &mut rng);
    }
    // Split off: one item per tile whatever the batch.
    let mut c = case(vec![7], vec![4096], 0, (32, 8), 128, Mask::Causal);
    c.allow_split = false;
    c.expect_split = Some(false);
    run_case::<half::bf16>(&c, &mut rng);
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_prefill_custom_masks() {
    let mut rng = Rng::fresh("prefill_mask");
    // A custom mask equal to the causal pattern gives the causal result.
    for (page, heads, d) in [(16, (32, 8), 128), (0, (7, 1), 64), (5, (4, 4), 256)] {
        let mut c = case(
            vec![128, 7, 577],
            vec![128, 1007, 4096],
            page,
            heads,
            d,
            Mask::Causal,
        );
        // The same schedule for both (the planner cuts causal tiles at their diagonal, so split
        // sizes could differ), so that the results must agree to the bit up to rounding ties.
        c.allow_split = false;
        let causal = run_case::<half::bf16>(&c, &mut rng.clone());
        let custom = run_case::<half::bf16>(
            &Case {
                mask: Mask::CustomCausal,
                ..c
            },
            &mut rng.clone(),
        );
        let err = rel_l2_error(
            &custom,
            &causal.iter().map(|&x| x as f64).collect::<Vec<_>>(),
        );
        assert!(err <= 1e-6, "custom causal vs causal: {err}");
        let _ = rng.next_u64();
    }
    // Random masks with fully masked rows.
    run_case::<half::f16>(
        &case(
            vec![33, 1, 200],
            vec![50, 700, 200],
            16,
            (32, 8),
            128,
            Mask::CustomRandom,
        ),
        &mut rng,
    );
    run_case::<half::bf16>(
        &case(
            vec![9, 64],
            vec![100, 64],
            0,
            (8, 1),
            64,
            Mask::CustomRandom,
        ),
        &mut rng,
    );
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_single_prefill_contiguous() {
    let mut rng = Rng::fresh("single_prefill");
    let dev = device();
    let st = dev.stream();
    let heads = HeadConfig::new(32, 8, 128).unwrap();
    let (qo_len, kv_len) = (300, 1300);
    let q: Vec<half::bf16> = rng.vec(qo_len * 32 * 128, 1.0);
    let k: Vec<half::bf16> = rng.vec(kv_len * 8 * 128, 1.0);
    let v: Vec<half::bf16> = rng.vec(kv_len * 8 * 128, 1.0);
    let params = AttentionParams::default();
    let mut want = vec![0f32; q.len()];
    reference::single_prefill(
        &to_f32(&q),
        &k,
        &v,
        qo_len,
        kv_len,
        heads,
        MaskMode::Causal,
        &params,
        &mut want,
        None,
    )
    .unwrap();
    let cfg = PrefillConfig {
        heads,
        q_dtype: flashinfer::DType::BF16,
        kv_dtype: flashinfer::DType::BF16,
        params,
        mask: PrefillMask::Causal,
        allow_split: true,
    };
    let mut op = SinglePrefill::new(&dev, cfg).unwrap();
    let (dq, dk, dv) = (upload(&dev, &q), upload(&dev, &k), upload(&dev, &v));
    let mut dout = poisoned::<half::bf16>(&dev, q.len());
    op.run(
        DevSlice::new(&dq, st),
        DevSlice::new(&dk, st),
        DevSlice::new(&dv, st),
        qo_len,
        kv_len,
        DevSliceMut::new(&mut dout, st),
        None,
        None,
    )
    .unwrap();
    let got = to_f32(&download(&dev, &dout));
    let err = rel_l2_error(&got, &want.iter().map(|&x| x as f64).collect::<Vec<_>>());
    assert!(err <= 1e-2, "single prefill rel err {err}");
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_prefill_rejects_bad_input_before_launch() {
    let dev = device();
    let st = dev.stream();
    let heads = HeadConfig::new(8, 2, 128).unwrap();
    let cfg = PrefillConfig {
        heads,
        q_dtype: flashinfer::DType::F16,
        kv_dtype: flashinfer::DType::F16,
        params: AttentionParams::default(),
        mask: PrefillMask::Causal,
        allow_split: true,
    };
    let mut op = BatchPrefill::new(&dev, cfg).unwrap();
    let qo = Ragged::from_lens(&[5, 3]);
    let kv = Ragged::from_lens(&[10, 6]);
    let bad = Ragged::from_lens(&[10]);
    let e = op.plan(&qo, PrefillKv::Ragged(&bad), None).unwrap_err();
    assert!(e.to_string().contains("kv_indptr"), "{e}");
    op.plan(&qo, PrefillKv::Ragged(&kv), None).unwrap();
    let q = upload(&dev, &vec![half::f16::ONE; 8 * 8 * 128]);
    let k = upload(&dev, &vec![half::f16::ONE; 16 * 2 * 128]);
    let short = upload(&dev, &vec![half::f16::ONE; 15 * 2 * 128]);
    let mut o = poisoned::<half::f16>(&dev, 8 * 8 * 128);
    let e = op
        .run_ragged(
            DevSlice::new(&q, st),
            DevSlice::new(&short, st),
            DevSlice::new(&k, st),
            DevSliceMut::new(&mut o, st),
            None,
            None,
        )
        .unwrap_err();
    assert!(e.to_string().contains("`k`"), "{e}");
    let e = op
        .run_paged(
            DevSlice::new(&q, st),
            DevSlice::new(&k, st),
            DevSlice::new(&k, st),
            &PagedKvDesc::new(KvLayout::Nhd, 1, 16, 2, 128).unwrap(),
            DevSlice::new(&upload(&dev, &[0i32]), st),
            DevSliceMut::new(&mut o, st),
            None,
            None,
        )
        .unwrap_err();
    assert!(
        e.to_string().contains("paged") || e.to_string().contains("ragged"),
        "{e}"
    );
    // Nothing was launched: the output is still poisoned.
    assert!(download(&dev, &o).iter().all(|x| x.to_f32().is_nan()));
}

/// Small cases that still reach every kernel shape (wgmma and the three mma.sync tiles, paged
/// and ragged, split merge, custom mask, head_dim 256), sized so that compute-sanitizer's
/// racecheck finishes in a minute: `bash .gpu/run sanitize prefill_sanitizer`.
#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_prefill_sanitizer_cases() {
    let mut rng = Rng::fresh("prefill_sanitizer");
    run_case::<half::bf16>(
        &case(
            vec![100, 0, 30],
            vec![100, 5, 130],
            0,
            (8, 2),
            128,
            Mask::Causal,
        ),
        &mut rng,
    );
    let mut c = case(vec![3], vec![700], 5, (8, 2), 64, Mask::Causal);
    c.expect_split = Some(true);
    run_case::<half::f16>(&c, &mut rng);
    run_case::<half::f16>(
        &case(vec![20, 5], vec![40, 90], 0, (4, 4), 64, Mask::CustomRandom),
        &mut rng,
    );
    let mut c = case(vec![70], vec![70], 16, (2, 1), 256, Mask::None);
    c.layout = KvLayout::Hnd;
    run_case::<half::bf16>(&c, &mut rng);
}

/// bf16 wgmma tiles with the producer warpgroup: `wg` warpgroups, `kt` keys per stage, `ns` stages.
#[allow(clippy::too_many_arguments)]
fn ws(
    d: usize,
    g: usize,
    paged: bool,
    mask: PrefillMask,
    wg: usize,
    kt: usize,
    ns: usize,
) -> Option<PrefillTiles> {
    let mut t = PrefillTiles::wgmma(d, g, DType::BF16, paged, mask, wg, kt);
    t.warp_specialized = true;
    t.nstage = ns;
    Some(t)
}

/// The same with intra-warpgroup overlap (the engine's shape for shorter prompts: three
/// warpgroups, four 64-key stages).
fn ws_overlap(d: usize, g: usize, paged: bool, mask: PrefillMask) -> Option<PrefillTiles> {
    ws(d, g, paged, mask, 3, 64, 4).map(PrefillTiles::with_intra_wg_overlap)
}

/// The producer-warpgroup (warp-specialised) wgmma kernel in each block shape it runs in, on small
/// cases (one tile shape each, no sweep) that compute-sanitizer's racecheck finishes quickly: the
/// mbarrier pipeline, the consumers-only barriers of the epilogue, a split merge, a custom mask
/// and an empty request. `bash .gpu/run sanitize producer_sanitizer`.
#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_prefill_producer_sanitizer_cases() {
    if device().arch() < flashinfer::jit::Arch::SM90 {
        eprintln!("the producer warpgroup needs sm_90a; nothing to check on this GPU");
        return;
    }
    let mut rng = Rng::fresh("prefill_producer_sanitizer");
    let shape = |wg, kt, ns| ws(128, 4, false, PrefillMask::Causal, wg, kt, ns);
    for tiles in [
        shape(3, 128, 2),
        shape(3, 64, 3),
        shape(2, 128, 2),
        shape(1, 64, 2),
        ws_overlap(128, 4, false, PrefillMask::Causal),
    ] {
        let mut c = case(
            vec![100, 0, 30],
            vec![100, 5, 300],
            0,
            (8, 2),
            128,
            Mask::Causal,
        );
        c.tiles = tiles;
        run_case::<half::bf16>(&c, &mut rng);
    }
    let mut c = case(vec![3], vec![700], 5, (8, 2), 64, Mask::Causal);
    c.expect_split = Some(true);
    c.tiles = ws(64, 4, true, PrefillMask::Causal, 1, 64, 2);
    run_case::<half::bf16>(&c, &mut rng);
    let mut c = case(
        vec![20, 5],
        vec![40, 200],
        16,
        (4, 4),
        128,
        Mask::CustomRandom,
    );
    c.tiles = ws(128, 1, true, PrefillMask::Custom, 3, 64, 3);
    run_case::<half::bf16>(&c, &mut rng);
}

/// Persistent blocks (the default with the producer warpgroup; forced on here for every block
/// shape): more (item, head) pairs than one wave of blocks, so every block claims several items
/// and both Q buffers turn over; an empty request among them, and short first row tiles (whole
/// idle warpgroups). Under compute-sanitizer the kernels also carry named-barrier copies of
/// their mbarrier orderings, which racecheck needs to see them (`racecheck_shadow` in
/// src/prefill/tiles.rs): `bash .gpu/run sanitize persistent_cases` is clean. memcheck and
/// synccheck of the kernels without those copies: `FLASHINFER_RACECHECK_SHADOW=0`.
#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_prefill_persistent_cases() {
    if device().arch() < flashinfer::jit::Arch::SM90 {
        eprintln!("persistent blocks need sm_90a; nothing to check on this GPU");
        return;
    }
    let mut rng = Rng::fresh("prefill_persistent");
    let persistent = |t: Option<PrefillTiles>| {
        t.map(|t| PrefillTiles {
            persistent: true,
            ..t
        })
    };
    let mut lens: Vec<usize> = (0..50).map(|i| 40 + (i * 37) % 90).collect();
    lens[7] = 0;
    let kv: Vec<usize> = lens.iter().map(|&l| l + 60).collect();
    let shape = |wg, kt, ns| ws(128, 4, true, PrefillMask::Causal, wg, kt, ns);
    for tiles in [
        shape(3, 64, 3),
        shape(2, 128, 2),
        shape(1, 64, 2),
        ws_overlap(128, 4, true, PrefillMask::Causal),
    ] {
        let mut c = case(lens.clone(), kv.clone(), 16, (32, 8), 128, Mask::Causal);
        c.tiles = persistent(tiles);
        run_case::<half::bf16>(&c, &mut rng);
    }
    let mut c = case(lens.clone(), kv.clone(), 0, (8, 8), 64, Mask::CustomRandom);
    c.tiles = persistent(ws(64, 1, false, PrefillMask::Custom, 3, 128, 2));
    run_case::<half::bf16>(&c, &mut rng);
}
