//! Element types. Inputs are f16, bf16 or f32; all arithmetic accumulates in f32.

use half::{bf16, f16};

/// A tensor's element type, as the kernels and the CLI name it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    F16,
    BF16,
    F32,
}

impl DType {
    pub fn size_bytes(self) -> usize {
        match self {
            DType::F16 | DType::BF16 => 2,
            DType::F32 => 4,
        }
    }

    /// The CUDA C++ type our kernels use for it (see kernels/common.cuh).
    pub fn cuda_type(self) -> &'static str {
        match self {
            DType::F16 => "half_t",
            DType::BF16 => "bf16_t",
            DType::F32 => "float",
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            DType::F32 => "f32",
        }
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for DType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "f16" | "fp16" | "half" => Ok(DType::F16),
            "bf16" => Ok(DType::BF16),
            "f32" | "fp32" | "float" => Ok(DType::F32),
            _ => Err(format!("unknown dtype `{s}` (expected f16, bf16 or f32)")),
        }
    }
}

/// A host element type the engine accepts.
pub trait Element: Copy + Send + Sync + Default + std::fmt::Debug + 'static {
    const DTYPE: DType;
    fn to_f32(self) -> f32;
    fn from_f32(x: f32) -> Self;
    fn to_f64(self) -> f64 {
        self.to_f32() as f64
    }
}

impl Element for f32 {
    const DTYPE: DType = DType::F32;
    fn to_f32(self) -> f32 {
        self
    }
    fn from_f32(x: f32) -> Self {
        x
    }
}

impl Element for f16 {
    const DTYPE: DType = DType::F16;
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    fn from_f32(x: f32) -> Self {
        f16::from_f32(x)
    }
}

impl Element for bf16 {
    const DTYPE: DType = DType::BF16;
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
    fn from_f32(x: f32) -> Self {
        bf16::from_f32(x)
    }
}
