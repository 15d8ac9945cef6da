//! The CUDA layer: a device context with what the planner needs to know about the GPU, streams,
//! device tensor views over cudarc slices or caller-owned pointers, workspaces, and launches.
//!
//! The driver library is loaded at run time: nothing here is linked at build time, and every entry
//! point returns [`crate::Error::NoGpu`] on a machine without a driver instead of panicking.

mod device;
mod graph;
mod launch;
mod tensor;
mod workspace;

pub use cudarc::driver::{sys, CudaSlice, CudaStream, DriverError};
pub use device::{Device, DeviceInfo};
pub use graph::Graph;
pub use launch::{launch, LaunchConfig};
pub use tensor::{DevSlice, DevSliceMut, DeviceRepr};
pub use workspace::{PlanItem, PlanLayout, Workspace};
