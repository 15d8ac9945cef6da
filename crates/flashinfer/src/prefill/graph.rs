//! CUDA-graph mode of [`BatchPrefill`]: `run()` is captured once and replayed after every later
//! `plan()`.
//!
//! A captured launch keeps its grid, its kernel and its argument values, so in this mode they are
//! fixed at construction for the largest step the caller will plan ([`PrefillGraphLimits`]): the
//! tile shape (chosen from the limits, or forced), the grid (the most work items any plan within
//! the limits makes, `plan::prefill::prefill_bounds`, times the KV heads) and every workspace
//! offset (work list, split counters and partial states sized for those bounds). What changes from
//! step to step (the work list and its length, which the kernel reads from the workspace, and the
//! zeroed counters) is rewritten by `plan()` with one asynchronous copy; blocks past the step's
//! items exit at once. A plan outside the limits is a typed error before anything is written, so
//! the previous plan stays valid.

use std::sync::Arc;

use super::{plan_layout, BatchPrefill, PrefillConfig, PrefillMask, PrefillSchedule, PrefillTiles};
use crate::cuda::{Device, Workspace};
use crate::error::{ensure, invalid, Result};
use crate::plan::prefill::{prefill_bounds, PrefillBounds};

/// Where the keys of every step of a CUDA-graph-mode prefill live, and how many a step may use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PrefillGraphKv {
    /// Ragged K/V: `k`/`v` given to `run_ragged()` hold `max_kv_tokens` rows `[max_kv_tokens,
    /// num_kv_heads, head_dim]`, of which a step uses the first.
    Ragged { max_kv_tokens: usize },
    /// A paged cache of `page_size`-token pages: `kv_indices` given to `run_paged()` holds at
    /// least `max_pages` entries, of which a step uses the first.
    Paged { max_pages: usize, page_size: usize },
}

/// What a CUDA-graph-mode prefill is sized for: every plan must fit these.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PrefillGraphLimits {
    /// Most requests in one step.
    pub max_batch: usize,
    /// Most query tokens in one step: `q`, `o` (and `lse`) given to `run()` hold this many rows,
    /// of which a step uses the first.
    pub max_qo_tokens: usize,
    pub kv: PrefillGraphKv,
    /// [`PrefillMask::Custom`]: most bytes of mask bits in one step (the `mask` given to `run()`
    /// holds at least this many); 0 for the other masks.
    pub max_mask_bytes: usize,
}

impl PrefillGraphLimits {
    fn paged(&self) -> bool {
        matches!(self.kv, PrefillGraphKv::Paged { .. })
    }

    /// Ragged: rows of K/V; paged: entries of `kv_indices`.
    fn max_kv(&self) -> usize {
        match self.kv {
            PrefillGraphKv::Ragged { max_kv_tokens } => max_kv_tokens,
            PrefillGraphKv::Paged { max_pages, .. } => max_pages,
        }
    }
}

/// What a graph-mode op fixed at construction.
#[derive(Clone, Copy, Debug)]
pub(super) struct GraphShape {
    pub(super) limits: PrefillGraphLimits,
    /// The kernel's shape; its variant, look-ahead and user-hook fields follow the op's settings
    /// at each plan, which change neither the grid nor the workspace.
    pub(super) tiles: PrefillTiles,
    pub(super) bounds: PrefillBounds,
}

/// The fields of a tile that size the grid and the workspace (rows per tile, keys per stage,
/// blocks per SM through threads and shared memory, pieces per merge).
fn shape_key(t: &PrefillTiles) -> (usize, usize, usize, usize, usize, bool) {
    (
        t.warps_q, t.warps_kv, t.m_tiles, t.kv_tile, t.nstage, t.wgmma,
    )
}

impl BatchPrefill {
    /// A prefill whose `run_paged()` / `run_ragged()` can be captured in a CUDA graph once
    /// ([`crate::cuda::Graph::capture`]) and replayed after every later `plan()`: the kernel, the
    /// grid and every workspace offset are fixed here for `limits`, and each `plan()` only
    /// rewrites the work list in the workspace (one asynchronous host-to-device copy, ordered on
    /// the stream after the replays before it). The buffers given to `run()` hold the limits'
    /// rows ([`PrefillGraphLimits`]) and must stay the same (the graph keeps their addresses).
    ///
    /// `tiles` forces the kernel's tile shape; `None` picks it as `plan()` would for a full step
    /// (`max_qo_tokens / max_batch` query tokens per request). Split-KV works as in the normal
    /// mode, with partial states and counters for the most splits a plan can make.
    ///
    /// Plans must use the limits' KV kind (and page size); `set_variant`,
    /// `set_user_variant` and `set_l2_lookahead` change the kernel, so capture `run()` again
    /// after them (and plan first); forced or batch-invariant tiles must keep the shape fixed
    /// here, and a batch-invariant chunk that cuts a step into more items than the grid holds is
    /// an error at `plan()`.
    pub fn for_cuda_graph(
        dev: &Arc<Device>,
        cfg: PrefillConfig,
        limits: PrefillGraphLimits,
        tiles: Option<PrefillTiles>,
    ) -> Result<Self> {
        let h = cfg.heads;
        let l = limits;
        let too_big = i32::MAX as usize / 64;
        ensure(l.max_batch >= 1, "limits", || {
            "max_batch must be at least 1".into()
        })?;
        ensure((1..too_big).contains(&l.max_qo_tokens), "limits", || {
            format!("max_qo_tokens {} must be in 1..{too_big}", l.max_qo_tokens)
        })?;
        ensure(l.max_kv() < too_big, "limits", || {
            format!("{:?} is too many keys for one batch", l.kv)
        })?;
        if let PrefillGraphKv::Paged { page_size, .. } = l.kv {
            ensure(
                page_size >= 1 && page_size <= i32::MAX as usize,
                "limits",
                || format!("page_size {page_size} must be in 1..=i32::MAX"),
            )?;
        }
        match cfg.mask {
            PrefillMask::Custom => ensure(
                l.max_mask_bytes >= 1 && l.max_mask_bytes < i32::MAX as usize,
                "limits",
                || {
                    format!(
                        "max_mask_bytes {} must be in 1..i32::MAX for custom masks",
                        l.max_mask_bytes
                    )
                },
            )?,
            _ => ensure(l.max_mask_bytes == 0, "limits", || {
                format!(
                    "max_mask_bytes {} is for PrefillMask::Custom; the op masks {:?}",
                    l.max_mask_bytes, cfg.mask
                )
            })?,
        }

        let mut op = Self::new(dev, cfg)?;
        let paged = l.paged();
        let tiles = match tiles {
            Some(t) => {
                op.check_forced(&t)?;
                PrefillTiles { paged, ..t }
            }
            // The tile plan() would pick for a full step, as it picks from the packed average.
            None => op.choose_tiles(paged, l.max_qo_tokens * h.group_size() / l.max_batch),
        };
        let bounds = prefill_bounds(l.max_batch, l.max_qo_tokens, &op.plan_shape(&tiles));
        ensure(
            bounds.max_work.saturating_mul(h.num_kv_heads) < i32::MAX as usize,
            "limits",
            || {
                format!(
                    "{} work items of {} KV heads are more blocks than one launch allows",
                    bounds.max_work, h.num_kv_heads
                )
            },
        )?;
        // Compiled now, so that neither plan() nor the capture waits for NVRTC.
        op.kernel(&tiles)?;
        op.layout = plan_layout(
            bounds.max_work,
            bounds.max_counters,
            bounds.max_partial,
            &tiles,
            h,
        );
        op.workspace = Workspace::new(dev.stream(), op.layout.total)?;
        op.graph = Some(GraphShape {
            limits,
            tiles,
            bounds,
        });
        Ok(op)
    }

    /// The limits of a CUDA-graph-mode op (`None` in the normal mode).
    pub fn graph_limits(&self) -> Option<PrefillGraphLimits> {
        self.graph.map(|g| g.limits)
    }

    /// In graph mode, tiles forced later (or by batch-invariant mode) must keep the shape the grid
    /// and workspace were sized for.
    pub(super) fn check_graph_tiles(&self, t: &PrefillTiles) -> Result<()> {
        let Some(g) = &self.graph else {
            return Ok(());
        };
        ensure(shape_key(t) == shape_key(&g.tiles), "tiles", || {
            format!(
                "{} has another shape than {}, which this CUDA-graph op was sized for",
                t.name(),
                g.tiles.name()
            )
        })
    }

    /// In graph mode, errors unless the step fits the limits and its schedule the bounds; called
    /// by `plan()` before it writes anything. `nnz_kv`: ragged rows or paged `kv_indices` entries.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn check_graph_step(
        &self,
        batch: usize,
        nnz_qo: usize,
        paged: bool,
        nnz_kv: usize,
        page_size: usize,
        mask_bytes: usize,
        s: &PrefillSchedule,
    ) -> Result<()> {
        let Some(g) = &self.graph else {
            return Ok(());
        };
        let l = g.limits;
        match l.kv {
            PrefillGraphKv::Ragged { max_kv_tokens } => {
                ensure(!paged, "kv", || {
                    "a paged step; this CUDA-graph op was built for ragged KV".into()
                })?;
                ensure(nnz_kv <= max_kv_tokens, "kv", || {
                    format!("has {nnz_kv} keys; the graph was sized for {max_kv_tokens}")
                })?;
            }
            PrefillGraphKv::Paged {
                max_pages,
                page_size: graph_page_size,
            } => {
                ensure(paged, "kv", || {
                    "a ragged step; this CUDA-graph op was built for paged KV".into()
                })?;
                ensure(page_size == graph_page_size, "kv", || {
                    format!("page_size {page_size}; the graph was built for {graph_page_size}")
                })?;
                ensure(nnz_kv <= max_pages, "kv", || {
                    format!("uses {nnz_kv} pages; the graph was sized for {max_pages}")
                })?;
            }
        }
        ensure(batch <= l.max_batch, "qo_indptr", || {
            format!(
                "has {batch} requests; the graph was sized for {}",
                l.max_batch
            )
        })?;
        ensure(nnz_qo <= l.max_qo_tokens, "qo_indptr", || {
            format!(
                "has {nnz_qo} query tokens; the graph was sized for {}",
                l.max_qo_tokens
            )
        })?;
        ensure(mask_bytes <= l.max_mask_bytes, "mask", || {
            format!(
                "has {mask_bytes} bytes; the graph was sized for {}",
                l.max_mask_bytes
            )
        })?;
        let b = g.bounds;
        if s.work.len() > b.max_work
            || s.num_partial > b.max_partial
            || s.num_counters > b.max_counters
        {
            // Within the limits only a fixed (batch-invariant) chunk can get here.
            return Err(invalid(
                if self.fixed_kv_chunk.is_some() {
                    "kv_chunk"
                } else {
                    "qo_indptr"
                },
                format!(
                    "the step needs {} work items, {} partial states and {} counters; the graph \
                     has room for {}, {} and {}",
                    s.work.len(),
                    s.num_partial,
                    s.num_counters,
                    b.max_work,
                    b.max_partial,
                    b.max_counters
                ),
            ));
        }
        Ok(())
    }

    /// Query rows `run()` takes: the step's, or in graph mode the limit's (a step uses the
    /// first).
    pub(super) fn run_qo_rows(&self) -> usize {
        self.graph
            .map_or(self.planned.nnz_qo, |g| g.limits.max_qo_tokens)
    }

    /// Ragged K/V rows, or paged `kv_indices` entries, `run()` takes.
    pub(super) fn run_kv_len(&self) -> usize {
        self.graph
            .map_or(self.planned.nnz_kv, |g| g.limits.max_kv())
    }

    /// Bytes of custom-mask bits `run()` needs.
    pub(super) fn run_mask_bytes(&self) -> usize {
        self.graph
            .map_or(self.planned.mask_bytes, |g| g.limits.max_mask_bytes)
    }

    /// Work items in the grid: the plan's, or in graph mode the most any plan makes (blocks past
    /// the step's items exit at once).
    pub(super) fn grid_items(&self) -> usize {
        self.graph
            .map_or(self.schedule.work.len(), |g| g.bounds.max_work)
    }
}
