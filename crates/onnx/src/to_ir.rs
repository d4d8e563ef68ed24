//! ONNX → IR: reads a `.onnx` file into a ferry [`Graph`] whose weights stay in the file.
//!
//! The model file is mapped, and the protobuf wire format of `ModelProto.graph` and of each
//! `GraphProto.initializer` is walked by hand: every field except `raw_data` is decoded with
//! prost, while `raw_data` becomes a [`TensorData::Mapped`] byte range of the mapped file, so
//! weight bytes are never copied. External data maps the side file the same way. Only
//! tensors stored in the typed fields (`float_data`, `int64_data`, …) and `Constant`
//! attributes are converted to owned bytes.

use std::collections::{BTreeMap, HashMap};
use std::ops::Range;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use ferry_ir::{
    Attr, DType, Dim, Graph, Initializer, MappedFile, Node, OpsetImport, TensorData, Value,
};
use prost::Message;

use crate::dtype_from_onnx;
use crate::proto::{
    self, AttributeProto, GraphProto, ModelProto, NodeProto, TensorProto, ValueInfoProto,
    attribute_type as at,
};
use crate::read::ReadError;

/// The `ModelProto` fields ferry's [`Graph`] does not model, as the file had them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ModelInfo {
    /// `ir_version`.
    pub ir_version: i64,
    /// `producer_name`.
    pub producer_name: String,
    /// `producer_version`.
    pub producer_version: String,
    /// `domain`.
    pub domain: String,
    /// `model_version`.
    pub model_version: i64,
    /// `doc_string` of the model.
    pub doc_string: String,
    /// `metadata_props`, in file order.
    pub metadata: Vec<(String, String)>,
    /// `doc_string` of the graph.
    pub graph_doc_string: String,
}

/// A model read by [`read_model`]: the graph and the model-level fields around it.
#[derive(Debug, Clone)]
pub struct OnnxModel {
    /// The graph; initializers borrow their bytes from the mapped model (or side) file.
    pub graph: Graph,
    /// Model-level fields ferry's IR does not hold.
    pub info: ModelInfo,
}

/// Reads an ONNX model into a ferry [`Graph`] (see [`read_model`]).
pub fn read_graph(path: &Path) -> Result<Graph, ReadError> {
    read_model(path).map(|m| m.graph)
}

/// Reads an ONNX model: the graph (nodes, inputs, outputs, value infos, opset imports,
/// initializers mapped in place, external data mapped from side files next to the model)
/// and the model-level fields.
///
/// Graph inputs that name an initializer (old exporters list weights as inputs) are left
/// out of [`Graph::inputs`]: ferry treats them as constants. Graph attributes (`If`
/// branches) become [`Attr::Graph`], their own small initializers decoded; node attributes
/// of kinds ferry's [`Attr`] cannot hold (sparse tensors, type protos) are refused with an
/// error naming the node.
pub fn read_model(path: &Path) -> Result<OnnxModel, ReadError> {
    let file = Arc::new(MappedFile::open(path).map_err(|source| ReadError::Io {
        path: path.to_path_buf(),
        source,
    })?);
    let malformed = |reason: &'static str| ReadError::Malformed {
        path: path.to_path_buf(),
        reason,
    };
    let decode = |source: prost::DecodeError| ReadError::Decode {
        path: path.to_path_buf(),
        source,
    };
    let bytes = file.bytes();

    // ModelProto: everything but the graph is small; decode it from the other fields.
    let mut model_rest = Vec::new();
    let mut graph_range = None;
    for field in Fields::new(bytes, 0..bytes.len()) {
        let f = field.map_err(malformed)?;
        if f.tag == proto::MODEL_GRAPH_TAG && f.wire == 2 {
            if graph_range.is_some() {
                return Err(malformed("more than one graph field"));
            }
            graph_range = Some(f.payload.clone());
        } else {
            model_rest.extend_from_slice(&bytes[f.whole]);
        }
    }
    let model = ModelProto::decode(model_rest.as_slice()).map_err(decode)?;
    let graph_range = graph_range.ok_or_else(|| malformed("no graph"))?;

    // GraphProto: initializers are walked, the rest decoded.
    let mut graph_rest = Vec::new();
    let mut tensors = Vec::new();
    for field in Fields::new(bytes, graph_range) {
        let f = field.map_err(malformed)?;
        if f.tag == proto::GRAPH_INITIALIZER_TAG && f.wire == 2 {
            let mut header = Vec::new();
            let mut raw = None;
            for tf in Fields::new(bytes, f.payload) {
                let tf = tf.map_err(malformed)?;
                if tf.tag == proto::TENSOR_RAW_DATA_TAG && tf.wire == 2 {
                    raw = Some(tf.payload.start as u64..tf.payload.end as u64);
                } else {
                    header.extend_from_slice(&bytes[tf.whole]);
                }
            }
            let t = TensorProto::decode(header.as_slice()).map_err(decode)?;
            tensors.push((t, raw));
        } else {
            graph_rest.extend_from_slice(&bytes[f.whole]);
        }
    }
    let gp = GraphProto::decode(graph_rest.as_slice()).map_err(decode)?;

    let mut cx = Context {
        path: path.to_path_buf(),
        dir: match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        },
        model: file.clone(),
        side_files: HashMap::new(),
        unknown_dims: 0,
    };
    let initializers = tensors
        .iter()
        .map(|(t, raw)| cx.tensor(t, raw.clone()))
        .collect::<Result<Vec<_>, _>>()?;
    let mut graph = cx.graph_body(&gp, initializers, "graph")?;
    graph.opsets = model
        .opset_import
        .iter()
        .map(|o| OpsetImport {
            domain: o.domain.clone(),
            version: o.version,
        })
        .collect();
    let info = ModelInfo {
        ir_version: model.ir_version,
        producer_name: model.producer_name,
        producer_version: model.producer_version,
        domain: model.domain,
        model_version: model.model_version,
        doc_string: model.doc_string,
        metadata: model
            .metadata_props
            .into_iter()
            .map(|e| (e.key, e.value))
            .collect(),
        graph_doc_string: gp.doc_string,
    };
    Ok(OnnxModel { graph, info })
}

/// State of one read: where the model lives and the side files mapped so far.
struct Context {
    path: PathBuf,
    dir: PathBuf,
    model: Arc<MappedFile>,
    side_files: HashMap<PathBuf, Arc<MappedFile>>,
    unknown_dims: usize,
}

impl Context {
    fn invalid(&self, reason: String) -> ReadError {
        ReadError::Invalid {
            path: self.path.clone(),
            reason,
        }
    }

    fn value(&mut self, v: &ValueInfoProto, what: &str) -> Result<Value, ReadError> {
        let Some(tt) = v.r#type.as_ref().and_then(|t| t.tensor_type.as_ref()) else {
            return Err(self.invalid(format!("{what} `{}` is not a tensor", v.name)));
        };
        let dtype = dtype_from_onnx(tt.elem_type).ok_or_else(|| {
            self.invalid(format!(
                "{what} `{}` has element type {}, which ferry does not handle",
                v.name, tt.elem_type
            ))
        })?;
        let shape = tt.shape.as_ref().map(|s| {
            s.dim
                .iter()
                .map(|d| match &d.value {
                    Some(proto::DimensionValue::DimValue(n)) => Dim::Fixed(*n),
                    Some(proto::DimensionValue::DimParam(p)) => Dim::Sym(p.clone()),
                    None => {
                        self.unknown_dims += 1;
                        Dim::Sym(format!("unk_{}", self.unknown_dims))
                    }
                })
                .collect()
        });
        Ok(Value {
            name: v.name.clone(),
            dtype,
            shape,
        })
    }

    fn node(&mut self, n: &NodeProto) -> Result<Node, ReadError> {
        let mut attrs = BTreeMap::new();
        for a in &n.attribute {
            let attr = self.attribute(a).map_err(|reason| {
                self.invalid(format!(
                    "node `{}` ({}): attribute `{}` {reason}",
                    n.name, n.op_type, a.name
                ))
            })?;
            attrs.insert(a.name.clone(), attr);
        }
        Ok(Node {
            name: n.name.clone(),
            op_type: n.op_type.clone(),
            domain: n.domain.clone(),
            inputs: n.input.clone(),
            outputs: n.output.clone(),
            attrs,
        })
    }

    fn attribute(&mut self, a: &AttributeProto) -> Result<Attr, String> {
        let utf8 = |b: &[u8]| String::from_utf8(b.to_vec()).map_err(|_| "is not UTF-8".to_string());
        Ok(match a.r#type {
            at::FLOAT => Attr::Float(a.f),
            at::INT => Attr::Int(a.i),
            at::STRING => Attr::String(utf8(&a.s)?),
            at::FLOATS => Attr::Floats(a.floats.clone()),
            at::INTS => Attr::Ints(a.ints.clone()),
            at::STRINGS => Attr::Strings(
                a.strings
                    .iter()
                    .map(|s| utf8(s))
                    .collect::<Result<Vec<_>, _>>()?,
            ),
            at::TENSOR => {
                let t =
                    a.t.as_ref()
                        .ok_or("is a tensor attribute without a tensor")?;
                Attr::Tensor(Box::new(self.tensor(t, None).map_err(|e| match e {
                    ReadError::Invalid { reason, .. } => reason,
                    other => other.to_string(),
                })?))
            }
            at::GRAPH => {
                let g = a.g.as_ref().ok_or("is a graph attribute without a graph")?;
                Attr::Graph(Box::new(self.subgraph(g).map_err(|e| match e {
                    ReadError::Invalid { reason, .. } => reason,
                    other => other.to_string(),
                })?))
            }
            0 if !a.ref_attr_name.is_empty() => {
                return Err(format!(
                    "refers to function attribute `{}` (functions are not supported)",
                    a.ref_attr_name
                ));
            }
            other => {
                return Err(format!(
                    "has attribute type {other}, which ferry does not handle"
                ));
            }
        })
    }

    /// A graph's body (`what`: "graph", or "subgraph" for an `If` branch, whose own small
    /// initializers are decoded and whose reads of the enclosing graph stay names): inputs
    /// (those naming an initializer left out), outputs, value infos and nodes, with
    /// `initializers`; no opsets (the model's, set by the caller).
    fn graph_body(
        &mut self,
        gp: &GraphProto,
        initializers: Vec<Initializer>,
        what: &str,
    ) -> Result<Graph, ReadError> {
        let init_names: std::collections::HashSet<&str> =
            initializers.iter().map(|i| i.name.as_str()).collect();
        let inputs = gp
            .input
            .iter()
            .filter(|v| !init_names.contains(v.name.as_str()))
            .map(|v| self.value(v, &format!("{what} input")))
            .collect::<Result<Vec<_>, _>>()?;
        let outputs = gp
            .output
            .iter()
            .map(|v| self.value(v, &format!("{what} output")))
            .collect::<Result<Vec<_>, _>>()?;
        // value_info entries are hints: those that are not tensors of a ferry dtype are dropped.
        let value_info = gp
            .value_info
            .iter()
            .filter_map(|v| self.value(v, "value_info").ok())
            .collect();
        let nodes = gp
            .node
            .iter()
            .map(|n| self.node(n))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Graph {
            name: gp.name.clone(),
            inputs,
            outputs,
            nodes,
            initializers,
            value_info,
            opsets: Vec::new(),
        })
    }

    /// A subgraph (an `If` branch) with its own decoded initializers.
    fn subgraph(&mut self, gp: &GraphProto) -> Result<Graph, ReadError> {
        let initializers = gp
            .initializer
            .iter()
            .map(|t| self.tensor(t, None))
            .collect::<Result<Vec<_>, _>>()?;
        self.graph_body(gp, initializers, "subgraph")
    }

    /// A tensor: `raw` is where its `raw_data` lies in the model file (initializers), or
    /// `None` to use the decoded message's own fields (attributes).
    fn tensor(
        &mut self,
        t: &TensorProto,
        raw: Option<Range<u64>>,
    ) -> Result<Initializer, ReadError> {
        let name = &t.name;
        let dtype = dtype_from_onnx(t.data_type).ok_or_else(|| {
            self.invalid(format!(
                "tensor `{name}` has data type {}, which ferry does not handle",
                t.data_type
            ))
        })?;
        if let Some(d) = t.dims.iter().find(|&&d| d < 0) {
            return Err(self.invalid(format!("tensor `{name}` has negative dim {d}")));
        }
        let numel = t
            .dims
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d as u64))
            .ok_or_else(|| self.invalid(format!("tensor `{name}` is too large")))?;
        let expected = numel
            .checked_mul(dtype.size() as u64)
            .ok_or_else(|| self.invalid(format!("tensor `{name}` is too large")))?;
        let data = if t.data_location == proto::data_location::EXTERNAL {
            self.external(t, expected)?
        } else if let Some(r) = raw {
            TensorData::Mapped {
                file: self.model.clone(),
                offset: r.start,
                len: r.end - r.start,
            }
        } else if !t.raw_data.is_empty() {
            TensorData::owned(t.raw_data.clone())
        } else {
            TensorData::owned(typed_bytes(t, dtype))
        };
        if data.len() != expected {
            return Err(self.invalid(format!(
                "tensor `{name}` has {} bytes but its data type and shape {:?} need {expected}",
                data.len(),
                t.dims
            )));
        }
        Ok(Initializer {
            name: name.clone(),
            dtype,
            dims: t.dims.clone(),
            data,
        })
    }

    fn external(&mut self, t: &TensorProto, expected: u64) -> Result<TensorData, ReadError> {
        let name = &t.name;
        let get = |key: &str| {
            t.external_data
                .iter()
                .rev()
                .find(|e| e.key == key)
                .map(|e| e.value.as_str())
        };
        let location = get("location").ok_or_else(|| {
            self.invalid(format!(
                "tensor `{name}` has external data without a location"
            ))
        })?;
        let number = |key: &str| -> Result<Option<u64>, ReadError> {
            get(key)
                .map(|v| {
                    v.parse::<u64>().map_err(|_| {
                        self.invalid(format!(
                            "tensor `{name}`: external data {key} `{v}` is not a number"
                        ))
                    })
                })
                .transpose()
        };
        let offset = number("offset")?.unwrap_or(0);
        let length = number("length")?;
        let rel = Path::new(location);
        let escapes = rel.as_os_str().is_empty()
            || rel
                .components()
                .any(|c| !matches!(c, Component::Normal(_) | Component::CurDir));
        if escapes {
            return Err(self.invalid(format!(
                "tensor `{name}`: external data location `{location}` is not a file inside the model's directory"
            )));
        }
        let full = self.dir.join(rel);
        // Symbolic links must not lead out of the directory either.
        let canon_dir = self.dir.canonicalize().map_err(|source| ReadError::Io {
            path: self.dir.clone(),
            source,
        })?;
        let canon = full.canonicalize().map_err(|source| ReadError::Io {
            path: full.clone(),
            source,
        })?;
        if !canon.starts_with(&canon_dir) {
            return Err(self.invalid(format!(
                "tensor `{name}`: external data location `{location}` leads outside the model's directory"
            )));
        }
        let file = match self.side_files.get(&canon) {
            Some(f) => f.clone(),
            None => {
                let f = Arc::new(MappedFile::open(&canon).map_err(|source| ReadError::Io {
                    path: full.clone(),
                    source,
                })?);
                self.side_files.insert(canon, f.clone());
                f
            }
        };
        let file_len = file.bytes().len() as u64;
        let len = length.unwrap_or(expected);
        if offset.checked_add(len).is_none_or(|end| end > file_len) {
            return Err(self.invalid(format!(
                "tensor `{name}`: external data {offset}+{len} runs past the end of `{location}` ({file_len} bytes)"
            )));
        }
        Ok(TensorData::Mapped { file, offset, len })
    }
}

/// The bytes of a tensor stored in `TensorProto`'s typed fields, little-endian.
fn typed_bytes(t: &TensorProto, dtype: DType) -> Vec<u8> {
    match dtype {
        DType::F32 => t.float_data.iter().flat_map(|v| v.to_le_bytes()).collect(),
        DType::F64 => t.double_data.iter().flat_map(|v| v.to_le_bytes()).collect(),
        DType::I64 => t.int64_data.iter().flat_map(|v| v.to_le_bytes()).collect(),
        DType::I32 => t.int32_data.iter().flat_map(|v| v.to_le_bytes()).collect(),
        // Narrower types are stored one per int32 (float16/bfloat16 as their bit patterns).
        DType::I16 | DType::F16 | DType::BF16 => t
            .int32_data
            .iter()
            .flat_map(|&v| (v as u16).to_le_bytes())
            .collect(),
        DType::I8 | DType::U8 | DType::Bool => t.int32_data.iter().map(|&v| v as u8).collect(),
    }
}

/// One protobuf field found by [`Fields`].
struct Field {
    tag: u32,
    wire: u8,
    /// Key, length and payload: the bytes to copy to re-encode the field.
    whole: Range<usize>,
    /// The payload (for length-delimited fields, the bytes after the length).
    payload: Range<usize>,
}

/// Walks the fields of one protobuf message lying in `buf[range]`.
struct Fields<'a> {
    buf: &'a [u8],
    pos: usize,
    end: usize,
    failed: bool,
}

impl<'a> Fields<'a> {
    fn new(buf: &'a [u8], range: Range<usize>) -> Self {
        Self {
            buf,
            pos: range.start,
            end: range.end,
            failed: false,
        }
    }

    fn varint(&mut self) -> Result<u64, &'static str> {
        let mut v = 0u64;
        for i in 0..10 {
            let b = *self
                .buf
                .get(self.pos)
                .filter(|_| self.pos < self.end)
                .ok_or("truncated varint")?;
            self.pos += 1;
            v |= u64::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err("varint too long")
    }

    fn field(&mut self) -> Result<Field, &'static str> {
        let start = self.pos;
        let key = self.varint()?;
        let (tag, wire) = ((key >> 3) as u32, (key & 7) as u8);
        if tag == 0 {
            return Err("field number 0");
        }
        let payload_start;
        match wire {
            0 => {
                payload_start = self.pos;
                self.varint()?;
            }
            1 | 5 => {
                payload_start = self.pos;
                let n = if wire == 1 { 8 } else { 4 };
                if self.end - self.pos < n {
                    return Err("field runs past the end of its message");
                }
                self.pos += n;
            }
            2 => {
                let n = self.varint()?;
                payload_start = self.pos;
                if n > (self.end - self.pos) as u64 {
                    return Err("field runs past the end of its message");
                }
                self.pos += n as usize;
            }
            _ => return Err("unsupported wire type"),
        }
        Ok(Field {
            tag,
            wire,
            whole: start..self.pos,
            payload: payload_start..self.pos,
        })
    }
}

impl Iterator for Fields<'_> {
    type Item = Result<Field, &'static str>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed || self.pos >= self.end {
            return None;
        }
        let r = self.field();
        self.failed = r.is_err();
        Some(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_walk_and_reject_truncation() {
        // field 1 varint 150, field 2 bytes "ab", field 3 fixed32.
        let buf = [0x08, 0x96, 0x01, 0x12, 0x02, b'a', b'b', 0x1d, 1, 2, 3, 4];
        let fs: Vec<Field> = Fields::new(&buf, 0..buf.len())
            .collect::<Result<_, _>>()
            .expect("walk");
        assert_eq!(fs.len(), 3);
        assert_eq!((fs[1].tag, fs[1].wire), (2, 2));
        assert_eq!(&buf[fs[1].payload.clone()], b"ab");
        assert_eq!(fs[2].whole, 7..12);
        for cut in 1..buf.len() {
            if [3, 7].contains(&cut) {
                continue;
            }
            let r: Result<Vec<Field>, _> = Fields::new(&buf, 0..cut).collect();
            assert!(r.is_err(), "cut at {cut}");
        }
    }

    #[test]
    fn typed_fields_become_bytes() {
        let t = TensorProto {
            int32_data: vec![1, -1, 300],
            ..Default::default()
        };
        assert_eq!(typed_bytes(&t, DType::U8), vec![1, 255, 44]);
        assert_eq!(typed_bytes(&t, DType::I16), vec![1, 0, 255, 255, 44, 1]);
        let t = TensorProto {
            float_data: vec![1.5],
            ..Default::default()
        };
        assert_eq!(typed_bytes(&t, DType::F32), 1.5f32.to_le_bytes().to_vec());
    }
}
