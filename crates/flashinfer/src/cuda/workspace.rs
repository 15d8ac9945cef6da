//! Workspace buffers: device scratch memory the plans lay out (partial states of split-KV, work
//! lists). A plan states how many bytes it needs; `run()` checks before launching.

use std::sync::Arc;

use cudarc::driver::sys::CUdeviceptr;
use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::{CudaEvent, CudaSlice, CudaStream, DevicePtr, PinnedHostSlice};

use crate::error::{Error, Result};

/// A device byte buffer, owned by the engine or borrowed from the caller.
pub struct Workspace {
    ptr: CUdeviceptr,
    bytes: usize,
    _owned: Option<CudaSlice<u8>>,
    /// Page-locked staging of `upload_plan` (a true asynchronous copy, no driver-side staging of
    /// pageable memory), and the event after its last copy: rewritten only once that copy is done.
    staging: Option<(PinnedHostSlice<u8>, CudaEvent)>,
}

impl Workspace {
    /// Allocates `bytes` on the stream's device.
    pub fn new(stream: &Arc<CudaStream>, bytes: usize) -> Result<Self> {
        // SAFETY: workspace contents are always written by a kernel before they are read.
        let buf = unsafe { stream.alloc::<u8>(bytes.max(256)) }?;
        let ptr = {
            let (ptr, _sync) = buf.device_ptr(stream);
            ptr
        };
        Ok(Self {
            ptr,
            bytes,
            _owned: Some(buf),
            staging: None,
        })
    }

    /// Uses caller-owned device memory as workspace.
    ///
    /// # Safety
    /// `ptr` must be 256-byte aligned device memory of at least `bytes` bytes, reserved for the
    /// engine for as long as the workspace is used, including by CUDA graphs captured with it.
    pub unsafe fn from_raw(ptr: CUdeviceptr, bytes: usize) -> Self {
        Self {
            ptr,
            bytes,
            _owned: None,
            staging: None,
        }
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }
    pub fn ptr(&self) -> CUdeviceptr {
        self.ptr
    }

    /// Errors unless `needed` bytes fit.
    pub fn check(&self, needed: usize) -> Result<()> {
        if needed > self.bytes {
            return Err(Error::WorkspaceTooSmall {
                arg: "workspace",
                needed,
                given: self.bytes,
            });
        }
        Ok(())
    }
}

/// Plain old data that a plan copies into a workspace byte for byte.
///
/// # Safety
/// The type must be `repr(C)` without padding bytes (every byte of a value is initialised), so
/// that its bytes can be read as `u8`.
pub unsafe trait PlanItem: Copy {}

/// Byte offsets of a plan inside its workspace, each piece 256-byte aligned: the number of work
/// items (one `i32`, read by every block), the work list, the arrival counters of split work
/// (`i32`, zero between runs), then the partial states' outputs and LSEs (`f32`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PlanLayout {
    pub num_work: usize,
    pub work: usize,
    pub counters: usize,
    pub partial_o: usize,
    pub partial_lse: usize,
    /// Bytes the plan needs.
    pub total: usize,
}

impl PlanLayout {
    /// Room for `work_bytes` of work items, `counters` counters and `partial_o` / `partial_lse`
    /// floats of partial states.
    pub fn new(work_bytes: usize, counters: usize, partial_o: usize, partial_lse: usize) -> Self {
        let align = |x: usize| x.div_ceil(256) * 256;
        let work = 256;
        let counters_at = work + align(work_bytes);
        let partial_o_at = counters_at + align(counters * 4);
        let partial_lse_at = partial_o_at + align(partial_o * 4);
        PlanLayout {
            num_work: 0,
            work,
            counters: counters_at,
            partial_o: partial_o_at,
            partial_lse: partial_lse_at,
            total: partial_lse_at + align(partial_lse * 4),
        }
    }
}

impl Workspace {
    /// Writes a plan into the workspace with one host-to-device copy on `stream`: the number of
    /// items and the items where `layout` puts them, and zeros everywhere else up to the partial
    /// states (the counters, which kernels expect zeroed).
    pub fn upload_plan<T: PlanItem>(
        &mut self,
        stream: &CudaStream,
        layout: &PlanLayout,
        items: &[T],
    ) -> Result<()> {
        let (count_at, items_at, len) = (layout.num_work, layout.work, layout.partial_o);
        let item_bytes = std::mem::size_of_val(items);
        let count = i32::try_from(items.len()).map_err(|_| {
            crate::error::invalid("items", format!("{} work items is too many", items.len()))
        })?;
        if count_at + 4 > len || items_at + item_bytes > len || len > self.bytes {
            return Err(Error::WorkspaceTooSmall {
                arg: "workspace",
                needed: len.max(count_at + 4).max(items_at + item_bytes),
                given: self.bytes,
            });
        }
        let ctx = stream.context();
        let (buf, done) = match self.staging.take() {
            Some(staging) if staging.0.len() >= len => self.staging.insert(staging),
            old => {
                // Growing: the old buffer may still be read by its last copy.
                if let Some((_, done)) = &old {
                    done.synchronize()?;
                }
                // SAFETY: every byte of the staging buffer a copy reads is written below first.
                let buf = unsafe { ctx.alloc_pinned::<u8>(len.next_power_of_two().max(4096)) }?;
                let done = ctx.new_event(Some(CUevent_flags::CU_EVENT_DISABLE_TIMING))?;
                self.staging.insert((buf, done))
            }
        };
        // The previous plan's copy must have read the buffer before it is rewritten (it usually
        // has: a step's launches sit between two plans).
        done.synchronize()?;
        let host = &mut buf.as_mut_slice()?[..len];
        host[..items_at].fill(0);
        host[count_at..count_at + 4].copy_from_slice(&count.to_ne_bytes());
        // SAFETY: T is PlanItem: repr(C) with every byte initialised.
        let bytes = unsafe { std::slice::from_raw_parts(items.as_ptr() as *const u8, item_bytes) };
        host[items_at..items_at + item_bytes].copy_from_slice(bytes);
        // Padding and the arrival counters.
        host[items_at + item_bytes..].fill(0);
        // SAFETY: the workspace holds at least len bytes (checked); the source is page-locked and
        // not written again before `done` (recorded right after) has completed.
        unsafe {
            cudarc::driver::sys::cuMemcpyHtoDAsync_v2(
                self.ptr,
                host.as_ptr() as *const _,
                len,
                stream.cu_stream(),
            )
            .result()?;
        }
        done.record(stream)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_layout_pieces_are_aligned_in_order_and_disjoint() {
        let l = PlanLayout::new(28 * 5, 7, 3 * 128, 3);
        assert_eq!((l.num_work, l.work), (0, 256));
        assert_eq!(l.counters, 256 + 256);
        assert_eq!(l.partial_o, l.counters + 256);
        assert_eq!(l.partial_lse, l.partial_o + 3 * 128 * 4); // 1536 bytes, already aligned
        assert_eq!(l.total, l.partial_lse + 256);
        for x in [l.work, l.counters, l.partial_o, l.partial_lse, l.total] {
            assert_eq!(x % 256, 0);
        }
        // Nothing split: no counters, no partial states.
        let l = PlanLayout::new(0, 0, 0, 0);
        assert_eq!((l.counters, l.partial_o, l.total), (256, 256, 256));
    }
}
