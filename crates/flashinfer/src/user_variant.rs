//! User-written attention variants: CUDA snippets for the kernel's hooks, compiled just in time.
//!
//! The paper's second idea in its open form: the prefill kernel (which also serves appends and
//! decode-shaped batches) has hook points, and a [`UserVariant`] fills them with CUDA C++ function
//! bodies. Each hook receives the variant's parameters as `params` (a struct with one field per
//! declared tensor, `const float*` or `const int*`, and per declared `float` scalar):
//!
//! | hook | signature of the body | applied to |
//! |---|---|---|
//! | `query_transform` | `float (const UserParams& params, float q, int qo_head, int pos, int dim)` | each query element, before q·k |
//! | `key_transform` | `float (const UserParams& params, float k, int kv_head, int pos, int dim)` | each key element, before q·k |
//! | `logits_transform` | `float (const UserParams& params, float logit, int qo_head, int q_pos, int k_pos)` | the natural logit `q·k · sm_scale` |
//! | `logits_mask` | `bool (const UserParams& params, int qo_head, int q_pos, int k_pos)` | on top of the op's mask: `false` hides the key |
//! | `output_transform` | `float (const UserParams& params, float o, int qo_head, int q_pos, int dim)` | each output element |
//!
//! Positions are key indices within the request; query `i` of a request with `qo_len` queries and
//! `kv_len` keys sits at `kv_len - qo_len + i` (bottom-right, as the causal mask). With
//! `use_softmax` the transformed logits go through the usual online softmax; without it they weigh
//! the values directly, `o = Σ_j logit'_j v_j` (e.g. sigmoid attention), which has no LSE and is
//! not split over KV chunks (its partial sums are not normalised states).
//!
//! Every hook body is compiled into the kernel's translation unit with NVRTC on first use and
//! cached on disk like any specialisation; a compile error comes back as [`Error::Compile`] with
//! NVRTC's log. The kernel's key names the variant and a digest of its source, so two variants
//! never share a cache entry.

use sha2::{Digest, Sha256};

use crate::error::{ensure, Error, Result};

/// Element type of a tensor parameter of a user variant (in device memory).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum UserTensor {
    F32,
    I32,
}

impl UserTensor {
    fn cuda_type(self) -> &'static str {
        match self {
            UserTensor::F32 => "const float*",
            UserTensor::I32 => "const int*",
        }
    }
}

/// A user-written variant: the hooks it fills (CUDA C++ function bodies), whether the softmax is
/// used, and the parameters it declares. Values of the parameters are given per op with
/// [`UserArgs`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct UserVariant {
    /// A C identifier naming the variant (part of the kernel's key), e.g. `sigmoid`.
    pub name: String,
    pub use_softmax: bool,
    pub query_transform: Option<String>,
    pub key_transform: Option<String>,
    pub logits_transform: Option<String>,
    pub logits_mask: Option<String>,
    pub output_transform: Option<String>,
    /// Names of `float` scalar parameters, in the order [`UserArgs::scalars`] gives their values.
    pub scalars: Vec<String>,
    /// Names and element types of tensor parameters, in the order of [`UserArgs::tensors`].
    pub tensors: Vec<(String, UserTensor)>,
}

/// Run-time values of a user variant's parameters: one per declared scalar, one device pointer
/// per declared tensor (the caller keeps the memory alive and unchanged while ops use it).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct UserArgs {
    pub scalars: Vec<f32>,
    pub tensors: Vec<u64>,
}

fn is_identifier(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

impl UserVariant {
    /// Whether the variant rewrites query or key tiles in shared memory (every thread of the
    /// block takes part, so the prefill kernel then runs without a producer warp).
    pub fn transforms_tiles(&self) -> bool {
        self.query_transform.is_some() || self.key_transform.is_some()
    }

    /// Checks names (C identifiers, distinct) before anything compiles.
    pub fn validate(&self) -> Result<()> {
        ensure(
            is_identifier(&self.name) && self.name.len() <= 40,
            "user_variant",
            || {
                format!(
                    "name `{}` must be a C identifier of at most 40 characters",
                    self.name
                )
            },
        )?;
        let mut names: Vec<&str> = self.scalars.iter().map(String::as_str).collect();
        names.extend(self.tensors.iter().map(|(n, _)| n.as_str()));
        for (i, n) in names.iter().enumerate() {
            ensure(is_identifier(n), "user_variant", || {
                format!("parameter `{n}` is not a C identifier")
            })?;
            ensure(!names[..i].contains(n), "user_variant", || {
                format!("parameter `{n}` is declared twice")
            })?;
        }
        Ok(())
    }

    /// Checks `args` against the declared parameters.
    pub fn check_args(&self, args: &UserArgs) -> Result<()> {
        ensure(
            args.scalars.len() == self.scalars.len(),
            "user_args",
            || {
                format!(
                    "has {} scalars, the variant `{}` declares {}",
                    args.scalars.len(),
                    self.name,
                    self.scalars.len()
                )
            },
        )?;
        ensure(
            args.tensors.len() == self.tensors.len(),
            "user_args",
            || {
                format!(
                    "has {} tensors, the variant `{}` declares {}",
                    args.tensors.len(),
                    self.name,
                    self.tensors.len()
                )
            },
        )?;
        for (&ptr, (name, _)) in args.tensors.iter().zip(&self.tensors) {
            ensure(ptr != 0 && ptr % 4 == 0, "user_args", || {
                format!("tensor `{name}` is null or misaligned")
            })?;
        }
        Ok(())
    }

    /// The first 48 bits of the SHA-256 of the variant's generated source: its identity in the
    /// kernel cache (never 0, so 0 can mean "no user variant").
    pub fn digest(&self) -> u64 {
        let sha = Sha256::digest(self.source().as_bytes());
        sha.iter()
            .take(6)
            .fold(0u64, |acc, &b| acc << 8 | b as u64)
            .max(1)
    }

    /// The kernel-key part naming this variant: `_user_<name>_<12 hex digits of its source>`.
    pub fn key_suffix(&self) -> String {
        format!("_user_{}_{:012x}", self.name, self.digest())
    }

    /// Bytes of the kernel's `UserParams` argument: the pointers first (8 bytes each), then the
    /// floats, padded to the struct's alignment.
    pub fn params_bytes(&self) -> usize {
        let raw = 8 * self.tensors.len() + 4 * self.scalars.len();
        let align = if self.tensors.is_empty() { 4 } else { 8 };
        raw.max(4).div_ceil(align) * align
    }

    /// The `UserParams` argument's bytes for `args` (checked by [`UserVariant::check_args`]).
    pub fn params_blob(&self, args: &UserArgs) -> Vec<u8> {
        let mut blob = Vec::with_capacity(self.params_bytes());
        for &p in &args.tensors {
            blob.extend_from_slice(&p.to_le_bytes());
        }
        for &x in &args.scalars {
            blob.extend_from_slice(&x.to_le_bytes());
        }
        blob.resize(self.params_bytes(), 0);
        blob
    }

    /// The definitions the kernel template expects before it is included: switches, the
    /// parameter struct, and one device function per hook.
    pub fn source(&self) -> String {
        let mut s = String::from("#define USER_VARIANT 1\n");
        s += &format!("#define USER_USE_SOFTMAX {}\n", u32::from(self.use_softmax));
        s += "struct UserParams {\n";
        for (name, t) in &self.tensors {
            s += &format!("  {} {name};\n", t.cuda_type());
        }
        for name in &self.scalars {
            s += &format!("  float {name};\n");
        }
        if self.tensors.is_empty() && self.scalars.is_empty() {
            s += "  int unused_;\n";
        }
        s += "};\n";
        s += &format!(
            "static_assert(sizeof(UserParams) == {}, \"UserParams must match user_variant.rs\");\n",
            self.params_bytes()
        );
        let hooks: [(&str, &Option<String>, &str); 5] = [
            (
                "QUERY_TRANSFORM",
                &self.query_transform,
                "float user_query_transform(const UserParams& params, float q, int qo_head, int pos, int dim)",
            ),
            (
                "KEY_TRANSFORM",
                &self.key_transform,
                "float user_key_transform(const UserParams& params, float k, int kv_head, int pos, int dim)",
            ),
            (
                "LOGITS_TRANSFORM",
                &self.logits_transform,
                "float user_logits_transform(const UserParams& params, float logit, int qo_head, int q_pos, int k_pos)",
            ),
            (
                "LOGITS_MASK",
                &self.logits_mask,
                "bool user_logits_mask(const UserParams& params, int qo_head, int q_pos, int k_pos)",
            ),
            (
                "OUTPUT_TRANSFORM",
                &self.output_transform,
                "float user_output_transform(const UserParams& params, float o, int qo_head, int q_pos, int dim)",
            ),
        ];
        for (switch, body, signature) in hooks {
            s += &format!("#define USER_HAS_{switch} {}\n", u32::from(body.is_some()));
            if let Some(body) = body {
                // The #line directive makes NVRTC's messages point into the user's snippet.
                s += &format!(
                    "__device__ __forceinline__ {signature} {{\n#line 1 \"{}.{}\"\n{body}\n}}\n",
                    self.name,
                    switch.to_ascii_lowercase()
                );
            }
        }
        s
    }
}

/// What an op refuses for a variant without softmax.
pub(crate) fn no_softmax_lse_error(name: &str) -> Error {
    crate::error::invalid(
        "lse",
        format!("the user variant `{name}` uses no softmax, so there is no LSE to write"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sigmoid() -> UserVariant {
        UserVariant {
            name: "sigmoid".into(),
            use_softmax: false,
            logits_transform: Some("return 1.f / (1.f + __expf(-(logit + params.bias)));".into()),
            scalars: vec!["bias".into()],
            tensors: vec![("scale".into(), UserTensor::F32)],
            ..Default::default()
        }
    }

    #[test]
    fn params_blob_matches_the_declared_layout() {
        let v = sigmoid();
        assert_eq!(v.params_bytes(), 16);
        let blob = v.params_blob(&UserArgs {
            scalars: vec![1.5],
            tensors: vec![0x1000],
        });
        assert_eq!(blob.len(), 16);
        assert_eq!(&blob[..8], &0x1000u64.to_le_bytes());
        assert_eq!(&blob[8..12], &1.5f32.to_le_bytes());
        let src = v.source();
        assert!(src.contains("const float* scale;") && src.contains("float bias;"));
        assert!(src.contains("#define USER_HAS_LOGITS_TRANSFORM 1"));
        assert!(src.contains("#define USER_HAS_LOGITS_MASK 0"));
        assert!(src.contains("#define USER_USE_SOFTMAX 0"));
    }

    #[test]
    fn keys_change_with_the_source_and_names_are_checked() {
        let a = sigmoid();
        let mut b = sigmoid();
        b.logits_transform = Some("return logit;".into());
        assert_ne!(a.key_suffix(), b.key_suffix());
        assert!(a.key_suffix().starts_with("_user_sigmoid_"));
        assert!(a.validate().is_ok());
        let mut bad = sigmoid();
        bad.name = "no spaces".into();
        assert!(bad
            .validate()
            .unwrap_err()
            .to_string()
            .contains("user_variant"));
        let mut twice = sigmoid();
        twice.scalars.push("scale".into());
        assert!(twice.validate().is_err());
        let e = a
            .check_args(&UserArgs {
                scalars: vec![],
                tensors: vec![16],
            })
            .unwrap_err();
        assert!(e.to_string().contains("user_args"), "{e}");
    }
}
