//! Values, nodes and graphs.

use std::collections::BTreeMap;
use std::fmt;

use crate::{DType, Initializer};

/// One dimension of a value's shape: a fixed size or a named symbol (`batch_size`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Dim {
    /// A fixed extent.
    Fixed(i64),
    /// A symbolic extent, named as it appears in the exported model's dynamic axes.
    Sym(String),
}

impl Dim {
    /// A symbolic dim.
    pub fn sym(name: &str) -> Self {
        Dim::Sym(name.to_string())
    }

    /// The fixed size, if known.
    pub fn fixed(&self) -> Option<i64> {
        match self {
            Dim::Fixed(n) => Some(*n),
            Dim::Sym(_) => None,
        }
    }
}

impl fmt::Display for Dim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Dim::Fixed(n) => write!(f, "{n}"),
            Dim::Sym(s) => f.write_str(s),
        }
    }
}

impl From<i64> for Dim {
    fn from(n: i64) -> Self {
        Dim::Fixed(n)
    }
}

/// A typed value: a graph input or output, or an intermediate with inferred type.
#[derive(Debug, Clone, PartialEq)]
pub struct Value {
    /// Name, unique within the graph.
    pub name: String,
    /// Element type.
    pub dtype: DType,
    /// Shape; `None` when unknown.
    pub shape: Option<Vec<Dim>>,
}

impl Value {
    /// A value with a known shape.
    pub fn new(name: impl Into<String>, dtype: DType, shape: Vec<Dim>) -> Self {
        Self {
            name: name.into(),
            dtype,
            shape: Some(shape),
        }
    }
}

/// A node attribute.
#[derive(Debug, Clone)]
pub enum Attr {
    /// One float.
    Float(f32),
    /// One integer.
    Int(i64),
    /// A string (bytes in ONNX).
    String(String),
    /// Several floats.
    Floats(Vec<f32>),
    /// Several integers.
    Ints(Vec<i64>),
    /// Several strings.
    Strings(Vec<String>),
    /// A tensor (the `value` of a `Constant` node).
    Tensor(Box<Initializer>),
}

/// One operation: an ONNX-style op type over named inputs and outputs.
///
/// An empty input name means an omitted optional input, as in ONNX.
#[derive(Debug, Clone)]
pub struct Node {
    /// Node name, saying where it comes from (`/encoder/layer.0/attention/self/query/MatMul`).
    pub name: String,
    /// Operator type (`MatMul`, `LayerNormalization`, `Attention`…).
    pub op_type: String,
    /// Operator domain: empty for the default ONNX domain, `com.microsoft` for contrib ops.
    pub domain: String,
    /// Input value names.
    pub inputs: Vec<String>,
    /// Output value names.
    pub outputs: Vec<String>,
    /// Attributes, by name, in a stable order.
    pub attrs: BTreeMap<String, Attr>,
}

impl Node {
    /// An attribute by name.
    pub fn attr(&self, name: &str) -> Option<&Attr> {
        self.attrs.get(name)
    }
}

/// An operator set the graph uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpsetImport {
    /// Domain (empty for ONNX).
    pub domain: String,
    /// Version.
    pub version: i64,
}

/// A computation graph: inputs, outputs, nodes in topological order and initializers.
#[derive(Debug, Clone, Default)]
pub struct Graph {
    /// Graph name.
    pub name: String,
    /// Graph inputs (not including initializers).
    pub inputs: Vec<Value>,
    /// Graph outputs.
    pub outputs: Vec<Value>,
    /// Nodes in topological order.
    pub nodes: Vec<Node>,
    /// Constant tensors (weights), bytes still borrowed from their source.
    pub initializers: Vec<Initializer>,
    /// Inferred types of intermediate values, where known.
    pub value_info: Vec<Value>,
    /// Operator sets used.
    pub opsets: Vec<OpsetImport>,
}

impl Graph {
    /// Number of nodes of each op type, sorted by op type.
    pub fn op_counts(&self) -> BTreeMap<String, usize> {
        let mut counts = BTreeMap::new();
        for n in &self.nodes {
            *counts.entry(n.op_type.clone()).or_insert(0) += 1;
        }
        counts
    }

    /// Total number of weight elements.
    pub fn parameter_count(&self) -> u64 {
        self.initializers.iter().map(Initializer::numel).sum()
    }

    /// Total initializer bytes.
    pub fn weight_bytes(&self) -> u64 {
        self.initializers.iter().map(|i| i.data.len()).sum()
    }

    /// The version of the default ONNX opset, if imported.
    pub fn onnx_opset(&self) -> Option<i64> {
        self.opsets
            .iter()
            .find(|o| o.domain.is_empty() || o.domain == "ai.onnx")
            .map(|o| o.version)
    }
}
