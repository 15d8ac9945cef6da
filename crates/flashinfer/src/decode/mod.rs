//! Batch decode on a paged KV cache: one query token per request, every KV head, GQA.
//!
//! `plan()` runs on the host from the page table alone: it picks the kernel specialisation, splits
//! long requests when the batch cannot fill the GPU or would leave them running alone (a simulated
//! block scheduler picks the chunk, plan/decode/split.rs), and copies the work list into the
//! workspace in one transfer. `run()` validates the device tensors and launches one kernel; when a request was
//! split, the last of its blocks to finish merges the partial states (kernels/decode_common.cuh).
//! `set_variant` adds RoPE, a soft cap, ALiBi, a sliding window and sinks (decode/variant.rs).

mod fastdiv;
mod tiles;
mod variant;

pub(crate) use fastdiv::fast_div_params;

pub use crate::plan::decode::{
    decode_chunk, fixed_decode_chunk, max_work_items, plan_decode, plan_decode_fixed_chunk,
    plan_decode_with, schedule_decode_into, DecodeSchedule, DecodeScratch, DecodeWork, Dispatch,
    SplitModel, SplitPolicy, CHUNK_ALIGN, MIN_CHUNK,
};
pub(crate) use tiles::specs;
pub use tiles::{DecodePath, DecodeTiles, HEAD_DIMS, TENSOR_CORE_MIN_GROUP};

use std::borrow::Cow;
use std::sync::Arc;

use cudarc::driver::sys;

use crate::cuda::{
    launch, DevSlice, DevSliceMut, Device, LaunchConfig, PlanItem, PlanLayout, Workspace,
};
use crate::dtype::{DType, Element};
use crate::error::{ensure, invalid, Result};
use crate::jit::KernelFunction;
use crate::layout::{HeadConfig, PageTable, PagedKvDesc};
use crate::params::AttentionParams;
use crate::variant::Variant;
use variant::DecodeVariant;

// SAFETY: DecodeWork is repr(C) with seven i32 fields: no padding.
unsafe impl PlanItem for DecodeWork {}

/// Static configuration of a decode op (one per model layer shape).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DecodeConfig {
    pub heads: HeadConfig,
    pub q_dtype: DType,
    pub kv_dtype: DType,
    pub params: AttentionParams,
    /// Allow split-KV (off gives each request one block per KV head, whatever the batch).
    pub allow_split: bool,
}

/// Parameter block of the kernel, laid out exactly as `DecodeParams` in kernels/decode.cuh.
#[repr(C)]
#[derive(Clone, Copy)]
struct DecodeParams {
    q: u64,
    k: u64,
    v: u64,
    kv_indices: u64,
    work: u64,
    num_work: u64,
    o: u64,
    lse: u64,
    partial_o: u64,
    partial_lse: u64,
    counters: u64,
    page_stride: i64,
    token_stride: i64,
    head_stride: i64,
    page_size: i32,
    page_size_div_magic: u32,
    page_size_div_shift: u32,
    num_qo_heads: i32,
    sm_scale_log2: f32,
    lse_out_scale: f32,
    softcap_in: f32,
    softcap_out: f32,
    alibi_slopes_log2: u64,
    sinks_log2: u64,
    kv_lens: u64,
    rope_offsets: u64,
    rope_rcp_scale: f32,
    rope_log2_theta: f32,
    num_inline: i32,
    inline_pad: i32,
    inline_work: [DecodeWork; INLINE_WORK],
}

/// Work items the launch parameters carry (decode_common.cuh's INLINE_WORK): a plan of at most
/// this many items outside graph mode is passed in the launch instead of read from the
/// workspace, which saves each block a dependent DRAM trip before its page ids (the one-wave
/// shapes: 1 x 1024 has 16 items, 1 x 32768 and 16 x 4096 32). Graph mode always reads the
/// workspace (a captured launch's parameters are fixed). `FLASHINFER_DECODE_INLINE_WORK=0` turns
/// it off (A/B).
const INLINE_WORK: usize = 32;

// The kernel static_asserts the same size: a field added on one side only fails to compile.
const _: () = assert!(std::mem::size_of::<DecodeParams>() == 192 + INLINE_WORK * 28);

/// Read once per process: `run()` is the hot path and only launches.
fn inline_work_enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("FLASHINFER_DECODE_INLINE_WORK").map_or(true, |v| v != "0"))
}

/// What a CUDA-graph-mode decode is sized for: every plan must fit these.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GraphLimits {
    /// Most requests in one step.
    pub max_batch: usize,
    /// Most page ids (`kv_indices` entries) in one step.
    pub max_pages: usize,
}

#[derive(Clone, Copy, Debug)]
struct GraphShape {
    limits: GraphLimits,
    /// Work items the fixed grid has room for.
    max_work: usize,
}

/// Where a plan for `work` items, `batch` requests and `partial` partial states lives in the
/// workspace: one arrival counter per (request, KV head), a partial state per (slot, query head).
fn plan_layout(work: usize, batch: usize, partial: usize, h: HeadConfig) -> PlanLayout {
    PlanLayout::new(
        work * std::mem::size_of::<DecodeWork>(),
        batch * h.num_kv_heads,
        partial * h.num_qo_heads * h.head_dim,
        partial * h.num_qo_heads,
    )
}

/// A planned batch decode.
pub struct BatchDecode {
    dev: Arc<Device>,
    cfg: DecodeConfig,
    tiles: DecodeTiles,
    decode_fn: KernelFunction,
    workspace: Workspace,
    schedule: DecodeSchedule,
    /// `plan()`'s buffers, kept across steps so that planning allocates nothing once they have
    /// grown: the planner's scratch, and the schedule of the next plan, swapped with `schedule`
    /// once that plan has succeeded (a failed plan leaves the current one whole).
    plan_scratch: DecodeScratch,
    next_schedule: DecodeSchedule,
    layout: PlanLayout,
    batch_size: usize,
    page_size: usize,
    kv_indices_len: usize,
    planned: bool,
    graph: Option<GraphShape>,
    /// Batch-invariant mode's fixed split size.
    fixed_chunk: Option<usize>,
    /// How a batch that fills the GPU by itself is split (`FLASHINFER_DECODE_SPLIT`).
    split: SplitPolicy,
    variant: DecodeVariant,
    /// Whether the op's kernel has the producer warp when its variant allows (RoPE does not):
    /// the choice made at creation, which `set_variant` goes back to.
    producer_warp: bool,
}

/// The tuning knob `FLASHINFER_DECODE_SPLIT` (`old`, `new`, or `new:start=3,merge=1,...`; see
/// [`SplitPolicy`]'s `FromStr`): read when an op is created, so that a benchmark can compare
/// split policies on the GPU host without rebuilding. Unset or empty: the default policy.
fn split_policy_from_env() -> Result<SplitPolicy> {
    match std::env::var("FLASHINFER_DECODE_SPLIT") {
        Ok(v) if !v.trim().is_empty() => {
            v.parse().map_err(|e| invalid("FLASHINFER_DECODE_SPLIT", e))
        }
        _ => Ok(SplitPolicy::default()),
    }
}

/// Compiles (or loads from the cache) the kernel of `tiles`.
fn load_kernel(dev: &Device, tiles: &DecodeTiles) -> Result<KernelFunction> {
    let module = dev.module(&tiles.spec())?;
    module.set_max_dynamic_shared_bytes("batch_decode", tiles.smem_bytes())?;
    module.kernel("batch_decode")
}

impl BatchDecode {
    /// Compiles (or loads from the cache) the kernels for `cfg` and allocates a workspace.
    pub fn new(dev: &Arc<Device>, cfg: DecodeConfig) -> Result<Self> {
        let h = cfg.heads;
        let tiles = DecodeTiles::choose(h.head_dim, h.group_size(), cfg.q_dtype, cfg.kv_dtype)
            .for_arch(dev.arch());
        Self::with_tiles(dev, cfg, tiles)
    }

    /// As [`BatchDecode::new`] with an explicit kernel specialisation (benchmarks compare paths).
    pub fn with_tiles(dev: &Arc<Device>, cfg: DecodeConfig, tiles: DecodeTiles) -> Result<Self> {
        let h = cfg.heads;
        ensure(HEAD_DIMS.contains(&h.head_dim), "head_dim", || {
            format!("{} is not one of {HEAD_DIMS:?}", h.head_dim)
        })?;
        ensure(h.group_size() <= 16, "num_qo_heads", || {
            format!("GQA ratio {} is above the supported 16", h.group_size())
        })?;
        for (arg, dt) in [("q_dtype", cfg.q_dtype), ("kv_dtype", cfg.kv_dtype)] {
            ensure(dt != DType::F32, arg, || "decode takes f16 or bf16".into())?;
        }
        ensure(
            tiles.head_dim == h.head_dim
                && tiles.group == h.group_size()
                && tiles.q_dtype == cfg.q_dtype
                && tiles.kv_dtype == cfg.kv_dtype,
            "tiles",
            || format!("{tiles:?} does not match the configuration {cfg:?}"),
        )?;
        ensure(tiles.variant.is_plain(), "tiles", || {
            format!(
                "{tiles:?} compiles a variant in; variants are given to set_variant(), which \
                 also passes their values"
            )
        })?;
        ensure(
            !tiles.producer_warp || tiles.producer_warp_fits(dev.arch()),
            "tiles",
            || {
                format!(
                    "{tiles:?}: the producer-warp kernel needs sm_90 or newer, head_dim <= 128 \
                     and one 16-token step per warp"
                )
            },
        )?;
        let split = split_policy_from_env()?;
        let decode_fn = load_kernel(dev, &tiles)?;
        let workspace = Workspace::new(dev.stream(), 1 << 20)?;
        Ok(Self {
            dev: dev.clone(),
            cfg,
            tiles,
            decode_fn,
            workspace,
            schedule: DecodeSchedule::default(),
            plan_scratch: DecodeScratch::default(),
            next_schedule: DecodeSchedule::default(),
            layout: PlanLayout::default(),
            batch_size: 0,
            page_size: 0,
            kv_indices_len: 0,
            planned: false,
            graph: None,
            fixed_chunk: None,
            split,
            variant: DecodeVariant::default(),
            producer_warp: tiles.producer_warp,
        })
    }

    /// A decode whose `run()` can be captured in a CUDA graph once and replayed after every later
    /// `plan()`: the grid and every workspace offset are fixed for `limits`, and everything a
    /// plan changes (the work list, its length, the split counters) lives in the workspace that
    /// `plan()` rewrites with one asynchronous copy. `q`/`o`/`lse` given to `run()` hold
    /// `limits.max_batch` rows and `kv_indices` at least `limits.max_pages` entries; a step uses
    /// the first rows and entries.
    pub fn for_cuda_graph(
        dev: &Arc<Device>,
        cfg: DecodeConfig,
        limits: GraphLimits,
    ) -> Result<Self> {
        ensure(limits.max_batch >= 1, "limits", || {
            "max_batch must be at least 1".into()
        })?;
        let mut op = Self::new(dev, cfg)?;
        // The planner makes one item per request, or (when it splits) at most a few waves of
        // items plus one per request, whatever the split policy (plan/decode.rs).
        let max_work = max_work_items(limits.max_batch, cfg.heads.num_kv_heads, op.wave());
        op.layout = plan_layout(max_work, limits.max_batch, max_work, cfg.heads);
        op.workspace = Workspace::new(dev.stream(), op.layout.total)?;
        op.graph = Some(GraphShape { limits, max_work });
        Ok(op)
    }

    /// Batch-invariant mode: every later plan splits each request longer than `chunk` tokens (a
    /// multiple of [`CHUNK_ALIGN`]) into chunks of `chunk`, whatever else is in the batch, so a
    /// request's result is the same, to the bit, in any batch. `None` returns to the
    /// batch-dependent split.
    pub fn set_batch_invariant(&mut self, chunk: Option<usize>) -> Result<()> {
        if let Some(c) = chunk {
            ensure(c > 0 && c.is_multiple_of(CHUNK_ALIGN), "chunk", || {
                format!("{c} is not a positive multiple of {CHUNK_ALIGN}")
            })?;
        }
        self.fixed_chunk = chunk;
        Ok(())
    }

    /// Attention variant of every later `plan()` and `run()`: RoPE (fused: q and every key are
    /// rotated in the kernel), logits soft cap, ALiBi, sliding window and sinks, in any
    /// combination (definitions in [`crate::variant`]; the query of a request of `kv_len` keys is
    /// at position `kv_len - 1`, plus its `rope_offsets` entry under RoPE), on the kernel path this
    /// op runs. Compiles (or loads) the variant's kernel and copies the per-head slopes and sinks
    /// to the device, once. The current plan is dropped: call `plan()` before the next `run()`
    /// (and, in CUDA-graph mode, capture `run()` again, unless only the offsets changed).
    ///
    /// `rope_offsets` are per request, so a step whose batch changes calls this again with the
    /// step's offsets (`plan()` checks that they cover its batch, and uploads them). A call that
    /// changes nothing but the offsets keeps the kernel and every device address: a CUDA graph
    /// captured before stays valid after the next `plan()`. On an error the op keeps its previous
    /// variant and plan.
    pub fn set_variant(&mut self, variant: &Variant<'_>) -> Result<()> {
        if self.variant.same_except_offsets(variant) {
            self.variant.set_offsets(self.cfg.heads, variant)?;
            self.planned = false;
            return Ok(());
        }
        let state = DecodeVariant::new(self.dev.stream(), self.cfg.heads, variant)?;
        // RoPE rotates keys with every thread's help: not with the producer warp.
        let tiles = DecodeTiles {
            variant: state.kernel_flags,
            ..self.tiles
        };
        let tiles = if state.kernel_flags.rope {
            tiles.for_fused_rope()
        } else {
            tiles.with_producer_warp(self.producer_warp)
        };
        self.decode_fn = load_kernel(&self.dev, &tiles)?;
        self.tiles = tiles;
        self.variant = state;
        self.planned = false;
        Ok(())
    }

    /// How later plans split a batch that fills the GPU by itself (default: the environment's
    /// `FLASHINFER_DECODE_SPLIT`, else [`SplitPolicy::default`]). Batch-invariant mode and
    /// batches too small to fill the GPU do not depend on it.
    pub fn set_split_policy(&mut self, policy: SplitPolicy) {
        self.split = policy;
    }
    /// The split policy of later plans.
    pub fn split_policy(&self) -> SplitPolicy {
        self.split
    }

    /// Blocks of this kernel resident on the whole GPU at once.
    fn wave(&self) -> usize {
        let info = self.dev.info();
        info.sm_count * self.tiles.ctas_per_sm(info.smem_per_sm)
    }

    /// The kernel specialisation this op runs.
    pub fn tiles(&self) -> &DecodeTiles {
        &self.tiles
    }
    /// The current plan's schedule.
    pub fn schedule(&self) -> &DecodeSchedule {
        &self.schedule
    }
    /// Bytes of workspace the current plan needs.
    pub fn workspace_bytes(&self) -> usize {
        self.layout.total
    }

    /// Plans a step for the requests of `table` (host copy of the page table the device holds).
    pub fn plan(&mut self, table: &PageTable) -> Result<()> {
        let kv_lens = table.kv_lens();
        ensure(
            kv_lens.iter().all(|&l| l < i32::MAX as usize),
            "table",
            || "a request is too long".into(),
        )?;
        // RoPE's offsets: one per request, positions inside i32 (before anything changes).
        self.variant.check_batch(&kv_lens)?;
        // A sliding window: only the keys inside it are planned (decode/variant.rs); the items are
        // moved to start at the window below.
        let window_starts = self.variant.window_starts(&kv_lens);
        let planned_lens: Cow<[usize]> = match &window_starts {
            Some(starts) => kv_lens.iter().zip(starts).map(|(l, s)| l - s).collect(),
            None => Cow::Borrowed(&kv_lens),
        };
        let wave = self.wave();
        let page_begin = &table.kv_indptr()[..table.batch_size()];
        let max_pieces = self.tiles.smem_bytes() / (4 * self.cfg.heads.group_size());
        let chunk = match self.fixed_chunk {
            Some(chunk) => {
                let longest = planned_lens.iter().copied().max().unwrap_or(0);
                ensure(longest.div_ceil(chunk) <= max_pieces, "chunk", || {
                    format!(
                        "{chunk} cuts a {longest}-token request into more than the {max_pieces} \
                         pieces one merge holds"
                    )
                })?;
                fixed_decode_chunk(&planned_lens, chunk)
            }
            None => decode_chunk(
                &planned_lens,
                self.cfg.heads.num_kv_heads,
                wave,
                max_pieces,
                self.cfg.allow_split,
                &self.split,
            ),
        };
        let mut s = std::mem::take(&mut self.next_schedule);
        schedule_decode_into(
            &planned_lens,
            page_begin,
            chunk,
            &mut self.plan_scratch,
            &mut s,
        );
        if let Some(starts) = &window_starts {
            // Key positions (and pages) stay those of the request: an item's keys are
            // kv_start.. from the request's first page.
            for w in &mut s.work {
                w.kv_start += starts[w.request as usize] as i32;
            }
        }
        let h = self.cfg.heads;
        let l = match self.graph {
            Some(g) => {
                let lim = g.limits;
                ensure(table.batch_size() <= lim.max_batch, "table", || {
                    format!(
                        "has {} requests; the graph was sized for {}",
                        table.batch_size(),
                        lim.max_batch
                    )
                })?;
                ensure(table.kv_indices().len() <= lim.max_pages, "table", || {
                    format!(
                        "uses {} pages; the graph was sized for {}",
                        table.kv_indices().len(),
                        lim.max_pages
                    )
                })?;
                ensure(
                    s.work.len() <= g.max_work && s.num_partial <= g.max_work,
                    "table",
                    || {
                        format!(
                            "needs {} work items; the graph has room for {}",
                            s.work.len(),
                            g.max_work
                        )
                    },
                )?;
                self.layout
            }
            None => {
                let l = plan_layout(s.work.len(), table.batch_size(), s.num_partial, h);
                if l.total > self.workspace.bytes() {
                    self.workspace =
                        Workspace::new(self.dev.stream(), l.total.next_power_of_two())?;
                }
                l
            }
        };
        // ALiBi's and RoPE's query positions, and RoPE's offsets (a second small copy; only for
        // variants that read them). In CUDA-graph mode sized for the largest batch once, so that
        // its address never changes.
        let capacity = self
            .graph
            .map_or(table.batch_size().next_power_of_two(), |g| {
                g.limits.max_batch
            });
        self.variant
            .upload_requests(self.dev.stream(), &kv_lens, capacity)?;
        // The item count, the work list and the zeroed counters, in one transfer.
        self.workspace.upload_plan(self.dev.stream(), &l, &s.work)?;
        self.next_schedule = std::mem::replace(&mut self.schedule, s);
        self.layout = l;
        self.batch_size = table.batch_size();
        self.page_size = table.page_size();
        self.kv_indices_len = table.kv_indices().len();
        self.planned = true;
        Ok(())
    }

    /// Runs the planned step: `q`, `o` are `[batch, num_qo_heads, head_dim]`, `lse` `[batch,
    /// num_qo_heads]`; `k_cache`/`v_cache` the page pool described by `kv` (pass the same slice
    /// twice for a combined `[pages, 2, ...]` tensor); `kv_indices` the device copy of the table's
    /// page ids given to `plan()`.
    #[allow(clippy::too_many_arguments)]
    pub fn run<Q: Element, KV: Element>(
        &self,
        q: DevSlice<Q>,
        k_cache: DevSlice<KV>,
        v_cache: DevSlice<KV>,
        kv: &PagedKvDesc,
        kv_indices: DevSlice<i32>,
        o: DevSliceMut<Q>,
        lse: Option<DevSliceMut<f32>>,
    ) -> Result<()> {
        let need = self
            .graph
            .map_or(self.kv_indices_len, |g| g.limits.max_pages);
        ensure(kv_indices.len() >= need, "kv_indices", || {
            format!("has {} entries, the plan needs {need}", kv_indices.len())
        })?;
        self.launch(q, k_cache, v_cache, kv, kv_indices.ptr(), o, lse)
    }

    /// `run()` with `kv_indices_ptr` = 0 meaning page i of a request is page `page_begin + i` of
    /// the pool (contiguous KV).
    #[allow(clippy::too_many_arguments)]
    fn launch<Q: Element, KV: Element>(
        &self,
        q: DevSlice<Q>,
        k_cache: DevSlice<KV>,
        v_cache: DevSlice<KV>,
        kv: &PagedKvDesc,
        kv_indices_ptr: u64,
        o: DevSliceMut<Q>,
        lse: Option<DevSliceMut<f32>>,
    ) -> Result<()> {
        let (cfg, h) = (&self.cfg, self.cfg.heads);
        ensure(self.planned, "self", || "run() called before plan()".into())?;
        ensure(Q::DTYPE == cfg.q_dtype, "q", || {
            format!("is {}, configured {}", Q::DTYPE, cfg.q_dtype)
        })?;
        ensure(KV::DTYPE == cfg.kv_dtype, "k_cache", || {
            format!("is {}, configured {}", KV::DTYPE, cfg.kv_dtype)
        })?;
        ensure(kv.page_size == self.page_size, "kv", || {
            format!(
                "page_size {} differs from the planned table's {}",
                kv.page_size, self.page_size
            )
        })?;
        ensure(kv.num_kv_heads == h.num_kv_heads, "kv", || {
            format!(
                "num_kv_heads {} differs from the configured {}",
                kv.num_kv_heads, h.num_kv_heads
            )
        })?;
        ensure(kv.head_dim == h.head_dim, "kv", || {
            format!(
                "head_dim {} differs from the configured {}",
                kv.head_dim, h.head_dim
            )
        })?;
        ensure(kv.page_size <= i32::MAX as usize, "kv", || {
            format!("page_size {} exceeds i32::MAX", kv.page_size)
        })?;
        kv.check_buffers(k_cache.len(), v_cache.len())?;
        // In graph mode the buffers are sized for the largest step, and the kernel touches only
        // the rows of the planned requests.
        let b = self.graph.map_or(self.batch_size, |g| g.limits.max_batch);
        let rows = b * h.num_qo_heads;
        ensure(q.len() == rows * h.head_dim, "q", || {
            format!(
                "has {} elements, expected batch {b} x {} heads x {}",
                q.len(),
                h.num_qo_heads,
                h.head_dim
            )
        })?;
        ensure(o.len() == q.len(), "o", || {
            format!("has {} elements, expected {}", o.len(), q.len())
        })?;
        if let Some(l) = &lse {
            ensure(l.len() == rows, "lse", || {
                format!("has {} elements, expected {rows}", l.len())
            })?;
        }
        let esz = KV::DTYPE.size_bytes() as u64;
        let v_base = v_cache.ptr() + kv.v_offset.unwrap_or(0) as u64 * esz;
        for (arg, p) in [
            ("q", q.ptr()),
            ("o", o.ptr()),
            ("k_cache", k_cache.ptr()),
            ("v_cache", v_base),
        ] {
            ensure(p % 16 == 0, arg, || {
                format!("device pointer {p:#x} is not 16-byte aligned")
            })?;
        }
        ensure(
            (kv.page_stride as u64 * esz).is_multiple_of(16),
            "kv",
            || {
                format!(
                    "page_stride {} is not a multiple of 16 bytes",
                    kv.page_stride
                )
            },
        )?;
        self.workspace.check(self.layout.total)?;

        let ws = self.workspace.ptr();
        let page_div = fastdiv::fast_div_params(kv.page_size as u32);
        let sm_scale = cfg.params.scale(h.head_dim);
        let var = self
            .variant
            .params(self.dev.stream(), sm_scale, h.num_qo_heads)?;
        let mut params = DecodeParams {
            q: q.ptr(),
            k: k_cache.ptr(),
            v: v_base,
            kv_indices: kv_indices_ptr,
            work: ws + self.layout.work as u64,
            num_work: ws + self.layout.num_work as u64,
            o: o.ptr(),
            lse: lse.as_ref().map_or(0, |l| l.ptr()),
            partial_o: ws + self.layout.partial_o as u64,
            partial_lse: ws + self.layout.partial_lse as u64,
            counters: ws + self.layout.counters as u64,
            page_stride: kv.page_stride as i64,
            token_stride: kv.token_stride() as i64,
            head_stride: kv.head_stride() as i64,
            page_size: kv.page_size as i32,
            page_size_div_magic: page_div.0,
            page_size_div_shift: page_div.1,
            num_qo_heads: h.num_qo_heads as i32,
            sm_scale_log2: sm_scale * std::f32::consts::LOG2_E,
            lse_out_scale: cfg.params.lse_base.from_log2(1.0),
            softcap_in: var.softcap_in,
            softcap_out: var.softcap_out,
            alibi_slopes_log2: var.alibi_slopes_log2,
            sinks_log2: var.sinks_log2,
            kv_lens: var.kv_lens,
            rope_offsets: var.rope_offsets,
            rope_rcp_scale: var.rope_rcp_scale,
            rope_log2_theta: var.rope_log2_theta,
            num_inline: 0,
            inline_pad: 0,
            inline_work: [DecodeWork::EMPTY; INLINE_WORK],
        };
        let work = &self.schedule.work;
        if self.graph.is_none() && work.len() <= INLINE_WORK && inline_work_enabled() {
            params.num_inline = work.len() as i32;
            params.inline_work[..work.len()].copy_from_slice(work);
        }
        let launch_cfg = LaunchConfig {
            // One block per (work item, KV head), in the order decode_common.cuh describes. A
            // graph's launch is fixed while its plans change, so it takes heads fastest.
            grid: {
                let items = self.graph.map_or(self.schedule.work.len(), |g| g.max_work);
                if self.graph.is_some() || self.schedule.heads_fastest() {
                    ((items * h.num_kv_heads) as u32, 1, 1)
                } else {
                    (items as u32, h.num_kv_heads as u32, 1)
                }
            },
            block: self.tiles.block(),
            smem_bytes: self.tiles.smem_bytes() as u32,
        };
        let stream = self.dev.stream();
        let mut args = crate::kernel_args![&params];
        // SAFETY: params matches DecodeParams in decode_common.cuh; every pointer was checked
        // above to cover the shapes, the work list was written by plan() for this table, and the
        // partial buffers fit in the workspace (checked). The variant's tensors hold one entry
        // per query head and, for kv_lens and rope_offsets, per request of the plan
        // (decode/variant.rs); a kernel reads only those its variant compiles in, which
        // set_variant() uploaded or the plan did.
        unsafe { launch(self.decode_fn.raw(), launch_cfg, stream, &mut args)? };
        Ok(())
    }

    /// Validates the device copy of the page ids against the pool (a device-to-host copy and a
    /// sync: for tests and debug builds).
    pub fn check_kv_indices(&self, kv_indices: DevSlice<i32>, kv: &PagedKvDesc) -> Result<()> {
        ensure(
            kv_indices.len() >= self.kv_indices_len,
            "kv_indices",
            || {
                format!(
                    "has {} entries, the planned table has {}",
                    kv_indices.len(),
                    self.kv_indices_len
                )
            },
        )?;
        let mut host = vec![0i32; self.kv_indices_len];
        if host.is_empty() {
            return Ok(());
        }
        // SAFETY: kv_indices holds at least kv_indices_len entries (checked by the caller's run).
        unsafe {
            sys::cuMemcpyDtoHAsync_v2(
                host.as_mut_ptr() as *mut _,
                kv_indices.ptr(),
                host.len() * 4,
                self.dev.stream().cu_stream(),
            )
            .result()?;
        }
        self.dev.stream().synchronize()?;
        if let Some((i, p)) = host
            .iter()
            .enumerate()
            .find(|(_, &p)| p < 0 || p as usize >= kv.num_pages)
        {
            return Err(invalid(
                "kv_indices",
                format!(
                    "kv_indices[{i}] = {p} is outside the pool of {} pages",
                    kv.num_pages
                ),
            ));
        }
        Ok(())
    }
}

/// Decode of one request over contiguous K/V `[kv_len, num_kv_heads, head_dim]` (NHD).
///
/// Contiguous KV is the paged case with one page holding the whole request, so this plans and
/// runs the same kernel; the plan is redone each call (host work plus one small copy).
pub struct SingleDecode {
    inner: BatchDecode,
}

impl SingleDecode {
    pub fn new(dev: &Arc<Device>, cfg: DecodeConfig) -> Result<Self> {
        Ok(Self {
            inner: BatchDecode::new(dev, cfg)?,
        })
    }

    /// Attention variant of every later `run()`, as [`BatchDecode::set_variant`] (the query is
    /// at position `kv_len - 1`; `rope_offsets`, if given, has the one request's entry).
    pub fn set_variant(&mut self, variant: &Variant<'_>) -> Result<()> {
        self.inner.set_variant(variant)
    }

    /// `q`, `o`: `[num_qo_heads, head_dim]`; `k`, `v`: `[kv_len, num_kv_heads, head_dim]`;
    /// `lse`: `[num_qo_heads]`.
    #[allow(clippy::too_many_arguments)]
    pub fn run<Q: Element, KV: Element>(
        &mut self,
        q: DevSlice<Q>,
        k: DevSlice<KV>,
        v: DevSlice<KV>,
        kv_len: usize,
        o: DevSliceMut<Q>,
        lse: Option<DevSliceMut<f32>>,
    ) -> Result<()> {
        let h = self.inner.cfg.heads;
        let page = kv_len.max(1);
        let pages = usize::from(kv_len > 0);
        let table = PageTable::from_kv_lens(&[kv_len], page, &[0], pages)?;
        let desc = PagedKvDesc::new(
            crate::layout::KvLayout::Nhd,
            pages,
            page,
            h.num_kv_heads,
            h.head_dim,
        )?;
        ensure(k.len() == kv_len * h.num_kv_heads * h.head_dim, "k", || {
            format!(
                "has {} elements, expected kv_len {kv_len} x {} x {}",
                k.len(),
                h.num_kv_heads,
                h.head_dim
            )
        })?;
        ensure(v.len() == k.len(), "v", || {
            format!("has {} elements, expected {}", v.len(), k.len())
        })?;
        self.inner.plan(&table)?;
        self.inner.launch(q, k, v, &desc, 0, o, lse)
    }
}
