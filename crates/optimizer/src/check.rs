//! Structural checks [`crate::optimize`] runs before any pass: a default-domain node of a
//! known op must have the inputs, outputs and attributes the ONNX spec gives it at the
//! graph's opset (a `Mul` with one input is rejected; an opset-9 `Slice` with `starts` and
//! `ends` attributes is fine). The passes themselves never index past a node's operands, so
//! this only turns a malformed model into a typed error instead of a silently skipped node.

use ferry_ir::{Attr, Graph, Node};

use crate::OptimizeError;
use crate::fuse::is_onnx_domain;

/// How many inputs (the first `min` required, i.e. not empty names) and outputs an op
/// takes, and the attributes it requires.
struct Arity {
    min: usize,
    max: usize,
    outputs: (usize, usize),
    required_attrs: &'static [&'static str],
}

const fn arity(min: usize, max: usize) -> Arity {
    Arity {
        min,
        max,
        outputs: (1, 1),
        required_attrs: &[],
    }
}

/// The arity of default-domain `op` at `opset` (`None`: no default opset imported, so the
/// union of every version's), or `None` for ops not checked.
fn spec(op: &str, opset: Option<i64>) -> Option<Arity> {
    // `new` applies from opset `since` on, `old` before it.
    let by = |since: i64, old: Arity, new: Arity| match opset {
        Some(v) if v < since => old,
        Some(_) => new,
        None => Arity {
            min: old.min.min(new.min),
            max: old.max.max(new.max),
            outputs: old.outputs,
            required_attrs: &[],
        },
    };
    Some(match op {
        "Relu" | "Tanh" | "Erf" | "Sqrt" | "Neg" | "Exp" | "Log" | "Abs" | "Not" | "Sigmoid"
        | "Reciprocal" | "Softmax" | "Shape" | "Transpose" | "Flatten" | "ConstantOfShape"
        | "Identity" => arity(1, 1),
        "Cast" => Arity {
            required_attrs: &["to"],
            ..arity(1, 1)
        },
        "Add" | "Sub" | "Mul" | "Div" | "Pow" | "And" | "Or" | "Xor" | "Equal" | "Greater"
        | "GreaterOrEqual" | "Less" | "LessOrEqual" | "MatMul" | "Expand" | "Gather" => arity(2, 2),
        "Where" | "Range" => arity(3, 3),
        "Gemm" => arity(2, 3),
        "Concat" => arity(1, usize::MAX),
        "Constant" => arity(0, 0),
        "Slice" => by(
            10,
            Arity {
                required_attrs: &["starts", "ends"],
                ..arity(1, 1)
            },
            arity(3, 5),
        ),
        "Unsqueeze" => by(
            13,
            Arity {
                required_attrs: &["axes"],
                ..arity(1, 1)
            },
            arity(2, 2),
        ),
        "Squeeze" => by(13, arity(1, 1), arity(1, 2)),
        "ReduceMean" => by(18, arity(1, 1), arity(1, 2)),
        "Reshape" => by(5, arity(1, 1), arity(2, 2)),
        "LayerNormalization" => Arity {
            outputs: (1, 3),
            ..arity(2, 3)
        },
        "Dropout" => Arity {
            outputs: (1, 2),
            ..arity(1, 3)
        },
        _ => return None,
    })
}

/// Checks every default-domain node of an op in the table above against its arity at the
/// graph's opset: input count, required inputs present (non-empty names), output count
/// (no empty first output) and required attributes. Other ops and domains pass unchecked.
pub fn check_nodes(graph: &Graph) -> Result<(), OptimizeError> {
    let opset = graph.onnx_opset();
    for n in graph.nodes.iter().filter(|n| is_onnx_domain(n)) {
        let Some(a) = spec(&n.op_type, opset) else {
            continue;
        };
        check_node(n, &a, opset)?;
    }
    Ok(())
}

fn check_node(n: &Node, a: &Arity, opset: Option<i64>) -> Result<(), OptimizeError> {
    let bad = |reason: String| OptimizeError::BadNode {
        node: n.name.clone(),
        op_type: n.op_type.clone(),
        reason,
    };
    let at = opset.map_or(String::new(), |v| format!(" at opset {v}"));
    let count = |k: usize, what: &str| format!("{k} {what}{}", if k == 1 { "" } else { "s" });
    let ins = n.inputs.len();
    if ins < a.min || ins > a.max {
        let want = match (a.min, a.max) {
            (lo, hi) if lo == hi => count(lo, "input"),
            (lo, usize::MAX) => format!("at least {}", count(lo, "input")),
            (lo, hi) => format!("{lo} to {hi} inputs"),
        };
        return Err(bad(format!(
            "has {}, needs {want}{at}",
            count(ins, "input")
        )));
    }
    if let Some(k) = n.inputs.iter().take(a.min).position(String::is_empty) {
        return Err(bad(format!("required input {k} is missing")));
    }
    let (lo, hi) = a.outputs;
    let outs = n.outputs.len();
    if outs < lo || outs > hi || n.outputs.first().is_some_and(String::is_empty) {
        let want = if lo == hi {
            count(lo, "output")
        } else {
            format!("{lo} to {hi} outputs")
        };
        return Err(bad(format!("has {}, needs {want}", count(outs, "output"))));
    }
    for name in a.required_attrs {
        if n.attr(name).is_none() {
            return Err(bad(format!("attribute `{name}` is missing{at}")));
        }
    }
    if n.op_type == "Cast"
        && let Some(attr) = n.attr("to").filter(|t| !matches!(t, Attr::Int(_)))
    {
        return Err(bad(format!("attribute `to` is {attr:?}, not an int")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{graph, node};

    fn at(opset: i64, n: ferry_ir::Node) -> Result<(), OptimizeError> {
        let mut g = graph(vec![n], vec![], &["y"]);
        g.opsets[0].version = opset;
        check_nodes(&g)
    }

    #[test]
    fn arity_follows_the_opset() {
        let slice_attrs = || {
            vec![
                ("starts", Attr::Ints(vec![0])),
                ("ends", Attr::Ints(vec![1])),
            ]
        };
        assert!(at(9, node("Slice", &["x"], &["y"], slice_attrs())).is_ok());
        let e = at(9, node("Slice", &["x"], &["y"], vec![])).expect_err("no starts");
        assert_eq!(
            e.to_string(),
            "node `/Slice_y` (Slice): attribute `starts` is missing at opset 9"
        );
        let e = at(13, node("Slice", &["x"], &["y"], slice_attrs())).expect_err("opset 13");
        assert_eq!(
            e.to_string(),
            "node `/Slice_y` (Slice): has 1 input, needs 3 to 5 inputs at opset 13"
        );
        assert!(
            at(
                13,
                node("Slice", &["x", "s", "e", "", "st"], &["y"], vec![])
            )
            .is_ok()
        );
        let e = at(17, node("Mul", &["x"], &["y"], vec![])).expect_err("one input");
        assert_eq!(
            e.to_string(),
            "node `/Mul_y` (Mul): has 1 input, needs 2 inputs at opset 17"
        );
        let e = at(17, node("Mul", &["x", ""], &["y"], vec![])).expect_err("empty");
        assert!(e.to_string().contains("required input 1 is missing"), "{e}");
        let e = at(17, node("Add", &["x", "x"], &[], vec![])).expect_err("no output");
        assert!(
            e.to_string().contains("has 0 outputs, needs 1 output"),
            "{e}"
        );
        assert!(at(17, node("NoSuchOp", &[], &[], vec![])).is_ok());
        let mut ms = node("Mul", &["x"], &["y"], vec![]);
        ms.domain = crate::MS_DOMAIN.into();
        assert!(at(17, ms).is_ok(), "other domains are not checked");
    }
}
