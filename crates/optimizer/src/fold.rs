//! Constant folding: `Constant` nodes and `Transpose` of initializers become initializers,
//! and [`fold_computed`] evaluates whole constant subgraphs (shape arithmetic, masks) with
//! the evaluator in `eval.rs`.

use std::collections::{HashMap, HashSet};

use ferry_ir::{Attr, DType, Dim, Graph, Initializer, Node, TensorData};

use crate::OptimizeError;
use crate::eval::{self, Tensor};

/// Largest initializer (in elements) [`fold_computed`] reads to evaluate a node: constant
/// paths are shape arithmetic and small index tensors, and weights are left to ONNX Runtime.
const MAX_FOLD_INPUT_ELEMENTS: u64 = 1 << 20;

/// Evaluates every default-domain node whose inputs are all constant — initializers (not
/// overridable as graph inputs), values computed by earlier folded nodes, or, for `Shape`,
/// any value whose dims are all fixed in the graph's inputs, value_info or initializers —
/// and replaces it by owned initializers named after its outputs. Handled ops and dtypes are
/// those of the evaluator (Shape, Gather, Unsqueeze, Squeeze, Concat, Cast, Add/Sub/Mul/Div,
/// Reshape, Transpose, Slice, Equal, Where, ConstantOfShape, Range, Expand, Identity over
/// float32/int32/int64/bool); any other node, a node producing a graph output, or one
/// reading an initializer of more than 2²⁰ elements stays. Only computed values that a
/// remaining node reads become initializers. Returns how many nodes were folded.
pub fn fold_computed(graph: &mut Graph) -> usize {
    let Some(opset) = graph.onnx_opset() else {
        return 0;
    };
    let reserved = reserved(graph);
    let graph_inputs: HashSet<&str> = graph.inputs.iter().map(|v| v.name.as_str()).collect();
    let inits: HashMap<&str, &Initializer> = graph
        .initializers
        .iter()
        .filter(|i| !graph_inputs.contains(i.name.as_str()))
        .map(|i| (i.name.as_str(), i))
        .collect();
    // Fully fixed shapes known for non-constant values.
    let fixed = |shape: &Option<Vec<Dim>>| -> Option<Vec<i64>> {
        shape.as_ref()?.iter().map(Dim::fixed).collect()
    };
    let static_dims: HashMap<&str, Vec<i64>> = graph
        .inputs
        .iter()
        .chain(&graph.value_info)
        .chain(&graph.outputs)
        .filter_map(|v| Some((v.name.as_str(), fixed(&v.shape)?)))
        .collect();
    let mut consts: HashMap<String, Tensor> = HashMap::new();
    let mut computed: Vec<String> = Vec::new();
    let mut folded = vec![false; graph.nodes.len()];
    for (k, n) in graph.nodes.iter().enumerate() {
        if !is_onnx_domain(n)
            || n.inputs.is_empty()
            || n.outputs.is_empty()
            || n.outputs
                .iter()
                .any(|o| reserved.contains(o) || o.is_empty())
        {
            continue;
        }
        let outs = if n.op_type == "Shape" && n.inputs.len() == 1 {
            let x = n.inputs[0].as_str();
            let dims = match consts.get(x) {
                Some(t) => Some(t.dims.iter().map(|&d| d as i64).collect()),
                None => inits
                    .get(x)
                    .map(|i| i.dims.clone())
                    .or_else(|| static_dims.get(x).cloned()),
            };
            dims.and_then(|d| eval::shape_of(n, &d)).map(|t| vec![t])
        } else {
            // Every input constant? Checked before reading any bytes, so a node with a
            // run-time input loads nothing.
            let is_const = |x: &String| {
                x.is_empty()
                    || consts.contains_key(x)
                    || inits
                        .get(x.as_str())
                        .is_some_and(|i| i.numel() <= MAX_FOLD_INPUT_ELEMENTS)
            };
            if !n.inputs.iter().all(is_const) {
                continue;
            }
            // Load the initializers it reads (once each).
            let mut ok = true;
            for x in &n.inputs {
                if x.is_empty() || consts.contains_key(x) {
                    continue;
                }
                match inits
                    .get(x.as_str())
                    .and_then(|i| Tensor::from_initializer(i))
                {
                    Some(t) => {
                        consts.insert(x.clone(), t);
                    }
                    None => {
                        ok = false;
                        break;
                    }
                }
            }
            if !ok {
                continue;
            }
            let args: Vec<Option<&Tensor>> = n
                .inputs
                .iter()
                .map(|x| if x.is_empty() { None } else { consts.get(x) })
                .collect();
            eval::eval(n, &args, opset)
        };
        let Some(outs) = outs.filter(|o| o.len() == n.outputs.len()) else {
            continue;
        };
        for (name, t) in n.outputs.iter().zip(outs) {
            consts.insert(name.clone(), t);
            computed.push(name.clone());
        }
        folded[k] = true;
    }
    let count = folded.iter().filter(|&&f| f).count();
    if count == 0 {
        return 0;
    }
    let mut keep = folded.iter().map(|&f| !f);
    graph.nodes.retain(|_| keep.next().unwrap_or(true));
    let read: HashSet<&str> = graph
        .nodes
        .iter()
        .flat_map(|n| n.inputs.iter().map(String::as_str))
        .collect();
    let new_inits: Vec<Initializer> = computed
        .iter()
        .filter(|name| read.contains(name.as_str()))
        .filter_map(|name| consts.remove(name).map(|t| t.into_initializer(name)))
        .collect();
    drop_value_info(graph, computed.iter().map(String::as_str));
    graph.initializers.extend(new_inits);
    count
}

fn is_onnx_domain(n: &Node) -> bool {
    n.domain.is_empty() || n.domain == "ai.onnx"
}

/// Names a folded node's output must not have: graph inputs and outputs (an initializer
/// there would change the model's interface) and existing initializers.
fn reserved(graph: &Graph) -> HashSet<String> {
    graph
        .inputs
        .iter()
        .chain(&graph.outputs)
        .map(|v| v.name.clone())
        .chain(graph.initializers.iter().map(|i| i.name.clone()))
        .collect()
}

/// The tensor a `Constant` node produces, when it is one ferry's IR holds (`value`,
/// `value_float(s)`, `value_int(s)`; not strings or sparse tensors).
fn constant_value(n: &Node, name: &str) -> Option<Initializer> {
    let (dtype, dims, data) = match n.attrs.iter().next().filter(|_| n.attrs.len() == 1)? {
        (k, Attr::Tensor(t)) if k == "value" => (t.dtype, t.dims.clone(), t.data.clone()),
        (k, Attr::Float(v)) if k == "value_float" => {
            (DType::F32, vec![], TensorData::from_f32(&[*v]))
        }
        (k, Attr::Floats(v)) if k == "value_floats" => {
            (DType::F32, vec![v.len() as i64], TensorData::from_f32(v))
        }
        (k, Attr::Int(v)) if k == "value_int" => (DType::I64, vec![], TensorData::from_i64(&[*v])),
        (k, Attr::Ints(v)) if k == "value_ints" => {
            (DType::I64, vec![v.len() as i64], TensorData::from_i64(v))
        }
        _ => return None,
    };
    Some(Initializer {
        name: name.to_string(),
        dtype,
        dims,
        data,
    })
}

/// Turns `Constant` nodes into initializers named after their output. Constants whose
/// output is a graph output, or whose value is a string or sparse tensor, stay. Returns
/// how many were folded.
pub fn fold_constants(graph: &mut Graph) -> usize {
    let mut reserved = reserved(graph);
    let mut folded = Vec::new();
    graph.nodes.retain(|n| {
        if n.op_type != "Constant" || !is_onnx_domain(n) || n.outputs.len() != 1 {
            return true;
        }
        let out = &n.outputs[0];
        if reserved.contains(out) {
            return true;
        }
        match constant_value(n, out) {
            Some(init) => {
                reserved.insert(out.clone());
                folded.push(init);
                false
            }
            None => true,
        }
    });
    let count = folded.len();
    drop_value_info(graph, folded.iter().map(|i| i.name.as_str()));
    graph.initializers.extend(folded);
    count
}

/// Replaces each `Transpose` whose input is an initializer by an initializer holding the
/// transposed tensor, named after the node's output: a [`TensorData::Transposed`] view that
/// the writers compute band by band, so no transposed copy of a weight is held here (the source initializer stays for
/// its other users; [`crate::remove_unused_initializers`] drops it otherwise). Returns how
/// many were folded.
pub fn fold_transposes(graph: &mut Graph) -> Result<usize, OptimizeError> {
    let mut reserved = reserved(graph);
    let graph_inputs: HashSet<&str> = graph.inputs.iter().map(|v| v.name.as_str()).collect();
    let mut index: HashMap<String, usize> = graph
        .initializers
        .iter()
        .enumerate()
        .filter(|(_, i)| !graph_inputs.contains(i.name.as_str()))
        .map(|(k, i)| (i.name.clone(), k))
        .collect();
    let mut new_inits: Vec<Initializer> = Vec::new();
    let mut keep = Vec::with_capacity(graph.nodes.len());
    for n in &graph.nodes {
        let foldable = n.op_type == "Transpose"
            && is_onnx_domain(n)
            && n.inputs.len() == 1
            && n.outputs.len() == 1
            && !reserved.contains(&n.outputs[0]);
        let src = foldable.then(|| index.get(&n.inputs[0]).copied()).flatten();
        let Some(k) = src else {
            keep.push(true);
            continue;
        };
        let source = if k < graph.initializers.len() {
            &graph.initializers[k]
        } else {
            &new_inits[k - graph.initializers.len()]
        };
        let t = transpose(n, source)?;
        reserved.insert(t.name.clone());
        index.insert(t.name.clone(), graph.initializers.len() + new_inits.len());
        new_inits.push(t);
        keep.push(false);
    }
    let count = new_inits.len();
    let mut keep = keep.into_iter();
    graph.nodes.retain(|_| keep.next().unwrap_or(true));
    drop_value_info(graph, new_inits.iter().map(|i| i.name.as_str()));
    graph.initializers.extend(new_inits);
    Ok(count)
}

fn drop_value_info<'a>(graph: &mut Graph, names: impl Iterator<Item = &'a str>) {
    let names: HashSet<&str> = names.collect();
    if !names.is_empty() {
        graph
            .value_info
            .retain(|v| !names.contains(v.name.as_str()));
    }
}

/// The initializer `Transpose` node `n` computes from `src`.
fn transpose(n: &Node, src: &Initializer) -> Result<Initializer, OptimizeError> {
    let bad = |reason: String| OptimizeError::BadNode {
        node: n.name.clone(),
        op_type: n.op_type.clone(),
        reason,
    };
    let rank = src.dims.len();
    let perm: Vec<usize> = match n.attr("perm") {
        None => (0..rank).rev().collect(),
        Some(Attr::Ints(p)) => {
            let mut seen = vec![false; rank];
            let mut perm = Vec::with_capacity(p.len());
            for &a in p {
                let ok = usize::try_from(a).ok().filter(|&a| a < rank && !seen[a]);
                let a = ok.ok_or_else(|| {
                    bad(format!("perm {p:?} is not a permutation of {rank} axes"))
                })?;
                seen[a] = true;
                perm.push(a);
            }
            if perm.len() != rank {
                return Err(bad(format!(
                    "perm {p:?} is not a permutation of {rank} axes"
                )));
            }
            perm
        }
        Some(other) => return Err(bad(format!("perm is {other:?}, not a list of ints"))),
    };
    let elem = src.dtype.size();
    let expected = src.numel().saturating_mul(elem as u64);
    if src.data.len() != expected {
        return Err(bad(format!(
            "input `{}` has {} bytes, its shape needs {expected}",
            src.name,
            src.data.len()
        )));
    }
    let dims: Vec<usize> = src.dims.iter().map(|&d| d.max(0) as usize).collect();
    let data = TensorData::transposed(src.data.clone(), &dims, &perm, elem).map_err(|source| {
        OptimizeError::Io {
            name: src.name.clone(),
            source,
        }
    })?;
    Ok(Initializer {
        name: n.outputs[0].clone(),
        dtype: src.dtype,
        dims: perm.iter().map(|&a| src.dims[a]).collect(),
        data,
    })
}

/// Reference row-major transpose (what this pass materialized before transposes became
/// views): the folded views must produce exactly these bytes.
#[cfg(test)]
/// (`src` has shape `dims` and `elem`-byte elements.)
fn transpose_bytes(src: &[u8], dims: &[usize], perm: &[usize], elem: usize) -> Vec<u8> {
    let rank = dims.len();
    let numel: usize = dims.iter().product();
    let mut out = Vec::with_capacity(numel * elem);
    if numel == 0 {
        return out;
    }
    let mut in_strides = vec![1usize; rank];
    for i in (0..rank.saturating_sub(1)).rev() {
        in_strides[i] = in_strides[i + 1] * dims[i + 1];
    }
    let out_dims: Vec<usize> = perm.iter().map(|&a| dims[a]).collect();
    // Input stride of each output axis.
    let strides: Vec<usize> = perm.iter().map(|&a| in_strides[a]).collect();
    let mut idx = vec![0usize; rank];
    let mut off = 0usize;
    for _ in 0..numel {
        out.extend_from_slice(&src[off * elem..(off + 1) * elem]);
        // Odometer step over the output index, updating the input offset incrementally.
        for ax in (0..rank).rev() {
            idx[ax] += 1;
            off += strides[ax];
            if idx[ax] < out_dims[ax] {
                break;
            }
            off -= strides[ax] * out_dims[ax];
            idx[ax] = 0;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use ferry_ir::{DType, Dim, Value};

    use super::*;
    use crate::test_util::{graph, init, node};

    #[test]
    fn transpose_bytes_matches_index_arithmetic() {
        // 2x3x4 tensor of 0..24, perm [2, 0, 1] → 4x2x3.
        let src: Vec<u8> = (0..24).collect();
        let out = transpose_bytes(&src, &[2, 3, 4], &[2, 0, 1], 1);
        let mut want = Vec::new();
        for k in 0..4 {
            for i in 0..2 {
                for j in 0..3 {
                    want.push((i * 12 + j * 4 + k) as u8);
                }
            }
        }
        assert_eq!(out, want);
        // Multi-byte elements, 2-D default reverse.
        let src: Vec<u8> = [1u16, 2, 3, 4, 5, 6]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let out = transpose_bytes(&src, &[2, 3], &[1, 0], 2);
        let want: Vec<u8> = [1u16, 4, 2, 5, 3, 6]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        assert_eq!(out, want);
        // Scalars and empty tensors.
        assert_eq!(transpose_bytes(&[7], &[], &[], 1), vec![7]);
        assert!(transpose_bytes(&[], &[0, 3], &[1, 0], 4).is_empty());
    }

    #[test]
    fn transposes_of_initializers_fold() {
        let mut g = graph(
            vec![
                node("Transpose", &["w"], &["wt"], vec![]),
                // Chained: transposing the folded result back.
                node(
                    "Transpose",
                    &["wt"],
                    &["wtt"],
                    vec![("perm", Attr::Ints(vec![1, 0]))],
                ),
                node("MatMul", &["x", "wt"], &["y"], vec![]),
                node("Add", &["y", "wtt"], &["z"], vec![]),
                // Not an initializer: stays.
                node("Transpose", &["z"], &["out"], vec![]),
            ],
            vec![init("w", vec![2, 3], &[1., 2., 3., 4., 5., 6.])],
            &["out"],
        );
        g.value_info = vec![Value::new("wt", DType::F32, vec![])];
        assert_eq!(fold_transposes(&mut g).expect("fold"), 2);
        let ops: Vec<&str> = g.nodes.iter().map(|n| n.op_type.as_str()).collect();
        assert_eq!(ops, ["MatMul", "Add", "Transpose"]);
        assert!(g.value_info.is_empty());
        let wt = g.initializers.iter().find(|i| i.name == "wt").expect("wt");
        assert_eq!(wt.dims, vec![3, 2]);
        assert_eq!(
            wt.data.to_f32_vec().expect("f32"),
            vec![1., 4., 2., 5., 3., 6.]
        );
        let wtt = g
            .initializers
            .iter()
            .find(|i| i.name == "wtt")
            .expect("wtt");
        assert_eq!(wtt.dims, vec![2, 3]);
        assert_eq!(
            wtt.data.to_f32_vec().expect("f32"),
            vec![1., 2., 3., 4., 5., 6.]
        );
    }

    #[test]
    fn folded_transposes_stream_the_bytes_a_copy_had() {
        // A 3-D weight under every permutation, and a 2-D bert-like weight.
        let vals: Vec<f32> = (0..2 * 3 * 5).map(|v| v as f32 * 0.5 - 3.0).collect();
        let w2: Vec<f32> = (0..40 * 24).map(|v| (v as f32).sin()).collect();
        for (dims, values, perm) in [
            (vec![2i64, 3, 5], &vals, vec![2i64, 0, 1]),
            (vec![2, 3, 5], &vals, vec![1, 2, 0]),
            (vec![2, 3, 5], &vals, vec![0, 2, 1]),
            (vec![2, 3, 5], &vals, vec![2, 1, 0]),
            (vec![40, 24], &w2, vec![1, 0]),
        ] {
            let mut g = graph(
                vec![
                    node(
                        "Transpose",
                        &["w"],
                        &["wt"],
                        vec![("perm", Attr::Ints(perm.clone()))],
                    ),
                    node("Relu", &["wt"], &["y"], vec![]),
                ],
                vec![init("w", dims.clone(), values)],
                &["y"],
            );
            assert_eq!(fold_transposes(&mut g).expect("fold"), 1);
            let src = g.initializers[0].data.bytes().expect("bytes").into_owned();
            let ud: Vec<usize> = dims.iter().map(|&d| d as usize).collect();
            let up: Vec<usize> = perm.iter().map(|&a| a as usize).collect();
            let want = transpose_bytes(&src, &ud, &up, 4);
            let wt = g.initializers.iter().find(|i| i.name == "wt").expect("wt");
            assert!(matches!(wt.data, TensorData::Transposed { .. }));
            assert_eq!(&*wt.data.bytes().expect("bytes"), &want[..], "{perm:?}");
            let mut streamed = Vec::new();
            wt.data.write_to(&mut streamed).expect("write");
            assert_eq!(streamed, want, "{perm:?}");
        }
    }

    #[test]
    fn transposes_that_must_stay() {
        // Output is a graph output; input is an initializer overridable as a graph input.
        let mut g = graph(
            vec![
                node("Transpose", &["w"], &["y"], vec![]),
                node("Transpose", &["x"], &["xt"], vec![]),
            ],
            vec![init("w", vec![1, 2], &[1., 2.]), init("x", vec![1], &[0.])],
            &["y", "xt"],
        );
        assert_eq!(fold_transposes(&mut g).expect("fold"), 0);
        assert_eq!(g.nodes.len(), 2);
        // A bad perm is an error naming the node.
        let mut g = graph(
            vec![
                node(
                    "Transpose",
                    &["w"],
                    &["wt"],
                    vec![("perm", Attr::Ints(vec![0, 0]))],
                ),
                node("Relu", &["wt"], &["y"], vec![]),
            ],
            vec![init("w", vec![1, 2], &[1., 2.])],
            &["y"],
        );
        let e = fold_transposes(&mut g).expect_err("bad perm");
        assert!(e.to_string().contains("/Transpose_wt"), "{e}");
    }

    /// The tracer's run-time reshape pattern over a static input: Shape → Gather →
    /// Unsqueeze → Concat → Reshape target; the reshape of the (non-constant) input stays,
    /// its target becomes an initializer, and the intermediate values leave no trace.
    #[test]
    fn shape_arithmetic_of_static_dims_folds() {
        let ints = |name: &str, v: &[i64]| Initializer {
            name: name.into(),
            dtype: DType::I64,
            dims: vec![v.len() as i64],
            data: TensorData::from_i64(v),
        };
        let scalar = |name: &str, v: i64| Initializer {
            dims: vec![],
            ..ints(name, &[v])
        };
        let mut g = graph(
            vec![
                node("Shape", &["x"], &["s"], vec![]),
                node("Gather", &["s", "zero"], &["b"], vec![]),
                node("Unsqueeze", &["b", "axes"], &["bu"], vec![]),
                node(
                    "Concat",
                    &["bu", "minus1"],
                    &["target"],
                    vec![("axis", Attr::Int(0))],
                ),
                node("Reshape", &["x", "target"], &["y"], vec![]),
                // Not constant: reads the graph input's values.
                node("Cast", &["x"], &["xc"], vec![("to", Attr::Int(7))]),
                node("Add", &["y", "y"], &["out"], vec![]),
            ],
            vec![scalar("zero", 0), ints("axes", &[0]), ints("minus1", &[-1])],
            &["out", "xc"],
        );
        g.inputs = vec![Value::new(
            "x",
            DType::F32,
            vec![Dim::Fixed(2), Dim::Fixed(3), Dim::Fixed(4)],
        )];
        g.value_info = vec![Value::new("s", DType::I64, vec![Dim::Fixed(3)])];
        assert_eq!(fold_computed(&mut g), 4);
        let ops: Vec<&str> = g.nodes.iter().map(|n| n.op_type.as_str()).collect();
        assert_eq!(ops, ["Reshape", "Cast", "Add"]);
        let target = g
            .initializers
            .iter()
            .find(|i| i.name == "target")
            .expect("target folded");
        assert_eq!((target.dtype, target.dims.clone()), (DType::I64, vec![2]));
        let bytes = target.data.bytes().expect("bytes");
        let v: Vec<i64> = bytes
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes")))
            .collect();
        assert_eq!(v, [2, -1]);
        // Intermediates are neither initializers nor value_info.
        assert!(
            !g.initializers
                .iter()
                .any(|i| ["s", "b", "bu"].contains(&i.name.as_str()))
        );
        assert!(g.value_info.is_empty());

        // A symbolic dim keeps the Shape (and everything after it).
        let mut g2 = graph(
            vec![
                node("Shape", &["x"], &["s"], vec![]),
                node("Cast", &["s"], &["out"], vec![("to", Attr::Int(1))]),
            ],
            vec![],
            &["out"],
        );
        g2.inputs = vec![Value::new(
            "x",
            DType::F32,
            vec![Dim::sym("batch"), Dim::Fixed(3)],
        )];
        assert_eq!(fold_computed(&mut g2), 0);
        // An initializer overridable as a graph input is not a constant; a graph output is
        // never folded.
        let mut g3 = graph(
            vec![
                node("Cast", &["w"], &["wc"], vec![("to", Attr::Int(7))]),
                node("Cast", &["v"], &["out"], vec![("to", Attr::Int(7))]),
                node("Add", &["wc", "wc"], &["o2"], vec![]),
            ],
            vec![init("w", vec![1], &[1.0]), init("v", vec![1], &[2.0])],
            &["out", "o2"],
        );
        g3.inputs = vec![Value::new("w", DType::F32, vec![Dim::Fixed(1)])];
        assert_eq!(fold_computed(&mut g3), 0);
        assert_eq!(g3.nodes.len(), 3);
    }

    #[test]
    fn constants_fold() {
        let t = init("ignored", vec![2], &[1.5, 2.5]);
        let mut g = graph(
            vec![
                node(
                    "Constant",
                    &[],
                    &["a"],
                    vec![("value", Attr::Tensor(Box::new(t)))],
                ),
                node(
                    "Constant",
                    &[],
                    &["b"],
                    vec![("value_ints", Attr::Ints(vec![1, 2, 3]))],
                ),
                node("Constant", &[], &["c"], vec![("value_int", Attr::Int(4))]),
                node(
                    "Constant",
                    &[],
                    &["d"],
                    vec![("value_string", Attr::String("s".into()))],
                ),
                // Graph output: stays a node.
                node(
                    "Constant",
                    &[],
                    &["y"],
                    vec![("value_float", Attr::Float(1.0))],
                ),
            ],
            vec![],
            &["y"],
        );
        assert_eq!(fold_constants(&mut g), 3);
        let ops: Vec<&str> = g.nodes.iter().map(|n| n.outputs[0].as_str()).collect();
        assert_eq!(ops, ["d", "y"]);
        let a = &g.initializers[0];
        assert_eq!((a.name.as_str(), a.dims.clone()), ("a", vec![2]));
        assert_eq!(a.data.to_f32_vec().expect("f32"), vec![1.5, 2.5]);
        let b = &g.initializers[1];
        assert_eq!(
            (b.dtype, b.dims.clone(), b.data.len()),
            (DType::I64, vec![3], 24)
        );
        let c = &g.initializers[2];
        assert_eq!(
            (c.dtype, c.dims.clone(), c.data.len()),
            (DType::I64, vec![], 8)
        );
    }
}
