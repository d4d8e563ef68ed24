//! Decoding ONNX files into protobuf messages.

use std::path::{Path, PathBuf};

use prost::Message;

use crate::proto::ModelProto;

/// Why an ONNX file could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The bytes are not an ONNX `ModelProto`.
    #[error("{path} is not an ONNX model: {source}")]
    Decode {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: prost::DecodeError,
    },
}

/// Reads and decodes a whole `.onnx` file (external data is left where it is).
pub fn read_model_proto(path: &Path) -> Result<ModelProto, ReadError> {
    let bytes = std::fs::read(path).map_err(|source| ReadError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    ModelProto::decode(bytes.as_slice()).map_err(|source| ReadError::Decode {
        path: path.to_path_buf(),
        source,
    })
}
