//! What the JIT compiles: one generated translation unit and the kernels it exports.

use super::Arch;
use crate::error::{ensure, Result};

/// One kernel specialisation, ready to compile.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct KernelSpec {
    /// A readable key that names every template parameter, e.g. `merge_states_bf16_h128`. It is
    /// the on-disk cache file's prefix and the module registry's key, so two specs with different
    /// sources must never share a name.
    pub name: String,
    /// The whole generated translation unit. It may `#include` any embedded header by file name
    /// (see [`super::headers::HEADERS`]).
    pub source: String,
    /// The `extern "C"` kernel names the translation unit defines.
    pub entries: Vec<String>,
    /// The oldest architecture the source compiles for (`wgmma` kernels need sm_90a).
    pub min_arch: Arch,
}

/// The longest name we accept: it becomes part of a file name, with room for the key and suffix.
const MAX_NAME_LEN: usize = 160;

impl KernelSpec {
    pub fn new(
        name: impl Into<String>,
        source: impl Into<String>,
        entries: impl IntoIterator<Item = impl Into<String>>,
    ) -> KernelSpec {
        KernelSpec {
            name: name.into(),
            source: source.into(),
            entries: entries.into_iter().map(Into::into).collect(),
            min_arch: Arch::SM80,
        }
    }

    /// The same spec, compiled only for `arch` and newer.
    pub fn requires(mut self, arch: Arch) -> KernelSpec {
        self.min_arch = arch;
        self
    }

    /// Whether the source compiles for `arch`.
    pub fn supports(&self, arch: Arch) -> bool {
        arch >= self.min_arch
    }

    /// Checks what the compiler and the cache rely on: the name is a safe file-name stem, the
    /// entries are C identifiers, and nothing contains a NUL byte (NVRTC takes C strings).
    pub fn validate(&self) -> Result<()> {
        let name = &self.name;
        ensure(
            !name.is_empty() && name.len() <= MAX_NAME_LEN,
            "spec.name",
            || format!("`{name}` must be 1 to {MAX_NAME_LEN} characters long"),
        )?;
        ensure(
            name.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.')
                && !name.starts_with('.'),
            "spec.name",
            || format!("`{name}` may only contain A-Z a-z 0-9 _ - . and must not start with `.`"),
        )?;
        ensure(!self.source.trim().is_empty(), "spec.source", || {
            format!("the source of `{name}` is empty")
        })?;
        ensure(!self.source.contains('\0'), "spec.source", || {
            format!("the source of `{name}` contains a NUL byte")
        })?;
        ensure(!self.entries.is_empty(), "spec.entries", || {
            format!("`{name}` names no kernel entry point")
        })?;
        for entry in &self.entries {
            ensure(is_c_identifier(entry), "spec.entries", || {
                format!("`{entry}` (in `{name}`) is not a C identifier")
            })?;
        }
        Ok(())
    }
}

fn is_c_identifier(s: &str) -> bool {
    let mut bytes = s.bytes();
    matches!(bytes.next(), Some(b) if b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
}
