//! ferry-quantizer: rewrites a float32 graph (any ONNX model's IR) into a smaller one that
//! ONNX Runtime runs: int8 dynamic quantization ([`int8`]), int4 weight-only `MatMulNBits`
//! ([`int4`]; embedding tables as `GatherBlockQuantized`: [`gather4`]) and float16 ([`fp16`]).

pub mod fp16;
pub mod gather4;
pub mod half_weights;
pub mod int4;
pub mod int4_lazy;
pub mod int8;
pub mod qparams;

pub use int8::{Int8Options, Int8Stats, quantize_int8};
pub use qparams::QType;

/// Why quantizing failed. The graph may be partly rewritten when this is returned.
#[derive(Debug, thiserror::Error)]
pub enum QuantizeError {
    /// An initializer's bytes could not be read.
    #[error("cannot read tensor `{name}`: {source}")]
    Io {
        /// The tensor.
        name: String,
        /// The cause.
        source: std::io::Error,
    },
    /// A node or option is inconsistent (e.g. a block size that is not a power of two).
    #[error("{0}")]
    Invalid(String),
    /// The two parts of a merged decoder could not be merged again.
    #[error(transparent)]
    Merge(#[from] ferry_ir::MergeError),
}

/// Refuses a graph with `If` subgraphs that is not a merged decoder (those are rewritten
/// as their two parts, [`ferry_ir::map_merged`]): the rewrites drop float weights their
/// outer nodes no longer read, which a branch may still read.
pub(crate) fn no_subgraphs(graph: &ferry_ir::Graph) -> Result<(), QuantizeError> {
    if graph.has_subgraphs() {
        return Err(QuantizeError::Invalid(
            "graphs with `If` subgraphs are quantized only in optimum's merged-decoder form (one `If` on a graph input)".into(),
        ));
    }
    Ok(())
}
