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
    /// The file's top-level protobuf structure is broken.
    #[error("{path} is not an ONNX model: {reason}")]
    Malformed {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: &'static str,
    },
    /// The model is valid protobuf but uses something ferry's IR cannot hold, or its
    /// contents are inconsistent (names the node or tensor).
    #[error("{path}: {reason}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong, naming the node or tensor.
        reason: String,
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

/// Reads only `ModelProto.metadata_props` of an `.onnx` file, in file order, without decoding
/// the graph: top-level fields other than `metadata_props` are skipped by seeking, so this
/// costs a few reads even for a multi-gigabyte model.
pub fn read_metadata(path: &Path) -> Result<Vec<(String, String)>, ReadError> {
    use std::io::{BufReader, Read, Seek};

    let io = |source: std::io::Error| ReadError::Io {
        path: path.to_path_buf(),
        source,
    };
    let bad = |reason: &'static str| ReadError::Malformed {
        path: path.to_path_buf(),
        reason,
    };
    let file = std::fs::File::open(path).map_err(io)?;
    let len = file.metadata().map_err(io)?.len();
    let mut r = BufReader::new(file);
    // A varint, or None at a clean end of file.
    fn varint(r: &mut impl Read) -> std::io::Result<Option<u64>> {
        let mut v = 0u64;
        for i in 0..10 {
            let mut b = [0u8; 1];
            if r.read(&mut b)? == 0 {
                return if i == 0 {
                    Ok(None)
                } else {
                    Err(std::io::ErrorKind::UnexpectedEof.into())
                };
            }
            v |= u64::from(b[0] & 0x7f) << (7 * i);
            if b[0] & 0x80 == 0 {
                return Ok(Some(v));
            }
        }
        Err(std::io::ErrorKind::InvalidData.into())
    }
    let mut out = Vec::new();
    while let Some(key) = varint(&mut r).map_err(io)? {
        let (field, wire) = (key >> 3, key & 7);
        match wire {
            0 => {
                varint(&mut r)
                    .map_err(io)?
                    .ok_or_else(|| bad("truncated varint"))?;
            }
            1 => {
                r.seek_relative(8).map_err(io)?;
            }
            5 => {
                r.seek_relative(4).map_err(io)?;
            }
            2 => {
                let n = varint(&mut r)
                    .map_err(io)?
                    .ok_or_else(|| bad("truncated length"))?;
                let pos = r.stream_position().map_err(io)?;
                if n > len.saturating_sub(pos) {
                    return Err(bad("field runs past the end of the file"));
                }
                if field == 14 {
                    let mut buf = vec![0u8; n as usize];
                    r.read_exact(&mut buf).map_err(io)?;
                    let e = crate::proto::StringStringEntryProto::decode(buf.as_slice()).map_err(
                        |source| ReadError::Decode {
                            path: path.to_path_buf(),
                            source,
                        },
                    )?;
                    out.push((e.key, e.value));
                } else {
                    r.seek_relative(n as i64).map_err(io)?;
                }
            }
            _ => return Err(bad("not an ONNX model (bad wire type)")),
        }
    }
    Ok(out)
}
