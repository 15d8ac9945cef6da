//! The CUDA headers of `crates/flashinfer/kernels/`, embedded in the binary so that kernels
//! compile at run time with nothing but libnvrtc on disk. Every compile passes all of them to
//! NVRTC, so generated source can `#include "common.cuh"`; their contents are part of the cache
//! key, so editing a header rebuilds every kernel.
//!
//! To add a header: put the file in `kernels/` and add one line below.

/// `(file name as included, contents)`, one line per file of `kernels/*.cuh`.
pub const HEADERS: &[(&str, &str)] = &[
    ("common.cuh", include_str!("../../kernels/common.cuh")),
    ("state.cuh", include_str!("../../kernels/state.cuh")),
    ("merge.cuh", include_str!("../../kernels/merge.cuh")),
    (
        "decode_variant.cuh",
        include_str!("../../kernels/decode_variant.cuh"),
    ),
    (
        "decode_common.cuh",
        include_str!("../../kernels/decode_common.cuh"),
    ),
    ("decode.cuh", include_str!("../../kernels/decode.cuh")),
    ("mma.cuh", include_str!("../../kernels/mma.cuh")),
    ("decode_tc.cuh", include_str!("../../kernels/decode_tc.cuh")),
    ("page.cuh", include_str!("../../kernels/page.cuh")),
    (
        "rope_apply.cuh",
        include_str!("../../kernels/rope_apply.cuh"),
    ),
    ("prefill.cuh", include_str!("../../kernels/prefill.cuh")),
    ("wgmma.cuh", include_str!("../../kernels/wgmma.cuh")),
    ("pipeline.cuh", include_str!("../../kernels/pipeline.cuh")),
];

/// The contents of an embedded header, by file name.
pub fn header(name: &str) -> Option<&'static str> {
    HEADERS
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, text)| *text)
}
