//! optimum's merged decoder: a decoder without cache and a decoder with cache as one graph
//! whose `If` on `use_cache_branch` picks the branch, weights stored once in the outer graph;
//! and its inverse, so passes run on the two parts of a merged file and merge them again.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use crate::{Attr, DType, Dim, Graph, Initializer, Node, TensorData, Value};

/// Name of the merged decoder's boolean `[1]` input: true runs the with-past branch.
pub const USE_CACHE_BRANCH: &str = "use_cache_branch";

/// Why two decoders cannot be merged.
#[derive(Debug, thiserror::Error)]
pub enum MergeError {
    /// The two graphs import different default-domain opsets.
    #[error("cannot merge decoders: opset {0:?} without cache, {1:?} with cache")]
    Opset(Option<i64>, Option<i64>),
    /// An output of the decoder with cache that the decoder without cache lacks.
    #[error(
        "cannot merge decoders: output `{0}` of the decoder with cache is not an output of the decoder without cache"
    )]
    ExtraOutput(String),
    /// A value the two decoders type differently.
    #[error("cannot merge decoders: `{name}` is {first:?} without cache but {second:?} with cache")]
    DType {
        /// The input or output.
        name: String,
        /// Its type in the decoder without cache.
        first: DType,
        /// Its type in the decoder with cache.
        second: DType,
    },
    /// An output missing from the decoder with cache whose shape has no symbolic dim to
    /// make empty (optimum's rule for the constant stand-in).
    #[error(
        "cannot merge decoders: output `{0}` is missing with cache and has no dynamic axis for an empty stand-in"
    )]
    StaticOutput(String),
    /// Reading a tensor to compare two same-named weights failed.
    #[error("cannot merge decoders: reading tensor `{name}` failed: {source}")]
    Io {
        /// The tensor.
        name: String,
        /// The cause.
        source: std::io::Error,
    },
}

/// Whether an initializer stays inside its branch rather than moving to the outer graph:
/// scalars and 1-D int32/int64 tensors (as optimum keeps them; ONNX Runtime's optimizer
/// needs them there), empty tensors and tensors that are the branch's outputs.
fn stays_in_branch(init: &Initializer, outputs: &HashSet<&str>) -> bool {
    init.dims.is_empty()
        || (init.dims.len() == 1 && matches!(init.dtype, DType::I32 | DType::I64))
        || init.numel() == 0
        || outputs.contains(init.name.as_str())
}

/// Merges `decoder` (no cache) and `with_past` (cache inputs) into optimum's
/// `decoder_model_merged` graph, as `optimum.onnx.merge_decoders` does: inputs are the
/// union (the decoder's first, in order) plus [`USE_CACHE_BRANCH`] (bool `[1]`); one `If`
/// whose `then_branch` is `with_past` and `else_branch` is `decoder`; the outputs are the
/// decoder's, and outputs the decoder with cache lacks (the encoder's cross-attention
/// cache) become empty constants in its branch (first symbolic dim 0, later ones 1).
/// Initializers move to the outer graph, one per name (a same-named tensor of the second
/// graph with other bytes is renamed), except small ones ([`stays_in_branch`]).
pub fn merge_decoders(decoder: Graph, with_past: Graph) -> Result<Graph, MergeError> {
    if decoder.onnx_opset() != with_past.onnx_opset() {
        return Err(MergeError::Opset(
            decoder.onnx_opset(),
            with_past.onnx_opset(),
        ));
    }
    let mut opsets = decoder.opsets.clone();
    for o in &with_past.opsets {
        if !opsets.iter().any(|p| p.domain == o.domain) {
            opsets.push(o.clone());
        }
    }
    // Inputs: the union, then the branch flag.
    let mut inputs = decoder.inputs.clone();
    for v in &with_past.inputs {
        match inputs.iter().find(|u| u.name == v.name) {
            Some(u) if u.dtype != v.dtype => return Err(dtype_error(&v.name, u.dtype, v.dtype)),
            Some(_) => {}
            None => inputs.push(v.clone()),
        }
    }
    inputs.push(Value::new(
        USE_CACHE_BRANCH,
        DType::Bool,
        vec![Dim::Fixed(1)],
    ));

    let mut with_past = with_past;
    unify_outputs(&decoder.outputs, &mut with_past)?;

    // Outer initializers: the decoder's, then the with-past graph's new ones.
    let mut outer: Vec<Initializer> = Vec::new();
    let mut by_name: HashMap<String, usize> = HashMap::new();
    let decoder = split_initializers(decoder, &mut outer, &mut by_name, false)?;
    let with_past = split_initializers(with_past, &mut outer, &mut by_name, true)?;

    let outputs = decoder.outputs.clone();
    let branch = |g: Graph, name: &str| Graph {
        name: name.to_string(),
        inputs: Vec::new(),
        opsets: Vec::new(),
        ..g
    };
    let mut attrs = BTreeMap::new();
    attrs.insert(
        "then_branch".to_string(),
        Attr::Graph(Box::new(branch(with_past, "with_past"))),
    );
    attrs.insert(
        "else_branch".to_string(),
        Attr::Graph(Box::new(branch(decoder, "no_past"))),
    );
    let node = Node {
        name: "optimum::if".into(),
        op_type: "If".into(),
        domain: String::new(),
        inputs: vec![USE_CACHE_BRANCH.into()],
        outputs: outputs.iter().map(|v| v.name.clone()).collect(),
        attrs,
    };
    Ok(Graph {
        name: "merged".into(),
        inputs,
        outputs,
        nodes: vec![node],
        initializers: outer,
        value_info: Vec::new(),
        opsets,
    })
}

fn dtype_error(name: &str, first: DType, second: DType) -> MergeError {
    MergeError::DType {
        name: name.to_string(),
        first,
        second,
    }
}

/// Gives `with_past` the decoder's outputs (names, order and declared types), adding an
/// empty `Constant` for each one it lacks.
fn unify_outputs(decoder_outputs: &[Value], with_past: &mut Graph) -> Result<(), MergeError> {
    let known: HashSet<&str> = decoder_outputs.iter().map(|v| v.name.as_str()).collect();
    if let Some(extra) = with_past
        .outputs
        .iter()
        .find(|v| !known.contains(v.name.as_str()))
    {
        return Err(MergeError::ExtraOutput(extra.name.clone()));
    }
    let mut outputs = Vec::with_capacity(decoder_outputs.len());
    for d in decoder_outputs {
        if let Some(v) = with_past.outputs.iter().find(|v| v.name == d.name) {
            if v.dtype != d.dtype {
                return Err(dtype_error(&d.name, d.dtype, v.dtype));
            }
            // Both branches declare the decoder's output types, as optimum's merged file.
            outputs.push(d.clone());
            continue;
        }
        let shape = d.shape.as_deref().unwrap_or_default();
        let mut first = true;
        let dims: Vec<i64> = shape
            .iter()
            .map(|s| match s {
                Dim::Fixed(n) => *n,
                Dim::Sym(_) if first => {
                    first = false;
                    0
                }
                Dim::Sym(_) => 1,
            })
            .collect();
        if first {
            return Err(MergeError::StaticOutput(d.name.clone()));
        }
        let value = Initializer {
            name: "const_tensor".into(),
            dtype: d.dtype,
            dims,
            data: TensorData::owned(Vec::new()),
        };
        let mut attrs = BTreeMap::new();
        attrs.insert("value".to_string(), Attr::Tensor(Box::new(value)));
        with_past.nodes.push(Node {
            name: format!("Constant_{}", with_past.nodes.len() + 1),
            op_type: "Constant".into(),
            domain: String::new(),
            inputs: Vec::new(),
            outputs: vec![d.name.clone()],
            attrs,
        });
        outputs.push(d.clone());
    }
    with_past.outputs = outputs;
    Ok(())
}

/// Moves `g`'s initializers to `outer` (one per name), except those that stay in the
/// branch; a same-named tensor with other bytes is renamed in `g` when `rename` is set.
fn split_initializers(
    mut g: Graph,
    outer: &mut Vec<Initializer>,
    by_name: &mut HashMap<String, usize>,
    rename: bool,
) -> Result<Graph, MergeError> {
    let outputs: HashSet<String> = g.outputs.iter().map(|v| v.name.clone()).collect();
    let out_refs: HashSet<&str> = outputs.iter().map(String::as_str).collect();
    let mut local = Vec::new();
    let mut renames: HashMap<String, String> = HashMap::new();
    for init in std::mem::take(&mut g.initializers) {
        if stays_in_branch(&init, &out_refs) {
            local.push(init);
            continue;
        }
        match by_name.get(&init.name) {
            None => {
                by_name.insert(init.name.clone(), outer.len());
                outer.push(init);
            }
            Some(&k) if same_tensor(&outer[k], &init)? => {}
            Some(_) if rename => {
                let mut n = 1;
                let fresh = loop {
                    let c = format!(
                        "{}_with_past{}",
                        init.name,
                        if n == 1 { String::new() } else { n.to_string() }
                    );
                    if !by_name.contains_key(&c) {
                        break c;
                    }
                    n += 1;
                };
                renames.insert(init.name.clone(), fresh.clone());
                by_name.insert(fresh.clone(), outer.len());
                outer.push(Initializer {
                    name: fresh,
                    ..init
                });
            }
            // Two tensors of one name within the first graph cannot happen in a valid graph.
            Some(_) => local.push(init),
        }
    }
    g.initializers = local;
    if !renames.is_empty() {
        rename_reads(&mut g.nodes, &renames);
    }
    Ok(g)
}

/// Renames the values `nodes` (and their subgraphs) read.
fn rename_reads(nodes: &mut [Node], renames: &HashMap<String, String>) {
    for n in nodes {
        for i in n.inputs.iter_mut() {
            if let Some(r) = renames.get(i) {
                *i = r.clone();
            }
        }
        for a in n.attrs.values_mut() {
            if let Attr::Graph(g) = a {
                rename_reads(&mut g.nodes, renames);
            }
        }
    }
}

/// Whether two initializers hold the same tensor: same type and shape, and the same bytes
/// (the same source, [`same_source`], or compared in bands).
fn same_tensor(a: &Initializer, b: &Initializer) -> Result<bool, MergeError> {
    if a.dtype != b.dtype || a.dims != b.dims || a.data.len() != b.data.len() {
        return Ok(false);
    }
    if same_source(&a.data, &b.data) {
        return Ok(true);
    }
    const BAND: u64 = 4 << 20;
    let len = a.data.len();
    let io = |name: &str| {
        let name = name.to_string();
        move |source| MergeError::Io { name, source }
    };
    let (mut x, mut y) = (Vec::new(), Vec::new());
    let mut at = 0u64;
    while at < len {
        let n = (len - at).min(BAND) as usize;
        x.resize(n, 0);
        y.resize(n, 0);
        a.data.read_into(at, &mut x).map_err(io(&a.name))?;
        b.data.read_into(at, &mut y).map_err(io(&b.name))?;
        if x != y {
            return Ok(false);
        }
        at += n as u64;
    }
    Ok(true)
}

/// Whether two tensor data are the same bytes by construction: one range of one mapped file,
/// one shared buffer or reader, or the same derivation (conversion, transpose, concatenation)
/// of such. Tensors a tracer builds twice from one checkpoint compare equal here without a
/// byte being read.
fn same_source(a: &TensorData, b: &TensorData) -> bool {
    use std::sync::Arc;
    match (a, b) {
        (
            TensorData::Mapped {
                file: fa,
                offset: oa,
                len: la,
            },
            TensorData::Mapped {
                file: fb,
                offset: ob,
                len: lb,
            },
        ) => oa == ob && la == lb && (Arc::ptr_eq(fa, fb) || fa.path() == fb.path()),
        (TensorData::Owned(x), TensorData::Owned(y)) => Arc::ptr_eq(x, y),
        (TensorData::Lazy { read: x, .. }, TensorData::Lazy { read: y, .. }) => Arc::ptr_eq(x, y),
        (
            TensorData::Converted {
                source: sa,
                from: fa,
                to: ta,
            },
            TensorData::Converted {
                source: sb,
                from: fb,
                to: tb,
            },
        ) => fa == fb && ta == tb && same_source(sa, sb),
        (
            TensorData::Transposed {
                source: sa,
                dims: da,
                perm: pa,
                elem: ea,
            },
            TensorData::Transposed {
                source: sb,
                dims: db,
                perm: pb,
                elem: eb,
            },
        ) => da == db && pa == pb && ea == eb && same_source(sa, sb),
        (
            TensorData::Concat {
                parts: pa,
                rows: ra,
            },
            TensorData::Concat {
                parts: pb,
                rows: rb,
            },
        ) => {
            ra == rb
                && pa.len() == pb.len()
                && pa.iter().zip(pb.iter()).all(|(x, y)| same_source(x, y))
        }
        (TensorData::Produced(x), TensorData::Produced(y)) => Arc::ptr_eq(x, y),
        _ => false,
    }
}

/// The two decoders of a merged graph ([`merge_decoders`]'s form: one `If` on a graph
/// input, every other value an initializer): `(without cache, with cache)`, each a
/// standalone graph with the outer inputs and initializers its branch reads. `None` for
/// any other graph.
pub fn split_merged(graph: &Graph) -> Option<(Graph, Graph)> {
    let [node] = graph.nodes.as_slice() else {
        return None;
    };
    if node.op_type != "If" || !node.domain.is_empty() {
        return None;
    }
    let cond = node.inputs.first()?;
    if !graph.inputs.iter().any(|v| &v.name == cond) {
        return None;
    }
    let (Some(Attr::Graph(then_g)), Some(Attr::Graph(else_g))) =
        (node.attr("then_branch"), node.attr("else_branch"))
    else {
        return None;
    };
    let part = |b: &Graph, suffix: &str| {
        let reads: BTreeSet<String> = b.outer_reads();
        let mut initializers = b.initializers.clone();
        initializers.extend(
            graph
                .initializers
                .iter()
                .filter(|i| reads.contains(&i.name))
                .cloned(),
        );
        Graph {
            name: format!("{}_{suffix}", graph.name),
            inputs: graph
                .inputs
                .iter()
                .filter(|v| reads.contains(&v.name))
                .cloned()
                .collect(),
            outputs: b.outputs.clone(),
            nodes: b.nodes.clone(),
            initializers,
            value_info: b.value_info.clone(),
            opsets: graph.opsets.clone(),
        }
    };
    Some((part(else_g, "no_past"), part(then_g, "with_past")))
}

/// Runs `f` on both parts of a merged graph ([`split_merged`]) and merges the results back
/// into `graph` (so a pass written for plain graphs works on a merged decoder); `None`,
/// `graph` untouched, when `graph` is not a merged decoder. The results of `f` come back as
/// `(without cache, with cache)`.
pub fn map_merged<T, E: From<MergeError>>(
    graph: &mut Graph,
    mut f: impl FnMut(&mut Graph) -> Result<T, E>,
) -> Option<Result<(T, T), E>> {
    let (mut no_past, mut with_past) = split_merged(graph)?;
    Some((|| {
        let a = f(&mut no_past)?;
        let b = f(&mut with_past)?;
        let mut merged = merge_decoders(no_past, with_past)?;
        merged.name = std::mem::take(&mut graph.name);
        *graph = merged;
        Ok((a, b))
    })())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(op: &str, inputs: &[&str], outputs: &[&str]) -> Node {
        Node {
            name: format!("{op}_{}", outputs.join("_")),
            op_type: op.into(),
            domain: String::new(),
            inputs: inputs.iter().map(|s| s.to_string()).collect(),
            outputs: outputs.iter().map(|s| s.to_string()).collect(),
            attrs: BTreeMap::new(),
        }
    }

    fn w(name: &str, v: &[f32]) -> Initializer {
        Initializer {
            name: name.into(),
            dtype: DType::F32,
            dims: vec![v.len() as i64],
            data: TensorData::from_f32(v),
        }
    }

    fn f32v(name: &str, dims: &[&str]) -> Value {
        Value::new(name, DType::F32, dims.iter().map(|d| Dim::sym(d)).collect())
    }

    fn opsets() -> Vec<crate::OpsetImport> {
        vec![crate::OpsetImport {
            domain: String::new(),
            version: 17,
        }]
    }

    /// No cache: logits = x * w; present = x + b; cross = x * c.
    fn decoder() -> Graph {
        Graph {
            name: "decoder".into(),
            inputs: vec![f32v("x", &["batch", "seq"])],
            outputs: vec![
                f32v("logits", &["batch", "seq"]),
                f32v("present", &["batch", "seq"]),
                f32v("cross", &["batch", "enc"]),
            ],
            nodes: vec![
                node("Mul", &["x", "w"], &["logits"]),
                node("Add", &["x", "b"], &["present"]),
                node("Mul", &["x", "c"], &["cross"]),
            ],
            initializers: vec![w("w", &[2.0]), w("b", &[1.0]), w("c", &[3.0])],
            value_info: Vec::new(),
            opsets: opsets(),
        }
    }

    /// With cache: logits = x * w; present = past + b (another `b`).
    fn with_past(b: f32) -> Graph {
        Graph {
            name: "with_past".into(),
            inputs: vec![f32v("x", &["batch", "one"]), f32v("past", &["batch", "p"])],
            outputs: vec![
                f32v("present", &["batch", "p"]),
                f32v("logits", &["batch", "one"]),
            ],
            nodes: vec![
                node("Mul", &["x", "w"], &["logits"]),
                node("Add", &["past", "b"], &["present"]),
            ],
            initializers: vec![w("w", &[2.0]), w("b", &[b])],
            value_info: Vec::new(),
            opsets: opsets(),
        }
    }

    fn names(vs: &[Value]) -> Vec<&str> {
        vs.iter().map(|v| v.name.as_str()).collect()
    }

    #[test]
    fn merge_is_optimums_layout() {
        let m = merge_decoders(decoder(), with_past(1.0)).expect("merge");
        assert_eq!(names(&m.inputs), ["x", "past", USE_CACHE_BRANCH]);
        assert_eq!(m.inputs[2].dtype, DType::Bool);
        assert_eq!(names(&m.outputs), ["logits", "present", "cross"]);
        // Shared weights once, outside.
        let outer: Vec<&str> = m.initializers.iter().map(|i| i.name.as_str()).collect();
        assert_eq!(outer, ["w", "b", "c"]);
        let [ifn] = m.nodes.as_slice() else { panic!() };
        assert_eq!(ifn.op_type, "If");
        assert_eq!(
            ifn.implicit_inputs().into_iter().collect::<Vec<_>>(),
            ["b", "c", "past", "w", "x"]
        );
        let Some(Attr::Graph(t)) = ifn.attr("then_branch") else {
            panic!()
        };
        let Some(Attr::Graph(e)) = ifn.attr("else_branch") else {
            panic!()
        };
        assert!(t.initializers.is_empty() && e.initializers.is_empty());
        // The with-past branch's outputs follow the decoder's order, `cross` an empty
        // constant with the first dynamic axis 0.
        assert_eq!(names(&t.outputs), ["logits", "present", "cross"]);
        let c = t.nodes.last().expect("constant");
        assert_eq!(
            (c.op_type.as_str(), c.outputs[0].as_str()),
            ("Constant", "cross")
        );
        let Some(Attr::Tensor(v)) = c.attr("value") else {
            panic!()
        };
        assert_eq!(v.dims, [0, 1]);
        assert_eq!(
            e.outer_reads().into_iter().collect::<Vec<_>>(),
            ["b", "c", "w", "x"]
        );

        // Split gives the parts back; merging them again is the same graph.
        let (a, b) = split_merged(&m).expect("merged form");
        assert_eq!(names(&a.inputs), ["x"]);
        assert_eq!(names(&b.inputs), ["x", "past"]);
        assert_eq!(b.initializers.len(), 2);
        let again = merge_decoders(a, b).expect("merge again");
        assert_eq!(names(&again.inputs), names(&m.inputs));
        assert_eq!(again.initializers.len(), 3);
        assert!(split_merged(&decoder()).is_none());
    }

    #[test]
    fn same_name_other_bytes_is_renamed_in_the_with_past_branch() {
        let m = merge_decoders(decoder(), with_past(5.0)).expect("merge");
        let outer: Vec<&str> = m.initializers.iter().map(|i| i.name.as_str()).collect();
        assert_eq!(outer, ["w", "b", "c", "b_with_past"]);
        let Some(Attr::Graph(t)) = m.nodes[0].attr("then_branch") else {
            panic!()
        };
        assert_eq!(t.nodes[1].inputs, ["past", "b_with_past"]);
    }

    #[test]
    fn same_source_needs_no_bytes() {
        let bytes = TensorData::from_f32(&[1.0, 2.0]);
        let t = |d: TensorData| TensorData::transposed(d, &[1, 2], &[1, 0], 4).expect("transpose");
        assert!(same_source(&t(bytes.clone()), &t(bytes.clone())));
        // Equal bytes from different buffers are not the same source (compared by bytes).
        let other = TensorData::from_f32(&[1.0, 2.0]);
        assert!(!same_source(&t(bytes.clone()), &t(other.clone())));
        let init = |d: TensorData| Initializer {
            name: "w".into(),
            dtype: DType::F32,
            dims: vec![2],
            data: d,
        };
        assert!(same_tensor(&init(bytes.clone()), &init(other)).expect("reads"));
        let third = TensorData::from_f32(&[1.0, 3.0]);
        assert!(!same_tensor(&init(bytes), &init(third)).expect("reads"));
    }

    #[test]
    fn mismatched_decoders_are_refused() {
        let mut extra = with_past(1.0);
        extra.outputs.push(f32v("other", &["batch"]));
        assert!(matches!(
            merge_decoders(decoder(), extra),
            Err(MergeError::ExtraOutput(n)) if n == "other"
        ));
        let mut ints = with_past(1.0);
        ints.inputs[1].dtype = DType::I64;
        ints.inputs[0].dtype = DType::I64;
        assert!(matches!(
            merge_decoders(decoder(), ints),
            Err(MergeError::DType { .. })
        ));
        let mut fixed = decoder();
        fixed.outputs[2].shape = Some(vec![Dim::Fixed(2)]);
        assert!(matches!(
            merge_decoders(fixed, with_past(1.0)),
            Err(MergeError::StaticOutput(_))
        ));
    }
}
