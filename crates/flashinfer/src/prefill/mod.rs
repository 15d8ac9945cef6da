//! Batch prefill and append on ragged or paged KV, on tensor cores.
//!
//! `plan()` runs on the host from the request lengths: it picks the query tile from the packed
//! query length (prefill/tiles.rs), cuts every request into tiles, splits the keys of tiles when a
//! few long requests cannot fill the GPU, and copies the work list into the workspace in one
//! transfer. `run()` validates the device tensors and launches one kernel; split tiles are merged
//! inside it (kernels/prefill.cuh). [`BatchPrefill::for_cuda_graph`] (prefill/graph.rs) fixes the
//! kernel, grid and workspace for the largest step, so that `run()` is captured in a CUDA graph
//! once and each later `plan()` only rewrites the work list.
//!
//! Append (a few new tokens over a long cache: chunked prefill, speculative verification) is the
//! same op with `qo_len < kv_len` and the causal mask aligned bottom-right.

mod graph;
mod tiles;

pub use crate::plan::prefill::{
    plan_prefill, plan_prefill_into, PrefillRequest, PrefillSchedule, PrefillScratch, PrefillShape,
    PrefillWork, MIN_KV_CHUNK,
};
pub use crate::plan::prefill::{prefill_bounds, PrefillBounds};
pub use graph::{PrefillGraphKv, PrefillGraphLimits};
pub(crate) use tiles::specs;
pub use tiles::{PrefillMask, PrefillTiles, HEAD_DIMS};

use std::collections::HashMap;
use std::sync::Arc;

use cudarc::driver::CudaSlice;

use crate::cuda::{
    launch, DevSlice, DevSliceMut, Device, LaunchConfig, PlanItem, PlanLayout, Workspace,
};
use crate::decode::fast_div_params;
use crate::dtype::{DType, Element};
use crate::error::{ensure, invalid, Result};
use crate::jit::KernelFunction;
use crate::layout::{check_len, CustomMask, HeadConfig, PageTable, PagedKvDesc, Ragged};
use crate::params::AttentionParams;
use crate::user_variant::{no_softmax_lse_error, UserArgs, UserVariant};
use crate::variant::{Rope, Variant, VariantFlags};

// SAFETY: PrefillWork is repr(C) with fifteen i32 fields: no padding.
unsafe impl PlanItem for PrefillWork {}
// The kernel's struct has the same size (a static_assert in kernels/prefill.cuh).
const _: () = assert!(std::mem::size_of::<PrefillWork>() == 15 * 4);

/// Static configuration of a prefill op (one per model layer shape and mask kind).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PrefillConfig {
    pub heads: HeadConfig,
    pub q_dtype: DType,
    pub kv_dtype: DType,
    pub params: AttentionParams,
    pub mask: PrefillMask,
    /// Allow split-KV for batches too small to fill the GPU.
    pub allow_split: bool,
}

/// Where the keys of a batch live, as `plan()` sees them on the host.
#[derive(Clone, Copy, Debug)]
pub enum PrefillKv<'a> {
    /// Ragged K/V `[nnz_kv, num_kv_heads, head_dim]`, request i owning rows
    /// `kv_indptr[i]..kv_indptr[i+1]`.
    Ragged(&'a Ragged),
    /// A paged cache and its page table.
    Paged(&'a PageTable),
}

/// Parameter block of the kernel, laid out exactly as `PrefillParams` in kernels/prefill.cuh.
#[repr(C)]
#[derive(Clone, Copy)]
struct PrefillParams {
    q: u64,
    k: u64,
    v: u64,
    kv_indices: u64,
    mask: u64,
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
    num_kv_heads: i32,
    sm_scale_log2: f32,
    lse_out_scale: f32,
    softcap_in: f32,
    softcap_out: f32,
    window_left: i32,
    alibi_slopes_log2: u64,
    sinks_log2: u64,
    rope_offsets: u64,
    rope_rcp_scale: f32,
    rope_log2_theta: f32,
}

// The kernel static_asserts the same size: a field added on one side only fails to compile.
const _: () = assert!(std::mem::size_of::<PrefillParams>() == 192);

/// The variant of later plans and runs: what the kernel compiles in, its scalars, and the
/// per-head tensors (ALiBi slopes, then sinks, both times log2(e)) in device memory.
#[derive(Default)]
struct VariantState {
    flags: VariantFlags,
    soft_cap: f32,
    window_left: usize,
    /// `[2 * num_qo_heads]`: slopes, then sinks.
    per_head: Option<CudaSlice<f32>>,
    rope: Rope,
    /// RoPE: each request's first-key position (host copy for plan()'s checks, device copy for
    /// the kernel); `None`: all 0.
    rope_offsets: Option<(Vec<i32>, CudaSlice<i32>)>,
}

/// Where a plan of `work` items, `counters` split tiles and `partial` slots lives in the
/// workspace: one arrival counter per (split tile, KV head), a partial state per (slot, KV head,
/// tile row).
fn plan_layout(
    work: usize,
    counters: usize,
    partial: usize,
    tiles: &PrefillTiles,
    h: HeadConfig,
) -> PlanLayout {
    let rows = partial * h.num_kv_heads * tiles.cta_q();
    PlanLayout::new(
        work * std::mem::size_of::<PrefillWork>(),
        counters * h.num_kv_heads,
        rows * h.head_dim,
        rows,
    )
}

/// What the last `plan()` fixed, and `run()` checks the tensors against.
#[derive(Clone, Debug, Default)]
struct Planned {
    tiles: Option<PrefillTiles>,
    paged: bool,
    nnz_qo: usize,
    /// Ragged: rows of K/V; paged: entries of `kv_indices`.
    nnz_kv: usize,
    page_size: usize,
    mask_bytes: usize,
}

/// Buffers `plan()` reuses from step to step, so that planning allocates nothing once they have
/// grown: the requests it gives the planner, the planner's scratch, and the schedule of the next
/// plan, swapped with the current one once that plan has succeeded (a failed plan leaves the
/// current one whole, and drops what it took from here).
#[derive(Debug, Default)]
struct PlanBuffers {
    requests: Vec<PrefillRequest>,
    scratch: PrefillScratch,
    next: PrefillSchedule,
}

/// A planned batch prefill.
pub struct BatchPrefill {
    dev: Arc<Device>,
    cfg: PrefillConfig,
    kernels: HashMap<PrefillTiles, KernelFunction>,
    workspace: Workspace,
    schedule: PrefillSchedule,
    layout: PlanLayout,
    planned: Planned,
    plan_buffers: PlanBuffers,
    /// Forces a tile shape (benchmarks, batch-invariant mode); `None` lets `plan()` choose.
    forced_tiles: Option<PrefillTiles>,
    l2_lookahead: bool,
    /// Warp specialisation on (`Some(true)`), off, or the tiles' own choice (`None`).
    warp_specialize: Option<bool>,
    /// Persistent blocks on, off, or the tiles' own choice (`None`).
    persistent: Option<bool>,
    /// Batch-invariant mode's fixed split size.
    fixed_kv_chunk: Option<usize>,
    /// CUDA-graph mode: what is fixed at construction (prefill/graph.rs).
    graph: Option<graph::GraphShape>,
    variant: VariantState,
    /// A user-written variant (replaces the built-in ones while set) and its argument bytes.
    user: Option<UserState>,
}

struct UserState {
    variant: UserVariant,
    /// Identity in the kernel cache (from its source digest), never 0.
    id: u64,
    /// The kernel's `UserParams` argument.
    blob: Vec<u8>,
}

impl BatchPrefill {
    pub fn new(dev: &Arc<Device>, cfg: PrefillConfig) -> Result<Self> {
        let h = cfg.heads;
        ensure(HEAD_DIMS.contains(&h.head_dim), "head_dim", || {
            format!("{} is not one of {HEAD_DIMS:?}", h.head_dim)
        })?;
        for (arg, dt) in [("q_dtype", cfg.q_dtype), ("kv_dtype", cfg.kv_dtype)] {
            ensure(dt != DType::F32, arg, || "prefill takes f16 or bf16".into())?;
        }
        ensure(cfg.q_dtype == cfg.kv_dtype, "kv_dtype", || {
            format!(
                "{} differs from q_dtype {}; the tensor-core prefill takes one 16-bit type",
                cfg.kv_dtype, cfg.q_dtype
            )
        })?;
        let scale = cfg.params.scale(h.head_dim);
        ensure(scale.is_finite() && scale > 0.0, "params", || {
            format!("sm_scale {scale} must be finite and positive")
        })?;
        ensure(h.group_size() <= 64, "num_qo_heads", || {
            format!("GQA ratio {} is above the supported 64", h.group_size())
        })?;
        Ok(Self {
            dev: dev.clone(),
            cfg,
            kernels: HashMap::new(),
            workspace: Workspace::new(dev.stream(), 1 << 20)?,
            schedule: PrefillSchedule::default(),
            layout: PlanLayout::default(),
            planned: Planned::default(),
            plan_buffers: PlanBuffers::default(),
            forced_tiles: None,
            l2_lookahead: false,
            warp_specialize: None,
            persistent: None,
            fixed_kv_chunk: None,
            graph: None,
            variant: VariantState::default(),
            user: None,
        })
    }

    /// Uses `tiles` for every later plan (benchmarks compare shapes); they must match the
    /// configuration, and parameters the kernel cannot be built with are an error.
    pub fn force_tiles(&mut self, tiles: Option<PrefillTiles>) -> Result<()> {
        if let Some(t) = &tiles {
            self.check_forced(t)?;
        }
        self.forced_tiles = tiles;
        Ok(())
    }

    /// Forced tiles must be buildable and describe this op's configuration.
    fn check_forced(&self, t: &PrefillTiles) -> Result<()> {
        t.check()?;
        self.check_graph_tiles(t)?;
        self.check_matches_config(t)
    }

    /// Tiles (forced, or chosen for a plan) describe this op's configuration.
    fn check_matches_config(&self, t: &PrefillTiles) -> Result<()> {
        let (c, h) = (&self.cfg, self.cfg.heads);
        ensure(
            t.head_dim == h.head_dim
                && t.group == h.group_size()
                && t.q_dtype == c.q_dtype
                && t.kv_dtype == c.kv_dtype
                && t.mask == c.mask,
            "tiles",
            || {
                format!(
                    "{} does not match the configuration (head_dim {}, GQA group {}, {}/{}, mask {:?})",
                    t.name(),
                    h.head_dim,
                    h.group_size(),
                    c.q_dtype,
                    c.kv_dtype,
                    c.mask
                )
            },
        )
    }

    /// Prefetches each key tile into L2 one tile ahead of its copy (see
    /// [`PrefillTiles::l2_lookahead`]); for keys that are cold in L2 and shared by many row tiles,
    /// such as a cascade's shared prefix. Takes effect at the next `plan()`.
    pub fn set_l2_lookahead(&mut self, on: bool) {
        self.l2_lookahead = on;
    }

    /// Turns the wgmma kernel's producer warp (see [`PrefillTiles::warp_specialized`]) on or
    /// off, or leaves it to the tile choice (`None`). Where the kernel cannot take it (mma.sync,
    /// RoPE, user query/key transforms) it stays off. Takes effect at the next `plan()`.
    pub fn set_warp_specialization(&mut self, on: Option<bool>) {
        self.warp_specialize = on;
    }

    /// Turns persistent blocks (see [`PrefillTiles::persistent`]) on or off, or leaves them to
    /// the tile choice (`None`). They need the producer warpgroup, and a plan that splits KV or
    /// a CUDA-graph op never takes them. Takes effect at the next `plan()`.
    pub fn set_persistent(&mut self, on: Option<bool>) {
        self.persistent = on;
    }

    /// Batch-invariant mode: every later plan uses `tiles` and splits every tile's keys into
    /// chunks of `kv_chunk` (a multiple of `tiles.kv_tile`), so a request's result is the same, to
    /// the bit, whatever else is in the batch. `None` returns to the batch-dependent choice.
    pub fn set_batch_invariant(&mut self, mode: Option<(PrefillTiles, usize)>) -> Result<()> {
        match mode {
            Some((tiles, chunk)) => {
                self.check_forced(&tiles)?;
                ensure(
                    chunk > 0 && chunk.is_multiple_of(tiles.kv_tile),
                    "kv_chunk",
                    || {
                        format!(
                            "{chunk} is not a positive multiple of the tile's {} keys",
                            tiles.kv_tile
                        )
                    },
                )?;
                self.forced_tiles = Some(tiles);
                self.fixed_kv_chunk = Some(chunk);
            }
            None => {
                self.forced_tiles = None;
                self.fixed_kv_chunk = None;
            }
        }
        Ok(())
    }

    /// Attention variant of every later `plan()` and `run()`: RoPE (fused: q and each key tile are
    /// rotated in shared memory), logits soft cap, ALiBi, sliding window and sinks, in any
    /// combination (definitions in [`crate::variant`]; positions are aligned bottom-right, as the
    /// causal mask). The per-head slopes and sinks, and the RoPE offsets, are copied to the device
    /// here: offsets are per request, so a step whose batch changes calls this again (`plan()`
    /// checks that they cover its batch).
    pub fn set_variant(&mut self, variant: &Variant<'_>) -> Result<()> {
        let h = self.cfg.heads;
        // The batch is not known yet: plan() checks the offsets' length.
        variant.validate(&h, None)?;
        if let Some(o) = variant.rope_offsets {
            ensure(o.iter().all(|&x| x >= 0), "rope_offsets", || {
                "positions must be non-negative".into()
            })?;
        }
        if let Some(w) = variant.window_left {
            ensure(w < i32::MAX as usize, "window_left", || {
                format!("{w} exceeds i32::MAX")
            })?;
        }
        let flags = VariantFlags::of(variant);
        let per_head = if flags.alibi || flags.sinks {
            let log2e = std::f32::consts::LOG2_E;
            let mut host = vec![0f32; 2 * h.num_qo_heads];
            if let Some(s) = variant.alibi_slopes {
                for (d, &x) in host[..h.num_qo_heads].iter_mut().zip(s) {
                    *d = x * log2e;
                }
            }
            if let Some(s) = variant.sinks {
                for (d, &x) in host[h.num_qo_heads..].iter_mut().zip(s) {
                    *d = x * log2e;
                }
            }
            Some(self.dev.stream().clone_htod(&host)?)
        } else {
            None
        };
        let rope_offsets = match variant.rope_offsets {
            Some(o) if !o.is_empty() => Some((o.to_vec(), self.dev.stream().clone_htod(o)?)),
            _ => None,
        };
        self.user = None;
        self.variant = VariantState {
            flags,
            soft_cap: variant.logits_soft_cap.unwrap_or(0.0),
            window_left: variant.window_left.unwrap_or(0),
            per_head,
            rope: variant.rope.unwrap_or_default(),
            rope_offsets,
        };
        // The next plan() picks (and compiles) the variant's kernel.
        self.planned.tiles = None;
        Ok(())
    }

    /// A user-written variant for every later `plan()` and `run()` (see [`crate::user_variant`]):
    /// its hooks are compiled into the kernel at the next `plan()` (a compile error is returned
    /// there with NVRTC's log). It replaces the built-in variants; `set_variant` clears it.
    pub fn set_user_variant(&mut self, variant: UserVariant, args: UserArgs) -> Result<()> {
        variant.validate()?;
        variant.check_args(&args)?;
        let id = variant.digest();
        let blob = variant.params_blob(&args);
        self.variant = VariantState::default();
        self.user = Some(UserState { variant, id, blob });
        self.planned.tiles = None;
        Ok(())
    }

    /// New values for the current user variant's parameters (no recompilation).
    pub fn set_user_args(&mut self, args: UserArgs) -> Result<()> {
        let u = self
            .user
            .as_mut()
            .ok_or_else(|| invalid("user_args", "no user variant is set"))?;
        u.variant.check_args(&args)?;
        u.blob = u.variant.params_blob(&args);
        Ok(())
    }

    /// The current plan's schedule and kernel shape.
    pub fn schedule(&self) -> &PrefillSchedule {
        &self.schedule
    }
    pub fn tiles(&self) -> Option<PrefillTiles> {
        self.planned.tiles
    }
    /// Bytes of workspace the current plan needs.
    pub fn workspace_bytes(&self) -> usize {
        self.layout.total
    }

    fn kernel(&mut self, tiles: &PrefillTiles) -> Result<KernelFunction> {
        if let Some(f) = self.kernels.get(tiles) {
            return Ok(*f);
        }
        let spec = tiles.spec_with(self.user.as_ref().map(|u| &u.variant));
        let module = self.dev.module(&spec)?;
        module.set_max_dynamic_shared_bytes("batch_prefill", tiles.smem_bytes())?;
        let f = module.kernel("batch_prefill")?;
        self.kernels.insert(*tiles, f);
        Ok(f)
    }

    /// Compiles (or loads) the kernel this op would use for requests of `packed_qo_len` packed
    /// rows, so the first `plan()` of a serving loop does not pay for it.
    pub fn warmup(&mut self, paged: bool, packed_qo_len: usize) -> Result<()> {
        let t = self.choose_tiles(paged, packed_qo_len);
        self.kernel(&t).map(|_| ())
    }

    fn choose_tiles(&self, paged: bool, packed_qo_len: usize) -> PrefillTiles {
        let (c, h) = (&self.cfg, self.cfg.heads);
        let variant = self.variant.flags;
        let l2_lookahead = self.l2_lookahead;
        let user = self.user.as_ref().map_or(0, |u| u.id);
        // Graph mode's tiles are fixed at construction (forced ones have the same shape).
        let fixed = self.graph.map(|g| g.tiles).or(self.forced_tiles);
        let t = match fixed {
            Some(t) => PrefillTiles {
                paged,
                variant,
                l2_lookahead,
                user,
                ..t
            },
            None => PrefillTiles {
                variant,
                l2_lookahead,
                user,
                ..PrefillTiles::choose(
                    h.head_dim,
                    h.group_size(),
                    c.q_dtype,
                    c.kv_dtype,
                    paged,
                    c.mask,
                    packed_qo_len,
                    self.dev.arch(),
                )
            },
        };
        let allowed = t.can_specialise_warps()
            && !self
                .user
                .as_ref()
                .is_some_and(|u| u.variant.transforms_tiles());
        let on = allowed && self.warp_specialize.unwrap_or(t.warp_specialized);
        // Chosen tiles take persistent blocks where they pay; forced ones keep their flag.
        let persistent = t.persistent
            && (fixed.is_some() || t.persistent_pays(self.user.as_ref().map(|u| &u.variant)));
        match (on, fixed) {
            (true, _) => PrefillTiles {
                warp_specialized: true,
                persistent: self.graph.is_none() && self.persistent.unwrap_or(persistent),
                ..t
            },
            // Fixed tiles keep their shape; chosen ones fall back to the best shape without a
            // producer warpgroup.
            (false, Some(_)) => PrefillTiles {
                warp_specialized: false,
                persistent: false,
                intra_wg_overlap: false,
                ..t
            },
            (false, None) => t.without_producer(),
        }
    }

    /// What the planner needs besides the requests, for kernel `tiles` on this GPU (CUDA-graph
    /// mode sizes its grid with the same shape).
    fn plan_shape(&self, tiles: &PrefillTiles) -> PrefillShape {
        let (cfg, h) = (&self.cfg, self.cfg.heads);
        let info = self.dev.info();
        PrefillShape {
            group: h.group_size(),
            cta_q: tiles.cta_q(),
            kv_tile: tiles.kv_tile,
            causal: cfg.mask == PrefillMask::Causal,
            num_kv_heads: h.num_kv_heads,
            wave: info.sm_count * tiles.ctas_per_sm(info.smem_per_sm),
            max_pieces: tiles.max_pieces(),
            // Without a softmax, pieces are plain sums, not states the merge could weigh.
            allow_split: cfg.allow_split
                && self.user.as_ref().is_none_or(|u| u.variant.use_softmax),
            fixed_kv_chunk: self.fixed_kv_chunk,
        }
    }

    /// Plans a step: `qo_indptr` over the rows of `q`, `kv` the keys, `mask` the custom masks
    /// when the op was configured with [`PrefillMask::Custom`] (its host copy: offsets and
    /// lengths are checked against the batch).
    pub fn plan(
        &mut self,
        qo_indptr: &Ragged,
        kv: PrefillKv<'_>,
        mask: Option<&CustomMask>,
    ) -> Result<()> {
        let (cfg, h) = (self.cfg, self.cfg.heads);
        let batch = qo_indptr.batch_size();
        let (kv_lens, paged, nnz_kv, page_size) = match kv {
            PrefillKv::Ragged(r) => {
                ensure(r.batch_size() == batch, "kv_indptr", || {
                    format!("has {} requests, qo_indptr has {batch}", r.batch_size())
                })?;
                (r.lens(), false, r.total(), 0)
            }
            PrefillKv::Paged(t) => {
                ensure(t.batch_size() == batch, "kv_indptr", || {
                    format!(
                        "the page table has {} requests, qo_indptr has {batch}",
                        t.batch_size()
                    )
                })?;
                (t.kv_lens(), true, t.kv_indices().len(), t.page_size())
            }
        };
        for (arg, total) in [("qo_indptr", qo_indptr.total()), ("kv_indptr", nnz_kv)] {
            ensure(total < i32::MAX as usize / 64, arg, || {
                format!("{total} rows is too many for one batch")
            })?;
        }
        ensure(
            kv_lens.iter().all(|&l| l < i32::MAX as usize / 2),
            "kv_indptr",
            || "a request is too long".into(),
        )?;
        if let Some((offsets, _)) = &self.variant.rope_offsets {
            ensure(offsets.len() == batch, "rope_offsets", || {
                format!(
                    "has {} entries, the batch has {batch} requests (call set_variant for this step)",
                    offsets.len()
                )
            })?;
            ensure(
                offsets
                    .iter()
                    .zip(&kv_lens)
                    .all(|(&o, &l)| (o as usize) + l < i32::MAX as usize),
                "rope_offsets",
                || "a position exceeds i32::MAX".into(),
            )?;
        }
        let mask_bytes = match (cfg.mask, mask) {
            (PrefillMask::Custom, Some(m)) => {
                ensure(m.batch_size() == batch, "mask", || {
                    format!("covers {} requests, the batch has {batch}", m.batch_size())
                })?;
                for (i, &kv_len) in kv_lens.iter().enumerate() {
                    ensure(
                        m.qo_lens()[i] == qo_indptr.len(i) && m.kv_lens()[i] == kv_len,
                        "mask",
                        || {
                            format!(
                                "request {i} is {} x {}, the batch has qo_len {} x kv_len {}",
                                m.qo_lens()[i],
                                m.kv_lens()[i],
                                qo_indptr.len(i),
                                kv_len
                            )
                        },
                    )?;
                }
                m.bits().len()
            }
            (PrefillMask::Custom, None) => {
                return Err(invalid(
                    "mask",
                    "the op was configured for custom masks; pass one",
                ))
            }
            (_, Some(_)) => {
                return Err(invalid(
                    "mask",
                    "given, but the op was not configured with PrefillMask::Custom",
                ))
            }
            (_, None) => 0,
        };

        let packed_avg = (qo_indptr.total() * h.group_size())
            .checked_div(batch)
            .unwrap_or(0);
        let tiles = self.choose_tiles(paged, packed_avg);
        self.check_matches_config(&tiles)?;
        let mut requests = std::mem::take(&mut self.plan_buffers.requests);
        requests.clear();
        requests.extend((0..batch).map(|i| PrefillRequest {
            qo_len: qo_indptr.len(i),
            kv_len: kv_lens[i],
            q_start: qo_indptr.start(i),
            kv_offset: match kv {
                PrefillKv::Ragged(r) => r.start(i),
                PrefillKv::Paged(_) => 0,
            },
            page_begin: match kv {
                PrefillKv::Ragged(_) => 0,
                PrefillKv::Paged(t) => t.kv_indptr()[i] as usize,
            },
            mask_offset: mask.map_or(0, |m| m.mask_indptr()[i] as usize),
        }));
        // The planner sees the non-persistent block (its split merge bounds the pieces); a plan
        // that splits runs it.
        // (A graph op plans with the shape it was sized for: turning the producer off, e.g. for
        // RoPE, changes the blocks per SM but not its fixed grid.)
        let shape = self.plan_shape(&PrefillTiles {
            persistent: false,
            ..self.graph.map_or(tiles, |g| g.tiles)
        });
        if let Some(chunk) = self.fixed_kv_chunk {
            let longest = kv_lens.iter().copied().max().unwrap_or(0);
            ensure(
                longest.div_ceil(chunk) <= shape.max_pieces,
                "kv_chunk",
                || {
                    format!(
                        "{chunk} cuts a {longest}-key request into more than the {} pieces one \
                     merge holds",
                        shape.max_pieces
                    )
                },
            )?;
        }
        let mut s = std::mem::take(&mut self.plan_buffers.next);
        plan_prefill_into(&requests, &shape, &mut self.plan_buffers.scratch, &mut s);
        self.plan_buffers.requests = requests;
        let tiles = PrefillTiles {
            // Not with split KV (the merge reuses stage memory), nor in batch-invariant mode: there
            // a request's bits must not depend on whether another request of the batch splits.
            persistent: tiles.persistent && s.num_partial == 0 && self.fixed_kv_chunk.is_none(),
            ..tiles
        };
        ensure(
            // (Half the range: persistent blocks count claims up to pairs + grid in an i32.)
            s.work.len() * h.num_kv_heads < i32::MAX as usize / 2,
            "qo_indptr",
            || "the batch needs more blocks than one launch allows".into(),
        )?;
        // Graph mode: the step must fit what the captured launch was sized for.
        self.check_graph_step(
            batch,
            qo_indptr.total(),
            paged,
            nnz_kv,
            page_size,
            mask_bytes,
            &s,
        )?;
        self.kernel(&tiles)?;
        let l = match self.graph {
            // The layout (and the workspace) of graph mode never move.
            Some(_) => self.layout,
            None => {
                // Persistent blocks claim their items from counter 0 (they never split, so it
                // is free).
                let counters = s.num_counters.max(usize::from(tiles.persistent));
                let l = plan_layout(s.work.len(), counters, s.num_partial, &tiles, h);
                if l.total > self.workspace.bytes() {
                    self.workspace =
                        Workspace::new(self.dev.stream(), l.total.next_power_of_two())?;
                }
                l
            }
        };
        // The item count, the work list and the zeroed counters, in one transfer.
        self.workspace.upload_plan(self.dev.stream(), &l, &s.work)?;
        self.plan_buffers.next = std::mem::replace(&mut self.schedule, s);
        self.layout = l;
        self.planned = Planned {
            tiles: Some(tiles),
            paged,
            nnz_qo: qo_indptr.total(),
            nnz_kv,
            page_size,
            mask_bytes,
        };
        Ok(())
    }

    /// Runs a step planned with [`PrefillKv::Ragged`]: `q`, `o` `[nnz_qo, num_qo_heads,
    /// head_dim]`, `k`, `v` `[nnz_kv, num_kv_heads, head_dim]`, `lse` `[nnz_qo, num_qo_heads]`,
    /// `mask` the device copy of the custom mask's bits.
    #[allow(clippy::too_many_arguments)]
    pub fn run_ragged<T: Element>(
        &self,
        q: DevSlice<T>,
        k: DevSlice<T>,
        v: DevSlice<T>,
        o: DevSliceMut<T>,
        lse: Option<DevSliceMut<f32>>,
        mask: Option<DevSlice<u8>>,
    ) -> Result<()> {
        ensure(!self.planned.paged, "self", || {
            "planned for paged KV; call run_paged".into()
        })?;
        let h = self.cfg.heads;
        let rows = self.run_kv_len();
        check_len(
            "k",
            k.len(),
            rows * h.num_kv_heads * h.head_dim,
            "[nnz_kv, num_kv_heads, head_dim]",
        )?;
        check_len(
            "v",
            v.len(),
            rows * h.num_kv_heads * h.head_dim,
            "[nnz_kv, num_kv_heads, head_dim]",
        )?;
        let kv = KvAddressing {
            k: k.ptr(),
            v: v.ptr(),
            kv_indices: 0,
            page_stride: 0,
            token_stride: (h.num_kv_heads * h.head_dim) as i64,
            head_stride: h.head_dim as i64,
            page_size: (rows.max(1)) as u32,
        };
        self.launch(q, kv, o, lse, mask)
    }

    /// Runs a step planned with [`PrefillKv::Paged`]: `k_cache`/`v_cache` the pool described by
    /// `kv` (the same slice twice for a combined `[pages, 2, ...]` tensor), `kv_indices` the
    /// device copy of the table's page ids; the rest as [`BatchPrefill::run_ragged`].
    #[allow(clippy::too_many_arguments)]
    pub fn run_paged<T: Element>(
        &self,
        q: DevSlice<T>,
        k_cache: DevSlice<T>,
        v_cache: DevSlice<T>,
        kv: &PagedKvDesc,
        kv_indices: DevSlice<i32>,
        o: DevSliceMut<T>,
        lse: Option<DevSliceMut<f32>>,
        mask: Option<DevSlice<u8>>,
    ) -> Result<()> {
        let h = self.cfg.heads;
        ensure(self.planned.paged, "self", || {
            "planned for ragged KV; call run_ragged".into()
        })?;
        ensure(kv.page_size == self.planned.page_size, "kv", || {
            format!(
                "page_size {} differs from the planned table's {}",
                kv.page_size, self.planned.page_size
            )
        })?;
        ensure(
            kv.num_kv_heads == h.num_kv_heads && kv.head_dim == h.head_dim,
            "kv",
            || {
                format!(
                    "has {} KV heads of dim {}, configured {} of dim {}",
                    kv.num_kv_heads, kv.head_dim, h.num_kv_heads, h.head_dim
                )
            },
        )?;
        ensure(kv.page_size <= i32::MAX as usize, "kv", || {
            format!("page_size {} exceeds i32::MAX", kv.page_size)
        })?;
        kv.check_buffers(k_cache.len(), v_cache.len())?;
        ensure(kv_indices.len() >= self.run_kv_len(), "kv_indices", || {
            format!(
                "has {} entries, the plan needs {}",
                kv_indices.len(),
                self.run_kv_len()
            )
        })?;
        let esz = T::DTYPE.size_bytes() as u64;
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
        let addressing = KvAddressing {
            k: k_cache.ptr(),
            v: v_cache.ptr() + kv.v_offset.unwrap_or(0) as u64 * esz,
            kv_indices: kv_indices.ptr(),
            page_stride: kv.page_stride as i64,
            token_stride: kv.token_stride() as i64,
            head_stride: kv.head_stride() as i64,
            page_size: kv.page_size as u32,
        };
        self.launch(q, addressing, o, lse, mask)
    }

    fn launch<T: Element>(
        &self,
        q: DevSlice<T>,
        kv: KvAddressing,
        o: DevSliceMut<T>,
        lse: Option<DevSliceMut<f32>>,
        mask: Option<DevSlice<u8>>,
    ) -> Result<()> {
        let (cfg, h) = (&self.cfg, self.cfg.heads);
        let tiles = self
            .planned
            .tiles
            .ok_or_else(|| invalid("self", "run() called before plan()"))?;
        ensure(T::DTYPE == cfg.q_dtype, "q", || {
            format!("is {}, configured {}", T::DTYPE, cfg.q_dtype)
        })?;
        let n = self.run_qo_rows();
        check_len(
            "q",
            q.len(),
            n * h.num_qo_heads * h.head_dim,
            "[nnz_qo, num_qo_heads, head_dim]",
        )?;
        check_len(
            "o",
            o.len(),
            n * h.num_qo_heads * h.head_dim,
            "[nnz_qo, num_qo_heads, head_dim]",
        )?;
        if let Some(u) = self.user.as_ref().filter(|u| !u.variant.use_softmax) {
            if lse.is_some() {
                return Err(no_softmax_lse_error(&u.variant.name));
            }
        }
        if let Some(l) = &lse {
            check_len("lse", l.len(), n * h.num_qo_heads, "[nnz_qo, num_qo_heads]")?;
        }
        let mask_ptr = match (cfg.mask, &mask) {
            (PrefillMask::Custom, Some(m)) => {
                ensure(m.len() >= self.run_mask_bytes(), "mask", || {
                    format!(
                        "has {} bytes, the planned mask has {}",
                        m.len(),
                        self.run_mask_bytes()
                    )
                })?;
                m.ptr()
            }
            (PrefillMask::Custom, None) => {
                return Err(invalid("mask", "the op uses custom masks; pass the bits"))
            }
            (_, Some(_)) => return Err(invalid("mask", "given to an op without custom masks")),
            (_, None) => 0,
        };
        for (arg, p) in [("q", q.ptr()), ("o", o.ptr()), ("k", kv.k), ("v", kv.v)] {
            ensure(p % 16 == 0, arg, || {
                format!("device pointer {p:#x} is not 16-byte aligned")
            })?;
        }
        self.workspace.check(self.layout.total)?;
        // Graph mode launches its fixed grid even for an empty step: the capture must hold the
        // launch that later steps' replays need.
        let num_work = self.grid_items();
        if num_work == 0 {
            return Ok(()); // no query rows
        }
        let ws = self.workspace.ptr();
        let div = fast_div_params(kv.page_size);
        // The per-head tensors: slopes, then sinks (null pointers for a plain kernel).
        let (alibi_slopes_log2, sinks_log2) = self.variant.per_head.as_ref().map_or((0, 0), |b| {
            let base = DevSlice::new(b, self.dev.stream()).ptr();
            (base, base + (h.num_qo_heads * 4) as u64)
        });
        let params = PrefillParams {
            q: q.ptr(),
            k: kv.k,
            v: kv.v,
            kv_indices: kv.kv_indices,
            mask: mask_ptr,
            work: ws + self.layout.work as u64,
            num_work: ws + self.layout.num_work as u64,
            o: o.ptr(),
            lse: lse.as_ref().map_or(0, |l| l.ptr()),
            partial_o: ws + self.layout.partial_o as u64,
            partial_lse: ws + self.layout.partial_lse as u64,
            counters: ws + self.layout.counters as u64,
            page_stride: kv.page_stride,
            token_stride: kv.token_stride,
            head_stride: kv.head_stride,
            page_size: kv.page_size as i32,
            page_size_div_magic: div.0,
            page_size_div_shift: div.1,
            num_qo_heads: h.num_qo_heads as i32,
            num_kv_heads: h.num_kv_heads as i32,
            sm_scale_log2: cfg.params.scale(h.head_dim) * std::f32::consts::LOG2_E,
            lse_out_scale: cfg.params.lse_base.from_log2(1.0),
            softcap_in: if self.variant.flags.soft_cap {
                cfg.params.scale(h.head_dim) / self.variant.soft_cap
            } else {
                0.0
            },
            softcap_out: self.variant.soft_cap * std::f32::consts::LOG2_E,
            window_left: self.variant.window_left as i32,
            alibi_slopes_log2,
            sinks_log2,
            rope_offsets: self
                .variant
                .rope_offsets
                .as_ref()
                .map_or(0, |(_, d)| DevSlice::new(d, self.dev.stream()).ptr()),
            rope_rcp_scale: 1.0 / self.variant.rope.scale,
            rope_log2_theta: self.variant.rope.theta.log2(),
        };
        let f = self
            .kernels
            .get(&tiles)
            .ok_or_else(|| invalid("self", "the planned kernel is not loaded"))?;
        // Persistent blocks: one wave of them walks all (item, head) pairs.
        let blocks = num_work * h.num_kv_heads;
        let blocks = if tiles.persistent {
            let info = self.dev.info();
            blocks.min(info.sm_count * tiles.ctas_per_sm(info.smem_per_sm))
        } else {
            blocks
        };
        let launch_cfg = LaunchConfig {
            grid: (blocks as u32, 1, 1),
            block: (tiles.threads() as u32, 1, 1),
            smem_bytes: tiles.smem_bytes() as u32,
        };
        // A user variant's kernel takes its UserParams bytes as a second argument.
        let [params_arg] = crate::kernel_args![&params];
        let (mut args, num_args) = match &self.user {
            Some(u) => ([params_arg, u.blob.as_ptr() as *mut std::ffi::c_void], 2),
            None => ([params_arg, std::ptr::null_mut()], 1),
        };
        // SAFETY: params matches PrefillParams in prefill.cuh (and a user variant's blob its
        // UserParams, sized by the same declaration that generated the struct); q/o/lse/k/v/
        // kv_indices/mask were checked above against the planned shapes, the work list in the
        // workspace was written by plan() for them, and the workspace holds the plan's partial
        // states (checked).
        unsafe {
            launch(
                f.raw(),
                launch_cfg,
                self.dev.stream(),
                &mut args[..num_args],
            )?
        };
        Ok(())
    }
}

/// How the kernel reaches keys: base pointers and strides in elements.
#[derive(Clone, Copy, Debug)]
struct KvAddressing {
    k: u64,
    v: u64,
    kv_indices: u64,
    page_stride: i64,
    token_stride: i64,
    head_stride: i64,
    page_size: u32,
}

/// Prefill of one request over contiguous K/V `[kv_len, num_kv_heads, head_dim]`: the ragged op
/// with a batch of one.
pub struct SinglePrefill {
    inner: BatchPrefill,
}

impl SinglePrefill {
    pub fn new(dev: &Arc<Device>, cfg: PrefillConfig) -> Result<Self> {
        Ok(Self {
            inner: BatchPrefill::new(dev, cfg)?,
        })
    }

    /// `q`, `o`: `[qo_len, num_qo_heads, head_dim]`; `k`, `v`: `[kv_len, num_kv_heads,
    /// head_dim]`; `lse`: `[qo_len, num_qo_heads]`; `mask` as for [`BatchPrefill::plan`] and its
    /// device bits.
    #[allow(clippy::too_many_arguments)]
    pub fn run<T: Element>(
        &mut self,
        q: DevSlice<T>,
        k: DevSlice<T>,
        v: DevSlice<T>,
        qo_len: usize,
        kv_len: usize,
        o: DevSliceMut<T>,
        lse: Option<DevSliceMut<f32>>,
        mask: Option<(&CustomMask, DevSlice<u8>)>,
    ) -> Result<()> {
        let qo = Ragged::from_lens(&[qo_len]);
        let kv = Ragged::from_lens(&[kv_len]);
        self.inner
            .plan(&qo, PrefillKv::Ragged(&kv), mask.map(|m| m.0))?;
        self.inner.run_ragged(q, k, v, o, lse, mask.map(|m| m.1))
    }
}
