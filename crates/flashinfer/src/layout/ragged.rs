//! Ragged (contiguous variable-length) tensors: rows of request i are `indptr[i]..indptr[i+1]`.

use super::validate_indptr;
use crate::error::Result;

/// A validated `indptr` over a batch of variable-length requests.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ragged {
    indptr: Vec<i32>,
}

impl Ragged {
    /// Validates `indptr` (named `arg` in errors): `indptr[0] == 0`, non-decreasing.
    pub fn new(arg: &'static str, indptr: &[i32]) -> Result<Self> {
        validate_indptr(arg, indptr, None, None)?;
        Ok(Self {
            indptr: indptr.to_vec(),
        })
    }

    /// Builds the prefix sum of `lens`.
    pub fn from_lens(lens: &[usize]) -> Self {
        let mut indptr = Vec::with_capacity(lens.len() + 1);
        let mut acc = 0i32;
        indptr.push(0);
        for &l in lens {
            acc += l as i32;
            indptr.push(acc);
        }
        Self { indptr }
    }

    pub fn indptr(&self) -> &[i32] {
        &self.indptr
    }
    pub fn batch_size(&self) -> usize {
        self.indptr.len() - 1
    }
    /// Total rows over all requests.
    pub fn total(&self) -> usize {
        *self.indptr.last().unwrap_or(&0) as usize
    }
    pub fn len(&self, i: usize) -> usize {
        (self.indptr[i + 1] - self.indptr[i]) as usize
    }
    pub fn is_empty(&self) -> bool {
        self.total() == 0
    }
    pub fn start(&self, i: usize) -> usize {
        self.indptr[i] as usize
    }
    pub fn lens(&self) -> Vec<usize> {
        (0..self.batch_size()).map(|i| self.len(i)).collect()
    }
}
