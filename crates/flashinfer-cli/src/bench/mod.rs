//! `flashinfer bench ...`: benchmarks on the GPU, each checked against the CPU backend before it
//! is timed. Timing: CUDA events around each run, the L2 flushed before each (a 256 MB write),
//! median of at least 30 runs after warm-up (DESIGN.md, "Performance method").

mod cascade;
mod decode;
mod jit;
mod npy;
mod plan;
mod prefill;
mod stream;
mod timing;
mod variant_args;

use clap::Subcommand;

pub use cascade::CascadeArgs;
pub use decode::DecodeArgs;
pub use jit::JitArgs;
pub use plan::PlanArgs;
pub use prefill::PrefillArgs;
pub use stream::StreamArgs;

#[derive(Debug, Subcommand)]
pub enum BenchCmd {
    /// Batch decode on a paged KV cache.
    Decode(DecodeArgs),
    /// Batch prefill / append on ragged or paged KV.
    Prefill(PrefillArgs),
    /// A shared prefix as one level and as a cascade (prefix read once, merged).
    Cascade(CascadeArgs),
    /// Host time of planning a step (schedulers; with a GPU the ops' whole plan()).
    Plan(PlanArgs),
    /// The bandwidth floor: a kernel that only reads N bytes, timed as the decode is.
    Stream(StreamArgs),
    /// Cold NVRTC compile and cached load times of the shipped kernels.
    Jit(JitArgs),
}

pub fn run(cmd: BenchCmd) -> Result<(), String> {
    match cmd {
        BenchCmd::Decode(a) => decode::run(a),
        BenchCmd::Prefill(a) => prefill::run(a),
        BenchCmd::Cascade(a) => cascade::run(a),
        BenchCmd::Jit(a) => jit::run(a),
        BenchCmd::Plan(a) => plan::run(a),
        BenchCmd::Stream(a) => stream::run(a),
    }
}

/// Parses `32:8` as (query heads, KV heads).
pub(crate) fn parse_heads(s: &str) -> Result<(usize, usize), String> {
    let (q, k) = s
        .split_once(':')
        .ok_or_else(|| format!("heads `{s}`: expected QO:KV, e.g. 32:8"))?;
    let q = q
        .trim()
        .parse()
        .map_err(|_| format!("heads `{s}`: bad query head count"))?;
    let k = k
        .trim()
        .parse()
        .map_err(|_| format!("heads `{s}`: bad KV head count"))?;
    Ok((q, k))
}

/// Peak numbers the benchmarks report against (measured on the H200, shared/gpu/README.md).
pub(crate) const HBM_BYTES_PER_S: f64 = 4.3e12;
pub(crate) const GEMM_FLOPS_PER_S: f64 = 790e12;
