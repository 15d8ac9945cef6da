//! Loaded modules: CUBINs from the [`Jit`] loaded into one CUDA context, each once.
//!
//! The cuda layer owns one [`ModuleRegistry`] per device context. Ops ask it for their kernel's
//! module on every `run()`, so a hit is a map lookup (plus a source comparison that catches two
//! different specs sharing a name); a miss compiles (or reads the disk cache) outside the lock,
//! so a long compile never blocks launches of kernels that are already loaded.

use std::collections::HashMap;
use std::ffi::CString;
use std::sync::{Arc, Mutex, PoisonError};

use cudarc::driver::{result, sys, CudaContext};

use super::arch::Arch;
use super::compiler::Jit;
use super::spec::KernelSpec;
use crate::error::{invalid, Error, Result};

/// The modules loaded into one CUDA context, by kernel name and architecture.
#[derive(Default)]
pub struct ModuleRegistry {
    modules: Mutex<HashMap<String, Arc<LoadedModule>>>,
}

impl std::fmt::Debug for ModuleRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModuleRegistry")
            .field("loaded", &self.len())
            .finish()
    }
}

impl ModuleRegistry {
    pub fn new() -> ModuleRegistry {
        ModuleRegistry::default()
    }

    /// Number of modules loaded.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    // The map is only inserted into and read; a panic elsewhere cannot leave it half-updated.
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<LoadedModule>>> {
        self.modules.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The module of `spec` for `arch` in `ctx`: already loaded, or compiled (through `jit`'s
    /// disk cache) and loaded now, with every entry point resolved.
    pub fn get_or_load(
        &self,
        ctx: &Arc<CudaContext>,
        spec: &KernelSpec,
        jit: &Jit,
        arch: Arch,
    ) -> Result<Arc<LoadedModule>> {
        let map_key = format!("{}@{}", spec.name, arch.sm_name());
        let existing = self.lock().get(&map_key).cloned();
        if let Some(module) = existing {
            module.check_matches(ctx, spec)?;
            return Ok(module);
        }
        let cubin = jit.cubin(spec, arch)?;
        let loaded = Arc::new(LoadedModule::load(
            ctx,
            spec,
            arch,
            &cubin.bytes,
            cubin.key,
        )?);
        for entry in &spec.entries {
            loaded.function(entry)?;
        }
        // Two threads may have loaded it at once; keep the first, drop (unload) ours.
        let module = self.lock().entry(map_key).or_insert(loaded).clone();
        module.check_matches(ctx, spec)?;
        Ok(module)
    }
}

/// A `CUfunction` that may be sent and shared between threads.
///
/// It is valid only while the [`LoadedModule`] it came from is alive: keep the module's `Arc`
/// for as long as you launch the function.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelFunction(sys::CUfunction);

// SAFETY: a CUfunction is an opaque handle owned by the driver, not by the thread that obtained
// it. The driver API is thread-safe, and using the handle from any thread (with its context
// current) is supported; the wrapper gives no access to anything thread-local.
unsafe impl Send for KernelFunction {}
// SAFETY: as above; the handle is never mutated through a shared reference.
unsafe impl Sync for KernelFunction {}

impl KernelFunction {
    /// The raw handle, for `cuLaunchKernel`.
    pub fn raw(self) -> sys::CUfunction {
        self.0
    }
}

struct FunctionEntry {
    function: KernelFunction,
    /// The largest `MAX_DYNAMIC_SHARED_SIZE_BYTES` set so far (0: the driver's default).
    max_dynamic_smem: usize,
}

/// One CUBIN loaded into a context. Unloaded when the last `Arc` goes.
pub struct LoadedModule {
    ctx: Arc<CudaContext>,
    module: sys::CUmodule,
    name: String,
    source: String,
    arch: Arch,
    key: String,
    functions: Mutex<HashMap<String, FunctionEntry>>,
}

// SAFETY: `module` is a driver handle usable from any thread once its context is bound (every
// method binds `ctx` first); all mutable state is behind the `functions` mutex.
unsafe impl Send for LoadedModule {}
// SAFETY: as above.
unsafe impl Sync for LoadedModule {}

impl std::fmt::Debug for LoadedModule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedModule")
            .field("name", &self.name)
            .field("arch", &self.arch)
            .field("key", &self.key)
            .finish()
    }
}

impl LoadedModule {
    fn load(
        ctx: &Arc<CudaContext>,
        spec: &KernelSpec,
        arch: Arch,
        cubin: &[u8],
        key: String,
    ) -> Result<LoadedModule> {
        ctx.bind_to_thread()?;
        // The driver reads the ELF image in place; give it 8-byte alignment, which a Vec<u8>
        // does not promise.
        let aligned: Vec<u64> = cubin
            .chunks(8)
            .map(|chunk| {
                let mut word = [0u8; 8];
                word[..chunk.len()].copy_from_slice(chunk);
                u64::from_ne_bytes(word)
            })
            .collect();
        // SAFETY: `aligned` holds a complete CUBIN (an ELF image NVRTC produced and the cache
        // verified) and lives until the call returns; the driver copies what it keeps. `ctx` is
        // current on this thread, so the module lands in it. The driver library is loaded: a
        // CudaContext exists.
        let module = unsafe { result::module::load_data(aligned.as_ptr().cast()) }?;
        tracing::debug!(kernel = %spec.name, %arch, "module loaded");
        Ok(LoadedModule {
            ctx: ctx.clone(),
            module,
            name: spec.name.clone(),
            source: spec.source.clone(),
            arch,
            key,
            functions: Mutex::new(HashMap::new()),
        })
    }

    /// Errors unless this module was loaded from `spec`'s source into `ctx`.
    fn check_matches(&self, ctx: &Arc<CudaContext>, spec: &KernelSpec) -> Result<()> {
        if self.ctx.cu_ctx() != ctx.cu_ctx() {
            return Err(invalid(
                "ctx",
                format!(
                    "this module registry belongs to device {}'s context",
                    self.ctx.ordinal()
                ),
            ));
        }
        if self.source != spec.source {
            return Err(invalid(
                "spec.name",
                format!(
                    "two different kernel sources share the name `{}`: a spec's name must name \
                     every template parameter",
                    spec.name
                ),
            ));
        }
        Ok(())
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn arch(&self) -> Arch {
        self.arch
    }

    /// The cache key of the CUBIN loaded.
    pub fn key(&self) -> &str {
        &self.key
    }

    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// The raw module handle. Valid while `self` lives.
    pub fn cu_module(&self) -> sys::CUmodule {
        self.module
    }

    fn functions(&self) -> std::sync::MutexGuard<'_, HashMap<String, FunctionEntry>> {
        // Entries are inserted whole; a poisoned map is still consistent.
        self.functions
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// The kernel `name` (an `extern "C"` entry of the spec), looked up once and cached.
    pub fn kernel(&self, name: &str) -> Result<KernelFunction> {
        let mut functions = self.functions();
        if let Some(entry) = functions.get(name) {
            return Ok(entry.function);
        }
        let c_name = CString::new(name).map_err(|_| invalid("name", "contains a NUL byte"))?;
        self.ctx.bind_to_thread()?;
        // SAFETY: `self.module` is loaded (unloaded only in Drop) in `self.ctx`, now current.
        let raw = unsafe { result::module::get_function(self.module, c_name) }.map_err(|e| {
            if e.0 == sys::cudaError_enum::CUDA_ERROR_NOT_FOUND {
                invalid(
                    "name",
                    format!("no kernel `{name}` in module `{}`", self.name),
                )
            } else {
                Error::Driver(e)
            }
        })?;
        let function = KernelFunction(raw);
        functions.insert(
            name.to_string(),
            FunctionEntry {
                function,
                max_dynamic_smem: 0,
            },
        );
        Ok(function)
    }

    /// The raw `CUfunction` of kernel `name`; see [`LoadedModule::kernel`].
    pub fn function(&self, name: &str) -> Result<sys::CUfunction> {
        self.kernel(name).map(KernelFunction::raw)
    }

    /// Lets kernel `name` be launched with `bytes` of dynamic shared memory. Above 48 KiB the
    /// driver requires this opt-in; it fails with [`Error::Unsupported`] when the device cannot
    /// give that much (its opt-in limit, less the kernel's static shared memory).
    pub fn set_max_dynamic_shared_bytes(&self, name: &str, bytes: usize) -> Result<()> {
        let function = self.kernel(name)?;
        let mut functions = self.functions();
        let entry = functions.get_mut(name).ok_or_else(|| {
            invalid(
                "name",
                format!("no kernel `{name}` in module `{}`", self.name),
            )
        })?;
        if bytes <= entry.max_dynamic_smem {
            return Ok(());
        }
        self.ctx.bind_to_thread()?;
        let optin = self.ctx.attribute(
            sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN,
        )?;
        // SAFETY: `function` belongs to this live module, whose context is current.
        let static_smem = unsafe {
            result::function::get_function_attribute(
                function.raw(),
                sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES,
            )
        }?;
        let available = (optin.max(0) as usize).saturating_sub(static_smem.max(0) as usize);
        if bytes > available {
            return Err(Error::Unsupported(format!(
                "kernel `{name}` needs {bytes} bytes of dynamic shared memory; device {} allows \
                 {available} ({optin} per block, {static_smem} used statically)",
                self.ctx.ordinal()
            )));
        }
        // `bytes <= available <= i32::MAX` as both came from i32 attributes.
        let value = i32::try_from(bytes).map_err(|_| invalid("bytes", "too large"))?;
        // SAFETY: as above; the value is within the device's opt-in limit.
        unsafe {
            result::function::set_function_attribute(
                function.raw(),
                sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                value,
            )
        }?;
        entry.max_dynamic_smem = bytes;
        Ok(())
    }
}

impl Drop for LoadedModule {
    fn drop(&mut self) {
        // cuModuleUnload acts on the current context, so make ours current first.
        if let Err(e) = self.ctx.bind_to_thread() {
            tracing::warn!(kernel = %self.name, "cannot unload module: {e}");
            return;
        }
        // SAFETY: `self.module` was loaded in `self.ctx` (now current) and is unloaded only here;
        // every KernelFunction taken from it is documented to die with the module.
        if let Err(e) = unsafe { result::module::unload(self.module) } {
            tracing::warn!(kernel = %self.name, "cuModuleUnload failed: {e}");
        }
    }
}
