//! [`Jit`]: NVRTC plus the disk cache. Turns a [`KernelSpec`] into a CUBIN for one architecture.

use std::path::PathBuf;
use std::sync::{Mutex, OnceLock};
use std::time::Instant;

use super::arch::Arch;
use super::cache::{cache_key, DiskCache};
use super::discover::{find_nvrtc, SearchEnv};
use super::headers::HEADERS;
use super::nvrtc::{CompileFailure, Nvrtc};
use super::options::compile_options;
use super::spec::KernelSpec;
use crate::error::{Error, Result};

/// What discovery found; shown by `flashinfer info`.
#[derive(Clone, Debug)]
pub struct Toolkit {
    /// The libnvrtc loaded: a full path, or a bare name the dynamic linker resolved.
    pub nvrtc_library: PathBuf,
    /// Which search step found it (`$CUDA_HOME=/usr/local/cuda-12.8`, `$VIRTUAL_ENV`, ...).
    pub found_by: String,
    /// NVRTC's (major, minor) version.
    pub nvrtc_version: (u32, u32),
    /// The `libnvrtc-builtins` we preloaded next to it, if any.
    pub builtins_library: Option<PathBuf>,
    /// The CUDA include directory passed to NVRTC; `None` when no CUDA headers were found, which
    /// is fine for our own kernels.
    pub include_dir: Option<PathBuf>,
}

impl std::fmt::Display for Toolkit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (major, minor) = self.nvrtc_version;
        writeln!(
            f,
            "NVRTC {major}.{minor}: {} (found by {})",
            self.nvrtc_library.display(),
            self.found_by
        )?;
        if let Some(builtins) = &self.builtins_library {
            writeln!(f, "NVRTC builtins: {}", builtins.display())?;
        }
        match &self.include_dir {
            Some(dir) => write!(f, "CUDA headers: {}", dir.display()),
            None => write!(
                f,
                "CUDA headers: not found (not needed by flashinfer's own kernels)"
            ),
        }
    }
}

/// A compiled kernel.
#[derive(Clone, Debug)]
pub struct Cubin {
    /// The CUBIN (an ELF image for exactly one architecture).
    pub bytes: Vec<u8>,
    /// The full cache key (SHA-256 hex).
    pub key: String,
    /// True when read from the disk cache, false when NVRTC ran in this call.
    pub from_cache: bool,
    /// Time spent in NVRTC in this call (0 for a cache hit).
    pub compile_ms: f64,
}

/// The JIT compiler: a loaded NVRTC, the toolkit paths and the disk cache.
pub struct Jit {
    nvrtc: Nvrtc,
    toolkit: Toolkit,
    cache: DiskCache,
}

impl std::fmt::Debug for Jit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Jit")
            .field("toolkit", &self.toolkit)
            .field("cache", &self.cache)
            .finish()
    }
}

impl Jit {
    /// Finds and loads NVRTC from the places this process's environment points at, and opens the
    /// default disk cache. Fails with [`Error::NotFound`] (listing every place searched and how
    /// to install NVRTC) when there is no usable libnvrtc.
    pub fn new() -> Result<Jit> {
        Jit::with(&SearchEnv::from_process(), DiskCache::open_default()?)
    }

    /// Like [`Jit::new`], with explicit search places and cache.
    pub fn with(search: &SearchEnv, cache: DiskCache) -> Result<Jit> {
        let found = find_nvrtc(search, Nvrtc::load)?;
        let nvrtc = found.loaded;
        let toolkit = Toolkit {
            nvrtc_library: found.library,
            found_by: found.origin,
            nvrtc_version: nvrtc.version(),
            builtins_library: nvrtc.builtins().map(PathBuf::from),
            include_dir: found.include_dir,
        };
        tracing::info!(
            nvrtc = %toolkit.nvrtc_library.display(),
            version = ?toolkit.nvrtc_version,
            include = ?toolkit.include_dir,
            cache = %cache.cache_dir().display(),
            "JIT ready"
        );
        Ok(Jit {
            nvrtc,
            toolkit,
            cache,
        })
    }

    /// The process-wide JIT, created on first use. A failure is returned (not cached): each call
    /// searches again, so installing NVRTC and retrying works without a restart.
    pub fn shared() -> Result<&'static Jit> {
        static SHARED: OnceLock<Jit> = OnceLock::new();
        static INIT: Mutex<()> = Mutex::new(());
        if let Some(jit) = SHARED.get() {
            return Ok(jit);
        }
        // One thread searches at a time; the others then find it done. A poisoned lock only
        // means a panic elsewhere while searching; the `()` it guards cannot be inconsistent.
        let _guard = INIT.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(jit) = SHARED.get() {
            return Ok(jit);
        }
        let jit = Jit::new()?;
        Ok(SHARED.get_or_init(|| jit))
    }

    /// What discovery found.
    pub fn toolkit(&self) -> &Toolkit {
        &self.toolkit
    }

    /// The disk cache this JIT reads and writes.
    pub fn cache(&self) -> &DiskCache {
        &self.cache
    }

    /// The full NVRTC option list for `arch`, with `extra` options appended.
    pub fn options(&self, arch: Arch, extra: &[String]) -> Vec<String> {
        compile_options(arch, self.toolkit.include_dir.as_deref(), extra)
    }

    /// The cache key of `spec` compiled for `arch` with `extra` options.
    pub fn key(&self, spec: &KernelSpec, arch: Arch, extra: &[String]) -> String {
        let options = self.options(arch, extra);
        cache_key(
            &spec.source,
            HEADERS,
            &options,
            &arch.sm_name(),
            self.toolkit.nvrtc_version,
        )
    }

    /// The CUBIN of `spec` for `arch`: from the disk cache, or compiled and stored.
    pub fn cubin(&self, spec: &KernelSpec, arch: Arch) -> Result<Cubin> {
        self.cubin_with_options(spec, arch, &[])
    }

    /// [`Jit::cubin`] with extra NVRTC options (part of the cache key).
    pub fn cubin_with_options(
        &self,
        spec: &KernelSpec,
        arch: Arch,
        extra: &[String],
    ) -> Result<Cubin> {
        spec.validate()?;
        let options = self.options(arch, extra);
        let key = cache_key(
            &spec.source,
            HEADERS,
            &options,
            &arch.sm_name(),
            self.toolkit.nvrtc_version,
        );
        let mut compile_ms = 0.0;
        let lookup = self.cache.get_or_insert_with(&spec.name, &key, || {
            let start = Instant::now();
            let bytes = self.compile_with(spec, arch, &options)?;
            compile_ms = start.elapsed().as_secs_f64() * 1e3;
            Ok(bytes)
        })?;
        if lookup.from_cache {
            tracing::debug!(kernel = %spec.name, %arch, key = &key[..16], "JIT cache hit");
        } else {
            tracing::info!(
                kernel = %spec.name,
                %arch,
                key = &key[..16],
                bytes = lookup.bytes.len(),
                "compiled in {compile_ms:.0} ms"
            );
        }
        Ok(Cubin {
            bytes: lookup.bytes,
            key,
            from_cache: lookup.from_cache,
            compile_ms,
        })
    }

    /// Compiles `spec` for `arch` without reading or writing the cache (the compile-only tests).
    pub fn compile_uncached(&self, spec: &KernelSpec, arch: Arch) -> Result<Cubin> {
        spec.validate()?;
        let options = self.options(arch, &[]);
        let key = cache_key(
            &spec.source,
            HEADERS,
            &options,
            &arch.sm_name(),
            self.toolkit.nvrtc_version,
        );
        let start = Instant::now();
        let bytes = self.compile_with(spec, arch, &options)?;
        let compile_ms = start.elapsed().as_secs_f64() * 1e3;
        tracing::debug!(kernel = %spec.name, %arch, "compiled (uncached) in {compile_ms:.0} ms");
        Ok(Cubin {
            bytes,
            key,
            from_cache: false,
            compile_ms,
        })
    }

    fn compile_with(&self, spec: &KernelSpec, arch: Arch, options: &[String]) -> Result<Vec<u8>> {
        if !spec.supports(arch) {
            return Err(Error::Unsupported(format!(
                "`{}` needs {} or newer; this GPU is {arch}",
                spec.name, spec.min_arch
            )));
        }
        let compile_error = |log: String| Error::Compile {
            kernel: spec.name.clone(),
            arch: arch.sm_name(),
            log,
        };
        let bytes = match self
            .nvrtc
            .compile_cubin(&spec.name, &spec.source, HEADERS, options)
        {
            Ok(bytes) => bytes,
            Err(CompileFailure::Rejected { log }) => return Err(compile_error(log)),
            Err(CompileFailure::Call(e)) => return Err(e),
        };
        if !bytes.starts_with(b"\x7fELF") {
            return Err(Error::Nvrtc {
                call: "nvrtcGetCUBIN",
                message: format!("`{}`: the CUBIN is not an ELF image", spec.name),
            });
        }
        // Catch a kernel that is missing or not `extern "C"` (so mangled) here, on any machine,
        // rather than at module load on a GPU. Symbol names sit NUL-separated in the string table.
        let missing: Vec<&str> = spec
            .entries
            .iter()
            .map(String::as_str)
            .filter(|entry| !has_symbol(&bytes, entry))
            .collect();
        if !missing.is_empty() {
            return Err(compile_error(format!(
                "entry point(s) {missing:?} not found in the CUBIN: each must be defined as \
                 `extern \"C\" __global__` in the source"
            )));
        }
        Ok(bytes)
    }
}

/// Whether `name` appears as a whole string in one of the ELF's string tables.
fn has_symbol(elf: &[u8], name: &str) -> bool {
    let mut needle = Vec::with_capacity(name.len() + 2);
    needle.push(0);
    needle.extend_from_slice(name.as_bytes());
    needle.push(0);
    elf.windows(needle.len()).any(|w| w == needle.as_slice())
}
