//! Head configuration shared by every op: query heads, KV heads (GQA), head dimension.

use crate::error::{ensure, Result};

/// Query heads, KV heads and head dimension. Query head `h` reads KV head `h / group_size()`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct HeadConfig {
    pub num_qo_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
}

impl HeadConfig {
    pub fn new(num_qo_heads: usize, num_kv_heads: usize, head_dim: usize) -> Result<Self> {
        ensure(num_qo_heads > 0, "num_qo_heads", || {
            "must be at least 1".into()
        })?;
        ensure(num_kv_heads > 0, "num_kv_heads", || {
            "must be at least 1".into()
        })?;
        ensure(
            num_qo_heads.is_multiple_of(num_kv_heads),
            "num_kv_heads",
            || format!("{num_kv_heads} does not divide num_qo_heads = {num_qo_heads}"),
        )?;
        ensure(head_dim > 0, "head_dim", || "must be at least 1".into())?;
        Ok(Self {
            num_qo_heads,
            num_kv_heads,
            head_dim,
        })
    }

    /// Query heads per KV head (the GQA ratio).
    pub fn group_size(&self) -> usize {
        self.num_qo_heads / self.num_kv_heads
    }

    /// Default softmax scale, `1/sqrt(head_dim)`.
    pub fn default_sm_scale(&self) -> f32 {
        1.0 / (self.head_dim as f32).sqrt()
    }
}
