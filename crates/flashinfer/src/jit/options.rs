//! The NVRTC command line. Every option here is part of the cache key.

use std::path::Path;

use super::arch::Arch;

/// `-std=c++17 --gpu-architecture=sm_XX -default-device -lineinfo [--include-path=DIR] extra...`
///
/// - A real architecture (`sm_`, never `compute_`) so that NVRTC emits a CUBIN: no PTX JIT in
///   the driver at load time, and `sm_90a` features are usable.
/// - `-default-device`: functions without `__host__`/`__device__` are device functions, so our
///   headers need no annotations on helpers.
/// - `-lineinfo`: source lines in profiles (Nsight Compute) at no run-time cost.
/// - The CUDA include directory only when found: our kernels need no CUDA header, user code may.
pub fn compile_options(arch: Arch, include_dir: Option<&Path>, extra: &[String]) -> Vec<String> {
    let mut options = vec![
        "-std=c++17".to_string(),
        arch.nvrtc_option(),
        "-default-device".to_string(),
        "-lineinfo".to_string(),
    ];
    if let Some(dir) = include_dir {
        options.push(format!("--include-path={}", dir.display()));
    }
    options.extend(extra.iter().cloned());
    options
}
