//! Compile-only tier: every kernel specialisation in `flashinfer::jit::catalog()` must compile
//! with NVRTC for sm_80 and sm_90a (sm_90a only for the specs that require it, e.g. wgmma). Needs libnvrtc (scripts/install-nvrtc.sh installs it from
//! PyPI), no GPU.
//!
//! Without NVRTC this prints a loud SKIPPED line and passes, unless `FLASHINFER_REQUIRE_NVRTC=1`,
//! which makes a missing NVRTC a failure. `FLASHINFER_COMPILE_FILTER=<substring>` limits the run to
//! the specs whose name contains it.

use flashinfer::jit::{catalog, Arch, DiskCache, Jit, SearchEnv};

#[test]
fn every_catalog_kernel_compiles_for_sm80_and_sm90a() {
    // The cache is not used (compile_uncached), but Jit wants one: give it a private folder.
    let dir =
        std::env::temp_dir().join(format!("flashinfer-compile-kernels-{}", std::process::id()));
    let jit = match Jit::with(&SearchEnv::from_process(), DiskCache::open(&dir).unwrap()) {
        Ok(jit) => jit,
        Err(e) if std::env::var("FLASHINFER_REQUIRE_NVRTC").as_deref() == Ok("1") => {
            panic!("FLASHINFER_REQUIRE_NVRTC=1 but NVRTC is unusable: {e}")
        }
        Err(e) => {
            eprintln!(
                "\n*** SKIPPED: NVRTC not found (set FLASHINFER_REQUIRE_NVRTC=1 to make this an \
                 error) ***\n{e}\n"
            );
            return;
        }
    };
    eprintln!("{}", jit.toolkit());

    // FLASHINFER_COMPILE_FILTER=substring compiles only the matching specs (while developing).
    let filter = std::env::var("FLASHINFER_COMPILE_FILTER").unwrap_or_default();
    let specs: Vec<_> = catalog()
        .into_iter()
        .filter(|s| s.name.contains(&filter))
        .collect();
    let mut failures = Vec::new();
    let mut total_ms = 0.0;
    let mut compiled = 0;
    for spec in &specs {
        for arch in [Arch::SM80, Arch::SM90]
            .into_iter()
            .filter(|&a| spec.supports(a))
        {
            match jit.compile_uncached(spec, arch) {
                Ok(cubin) => {
                    total_ms += cubin.compile_ms;
                    compiled += 1;
                    eprintln!(
                        "ok   {:<48} {:<8} {:>8.0} ms {:>9} bytes",
                        spec.name,
                        arch.sm_name(),
                        cubin.compile_ms,
                        cubin.bytes.len()
                    );
                }
                Err(e) => {
                    eprintln!("FAIL {:<48} {:<8}", spec.name, arch.sm_name());
                    failures.push(format!("{} for {arch}: {e}", spec.name));
                }
            }
        }
    }
    eprintln!(
        "{} specs, {compiled} (spec, architecture) compiles in {:.1} s",
        specs.len(),
        total_ms / 1e3
    );
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        failures.is_empty(),
        "{} compile failure(s):\n{}",
        failures.len(),
        failures.join("\n\n")
    );
}
