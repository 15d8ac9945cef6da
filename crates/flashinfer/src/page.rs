//! Appending to a paged KV cache on the GPU: the new tokens' K and V rows written into their slots.
//!
//! `plan()` runs on the host: it validates the batch indices and positions against the page table
//! ([`append_offsets`], the same checks as the CPU backend's
//! [`reference::append`](crate::reference::append)), computes each token's destination offset and
//! copies the offsets into the workspace in one transfer. `run()` validates the device tensors and
//! launches one kernel (kernels/page.cuh) that moves 16-byte chunks; it is a copy, so the result is
//! bit-exact and one kernel serves every element type.
//!
//! Separate K and V pools go through [`PagedKvAppend::run`]; one `[pages, 2, ...]` pool through
//! [`PagedKvAppend::run_combined`], which takes the one buffer once: K and V are its disjoint parts,
//! `desc.v_offset` apart, so no two mutable views of one buffer are ever needed.
//!
//! The grid depends on the number of new tokens, so a `run()` captured in a CUDA graph replays
//! only plans of the same token count (whose offsets `plan()` rewrites in place).

use std::sync::Arc;

use cudarc::driver::sys;

use crate::cuda::{launch, DevSlice, DevSliceMut, Device, LaunchConfig, Workspace};
use crate::dtype::{DType, Element};
use crate::error::{ensure, invalid, Result};
use crate::jit::{KernelFunction, KernelSpec};
use crate::layout::{append_offsets, check_len, PageTable, PagedKvDesc};

/// The kernel's entry point in kernels/page.cuh.
const ENTRY: &str = "append_paged_kv_cache";

/// Threads a block aims for: the copy is bound by memory, not by the block size.
const BLOCK_THREADS: usize = 128;

/// Bytes each thread moves.
const CHUNK: usize = 16;

/// The append kernel. It copies 16-byte chunks and names no element type, so one specialisation
/// serves f16, bf16 and f32.
fn spec() -> KernelSpec {
    KernelSpec::new("page_append_kv_16b", "#include \"page.cuh\"\n", [ENTRY])
}

/// Every page-op specialisation we ship (for warmup and the compile-only tests).
pub(crate) fn specs() -> Vec<KernelSpec> {
    vec![spec()]
}

/// What `plan()` fixed for `run()`.
#[derive(Clone, Copy, Debug)]
struct Planned {
    desc: PagedKvDesc,
    nnz: usize,
}

/// A planned append of new tokens' K and V into a paged KV cache.
pub struct PagedKvAppend {
    dev: Arc<Device>,
    dtype: DType,
    func: KernelFunction,
    workspace: Workspace,
    planned: Option<Planned>,
}

impl PagedKvAppend {
    /// Loads the kernel (compiling it on first use) and allocates a workspace; `dtype` is the
    /// element type of the cache and of the new rows.
    pub fn new(dev: &Arc<Device>, dtype: DType) -> Result<Self> {
        let func = dev.module(&spec())?.kernel(ENTRY)?;
        // Room for 512 tokens' offsets; plan() grows it.
        let workspace = Workspace::new(dev.stream(), 4096)?;
        Ok(Self {
            dev: dev.clone(),
            dtype,
            func,
            workspace,
            planned: None,
        })
    }

    /// The element type this op was made for.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Plans an append: token `t` goes to request `batch_indices[t]` at position `positions[t]` of
    /// its KV, in the pool `desc` with page table `table` (the table after the append: it already
    /// counts the new tokens). Validates everything (see [`append_offsets`]; two tokens writing
    /// one slot is an error naming `positions`) and the alignment the kernel needs (rows, page
    /// stride and V offset in multiples of 16 bytes), then copies each token's destination offset
    /// to the workspace. A failed plan leaves nothing to run.
    pub fn plan(
        &mut self,
        table: &PageTable,
        batch_indices: &[i32],
        positions: &[i32],
        desc: &PagedKvDesc,
    ) -> Result<()> {
        self.planned = None;
        let offsets = append_offsets(table, desc, batch_indices, positions)?;
        check_alignment(desc, self.dtype)?;
        let nnz = offsets.len();
        let rpb = rows_per_block(desc, self.dtype);
        let blocks = nnz.checked_mul(desc.num_kv_heads).map(|r| r.div_ceil(rpb));
        ensure(
            blocks.is_some_and(|b| b <= i32::MAX as usize),
            "positions",
            || {
                format!(
                    "{nnz} tokens x {} KV heads is too many rows for one launch",
                    desc.num_kv_heads
                )
            },
        )?;
        let bytes = nnz * std::mem::size_of::<i64>();
        if bytes > self.workspace.bytes() {
            self.workspace = Workspace::new(self.dev.stream(), bytes.next_power_of_two())?;
        }
        if nnz > 0 {
            // Offsets fit i64: check_alignment bounded the pool's extent in bytes by i64::MAX.
            let host: Vec<i64> = offsets.iter().map(|&o| o as i64).collect();
            // SAFETY: the workspace holds at least `bytes` bytes (ensured above); the copy is
            // ordered on the engine's stream before any launch of run() and after any earlier
            // run() that read the previous offsets; the host buffer is pageable, so the driver
            // stages it before returning.
            unsafe {
                sys::cuMemcpyHtoDAsync_v2(
                    self.workspace.ptr(),
                    host.as_ptr() as *const _,
                    bytes,
                    self.dev.stream().cu_stream(),
                )
                .result()?;
            }
        }
        self.planned = Some(Planned { desc: *desc, nnz });
        Ok(())
    }

    /// Runs the planned append into separate K and V pools: `k_new`, `v_new` are
    /// `[nnz, num_kv_heads, head_dim]`, `k_cache`/`v_cache` the pools described by `desc` (the
    /// description given to `plan()`, with `v_offset` `None`). Pointers must be 16-byte aligned.
    pub fn run<T: Element>(
        &self,
        k_new: DevSlice<T>,
        v_new: DevSlice<T>,
        k_cache: DevSliceMut<T>,
        v_cache: DevSliceMut<T>,
        desc: &PagedKvDesc,
    ) -> Result<()> {
        let p = self.planned(desc)?;
        ensure(desc.v_offset.is_none(), "desc", || {
            "describes a combined [pages, 2, ...] tensor; use run_combined".into()
        })?;
        desc.check_buffers(k_cache.len(), v_cache.len())?;
        self.launch(p, k_new, v_new, k_cache.ptr(), v_cache.ptr())
    }

    /// Runs the planned append into one `[pages, 2, ...]` pool holding K then V of each page
    /// (`desc` made by [`PagedKvDesc::combined`]); otherwise as [`PagedKvAppend::run`].
    pub fn run_combined<T: Element>(
        &self,
        k_new: DevSlice<T>,
        v_new: DevSlice<T>,
        kv_cache: DevSliceMut<T>,
        desc: &PagedKvDesc,
    ) -> Result<()> {
        let p = self.planned(desc)?;
        let Some(v_offset) = desc.v_offset else {
            return Err(invalid(
                "desc",
                "describes separate K and V tensors; use run",
            ));
        };
        let need = desc.required_len();
        ensure(kv_cache.len() >= need, "kv_cache", || {
            format!(
                "has {} elements; the pool of {} pages needs {need}",
                kv_cache.len(),
                desc.num_pages
            )
        })?;
        let v_base = kv_cache.ptr() + (v_offset * T::DTYPE.size_bytes()) as u64;
        self.launch(p, k_new, v_new, kv_cache.ptr(), v_base)
    }

    /// The current plan, which must be for `desc`.
    fn planned(&self, desc: &PagedKvDesc) -> Result<Planned> {
        let p = self
            .planned
            .ok_or_else(|| invalid("self", "run() called before a successful plan()"))?;
        desc.ensure_planned_for(&p.desc)?;
        Ok(p)
    }

    /// Checks the new rows and the pointers, then launches. `v_base` points at V of page 0.
    fn launch<T: Element>(
        &self,
        p: Planned,
        k_new: DevSlice<T>,
        v_new: DevSlice<T>,
        k_base: u64,
        v_base: u64,
    ) -> Result<()> {
        let d = &p.desc;
        ensure(T::DTYPE == self.dtype, "k_new", || {
            format!("is {}, the op was made for {}", T::DTYPE, self.dtype)
        })?;
        let row = d.num_kv_heads * d.head_dim;
        let shape = "[nnz, num_kv_heads, head_dim]";
        check_len("k_new", k_new.len(), p.nnz * row, shape)?;
        check_len("v_new", v_new.len(), p.nnz * row, shape)?;
        for (arg, ptr) in [
            ("k_new", k_new.ptr()),
            ("v_new", v_new.ptr()),
            ("k_cache", k_base),
            ("v_cache", v_base),
        ] {
            ensure(ptr.is_multiple_of(CHUNK as u64), arg, || {
                format!("device pointer {ptr:#x} is not 16-byte aligned")
            })?;
        }
        self.workspace.check(p.nnz * std::mem::size_of::<i64>())?;

        let rpb = rows_per_block(d, self.dtype);
        let num_rows = (p.nnz * d.num_kv_heads) as i64;
        let cfg = LaunchConfig {
            grid: ((num_rows as usize).div_ceil(rpb) as u32, 1, 1),
            block: (chunks_per_row(d, self.dtype) as u32, rpb as u32, 1),
            smem_bytes: 0,
        };
        let (pk, pv, pdst) = (k_new.ptr(), v_new.ptr(), self.workspace.ptr());
        let num_kv_heads = d.num_kv_heads as i32;
        let head_stride = d.head_stride() as i64;
        let elem_bytes = self.dtype.size_bytes() as i32;
        let mut args = crate::kernel_args![
            &pk,
            &pv,
            &pdst,
            &k_base,
            &v_base,
            &num_rows,
            &num_kv_heads,
            &head_stride,
            &elem_bytes
        ];
        // SAFETY: the arguments match append_paged_kv_cache in page.cuh. k_new and v_new hold the
        // planned nnz rows (checked); the workspace holds the nnz offsets plan() wrote for this
        // very description (checked equal), each the head-0 row of a slot of a page inside the
        // pool, and the pool's buffers cover `desc.required_len()` elements (checked by the
        // caller), so every write lands inside them; pointers, rows and strides are 16-byte
        // multiples (checked here and in plan()); no two tokens share a slot (plan()), so no two
        // threads write one address.
        unsafe { launch(self.func.raw(), cfg, self.dev.stream(), &mut args) }
    }
}

/// 16-byte chunks in one `[head_dim]` row: one thread each.
fn chunks_per_row(desc: &PagedKvDesc, dtype: DType) -> usize {
    desc.head_dim * dtype.size_bytes() / CHUNK
}

/// (token, head) rows one block copies.
fn rows_per_block(desc: &PagedKvDesc, dtype: DType) -> usize {
    (BLOCK_THREADS / chunks_per_row(desc, dtype).max(1)).max(1)
}

/// What the kernel's 16-byte chunks need of a (validated) description, in bytes of `dtype`.
fn check_alignment(desc: &PagedKvDesc, dtype: DType) -> Result<()> {
    let esz = dtype.size_bytes();
    let row_bytes = desc.head_dim * esz;
    ensure(row_bytes.is_multiple_of(CHUNK), "head_dim", || {
        format!(
            "{} x {esz} bytes is not a multiple of 16 bytes",
            desc.head_dim
        )
    })?;
    ensure(row_bytes <= 1024 * CHUNK, "head_dim", || {
        format!(
            "{} x {esz} bytes is above the 16384 bytes a row may have",
            desc.head_dim
        )
    })?;
    ensure(
        desc.num_kv_heads <= i32::MAX as usize,
        "num_kv_heads",
        || format!("{} exceeds i32::MAX", desc.num_kv_heads),
    )?;
    ensure(
        (desc.page_stride * esz).is_multiple_of(CHUNK),
        "desc",
        || {
            format!(
                "page_stride {} is not a multiple of 16 bytes",
                desc.page_stride
            )
        },
    )?;
    let v_offset = desc.v_offset.unwrap_or(0);
    ensure((v_offset * esz).is_multiple_of(CHUNK), "desc", || {
        format!("v_offset {v_offset} is not a multiple of 16 bytes")
    })?;
    ensure(
        desc.required_len()
            .checked_mul(esz)
            .is_some_and(|b| b <= i64::MAX as usize),
        "desc",
        || "the pool's extent in bytes overflows i64".into(),
    )
}

/// Plans and runs one append into separate K and V pools: [`PagedKvAppend::plan`] then
/// [`PagedKvAppend::run`] (a new op, hence a small workspace allocation, per call).
#[allow(clippy::too_many_arguments)]
pub fn append_paged_kv_cache<T: Element>(
    dev: &Arc<Device>,
    k_new: DevSlice<T>,
    v_new: DevSlice<T>,
    batch_indices: &[i32],
    positions: &[i32],
    table: &PageTable,
    desc: &PagedKvDesc,
    k_cache: DevSliceMut<T>,
    v_cache: DevSliceMut<T>,
) -> Result<()> {
    let mut op = PagedKvAppend::new(dev, T::DTYPE)?;
    op.plan(table, batch_indices, positions, desc)?;
    op.run(k_new, v_new, k_cache, v_cache, desc)
}

/// As [`append_paged_kv_cache`] into one `[pages, 2, ...]` pool ([`PagedKvAppend::run_combined`]).
#[allow(clippy::too_many_arguments)]
pub fn append_paged_kv_cache_combined<T: Element>(
    dev: &Arc<Device>,
    k_new: DevSlice<T>,
    v_new: DevSlice<T>,
    batch_indices: &[i32],
    positions: &[i32],
    table: &PageTable,
    desc: &PagedKvDesc,
    kv_cache: DevSliceMut<T>,
) -> Result<()> {
    let mut op = PagedKvAppend::new(dev, T::DTYPE)?;
    op.plan(table, batch_indices, positions, desc)?;
    op.run_combined(k_new, v_new, kv_cache, desc)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::KvLayout;

    #[test]
    fn launch_shape_covers_every_chunk_once() {
        for (dt, d, chunks, rpb) in [
            (DType::F16, 64, 8, 16),
            (DType::BF16, 128, 16, 8),
            (DType::F16, 256, 32, 4),
            (DType::F32, 128, 32, 4),
            (DType::F16, 80, 10, 12),
            (DType::F32, 4096, 1024, 1),
        ] {
            let desc = PagedKvDesc::new(KvLayout::Nhd, 4, 16, 2, d).unwrap();
            assert_eq!(chunks_per_row(&desc, dt), chunks);
            assert_eq!(rows_per_block(&desc, dt), rpb);
            assert!(chunks * rpb <= 1024);
            check_alignment(&desc, dt).unwrap();
        }
    }

    #[test]
    fn misaligned_descriptions_are_rejected() {
        let arg = |desc: PagedKvDesc, dt| match check_alignment(&desc, dt) {
            Err(crate::Error::InvalidArgument { arg, .. }) => arg,
            r => panic!("{desc:?}: expected InvalidArgument, got {r:?}"),
        };
        let good = PagedKvDesc::new(KvLayout::Hnd, 4, 16, 2, 64).unwrap();
        let odd = PagedKvDesc::new(KvLayout::Hnd, 4, 16, 2, 60).unwrap();
        assert_eq!(arg(odd, DType::F16), "head_dim");
        check_alignment(&odd, DType::F32).unwrap(); // 240 bytes
        let big = PagedKvDesc::new(KvLayout::Nhd, 1, 1, 1, 8200).unwrap();
        assert_eq!(arg(big, DType::F32), "head_dim");
        let padded = good.with_page_stride(good.page_stride + 4).unwrap();
        assert_eq!(arg(padded, DType::F16), "desc");
        check_alignment(&padded, DType::F32).unwrap();
        let comb = PagedKvDesc {
            v_offset: Some(good.page_elems() + 4),
            page_stride: 2 * good.page_elems() + 8,
            ..good
        };
        assert_eq!(arg(comb, DType::BF16), "desc");
    }
}
