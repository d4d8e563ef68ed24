//! The streaming ONNX writer.

use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc::sync_channel;

use ferry_ir::{Attr, Dim, Graph, Initializer, Node, TensorData, Value};
use prost::Message;

use crate::proto::{
    self, AttributeProto, GraphProto, ModelProto, NodeProto, OperatorSetIdProto,
    StringStringEntryProto, TensorProto, TensorShapeProto, TypeProto, TypeProtoTensor,
    ValueInfoProto, attribute_type as at,
};
use crate::{MAX_OPSET, onnx_dtype};

/// The oldest default-domain opset [`write_model`] writes (IR version 4, the first whose
/// initializers need not be graph inputs): `ferry optimize`/`quantize` rewrite older
/// models; `ferry export` itself writes [`crate::MIN_OPSET`] and later.
pub const MIN_WRITE_OPSET: i64 = 9;

/// Protobuf refuses messages of 2 GiB or more; past this, weights must go to external data.
const PROTOBUF_LIMIT: u64 = (1 << 31) - 1;
/// Initializers smaller than this stay inline even with external data (as `onnx` does).
const EXTERNAL_THRESHOLD: u64 = 1024;
/// Derived tensors (transposed, concatenated, converted or produced weights) are computed by
/// a helper thread ahead of the writer, so computing one overlaps writing the previous:
/// whole up to this size, larger ones in bands of this size. At most four such buffers
/// exist at once.
const PREFETCH_MAX: u64 = 16 << 20;
/// Tensors at least this large start on a page boundary in the side file, so ONNX Runtime
/// can map them.
const PAGE_ALIGN_FROM: u64 = 64 * 1024;

/// Where initializer bytes go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ExternalData {
    /// Inline, unless the file would pass protobuf's 2 GiB limit (then external).
    #[default]
    Auto,
    /// Always in a side file.
    Always,
    /// As [`ExternalData::Auto`] with a smaller limit than 2 GiB: external when the file
    /// would reach this many bytes (how tests reach the automatic switch with small files).
    Past(u64),
    /// Initializers mapped from a file in the output's directory are referenced where they
    /// already are (`location` = that file, `offset`, `length`) instead of copied; the others
    /// as [`ExternalData::Auto`]. Writes a small view of a model that ONNX Runtime loads by
    /// mapping its weights (the accuracy report), never a standalone file.
    InPlace,
}

/// Options for [`write_model`].
#[derive(Debug, Clone, Default)]
pub struct WriteOptions {
    /// Inline or external weights.
    pub external_data: ExternalData,
    /// `doc_string` of the model (e.g. where it was exported from).
    pub doc_string: String,
    /// `metadata_props` of the model: key/value pairs, in order (e.g. the task, labels).
    pub metadata: Vec<(String, String)>,
    /// Graph outputs written without a type, for ONNX Runtime to infer from the nodes
    /// producing them (views of part of a graph, whose outputs are intermediate values).
    pub untyped_outputs: bool,
}

/// What [`write_model`] produced.
#[derive(Debug, Clone)]
pub struct WriteReport {
    /// The `.onnx` file.
    pub model_path: PathBuf,
    /// Its size in bytes.
    pub model_bytes: u64,
    /// The external-data side file, if weights went there.
    pub data_path: Option<PathBuf>,
    /// The side file's size in bytes.
    pub data_bytes: u64,
    /// The ONNX IR version written.
    pub ir_version: i64,
}

/// Why writing failed. No output file is left behind in any case.
#[derive(Debug, thiserror::Error)]
pub enum OnnxError {
    /// The opset is outside what ferry writes.
    #[error("opset {0} is not supported (ferry writes opsets {MIN_WRITE_OPSET}..={MAX_OPSET})")]
    Opset(i64),
    /// The graph has no default-domain opset import.
    #[error("graph has no ONNX opset import")]
    NoOpset,
    /// The output path cannot be used.
    #[error("cannot write {path}: {reason}")]
    OutputPath {
        /// The path.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// An I/O error while writing.
    #[error("writing {path} failed: {source}")]
    Io {
        /// The file being written.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// An initializer's byte count disagrees with its dtype and shape.
    #[error("tensor `{name}` has {actual} bytes but its dtype and shape need {expected}")]
    TensorSize {
        /// Tensor name.
        name: String,
        /// Bytes the shape needs.
        expected: u64,
        /// Bytes present.
        actual: u64,
    },
}

/// The ONNX IR version that goes with a default-domain opset (per onnx/helper.py's table).
pub fn ir_version_for_opset(opset: i64) -> Result<i64, OnnxError> {
    Ok(match opset {
        9 => 4,
        10 => 5,
        11 => 6,
        12..=14 => 7,
        15..=18 => 8,
        19 | 20 => 9,
        21 => 10,
        other => return Err(OnnxError::Opset(other)),
    })
}

/// Writes `graph` as an ONNX model at `path`, streaming weights; see the crate docs.
pub fn write_model(
    graph: &Graph,
    path: &Path,
    opts: &WriteOptions,
) -> Result<WriteReport, OnnxError> {
    let opset = graph.onnx_opset().ok_or(OnnxError::NoOpset)?;
    let ir_version = ir_version_for_opset(opset)?;
    for init in &graph.initializers {
        let expected = init.numel().saturating_mul(init.dtype.size() as u64);
        if expected != init.data.len() {
            return Err(OnnxError::TensorSize {
                name: init.name.clone(),
                expected,
                actual: init.data.len(),
            });
        }
    }
    let file_name = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| OnnxError::OutputPath {
            path: path.to_path_buf(),
            reason: "not a file name".into(),
        })?
        .to_string();
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    if !dir.is_dir() {
        return Err(OnnxError::OutputPath {
            path: path.to_path_buf(),
            reason: format!("directory {} does not exist", dir.display()),
        });
    }

    // Decide where weights go.
    let graph_head = graph_without_initializers(graph, opts.untyped_outputs).encode_to_vec();
    let limit = match opts.external_data {
        ExternalData::Past(n) => n.min(PROTOBUF_LIMIT),
        _ => PROTOBUF_LIMIT,
    };
    // With `InPlace`, tensors mapped from a file beside the output are referenced there.
    let in_place = |init: &Initializer| -> Option<(String, u64)> {
        if opts.external_data != ExternalData::InPlace || init.data.len() < EXTERNAL_THRESHOLD {
            return None;
        }
        let TensorData::Mapped { file, offset, .. } = &init.data else {
            return None;
        };
        let here = std::fs::canonicalize(&dir).ok()?;
        // A bare file name's parent is "", the current directory.
        let parent = file.path().parent().filter(|p| !p.as_os_str().is_empty());
        let there = std::fs::canonicalize(parent.unwrap_or(Path::new("."))).ok()?;
        let name = file.path().file_name()?.to_str()?.to_string();
        (here == there).then_some((name, *offset))
    };
    let inline_total: u64 = graph_head.len() as u64
        + graph
            .initializers
            .iter()
            .filter(|i| in_place(i).is_none())
            .map(|i| i.data.len() + 64 + i.name.len() as u64)
            .sum::<u64>();
    let external = match opts.external_data {
        ExternalData::Always => true,
        ExternalData::Auto | ExternalData::Past(_) | ExternalData::InPlace => inline_total >= limit,
    };
    let data_name = format!("{file_name}_data");

    // Plan: header bytes of each initializer, and external offsets.
    let mut plans = Vec::with_capacity(graph.initializers.len());
    let mut data_offset = 0u64;
    for init in &graph.initializers {
        let len = init.data.len();
        let mut header = tensor_header(init);
        if let Some((location, offset)) = in_place(init) {
            header.data_location = proto::data_location::EXTERNAL;
            header.external_data = vec![
                entry("location", &location),
                entry("offset", &offset.to_string()),
                entry("length", &len.to_string()),
            ];
            let header = header.encode_to_vec();
            plans.push(Plan {
                msg_len: header.len() as u64,
                header,
                len,
                external: true,
                referenced: true,
                pad: 0,
            });
            continue;
        }
        let ext = external && len >= EXTERNAL_THRESHOLD;
        let mut pad = 0;
        if ext {
            let align = if len >= PAGE_ALIGN_FROM { 4096 } else { 64 };
            pad = (align - data_offset % align) % align;
            data_offset += pad;
            header.data_location = proto::data_location::EXTERNAL;
            header.external_data = vec![
                entry("location", &data_name),
                entry("offset", &data_offset.to_string()),
                entry("length", &len.to_string()),
            ];
            data_offset += len;
        }
        let header = header.encode_to_vec();
        let msg_len = if ext {
            header.len() as u64
        } else {
            header.len() as u64 + key_len(proto::TENSOR_RAW_DATA_TAG) + varint_len(len) + len
        };
        plans.push(Plan {
            header,
            msg_len,
            len,
            external: ext,
            referenced: false,
            pad,
        });
    }
    let model_head = ModelProto {
        ir_version,
        opset_import: graph
            .opsets
            .iter()
            .map(|o| OperatorSetIdProto {
                domain: o.domain.clone(),
                version: o.version,
            })
            .collect(),
        producer_name: "ferry".into(),
        producer_version: env!("CARGO_PKG_VERSION").into(),
        doc_string: opts.doc_string.clone(),
        metadata_props: opts.metadata.iter().map(|(k, v)| entry(k, v)).collect(),
        ..Default::default()
    }
    .encode_to_vec();
    align_inline(&mut plans, model_head.len() as u64, graph_head.len() as u64);
    let graph_len = graph_head.len() as u64
        + plans
            .iter()
            .map(|p| key_len(proto::GRAPH_INITIALIZER_TAG) + varint_len(p.msg_len) + p.msg_len)
            .sum::<u64>();
    if graph_len >= PROTOBUF_LIMIT {
        // Only reachable with many small inline tensors; the weights are external already.
        return Err(OnnxError::OutputPath {
            path: path.to_path_buf(),
            reason: "graph structure alone exceeds protobuf's 2 GiB limit".into(),
        });
    }

    let data_path = dir.join(&data_name);
    let mut model_tmp = TempOutput::create(path)?;
    let mut data_tmp = if external {
        Some(TempOutput::create(&data_path)?)
    } else {
        None
    };

    // Stream.
    let io_err = |p: &Path| {
        let p = p.to_path_buf();
        move |source| OnnxError::Io {
            path: p.clone(),
            source,
        }
    };
    let referenced: Vec<bool> = plans.iter().map(|p| p.referenced).collect();
    let prefetched = |k: usize, i: &Initializer| !referenced[k] && i.data.is_derived();
    std::thread::scope(|s| -> Result<(), OnnxError> {
        // A helper computes derived tensors in order into recycled buffers (whole tensors
        // up to PREFETCH_MAX, larger ones band by band); the loop below takes them in the
        // same order and writes them, so computing the next band overlaps writing this one.
        let (full_tx, full_rx) = sync_channel::<io::Result<Vec<u8>>>(1);
        let (free_tx, free_rx) = sync_channel::<Vec<u8>>(3);
        let inits = &graph.initializers;
        s.spawn(move || {
            for (_, init) in inits.iter().enumerate().filter(|(k, i)| prefetched(*k, i)) {
                let r = if init.data.len() <= PREFETCH_MAX {
                    let mut buf = free_rx.try_recv().unwrap_or_default();
                    usize::try_from(init.data.len())
                        .map_err(io::Error::other)
                        .and_then(|n| {
                            buf.resize(n, 0);
                            init.data.read_into(0, &mut buf)
                        })
                        .map(|()| buf)
                } else {
                    let sent = init.data.for_each_chunk(PREFETCH_MAX as usize, |band| {
                        let mut buf = free_rx.try_recv().unwrap_or_default();
                        buf.clear();
                        buf.extend_from_slice(band);
                        full_tx
                            .send(Ok(buf))
                            .map_err(|_| io::Error::other("writer stopped"))
                    });
                    match sent {
                        Ok(()) => continue,
                        Err(e) => Err(e),
                    }
                };
                let failed = r.is_err();
                if full_tx.send(r).is_err() || failed {
                    return;
                }
            }
        });
        let emit = |k: usize, init: &Initializer, w: &mut BufWriter<File>| -> io::Result<()> {
            if prefetched(k, init) {
                // One buffer for a small tensor, bands until its length for a large one.
                let len = init.data.len();
                let mut got = 0u64;
                loop {
                    let buf = full_rx
                        .recv()
                        .map_err(|_| io::Error::other("tensor producer stopped"))??;
                    w.write_all(&buf)?;
                    got += buf.len() as u64;
                    let _ = free_tx.try_send(buf);
                    if len <= PREFETCH_MAX || got >= len {
                        break Ok(());
                    }
                }
            } else {
                init.data.write_to(w)
            }
        };
        let out = &mut model_tmp.writer;
        let mut head = Vec::with_capacity(model_head.len() + 16);
        head.extend_from_slice(&model_head);
        put_key(&mut head, proto::MODEL_GRAPH_TAG);
        put_varint(&mut head, graph_len);
        head.extend_from_slice(&graph_head);
        out.write_all(&head).map_err(io_err(path))?;
        for (k, (init, plan)) in graph.initializers.iter().zip(&plans).enumerate() {
            let mut h = Vec::with_capacity(plan.header.len() + 24);
            put_key(&mut h, proto::GRAPH_INITIALIZER_TAG);
            put_varint(&mut h, plan.msg_len);
            h.extend_from_slice(&plan.header);
            if plan.referenced {
                out.write_all(&h).map_err(io_err(path))?;
            } else if plan.external {
                out.write_all(&h).map_err(io_err(path))?;
                if let Some(data) = data_tmp.as_mut() {
                    let w = &mut data.writer;
                    w.write_all(&vec![0u8; plan.pad as usize])
                        .map_err(io_err(&data_path))?;
                    emit(k, init, w).map_err(io_err(&data_path))?;
                }
            } else {
                put_key(&mut h, proto::TENSOR_RAW_DATA_TAG);
                put_varint(&mut h, init.data.len());
                out.write_all(&h).map_err(io_err(path))?;
                emit(k, init, out).map_err(io_err(path))?;
            }
        }
        Ok(())
    })?;
    let data_bytes = match data_tmp {
        Some(d) => d.commit()?,
        None => 0,
    };
    let model_bytes = model_tmp.commit()?;
    Ok(WriteReport {
        model_path: path.to_path_buf(),
        model_bytes,
        data_path: external.then_some(data_path),
        data_bytes,
        ir_version,
    })
}

/// Starts the raw bytes of every inline tensor of at least [`PAGE_ALIGN_FROM`] bytes on a
/// page boundary of the `.onnx` file, by ending its header with a `doc_string` of spaces of
/// the right length; `model_head` and `graph_head` are the byte lengths written before the
/// initializers. A view referencing such bytes in place ([`ExternalData::InPlace`]) is then
/// mapped by ONNX Runtime, which maps only page-aligned external data.
fn align_inline(plans: &mut [Plan], model_head: u64, graph_head: u64) {
    const PAGE: u64 = 4096;
    let record = |p: &Plan, pad: u64| {
        let msg = p.msg_len + pad;
        key_len(proto::GRAPH_INITIALIZER_TAG) + varint_len(msg) + msg
    };
    let unpadded: u64 = plans.iter().map(|p| record(p, 0)).sum();
    // The graph's own length prefix comes first; its width depends on the padding chosen.
    let mut width = varint_len(graph_head + unpadded);
    for _ in 0..4 {
        let mut pos = model_head + key_len(proto::MODEL_GRAPH_TAG) + width + graph_head;
        let mut pads = Vec::with_capacity(plans.len());
        for p in plans.iter() {
            let mut pad = 0;
            if !p.external && p.len >= PAGE_ALIGN_FROM {
                // Where the raw bytes start with `t` bytes of padding in the header.
                let start = |t: u64| {
                    let msg = p.msg_len + t;
                    pos + key_len(proto::GRAPH_INITIALIZER_TAG)
                        + varint_len(msg)
                        + p.header.len() as u64
                        + t
                        + key_len(proto::TENSOR_RAW_DATA_TAG)
                        + varint_len(p.len)
                };
                pad = (0..2 * PAGE + 8)
                    .find(|&t| start(t).is_multiple_of(PAGE) && doc_string_len(t).is_some())
                    .unwrap_or(0);
            }
            pos += record(p, pad);
            pads.push(pad);
        }
        let graph_len = pos - (model_head + key_len(proto::MODEL_GRAPH_TAG) + width);
        if varint_len(graph_len) == width {
            for (p, pad) in plans.iter_mut().zip(pads) {
                if let Some(field) = doc_string_pad(pad) {
                    p.header.extend_from_slice(&field);
                    p.msg_len += pad;
                }
            }
            return;
        }
        width = varint_len(graph_len);
    }
}

/// A `doc_string` field (tag 12) of spaces exactly `total` bytes long, key and length
/// included (`Some(empty)` for 0); `None` for the lengths no such field has.
fn doc_string_pad(total: u64) -> Option<Vec<u8>> {
    if total == 0 {
        return Some(Vec::new());
    }
    doc_string_len(total).map(|p| {
        let mut f = Vec::with_capacity(total as usize);
        put_key(&mut f, DOC_STRING_TAG);
        put_varint(&mut f, p);
        f.resize(total as usize, b' ');
        f
    })
}

/// The string length `p` of a `doc_string` field exactly `total` bytes long (key, length
/// prefix and `p` spaces); `Some(0)` for 0 (no field), `None` for the lengths no field has.
/// Computed from the prefix width rather than searched, because the page alignment asks
/// for it at every candidate padding of every large tensor.
fn doc_string_len(total: u64) -> Option<u64> {
    if total == 0 {
        return Some(0);
    }
    let key = key_len(DOC_STRING_TAG);
    (1..=10u64).find_map(|w| {
        let p = total.checked_sub(key + w)?;
        (varint_len(p) == w).then_some(p)
    })
}

/// `TensorProto.doc_string`'s field number.
const DOC_STRING_TAG: u32 = 12;

struct Plan {
    header: Vec<u8>,
    msg_len: u64,
    /// Bytes of the tensor's data.
    len: u64,
    external: bool,
    /// Referenced where it already is (`ExternalData::InPlace`): no bytes written.
    referenced: bool,
    pad: u64,
}

/// An output file written under a temporary name and renamed into place on commit; dropped
/// uncommitted, it is removed.
struct TempOutput {
    tmp: PathBuf,
    dest: PathBuf,
    writer: BufWriter<File>,
    committed: bool,
}

impl TempOutput {
    fn create(dest: &Path) -> Result<Self, OnnxError> {
        let name = dest
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let tmp = dest.with_file_name(format!(".{name}.ferry-tmp-{}", std::process::id()));
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(|e| OnnxError::OutputPath {
                path: dest.to_path_buf(),
                reason: e.to_string(),
            })?;
        Ok(Self {
            tmp,
            dest: dest.to_path_buf(),
            writer: BufWriter::with_capacity(1 << 20, file),
            committed: false,
        })
    }

    fn commit(mut self) -> Result<u64, OnnxError> {
        let err = |source| OnnxError::Io {
            path: self.dest.clone(),
            source,
        };
        self.writer.flush().map_err(err)?;
        let len = self.writer.get_ref().metadata().map_err(err)?.len();
        // Renaming onto an existing file makes ext4 (`auto_da_alloc`) allocate and start
        // writing back the whole new file inside `rename`, which costs as much as writing
        // it; an existing output is removed first instead. The output is still never
        // partial: it is either absent for that instant or complete.
        if std::fs::symlink_metadata(&self.dest).is_ok_and(|m| m.is_file()) {
            let _ = std::fs::remove_file(&self.dest);
        }
        std::fs::rename(&self.tmp, &self.dest).map_err(err)?;
        self.committed = true;
        Ok(len)
    }
}

impl Drop for TempOutput {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

fn entry(key: &str, value: &str) -> StringStringEntryProto {
    StringStringEntryProto {
        key: key.into(),
        value: value.into(),
    }
}

fn tensor_header(init: &Initializer) -> TensorProto {
    TensorProto {
        dims: init.dims.clone(),
        data_type: onnx_dtype(init.dtype),
        name: init.name.clone(),
        ..Default::default()
    }
}

/// A small tensor fully encoded (for `Constant` node attributes).
fn tensor_inline(init: &Initializer) -> io::Result<TensorProto> {
    let mut t = tensor_header(init);
    t.raw_data = init.data.bytes()?.into_owned();
    Ok(t)
}

fn value_info(v: &Value) -> ValueInfoProto {
    ValueInfoProto {
        name: v.name.clone(),
        r#type: Some(TypeProto {
            tensor_type: Some(TypeProtoTensor {
                elem_type: onnx_dtype(v.dtype),
                shape: v.shape.as_ref().map(|dims| TensorShapeProto {
                    dim: dims
                        .iter()
                        .map(|d| proto::Dimension {
                            value: Some(match d {
                                Dim::Fixed(n) => proto::DimensionValue::DimValue(*n),
                                Dim::Sym(s) => proto::DimensionValue::DimParam(s.clone()),
                            }),
                            denotation: String::new(),
                        })
                        .collect(),
                }),
            }),
            denotation: String::new(),
        }),
        doc_string: String::new(),
    }
}

fn attribute(name: &str, a: &Attr) -> AttributeProto {
    let mut p = AttributeProto {
        name: name.to_string(),
        ..Default::default()
    };
    match a {
        Attr::Float(f) => {
            p.r#type = at::FLOAT;
            p.f = *f;
        }
        Attr::Int(i) => {
            p.r#type = at::INT;
            p.i = *i;
        }
        Attr::String(s) => {
            p.r#type = at::STRING;
            p.s = s.as_bytes().to_vec();
        }
        Attr::Floats(v) => {
            p.r#type = at::FLOATS;
            p.floats = v.clone();
        }
        Attr::Ints(v) => {
            p.r#type = at::INTS;
            p.ints = v.clone();
        }
        Attr::Strings(v) => {
            p.r#type = at::STRINGS;
            p.strings = v.iter().map(|s| s.as_bytes().to_vec()).collect();
        }
        Attr::Tensor(t) => {
            p.r#type = at::TENSOR;
            // Constant tensors are small owned values; a read failure leaves the attribute
            // empty, which ONNX Runtime then rejects loudly rather than silently.
            p.t = tensor_inline(t).ok();
        }
        Attr::Graph(g) => {
            p.r#type = at::GRAPH;
            p.g = Some(Box::new(subgraph_proto(g)));
        }
    }
    p
}

/// A subgraph (an `If` branch) as a `GraphProto`: its own initializers are small constants
/// written inline (the weights it reads live in the outer graph and stream with it).
fn subgraph_proto(g: &Graph) -> GraphProto {
    let mut p = graph_without_initializers(g, false);
    // A read failure leaves the tensor empty, which ONNX Runtime rejects loudly.
    p.initializer = g
        .initializers
        .iter()
        .map(|i| tensor_inline(i).unwrap_or_else(|_| tensor_header(i)))
        .collect();
    p
}

/// A node as a `NodeProto`.
pub(crate) fn node_proto(n: &Node) -> NodeProto {
    NodeProto {
        input: n.inputs.clone(),
        output: n.outputs.clone(),
        name: n.name.clone(),
        op_type: n.op_type.clone(),
        domain: n.domain.clone(),
        attribute: n.attrs.iter().map(|(k, v)| attribute(k, v)).collect(),
        doc_string: String::new(),
    }
}

fn graph_without_initializers(g: &Graph, untyped_outputs: bool) -> GraphProto {
    GraphProto {
        node: g.nodes.iter().map(node_proto).collect(),
        name: g.name.clone(),
        initializer: Vec::new(),
        doc_string: String::new(),
        input: g.inputs.iter().map(value_info).collect(),
        output: g
            .outputs
            .iter()
            .map(|v| {
                let mut info = value_info(v);
                if untyped_outputs {
                    info.r#type = None;
                }
                info
            })
            .collect(),
        value_info: g.value_info.iter().map(value_info).collect(),
    }
}

fn varint_len(mut v: u64) -> u64 {
    let mut n = 1;
    while v >= 0x80 {
        v >>= 7;
        n += 1;
    }
    n
}

fn key_len(tag: u32) -> u64 {
    varint_len(u64::from(tag) << 3)
}

fn put_varint(buf: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        buf.push((v as u8 & 0x7f) | 0x80);
        v >>= 7;
    }
    buf.push(v as u8);
}

/// A length-delimited field key (wire type 2).
fn put_key(buf: &mut Vec<u8>, tag: u32) {
    put_varint(buf, (u64::from(tag) << 3) | 2);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doc_string_lengths_are_the_searched_ones() {
        let key = key_len(DOC_STRING_TAG);
        for total in 0..20_000u64 {
            let searched = if total == 0 {
                Some(0)
            } else {
                (0..total).find(|&p| key + varint_len(p) + p == total)
            };
            assert_eq!(doc_string_len(total), searched, "total {total}");
            if let Some(f) = doc_string_pad(total) {
                assert_eq!(f.len() as u64, total);
            }
        }
    }

    #[test]
    fn varints_match_prost() {
        for v in [0u64, 1, 127, 128, 300, 1 << 31, u64::MAX] {
            let mut a = Vec::new();
            put_varint(&mut a, v);
            assert_eq!(a.len() as u64, varint_len(v));
            let mut b = Vec::new();
            prost::encoding::encode_varint(v, &mut b);
            assert_eq!(a, b);
        }
    }

    /// A graph whose initializers are the given tensors, each a graph output via Identity.
    fn graph_of(inits: Vec<Initializer>) -> Graph {
        use ferry_ir::{DType, OpsetImport};
        Graph {
            name: "g".into(),
            inputs: vec![],
            outputs: inits
                .iter()
                .map(|i| Value::new(format!("{}_out", i.name), DType::F32, vec![]))
                .collect(),
            nodes: inits
                .iter()
                .map(|i| Node {
                    name: format!("/Identity_{}", i.name),
                    op_type: "Identity".into(),
                    domain: String::new(),
                    inputs: vec![i.name.clone()],
                    outputs: vec![format!("{}_out", i.name)],
                    attrs: Default::default(),
                })
                .collect(),
            initializers: inits,
            value_info: vec![],
            opsets: vec![OpsetImport {
                domain: String::new(),
                version: 17,
            }],
        }
    }

    #[test]
    fn untyped_outputs_leave_only_the_outputs_types_out() -> Result<(), Box<dyn std::error::Error>>
    {
        use ferry_ir::{DType, TensorData};
        let g = graph_of(vec![Initializer {
            name: "w".into(),
            dtype: DType::F32,
            dims: vec![2],
            data: TensorData::from_f32(&[1.0, 2.0]),
        }]);
        let dir = tempfile::tempdir()?;
        for untyped in [false, true] {
            let out = dir.path().join(format!("m{untyped}.onnx"));
            let opts = WriteOptions {
                untyped_outputs: untyped,
                ..Default::default()
            };
            write_model(&g, &out, &opts)?;
            let p = crate::read_model_proto(&out)?;
            let graph = p.graph.ok_or("no graph")?;
            assert_eq!(graph.output.len(), 1);
            assert_eq!(graph.output[0].name, "w_out");
            assert_eq!(graph.output[0].r#type.is_none(), untyped);
        }
        Ok(())
    }

    #[test]
    fn derived_initializers_are_written_as_their_bytes() -> Result<(), Box<dyn std::error::Error>> {
        use ferry_ir::{DType, TensorData};
        let f32s = |n: usize, k: f32| -> Vec<f32> { (0..n).map(|i| i as f32 * k - 1.0).collect() };
        let w = TensorData::from_f32(&f32s(6 * 5, 0.25));
        let big = TensorData::from_f32(&f32s(1500 * 3000, 1e-3));
        let mut inits = vec![
            Initializer {
                name: "wt".into(),
                dtype: DType::F32,
                dims: vec![5, 6],
                data: TensorData::transposed(w.clone(), &[6, 5], &[1, 0], 4)?,
            },
            Initializer {
                name: "plain".into(),
                dtype: DType::F32,
                dims: vec![6, 5],
                data: w.clone(),
            },
            // Larger than the prefetch limit and than one band: streamed band by band.
            Initializer {
                name: "bigt".into(),
                dtype: DType::F32,
                dims: vec![3000, 1500],
                data: TensorData::transposed(big, &[1500, 3000], &[1, 0], 4)?,
            },
        ];
        let cat = TensorData::concat_rows(vec![inits[0].data.clone(), w.clone()], 5)?;
        inits.push(Initializer {
            name: "cat".into(),
            dtype: DType::F32,
            dims: vec![5, 12],
            data: cat,
        });
        let g = graph_of(inits);
        let tmp = tempfile::tempdir()?;
        let dir = tmp.path();
        for external in [ExternalData::Auto, ExternalData::Always] {
            let out = dir.join("m.onnx");
            let opts = WriteOptions {
                external_data: external,
                ..Default::default()
            };
            // Twice: the second write replaces the first file.
            write_model(&g, &out, &opts)?;
            write_model(&g, &out, &opts)?;
            let back = crate::read_graph(&out)?;
            for (a, b) in g.initializers.iter().zip(&back.initializers) {
                assert_eq!(a.name, b.name);
                assert!(a.data.bytes()? == b.data.bytes()?, "{}", a.name);
            }
            assert!(!matches!(back.initializers[0].data, TensorData::Owned(_)));
        }
        Ok(())
    }

    #[test]
    fn past_a_limit_weights_go_external_and_views_reference_them_in_place()
    -> Result<(), Box<dyn std::error::Error>> {
        use ferry_ir::{DType, TensorData};
        let vals: Vec<f32> = (0..5000).map(|i| i as f32 * 0.5).collect();
        let g = graph_of(vec![
            Initializer {
                name: "big".into(),
                dtype: DType::F32,
                dims: vec![50, 100],
                data: TensorData::from_f32(&vals),
            },
            Initializer {
                name: "small".into(),
                dtype: DType::F32,
                dims: vec![2],
                data: TensorData::from_f32(&[1.0, 2.0]),
            },
        ]);
        let tmp = tempfile::tempdir()?;
        let out = tmp.path().join("m.onnx");
        let opts = |external_data| WriteOptions {
            external_data,
            ..Default::default()
        };
        // Under the limit: inline; past it: the side file, as past 2 GiB.
        let r = write_model(&g, &out, &opts(ExternalData::Past(1 << 20)))?;
        assert!(r.data_path.is_none());
        let r = write_model(&g, &out, &opts(ExternalData::Past(10_000)))?;
        assert!(r.data_path.as_ref().is_some_and(|p| p.is_file()));
        assert!(r.model_bytes < 1000, "{}", r.model_bytes);
        // A view of the written model beside it references its side file in place.
        let back = crate::read_graph(&out)?;
        let view = tmp.path().join("view.onnx");
        let v = write_model(&back, &view, &opts(ExternalData::InPlace))?;
        assert!(v.data_path.is_none() && v.model_bytes < 1000);
        let again = crate::read_graph(&view)?;
        for (a, b) in g.initializers.iter().zip(&again.initializers) {
            assert_eq!(a.data.bytes()?, b.data.bytes()?, "{}", a.name);
        }
        assert!(matches!(
            &again.initializers[0].data,
            TensorData::Mapped { file, .. } if file.path().ends_with("m.onnx_data")
        ));
        // In another directory, nothing can be referenced: the bytes are copied.
        let sub = tmp.path().join("sub");
        std::fs::create_dir(&sub)?;
        let v = write_model(&back, &sub.join("view.onnx"), &opts(ExternalData::InPlace))?;
        assert!(v.model_bytes > 20_000);
        Ok(())
    }

    #[test]
    fn large_inline_tensors_start_on_a_page() -> Result<(), Box<dyn std::error::Error>> {
        use ferry_ir::{DType, TensorData};
        // Odd sizes and names shift every later record; all large ones still land aligned.
        let inits: Vec<Initializer> = [
            (70_001usize, "a"),
            (5, "tiny"),
            (16_411, "bbbbbbb"),
            (300_000, "c"),
        ]
        .iter()
        .map(|&(n, name)| {
            let v: Vec<f32> = (0..n).map(|i| i as f32).collect();
            Initializer {
                name: name.into(),
                dtype: DType::F32,
                dims: vec![n as i64],
                data: TensorData::from_f32(&v),
            }
        })
        .collect();
        let g = graph_of(inits);
        let tmp = tempfile::tempdir()?;
        let out = tmp.path().join("m.onnx");
        write_model(&g, &out, &WriteOptions::default())?;
        let back = crate::read_graph(&out)?;
        for (a, b) in g.initializers.iter().zip(&back.initializers) {
            assert_eq!(a.data.bytes()?, b.data.bytes()?, "{}", a.name);
            if let TensorData::Mapped { offset, len, .. } = b.data
                && len >= PAGE_ALIGN_FROM
            {
                assert_eq!(offset % 4096, 0, "{}", a.name);
            }
        }
        assert!(
            back.initializers
                .iter()
                .filter(|i| i.data.len() >= PAGE_ALIGN_FROM)
                .count()
                == 3
        );
        Ok(())
    }

    #[test]
    fn ir_versions() {
        assert_eq!(ir_version_for_opset(14).ok(), Some(7));
        assert_eq!(ir_version_for_opset(17).ok(), Some(8));
        assert_eq!(ir_version_for_opset(21).ok(), Some(10));
        assert_eq!(ir_version_for_opset(9).ok(), Some(4));
        assert_eq!(ir_version_for_opset(13).ok(), Some(7));
        assert!(ir_version_for_opset(8).is_err());
        assert!(ir_version_for_opset(22).is_err());
    }
}
