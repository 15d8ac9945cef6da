//! A CUDA device: its primary context, its properties, and the kernels loaded into it.

use std::sync::Arc;

use cudarc::driver::sys::CUdevice_attribute as Attr;
use cudarc::driver::{CudaContext, CudaStream};

use crate::error::{Error, Result};
use crate::jit::{Arch, Jit, KernelSpec, LoadedModule, ModuleRegistry};

/// What the planner and the CLI need to know about a GPU.
#[derive(Clone, Debug)]
pub struct DeviceInfo {
    pub ordinal: usize,
    pub name: String,
    /// The GPU's UUID as nvidia-smi prints it (`GPU-...`; empty if the driver does not say):
    /// benchmark records carry it, because two GPUs of the same model measure differently
    /// (docs/perf-notes.md, session 9).
    pub uuid: String,
    pub arch: Arch,
    pub sm_count: usize,
    /// Shared memory one block may use after opting in (`cuFuncSetAttribute`).
    pub max_smem_per_block_optin: usize,
    pub smem_per_sm: usize,
    pub l2_bytes: usize,
    pub total_mem: usize,
}

/// A device context and the stream the engine's ops launch on. Cheap to clone through `Arc`;
/// [`Device::with_stream`] gives a handle on the same context (sharing its loaded kernels) that
/// launches on another stream, e.g. a serving framework's own.
pub struct Device {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    info: DeviceInfo,
    modules: Arc<ModuleRegistry>,
}

/// Names the dynamic linker tries for the driver library.
const DRIVER_NAMES: &[&str] = &["libcuda.so.1", "libcuda.so", "nvcuda.dll"];

/// Whether a CUDA driver library can be loaded at all. cudarc panics when it cannot, so every
/// path into the driver asks this first.
pub(crate) fn driver_present() -> bool {
    static PRESENT: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *PRESENT.get_or_init(|| {
        DRIVER_NAMES.iter().any(|n| {
            // SAFETY: loading the driver library runs its initialisers, which have no
            // preconditions; we keep the handle alive for the process (cudarc loads it again).
            unsafe { libloading::Library::new(*n) }
                .map(std::mem::forget)
                .is_ok()
        })
    })
}

impl Device {
    /// Number of CUDA devices, 0 on a machine without a driver.
    pub fn count() -> usize {
        if !driver_present() {
            return 0;
        }
        CudaContext::device_count()
            .map(|n| n.max(0) as usize)
            .unwrap_or(0)
    }

    /// Opens device `ordinal` (its primary context) with an engine-owned stream.
    pub fn new(ordinal: usize) -> Result<Arc<Self>> {
        if !driver_present() {
            return Err(Error::NoGpu(format!(
                "the CUDA driver library ({}) could not be loaded",
                DRIVER_NAMES.join(", ")
            )));
        }
        let n = Self::count();
        if ordinal >= n {
            return Err(Error::NoGpu(format!(
                "device {ordinal} requested, {n} present"
            )));
        }
        let ctx = CudaContext::new(ordinal)?;
        // The engine orders its own work on one stream; cudarc's per-slice event tracking would
        // add an event record to every launch argument.
        // SAFETY: we never share cudarc slices across streams without synchronising ourselves.
        unsafe { ctx.disable_event_tracking() };
        let attr = |a| ctx.attribute(a).map(|v| v.max(0) as usize);
        let (major, minor) = ctx.compute_capability()?;
        let info = DeviceInfo {
            ordinal,
            name: ctx.name()?,
            uuid: ctx.uuid().map_or(String::new(), |u| format_uuid(&u.bytes)),
            arch: Arch::new(major as u32, minor as u32),
            sm_count: attr(Attr::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?,
            max_smem_per_block_optin: attr(
                Attr::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN,
            )?,
            smem_per_sm: attr(Attr::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_MULTIPROCESSOR)?,
            l2_bytes: attr(Attr::CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE)?,
            total_mem: ctx.total_mem()?,
        };
        let stream = ctx.new_stream()?;
        tracing::info!(?info, "opened CUDA device");
        Ok(Arc::new(Self {
            ctx,
            stream,
            info,
            modules: Arc::default(),
        }))
    }

    pub fn info(&self) -> &DeviceInfo {
        &self.info
    }
    pub fn arch(&self) -> Arch {
        self.info.arch
    }
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }
    /// The stream this handle's ops launch on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }
    /// Kernels loaded into this context.
    pub fn modules(&self) -> &ModuleRegistry {
        &self.modules
    }

    /// The module of `spec`, compiled (or read from the disk cache) and loaded on first use.
    pub fn module(&self, spec: &KernelSpec) -> Result<Arc<LoadedModule>> {
        self.modules
            .get_or_load(&self.ctx, spec, Jit::shared()?, self.info.arch)
    }

    /// Kernel `entry` of `spec`'s module (loaded on first use; the registry keeps it loaded for
    /// the device's lifetime, so the handle stays valid).
    pub fn kernel(
        &self,
        spec: &KernelSpec,
        entry: &str,
    ) -> Result<cudarc::driver::sys::CUfunction> {
        self.module(spec)?.function(entry)
    }

    /// A handle on the same device and loaded kernels whose ops launch on `stream` (a stream of
    /// this device's context).
    pub fn with_stream(&self, stream: Arc<CudaStream>) -> Result<Arc<Device>> {
        if stream.context().cu_ctx() != self.ctx.cu_ctx() {
            return Err(crate::error::invalid(
                "stream",
                "belongs to another CUDA context",
            ));
        }
        Ok(Arc::new(Device {
            ctx: self.ctx.clone(),
            stream,
            info: self.info.clone(),
            modules: self.modules.clone(),
        }))
    }

    /// A handle whose ops launch on a stream owned by the caller (e.g. a framework's current
    /// stream, as a raw `CUstream`).
    ///
    /// # Safety
    /// `raw` must be a live stream of this device's primary context (or the null stream), and must
    /// outlive every use of the returned handle and of work launched through it. The caller orders
    /// its own work on that stream.
    pub unsafe fn with_borrowed_stream(
        &self,
        raw: cudarc::driver::sys::CUstream,
    ) -> Result<Arc<Device>> {
        // SAFETY: forwarded to the caller (see above).
        let stream = unsafe { self.ctx.wrap_borrowed_stream(raw) };
        self.with_stream(stream)
    }
}

/// A device UUID in nvidia-smi's form: `GPU-` and 32 hex digits grouped 8-4-4-4-12.
fn format_uuid(bytes: &[std::ffi::c_char; 16]) -> String {
    let hex: String = bytes.iter().map(|&b| format!("{:02x}", b as u8)).collect();
    format!(
        "GPU-{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

#[cfg(test)]
mod tests {
    use super::format_uuid;

    #[test]
    fn uuid_prints_as_nvidia_smi_does() {
        let bytes: [u8; 16] = [
            0x1f, 0x2e, 0x3d, 0x4c, 0x5b, 0x6a, 0x79, 0x88, 0x97, 0xa6, 0xb5, 0xc4, 0xd3, 0xe2,
            0xf1, 0x00,
        ];
        let as_c = bytes.map(|b| b as std::ffi::c_char);
        assert_eq!(
            format_uuid(&as_c),
            "GPU-1f2e3d4c-5b6a-7988-97a6-b5c4d3e2f100"
        );
    }
}
