//! ferry-onnx: writes ferry IR graphs as ONNX files, streaming weights to disk.
//!
//! The writer never builds a whole `ModelProto` with its weights in memory: it encodes the
//! small parts (nodes, value infos, tensor headers) with prost, computes every length up
//! front, and streams each initializer's bytes from its source (an in-kernel copy for
//! mapped checkpoint files) straight into the output. With external data the weights go to
//! one side file in ONNX's external-data format instead. Output is written to temporary
//! files and renamed into place only when complete.

pub mod proto;
mod read;
mod to_ir;
mod write;

pub use read::{ReadError, read_metadata, read_model_proto};
pub use to_ir::{ModelInfo, OnnxModel, read_graph, read_model};
pub use write::{
    ExternalData, MIN_WRITE_OPSET, OnnxError, WriteOptions, WriteReport, ir_version_for_opset,
    write_model,
};

use ferry_ir::DType;

/// Oldest default-domain opset ferry exports (the writer also writes older models, down to
/// [`MIN_WRITE_OPSET`], for `ferry optimize` and `ferry quantize`).
pub const MIN_OPSET: i64 = 14;
/// Newest default-domain opset ferry writes.
pub const MAX_OPSET: i64 = 21;
/// Default opset, as optimum and torch.onnx use today.
pub const DEFAULT_OPSET: i64 = 17;

/// ONNX `TensorProto.DataType` code of a ferry dtype.
pub fn onnx_dtype(d: DType) -> i32 {
    use proto::data_type as t;
    match d {
        DType::F32 => t::FLOAT,
        DType::F16 => t::FLOAT16,
        DType::BF16 => t::BFLOAT16,
        DType::F64 => t::DOUBLE,
        DType::I64 => t::INT64,
        DType::I32 => t::INT32,
        DType::I16 => t::INT16,
        DType::I8 => t::INT8,
        DType::U8 => t::UINT8,
        DType::Bool => t::BOOL,
    }
}

/// The ferry dtype of an ONNX `TensorProto.DataType` code, if ferry handles it.
pub fn dtype_from_onnx(code: i32) -> Option<DType> {
    use proto::data_type as t;
    Some(match code {
        t::FLOAT => DType::F32,
        t::FLOAT16 => DType::F16,
        t::BFLOAT16 => DType::BF16,
        t::DOUBLE => DType::F64,
        t::INT64 => DType::I64,
        t::INT32 => DType::I32,
        t::INT16 => DType::I16,
        t::INT8 => DType::I8,
        t::UINT8 => DType::U8,
        t::BOOL => DType::Bool,
        _ => return None,
    })
}
