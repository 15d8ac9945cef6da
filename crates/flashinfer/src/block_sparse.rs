//! Block-sparse attention: queries attend the keys a BSR pattern of R x C blocks selects, with
//! optional masks inside the blocks.
//!
//! The paper's first idea in its plainest form: a BSR matrix is a page table. Block row `i` (query
//! rows `i*R..(i+1)*R`) is one request of a batch prefill, the key tensor `[N, heads, dim]` is a
//! page pool of `C`-token pages (NHD), and the row's column blocks are its pages
//! ([`Bsr::as_paged`]). So the same paged prefill kernel serves it, and per-block masks become the
//! requests' custom masks.

use std::sync::Arc;

use cudarc::driver::CudaSlice;

use crate::cuda::{DevSlice, DevSliceMut, Device};
use crate::dtype::{DType, Element};
use crate::error::{ensure, invalid, Result};
use crate::layout::{Bsr, HeadConfig, PagedKvDesc};
use crate::params::AttentionParams;
use crate::prefill::{BatchPrefill, PrefillConfig, PrefillKv, PrefillMask};

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BlockSparseConfig {
    pub heads: HeadConfig,
    pub dtype: DType,
    pub params: AttentionParams,
}

/// A planned block-sparse attention.
pub struct BlockSparseAttention {
    dev: Arc<Device>,
    cfg: BlockSparseConfig,
    /// Whole blocks (`Some` once used), and blocks with masks inside.
    plain: Option<BatchPrefill>,
    masked: Option<BatchPrefill>,
    use_mask: bool,
    desc: Option<PagedKvDesc>,
    kv_indices: Option<CudaSlice<i32>>,
    mask_bits: Option<CudaSlice<u8>>,
    rows: usize,
    cols: usize,
}

impl BlockSparseAttention {
    pub fn new(dev: &Arc<Device>, cfg: BlockSparseConfig) -> Result<Self> {
        Ok(Self {
            dev: dev.clone(),
            cfg,
            plain: None,
            masked: None,
            use_mask: false,
            desc: None,
            kv_indices: None,
            mask_bits: None,
            rows: 0,
            cols: 0,
        })
    }

    fn op(&mut self, masked: bool) -> Result<&mut BatchPrefill> {
        let slot = if masked {
            &mut self.masked
        } else {
            &mut self.plain
        };
        if slot.is_none() {
            *slot = Some(BatchPrefill::new(
                &self.dev,
                PrefillConfig {
                    heads: self.cfg.heads,
                    q_dtype: self.cfg.dtype,
                    kv_dtype: self.cfg.dtype,
                    params: self.cfg.params,
                    mask: if masked {
                        PrefillMask::Custom
                    } else {
                        PrefillMask::None
                    },
                    allow_split: true,
                },
            )?);
        }
        Ok(slot.as_mut().expect("just set"))
    }

    /// Plans the pattern `bsr` (rows: queries, columns: keys) with optional per-block masks
    /// (`[nnz, R, C]` in `bsr`'s order, `true` = visible). Copies the page ids (and mask bits) to
    /// the device.
    pub fn plan(&mut self, bsr: &Bsr, block_mask: Option<&[bool]>) -> Result<()> {
        self.desc = None;
        let paged = bsr.as_paged()?;
        let mask = block_mask
            .map(|m| bsr.block_mask_as_custom(&paged, m))
            .transpose()?;
        let h = self.cfg.heads;
        let desc = bsr.key_pool(h.num_kv_heads, h.head_dim)?;
        let stream = self.dev.stream().clone();
        let ids: Vec<i32> = paged
            .table
            .kv_indices()
            .iter()
            .copied()
            .chain([0])
            .collect();
        self.kv_indices = Some(stream.clone_htod(&ids)?);
        self.mask_bits = match &mask {
            Some(m) => Some(stream.clone_htod(&[m.bits(), &[0u8]].concat())?),
            None => None,
        };
        self.use_mask = mask.is_some();
        let masked = self.use_mask;
        self.op(masked)?.plan(
            &paged.qo_indptr,
            PrefillKv::Paged(&paged.table),
            mask.as_ref(),
        )?;
        self.rows = bsr.num_rows;
        self.cols = bsr.num_cols;
        self.desc = Some(desc);
        Ok(())
    }

    /// `q`, `o`: `[num_rows, num_qo_heads, head_dim]`; `k`, `v`: `[num_cols, num_kv_heads,
    /// head_dim]`; `lse`: `[num_rows, num_qo_heads]`.
    pub fn run<T: Element>(
        &self,
        q: DevSlice<T>,
        k: DevSlice<T>,
        v: DevSlice<T>,
        o: DevSliceMut<T>,
        lse: Option<DevSliceMut<f32>>,
    ) -> Result<()> {
        let desc = self
            .desc
            .as_ref()
            .ok_or_else(|| invalid("self", "run() called before a successful plan()"))?;
        let h = self.cfg.heads;
        for (arg, len) in [("k", k.len()), ("v", v.len())] {
            ensure(len == self.cols * h.num_kv_heads * h.head_dim, arg, || {
                format!(
                    "has {len} elements, expected num_cols {} x {} x {}",
                    self.cols, h.num_kv_heads, h.head_dim
                )
            })?;
        }
        let stream = self.dev.stream();
        let ids = self
            .kv_indices
            .as_ref()
            .ok_or_else(|| invalid("self", "not planned"))?;
        let mask = self.mask_bits.as_ref().map(|m| DevSlice::new(m, stream));
        let op = if self.use_mask {
            self.masked.as_ref()
        } else {
            self.plain.as_ref()
        }
        .ok_or_else(|| invalid("self", "not planned"))?;
        op.run_paged(q, k, v, desc, DevSlice::new(ids, stream), o, lse, mask)
    }
}
