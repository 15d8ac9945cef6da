//! flashinfer: an attention engine for LLM inference serving.
//!
//! - [`layout`]: paged KV caches, ragged tensors, block-sparse matrices and custom masks, validated.
//! - [`reference`]: the CPU backend, exact, multi-threaded; the oracle for every GPU test.
//! - [`cuda`]: device context, streams, device tensor views, workspaces.
//! - [`jit`]: NVRTC discovery, compilation to CUBIN, the on-disk cache, loaded modules.
//! - [`merge`]: the attention-state merge operators on the GPU.
//! - [`decode`]: batch decode on a paged KV cache (plan/run, split-KV).
//! - [`cascade`]: multi-level shared-prefix attention, each level attended once and merged.
//! - [`block_sparse`]: attention over a block-sparse (BSR) pattern, served by the paged prefill kernel.
//! - [`prefill`]: batch prefill and append on ragged or paged KV (plan/run, split-KV).
//! - [`page`]: appending new tokens' K and V to a paged KV cache (plan/run).
//! - [`rope`]: RoPE applied to the keys of a paged KV cache as a pass of its own (plan/run).
//! - [`variant`]: attention variants (RoPE, soft cap, ALiBi, sliding window, sinks) and their definitions.
//! - [`user_variant`]: user-written variants: CUDA snippets for the prefill kernel's hooks, compiled just in time.
//! - [`plan`]: the schedulers behind each op's `plan()`, pure functions of request lengths.
//!
//! See `DESIGN.md` in the repository for the shape of the whole.

pub mod block_sparse;
pub mod cascade;
pub mod cuda;
pub mod decode;
pub mod dtype;
pub mod error;
pub mod jit;
pub mod layout;
pub mod merge;
pub mod page;
pub mod params;
pub mod plan;
pub mod prefill;
pub mod random;
pub mod reference;
pub mod rope;
pub mod user_variant;
pub mod variant;

pub use dtype::{DType, Element};
pub use error::{Error, Result};
pub use params::{AttentionParams, LseBase, MaskMode};
