//! The JIT's own kernel: the smallest spec that exercises the whole path (embedded header
//! include, extern "C" entry, arch-specific compile), used by the compile-only tier and by
//! `flashinfer info`/`warmup` to check that NVRTC works.

use super::spec::KernelSpec;

/// `y[i] = a * x[i] + y[i]` for `i < n`, one thread per element.
pub const SELFTEST_ENTRY: &str = "flashinfer_jit_selftest_axpy";

pub fn selftest_spec() -> KernelSpec {
    let source = format!(
        r#"// JIT self-test: y[i] = a * x[i] + y[i]. One thread per element, any block size.
#include "common.cuh"

extern "C" __global__ void {SELFTEST_ENTRY}(float a, const float* __restrict__ x,
                                             float* __restrict__ y, unsigned int n) {{
    unsigned int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) {{
        y[i] = a * x[i] + y[i];
    }}
}}
"#
    );
    KernelSpec::new("jit_selftest_axpy_f32", source, [SELFTEST_ENTRY])
}

/// The catalog entry: every kernel this module ships.
pub fn specs() -> Vec<KernelSpec> {
    vec![selftest_spec()]
}
