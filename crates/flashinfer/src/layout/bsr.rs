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

    /// The dense boolean pattern with optional per-block masks (`[nnz, R, C]`, this BSR's order),
    /// row-major `[num_rows, num_cols]`: the mask block-sparse attention is defined by.
    pub fn dense_mask(&self, block_mask: Option<&[bool]>) -> Result<Vec<bool>> {
        let (r, c) = (self.block_rows, self.block_cols);
        if let Some(bm) = block_mask {
            self.check_block_mask(bm)?;
        }
        let mut m = vec![false; self.num_rows * self.num_cols];
        for i in 0..self.num_block_rows() {
            for k in self.indptr[i] as usize..self.indptr[i + 1] as usize {
                let j = self.indices[k] as usize;
                for row in i * r..((i + 1) * r).min(self.num_rows) {
                    for col in j * c..((j + 1) * c).min(self.num_cols) {
                        let local = ((k * r) + row - i * r) * c + col - j * c;
                        m[row * self.num_cols + col] = block_mask.is_none_or(|bm| bm[local]);
                    }
                }
            }
        }
        Ok(m)
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

/// A BSR pattern as a paged prefill: block row `i` is a "request" whose queries are its `R` rows
/// and whose KV pages are its column blocks (the key tensor viewed as pages of `C` tokens), in
/// ascending order. See [`Bsr::as_paged`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BsrAsPaged {
    pub qo_indptr: super::Ragged,
    pub table: super::PageTable,
    /// `order[k]` is the position in [`Bsr::indices`] of the `k`-th page of the table (block
    /// masks given in the BSR's order are permuted with it).
    pub order: Vec<usize>,
}

impl Bsr {
    /// The paged-prefill view of this pattern. Needs `num_cols` to be a multiple of `block_cols`
    /// (the key tensor is then exactly `num_cols / block_cols` pages); the last row block may be
    /// partial.
    pub fn as_paged(&self) -> Result<BsrAsPaged> {
        let (r, c) = (self.block_rows, self.block_cols);
        ensure(self.num_cols.is_multiple_of(c), "num_cols", || {
            format!(
                "{} is not a multiple of block_cols = {c} (the keys are viewed as pages of {c})",
                self.num_cols
            )
        })?;
        let mb = self.num_block_rows();
        let lens: Vec<usize> = (0..mb).map(|i| r.min(self.num_rows - i * r)).collect();
        let mut order = Vec::with_capacity(self.indices.len());
        let mut pages = Vec::with_capacity(self.indices.len());
        let mut last = Vec::with_capacity(mb);
        for i in 0..mb {
            let begin = self.indptr[i] as usize;
            let mut row: Vec<usize> = (begin..self.indptr[i + 1] as usize).collect();
            row.sort_by_key(|&k| self.indices[k]);
            pages.extend(row.iter().map(|&k| self.indices[k]));
            last.push(if row.is_empty() { 0 } else { c as i32 });
            order.extend(row);
        }
        let table = super::PageTable::new(&self.indptr, &pages, &last, c, self.num_cols / c)?;
        Ok(BsrAsPaged {
            qo_indptr: super::Ragged::from_lens(&lens),
            table,
            order,
        })
    }

    /// The key tensor `[num_cols, num_kv_heads, head_dim]` seen as the page pool of
    /// [`Bsr::as_paged`]: `num_cols / C` NHD pages of `C` tokens.
    pub fn key_pool(&self, num_kv_heads: usize, head_dim: usize) -> Result<super::PagedKvDesc> {
        super::PagedKvDesc::new(
            super::KvLayout::Nhd,
            self.num_cols / self.block_cols,
            self.block_cols,
            num_kv_heads,
            head_dim,
        )
    }

    /// Checks that per-block masks hold `nnz x R x C` entries.
    fn check_block_mask(&self, block_mask: &[bool]) -> Result<()> {
        let (r, c) = (self.block_rows, self.block_cols);
        ensure(
            block_mask.len() == self.indices.len() * r * c,
            "block_mask",
            || {
                format!(
                    "has {} entries, expected nnz {} x R {r} x C {c}",
                    block_mask.len(),
                    self.indices.len()
                )
            },
        )
    }

    /// Packs per-block masks (`[nnz, R, C]` in this BSR's order, `true` = visible) into the
    /// per-request custom mask of [`Bsr::as_paged`]'s batch.
    pub fn block_mask_as_custom(
        &self,
        paged: &BsrAsPaged,
        block_mask: &[bool],
    ) -> Result<super::CustomMask> {
        let (r, c) = (self.block_rows, self.block_cols);
        self.check_block_mask(block_mask)?;
        let batch = paged.qo_indptr.batch_size();
        let qo_lens = paged.qo_indptr.lens();
        let kv_lens = paged.table.kv_lens();
        let mut masks = Vec::with_capacity(batch);
        for i in 0..batch {
            let (q, kv) = (qo_lens[i], kv_lens[i]);
            let mut m = vec![false; q * kv];
            let first = paged.table.kv_indptr()[i] as usize;
            for (k, &entry) in paged.order[first..first + kv / c].iter().enumerate() {
                for row in 0..q {
                    for col in 0..c {
                        m[row * kv + k * c + col] = block_mask[(entry * r + row) * c + col];
                    }
                }
            }
            masks.push(m);
        }
        super::CustomMask::pack(&masks, &qo_lens, &kv_lens)
    }
}
