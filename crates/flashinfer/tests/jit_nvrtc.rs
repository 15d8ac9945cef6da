//! The JIT against a real NVRTC: compiling to CUBIN for sm_80 and sm_90a, compile errors with
//! NVRTC's log, and the disk cache in front of it.
//!
//! Without NVRTC these tests print a loud SKIPPED line and return, unless
//! `FLASHINFER_REQUIRE_NVRTC=1` (set by scripts/install-nvrtc.sh and CI), which turns a missing
//! NVRTC into a failure so that this tier can never pass by skipping where it is meant to run.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use flashinfer::jit::{selftest_spec, Arch, DiskCache, Jit, KernelSpec, SearchEnv};
use flashinfer::Error;

fn scratch_dir(tag: &str) -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "flashinfer-test-{tag}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A JIT with its own empty cache, or `None` (after saying so loudly) when NVRTC is absent and
/// not required.
fn jit(tag: &str) -> Option<(Jit, PathBuf)> {
    let dir = scratch_dir(tag);
    let jit = Jit::with(&SearchEnv::from_process(), DiskCache::open(&dir).unwrap());
    if jit.is_err() {
        let _ = std::fs::remove_dir_all(&dir);
    }
    match jit {
        Ok(jit) => Some((jit, dir)),
        Err(e) if std::env::var("FLASHINFER_REQUIRE_NVRTC").as_deref() == Ok("1") => {
            panic!("FLASHINFER_REQUIRE_NVRTC=1 but NVRTC is unusable: {e}")
        }
        Err(e) => {
            eprintln!(
                "\n*** SKIPPED: NVRTC not found (set FLASHINFER_REQUIRE_NVRTC=1 to make this an \
                 error) ***\n{e}\n"
            );
            None
        }
    }
}

/// Checks that `bytes` is a 64-bit ELF for NVIDIA GPUs (e_machine EM_CUDA = 190).
fn assert_cubin(bytes: &[u8]) {
    assert!(bytes.len() > 64, "CUBIN of {} bytes", bytes.len());
    assert_eq!(&bytes[..4], b"\x7fELF", "not an ELF image");
    assert_eq!(bytes[4], 2, "not a 64-bit ELF");
    assert_eq!(
        u16::from_le_bytes([bytes[18], bytes[19]]),
        190,
        "e_machine is not EM_CUDA"
    );
}

#[test]
fn toolkit_is_reported() {
    let Some((jit, dir)) = jit("nvrtc-toolkit") else {
        return;
    };
    let toolkit = jit.toolkit();
    eprintln!("{toolkit}");
    assert!(toolkit.nvrtc_version.0 >= 11, "{toolkit:?}");
    if toolkit.nvrtc_library.components().count() > 1 {
        assert!(toolkit.nvrtc_library.is_file(), "{toolkit:?}");
        // Loaded by full path, libnvrtc cannot find its builtins by itself unless we preload
        // them (it has no RUNPATH): check that we did whenever they sit next to it.
        let (major, minor) = toolkit.nvrtc_version;
        let dir = toolkit.nvrtc_library.parent().unwrap();
        if dir
            .join(format!("libnvrtc-builtins.so.{major}.{minor}"))
            .is_file()
        {
            assert!(toolkit.builtins_library.is_some(), "{toolkit:?}");
        }
    }
    if let Some(include) = &toolkit.include_dir {
        assert!(include.join("cuda_fp16.h").is_file(), "{toolkit:?}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn selftest_compiles_to_cubin_for_sm80_and_sm90a() {
    let Some((jit, dir)) = jit("nvrtc-selftest") else {
        return;
    };
    let spec = selftest_spec();
    for arch in [Arch::SM80, Arch::SM90] {
        let cubin = jit.compile_uncached(&spec, arch).unwrap();
        assert_cubin(&cubin.bytes);
        assert!(!cubin.from_cache);
        assert_eq!(cubin.key, jit.key(&spec, arch, &[]));
        eprintln!(
            "{} {arch}: {} bytes in {:.0} ms",
            spec.name,
            cubin.bytes.len(),
            cubin.compile_ms
        );
    }
    // Uncached means uncached.
    assert_eq!(jit.cache().entry_count().unwrap(), 0);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn sm90a_enables_hopper_only_instructions() {
    // wgmma exists only on sm_90a: this compiles only because we target the `a` variant.
    let Some((jit, dir)) = jit("nvrtc-sm90a") else {
        return;
    };
    let spec = KernelSpec::new(
        "wgmma_fence_probe",
        r#"extern "C" __global__ void wgmma_fence_probe() {
    asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
}"#,
        ["wgmma_fence_probe"],
    );
    assert_cubin(&jit.compile_uncached(&spec, Arch::SM90).unwrap().bytes);
    assert!(matches!(
        jit.compile_uncached(&spec, Arch::SM80),
        Err(Error::Compile { .. })
    ));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn compile_error_returns_nvrtc_log() {
    let Some((jit, dir)) = jit("nvrtc-error") else {
        return;
    };
    let spec = KernelSpec::new(
        "broken_kernel_f32",
        "extern \"C\" __global__ void broken(float* x) { x[0] = undefined_identifier_xyz; }",
        ["broken"],
    );
    match jit.cubin(&spec, Arch::SM80) {
        Err(Error::Compile { kernel, arch, log }) => {
            assert_eq!(kernel, "broken_kernel_f32");
            assert_eq!(arch, "sm_80");
            assert!(log.contains("undefined_identifier_xyz"), "log: {log}");
            assert!(log.contains("error"), "log: {log}");
        }
        other => panic!("expected a compile error, got {other:?}"),
    }
    // Nothing was cached for a failed compile.
    assert_eq!(jit.cache().entry_count().unwrap(), 0);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn mangled_or_missing_entry_is_a_compile_error() {
    let Some((jit, dir)) = jit("nvrtc-entry") else {
        return;
    };
    // Without extern "C" the symbol is mangled and the driver would not find `not_extern_c`.
    let spec = KernelSpec::new(
        "not_extern_c_probe",
        "__global__ void not_extern_c(float* x) { x[0] = 1.0f; }",
        ["not_extern_c"],
    );
    match jit.compile_uncached(&spec, Arch::SM80) {
        Err(Error::Compile { log, .. }) => assert!(log.contains("not_extern_c"), "{log}"),
        other => panic!("expected a compile error, got {other:?}"),
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn second_compile_is_a_cache_hit_and_corruption_rebuilds() {
    let Some((jit, dir)) = jit("nvrtc-cache") else {
        return;
    };
    let spec = selftest_spec();
    let first = jit.cubin(&spec, Arch::SM90).unwrap();
    assert!(!first.from_cache);
    assert!(first.compile_ms > 0.0);
    let second = jit.cubin(&spec, Arch::SM90).unwrap();
    assert!(second.from_cache);
    assert_eq!(second.compile_ms, 0.0);
    assert_eq!(first.bytes, second.bytes);
    assert_eq!(first.key, second.key);

    // Another architecture is another entry.
    let sm80 = jit.cubin(&spec, Arch::SM80).unwrap();
    assert!(!sm80.from_cache);
    assert_ne!(sm80.key, first.key);
    assert_eq!(jit.cache().entry_count().unwrap(), 2);

    // A corrupt entry is rebuilt, not loaded.
    let path = jit.cache().entry_path(&spec.name, &first.key);
    let mut data = std::fs::read(&path).unwrap();
    let last = data.len() - 1;
    data[last] ^= 0xff;
    std::fs::write(&path, &data).unwrap();
    let rebuilt = jit.cubin(&spec, Arch::SM90).unwrap();
    assert!(!rebuilt.from_cache);
    assert_eq!(rebuilt.bytes, first.bytes);
    assert!(jit.cubin(&spec, Arch::SM90).unwrap().from_cache);

    // A fresh JIT on the same folder (another process, later) hits too.
    let again = Jit::with(&SearchEnv::from_process(), DiskCache::open(&dir).unwrap()).unwrap();
    assert!(again.cubin(&spec, Arch::SM90).unwrap().from_cache);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn concurrent_compiles_of_one_kernel_compile_once() {
    let Some((jit, dir)) = jit("nvrtc-concurrent") else {
        return;
    };
    let jit = Arc::new(jit);
    let spec = KernelSpec::new(
        "concurrent_probe_f32",
        "#include \"common.cuh\"\nextern \"C\" __global__ void probe(float* x) { x[threadIdx.x] *= 2.0f; }",
        ["probe"],
    );
    let handles: Vec<_> = (0..4)
        .map(|_| {
            let (jit, spec) = (jit.clone(), spec.clone());
            std::thread::spawn(move || jit.cubin(&spec, Arch::SM80).unwrap())
        })
        .collect();
    let results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    assert_eq!(results.iter().filter(|c| !c.from_cache).count(), 1);
    assert!(results.iter().all(|c| c.bytes == results[0].bytes));
    assert_eq!(jit.cache().entry_count().unwrap(), 1);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn cuda_headers_are_usable_when_found() {
    let Some((jit, dir)) = jit("nvrtc-headers") else {
        return;
    };
    if jit.toolkit().include_dir.is_none() {
        eprintln!("no CUDA include directory found: <cuda_fp16.h> check not run");
        return;
    }
    let spec = KernelSpec::new(
        "cuda_fp16_probe",
        r#"#include <cuda_fp16.h>
#include <cuda_bf16.h>
extern "C" __global__ void cuda_fp16_probe(__half* x, __nv_bfloat16* y) {
    x[threadIdx.x] = __float2half(1.0f);
    y[threadIdx.x] = __float2bfloat16(2.0f);
}"#,
        ["cuda_fp16_probe"],
    );
    for arch in [Arch::SM80, Arch::SM90] {
        assert_cubin(&jit.compile_uncached(&spec, arch).unwrap().bytes);
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn shared_jit_is_one_per_process() {
    match Jit::shared() {
        Ok(a) => {
            let b = Jit::shared().unwrap();
            assert!(std::ptr::eq(a, b));
        }
        Err(e) if std::env::var("FLASHINFER_REQUIRE_NVRTC").as_deref() == Ok("1") => {
            panic!("FLASHINFER_REQUIRE_NVRTC=1 but NVRTC is unusable: {e}")
        }
        Err(e) => {
            // Not cached: asking again searches again and fails the same way, without panicking.
            assert!(matches!(e, Error::NotFound { .. }), "{e}");
            assert!(Jit::shared().is_err());
            eprintln!("*** SKIPPED: NVRTC not found (set FLASHINFER_REQUIRE_NVRTC=1 to make this an error) ***");
        }
    }
}
