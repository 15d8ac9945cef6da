//! Finding libnvrtc and the CUDA headers without help from the user.
//!
//! Order (first library that loads wins):
//! 1. `$FLASHINFER_NVRTC_PATH`, an explicit file. When set, nothing else is tried: the user asked
//!    for that library, and silently loading another one would hide their mistake.
//! 2. CUDA toolkits: `$CUDA_HOME`, `$CUDA_PATH`, `/usr/local/cuda`, `$CONDA_PREFIX`
//!    (`lib64/`, `lib/`).
//! 3. The pip wheels `nvidia-cuda-nvrtc` / `nvidia-cuda-runtime` in `$VIRTUAL_ENV`, then in the
//!    site-packages and user site that `python3` reports. CUDA 13 wheels put everything under
//!    `site-packages/nvidia/cu13/{lib,include}`; CUDA 12 wheels use `nvidia/cuda_nvrtc/lib` and
//!    `nvidia/cuda_runtime/include`.
//! 4. Each directory of `$LD_LIBRARY_PATH`.
//! 5. The plain library names, resolved by the dynamic linker (`ld.so.cache`, distro packages).
//!
//! The include directory is optional (our kernels define their own types and need no CUDA header),
//! so its absence is never an error: we prefer the one next to the library found, else the first
//! directory with `cuda_fp16.h` among the same places.

use std::cell::OnceCell;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::error::{Error, Result};

/// How to install what is missing; part of every [`Error::NotFound`] for NVRTC.
pub const INSTALL_HINT: &str = "Install NVRTC and the CUDA headers from PyPI into the active \
     virtualenv: `pip install nvidia-cuda-nvrtc==13.0.88 nvidia-cuda-runtime==13.0.96` (or run \
     scripts/install-nvrtc.sh and export the VIRTUAL_ENV it prints); or install a CUDA toolkit \
     and set CUDA_HOME; or set FLASHINFER_NVRTC_PATH to the libnvrtc file.";

/// The header whose presence marks a CUDA include directory.
const MARKER_HEADER: &str = "cuda_fp16.h";

/// Where discovery looks. [`SearchEnv::from_process`] reads the environment; tests build their
/// own so that they never depend on what this machine has installed.
#[derive(Clone, Debug, Default)]
pub struct SearchEnv {
    /// `$FLASHINFER_NVRTC_PATH`.
    pub nvrtc_path: Option<PathBuf>,
    /// Toolkit roots in order, each with the label shown in error messages (`$CUDA_HOME`, ...).
    /// An empty path stands for a variable that is not set: listed in the error, not searched.
    pub cuda_roots: Vec<(String, PathBuf)>,
    /// `$VIRTUAL_ENV`.
    pub virtual_env: Option<PathBuf>,
    /// The Python interpreter asked for its site-packages; `None` skips asking.
    pub python: Option<OsString>,
    /// `$LD_LIBRARY_PATH`, split.
    pub library_path: Vec<PathBuf>,
    /// Names handed to the dynamic linker as they are, last.
    pub system_names: Vec<String>,
    /// Include directories tried last when no other has the CUDA headers (`/usr/include`).
    pub include_fallbacks: Vec<PathBuf>,
}

impl SearchEnv {
    /// The places this process should look, from its environment variables.
    pub fn from_process() -> SearchEnv {
        let var = |name: &str| {
            std::env::var_os(name)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        };
        let mut cuda_roots = Vec::new();
        for name in ["CUDA_HOME", "CUDA_PATH"] {
            if let Some(root) = var(name) {
                cuda_roots.push((format!("${name}"), root));
            } else {
                cuda_roots.push((format!("${name} (not set)"), PathBuf::new()));
            }
        }
        if cfg!(unix) {
            cuda_roots.push(("default toolkit".into(), PathBuf::from("/usr/local/cuda")));
        }
        if let Some(root) = var("CONDA_PREFIX") {
            cuda_roots.push(("$CONDA_PREFIX".into(), root));
        }
        let library_path_var = if cfg!(windows) {
            "PATH"
        } else {
            "LD_LIBRARY_PATH"
        };
        let library_path = std::env::var_os(library_path_var)
            .map(|v| {
                std::env::split_paths(&v)
                    .filter(|p| !p.as_os_str().is_empty())
                    .collect()
            })
            .unwrap_or_default();
        SearchEnv {
            nvrtc_path: var("FLASHINFER_NVRTC_PATH"),
            cuda_roots,
            virtual_env: var("VIRTUAL_ENV"),
            python: Some(OsString::from(if cfg!(windows) {
                "python"
            } else {
                "python3"
            })),
            library_path,
            system_names: SYSTEM_NAMES.iter().map(|s| s.to_string()).collect(),
            include_fallbacks: if cfg!(unix) {
                vec![PathBuf::from("/usr/include")]
            } else {
                vec![]
            },
        }
    }
}

/// The names the dynamic linker may know libnvrtc by, newest first.
#[cfg(not(windows))]
const SYSTEM_NAMES: &[&str] = &[
    "libnvrtc.so",
    "libnvrtc.so.13",
    "libnvrtc.so.12",
    "libnvrtc.so.11.2",
];
#[cfg(windows)]
const SYSTEM_NAMES: &[&str] = &[
    "nvrtc64_130_0.dll",
    "nvrtc64_120_0.dll",
    "nvrtc64_112_0.dll",
];

/// Library directories inside a toolkit root.
#[cfg(not(windows))]
const ROOT_LIB_DIRS: &[&str] = &["lib64", "lib"];
#[cfg(windows)]
const ROOT_LIB_DIRS: &[&str] = &["bin", "bin/x64"];

/// Whether a file name is a loadable libnvrtc (not the builtins, not the static or `.alt` ones).
fn is_nvrtc_file(name: &str) -> bool {
    if cfg!(windows) {
        name.starts_with("nvrtc64_") && name.ends_with(".dll") && !name.contains("alt")
    } else {
        name == "libnvrtc.so" || name.starts_with("libnvrtc.so.")
    }
}

/// A library that was found and loaded, and where it came from.
#[derive(Clone, Debug)]
pub(crate) struct Found<T> {
    pub loaded: T,
    /// Full path, or a bare name resolved by the dynamic linker.
    pub library: PathBuf,
    /// Which search step found it, e.g. `$VIRTUAL_ENV`.
    pub origin: String,
    pub include_dir: Option<PathBuf>,
}

/// Walks the places of `env` in order, calling `load` on each libnvrtc candidate until one
/// loads. `load` returns why a candidate failed, which ends up in the error's `searched` list.
pub(crate) fn find_nvrtc<T>(
    env: &SearchEnv,
    mut load: impl FnMut(&Path) -> std::result::Result<T, String>,
) -> Result<Found<T>> {
    let mut search = Search {
        env,
        searched: Vec::new(),
        python_sites: OnceCell::new(),
    };

    if let Some(path) = &env.nvrtc_path {
        return match load(path) {
            Ok(loaded) => Ok(Found {
                loaded,
                library: path.clone(),
                origin: "$FLASHINFER_NVRTC_PATH".into(),
                // <toolkit>/lib64/../include, or a wheel's lib/../include.
                include_dir: search.include_dir(
                    path.parent()
                        .and_then(Path::parent)
                        .map(|p| p.join("include")),
                ),
            }),
            Err(why) => Err(Error::NotFound {
                what: "libnvrtc (NVRTC, the CUDA runtime compiler)",
                searched: vec![format!("$FLASHINFER_NVRTC_PATH={}: {why}", path.display())],
                hint: format!(
                    "Point FLASHINFER_NVRTC_PATH at an existing libnvrtc, or unset it to search \
                     the usual places. {INSTALL_HINT}"
                ),
            }),
        };
    }

    for (label, root) in &env.cuda_roots {
        if root.as_os_str().is_empty() {
            search.searched.push(label.clone());
            continue;
        }
        let dirs: Vec<PathBuf> = ROOT_LIB_DIRS.iter().map(|d| root.join(d)).collect();
        let origin = format!("{label}={}", root.display());
        if let Some(found) = search.try_dirs(&origin, &dirs, &mut load) {
            let include = search.include_dir(Some(root.join("include")));
            return Ok(found.with_include(include));
        }
    }

    let venv_sites = match &env.virtual_env {
        Some(venv) => {
            let sites = venv_site_dirs(venv);
            if sites.is_empty() {
                search.searched.push(format!(
                    "$VIRTUAL_ENV={}: no lib/python*/site-packages",
                    venv.display()
                ));
            }
            sites
        }
        None => {
            search.searched.push("$VIRTUAL_ENV (not set)".into());
            Vec::new()
        }
    };
    for site in &venv_sites {
        if let Some(found) = search.try_site("$VIRTUAL_ENV", site, &mut load) {
            return Ok(found);
        }
    }
    let python_sites: Vec<PathBuf> = search
        .python_sites()
        .iter()
        .filter(|s| !venv_sites.contains(s))
        .cloned()
        .collect();
    for site in &python_sites {
        if let Some(found) = search.try_site("python site-packages", site, &mut load) {
            return Ok(found);
        }
    }

    if env.library_path.is_empty() {
        search.searched.push("$LD_LIBRARY_PATH (not set)".into());
    }
    for dir in &env.library_path {
        if let Some(found) =
            search.try_dirs("$LD_LIBRARY_PATH", std::slice::from_ref(dir), &mut load)
        {
            let include = search.include_dir(dir.parent().map(|p| p.join("include")));
            return Ok(found.with_include(include));
        }
    }

    for name in &env.system_names {
        match load(Path::new(name)) {
            Ok(loaded) => {
                let include_dir = search.include_dir(None);
                return Ok(Found {
                    loaded,
                    library: PathBuf::from(name),
                    origin: "dynamic linker".into(),
                    include_dir,
                });
            }
            Err(why) => search
                .searched
                .push(format!("dynamic linker, name {name}: {why}")),
        }
    }

    Err(Error::NotFound {
        what: "libnvrtc (NVRTC, the CUDA runtime compiler)",
        searched: search.searched,
        hint: INSTALL_HINT.into(),
    })
}

impl<T> Found<T> {
    fn with_include(mut self, include_dir: Option<PathBuf>) -> Found<T> {
        self.include_dir = include_dir;
        self
    }
}

struct Search<'a> {
    env: &'a SearchEnv,
    searched: Vec<String>,
    /// What `python3` reported, asked at most once and only when reached.
    python_sites: OnceCell<Vec<PathBuf>>,
}

impl Search<'_> {
    /// Tries every libnvrtc file in `dirs`, newest version first.
    fn try_dirs<T>(
        &mut self,
        origin: &str,
        dirs: &[PathBuf],
        load: &mut impl FnMut(&Path) -> std::result::Result<T, String>,
    ) -> Option<Found<T>> {
        for dir in dirs {
            let files = nvrtc_files_in(dir);
            if files.is_empty() {
                self.searched
                    .push(format!("{origin}: {} (no libnvrtc)", dir.display()));
            }
            for file in files {
                match load(&file) {
                    Ok(loaded) => {
                        return Some(Found {
                            loaded,
                            library: file,
                            origin: origin.to_string(),
                            include_dir: None,
                        })
                    }
                    Err(why) => self
                        .searched
                        .push(format!("{origin}: {}: {why}", file.display())),
                }
            }
        }
        None
    }

    /// Tries the NVIDIA wheels of one site-packages directory.
    fn try_site<T>(
        &mut self,
        origin: &str,
        site: &Path,
        load: &mut impl FnMut(&Path) -> std::result::Result<T, String>,
    ) -> Option<Found<T>> {
        let lib_dirs: Vec<PathBuf> = nvidia_wheel_dirs(site)
            .iter()
            .map(|d| d.join("lib"))
            .collect();
        if lib_dirs.is_empty() {
            self.searched
                .push(format!("{origin}: {} (no nvidia/*/lib)", site.display()));
            return None;
        }
        for lib_dir in &lib_dirs {
            if let Some(found) = self.try_dirs(origin, std::slice::from_ref(lib_dir), load) {
                // The CUDA 13 wheels share one include dir with the library; the CUDA 12 ones
                // keep headers in the runtime wheel's folder.
                let paired = lib_dir.parent().map(|p| p.join("include"));
                let include = match paired.filter(|d| d.join(MARKER_HEADER).is_file()) {
                    Some(dir) => Some(dir),
                    None => self.include_dir(Some(site.join("nvidia/cuda_runtime/include"))),
                };
                return Some(found.with_include(include));
            }
        }
        None
    }

    fn python_sites(&self) -> &[PathBuf] {
        self.python_sites.get_or_init(|| match &self.env.python {
            Some(python) => python_site_dirs(python),
            None => Vec::new(),
        })
    }

    /// `preferred` if it has the CUDA headers, else the first place that has them.
    fn include_dir(&self, preferred: Option<PathBuf>) -> Option<PathBuf> {
        let has_headers = |d: &Path| d.join(MARKER_HEADER).is_file();
        if let Some(dir) = preferred.filter(|d| has_headers(d)) {
            return Some(dir);
        }
        let env = self.env;
        let roots = env
            .cuda_roots
            .iter()
            .filter(|(_, root)| !root.as_os_str().is_empty())
            .map(|(_, root)| root.join("include"));
        let venv_sites = env.virtual_env.iter().flat_map(|v| venv_site_dirs(v));
        let sites = venv_sites
            .chain(self.python_sites().iter().cloned())
            .flat_map(|site| nvidia_wheel_dirs(&site))
            .map(|d| d.join("include"));
        let from_library_path = env
            .library_path
            .iter()
            .filter_map(|d| d.parent().map(|p| p.join("include")));
        roots
            .chain(sites)
            .chain(from_library_path)
            .chain(env.include_fallbacks.iter().cloned())
            .find(|d| has_headers(d))
    }
}

/// The libnvrtc files of `dir`, highest version first (`libnvrtc.so.13` before `libnvrtc.so.12`;
/// the unversioned development link last, as it points at one of them).
fn nvrtc_files_in(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<(Vec<u32>, PathBuf)> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            is_nvrtc_file(&name).then(|| (version_of(&name), e.path()))
        })
        .filter(|(_, path)| path.is_file())
        .collect();
    files.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(&b.1)));
    files.into_iter().map(|(_, p)| p).collect()
}

/// The numbers in a library file name: `libnvrtc.so.12.4` -> [12, 4]; `nvrtc64_120_0.dll` -> [120, 0].
fn version_of(name: &str) -> Vec<u32> {
    name.split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .filter_map(|s| s.parse().ok())
        .filter(|&n| n != 64) // the "64" of nvrtc64_ is not a version
        .collect()
}

/// `site/nvidia/<wheel>` folders, CUDA 13's `cu13` style first (highest first), then the
/// CUDA 12 per-component ones (`cuda_nvrtc`, `cuda_runtime`, ...).
pub(crate) fn nvidia_wheel_dirs(site: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(site.join("nvidia")) else {
        return Vec::new();
    };
    let mut dirs: Vec<(Option<u32>, PathBuf)> = entries
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_dir())
        .map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let cu_version = name.strip_prefix("cu").and_then(|v| v.parse::<u32>().ok());
            (cu_version, e.path())
        })
        .collect();
    dirs.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(&b.1)));
    dirs.into_iter().map(|(_, p)| p).collect()
}

/// The site-packages folders of a virtualenv, found on disk without running its Python.
pub(crate) fn venv_site_dirs(venv: &Path) -> Vec<PathBuf> {
    let mut sites = Vec::new();
    for lib in ["lib", "lib64"] {
        let Ok(entries) = std::fs::read_dir(venv.join(lib)) else {
            continue;
        };
        let mut found: Vec<PathBuf> = entries
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().starts_with("python"))
            .map(|e| e.path().join("site-packages"))
            .filter(|p| p.is_dir())
            .collect();
        found.sort();
        for site in found {
            // lib64 is often a symlink to lib: keep each folder once.
            let canonical = site.canonicalize().unwrap_or_else(|_| site.clone());
            if !sites
                .iter()
                .any(|s: &PathBuf| s.canonicalize().ok().as_ref() == Some(&canonical))
            {
                sites.push(site);
            }
        }
    }
    let windows_site = venv.join("Lib").join("site-packages");
    if windows_site.is_dir() && !sites.contains(&windows_site) {
        sites.push(windows_site);
    }
    sites
}

/// Asks a Python interpreter for its site-packages and user site. Any failure (no Python, an
/// old one) yields nothing: Python is one place among several, not a requirement.
fn python_site_dirs(python: &OsString) -> Vec<PathBuf> {
    const SCRIPT: &str = "import site, sys\n\
        dirs = list(getattr(site, 'getsitepackages', lambda: [])())\n\
        dirs.append(site.getusersitepackages())\n\
        dirs += [p for p in sys.path if p.endswith(('site-packages', 'dist-packages'))]\n\
        print('\\n'.join(dirs))";
    let output = Command::new(python)
        .args(["-I", "-c", SCRIPT])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output();
    let Ok(output) = output else {
        tracing::debug!("could not run {python:?} to find its site-packages");
        return Vec::new();
    };
    if !output.status.success() {
        return Vec::new();
    }
    let mut dirs: Vec<PathBuf> = Vec::new();
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        let dir = PathBuf::from(line.trim());
        if !line.trim().is_empty() && dir.is_dir() && !dirs.contains(&dir) {
            dirs.push(dir);
        }
    }
    dirs
}
