//! Fusion of the decomposed layer normalization (what ferry emits below opset 17, and what
//! `torch.onnx.export` emits below opset 17) into one `LayerNormalization` node.

use ferry_ir::{Attr, Graph, Node};

use crate::fuse::{
    Claimed, Index, Rewrite, apply, both_orders, fused_name, input_at, int_vector, is_binary,
    node_names, scalar_value,
};

/// Whether `n` is `ReduceMean` over the last axis only, keeping dims, with the axes as an
/// attribute (opset < 18) or as a constant second input (opset ≥ 18).
pub(crate) fn is_last_axis_mean(ix: &Index<'_>, n: &Node) -> bool {
    if n.op_type != "ReduceMean" || !crate::fuse::is_onnx_domain(n) || n.outputs.len() != 1 {
        return false;
    }
    let keep = matches!(n.attr("keepdims"), None | Some(Attr::Int(1)));
    let extra = n
        .attrs
        .keys()
        .any(|k| !["axes", "keepdims"].contains(&k.as_str()));
    let axes = match (n.inputs.len(), n.attr("axes")) {
        (1, Some(Attr::Ints(a))) => Some(a.clone()),
        (2, None) => int_vector(ix, input_at(n, 1)),
        _ => None,
    };
    let last = |a: &[i64]| match a {
        [-1] => true,
        [k] => ix
            .shapes
            .get(input_at(n, 0))
            .is_some_and(|s| s.len().checked_sub(1) == usize::try_from(*k).ok()),
        _ => false,
    };
    keep && !extra && axes.is_some_and(|a| last(&a))
}

/// A float32 initializer holding exactly one value (rank 0, or rank 1 of length 1).
fn single_value(ix: &Index<'_>, value: &str) -> Option<f32> {
    if let Some(v) = scalar_value(ix, value) {
        return Some(v);
    }
    let i = ix.inits.get(value)?;
    if i.dtype != ferry_ir::DType::F32 || i.dims != [1] {
        return None;
    }
    match i.data.to_f32_vec().ok()?.as_slice() {
        [v] => Some(*v),
        _ => None,
    }
}

/// A matched decomposed layer normalization.
struct LayerNormMatch {
    x: String,
    gamma: String,
    beta: String,
    epsilon: f32,
    removed: Vec<usize>,
}

/// Matches `Add(Mul(Div(Sub(x, ReduceMean(x)), Sqrt(Add(ReduceMean(Pow(Sub(..), 2)), eps))),
/// gamma), beta)` ending in the Add `out`.
fn match_layer_norm(ix: &Index<'_>, out: &Node) -> Option<LayerNormMatch> {
    if !is_binary(out, "Add") {
        return None;
    }
    both_orders(out).into_iter().find_map(|(scaled, beta)| {
        let h = ix.inits.get(beta)?.dims.first().copied()?;
        if !ix.is_vector(beta, h) || !ix.single_use(scaled) {
            return None;
        }
        let (mi, mul) = ix
            .producer(scaled, "Mul")
            .filter(|(_, n)| is_binary(n, "Mul"))?;
        let (normed, gamma) = both_orders(mul)
            .into_iter()
            .find(|&(_, g)| ix.is_vector(g, h))?;
        if !ix.single_use(normed) {
            return None;
        }
        let (di, div) = ix
            .producer(normed, "Div")
            .filter(|(_, n)| is_binary(n, "Div"))?;
        let (centered, std) = (input_at(div, 0), input_at(div, 1));
        // The centered value is read by the Pow and the Div only.
        if ix.consumers.get(centered) != Some(&2)
            || ix.graph_outputs.contains(centered)
            || !ix.single_use(std)
        {
            return None;
        }
        let (si, sqrt) = ix.producer(std, "Sqrt")?;
        if sqrt.inputs.len() != 1 || sqrt.outputs.len() != 1 || !ix.single_use(input_at(sqrt, 0)) {
            return None;
        }
        let (ei, add_eps) = ix
            .producer(input_at(sqrt, 0), "Add")
            .filter(|(_, n)| is_binary(n, "Add"))?;
        let (var, epsilon) = both_orders(add_eps)
            .into_iter()
            .find_map(|(v, e)| Some((v, single_value(ix, e)?)))?;
        if !epsilon.is_finite() || epsilon < 0.0 || !ix.single_use(var) {
            return None;
        }
        let (vi, var_mean) = ix.producer(var, "ReduceMean")?;
        if !is_last_axis_mean(ix, var_mean) || !ix.single_use(input_at(var_mean, 0)) {
            return None;
        }
        let (pi, pow) = ix
            .producer(input_at(var_mean, 0), "Pow")
            .filter(|(_, n)| is_binary(n, "Pow"))?;
        if input_at(pow, 0) != centered || single_value(ix, input_at(pow, 1)) != Some(2.0) {
            return None;
        }
        let (ci, sub) = ix
            .producer(centered, "Sub")
            .filter(|(_, n)| is_binary(n, "Sub"))?;
        let (x, mean) = (input_at(sub, 0), input_at(sub, 1));
        if !ix.single_use(mean) {
            return None;
        }
        let (ri, mean_node) = ix.producer(mean, "ReduceMean")?;
        if !is_last_axis_mean(ix, mean_node) || input_at(mean_node, 0) != x {
            return None;
        }
        // A known last dimension other than the hidden size would broadcast differently.
        if ix.last_dim(x).is_some_and(|d| d != h) {
            return None;
        }
        Some(LayerNormMatch {
            x: x.to_string(),
            gamma: gamma.to_string(),
            beta: beta.to_string(),
            epsilon,
            removed: vec![mi, di, si, ei, vi, pi, ci, ri],
        })
    })
}

/// Fuses the decomposed layer normalization over the last axis,
/// `Add(Mul(Div(Sub(x, ReduceMean(x)), Sqrt(Add(ReduceMean(Pow(Sub(x, ReduceMean(x)), 2)),
/// eps))), gamma), beta)` (ReduceMeans over axis −1 keeping dims, axes as attribute or
/// constant input; `eps` and the exponent float32 single-value initializers; gamma and beta
/// 1-D float32 initializers of the same length; Add and Mul in either operand order; every
/// intermediate read only inside the pattern), into the default-domain
/// `LayerNormalization(x, gamma, beta)` with `axis` −1 and the matched `epsilon`. This is
/// emitted at every opset: ONNX defines it from opset 17, and ONNX Runtime also accepts it
/// in the default domain at lower opsets (its contrib kernel), so the SkipLayerNormalization
/// and EmbedLayerNormalization fusions can follow. Returns how many were fused.
pub fn fuse_layer_norm(graph: &mut Graph) -> usize {
    let ix = Index::new(graph);
    let mut names = node_names(graph);
    let mut taken = Claimed::default();
    let mut rewrites = Vec::new();
    for (i, out) in graph.nodes.iter().enumerate() {
        let Some(m) = match_layer_norm(&ix, out) else {
            continue;
        };
        if !taken.claim(i, &m.removed) {
            continue;
        }
        let name = fused_name(&mut names, &out.name, "LayerNormalization");
        let node = Node {
            name,
            op_type: "LayerNormalization".to_string(),
            domain: String::new(),
            inputs: vec![m.x, m.gamma, m.beta],
            outputs: out.outputs.clone(),
            attrs: [
                ("axis".to_string(), Attr::Int(-1)),
                ("epsilon".to_string(), Attr::Float(m.epsilon)),
            ]
            .into_iter()
            .collect(),
        };
        rewrites.push(Rewrite {
            anchor: i,
            node,
            removed: m.removed,
        });
    }
    apply(graph, rewrites)
}

#[cfg(test)]
mod tests {
    use ferry_ir::{Attr, Dim, Value};

    use super::*;
    use crate::test_util::{graph, init, node};

    fn ln_graph(x_shape: Vec<Dim>, eps: f32, exponent: f32) -> Graph {
        let mean = |x: &str, y: &str| {
            node(
                "ReduceMean",
                &[x],
                &[y],
                vec![("axes", Attr::Ints(vec![-1])), ("keepdims", Attr::Int(1))],
            )
        };
        let mut g = graph(
            vec![
                mean("x", "m"),
                node("Sub", &["x", "m"], &["c"], vec![]),
                node("Pow", &["c", "two"], &["p"], vec![]),
                mean("p", "v"),
                node("Add", &["v", "eps"], &["ve"], vec![]),
                node("Sqrt", &["ve"], &["s"], vec![]),
                node("Div", &["c", "s"], &["n"], vec![]),
                node("Mul", &["gamma", "n"], &["ng"], vec![]),
                node("Add", &["ng", "beta"], &["y"], vec![]),
            ],
            vec![
                init("two", vec![], &[exponent]),
                init("eps", vec![], &[eps]),
                init("gamma", vec![3], &[1., 2., 3.]),
                init("beta", vec![3], &[0., 0.5, 1.]),
            ],
            &["y"],
        );
        g.inputs = vec![Value::new("x", ferry_ir::DType::F32, x_shape)];
        g
    }

    fn bsh(h: i64) -> Vec<Dim> {
        vec![Dim::Sym("b".into()), Dim::Sym("s".into()), Dim::Fixed(h)]
    }

    #[test]
    fn decomposed_layer_norm_fuses() {
        let mut g = ln_graph(bsh(3), 1e-12, 2.0);
        assert_eq!(fuse_layer_norm(&mut g), 1);
        assert_eq!(g.nodes.len(), 1);
        let n = &g.nodes[0];
        assert_eq!(n.op_type, "LayerNormalization");
        assert_eq!(n.domain, "");
        assert_eq!(n.inputs, ["x", "gamma", "beta"]);
        assert_eq!(n.outputs, ["y"]);
        assert!(matches!(n.attr("epsilon"), Some(Attr::Float(e)) if *e == 1e-12));
        assert!(matches!(n.attr("axis"), Some(Attr::Int(-1))));
    }

    #[test]
    fn reduce_mean_axes_as_input_fuse() {
        let mut g = ln_graph(bsh(3), 1e-5, 2.0);
        for n in g.nodes.iter_mut().filter(|n| n.op_type == "ReduceMean") {
            n.attrs.remove("axes");
            n.inputs.push("axes".into());
        }
        g.initializers.push(ferry_ir::Initializer {
            name: "axes".into(),
            dtype: ferry_ir::DType::I64,
            dims: vec![1],
            data: ferry_ir::TensorData::from_i64(&[-1]),
        });
        assert_eq!(fuse_layer_norm(&mut g), 1);
        assert_eq!(g.nodes.len(), 1);
    }

    #[test]
    fn inexact_layer_norm_patterns_stay() {
        // Wrong exponent, wrong hidden size, a centered value read elsewhere, and a
        // reduction over another axis.
        let mut g = ln_graph(bsh(3), 1e-5, 3.0);
        assert_eq!(fuse_layer_norm(&mut g), 0);
        let mut g = ln_graph(bsh(4), 1e-5, 2.0);
        assert_eq!(fuse_layer_norm(&mut g), 0);
        let mut g = ln_graph(bsh(3), 1e-5, 2.0);
        g.outputs
            .push(Value::new("c", ferry_ir::DType::F32, vec![]));
        assert_eq!(fuse_layer_norm(&mut g), 0);
        let mut g = ln_graph(bsh(3), 1e-5, 2.0);
        g.nodes[0].attrs.insert("axes".into(), Attr::Ints(vec![1]));
        assert_eq!(fuse_layer_norm(&mut g), 0);
        assert_eq!(g.nodes.len(), 9);
    }
}
