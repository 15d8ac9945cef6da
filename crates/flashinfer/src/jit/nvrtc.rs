//! Our own binding of the NVRTC C API, loaded at run time with libloading.
//!
//! We don't use cudarc's NVRTC module: it panics when the library is missing, and a missing
//! compiler must be an [`Error::NotFound`] that says where we looked. Only the calls the JIT needs
//! are bound. NVRTC is thread-safe as long as one program is not used from two threads at once,
//! and each [`Program`] here lives inside one call, so [`Nvrtc`] is `Send + Sync`.

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::path::{Path, PathBuf};

use crate::error::{invalid, Error, Result};

type NvrtcResult = c_int;
type NvrtcProgram = *mut c_void;

const NVRTC_SUCCESS: NvrtcResult = 0;

type VersionFn = unsafe extern "C" fn(*mut c_int, *mut c_int) -> NvrtcResult;
type GetErrorStringFn = unsafe extern "C" fn(NvrtcResult) -> *const c_char;
type CreateProgramFn = unsafe extern "C" fn(
    *mut NvrtcProgram,
    *const c_char,
    *const c_char,
    c_int,
    *const *const c_char,
    *const *const c_char,
) -> NvrtcResult;
type CompileProgramFn =
    unsafe extern "C" fn(NvrtcProgram, c_int, *const *const c_char) -> NvrtcResult;
type GetSizeFn = unsafe extern "C" fn(NvrtcProgram, *mut usize) -> NvrtcResult;
type GetBytesFn = unsafe extern "C" fn(NvrtcProgram, *mut c_char) -> NvrtcResult;
type DestroyProgramFn = unsafe extern "C" fn(*mut NvrtcProgram) -> NvrtcResult;

/// Function pointers copied out of the library. They stay valid while `Nvrtc::_lib` is loaded,
/// which is as long as the `Nvrtc` that holds both lives.
struct Api {
    version: VersionFn,
    get_error_string: GetErrorStringFn,
    create_program: CreateProgramFn,
    compile_program: CompileProgramFn,
    get_program_log_size: GetSizeFn,
    get_program_log: GetBytesFn,
    get_cubin_size: GetSizeFn,
    get_cubin: GetBytesFn,
    destroy_program: DestroyProgramFn,
}

/// A loaded libnvrtc.
pub(crate) struct Nvrtc {
    api: Api,
    version: (u32, u32),
    builtins: Option<PathBuf>,
    // Fields drop in declaration order: libnvrtc goes before the builtins it may have opened.
    _lib: libloading::Library,
    _builtins_lib: Option<libloading::Library>,
}

/// Why a compile failed: NVRTC rejected the source (with its log), or a call failed.
pub(crate) enum CompileFailure {
    Rejected { log: String },
    Call(Error),
}

impl From<Error> for CompileFailure {
    fn from(e: Error) -> Self {
        CompileFailure::Call(e)
    }
}

impl Nvrtc {
    /// Loads libnvrtc from `library` (a full path, or a bare name for the dynamic linker), and,
    /// for a full path, preloads the matching `libnvrtc-builtins` from the same folder. The error
    /// is a sentence for discovery's list of places searched.
    pub(crate) fn load(library: &Path) -> std::result::Result<Nvrtc, String> {
        if library.components().count() > 1 && !library.is_file() {
            return Err("no such file".into());
        }
        // SAFETY: loading a shared library runs its initialisers. libnvrtc's are NVIDIA's own and
        // have no preconditions; we load it exactly as cudarc and PyTorch do.
        let lib = unsafe { libloading::Library::new(library) }.map_err(|e| describe(&e))?;
        let api =
            load_api(&lib).map_err(|e| format!("not a usable libnvrtc ({})", describe(&e)))?;
        let (mut major, mut minor) = (0, 0);
        // SAFETY: `version` was resolved from this live library with the signature NVRTC
        // documents; both pointers are valid for writes.
        let status = unsafe { (api.version)(&mut major, &mut minor) };
        if status != NVRTC_SUCCESS || major <= 0 {
            return Err(format!("nvrtcVersion failed with status {status}"));
        }
        let version = (major as u32, minor.max(0) as u32);
        let (builtins, builtins_lib) = match library.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => preload_builtins(dir, version),
            _ => (None, None),
        };
        Ok(Nvrtc {
            api,
            version,
            builtins,
            _lib: lib,
            _builtins_lib: builtins_lib,
        })
    }

    /// NVRTC's (major, minor) version, e.g. (13, 0).
    pub(crate) fn version(&self) -> (u32, u32) {
        self.version
    }

    /// The builtins library we preloaded, if any.
    pub(crate) fn builtins(&self) -> Option<&Path> {
        self.builtins.as_deref()
    }

    fn error_string(&self, status: NvrtcResult) -> String {
        // SAFETY: nvrtcGetErrorString accepts any value and returns a pointer to a static,
        // NUL-terminated string (or NULL, which we check).
        let ptr = unsafe { (self.api.get_error_string)(status) };
        if ptr.is_null() {
            return format!("NVRTC status {status}");
        }
        // SAFETY: non-null, NUL-terminated, static storage (NVRTC's documented contract).
        unsafe { CStr::from_ptr(ptr) }
            .to_string_lossy()
            .into_owned()
    }

    fn check(&self, call: &'static str, status: NvrtcResult) -> Result<()> {
        if status == NVRTC_SUCCESS {
            Ok(())
        } else {
            Err(Error::Nvrtc {
                call,
                message: self.error_string(status),
            })
        }
    }

    /// Compiles one translation unit with the given headers and options and returns its CUBIN.
    /// `options` must select a real architecture (`--gpu-architecture=sm_XX`), else NVRTC makes
    /// no CUBIN and this returns an error.
    pub(crate) fn compile_cubin(
        &self,
        program_name: &str,
        source: &str,
        headers: &[(&str, &str)],
        options: &[String],
    ) -> std::result::Result<Vec<u8>, CompileFailure> {
        let c_source = c_string("spec.source", source)?;
        let c_name = c_string("spec.name", &format!("{program_name}.cu"))?;
        let header_names = headers
            .iter()
            .map(|(n, _)| c_string("header name", n))
            .collect::<Result<Vec<_>>>()?;
        let header_texts = headers
            .iter()
            .map(|(_, t)| c_string("header", t))
            .collect::<Result<Vec<_>>>()?;
        let c_options = options
            .iter()
            .map(|o| c_string("options", o))
            .collect::<Result<Vec<_>>>()?;
        let name_ptrs: Vec<*const c_char> = header_names.iter().map(|s| s.as_ptr()).collect();
        let text_ptrs: Vec<*const c_char> = header_texts.iter().map(|s| s.as_ptr()).collect();
        let option_ptrs: Vec<*const c_char> = c_options.iter().map(|s| s.as_ptr()).collect();

        let program = Program::create(self, &c_source, &c_name, &text_ptrs, &name_ptrs)?;
        let num_options = c_int::try_from(option_ptrs.len())
            .map_err(|_| invalid("options", "too many compile options"))?;
        // SAFETY: `program` is a live program; `option_ptrs` holds `num_options` pointers to
        // NUL-terminated strings owned by `c_options`, which outlives the call.
        let status =
            unsafe { (self.api.compile_program)(program.raw, num_options, option_ptrs.as_ptr()) };
        let log = program.log()?;
        if status != NVRTC_SUCCESS {
            let what = self.error_string(status);
            let log = if log.trim().is_empty() {
                what
            } else if what.contains("COMPILATION") {
                log
            } else {
                format!("{log}\n({what})")
            };
            return Err(CompileFailure::Rejected { log });
        }
        if !log.trim().is_empty() {
            tracing::debug!(kernel = program_name, "NVRTC warnings:\n{log}");
        }
        Ok(program.cubin()?)
    }
}

/// An `nvrtcProgram`, destroyed on drop.
struct Program<'a> {
    nvrtc: &'a Nvrtc,
    raw: NvrtcProgram,
}

impl<'a> Program<'a> {
    fn create(
        nvrtc: &'a Nvrtc,
        source: &CStr,
        name: &CStr,
        header_texts: &[*const c_char],
        header_names: &[*const c_char],
    ) -> Result<Program<'a>> {
        let num_headers = c_int::try_from(header_texts.len())
            .map_err(|_| invalid("headers", "too many headers"))?;
        let mut raw: NvrtcProgram = std::ptr::null_mut();
        // SAFETY: `raw` is valid for a write; `source` and `name` are NUL-terminated; both header
        // arrays hold `num_headers` pointers to NUL-terminated strings that outlive the call
        // (NVRTC copies them into the program).
        let status = unsafe {
            (nvrtc.api.create_program)(
                &mut raw,
                source.as_ptr(),
                name.as_ptr(),
                num_headers,
                header_texts.as_ptr(),
                header_names.as_ptr(),
            )
        };
        nvrtc.check("nvrtcCreateProgram", status)?;
        Ok(Program { nvrtc, raw })
    }

    /// Reads a byte buffer whose size NVRTC reports first (the log, the CUBIN).
    fn read(
        &self,
        size_call: &'static str,
        size_fn: GetSizeFn,
        get_call: &'static str,
        get_fn: GetBytesFn,
    ) -> Result<Vec<u8>> {
        let mut size = 0usize;
        // SAFETY: live program; `size` is valid for a write.
        self.nvrtc
            .check(size_call, unsafe { size_fn(self.raw, &mut size) })?;
        let mut buf = vec![0u8; size.max(1)];
        // SAFETY: live program; `buf` has room for the `size` bytes NVRTC just reported.
        self.nvrtc.check(get_call, unsafe {
            get_fn(self.raw, buf.as_mut_ptr().cast())
        })?;
        buf.truncate(size);
        Ok(buf)
    }

    fn log(&self) -> Result<String> {
        let api = &self.nvrtc.api;
        let mut bytes = self.read(
            "nvrtcGetProgramLogSize",
            api.get_program_log_size,
            "nvrtcGetProgramLog",
            api.get_program_log,
        )?;
        // The size includes the terminating NUL.
        while bytes.last() == Some(&0) {
            bytes.pop();
        }
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    fn cubin(&self) -> Result<Vec<u8>> {
        let api = &self.nvrtc.api;
        let cubin = self.read(
            "nvrtcGetCUBINSize",
            api.get_cubin_size,
            "nvrtcGetCUBIN",
            api.get_cubin,
        )?;
        if cubin.is_empty() {
            return Err(Error::Nvrtc {
                call: "nvrtcGetCUBIN",
                message: "NVRTC produced no CUBIN (was a virtual compute_XX architecture given?)"
                    .into(),
            });
        }
        Ok(cubin)
    }
}

impl Drop for Program<'_> {
    fn drop(&mut self) {
        // SAFETY: `raw` came from a successful nvrtcCreateProgram and is destroyed only here.
        let status = unsafe { (self.nvrtc.api.destroy_program)(&mut self.raw) };
        if status != NVRTC_SUCCESS {
            tracing::debug!(
                "nvrtcDestroyProgram failed: {}",
                self.nvrtc.error_string(status)
            );
        }
    }
}

/// libloading's error with its cause (dlerror's text), which its Display leaves out.
fn describe(e: &libloading::Error) -> String {
    match std::error::Error::source(e) {
        Some(cause) => format!("{e}: {cause}"),
        None => e.to_string(),
    }
}

fn c_string(arg: &'static str, s: &str) -> Result<CString> {
    CString::new(s).map_err(|_| invalid(arg, "contains a NUL byte"))
}

/// Resolves every function we use. A library missing any of them is not a usable libnvrtc.
fn load_api(lib: &libloading::Library) -> std::result::Result<Api, libloading::Error> {
    /// Copies a function pointer out of the library.
    ///
    /// # Safety
    /// `T` must be the exact C signature of `name` in the NVRTC API.
    unsafe fn sym<T: Copy>(lib: &libloading::Library, name: &str) -> Result<T, libloading::Error> {
        // SAFETY: forwarded to the caller: `T` is the symbol's true type.
        unsafe { lib.get::<T>(name).map(|s| *s) }
    }
    // SAFETY: each type alias above transcribes the prototype in nvrtc.h for that name.
    unsafe {
        Ok(Api {
            version: sym(lib, "nvrtcVersion")?,
            get_error_string: sym(lib, "nvrtcGetErrorString")?,
            create_program: sym(lib, "nvrtcCreateProgram")?,
            compile_program: sym(lib, "nvrtcCompileProgram")?,
            get_program_log_size: sym(lib, "nvrtcGetProgramLogSize")?,
            get_program_log: sym(lib, "nvrtcGetProgramLog")?,
            get_cubin_size: sym(lib, "nvrtcGetCUBINSize")?,
            get_cubin: sym(lib, "nvrtcGetCUBIN")?,
            destroy_program: sym(lib, "nvrtcDestroyProgram")?,
        })
    }
}

/// libnvrtc opens `libnvrtc-builtins.so.<major>.<minor>` by bare name when it first compiles.
/// It has no RUNPATH, so when we loaded it by full path from a folder the dynamic linker does not
/// search (a pip wheel), that open fails ("failed to open libnvrtc-builtins.so.13.0"). Loading the
/// builtins first by full path makes the later open by name find the already-loaded library
/// (the dynamic linker matches loaded libraries by SONAME). Failure here is not fatal: the
/// dynamic linker may still find it by itself (a system toolkit in ld.so.cache).
fn preload_builtins(
    dir: &Path,
    (major, minor): (u32, u32),
) -> (Option<PathBuf>, Option<libloading::Library>) {
    let candidates: Vec<PathBuf> = if cfg!(windows) {
        vec![dir.join(format!("nvrtc-builtins64_{major}{minor}.dll"))]
    } else {
        vec![
            dir.join(format!("libnvrtc-builtins.so.{major}.{minor}")),
            dir.join("libnvrtc-builtins.so"),
        ]
    };
    for path in candidates.into_iter().filter(|p| p.is_file()) {
        // SAFETY: as for libnvrtc itself: NVIDIA's library, no initialiser preconditions.
        match unsafe { libloading::Library::new(&path) } {
            Ok(lib) => {
                tracing::debug!("preloaded {}", path.display());
                return (Some(path), Some(lib));
            }
            Err(e) => tracing::debug!("could not preload {}: {}", path.display(), describe(&e)),
        }
    }
    (None, None)
}
