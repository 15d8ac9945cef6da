//! User variants through NVRTC, without a GPU: a sigmoid-attention variant (no softmax, a scalar
//! and a tensor parameter, every hook filled) compiles for sm_80 and sm_90a, and a broken snippet
//! comes back as `Error::Compile` carrying NVRTC's message, pointing into the snippet.

use flashinfer::jit::{Arch, DiskCache, Jit, SearchEnv};
use flashinfer::prefill::{PrefillMask, PrefillTiles};
use flashinfer::user_variant::{UserTensor, UserVariant};
use flashinfer::{DType, Error};

fn jit() -> Option<Jit> {
    let dir = std::env::temp_dir().join(format!("flashinfer-user-variant-{}", std::process::id()));
    match Jit::with(&SearchEnv::from_process(), DiskCache::open(&dir).unwrap()) {
        Ok(jit) => Some(jit),
        Err(e) if std::env::var("FLASHINFER_REQUIRE_NVRTC").as_deref() == Ok("1") => {
            panic!("FLASHINFER_REQUIRE_NVRTC=1 but NVRTC is unusable: {e}")
        }
        Err(e) => {
            eprintln!("\n*** SKIPPED: NVRTC not found ***\n{e}\n");
            None
        }
    }
}

fn every_hook() -> UserVariant {
    UserVariant {
        name: "sigmoid_all_hooks".into(),
        use_softmax: false,
        query_transform: Some("return q * params.q_gain;".into()),
        key_transform: Some("return k + 0.f * (float)(kv_head + pos + dim);".into()),
        logits_transform: Some(
            "return 1.f / (1.f + __expf(-(logit + params.bias[qo_head])));".into(),
        ),
        logits_mask: Some("return (q_pos - k_pos) % 3 != 1;".into()),
        output_transform: Some("return o * 0.5f;".into()),
        scalars: vec!["q_gain".into()],
        tensors: vec![("bias".into(), UserTensor::F32)],
    }
}

#[test]
fn user_variants_compile_and_report_nvrtc_errors() {
    let Some(jit) = jit() else { return };
    let dt = DType::BF16;
    let tiles = [
        PrefillTiles::mma_sync(128, 4, dt, dt, true, PrefillMask::Causal, 1024),
        PrefillTiles::mma_sync(64, 1, dt, dt, false, PrefillMask::None, 4),
        PrefillTiles::wgmma(128, 4, dt, true, PrefillMask::Causal, 3, 64),
    ];
    let softmax = UserVariant {
        name: "scaled_softmax".into(),
        use_softmax: true,
        logits_transform: Some("return logit * params.temperature;".into()),
        scalars: vec!["temperature".into()],
        ..Default::default()
    };
    for t in tiles {
        for v in [every_hook(), softmax.clone()] {
            let spec = t.spec_with(Some(&v));
            assert!(spec.name.contains("_user_"), "{}", spec.name);
            for arch in [Arch::SM80, Arch::SM90]
                .into_iter()
                .filter(|&a| spec.supports(a))
            {
                if let Err(e) = jit.compile_uncached(&spec, arch) {
                    panic!("{} for {arch}: {e}", spec.name);
                }
            }
        }
    }
    let broken = UserVariant {
        name: "broken".into(),
        use_softmax: true,
        logits_transform: Some("return logit * undeclared_thing;".into()),
        ..Default::default()
    };
    let spec = tiles[0].spec_with(Some(&broken));
    match jit.compile_uncached(&spec, Arch::SM80) {
        Err(Error::Compile { log, .. }) => {
            assert!(log.contains("undeclared_thing"), "{log}");
            assert!(log.contains("broken.logits_transform"), "{log}");
        }
        other => panic!("expected a compile error, got {:?}", other.map(|_| ())),
    }
}
