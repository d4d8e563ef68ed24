//! Decoder self-attention with a key/value cache → `RotaryEmbedding` (queries and keys) +
//! `GroupQueryAttention`, declared to the [pattern matcher](crate::pattern).
//!
//! The matched block is ferry's decoder attention (transformers' eager attention): heads
//! split, rotary embedding `x·cos + rotate_half(x)·sin` over the first `r` features,
//! `Concat(past, k)` → `present`, `repeat_kv`, `softmax(q·kᵀ·scale [soft-capped] + mask)·v`,
//! heads merged. The additive mask (causal, padding and sliding window together) becomes
//! GroupQueryAttention's `attention_bias`, so every case the mask expresses stays exact;
//! the rotary embedding runs as `RotaryEmbedding` on each token's own `position_ids` (left
//! padding included) with cos/sin caches computed in the graph from the same inverse
//! frequencies the export computes (fixed, dynamic or LongRoPE alike).
//!
//! Also matched: optimum's sdpa export of the same block (the scale's square root on q and
//! on kᵀ, `Where(IsNaN)` after the softmax, bounds, head merge and mask slice computed from
//! shapes — [`fold_slice_bounds`] folds the rotary bounds first), and float16 exports (scores
//! widened for the float32 mask and softmax, probabilities narrowed back, float16 tables):
//! the fused ops then run in float16 with a narrowed, clamped mask.

use std::collections::{HashMap, HashSet};

use ferry_ir::{Attr, DType, Graph, Initializer, Node, TensorData};

use crate::GqaForm;
use crate::fuse::{
    Claimed, Index, Rewrite, apply, fused_name, input_at, int_vector, is_onnx_domain, ms_node,
    node_names, unique_name, value_names,
};
use crate::fuse_llm::is_cast_to_float;
use crate::pattern::{Match, Op, P, Pattern, init, op, shape_readers, single_f32, val};
use crate::slice_bounds::{fold_slice_bounds, known_ints};

fn is_scalar_f32(i: &Initializer) -> bool {
    single_float(i).is_some()
}

/// A float32 or float16 (`--dtype fp16` exports) initializer holding one value, that value.
fn single_float(i: &Initializer) -> Option<f32> {
    if i.dtype != DType::F16 {
        return single_f32(i);
    }
    if i.dims.iter().product::<i64>() != 1 || i.dims.len() > 1 {
        return None;
    }
    let wide = TensorData::converted(i.data.clone(), DType::F16, DType::F32)?;
    match wide.to_f32_vec().ok()?.as_slice() {
        [v] => Some(*v),
        _ => None,
    }
}

/// `Cast(·, float16)`.
fn is_cast_to_half(_: &Index<'_>, n: &Node) -> bool {
    matches!(n.attr("to"), Some(Attr::Int(10))) && n.attrs.len() == 1
}

fn has_perm(perm: &[i64]) -> impl Fn(&Node) -> bool + '_ {
    move |n: &Node| matches!(n.attr("perm"), Some(Attr::Ints(p)) if p == perm) && n.attrs.len() == 1
}

fn perm_0213(_: &Index<'_>, n: &Node) -> bool {
    has_perm(&[0, 2, 1, 3])(n)
}

fn perm_0132(_: &Index<'_>, n: &Node) -> bool {
    has_perm(&[0, 1, 3, 2])(n)
}

fn last_axis(_: &Index<'_>, n: &Node) -> bool {
    matches!(n.attr("axis"), Some(Attr::Int(-1 | 3))) && n.attrs.len() == 1
}

fn seq_axis(_: &Index<'_>, n: &Node) -> bool {
    matches!(n.attr("axis"), Some(Attr::Int(2 | -2))) && n.attrs.len() == 1
}

fn any_input() -> P {
    P::Any
}

/// A Slice of `x` (its bounds checked after the match), named `name`.
fn slice(x: P, name: &'static str) -> Op {
    op("Slice", vec![x]).min_inputs().named(name)
}

/// Names of one projection's (q or k) pattern nodes.
struct Names {
    t: &'static str,
    lo: &'static str,
    hi: &'static str,
    rot: &'static str,
    pass: &'static str,
}

const Q: Names = Names {
    t: "q_t",
    lo: "q_lo",
    hi: "q_hi",
    rot: "q_rot",
    pass: "q_pass",
};
const K: Names = Names {
    t: "k_t",
    lo: "k_lo",
    hi: "k_hi",
    rot: "k_rot",
    pass: "k_pass",
};

/// cos or sin table `[b, 1, s, r]`: `Unsqueeze(f(Concat(m, m)) [· scale])` with
/// `m = Mul(Unsqueeze(Cast(pos)), inv)`; shared by every layer, so kept (matched, not
/// removed; dead-node removal takes it once every layer is fused).
fn table(f: &'static str, name: &'static str, scale: &'static str, half: &'static str) -> P {
    let m = op(
        "Mul",
        vec![
            op(
                "Unsqueeze",
                vec![op("Cast", vec![val("pos")]).uses(None).p()],
            )
            .min_inputs()
            .uses(None)
            .p(),
            val("inv"),
        ],
    )
    .commutative()
    .uses(None)
    .named("freqs");
    // optimum: `(inv_freq[None, :, None].expand(B, -1, 1) @ pos[:, None, :]).transpose(1, 2)`,
    // through float32 → float32 Casts: a MatMul over one product, `pos · inv_freq` exactly.
    let float_cast = |x: Op| {
        let cast = |x: P| op("Cast", vec![x]).check(is_cast_to_float).uses(None).p();
        P::Either(vec![cast(cast(x.clone().p())), cast(x.clone().p()), x.p()])
    };
    let inv_col = op("Expand", vec![init("inv", is_inv_column), P::Any]).uses(None);
    let pos_row = op(
        "Cast",
        vec![
            op("Unsqueeze", vec![val("pos")])
                .min_inputs()
                .uses(None)
                .p(),
        ],
    )
    .check(is_cast_to_float)
    .uses(None);
    let mm = op("MatMul", vec![float_cast(inv_col), float_cast(pos_row)])
        .uses(None)
        .named("freqs_mm");
    let mm = op("Transpose", vec![mm.p()])
        .check(|_, n| has_perm(&[0, 2, 1])(n))
        .uses(None)
        .named("freqs");
    let m = P::Either(vec![m.p(), mm.p()]);
    let emb = op("Concat", vec![m.clone(), m])
        .check(last_axis)
        .uses(None)
        .named("emb");
    let trig = op(f, vec![emb.p()]).uses(None);
    let scaled = op("Mul", vec![trig.clone().p(), init(scale, is_scalar_f32)])
        .commutative()
        .uses(None);
    let computed = P::Either(vec![scaled.p(), trig.p()]);
    // Narrowed to float16 (`--dtype fp16` exports compute the tables in float32).
    let narrowed = op("Cast", vec![computed.clone()])
        .check(is_cast_to_half)
        .uses(None)
        .named(half);
    let scaled = op("Cast", vec![computed])
        .check(is_cast_to_float)
        .optional()
        .uses(None);
    op("Unsqueeze", vec![P::Either(vec![narrowed.p(), scaled.p()])])
        .min_inputs()
        .kept()
        .named(name)
        .p()
}

/// optimum's `inv_freq[None, :, None]`: a float32 `[1, n, 1]` initializer.
fn is_inv_column(i: &Initializer) -> bool {
    i.dtype == DType::F32 && i.dims.len() == 3 && i.dims[0] == 1 && i.dims[2] == 1
}

/// `x·cos + rotate_half(x)·sin`, `rotate_half(x) = Concat(−x[r/2:], x[:r/2])`.
fn rope_core(x: &dyn Fn() -> P, n: &Names) -> Op {
    let half = op(
        "Concat",
        vec![
            op("Neg", vec![slice(x(), n.hi).p()]).p(),
            slice(x(), n.lo).p(),
        ],
    )
    .check(last_axis);
    op(
        "Add",
        vec![
            op(
                "Mul",
                vec![x(), table("Cos", "cos", "cos_scale", "cos_half")],
            )
            .commutative()
            .p(),
            op(
                "Mul",
                vec![half.p(), table("Sin", "sin", "sin_scale", "sin_half")],
            )
            .commutative()
            .p(),
        ],
    )
    .commutative()
}

/// The rotary embedding of the heads `Transpose(x4d, [0, 2, 1, 3])`, whole or over the
/// first `r` features (the rest concatenated back, Phi-3's partial rotary): `(whole,
/// partial)`.
fn rope_ops(n: &Names, x4d: &'static str) -> (Op, Op) {
    let full_x = || {
        op("Transpose", vec![val(x4d)])
            .check(perm_0213)
            .uses(Some(3))
            .named(n.t)
            .p()
    };
    let rot_x = || slice(heads_t(x4d, n.t), n.rot).uses(Some(3)).p();
    let full = rope_core(&full_x, n);
    let partial = op(
        "Concat",
        vec![
            rope_core(&rot_x, n).p(),
            slice(heads_t(x4d, n.t), n.pass).p(),
        ],
    )
    .check(last_axis);
    (full, partial)
}

/// [`rope_ops`], either form.
fn rope(n: &Names, x4d: &'static str) -> P {
    let (full, partial) = rope_ops(n, x4d);
    P::Either(vec![full.p(), partial.p()])
}

/// `Transpose(x4d, [0, 2, 1, 3])` read by the two slices of a partial rotary.
fn heads_t(x4d: &'static str, name: &'static str) -> P {
    op("Transpose", vec![val(x4d)])
        .check(perm_0213)
        .uses(Some(2))
        .named(name)
        .p()
}

/// `Concat(past, new)` on the sequence axis: the present key/value (a graph output).
fn present(past: &'static str, new: P, name: &'static str) -> Op {
    op("Concat", vec![val(past), new])
        .check(seq_axis)
        .uses(None)
        .named(name)
}

/// `repeat_kv(x)`: `Reshape(Expand(Unsqueeze(x, 2), reps), [0, heads, -1, hd])`, or `x`.
fn repeated(x: Op, name: &'static str) -> P {
    let rep = op(
        "Reshape",
        vec![
            op(
                "Expand",
                vec![
                    op("Unsqueeze", vec![x.clone().p()]).min_inputs().p(),
                    any_input(),
                ],
            )
            .p(),
            any_input(),
        ],
    )
    .shape_readers()
    .named(name);
    P::Either(vec![rep.p(), x.p()])
}

fn attention_pattern() -> Pattern {
    let k_present = present("past_k", rope(&K, "k4d"), "present_k");
    let v_present = present(
        "past_v",
        op("Transpose", vec![val("v4d")]).check(perm_0213).p(),
        "present_v",
    );
    let kt = op("Transpose", vec![repeated(k_present, "k_rep")]).check(perm_0132);
    let scores = op(
        "Mul",
        vec![
            op("MatMul", vec![rope(&Q, "q4d"), kt.clone().p()]).p(),
            init("scale", is_scalar_f32),
        ],
    )
    .commutative()
    .named("scores");
    // optimum (sdpa): the scale's square root on q and on kᵀ, `(q·√s)·(kᵀ·√s)`.
    let split_scale = op(
        "MatMul",
        vec![
            op("Mul", vec![rope(&Q, "q4d"), init("q_scale", is_scalar_f32)])
                .commutative()
                .p(),
            op("Mul", vec![kt.p(), init("k_scale", is_scalar_f32)])
                .commutative()
                .p(),
        ],
    )
    .named("scores");
    let scores = P::Either(vec![scores.p(), split_scale.p()]);
    let capped = op(
        "Mul",
        vec![
            op(
                "Tanh",
                vec![op("Div", vec![scores.clone(), init("cap", is_scalar_f32)]).p()],
            )
            .p(),
            init("cap", is_scalar_f32),
        ],
    )
    .commutative()
    .named("softcap");
    // A float16 export adds the float32 mask to the scores widened to float32.
    let scored = P::Either(vec![capped.p(), scores]);
    let widened = op("Cast", vec![scored.clone()])
        .check(is_cast_to_float)
        .named("to_float");
    let masked = op(
        "Add",
        vec![P::Either(vec![widened.p(), scored]), val("mask")],
    );
    let softmax = op("Softmax", vec![masked.p()])
        .check(last_axis)
        .named("probs");
    // optimum: `Where(IsNaN(p), 0, p)` (rows with every key masked); GroupQueryAttention
    // gives those rows 0 too.
    let guarded = op(
        "Where",
        vec![
            op("IsNaN", vec![softmax.clone().uses(Some(2)).p()]).p(),
            init("nan_zero", |i| single_f32(i) == Some(0.0)),
            softmax.clone().uses(Some(2)).p(),
        ],
    );
    let probs = P::Either(vec![guarded.p(), softmax.p()]);
    // … and narrows the probabilities back to float16.
    let narrowed = op("Cast", vec![probs.clone()])
        .check(is_cast_to_half)
        .named("to_half");
    let probs = P::Either(vec![narrowed.p(), probs]);
    let ctx = op("MatMul", vec![probs, repeated(v_present, "v_rep")]);
    let merged = op("Transpose", vec![ctx.p()]).check(perm_0213);
    Pattern::new(op("Reshape", vec![merged.p(), val("merge")]))
}

/// `(start, end)` of a bound Slice on the last axis (`axes` −1 or 3).
fn bounds(ix: &Index<'_>, m: &Match, name: &str) -> Option<(i64, i64)> {
    let n = &ix.graph.nodes[m.node(name)?];
    if n.inputs.len() != 4 && n.inputs.len() != 5 {
        return None;
    }
    let one = |k: usize| match int_vector(ix, &n.inputs[k])?.as_slice() {
        [v] => Some(*v),
        _ => None,
    };
    if !matches!(one(3)?, -1 | 3) || (n.inputs.len() == 5 && one(4)? != 1) {
        return None;
    }
    Some((one(1)?, one(2)?))
}

/// The rotary width `r` of one projection, when its slices are exactly `rotate_half` over
/// the first `r` of `hd` features.
fn rotary_width(ix: &Index<'_>, m: &Match, n: &Names, hd: i64) -> Option<i64> {
    let r = match m.node(n.rot) {
        None => hd,
        Some(_) => {
            let (s, e) = bounds(ix, m, n.rot)?;
            let (ps, pe) = bounds(ix, m, n.pass)?;
            (s == 0 && ps == e && pe >= hd && e < hd).then_some(e)?
        }
    };
    let (ls, le) = bounds(ix, m, n.lo)?;
    let (hs, he) = bounds(ix, m, n.hi)?;
    (r > 0 && r % 2 == 0 && ls == 0 && le == r / 2 && hs == r / 2 && he >= r).then_some(r)
}

/// A matched attention block.
struct Gqa {
    heads: i64,
    kv_heads: i64,
    rotary: i64,
    scale: f32,
    softcap: Option<f32>,
    /// The `present.*` key and value outputs GroupQueryAttention takes over.
    present: [String; 2],
    /// `Gather(Shape(repeat_kv(key)), 2)` nodes (optimum's mask slice): `(Shape, Gather)`
    /// indices, re-pointed to `Shape(attention_mask)[1]`.
    key_length_readers: Vec<(usize, usize)>,
    /// A float16 block: the float32 mask is narrowed for `attention_bias`.
    half: bool,
    removed: Vec<usize>,
    m: Match,
}

fn match_gqa(ix: &Index<'_>, pat: &Pattern, i: usize) -> Option<Gqa> {
    let m = pat.at(ix, i)?;
    let past = ix.shapes.get(m.value("past_k"))?;
    let (kv_heads, hd) = match past {
        [_, h, _, d] => (h.fixed()?, d.fixed()?),
        _ => return None,
    };
    if ix.shapes.get(m.value("past_v")) != Some(past) {
        return None;
    }
    let width = merged_width(ix, &m)?;
    let width = &width;
    // ONNX Runtime's kernel takes head sizes that are multiples of 8 only.
    if hd <= 0 || hd % 8 != 0 || width % hd != 0 || (width / hd) % kv_heads != 0 {
        return None;
    }
    let heads = width / hd;
    // GroupQueryAttention's attention_bias: (B or 1, N or 1, S, T).
    let mask_ok = mask_ok(ix, m.value("mask"), heads);
    let rq = rotary_width(ix, &m, &Q, hd)?;
    let rk = rotary_width(ix, &m, &K, hd)?;
    if !mask_ok || rq != rk || m.value("pos").is_empty() {
        return None;
    }
    let scalar = |name: &str| single_float(ix.inits.get(m.value(name))?);
    // float16: scores widened for the float32 mask and softmax, probabilities narrowed
    // back, float16 cos/sin tables; float32: none of these.
    let half = m.node("to_half").is_some();
    if (half && m.node("to_float").is_none()) || half_tables(&m) != Some(half) {
        return None;
    }
    let scale = match scalar("scale") {
        Some(s) => s,
        // `(q·a)·(kᵀ·b)` = `(q·kᵀ)·(a·b)` up to float rounding.
        None => scalar("q_scale")? * scalar("k_scale")?,
    };
    let key_length_readers = key_length_readers(ix, &m)?;
    let softcap = match m.node("softcap") {
        Some(_) => Some(scalar("cap").filter(|c| *c > 0.0)?),
        None => None,
    };
    let (pk, pv) = (m.node("present_k")?, m.node("present_v")?);
    let present = [pk, pv].map(|k| ix.graph.nodes[k].outputs[0].clone());
    // Every matched node but the shared cos/sin tables: each is read only inside the block
    // (the present Concats' other reader is the graph output GroupQueryAttention takes).
    let removed = m.interior.clone();
    Some(Gqa {
        heads,
        kv_heads,
        rotary: rq,
        scale,
        softcap,
        key_length_readers,
        half,
        present,
        removed,
        m,
    })
}

/// The width `N·hd` the heads are merged into: a constant `[0, 0, N·hd]` (ferry), or (optimum's
/// `[B, S, -1]` from shapes) the root's inferred `[B, S, N·hd]` with the queries' own batch
/// and sequence dims.
fn merged_width(ix: &Index<'_>, m: &Match) -> Option<i64> {
    if let Some(merge) = int_vector(ix, m.value("merge")) {
        return match merge.as_slice() {
            [0, 0, w] => Some(*w),
            _ => None,
        };
    }
    let known = known_ints(ix, m.value("merge"))?;
    let out = ix.shapes.get(ix.graph.nodes[m.root].outputs[0].as_str())?;
    let q = ix.shapes.get(m.value("q4d"))?;
    match (known.as_slice(), out) {
        ([_, _, Some(-1)], [b, s, w]) if q.len() == 4 && *b == q[0] && *s == q[1] => w.fixed(),
        _ => None,
    }
}

/// Whether the additive mask `v` can be GroupQueryAttention's `attention_bias` `(B or 1, N
/// or 1, S, T)`: its inferred shape says so, or it is optimum's `Where(Slice(Expand(m,
/// [B, 1, S, T]), …, axes [3]), 0, -inf)` (torch's `expand(B, -1, S, T)` of the boolean
/// mask, sliced on the key axis; dims 1 of `m` is 1 or N, as the scores' Add requires).
fn mask_ok(ix: &Index<'_>, v: &str, heads: i64) -> bool {
    if let Some(s) = ix.shapes.get(v) {
        return s.len() == 4 && (s[1].fixed() == Some(1) || s[1].fixed() == Some(heads));
    }
    let node = |v: &str, op: &str| {
        let n = &ix.graph.nodes[*ix.producer.get(v)?];
        (n.op_type == op && is_onnx_domain(n)).then_some(n)
    };
    let Some(w) = node(v, "Where").filter(|w| w.inputs.len() == 3) else {
        return false;
    };
    let Some(sl) = node(&w.inputs[0], "Slice").filter(|s| s.inputs.len() >= 4) else {
        return false;
    };
    let zero = ix
        .inits
        .get(w.inputs[1].as_str())
        .and_then(|i| single_f32(i))
        == Some(0.0);
    let ninf = ix
        .inits
        .get(w.inputs[2].as_str())
        .and_then(|i| single_f32(i))
        == Some(f32::NEG_INFINITY);
    let last =
        known_ints(ix, &sl.inputs[3]).is_some_and(|a| matches!(a.as_slice(), [Some(3 | -1)]));
    let expanded = node(&sl.inputs[0], "Expand").is_some_and(|e| {
        known_ints(ix, input_at(e, 1)).is_some_and(|t| {
            t.len() == 4
                && t[1] == Some(1)
                && t[2].is_none_or(|d| d > 1)
                && t[3].is_none_or(|d| d > 1)
        }) && ix.shapes.get(input_at(e, 0)).is_none_or(|s| s.len() <= 4)
    });
    zero && ninf && last && expanded
}

/// The `Shape` readers of the repeated key (bound `k_rep`): each must feed only `Gather`s
/// (axis 0) of index 2 — the key length, `attention_mask`'s dim 1 (as GroupQueryAttention's
/// `total_sequence_length`). `None` when one reads anything else.
fn key_length_readers(ix: &Index<'_>, m: &Match) -> Option<Vec<(usize, usize)>> {
    // The repeated values are removed: nothing may read their shape.
    if let Some(v) = m.node("v_rep")
        && !shape_readers(ix, &ix.graph.nodes[v].outputs[0]).is_empty()
    {
        return None;
    }
    let Some(rep) = m.node("k_rep") else {
        return Some(Vec::new());
    };
    let out = ix.graph.nodes[rep].outputs[0].as_str();
    let mut found = Vec::new();
    for s in shape_readers(ix, out) {
        let shape = &ix.graph.nodes[s];
        if shape.inputs.len() != 1
            || !shape.attrs.is_empty()
            || ix.graph_outputs.contains(shape.outputs[0].as_str())
        {
            return None;
        }
        for (g, n) in ix.graph.nodes.iter().enumerate() {
            if !n.inputs.contains(&shape.outputs[0]) {
                continue;
            }
            let index = known_ints(ix, input_at(n, 1));
            let ok = n.op_type == "Gather"
                && n.inputs.len() == 2
                && n.inputs[0] == shape.outputs[0]
                && matches!(n.attr("axis"), None | Some(Attr::Int(0)))
                && ix
                    .inits
                    .get(n.inputs[1].as_str())
                    .is_some_and(|i| i.dims.is_empty())
                && index.is_some_and(|i| matches!(i.as_slice(), [Some(2 | -2)]));
            if !ok {
                return None;
            }
            found.push((s, g));
        }
    }
    Some(found)
}

/// Builds nodes into `nodes`, naming values and nodes uniquely.
struct Emit<'a> {
    names: &'a mut HashSet<String>,
    values: &'a mut HashSet<String>,
    nodes: Vec<Node>,
    inits: Vec<Initializer>,
    scope: String,
}

impl Emit<'_> {
    fn node(&mut self, op: &str, inputs: Vec<String>, attrs: Vec<(&str, Attr)>) -> String {
        let name = unique_name(self.names, format!("{}/{op}", self.scope));
        let out = unique_name(self.values, format!("{name}_output_0"));
        self.nodes.push(Node {
            name,
            op_type: op.to_string(),
            domain: String::new(),
            inputs,
            outputs: vec![out.clone()],
            attrs: attrs.into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
        });
        out
    }

    /// A rank-0 int64 initializer.
    fn ints(&mut self, v: &[i64]) -> String {
        self.int_tensor(v, vec![])
    }

    /// A 1-D int64 initializer.
    fn ints_1d(&mut self, v: &[i64]) -> String {
        self.int_tensor(v, vec![v.len() as i64])
    }

    fn int_tensor(&mut self, v: &[i64], dims: Vec<i64>) -> String {
        let name = unique_name(self.values, format!("{}/const", self.scope));
        self.inits.push(Initializer {
            name: name.clone(),
            dtype: DType::I64,
            dims,
            data: TensorData::from_i64(v),
        });
        name
    }
}

/// cos/sin caches already built, by (positions, inverse frequencies, cos and sin scales).
/// Whether the matched cos/sin tables are narrowed to float16 (`None` when one is and the
/// other is not).
fn half_tables(m: &Match) -> Option<bool> {
    let (c, s) = (m.node("cos_half").is_some(), m.node("sin_half").is_some());
    (c == s).then_some(c)
}

type Caches = HashMap<(String, String, [String; 2], bool), (String, String)>;

/// The `[max(position_ids) + 1, r/2]` cos and sin caches of a matched rotary embedding,
/// computed in the graph as the export computes its tables (`positions · inv_freq`, `Cos`
/// / `Sin`, times the attention scaling): built once per (positions, frequencies, scales).
fn rotary_caches(e: &mut Emit<'_>, caches: &mut Caches, m: &Match) -> (String, String) {
    let key = (
        m.value("pos").to_string(),
        m.value("inv").to_string(),
        [
            m.value("cos_scale").to_string(),
            m.value("sin_scale").to_string(),
        ],
        half_tables(m) == Some(true),
    );
    if let Some(c) = caches.get(&key) {
        return c.clone();
    }
    let scope = std::mem::replace(&mut e.scope, "/rotary_emb/cache".to_string());
    let max = e.node(
        "ReduceMax",
        vec![key.0.clone()],
        vec![("keepdims", Attr::Int(0))],
    );
    let one = e.ints(&[1]);
    let zero = e.ints(&[0]);
    let len = e.node("Add", vec![max, one.clone()], vec![]);
    let rows = e.node("Range", vec![zero, len, one], vec![]);
    let rows = e.node("Cast", vec![rows], vec![("to", Attr::Int(1))]);
    let axis = e.ints_1d(&[1]);
    let rows = e.node("Unsqueeze", vec![rows, axis], vec![]);
    // optimum's `[1, r/2, 1]` column of inverse frequencies, flattened.
    let inv = if m.node("freqs_mm").is_some() {
        let flat = e.ints_1d(&[-1]);
        e.node("Reshape", vec![key.1.clone(), flat], vec![])
    } else {
        key.1.clone()
    };
    let freqs = e.node("Mul", vec![rows, inv], vec![]);
    let trig = |e: &mut Emit<'_>, f: &str, scale: &str| {
        let t = e.node(f, vec![freqs.clone()], vec![]);
        if scale.is_empty() {
            t
        } else {
            e.node("Mul", vec![t, scale.to_string()], vec![])
        }
    };
    let (mut cos, mut sin) = (trig(e, "Cos", &key.2[0]), trig(e, "Sin", &key.2[1]));
    // Narrowed to float16 as the export narrows its tables.
    if key.3 {
        cos = e.node("Cast", vec![cos], vec![("to", Attr::Int(10))]);
        sin = e.node("Cast", vec![sin], vec![("to", Attr::Int(10))]);
    }
    let c = (cos, sin);
    caches.insert(key, c.clone());
    e.scope = scope;
    c
}

/// The head size of a matched block (the past key's last dim).
fn head_size(ix: &Index<'_>, m: &Match) -> i64 {
    ix.shapes
        .get(m.value("past_k"))
        .and_then(|s| s.get(3).and_then(|d| d.fixed()))
        .unwrap_or(0)
}

/// What onnxruntime-genai's form of one block needs: constant inverse frequencies and
/// cos/sin scales, and the packed q/k/v value when there is one.
struct GenaiBlock {
    inv: Vec<f32>,
    scales: [f32; 2],
    max_positions: i64,
    packed: Option<String>,
}

impl GenaiBlock {
    /// The `[max_positions, r/2]` cos and sin caches as initializers, each entry computed
    /// as the export computes its tables (`f32(p) · inv[j]`, `cos`/`sin`, times the scale,
    /// in float32; narrowed to float16 for a float16 block).
    fn caches(&self, e: &mut Emit<'_>, half: bool) -> (String, String) {
        let table = |f: fn(f32) -> f32, scale: f32| -> Vec<f32> {
            let mut t = Vec::with_capacity(self.max_positions as usize * self.inv.len());
            for p in 0..self.max_positions {
                t.extend(self.inv.iter().map(|&w| f(p as f32 * w) * scale));
            }
            t
        };
        let dims = vec![self.max_positions, self.inv.len() as i64];
        let add = |e: &mut Emit<'_>, name: &str, v: Vec<f32>| {
            let name = unique_name(e.values, format!("/rotary_emb/{name}"));
            let data = TensorData::from_f32(&v);
            let (dtype, data) = match half {
                true => (
                    DType::F16,
                    TensorData::converted(data.clone(), DType::F32, DType::F16).unwrap_or(data),
                ),
                false => (DType::F32, data),
            };
            e.inits.push(Initializer {
                name: name.clone(),
                dtype,
                dims: dims.clone(),
                data,
            });
            name
        };
        let cos = add(e, "cos_cache", table(f32::cos, self.scales[0]));
        let sin = add(e, "sin_cache", table(f32::sin, self.scales[1]));
        (cos, sin)
    }
}

/// A block's [`GenaiBlock`], when its rotary covers the whole head and its frequencies
/// and scales are initializers (fixed, linear, llama3 and YaRN rope; not dynamic NTK).
fn genai_block(ix: &Index<'_>, g: &Gqa, max_positions: i64) -> Option<GenaiBlock> {
    let m = &g.m;
    let hd = head_size(ix, m);
    // ONNX Runtime's kernel rotates inside the attention for head sizes that are multiples
    // of 16 only.
    if g.rotary != hd || hd % 16 != 0 {
        return None;
    }
    let inv = ix.inits.get(m.value("inv"))?;
    if inv.dtype != DType::F32 {
        return None;
    }
    let inv = inv.data.to_f32_vec().ok()?;
    if inv.len() as i64 != hd / 2 {
        return None;
    }
    let scale = |name: &str| match m.value(name) {
        "" => Some(1.0),
        v => single_float(ix.inits.get(v)?),
    };
    Some(GenaiBlock {
        inv,
        scales: [scale("cos_scale")?, scale("sin_scale")?],
        max_positions,
        packed: packed_qkv_input(ix, g, hd),
    })
}

/// The packed `[B, S, (N + 2·kv)·hd]` projection the block's q/k/v come from: the input of
/// a `Split` (last axis, widths `N·hd, kv·hd, kv·hd`) whose three outputs are, in order,
/// the inputs of the `Reshape`s to the query, key and value heads.
fn packed_qkv_input(ix: &Index<'_>, g: &Gqa, hd: i64) -> Option<String> {
    let m = &g.m;
    let reshaped = |x: &str| {
        let n = &ix.graph.nodes[*ix.producer.get(m.value(x))?];
        (n.op_type == "Reshape" && is_onnx_domain(n)).then(|| n.inputs[0].as_str())
    };
    let qkv = [reshaped("q4d")?, reshaped("k4d")?, reshaped("v4d")?];
    let split = &ix.graph.nodes[*ix.producer.get(qkv[0])?];
    let widths = match split.inputs.get(1) {
        Some(w) if !w.is_empty() => int_vector(ix, w)?,
        _ => match split.attr("split") {
            Some(Attr::Ints(w)) => w.clone(),
            _ => return None,
        },
    };
    let ok = split.op_type == "Split"
        && is_onnx_domain(split)
        && split.outputs == qkv
        && matches!(split.attr("axis"), Some(Attr::Int(-1 | 2)))
        && widths == [g.heads * hd, g.kv_heads * hd, g.kv_heads * hd];
    ok.then(|| split.inputs[0].clone())
}

/// Removes the `position_ids` graph input when no node reads it (onnxruntime-genai's
/// GroupQueryAttention form computes positions from `attention_mask`). Returns whether it
/// was removed.
pub fn drop_unread_position_ids(graph: &mut Graph) -> bool {
    let read = graph
        .nodes
        .iter()
        .any(|n| n.inputs.iter().any(|i| i == "position_ids"))
        || graph.outputs.iter().any(|o| o.name == "position_ids");
    let before = graph.inputs.len();
    if !read {
        graph.inputs.retain(|v| v.name != "position_ids");
    }
    graph.inputs.len() != before
}

/// Fuses each decoder self-attention block with a cache (see the module docs) into
/// `com.microsoft` `RotaryEmbedding` of the queries and of the keys (3-D, `num_heads`,
/// `rotary_embedding_dim` for partial rotary; cos/sin caches `[max(position_ids) + 1, r/2]`
/// computed in the graph from the export's own inverse frequencies and scaling) and
/// `GroupQueryAttention(q, k, v, past_key, past_value, seqlens_k, total_sequence_length,
/// attention_bias = the export's additive mask)` with `num_heads`, `kv_num_heads`, `scale`
/// and `softcap`, producing the same `present.*` outputs. `total_sequence_length` is
/// `Shape(attention_mask)[1]` and `seqlens_k` is `total_sequence_length − 1` for every row
/// (int32), so the operator's own causal limit is the mask's and the mask input carries the
/// padding: exact for every non-padding token with left-padded batches. Rows of padding
/// queries (every key masked) average over all keys in the export but only over the causal
/// ones in GroupQueryAttention: their outputs (and the cache entries later layers compute
/// from them, which every real token masks) differ. Needs opset ≥ 13 and an
/// `attention_mask` graph input. Returns how many blocks were fused.
pub fn fuse_group_query_attention(graph: &mut Graph) -> usize {
    fuse_group_query_attention_as(graph, GqaForm::Exact)
}

/// [`fuse_group_query_attention`] in the given form. [`GqaForm::Genai`] writes what
/// onnxruntime-genai's model builder writes, when every matched block allows it (else the
/// exact form): the packed q/k/v projection (a `Split` of one MatMul, from
/// [`fuse_packed_qkv`](crate::fuse_packed_qkv)) as GroupQueryAttention's packed `query`
/// with `key`/`value` empty (else the three 3-D projections), the rotary inside the
/// attention (`do_rotary` 1, `rotary_interleaved` 0) with constant `[max_positions, r/2]`
/// cos/sin caches computed here from the export's constant inverse frequencies and scaling
/// (so not for dynamic-NTK or LongRoPE exports, whose frequencies depend on the sequence
/// length, nor partial rotary, nor head sizes that are not a multiple of 16, which the
/// kernel's rotary rejects), `seqlens_k = int32(ReduceSum(attention_mask, 1) − 1)`,
/// `total_sequence_length = int32(Shape(attention_mask)[1])` and no `attention_bias`: the
/// kernel's own causal limit over keys `[0, seqlens_k]` and its own positions (the prompt
/// at `0..S`, later tokens after `seqlens_k`). Exact for unpadded and right-padded rows
/// only, with no sliding window (the caller keeps the exact form for sliding-window
/// models); `position_ids` is then unread ([`drop_unread_position_ids`]).
pub fn fuse_group_query_attention_as(graph: &mut Graph, form: GqaForm) -> usize {
    let opset = graph
        .opsets
        .iter()
        .find(|o| o.domain.is_empty() || o.domain == "ai.onnx")
        .map_or(0, |o| o.version);
    let has_mask = graph.inputs.iter().any(|v| v.name == "attention_mask");
    if opset < 13 || !has_mask {
        return 0;
    }
    fold_slice_bounds(graph);
    let ix = Index::new(graph);
    let pat = attention_pattern();
    let mut names = node_names(graph);
    let mut values = value_names(graph);
    let mut taken = Claimed::default();
    let mut rewrites = Vec::new();
    let mut before: Vec<(String, Vec<Node>)> = Vec::new();
    let mut new_inits = Vec::new();
    // Shared per graph: the lengths, and the cos/sin caches per (pos, inv, scale).
    let mut lengths: Option<(String, String)> = None;
    let mut caches = Caches::new();
    let mut shared: Vec<Node> = Vec::new();
    let mut repoint: Vec<(usize, usize)> = Vec::new();
    let mut blocks = Vec::new();
    for (i, root) in graph.nodes.iter().enumerate() {
        if root.op_type != "Reshape" {
            continue;
        }
        let Some(g) = match_gqa(&ix, &pat, i) else {
            continue;
        };
        if taken.claim(i, &g.removed) {
            blocks.push((i, g));
        }
    }
    // onnxruntime-genai's form for every block or for none (one graph, one kind of lengths).
    let genai = match form {
        GqaForm::Genai { max_positions } if max_positions > 0 => blocks
            .iter()
            .map(|(_, g)| genai_block(&ix, g, max_positions))
            .collect::<Option<Vec<_>>>(),
        _ => None,
    };
    let mut constant_caches: HashMap<(String, [String; 2], bool), (String, String)> =
        HashMap::new();
    for (n, (i, g)) in blocks.into_iter().enumerate() {
        let root = &graph.nodes[i];
        repoint.extend(&g.key_length_readers);
        let m = &g.m;
        let scope = root
            .name
            .rsplit_once('/')
            .map_or("", |(s, _)| s)
            .to_string();
        let block = genai.as_ref().map(|b| &b[n]);
        let mut e = Emit {
            names: &mut names,
            values: &mut values,
            nodes: Vec::new(),
            inits: Vec::new(),
            scope: "/attention_lengths".to_string(),
        };
        let (seqlens, total) = match &lengths {
            Some(l) => l.clone(),
            None => {
                let shape = e.node("Shape", vec!["attention_mask".into()], vec![]);
                let one = e.ints(&[1]);
                let t = e.node(
                    "Gather",
                    vec![shape.clone(), one.clone()],
                    vec![("axis", Attr::Int(0))],
                );
                let total = e.node("Cast", vec![t.clone()], vec![("to", Attr::Int(6))]);
                let rows = if genai.is_some() {
                    // The builder's `ReduceSum(attention_mask, 1) − 1` per row.
                    let axes = e.ints_1d(&[1]);
                    let sum = e.node(
                        "ReduceSum",
                        vec!["attention_mask".into(), axes],
                        vec![("keepdims", Attr::Int(0))],
                    );
                    e.node("Sub", vec![sum, one], vec![])
                } else {
                    let t1 = e.node("Sub", vec![t, one], vec![]);
                    let (z, o) = (e.ints_1d(&[0]), e.ints_1d(&[1]));
                    let batch = e.node("Slice", vec![shape, z.clone(), o, z], vec![]);
                    e.node("Expand", vec![t1, batch], vec![])
                };
                let seqlens = e.node("Cast", vec![rows], vec![("to", Attr::Int(6))]);
                lengths = Some((seqlens.clone(), total.clone()));
                (seqlens, total)
            }
        };
        let flat = |e: &mut Emit<'_>| e.ints_1d(&[0, 0, -1]);
        let inputs = if let Some(b) = block {
            shared.append(&mut e.nodes);
            let key = (
                m.value("inv").to_string(),
                [
                    m.value("cos_scale").to_string(),
                    m.value("sin_scale").to_string(),
                ],
                g.half,
            );
            let (cos, sin) = match constant_caches.get(&key) {
                Some(c) => c.clone(),
                None => {
                    let c = b.caches(&mut e, g.half);
                    constant_caches.insert(key, c.clone());
                    c
                }
            };
            e.scope = scope.clone();
            let (q, k, v) = match &b.packed {
                Some(qkv) => (qkv.clone(), String::new(), String::new()),
                None => {
                    let flat = flat(&mut e);
                    let mut x3 = |x: &str| {
                        e.node(
                            "Reshape",
                            vec![m.value(x).to_string(), flat.clone()],
                            vec![],
                        )
                    };
                    (x3("q4d"), x3("k4d"), x3("v4d"))
                }
            };
            vec![
                q,
                k,
                v,
                m.value("past_k").to_string(),
                m.value("past_v").to_string(),
                seqlens,
                total,
                cos,
                sin,
            ]
        } else {
            let (cos, sin) = rotary_caches(&mut e, &mut caches, m);
            shared.append(&mut e.nodes);
            e.scope = scope.clone();
            let flat = flat(&mut e);
            let rotated = |e: &mut Emit<'_>, x4d: &str, heads: i64| {
                let x3 = e.node("Reshape", vec![x4d.to_string(), flat.clone()], vec![]);
                let name = unique_name(e.names, format!("{}/RotaryEmbedding", e.scope));
                let out = unique_name(e.values, format!("{name}_output_0"));
                let mut n = ms_node(
                    name,
                    "RotaryEmbedding",
                    vec![x3, m.value("pos").to_string(), cos.clone(), sin.clone()],
                    vec![out.clone()],
                );
                n.attrs.insert("num_heads".into(), Attr::Int(heads));
                n.attrs.insert("interleaved".into(), Attr::Int(0));
                if g.rotary != head_size(&ix, m) {
                    n.attrs
                        .insert("rotary_embedding_dim".into(), Attr::Int(g.rotary));
                }
                e.nodes.push(n);
                out
            };
            let q = rotated(&mut e, m.value("q4d"), g.heads);
            let k = rotated(&mut e, m.value("k4d"), g.kv_heads);
            // attention_bias has the queries' type: a float16 block's float32 mask narrowed,
            // clamped to float16's lowest first (a plain Cast makes float32's lowest -inf,
            // and the float16 kernel gives NaN for a row of -inf, which later layers would
            // read through the padding positions' cache entries).
            let bias = if g.half {
                let lowest = unique_name(e.values, format!("{}/half_lowest", e.scope));
                e.inits.push(Initializer {
                    name: lowest.clone(),
                    dtype: DType::F32,
                    dims: vec![],
                    data: TensorData::from_f32(&[-65504.0]),
                });
                let clamped = e.node("Max", vec![m.value("mask").to_string(), lowest], vec![]);
                e.node("Cast", vec![clamped], vec![("to", Attr::Int(10))])
            } else {
                m.value("mask").to_string()
            };
            let v = e.node("Reshape", vec![m.value("v4d").to_string(), flat], vec![]);
            vec![
                q,
                k,
                v,
                m.value("past_k").to_string(),
                m.value("past_v").to_string(),
                seqlens,
                total,
                String::new(),
                String::new(),
                String::new(),
                bias,
            ]
        };
        let name = fused_name(e.names, &root.name, "GroupQueryAttention");
        let mut node = ms_node(
            name.clone(),
            "GroupQueryAttention",
            inputs,
            vec![
                root.outputs[0].clone(),
                g.present[0].clone(),
                g.present[1].clone(),
            ],
        );
        node.attrs.insert("num_heads".into(), Attr::Int(g.heads));
        node.attrs
            .insert("kv_num_heads".into(), Attr::Int(g.kv_heads));
        node.attrs.insert("scale".into(), Attr::Float(g.scale));
        if let Some(c) = g.softcap {
            node.attrs.insert("softcap".into(), Attr::Float(c));
        }
        if block.is_some() {
            node.attrs.insert("do_rotary".into(), Attr::Int(1));
            node.attrs.insert("rotary_interleaved".into(), Attr::Int(0));
        }
        new_inits.append(&mut e.inits);
        before.push((name, e.nodes));
        rewrites.push(Rewrite {
            anchor: i,
            node,
            removed: g.removed,
        });
    }
    // The key length optimum slices its mask to: `Shape(attention_mask)[1]` (before
    // `apply`, while the indices hold).
    if !repoint.is_empty() {
        let one = unique_name(&mut values, "/attention_lengths/key_axis".to_string());
        new_inits.push(Initializer {
            name: one.clone(),
            dtype: DType::I64,
            dims: vec![],
            data: TensorData::from_i64(&[1]),
        });
        for (s, g) in repoint {
            graph.nodes[s].inputs[0] = "attention_mask".to_string();
            let out = graph.nodes[s].outputs[0].clone();
            graph.value_info.retain(|v| v.name != out);
            graph.nodes[g].inputs[1] = one.clone();
        }
    }
    let count = apply(graph, rewrites);
    // The lengths and caches read graph inputs and the positions and inverse frequencies
    // computed before the first layer: they go before the first fused block's nodes.
    if let Some((_, first)) = before.first_mut() {
        first.splice(0..0, shared);
    }
    for (name, pre) in before {
        if let Some(at) = graph.nodes.iter().position(|n| n.name == name) {
            graph.nodes.splice(at..at, pre);
        }
    }
    graph.initializers.extend(new_inits);
    count
}

/// Fuses the rotary embeddings [`fuse_group_query_attention`] left (exports without a
/// cache, head sizes its kernel rejects): `x·cos + rotate_half(x)·sin` of the heads
/// `Transpose(·, [0, 2, 1, 3])` (whole, or Phi-3's first `r` features with the rest
/// concatenated back) → `com.microsoft` `RotaryEmbedding(x, position_ids, cos_cache,
/// sin_cache)` on the 4-D `[B, N, S, hd]` heads (`interleaved` 0, `num_heads`,
/// `rotary_embedding_dim` when partial), with the same in-graph caches as
/// [`fuse_group_query_attention`]. Needs opset ≥ 13. Returns how many were fused.
pub fn fuse_rotary_embedding(graph: &mut Graph) -> usize {
    let opset = graph
        .opsets
        .iter()
        .find(|o| o.domain.is_empty() || o.domain == "ai.onnx")
        .map_or(0, |o| o.version);
    if opset < 13 {
        return 0;
    }
    fold_slice_bounds(graph);
    let ix = Index::new(graph);
    let (full, partial) = rope_ops(&Q, "q4d");
    let (full, partial) = (Pattern::new(full), Pattern::new(partial));
    let mut names = node_names(graph);
    let mut values = value_names(graph);
    let mut caches = Caches::new();
    let mut taken = Claimed::default();
    let mut e = Emit {
        names: &mut names,
        values: &mut values,
        nodes: Vec::new(),
        inits: Vec::new(),
        scope: String::new(),
    };
    let mut rewrites = Vec::new();
    for (i, root) in graph.nodes.iter().enumerate() {
        let out = root.outputs.first().map_or("", String::as_str);
        // Nodes an earlier fusion left for dead-node removal stay.
        let live = ix.consumers.contains_key(out) || ix.graph_outputs.contains(out);
        let Some(m) = live
            .then(|| full.at(&ix, i).or_else(|| partial.at(&ix, i)))
            .flatten()
        else {
            continue;
        };
        let Some(xt) = m.node(Q.t).map(|k| ix.graph.nodes[k].outputs[0].clone()) else {
            continue;
        };
        let dims = ix.shapes.get(xt.as_str()).copied().unwrap_or(&[]);
        let (Some(heads), Some(hd)) = (
            dims.get(1).and_then(|d| d.fixed()),
            dims.get(3).and_then(|d| d.fixed()),
        ) else {
            continue;
        };
        let Some(r) = rotary_width(&ix, &m, &Q, hd).filter(|_| half_tables(&m).is_some()) else {
            continue;
        };
        // RotaryEmbedding reads `position_ids` as `[batch, seq]`: positions broadcast over
        // the batch (a `[1, seq]` row) stay unfused.
        let pos = ix.shapes.get(m.value("pos")).copied().unwrap_or(&[]);
        if pos.len() != 2 || dims.first() != pos.first() {
            continue;
        }
        // The rotation's nodes go; the heads Transpose is RotaryEmbedding's input.
        let removed: Vec<usize> = m
            .interior
            .iter()
            .copied()
            .filter(|&k| Some(k) != m.node(Q.t))
            .collect();
        if !taken.claim(i, &removed) {
            continue;
        }
        let (cos, sin) = rotary_caches(&mut e, &mut caches, &m);
        let name = fused_name(e.names, &root.name, "RotaryEmbedding");
        let mut node = ms_node(
            name,
            "RotaryEmbedding",
            vec![xt, m.value("pos").to_string(), cos, sin],
            root.outputs.clone(),
        );
        node.attrs.insert("interleaved".into(), Attr::Int(0));
        node.attrs.insert("num_heads".into(), Attr::Int(heads));
        if r != hd {
            node.attrs
                .insert("rotary_embedding_dim".into(), Attr::Int(r));
        }
        rewrites.push(Rewrite {
            anchor: i,
            node,
            removed,
        });
    }
    let (shared, inits) = (e.nodes, e.inits);
    let count = apply(graph, rewrites);
    if let Some(at) = graph
        .nodes
        .iter()
        .position(|n| n.op_type == "RotaryEmbedding")
    {
        graph.nodes.splice(at..at, shared);
    }
    graph.initializers.extend(inits);
    count
}

#[cfg(test)]
mod tests {
    use ferry_ir::{Dim, Value};

    use super::*;
    use crate::test_util::{graph, init, node};

    fn ints(name: &str, v: &[i64]) -> Initializer {
        Initializer {
            name: name.into(),
            dtype: DType::I64,
            dims: vec![v.len() as i64],
            data: TensorData::from_i64(v),
        }
    }

    fn axis(a: i64) -> Vec<(&'static str, Attr)> {
        vec![("axis", Attr::Int(a))]
    }

    fn perm(p: &[i64]) -> Vec<(&'static str, Attr)> {
        vec![("perm", Attr::Ints(p.to_vec()))]
    }

    /// ferry's decoder attention for one layer (no repeat_kv: 2 heads, 2 kv heads, head
    /// size `hd`), from `q4d`/`k4d`/`v4d` `[B, S, 2, hd]` graph inputs.
    fn attention_graph(hd: i64) -> Graph {
        let h = hd / 2;
        let mut nodes = vec![
            node(
                "Cast",
                &["position_ids"],
                &["pf"],
                vec![("to", Attr::Int(1))],
            ),
            node("Unsqueeze", &["pf", "ax2"], &["pu"], vec![]),
            node("Mul", &["pu", "inv"], &["freqs"], vec![]),
            node("Concat", &["freqs", "freqs"], &["emb"], axis(-1)),
            node("Cos", &["emb"], &["cos0"], vec![]),
            node("Unsqueeze", &["cos0", "ax1"], &["cos"], vec![]),
            node("Sin", &["emb"], &["sin0"], vec![]),
            node("Unsqueeze", &["sin0", "ax1"], &["sin"], vec![]),
        ];
        for x in ["q", "k"] {
            let n = |s: &str| format!("{x}_{s}");
            let (t, lo, hi, neg, half, a, b, r) = (
                n("t"),
                n("lo"),
                n("hi"),
                n("neg"),
                n("half"),
                n("a"),
                n("b"),
                n("rot"),
            );
            nodes.extend([
                node(
                    "Transpose",
                    &[&format!("{x}4d")],
                    &[&t],
                    perm(&[0, 2, 1, 3]),
                ),
                node("Slice", &[&t, "zero", "h", "last"], &[&lo], vec![]),
                node("Slice", &[&t, "h", "hd", "last"], &[&hi], vec![]),
                node("Neg", &[&hi], &[&neg], vec![]),
                node("Concat", &[&neg, &lo], &[&half], axis(-1)),
                node("Mul", &[&t, "cos"], &[&a], vec![]),
                node("Mul", &[&half, "sin"], &[&b], vec![]),
                node("Add", &[&a, &b], &[&r], vec![]),
            ]);
        }
        nodes.extend([
            node("Concat", &["past_k", "k_rot"], &["present_k"], axis(2)),
            node("Transpose", &["v4d"], &["v_t"], perm(&[0, 2, 1, 3])),
            node("Concat", &["past_v", "v_t"], &["present_v"], axis(2)),
            node("Transpose", &["present_k"], &["kt"], perm(&[0, 1, 3, 2])),
            node("MatMul", &["q_rot", "kt"], &["qk"], vec![]),
            node("Mul", &["qk", "scale"], &["s"], vec![]),
            node("Add", &["s", "mask"], &["sm"], vec![]),
            node("Softmax", &["sm"], &["p"], axis(-1)),
            node("MatMul", &["p", "present_v"], &["ctx"], vec![]),
            node("Transpose", &["ctx"], &["ctx_t"], perm(&[0, 2, 1, 3])),
            node("Reshape", &["ctx_t", "merge"], &["out"], vec![]),
        ]);
        let mut g = graph(
            nodes,
            vec![
                init("inv", vec![h], &vec![0.5; h as usize]),
                init("scale", vec![], &[0.25]),
                ints("ax1", &[1]),
                ints("ax2", &[2]),
                ints("zero", &[0]),
                ints("h", &[h]),
                ints("hd", &[hd]),
                ints("last", &[-1]),
                ints("merge", &[0, 0, 2 * hd]),
            ],
            &["out", "present_k", "present_v"],
        );
        let (b, s, p, t) = (
            Dim::sym("batch"),
            Dim::sym("seq"),
            Dim::sym("past"),
            Dim::sym("total"),
        );
        let heads = |seq: &Dim| vec![b.clone(), Dim::Fixed(2), seq.clone(), Dim::Fixed(hd)];
        let bsnh = vec![b.clone(), s.clone(), Dim::Fixed(2), Dim::Fixed(hd)];
        g.inputs = vec![
            Value::new("q4d", DType::F32, bsnh.clone()),
            Value::new("k4d", DType::F32, bsnh.clone()),
            Value::new("v4d", DType::F32, bsnh),
            Value::new("past_k", DType::F32, heads(&p)),
            Value::new("past_v", DType::F32, heads(&p)),
            Value::new("position_ids", DType::I64, vec![b.clone(), s.clone()]),
            Value::new("attention_mask", DType::I64, vec![b.clone(), t.clone()]),
            Value::new("mask", DType::F32, vec![b, Dim::Fixed(1), s, t]),
        ];
        g
    }

    fn gqa_node(g: &Graph) -> &Node {
        g.nodes
            .iter()
            .find(|n| n.op_type == "GroupQueryAttention")
            .expect("fused")
    }

    #[test]
    fn decoder_attention_becomes_rotary_embeddings_and_group_query_attention() {
        let mut g = attention_graph(8);
        assert_eq!(fuse_group_query_attention(&mut g), 1);
        let gqa = gqa_node(&g);
        assert_eq!(gqa.domain, crate::MS_DOMAIN);
        assert_eq!(gqa.outputs, ["out", "present_k", "present_v"]);
        assert_eq!(&gqa.inputs[3..5], ["past_k", "past_v"]);
        assert_eq!(gqa.inputs[10], "mask");
        assert!(matches!(gqa.attr("num_heads"), Some(Attr::Int(2))));
        assert!(matches!(gqa.attr("kv_num_heads"), Some(Attr::Int(2))));
        assert!(matches!(gqa.attr("scale"), Some(Attr::Float(s)) if *s == 0.25));
        let rotary: Vec<&Node> = g
            .nodes
            .iter()
            .filter(|n| n.op_type == "RotaryEmbedding")
            .collect();
        assert_eq!(rotary.len(), 2);
        assert_eq!(rotary[0].inputs[1], "position_ids");
        assert!(rotary[0].attr("rotary_embedding_dim").is_none());
        // Every node reads values produced before it.
        let mut seen: std::collections::HashSet<&str> = g
            .inputs
            .iter()
            .map(|v| v.name.as_str())
            .chain(g.initializers.iter().map(|i| i.name.as_str()))
            .collect();
        for n in &g.nodes {
            for i in n.inputs.iter().filter(|i| !i.is_empty()) {
                assert!(seen.contains(i.as_str()), "{} reads {i} first", n.name);
            }
            seen.extend(n.outputs.iter().map(String::as_str));
        }
        // The present concatenations are gone; the rest is left for dead-node removal.
        assert!(
            !g.nodes
                .iter()
                .any(|n| n.outputs == ["present_k"] && n.op_type == "Concat")
        );
    }

    /// [`attention_graph`] as optimum's sdpa export writes it: the scale's square root on q
    /// and on kᵀ, `Where(IsNaN(p), 0, p)` after the softmax, and the queries' rotate_half
    /// bounds computed from the heads' shape (`Unsqueeze(Div(Gather(Shape(q_t), 3), 2))`).
    fn optimum_attention_graph(hd: i64) -> Graph {
        let mut g = attention_graph(hd);
        let at = |g: &Graph, out: &str| {
            g.nodes
                .iter()
                .position(|n| n.outputs == [out])
                .expect("node")
        };
        let mm = at(&g, "qk");
        g.nodes.splice(
            mm..mm + 2,
            [
                node("Mul", &["q_rot", "half_scale"], &["q_sc"], vec![]),
                node("Mul", &["kt", "half_scale"], &["k_sc"], vec![]),
                node("MatMul", &["q_sc", "k_sc"], &["s"], vec![]),
            ],
        );
        let sm = at(&g, "p");
        g.nodes[sm].outputs = vec!["p0".into()];
        g.nodes.splice(
            sm + 1..sm + 1,
            [
                node("IsNaN", &["p0"], &["nan"], vec![]),
                node("Where", &["nan", "fzero", "p0"], &["p"], vec![]),
            ],
        );
        let t = at(&g, "q_t");
        g.nodes.splice(
            t + 1..t + 1,
            [
                node("Shape", &["q_t"], &["q_shape"], vec![]),
                node("Gather", &["q_shape", "three"], &["q_d"], axis(0)),
                node("Div", &["q_d", "two"], &["q_h"], vec![]),
                node("Unsqueeze", &["q_h", "ax0"], &["q_hv"], vec![]),
            ],
        );
        for n in g.nodes.iter_mut().filter(|n| n.inputs[0] == "q_t") {
            for i in n.inputs.iter_mut().filter(|i| *i == "h") {
                *i = "q_hv".into();
            }
        }
        g.initializers.extend([
            init("half_scale", vec![], &[0.5]),
            init("fzero", vec![1], &[0.0]),
            ints("ax0", &[0]),
        ]);
        for (name, v) in [("three", 3), ("two", 2)] {
            g.initializers.push(Initializer {
                name: name.into(),
                dtype: DType::I64,
                dims: vec![],
                data: TensorData::from_i64(&[v]),
            });
        }
        crate::infer_shapes(&mut g);
        g
    }

    #[test]
    fn optimum_attention_fuses_as_ferrys() {
        let mut g = optimum_attention_graph(8);
        assert_eq!(fuse_group_query_attention(&mut g), 1);
        let gqa = gqa_node(&g);
        // √s · √s.
        assert!(matches!(gqa.attr("scale"), Some(Attr::Float(s)) if *s == 0.25));
        assert_eq!(gqa.outputs, ["out", "present_k", "present_v"]);
        // The shape-derived bounds were folded and their nodes removed.
        assert!(
            !g.nodes
                .iter()
                .any(|n| n.op_type == "Shape" && n.inputs == ["q_t"])
        );
        // Bounds from a shape whose last dim is not the head size's half, and a guard that
        // is not `Where(IsNaN(p), 0, p)`, stay unfused.
        for (name, data) in [
            ("two", TensorData::from_i64(&[4])),
            ("fzero", TensorData::from_f32(&[1.0])),
        ] {
            let mut g = optimum_attention_graph(8);
            let i = g.initializers.iter_mut().find(|i| i.name == name);
            i.expect("initializer").data = data;
            assert_eq!(fuse_group_query_attention(&mut g), 0, "{name}");
        }
    }

    #[test]
    fn genai_form_rotates_inside_with_constant_caches() {
        let genai = GqaForm::Genai { max_positions: 8 };
        let mut g = attention_graph(16);
        assert_eq!(fuse_group_query_attention_as(&mut g, genai), 1);
        let gqa = gqa_node(&g);
        assert!(matches!(gqa.attr("do_rotary"), Some(Attr::Int(1))));
        assert!(matches!(gqa.attr("rotary_interleaved"), Some(Attr::Int(0))));
        assert_eq!(gqa.inputs.len(), 9, "no attention_bias");
        assert!(!g.nodes.iter().any(|n| n.op_type == "RotaryEmbedding"));
        // Lengths from the mask's row sums.
        let seqlens = g.nodes.iter().find(|n| n.outputs[0] == gqa.inputs[5]);
        let sub = g
            .nodes
            .iter()
            .find(|n| n.outputs[0] == seqlens.expect("cast").inputs[0]);
        let sum = g
            .nodes
            .iter()
            .find(|n| n.outputs[0] == sub.expect("sub").inputs[0]);
        assert_eq!(sum.expect("sum").op_type, "ReduceSum");
        // cos(p · 0.5), p < 8, for each of the 8 frequencies.
        let cos = g.initializers.iter().find(|i| i.name == gqa.inputs[7]);
        let cos = cos.expect("constant cache");
        assert_eq!(cos.dims, [8, 8]);
        let v = cos.data.to_f32_vec().expect("f32");
        assert_eq!(v[3 * 8 + 5], (3.0f32 * 0.5).cos());
        crate::remove_dead_nodes(&mut g);
        assert!(drop_unread_position_ids(&mut g));
        assert!(!g.inputs.iter().any(|v| v.name == "position_ids"));
        // Head size 8 (the kernel's rotary takes multiples of 16): the exact form.
        let mut g = attention_graph(8);
        assert_eq!(fuse_group_query_attention_as(&mut g, genai), 1);
        assert!(gqa_node(&g).attr("do_rotary").is_none());
        assert_eq!(gqa_node(&g).inputs[10], "mask");
    }

    #[test]
    fn inexact_or_unsupported_attention_stays() {
        // Head size 12 (not a multiple of 8): GroupQueryAttention stays, the rotary fuses.
        let mut g = attention_graph(12);
        assert_eq!(fuse_group_query_attention(&mut g), 0);
        assert_eq!(
            fuse_rotary_embedding(&mut g),
            0,
            "no [B, N, S, hd] shapes known"
        );
        crate::infer_shapes(&mut g);
        assert_eq!(fuse_rotary_embedding(&mut g), 2);
        // Positions broadcast over the batch ([1, seq], ModernBERT's `arange(seq)[None]`):
        // RotaryEmbedding reads [batch, seq] position_ids, so the rotary stays.
        let mut g = attention_graph(12);
        for v in g.inputs.iter_mut().filter(|v| v.name == "position_ids") {
            v.shape = Some(vec![Dim::Fixed(1), Dim::sym("seq")]);
        }
        crate::infer_shapes(&mut g);
        assert_eq!(fuse_rotary_embedding(&mut g), 0);
        // rotate_half with its halves swapped is another function.
        let mut g = attention_graph(8);
        for n in g.nodes.iter_mut().filter(|n| n.op_type == "Concat") {
            if n.inputs[0].ends_with("neg") {
                n.inputs.swap(0, 1);
            }
        }
        assert_eq!(fuse_group_query_attention(&mut g), 0);
        // No attention_mask input to compute the lengths from.
        let mut g = attention_graph(8);
        g.inputs.retain(|v| v.name != "attention_mask");
        assert_eq!(fuse_group_query_attention(&mut g), 0);
        // A softmax over another axis.
        let mut g = attention_graph(8);
        for n in g.nodes.iter_mut().filter(|n| n.op_type == "Softmax") {
            n.attrs.insert("axis".into(), Attr::Int(2));
        }
        assert_eq!(fuse_group_query_attention(&mut g), 0);
    }
}
