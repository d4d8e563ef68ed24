//! GPT-2 causal self-attention (without past key/values) fused into `com.microsoft`
//! `Attention` with `unidirectional = 1`.

use ferry_ir::{Attr, DType, Graph, Node};

use crate::fuse::{
    Claimed, Index, Int32Casts, Rewrite, apply, attention_core, both_orders,
    constant_merge_heads_reshape, fused_name, has_perm, input_at, int_vector, is_binary, ms_node,
    node_names, scalar_value, value_names,
};

/// A rank-0 int64 initializer's value.
fn scalar_i64(ix: &Index<'_>, value: &str) -> Option<i64> {
    let i = ix.inits.get(value)?;
    if i.dtype != DType::I64 || !i.dims.is_empty() {
        return None;
    }
    let b = i.data.bytes().ok()?;
    Some(i64::from_le_bytes(b.get(..8)?.try_into().ok()?))
}

/// `Unsqueeze(x, axes)` with the axes as attribute or constant input: `(index, x)`.
fn unsqueeze_of<'g>(ix: &Index<'g>, value: &str, axes: &[i64]) -> Option<(usize, &'g Node)> {
    let (i, n) = ix.producer(value, "Unsqueeze")?;
    let ok = match (n.inputs.len(), n.attr("axes")) {
        (1, Some(Attr::Ints(a))) => a == axes,
        (2, None) => int_vector(ix, input_at(n, 1)).is_some_and(|a| a == axes),
        _ => false,
    };
    (ok && n.outputs.len() == 1 && n.attrs.len() <= 1).then_some((i, n))
}

/// ferry's GPT-2 causal + padding mask without past (`causal_mask` in the tracer):
/// `Where(And(Not(Greater(Range(0, n, 1), Unsqueeze(Range(0, n, 1), [1]))),
/// Cast(Unsqueeze(mask, [1, 2]), bool)), 0, f32::MIN)` with `n = Gather(Shape(mask), 1)`,
/// over a rank-2 integer graph input `mask`; returns that input's name.
fn causal_padding_mask(ix: &Index<'_>, value: &str) -> Option<String> {
    let (_, wh) = ix.producer(value, "Where")?;
    if wh.inputs.len() != 3
        || scalar_value(ix, input_at(wh, 1)) != Some(0.0)
        || scalar_value(ix, input_at(wh, 2)).is_none_or(|v| v.to_bits() != f32::MIN.to_bits())
    {
        return None;
    }
    let (_, and) = ix
        .producer(input_at(wh, 0), "And")
        .filter(|(_, n)| is_binary(n, "And"))?;
    both_orders(and).into_iter().find_map(|(allowed, pad)| {
        let (_, cast) = ix.producer(pad, "Cast")?;
        if cast.inputs.len() != 1 || !matches!(cast.attr("to"), Some(Attr::Int(9))) {
            return None;
        }
        let (_, unsq) = unsqueeze_of(ix, input_at(cast, 0), &[1, 2])?;
        let mask = input_at(unsq, 0);
        let input = ix.graph.inputs.iter().find(|v| v.name == mask)?;
        let int_like = matches!(
            input.dtype,
            DType::I64 | DType::I32 | DType::I16 | DType::I8 | DType::U8 | DType::Bool
        );
        if !int_like
            || input.shape.as_ref().is_some_and(|s| s.len() != 2)
            || ix.inits.contains_key(mask)
        {
            return None;
        }
        let (_, not) = ix.producer(allowed, "Not")?;
        let (_, gt) = ix
            .producer(input_at(not, 0), "Greater")
            .filter(|(_, n)| is_binary(n, "Greater"))?;
        let range = |v: &str| {
            let (_, r) = ix.producer(v, "Range")?;
            (r.inputs.len() == 3
                && scalar_i64(ix, input_at(r, 0)) == Some(0)
                && scalar_i64(ix, input_at(r, 2)) == Some(1))
            .then(|| input_at(r, 1).to_string())
        };
        let kv_len = range(input_at(gt, 0))?;
        let (_, qc) = unsqueeze_of(ix, input_at(gt, 1), &[1])?;
        let q_len = range(input_at(qc, 0))?;
        if kv_len != q_len {
            return None;
        }
        let (_, gather) = ix.producer(&kv_len, "Gather")?;
        let axis_ok = matches!(gather.attr("axis"), None | Some(Attr::Int(0)));
        if !axis_ok || gather.inputs.len() != 2 || scalar_i64(ix, input_at(gather, 1)) != Some(1) {
            return None;
        }
        let (_, shape) = ix.producer(input_at(gather, 0), "Shape")?;
        (shape.inputs.len() == 1 && shape.attrs.is_empty() && input_at(shape, 0) == mask)
            .then(|| mask.to_string())
    })
}

/// One head split `Transpose(Reshape(Slice(qkv, [k·H], [(k+1)·H], [-1]), [0, 0, heads,
/// head_dim]), [0, 2, 1, 3])`, for the key either followed by `Transpose([0, 1, 3, 2])` or
/// as one `Transpose([0, 2, 3, 1])`: `(qkv, slot k, heads, head_dim, node indices)`.
fn head_split(
    ix: &Index<'_>,
    value: &str,
    key: bool,
) -> Option<(String, i64, i64, i64, Vec<usize>)> {
    if !ix.single_use(value) {
        return None;
    }
    let mut removed = Vec::new();
    let (ti, tr) = ix.producer(value, "Transpose")?;
    removed.push(ti);
    let reshaped = if key && has_perm(tr, &[0, 1, 3, 2]) {
        if !ix.single_use(input_at(tr, 0)) {
            return None;
        }
        let (t2i, t2) = ix
            .producer(input_at(tr, 0), "Transpose")
            .filter(|(_, n)| has_perm(n, &[0, 2, 1, 3]))?;
        removed.push(t2i);
        input_at(t2, 0)
    } else if has_perm(tr, if key { &[0, 2, 3, 1] } else { &[0, 2, 1, 3] }) {
        input_at(tr, 0)
    } else {
        return None;
    };
    if !ix.single_use(reshaped) {
        return None;
    }
    let (ri, rs) = ix.producer(reshaped, "Reshape")?;
    if rs.inputs.len() != 2 || rs.outputs.len() != 1 || !rs.attrs.is_empty() {
        return None;
    }
    let [0, 0, heads, head_dim] = int_vector(ix, input_at(rs, 1))?[..] else {
        return None;
    };
    let h = heads
        .checked_mul(head_dim)
        .filter(|_| heads > 0 && head_dim > 0)?;
    if !ix.single_use(input_at(rs, 0)) {
        return None;
    }
    let (si, sl) = ix.producer(input_at(rs, 0), "Slice")?;
    let steps_ok = match sl.inputs.len() {
        4 => true,
        5 => int_vector(ix, input_at(sl, 4)).is_some_and(|s| s == [1]),
        _ => false,
    };
    let axes_ok = int_vector(ix, input_at(sl, 3)).is_some_and(|a| a == [-1] || a == [2]);
    let ([start], [end]) = (
        &int_vector(ix, input_at(sl, 1))?[..],
        &int_vector(ix, input_at(sl, 2))?[..],
    ) else {
        return None;
    };
    if !steps_ok
        || !axes_ok
        || start % h != 0
        || end.checked_sub(*start) != Some(h)
        || !(0..3).contains(&(start / h))
    {
        return None;
    }
    removed.extend([ri, si]);
    Some((
        input_at(sl, 0).to_string(),
        start / h,
        heads,
        head_dim,
        removed,
    ))
}

/// A matched GPT-2 attention block.
struct Gpt2Match {
    x: String,
    weight: String,
    bias: String,
    heads: i64,
    scale: f32,
    mask: String,
    removed: Vec<usize>,
}

/// Matches the block ending in `out`: `Reshape(Transpose(MatMul(Softmax(Add(Mul(MatMul(q,
/// k), scale), causal_mask)), v), [0, 2, 1, 3]), [0, 0, H])`, q/k/v head splits of one
/// `Add(MatMul(x, W[H, 3H]), b[3H])`.
fn match_gpt2_attention(ix: &Index<'_>, out: &Node) -> Option<Gpt2Match> {
    let hidden = constant_merge_heads_reshape(ix, out)?;
    let core = attention_core(ix, out, |m, _| causal_padding_mask(ix, m))?;
    let q = head_split(ix, input_at(core.qk, 0), false)?;
    let k = head_split(ix, input_at(core.qk, 1), true)?;
    let v = head_split(ix, core.v, false)?;
    let same = |p: &(String, i64, i64, i64, Vec<usize>)| p.0 == q.0 && p.2 == q.2 && p.3 == q.3;
    if !same(&k) || !same(&v) || (q.1, k.1, v.1) != (0, 1, 2) || q.2 * q.3 != hidden {
        return None;
    }
    // The packed projection, read by the three slices only.
    let qkv = q.0.as_str();
    if ix.consumers.get(qkv) != Some(&3) || ix.graph_outputs.contains(qkv) {
        return None;
    }
    let (ai, add) = ix
        .producer(qkv, "Add")
        .filter(|(_, n)| is_binary(n, "Add"))?;
    let (mm, bias) = both_orders(add)
        .into_iter()
        .find(|&(mm, b)| ix.is_vector(b, 3 * hidden) && ix.single_use(mm))?;
    let (mi, matmul) = ix
        .producer(mm, "MatMul")
        .filter(|(_, n)| is_binary(n, "MatMul"))?;
    let (x, w) = (input_at(matmul, 0), input_at(matmul, 1));
    let w_ok = ix
        .inits
        .get(w)
        .is_some_and(|i| i.dtype == DType::F32 && i.dims == [hidden, 3 * hidden]);
    let x_ok = ix
        .shapes
        .get(x)
        .is_some_and(|s| s.len() == 3 && s[2].fixed() == Some(hidden));
    if !w_ok || !x_ok {
        return None;
    }
    let mut removed = core.removed;
    removed.extend([ai, mi]);
    removed.extend(q.4.iter().chain(&k.4).chain(&v.4));
    Some(Gpt2Match {
        x: x.to_string(),
        weight: w.to_string(),
        bias: bias.to_string(),
        heads: q.2,
        scale: core.scale,
        mask: core.mask,
        removed,
    })
}

/// Fuses ferry's GPT-2 self-attention without past key/values: `Add(MatMul(x, W), b)` with
/// `W` `[H, 3H]` and `b` `[3H]` float32 initializers (Conv1D's packed q | k | v), sliced
/// along the last axis into q, k, v, each reshaped to `[0, 0, heads, head_dim]` and
/// transposed; `Softmax(Add(Mul(MatMul(q, kᵀ), scale), causal_mask), -1)` times v,
/// transposed back and reshaped to `[0, 0, H]`, where `causal_mask` is exactly ferry's
/// causal + padding mask of a rank-2 integer graph input. Every intermediate must have no
/// other consumer. The block becomes `com.microsoft` `Attention(x, W, b, mask_index)` with
/// `unidirectional` 1, `num_heads`, the matched `scale` and `mask_filter_value` `f32::MIN`;
/// `W` and `b` are used as they are (already packed in Attention's layout), and
/// `mask_index` is one `Cast(mask, int32)` per mask input (an existing one is reused).
/// Rows whose keys are all masked (padding before the first real token) may differ from
/// the unfused graph; real tokens' rows do not. Returns how many were fused.
pub fn fuse_gpt2_attention(graph: &mut Graph) -> usize {
    let ix = Index::new(graph);
    let mut names = node_names(graph);
    let mut values = value_names(graph);
    let mut casts = Int32Casts::new(graph, true);
    let mut taken = Claimed::default();
    let mut rewrites = Vec::new();
    for (i, out) in graph.nodes.iter().enumerate() {
        let Some(m) = match_gpt2_attention(&ix, out) else {
            continue;
        };
        if !taken.claim(i, &m.removed) {
            continue;
        }
        let mask_index = casts.of(&mut names, &mut values, &m.mask);
        let name = fused_name(&mut names, &out.name, "Attention");
        let mut node = ms_node(
            name,
            "Attention",
            vec![m.x, m.weight, m.bias, mask_index],
            out.outputs.clone(),
        );
        node.attrs
            .insert("num_heads".to_string(), Attr::Int(m.heads));
        node.attrs
            .insert("unidirectional".to_string(), Attr::Int(1));
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
    use ferry_ir::{Dim, Initializer, TensorData, Value};

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

    fn int_scalar(name: &str, v: i64) -> Initializer {
        Initializer {
            name: name.into(),
            dtype: DType::I64,
            dims: vec![],
            data: TensorData::from_i64(&[v]),
        }
    }

    /// ferry's GPT-2 attention (hidden 4, 2 heads) with its causal + padding mask.
    fn gpt2_graph() -> Graph {
        let perm = |p: &[i64]| vec![("perm", Attr::Ints(p.to_vec()))];
        let mut nodes = vec![
            node("Shape", &["attention_mask"], &["ms"], vec![]),
            node(
                "Gather",
                &["ms", "i1"],
                &["n"],
                vec![("axis", Attr::Int(0))],
            ),
            node("Range", &["i0", "n", "i1"], &["kv"], vec![]),
            node("Range", &["i0", "n", "i1"], &["q"], vec![]),
            node("Unsqueeze", &["q", "ax1"], &["qc"], vec![]),
            node("Greater", &["kv", "qc"], &["later"], vec![]),
            node("Not", &["later"], &["allowed"], vec![]),
            node("Unsqueeze", &["attention_mask", "ax12"], &["mu"], vec![]),
            node("Cast", &["mu"], &["pad"], vec![("to", Attr::Int(9))]),
            node("And", &["allowed", "pad"], &["ok"], vec![]),
            node("Where", &["ok", "zero", "fmin"], &["mask"], vec![]),
            node("MatMul", &["x", "w"], &["mm"], vec![]),
            node("Add", &["mm", "b"], &["qkv"], vec![]),
        ];
        for (k, p) in ["q", "k", "v"].iter().enumerate() {
            let n = |s: &str| format!("{p}_{s}");
            nodes.extend([
                node(
                    "Slice",
                    &["qkv", &format!("s{k}"), &format!("s{}", k + 1), "last"],
                    &[&n("sl")],
                    vec![],
                ),
                node("Reshape", &[&n("sl"), "heads_shape"], &[&n("r")], vec![]),
                node("Transpose", &[&n("r")], &[&n("t")], perm(&[0, 2, 1, 3])),
            ]);
        }
        nodes.extend([
            node("Transpose", &["k_t"], &["k_tt"], perm(&[0, 1, 3, 2])),
            node("MatMul", &["q_t", "k_tt"], &["qk"], vec![]),
            node("Mul", &["qk", "scale"], &["sc"], vec![]),
            node("Add", &["sc", "mask"], &["s"], vec![]),
            node("Softmax", &["s"], &["pr"], vec![("axis", Attr::Int(-1))]),
            node("MatMul", &["pr", "v_t"], &["c"], vec![]),
            node("Transpose", &["c"], &["ct"], perm(&[0, 2, 1, 3])),
            node("Reshape", &["ct", "out_shape"], &["y"], vec![]),
        ]);
        let w: Vec<f32> = (0..48).map(|i| i as f32).collect();
        let b: Vec<f32> = (0..12).map(|i| i as f32).collect();
        let inits = vec![
            int_scalar("i0", 0),
            int_scalar("i1", 1),
            ints("ax1", &[1]),
            ints("ax12", &[1, 2]),
            init("zero", vec![], &[0.0]),
            init("fmin", vec![], &[f32::MIN]),
            init("w", vec![4, 12], &w),
            init("b", vec![12], &b),
            ints("s0", &[0]),
            ints("s1", &[4]),
            ints("s2", &[8]),
            ints("s3", &[12]),
            ints("last", &[-1]),
            ints("heads_shape", &[0, 0, 2, 2]),
            ints("out_shape", &[0, 0, 4]),
            init("scale", vec![], &[0.5]),
        ];
        let mut g = graph(nodes, inits, &["y"]);
        g.inputs = vec![
            Value::new(
                "x",
                DType::F32,
                vec![Dim::sym("b"), Dim::sym("s"), Dim::Fixed(4)],
            ),
            Value::new(
                "attention_mask",
                DType::I64,
                vec![Dim::sym("b"), Dim::sym("s")],
            ),
        ];
        g
    }

    #[test]
    fn gpt2_attention_fuses_unidirectional_with_the_packed_weights() {
        let mut g = gpt2_graph();
        assert_eq!(fuse_gpt2_attention(&mut g), 1);
        let att = g
            .nodes
            .iter()
            .find(|n| n.op_type == "Attention")
            .expect("fused");
        assert_eq!(g.nodes[0].op_type, "Cast");
        let cast_out = g.nodes[0].outputs[0].as_str();
        assert_eq!(att.inputs, ["x", "w", "b", cast_out]);
        assert_eq!(att.outputs, ["y"]);
        assert!(matches!(att.attr("unidirectional"), Some(Attr::Int(1))));
        assert!(matches!(att.attr("num_heads"), Some(Attr::Int(2))));
        assert!(matches!(att.attr("scale"), Some(Attr::Float(s)) if *s == 0.5));
        for gone in ["Softmax", "Slice", "MatMul"] {
            assert!(g.nodes.iter().all(|n| n.op_type != gone), "{gone}");
        }
    }

    #[test]
    fn inexact_gpt2_attention_patterns_stay() {
        type Change = Box<dyn Fn(&mut Graph)>;
        let variants: Vec<Change> = vec![
            // Queries starting after a past (not 0): not the no-past mask.
            Box::new(|g| g.nodes[3].inputs[0] = "i1".into()),
            // Keys after queries allowed (Less instead of Greater).
            Box::new(|g| g.nodes[5].op_type = "Less".into()),
            // Masked scores filled with 0 instead of f32::MIN.
            Box::new(|g| g.nodes[10].inputs[2] = "zero".into()),
            // q and k swapped in the packed projection.
            Box::new(|g| {
                g.nodes[13].inputs[1] = "s1".into();
                g.nodes[13].inputs[2] = "s2".into();
                g.nodes[16].inputs[1] = "s0".into();
                g.nodes[16].inputs[2] = "s1".into();
            }),
            // The packed projection read elsewhere.
            Box::new(|g| g.outputs.push(Value::new("qkv", DType::F32, vec![]))),
            // Bias of the wrong length.
            Box::new(|g| g.initializers[7] = init("b", vec![4], &[0.; 4])),
        ];
        for (k, change) in variants.iter().enumerate() {
            let mut g = gpt2_graph();
            change(&mut g);
            assert_eq!(fuse_gpt2_attention(&mut g), 0, "variant {k}");
        }
    }
}
