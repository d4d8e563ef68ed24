//! Self-attention whose Q/K/V projections are not packable (weights that are not
//! constants, or [`fuse_attention`](crate::fuse_attention) disabled) fused into
//! `com.microsoft` `MultiHeadAttention` with separate query, key and value inputs.

use ferry_ir::{Attr, Graph, Node};

use crate::fuse::{
    Claimed, Index, Int32Casts, Rewrite, additive_mask_input, apply, attention_core,
    constant_merge_heads_reshape, fused_name, has_perm, input_at, int_vector, ms_node, node_names,
    value_names,
};

/// `Transpose(Reshape(p, [0, 0, heads, head_dim]), perm)` read once: `(p, heads, head_dim,
/// node indices)`.
fn split_heads(
    ix: &Index<'_>,
    value: &str,
    perm: &[i64],
) -> Option<(String, i64, i64, Vec<usize>)> {
    if !ix.single_use(value) {
        return None;
    }
    let (ti, tr) = ix
        .producer(value, "Transpose")
        .filter(|(_, n)| has_perm(n, perm))?;
    if !ix.single_use(input_at(tr, 0)) {
        return None;
    }
    let (ri, rs) = ix.producer(input_at(tr, 0), "Reshape")?;
    if rs.inputs.len() != 2 || rs.outputs.len() != 1 || !rs.attrs.is_empty() {
        return None;
    }
    let [0, 0, heads, head_dim] = int_vector(ix, input_at(rs, 1))?[..] else {
        return None;
    };
    (heads > 0 && head_dim > 0)
        .then(|| (input_at(rs, 0).to_string(), heads, head_dim, vec![ti, ri]))
}

/// A matched attention core.
struct MhaMatch {
    qkv: [String; 3],
    heads: i64,
    scale: f32,
    mask: String,
    removed: Vec<usize>,
}

/// Matches `Reshape(Transpose(MatMul(Softmax(Add(Mul(MatMul(q, k), scale), mask)), v),
/// [0, 2, 1, 3]), [0, 0, H])` over head splits of three rank-3 projections.
fn match_mha(ix: &Index<'_>, out: &Node) -> Option<MhaMatch> {
    let hidden = constant_merge_heads_reshape(ix, out)?;
    let core = attention_core(ix, out, |m, _| additive_mask_input(ix, m))?;
    let q = split_heads(ix, input_at(core.qk, 0), &[0, 2, 1, 3])?;
    let k = split_heads(ix, input_at(core.qk, 1), &[0, 2, 3, 1])?;
    let v = split_heads(ix, core.v, &[0, 2, 1, 3])?;
    let (heads, head_dim) = (q.1, q.2);
    if (k.1, k.2) != (heads, head_dim) || (v.1, v.2) != (heads, head_dim) {
        return None;
    }
    if heads.checked_mul(head_dim) != Some(hidden) {
        return None;
    }
    // Known projection widths must be the hidden size.
    let width_ok = [&q.0, &k.0, &v.0]
        .iter()
        .all(|p| ix.last_dim(p).is_none_or(|d| d == hidden));
    if !width_ok {
        return None;
    }
    let mut removed = core.removed;
    removed.extend(q.3.iter().chain(&k.3).chain(&v.3));
    Some(MhaMatch {
        qkv: [q.0, k.0, v.0],
        heads,
        scale: core.scale,
        mask: core.mask,
        removed,
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
    for (i, out) in graph.nodes.iter().enumerate() {
        let Some(m) = match_mha(&ix, out) else {
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
