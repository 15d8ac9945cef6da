//! Block-sparse row (BSR) matrices of R×C blocks: the general form of every KV layout.
//!
//! Row block `i` (queries `i*R..(i+1)*R`) attends the column blocks (keys `j*C..(j+1)*C`) listed in
//! `indices[indptr[i]..indptr[i+1]]`. A paged KV cache is the case R = one request's queries,
//! C = page_size; page size 1 is vector sparsity.

use super::validate_indptr;
use crate::error::{ensure, Result};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bsr {
    /// Rows per block (R).
    pub block_rows: usize,
    /// Columns per block (C).
    pub block_cols: usize,
    /// Number of rows of the dense matrix (M); the last row block may be partial.
    pub num_rows: usize,
    /// Number of columns of the dense matrix (N); the last column block may be partial.
    pub num_cols: usize,
    indptr: Vec<i32>,
    indices: Vec<i32>,
}

impl Bsr {
    pub fn new(
        block_rows: usize,
        block_cols: usize,
        num_rows: usize,
        num_cols: usize,
        indptr: &[i32],
        indices: &[i32],
    ) -> Result<Self> {
        ensure(block_rows >= 1, "block_rows", || {
            "must be at least 1".into()
        })?;
        ensure(block_cols >= 1, "block_cols", || {
            "must be at least 1".into()
        })?;
        let mb = num_rows.div_ceil(block_rows);
        let nb = num_cols.div_ceil(block_cols);
        validate_indptr("indptr", indptr, Some(mb), None)?;
        let nnz = *indptr.last().unwrap() as usize;
        ensure(indices.len() == nnz, "indices", || {
            format!("has {} entries but indptr[{mb}] = {nnz}", indices.len())
        })?;
        for i in 0..mb {
            let row = &indices[indptr[i] as usize..indptr[i + 1] as usize];
            for &j in row {
                ensure(j >= 0 && (j as usize) < nb, "indices", || {
                    format!("column block {j} in row block {i} is outside 0..{nb}")
                })?;
            }
            // A block listed twice would be attended twice: a silently wrong softmax.
            let mut sorted = row.to_vec();
            sorted.sort_unstable();
            if let Some(w) = sorted.windows(2).find(|w| w[0] == w[1]) {
                return Err(crate::error::invalid(
                    "indices",
                    format!("column block {} appears twice in row block {i}", w[0]),
                ));
            }
        }
        Ok(Self {
            block_rows,
            block_cols,
            num_rows,
            num_cols,
            indptr: indptr.to_vec(),
            indices: indices.to_vec(),
        })
    }

    pub fn indptr(&self) -> &[i32] {
        &self.indptr
    }
    pub fn indices(&self) -> &[i32] {
        &self.indices
    }
    pub fn num_block_rows(&self) -> usize {
        self.indptr.len() - 1
    }
    /// Column blocks of row block `i`.
    pub fn row(&self, i: usize) -> &[i32] {
        &self.indices[self.indptr[i] as usize..self.indptr[i + 1] as usize]
    }

    /// The dense boolean pattern, row-major `[num_rows, num_cols]` (for tests and the reference).
    pub fn to_dense(&self) -> Vec<bool> {
        let mut m = vec![false; self.num_rows * self.num_cols];
        for i in 0..self.num_block_rows() {
            for &j in self.row(i) {
                for r in i * self.block_rows..((i + 1) * self.block_rows).min(self.num_rows) {
                    let c0 = j as usize * self.block_cols;
                    let c1 = (c0 + self.block_cols).min(self.num_cols);
                    m[r * self.num_cols + c0..r * self.num_cols + c1].fill(true);
                }
            }
        }
        m
    }
}
