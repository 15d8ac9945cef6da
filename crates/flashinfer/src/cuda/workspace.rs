//! Workspace buffers: device scratch memory the plans lay out (partial states of split-KV, work
//! lists). A plan states how many bytes it needs; `run()` checks before launching.

use std::sync::Arc;

use cudarc::driver::sys::CUdeviceptr;
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr};

use crate::error::{Error, Result};

/// A device byte buffer, owned by the engine or borrowed from the caller.
pub struct Workspace {
    ptr: CUdeviceptr,
    bytes: usize,
    _owned: Option<CudaSlice<u8>>,
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

impl Workspace {
    /// Writes a plan into the workspace with one host-to-device copy on `stream`: the number of
    /// items as an `i32` at byte `count_at`, the items at byte `items_at`, and zeros everywhere
    /// else up to byte `len` (counters that kernels expect zeroed).
    pub fn upload_plan<T: PlanItem>(
        &self,
        stream: &CudaStream,
        count_at: usize,
        items_at: usize,
        items: &[T],
        len: usize,
    ) -> Result<()> {
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
        let mut host = vec![0u8; len];
        host[count_at..count_at + 4].copy_from_slice(&count.to_ne_bytes());
        // SAFETY: T is PlanItem: repr(C) with every byte initialised.
        let bytes = unsafe { std::slice::from_raw_parts(items.as_ptr() as *const u8, item_bytes) };
        host[items_at..items_at + item_bytes].copy_from_slice(bytes);
        // SAFETY: the workspace holds at least len bytes (checked); the copy is ordered on the
        // stream before any later launch on it, and the source is pageable host memory, which the
        // driver stages before the call returns (so `host` may be dropped right after).
        unsafe {
            cudarc::driver::sys::cuMemcpyHtoDAsync_v2(
                self.ptr,
                host.as_ptr() as *const _,
                len,
                stream.cu_stream(),
            )
            .result()?;
        }
        Ok(())
    }
}
