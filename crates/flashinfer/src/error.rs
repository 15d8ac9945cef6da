//! The one error type of the crate. Every public entry point validates its arguments first and
//! returns one of these, naming the argument and the offending value, before anything is launched.

use std::path::PathBuf;

/// Errors returned by flashinfer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An argument failed validation; `arg` is its name as the caller knows it.
    #[error("invalid argument `{arg}`: {reason}")]
    InvalidArgument { arg: &'static str, reason: String },

    /// A shared library or header directory that the GPU path needs was not found.
    #[error("{what} not found. Looked in:\n{}\n{hint}", searched.iter().map(|s| format!("  - {s}")).collect::<Vec<_>>().join("\n"))]
    NotFound {
        what: &'static str,
        searched: Vec<String>,
        hint: String,
    },

    /// NVRTC rejected a kernel's source. `log` is NVRTC's own compile log.
    #[error("NVRTC could not compile `{kernel}` for {arch}:\n{log}")]
    Compile {
        kernel: String,
        arch: String,
        log: String,
    },

    /// An NVRTC call failed outside of compilation proper.
    #[error("NVRTC call {call} failed: {message}")]
    Nvrtc { call: &'static str, message: String },

    /// A CUDA driver call failed.
    #[error("CUDA driver call failed: {0}")]
    Driver(#[from] cudarc::driver::DriverError),

    /// No usable CUDA device (no driver library, no device, or the ordinal is out of range).
    #[error("no CUDA GPU available: {0}")]
    NoGpu(String),

    /// The workspace given to `run()` is smaller than the plan needs.
    #[error("workspace too small: the plan needs {needed} bytes, `{arg}` has {given}")]
    WorkspaceTooSmall {
        arg: &'static str,
        needed: usize,
        given: usize,
    },

    /// A valid request that this build does not implement (yet), e.g. an unsupported head_dim.
    #[error("unsupported: {0}")]
    Unsupported(String),

    /// File-system error, with the path involved.
    #[error("I/O error on {}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Result with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Shorthand for [`Error::InvalidArgument`].
pub(crate) fn invalid(arg: &'static str, reason: impl Into<String>) -> Error {
    Error::InvalidArgument {
        arg,
        reason: reason.into(),
    }
}

/// Returns an [`Error::InvalidArgument`] unless `cond` holds.
pub(crate) fn ensure(cond: bool, arg: &'static str, reason: impl FnOnce() -> String) -> Result<()> {
    if cond {
        Ok(())
    } else {
        Err(invalid(arg, reason()))
    }
}

pub(crate) fn io_err(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Error {
    let path = path.into();
    move |source| Error::Io { path, source }
}
