//! The CPU backend's attention variants against an independent f64 implementation of their
//! definitions (crate::variant's module docs), over random batches and every combination.

use flashinfer::layout::{
    CustomMask, HeadConfig, KvLayout, PageTable, PagedKv, PagedKvDesc, Ragged,
};
use flashinfer::random::SplitMix64;
use flashinfer::reference::{self, rel_l2_error};
use flashinfer::variant::{alibi_slopes, Rope, Variant};
use flashinfer::{AttentionParams, LseBase, MaskMode};

/// Naive f64 attention with variants, written from the definitions alone.
#[allow(clippy::too_many_arguments)]
fn naive(
    q: &[f32],
    qo: &Ragged,
    pool: &PagedKv<'_, f32>,
    table: &PageTable,
    heads: HeadConfig,
    mask: &MaskMode<'_>,
    scale: f64,
    v: &Variant<'_>,
) -> (Vec<f64>, Vec<f64>) {
    let (hq, d) = (heads.num_qo_heads, heads.head_dim);
    let mut out = vec![0f64; q.len()];
    let mut lse = vec![f64::NEG_INFINITY; qo.total() * hq];
    let rot = |x: &mut Vec<f64>, pos: f64, r: &Rope| {
        let half = d / 2;
        let y = x.clone();
        for k in 0..half {
            let ang = pos / r.scale as f64 / (r.theta as f64).powf(2.0 * k as f64 / d as f64);
            x[k] = y[k] * ang.cos() - y[k + half] * ang.sin();
            x[k + half] = y[k] * ang.sin() + y[k + half] * ang.cos();
        }
    };
    for r in 0..qo.batch_size() {
        let (ql, kl) = (qo.len(r), table.kv_len(r));
        let off = v.rope_offsets.map_or(0.0, |o| o[r] as f64);
        for i in 0..ql {
            let t = qo.start(r) + i;
            let p = kl as f64 - ql as f64 + i as f64;
            for h in 0..hq {
                let kvh = h / heads.group_size();
                let mut qv: Vec<f64> = q[(t * hq + h) * d..(t * hq + h + 1) * d]
                    .iter()
                    .map(|&x| x as f64)
                    .collect();
                if let Some(rp) = &v.rope {
                    rot(&mut qv, off + p, rp);
                }
                let mut logits = Vec::new();
                for j in 0..kl {
                    let seen = match mask {
                        MaskMode::None => true,
                        MaskMode::Causal => (j as f64) <= p,
                        MaskMode::Custom(m) => m.visible(r, i, j),
                    } && v.window_left.is_none_or(|w| j as f64 >= p - w as f64);
                    if !seen {
                        continue;
                    }
                    let (pg, s) = table.locate(r, j);
                    let mut kv: Vec<f64> = pool.key(pg, s, kvh).iter().map(|&x| x as f64).collect();
                    if let Some(rp) = &v.rope {
                        rot(&mut kv, off + j as f64, rp);
                    }
                    let mut x: f64 = qv.iter().zip(&kv).map(|(a, b)| a * b).sum::<f64>() * scale;
                    if let Some(c) = v.logits_soft_cap {
                        x = c as f64 * (x / c as f64).tanh();
                    }
                    if let Some(sl) = v.alibi_slopes {
                        x += sl[h] as f64 * (j as f64 - p);
                    }
                    logits.push((j, x));
                }
                let sink = v.sinks.map(|s| s[h] as f64);
                let m = logits
                    .iter()
                    .map(|l| l.1)
                    .chain(sink)
                    .fold(f64::NEG_INFINITY, f64::max);
                if m == f64::NEG_INFINITY {
                    continue;
                }
                let mut sum = sink.map_or(0.0, |s| (s - m).exp());
                let o = &mut out[(t * hq + h) * d..(t * hq + h + 1) * d];
                for &(j, x) in &logits {
                    let w = (x - m).exp();
                    sum += w;
                    let (pg, s) = table.locate(r, j);
                    for (a, &b) in o.iter_mut().zip(pool.value(pg, s, kvh)) {
                        *a += w * b as f64;
                    }
                }
                o.iter_mut().for_each(|a| *a /= sum);
                lse[t * hq + h] = m + sum.ln();
            }
        }
    }
    (out, lse)
}

#[test]
fn every_variant_combination_matches_its_definition() {
    let mut rng = SplitMix64::new(2026);
    for case in 0..64u32 {
        let bit = |b: u32| case & (1 << b) != 0;
        let (hq, hk, d) = [(4, 2, 16), (6, 3, 8), (8, 8, 32)][case as usize % 3];
        let heads = HeadConfig::new(hq, hk, d).unwrap();
        let batch = 1 + rng.below(4);
        let qo_lens: Vec<usize> = (0..batch).map(|_| rng.below(6)).collect();
        let kv_lens: Vec<usize> = qo_lens.iter().map(|&q| q + rng.below(40)).collect();
        let page = 1 + rng.below(8);
        let num_pages = PageTable::pages_needed(&kv_lens, page) + 1;
        let mut ids: Vec<i32> = (0..num_pages as i32).collect();
        rng.shuffle(&mut ids);
        let table = PageTable::from_kv_lens(&kv_lens, page, &ids, num_pages).unwrap();
        let desc = PagedKvDesc::new(
            KvLayout::Nhd,
            num_pages,
            page,
            heads.num_kv_heads,
            heads.head_dim,
        )
        .unwrap();
        let k: Vec<f32> = rng.vec(desc.required_len(), 1.0);
        let vv: Vec<f32> = rng.vec(desc.required_len(), 1.0);
        let pool = PagedKv::new(desc, &k, &vv).unwrap();
        let qo = Ragged::from_lens(&qo_lens);
        let q: Vec<f32> = rng.vec(qo.total() * heads.num_qo_heads * heads.head_dim, 2.0);
        let slopes = alibi_slopes(heads.num_qo_heads);
        let sinks: Vec<f32> = (0..heads.num_qo_heads).map(|_| rng.sym(2.0)).collect();
        let offsets: Vec<i32> = (0..batch).map(|_| rng.below(5000) as i32).collect();
        let variant = Variant {
            rope: bit(0).then_some(Rope {
                theta: 1e4,
                scale: [1.0, 4.0][rng.below(2)],
            }),
            rope_offsets: (bit(0) && bit(5)).then_some(offsets.as_slice()),
            logits_soft_cap: bit(1).then_some(2.5),
            window_left: bit(2).then_some(rng.below(12)),
            alibi_slopes: bit(3).then_some(slopes.as_slice()),
            sinks: bit(4).then_some(sinks.as_slice()),
        };
        let custom = CustomMask::pack(
            &qo_lens
                .iter()
                .zip(&kv_lens)
                .map(|(&a, &b)| (0..a * b).map(|_| rng.below(3) != 0).collect())
                .collect::<Vec<_>>(),
            &qo_lens,
            &kv_lens,
        )
        .unwrap();
        let mask = [MaskMode::Causal, MaskMode::None, MaskMode::Custom(&custom)][case as usize % 3];
        let params = AttentionParams {
            sm_scale: Some(0.4),
            lse_base: LseBase::Natural,
        };
        let mut out = vec![f32::NAN; q.len()];
        let mut lse = vec![f32::NAN; qo.total() * heads.num_qo_heads];
        reference::batch_attention_paged(
            &q,
            &qo,
            &pool,
            &table,
            heads,
            mask,
            &params,
            &variant,
            &mut out,
            Some(&mut lse),
        )
        .unwrap();
        let (want, want_lse) = naive(&q, &qo, &pool, &table, heads, &mask, 0.4, &variant);
        let what = format!("case {case} {} {mask:?}", variant.key());
        let e = rel_l2_error(&out, &want);
        assert!(e <= 1e-4, "{what}: rel err {e}");
        for (g, w) in lse.iter().zip(&want_lse) {
            assert!(
                (*w == f64::NEG_INFINITY && *g == f32::NEG_INFINITY)
                    || ((*g as f64) - w).abs() <= 1e-4 * (1.0 + w.abs()),
                "{what}: lse {g} vs {w}"
            );
        }
    }
}

#[test]
fn plain_variant_equals_batch_prefill() {
    let mut rng = SplitMix64::new(5);
    let heads = HeadConfig::new(8, 2, 16).unwrap();
    let kv_lens = [37usize, 0, 5];
    let qo_lens = [4usize, 0, 5];
    let table = PageTable::from_kv_lens(&kv_lens, 4, &(0..20).collect::<Vec<i32>>(), 20).unwrap();
    let desc = PagedKvDesc::new(KvLayout::Hnd, 20, 4, 2, 16).unwrap();
    let (k, v): (Vec<f32>, Vec<f32>) = (
        rng.vec(desc.required_len(), 1.0),
        rng.vec(desc.required_len(), 1.0),
    );
    let pool = PagedKv::new(desc, &k, &v).unwrap();
    let qo = Ragged::from_lens(&qo_lens);
    let q: Vec<f32> = rng.vec(9 * 8 * 16, 1.0);
    let params = AttentionParams::default();
    let (mut a, mut b) = (vec![0f32; q.len()], vec![0f32; q.len()]);
    reference::batch_prefill_paged(
        &q,
        &qo,
        &pool,
        &table,
        heads,
        MaskMode::Causal,
        &params,
        &mut a,
        None,
    )
    .unwrap();
    reference::batch_attention_paged(
        &q,
        &qo,
        &pool,
        &table,
        heads,
        MaskMode::Causal,
        &params,
        &Variant::default(),
        &mut b,
        None,
    )
    .unwrap();
    let e = rel_l2_error(&b, &a.iter().map(|&x| x as f64).collect::<Vec<_>>());
    assert!(e <= 1e-6, "rel err {e}");
}
