//! The JIT runtime: kernels are CUDA C++ generated at run time, compiled by NVRTC to a CUBIN for
//! the device's exact architecture, cached on disk, and loaded once per CUDA context.
//!
//! - [`discover`]: where libnvrtc and the CUDA headers are (toolkit, pip wheels, dynamic linker).
//! - `nvrtc`: our own run-time binding of NVRTC (a missing library is an error, not a panic).
//! - [`Arch`], [`KernelSpec`], [`headers::HEADERS`]: what is compiled, for what, with which headers.
//! - [`DiskCache`]: CUBINs on disk, checksummed, written atomically, shared between processes.
//! - [`Jit`]: all of the above; [`Jit::cubin`] is the one call ops need.
//! - [`ModuleRegistry`]: CUBINs loaded into a CUDA context.
//! - [`catalog`]: every kernel specialisation we ship, compiled by the compile-only test tier.

mod arch;
mod cache;
mod compiler;
pub mod discover;
pub mod headers;
mod nvrtc;
mod options;
mod registry;
mod selftest;
mod spec;

pub use arch::Arch;
pub use cache::{cache_key, CacheLookup, DiskCache};
pub use compiler::{Cubin, Jit, Toolkit};
pub use discover::SearchEnv;
pub use options::compile_options;
pub use registry::{KernelFunction, LoadedModule, ModuleRegistry};
pub use selftest::{selftest_spec, SELFTEST_ENTRY};
pub use spec::KernelSpec;

/// Every kernel specialisation flashinfer ships, for the compile-only test tier
/// (`tests/compile_kernels.rs`) and `flashinfer warmup`.
///
/// To add an op's kernels: give the op a `fn ...() -> Vec<KernelSpec>` listing its shipped
/// specialisations and add it to this list, one line per op.
const CATALOG: &[fn() -> Vec<KernelSpec>] = &[
    selftest::specs,
    crate::merge::specs,
    crate::decode::specs,
    crate::page::specs,
    crate::rope::specs,
    crate::prefill::specs,
];

/// The specs of [`CATALOG`], in order.
pub fn catalog() -> Vec<KernelSpec> {
    CATALOG.iter().flat_map(|specs| specs()).collect()
}
