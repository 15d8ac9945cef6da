//! GPU prefill / append / decode-shaped steps with attention variants (soft cap, ALiBi, sliding
//! window, sinks, every combination; fused RoPE alone and with the others) against the CPU backend's definitions
//! (`reference::batch_attention_paged`), on both matmul backends.

mod support;

use flashinfer::cuda::{DevSlice, DevSliceMut};
use flashinfer::layout::{HeadConfig, KvLayout, PageTable, PagedKv, PagedKvDesc, Ragged};
use flashinfer::prefill::{BatchPrefill, PrefillConfig, PrefillKv, PrefillMask, PrefillTiles};
use flashinfer::reference::{self, rel_l2_error};
use flashinfer::variant::{alibi_slopes, Rope, Variant};
use flashinfer::{AttentionParams, DType, MaskMode};
use support::*;

#[allow(clippy::too_many_arguments)]
fn run(
    rng: &mut flashinfer::random::SplitMix64,
    qo_lens: &[usize],
    kv_lens: &[usize],
    heads: HeadConfig,
    causal: bool,
    variant: &Variant<'_>,
    portable: bool,
) {
    // The portable backend (mma.sync) instead of the engine's choice.
    let forced = portable.then(|| {
        PrefillTiles::mma_sync(
            heads.head_dim,
            heads.group_size(),
            DType::BF16,
            DType::BF16,
            true,
            prefill_mask(causal),
            1 << 20,
        )
    });
    run_with(rng, qo_lens, kv_lens, heads, causal, variant, forced)
}

fn prefill_mask(causal: bool) -> PrefillMask {
    if causal {
        PrefillMask::Causal
    } else {
        PrefillMask::None
    }
}

/// `run` with the block shape forced to `forced` (None: the engine's choice).
fn run_with(
    rng: &mut flashinfer::random::SplitMix64,
    qo_lens: &[usize],
    kv_lens: &[usize],
    heads: HeadConfig,
    causal: bool,
    variant: &Variant<'_>,
    forced: Option<PrefillTiles>,
) {
    let dev = device();
    let st = dev.stream();
    let page = 16;
    let num_pages = PageTable::pages_needed(kv_lens, page) + 1;
    let mut ids: Vec<i32> = (0..num_pages as i32).collect();
    rng.shuffle(&mut ids);
    let table = PageTable::from_kv_lens(kv_lens, page, &ids, num_pages).unwrap();
    let desc = PagedKvDesc::new(
        KvLayout::Nhd,
        num_pages,
        page,
        heads.num_kv_heads,
        heads.head_dim,
    )
    .unwrap();
    let k: Vec<half::bf16> = rng.vec(desc.required_len(), 1.0);
    let v: Vec<half::bf16> = rng.vec(desc.required_len(), 1.0);
    let qo = Ragged::from_lens(qo_lens);
    let q: Vec<half::bf16> = rng.vec(qo.total() * heads.num_qo_heads * heads.head_dim, 2.0);
    let params = AttentionParams::default();
    let mask = if causal {
        MaskMode::Causal
    } else {
        MaskMode::None
    };
    let pool = PagedKv::new(desc, &k, &v).unwrap();
    let mut want = vec![0f32; q.len()];
    let mut want_lse = vec![0f32; qo.total() * heads.num_qo_heads];
    reference::batch_attention_paged(
        &to_f32(&q),
        &qo,
        &pool,
        &table,
        heads,
        mask,
        &params,
        variant,
        &mut want,
        Some(&mut want_lse),
    )
    .unwrap();
    let kind = prefill_mask(causal);
    let mut op = BatchPrefill::new(
        &dev,
        PrefillConfig {
            heads,
            q_dtype: DType::BF16,
            kv_dtype: DType::BF16,
            params,
            mask: kind,
            allow_split: true,
        },
    )
    .unwrap();
    op.force_tiles(forced).unwrap();
    op.set_variant(variant).unwrap();
    op.plan(&qo, PrefillKv::Paged(&table), None).unwrap();
    if let Some(f) = forced {
        let t = op.tiles().unwrap();
        assert!(
            t.persistent == f.persistent && t.kv_tile == f.kv_tile && t.warps_q == f.warps_q,
            "forced {} but the plan runs {}",
            f.name(),
            t.name()
        );
    }
    let what = format!(
        "{} causal {causal} qo {qo_lens:?} kv {kv_lens:?} {:?} {}",
        variant.key(),
        heads,
        op.tiles().unwrap().name()
    );
    let (dq, dk, dv) = (upload(&dev, &q), upload(&dev, &k), upload(&dev, &v));
    let di = upload(&dev, &[table.kv_indices(), &[0]].concat());
    let mut out = poisoned::<half::bf16>(&dev, q.len());
    let mut lse = poisoned::<f32>(&dev, want_lse.len());
    op.run_paged(
        DevSlice::new(&dq, st),
        DevSlice::new(&dk, st),
        DevSlice::new(&dv, st),
        &desc,
        DevSlice::new(&di, st),
        DevSliceMut::new(&mut out, st),
        Some(DevSliceMut::new(&mut lse, st)),
        None,
    )
    .unwrap();
    let got = to_f32(&download(&dev, &out));
    let err = rel_l2_error(&got, &want.iter().map(|&x| x as f64).collect::<Vec<_>>());
    assert!(err <= 1e-2, "{what}: rel err {err}");
    // Fused RoPE rounds the rotated q and k to bf16 for the tensor cores (the reference rotates in
    // f64 and keeps them): the logits, hence the LSE, carry that rounding (~3e-3 on a single-key
    // row); the output stays within DESIGN.md's 1e-2 above.
    let lse_tol = if variant.rope.is_some() { 1e-2 } else { 2e-3 };
    check_lse(
        &format!("{what} lse"),
        &download(&dev, &lse),
        &want_lse,
        lse_tol,
    );
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_prefill_variants_match_their_definitions() {
    let mut rng = Rng::fresh("variants");
    let slopes32 = alibi_slopes(32);
    let sinks32: Vec<f32> = (0..32).map(|_| rng.sym(3.0)).collect();
    let slopes8 = alibi_slopes(8);
    let sinks8: Vec<f32> = (0..8).map(|_| rng.sym(3.0)).collect();
    for bits in 1u32..16 {
        let on = |b: u32| bits & (1 << b) != 0;
        for (heads, slopes, sinks) in [
            (HeadConfig::new(32, 8, 128).unwrap(), &slopes32, &sinks32),
            (HeadConfig::new(8, 8, 64).unwrap(), &slopes8, &sinks8),
        ] {
            let variant = Variant {
                logits_soft_cap: on(0).then_some(5.0),
                alibi_slopes: on(1).then_some(slopes.as_slice()),
                window_left: on(2).then_some(100),
                sinks: on(3).then_some(sinks.as_slice()),
                ..Default::default()
            };
            for portable in [false, true] {
                // Prompts, an append over a longer cache, decode-shaped rows, a split short append.
                run(
                    &mut rng,
                    &[300, 57],
                    &[300, 1057],
                    heads,
                    true,
                    &variant,
                    portable,
                );
                run(
                    &mut rng,
                    &[1, 1, 1],
                    &[700, 1, 33],
                    heads,
                    true,
                    &variant,
                    portable,
                );
                run(
                    &mut rng,
                    &[3],
                    &[5000],
                    heads,
                    bits % 2 == 0,
                    &variant,
                    portable,
                );
            }
        }
    }
}

/// The logits variants in persistent blocks on 64-key stages (the engine's shape for prompts and
/// appends since session 11: three warpgroups, four stages, intra-warpgroup overlap; ALiBi visits
/// key tiles diagonal first, the soft cap keeps the rescale slack), on a batch of more (item,
/// head) pairs than one wave of blocks so that every block claims several items, with an empty
/// request among them. Small enough for compute-sanitizer:
/// `bash .gpu/run sanitize persistent_variant_cases`.
#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_prefill_persistent_variant_cases() {
    if device().arch() < flashinfer::jit::Arch::SM90 {
        eprintln!("persistent blocks need sm_90a; nothing to check on this GPU");
        return;
    }
    let mut rng = Rng::fresh("prefill_persistent_variants");
    let heads = HeadConfig::new(32, 8, 128).unwrap();
    let slopes = alibi_slopes(32);
    let mut qo: Vec<usize> = (0..40).map(|i| 40 + (i * 37) % 90).collect();
    qo[5] = 0;
    let kv: Vec<usize> = qo.iter().map(|&l| l + 70).collect();
    let mut tiles = PrefillTiles::wgmma(128, 4, DType::BF16, true, PrefillMask::Causal, 3, 64)
        .with_intra_wg_overlap();
    tiles.warp_specialized = true;
    tiles.nstage = 4;
    tiles.persistent = true;
    for variant in [
        Variant {
            alibi_slopes: Some(slopes.as_slice()),
            ..Default::default()
        },
        Variant {
            logits_soft_cap: Some(5.0),
            ..Default::default()
        },
    ] {
        run_with(&mut rng, &qo, &kv, heads, true, &variant, Some(tiles));
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_prefill_fused_rope_matches_its_definition() {
    let mut rng = Rng::fresh("rope");
    let slopes = alibi_slopes(32);
    let sinks: Vec<f32> = (0..32).map(|_| rng.sym(3.0)).collect();
    // Positions past 30k (offsets) check the angle reduction; 1e4 and 5e5 bases, a scale.
    const OFFSETS2: [i32; 2] = [31_000, 7];
    const OFFSETS3: [i32; 3] = [0, 12_345, 3];
    const OFFSETS1: [i32; 1] = [40_000];
    for (rope, with_rest) in [
        (Rope::default(), false),
        (
            Rope {
                theta: 5e5,
                scale: 8.0,
            },
            true,
        ),
    ] {
        for (heads, portable) in [
            (HeadConfig::new(32, 8, 128).unwrap(), false),
            (HeadConfig::new(32, 8, 128).unwrap(), true),
            (HeadConfig::new(32, 32, 64).unwrap(), false),
            (HeadConfig::new(32, 4, 256).unwrap(), true),
        ] {
            let per_head = with_rest && heads.num_qo_heads == 32;
            let (slopes, sinks) = (slopes.as_slice(), sinks.as_slice());
            let variant = move |offsets: Option<&'static [i32]>| Variant {
                rope: Some(rope),
                rope_offsets: offsets,
                logits_soft_cap: with_rest.then_some(30.0),
                window_left: with_rest.then_some(700),
                alibi_slopes: per_head.then_some(slopes),
                sinks: per_head.then_some(sinks),
            };
            run(
                &mut rng,
                &[300, 57],
                &[300, 1057],
                heads,
                true,
                &variant(Some(&OFFSETS2)),
                portable,
            );
            run(
                &mut rng,
                &[1, 1, 1],
                &[700, 1, 33],
                heads,
                true,
                &variant(Some(&OFFSETS3)),
                portable,
            );
            run(
                &mut rng,
                &[3],
                &[5000],
                heads,
                false,
                &variant(Some(&OFFSETS1)),
                portable,
            );
            run(
                &mut rng,
                &[129],
                &[129],
                heads,
                true,
                &variant(None),
                portable,
            );
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_prefill_rope_offsets_must_cover_the_batch() {
    let dev = device();
    let mut op = BatchPrefill::new(
        &dev,
        PrefillConfig {
            heads: HeadConfig::new(8, 2, 64).unwrap(),
            q_dtype: DType::F16,
            kv_dtype: DType::F16,
            params: AttentionParams::default(),
            mask: PrefillMask::Causal,
            allow_split: true,
        },
    )
    .unwrap();
    let v = Variant {
        rope: Some(Default::default()),
        rope_offsets: Some(&[1, 2, 3]),
        ..Default::default()
    };
    op.set_variant(&v).unwrap();
    let qo = Ragged::from_lens(&[4, 4]);
    let e = op
        .plan(&qo, PrefillKv::Ragged(&qo), None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("rope_offsets"), "{e}");
    let neg = Variant {
        rope: Some(Default::default()),
        rope_offsets: Some(&[-1]),
        ..Default::default()
    };
    let e = op.set_variant(&neg).unwrap_err().to_string();
    assert!(e.contains("rope_offsets"), "{e}");
}
