//! Slice bounds computed from shapes (optimum's `x[..., : x.shape[-1] // 2]`:
//! `Unsqueeze(Cast(Div(Gather(Shape(x), 3), 2)))`) → constants, when the dims they read are
//! fixed in the inferred shapes, so the rotary patterns see the same constant bounds as in
//! ferry's exports.

use std::collections::HashSet;

use ferry_ir::{Attr, DType, Graph, Initializer, TensorData};

use crate::fuse::{Index, input_at, is_onnx_domain, unique_name, value_names};
use crate::pattern::{i64_values, rank0_i64};

/// How deep [`known_ints`] follows producers, and how many values one call may visit.
const DEPTH: usize = 12;
const VISITS: usize = 256;

/// The int64 contents of `v` as far as they are known, each element a value or `None` for
/// an unknown dim (never negative): initializers, `Shape` of a value with inferred dims
/// (symbolic ones unknown), a `Gather` (axis 0) of any `Shape` (unknown when the shape is),
/// `Unsqueeze`, `Squeeze`, `Cast` to int32/int64, `Concat`, `Reshape(·, [-1])`,
/// `ConstantOfShape` of a known length, `Add`/`Mul`/`Div`/`Sub`/`Equal` where the result is
/// certain, and `Where` of a known condition (torch's `expand(…, -1, …)` idiom). `None` when
/// `v` is not such a value.
pub(crate) fn known_ints(ix: &Index<'_>, v: &str) -> Option<Vec<Option<i64>>> {
    known(ix, v, DEPTH, &mut VISITS.clone())
}

fn known(ix: &Index<'_>, v: &str, depth: usize, visits: &mut usize) -> Option<Vec<Option<i64>>> {
    *visits = visits.checked_sub(1)?;
    if let Some(i) = ix.inits.get(v) {
        let vals = i64_values(i).or_else(|| rank0_i64(i).map(|x| vec![x]))?;
        return Some(vals.into_iter().map(Some).collect());
    }
    let depth = depth.checked_sub(1)?;
    let n = &ix.graph.nodes[*ix.producer.get(v)?];
    if !is_onnx_domain(n) || n.outputs.len() != 1 {
        return None;
    }
    let arg = |k: usize, visits: &mut usize| known(ix, input_at(n, k), depth, visits);
    match n.op_type.as_str() {
        "Shape" if n.attrs.is_empty() && n.inputs.len() == 1 => {
            let x = input_at(n, 0);
            if let Some(s) = ix.shapes.get(x) {
                return Some(s.iter().map(|d| d.fixed()).collect());
            }
            // The length of a known 1-D vector (a Concat, or flattened by Reshape(·, [-1])).
            let p = &ix.graph.nodes[*ix.producer.get(x)?];
            let one_d = p.op_type == "Concat"
                || (p.op_type == "Reshape"
                    && known(ix, input_at(p, 1), depth, visits).is_some_and(|t| t == [Some(-1)]));
            one_d
                .then(|| known(ix, x, depth, visits).map(|v| vec![Some(v.len() as i64)]))
                .flatten()
        }
        "Gather" if matches!(n.attr("axis"), None | Some(Attr::Int(0))) => {
            let shape_of_unknown = ix
                .producer
                .get(input_at(n, 0))
                .is_some_and(|&p| ix.graph.nodes[p].op_type == "Shape");
            let Some(data) = arg(0, visits) else {
                // Dims of a value whose shape is not inferred: unknown, never negative.
                return shape_of_unknown
                    .then(|| arg(1, visits).map(|k| vec![None; k.len()]))
                    .flatten();
            };
            let len = data.len() as i64;
            arg(1, visits)?
                .into_iter()
                .map(|k| {
                    let k = k?;
                    let k = if k < 0 { k + len } else { k };
                    (0..len).contains(&k).then(|| data[k as usize])
                })
                .collect()
        }
        "Unsqueeze" | "Squeeze" | "Identity" => arg(0, visits),
        "Cast" if matches!(n.attr("to"), Some(Attr::Int(6 | 7))) => arg(0, visits),
        "Concat" if matches!(n.attr("axis"), Some(Attr::Int(0 | -1))) => {
            let mut out = Vec::new();
            for k in 0..n.inputs.len() {
                out.extend(arg(k, visits)?);
            }
            Some(out)
        }
        "Reshape" if arg(1, visits).is_some_and(|t| t == [Some(-1)]) => arg(0, visits),
        "ConstantOfShape" => {
            let len = match arg(0, visits)?.as_slice() {
                [Some(l)] if (0..=64).contains(l) => *l as usize,
                _ => return None,
            };
            let value = match n.attr("value") {
                Some(Attr::Tensor(t)) => i64_values(t).or_else(|| rank0_i64(t).map(|x| vec![x]))?,
                _ => return None,
            };
            match value.as_slice() {
                [v] => Some(vec![Some(*v); len]),
                _ => None,
            }
        }
        "Add" | "Sub" | "Mul" | "Div" | "Equal" => {
            let (a, b) = (arg(0, visits)?, arg(1, visits)?);
            let op = n.op_type.as_str();
            elementwise(&[&a, &b], |e| {
                Some(match (op, e[0], e[1]) {
                    (_, Some(x), Some(y)) => Some(match op {
                        "Add" => x.checked_add(y)?,
                        "Sub" => x.checked_sub(y)?,
                        "Mul" => x.checked_mul(y)?,
                        // Division only of non-negative values (truncation and floor agree).
                        "Div" => (x >= 0 && y > 0).then(|| x / y)?,
                        _ => i64::from(x == y),
                    }),
                    // An unknown dim is never negative.
                    ("Equal", None, Some(k)) | ("Equal", Some(k), None) if k < 0 => Some(0),
                    ("Add" | "Mul", None, Some(k)) | ("Add" | "Mul", Some(k), None) if k >= 0 => {
                        None
                    }
                    ("Add" | "Mul", None, None) => None,
                    ("Div", None, Some(k)) if k > 0 => None,
                    _ => return None,
                })
            })
        }
        "Where" => {
            let (c, a, b) = (arg(0, visits)?, arg(1, visits)?, arg(2, visits)?);
            elementwise(&[&c, &a, &b], |e| match e[0]? {
                0 => Some(e[2]),
                _ => Some(e[1]),
            })
        }
        _ => None,
    }
}

/// `f` over the elements of `args` (each of one length, or 1 broadcast); `None` when the
/// lengths differ or `f` fails on one element.
fn elementwise(
    args: &[&Vec<Option<i64>>],
    f: impl Fn(&[Option<i64>]) -> Option<Option<i64>>,
) -> Option<Vec<Option<i64>>> {
    let len = args.iter().map(|a| a.len()).max()?;
    if args.iter().any(|a| a.len() != len && a.len() != 1) {
        return None;
    }
    (0..len)
        .map(|i| {
            let e: Vec<Option<i64>> = args
                .iter()
                .map(|a| if a.len() == 1 { a[0] } else { a[i] })
                .collect();
            f(&e)
        })
        .collect()
}

/// Replaces the `starts`/`ends`/`axes`/`steps` inputs of `Slice` nodes that are computed
/// from fixed dims ([`known_ints`], every element known) by int64 initializers, then removes
/// the nodes that computed them when nothing else reads them. Returns how many inputs
/// were replaced.
pub(crate) fn fold_slice_bounds(graph: &mut Graph) -> usize {
    let ix = Index::new(graph);
    let mut replace = Vec::new();
    for (i, n) in graph.nodes.iter().enumerate() {
        if n.op_type != "Slice" || !is_onnx_domain(n) {
            continue;
        }
        for k in 1..n.inputs.len().min(5) {
            let v = input_at(n, k);
            if v.is_empty() || ix.inits.contains_key(v) || !ix.producer.contains_key(v) {
                continue;
            }
            let Some(vals) =
                known_ints(&ix, v).and_then(|x| x.into_iter().collect::<Option<Vec<i64>>>())
            else {
                continue;
            };
            // Slice takes 1-D bounds; a rank-0 result is not a valid one.
            let one_d = ix.shapes.get(v).is_none_or(|s| s.len() == 1);
            if one_d {
                replace.push((i, k, v.to_string(), vals));
            }
        }
    }
    if replace.is_empty() {
        return 0;
    }
    let mut values = value_names(graph);
    let mut dropped = Vec::new();
    for (i, k, old, vals) in &replace {
        let name = unique_name(&mut values, format!("{old}_folded"));
        graph.initializers.push(Initializer {
            name: name.clone(),
            dtype: DType::I64,
            dims: vec![vals.len() as i64],
            data: TensorData::from_i64(vals),
        });
        graph.nodes[*i].inputs[*k] = name;
        dropped.push(old.clone());
    }
    remove_unread(graph, dropped);
    replace.len()
}

/// Removes the producers of `values` no node reads any more (and not graph outputs), and
/// then theirs, transitively.
fn remove_unread(graph: &mut Graph, mut values: Vec<String>) {
    let outputs: HashSet<String> = graph.outputs.iter().map(|v| v.name.clone()).collect();
    while let Some(v) = values.pop() {
        let read = graph.nodes.iter().any(|n| n.inputs.contains(&v));
        if read || outputs.contains(&v) {
            continue;
        }
        let Some(p) = graph.nodes.iter().position(|n| n.outputs.contains(&v)) else {
            continue;
        };
        let n = &graph.nodes[p];
        let unread = n.outputs.iter().all(|o| {
            o.is_empty()
                || (!outputs.contains(o) && !graph.nodes.iter().any(|m| m.inputs.contains(o)))
        });
        if unread {
            let n = graph.nodes.remove(p);
            graph.value_info.retain(|x| !n.outputs.contains(&x.name));
            values.extend(n.inputs.into_iter().filter(|s| !s.is_empty()));
        }
    }
}

#[cfg(test)]
mod tests {
    use ferry_ir::{Dim, Value};

    use super::*;
    use crate::test_util::{graph, node};

    fn ints(name: &str, dims: Vec<i64>, v: &[i64]) -> Initializer {
        Initializer {
            name: name.into(),
            dtype: DType::I64,
            dims,
            data: TensorData::from_i64(v),
        }
    }

    /// `x[..., : x.shape[3] // 2]` as optimum writes it, with `x` `[b, 2, s, 8]`; and
    /// torch's `expand(b, -1, b)` shape `Where(Equal(r, -1), 1, r)` over a value `y` of
    /// unknown (not inferred) shape.
    fn shape_graph() -> Graph {
        let mut g = graph(
            vec![
                node("Shape", &["x"], &["sh"], vec![]),
                node("Gather", &["sh", "three"], &["d"], vec![]),
                node("Div", &["d", "two"], &["h"], vec![]),
                node("Cast", &["h"], &["hc"], vec![("to", Attr::Int(7))]),
                node("Unsqueeze", &["hc", "ax0"], &["hv"], vec![]),
                node("Slice", &["x", "zero", "hv", "last"], &["lo"], vec![]),
                node("Relu", &["x"], &["y"], vec![]),
                node("Shape", &["y"], &["ysh"], vec![]),
                node("Gather", &["ysh", "zero0"], &["b"], vec![]),
                node("Unsqueeze", &["b", "ax0"], &["bv"], vec![]),
                node(
                    "Concat",
                    &["bv", "minus1", "bv"],
                    &["r0"],
                    vec![("axis", Attr::Int(0))],
                ),
                node("Reshape", &["r0", "minus1"], &["r"], vec![]),
                node("Shape", &["r"], &["rsh"], vec![]),
                node(
                    "ConstantOfShape",
                    &["rsh"],
                    &["ones"],
                    vec![("value", Attr::Tensor(Box::new(ints("v", vec![1], &[1]))))],
                ),
                node("Mul", &["ones", "minus1"], &["neg"], vec![]),
                node("Equal", &["r", "neg"], &["eq"], vec![]),
                node("Where", &["eq", "ones", "r"], &["target"], vec![]),
            ],
            vec![
                ints("three", vec![], &[3]),
                ints("two", vec![], &[2]),
                ints("zero0", vec![], &[0]),
                ints("ax0", vec![1], &[0]),
                ints("zero", vec![1], &[0]),
                ints("last", vec![1], &[-1]),
                ints("minus1", vec![1], &[-1]),
            ],
            &["lo", "target"],
        );
        let (b, s) = (Dim::sym("b"), Dim::sym("s"));
        g.inputs = vec![Value::new(
            "x",
            DType::F32,
            vec![b, Dim::Fixed(2), s, Dim::Fixed(8)],
        )];
        g
    }

    #[test]
    fn shape_arithmetic_is_known_where_certain() {
        let g = shape_graph();
        let ix = Index::new(&g);
        assert_eq!(known_ints(&ix, "hv"), Some(vec![Some(4)]));
        // Batch unknown (never negative, so not -1), the -1 replaced by 1.
        assert_eq!(known_ints(&ix, "target"), Some(vec![None, Some(1), None]));
        // A symbolic dim of x.
        assert_eq!(
            known_ints(&ix, "sh"),
            Some(vec![None, Some(2), None, Some(8)])
        );
        assert_eq!(known_ints(&ix, "x"), None);
    }

    #[test]
    fn slice_bounds_from_fixed_dims_become_constants() {
        let mut g = shape_graph();
        assert_eq!(fold_slice_bounds(&mut g), 1);
        let slice = g
            .nodes
            .iter()
            .find(|n| n.op_type == "Slice")
            .expect("slice");
        let end = g
            .initializers
            .iter()
            .find(|i| i.name == slice.inputs[2])
            .expect("folded");
        assert_eq!(crate::pattern::i64_values(end), Some(vec![4]));
        // The Shape/Gather/Div/Cast/Unsqueeze chain is gone; the rest stays.
        assert!(
            !g.nodes
                .iter()
                .any(|n| n.inputs == ["x"] && n.op_type == "Shape")
        );
        assert_eq!(g.nodes.len(), 12);
        // A bound from a symbolic dim stays.
        let mut g = shape_graph();
        g.initializers[0] = ints("three", vec![], &[2]);
        assert_eq!(fold_slice_bounds(&mut g), 0);
    }
}
