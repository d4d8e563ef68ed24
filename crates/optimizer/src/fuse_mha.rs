//! Self-attention whose Q/K/V projections are not packable (weights that are not
//! constants, or [`fuse_attention`](crate::fuse_attention) disabled) fused into
//! `com.microsoft` `MultiHeadAttention` with separate query, key and value inputs.

use ferry_ir::{Attr, Graph};

use crate::fuse::{
    Claimed, Index, Int32Casts, Rewrite, additive_mask_input, apply, attention_pattern,
    attention_scale, constant_merge_heads_reshape, fused_name, int_vector, ms_node, node_names,
    perm_0213, perm_0231, value_names,
};
use crate::pattern::{P, Pattern, init, is_i64_vector, op, val};

/// `Transpose(Reshape(p, [0, 0, heads, head_dim]), perm)`, `p` and the shape bound to the
/// two names.
fn split_heads(names: [&'static str; 2], perm: fn(&Index<'_>, &ferry_ir::Node) -> bool) -> P {
    let rs = op(
        "Reshape",
        vec![val(names[0]), init(names[1], is_i64_vector)],
    )
    .check(|_, n| n.attrs.is_empty());
    op("Transpose", vec![rs.p()]).check(perm).p()
}

/// The attention core over head splits of three projections.
fn mha_pattern() -> Pattern {
    attention_pattern(
        |ix, n| constant_merge_heads_reshape(ix, n).is_some(),
        [
            split_heads(["q", "q_shape"], perm_0213),
            split_heads(["k", "k_shape"], perm_0231),
            split_heads(["v", "v_shape"], perm_0213),
        ],
    )
}

/// A matched attention core.
struct MhaMatch {
    qkv: [String; 3],
    heads: i64,
    scale: f32,
    mask: String,
    removed: Vec<usize>,
}

/// Checks an [`mha_pattern`] match at node `i`: one head split for q, k and v, as wide
/// as the merged output (known projection widths too), a positive scale, ferry's mask.
fn match_mha(ix: &Index<'_>, pat: &Pattern, i: usize) -> Option<MhaMatch> {
    let m = pat.at(ix, i)?;
    let hidden = constant_merge_heads_reshape(ix, &ix.graph.nodes[i])?;
    let split = |name| match int_vector(ix, m.value(name))?[..] {
        [0, 0, heads, head_dim] if heads > 0 && head_dim > 0 => Some((heads, head_dim)),
        _ => None,
    };
    let (heads, head_dim) = split("q_shape")?;
    if split("k_shape")? != (heads, head_dim)
        || split("v_shape")? != (heads, head_dim)
        || heads.checked_mul(head_dim) != Some(hidden)
    {
        return None;
    }
    let qkv = ["q", "k", "v"].map(|p| m.value(p).to_string());
    // Known projection widths must be the hidden size.
    if !qkv
        .iter()
        .all(|p| ix.last_dim(p).is_none_or(|d| d == hidden))
    {
        return None;
    }
    Some(MhaMatch {
        qkv,
        heads,
        scale: attention_scale(ix, &m)?,
        mask: additive_mask_input(ix, m.value("mask"))?,
        removed: m.interior,
    })
}

/// Fuses the attention core that [`fuse_attention`](crate::fuse_attention) leaves (its
/// projections are not three `Add(MatMul(x, W), b)` of one input with constant weights, or
/// that fusion is disabled): `Softmax(Add(Mul(MatMul(q, k), scale), mask), -1)` times v,
/// transposed back and reshaped to `[0, 0, H]`, where q, k and v are head splits
/// (`Reshape` to `[0, 0, heads, head_dim]`, `Transpose` `[0, 2, 1, 3]`, for k
/// `[0, 2, 3, 1]`) of rank-3 projections and `mask` is exactly ferry's `additive_mask` of a
/// rank-2 integer graph input. Every intermediate must have no other consumer. The core
/// becomes `com.microsoft` `MultiHeadAttention(query, key, value, "", key_padding_mask)`
/// with `num_heads`, the matched `scale` and `mask_filter_value` `f32::MIN`; the
/// projections stay as they are and `key_padding_mask` is one `Cast(mask, int32)` per mask
/// input (an existing one is reused). Returns how many were fused.
pub fn fuse_multi_head_attention(graph: &mut Graph) -> usize {
    let ix = Index::new(graph);
    let mut names = node_names(graph);
    let mut values = value_names(graph);
    let mut casts = Int32Casts::new(graph, true);
    let mut taken = Claimed::default();
    let mut rewrites = Vec::new();
    let pat = mha_pattern();
    for (i, out) in graph.nodes.iter().enumerate() {
        let Some(m) = match_mha(&ix, &pat, i) else {
            continue;
        };
        if !taken.claim(i, &m.removed) {
            continue;
        }
        let mask = casts.of(&mut names, &mut values, &m.mask);
        let name = fused_name(&mut names, &out.name, "MultiHeadAttention");
        let [q, k, v] = m.qkv;
        let mut node = ms_node(
            name,
            "MultiHeadAttention",
            vec![q, k, v, String::new(), mask],
            out.outputs.clone(),
        );
        node.attrs
            .insert("num_heads".to_string(), Attr::Int(m.heads));
        node.attrs.insert("scale".to_string(), Attr::Float(m.scale));
        node.attrs
            .insert("mask_filter_value".to_string(), Attr::Float(f32::MIN));
        rewrites.push(Rewrite {
            anchor: i,
            node,
            removed: m.removed,
        });
    }
    let count = apply(graph, rewrites);
    casts.insert(graph);
    count
}

#[cfg(test)]
mod tests {
    use ferry_ir::{DType, Dim, Initializer, TensorData, Value};

    use super::*;
    use crate::test_util::{graph, init, node};

    fn ints(name: &str, values: &[i64]) -> Initializer {
        Initializer {
            name: name.into(),
            dtype: DType::I64,
            dims: vec![values.len() as i64],
            data: TensorData::from_i64(values),
        }
    }

    /// The attention core over three projections that are graph inputs (nothing to pack).
    fn core_graph() -> Graph {
        let mut nodes = vec![
            node("Unsqueeze", &["attention_mask", "axes"], &["mu"], vec![]),
            node("Cast", &["mu"], &["mf"], vec![("to", Attr::Int(1))]),
            node("Sub", &["one", "mf"], &["inv"], vec![]),
            node("Mul", &["inv", "fmin"], &["madd"], vec![]),
        ];
        for (p, perm) in [
            ("q", vec![0, 2, 1, 3]),
            ("k", vec![0, 2, 3, 1]),
            ("v", vec![0, 2, 1, 3]),
        ] {
            let n = |s: &str| format!("{p}_{s}");
            nodes.extend([
                node("Reshape", &[p, "heads_shape"], &[&n("r")], vec![]),
                node(
                    "Transpose",
                    &[&n("r")],
                    &[&n("t")],
                    vec![("perm", Attr::Ints(perm))],
                ),
            ]);
        }
        nodes.extend([
            node("MatMul", &["q_t", "k_t"], &["qk"], vec![]),
            node("Mul", &["scale", "qk"], &["sc"], vec![]),
            node("Add", &["madd", "sc"], &["s"], vec![]),
            node("Softmax", &["s"], &["pr"], vec![("axis", Attr::Int(-1))]),
            node("MatMul", &["pr", "v_t"], &["c"], vec![]),
            node(
                "Transpose",
                &["c"],
                &["ct"],
                vec![("perm", Attr::Ints(vec![0, 2, 1, 3]))],
            ),
            node("Reshape", &["ct", "out_shape"], &["y"], vec![]),
        ]);
        let inits = vec![
            ints("axes", &[1, 2]),
            init("one", vec![], &[1.0]),
            init("fmin", vec![], &[f32::MIN]),
            ints("heads_shape", &[0, 0, 2, 2]),
            ints("out_shape", &[0, 0, 4]),
            init("scale", vec![], &[0.5]),
        ];
        let mut g = graph(nodes, inits, &["y"]);
        let bsh = vec![Dim::sym("b"), Dim::sym("s"), Dim::Fixed(4)];
        g.inputs = ["q", "k", "v"]
            .iter()
            .map(|n| Value::new(*n, DType::F32, bsh.clone()))
            .collect();
        g.inputs.push(Value::new(
            "attention_mask",
            DType::I64,
            vec![Dim::sym("b"), Dim::sym("s")],
        ));
        g
    }

    #[test]
    fn attention_core_over_unpackable_projections_fuses() {
        let mut g = core_graph();
        assert_eq!(fuse_multi_head_attention(&mut g), 1);
        let ops: Vec<&str> = g.nodes.iter().map(|n| n.op_type.as_str()).collect();
        // The mask arithmetic is left for dead-node removal.
        assert_eq!(ops[0], "Cast");
        let mha = g
            .nodes
            .iter()
            .find(|n| n.op_type == "MultiHeadAttention")
            .expect("fused");
        assert_eq!(mha.domain, crate::MS_DOMAIN);
        let cast_out = g.nodes[0].outputs[0].as_str();
        assert_eq!(mha.inputs, ["q", "k", "v", "", cast_out]);
        assert_eq!(mha.outputs, ["y"]);
        assert!(matches!(mha.attr("num_heads"), Some(Attr::Int(2))));
        assert!(matches!(mha.attr("scale"), Some(Attr::Float(s)) if *s == 0.5));
        assert!(!ops.contains(&"Softmax"));
        assert!(g.opsets.iter().any(|o| o.domain == crate::MS_DOMAIN));
    }

    #[test]
    fn inexact_attention_cores_stay() {
        type Change = Box<dyn Fn(&mut Graph)>;
        let variants: Vec<Change> = vec![
            // Key not transposed for the product.
            Box::new(|g| {
                g.nodes[7].attrs = [("perm".to_string(), Attr::Ints(vec![0, 2, 1, 3]))].into()
            }),
            // Softmax over another axis.
            Box::new(|g| g.nodes[13].attrs = [("axis".to_string(), Attr::Int(1))].into()),
            // Scores read elsewhere.
            Box::new(|g| g.outputs.push(Value::new("s", DType::F32, vec![]))),
            // A mask that is not ferry's additive mask (0 instead of f32::MIN).
            Box::new(|g| g.initializers[2] = init("fmin", vec![], &[0.0])),
            // Heads that do not multiply to the output width.
            Box::new(|g| g.initializers[4] = ints("out_shape", &[0, 0, 8])),
        ];
        for (k, change) in variants.iter().enumerate() {
            let mut g = core_graph();
            change(&mut g);
            assert_eq!(fuse_multi_head_attention(&mut g), 0, "variant {k}");
        }
    }
}
