//! Where the prefill kernel's tile sizes are chosen, and its source generated.
//!
//! The kernel (kernels/prefill.cuh) runs WARPS_Q x WARPS_KV warps over a tile of CTA_Q packed query
//! rows (query token x head of the GQA group) and streams KV_TILE keys per pipeline stage. The
//! query tile follows the packed query length, as in the paper (section 3.2.2):
//!
//! | packed rows per request | CTA_Q | warps (q x kv) | rows per warp | why |
//! |---|---|---|---|---|
//! | > 64 (prompts) | 128 (64 at head_dim 256) | 4 x 1 | 32 (2 mma tiles) | each K/V fragment feeds two mma tiles; registers allow it up to head_dim 128 |
//! | 17..=64 | 64 | 4 x 1 | 16 | less padding for mid-size appends |
//! | <= 16 (short appends, speculative verification) | 16 | 1 x 2 | 16 | one tile of rows; two warps split 32-key stages, so four small blocks share an SM |
//!
//! Keys per stage: 64 (32 for the 64-row tile at head_dim 256, to keep two stages in 96 KB, and for
//! the 16-row tile).
//! Two stages of K and V plus the Q tile: 96 KB at CTA_Q 128 / head_dim 128, so two blocks share
//! an SM.
//!
//! On Hopper (sm_90a), more than 16 packed rows at head_dim 64 and 128 take the wgmma backend
//! instead, with a producer warpgroup that copies K/V for the computing ones
//! ([`PrefillTiles::warp_specialized`]): blocks of one, two or three computing warpgroups of 64
//! rows ([`wgmma_shape`]: the least padded time). Prompts take three (CTA_Q 192, 512 threads with
//! the producer, one block per SM, 160 registers per computing thread after `setmaxnreg`), with
//! four 64-key stages with intra-warpgroup overlap ([`PrefillTiles::intra_wg_overlap`]), or two
//! 128-key stages from [`LONG_PACKED_ROWS`] packed rows per request;
//! two warpgroups take 128-key stages, one warpgroup 64 (two blocks per SM). Variants that cannot
//! have a producer (RoPE, user query/key transforms) take [`PrefillTiles::without_producer`].
//! Those blocks are persistent ([`PrefillTiles::persistent`]): one per SM, claiming (item, head)
//! pairs from a counter, except in split plans and CUDA graphs. The measurements behind these
//! choices are in docs/perf-notes.md.

use crate::dtype::DType;
use crate::error::{invalid, Result};
use crate::jit::{Arch, KernelSpec};
use crate::user_variant::UserVariant;
use crate::variant::VariantFlags;

/// How keys are masked; part of the kernel specialisation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum PrefillMask {
    #[default]
    None,
    /// Bottom-right aligned causal mask.
    Causal,
    /// Per-request bit-packed masks.
    Custom,
}

impl PrefillMask {
    fn code(self) -> u32 {
        match self {
            PrefillMask::None => 0,
            PrefillMask::Causal => 1,
            PrefillMask::Custom => 2,
        }
    }
    fn key(self) -> &'static str {
        match self {
            PrefillMask::None => "nomask",
            PrefillMask::Causal => "causal",
            PrefillMask::Custom => "custom",
        }
    }
}

/// Template parameters of one prefill specialisation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PrefillTiles {
    pub head_dim: usize,
    pub group: usize,
    pub q_dtype: DType,
    pub kv_dtype: DType,
    pub paged: bool,
    pub mask: PrefillMask,
    pub warps_q: usize,
    pub warps_kv: usize,
    /// 16-row mma tiles per warp.
    pub m_tiles: usize,
    /// Keys per pipeline stage.
    pub kv_tile: usize,
    pub nstage: usize,
    /// Matmuls on Hopper's wgmma (warpgroups of 64 rows) instead of mma.sync.
    pub wgmma: bool,
    /// Attention variants compiled in.
    pub variant: VariantFlags,
    /// Prefetch into L2 the rows of the key tile after the one being copied. Pays where the keys
    /// are cold in L2 and every block's tile is long (a shared prefix read by all its group's
    /// row tiles: 131.2 -> 124.5 us at 64 x 32768); costs elsewhere (prompts -3 %, short appends
    /// over long caches -13 %: the extra requests compete with the copies). docs/perf-notes.md.
    pub l2_lookahead: bool,
    /// A user variant's identity (0: none); its source is given to [`PrefillTiles::spec_with`].
    pub user: u64,
    /// Warp specialisation (wgmma only): one more warpgroup copies K/V tiles and hands them to
    /// the computing warpgroups through mbarriers (and most of its registers, by setmaxnreg), instead of every thread copying and a block barrier per tile
    /// (kernels/pipeline.cuh). Not with RoPE or user query/key transforms, which rewrite each
    /// tile with every thread (see [`PrefillTiles::can_specialise_warps`]).
    pub warp_specialized: bool,
    /// Persistent blocks (with the producer warpgroup): one block per SM claims work items from a
    /// counter; the producer loads the next item's Q tile (two Q buffers) and K/V while the consumers finish
    /// this one, whose output they write from registers. [`PrefillTiles::choose`] takes them
    /// with the producer; never for a plan with split KV or a CUDA-graph op (the op turns them
    /// off there).
    pub persistent: bool,
    /// Intra-warpgroup overlap (with the producer warpgroup): each computing warpgroup issues
    /// one tile's QK^T with the previous tile's PV and runs the softmax behind both
    /// (kernels/prefill.cuh, PREFILL_OVERLAP). [`PrefillTiles::choose`] takes it for three
    /// warpgroups of 64-key stages, with four stages: a stage is held one step longer, so two
    /// stages, which [`PrefillTiles::check`] allows, starve the producer (two warpgroups of
    /// 128-key stages: 487.6 -> 340.2 TFLOP/s at 1 x 8192; docs/perf-notes.md, session 8).
    pub intra_wg_overlap: bool,
}

/// Head dims the prefill kernel is built for.
pub const HEAD_DIMS: [usize; 3] = [64, 128, 256];

/// The wgmma block shapes with a producer warpgroup: (warpgroups, keys per stage, stages,
/// throughput per useful row relative to the last). Three warpgroups (their 64-key stages take
/// intra-warpgroup overlap and four stages: `with_overlap_where_it_pays`) are the reference.
/// Two warpgroups of 128-key stages: 0.78, from the paged appends of session 11 (H200, causal,
/// page 16, µs, two against three warpgroups): 16 x 128 over 4096 (512 rows, three pad to 576)
/// 339.3 / 303.2 (0.782), 32 x 64 over 4096 (256 rows, three pad to 384) 343.4 / 398.1 (0.773).
/// One warpgroup per block (two blocks per SM) keeps the ratio to two that session 4 measured at
/// 1 x 8192 (408.7 against 484.2 TFLOP/s). (Session 4 had two at 484.2 / 503.5 of three, before
/// overlap, ping-pong and the slack sped three up more.)
const WGMMA_SHAPES: [(usize, usize, usize, f64); 3] = [
    (1, 64, 2, 0.78 * 408.7 / 484.2),
    (2, 128, 2, 0.78),
    (3, 64, 3, 1.0),
];

/// Packed rows per request from which three warpgroups take two 128-key stages instead of four
/// 64-key ones with intra-warpgroup overlap: fewer, longer copies and half the barrier round trips
/// per key, but a longer diagonal tile and pipeline fill, which shorter prompts feel. H200,
/// causal, µs, 128-key against 64-key with overlap (session 11, rescale slack on; persistent
/// both): 1 x 16384 (65536 rows) 3770.9 / 4118.7, 1 x 8192 (32768) 946.0 / 935.5 (two runs each;
/// session 8, before the slack: 570.2 / 569.9 TFLOP/s), 4 x 4096 (16384) 511.7 / 530.4 TFLOP/s,
/// 16 x 1024 (4096) 292.6 / 371.6 (docs/perf-notes.md).
pub const LONG_PACKED_ROWS: usize = 65536;

/// Warpgroups (64 rows each) per block, keys per stage and stages for requests of `packed_qo_len`
/// rows: the shape with the least time per request, counting the padding of its last tile.
/// Prompts take three; a group of 64 decode queries sharing a prefix (256 rows at GQA 4) takes
/// two (two full tiles beat two tiles of 192 with a third of them empty, and four tiles of 64).
pub fn wgmma_shape(packed_qo_len: usize) -> (usize, usize, usize) {
    let cost = |&(wg, _, _, eff): &(usize, usize, usize, f64)| {
        let rows = packed_qo_len.div_ceil(64 * wg) * 64 * wg;
        rows as f64 / eff
    };
    let (wg, kt, ns) = WGMMA_SHAPES
        .iter()
        .min_by(|a, b| cost(a).total_cmp(&cost(b)))
        .map_or((3, 64, 3), |&(wg, kt, ns, _)| (wg, kt, ns));
    if wg == 3 && packed_qo_len >= LONG_PACKED_ROWS {
        (3, 128, 2)
    } else {
        (wg, kt, ns)
    }
}

impl PrefillTiles {
    /// The specialisation for requests of `packed_qo_len` packed rows on average (`qo_len x group`)
    /// on a GPU of architecture `arch`.
    #[allow(clippy::too_many_arguments)]
    pub fn choose(
        head_dim: usize,
        group: usize,
        q_dtype: DType,
        kv_dtype: DType,
        paged: bool,
        mask: PrefillMask,
        packed_qo_len: usize,
        arch: Arch,
    ) -> Self {
        if arch >= Arch::SM90 && packed_qo_len > 16 && (head_dim == 64 || head_dim == 128) {
            let (wg, kv_tile, nstage) = wgmma_shape(packed_qo_len);
            // With a producer warpgroup: 1 x 8192 causal 415 -> 500 TFLOP/s at the same shape,
            // the cascade's shared level 124 -> 103 us. Persistent blocks that claim items
            // from a counter: 16 x 1024 315 -> 336, 1 x 8192 549 -> 567 (docs/perf-notes.md);
            // the op turns them off for split plans and CUDA graphs.
            let t = Self {
                warp_specialized: true,
                persistent: true,
                nstage,
                ..Self::wgmma(head_dim, group, q_dtype, paged, mask, wg, kv_tile)
            };
            return if overlap_allowed() {
                t.with_overlap_where_it_pays()
            } else {
                t
            };
        }
        Self::mma_sync(
            head_dim,
            group,
            q_dtype,
            kv_dtype,
            paged,
            mask,
            packed_qo_len,
        )
    }

    /// The Hopper backend: `warpgroups` x 64 rows per tile, `kv_tile` keys per stage.
    pub fn wgmma(
        head_dim: usize,
        group: usize,
        dtype: DType,
        paged: bool,
        mask: PrefillMask,
        warpgroups: usize,
        kv_tile: usize,
    ) -> Self {
        Self {
            head_dim,
            group,
            q_dtype: dtype,
            kv_dtype: dtype,
            paged,
            mask,
            warps_q: 4 * warpgroups,
            warps_kv: 1,
            m_tiles: 1,
            kv_tile,
            nstage: 2,
            wgmma: true,
            variant: VariantFlags::default(),
            l2_lookahead: false,
            user: 0,
            warp_specialized: false,
            persistent: false,
            intra_wg_overlap: false,
        }
    }

    /// The portable backend (mma.sync, sm_80 and newer), its query tile from the packed length.
    pub fn mma_sync(
        head_dim: usize,
        group: usize,
        q_dtype: DType,
        kv_dtype: DType,
        paged: bool,
        mask: PrefillMask,
        packed_qo_len: usize,
    ) -> Self {
        let (warps_q, warps_kv, m_tiles, kv_tile) = if packed_qo_len > 64 {
            if head_dim <= 128 {
                (4, 1, 2, 64)
            } else {
                (4, 1, 1, 32)
            }
        } else if packed_qo_len > 16 {
            (4, 1, 1, if head_dim <= 128 { 64 } else { 32 })
        } else {
            // Two warps splitting 32-key stages: 36 KB of shared memory, so four blocks share an
            // SM and hide the gather latency better than four warps on 64-key stages (measured
            // at 64 x 4096, one query: 266 vs 302 us; docs/perf-notes.md).
            (1, 2, 1, 32)
        };
        Self {
            head_dim,
            group,
            q_dtype,
            kv_dtype,
            paged,
            mask,
            warps_q,
            warps_kv,
            m_tiles,
            kv_tile,
            nstage: 2,
            wgmma: false,
            variant: VariantFlags::default(),
            l2_lookahead: false,
            user: 0,
            warp_specialized: false,
            persistent: false,
            intra_wg_overlap: false,
        }
    }

    /// Whether the kernel template can be built with these parameters (forced tiles come from
    /// users and benchmarks): a typed error naming what is wrong, before anything compiles.
    pub fn check(&self) -> Result<()> {
        let bad = |why: String| Err(invalid("tiles", format!("{}: {why}", self.name())));
        if !HEAD_DIMS.contains(&self.head_dim) {
            return bad(format!(
                "head_dim {} (expected 64, 128 or 256)",
                self.head_dim
            ));
        }
        if self.nstage < 2 || self.nstage > 8 {
            return bad(format!(
                "{} stages (the pipeline needs 2 to 8)",
                self.nstage
            ));
        }
        if self.warps_q == 0 || self.warps_kv == 0 || self.m_tiles == 0 {
            return bad("zero warps or m-tiles".into());
        }
        if self.threads() > 1024 {
            return bad(format!(
                "{} threads per block (at most 1024)",
                self.threads()
            ));
        }
        if self.kv_tile == 0
            || !(self.kv_tile / self.warps_kv).is_multiple_of(16)
            || !self.kv_tile.is_multiple_of(self.warps_kv)
        {
            return bad(format!(
                "{} keys per stage over {} warps (each warp takes a multiple of 16)",
                self.kv_tile, self.warps_kv
            ));
        }
        let chunks = self.head_dim / 8;
        let loaders = self.consumer_threads();
        if loaders < chunks || self.kv_tile.div_ceil(loaders / chunks) > chunks {
            return bad("too few threads to load a key tile (one lane resolves each pass)".into());
        }
        if self.persistent && !self.warp_specialized {
            return bad("persistent blocks need the producer warpgroup".into());
        }
        if self.intra_wg_overlap && !self.warp_specialized {
            return bad("intra-warpgroup overlap needs the producer warpgroup".into());
        }
        if self.warp_specialized && !self.wgmma {
            return bad("warp specialisation needs the wgmma backend".into());
        }
        if self.warp_specialized && !self.can_specialise_warps() {
            return bad("warp specialisation cannot rotate tiles (RoPE)".into());
        }
        if self.wgmma {
            if !(self.warps_q.is_multiple_of(4) && self.m_tiles == 1 && self.warps_kv == 1) {
                return bad("wgmma takes whole warpgroups of 64 rows (warps_q 4, 8 or 12)".into());
            }
            if !matches!(self.head_dim, 64 | 128) || !matches!(self.kv_tile, 64 | 128) {
                return bad("wgmma takes head_dim 64 or 128 and 64 or 128 keys per stage".into());
            }
        }
        Ok(())
    }

    /// Packed query rows per tile.
    pub fn cta_q(&self) -> usize {
        self.warps_q * 16 * self.m_tiles
    }
    /// Threads per block: the computing warps, and the producer warpgroup when warps are
    /// specialised.
    pub fn threads(&self) -> usize {
        self.consumer_threads() + if self.warp_specialized { 128 } else { 0 }
    }

    /// The threads that compute (and, without warp specialisation, also load).
    pub fn consumer_threads(&self) -> usize {
        32 * self.warps_q * self.warps_kv
    }

    /// The shape [`PrefillTiles::choose`] measured best without a producer warpgroup, for the
    /// variants that cannot have one: two 64-key stages (three warpgroups with 128-key stages, or
    /// three stages, need more registers or shared memory than the plain kernel has).
    pub fn without_producer(self) -> Self {
        if !self.warp_specialized {
            return self;
        }
        let kv_tile = if self.warps_q == 12 { 64 } else { self.kv_tile };
        Self {
            warp_specialized: false,
            persistent: false,
            intra_wg_overlap: false,
            kv_tile,
            nstage: 2,
            ..self
        }
    }

    /// Whether intra-warpgroup overlap pays on these tiles: three warpgroups of 64-key stages
    /// with the producer warpgroup (H200, causal, TFLOP/s: 16 x 1024 350.6 -> 371.6, 4 x 4096
    /// 511.7 -> 530.4 against the engine's shapes without it; docs/perf-notes.md, session 8).
    /// Not the 128-key shapes: three warpgroups spill there, two gain nothing.
    pub fn overlap_pays(&self) -> bool {
        self.warp_specialized && self.warps_q == 12 && self.kv_tile == 64
    }

    /// These tiles with intra-warpgroup overlap and the four stages it needs (a stage is held
    /// one step longer).
    pub fn with_intra_wg_overlap(self) -> Self {
        Self {
            intra_wg_overlap: true,
            nstage: 4,
            ..self
        }
    }

    /// These tiles with intra-warpgroup overlap where it pays ([`PrefillTiles::overlap_pays`]),
    /// unchanged elsewhere.
    fn with_overlap_where_it_pays(self) -> Self {
        if self.overlap_pays() {
            self.with_intra_wg_overlap()
        } else {
            self
        }
    }

    /// Whether persistent blocks pay for this shape and variant (`user`: the op's user variant).
    /// Not for three warpgroups of 128-key stages whose logits a variant transforms (soft cap,
    /// ALiBi, any user variant: the kernel's logits build): at 160 registers per consumer thread
    /// the persistent loop's state made those slower (1 x 8192, not persistent against
    /// persistent, session 5: soft cap 1361 against 1616 us, ALiBi 1070 against 1114; plain 983
    /// against 970; session 10, ALiBi diagonal first: 995 against 1026). Their 64-key stages
    /// (intra-warpgroup overlap) gain (session 11, not persistent against persistent, µs: ALiBi
    /// 1 x 8192 984.7 / 980.2, 4 x 4096 1064.2 / 1042.0, 16 x 1024 398.8 / 375.3; soft cap 4 x 4096
    /// 1195.3 / 1143.0, 16 x 1024 427.3 / 383.5, 16 x 128 over 4096 334.4 / 331.4). Two
    /// warpgroups have 232 registers and gain (16 x 128 over 4096: soft cap 379 -> 367 us, ALiBi
    /// 361 -> 353).
    /// Never with a user output transform: the persistent epilogue stages the output as 16-bit
    /// values, and the transform must see the f32 ones.
    pub fn persistent_pays(&self, user: Option<&UserVariant>) -> bool {
        if user.is_some_and(|u| u.output_transform.is_some()) {
            return false;
        }
        let logits = self.variant.soft_cap || self.variant.alibi || user.is_some();
        !(self.warps_q >= 12 && self.kv_tile >= 128 && logits)
    }

    /// Whether the backend and the built-in variants allow a producer warp: RoPE rewrites each
    /// tile in shared memory with every thread between its copy and its use (so do a user
    /// variant's query/key transforms, which the op checks: [`UserVariant::transforms_tiles`]).
    pub fn can_specialise_warps(&self) -> bool {
        self.wgmma && !self.variant.rope
    }

    /// Dynamic shared memory: Q tile and K/V stages, or the epilogue's f32 states if larger,
    /// plus 1 KB that the kernel may skip to align its tiles to 1024 bytes.
    pub fn smem_bytes(&self) -> usize {
        self.smem_used() + 1024
    }

    /// The bytes the kernel uses after aligning its base.
    fn smem_used(&self) -> usize {
        let e = self.kv_dtype.size_bytes();
        let q_buffers = if self.persistent { 2 } else { 1 };
        let main = q_buffers * self.cta_q() * self.head_dim * e
            + self.nstage * 2 * self.kv_tile * self.head_dim * e;
        // The f32 states of the epilogue reuse the tiles' bytes (persistent blocks write from
        // registers instead).
        let epilogue = if self.persistent {
            0
        } else {
            self.warps_kv * self.cta_q() * ((self.head_dim + 8) + 2) * 4
        };
        main.max(epilogue)
    }

    /// Registers per thread the block is compiled for: the mma.sync tiles use up to 255 (two
    /// 128-thread blocks per SM), the wgmma block is one per SM (65536 / 384 = 170, rounded down
    /// to ptxas's multiple of 8). A warp-specialised block starts from 128 per thread (one block
    /// of four warpgroups, or two of two, per SM); its producer then hands registers to the
    /// consumers (kernels/prefill.cuh, CONSUMER_REGS).
    fn regs_per_thread(&self) -> usize {
        if self.warp_specialized {
            128
        } else if self.wgmma {
            168
        } else {
            255
        }
    }

    /// Blocks of this kind one SM holds (shared memory, threads and registers; 1 KB reserved per
    /// block by the driver).
    pub fn ctas_per_sm(&self, smem_per_sm: usize) -> usize {
        // (+ 256: the kernel's static shared memory: barriers, flags.)
        let by_smem = smem_per_sm / (self.smem_bytes() + 1024 + 256);
        let by_threads = 2048 / self.threads();
        let by_regs = 65536 / (self.threads() * self.regs_per_thread().div_ceil(8) * 8);
        by_smem.min(by_threads).min(by_regs).max(1)
    }

    /// Split pieces one tile can merge: their LSEs live in the block's shared memory.
    pub fn max_pieces(&self) -> usize {
        self.smem_used() / (4 * self.cta_q())
    }

    /// Readable key naming every template parameter.
    pub fn name(&self) -> String {
        self.name_with(self.switches())
    }

    /// The environment's A/B switches as they apply to this specialisation, read once per name
    /// or spec so that a spec's name and source always agree.
    fn switches(&self) -> Switches {
        let reverse_kv = match std::env::var("FLASHINFER_PREFILL_REVERSE_KV").as_deref() {
            Ok("1") => true,
            Ok("0") => false,
            _ => self.variant.alibi,
        };
        Switches {
            pingpong: self.has_pingpong_warpgroups() && pingpong(),
            racecheck_shadow: self.persistent && racecheck_shadow(),
            reverse_kv,
            rescale_slack: rescale_slack(reverse_kv),
        }
    }

    /// Whether the kernel has warpgroups that can take turns at the tensor cores ([`pingpong`]):
    /// a producer warpgroup and at least two computing ones.
    fn has_pingpong_warpgroups(&self) -> bool {
        self.warp_specialized && self.warps_q >= 8
    }

    fn name_with(&self, sw: Switches) -> String {
        format!(
            "batch_prefill{}_{}_{}_q{}_kv{}_d{}_g{}_wq{}_wkv{}_m{}_kt{}_s{}{}{}{}{}{}{}{}{}{}",
            if self.wgmma { "_sm90" } else { "" },
            if self.paged { "paged" } else { "ragged" },
            self.mask.key(),
            self.q_dtype,
            self.kv_dtype,
            self.head_dim,
            self.group,
            self.warps_q,
            self.warps_kv,
            self.m_tiles,
            self.kv_tile,
            self.nstage,
            if self.l2_lookahead { "_la" } else { "" },
            if self.warp_specialized { "_ws" } else { "" },
            if self.persistent { "_p" } else { "" },
            if self.intra_wg_overlap { "_ov" } else { "" },
            // Ping-pong and the racecheck shadow are named only off their defaults. Every switch
            // that changes the source changes the name, so one process's kernels stay apart if
            // the environment changes between plans (the registry refuses two sources under one
            // name).
            if self.has_pingpong_warpgroups() && !sw.pingpong {
                "_nopp"
            } else {
                ""
            },
            if sw.racecheck_shadow { "_rs" } else { "" },
            if sw.reverse_kv { "_rv" } else { "" },
            match sw.rescale_slack {
                0 => String::new(),
                n => format!("_sl{n}"),
            },
            self.variant.key_suffix()
        )
    }

    pub fn spec(&self) -> KernelSpec {
        self.spec_with(None)
    }

    /// The specialisation with a user variant's hooks compiled in (its definitions go right
    /// before the kernel template; its key suffix names it and a digest of its source).
    pub fn spec_with(&self, user: Option<&UserVariant>) -> KernelSpec {
        let sw = self.switches();
        let name = match user {
            Some(u) => self.name_with(sw) + &u.key_suffix(),
            None => self.name_with(sw),
        };
        let spec = KernelSpec::new(name, self.source_with(sw, user), ["batch_prefill"]);
        if self.wgmma {
            spec.requires(Arch::SM90)
        } else {
            spec
        }
    }

    fn source_with(&self, sw: Switches, user: Option<&UserVariant>) -> String {
        format!(
            "#define L2_PREFETCH 1\n#define PREFILL_WGMMA {wg}\n#define PREFILL_WS {ws}\n#define PREFILL_PERSISTENT {pe}\n#define PREFILL_RACECHECK_SHADOW {rs}\n#define PREFILL_PINGPONG {pp}\n#define PREFILL_OVERLAP {ov}\n#define PREFILL_REVERSE_KV {rv}\n#define PREFILL_RESCALE_SLACK {sl}\n#define PREFILL_L2_LOOKAHEAD {la}\n{var}#include \"common.cuh\"\nusing DTypeQ = {q};\nusing DTypeKV = {kv};\n\
             using DTypeO = {q};\nconstexpr int HEAD_DIM = {d};\nconstexpr int GROUP = {g};\n\
             constexpr int WARPS_Q = {wq};\nconstexpr int WARPS_KV = {wkv};\nconstexpr int M_TILES = {m};\n\
             constexpr int KV_TILE = {kt};\nconstexpr int NSTAGE = {s};\nconstexpr bool PAGED = {paged};\n\
             constexpr int MASK_MODE = {mask};\n#define MIN_BLOCKS_PER_SM {mb}\n{user}#include \"prefill.cuh\"\n",
            q = self.q_dtype.cuda_type(),
            kv = self.kv_dtype.cuda_type(),
            d = self.head_dim,
            g = self.group,
            wq = self.warps_q,
            wkv = self.warps_kv,
            m = self.m_tiles,
            kt = self.kv_tile,
            s = self.nstage,
            paged = self.paged,
            mask = self.mask.code(),
            mb = self.ctas_per_sm(228 * 1024),
            wg = u32::from(self.wgmma),
            var = self.variant.defines(),
            la = u32::from(self.l2_lookahead),
            ws = u32::from(self.warp_specialized),
            pe = u32::from(self.persistent),
            // A debug aid for compute-sanitizer's racecheck (kernels/prefill.cuh): it changes the
            // source, so such kernels have their own cache entries.
            rs = u32::from(sw.racecheck_shadow),
            // The consumer warpgroups take turns issuing their QK^T GEMMs (see `pingpong`).
            pp = u32::from(sw.pingpong),
            ov = u32::from(self.intra_wg_overlap),
            rv = u32::from(sw.reverse_kv),
            sl = sw.rescale_slack,
            user = user.map_or(String::new(), |u| u.source()),
        )
    }
}

/// The A/B switches read from the environment (each function below says what it does).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Switches {
    /// Ping-pong between consumer warpgroups ([`pingpong`]), where the kernel has them.
    pingpong: bool,
    /// The racecheck shadow barriers ([`racecheck_shadow`]), in persistent kernels.
    racecheck_shadow: bool,
    /// Key tiles from the causal diagonal back (kernels/prefill.cuh, PREFILL_REVERSE_KV): on for
    /// ALiBi, whose logits grow toward the diagonal, so that the first tile sets every row's max
    /// and O is not rescaled at every tile. `FLASHINFER_PREFILL_REVERSE_KV=1` / `=0` turns it on
    /// / off for every kernel (A/B runs). Session 10, 1 x 8192 causal ALiBi: 1028.7 -> 994.5 us
    /// (plain: 963.2 -> 968.7, so plain keeps key order).
    reverse_kv: bool,
    /// [`rescale_slack`].
    rescale_slack: u32,
}

/// Whether the consumer warpgroups of producer-warpgroup kernels take turns issuing their QK^T
/// GEMMs (ping-pong, as FA3): on unless `FLASHINFER_PREFILL_PINGPONG=0`, which exists for A/B
/// runs (H200, session 6: +0.2 % at 1 x 8192, +1.6 % at 16 x 1024, +2.4 % on the paged append;
/// docs/perf-notes.md). It changes the source, so either setting has its own cache entries.
fn pingpong() -> bool {
    std::env::var("FLASHINFER_PREFILL_PINGPONG").map_or(true, |v| v != "0")
}

/// The softmax's rescale slack in log2 units (kernels/prefill.cuh, PREFILL_RESCALE_SLACK): 8,
/// which measured 1.9 % faster on 1 x 8192 plain prefill (963 -> 945 us; session 10, same run)
/// and 2.5 % with the soft cap (1114.8 -> 1087.4, session 11). None where key tiles are visited
/// diagonal first (`reverse_kv`, ALiBi): the first tile sets each row's max, so the slack saves
/// almost no rescale and its compare costs (1 x 8192 ALiBi 978.4 -> 972.8 us, session 11, two
/// pairs in one run). `FLASHINFER_PREFILL_RESCALE_SLACK=N` sets it for A/B runs (0: off). At
/// most 8: P can then reach 2^N and is stored as the KV type (f16 ends at 65504; 8 leaves wide
/// room under it).
const DEFAULT_RESCALE_SLACK: u32 = 8;
fn rescale_slack(reverse_kv: bool) -> u32 {
    let default = if reverse_kv { 0 } else { DEFAULT_RESCALE_SLACK };
    std::env::var("FLASHINFER_PREFILL_RESCALE_SLACK")
        .ok()
        .and_then(|v| v.parse().ok())
        .map_or(default, |n: u32| n.min(8))
}

/// Whether [`PrefillTiles::choose`] may take intra-warpgroup overlap: yes unless
/// `FLASHINFER_PREFILL_OVERLAP=0`, which exists for A/B runs.
fn overlap_allowed() -> bool {
    std::env::var("FLASHINFER_PREFILL_OVERLAP").map_or(true, |v| v != "0")
}

/// Whether persistent kernels repeat their mbarrier orderings as named barriers, which
/// compute-sanitizer's racecheck sees: `FLASHINFER_RACECHECK_SHADOW=1` or `0`, and by default
/// whenever the process runs under compute-sanitizer (its injection sets
/// `NV_SANITIZER_INJECTION_PORT_BASE`). Racecheck (CUDA 13.0) does not model the completion of
/// `cp.async` through `cp.async.mbarrier.arrive.noinc`: it reports the producer's Q copies and the
/// epilogue's stores into the same buffer as hazards although the `q_empty` mbarrier orders
/// them, and reports none once the same orderings are also named barriers (docs/perf-notes.md).
/// The copies also hide a broken mbarrier protocol from the other tools: run memcheck and
/// synccheck with `FLASHINFER_RACECHECK_SHADOW=0` as well.
fn racecheck_shadow() -> bool {
    match std::env::var("FLASHINFER_RACECHECK_SHADOW") {
        Ok(v) => v == "1",
        Err(_) => std::env::var_os("NV_SANITIZER_INJECTION_PORT_BASE").is_some(),
    }
}

/// Every prefill specialisation the compile-only tier checks: both dtypes, the three head dims,
/// the three tile shapes, paged and ragged, every mask, at common and odd GQA ratios.
pub(crate) fn specs() -> Vec<KernelSpec> {
    let mut v = Vec::new();
    for dt in [DType::F16, DType::BF16] {
        for d in HEAD_DIMS {
            for (g, paged, mask) in [
                (1, false, PrefillMask::Causal),
                (4, true, PrefillMask::Causal),
                (7, false, PrefillMask::None),
                (4, true, PrefillMask::Custom),
            ] {
                for packed in [8, 64, 1024] {
                    v.push(PrefillTiles::mma_sync(d, g, dt, dt, paged, mask, packed).spec());
                }
                if d <= 128 {
                    // Without a producer: the session-3 shapes (and what variants that cannot
                    // have one run). With it: the shapes `wgmma_shape` chooses, and the
                    // persistent blocks of the prompt shapes.
                    for (wg, kt) in [(1, 64), (2, 128), (3, 64)] {
                        v.push(PrefillTiles::wgmma(d, g, dt, paged, mask, wg, kt).spec());
                    }
                    for (wg, kt, ns) in [(1, 64, 2), (2, 128, 2), (3, 64, 3), (3, 128, 2)] {
                        let mut t = PrefillTiles::wgmma(d, g, dt, paged, mask, wg, kt);
                        t.warp_specialized = true;
                        t.nstage = ns;
                        t = t.with_overlap_where_it_pays();
                        v.push(t.spec());
                        t.persistent = true;
                        v.push(t.spec());
                    }
                }
            }
        }
    }
    // Every variant switch, alone and all together, on both backends.
    for flags in VariantFlags::singles()
        .into_iter()
        .chain([VariantFlags::all()])
    {
        let dt = DType::BF16;
        for mut t in [
            PrefillTiles::mma_sync(128, 4, dt, dt, true, PrefillMask::Causal, 1024),
            PrefillTiles::mma_sync(64, 4, dt, dt, false, PrefillMask::None, 8),
            PrefillTiles::wgmma(128, 4, dt, true, PrefillMask::Causal, 3, 64),
        ] {
            t.variant = flags;
            v.push(t.spec());
        }
        // The producer-warpgroup prompt shapes (long prompts: 128-key stages; shorter ones:
        // 64-key stages with intra-warpgroup overlap), persistent or not (128-key stages whose
        // logits a variant transforms are not: `persistent_pays`; forced tiles may still ask),
        // with every variant they can take.
        for kt in [128, 64] {
            let mut t = PrefillTiles::wgmma(128, 4, dt, true, PrefillMask::Causal, 3, kt);
            t.warp_specialized = true;
            t = t.with_overlap_where_it_pays();
            t.variant = flags;
            if t.can_specialise_warps() {
                v.push(t.spec());
                t.persistent = true;
                v.push(t.spec());
            }
        }
    }
    // The cascade's shared levels: the L2 look-ahead, on the shapes they choose (paged, no mask),
    // with and without the producer warpgroup (RoPE turns it off).
    for dt in [DType::F16, DType::BF16] {
        for (wg, kt, ns) in [(1, 64, 2), (2, 128, 2), (3, 64, 3)] {
            let mut t = PrefillTiles::wgmma(128, 4, dt, true, PrefillMask::None, wg, kt);
            t.l2_lookahead = true;
            v.push(t.without_producer().spec());
            t.warp_specialized = true;
            t.nstage = ns;
            t = t.with_overlap_where_it_pays();
            v.push(t.spec());
            t.persistent = true;
            v.push(t.spec());
        }
    }
    // Different packed lengths can choose the same tiles: one spec per name.
    v.sort_by(|a, b| a.name.cmp(&b.name));
    v.dedup_by(|a, b| a.name == b.name);
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The engine's tiles for bf16 causal prompts of `packed` rows, d128 at GQA 4, on sm_90.
    fn choose_bf16_prompt(packed: usize) -> PrefillTiles {
        let dt = DType::BF16;
        PrefillTiles::choose(
            128,
            4,
            dt,
            dt,
            false,
            PrefillMask::Causal,
            packed,
            Arch::SM90,
        )
    }

    #[test]
    fn every_source_switch_changes_the_kernel_name() {
        // The registry refuses two sources under one name, so a switch that changes the source
        // must change the name: over every combination, equal names <=> equal sources.
        let mut seen: Vec<(String, String)> = Vec::new();
        for packed in [256, 4096] {
            let tiles = choose_bf16_prompt(packed);
            assert!(tiles.warp_specialized && tiles.warps_q >= 8 && tiles.persistent);
            for bits in 0..16u32 {
                for rescale_slack in [0, 4, 8] {
                    let sw = Switches {
                        pingpong: bits & 1 != 0,
                        racecheck_shadow: bits & 2 != 0,
                        reverse_kv: bits & 4 != 0,
                        rescale_slack,
                    };
                    let alibi = bits & 8 != 0;
                    let t = PrefillTiles {
                        variant: VariantFlags {
                            alibi,
                            ..Default::default()
                        },
                        ..tiles
                    };
                    seen.push((t.name_with(sw), t.source_with(sw, None)));
                }
            }
        }
        for (i, a) in seen.iter().enumerate() {
            for b in &seen[i + 1..] {
                assert_eq!(a.0 == b.0, a.1 == b.1, "{} / {}", a.0, b.0);
            }
        }
    }

    #[test]
    fn prompts_take_persistent_blocks_unless_a_variant_transforms_logits_on_128_key_stages() {
        let choose = choose_bf16_prompt;
        let prompt = choose(4096);
        assert!(prompt.warp_specialized && prompt.persistent && prompt.warps_q == 12);
        // Prompts up to 1 x 8192 at GQA 4: 64-key stages with intra-warpgroup overlap, four of
        // them; longer ones: two 128-key stages without it.
        assert!(prompt.intra_wg_overlap && prompt.kv_tile == 64 && prompt.nstage == 4);
        let at_8192 = choose(8192 * 4);
        assert!(at_8192.intra_wg_overlap && at_8192.kv_tile == 64);
        let long = choose(LONG_PACKED_ROWS);
        assert!(!long.intra_wg_overlap && long.kv_tile == 128 && long.nstage == 2);
        assert!(prompt.persistent_pays(None) && long.persistent_pays(None));
        let mut user = UserVariant {
            name: "scaled".into(),
            use_softmax: true,
            ..Default::default()
        };
        let capped = PrefillTiles {
            variant: VariantFlags {
                soft_cap: true,
                ..Default::default()
            },
            ..prompt
        };
        // Logits variants: persistent on 64-key stages, not on 128-key ones (spills).
        assert!(prompt.persistent_pays(Some(&user)) && capped.persistent_pays(None));
        let long_capped = PrefillTiles {
            variant: capped.variant,
            ..long
        };
        assert!(!long.persistent_pays(Some(&user)) && !long_capped.persistent_pays(None));
        // Two warpgroups (a group of decode queries over a shared prefix) keep them.
        let two = PrefillTiles {
            variant: capped.variant,
            ..choose(256)
        };
        assert_eq!(two.warps_q, 8);
        assert!(two.persistent_pays(Some(&user)));
        // An output transform must see f32 outputs, which the persistent epilogue does not keep.
        user.output_transform = Some("return o;".into());
        assert!(!two.persistent_pays(Some(&user)));
        // No producer, no persistence.
        assert!(!prompt.without_producer().persistent);
    }

    #[test]
    fn alibi_goes_diagonal_first_without_slack() {
        // Assumes the A/B variables are unset, as in CI and a user's process.
        if std::env::var_os("FLASHINFER_PREFILL_RESCALE_SLACK").is_some()
            || std::env::var_os("FLASHINFER_PREFILL_REVERSE_KV").is_some()
        {
            return;
        }
        let plain = choose_bf16_prompt(4096);
        let alibi = PrefillTiles {
            variant: VariantFlags {
                alibi: true,
                ..Default::default()
            },
            ..plain
        };
        let (p, a) = (plain.switches(), alibi.switches());
        assert!(!p.reverse_kv && p.rescale_slack == DEFAULT_RESCALE_SLACK);
        assert!(a.reverse_kv && a.rescale_slack == 0);
        assert!(plain.name().ends_with("_sl8") && alibi.name().ends_with("_rv_alibi"));
    }

    #[test]
    fn tiles_fit_hopper() {
        for d in HEAD_DIMS {
            for packed in [1, 16, 17, 64, 65, 4096, 100_000] {
                for arch in [Arch::SM80, Arch::SM90] {
                    let t = PrefillTiles::choose(
                        d,
                        4,
                        DType::BF16,
                        DType::BF16,
                        true,
                        PrefillMask::Causal,
                        packed,
                        arch,
                    );
                    assert!(t.smem_bytes() <= 227 * 1024, "{t:?}");
                    assert_eq!(t.kv_tile % (16 * t.warps_kv), 0);
                    let rows_per_pass = t.threads() / (d / 8);
                    assert!(t.kv_tile.div_ceil(rows_per_pass) <= d / 8, "{t:?}");
                    assert!(t.max_pieces() >= 16);
                    assert!(t.ctas_per_sm(228 * 1024) >= 1);
                    assert_eq!(t.wgmma, arch == Arch::SM90 && packed > 16 && d <= 128);
                }
            }
        }
        let t = PrefillTiles::choose(
            128,
            4,
            DType::BF16,
            DType::BF16,
            false,
            PrefillMask::Causal,
            8192 * 4,
            Arch::SM80,
        );
        assert_eq!((t.cta_q(), t.kv_tile, t.smem_bytes()), (128, 64, 97 * 1024));
        assert_eq!(t.ctas_per_sm(228 * 1024), 2);
        let t = choose_bf16_prompt(8192 * 4);
        // Three computing warpgroups and the producer warpgroup.
        assert_eq!(
            (t.cta_q(), t.threads(), t.ctas_per_sm(228 * 1024)),
            (192, 512, 1)
        );
        assert!(t.warp_specialized && t.check().is_ok());
        // One warpgroup (and its producer) at two blocks per SM.
        let one = PrefillTiles {
            warp_specialized: true,
            ..PrefillTiles::wgmma(128, 4, DType::BF16, false, PrefillMask::Causal, 1, 64)
        };
        assert_eq!((one.threads(), one.ctas_per_sm(228 * 1024)), (256, 2));
        // No producer warpgroup for mma.sync or RoPE.
        let mut bad = PrefillTiles::mma_sync(
            128,
            4,
            DType::BF16,
            DType::BF16,
            false,
            PrefillMask::Causal,
            1024,
        );
        bad.warp_specialized = true;
        assert!(bad.check().is_err());
        let mut rope = t;
        rope.variant.rope = true;
        assert!(!rope.can_specialise_warps() && rope.check().is_err());
        // Shared-prefix groups of decode queries: whole tiles, the widest that fits.
        assert_eq!(wgmma_shape(256), (2, 128, 2));
        assert_eq!(wgmma_shape(64), (1, 64, 2));
        assert_eq!(wgmma_shape(8192 * 4), (3, 64, 3));
        assert_eq!(wgmma_shape(LONG_PACKED_ROWS), (3, 128, 2));
        assert_eq!(wgmma_shape(4096), (3, 64, 3));
        // Appends: three warpgroups from 384 rows (512: 16 x 128 queries at GQA 4).
        assert_eq!(wgmma_shape(512), (3, 64, 3));
        assert_eq!(wgmma_shape(128), (2, 128, 2));
    }
}
