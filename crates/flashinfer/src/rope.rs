//! RoPE applied to the keys of a paged KV cache on the GPU, as a pass of its own.
//!
//! The decode and prefill kernels fuse RoPE (`set_variant`); this op is the unfused alternative,
//! for caches that hold unrotated keys and must be rotated once, and the baseline the fused
//! decode is measured against (`flashinfer bench decode --rope-separate`). It rotates every used
//! slot of every request, all KV heads, to the slot's position (key `j` of request `r` at
//! `rope_offsets[r] + j`, as [`crate::variant`] defines), from a source pool into a destination
//! pool of the same description (a copy, or the pool itself with [`RopeApply::run_in_place`]).
//!
//! `plan()` runs on the host: it validates the table against the pool and cuts the used slots into
//! runs of at most [`SLOTS_PER_ENTRY`] slots of one page, copied to the device in one transfer.
//! `run()` launches kernels/rope_apply.cuh: one block per (run, KV head). The element type is
//! f16 or bf16.

use std::sync::Arc;

use cudarc::driver::CudaSlice;

use crate::cuda::{launch, DevSlice, DevSliceMut, Device, LaunchConfig};
use crate::dtype::{DType, Element};
use crate::error::{ensure, invalid, Result};
use crate::jit::{KernelFunction, KernelSpec};
use crate::layout::{HeadConfig, PageTable, PagedKvDesc};
use crate::variant::{Rope, Variant};

/// The kernel's entry point in kernels/rope_apply.cuh.
const ENTRY: &str = "rope_apply_paged";

/// Slots of one page a block rotates at most (pages larger than this take several blocks).
pub const SLOTS_PER_ENTRY: usize = 64;

/// Threads a block aims for.
const BLOCK_THREADS: usize = 128;

/// The kernel for element type `dtype` (f16 or bf16).
fn spec(dtype: DType) -> KernelSpec {
    KernelSpec::new(
        format!("rope_apply_{dtype}"),
        format!(
            "#include \"common.cuh\"\nusing DTypeKV = {};\n#include \"rope_apply.cuh\"\n",
            dtype.cuda_type()
        ),
        [ENTRY],
    )
}

/// Every specialisation we ship (for warmup and the compile-only tests).
pub(crate) fn specs() -> Vec<KernelSpec> {
    vec![spec(DType::F16), spec(DType::BF16)]
}

/// What `plan()` fixed for `run()`.
#[derive(Clone, Copy, Debug)]
struct Planned {
    desc: PagedKvDesc,
    entries: usize,
    rope: Rope,
}

/// A planned RoPE pass over the keys of a paged KV cache.
pub struct RopeApply {
    dev: Arc<Device>,
    dtype: DType,
    func: KernelFunction,
    /// `[entries, 4]`: page, first slot, its position, slots (`RopeEntry` in rope_apply.cuh).
    entries: Option<CudaSlice<i32>>,
    planned: Option<Planned>,
}

impl RopeApply {
    /// Loads the kernel for `dtype` (f16 or bf16), compiling it on first use.
    pub fn new(dev: &Arc<Device>, dtype: DType) -> Result<Self> {
        ensure(dtype != DType::F32, "dtype", || {
            "RoPE over a paged cache takes f16 or bf16".into()
        })?;
        let func = dev.module(&spec(dtype))?.kernel(ENTRY)?;
        Ok(Self {
            dev: dev.clone(),
            dtype,
            func,
            entries: None,
            planned: None,
        })
    }

    /// Plans the rotation of the keys of `table`'s requests in the pool `desc`: request `r`'s key
    /// `j` to position `rope_offsets[r] + j` (`None`: all 0) with `rope`'s base and scale.
    /// Every page may belong to one request only (a shared page would need two positions per
    /// slot). A failed plan leaves nothing to run.
    pub fn plan(
        &mut self,
        table: &PageTable,
        desc: &PagedKvDesc,
        rope: Rope,
        rope_offsets: Option<&[i32]>,
    ) -> Result<()> {
        self.planned = None;
        desc.validate()?;
        let batch = table.batch_size();
        let heads = HeadConfig::new(desc.num_kv_heads, desc.num_kv_heads, desc.head_dim)?;
        Variant {
            rope: Some(rope),
            rope_offsets,
            ..Default::default()
        }
        .validate(&heads, Some(batch))?;
        check_alignment(desc, self.dtype)?;
        ensure(table.page_size() == desc.page_size, "table", || {
            format!(
                "page_size {} differs from the pool's {}",
                table.page_size(),
                desc.page_size
            )
        })?;
        let mut used = vec![false; desc.num_pages];
        for (i, &p) in table.kv_indices().iter().enumerate() {
            let slot = usize::try_from(p)
                .ok()
                .and_then(|p| used.get_mut(p))
                .ok_or_else(|| {
                    invalid(
                        "table",
                        format!(
                            "kv_indices[{i}] = {p} is outside the pool of {} pages",
                            desc.num_pages
                        ),
                    )
                })?;
            ensure(!*slot, "table", || {
                format!("page {p} is used twice; each slot needs one position")
            })?;
            *slot = true;
        }
        let mut host: Vec<i32> = Vec::new();
        for r in 0..batch {
            let off = rope_offsets.map_or(0, |o| o[r]);
            ensure(off >= 0, "rope_offsets", || {
                format!("rope_offsets[{r}] = {off}: positions must be non-negative")
            })?;
            let len = table.kv_len(r);
            ensure(
                off as usize + len <= i32::MAX as usize,
                "rope_offsets",
                || format!("request {r}: offset {off} + kv_len {len} exceeds i32::MAX"),
            )?;
            for (i, &page) in table.pages(r).iter().enumerate() {
                let first = i * desc.page_size;
                let slots = len.min(first + desc.page_size) - first;
                for s0 in (0..slots).step_by(SLOTS_PER_ENTRY) {
                    let n = SLOTS_PER_ENTRY.min(slots - s0);
                    // All fit i32: positions are checked above, slots are below page_size, which
                    // check_alignment bounded.
                    host.extend([page, s0 as i32, off + (first + s0) as i32, n as i32]);
                }
            }
        }
        let entries = host.len() / 4;
        ensure(entries <= i32::MAX as usize, "table", || {
            format!("{entries} runs of slots are too many for one launch")
        })?;
        if !host.is_empty() {
            let buf = match self.entries.take() {
                Some(b) if b.len() >= host.len() => b,
                _ => self.dev.stream().alloc_zeros::<i32>(host.len())?,
            };
            let buf = self.entries.insert(buf);
            self.dev.stream().memcpy_htod(&host, buf)?;
        }
        self.planned = Some(Planned {
            desc: *desc,
            entries,
            rope,
        });
        Ok(())
    }

    /// Rotates the planned keys of the pool `src` into the pool `dst` (both described by `desc`,
    /// the description given to `plan()`; only the K rows of used slots of `dst` are written).
    pub fn run<T: Element>(
        &self,
        src: DevSlice<T>,
        dst: DevSliceMut<T>,
        desc: &PagedKvDesc,
    ) -> Result<()> {
        let need = desc.required_len();
        ensure(src.len() >= need, "src", || {
            format!("has {} elements; the pool needs {need}", src.len())
        })?;
        self.launch::<T>(src.ptr(), dst, desc)
    }

    /// Rotates the planned keys of `cache` (described by `desc`) where they are.
    pub fn run_in_place<T: Element>(
        &self,
        cache: DevSliceMut<T>,
        desc: &PagedKvDesc,
    ) -> Result<()> {
        let src = cache.ptr();
        self.launch::<T>(src, cache, desc)
    }

    /// Checks `dst`, the pointers and the plan, then launches; `src` covers the pool (checked by
    /// the caller).
    fn launch<T: Element>(&self, src: u64, dst: DevSliceMut<T>, desc: &PagedKvDesc) -> Result<()> {
        let p = self
            .planned
            .ok_or_else(|| invalid("self", "run() called before a successful plan()"))?;
        desc.ensure_planned_for(&p.desc)?;
        ensure(T::DTYPE == self.dtype, "dst", || {
            format!("is {}, the op was made for {}", T::DTYPE, self.dtype)
        })?;
        let need = desc.required_len();
        ensure(dst.len() >= need, "dst", || {
            format!("has {} elements; the pool needs {need}", dst.len())
        })?;
        for (arg, ptr) in [("src", src), ("dst", dst.ptr())] {
            ensure(ptr.is_multiple_of(16), arg, || {
                format!("device pointer {ptr:#x} is not 16-byte aligned")
            })?;
        }
        let entries = match &self.entries {
            Some(b) if p.entries > 0 => DevSlice::new(b, self.dev.stream()).ptr(),
            _ => return Ok(()), // nothing to rotate
        };
        let chunks = desc.head_dim / 16;
        let cfg = LaunchConfig {
            grid: (p.entries as u32, desc.num_kv_heads as u32, 1),
            block: (chunks as u32, (BLOCK_THREADS / chunks).max(1) as u32, 1),
            smem_bytes: 0,
        };
        let dst_ptr = dst.ptr();
        let page_stride = desc.page_stride as i64;
        let token_stride = desc.token_stride() as i64;
        let head_stride = desc.head_stride() as i64;
        let head_dim = desc.head_dim as i32;
        let log2_theta = p.rope.theta.log2();
        let rcp_scale = 1.0 / p.rope.scale;
        let mut args = crate::kernel_args![
            &src,
            &dst_ptr,
            &entries,
            &page_stride,
            &token_stride,
            &head_stride,
            &head_dim,
            &log2_theta,
            &rcp_scale
        ];
        // SAFETY: the arguments match rope_apply_paged in rope_apply.cuh. The entries were written
        // by plan() for this very description (checked equal): each names a page of the pool and
        // slots below page_size, so every access (K rows of those slots, all heads) lies inside
        // `required_len()` elements, which src and dst hold (checked); pointers and strides are
        // 16-byte multiples (checked here and in plan()); no page appears twice (plan()), so no
        // two threads write one element, and each thread reads its elements before writing them
        // (src == dst is allowed).
        unsafe { launch(self.func.raw(), cfg, self.dev.stream(), &mut args) }
    }
}

/// What the kernel's 16-byte accesses need of a (validated) description, in bytes of `dtype`.
fn check_alignment(desc: &PagedKvDesc, dtype: DType) -> Result<()> {
    let esz = dtype.size_bytes();
    ensure(
        desc.head_dim.is_multiple_of(16) && desc.head_dim <= 16 * BLOCK_THREADS,
        "head_dim",
        || {
            format!(
                "{} must be a multiple of 16, at most {}",
                desc.head_dim,
                16 * BLOCK_THREADS
            )
        },
    )?;
    ensure(
        desc.num_kv_heads <= u16::MAX as usize,
        "num_kv_heads",
        || format!("{} exceeds the grid's 65535", desc.num_kv_heads),
    )?;
    ensure(desc.page_size <= i32::MAX as usize, "page_size", || {
        format!("{} exceeds i32::MAX", desc.page_size)
    })?;
    ensure((desc.page_stride * esz).is_multiple_of(16), "desc", || {
        format!(
            "page_stride {} is not a multiple of 16 bytes",
            desc.page_stride
        )
    })?;
    ensure(
        desc.required_len()
            .checked_mul(esz)
            .is_some_and(|b| b <= i64::MAX as usize),
        "desc",
        || "the pool's extent in bytes overflows i64".into(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::KvLayout;

    #[test]
    fn alignment_and_shapes_are_checked() {
        let d = PagedKvDesc::new(KvLayout::Nhd, 4, 16, 2, 128).unwrap();
        assert!(check_alignment(&d, DType::BF16).is_ok());
        let d = PagedKvDesc::new(KvLayout::Hnd, 4, 16, 2, 72).unwrap();
        let e = check_alignment(&d, DType::F16).unwrap_err().to_string();
        assert!(e.contains("head_dim"), "{e}");
        let d = PagedKvDesc::new(KvLayout::Nhd, 4, 16, 2, 64)
            .unwrap()
            .with_page_stride(16 * 2 * 64 + 4)
            .unwrap();
        let e = check_alignment(&d, DType::F16).unwrap_err().to_string();
        assert!(e.contains("page_stride"), "{e}");
    }
}
