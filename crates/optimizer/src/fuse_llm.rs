//! Decoder-LLM fusions, declared to the [pattern matcher](crate::pattern): RMSNorm →
//! `SimplifiedLayerNormalization`, residual Add + RMSNorm → `SkipSimplifiedLayerNormalization`,
//! and the q/k/v projections of one input → one packed MatMul + Split.

use std::collections::HashMap;

use ferry_ir::{Attr, DType, Graph, Initializer, Node, TensorData};

use crate::fuse::{
    Claimed, Index, Rewrite, apply, fused_name, input_at, is_plain_layer_norm, ms_node, node_names,
    unique_name, value_names,
};
use crate::fuse_layer_norm::is_last_axis_mean;
use crate::pattern::{Match, P, Pattern, init, is_f32_vector, op, single_f32, val};

/// A 1-D float32 or float16 initializer (a norm's weight, a bias; float16 in `--dtype fp16`
/// exports).
fn is_float_vector(i: &Initializer) -> bool {
    matches!(i.dtype, DType::F32 | DType::F16) && i.dims.len() == 1
}

/// A float32 or float16 initializer of rank 2 (a MatMul weight).
fn is_float_matrix(i: &Initializer) -> bool {
    matches!(i.dtype, DType::F32 | DType::F16) && i.dims.len() == 2
}

/// `Cast(·, float16)`: a float16 export's RMSNorm computed in float32, narrowed back
/// before its float16 weight.
fn is_cast_to_half(_: &Index<'_>, n: &Node) -> bool {
    matches!(n.attr("to"), Some(Attr::Int(10))) && n.attrs.len() == 1
}

fn is_two(i: &Initializer) -> bool {
    single_f32(i) == Some(2.0)
}

fn is_one(i: &Initializer) -> bool {
    single_f32(i) == Some(1.0)
}

fn is_epsilon(i: &Initializer) -> bool {
    single_f32(i).is_some_and(|e| e.is_finite() && e >= 0.0)
}

/// `x · rsqrt(mean(x²) + eps)` in the forms exporters write: `Mul(x, Div(1, Sqrt(…)))`
/// (ferry), `Mul(x, Reciprocal(Sqrt(…)))` (torch's `rsqrt`) or `Div(x, Sqrt(…))`.
/// `Cast(·, float)` (`to` 1 only): what torch exports for `.to(torch.float32)` of a
/// float32 tensor.
pub(crate) fn is_cast_to_float(_: &Index<'_>, n: &Node) -> bool {
    matches!(n.attr("to"), Some(Attr::Int(1))) && n.attrs.len() == 1
}

/// The normalized input `x`, or `Cast(x, float)` read by the Pow and the Mul (optimum's
/// export: `hidden_states.to(torch.float32)`).
fn rms_input() -> P {
    P::Either(vec![
        op("Cast", vec![val("x")])
            .check(is_cast_to_float)
            .uses(Some(2))
            .named("x_cast")
            .p(),
        val("x"),
    ])
}

fn rms_normalized() -> P {
    let var = op(
        "ReduceMean",
        vec![op("Pow", vec![rms_input(), init("two", is_two)]).p()],
    )
    .min_inputs()
    .check(is_last_axis_mean);
    let std = || {
        op(
            "Sqrt",
            vec![
                op("Add", vec![var.clone().p(), init("eps", is_epsilon)])
                    .commutative()
                    .p(),
            ],
        )
    };
    let inv = P::Either(vec![
        op("Div", vec![init("one", is_one), std().p()]).p(),
        op("Reciprocal", vec![std().p()]).p(),
    ]);
    let normalized = P::Either(vec![
        op("Mul", vec![rms_input(), inv]).commutative().p(),
        op("Div", vec![rms_input(), std().p()]).p(),
    ]);
    // `.to(input_dtype)` before the weight, a float32 → float32 Cast in a float32 export,
    // float32 → float16 in a float16 one.
    P::Either(vec![
        op("Cast", vec![normalized.clone()])
            .check(is_cast_to_float)
            .p(),
        op("Cast", vec![normalized.clone()])
            .check(is_cast_to_half)
            .named("to_half")
            .p(),
        normalized,
    ])
}

/// RMSNorm scaled by `weight` (`w`), or by `1 + weight` (Gemma; `w` then the raw weight
/// and `plus_one` bound).
fn rms_norm_pattern() -> Pattern {
    // A float16 export widens the weight first: `Cast(w, float) + 1`.
    let widened = op("Cast", vec![init("w", is_float_vector)])
        .check(is_cast_to_float)
        .named("w_cast");
    let raw = P::Either(vec![init("w", is_f32_vector), widened.p()]);
    let plus_one = op("Add", vec![raw, init("one_w", is_one)])
        .commutative()
        .named("plus_one");
    Pattern::new(
        op(
            "Mul",
            vec![
                P::Either(vec![init("w", is_float_vector), plus_one.p()]),
                rms_normalized(),
            ],
        )
        .commutative(),
    )
}

/// A matched RMSNorm: `x`, the weight's initializer, epsilon, whether Gemma's `1 + w`.
struct RmsMatch {
    x: String,
    weight: String,
    epsilon: f32,
    plus_one: bool,
    removed: Vec<usize>,
}

fn match_rms(ix: &Index<'_>, pat: &Pattern, i: usize) -> Option<RmsMatch> {
    let m: Match = pat.at(ix, i)?;
    let w = ix.inits.get(m.value("w"))?;
    let h = w.dims[0];
    // A float16 weight scales the float16 narrowing of the float32 norm (and only it), or
    // (Gemma) is widened to float32 for `1 + w`, which scales the float32 norm.
    let half = w.dtype == DType::F16;
    let ok = if m.node("plus_one").is_some() {
        half == m.node("w_cast").is_some() && m.node("to_half").is_none()
    } else {
        half == m.node("to_half").is_some()
    };
    if !ok {
        return None;
    }
    // The weight spans the normalized (last) axis.
    if ix.last_dim(m.value("x")).is_some_and(|d| d != h) {
        return None;
    }
    Some(RmsMatch {
        x: m.value("x").to_string(),
        weight: m.value("w").to_string(),
        epsilon: single_f32(ix.inits.get(m.value("eps"))?)?,
        plus_one: m.node("plus_one").is_some(),
        removed: m.interior,
    })
}

/// Fuses RMSNorm over the last axis, `weight · (x · 1/√(mean(x²) + eps))` (ReduceMean over
/// axis −1 keeping dims; exponent 2, `eps` and the `1` float32 single-value initializers;
/// `weight` a 1-D float32 initializer as long as x's last axis; `Reciprocal(Sqrt)` or
/// `Div(x, Sqrt)` for `Div(1, Sqrt)`; commutative operands in either order; every
/// intermediate read only inside the pattern), into the default-domain
/// `SimplifiedLayerNormalization(x, weight)` (ONNX Runtime's, registered in the ONNX domain)
/// with `axis` −1, the matched `epsilon` and `stash_type` 1. Gemma's `(1 + weight)` scale
/// becomes a new initializer holding `weight + 1` computed in float32, as the graph computes
/// it (the only copy made: one vector per norm). Returns how many were fused.
pub fn fuse_simplified_layer_norm(graph: &mut Graph) -> usize {
    let ix = Index::new(graph);
    let pat = rms_norm_pattern();
    let mut names = node_names(graph);
    let mut values = value_names(graph);
    let mut taken = Claimed::default();
    let mut rewrites = Vec::new();
    let mut new_inits = Vec::new();
    for (i, out) in graph.nodes.iter().enumerate() {
        if out.op_type != "Mul" {
            continue;
        }
        let Some(m) = match_rms(&ix, &pat, i) else {
            continue;
        };
        let weight = if m.plus_one {
            let Some(w) = ix.inits.get(m.weight.as_str()) else {
                continue;
            };
            // A float16 weight, widened as the graph widens it (exactly).
            let wide = TensorData::converted(w.data.clone(), w.dtype, DType::F32);
            let Some(Ok(v)) = wide.map(|d| d.to_f32_vec()) else {
                continue;
            };
            let folded: Vec<f32> = v.iter().map(|x| x + 1.0).collect();
            let name = unique_name(&mut values, format!("{}_plus_one", m.weight));
            new_inits.push(Initializer {
                name: name.clone(),
                dtype: DType::F32,
                dims: w.dims.clone(),
                data: TensorData::from_f32(&folded),
            });
            name
        } else {
            m.weight.clone()
        };
        if !taken.claim(i, &m.removed) {
            continue;
        }
        let name = fused_name(&mut names, &out.name, "SimplifiedLayerNormalization");
        let mut node = ms_node(
            name,
            "SimplifiedLayerNormalization",
            vec![m.x, weight],
            out.outputs.clone(),
        );
        node.domain = String::new();
        node.attrs.extend([
            ("axis".to_string(), Attr::Int(-1)),
            ("epsilon".to_string(), Attr::Float(m.epsilon)),
            ("stash_type".to_string(), Attr::Int(1)),
        ]);
        rewrites.push(Rewrite {
            anchor: i,
            node,
            removed: m.removed,
        });
    }
    let count = apply(graph, rewrites);
    graph.initializers.extend(new_inits);
    count
}

/// Fuses `SimplifiedLayerNormalization(Add(a, b), gamma)` (a and b of the same known rank-3
/// shape, as the residual stream and a layer's output are) into `com.microsoft`
/// `SkipSimplifiedLayerNormalization(a, b, gamma)` with the same `epsilon`; when the sum is
/// read elsewhere too (the residual stream of a pre-norm decoder), it becomes output 3
/// (`input_skip_bias_sum`). Run after [`fuse_simplified_layer_norm`]. Returns how many
/// were fused.
pub fn fuse_skip_simplified_layer_norm(graph: &mut Graph) -> usize {
    let ix = Index::new(graph);
    let add = || op("Add", vec![val("a"), val("b")]).named("add");
    // torch's no-op `.to(torch.float32)` of the float32 sum (optimum's exports): the Cast's
    // output is the sum the residual stream reads.
    let sum = P::Either(vec![
        op("Cast", vec![add().p()])
            .check(is_cast_to_float)
            .uses(None)
            .named("sum_cast")
            .p(),
        add().uses(None).p(),
    ]);
    let pat = Pattern::new(
        op(
            "SimplifiedLayerNormalization",
            vec![sum, init("gamma", is_float_vector)],
        )
        .check(is_plain_layer_norm),
    );
    let dtype = |v: &str| {
        graph
            .inputs
            .iter()
            .chain(&graph.value_info)
            .find(|x| x.name == v)
            .map(|x| x.dtype)
    };
    let float32 = |v: &str| dtype(v) == Some(DType::F32);
    let mut names = node_names(graph);
    let mut taken = Claimed::default();
    let mut rewrites = Vec::new();
    for (i, ln) in graph.nodes.iter().enumerate() {
        let Some(m) = pat.at(&ix, i) else { continue };
        let (a, b) = (m.value("a"), m.value("b"));
        let same_shape = match (ix.shapes.get(a), ix.shapes.get(b)) {
            (Some(sa), Some(sb)) => sa.len() == 3 && sa == sb,
            _ => false,
        };
        let cast_ok = m.node("sum_cast").is_none() || (float32(a) && float32(b));
        // One type for input, skip and gamma (Gemma's float16 exports scale by a float32
        // `1 + w`: those stay SimplifiedLayerNormalization).
        let gamma = ix.inits.get(m.value("gamma")).map(|g| g.dtype);
        let typed = gamma.is_some() && dtype(a) == gamma && dtype(b) == gamma;
        if !same_shape || !cast_ok || !typed || !taken.claim(i, &m.interior) {
            continue;
        }
        let sum = input_at(ln, 0);
        let mut outputs = ln.outputs.clone();
        if !ix.single_use(sum) {
            outputs.extend([String::new(), String::new(), sum.to_string()]);
        }
        let name = fused_name(&mut names, &ln.name, "SkipSimplifiedLayerNormalization");
        let mut node = ms_node(
            name,
            "SkipSimplifiedLayerNormalization",
            vec![a.to_string(), b.to_string(), m.value("gamma").to_string()],
            outputs,
        );
        let epsilon = match ln.attr("epsilon") {
            Some(Attr::Float(e)) => *e,
            _ => 1e-5,
        };
        node.attrs
            .insert("epsilon".to_string(), Attr::Float(epsilon));
        rewrites.push(Rewrite {
            anchor: i,
            node,
            removed: m.interior,
        });
    }
    apply(graph, rewrites)
}

/// One projection of a packed group: its MatMul, weight, optional bias Add and the value
/// the group's Split produces in its place.
struct Projection {
    matmul: usize,
    weight: String,
    width: i64,
    bias: Option<(usize, String)>,
    /// The MatMul's output.
    mm_out: String,
    /// The bias Add's output, or the MatMul's.
    out: String,
}

/// The projection `MatMul(x, W)` (W a 2-D float32 initializer `[h, n]`), with its bias
/// `Add(·, b)` (b a float32 `[n]` initializer, the MatMul's only reader) when there is one.
fn projection(ix: &Index<'_>, i: usize, x: &str, h: i64) -> Option<Projection> {
    let n = &ix.graph.nodes[i];
    let mm = op("MatMul", vec![val("x"), init("w", is_float_matrix)]);
    let m = Pattern::new(mm).at(ix, i)?;
    let w = ix.inits.get(m.value("w"))?;
    if m.value("x") != x || w.dims[0] != h || n.outputs.len() != 1 {
        return None;
    }
    let width = w.dims[1];
    let out = n.outputs[0].clone();
    let bias = ix
        .graph
        .nodes
        .iter()
        .enumerate()
        .find(|(_, a)| a.inputs.contains(&out))
        .filter(|_| ix.single_use(&out))
        .and_then(|(ai, _)| {
            let bias_init = init("b", is_float_vector);
            let add = op("Add", vec![val("mm"), bias_init]).commutative();
            let bm = Pattern::new(add).at(ix, ai)?;
            let b = ix.inits.get(bm.value("b"))?;
            (bm.value("mm") == out && b.dims[0] == width).then(|| (ai, bm.value("b").to_string()))
        });
    let biased = match &bias {
        Some((ai, _)) => ix.graph.nodes[*ai].outputs[0].clone(),
        None => out.clone(),
    };
    Some(Projection {
        matmul: i,
        weight: m.value("w").to_string(),
        width,
        bias,
        mm_out: out,
        out: biased,
    })
}

/// Packs the q/k/v projections of one input — exactly three `MatMul(x, W)` with float32
/// `[h, n]` initializer weights reading `x`, and nothing else reading `x` — into one
/// `MatMul(x, [Wq | Wk | Wv])` (a lazy row-wise concatenation of the weights, written as it
/// streams; no copy) followed, when all three have a 1-D bias Add, by one Add of the
/// concatenated bias, then `Split` on the last axis into the three original outputs.
/// onnxruntime-genai's model builder packs q/k/v the same way. Returns how many groups were
/// packed.
pub fn fuse_packed_qkv(graph: &mut Graph) -> usize {
    let ix = Index::new(graph);
    let opset = graph
        .opsets
        .iter()
        .find(|o| o.domain.is_empty() || o.domain == "ai.onnx")
        .map_or(17, |o| o.version);
    let mut readers: HashMap<&str, Vec<usize>> = HashMap::new();
    for (i, n) in graph.nodes.iter().enumerate() {
        for s in n.inputs.iter().filter(|s| !s.is_empty()) {
            readers.entry(s.as_str()).or_default().push(i);
        }
    }
    let mut names = node_names(graph);
    let mut values = value_names(graph);
    let mut taken = Claimed::default();
    let mut rewrites = Vec::new();
    let mut before: Vec<(String, Vec<Node>)> = Vec::new();
    let mut new_inits = Vec::new();
    // Readers besides the projections may only read x's shape (optimum's exports).
    let mut groups: Vec<(&str, Vec<usize>)> = readers
        .iter()
        .map(|(x, r)| {
            let r: Vec<usize> = r
                .iter()
                .copied()
                .filter(|&i| graph.nodes[i].op_type != "Shape")
                .collect();
            (*x, r)
        })
        .filter(|(x, r)| r.len() == 3 && !ix.graph_outputs.contains(*x))
        .collect();
    groups.sort_by_key(|(_, r)| r[0]);
    for (x, r) in groups {
        // x's last axis, known or (a MatMul needs it) the weights' rows.
        let rows = |i: usize| {
            ix.inits
                .get(input_at(&graph.nodes[i], 1))?
                .dims
                .first()
                .copied()
        };
        let Some(h) = ix.last_dim(x).or_else(|| rows(r[0])) else {
            continue;
        };
        let Some(ps) = r
            .iter()
            .map(|&i| projection(&ix, i, x, h))
            .collect::<Option<Vec<_>>>()
        else {
            continue;
        };
        let with_bias = ps.iter().all(|p| p.bias.is_some());
        // One dtype (float32, or float16 in `--dtype fp16` exports) for weights and biases.
        let dtype_of = |name: &str| ix.inits.get(name).map(|i| i.dtype);
        let Some(dtype) = dtype_of(&ps[0].weight) else {
            continue;
        };
        let one_dtype = ps.iter().all(|p| {
            dtype_of(&p.weight) == Some(dtype)
                && p.bias
                    .as_ref()
                    .is_none_or(|(_, b)| dtype_of(b) == Some(dtype))
        });
        if !one_dtype {
            continue;
        }
        let Ok(rows) = u64::try_from(h) else { continue };
        let data = |name: &str| ix.inits.get(name).map(|i| i.data.clone());
        let Some(ws) = ps
            .iter()
            .map(|p| data(&p.weight))
            .collect::<Option<Vec<_>>>()
        else {
            continue;
        };
        let Ok(packed) = TensorData::concat_rows(ws, rows) else {
            continue;
        };
        let bias = if with_bias {
            let bs = ps
                .iter()
                .map(|p| p.bias.as_ref().and_then(|(_, b)| data(b)))
                .collect::<Option<Vec<_>>>();
            match bs.map(|bs| TensorData::concat_rows(bs, 1)) {
                Some(Ok(b)) => Some(b),
                _ => continue,
            }
        } else {
            None
        };
        let mut removed: Vec<usize> = ps.iter().map(|p| p.matmul).collect();
        if with_bias {
            removed.extend(ps.iter().filter_map(|p| p.bias.as_ref().map(|(a, _)| *a)));
        }
        let anchor = ps[0].matmul;
        let rest: Vec<usize> = removed.iter().copied().filter(|&k| k != anchor).collect();
        if !taken.claim(anchor, &rest) {
            continue;
        }
        let total: i64 = ps.iter().map(|p| p.width).sum();
        let first = &ix.graph.nodes[anchor];
        let mm_name = fused_name(&mut names, &first.name, "qkv_proj/MatMul");
        let w_name = unique_name(&mut values, format!("{mm_name}.weight"));
        new_inits.push(Initializer {
            name: w_name.clone(),
            dtype,
            dims: vec![h, total],
            data: packed,
        });
        let mm_out = unique_name(&mut values, format!("{mm_name}_output_0"));
        let mut pre = vec![Node {
            name: mm_name.clone(),
            op_type: "MatMul".into(),
            domain: String::new(),
            inputs: vec![x.to_string(), w_name],
            outputs: vec![mm_out.clone()],
            attrs: Default::default(),
        }];
        let mut split_in = mm_out;
        if let Some(b) = bias {
            let add_name = fused_name(&mut names, &first.name, "qkv_proj/Add");
            let b_name = unique_name(&mut values, format!("{add_name}.bias"));
            new_inits.push(Initializer {
                name: b_name.clone(),
                dtype,
                dims: vec![total],
                data: b,
            });
            let add_out = unique_name(&mut values, format!("{add_name}_output_0"));
            pre.push(Node {
                name: add_name,
                op_type: "Add".into(),
                domain: String::new(),
                inputs: vec![split_in, b_name],
                outputs: vec![add_out.clone()],
                attrs: Default::default(),
            });
            split_in = add_out;
        }
        let widths: Vec<i64> = ps.iter().map(|p| p.width).collect();
        let split_name = fused_name(&mut names, &first.name, "qkv_proj/Split");
        let mut split = Node {
            name: split_name.clone(),
            op_type: "Split".into(),
            domain: String::new(),
            inputs: vec![split_in],
            outputs: ps
                .iter()
                .map(|p| if with_bias { &p.out } else { &p.mm_out }.clone())
                .collect(),
            attrs: [("axis".to_string(), Attr::Int(-1))].into_iter().collect(),
        };
        if opset >= 13 {
            let s_name = unique_name(&mut values, format!("{split_name}.split"));
            new_inits.push(Initializer {
                name: s_name.clone(),
                dtype: DType::I64,
                dims: vec![3],
                data: TensorData::from_i64(&widths),
            });
            split.inputs.push(s_name);
        } else {
            split.attrs.insert("split".to_string(), Attr::Ints(widths));
        }
        before.push((split_name, pre));
        // Bias-less projections whose MatMul feeds an Add keep it (the Add reads the Split).
        let removed = if with_bias {
            rest
        } else {
            ps.iter()
                .map(|p| p.matmul)
                .filter(|&k| k != anchor)
                .collect()
        };
        rewrites.push(Rewrite {
            anchor,
            node: split,
            removed,
        });
    }
    let count = apply(graph, rewrites);
    for (split, pre) in before {
        if let Some(at) = graph.nodes.iter().position(|n| n.name == split) {
            graph.nodes.splice(at..at, pre);
        }
    }
    graph.initializers.extend(new_inits);
    count
}

#[cfg(test)]
mod tests {
    use ferry_ir::{Dim, Value};

    use super::*;
    use crate::test_util::{graph, init, node};

    fn bsh(h: i64) -> Vec<Dim> {
        vec![Dim::Sym("b".into()), Dim::Sym("s".into()), Dim::Fixed(h)]
    }

    /// ferry's RMSNorm of `x` (and Gemma's `1 + w` form), its output `y`.
    fn rms_graph(plus_one: bool) -> Graph {
        let mut nodes = vec![
            node("Pow", &["x", "two"], &["sq"], vec![]),
            node(
                "ReduceMean",
                &["sq"],
                &["var"],
                vec![("axes", Attr::Ints(vec![-1])), ("keepdims", Attr::Int(1))],
            ),
            node("Add", &["var", "eps"], &["ve"], vec![]),
            node("Sqrt", &["ve"], &["s"], vec![]),
            node("Div", &["one", "s"], &["inv"], vec![]),
            node("Mul", &["x", "inv"], &["n"], vec![]),
        ];
        if plus_one {
            nodes.push(node("Add", &["w", "one"], &["w1"], vec![]));
            nodes.push(node("Mul", &["n", "w1"], &["y"], vec![]));
        } else {
            nodes.push(node("Mul", &["w", "n"], &["y"], vec![]));
        }
        let mut g = graph(
            nodes,
            vec![
                init("two", vec![], &[2.0]),
                init("eps", vec![], &[1e-6]),
                init("one", vec![], &[1.0]),
                init("w", vec![3], &[0.5, 1.0, 2.0]),
            ],
            &["y"],
        );
        g.inputs = vec![Value::new("x", DType::F32, bsh(3))];
        g
    }

    #[test]
    fn rms_norm_fuses_with_plain_and_plus_one_weights() {
        let mut g = rms_graph(false);
        assert_eq!(fuse_simplified_layer_norm(&mut g), 1);
        assert_eq!(g.nodes.len(), 1);
        let n = &g.nodes[0];
        assert_eq!(
            (n.op_type.as_str(), n.domain.as_str()),
            ("SimplifiedLayerNormalization", "")
        );
        assert_eq!(n.inputs, ["x", "w"]);
        assert!(matches!(n.attr("epsilon"), Some(Attr::Float(e)) if *e == 1e-6));

        let mut g = rms_graph(true);
        assert_eq!(fuse_simplified_layer_norm(&mut g), 1);
        assert_eq!(g.nodes.len(), 1);
        let w = &g.nodes[0].inputs[1];
        let folded = g
            .initializers
            .iter()
            .find(|i| &i.name == w)
            .expect("folded");
        assert_eq!(folded.data.to_f32_vec().expect("f32"), [1.5, 2.0, 3.0]);
    }

    #[test]
    fn inexact_rms_norms_stay() {
        // Another exponent, a weight of the wrong length, a mean over another axis, an
        // interior value read elsewhere.
        let mut g = rms_graph(false);
        g.initializers[0] = init("two", vec![], &[3.0]);
        assert_eq!(fuse_simplified_layer_norm(&mut g), 0);
        let mut g = rms_graph(false);
        g.initializers[3] = init("w", vec![2], &[1.0, 2.0]);
        assert_eq!(fuse_simplified_layer_norm(&mut g), 0);
        let mut g = rms_graph(false);
        g.nodes[1].attrs.insert("axes".into(), Attr::Ints(vec![1]));
        assert_eq!(fuse_simplified_layer_norm(&mut g), 0);
        let mut g = rms_graph(false);
        g.outputs.push(Value::new("inv", DType::F32, vec![]));
        assert_eq!(fuse_simplified_layer_norm(&mut g), 0);
        // Gemma's Add with 2 instead of 1.
        let mut g = rms_graph(true);
        g.nodes[6].inputs[1] = "two".into();
        assert_eq!(fuse_simplified_layer_norm(&mut g), 0);
        assert_eq!(g.nodes.len(), 8);
    }

    #[test]
    fn residual_add_and_rms_norm_fuse_with_the_sum_output() {
        let mut g = rms_graph(false);
        g.inputs = vec![
            Value::new("a", DType::F32, bsh(3)),
            Value::new("b", DType::F32, bsh(3)),
        ];
        g.nodes.insert(0, node("Add", &["a", "b"], &["x"], vec![]));
        g.value_info.push(Value::new("x", DType::F32, bsh(3)));
        // The sum is also the residual stream.
        g.outputs.push(Value::new("x", DType::F32, bsh(3)));
        assert_eq!(fuse_simplified_layer_norm(&mut g), 1);
        assert_eq!(fuse_skip_simplified_layer_norm(&mut g), 1);
        assert_eq!(g.nodes.len(), 1);
        let n = &g.nodes[0];
        assert_eq!(n.op_type, "SkipSimplifiedLayerNormalization");
        assert_eq!(n.domain, crate::MS_DOMAIN);
        assert_eq!(n.inputs, ["a", "b", "w"]);
        assert_eq!(n.outputs, ["y", "", "", "x"]);
        assert!(g.opsets.iter().any(|o| o.domain == crate::MS_DOMAIN));

        // Operands of different shapes (a broadcast) stay.
        let mut g2 = rms_graph(false);
        g2.inputs = vec![
            Value::new("a", DType::F32, bsh(3)),
            Value::new("b", DType::F32, vec![Dim::Fixed(3)]),
        ];
        g2.nodes.insert(0, node("Add", &["a", "b"], &["x"], vec![]));
        assert_eq!(fuse_simplified_layer_norm(&mut g2), 1);
        assert_eq!(fuse_skip_simplified_layer_norm(&mut g2), 0);
    }

    fn qkv_graph(bias: bool, opset: i64) -> Graph {
        let mut nodes = Vec::new();
        let mut inits = Vec::new();
        let mut outs = Vec::new();
        for (p, n) in [("q", 4), ("k", 2), ("v", 2)] {
            let vals: Vec<f32> = (0..3 * n).map(|i| i as f32).collect();
            inits.push(init(&format!("w{p}"), vec![3, n], &vals));
            let mm = format!("{p}_mm");
            nodes.push(node("MatMul", &["x", &format!("w{p}")], &[&mm], vec![]));
            let out = if bias {
                inits.push(init(&format!("b{p}"), vec![n], &vec![1.0; n as usize]));
                let o = format!("{p}_out");
                nodes.push(node("Add", &[&mm, &format!("b{p}")], &[&o], vec![]));
                o
            } else {
                mm
            };
            nodes.push(node("Relu", &[&out], &[&format!("{p}_r")], vec![]));
            outs.push(format!("{p}_r"));
        }
        let outs: Vec<&str> = outs.iter().map(String::as_str).collect();
        let mut g = graph(nodes, inits, &outs);
        g.inputs = vec![Value::new("x", DType::F32, bsh(3))];
        g.opsets[0].version = opset;
        g
    }

    #[test]
    fn qkv_projections_pack_into_one_matmul_and_split() {
        for (bias, opset) in [(true, 17), (false, 11)] {
            let mut g = qkv_graph(bias, opset);
            assert_eq!(fuse_packed_qkv(&mut g), 1);
            let ops: Vec<&str> = g.nodes.iter().map(|n| n.op_type.as_str()).collect();
            let want: &[&str] = if bias {
                &["MatMul", "Add", "Split", "Relu", "Relu", "Relu"]
            } else {
                &["MatMul", "Split", "Relu", "Relu", "Relu"]
            };
            assert_eq!(ops, want);
            let w = g
                .initializers
                .iter()
                .find(|i| i.name == g.nodes[0].inputs[1])
                .expect("packed");
            assert_eq!(w.dims, [3, 8]);
            // Row 1: wq's row 1 (4..8), wk's (2..4), wv's (2..4).
            let v = w.data.to_f32_vec().expect("f32");
            assert_eq!(&v[8..16], &[4., 5., 6., 7., 2., 3., 2., 3.]);
            let split = g
                .nodes
                .iter()
                .find(|n| n.op_type == "Split")
                .expect("split");
            let want_out = if bias { "q_out" } else { "q_mm" };
            assert_eq!(split.outputs[0], want_out);
            assert_eq!(split.inputs.len(), if opset >= 13 { 2 } else { 1 });
        }
        // A fourth reader of x, or a weight that is a graph input, stays.
        let mut g = qkv_graph(true, 17);
        g.nodes.push(node("Relu", &["x"], &["xr"], vec![]));
        assert_eq!(fuse_packed_qkv(&mut g), 0);
        let mut g = qkv_graph(true, 17);
        g.inputs.push(Value::new("wk", DType::F32, vec![]));
        assert_eq!(fuse_packed_qkv(&mut g), 0);
    }
}
