//! GPU cascade (shared-prefix) and block-sparse attention against the CPU backend: a cascade must
//! equal the same batch attended as one level, block-sparse attention must equal dense attention
//! under the pattern's mask; over random batches, levels (1 to 3), decode and append stages, page
//! sizes, and R, C in {1, 4, 16}, with and without masks inside blocks.

mod support;

use flashinfer::block_sparse::{BlockSparseAttention, BlockSparseConfig};
use flashinfer::cascade::{CascadeConfig, CascadeLevel, MultiLevelCascade};
use flashinfer::cuda::{DevSlice, DevSliceMut, DeviceRepr};
use flashinfer::layout::{HeadConfig, KvLayout, PagedKv, PagedKvDesc};
use flashinfer::random::SplitMix64;
use flashinfer::reference::{self, rel_l2_error};
use flashinfer::{AttentionParams, Element, LseBase, MaskMode};
use support::batches::{bsr_pattern, cascade_batch};
use support::*;

#[allow(clippy::too_many_arguments)]
fn run_cascade<T: Element + DeviceRepr>(
    rng: &mut SplitMix64,
    batch: usize,
    levels: usize,
    page_size: usize,
    heads: (usize, usize, usize),
    max_shared_pages: usize,
    max_qo: usize,
    max_suffix: usize,
) {
    let dev = device();
    let st = dev.stream();
    let heads = HeadConfig::new(heads.0, heads.1, heads.2).unwrap();
    let b = cascade_batch(
        rng,
        batch,
        levels,
        page_size,
        max_shared_pages,
        max_qo,
        max_suffix,
    );
    let layout = if rng.below(2) == 0 {
        KvLayout::Nhd
    } else {
        KvLayout::Hnd
    };
    let desc = PagedKvDesc::new(
        layout,
        b.num_pages,
        page_size,
        heads.num_kv_heads,
        heads.head_dim,
    )
    .unwrap();
    let k: Vec<T> = rng.vec(desc.required_len(), 1.0);
    let v: Vec<T> = rng.vec(desc.required_len(), 1.0);
    let rows = b.qo.total();
    let q: Vec<T> = rng.vec(rows * heads.num_qo_heads * heads.head_dim, 1.0);
    let params = AttentionParams {
        sm_scale: None,
        lse_base: LseBase::Natural,
    };
    // The definition: the whole batch as one level (each request's pages over all levels).
    let pool = PagedKv::new(desc, &k, &v).unwrap();
    let mut want = vec![0f32; q.len()];
    let mut want_lse = vec![0f32; rows * heads.num_qo_heads];
    reference::batch_prefill_paged(
        &to_f32(&q),
        &b.qo,
        &pool,
        &b.one_level,
        heads,
        MaskMode::Causal,
        &params,
        &mut want,
        Some(&mut want_lse),
    )
    .unwrap();

    let mut op = MultiLevelCascade::new(
        &dev,
        CascadeConfig {
            heads,
            dtype: T::DTYPE,
            params,
            num_levels: levels,
        },
    )
    .unwrap();
    let lv: Vec<CascadeLevel> = b
        .levels
        .iter()
        .map(|(qo, table)| CascadeLevel {
            qo_indptr: qo,
            table,
        })
        .collect();
    op.plan(&lv).unwrap();
    let (dq, dk, dv) = (upload(&dev, &q), upload(&dev, &k), upload(&dev, &v));
    let tables: Vec<_> = b
        .levels
        .iter()
        .map(|(_, t)| upload(&dev, &[t.kv_indices(), &[0]].concat()))
        .collect();
    let ids: Vec<DevSlice<i32>> = tables.iter().map(|t| DevSlice::new(t, st)).collect();
    let mut dout = poisoned::<T>(&dev, q.len());
    let mut dlse = poisoned::<f32>(&dev, want_lse.len());
    op.run(
        DevSlice::new(&dq, st),
        DevSlice::new(&dk, st),
        DevSlice::new(&dv, st),
        &desc,
        &ids,
        DevSliceMut::new(&mut dout, st),
        Some(DevSliceMut::new(&mut dlse, st)),
    )
    .unwrap();
    let got = to_f32(&download(&dev, &dout));
    let what = format!(
        "cascade batch {batch} levels {levels} page {page_size} {heads:?} {:?} qo {:?}",
        T::DTYPE,
        b.qo.lens()
    );
    let err = rel_l2_error(&got, &want.iter().map(|&x| x as f64).collect::<Vec<_>>());
    assert!(err <= tolerance::<T>(), "{what}: rel err {err}");
    check_lse(
        &format!("{what} lse"),
        &download(&dev, &dlse),
        &want_lse,
        2e-3,
    );
    // Without an LSE output (the cascade keeps its own running LSE): the same result.
    let mut dout2 = poisoned::<T>(&dev, q.len());
    op.run(
        DevSlice::new(&dq, st),
        DevSlice::new(&dk, st),
        DevSlice::new(&dv, st),
        &desc,
        &ids,
        DevSliceMut::new(&mut dout2, st),
        None,
    )
    .unwrap();
    let got2 = to_f32(&download(&dev, &dout2));
    assert!(
        got.iter()
            .zip(&got2)
            .all(|(a, b)| a.to_bits() == b.to_bits()),
        "{what}: a run without LSE differs"
    );
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_cascade_equals_one_level() {
    let mut rng = Rng::fresh("cascade");
    // Decode stage (one query per request) and append stage (several), 1 to 3 levels.
    for levels in 1..=3 {
        run_cascade::<half::bf16>(&mut rng, 7, levels, 16, (32, 8, 128), 40, 1, 40);
        run_cascade::<half::f16>(&mut rng, 5, levels, 1, (8, 2, 64), 300, 6, 30);
        run_cascade::<half::bf16>(&mut rng, 3, levels, 5, (7, 1, 256), 50, 20, 100);
    }
    // A long shared prefix over a large batch: the shared level takes the wgmma tiles (on
    // Hopper) and is split over the SMs; the last level is a decode step.
    run_cascade::<half::bf16>(&mut rng, 64, 2, 16, (32, 8, 128), 256, 1, 64);
    run_cascade::<half::bf16>(&mut rng, 16, 3, 16, (32, 8, 128), 128, 3, 64);
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_block_sparse_equals_dense_with_the_pattern_mask() {
    let mut rng = Rng::fresh("block_sparse");
    let dev = device();
    let st = dev.stream();
    for r in [1, 4, 16] {
        for c in [1, 4, 16] {
            for masked in [false, true] {
                let heads = if masked {
                    HeadConfig::new(8, 2, 128).unwrap()
                } else {
                    HeadConfig::new(4, 4, 64).unwrap()
                };
                let (m, n) = (1 + rng.below(300), c * (1 + rng.below(400 / c)));
                let (bsr, block_mask) = bsr_pattern(&mut rng, r, c, m, n, 30);
                let (hq, hk, d) = (heads.num_qo_heads, heads.num_kv_heads, heads.head_dim);
                let q: Vec<half::bf16> = rng.vec(m * hq * d, 1.0);
                let k: Vec<half::bf16> = rng.vec(n * hk * d, 1.0);
                let v: Vec<half::bf16> = rng.vec(n * hk * d, 1.0);
                let params = AttentionParams::default();
                let bm = masked.then_some(block_mask.as_slice());
                let mut want = vec![0f32; q.len()];
                let mut want_lse = vec![0f32; m * hq];
                reference::block_sparse_dense(
                    &to_f32(&q),
                    &k,
                    &v,
                    &bsr,
                    bm,
                    heads,
                    &params,
                    &mut want,
                    Some(&mut want_lse),
                )
                .unwrap();
                let mut op = BlockSparseAttention::new(
                    &dev,
                    BlockSparseConfig {
                        heads,
                        dtype: flashinfer::DType::BF16,
                        params,
                    },
                )
                .unwrap();
                op.plan(&bsr, bm).unwrap();
                let (dq, dk, dv) = (upload(&dev, &q), upload(&dev, &k), upload(&dev, &v));
                let mut dout = poisoned::<half::bf16>(&dev, q.len());
                let mut dlse = poisoned::<f32>(&dev, m * hq);
                op.run(
                    DevSlice::new(&dq, st),
                    DevSlice::new(&dk, st),
                    DevSlice::new(&dv, st),
                    DevSliceMut::new(&mut dout, st),
                    Some(DevSliceMut::new(&mut dlse, st)),
                )
                .unwrap();
                let got = to_f32(&download(&dev, &dout));
                let what = format!("R {r} C {c} masked {masked} ({m} x {n})");
                let err = rel_l2_error(&got, &want.iter().map(|&x| x as f64).collect::<Vec<_>>());
                assert!(err <= 1e-2, "{what}: rel err {err}");
                check_lse(
                    &format!("{what} lse"),
                    &download(&dev, &dlse),
                    &want_lse,
                    2e-3,
                );
            }
        }
    }
}
