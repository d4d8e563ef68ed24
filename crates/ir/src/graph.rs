//! Values, nodes and graphs.

use std::collections::{BTreeMap, BTreeSet};
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
    /// A subgraph (`If`'s `then_branch` / `else_branch`). Its nodes may read values of the
    /// enclosing graph (initializers, inputs, node outputs) by name; it has no inputs of its
    /// own, and its initializers, if any, are small constants written inline.
    Graph(Box<Graph>),
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

    /// The node's subgraph attributes (`If` branches), in attribute-name order.
    pub fn subgraphs(&self) -> impl Iterator<Item = &Graph> {
        self.attrs.values().filter_map(|a| match a {
            Attr::Graph(g) => Some(g.as_ref()),
            _ => None,
        })
    }

    /// Names of enclosing-scope values the node's subgraphs read (its implicit inputs,
    /// as ONNX Runtime calls them), sorted; empty for a node without subgraphs.
    pub fn implicit_inputs(&self) -> BTreeSet<String> {
        let mut out = BTreeSet::new();
        for g in self.subgraphs() {
            out.extend(g.outer_reads());
        }
        out
    }

    /// Every value the node reads: its inputs (omitted optional ones skipped) and its
    /// [`Node::implicit_inputs`].
    pub fn reads(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .inputs
            .iter()
            .filter(|s| !s.is_empty())
            .cloned()
            .collect();
        if self.attrs.values().any(|a| matches!(a, Attr::Graph(_))) {
            v.extend(self.implicit_inputs());
        }
        v
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

    /// Names this graph's nodes (and, recursively, their subgraphs) read that are defined
    /// neither by its inputs, its initializers nor its nodes: for a subgraph, the values
    /// it takes from the enclosing scope. Sorted.
    pub fn outer_reads(&self) -> BTreeSet<String> {
        let mut defined: BTreeSet<&str> = self
            .inputs
            .iter()
            .map(|v| v.name.as_str())
            .chain(self.initializers.iter().map(|i| i.name.as_str()))
            .collect();
        let mut out = BTreeSet::new();
        for n in &self.nodes {
            for r in n.reads() {
                if !defined.contains(r.as_str()) {
                    out.insert(r);
                }
            }
            defined.extend(n.outputs.iter().map(String::as_str));
        }
        for o in &self.outputs {
            if !defined.contains(o.name.as_str()) {
                out.insert(o.name.clone());
            }
        }
        out
    }

    /// Whether any node has a subgraph attribute (an `If`).
    pub fn has_subgraphs(&self) -> bool {
        self.nodes
            .iter()
            .any(|n| n.attrs.values().any(|a| matches!(a, Attr::Graph(_))))
    }

    /// The version of the default ONNX opset, if imported.
    pub fn onnx_opset(&self) -> Option<i64> {
        self.opsets
            .iter()
            .find(|o| o.domain.is_empty() || o.domain == "ai.onnx")
            .map(|o| o.version)
    }
}

/// A contiguous run of a graph's nodes, as [`Graph::segments`] splits it: a model that is
/// run piece by piece, each piece a graph of its own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segment {
    /// Indices of the segment's nodes in [`Graph::nodes`].
    pub nodes: std::ops::Range<usize>,
    /// Values the segment's nodes consume that are neither produced inside it nor
    /// initializers: graph inputs and outputs of earlier segments, in first-use order.
    pub inputs: Vec<String>,
    /// Values produced inside the segment that later segments or the graph outputs
    /// consume, in production order.
    pub outputs: Vec<String>,
    /// Names of the initializers the segment's nodes consume, in first-use order.
    pub initializers: Vec<String>,
    /// Bytes of those initializers.
    pub weight_bytes: u64,
}

impl Graph {
    /// Splits the nodes (in topological order) into contiguous segments whose consumed
    /// initializers total at most `max_bytes` each; a node whose own initializers exceed
    /// the bound forms a segment alone. An initializer consumed by several segments counts
    /// in each. Running the segments in order, each fed the values its `inputs` name,
    /// computes the graph's outputs. Initializers referenced only from node attributes
    /// (`Constant` values) are not counted: they are part of the node.
    pub fn segments(&self, max_bytes: u64) -> Vec<Segment> {
        use std::collections::{HashMap, HashSet};
        let inits: HashMap<&str, u64> = self
            .initializers
            .iter()
            .map(|i| (i.name.as_str(), i.data.len()))
            .collect();
        // Ranges first: greedy, by the bytes of distinct initializers in the range.
        let mut ranges = Vec::new();
        let (mut start, mut bytes) = (0usize, 0u64);
        let mut seen: HashSet<&str> = HashSet::new();
        for (i, node) in self.nodes.iter().enumerate() {
            let own: HashSet<&str> = node
                .inputs
                .iter()
                .map(String::as_str)
                .filter(|n| inits.contains_key(n))
                .collect();
            let more: u64 = own
                .iter()
                .filter(|n| !seen.contains(*n))
                .map(|n| inits[n])
                .sum();
            // Nodes that bring no new weight stay with the segment they follow.
            if i > start && more > 0 && bytes + more > max_bytes {
                ranges.push(start..i);
                start = i;
                // A new segment counts all of the node's own weights.
                bytes = own.iter().map(|n| inits[n]).sum();
                seen.clear();
            } else {
                bytes += more;
            }
            seen.extend(own);
        }
        if start < self.nodes.len() {
            ranges.push(start..self.nodes.len());
        }
        // Then each range's boundary: the last segment that consumes each value.
        let mut last_use: HashMap<&str, usize> = HashMap::new();
        for (s, r) in ranges.iter().enumerate() {
            for node in &self.nodes[r.clone()] {
                for name in node.inputs.iter().filter(|n| !n.is_empty()) {
                    last_use.insert(name.as_str(), s);
                }
            }
        }
        for o in &self.outputs {
            last_use.insert(o.name.as_str(), usize::MAX);
        }
        ranges
            .into_iter()
            .enumerate()
            .map(|(s, r)| {
                let mut produced = HashSet::new();
                let (mut inputs, mut initializers) = (Vec::new(), Vec::new());
                let mut listed = HashSet::new();
                let mut outputs = Vec::new();
                for node in &self.nodes[r.clone()] {
                    for name in node.inputs.iter().filter(|n| !n.is_empty()) {
                        if produced.contains(name.as_str()) || !listed.insert(name.as_str()) {
                            continue;
                        }
                        if inits.contains_key(name.as_str()) {
                            initializers.push(name.clone());
                        } else {
                            inputs.push(name.clone());
                        }
                    }
                    for name in node.outputs.iter().filter(|n| !n.is_empty()) {
                        produced.insert(name.as_str());
                        if last_use.get(name.as_str()).is_some_and(|&l| l > s) {
                            outputs.push(name.clone());
                        }
                    }
                }
                let weight_bytes = initializers.iter().map(|n| inits[n.as_str()]).sum();
                Segment {
                    nodes: r,
                    inputs,
                    outputs,
                    initializers,
                    weight_bytes,
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::TensorData;

    fn node(op: &str, inputs: &[&str], outputs: &[&str]) -> Node {
        Node {
            name: op.to_string(),
            op_type: op.to_string(),
            domain: String::new(),
            inputs: inputs.iter().map(|s| s.to_string()).collect(),
            outputs: outputs.iter().map(|s| s.to_string()).collect(),
            attrs: BTreeMap::new(),
        }
    }

    fn weight(name: &str, floats: usize) -> Initializer {
        Initializer {
            name: name.to_string(),
            dtype: DType::F32,
            dims: vec![floats as i64],
            data: TensorData::from_f32(&vec![0.0; floats]),
        }
    }

    /// x → MatMul(w1) → a → MatMul(w2) → b → Add(a) → c → MatMul(w1) → y, plus a mask
    /// input used only by the last node; w1 (400 B) is shared by the first and last MatMul.
    fn chain() -> Graph {
        Graph {
            inputs: vec![
                Value::new("x", DType::F32, vec![]),
                Value::new("m", DType::F32, vec![]),
            ],
            outputs: vec![
                Value::new("y", DType::F32, vec![]),
                Value::new("a", DType::F32, vec![]),
            ],
            nodes: vec![
                node("MatMul", &["x", "w1"], &["a"]),
                node("MatMul", &["a", "w2"], &["b"]),
                node("Add", &["b", "a"], &["c"]),
                node("Where", &["m", "c", "", "c"], &["d"]),
                node("MatMul", &["d", "w1"], &["y"]),
            ],
            initializers: vec![weight("w1", 100), weight("w2", 100)],
            ..Default::default()
        }
    }

    #[test]
    fn segments_split_by_weight_bytes_with_their_boundaries() {
        let g = chain();
        let s = g.segments(400);
        assert_eq!(s.len(), 3, "{s:#?}");
        assert_eq!(s[0].nodes, 0..1);
        assert_eq!(s[0].inputs, ["x"]);
        // `a` is consumed by segment 1 and is a graph output.
        assert_eq!(s[0].outputs, ["a"]);
        assert_eq!(
            (s[0].initializers.clone(), s[0].weight_bytes),
            (vec!["w1".to_string()], 400)
        );
        assert_eq!(s[1].nodes, 1..4);
        assert_eq!(s[1].inputs, ["a", "m"]);
        assert_eq!(s[1].outputs, ["d"]);
        assert_eq!(s[1].weight_bytes, 400);
        // w1 counts again in the last segment, which re-reads it.
        assert_eq!(s[2].nodes, 4..5);
        assert_eq!(s[2].inputs, ["d"]);
        assert_eq!(s[2].outputs, ["y"]);
        assert_eq!(s[2].initializers, ["w1"]);

        // A shared weight counts once within a segment: w1 + w2 fit 800 bytes, and the
        // last MatMul's w1 adds nothing. Graph inputs in, graph outputs out.
        let all = g.segments(800);
        assert_eq!(all.len(), 1, "{all:#?}");
        assert_eq!(all[0].nodes, 0..5);
        assert_eq!(all[0].inputs, ["x", "m"]);
        assert_eq!(all[0].outputs, ["a", "y"]);
        assert_eq!(all[0].initializers, ["w1", "w2"]);
        assert_eq!(all[0].weight_bytes, 800);
        // A node over the bound stands alone.
        let tiny = g.segments(1);
        assert_eq!(
            tiny.iter().map(|s| s.nodes.len()).collect::<Vec<_>>(),
            [1, 3, 1]
        );
        assert!(Graph::default().segments(1).is_empty());
    }
}
