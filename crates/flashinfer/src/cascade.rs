//! Multi-level cascade (shared-prefix) attention: the paper's composable formats.
//!
//! A batch whose requests share KV prefixes is described as several levels over one page pool.
//! Level `l` groups consecutive query rows (a group: the requests that share the level's pages)
//! and gives each group one page-table entry. Every level is attended as a batch prefill in which
//! a group is one "request" whose queries are all of its members' queries, so a prefix shared by
//! 64 requests is read once for all of them instead of 64 times. The levels' states (output, LSE)
//! are then merged exactly with the attention-state merge, in level order.
//!
//! Masks: a shared level's keys precede every query of its group, so its queries see all of them
//! (no mask). The last level holds each request's own keys, which end where its queries end: it is
//! causal, aligned bottom-right per request (a decode step is the case of one query per request).

use std::sync::Arc;

use cudarc::driver::CudaSlice;

use crate::cuda::{DevSlice, DevSliceMut, Device};
use crate::dtype::{DType, Element};
use crate::error::{ensure, invalid, Result};
use crate::layout::{HeadConfig, PageTable, PagedKvDesc, Ragged};
use crate::merge::merge_state_in_place;
use crate::params::AttentionParams;
use crate::prefill::{BatchPrefill, PrefillConfig, PrefillKv, PrefillMask};

/// Static configuration of a cascade (one per model layer shape).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CascadeConfig {
    pub heads: HeadConfig,
    pub dtype: DType,
    pub params: AttentionParams,
    /// Levels, shared ones first; the last is each request's own keys.
    pub num_levels: usize,
}

/// One level of a step, as the host sees it: `qo_indptr` groups the rows of `q` (group g owns
/// rows `qo_indptr[g]..qo_indptr[g+1]`; every level covers all rows, in the same order), `table`
/// holds one entry per group.
#[derive(Clone, Copy, Debug)]
pub struct CascadeLevel<'a> {
    pub qo_indptr: &'a Ragged,
    pub table: &'a PageTable,
}

/// A planned multi-level cascade attention.
pub struct MultiLevelCascade {
    dev: Arc<Device>,
    cfg: CascadeConfig,
    levels: Vec<BatchPrefill>,
    rows: usize,
    kv_indices_lens: Vec<usize>,
    /// A level's output and LSE before it is merged (bytes: rows x heads x dim of the dtype).
    tmp_o: Option<CudaSlice<u8>>,
    tmp_lse: Option<CudaSlice<f32>>,
    /// The running LSE when the caller asks for none.
    own_lse: Option<CudaSlice<f32>>,
    planned: bool,
}

impl MultiLevelCascade {
    pub fn new(dev: &Arc<Device>, cfg: CascadeConfig) -> Result<Self> {
        ensure(cfg.num_levels >= 1, "num_levels", || {
            "a cascade has at least one level".into()
        })?;
        let levels = (0..cfg.num_levels)
            .map(|l| {
                BatchPrefill::new(
                    dev,
                    PrefillConfig {
                        heads: cfg.heads,
                        q_dtype: cfg.dtype,
                        kv_dtype: cfg.dtype,
                        params: cfg.params,
                        mask: if l + 1 == cfg.num_levels {
                            PrefillMask::Causal
                        } else {
                            PrefillMask::None
                        },
                        allow_split: true,
                    },
                )
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            dev: dev.clone(),
            cfg,
            levels,
            rows: 0,
            kv_indices_lens: Vec::new(),
            tmp_o: None,
            tmp_lse: None,
            own_lse: None,
            planned: false,
        })
    }

    /// Plans a step: one [`CascadeLevel`] per configured level, all over the same query rows.
    pub fn plan(&mut self, levels: &[CascadeLevel<'_>]) -> Result<()> {
        self.planned = false;
        ensure(levels.len() == self.cfg.num_levels, "levels", || {
            format!(
                "has {} levels, the cascade was configured with {}",
                levels.len(),
                self.cfg.num_levels
            )
        })?;
        let rows = levels[0].qo_indptr.total();
        for (l, level) in levels.iter().enumerate() {
            ensure(level.qo_indptr.total() == rows, "levels", || {
                format!(
                    "level {l} covers {} query rows, level 0 covers {rows}",
                    level.qo_indptr.total()
                )
            })?;
            ensure(
                level.table.page_size() == levels[0].table.page_size(),
                "levels",
                || {
                    format!(
                        "level {l} has page size {}, level 0 {}",
                        level.table.page_size(),
                        levels[0].table.page_size()
                    )
                },
            )?;
        }
        for (op, level) in self.levels.iter_mut().zip(levels) {
            op.plan(level.qo_indptr, PrefillKv::Paged(level.table), None)?;
        }
        let h = self.cfg.heads;
        let o_bytes = rows * h.num_qo_heads * h.head_dim * self.cfg.dtype.size_bytes();
        let lse_len = rows * h.num_qo_heads;
        let stream = self.dev.stream();
        if self.cfg.num_levels > 1 && self.tmp_o.as_ref().is_none_or(|b| b.len() < o_bytes) {
            // SAFETY: written by a level's kernel before the merge reads it.
            self.tmp_o = Some(unsafe { stream.alloc::<u8>(o_bytes.max(16)) }?);
            self.tmp_lse = Some(unsafe { stream.alloc::<f32>(lse_len.max(1)) }?);
            self.own_lse = Some(unsafe { stream.alloc::<f32>(lse_len.max(1)) }?);
        }
        self.rows = rows;
        self.kv_indices_lens = levels.iter().map(|l| l.table.kv_indices().len()).collect();
        self.planned = true;
        Ok(())
    }

    /// Runs the planned step: `q`, `o` `[rows, num_qo_heads, head_dim]`, `lse` `[rows,
    /// num_qo_heads]`; `k_cache`/`v_cache` the page pool described by `kv` (the same slice twice
    /// for a combined tensor); `kv_indices[l]` the device copy of level `l`'s page ids.
    #[allow(clippy::too_many_arguments)]
    pub fn run<T: Element>(
        &mut self,
        q: DevSlice<T>,
        k_cache: DevSlice<T>,
        v_cache: DevSlice<T>,
        kv: &PagedKvDesc,
        kv_indices: &[DevSlice<i32>],
        mut o: DevSliceMut<T>,
        lse: Option<DevSliceMut<f32>>,
    ) -> Result<()> {
        ensure(self.planned, "self", || "run() called before plan()".into())?;
        ensure(T::DTYPE == self.cfg.dtype, "q", || {
            format!("is {}, configured {}", T::DTYPE, self.cfg.dtype)
        })?;
        ensure(
            kv_indices.len() == self.cfg.num_levels,
            "kv_indices",
            || {
                format!(
                    "has {} tables, the cascade has {} levels",
                    kv_indices.len(),
                    self.cfg.num_levels
                )
            },
        )?;
        let h = self.cfg.heads;
        let lse_len = self.rows * h.num_qo_heads;
        if let Some(l) = &lse {
            ensure(l.len() == lse_len, "lse", || {
                format!("has {} elements, expected {lse_len}", l.len())
            })?;
        }
        let stream = self.dev.stream().clone();
        let n = self.rows * h.num_qo_heads * h.head_dim;
        // Exact-length views of our buffers (they may be larger than this step needs).
        let mut own_lse = self.own_lse.as_mut().map(|b| {
            // SAFETY: a live allocation of at least lse_len f32 (sized by plan()), used only on
            // this stream.
            unsafe { DevSliceMut::<f32>::from_raw(DevSliceMut::new(b, &stream).ptr(), lse_len) }
        });
        // The running state: the caller's LSE, or ours.
        let mut lse = lse.or(own_lse.take());
        // Level 0 writes the running state directly; each later level writes its own state and
        // is merged into the running one. Every launch validates its tensors before it runs.
        self.levels[0].run_paged(
            q,
            k_cache,
            v_cache,
            kv,
            kv_indices[0],
            o.reborrow(),
            lse.as_mut().map(|l| l.reborrow()),
            None,
        )?;
        if self.cfg.num_levels == 1 {
            return Ok(());
        }
        let (tmp_o_ptr, tmp_lse_ptr) = match (&mut self.tmp_o, &mut self.tmp_lse) {
            (Some(a), Some(b)) => (
                DevSliceMut::new(a, &stream).ptr(),
                DevSliceMut::new(b, &stream).ptr(),
            ),
            _ => return Err(invalid("self", "the plan allocated no level buffers")),
        };
        let running_lse = lse
            .as_mut()
            .ok_or_else(|| invalid("self", "no running LSE"))?;
        for (level, &ids) in self.levels.iter().zip(kv_indices).skip(1) {
            // SAFETY: tmp_o holds at least n elements of T and tmp_lse lse_len floats (sized by
            // plan() for these rows; allocations are 256-byte aligned); both are owned by self
            // and used only on this stream, written by the level's kernel before the merge reads.
            let (level_o, level_lse) = unsafe {
                (
                    DevSliceMut::<T>::from_raw(tmp_o_ptr, n),
                    DevSliceMut::<f32>::from_raw(tmp_lse_ptr, lse_len),
                )
            };
            level.run_paged(q, k_cache, v_cache, kv, ids, level_o, Some(level_lse), None)?;
            // SAFETY: the same two buffers, now read-only.
            let (level_o, level_lse) = unsafe {
                (
                    DevSlice::<T>::from_raw(tmp_o_ptr, n),
                    DevSlice::<f32>::from_raw(tmp_lse_ptr, lse_len),
                )
            };
            merge_state_in_place(
                &self.dev,
                o.reborrow(),
                running_lse.reborrow(),
                level_o,
                level_lse,
                None,
                h.num_qo_heads,
                h.head_dim,
                self.cfg.params.lse_base,
            )?;
        }
        Ok(())
    }
}
