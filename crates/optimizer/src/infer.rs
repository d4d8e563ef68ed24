//! A small forward shape inference for models that come without `value_info` (such as
//! `torch.onnx.export`'s), so the fusions that check shapes can run on them. Only the ops
//! transformer encoders are made of are understood, and a shape is recorded only when it
//! follows from the graph for every input that runs (symbolic dims carried by name).

use std::collections::HashMap;

use ferry_ir::{Attr, DType, Dim, Graph, Node, Value};

use crate::fuse::{input_at, output_at};

/// A value's element type and shape.
type Shape = (DType, Vec<Dim>);

/// A 1-D int64 tensor whose elements are known constants or dims of other values (the
/// `Concat(Unsqueeze(Gather(Shape(x), k)), …)` of a dynamic-axes export).
type DimVector = Vec<Dim>;

/// The numpy broadcast of two shapes, when it is certain.
fn broadcast(a: &[Dim], b: &[Dim]) -> Option<Vec<Dim>> {
    let n = a.len().max(b.len());
    let at = |s: &[Dim], i: usize| {
        (i + s.len())
            .checked_sub(n)
            .map_or(Dim::Fixed(1), |k| s[k].clone())
    };
    (0..n)
        .map(|i| match (at(a, i), at(b, i)) {
            (x, y) if x == y => Some(x),
            (Dim::Fixed(1), y) => Some(y),
            (x, Dim::Fixed(1)) => Some(x),
            _ => None,
        })
        .collect()
}

fn ints_of(i: &ferry_ir::Initializer) -> Option<Vec<i64>> {
    if i.dtype != DType::I64 || i.dims.len() > 1 {
        return None;
    }
    let b = i.data.bytes().ok()?;
    Some(
        b.chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes")))
            .collect(),
    )
}

fn dtype_of_code(code: i64) -> Option<DType> {
    Some(match code {
        1 => DType::F32,
        6 => DType::I32,
        7 => DType::I64,
        9 => DType::Bool,
        _ => return None,
    })
}

struct State<'g> {
    shapes: HashMap<String, Shape>,
    /// Known-content int64 vectors: constants and shape arithmetic.
    dimvecs: HashMap<String, DimVector>,
    inits: HashMap<&'g str, &'g ferry_ir::Initializer>,
    /// Values read as the first operand of a MatMul with a 2-D initializer `[k, n]`:
    /// `(k, dtype)`, the last axis every run that succeeds gives them.
    matmul_rows: HashMap<&'g str, (i64, DType)>,
}

impl State<'_> {
    fn shape(&self, v: &str) -> Option<&Shape> {
        self.shapes.get(v)
    }

    fn dimvec(&self, v: &str) -> Option<DimVector> {
        if let Some(d) = self.dimvecs.get(v) {
            return Some(d.clone());
        }
        let i = self.inits.get(v)?;
        Some(ints_of(i)?.into_iter().map(Dim::Fixed).collect())
    }

    fn const_ints(&self, v: &str) -> Option<Vec<i64>> {
        self.dimvec(v)?.iter().map(Dim::fixed).collect()
    }
}

/// The product of `dims`: fixed when all are, else a symbol naming the product (the same
/// symbols and factor always give the same name).
fn product(dims: &[Dim]) -> Option<Dim> {
    let mut syms: Vec<&str> = Vec::new();
    let mut fixed: i64 = 1;
    for d in dims {
        match d {
            Dim::Fixed(x) if *x >= 0 => fixed = fixed.checked_mul(*x)?,
            Dim::Fixed(_) => return None,
            Dim::Sym(s) => syms.push(s),
        }
    }
    if syms.is_empty() {
        return Some(Dim::Fixed(fixed));
    }
    syms.sort_unstable();
    let mut name = syms.join("*");
    if fixed != 1 {
        name = format!("{name}*{fixed}");
    }
    Some(Dim::Sym(name))
}

/// The `-1` extent at `at` of a reshape of `input` to `target`: the target's symbolic dims
/// must be among the input's and the fixed ones divide exactly; input symbols left over
/// make a product symbol.
fn inferred_extent(input: &[Dim], target: &[Dim], at: usize) -> Option<Dim> {
    let mut syms: Vec<&str> = input
        .iter()
        .filter_map(|d| match d {
            Dim::Sym(s) => Some(s.as_str()),
            Dim::Fixed(_) => None,
        })
        .collect();
    let mut num: i64 = 1;
    for d in input {
        if let Dim::Fixed(x) = d {
            num = num.checked_mul(*x)?;
        }
    }
    let mut den: i64 = 1;
    for (k, d) in target.iter().enumerate() {
        match d {
            _ if k == at => {}
            Dim::Fixed(x) => den = den.checked_mul(*x)?,
            Dim::Sym(s) => {
                let i = syms.iter().position(|t| t == s)?;
                syms.swap_remove(i);
            }
        }
    }
    if den <= 0 || num % den != 0 {
        return None;
    }
    let mut rest: Vec<Dim> = syms.into_iter().map(|s| Dim::Sym(s.to_string())).collect();
    rest.push(Dim::Fixed(num / den));
    product(&rest)
}

/// Elementwise `op` of two known int vectors (lengths equal, or one of length 1), where
/// the result is certain: products, and `Equal` as 0/1 (a dim is never negative).
fn dimvec_binary(op: &str, a: &[Dim], b: &[Dim]) -> Option<DimVector> {
    let n = a.len().max(b.len());
    if !(a.len() == n || a.len() == 1) || !(b.len() == n || b.len() == 1) {
        return None;
    }
    let at = |v: &[Dim], i: usize| v[if v.len() == 1 { 0 } else { i }].clone();
    (0..n)
        .map(|i| match (op, at(a, i), at(b, i)) {
            ("Mul", Dim::Fixed(x), Dim::Fixed(y)) => Some(Dim::Fixed(x.checked_mul(y)?)),
            ("Mul", d, Dim::Fixed(1)) | ("Mul", Dim::Fixed(1), d) => Some(d),
            ("Equal", Dim::Fixed(x), Dim::Fixed(y)) => Some(Dim::Fixed(i64::from(x == y))),
            ("Equal", Dim::Sym(x), Dim::Sym(y)) if x == y => Some(Dim::Fixed(1)),
            ("Equal", Dim::Sym(_), Dim::Fixed(y)) | ("Equal", Dim::Fixed(y), Dim::Sym(_))
                if y < 0 =>
            {
                Some(Dim::Fixed(0))
            }
            _ => None,
        })
        .collect()
}

/// Output shapes (and known int64 contents) of `n`, given what is known of its inputs.
fn infer_node(st: &State<'_>, n: &Node) -> Option<(Vec<Shape>, Option<DimVector>)> {
    let input = |k: usize| st.shape(n.inputs.get(k)?);
    let op = n.op_type.as_str();
    let same = |k: usize| Some((vec![input(k)?.clone()], None));
    match op {
        "Relu" | "Tanh" | "Erf" | "Sqrt" | "Neg" | "Exp" | "Not" | "Identity" | "Softmax"
        | "Sigmoid" | "Reciprocal" | "Cos" | "Sin" | "Gelu" | "FastGelu" | "BiasGelu" => same(0),
        "LayerNormalization" if n.outputs.len() == 1 => same(0),
        "Cast" => {
            let (from, dims) = input(0)?.clone();
            let Some(Attr::Int(to)) = n.attr("to") else {
                return None;
            };
            let to = dtype_of_code(*to)?;
            let keep = (from == DType::I64 && to == DType::I64)
                .then(|| st.dimvecs.get(input_at(n, 0)).cloned())
                .flatten();
            Some((vec![(to, dims)], keep))
        }
        "Mul" | "Equal"
            if (st.dimvecs.contains_key(input_at(n, 0))
                || st.dimvecs.contains_key(input_at(n, 1)))
                && st.dimvec(input_at(n, 0)).is_some()
                && st.dimvec(input_at(n, 1)).is_some() =>
        {
            let (a, b) = (st.dimvec(input_at(n, 0))?, st.dimvec(input_at(n, 1))?);
            let v = dimvec_binary(op, &a, &b)?;
            let dt = if op == "Equal" {
                DType::Bool
            } else {
                DType::I64
            };
            // Two scalars (Gathered dims) give a scalar, not a 1-element vector.
            let rank0 = |k: usize| st.shape(input_at(n, k)).is_some_and(|(_, d)| d.is_empty());
            let dims = if rank0(0) && rank0(1) {
                vec![]
            } else {
                vec![Dim::Fixed(v.len() as i64)]
            };
            Some((vec![(dt, dims)], Some(v)))
        }
        "Where"
            if st.dimvecs.contains_key(input_at(n, 0))
                && st.dimvec(input_at(n, 1)).is_some()
                && st.dimvec(input_at(n, 2)).is_some() =>
        {
            let c = st.dimvecs.get(input_at(n, 0))?;
            let (a, b) = (st.dimvec(input_at(n, 1))?, st.dimvec(input_at(n, 2))?);
            if c.len() != a.len() || a.len() != b.len() {
                return None;
            }
            let v: Option<DimVector> = c
                .iter()
                .zip(a.iter().zip(&b))
                .map(|(c, (x, y))| match c {
                    Dim::Fixed(1) => Some(x.clone()),
                    Dim::Fixed(0) => Some(y.clone()),
                    _ => None,
                })
                .collect();
            let v = v?;
            Some((
                vec![(DType::I64, vec![Dim::Fixed(v.len() as i64)])],
                Some(v),
            ))
        }
        "ConstantOfShape" => {
            let shape = st.dimvec(input_at(n, 0))?;
            let (dt, fill) = match n.attr("value") {
                None => (DType::F32, None),
                Some(Attr::Tensor(t)) if t.dtype == DType::I64 => {
                    (DType::I64, ints_of(t)?.first().copied())
                }
                Some(Attr::Tensor(t)) => (t.dtype, None),
                _ => return None,
            };
            let known = match (fill, shape.as_slice()) {
                (Some(v), [Dim::Fixed(len)]) if *len >= 0 && *len <= 8 => {
                    Some(vec![Dim::Fixed(v); *len as usize])
                }
                _ => None,
            };
            Some((vec![(dt, shape)], known))
        }
        "Range" => {
            let start = st.const_ints(input_at(n, 0))?;
            let step = st.const_ints(input_at(n, 2))?;
            let limit = st.dimvecs.get(input_at(n, 1))?;
            let dt = st.inits.get(input_at(n, 0))?.dtype;
            if start != [0] || step != [1] || limit.len() != 1 || dt != DType::I64 {
                return None;
            }
            Some((vec![(dt, vec![limit[0].clone()])], None))
        }
        "Flatten" => {
            let (dt, dims) = input(0)?;
            let axis = match n.attr("axis") {
                None => 1,
                Some(Attr::Int(a)) => *a,
                _ => return None,
            };
            let a = usize::try_from(if axis < 0 {
                axis + dims.len() as i64
            } else {
                axis
            })
            .ok()?;
            if a > dims.len() {
                return None;
            }
            Some((
                vec![(*dt, vec![product(&dims[..a])?, product(&dims[a..])?])],
                None,
            ))
        }
        "Expand" => {
            let (dt, dims) = input(0)?;
            let target = st.dimvec(input_at(n, 1))?;
            Some((vec![(*dt, broadcast(dims, &target)?)], None))
        }
        "Add" | "Sub" | "Mul" | "Div" | "Pow" | "And" | "Or" | "Equal" | "Greater"
        | "GreaterOrEqual" | "Less" | "LessOrEqual" => {
            let (da, a) = input(0)?;
            let (_, b) = input(1)?;
            let out = broadcast(a, b)?;
            let dt = if [
                "And",
                "Or",
                "Equal",
                "Greater",
                "GreaterOrEqual",
                "Less",
                "LessOrEqual",
            ]
            .contains(&op)
            {
                DType::Bool
            } else {
                *da
            };
            Some((vec![(dt, out)], None))
        }
        "Where" => {
            let (_, c) = input(0)?;
            let (dt, x) = input(1)?;
            let (_, y) = input(2)?;
            Some((vec![(*dt, broadcast(&broadcast(c, x)?, y)?)], None))
        }
        "MatMul" => {
            let (dt, a) = input(0)?;
            let (_, b) = input(1)?;
            if a.len() < 2 || b.len() < 2 {
                return None;
            }
            let (k_a, k_b) = (&a[a.len() - 1], &b[b.len() - 2]);
            if k_a != k_b {
                return None;
            }
            let batch_a = &a[..a.len() - 2];
            let batch_b = &b[..b.len() - 2];
            if !batch_b.is_empty() && batch_a != batch_b {
                return None;
            }
            let batch = batch_a.to_vec();
            let mut out = batch;
            out.extend([a[a.len() - 2].clone(), b[b.len() - 1].clone()]);
            Some((vec![(*dt, out)], None))
        }
        "Gather" => {
            let axis = match n.attr("axis") {
                None => 0,
                Some(Attr::Int(a)) => *a,
                _ => return None,
            };
            // Shape arithmetic: one element of a known int vector.
            if let (Some(v), Some(k)) = (st.dimvec(input_at(n, 0)), st.const_ints(input_at(n, 1))) {
                let idx_shape = st.inits.get(input_at(n, 1))?.dims.clone();
                if axis == 0 && idx_shape.is_empty() && k.len() == 1 {
                    let i = if k[0] < 0 {
                        k[0] + v.len() as i64
                    } else {
                        k[0]
                    };
                    let d = v.get(usize::try_from(i).ok()?)?.clone();
                    return Some((vec![(DType::I64, vec![])], Some(vec![d])));
                }
            }
            let (dt, data) = input(0)?;
            let (_, idx) = input(1)?;
            if axis != 0 || data.is_empty() {
                return None;
            }
            let mut out = idx.clone();
            out.extend(data[1..].iter().cloned());
            Some((vec![(*dt, out)], None))
        }
        "Shape" if n.attrs.is_empty() => {
            let (_, dims) = input(0)?;
            Some((
                vec![(DType::I64, vec![Dim::Fixed(dims.len() as i64)])],
                Some(dims.clone()),
            ))
        }
        "Unsqueeze" => {
            let axes = match (n.inputs.len(), n.attr("axes")) {
                (1, Some(Attr::Ints(a))) => a.clone(),
                (2, None) => st.const_ints(input_at(n, 1))?,
                _ => return None,
            };
            // A scalar dim made a 1-vector.
            if axes == [0]
                && let Some(v) = st.dimvecs.get(input_at(n, 0))
                && input(0).is_some_and(|(_, s)| s.is_empty())
            {
                return Some((vec![(DType::I64, vec![Dim::Fixed(1)])], Some(v.clone())));
            }
            let (dt, dims) = input(0)?;
            let rank = dims.len() + axes.len();
            let mut axes: Vec<usize> = axes
                .iter()
                .map(|&a| usize::try_from(if a < 0 { a + rank as i64 } else { a }).ok())
                .collect::<Option<_>>()?;
            axes.sort_unstable();
            let mut out = dims.clone();
            for a in axes {
                if a > out.len() {
                    return None;
                }
                out.insert(a, Dim::Fixed(1));
            }
            Some((vec![(*dt, out)], None))
        }
        "Concat" => {
            let parts: Option<Vec<DimVector>> = n.inputs.iter().map(|i| st.dimvec(i)).collect();
            let v: DimVector = parts?.concat();
            Some((
                vec![(DType::I64, vec![Dim::Fixed(v.len() as i64)])],
                Some(v),
            ))
        }
        "Reshape" => {
            let target = st.dimvec(input_at(n, 1))?;
            // `[.., -1]` into a MatMul with a constant `[k, n]` weight: the -1 is k in
            // every run where the MatMul succeeds (optimum's merge of the heads).
            if input(0).is_none()
                && let Some(&(k, dt)) = st.matmul_rows.get(output_at(n, 0))
                && let Some((last, rest)) = target.split_last()
                && *last == Dim::Fixed(-1)
                && rest
                    .iter()
                    .all(|d| matches!(d, Dim::Sym(_)) || d.fixed().is_some_and(|x| x > 0))
            {
                let mut out = rest.to_vec();
                out.push(Dim::Fixed(k));
                return Some((vec![(dt, out)], None));
            }
            let (dt, dims) = input(0)?;
            if let Some(v) = st.dimvecs.get(input_at(n, 0))
                && dims.len() == 1
                && target == [Dim::Fixed(-1)]
            {
                return Some((vec![(*dt, dims.clone())], Some(v.clone())));
            }
            let allow_zero = matches!(n.attr("allowzero"), Some(Attr::Int(1)));
            let mut out = Vec::with_capacity(target.len());
            let mut infer_at = None;
            for (k, d) in target.iter().enumerate() {
                match d {
                    Dim::Fixed(0) if !allow_zero => out.push(dims.get(k)?.clone()),
                    Dim::Fixed(-1) if infer_at.is_none() => {
                        infer_at = Some(k);
                        out.push(Dim::Fixed(-1));
                    }
                    Dim::Fixed(x) if *x > 0 => out.push(d.clone()),
                    Dim::Sym(_) => out.push(d.clone()),
                    _ => return None,
                }
            }
            if let Some(k) = infer_at {
                out[k] = inferred_extent(dims, &out, k)?;
            }
            Some((vec![(*dt, out)], None))
        }
        "Transpose" => {
            let (dt, dims) = input(0)?;
            let Some(Attr::Ints(perm)) = n.attr("perm") else {
                return None;
            };
            let out: Option<Vec<Dim>> = perm
                .iter()
                .map(|&p| dims.get(usize::try_from(p).ok()?).cloned())
                .collect();
            Some((vec![(*dt, out?)], None))
        }
        "ReduceMean" => {
            let (dt, dims) = input(0)?;
            let keep = matches!(n.attr("keepdims"), None | Some(Attr::Int(1)));
            let axes = match (n.inputs.len(), n.attr("axes")) {
                (1, Some(Attr::Ints(a))) => a.clone(),
                (2, None) => st.const_ints(input_at(n, 1))?,
                _ => return None,
            };
            if !keep {
                return None;
            }
            let mut out = dims.clone();
            for a in axes {
                let a = if a < 0 { a + dims.len() as i64 } else { a };
                *out.get_mut(usize::try_from(a).ok()?)? = Dim::Fixed(1);
            }
            Some((vec![(*dt, out)], None))
        }
        "Slice" => {
            // Rows [0, end) of a constant table along one axis, end a dim of another value.
            let (dt, dims) = input(0)?;
            let starts = st.const_ints(input_at(n, 1))?;
            let ends = st.dimvec(input_at(n, 2))?;
            let axes = st.const_ints(n.inputs.get(3)?)?;
            let steps_ok = n
                .inputs
                .get(4)
                .is_none_or(|s| st.const_ints(s).is_some_and(|s| s == [1]));
            if starts != [0] || ends.len() != 1 || axes.len() != 1 || !steps_ok {
                return None;
            }
            let a = if axes[0] < 0 {
                axes[0] + dims.len() as i64
            } else {
                axes[0]
            };
            let mut out = dims.clone();
            let slot = out.get_mut(usize::try_from(a).ok()?)?;
            // A symbolic end within a fixed extent: the slice is `end` long whenever the
            // model runs (longer inputs fail the ops that combine it with them).
            match (&ends[0], &*slot) {
                (Dim::Sym(_), Dim::Fixed(_)) => *slot = ends[0].clone(),
                (Dim::Fixed(e), Dim::Fixed(len)) if *e >= 0 => *slot = Dim::Fixed(*e.min(len)),
                _ => return None,
            }
            Some((vec![(*dt, out)], None))
        }
        _ => None,
    }
}

/// Records in `value_info` the shapes that follow from the graph inputs and initializers
/// for values that have none, in node order (see the module docs for what is understood).
/// Returns how many shapes were added.
pub fn infer_shapes(graph: &mut Graph) -> usize {
    let inits: HashMap<&str, &ferry_ir::Initializer> = graph
        .initializers
        .iter()
        .map(|i| (i.name.as_str(), i))
        .collect();
    let overridable: std::collections::HashSet<&str> =
        graph.inputs.iter().map(|v| v.name.as_str()).collect();
    let matmul_rows = graph
        .nodes
        .iter()
        .filter(|n| n.op_type == "MatMul" && (n.domain.is_empty() || n.domain == "ai.onnx"))
        .filter_map(|n| {
            let w = inits
                .get(input_at(n, 1))
                .filter(|w| !overridable.contains(w.name.as_str()))?;
            match w.dims.as_slice() {
                [k, _] => Some((input_at(n, 0), (*k, w.dtype))),
                _ => None,
            }
        })
        .collect();
    let mut st = State {
        shapes: HashMap::new(),
        dimvecs: HashMap::new(),
        inits,
        matmul_rows,
    };
    for i in &graph.initializers {
        let dims = i.dims.iter().map(|&d| Dim::Fixed(d)).collect();
        st.shapes.insert(i.name.clone(), (i.dtype, dims));
    }
    for v in graph
        .inputs
        .iter()
        .chain(&graph.value_info)
        .chain(&graph.outputs)
    {
        if let Some(s) = &v.shape {
            st.shapes.insert(v.name.clone(), (v.dtype, s.clone()));
        }
    }
    let known: std::collections::HashSet<String> = st.shapes.keys().cloned().collect();
    let mut added = Vec::new();
    for n in &graph.nodes {
        let is_onnx = n.domain.is_empty() || n.domain == "ai.onnx";
        let is_ms_gelu = n.domain == crate::MS_DOMAIN && n.op_type.contains("Gelu");
        if !(is_onnx || is_ms_gelu) {
            continue;
        }
        let Some((outs, dimvec)) = infer_node(&st, n) else {
            continue;
        };
        if outs.len() != n.outputs.len() {
            continue;
        }
        if let Some(v) = dimvec
            && let Some(o) = n.outputs.first().filter(|o| !o.is_empty())
        {
            st.dimvecs.insert(o.clone(), v);
        }
        for (name, shape) in n.outputs.iter().zip(outs) {
            if name.is_empty() || st.shapes.contains_key(name) {
                continue;
            }
            if !known.contains(name) {
                added.push(Value::new(name.clone(), shape.0, shape.1.clone()));
            }
            st.shapes.insert(name.clone(), shape);
        }
    }
    let count = added.len();
    graph.value_info.extend(added);
    count
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{graph, init, node};

    #[test]
    fn shapes_flow_through_embeddings_matmul_and_shape_arithmetic() {
        let ints = |name: &str, v: &[i64]| ferry_ir::Initializer {
            name: name.into(),
            dtype: DType::I64,
            dims: if v.len() == 1 && name.starts_with('s') {
                vec![]
            } else {
                vec![v.len() as i64]
            },
            data: ferry_ir::TensorData::from_i64(v),
        };
        let mut g = graph(
            vec![
                node("Gather", &["table", "ids"], &["e"], vec![]),
                node("MatMul", &["e", "w"], &["m"], vec![]),
                node("Add", &["bias", "m"], &["a"], vec![]),
                node("Shape", &["e"], &["sh"], vec![]),
                node(
                    "Gather",
                    &["sh", "s1"],
                    &["seq"],
                    vec![("axis", Attr::Int(0))],
                ),
                node("Unsqueeze", &["seq", "zero"], &["seq1"], vec![]),
                node(
                    "Gather",
                    &["sh", "s0"],
                    &["b"],
                    vec![("axis", Attr::Int(0))],
                ),
                node("Unsqueeze", &["b", "zero"], &["b1"], vec![]),
                // A fixed scalar dim times a scalar stays a scalar (optimum's `heads * groups`).
                node(
                    "Gather",
                    &["sh", "s2"],
                    &["h"],
                    vec![("axis", Attr::Int(0))],
                ),
                node("Mul", &["h", "s2"], &["h2"], vec![]),
                node(
                    "Concat",
                    &["b1", "seq1", "heads"],
                    &["target"],
                    vec![("axis", Attr::Int(0))],
                ),
                node("Reshape", &["a", "target"], &["r"], vec![]),
                node(
                    "Transpose",
                    &["r"],
                    &["t"],
                    vec![("perm", Attr::Ints(vec![0, 2, 1, 3]))],
                ),
            ],
            vec![
                init("table", vec![5, 4], &[0.; 20]),
                init("w", vec![4, 4], &[0.; 16]),
                init("bias", vec![4], &[0.; 4]),
                ints("s1", &[1]),
                ints("s0", &[0]),
                ints("s2", &[2]),
                ints("zero", &[0]),
                ints("heads", &[2, 2]),
            ],
            &["unrelated"],
        );
        g.inputs = vec![Value::new(
            "ids",
            DType::I64,
            vec![Dim::sym("batch"), Dim::sym("seq")],
        )];
        infer_shapes(&mut g);
        let shape = |v: &str| {
            g.value_info
                .iter()
                .find(|x| x.name == v)
                .and_then(|x| x.shape.clone())
        };
        let bs = |rest: &[i64]| {
            let mut d = vec![Dim::sym("batch"), Dim::sym("seq")];
            d.extend(rest.iter().map(|&x| Dim::Fixed(x)));
            d
        };
        assert_eq!(shape("a"), Some(bs(&[4])));
        assert_eq!(shape("h2"), Some(vec![]));
        assert_eq!(shape("r"), Some(bs(&[2, 2])));
        assert_eq!(
            shape("t"),
            Some(vec![
                Dim::sym("batch"),
                Dim::Fixed(2),
                Dim::sym("seq"),
                Dim::Fixed(2)
            ])
        );
    }

    #[test]
    fn reshape_minus_one_is_resolved_when_symbols_cancel() {
        let (b, s) = (Dim::sym("b"), Dim::sym("s"));
        let input = [b.clone(), s.clone(), Dim::Fixed(32)];
        let target = [b.clone(), s.clone(), Dim::Fixed(-1), Dim::Fixed(8)];
        assert_eq!(inferred_extent(&input, &target, 2), Some(Dim::Fixed(4)));
        let target = [b.clone(), Dim::Fixed(-1), Dim::Fixed(8)];
        assert_eq!(inferred_extent(&input, &target, 1), Some(Dim::sym("s*4")));
        let target = [b, s, Dim::Fixed(-1), Dim::Fixed(5)];
        assert_eq!(inferred_extent(&input, &target, 2), None);
    }

    #[test]
    fn uncertain_broadcasts_give_no_shape() {
        let mut g = graph(
            vec![node("Add", &["x", "y"], &["z"], vec![])],
            vec![],
            &["z2"],
        );
        g.inputs = vec![
            Value::new("x", DType::F32, vec![Dim::sym("a"), Dim::Fixed(3)]),
            Value::new("y", DType::F32, vec![Dim::sym("b"), Dim::Fixed(3)]),
        ];
        assert_eq!(infer_shapes(&mut g), 0);
    }
}
