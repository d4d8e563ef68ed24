//! GPT-2 causal self-attention (without past key/values) fused into `com.microsoft`
//! `Attention` with `unidirectional = 1`.

use ferry_ir::{Attr, Graph, Node};

use crate::fuse::{
    Claimed, Index, Int32Casts, Rewrite, apply, attention_pattern, attention_scale,
    constant_merge_heads_reshape, fused_name, has_perm, input_at, int_vector, is_mask_input,
    matched_node, ms_node, node_names, perm_0213, perm_0231, unsqueeze, unsqueeze_axes,
    value_names,
};
use crate::pattern::{
    P, Pattern, init, is_f32_matrix, is_f32_scalar, is_f32_vector, is_i64_vector, op, rank0_i64,
    val,
};

/// ferry's GPT-2 causal + padding mask without past (`causal_mask` in the tracer):
/// `Where(And(Not(Greater(Range(0, n, 1), Unsqueeze(Range(0, n, 1), [1]))),
/// Cast(Unsqueeze(mask, [1, 2]), bool)), 0, f32::MIN)` with `n = Gather(Shape(mask), 1)`
/// (kept: all layers read it), `mask` bound to `mask_input`.
fn causal_padding_mask() -> Pattern {
    let n = op(
        "Gather",
        vec![
            op("Shape", vec![val("mask_input")])
                .check(|_, n| n.attrs.is_empty())
                .p(),
            init("one", |i| rank0_i64(i) == Some(1)),
        ],
    )
    .check(|_, n| matches!(n.attr("axis"), None | Some(Attr::Int(0))))
    .named("n");
    // Range(0, n, 1), its constants bound to the two names.
    let range = |[start, step]: [&'static str; 2]| {
        let start = init(start, |i| rank0_i64(i) == Some(0));
        let step = init(step, |i| rank0_i64(i) == Some(1));
        op("Range", vec![start, n.clone().p(), step]).p()
    };
    let column = unsqueeze(range(["q_start", "q_step"]), |ix, n| {
        unsqueeze_axes(ix, n, &[1])
    });
    let kv = range(["kv_start", "kv_step"]);
    let allowed = op("Not", vec![op("Greater", vec![kv, column.p()]).p()]);
    let to_bool = |_: &Index<'_>, n: &Node| matches!(n.attr("to"), Some(Attr::Int(9)));
    let padding = unsqueeze(val("mask_input"), |ix, n| unsqueeze_axes(ix, n, &[1, 2]));
    let padding = op("Cast", vec![padding.p()]).check(to_bool);
    let and = op("And", vec![allowed.p(), padding.p()]).commutative();
    let zero = init("zero_f", |i| scalar_is(i, 0.0));
    let min = init("min", |i| is_f32_scalar(i, f32::MIN));
    Pattern::new(op("Where", vec![and.p(), zero, min]).kept())
}

/// A rank-0 float32 initializer equal to `v`.
fn scalar_is(i: &ferry_ir::Initializer, v: f32) -> bool {
    crate::pattern::rank0_f32(i) == Some(v)
}

/// One head split `Transpose(Reshape(Slice(qkv, start, end, axes[, steps]), shape),
/// [0, 2, 1, 3])` of the packed projection `qkv`, for the key either followed by
/// `Transpose([0, 1, 3, 2])` or as one `Transpose([0, 2, 3, 1])`; the Slice and shape bound
/// to the two names.
fn head_split(names: [&'static str; 2], key: bool) -> P {
    let mm = op("MatMul", vec![val("x"), init("w", is_f32_matrix)]);
    let qkv = op("Add", vec![mm.p(), init("b", is_f32_vector)])
        .commutative()
        .named("qkv")
        .uses(Some(3));
    let slice = op("Slice", vec![qkv.p(), P::Any, P::Any, P::Any])
        .min_inputs()
        .named(names[0]);
    let rs = op("Reshape", vec![slice.p(), init(names[1], is_i64_vector)])
        .check(|_, n| n.attrs.is_empty());
    if !key {
        return op("Transpose", vec![rs.p()]).check(perm_0213).p();
    }
    let split = op("Transpose", vec![rs.clone().p()]).check(perm_0213);
    P::Either(vec![
        op("Transpose", vec![split.p()])
            .check(|_, n| has_perm(n, &[0, 1, 3, 2]))
            .p(),
        op("Transpose", vec![rs.p()]).check(perm_0231).p(),
    ])
}

/// `(heads, head_dim, slot)` of a head split: its shape `[0, 0, heads, head_dim]`, its
/// Slice the `slot`-th block of `heads · head_dim` columns along the last axis (step 1).
fn split_slot(ix: &Index<'_>, shape: &str, slice: &Node) -> Option<(i64, i64, i64)> {
    let [0, 0, heads, head_dim] = int_vector(ix, shape)?[..] else {
        return None;
    };
    let h = heads
        .checked_mul(head_dim)
        .filter(|_| heads > 0 && head_dim > 0)?;
    let steps_ok = match slice.inputs.len() {
        4 => true,
        5 => int_vector(ix, input_at(slice, 4)).is_some_and(|s| s == [1]),
        _ => false,
    };
    let axes_ok = int_vector(ix, input_at(slice, 3)).is_some_and(|a| a == [-1] || a == [2]);
    let ([start], [end]) = (
        &int_vector(ix, input_at(slice, 1))?[..],
        &int_vector(ix, input_at(slice, 2))?[..],
    ) else {
        return None;
    };
    let ok = steps_ok
        && axes_ok
        && start % h == 0
        && end.checked_sub(*start) == Some(h)
        && (0..3).contains(&(start / h));
    ok.then_some((heads, head_dim, start / h))
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

/// GPT-2's attention: [`attention_pattern`] over q/k/v head splits of one `Add(MatMul(x,
/// W), b)`.
fn gpt2_pattern() -> Pattern {
    attention_pattern(
        |ix, n| constant_merge_heads_reshape(ix, n).is_some(),
        [
            head_split(["q_slice", "q_shape"], false),
            head_split(["k_slice", "k_shape"], true),
            head_split(["v_slice", "v_shape"], false),
        ],
    )
}

/// Checks a [`gpt2_pattern`] match at node `i`: q, k, v the slots 0, 1, 2 of `W[H, 3H]`
/// and `b[3H]` in heads as wide as the merged output, a rank-3 `x` of width `H`, a
/// positive scale and ferry's causal + padding mask.
fn match_gpt2_attention(ix: &Index<'_>, pat: &Pattern, i: usize) -> Option<Gpt2Match> {
    let m = pat.at(ix, i)?;
    let hidden = constant_merge_heads_reshape(ix, &ix.graph.nodes[i])?;
    let slot = |slice, shape| split_slot(ix, m.value(shape), matched_node(ix, &m, slice)?);
    let (heads, head_dim, q) = slot("q_slice", "q_shape")?;
    let (k, v) = (slot("k_slice", "k_shape")?, slot("v_slice", "v_shape")?);
    if (q, k, v) != (0, (heads, head_dim, 1), (heads, head_dim, 2)) || heads * head_dim != hidden {
        return None;
    }
    let dims = |name, want: &[i64]| ix.inits.get(m.value(name)).is_some_and(|i| i.dims == want);
    let x_ok = ix
        .shapes
        .get(m.value("x"))
        .is_some_and(|s| s.len() == 3 && s[2].fixed() == Some(hidden));
    if !dims("w", &[hidden, 3 * hidden]) || !dims("b", &[3 * hidden]) || !x_ok {
        return None;
    }
    let mask = causal_padding_mask().at_value(ix, m.value("mask"))?;
    let mask = mask.value("mask_input");
    if !is_mask_input(ix, mask) {
        return None;
    }
    Some(Gpt2Match {
        x: m.value("x").to_string(),
        weight: m.value("w").to_string(),
        bias: m.value("b").to_string(),
        heads,
        scale: attention_scale(ix, &m)?,
        mask: mask.to_string(),
        removed: m.interior.clone(),
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
    let pat = gpt2_pattern();
    for (i, out) in graph.nodes.iter().enumerate() {
        let Some(m) = match_gpt2_attention(&ix, &pat, i) else {
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
