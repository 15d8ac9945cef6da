//! Parameters every attention op takes, on the GPU and on the CPU backend alike.

use crate::layout::CustomMask;

/// Base of a log-sum-exp value. The engine's states use base 2 internally; the public default is
/// the natural log (FlashInfer returns base 2, which users then merge by mistake with natural-log
/// LSE from other kernels).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum LseBase {
    #[default]
    Natural,
    Base2,
}

impl LseBase {
    /// Converts a base-2 LSE to this base.
    pub fn from_log2(self, lse2: f32) -> f32 {
        match self {
            LseBase::Natural => lse2 * std::f32::consts::LN_2,
            LseBase::Base2 => lse2,
        }
    }
    /// Converts an LSE in this base to base 2.
    pub fn to_log2(self, lse: f32) -> f32 {
        match self {
            LseBase::Natural => lse * std::f32::consts::LOG2_E,
            LseBase::Base2 => lse,
        }
    }
}

/// Which keys each query sees.
#[derive(Clone, Copy, Debug, Default)]
pub enum MaskMode<'a> {
    /// Every query sees every key of its request.
    #[default]
    None,
    /// Bottom-right aligned: query i of `qo_len` sees key j of `kv_len` iff `j <= kv_len - qo_len + i`.
    Causal,
    /// Per-request bit-packed masks.
    Custom(&'a CustomMask),
}

/// Scale and output conventions.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct AttentionParams {
    /// Softmax scale applied to q·k; `None` means `1/sqrt(head_dim)`.
    pub sm_scale: Option<f32>,
    /// Base of the returned LSE.
    pub lse_base: LseBase,
}

impl AttentionParams {
    pub fn scale(&self, head_dim: usize) -> f32 {
        self.sm_scale.unwrap_or(1.0 / (head_dim as f32).sqrt())
    }
}
