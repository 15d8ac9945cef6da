//! Sigmoid attention as a user variant: no softmax; each visible key weighs its value by
//! `sigmoid(q·k · sm_scale + bias)`, so `o_i = Σ_{j visible} sigmoid(q_i·k_j · sm_scale + b) v_j`.
//!
//! The variant is two lines of CUDA in a logits hook and one scalar parameter; the engine compiles
//! it into the prefill kernel on first use (NVRTC, cached on disk). The example runs a causal batch
//! of three requests on the GPU and checks every output against the formula computed here in f64.
//!
//!     cargo run --release --example sigmoid_attention
//!
//! Without a GPU it says so and exits successfully (there is nothing to compile for).

use flashinfer::cuda::{DevSlice, DevSliceMut, Device};
use flashinfer::layout::{HeadConfig, Ragged};
use flashinfer::prefill::{BatchPrefill, PrefillConfig, PrefillKv, PrefillMask};
use flashinfer::random::SplitMix64;
use flashinfer::user_variant::{UserArgs, UserVariant};
use flashinfer::{AttentionParams, DType, Error};

/// The variant: a logits hook (the natural logit plus the bias, through a sigmoid) and no softmax.
fn sigmoid_attention() -> UserVariant {
    UserVariant {
        name: "sigmoid".into(),
        use_softmax: false,
        logits_transform: Some("return 1.f / (1.f + __expf(-(logit + params.bias)));".into()),
        scalars: vec!["bias".into()],
        ..Default::default()
    }
}

/// The formula, in f64, over the same bf16 inputs (causal, aligned bottom-right).
#[allow(clippy::too_many_arguments)]
fn formula(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    qo: &Ragged,
    kv: &Ragged,
    h: HeadConfig,
    sm_scale: f64,
    bias: f64,
) -> Vec<f64> {
    let (hq, hk, d) = (h.num_qo_heads, h.num_kv_heads, h.head_dim);
    let mut out = vec![0f64; q.len()];
    for r in 0..qo.batch_size() {
        let (q0, qn) = (qo.indptr()[r] as usize, qo.len(r));
        let (k0, kn) = (kv.indptr()[r] as usize, kv.len(r));
        for i in 0..qn {
            for head in 0..hq {
                let kh = head / h.group_size();
                let qrow = &q[((q0 + i) * hq + head) * d..][..d];
                let orow = &mut out[((q0 + i) * hq + head) * d..][..d];
                // Query i sees keys up to kn - qn + i.
                for j in 0..=(kn - qn + i) {
                    let krow = &k[((k0 + j) * hk + kh) * d..][..d];
                    let vrow = &v[((k0 + j) * hk + kh) * d..][..d];
                    let logit: f64 = qrow
                        .iter()
                        .zip(krow)
                        .map(|(&a, &b)| a as f64 * b as f64)
                        .sum::<f64>()
                        * sm_scale;
                    let w = 1.0 / (1.0 + (-(logit + bias)).exp());
                    for (o, &x) in orow.iter_mut().zip(vrow) {
                        *o += w * x as f64;
                    }
                }
            }
        }
    }
    out
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dev = match Device::new(0) {
        Ok(dev) => dev,
        Err(Error::NoGpu(why)) => {
            println!("sigmoid_attention: no GPU ({why}); nothing to run");
            return Ok(());
        }
        Err(e) => return Err(e.into()),
    };
    let heads = HeadConfig::new(32, 8, 128)?;
    let (qo_lens, kv_lens) = ([77usize, 1, 300], [77usize, 500, 300]);
    let (qo, kv) = (Ragged::from_lens(&qo_lens), Ragged::from_lens(&kv_lens));
    let mut rng = SplitMix64::new(7);
    let q: Vec<half::bf16> = rng.vec(qo.total() * heads.num_qo_heads * heads.head_dim, 1.0);
    let k: Vec<half::bf16> = rng.vec(kv.total() * heads.num_kv_heads * heads.head_dim, 1.0);
    let v: Vec<half::bf16> = rng.vec(kv.total() * heads.num_kv_heads * heads.head_dim, 1.0);
    let bias = -2.0f32;
    let params = AttentionParams::default();

    let mut op = BatchPrefill::new(
        &dev,
        PrefillConfig {
            heads,
            q_dtype: DType::BF16,
            kv_dtype: DType::BF16,
            params,
            mask: PrefillMask::Causal,
            allow_split: true,
        },
    )?;
    op.set_user_variant(
        sigmoid_attention(),
        UserArgs {
            scalars: vec![bias],
            tensors: vec![],
        },
    )?;
    // plan() compiles the kernel with the hook (or loads it from the disk cache).
    op.plan(&qo, PrefillKv::Ragged(&kv), None)?;
    let st = dev.stream();
    let (dq, dk, dv) = (st.clone_htod(&q)?, st.clone_htod(&k)?, st.clone_htod(&v)?);
    let mut out = st.clone_htod(&vec![half::bf16::NAN; q.len()])?;
    op.run_ragged(
        DevSlice::new(&dq, st),
        DevSlice::new(&dk, st),
        DevSlice::new(&dv, st),
        DevSliceMut::new(&mut out, st),
        None,
        None,
    )?;
    let got: Vec<f32> = st.clone_dtoh(&out)?.iter().map(|x| x.to_f32()).collect();

    let f32s = |x: &[half::bf16]| x.iter().map(|v| v.to_f32()).collect::<Vec<f32>>();
    let want = formula(
        &f32s(&q),
        &f32s(&k),
        &f32s(&v),
        &qo,
        &kv,
        heads,
        params.scale(heads.head_dim) as f64,
        bias as f64,
    );
    let err = flashinfer::reference::rel_l2_error(&got, &want);
    println!(
        "sigmoid attention on {} ({} requests, kernel {}): rel L2 error vs the formula {err:.2e}",
        dev.info().name,
        qo_lens.len(),
        op.tiles().map_or("?".into(), |t| t.name())
    );
    if err.is_nan() || err > 1e-2 {
        return Err(format!("rel L2 error {err:.3e} above 1e-2").into());
    }
    Ok(())
}
