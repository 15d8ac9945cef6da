//! Host descriptions of the tensors attention reads, validated on construction.
//!
//! The paper's first idea lives here: a paged KV cache is a block-sparse row matrix whose column
//! blocks are pages ([`PageTable`]); a ragged KV is the same with an affine index ([`Ragged`]);
//! [`Bsr`] is the general form; [`append_offsets`] says where appended tokens go in a page pool.
//! No `unsafe`, no CUDA: everything here is tested on the CPU.

mod append;
mod bsr;
mod heads;
mod mask;
mod paged;
mod ragged;

pub use append::append_offsets;
pub use bsr::{Bsr, BsrAsPaged};
pub use heads::HeadConfig;
pub use mask::CustomMask;
pub use paged::{KvLayout, PageTable, PagedKv, PagedKvDesc};
pub use ragged::Ragged;

use crate::error::{ensure, Result};

/// Checks a prefix-sum index array: `indptr.len() == batch + 1` (when `batch` is given),
/// `indptr[0] == 0`, non-decreasing, and `indptr[batch] <= capacity` (when given).
pub(crate) fn validate_indptr(
    arg: &'static str,
    indptr: &[i32],
    batch: Option<usize>,
    capacity: Option<usize>,
) -> Result<()> {
    ensure(!indptr.is_empty(), arg, || {
        "is empty; it needs batch_size + 1 entries".into()
    })?;
    if let Some(b) = batch {
        ensure(indptr.len() == b + 1, arg, || {
            format!(
                "has {} entries, expected batch_size + 1 = {}",
                indptr.len(),
                b + 1
            )
        })?;
    }
    ensure(indptr[0] == 0, arg, || {
        format!("indptr[0] = {}, must be 0", indptr[0])
    })?;
    for (i, w) in indptr.windows(2).enumerate() {
        ensure(w[1] >= w[0], arg, || {
            format!(
                "decreases at {}: indptr[{}] = {} > indptr[{}] = {}",
                i + 1,
                i,
                w[0],
                i + 1,
                w[1]
            )
        })?;
    }
    if let Some(cap) = capacity {
        let last = *indptr.last().unwrap_or(&0) as i64;
        ensure(last <= cap as i64, arg, || {
            format!("last entry {last} exceeds the {cap} rows of the tensor it indexes")
        })?;
    }
    Ok(())
}

/// Checks that a host buffer has exactly the length its shape implies.
pub(crate) fn check_len(arg: &'static str, len: usize, expected: usize, shape: &str) -> Result<()> {
    ensure(len == expected, arg, || {
        format!("has {len} elements, expected {expected} for shape {shape}")
    })
}
