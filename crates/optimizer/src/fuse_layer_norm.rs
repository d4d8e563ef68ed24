//! Fusion of the decomposed layer normalization (what ferry emits below opset 17, and what
//! `torch.onnx.export` emits below opset 17) into one `LayerNormalization` node.

use ferry_ir::{Attr, Graph, Node};

use crate::fuse::{Claimed, Index, Rewrite, apply, fused_name, input_at, int_vector, node_names};
use crate::pattern::{Pattern, init, is_f32_vector, op, single_f32, val};

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

/// A matched decomposed layer normalization.
struct LayerNormMatch {
    x: String,
    gamma: String,
    /// Empty for the form without beta.
    beta: String,
    epsilon: f32,
    removed: Vec<usize>,
}

/// `Add(Mul(Div(Sub(x, ReduceMean(x)), Sqrt(Add(ReduceMean(Pow(Sub(..), 2)), eps))),
/// gamma), beta)`, the centered value read by the Pow and the Div only; without the final
/// `Add` when `with_beta` is false (`nn.LayerNorm(…, bias=False)`).
fn layer_norm_pattern(with_beta: bool) -> Pattern {
    let mean = op("ReduceMean", vec![val("x")])
        .min_inputs()
        .check(is_last_axis_mean);
    let centered = op("Sub", vec![val("x"), mean.p()])
        .named("centered")
        .uses(Some(2));
    let two = init("two", |i| single_f32(i) == Some(2.0));
    let var = op(
        "ReduceMean",
        vec![op("Pow", vec![centered.clone().p(), two]).p()],
    )
    .min_inputs()
    .check(is_last_axis_mean);
    let eps = init("eps", |i| single_f32(i).is_some());
    let std = op(
        "Sqrt",
        vec![op("Add", vec![var.p(), eps]).commutative().p()],
    );
    let normed = op("Div", vec![centered.p(), std.p()]);
    let scaled = op("Mul", vec![normed.p(), init("gamma", is_f32_vector)]).commutative();
    if !with_beta {
        return Pattern::new(scaled);
    }
    Pattern::new(op("Add", vec![scaled.p(), init("beta", is_f32_vector)]).commutative())
}

/// Checks a [`layer_norm_pattern`] match at node `i`: gamma and beta (when matched) of one
/// length `h` (`x`'s last dimension when known) and a finite non-negative epsilon.
fn match_layer_norm(ix: &Index<'_>, pat: &Pattern, i: usize) -> Option<LayerNormMatch> {
    let m = pat.at(ix, i)?;
    let (x, gamma, beta) = (m.value("x"), m.value("gamma"), m.value("beta"));
    let h = ix.inits.get(gamma)?.dims[0];
    let epsilon = single_f32(ix.inits.get(m.value("eps"))?)?;
    // A known last dimension other than the hidden size would broadcast differently.
    let ok = (beta.is_empty() || ix.is_vector(beta, h))
        && ix.is_vector(gamma, h)
        && epsilon.is_finite()
        && epsilon >= 0.0
        && ix.last_dim(x).is_none_or(|d| d == h);
    ok.then(|| LayerNormMatch {
        x: x.to_string(),
        gamma: gamma.to_string(),
        beta: beta.to_string(),
        epsilon,
        removed: m.interior.clone(),
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
/// and EmbedLayerNormalization fusions can follow. Then, over what is left, the same
/// without the final beta `Add` (`nn.LayerNorm(…, bias=False)`, ModernBERT) becomes
/// `LayerNormalization(x, gamma)`; run second, it never splits a layer norm with beta.
/// Returns how many were fused.
pub fn fuse_layer_norm(graph: &mut Graph) -> usize {
    fuse_layer_norm_form(graph, true) + fuse_layer_norm_form(graph, false)
}

/// [`fuse_layer_norm`] of one form, with or without beta.
fn fuse_layer_norm_form(graph: &mut Graph, with_beta: bool) -> usize {
    let ix = Index::new(graph);
    let mut names = node_names(graph);
    let mut taken = Claimed::default();
    let mut rewrites = Vec::new();
    let pat = layer_norm_pattern(with_beta);
    for (i, out) in graph.nodes.iter().enumerate() {
        let Some(m) = match_layer_norm(&ix, &pat, i) else {
            continue;
        };
        if !taken.claim(i, &m.removed) {
            continue;
        }
        let name = fused_name(&mut names, &out.name, "LayerNormalization");
        let mut inputs = vec![m.x, m.gamma, m.beta];
        inputs.retain(|v| !v.is_empty());
        let node = Node {
            name,
            op_type: "LayerNormalization".to_string(),
            domain: String::new(),
            inputs,
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
    fn decomposed_layer_norm_without_beta_fuses() {
        let mut g = ln_graph(bsh(3), 1e-5, 2.0);
        g.nodes.pop();
        g.outputs[0].name = "ng".into();
        assert_eq!(fuse_layer_norm(&mut g), 1);
        assert_eq!(g.nodes.len(), 1);
        assert_eq!(g.nodes[0].inputs, ["x", "gamma"]);
        assert_eq!(g.nodes[0].outputs, ["ng"]);
        // With beta, the whole pattern is one node, never the beta-less one plus an Add.
        let mut g = ln_graph(bsh(3), 1e-5, 2.0);
        assert_eq!(fuse_layer_norm(&mut g), 1);
        assert_eq!(g.nodes[0].inputs, ["x", "gamma", "beta"]);
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
