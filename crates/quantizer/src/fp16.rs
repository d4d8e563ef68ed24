//! float16 conversion: weights and compute in float16, graph inputs and outputs kept float32
//! by default, as ONNX Runtime's `float16.convert_float_to_float16(keep_io_types=True)`.
//!
//! Every float32 value becomes float16 except the inputs and outputs of nodes that stay in
//! float32: op types in [`FP32_OPS`] and nodes excluded by name. `Cast` nodes join the two
//! precisions wherever a value crosses between them, and (with `keep_io_types`) at the
//! graph's float inputs and outputs, whose names and float32 types stay as they were.
//! Float32 initializers become float16 (clamped to float16's finite range, tiny non-zero
//! magnitudes raised to its smallest subnormal, as ONNX Runtime does) unless only float32
//! nodes read them; the conversion runs when the writer streams each tensor. `Cast` to
//! float becomes `Cast` to float16, and `Constant` / `ConstantOfShape` values become float16.
//! Integer and boolean tensors are untouched.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;

use ferry_ir::{Attr, DType, Graph, Initializer, Node, RowProducer, TensorData};

use crate::QuantizeError;
use crate::int4::unique;

/// Op types left in float32 behind Casts.
///
/// ONNX Runtime's own default block list (`float16.DEFAULT_OP_BLOCK_LIST`: ai.onnx.ml
/// operators, `NonMaxSuppression`, `TopK`, `RoiAlign`, `Range`, `CumSum`, `Min`, `Max`,
/// `Upsample`, `RandomUniformLike`). Probing ONNX Runtime 1.32's CPU provider (Python) with
/// one-node float16 models found only `Range` refused outright (its schema has no float16;
/// the integration tests run converted graphs in 1.31); MatMul,
/// Gemm, Add, Mul, Sub, Div, Pow, Sqrt, Erf, Tanh, Softmax, LayerNormalization, ReduceMean,
/// Gather, Where, Cast and the contrib SkipLayerNormalization, Attention,
/// EmbedLayerNormalization, BiasGelu, FastGelu, Gelu and MatMulNBits all load and run (ONNX
/// Runtime inserts its own Casts around the few without a float16 CPU kernel).
pub const FP32_OPS: &[&str] = &[
    "ArrayFeatureExtractor",
    "Binarizer",
    "CastMap",
    "CategoryMapper",
    "DictVectorizer",
    "FeatureVectorizer",
    "Imputer",
    "LabelEncoder",
    "LinearClassifier",
    "LinearRegressor",
    "Normalizer",
    "OneHotEncoder",
    "RandomUniformLike",
    "SVMClassifier",
    "SVMRegressor",
    "Scaler",
    "TreeEnsembleClassifier",
    "TreeEnsembleRegressor",
    "TreeEnsemble",
    "ZipMap",
    "NonMaxSuppression",
    "TopK",
    "RoiAlign",
    "Range",
    "CumSum",
    "Min",
    "Max",
    "Upsample",
];

/// Inputs that stay float32 even when their node runs in float16 (op type, input indices),
/// as ONNX Runtime's `ALWAYS_FLOAT_INPUTS`.
const ALWAYS_FLOAT_INPUTS: &[(&str, &[usize])] = &[
    ("Resize", &[2]),
    ("GroupNorm", &[1, 2]),
    ("SkipGroupNorm", &[1, 2]),
];

/// ONNX's element type codes for float32 and float16.
const ONNX_FLOAT: i64 = 1;
const ONNX_FLOAT16: i64 = 10;

/// float16's largest finite value.
const F16_MAX: f32 = 65504.0;
/// float16's smallest positive subnormal (2^-24).
const F16_MIN_POSITIVE: f32 = 5.960_464_5e-8;

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
    /// Float32 initializers kept because only float32 nodes read them.
    pub initializers_kept: usize,
    /// `Constant`, `ConstantOfShape` and `Cast` nodes whose value or target became float16.
    pub constants_converted: usize,
    /// Nodes left in float32 (blocked op types and excluded names).
    pub nodes_kept_fp32: usize,
    /// `Cast` nodes inserted between precisions and at the graph's edges.
    pub casts_inserted: usize,
}

impl std::ops::Add for Fp16Stats {
    type Output = Fp16Stats;

    /// Sums the counts of two runs (the two parts of a merged decoder: a weight both read counts twice).
    fn add(self, o: Fp16Stats) -> Fp16Stats {
        Fp16Stats {
            initializers_converted: self.initializers_converted + o.initializers_converted,
            initializers_kept: self.initializers_kept + o.initializers_kept,
            constants_converted: self.constants_converted + o.constants_converted,
            nodes_kept_fp32: self.nodes_kept_fp32 + o.nodes_kept_fp32,
            casts_inserted: self.casts_inserted + o.casts_inserted,
        }
    }
}

impl fmt::Display for Fp16Stats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} initializers → float16 ({} kept float32), {} constants/casts → float16, \
             {} nodes kept float32, {} Casts inserted",
            self.initializers_converted,
            self.initializers_kept,
            self.constants_converted,
            self.nodes_kept_fp32,
            self.casts_inserted
        )
    }
}

/// Precision a float value has after conversion.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Prec {
    F32,
    F16,
}

impl Prec {
    fn dtype(self) -> DType {
        match self {
            Prec::F32 => DType::F32,
            Prec::F16 => DType::F16,
        }
    }

    fn onnx(self) -> i64 {
        match self {
            Prec::F32 => ONNX_FLOAT,
            Prec::F16 => ONNX_FLOAT16,
        }
    }
}

/// Converts a float32 graph to float16.
///
/// A merged decoder ([`ferry_ir::split_merged`]) is rewritten as its two decoders, merged
/// again (stats summed).
pub fn convert_fp16(graph: &mut Graph, opts: &Fp16Options) -> Result<Fp16Stats, QuantizeError> {
    if let Some(parts) = ferry_ir::map_merged(graph, |g| convert_fp16(g, opts)) {
        let (a, b) = parts?;
        return Ok(a + b);
    }
    crate::no_subgraphs(graph)?;
    let mut stats = Fp16Stats::default();
    let types = infer_dtypes(graph);
    let is_f32 = |name: &str| !name.is_empty() && types.get(name) == Some(&DType::F32);
    let exclude: HashSet<&str> = opts.exclude.iter().map(String::as_str).collect();
    let blocked: Vec<bool> = graph
        .nodes
        .iter()
        .map(|n| exclude.contains(n.name.as_str()) || FP32_OPS.contains(&n.op_type.as_str()))
        .collect();
    stats.nodes_kept_fp32 = blocked.iter().filter(|b| **b).count();
    let wants = |ni: usize, slot: usize| -> Prec {
        let n = &graph.nodes[ni];
        let always_float = ALWAYS_FLOAT_INPUTS
            .iter()
            .any(|(op, slots)| *op == n.op_type && slots.contains(&slot));
        if blocked[ni] || always_float {
            Prec::F32
        } else {
            Prec::F16
        }
    };
    let edge = if opts.keep_io_types {
        Prec::F32
    } else {
        Prec::F16
    };

    // The precision each float32 value is produced in.
    let mut native: HashMap<String, Prec> = HashMap::new();
    for v in &graph.inputs {
        if v.dtype == DType::F32 {
            native.insert(v.name.clone(), edge);
        }
    }
    let mut readers: HashMap<&str, Vec<(usize, usize)>> = HashMap::new();
    for (ni, n) in graph.nodes.iter().enumerate() {
        for (slot, i) in n.inputs.iter().enumerate() {
            readers.entry(i.as_str()).or_default().push((ni, slot));
        }
    }
    let graph_outputs: HashSet<&str> = graph.outputs.iter().map(|v| v.name.as_str()).collect();
    for t in &graph.initializers {
        if t.dtype == DType::F32 {
            let any_f16 = readers
                .get(t.name.as_str())
                .is_some_and(|r| r.iter().any(|&(ni, s)| wants(ni, s) == Prec::F16))
                || (graph_outputs.contains(t.name.as_str()) && edge == Prec::F16);
            native.insert(t.name.clone(), if any_f16 { Prec::F16 } else { Prec::F32 });
        }
    }
    for (ni, n) in graph.nodes.iter().enumerate() {
        for o in &n.outputs {
            if is_f32(o) {
                native.insert(o.clone(), if blocked[ni] { Prec::F32 } else { Prec::F16 });
            }
        }
    }

    let mut taken: HashSet<String> = graph
        .initializers
        .iter()
        .map(|t| t.name.clone())
        .chain(graph.nodes.iter().flat_map(|n| n.outputs.iter().cloned()))
        .chain(graph.nodes.iter().map(|n| n.name.clone()))
        .chain(graph.inputs.iter().map(|v| v.name.clone()))
        .collect();

    // Graph outputs produced in the other precision: the producer writes a renamed value and
    // a Cast writes the output's own name.
    let mut internal: HashMap<String, String> = HashMap::new();
    let mut output_casts: HashMap<String, (String, Prec)> = HashMap::new();
    for v in &graph.outputs {
        if let Some(&p) = native.get(&v.name)
            && p != edge
            && !graph.inputs.iter().any(|i| i.name == v.name)
            && !graph.initializers.iter().any(|t| t.name == v.name)
        {
            let suffix = if p == Prec::F16 { "fp16" } else { "fp32" };
            let renamed = unique(&mut taken, &format!("{}_{suffix}", v.name));
            native.insert(renamed.clone(), p);
            internal.insert(v.name.clone(), renamed.clone());
            output_casts.insert(renamed, (v.name.clone(), edge));
        }
    }
    let inner = |name: &str| {
        internal
            .get(name)
            .cloned()
            .unwrap_or_else(|| name.to_string())
    };

    // Casts: (value's internal name, target precision) → cast output name.
    let mut casts: BTreeMap<(String, Prec), String> = BTreeMap::new();
    let mut new_nodes: Vec<Node> = Vec::with_capacity(graph.nodes.len());
    let mut pending: HashMap<String, Vec<Node>> = HashMap::new();
    let mut prelude: Vec<Node> = Vec::new();
    let producers: HashSet<String> = graph
        .nodes
        .iter()
        .flat_map(|n| n.outputs.iter().map(|o| inner(o)))
        .collect();
    let mut rewritten: Vec<Node> = Vec::with_capacity(graph.nodes.len());
    for (ni, n) in graph.nodes.iter().enumerate() {
        let mut node = n.clone();
        for (slot, input) in node.inputs.iter_mut().enumerate() {
            if !is_f32(input) {
                continue;
            }
            let name = inner(input);
            let Some(&have) = native.get(&name) else {
                continue;
            };
            let want = wants(ni, slot);
            if have == want {
                *input = name;
                continue;
            }
            let key = (name.clone(), want);
            let cast_out = if let Some(c) = casts.get(&key) {
                c.clone()
            } else {
                let suffix = if want == Prec::F16 { "fp16" } else { "fp32" };
                let out = unique(&mut taken, &format!("{name}_{suffix}"));
                let cast = cast_node(&mut taken, &name, &out, want);
                stats.casts_inserted += 1;
                if producers.contains(&name) {
                    pending.entry(name.clone()).or_default().push(cast);
                } else {
                    prelude.push(cast);
                }
                casts.insert(key, out.clone());
                out
            };
            *input = cast_out;
        }
        // (By the original output names, which `types` knows.)
        if !blocked[ni] && convert_node_attrs(&mut node, &types)? {
            stats.constants_converted += 1;
        }
        for o in node.outputs.iter_mut() {
            *o = inner(o);
        }
        rewritten.push(node);
    }
    for (renamed, (out, p)) in &output_casts {
        let cast = cast_node(&mut taken, renamed, out, *p);
        stats.casts_inserted += 1;
        pending.entry(renamed.clone()).or_default().push(cast);
    }
    new_nodes.extend(prelude);
    for node in rewritten {
        let outs = node.outputs.clone();
        new_nodes.push(node);
        for o in outs {
            if let Some(cs) = pending.remove(&o) {
                new_nodes.extend(cs);
            }
        }
    }
    graph.nodes = new_nodes;

    // Initializers.
    for t in &mut graph.initializers {
        if t.dtype != DType::F32 {
            continue;
        }
        if native.get(&t.name) == Some(&Prec::F16) {
            *t = to_f16_initializer(t)?;
            stats.initializers_converted += 1;
        } else {
            stats.initializers_kept += 1;
        }
    }
    // Value types.
    for v in graph.value_info.iter_mut() {
        if v.dtype == DType::F32 {
            v.name = inner(&v.name);
            if let Some(p) = native.get(&v.name) {
                v.dtype = p.dtype();
            }
        }
    }
    for v in graph.inputs.iter_mut().chain(graph.outputs.iter_mut()) {
        if v.dtype == DType::F32 {
            v.dtype = edge.dtype();
        }
    }
    Ok(stats)
}

/// A `Cast` node from `input` to `output` in precision `to`.
fn cast_node(taken: &mut HashSet<String>, input: &str, output: &str, to: Prec) -> Node {
    let mut attrs = BTreeMap::new();
    attrs.insert("to".to_string(), Attr::Int(to.onnx()));
    Node {
        name: unique(taken, &format!("{output}/Cast")),
        op_type: "Cast".into(),
        domain: String::new(),
        inputs: vec![input.to_string()],
        outputs: vec![output.to_string()],
        attrs,
    }
}

/// Makes a float32-producing `Cast`, `Constant` or `ConstantOfShape` produce float16.
/// Returns whether it changed the node.
fn convert_node_attrs(
    node: &mut Node,
    types: &HashMap<String, DType>,
) -> Result<bool, QuantizeError> {
    if !node.domain.is_empty() && node.domain != "ai.onnx" {
        return Ok(false);
    }
    match node.op_type.as_str() {
        "Cast" => {
            if let Some(Attr::Int(to)) = node.attrs.get_mut("to")
                && *to == ONNX_FLOAT
            {
                *to = ONNX_FLOAT16;
                return Ok(true);
            }
            Ok(false)
        }
        "Constant" => {
            let out_f32 = node
                .outputs
                .first()
                .is_some_and(|o| types.get(o) == Some(&DType::F32));
            if !out_f32 {
                return Ok(false);
            }
            let scalar = match node.attrs.get("value_float") {
                Some(Attr::Float(v)) => Some((vec![*v], Vec::new())),
                _ => None,
            };
            let list = match node.attrs.get("value_floats") {
                Some(Attr::Floats(v)) => Some((v.clone(), vec![v.len() as i64])),
                _ => None,
            };
            if let Some((values, dims)) = scalar.or(list) {
                node.attrs.remove("value_float");
                node.attrs.remove("value_floats");
                node.attrs.insert(
                    "value".into(),
                    Attr::Tensor(Box::new(Initializer {
                        name: String::new(),
                        dtype: DType::F16,
                        dims,
                        data: TensorData::owned(f32_to_f16_bytes(&values)),
                    })),
                );
                return Ok(true);
            }
            convert_tensor_attr(node, "value")
        }
        "ConstantOfShape" => {
            if node.attrs.contains_key("value") {
                convert_tensor_attr(node, "value")
            } else {
                // The default value is a float32 zero.
                node.attrs.insert(
                    "value".into(),
                    Attr::Tensor(Box::new(Initializer {
                        name: String::new(),
                        dtype: DType::F16,
                        dims: vec![1],
                        data: TensorData::owned(vec![0, 0]),
                    })),
                );
                Ok(true)
            }
        }
        _ => Ok(false),
    }
}

/// Converts a float32 tensor attribute to float16 in place.
fn convert_tensor_attr(node: &mut Node, attr: &str) -> Result<bool, QuantizeError> {
    let Some(Attr::Tensor(t)) = node.attrs.get_mut(attr) else {
        return Ok(false);
    };
    if t.dtype != DType::F32 {
        return Ok(false);
    }
    let values = t.data.to_f32_vec().map_err(|source| QuantizeError::Io {
        name: format!("{}.{attr}", node.name),
        source,
    })?;
    if values.len() as u64 != t.numel() {
        return Err(QuantizeError::Invalid(format!(
            "attribute `{attr}` of node `{}` has {} values, its shape needs {}",
            node.name,
            values.len(),
            t.numel()
        )));
    }
    t.dtype = DType::F16;
    t.data = TensorData::owned(f32_to_f16_bytes(&values));
    Ok(true)
}

/// A float32 initializer as float16, converted when its bytes are read (streamed out).
fn to_f16_initializer(t: &Initializer) -> Result<Initializer, QuantizeError> {
    let expected = t.numel().saturating_mul(4);
    if t.data.len() != expected {
        return Err(QuantizeError::Invalid(format!(
            "initializer `{}` has {} bytes, its float32 shape needs {expected}",
            t.name,
            t.data.len()
        )));
    }
    Ok(Initializer {
        name: t.name.clone(),
        dtype: DType::F16,
        dims: t.dims.clone(),
        data: TensorData::produced(F16Rows(t.data.clone())),
    })
}

/// A float32 tensor's elements as float16 ([`to_f16`]), converted band by band as they are
/// read or streamed (each output "row" is one element).
struct F16Rows(TensorData);

impl RowProducer for F16Rows {
    fn total_bytes(&self) -> u64 {
        self.0.len() / 2
    }
    fn row_bytes(&self) -> u64 {
        2
    }
    fn row_work(&self) -> u64 {
        6
    }
    fn produce(&self, first: u64, out: &mut [u8]) -> std::io::Result<()> {
        crate::int8::with_buffer(2 * out.len(), |buf| {
            self.0.read_into(4 * first, buf)?;
            for (o, c) in out.chunks_exact_mut(2).zip(buf.as_chunks::<4>().0) {
                o.copy_from_slice(&to_f16(f32::from_le_bytes(*c)).to_le_bytes());
            }
            Ok(())
        })
    }
}

/// One float32 as float16: clamped to ±65504, non-zero magnitudes below float16's smallest
/// subnormal raised to it (ONNX Runtime's `convert_np_to_float16`); NaN stays NaN.
pub fn to_f16(v: f32) -> half::f16 {
    let c = if v.is_nan() {
        v
    } else if v.abs() > F16_MAX {
        F16_MAX.copysign(v)
    } else if v != 0.0 && v.abs() < F16_MIN_POSITIVE {
        F16_MIN_POSITIVE.copysign(v)
    } else {
        v
    };
    half::f16::from_f32(c)
}

fn f32_to_f16_bytes(values: &[f32]) -> Vec<u8> {
    values
        .iter()
        .flat_map(|&v| to_f16(v).to_le_bytes())
        .collect()
}

/// ONNX element type code → dtype (the codes ferry's IR has).
fn dtype_from_code(code: i64) -> Option<DType> {
    Some(match code {
        1 => DType::F32,
        2 => DType::U8,
        3 => DType::I8,
        5 => DType::I16,
        6 => DType::I32,
        7 => DType::I64,
        9 => DType::Bool,
        10 => DType::F16,
        11 => DType::F64,
        16 => DType::BF16,
        _ => return None,
    })
}

/// Element types of the graph's values: declared ones (inputs, outputs, value infos,
/// initializers) and, for the rest, per-op rules over the nodes in order.
fn infer_dtypes(graph: &Graph) -> HashMap<String, DType> {
    let mut t: HashMap<String, DType> = HashMap::new();
    for v in graph
        .inputs
        .iter()
        .chain(&graph.outputs)
        .chain(&graph.value_info)
    {
        t.insert(v.name.clone(), v.dtype);
    }
    for i in &graph.initializers {
        t.insert(i.name.clone(), i.dtype);
    }
    for n in &graph.nodes {
        let input = |i: usize| n.inputs.get(i).and_then(|x| t.get(x)).copied();
        let first_known = n.inputs.iter().find_map(|x| t.get(x)).copied();
        let contrib = n.domain == "com.microsoft";
        let outs: Vec<Option<DType>> = (0..n.outputs.len())
            .map(|k| match (n.op_type.as_str(), k) {
                ("Cast", _) => match n.attr("to") {
                    Some(Attr::Int(c)) => dtype_from_code(*c),
                    _ => None,
                },
                ("CastLike", _) => input(1),
                ("Constant", _) => match (
                    n.attr("value"),
                    n.attr("value_float"),
                    n.attr("value_floats"),
                ) {
                    (Some(Attr::Tensor(v)), _, _) => Some(v.dtype),
                    (_, Some(_), _) | (_, _, Some(_)) => Some(DType::F32),
                    _ => Some(DType::I64),
                },
                ("ConstantOfShape", _) => match n.attr("value") {
                    Some(Attr::Tensor(v)) => Some(v.dtype),
                    _ => Some(DType::F32),
                },
                ("Shape" | "Size" | "NonZero" | "ArgMax" | "ArgMin", _) => Some(DType::I64),
                ("TopK", 1) => Some(DType::I64),
                (
                    "Equal" | "Less" | "Greater" | "LessOrEqual" | "GreaterOrEqual" | "Not" | "And"
                    | "Or" | "Xor" | "IsNaN" | "IsInf",
                    _,
                ) => Some(DType::Bool),
                ("Where", _) => input(1),
                ("EmbedLayerNormalization", 1) if contrib => Some(DType::I32),
                ("EmbedLayerNormalization", _) if contrib => input(2),
                ("DequantizeLinear", _) => Some(DType::F32),
                ("DynamicQuantizeLinear", 1) => Some(DType::F32),
                ("DynamicQuantizeLinear", _) => Some(DType::U8),
                ("QuantizeLinear", _) => input(2).or(Some(DType::U8)),
                ("MatMulInteger" | "ConvInteger", _) => Some(DType::I32),
                _ => input(0).or(first_known),
            })
            .collect();
        for (o, d) in n.outputs.iter().zip(outs) {
            if let Some(d) = d
                && !o.is_empty()
            {
                t.entry(o.clone()).or_insert(d);
            }
        }
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_ir::{Dim, OpsetImport, Value};

    fn node(name: &str, op: &str, inputs: &[&str], outputs: &[&str]) -> Node {
        Node {
            name: name.into(),
            op_type: op.into(),
            domain: String::new(),
            inputs: inputs.iter().map(|s| s.to_string()).collect(),
            outputs: outputs.iter().map(|s| s.to_string()).collect(),
            attrs: BTreeMap::new(),
        }
    }

    fn f32_init(name: &str, values: &[f32]) -> Initializer {
        Initializer {
            name: name.into(),
            dtype: DType::F32,
            dims: vec![values.len() as i64],
            data: TensorData::from_f32(values),
        }
    }

    /// x (f32), ids (i64) → Add(x, W) → Range-fed Mul → MatMul → y; a Cast to float, a
    /// Constant and an int Gather along the way.
    fn tiny_graph() -> Graph {
        let mut cast = node("cast", "Cast", &["ids"], &["idsf"]);
        cast.attrs.insert("to".into(), Attr::Int(1));
        let mut konst = node("k", "Constant", &[], &["kv"]);
        konst.attrs.insert("value_float".into(), Attr::Float(1e9));
        Graph {
            name: "g".into(),
            inputs: vec![
                Value::new("x", DType::F32, vec![Dim::sym("b"), 3.into()]),
                Value::new("ids", DType::I64, vec![Dim::sym("b"), 3.into()]),
            ],
            outputs: vec![
                Value::new("y", DType::F32, vec![Dim::sym("b"), 3.into()]),
                Value::new("r", DType::F32, vec![3.into()]),
            ],
            nodes: vec![
                cast,
                konst,
                node("add", "Add", &["x", "W"], &["a"]),
                node("mul", "Mul", &["a", "idsf"], &["m"]),
                node("range", "Range", &["S", "L", "D"], &["r"]),
                node("mul2", "Mul", &["m", "r"], &["m2"]),
                node("add2", "Add", &["m2", "kv"], &["y"]),
                node("gi", "Gather", &["ids", "ids"], &["gi_out"]),
            ],
            initializers: vec![
                f32_init("W", &[1.0, -1e6, 1e-9]),
                f32_init("S", &[0.0]),
                f32_init("L", &[3.0]),
                f32_init("D", &[1.0]),
            ],
            value_info: vec![Value::new("a", DType::F32, vec![Dim::sym("b"), 3.into()])],
            opsets: vec![OpsetImport {
                domain: String::new(),
                version: 17,
            }],
        }
    }

    #[test]
    fn lazy_initializer_streams_the_eager_conversion_in_bands() -> std::io::Result<()> {
        // More elements than one band holds (16 MiB of work at 6 bytes each), with
        // out-of-range, tiny and NaN values spread through it.
        let n = 3_000_001usize;
        let values: Vec<f32> = (0..n)
            .map(|i| match i % 1009 {
                0 => 1e6,
                1 => -7e-9,
                2 => f32::NAN,
                _ => (i as f32 * 0.37).sin() * 100.0,
            })
            .collect();
        let t = Initializer {
            name: "w".into(),
            dtype: DType::F32,
            dims: vec![n as i64],
            data: TensorData::from_f32(&values),
        };
        let h = to_f16_initializer(&t).map_err(std::io::Error::other)?;
        let want = f32_to_f16_bytes(&values);
        assert!(matches!(h.data, TensorData::Produced(_)));
        let mut got = Vec::new();
        h.data.write_to(&mut got)?;
        assert!(got == want);
        let mut part = vec![0u8; 11];
        h.data.read_into(2 * 2_796_201 - 3, &mut part)?;
        assert_eq!(part, want[2 * 2_796_201 - 3..2 * 2_796_201 + 8]);
        Ok(())
    }

    #[test]
    fn converts_with_casts_at_edges_and_blocked_ops() -> Result<(), QuantizeError> {
        let mut g = tiny_graph();
        let s = convert_fp16(&mut g, &Fp16Options::default())?;
        let order: Vec<(&str, &str)> = g
            .nodes
            .iter()
            .map(|n| (n.op_type.as_str(), n.outputs[0].as_str()))
            .collect();
        assert_eq!(
            order,
            [
                ("Cast", "x_fp16"),
                ("Cast", "idsf"),
                ("Constant", "kv"),
                ("Add", "a"),
                ("Mul", "m"),
                ("Range", "r"),
                ("Cast", "r_fp16"),
                ("Mul", "m2"),
                ("Add", "y_fp16"),
                ("Cast", "y"),
                ("Gather", "gi_out"),
            ]
        );
        // Edges: x → fp16 cast, y from an fp16 value cast back, r (a float32 Range output)
        // stays the graph output as it is and is cast for the fp16 Mul.
        assert!(matches!(g.nodes[0].attr("to"), Some(Attr::Int(10))));
        assert!(matches!(g.nodes[1].attr("to"), Some(Attr::Int(10))));
        assert!(matches!(g.nodes[9].attr("to"), Some(Attr::Int(1))));
        assert_eq!(g.nodes[3].inputs, ["x_fp16", "W"]);
        assert_eq!(g.nodes[7].inputs, ["m", "r_fp16"]);
        assert_eq!(g.nodes[5].inputs, ["S", "L", "D"]);
        assert_eq!(g.nodes[10].inputs, ["ids", "ids"]);
        // The Constant: 1e9 clamps to 65504 in float16.
        match g.nodes[2].attr("value") {
            Some(Attr::Tensor(t)) => {
                assert_eq!(t.dtype, DType::F16);
                assert_eq!(
                    &*t.data
                        .bytes()
                        .map_err(|e| QuantizeError::Invalid(e.to_string()))?,
                    half::f16::MAX.to_le_bytes()
                );
            }
            other => panic!("constant value {other:?}"),
        }
        // W is float16 (clamped, tiny raised to the smallest subnormal); Range's stay float32.
        let w = &g.initializers[0];
        assert_eq!(w.dtype, DType::F16);
        let bytes = w
            .data
            .bytes()
            .map_err(|e| QuantizeError::Invalid(e.to_string()))?;
        let got: Vec<f32> = bytes
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect();
        assert_eq!(got, [1.0, -65504.0, F16_MIN_POSITIVE]);
        assert!(g.initializers[1..].iter().all(|t| t.dtype == DType::F32));
        assert_eq!((s.initializers_converted, s.initializers_kept), (1, 3));
        assert_eq!(
            (s.nodes_kept_fp32, s.casts_inserted, s.constants_converted),
            (1, 3, 2)
        );
        assert_eq!(g.value_info[0].dtype, DType::F16);
        assert!(
            g.inputs
                .iter()
                .chain(&g.outputs)
                .all(|v| v.dtype != DType::F16)
        );
        Ok(())
    }

    #[test]
    fn without_keep_io_types_and_with_exclusions() -> Result<(), QuantizeError> {
        let mut g = tiny_graph();
        let s = convert_fp16(
            &mut g,
            &Fp16Options {
                keep_io_types: false,
                exclude: vec!["add".into()],
            },
        )?;
        assert_eq!(g.inputs[0].dtype, DType::F16);
        assert_eq!(g.inputs[1].dtype, DType::I64);
        assert!(g.outputs.iter().all(|v| v.dtype == DType::F16));
        // The excluded Add reads x and W in float32, so x is cast back up and W stays f32;
        // its output is cast down for the fp16 Mul.
        let add = g
            .nodes
            .iter()
            .find(|n| n.name == "add")
            .map(|n| n.inputs.clone());
        assert_eq!(add, Some(vec!["x_fp32".to_string(), "W".to_string()]));
        assert_eq!(g.initializers[0].dtype, DType::F32);
        let mul = g
            .nodes
            .iter()
            .find(|n| n.name == "mul")
            .map(|n| n.inputs.clone());
        assert_eq!(mul, Some(vec!["a_fp16".to_string(), "idsf".to_string()]));
        assert_eq!(g.value_info[0].dtype, DType::F32);
        // Range's float32 output r is a graph output, now float16: cast through `r_fp32`.
        assert!(
            g.nodes
                .iter()
                .any(|n| n.inputs == ["r_fp32"] && n.outputs == ["r"])
        );
        assert_eq!(s.nodes_kept_fp32, 2);
        Ok(())
    }

    #[test]
    fn constant_of_shape_default_and_tensor_values() -> Result<(), QuantizeError> {
        let mut g = tiny_graph();
        let mut cos = node("cos", "ConstantOfShape", &["shp"], &["z"]);
        cos.attrs.remove("value");
        g.nodes.push(node("shp_n", "Shape", &["x"], &["shp"]));
        g.nodes.push(cos);
        g.nodes.push(node("use", "Add", &["z", "x"], &["zz"]));
        convert_fp16(&mut g, &Fp16Options::default())?;
        let cos = g.nodes.iter().find(|n| n.name == "cos");
        assert!(matches!(
            cos.and_then(|n| n.attr("value")),
            Some(Attr::Tensor(t)) if t.dtype == DType::F16
        ));
        let use_ = g
            .nodes
            .iter()
            .find(|n| n.name == "use")
            .map(|n| n.inputs.clone());
        assert_eq!(use_, Some(vec!["z".to_string(), "x_fp16".to_string()]));
        let shp = g
            .nodes
            .iter()
            .find(|n| n.name == "shp_n")
            .map(|n| n.inputs.clone());
        assert_eq!(shp, Some(vec!["x_fp16".to_string()]));
        Ok(())
    }

    #[test]
    fn constant_that_is_a_graph_output() -> Result<(), QuantizeError> {
        let mut g = tiny_graph();
        let mut c = node("c", "Constant", &[], &["cv"]);
        c.attrs
            .insert("value_floats".into(), Attr::Floats(vec![0.5, 2.0]));
        g.nodes.push(c);
        g.outputs.push(Value::new("cv", DType::F32, vec![2.into()]));
        convert_fp16(&mut g, &Fp16Options::default())?;
        let c = g.nodes.iter().find(|n| n.name == "c");
        assert_eq!(
            c.map(|n| n.outputs.clone()),
            Some(vec!["cv_fp16".to_string()])
        );
        assert!(matches!(
            c.and_then(|n| n.attr("value")),
            Some(Attr::Tensor(t)) if t.dtype == DType::F16 && t.dims == [2]
        ));
        let last = g
            .nodes
            .last()
            .map(|n| (n.inputs.clone(), n.outputs.clone()));
        assert_eq!(
            last,
            Some((vec!["cv_fp16".to_string()], vec!["cv".to_string()]))
        );
        Ok(())
    }

    #[test]
    fn short_initializer_is_an_error() {
        let mut g = tiny_graph();
        g.initializers[0].dims = vec![4];
        assert!(matches!(
            convert_fp16(&mut g, &Fp16Options::default()),
            Err(QuantizeError::Invalid(_))
        ));
    }

    #[test]
    fn f16_rounding_and_clamping() {
        assert_eq!(to_f16(1e5).to_f32(), 65504.0);
        assert_eq!(to_f16(-f32::INFINITY).to_f32(), -65504.0);
        assert_eq!(to_f16(-1e-10).to_f32(), -F16_MIN_POSITIVE);
        assert_eq!(to_f16(0.0).to_f32(), 0.0);
        assert!(to_f16(f32::NAN).is_nan());
        assert_eq!(to_f16(0.1).to_f32(), half::f16::from_f32(0.1).to_f32());
    }
}
