//! `Identity` nodes over initializers (what `torch.onnx.export` emits for deduplicated
//! parameters) bypassed, so the fusions see those parameters as initializers.

use std::collections::{HashMap, HashSet};

use ferry_ir::Graph;

/// Replaces every read of `Identity(init)`'s output by `init` itself and drops the Identity,
/// where `init` is an initializer that is not also a graph input and the output is not a
/// graph output. Returns how many Identity nodes were bypassed.
pub fn bypass_identities(graph: &mut Graph) -> usize {
    let graph_inputs: HashSet<&str> = graph.inputs.iter().map(|v| v.name.as_str()).collect();
    let graph_outputs: HashSet<&str> = graph.outputs.iter().map(|v| v.name.as_str()).collect();
    let inits: HashSet<&str> = graph
        .initializers
        .iter()
        .map(|i| i.name.as_str())
        .filter(|n| !graph_inputs.contains(n))
        .collect();
    let mut alias: HashMap<String, String> = HashMap::new();
    let mut drop: HashSet<usize> = HashSet::new();
    for (i, n) in graph.nodes.iter().enumerate() {
        if n.op_type == "Identity"
            && (n.domain.is_empty() || n.domain == "ai.onnx")
            && n.inputs.len() == 1
            && n.outputs.len() == 1
            && n.attrs.is_empty()
            && inits.contains(n.inputs[0].as_str())
            && !graph_outputs.contains(n.outputs[0].as_str())
        {
            alias.insert(n.outputs[0].clone(), n.inputs[0].clone());
            drop.insert(i);
        }
    }
    if alias.is_empty() {
        return 0;
    }
    let old = std::mem::take(&mut graph.nodes);
    for (i, mut n) in old.into_iter().enumerate() {
        if drop.contains(&i) {
            continue;
        }
        for input in &mut n.inputs {
            if let Some(to) = alias.get(input) {
                *input = to.clone();
            }
        }
        graph.nodes.push(n);
    }
    graph.value_info.retain(|v| !alias.contains_key(&v.name));
    drop.len()
}

#[cfg(test)]
mod tests {
    use ferry_ir::{DType, Value};

    use super::*;
    use crate::test_util::{graph, init, node};

    #[test]
    fn identities_of_initializers_are_bypassed() {
        let mut g = graph(
            vec![
                node("Identity", &["b"], &["b2"], vec![]),
                node("Identity", &["x"], &["x2"], vec![]),
                node("Identity", &["b"], &["out"], vec![]),
                node("Add", &["x2", "b2"], &["y"], vec![]),
            ],
            vec![init("b", vec![1], &[1.0])],
            &["y", "out"],
        );
        assert_eq!(bypass_identities(&mut g), 1);
        let ops: Vec<&str> = g.nodes.iter().map(|n| n.op_type.as_str()).collect();
        // Identity of a graph input, and one producing a graph output, stay.
        assert_eq!(ops, ["Identity", "Identity", "Add"]);
        assert_eq!(g.nodes[2].inputs, ["x2", "b"]);
        // An initializer that is also a graph input (overridable) is not a constant.
        let mut g = graph(
            vec![node("Identity", &["b"], &["b2"], vec![])],
            vec![init("b", vec![1], &[1.0])],
            &["b2x"],
        );
        g.inputs.push(Value::new("b", DType::F32, vec![]));
        assert_eq!(bypass_identities(&mut g), 0);
    }
}
