//! User-written variants on the GPU against their definitions, on both matmul backends:
//! - sigmoid attention (no softmax, a scalar parameter) against its formula;
//! - query, logits and output transforms and a logits mask with the softmax, against the CPU
//!   backend with the equivalent scale, custom mask and output factor (a tensor parameter too);
//! - an LSE output is refused for a variant without softmax, and a broken snippet fails at
//!   plan() with NVRTC's message.

mod support;

use flashinfer::cuda::{DevSlice, DevSliceMut};
use flashinfer::layout::{CustomMask, HeadConfig, Ragged};
use flashinfer::prefill::{BatchPrefill, PrefillConfig, PrefillKv, PrefillMask, PrefillTiles};
use flashinfer::reference::{self, rel_l2_error};
use flashinfer::user_variant::{UserArgs, UserTensor, UserVariant};
use flashinfer::{AttentionParams, DType, Error, MaskMode};
use support::*;

type B = half::bf16;

struct Batch {
    qo: Ragged,
    kv: Ragged,
    q: Vec<B>,
    k: Vec<B>,
    v: Vec<B>,
}

fn batch(
    rng: &mut flashinfer::random::SplitMix64,
    qo: &[usize],
    kv: &[usize],
    h: HeadConfig,
) -> Batch {
    let (qo, kv) = (Ragged::from_lens(qo), Ragged::from_lens(kv));
    Batch {
        q: rng.vec(qo.total() * h.num_qo_heads * h.head_dim, 1.0),
        k: rng.vec(kv.total() * h.num_kv_heads * h.head_dim, 1.0),
        v: rng.vec(kv.total() * h.num_kv_heads * h.head_dim, 1.0),
        qo,
        kv,
    }
}

/// Runs `variant` (causal) on the GPU; `portable` forces the mma.sync backend.
fn run_gpu(
    b: &Batch,
    h: HeadConfig,
    variant: UserVariant,
    args: UserArgs,
    portable: bool,
) -> Vec<f32> {
    let dev = device();
    let st = dev.stream();
    let mut op = BatchPrefill::new(
        &dev,
        PrefillConfig {
            heads: h,
            q_dtype: DType::BF16,
            kv_dtype: DType::BF16,
            params: AttentionParams::default(),
            mask: PrefillMask::Causal,
            allow_split: true,
        },
    )
    .unwrap();
    if portable {
        let t = PrefillTiles::mma_sync(
            h.head_dim,
            h.group_size(),
            DType::BF16,
            DType::BF16,
            false,
            PrefillMask::Causal,
            1 << 20,
        );
        op.force_tiles(Some(t)).unwrap();
    }
    op.set_user_variant(variant, args).unwrap();
    op.plan(&b.qo, PrefillKv::Ragged(&b.kv), None).unwrap();
    let (dq, dk, dv) = (upload(&dev, &b.q), upload(&dev, &b.k), upload(&dev, &b.v));
    let mut out = poisoned::<B>(&dev, b.q.len());
    op.run_ragged(
        DevSlice::new(&dq, st),
        DevSlice::new(&dk, st),
        DevSlice::new(&dv, st),
        DevSliceMut::new(&mut out, st),
        None,
        None,
    )
    .unwrap();
    to_f32(&download(&dev, &out))
}

/// `o_i = Σ_{j visible} sigmoid(q_i·k_j · scale + bias) v_j`, causal, in f64.
fn sigmoid_formula(b: &Batch, h: HeadConfig, scale: f64, bias: f64) -> Vec<f64> {
    let (q, k, v) = (to_f64(&b.q), to_f64(&b.k), to_f64(&b.v));
    let (hq, hk, d) = (h.num_qo_heads, h.num_kv_heads, h.head_dim);
    let mut out = vec![0f64; q.len()];
    for r in 0..b.qo.batch_size() {
        let (q0, qn, k0, kn) = (
            b.qo.indptr()[r] as usize,
            b.qo.len(r),
            b.kv.indptr()[r] as usize,
            b.kv.len(r),
        );
        for i in 0..qn {
            for head in 0..hq {
                let kh = head / h.group_size();
                let qrow = &q[((q0 + i) * hq + head) * d..][..d];
                for j in 0..=(kn - qn + i) {
                    let krow = &k[((k0 + j) * hk + kh) * d..][..d];
                    let logit: f64 = qrow.iter().zip(krow).map(|(a, b)| a * b).sum::<f64>() * scale;
                    let w = 1.0 / (1.0 + (-(logit + bias)).exp());
                    for x in 0..d {
                        out[((q0 + i) * hq + head) * d + x] += w * v[((k0 + j) * hk + kh) * d + x];
                    }
                }
            }
        }
    }
    out
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_sigmoid_attention_matches_its_formula() {
    let mut rng = Rng::fresh("user-sigmoid");
    for (h, qo, kv) in [
        (
            HeadConfig::new(32, 8, 128).unwrap(),
            vec![77, 1, 300],
            vec![77, 500, 300],
        ),
        (
            HeadConfig::new(7, 1, 64).unwrap(),
            vec![5, 130],
            vec![2000, 130],
        ),
    ] {
        let b = batch(&mut rng, &qo, &kv, h);
        let scale = AttentionParams::default().scale(h.head_dim) as f64;
        let want = sigmoid_formula(&b, h, scale, -1.5);
        for portable in [false, true] {
            let variant = UserVariant {
                name: "sigmoid".into(),
                use_softmax: false,
                logits_transform: Some(
                    "return 1.f / (1.f + __expf(-(logit + params.bias)));".into(),
                ),
                scalars: vec!["bias".into()],
                ..Default::default()
            };
            let got = run_gpu(
                &b,
                h,
                variant,
                UserArgs {
                    scalars: vec![-1.5],
                    tensors: vec![],
                },
                portable,
            );
            let err = rel_l2_error(&got, &want);
            assert!(
                err <= 1e-2,
                "{h:?} qo {qo:?} kv {kv:?} portable {portable}: rel err {err}"
            );
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_user_hooks_with_softmax_match_the_cpu_backend() {
    let mut rng = Rng::fresh("user-hooks");
    let dev = device();
    let h = HeadConfig::new(16, 4, 128).unwrap();
    let (qo, kv) = (vec![100, 3, 257], vec![100, 1200, 300]);
    let b = batch(&mut rng, &qo, &kv, h);
    // q * 1.5 before q·k, logit * temperature[qo_head] (a tensor), keys with k_pos % 3 == 1 hidden
    // (on top of causal), output * 0.25 + 0: the CPU backend sees scale * 1.5 * t per head...
    // which it cannot take per head, so every head gets the same temperature value here.
    let temperature = 0.7f32;
    let temps = upload(&dev, &vec![temperature; h.num_qo_heads]);
    let variant = UserVariant {
        name: "hooks".into(),
        use_softmax: true,
        query_transform: Some("return q * params.q_gain;".into()),
        key_transform: Some("return k;".into()),
        logits_transform: Some("return logit * params.temperature[qo_head];".into()),
        logits_mask: Some("return k_pos % 3 != 1;".into()),
        output_transform: Some("return o * 0.25f;".into()),
        scalars: vec!["q_gain".into()],
        tensors: vec![("temperature".into(), UserTensor::F32)],
    };
    let ptr = DevSlice::new(&temps, dev.stream()).ptr();
    let masks: Vec<Vec<bool>> = qo
        .iter()
        .zip(&kv)
        .map(|(&qn, &kn)| {
            (0..qn * kn)
                .map(|e| {
                    let (i, j) = (e / kn, e % kn);
                    j <= kn - qn + i && j % 3 != 1
                })
                .collect()
        })
        .collect();
    let mask = CustomMask::pack(&masks, &qo, &kv).unwrap();
    let params = AttentionParams {
        sm_scale: Some(AttentionParams::default().scale(h.head_dim) * 1.5 * temperature),
        ..Default::default()
    };
    let mut want = vec![B::ZERO; b.q.len()];
    reference::batch_prefill_ragged(
        &b.q,
        &b.qo,
        &b.k,
        &b.v,
        &b.kv,
        h,
        MaskMode::Custom(&mask),
        &params,
        &mut want,
        None,
    )
    .unwrap();
    let want: Vec<f64> = to_f64(&want).iter().map(|x| x * 0.25).collect();
    for portable in [false, true] {
        let got = run_gpu(
            &b,
            h,
            variant.clone(),
            UserArgs {
                scalars: vec![1.5],
                tensors: vec![ptr],
            },
            portable,
        );
        let err = rel_l2_error(&got, &want);
        assert!(err <= 1e-2, "portable {portable}: rel err {err}");
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_user_variant_errors_are_typed() {
    let dev = device();
    let h = HeadConfig::new(8, 2, 64).unwrap();
    let mut op = BatchPrefill::new(
        &dev,
        PrefillConfig {
            heads: h,
            q_dtype: DType::BF16,
            kv_dtype: DType::BF16,
            params: AttentionParams::default(),
            mask: PrefillMask::Causal,
            allow_split: true,
        },
    )
    .unwrap();
    let broken = UserVariant {
        name: "broken".into(),
        use_softmax: true,
        logits_transform: Some("return logit * not_declared;".into()),
        ..Default::default()
    };
    op.set_user_variant(broken, UserArgs::default()).unwrap();
    let qo = Ragged::from_lens(&[4]);
    match op.plan(&qo, PrefillKv::Ragged(&qo), None) {
        Err(Error::Compile { log, .. }) => assert!(log.contains("not_declared"), "{log}"),
        other => panic!("expected a compile error, got {:?}", other.err()),
    }
    // No softmax: an LSE output is refused before any launch.
    let sig = UserVariant {
        name: "linear".into(),
        use_softmax: false,
        ..Default::default()
    };
    op.set_user_variant(sig, UserArgs::default()).unwrap();
    op.plan(&qo, PrefillKv::Ragged(&qo), None).unwrap();
    let n = 4 * h.num_qo_heads * h.head_dim;
    let (q, k) = (
        upload(&dev, &vec![B::ONE; n]),
        upload(&dev, &vec![B::ONE; 4 * h.num_kv_heads * h.head_dim]),
    );
    let mut o = poisoned::<B>(&dev, n);
    let mut lse = poisoned::<f32>(&dev, 4 * h.num_qo_heads);
    let st = dev.stream();
    let e = op
        .run_ragged(
            DevSlice::new(&q, st),
            DevSlice::new(&k, st),
            DevSlice::new(&k, st),
            DevSliceMut::new(&mut o, st),
            Some(DevSliceMut::new(&mut lse, st)),
            None,
        )
        .unwrap_err();
    assert!(e.to_string().contains("lse"), "{e}");
    // Arguments must match the declaration.
    let e = op
        .set_user_args(UserArgs {
            scalars: vec![1.0],
            tensors: vec![],
        })
        .unwrap_err();
    assert!(e.to_string().contains("user_args"), "{e}");
}
