//! Clean-ups: nodes and initializers nothing needs.

use std::collections::HashSet;

use ferry_ir::Graph;

/// Removes nodes none of whose outputs reaches a graph output (directly or through other
/// nodes), and the `value_info` of the values they produced. Returns how many were removed.
/// Values an `If` branch reads from the graph count as read by the `If`.
///
/// Relies on the nodes being in topological order, as in every ONNX graph.
pub fn remove_dead_nodes(graph: &mut Graph) -> usize {
    let mut live: HashSet<String> = graph.outputs.iter().map(|v| v.name.clone()).collect();
    let mut keep = vec![false; graph.nodes.len()];
    for (i, n) in graph.nodes.iter().enumerate().rev() {
        if n.outputs.iter().any(|o| !o.is_empty() && live.contains(o)) {
            keep[i] = true;
            // An `If` also keeps alive every outer value its branches read.
            live.extend(n.reads());
        }
    }
    let before = graph.nodes.len();
    let mut keep = keep.into_iter();
    graph.nodes.retain(|_| keep.next().unwrap_or(true));
    let removed = before - graph.nodes.len();
    if removed > 0 {
        let produced: HashSet<&str> = graph
            .nodes
            .iter()
            .flat_map(|n| n.outputs.iter().map(String::as_str))
            .collect();
        graph
            .value_info
            .retain(|v| produced.contains(v.name.as_str()));
    }
    removed
}

/// Removes initializers that no node reads and that are not graph outputs. Returns how
/// many were removed.
pub fn remove_unused_initializers(graph: &mut Graph) -> usize {
    // Weights only an `If` branch reads count as used.
    let implicit: Vec<String> = graph
        .nodes
        .iter()
        .flat_map(|n| n.implicit_inputs())
        .collect();
    let used: HashSet<&str> = graph
        .nodes
        .iter()
        .flat_map(|n| n.inputs.iter().map(String::as_str))
        .chain(implicit.iter().map(String::as_str))
        .chain(graph.outputs.iter().map(|v| v.name.as_str()))
        .collect();
    let before = graph.initializers.len();
    let mut kept = Vec::with_capacity(before);
    for i in std::mem::take(&mut graph.initializers) {
        if used.contains(i.name.as_str()) {
            kept.push(i);
        }
    }
    graph.initializers = kept;
    before - graph.initializers.len()
}

#[cfg(test)]
mod tests {
    use ferry_ir::{DType, Value};

    use super::*;
    use crate::test_util::{graph, init, node};

    #[test]
    fn dead_chains_go_and_live_ones_stay() {
        let mut g = graph(
            vec![
                node("Relu", &["x"], &["a"], vec![]),
                node("Neg", &["a"], &["dead1"], vec![]),
                node("Abs", &["dead1"], &["dead2"], vec![]),
                // Two outputs, only the second reaches the graph output.
                node("Split", &["a"], &["s0", "s1"], vec![]),
                node("Add", &["s1", "w", ""], &["y"], vec![]),
            ],
            vec![init("w", vec![1], &[1.0])],
            &["y"],
        );
        g.value_info = vec![
            Value::new("a", DType::F32, vec![]),
            Value::new("dead2", DType::F32, vec![]),
        ];
        assert_eq!(remove_dead_nodes(&mut g), 2);
        let ops: Vec<&str> = g.nodes.iter().map(|n| n.op_type.as_str()).collect();
        assert_eq!(ops, ["Relu", "Split", "Add"]);
        assert_eq!(g.value_info.len(), 1);
        assert_eq!(g.value_info[0].name, "a");
        // A second run finds nothing.
        assert_eq!(remove_dead_nodes(&mut g), 0);
    }

    #[test]
    fn graph_output_that_is_an_input_keeps_nothing_else() {
        let mut g = graph(vec![node("Relu", &["x"], &["r"], vec![])], vec![], &["x"]);
        assert_eq!(remove_dead_nodes(&mut g), 1);
        assert!(g.nodes.is_empty());
    }

    #[test]
    fn unused_initializers_go() {
        let mut g = graph(
            vec![node("Add", &["x", "w"], &["y"], vec![])],
            vec![
                init("w", vec![1], &[1.0]),
                init("unused", vec![1], &[2.0]),
                init("out", vec![1], &[3.0]),
            ],
            &["y", "out"],
        );
        assert_eq!(remove_unused_initializers(&mut g), 1);
        let names: Vec<&str> = g.initializers.iter().map(|i| i.name.as_str()).collect();
        assert_eq!(names, ["w", "out"]);
        assert_eq!(remove_unused_initializers(&mut g), 0);
    }

    #[test]
    fn values_only_a_branch_reads_stay() {
        // y = If(cond) { then: Mul(a, w_then) } else { Identity(w_else) }; `a` comes from
        // an outer node only the then-branch reads.
        let branch = |n: ferry_ir::Node, out: &str| ferry_ir::Graph {
            name: out.into(),
            outputs: vec![Value::new(out, DType::F32, vec![])],
            nodes: vec![n],
            ..Default::default()
        };
        let mut iff = node("If", &["cond"], &["y"], vec![]);
        iff.attrs.insert(
            "then_branch".into(),
            ferry_ir::Attr::Graph(Box::new(branch(
                node("Mul", &["a", "w_then"], &["t"], vec![]),
                "t",
            ))),
        );
        iff.attrs.insert(
            "else_branch".into(),
            ferry_ir::Attr::Graph(Box::new(branch(
                node("Identity", &["w_else"], &["e"], vec![]),
                "e",
            ))),
        );
        let mut g = graph(
            vec![node("Relu", &["x"], &["a"], vec![]), iff],
            vec![
                init("w_then", vec![1], &[1.0]),
                init("w_else", vec![1], &[2.0]),
                init("unused", vec![1], &[3.0]),
            ],
            &["y"],
        );
        assert_eq!(remove_dead_nodes(&mut g), 0);
        assert_eq!(g.nodes.len(), 2);
        assert_eq!(remove_unused_initializers(&mut g), 1);
        let names: Vec<&str> = g.initializers.iter().map(|i| i.name.as_str()).collect();
        assert_eq!(names, ["w_then", "w_else"]);
    }
}
