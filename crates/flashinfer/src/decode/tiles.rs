//! Where the decode kernel's tile sizes are chosen, and its source generated.
//!
//! The CUDA-core kernel (kernels/decode.cuh) runs BDX = head_dim / 8 lanes per query head (16-byte
//! vectors of KV), GROUP query heads per KV head, and BDZ token slots, and streams TILE tokens of K
//! and V per pipeline stage. Decode is bound by reading KV, so the choices aim at (1) enough bytes
//! in flight per SM to cover HBM latency (a few tens of KB: stages × tile bytes × CTAs per SM) and
//! (2) a block of about 128 threads so that several CTAs share an SM. The measurements behind these
//! numbers are in docs/perf-notes.md.

use crate::dtype::DType;
use crate::jit::{Arch, KernelSpec};
use crate::variant::VariantFlags;

/// Which kernel a decode specialisation runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DecodePath {
    /// kernels/decode.cuh: CUDA cores, one lane group per query head.
    Simt,
    /// kernels/decode_tc.cuh: tensor cores, the GROUP query heads as rows of one mma tile.
    TensorCore,
}

/// Template parameters of one decode specialisation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct DecodeTiles {
    pub path: DecodePath,
    pub head_dim: usize,
    pub group: usize,
    pub q_dtype: DType,
    pub kv_dtype: DType,
    /// Token slots (independent softmax states) per block.
    pub bdz: usize,
    /// Simt: row-load passes per tile, TILE = group * bdz * passes.
    /// TensorCore: 16-token k-steps per warp per tile, TILE = 4 warps * 16 * passes.
    pub passes: usize,
    /// cp.async pipeline depth.
    pub nstage: usize,
    /// Ask L2 to prefetch 256 bytes around each copy (`cp.async ... .L2::256B`): on for the
    /// block-wide loaders, off with the producer warp (`with_producer_warp`).
    pub l2_prefetch: bool,
    /// Attention variants compiled in: RoPE, soft cap, ALiBi, sinks. Set by `BatchDecode::set_variant`;
    /// a sliding window is planned, not compiled (decode/variant.rs), so `window` stays false.
    pub variant: VariantFlags,
    /// Tensor-core path on sm_90: a fifth warp copies the tiles (cp.async onto mbarriers),
    /// and the four computing warps never wait at a block barrier (kernels/decode_tc.cuh,
    /// DECODE_WS). Set through [`DecodeTiles::with_producer_warp`], which also sizes its stages.
    pub producer_warp: bool,
}

/// Threads a block aims for.
const TARGET_THREADS: usize = 128;
/// Tokens a tile aims for: 32 rows of K and V is 16 KB per stage at head_dim 128 in bf16.
const TARGET_TILE: usize = 32;
/// Shared memory a block may use for its K/V stages; keeps 3 CTAs per SM on Hopper (228 KB).
const SMEM_BUDGET: usize = 64 * 1024;
/// The same for the tensor-core kernel: 96 KB, 2 blocks per SM.
const SMEM_BUDGET_TC: usize = 96 * 1024;
/// The same with the producer warp: three 64-token stages at head_dim 128, 2 blocks per SM.
const SMEM_BUDGET_WS: usize = 96 * 1024;

/// Query heads per KV head from which the tensor-core kernel is used. Measured on the H200 at
/// 64 x 4096, bf16, head_dim 128 (docs/benchmarks.md): tensor cores win at every group size,
/// 1037 vs 1166 us at group 1, 521 vs 668 at 2, 268 vs 468 at 4, 270 vs 748 at 8, 147 vs 597 at 16.
/// The CUDA-core kernel remains the second path (and is tested against the same cases).
pub const TENSOR_CORE_MIN_GROUP: usize = 1;

impl DecodeTiles {
    /// The specialisation the engine runs for this shape.
    pub fn choose(head_dim: usize, group: usize, q_dtype: DType, kv_dtype: DType) -> Self {
        if group >= TENSOR_CORE_MIN_GROUP {
            Self::tensor_core(head_dim, group, q_dtype, kv_dtype)
        } else {
            Self::simt(head_dim, group, q_dtype, kv_dtype)
        }
    }

    /// The tensor-core kernel: 4 warps of 16 * KT tokens each per tile; 3 stages of 64-token
    /// K and V tiles (96 KB at head_dim 128) keep 2 blocks per SM.
    pub fn tensor_core(head_dim: usize, group: usize, q_dtype: DType, kv_dtype: DType) -> Self {
        let kt = 1;
        let stage_bytes = 2 * 4 * 16 * kt * head_dim * kv_dtype.size_bytes();
        let nstage = (SMEM_BUDGET_TC / stage_bytes).clamp(2, 4);
        Self {
            path: DecodePath::TensorCore,
            head_dim,
            group,
            q_dtype,
            kv_dtype,
            bdz: 1,
            passes: kt,
            nstage,
            l2_prefetch: true,
            variant: VariantFlags::default(),
            producer_warp: false,
        }
    }

    /// The engine's choice for a GPU of `arch`: the producer-warp kernel on the data-centre
    /// Hopper and Blackwell parts (sm_90, sm_100: where it was measured and tested; sm_120's 99 KB
    /// per block leave one block per SM) for head_dim up to 128 (at 256 two stages leave one
    /// block per SM), unless `FLASHINFER_DECODE_WS=0` (A/B runs).
    pub fn for_arch(self, arch: Arch) -> Self {
        let wanted = self.producer_warp_fits(arch)
            && matches!(arch.major, 9 | 10)
            && !self.variant.rope
            && std::env::var("FLASHINFER_DECODE_WS").map_or(true, |v| v != "0");
        self.with_producer_warp(wanted)
    }

    /// Whether the producer-warp kernel can be built for these tiles on a GPU of `arch`: the
    /// tensor-core path, sm_90 or newer (mbarriers), head_dim up to 128, one 16-token step per
    /// warp. (`for_arch` is the engine's narrower choice among these.)
    pub fn producer_warp_fits(&self, arch: Arch) -> bool {
        self.path == DecodePath::TensorCore
            && arch >= Arch::SM90
            && self.head_dim <= 128
            && self.passes == 1
    }

    /// The tensor-core kernel with (or without) its producer warp, stages resized to the budget.
    /// Other paths are returned unchanged.
    pub fn with_producer_warp(mut self, on: bool) -> Self {
        if self.path != DecodePath::TensorCore || self.producer_warp == on {
            return self;
        }
        self.producer_warp = on;
        let budget = if on { SMEM_BUDGET_WS } else { SMEM_BUDGET_TC };
        self.nstage = (budget / self.stage_bytes()).clamp(2, 4);
        // The L2 prefetch hint helps the block-wide loader and hurts the producer warp: without
        // it, 64 x 4096 256.3 against 265.9 us, 128 x 8192 982.5 against 1021.2, every other
        // decode shape equal or faster (docs/perf-notes.md, session 7).
        self.l2_prefetch = !on;
        self
    }

    /// The kernel for fused RoPE, which rotates keys with every thread's help and so runs the
    /// block-wide loader: where the producer warp was chosen (sm_90+), without the L2 prefetch
    /// hint too, which costs RoPE what it costs the producer warp (H200, 64 x 4096: 262.8 against
    /// 272.1 us with it; plain 251.2; docs/perf-notes.md, session 8). Other tiles unchanged: with
    /// `FLASHINFER_DECODE_WS=0` (no producer warp chosen) RoPE keeps the block-wide loader's hint.
    pub fn for_fused_rope(self) -> Self {
        if !self.producer_warp {
            return self;
        }
        let mut tiles = self.with_producer_warp(false);
        tiles.l2_prefetch = false;
        tiles
    }

    /// Bytes of one K and V stage.
    fn stage_bytes(&self) -> usize {
        2 * self.tile() * self.row_bytes()
    }
    /// Bytes of one K (or V) row in shared memory.
    fn row_bytes(&self) -> usize {
        self.head_dim * self.kv_dtype.size_bytes()
    }

    /// The CUDA-core kernel.
    pub fn simt(head_dim: usize, group: usize, q_dtype: DType, kv_dtype: DType) -> Self {
        let vec = 16 / kv_dtype.size_bytes();
        let bdx = head_dim / vec;
        let bdz = (TARGET_THREADS / (bdx * group)).max(1);
        let passes = (TARGET_TILE / (group * bdz)).max(1);
        let stage_bytes = 2 * group * bdz * passes * head_dim * kv_dtype.size_bytes();
        let nstage = (SMEM_BUDGET / stage_bytes).clamp(2, 4);
        Self {
            path: DecodePath::Simt,
            head_dim,
            group,
            q_dtype,
            kv_dtype,
            bdz,
            passes,
            nstage,
            l2_prefetch: true,
            variant: VariantFlags::default(),
            producer_warp: false,
        }
    }

    pub fn vec(&self) -> usize {
        16 / self.kv_dtype.size_bytes()
    }
    pub fn bdx(&self) -> usize {
        self.head_dim / self.vec()
    }
    pub fn tile(&self) -> usize {
        match self.path {
            DecodePath::Simt => self.group * self.bdz * self.passes,
            DecodePath::TensorCore => 4 * 16 * self.passes,
        }
    }
    pub fn threads(&self) -> usize {
        match self.path {
            DecodePath::Simt => self.bdx() * self.group * self.bdz,
            DecodePath::TensorCore => 128 + if self.producer_warp { 32 } else { 0 },
        }
    }
    pub fn block(&self) -> (u32, u32, u32) {
        match self.path {
            DecodePath::Simt => (self.bdx() as u32, self.group as u32, self.bdz as u32),
            DecodePath::TensorCore => (self.threads() as u32, 1, 1),
        }
    }

    /// Dynamic shared memory: the K/V stages, or the end-of-kernel state exchange if larger.
    pub fn smem_bytes(&self) -> usize {
        let stages = self.nstage * self.stage_bytes();
        let states = match self.path {
            DecodePath::Simt => self.bdz * self.group * (self.head_dim + 2) * 4,
            DecodePath::TensorCore => 4 * (self.group * self.head_dim + 32) * 4,
        };
        stages.max(states)
    }

    /// Blocks of this kind one SM can hold (shared memory and threads; registers are assumed not
    /// to bind at ~128 threads).
    pub fn ctas_per_sm(&self, smem_per_sm: usize) -> usize {
        let by_smem = smem_per_sm / (self.smem_bytes() + 1024); // 1 KB reserved per block
        let by_threads = 2048 / self.threads();
        by_smem.min(by_threads).clamp(1, 32)
    }

    /// Readable key naming every template parameter (a plain kernel's has no variant suffix, so
    /// its name and cache entry are those of before variants existed).
    pub fn name(&self) -> String {
        match self.path {
            DecodePath::Simt => format!(
                "batch_decode_q{}_kv{}_d{}_g{}_z{}_p{}_s{}{}",
                self.q_dtype,
                self.kv_dtype,
                self.head_dim,
                self.group,
                self.bdz,
                self.passes,
                self.nstage,
                self.variant.key_suffix()
            ),
            DecodePath::TensorCore => format!(
                "batch_decode_tc_q{}_kv{}_d{}_g{}_kt{}_s{}{}{}{}",
                self.q_dtype,
                self.kv_dtype,
                self.head_dim,
                self.group,
                self.passes,
                self.nstage,
                self.prefetch_suffix(),
                if self.producer_warp { "_ws" } else { "" },
                self.variant.key_suffix()
            ),
        }
    }

    fn prefetch_suffix(&self) -> &'static str {
        if self.l2_prefetch {
            "_pf"
        } else {
            ""
        }
    }

    /// The line that turns the L2 prefetch hint on in the generated source.
    fn prefetch_define(&self) -> &'static str {
        if self.l2_prefetch {
            "#define L2_PREFETCH 1\n"
        } else {
            ""
        }
    }

    pub fn spec(&self) -> KernelSpec {
        if self.path == DecodePath::TensorCore {
            let source = format!(
                "{pf}{ws}{var}#include \"common.cuh\"\nusing DTypeQ = {q};\nusing DTypeKV = {kv};\nusing DTypeO = {q};\n\
                 constexpr int HEAD_DIM = {d};\nconstexpr int GROUP = {g};\nconstexpr int KT = {kt};\n\
                 constexpr int NSTAGE = {s};\n#include \"decode_tc.cuh\"\n",
                ws = if self.producer_warp { "#define DECODE_WS 1\n" } else { "" },
                q = self.q_dtype.cuda_type(),
                kv = self.kv_dtype.cuda_type(),
                d = self.head_dim,
                g = self.group,
                kt = self.passes,
                s = self.nstage,
                pf = self.prefetch_define(),
                var = self.variant.defines(),
            );
            let spec = KernelSpec::new(self.name(), source, ["batch_decode"]);
            return if self.producer_warp {
                spec.requires(Arch::SM90)
            } else {
                spec
            };
        }
        let source = format!(
            "{pf}{var}#include \"common.cuh\"\nusing DTypeQ = {q};\nusing DTypeKV = {kv};\nusing DTypeO = {q};\n\
             constexpr int HEAD_DIM = {d};\nconstexpr int GROUP = {g};\nconstexpr int BDZ = {z};\n\
             constexpr int PASSES = {p};\nconstexpr int NSTAGE = {s};\n#include \"decode.cuh\"\n",
            q = self.q_dtype.cuda_type(),
            kv = self.kv_dtype.cuda_type(),
            d = self.head_dim,
            g = self.group,
            z = self.bdz,
            p = self.passes,
            s = self.nstage,
            pf = self.prefetch_define(),
            var = self.variant.defines(),
        );
        KernelSpec::new(self.name(), source, ["batch_decode"])
    }
}

/// Head dims the decode kernel is built for.
pub const HEAD_DIMS: [usize; 3] = [64, 128, 256];

/// Every decode specialisation we ship for the compile-only tier: both 16-bit dtypes, the three
/// head dims, and the GQA ratios of common models plus odd ones.
pub(crate) fn specs() -> Vec<KernelSpec> {
    let mut v = Vec::new();
    for dt in [DType::F16, DType::BF16] {
        for d in HEAD_DIMS {
            for g in [1, 4, 5, 8, 16] {
                v.push(DecodeTiles::simt(d, g, dt, dt).spec());
                v.push(DecodeTiles::tensor_core(d, g, dt, dt).spec());
            }
        }
    }
    v.push(DecodeTiles::choose(128, 4, DType::F16, DType::BF16).spec());
    // The producer-warp kernel (sm_90a): head dims 64 and 128, common and odd groups, the plain
    // kernel and the variants it takes.
    for dt in [DType::F16, DType::BF16] {
        for d in [64, 128] {
            for g in [1, 4, 5, 8, 16] {
                v.push(
                    DecodeTiles::tensor_core(d, g, dt, dt)
                        .with_producer_warp(true)
                        .spec(),
                );
            }
        }
    }
    let ws = DecodeTiles::tensor_core(128, 4, DType::BF16, DType::BF16).with_producer_warp(true);
    for variant in VariantFlags::singles()
        .into_iter()
        .filter(|f| !f.window && !f.rope)
    {
        v.push(DecodeTiles { variant, ..ws }.spec());
    }
    // The variants (the window is planned, not compiled): each alone on both kernels, and all
    // together on both kernels at an odd GQA ratio and the other head dims.
    // The window is planned, not compiled; RoPE has its own list below.
    let one = VariantFlags::singles()
        .into_iter()
        .filter(|f| !f.window && !f.rope);
    let all = VariantFlags {
        rope: false,
        window: false,
        ..VariantFlags::all()
    };
    let bf = DType::BF16;
    for variant in one {
        for t in [
            DecodeTiles::simt(128, 4, bf, bf),
            DecodeTiles::tensor_core(128, 4, bf, bf),
        ] {
            v.push(DecodeTiles { variant, ..t }.spec());
        }
    }
    for t in [
        DecodeTiles::simt(64, 5, DType::F16, DType::F16),
        DecodeTiles::tensor_core(256, 5, DType::F16, DType::F16),
        DecodeTiles::tensor_core(128, 4, bf, bf),
    ] {
        v.push(DecodeTiles { variant: all, ..t }.spec());
    }
    // RoPE: alone at every head dim on both kernels (the tensor-core kernel shares its angles over
    // n-tiles up to head_dim 128 and not at 256), and with all the others.
    let rope = VariantFlags {
        rope: true,
        ..Default::default()
    };
    for (d, g, dt) in [(64, 1, DType::F16), (128, 4, bf), (256, 5, bf)] {
        for t in [
            DecodeTiles::simt(d, g, dt, dt),
            DecodeTiles::tensor_core(d, g, dt, dt),
        ] {
            v.push(DecodeTiles { variant: rope, ..t }.spec());
        }
    }
    let all_rope = VariantFlags { rope: true, ..all };
    for t in [
        DecodeTiles::simt(64, 5, DType::F16, DType::F16),
        DecodeTiles::simt(128, 4, bf, bf),
        DecodeTiles::tensor_core(256, 5, DType::F16, DType::F16),
        DecodeTiles::tensor_core(128, 4, bf, bf),
    ] {
        v.push(
            DecodeTiles {
                variant: all_rope,
                ..t
            }
            .spec(),
        );
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiles_fit_hopper_and_divide_evenly() {
        for d in HEAD_DIMS {
            for g in 1..=16 {
                for dt in [DType::F16, DType::BF16] {
                    for t in [
                        DecodeTiles::simt(d, g, dt, dt),
                        DecodeTiles::tensor_core(d, g, dt, dt),
                    ] {
                        assert!(t.threads() <= 1024, "{t:?}");
                        assert_eq!(t.tile() % t.bdz, 0);
                        assert!(t.smem_bytes() <= 227 * 1024, "{t:?}");
                        assert!(t.ctas_per_sm(228 * 1024) >= 1);
                    }
                }
            }
        }
        let t = DecodeTiles::simt(128, 4, DType::BF16, DType::BF16);
        assert_eq!((t.bdx(), t.bdz, t.tile(), t.threads()), (16, 2, 32, 128));
        let t = DecodeTiles::tensor_core(128, 4, DType::BF16, DType::BF16);
        assert_eq!(
            (t.tile(), t.threads(), t.nstage, t.smem_bytes()),
            (64, 128, 3, 96 * 1024)
        );
    }

    #[test]
    fn variants_are_named_and_defined_and_plain_kernels_are_unchanged() {
        for t in [
            DecodeTiles::simt(128, 4, DType::BF16, DType::BF16),
            DecodeTiles::tensor_core(128, 4, DType::BF16, DType::BF16),
        ] {
            let plain = t.spec();
            assert!(!plain.source.contains("VARIANT"), "{}", plain.source);
            let v = DecodeTiles {
                variant: VariantFlags {
                    soft_cap: true,
                    sinks: true,
                    ..Default::default()
                },
                ..t
            }
            .spec();
            assert_eq!(v.name, format!("{}_cap_sink", plain.name));
            let r = DecodeTiles {
                variant: VariantFlags {
                    rope: true,
                    alibi: true,
                    ..Default::default()
                },
                ..t
            }
            .spec();
            assert_eq!(r.name, format!("{}_rope_alibi", plain.name));
            assert!(r.source.contains("#define VARIANT_ROPE 1\n"));
            assert!(r.source.find("VARIANT_ROPE") < r.source.find("#include"));
            assert!(v.source.contains("#define VARIANT_SOFTCAP 1\n"));
            assert!(v.source.contains("#define VARIANT_SINKS 1\n"));
            assert!(!v.source.contains("VARIANT_ALIBI"));
            // The switches come before the kernel's headers read them.
            assert!(v.source.find("VARIANT_SINKS") < v.source.find("#include"));
        }
    }
}
