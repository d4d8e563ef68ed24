//! int4 weight-only quantization: float MatMuls with constant weights become ONNX Runtime's
//! `MatMulNBits` (work in progress: the rewrite lands with the int4 pass).

use std::fmt;

use ferry_ir::Graph;

use crate::QuantizeError;

/// Options of [`quantize_int4`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Int4Options {
    /// Weights per quantization block along K (a power of two ≥ 16; ONNX Runtime's default 128).
    pub block_size: usize,
    /// Symmetric blocks (no zero points) instead of min/max with zero points.
    pub symmetric: bool,
    /// Node names left in float.
    pub exclude: Vec<String>,
}

impl Default for Int4Options {
    fn default() -> Self {
        Self {
            block_size: 128,
            symmetric: false,
            exclude: Vec::new(),
        }
    }
}

/// What [`quantize_int4`] changed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Int4Stats {
    /// MatMuls rewritten to `MatMulNBits`.
    pub matmuls_quantized: usize,
}

impl fmt::Display for Int4Stats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} MatMul → MatMulNBits", self.matmuls_quantized)
    }
}

/// Rewrites MatMuls with constant float weights into `MatMulNBits` (4 bits).
pub fn quantize_int4(_graph: &mut Graph, _opts: &Int4Options) -> Result<Int4Stats, QuantizeError> {
    Err(QuantizeError::Invalid(
        "int4 quantization is not implemented yet".into(),
    ))
}
