//! Cascade and block-sparse attention on the CPU backend (no GPU): composed from levels (or from
//! the pattern's page-table view) they equal their definitions — the batch attended as one level,
//! and dense attention under the pattern's mask — over random batches, levels, R and C.

mod support;

use flashinfer::layout::{HeadConfig, KvLayout, PagedKv, PagedKvDesc};
use flashinfer::random::SplitMix64;
use flashinfer::reference::{self, rel_l2_error};
use flashinfer::{AttentionParams, LseBase, MaskMode};
use support::batches::{bsr_pattern, cascade_batch};

fn close(what: &str, got: &[f32], want: &[f32]) {
    let w: Vec<f64> = want.iter().map(|&x| x as f64).collect();
    let e = rel_l2_error(got, &w);
    assert!(e <= 1e-5, "{what}: rel err {e}");
}

#[test]
fn cascade_equals_one_level() {
    let mut rng = SplitMix64::new(7);
    for case in 0..24 {
        let levels = 1 + case % 3;
        let page_size = [1, 4, 16][case % 3];
        let heads = HeadConfig::new([4, 8, 6][case % 3], [4, 2, 3][case % 3], 16).unwrap();
        let batch = 1 + rng.below(6);
        let b = cascade_batch(&mut rng, batch, levels, page_size, 6, 5, 20);
        let desc = PagedKvDesc::new(
            if case % 2 == 0 {
                KvLayout::Nhd
            } else {
                KvLayout::Hnd
            },
            b.num_pages,
            page_size,
            heads.num_kv_heads,
            heads.head_dim,
        )
        .unwrap();
        let k: Vec<f32> = rng.vec(desc.required_len(), 1.0);
        let v: Vec<f32> = rng.vec(desc.required_len(), 1.0);
        let pool = PagedKv::new(desc, &k, &v).unwrap();
        let rows = b.qo.total();
        let q: Vec<f32> = rng.vec(rows * heads.num_qo_heads * heads.head_dim, 1.0);
        let params = AttentionParams {
            sm_scale: None,
            lse_base: if case % 2 == 0 {
                LseBase::Natural
            } else {
                LseBase::Base2
            },
        };
        let mut want = vec![0f32; q.len()];
        let mut want_lse = vec![0f32; rows * heads.num_qo_heads];
        reference::batch_prefill_paged(
            &q,
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
        let mut got = vec![f32::NAN; q.len()];
        let mut got_lse = vec![f32::NAN; want_lse.len()];
        let lv: Vec<_> = b.levels.iter().map(|(q, t)| (q, t)).collect();
        reference::cascade(&q, &pool, &lv, heads, &params, &mut got, &mut got_lse).unwrap();
        close(&format!("case {case} out"), &got, &want);
        close(&format!("case {case} lse"), &got_lse, &want_lse);
    }
}

#[test]
fn block_sparse_equals_dense_with_the_pattern_mask() {
    let mut rng = SplitMix64::new(11);
    for r in [1, 4, 16] {
        for c in [1, 4, 16] {
            for masked in [false, true] {
                let heads = HeadConfig::new(4, 2, 16).unwrap();
                let (m, n) = (1 + rng.below(40), c * (1 + rng.below(40 / c + 1)));
                let (bsr, block_mask) = bsr_pattern(&mut rng, r, c, m, n, 40);
                let q: Vec<f32> = rng.vec(m * 4 * 16, 1.0);
                let k: Vec<f32> = rng.vec(n * 2 * 16, 1.0);
                let v: Vec<f32> = rng.vec(n * 2 * 16, 1.0);
                let params = AttentionParams::default();
                let bm = masked.then_some(block_mask.as_slice());
                let (mut got, mut want) = (vec![f32::NAN; q.len()], vec![0f32; q.len()]);
                let (mut gl, mut wl) = (vec![f32::NAN; m * 4], vec![0f32; m * 4]);
                reference::block_sparse(
                    &q,
                    &k,
                    &v,
                    &bsr,
                    bm,
                    heads,
                    &params,
                    &mut got,
                    Some(&mut gl),
                )
                .unwrap();
                reference::block_sparse_dense(
                    &q,
                    &k,
                    &v,
                    &bsr,
                    bm,
                    heads,
                    &params,
                    &mut want,
                    Some(&mut wl),
                )
                .unwrap();
                let what = format!("R {r} C {c} masked {masked} ({m} x {n})");
                close(&what, &got, &want);
                for (a, b) in gl.iter().zip(&wl) {
                    assert!(
                        (a == b) || (a - b).abs() <= 1e-4 * (1.0 + b.abs()),
                        "{what}: lse {a} vs {b}"
                    );
                }
            }
        }
    }
}

#[test]
fn block_sparse_rejects_a_partial_last_column_block() {
    let bsr = flashinfer::layout::Bsr::new(4, 4, 8, 10, &[0, 1, 1], &[2]).unwrap();
    let e = bsr.as_paged().unwrap_err();
    assert!(e.to_string().contains("num_cols"), "{e}");
}
