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

use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::{CudaEvent, CudaSlice};

use crate::cuda::{DevSlice, DevSliceMut, Device};
use crate::dtype::{DType, Element};
use crate::error::{ensure, invalid, Result};
use crate::layout::{HeadConfig, PageTable, PagedKvDesc, Ragged};
use crate::merge::merge_state_in_place;
use crate::params::AttentionParams;
use crate::prefill::{BatchPrefill, PrefillConfig, PrefillKv, PrefillMask, PrefillTiles};

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
///
/// The levels are independent until they are merged, so level 0 runs on the caller's stream and
/// the later levels on a second stream of the same context, concurrently: a shared prefix is
/// compute-bound (all of a group's queries against its keys) while a request's own keys are a
/// memory-bound decode, and the second fills the SM resources the first leaves free. The merges
/// then run on the caller's stream in level order, so results do not depend on the overlap. Both
/// streams are joined by events, which CUDA-graph capture follows.
pub struct MultiLevelCascade {
    dev: Arc<Device>,
    /// The handle levels 1.. launch on (a second stream), with the fork and join events.
    side: Option<SideStream>,
    cfg: CascadeConfig,
    levels: Vec<BatchPrefill>,
    rows: usize,
    kv_indices_lens: Vec<usize>,
    /// Each later level's output and LSE before it is merged (bytes: rows x heads x dim of the
    /// dtype; floats: rows x heads).
    level_states: Vec<(CudaSlice<u8>, CudaSlice<f32>)>,
    /// The running LSE when the caller asks for none.
    own_lse: Option<CudaSlice<f32>>,
    planned: bool,
}

struct SideStream {
    dev: Arc<Device>,
    fork: CudaEvent,
    join: CudaEvent,
}

impl MultiLevelCascade {
    pub fn new(dev: &Arc<Device>, cfg: CascadeConfig) -> Result<Self> {
        ensure(cfg.num_levels >= 1, "num_levels", || {
            "a cascade has at least one level".into()
        })?;
        let side = if cfg.num_levels > 1 {
            let ctx = dev.context();
            let no_timing = Some(CUevent_flags::CU_EVENT_DISABLE_TIMING);
            Some(SideStream {
                dev: dev.with_stream(ctx.new_stream()?)?,
                fork: ctx.new_event(no_timing)?,
                join: ctx.new_event(no_timing)?,
            })
        } else {
            None
        };
        let mut levels = (0..cfg.num_levels)
            .map(|l| {
                BatchPrefill::new(
                    match &side {
                        Some(s) if l > 0 => &s.dev,
                        _ => dev,
                    },
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
        // Shared levels read keys that are cold in L2 once per row tile of their group.
        for op in levels.iter_mut().take(cfg.num_levels - 1) {
            op.set_l2_lookahead(true);
        }
        Ok(Self {
            dev: dev.clone(),
            side,
            cfg,
            levels,
            rows: 0,
            kv_indices_lens: Vec::new(),
            level_states: Vec::new(),
            own_lse: None,
            planned: false,
        })
    }

    /// Forces level `level`'s kernel specialisation (`None`: the engine's choice again); for
    /// tuning and benchmarks. Takes effect at the next `plan()`.
    pub fn force_tiles(&mut self, level: usize, tiles: Option<PrefillTiles>) -> Result<()> {
        let n = self.levels.len();
        let op = self
            .levels
            .get_mut(level)
            .ok_or_else(|| invalid("level", format!("is {level}, the cascade has {n} levels")))?;
        op.force_tiles(tiles)?;
        self.planned = false;
        Ok(())
    }

    /// The specialisation level `level` runs (after `plan()`).
    pub fn tiles(&self, level: usize) -> Option<PrefillTiles> {
        self.levels.get(level).and_then(|op| op.tiles())
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
        let too_small = |st: &(CudaSlice<u8>, CudaSlice<f32>)| st.0.len() < o_bytes.max(16);
        if self.cfg.num_levels > 1
            && (self.level_states.len() + 1 < self.cfg.num_levels
                || self.level_states.iter().any(too_small))
        {
            // Make sure no earlier step still uses the buffers being replaced.
            stream.synchronize()?;
            self.level_states = (1..self.cfg.num_levels)
                .map(|_| -> Result<_> {
                    // SAFETY: written by the level's kernel before the merge reads it.
                    unsafe {
                        Ok((
                            stream.alloc::<u8>(o_bytes.max(16))?,
                            stream.alloc::<f32>(lse_len.max(1))?,
                        ))
                    }
                })
                .collect::<Result<Vec<_>>>()?;
            // SAFETY: written by level 0 before anything reads it.
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
        let Some(side) = &self.side else {
            // One level: it writes the result directly.
            return self.levels[0].run_paged(q, k_cache, v_cache, kv, kv_indices[0], o, lse, None);
        };
        let states: Vec<(u64, u64)> = self
            .level_states
            .iter_mut()
            .map(|(a, b)| {
                (
                    DevSliceMut::new(a, &stream).ptr(),
                    DevSliceMut::new(b, &stream).ptr(),
                )
            })
            .collect();
        // SAFETY (the views below): each state buffer holds at least n elements of T and lse_len
        // floats (sized by plan() for these rows; allocations are 256-byte aligned); they are
        // owned by self, written by their level's kernel on the side stream, and read by the
        // merges on our stream after the join.
        let level_o = |i: usize| unsafe { DevSliceMut::<T>::from_raw(states[i].0, n) };
        let level_lse = |i: usize| unsafe { DevSliceMut::<f32>::from_raw(states[i].1, lse_len) };
        let read_o = |i: usize| unsafe { DevSlice::<T>::from_raw(states[i].0, n) };
        let read_lse = |i: usize| unsafe { DevSlice::<f32>::from_raw(states[i].1, lse_len) };

        // Fork: the side stream starts after everything already queued on ours (the previous
        // step's merges read these buffers). Level 0 is launched first so that its (usually
        // larger) grid is placed first; the later levels fill what it leaves free.
        side.fork.record(&stream)?;
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
        side.dev.stream().wait(&side.fork)?;
        for (i, (level, &ids)) in self.levels.iter().zip(kv_indices).skip(1).enumerate() {
            level.run_paged(
                q,
                k_cache,
                v_cache,
                kv,
                ids,
                level_o(i),
                Some(level_lse(i)),
                None,
            )?;
        }
        side.join.record(side.dev.stream())?;
        stream.wait(&side.join)?;
        let running_lse = lse
            .as_mut()
            .ok_or_else(|| invalid("self", "no running LSE"))?;
        for i in 0..states.len() {
            merge_state_in_place(
                &self.dev,
                o.reborrow(),
                running_lse.reborrow(),
                read_o(i),
                read_lse(i),
                None,
                h.num_qo_heads,
                h.head_dim,
                self.cfg.params.lse_base,
            )?;
        }
        Ok(())
    }
}
