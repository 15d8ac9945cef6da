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
