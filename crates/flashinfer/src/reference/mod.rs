//! The CPU backend: exact semantics of every attention op, multi-threaded with rayon.
//!
//! It is the oracle every GPU kernel is checked against and what runs on machines without a GPU,
//! so it takes the same arguments as the GPU ops: row-major host slices, caller-provided `out` and
//! `lse` buffers, the layouts of [`crate::layout`], and the conventions of DESIGN.md.
//!
//! Structure (the paper's "one gather abstraction, same code after"):
//! - `attend`: one routine attends one query row over keys reached through a gather closure, in
//!   base 2 like the GPU kernels, accumulating in f32. Paged, ragged and contiguous KV differ only
//!   in the closure (`gather` builds them).
//! - `mask`: which keys a query row sees (none / causal bottom-right / custom bits).
//! - `decode`, `prefill`: the public attention ops, validation first, then rows in parallel.
//! - `merge`: the attention-state merge operators (output + LSE).
//! - `append`: writing new tokens' K and V into their pages of a paged KV cache.
//! - `check`: argument validation shared by all of them.
//!
//! Every function validates all of its arguments before touching an output and returns
//! [`Error::InvalidArgument`](crate::error::Error::InvalidArgument) naming the argument; none
//! panics on user input. A row that sees no key outputs zeros and LSE = -inf, never NaN.

pub mod append;
mod attend;
pub mod cascade;
mod check;
pub mod decode;
mod gather;
mod mask;
pub mod merge;
pub mod prefill;
pub mod variant;

pub use append::{append_paged_kv_cache, append_paged_kv_cache_combined};
pub use cascade::{block_sparse, block_sparse_dense, cascade};
pub use decode::{batch_decode, single_decode};
pub use merge::{merge_state, merge_state_in_place, merge_states, merge_states_varlen};
pub use prefill::{batch_prefill_paged, batch_prefill_ragged, single_prefill};
pub use variant::batch_attention_paged;

use crate::layout::HeadConfig;

/// The KV head query head `h` reads under GQA: `h / (num_qo_heads / num_kv_heads)`.
pub fn gqa_kv_head(h: usize, heads: &HeadConfig) -> usize {
    h / heads.group_size().max(1)
}

/// Relative L2 error `‖out − reference‖ / ‖reference‖`, the accuracy measure of DESIGN.md.
///
/// Returns 0 when both are zero, and `+inf` when the error is undefined or unbounded: a NaN or
/// infinity in either input, lengths that differ, or a nonzero `out` against an all-zero
/// reference. A test support helper: an unwritten (NaN-poisoned) output can never pass.
pub fn rel_l2_error(out: &[f32], reference: &[f64]) -> f64 {
    if out.len() != reference.len() {
        return f64::INFINITY;
    }
    let mut diff2 = 0.0f64;
    let mut ref2 = 0.0f64;
    for (&o, &r) in out.iter().zip(reference) {
        let o = o as f64;
        if !o.is_finite() || !r.is_finite() {
            return f64::INFINITY;
        }
        diff2 += (o - r) * (o - r);
        ref2 += r * r;
    }
    if diff2 == 0.0 {
        0.0
    } else if ref2 == 0.0 {
        f64::INFINITY
    } else {
        (diff2 / ref2).sqrt()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rel_l2_error_edge_cases() {
        assert_eq!(rel_l2_error(&[], &[]), 0.0);
        assert_eq!(rel_l2_error(&[0.0, 0.0], &[0.0, 0.0]), 0.0);
        assert_eq!(rel_l2_error(&[1.0], &[0.0]), f64::INFINITY);
        assert_eq!(rel_l2_error(&[f32::NAN], &[1.0]), f64::INFINITY);
        assert_eq!(rel_l2_error(&[1.0], &[1.0, 2.0]), f64::INFINITY);
        let e = rel_l2_error(&[3.0, 4.0], &[3.0, 4.5]);
        assert!((e - 0.5 / (9.0f64 + 20.25).sqrt()).abs() < 1e-12);
    }

    #[test]
    fn gqa_mapping() {
        let heads = HeadConfig::new(8, 2, 16).unwrap();
        let kv: Vec<usize> = (0..8).map(|h| gqa_kv_head(h, &heads)).collect();
        assert_eq!(kv, [0, 0, 0, 0, 1, 1, 1, 1]);
    }
}
