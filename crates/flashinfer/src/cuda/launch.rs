//! Kernel launches: one place that calls `cuLaunchKernel` and checks its result.

use std::ffi::c_void;

use cudarc::driver::sys::{self, CUfunction};
use cudarc::driver::CudaStream;

use crate::error::Result;

/// Grid, block and dynamic shared memory of a launch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LaunchConfig {
    pub grid: (u32, u32, u32),
    pub block: (u32, u32, u32),
    pub smem_bytes: u32,
}

/// Launches `func` on `stream`; `args` holds a pointer to each kernel parameter, in order.
///
/// # Safety
/// `args` must match the kernel's parameter list exactly (count, order, sizes), and every device
/// pointer among them must be valid for the accesses the kernel makes with this configuration.
pub unsafe fn launch(
    func: CUfunction,
    cfg: LaunchConfig,
    stream: &CudaStream,
    args: &mut [*mut c_void],
) -> Result<()> {
    let (gx, gy, gz) = cfg.grid;
    let (bx, by, bz) = cfg.block;
    if gx == 0 || gy == 0 || gz == 0 {
        return Ok(()); // nothing to do: an empty batch
    }
    // SAFETY: see the function's contract.
    unsafe {
        sys::cuLaunchKernel(
            func,
            gx,
            gy,
            gz,
            bx,
            by,
            bz,
            cfg.smem_bytes,
            stream.cu_stream(),
            args.as_mut_ptr(),
            std::ptr::null_mut(),
        )
        .result()?;
    }
    Ok(())
}

/// Builds the `args` array for [`launch`] from references to the parameters.
#[macro_export]
#[doc(hidden)]
macro_rules! kernel_args {
    ($($a:expr),* $(,)?) => {
        [$(($a) as *const _ as *mut ::std::ffi::c_void),*]
    };
}
