//! float16 conversion: weights and compute in float16, graph inputs and outputs kept float32
//! by default (work in progress: the rewrite lands with the fp16 pass).

use std::fmt;

use ferry_ir::Graph;

use crate::QuantizeError;

/// Options of [`convert_fp16`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fp16Options {
    /// Keep float32 graph inputs and outputs (Casts at the edges), as ONNX Runtime's
    /// `keep_io_types`.
    pub keep_io_types: bool,
    /// Node names left in float32.
    pub exclude: Vec<String>,
}

impl Default for Fp16Options {
    fn default() -> Self {
        Self {
            keep_io_types: true,
            exclude: Vec::new(),
        }
    }
}

/// What [`convert_fp16`] changed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Fp16Stats {
    /// Initializers stored as float16.
    pub initializers_converted: usize,
}

impl fmt::Display for Fp16Stats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} initializers → float16", self.initializers_converted)
    }
}

/// Converts a float32 graph to float16.
pub fn convert_fp16(_graph: &mut Graph, _opts: &Fp16Options) -> Result<Fp16Stats, QuantizeError> {
    Err(QuantizeError::Invalid(
        "fp16 conversion is not implemented yet".into(),
    ))
}
