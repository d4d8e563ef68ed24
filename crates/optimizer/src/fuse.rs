//! Exact-rewrite fusions into ONNX Runtime's contrib ops (domain `com.microsoft`): a pattern
//! is rewritten only when it matches exactly (op types, constant values, shapes, and no other
//! consumer of any value the rewrite removes); anything else is left alone.

use std::collections::{HashMap, HashSet};

use ferry_ir::{Attr, DType, Dim, Graph, Initializer, Node, OpsetImport};

use crate::pattern::{
    Match, Op, P, Pattern, i64_values, init, is_f32_matrix, is_f32_scalar, is_f32_vector, op,
    rank0_f32, rank0_i64, val,
};

/// ONNX Runtime's contrib-op domain.
pub const MS_DOMAIN: &str = "com.microsoft";

pub(crate) fn is_onnx_domain(n: &Node) -> bool {
    n.domain.is_empty() || n.domain == "ai.onnx"
}

/// Input `k` of `n`, or `""` (an omitted input, which no matcher accepts as a value) when
/// `n` has fewer inputs: matchers read a node's operands without trusting its arity.
pub(crate) fn input_at(n: &Node, k: usize) -> &str {
    n.inputs.get(k).map_or("", String::as_str)
}

/// Output `k` of `n`, or `""` when `n` has fewer outputs.
pub(crate) fn output_at(n: &Node, k: usize) -> &str {
    n.outputs.get(k).map_or("", String::as_str)
}

/// Who produces and who reads each value, and what is known about it.
pub(crate) struct Index<'g> {
    pub(crate) graph: &'g Graph,
    pub(crate) producer: HashMap<&'g str, usize>,
    pub(crate) consumers: HashMap<&'g str, usize>,
    pub(crate) graph_outputs: HashSet<&'g str>,
    /// Initializers that are not overridable graph inputs.
    pub(crate) inits: HashMap<&'g str, &'g Initializer>,
    pub(crate) shapes: HashMap<&'g str, &'g [Dim]>,
}

impl<'g> Index<'g> {
    pub(crate) fn new(graph: &'g Graph) -> Self {
        let mut producer = HashMap::new();
        let mut consumers: HashMap<&str, usize> = HashMap::new();
        for (i, n) in graph.nodes.iter().enumerate() {
            for o in n.outputs.iter().filter(|o| !o.is_empty()) {
                producer.insert(o.as_str(), i);
            }
            for input in n.inputs.iter().filter(|s| !s.is_empty()) {
                *consumers.entry(input.as_str()).or_default() += 1;
            }
        }
        let graph_inputs: HashSet<&str> = graph.inputs.iter().map(|v| v.name.as_str()).collect();
        let inits = graph
            .initializers
            .iter()
            .filter(|i| !graph_inputs.contains(i.name.as_str()))
            .map(|i| (i.name.as_str(), i))
            .collect();
        let shapes = graph
            .inputs
            .iter()
            .chain(&graph.outputs)
            .chain(&graph.value_info)
            .filter_map(|v| Some((v.name.as_str(), v.shape.as_deref()?)))
            .collect();
        Self {
            graph,
            producer,
            consumers,
            graph_outputs: graph.outputs.iter().map(|v| v.name.as_str()).collect(),
            inits,
            shapes,
        }
    }

    /// The default-domain node of type `op` producing `value`, with its index.
    pub(crate) fn producer(&self, value: &str, op: &str) -> Option<(usize, &'g Node)> {
        let &i = self.producer.get(value)?;
        let n = &self.graph.nodes[i];
        (n.op_type == op && is_onnx_domain(n)).then_some((i, n))
    }

    /// Whether `value` is read by exactly one node input and is not a graph output, so the
    /// node producing it can go once that reader is rewritten.
    pub(crate) fn single_use(&self, value: &str) -> bool {
        self.consumers.get(value) == Some(&1) && !self.graph_outputs.contains(value)
    }

    /// Whether `value` is a 1-D float32 initializer of `len` elements.
    pub(crate) fn is_vector(&self, value: &str, len: i64) -> bool {
        self.inits
            .get(value)
            .is_some_and(|i| i.dtype == DType::F32 && i.dims == [len])
    }

    /// The last dimension of `value`, when fixed and known.
    pub(crate) fn last_dim(&self, value: &str) -> Option<i64> {
        self.shapes.get(value)?.last()?.fixed()
    }
}

/// One rewrite: `anchor` becomes `node`, the nodes in `removed` go.
pub(crate) struct Rewrite {
    pub(crate) anchor: usize,
    pub(crate) node: Node,
    pub(crate) removed: Vec<usize>,
}

/// Applies non-overlapping rewrites, drops the `value_info` of values no longer produced,
/// and imports `com.microsoft` (version 1) when a contrib op was emitted. Returns how many
/// were applied.
pub(crate) fn apply(graph: &mut Graph, rewrites: Vec<Rewrite>) -> usize {
    let count = rewrites.len();
    if count == 0 {
        return 0;
    }
    let mut replace: HashMap<usize, Node> = HashMap::new();
    let mut removed: HashSet<usize> = HashSet::new();
    for r in rewrites {
        removed.extend(r.removed);
        replace.insert(r.anchor, r.node);
    }
    // Values a new node still produces (e.g. SkipLayerNormalization's sum output) keep theirs.
    let kept: HashSet<String> = replace
        .values()
        .flat_map(|n| n.outputs.iter().cloned())
        .collect();
    let mut gone: HashSet<String> = HashSet::new();
    let old = std::mem::take(&mut graph.nodes);
    for (i, n) in old.into_iter().enumerate() {
        if removed.contains(&i) {
            gone.extend(n.outputs);
        } else if let Some(new) = replace.remove(&i) {
            gone.extend(n.outputs.into_iter().filter(|o| !new.outputs.contains(o)));
            graph.nodes.push(new);
        } else {
            graph.nodes.push(n);
        }
    }
    graph
        .value_info
        .retain(|v| !gone.contains(&v.name) || kept.contains(&v.name));
    if graph.nodes.iter().any(|n| n.domain == MS_DOMAIN)
        && !graph.opsets.iter().any(|o| o.domain == MS_DOMAIN)
    {
        graph.opsets.push(OpsetImport {
            domain: MS_DOMAIN.to_string(),
            version: 1,
        });
    }
    count
}

/// A node name not yet used in `graph`: `base`, else `base_1`, `base_2`, ….
pub(crate) fn unique_name(names: &mut HashSet<String>, base: String) -> String {
    let mut name = base.clone();
    let mut k = 1;
    while names.contains(&name) {
        name = format!("{base}_{k}");
        k += 1;
    }
    names.insert(name.clone());
    name
}

/// `name`'s scope (up to its last `/`) followed by `/op`.
pub(crate) fn fused_name(names: &mut HashSet<String>, like: &str, op: &str) -> String {
    let scope = like.rsplit_once('/').map_or("", |(s, _)| s);
    unique_name(names, format!("{scope}/{op}"))
}

pub(crate) fn node_names(graph: &Graph) -> HashSet<String> {
    graph.nodes.iter().map(|n| n.name.clone()).collect()
}

/// Node indices a pass has already matched, so that overlapping matches fuse once.
#[derive(Default)]
pub(crate) struct Claimed(HashSet<usize>);

impl Claimed {
    /// Whether node `i` is already part of a match.
    pub(crate) fn contains(&self, i: &usize) -> bool {
        self.0.contains(i)
    }

    /// Whether `anchor` and every index in `removed` are still free.
    pub(crate) fn free(&self, anchor: usize, removed: &[usize]) -> bool {
        !removed.iter().chain([&anchor]).any(|k| self.0.contains(k))
    }

    /// Marks `anchor` and `removed` as matched.
    pub(crate) fn take(&mut self, anchor: usize, removed: &[usize]) {
        self.0.extend(removed.iter().copied().chain([anchor]));
    }

    /// [`free`](Self::free), then [`take`](Self::take) when it is: whether the match is
    /// this pass's to rewrite.
    pub(crate) fn claim(&mut self, anchor: usize, removed: &[usize]) -> bool {
        let free = self.free(anchor, removed);
        if free {
            self.take(anchor, removed);
        }
        free
    }
}

/// Every value name in use (graph inputs, initializers, node outputs), for
/// [`unique_name`] when a pass adds values.
pub(crate) fn value_names(graph: &Graph) -> HashSet<String> {
    graph
        .inputs
        .iter()
        .map(|v| v.name.clone())
        .chain(graph.initializers.iter().map(|i| i.name.clone()))
        .chain(graph.nodes.iter().flat_map(|n| n.outputs.iter().cloned()))
        .collect()
}

/// The `Cast(graph input, int32)` nodes fusions feed contrib ops (`mask_index`, ids): one
/// per input, reusing the graph's own when asked, put at the front of the graph by
/// [`Int32Casts::insert`].
pub(crate) struct Int32Casts {
    cast_of: HashMap<String, String>,
    casts: Vec<Node>,
}

impl Int32Casts {
    /// Starts empty, or (`reuse_existing`) with the graph's existing `Cast(input, int32)`
    /// nodes of graph inputs.
    pub(crate) fn new(graph: &Graph, reuse_existing: bool) -> Self {
        let mut cast_of = HashMap::new();
        let existing = graph.nodes.iter().filter(|n| {
            reuse_existing
                && n.op_type == "Cast"
                && is_onnx_domain(n)
                && n.inputs.len() == 1
                && n.outputs.len() == 1
                && n.attrs.len() == 1
                && matches!(n.attr("to"), Some(Attr::Int(6)))
                && graph.inputs.iter().any(|v| v.name == input_at(n, 0))
        });
        for n in existing {
            cast_of
                .entry(input_at(n, 0).to_string())
                .or_insert_with(|| output_at(n, 0).to_string());
        }
        Self {
            cast_of,
            casts: Vec::new(),
        }
    }

    /// The int32 cast of `input`; a new `Cast` (named uniquely in `names` / `values`) the
    /// first time.
    pub(crate) fn of(
        &mut self,
        names: &mut HashSet<String>,
        values: &mut HashSet<String>,
        input: &str,
    ) -> String {
        if let Some(out) = self.cast_of.get(input) {
            return out.clone();
        }
        let out = unique_name(values, format!("{input}_int32"));
        let name = unique_name(names, format!("/{input}/Cast_int32"));
        self.casts.push(Node {
            name,
            op_type: "Cast".to_string(),
            domain: String::new(),
            inputs: vec![input.to_string()],
            outputs: vec![out.clone()],
            attrs: [("to".to_string(), Attr::Int(6))].into_iter().collect(),
        });
        self.cast_of.insert(input.to_string(), out.clone());
        out
    }

    /// Puts the new Casts at the front of `graph`, before any reader.
    pub(crate) fn insert(self, graph: &mut Graph) {
        graph.nodes.splice(0..0, self.casts);
    }
}

pub(crate) fn ms_node(name: String, op: &str, inputs: Vec<String>, outputs: Vec<String>) -> Node {
    Node {
        name,
        op_type: op.to_string(),
        domain: MS_DOMAIN.to_string(),
        inputs,
        outputs,
        attrs: Default::default(),
    }
}

/// A float32 scalar constant, compared bit for bit, bound to `name`.
macro_rules! scalar {
    ($name:literal, $v:expr) => {
        init($name, |i| is_f32_scalar(i, $v))
    };
}

/// `Add(Erf(x / √2), 1)` (or `Erf(x · (1/√2))`), `x` bound to `x`.
fn one_plus_erf() -> Op {
    let scaled = P::Either(vec![
        op(
            "Div",
            vec![val("x"), scalar!("sqrt2", std::f32::consts::SQRT_2)],
        )
        .p(),
        op(
            "Mul",
            vec![
                val("x"),
                scalar!("inv_sqrt2", std::f32::consts::FRAC_1_SQRT_2),
            ],
        )
        .commutative()
        .p(),
    ]);
    let erf = op("Erf", vec![scaled]);
    op("Add", vec![erf.p(), scalar!("one", 1.0)]).commutative()
}

/// The erf GELU ending in a `Mul`, with the 0.5 factor in any of the places exporters put
/// it: `Mul(Mul(x, 1 + erf), 0.5)`, `Mul(Mul(x, 0.5), 1 + erf)` or `Mul(x, Mul(1 + erf,
/// 0.5))`.
fn gelu_patterns() -> [Pattern; 3] {
    let mul = |a: P, b: P| op("Mul", vec![a, b]).commutative();
    let half = || scalar!("half", 0.5);
    [
        mul(mul(val("x"), one_plus_erf().p()).p(), half()),
        mul(mul(val("x"), half()).p(), one_plus_erf().p()),
        mul(val("x"), mul(one_plus_erf().p(), half()).p()),
    ]
    .map(Pattern::new)
}

/// Fuses the exact erf GELU torch exports,
/// `Mul(Mul(x, Add(Erf(Div(x, √2)), 1)), 0.5)` (float32 scalars `1.4142135`, `1`, `0.5`;
/// `Add` and `Mul` in either operand order), into `com.microsoft` `Gelu(x)`; also with the
/// 0.5 applied first to x or to `1 + erf`, and with `Mul(x, 1/√2)` for the Div. Every
/// intermediate must have no other consumer. Returns how many were fused.
pub fn fuse_gelu(graph: &mut Graph) -> usize {
    let ix = Index::new(graph);
    let patterns = gelu_patterns();
    let mut names = node_names(graph);
    let mut taken = Claimed::default();
    let mut rewrites = Vec::new();
    for (i, mul_half) in graph.nodes.iter().enumerate() {
        let Some(m) = patterns.iter().find_map(|p| p.at(&ix, i)) else {
            continue;
        };
        if !taken.claim(i, &m.interior) {
            continue;
        }
        let name = fused_name(&mut names, &mul_half.name, "Gelu");
        let node = ms_node(
            name,
            "Gelu",
            vec![m.value("x").into()],
            mul_half.outputs.clone(),
        );
        rewrites.push(Rewrite {
            anchor: i,
            node,
            removed: m.interior,
        });
    }
    apply(graph, rewrites)
}

/// `Add(MatMul(..), bias)` at `value` (either order), `bias` a 1-D float32 initializer as
/// long as the MatMul output's last axis `h`: `(Add index, MatMul output, bias, h)`.
fn matmul_bias(ix: &Index<'_>, value: &str) -> Option<(usize, String, String, i64)> {
    let pat = Pattern::new(op("Add", vec![val("mm"), init("bias", is_f32_vector)]).commutative());
    let m = pat.at_value(ix, value)?;
    let (mm, bias) = (m.value("mm"), m.value("bias"));
    let h = ix.last_dim(mm)?;
    (ix.producer(mm, "MatMul").is_some() && ix.is_vector(bias, h))
        .then(|| (m.root, mm.to_string(), bias.to_string(), h))
}

/// Fuses `Gelu(Add(MatMul(..), bias))` (a `com.microsoft` `Gelu`, e.g. from [`fuse_gelu`];
/// bias a 1-D float32 initializer as long as the MatMul output's last axis; the Add's result
/// read only by the Gelu) into `com.microsoft` `BiasGelu(matmul_out, bias)`. Returns how
/// many were fused.
pub fn fuse_bias_gelu(graph: &mut Graph) -> usize {
    let ix = Index::new(graph);
    let gelu = Pattern::new(op("Gelu", vec![val("sum")]).domain(MS_DOMAIN));
    let mut names = node_names(graph);
    let mut rewrites = Vec::new();
    for (i, n) in graph.nodes.iter().enumerate() {
        let Some(sum) = gelu.at(&ix, i).map(|m| m.value("sum").to_string()) else {
            continue;
        };
        let Some((ai, mm, bias, h)) = matmul_bias(&ix, &sum) else {
            continue;
        };
        if !ix.single_use(&sum) || ix.last_dim(&sum) != Some(h) {
            continue;
        }
        let name = fused_name(&mut names, &n.name, "BiasGelu");
        let node = ms_node(name, "BiasGelu", vec![mm, bias], n.outputs.clone());
        rewrites.push(Rewrite {
            anchor: i,
            node,
            removed: vec![ai],
        });
    }
    apply(graph, rewrites)
}

/// `√(2/π)` as the float32 ferry's tracer (and torch) writes for the tanh GELU.
fn sqrt_2_over_pi() -> f32 {
    (2.0f64 / std::f64::consts::PI).sqrt() as f32
}

/// `Mul(Mul(x, 0.5), Add(Tanh(Mul(Add(x, Mul(Pow(x, 3), 0.044715)), √(2/π))), 1))`.
fn fast_gelu_pattern() -> Pattern {
    let mul = |a: P, b: P| op("Mul", vec![a, b]).commutative().p();
    let add = |a: P, b: P| op("Add", vec![a, b]).commutative().p();
    let cube = op("Pow", vec![val("x"), scalar!("three", 3.0)]).p();
    let inner = add(val("x"), mul(cube, scalar!("c", 0.044715)));
    let tanh = op("Tanh", vec![mul(inner, scalar!("k", sqrt_2_over_pi()))]).p();
    let p = add(tanh, scalar!("one", 1.0));
    Pattern::new(op("Mul", vec![mul(val("x"), scalar!("half", 0.5)), p]).commutative())
}

/// Fuses the exact tanh GELU (`gelu_new`, `gelu_pytorch_tanh`, `gelu_fast`) ferry exports,
/// `Mul(Mul(x, 0.5), Add(Tanh(Mul(Add(x, Mul(Pow(x, 3), 0.044715)), √(2/π))), 1))`
/// (float32 scalars compared bit for bit, `√(2/π)` as `(2/π).sqrt() as f32`; `Add` and `Mul`
/// in either operand order), into `com.microsoft` `FastGelu(x)`. Every intermediate must
/// have no other consumer. When `x` is `Add(MatMul(..), bias)` with a 1-D float32 bias
/// initializer as long as the MatMul output's last axis, and `x` is read only by the
/// pattern, the Add is absorbed as FastGelu's optional bias: `FastGelu(matmul_out, bias)`.
/// Returns how many were fused (with or without bias).
pub fn fuse_fast_gelu(graph: &mut Graph) -> usize {
    let ix = Index::new(graph);
    let pat = fast_gelu_pattern();
    let mut names = node_names(graph);
    let mut taken = Claimed::default();
    let mut rewrites = Vec::new();
    for (i, out) in graph.nodes.iter().enumerate() {
        let Some(m) = pat.at(&ix, i) else { continue };
        let (x, mut removed) = (m.value("x"), m.interior.clone());
        // x read only by Pow, the inner Add and Mul(x, 0.5): a bias Add can be absorbed.
        let bias = (ix.consumers.get(x) == Some(&3) && !ix.graph_outputs.contains(x))
            .then(|| matmul_bias(&ix, x))
            .flatten()
            .filter(|(bi, _, _, h)| ix.last_dim(x) == Some(*h) && !taken.contains(bi));
        let inputs = match bias {
            Some((bi, mm, bias, _)) => {
                removed.push(bi);
                vec![mm, bias]
            }
            None => vec![x.to_string()],
        };
        if !taken.claim(i, &removed) {
            continue;
        }
        let name = fused_name(&mut names, &out.name, "FastGelu");
        let node = ms_node(name, "FastGelu", inputs, out.outputs.clone());
        rewrites.push(Rewrite {
            anchor: i,
            node,
            removed,
        });
    }
    apply(graph, rewrites)
}

/// Opt-in approximation (ONNX Runtime's `enable_gelu_approximation`): turns every
/// `com.microsoft` `Gelu(x)` into `FastGelu(x)` and `BiasGelu(a, bias)` into
/// `FastGelu(a, bias)`. This is **not** an exact rewrite: the tanh approximation differs
/// from the erf GELU by up to about 1e-3 per activation. Returns how many were changed.
pub fn approximate_gelu(graph: &mut Graph) -> usize {
    let mut count = 0;
    for n in &mut graph.nodes {
        let ok = n.domain == MS_DOMAIN
            && n.outputs.len() == 1
            && n.attrs.is_empty()
            && match n.op_type.as_str() {
                "Gelu" => n.inputs.len() == 1,
                "BiasGelu" => n.inputs.len() == 2,
                _ => false,
            };
        if ok {
            n.op_type = "FastGelu".to_string();
            count += 1;
        }
    }
    count
}

/// Whether `n` is a `LayerNormalization` over the last axis with the default stash type
/// and (if any) a float `epsilon`: what the contrib layer norms compute.
pub(crate) fn is_plain_layer_norm(_: &Index<'_>, n: &Node) -> bool {
    matches!(n.attr("axis"), None | Some(Attr::Int(-1)))
        && matches!(n.attr("stash_type"), None | Some(Attr::Int(1)))
        && matches!(n.attr("epsilon"), None | Some(Attr::Float(_)))
        && n.attrs
            .keys()
            .all(|k| ["axis", "epsilon", "stash_type"].contains(&k.as_str()))
}

/// A plain `LayerNormalization(input, gamma, beta)` ([`is_plain_layer_norm`]), gamma and
/// beta 1-D float32 initializers bound as `gamma` and `beta`; without `with_beta`, the
/// form without the optional beta (`nn.LayerNorm(…, bias=False)`, as in ModernBERT).
fn layer_norm_of(input: P, with_beta: bool) -> Pattern {
    let mut inputs = vec![input, init("gamma", is_f32_vector)];
    if with_beta {
        inputs.push(init("beta", is_f32_vector));
    }
    Pattern::new(op("LayerNormalization", inputs).check(is_plain_layer_norm))
}

/// A [`layer_norm_of`] match's epsilon (ONNX's default 1e-5 when absent).
fn layer_norm_epsilon(n: &Node) -> f32 {
    match n.attr("epsilon") {
        Some(Attr::Float(e)) => *e,
        _ => 1e-5,
    }
}

/// Fuses `LayerNormalization(Add(a, b), gamma, beta)` (default domain, so opset ≥ 17; axis
/// −1, default stash type, one output; `a` and `b` of the same known rank-3 shape; gamma and
/// beta 1-D float32 initializers of the hidden size; the Add's result read only by the
/// LayerNormalization) into `com.microsoft` `SkipLayerNormalization(a, b, gamma, beta)` with
/// its `epsilon`. When `a` (or `b`) is itself `Add(MatMul(..), bias)` with a 1-D bias
/// initializer and no other consumer, that Add is absorbed as the 5th input. When the
/// residual sum is read by other nodes too (pre-LN blocks such as GPT-2's), it stays
/// available as the fused node's output 3 (`input_skip_bias_sum`). A LayerNormalization
/// without beta gives a SkipLayerNormalization without it (input 3 left empty when the bias
/// follows). Returns how many were fused.
pub fn fuse_skip_layer_norm(graph: &mut Graph) -> usize {
    let ix = Index::new(graph);
    let sum = op("Add", vec![val("a"), val("b")]).uses(None);
    let without_beta = layer_norm_of(sum.clone().p(), false);
    let pat = layer_norm_of(sum.p(), true);
    let mut names = node_names(graph);
    let mut taken = Claimed::default();
    let mut rewrites = Vec::new();
    for (i, ln) in graph.nodes.iter().enumerate() {
        let Some(m) = pat.at(&ix, i).or_else(|| without_beta.at(&ix, i)) else {
            continue;
        };
        let (a, b) = (m.value("a"), m.value("b"));
        let (Some(sa), Some(sb)) = (ix.shapes.get(a), ix.shapes.get(b)) else {
            continue;
        };
        let Some(h) = sa.last().and_then(Dim::fixed) else {
            continue;
        };
        let gamma = m.value("gamma").to_string();
        // Beta is bound only by the first pattern; empty, input 3 is left out.
        let beta = m.value("beta").to_string();
        let beta_ok = beta.is_empty() || ix.is_vector(&beta, h);
        if sa.len() != 3 || sa != sb || !ix.is_vector(&gamma, h) || !beta_ok {
            continue;
        }
        // A bias Add on either side becomes the 5th input.
        let bias_add =
            |v: &str| matmul_bias(&ix, v).filter(|&(_, _, _, hb)| hb == h && ix.single_use(v));
        let with_bias = bias_add(a)
            .map(|r| (r, b))
            .or_else(|| bias_add(b).map(|r| (r, a)))
            .filter(|((bi, ..), _)| !taken.contains(bi));
        let (removed, inputs) = match with_bias {
            Some(((bi, mm, bias, _), skip)) => (
                vec![m.interior[0], bi],
                vec![mm, skip.to_string(), gamma, beta, bias],
            ),
            // Without beta its input is left out.
            None => (
                m.interior.clone(),
                [a.to_string(), b.to_string(), gamma, beta]
                    .into_iter()
                    .filter(|v| !v.is_empty())
                    .collect(),
            ),
        };
        if !taken.claim(i, &removed) {
            continue;
        }
        let name = fused_name(&mut names, &ln.name, "SkipLayerNormalization");
        let mut outputs = ln.outputs.clone();
        // A sum read elsewhere too (pre-LN residual streams, as in GPT-2) becomes output 3.
        if !ix.single_use(input_at(ln, 0)) {
            outputs.extend([String::new(), String::new(), input_at(ln, 0).to_string()]);
        }
        let mut node = ms_node(name, "SkipLayerNormalization", inputs, outputs);
        node.attrs
            .insert("epsilon".to_string(), Attr::Float(layer_norm_epsilon(ln)));
        rewrites.push(Rewrite {
            anchor: i,
            node,
            removed,
        });
    }
    apply(graph, rewrites)
}

/// A rank-0 float32 initializer's value.
pub(crate) fn scalar_value(ix: &Index<'_>, value: &str) -> Option<f32> {
    crate::pattern::rank0_f32(ix.inits.get(value)?)
}

/// A 1-D int64 initializer's values.
pub(crate) fn int_vector(ix: &Index<'_>, value: &str) -> Option<Vec<i64>> {
    crate::pattern::i64_values(ix.inits.get(value)?)
}

pub(crate) fn has_perm(n: &Node, perm: &[i64]) -> bool {
    n.inputs.len() == 1
        && n.outputs.len() == 1
        && n.attrs.len() == 1
        && matches!(n.attr("perm"), Some(Attr::Ints(p)) if p == perm)
}

/// [`has_perm`] `[0, 2, 1, 3]` (heads split off, or merged back), as a pattern check.
pub(crate) fn perm_0213(_: &Index<'_>, n: &Node) -> bool {
    has_perm(n, &[0, 2, 1, 3])
}

/// [`has_perm`] `[0, 2, 3, 1]` (the key's heads split off and transposed), as a pattern check.
pub(crate) fn perm_0231(_: &Index<'_>, n: &Node) -> bool {
    has_perm(n, &[0, 2, 3, 1])
}

/// Whether `n` is an `Unsqueeze` over `axes`, given as its attribute (opset < 13) or as a
/// constant second input, with no other attribute.
pub(crate) fn unsqueeze_axes(ix: &Index<'_>, n: &Node, axes: &[i64]) -> bool {
    let ok = match (n.inputs.len(), n.attr("axes")) {
        (1, Some(Attr::Ints(a))) => a == axes,
        (2, None) => int_vector(ix, input_at(n, 1)).is_some_and(|a| a == axes),
        _ => false,
    };
    ok && n.attrs.len() <= 1
}

/// An `Unsqueeze` of `x` pattern node; `axes` checks its axes ([`unsqueeze_axes`]).
pub(crate) fn unsqueeze(x: P, axes: fn(&Index<'_>, &Node) -> bool) -> Op {
    op("Unsqueeze", vec![x]).min_inputs().check(axes)
}

/// Whether `name` is a graph input (not an initializer) of an integer or boolean type, of
/// rank 2 when its shape is known: the 0/1 padding mask the additive masks are built from.
pub(crate) fn is_mask_input(ix: &Index<'_>, name: &str) -> bool {
    let Some(input) = ix.graph.inputs.iter().find(|v| v.name == name) else {
        return false;
    };
    let int_like = matches!(
        input.dtype,
        DType::I64 | DType::I32 | DType::I16 | DType::I8 | DType::U8 | DType::Bool
    );
    int_like && input.shape.as_ref().is_none_or(|s| s.len() == 2) && !ix.inits.contains_key(name)
}

/// ferry's `additive_mask`, `Mul(Sub(1, Cast(Unsqueeze(mask, [1, 2]), float)), f32::MIN)`
/// (kept: all layers read it), `mask` bound to `mask_input`.
fn additive_mask() -> Pattern {
    let unsq = unsqueeze(val("mask_input"), |ix, n| unsqueeze_axes(ix, n, &[1, 2]));
    let to_float =
        |_: &Index<'_>, n: &Node| n.attrs.len() == 1 && matches!(n.attr("to"), Some(Attr::Int(1)));
    let cast = op("Cast", vec![unsq.p()]).check(to_float);
    let sub = op(
        "Sub",
        vec![init("one", |i| rank0_f32(i) == Some(1.0)), cast.p()],
    );
    let min = init("min", |i| is_f32_scalar(i, f32::MIN));
    Pattern::new(op("Mul", vec![sub.p(), min]).commutative().kept())
}

/// The rank-2 integer graph input whose ferry `additive_mask` is `value`.
pub(crate) fn additive_mask_input(ix: &Index<'_>, value: &str) -> Option<String> {
    let m = additive_mask().at_value(ix, value)?;
    is_mask_input(ix, m.value("mask_input")).then(|| m.value("mask_input").to_string())
}

/// A plain `Reshape` (two inputs, one output, `allowzero` absent or 0).
fn plain_reshape(n: &Node) -> bool {
    n.op_type == "Reshape"
        && is_onnx_domain(n)
        && n.inputs.len() == 2
        && n.outputs.len() == 1
        && n.attrs.keys().all(|k| k == "allowzero")
        && matches!(n.attr("allowzero"), None | Some(Attr::Int(0)))
}

/// `(heads, head_dim)` of a `Reshape` splitting the last axis of a rank-3 value into
/// heads: its shape input the constant `[0, 0, heads, head_dim]`, or (a dynamic-axes
/// export's `Concat` of `Shape` dims) its known input shape `[a, b, H]` and output shape
/// `[a, b, heads, head_dim]`.
pub(crate) fn split_heads_reshape(ix: &Index<'_>, rs: &Node) -> Option<(i64, i64)> {
    if !plain_reshape(rs) {
        return None;
    }
    if let Some(&[0, 0, heads, head_dim]) = int_vector(ix, input_at(rs, 1)).as_deref() {
        return Some((heads, head_dim));
    }
    let input = ix.shapes.get(input_at(rs, 0))?;
    let output = ix.shapes.get(output_at(rs, 0))?;
    match (input, output) {
        ([a, b, h], [a2, b2, heads, head_dim])
            if a == a2 && b == b2 && h.fixed()? == heads.fixed()? * head_dim.fixed()? =>
        {
            Some((heads.fixed()?, head_dim.fixed()?))
        }
        _ => None,
    }
}

/// The hidden size `H` of a `Reshape` merging the heads of a rank-4 value back: its shape
/// input the constant `[0, 0, H]`, or its known input shape `[a, b, heads, head_dim]` and
/// output shape `[a, b, heads · head_dim]`.
pub(crate) fn merge_heads_reshape(ix: &Index<'_>, out: &Node) -> Option<i64> {
    if !plain_reshape(out) {
        return None;
    }
    if let Some(&[0, 0, hidden]) = int_vector(ix, input_at(out, 1)).as_deref() {
        return Some(hidden);
    }
    let input = ix.shapes.get(input_at(out, 0))?;
    let output = ix.shapes.get(output_at(out, 0))?;
    match (input, output) {
        ([a, b, heads, head_dim], [a2, b2, h])
            if a == a2 && b == b2 && h.fixed()? == heads.fixed()? * head_dim.fixed()? =>
        {
            h.fixed()
        }
        _ => None,
    }
}

/// `H` of a Reshape whose shape input is exactly the constant `[0, 0, H]` (no attributes):
/// the strict merge-heads form the GPT-2 and MultiHeadAttention matchers accept.
pub(crate) fn constant_merge_heads_reshape(ix: &Index<'_>, out: &Node) -> Option<i64> {
    if out.op_type != "Reshape"
        || !is_onnx_domain(out)
        || out.inputs.len() != 2
        || out.outputs.len() != 1
        || !out.attrs.is_empty()
    {
        return None;
    }
    match int_vector(ix, input_at(out, 1))?[..] {
        [0, 0, hidden] => Some(hidden),
        _ => None,
    }
}

/// The attention block the attention fusions share, rooted at its merge-heads Reshape
/// (accepted by `merge`): `Reshape(Transpose(MatMul(Softmax(Add(scores, mask), -1), v),
/// [0, 2, 1, 3]), shape)`, `scores` being `Mul(MatMul(q, k), scale)` or `Div(MatMul(q, k),
/// divisor)` (the scaling node bound as `scaled`, its rank-0 float32 constant as `scale`
/// or `divisor`) and the Add's other operand bound as `mask`; every intermediate read once.
pub(crate) fn attention_pattern(
    merge: fn(&Index<'_>, &Node) -> bool,
    [q, k, v]: [P; 3],
) -> Pattern {
    let qk = op("MatMul", vec![q, k]);
    let scaled = P::Either(vec![
        op(
            "Mul",
            vec![qk.clone().p(), init("scale", |i| rank0_f32(i).is_some())],
        )
        .commutative()
        .named("scaled")
        .p(),
        op(
            "Div",
            vec![qk.p(), init("divisor", |i| rank0_f32(i).is_some())],
        )
        .named("scaled")
        .p(),
    ]);
    let last_axis = |_: &Index<'_>, n: &Node| {
        n.attrs.len() == 1 && matches!(n.attr("axis"), Some(Attr::Int(-1)))
    };
    let masked = op("Add", vec![scaled, val("mask")]).commutative();
    let softmax = op("Softmax", vec![masked.p()]).check(last_axis);
    let ctx = op("MatMul", vec![softmax.p(), v]);
    let back = op("Transpose", vec![ctx.p()]).check(perm_0213);
    Pattern::new(op("Reshape", vec![back.p(), P::Any]).check(merge))
}

/// The score scale of an [`attention_pattern`] match (`scale`, or `1 / divisor`), when
/// positive and finite.
pub(crate) fn attention_scale(ix: &Index<'_>, m: &Match) -> Option<f32> {
    let scale = match scalar_value(ix, m.value("scale")) {
        Some(s) => s,
        None => 1.0 / scalar_value(ix, m.value("divisor"))?,
    };
    (scale.is_finite() && scale > 0.0).then_some(scale)
}

/// The merge-heads Reshape of an [`attention_pattern`] match.
pub(crate) fn matched_node<'g>(ix: &Index<'g>, m: &Match, name: &str) -> Option<&'g Node> {
    ix.graph.nodes.get(m.node(name)?)
}

/// One projection `Transpose(Reshape(Add(MatMul(x, w), b), split heads), perm)` of the
/// packable attention: the Reshape, weight and bias bound to the three names.
fn projection(names: [&'static str; 3], perm: fn(&Index<'_>, &Node) -> bool) -> P {
    let mm = op("MatMul", vec![val("x"), init(names[1], is_f32_matrix)]);
    let add = op("Add", vec![mm.p(), init(names[2], is_f32_vector)]).commutative();
    let split = |ix: &Index<'_>, n: &Node| split_heads_reshape(ix, n).is_some();
    let rs = op("Reshape", vec![add.p(), P::Any])
        .check(split)
        .named(names[0]);
    op("Transpose", vec![rs.p()]).check(perm).p()
}

/// A matched self-attention block.
struct AttentionMatch {
    x: String,
    weights: [String; 3],
    biases: [String; 3],
    heads: i64,
    hidden: i64,
    scale: f32,
    /// The mask graph input (ferry's additive mask), or with `bias_mask` the additive mask
    /// value itself, passed as Attention's `attention_bias`.
    mask: String,
    bias_mask: bool,
    removed: Vec<usize>,
}

/// Whether `mask` can be Attention's `attention_bias` for scores `scores`: both shapes
/// known, rank 4, the mask `[batch or 1, heads or 1, seq, total_seq]` of the scores'.
fn attention_bias_shape_ok(ix: &Index<'_>, mask: &str, scores: &str) -> bool {
    let (Some(m), Some(s)) = (ix.shapes.get(mask), ix.shapes.get(scores)) else {
        return false;
    };
    let one = Dim::Fixed(1);
    matches!((*m, *s), ([m0, m1, m2, m3], [s0, s1, s2, s3])
        if (m0 == s0 || *m0 == one) && (m1 == s1 || *m1 == one) && m2 == s2 && m3 == s3)
}

/// The packable self-attention: [`attention_pattern`] over three [`projection`]s of one
/// `x`.
fn packable_attention() -> Pattern {
    attention_pattern(
        |ix, n| merge_heads_reshape(ix, n).is_some(),
        [
            projection(["q_split", "wq", "bq"], perm_0213),
            projection(["k_split", "wk", "bk"], perm_0231),
            projection(["v_split", "wv", "bv"], perm_0213),
        ],
    )
}

/// Checks a [`packable_attention`] match at node `i`: head counts, weight and bias
/// shapes, `x`'s width, the scale and the mask.
fn match_attention(ix: &Index<'_>, pat: &Pattern, i: usize) -> Option<AttentionMatch> {
    let m = pat.at(ix, i)?;
    let hidden = merge_heads_reshape(ix, &ix.graph.nodes[i])?;
    let split = |name| split_heads_reshape(ix, matched_node(ix, &m, name)?);
    let (heads, head_dim) = split("q_split")?;
    if split("k_split")? != (heads, head_dim)
        || split("v_split")? != (heads, head_dim)
        || heads <= 0
        || head_dim <= 0
        || heads.checked_mul(head_dim) != Some(hidden)
    {
        return None;
    }
    let dims = |name, want: &[i64]| ix.inits.get(m.value(name)).is_some_and(|i| i.dims == want);
    let weights_ok = ["wq", "wk", "wv"]
        .iter()
        .all(|w| dims(w, &[hidden, hidden]));
    if !weights_ok || !["bq", "bk", "bv"].iter().all(|b| dims(b, &[hidden])) {
        return None;
    }
    let x = m.value("x").to_string();
    let x_ok = ix
        .shapes
        .get(x.as_str())
        .is_some_and(|s| s.len() == 3 && s[2].fixed() == Some(hidden));
    let scale = attention_scale(ix, &m)?;
    // ferry's additive mask of a 0/1 input becomes mask_index; any other additive mask of
    // a known broadcastable shape (e.g. torch.onnx.export's) is passed as attention_bias.
    let scores = output_at(matched_node(ix, &m, "scaled")?, 0);
    let (mask, bias_mask) = match additive_mask_input(ix, m.value("mask")) {
        Some(mask) => (mask, false),
        None if attention_bias_shape_ok(ix, m.value("mask"), scores) => {
            (m.value("mask").to_string(), true)
        }
        None => return None,
    };
    let value = |name| m.value(name).to_string();
    let (weights, biases) = (["wq", "wk", "wv"].map(value), ["bq", "bk", "bv"].map(value));
    x_ok.then_some(AttentionMatch {
        x,
        weights,
        biases,
        heads,
        hidden,
        scale,
        mask,
        bias_mask,
        removed: m.interior,
    })
}

/// Fuses ferry's encoder self-attention (`multi_head_attention` without a score bias):
/// three `Add(MatMul(x, w), b)` projections of the same rank-3 `x` (`w` `[H, H]` and `b`
/// `[H]` float32 initializers), each `Reshape`d to `[0, 0, heads, head_dim]` and transposed
/// (`[0, 2, 1, 3]` for q and v, `[0, 2, 3, 1]` for k); `Softmax(Add(Mul(MatMul(q, k),
/// scale), mask), -1)` times v, transposed back and reshaped to `[0, 0, H]`, where `mask`
/// is exactly ferry's `additive_mask` of a rank-2 integer graph input. Every intermediate
/// must have no other consumer. The block becomes `com.microsoft`
/// `Attention(x, [Wq | Wk | Wv], [bq | bk | bv], mask_index)` with `num_heads`, the matched
/// `scale` and `mask_filter_value` `f32::MIN` (what `(1 − m) · f32::MIN` adds for a 0 in a
/// 0/1 mask); the packed weights are new owned initializers and `mask_index` is one
/// `Cast(mask, int32)` per mask input, shared by all layers. Returns how many were fused.
pub fn fuse_attention(graph: &mut Graph) -> usize {
    let ix = Index::new(graph);
    let mut names = node_names(graph);
    let mut values = value_names(graph);
    let mut taken = Claimed::default();
    let mut rewrites = Vec::new();
    let mut new_inits: Vec<Initializer> = Vec::new();
    let mut casts = Int32Casts::new(graph, false);
    let pat = packable_attention();
    for (i, out) in graph.nodes.iter().enumerate() {
        let Some(m) = match_attention(&ix, &pat, i) else {
            continue;
        };
        if !taken.free(i, &m.removed) {
            continue;
        }
        // The packed weight and bias are row-wise concatenations computed when written
        // (`TensorData::Concat` over the, possibly transposed, source tensors): no copy of
        // the weights is made here.
        let Ok(h) = u64::try_from(m.hidden) else {
            continue;
        };
        let f32_data = |name: &String, numel: u64| {
            ix.inits
                .get(name.as_str())
                .filter(|i| i.dtype == DType::F32 && i.data.len() == numel * 4)
                .map(|i| i.data.clone())
        };
        let (Some(ws), Some(bs)) = (
            m.weights
                .iter()
                .map(|w| f32_data(w, h * h))
                .collect::<Option<Vec<_>>>(),
            m.biases
                .iter()
                .map(|b| f32_data(b, h))
                .collect::<Option<Vec<_>>>(),
        ) else {
            continue;
        };
        let (Ok(packed), Ok(bias)) = (
            ferry_ir::TensorData::concat_rows(ws, h),
            ferry_ir::TensorData::concat_rows(bs, 1),
        ) else {
            continue;
        };
        taken.take(i, &m.removed);
        let name = fused_name(&mut names, &out.name, "Attention");
        let w_name = unique_name(&mut values, format!("{name}.qkv_weight"));
        let b_name = unique_name(&mut values, format!("{name}.qkv_bias"));
        new_inits.push(Initializer {
            name: w_name.clone(),
            dtype: DType::F32,
            dims: vec![m.hidden, 3 * m.hidden],
            data: packed,
        });
        new_inits.push(Initializer {
            name: b_name.clone(),
            dtype: DType::F32,
            dims: vec![3 * m.hidden],
            data: bias,
        });
        let mut inputs = vec![m.x, w_name, b_name];
        if m.bias_mask {
            // mask_index and past absent; the additive mask is attention_bias.
            inputs.extend([String::new(), String::new(), m.mask]);
        } else {
            let mask_index = casts.of(&mut names, &mut values, &m.mask);
            inputs.push(mask_index);
        }
        let mut node = ms_node(name, "Attention", inputs, out.outputs.clone());
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
    graph.initializers.extend(new_inits);
    casts.insert(graph);
    count
}

/// A 2-D float32 initializer's `(rows, columns)`.
fn table_dims(ix: &Index<'_>, value: &str) -> Option<(i64, i64)> {
    let i = ix.inits.get(value)?;
    match (i.dtype, i.dims.as_slice()) {
        (DType::F32, &[rows, h]) if rows > 0 && h > 0 => Some((rows, h)),
        _ => None,
    }
}

/// A `Gather` on axis 0 (the attribute absent or 0, no other), as a pattern check.
fn gather_axis0(_: &Index<'_>, n: &Node) -> bool {
    matches!(
        (n.attrs.len(), n.attr("axis")),
        (0, None) | (1, Some(Attr::Int(0)))
    )
}

/// A node without attributes, as a pattern check.
fn no_attrs(_: &Index<'_>, n: &Node) -> bool {
    n.attrs.is_empty()
}

/// A 1-D int64 initializer holding exactly `$v`, bound to `$name`.
macro_rules! ints {
    ($name:literal, $v:expr) => {
        init($name, |i| i64_values(i).as_deref() == Some(&$v[..]))
    };
}

/// `Gather(table, ids)` on axis 0, `table` and `ids` bound to the two names.
fn lookup([table, ids]: [&'static str; 2]) -> P {
    let table = init(table, |i| i.dims.len() == 2);
    op("Gather", vec![table, val(ids)]).check(gather_axis0).p()
}

/// Rows `[0, seq)` of the position table `pos`, `seq` being the length of `ids`:
/// `Slice(pos, [0], Slice(Shape(ids), [1], [2], [0]), [0])`, or torch.onnx.export's
/// `Gather(pos, Slice(pos_ids, [0], Unsqueeze(Gather(Shape(ids), 1), [0]), [1][, [1]]))`
/// over its `position_ids` buffer.
fn position_rows() -> P {
    let shape = || op("Shape", vec![val("ids")]).check(no_attrs);
    let seq = op(
        "Slice",
        vec![
            shape().p(),
            ints!("s1", [1]),
            ints!("s2", [2]),
            ints!("s0", [0]),
        ],
    )
    .check(no_attrs);
    let pos = || init("pos", |i| i.dims.len() == 2);
    let sliced = op(
        "Slice",
        vec![pos(), ints!("p0", [0]), seq.p(), ints!("pa", [0])],
    )
    .check(no_attrs);
    let one = init("one", |i| rank0_i64(i) == Some(1) && i.data.len() == 8);
    let len = op("Gather", vec![shape().p(), one]).check(gather_axis0);
    let end = unsqueeze(len.p(), |ix, n| unsqueeze_axes(ix, n, &[0]));
    let steps_ok = |ix: &Index<'_>, n: &Node| {
        n.attrs.is_empty()
            && match n.inputs.len() {
                4 => true,
                5 => int_vector(ix, input_at(n, 4)).is_some_and(|s| s == [1]),
                _ => false,
            }
    };
    let ids = op(
        "Slice",
        vec![
            init("pos_ids", |i| i.dims.len() == 2),
            ints!("b0", [0]),
            end.p(),
            ints!("b1", [1]),
        ],
    )
    .min_inputs()
    .check(steps_ok);
    let gathered = op("Gather", vec![pos(), ids.p()]).check(gather_axis0);
    P::Either(vec![sliced.p(), gathered.p()])
}

/// Whether `ids` is a rank-2 int64 graph input (not an initializer).
fn is_ids_input(ix: &Index<'_>, ids: &str) -> bool {
    ix.graph.inputs.iter().any(|v| {
        v.name == ids
            && v.dtype == DType::I64
            && v.shape.as_ref().is_some_and(|s| s.len() == 2)
            && !ix.inits.contains_key(ids)
    })
}

/// Whether `buffer` is the int64 `[[0, 1, …, n − 1]]` with `n` at most `rows`.
fn is_position_buffer(ix: &Index<'_>, buffer: &str, rows: i64) -> bool {
    let Some(b) = ix.inits.get(buffer) else {
        return false;
    };
    let n = match b.dims.as_slice() {
        [1, n] if *n <= rows => *n,
        _ => return false,
    };
    b.dtype == DType::I64
        && b.data.bytes().ok().is_some_and(|b| {
            b.chunks_exact(8)
                .map(|c| c.try_into().map_or(-1, i64::from_le_bytes))
                .eq(0..n)
        })
}

/// A matched BERT embeddings block.
struct EmbedMatch {
    ids: String,
    /// Token-type ids and table; `None` for DistilBERT-style embeddings without them.
    types: Option<(String, String)>,
    word: String,
    pos: String,
    epsilon: f32,
    removed: Vec<usize>,
}

/// ferry's BERT (or DistilBERT, without token types) `embeddings`: `LayerNormalization(
/// Add(position rows, Add(word lookup, token-type lookup) or word lookup))`.
fn embed_pattern() -> Pattern {
    let word = lookup(["word", "ids"]);
    let words_and_types = op("Add", vec![word.clone(), lookup(["types", "type_ids"])]);
    let sum = P::Either(vec![word, words_and_types.commutative().p()]);
    layer_norm_of(
        op("Add", vec![position_rows(), sum]).commutative().p(),
        true,
    )
}

/// Checks an [`embed_pattern`] match at node `i`: every table as wide as gamma (the
/// position buffer within the position table), the ids rank-2 int64 graph inputs of one
/// shape.
fn match_embed_layer_norm(ix: &Index<'_>, pat: &Pattern, i: usize) -> Option<EmbedMatch> {
    let m = pat.at(ix, i)?;
    let h = ix.inits.get(m.value("gamma"))?.dims[0];
    if !ix.is_vector(m.value("beta"), h) {
        return None;
    }
    let (rows, pos_h) = table_dims(ix, m.value("pos"))?;
    let buffer = m.value("pos_ids");
    let ok = table_dims(ix, m.value("word"))?.1 == h
        && pos_h == h
        && (buffer.is_empty() || is_position_buffer(ix, buffer, rows))
        && is_ids_input(ix, m.value("ids"));
    let types = match (m.value("types"), m.value("type_ids")) {
        ("", _) => None,
        (types, ids) => {
            let shape_of = |v: &str| ix.graph.inputs.iter().find(|i| i.name == v)?.shape.clone();
            let ok = table_dims(ix, types)?.1 == h
                && is_ids_input(ix, ids)
                && shape_of(ids) == shape_of(m.value("ids"));
            if !ok {
                return None;
            }
            Some((ids.to_string(), types.to_string()))
        }
    };
    ok.then(|| EmbedMatch {
        ids: m.value("ids").to_string(),
        types,
        word: m.value("word").to_string(),
        pos: m.value("pos").to_string(),
        epsilon: layer_norm_epsilon(&ix.graph.nodes[i]),
        removed: m.interior.clone(),
    })
}

/// Fuses ferry's BERT embeddings, `LayerNormalization(Add(Add(Gather(word, input_ids),
/// Gather(types, token_type_ids)), Slice(pos, [0], Slice(Shape(input_ids), [1], [2], [0]),
/// [0])), gamma, beta)` (axis −1, default stash type; the ids rank-2 int64 graph inputs of
/// the same shape; word, types and pos 2-D float32 initializers of the hidden size, gamma
/// and beta 1-D ones; Gathers on axis 0; every intermediate read once; either operand order
/// of the Adds), into `com.microsoft` `EmbedLayerNormalization(Cast(input_ids, int32),
/// Cast(token_type_ids, int32), word, pos, types, gamma, beta)` with the LayerNormalization's
/// `epsilon`. Its output 0 replaces the LayerNormalization's output; output 1 (`mask_index`)
/// is left unread. One `Cast` to int32 per ids input, reusing an existing one (such as the
/// mask Cast of [`fuse_attention`]). DistilBERT's embeddings, `LayerNormalization(Add(
/// Gather(word, input_ids), Slice(pos, …)), gamma, beta)` without token types, fuse the same
/// way with the segment inputs left empty. Negative ids, which Gather wraps, are rejected by
/// EmbedLayerNormalization at run time. Returns how many were fused.
pub fn fuse_embed_layer_norm(graph: &mut Graph) -> usize {
    let ix = Index::new(graph);
    let mut names = node_names(graph);
    let mut values = value_names(graph);
    let mut casts = Int32Casts::new(graph, true);
    let mut taken = Claimed::default();
    let mut rewrites = Vec::new();
    let pat = embed_pattern();
    for (i, ln) in graph.nodes.iter().enumerate() {
        let Some(m) = match_embed_layer_norm(&ix, &pat, i) else {
            continue;
        };
        if !taken.claim(i, &m.removed) {
            continue;
        }
        let ids = casts.of(&mut names, &mut values, &m.ids);
        let (types, seg) = match &m.types {
            Some((types, seg)) => (casts.of(&mut names, &mut values, types), seg.clone()),
            None => (String::new(), String::new()),
        };
        let name = fused_name(&mut names, &ln.name, "EmbedLayerNormalization");
        let mask_index = unique_name(&mut values, format!("{name}.mask_index"));
        let mut node = ms_node(
            name,
            "EmbedLayerNormalization",
            vec![
                ids,
                types,
                m.word,
                m.pos,
                seg,
                input_at(ln, 1).to_string(),
                input_at(ln, 2).to_string(),
            ],
            vec![output_at(ln, 0).to_string(), mask_index],
        );
        node.attrs
            .insert("epsilon".to_string(), Attr::Float(m.epsilon));
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
    use ferry_ir::Value;

    use super::*;
    use crate::test_util::{graph, init, node};

    fn scalar(name: &str, v: f32) -> Initializer {
        init(name, vec![], &[v])
    }

    fn shaped(names: &[&str], shape: &[Dim]) -> Vec<Value> {
        names
            .iter()
            .map(|n| Value::new(*n, DType::F32, shape.to_vec()))
            .collect()
    }

    fn bsh(h: i64) -> Vec<Dim> {
        vec![Dim::sym("batch"), Dim::sym("seq"), Dim::Fixed(h)]
    }

    /// torch's erf GELU of `x` into `y`, as ferry exports it.
    fn gelu_nodes(x: &str, y: &str) -> Vec<Node> {
        vec![
            node("Div", &[x, "sqrt2"], &["d"], vec![]),
            node("Erf", &["d"], &["e"], vec![]),
            node("Add", &["e", "one"], &["p"], vec![]),
            node("Mul", &[x, "p"], &["m"], vec![]),
            node("Mul", &["m", "half"], &[y], vec![]),
        ]
    }

    fn gelu_consts() -> Vec<Initializer> {
        vec![
            scalar("sqrt2", std::f32::consts::SQRT_2),
            scalar("one", 1.0),
            scalar("half", 0.5),
        ]
    }

    fn ops(g: &Graph) -> Vec<&str> {
        g.nodes.iter().map(|n| n.op_type.as_str()).collect()
    }

    #[test]
    fn erf_gelu_fuses() {
        let mut g = graph(gelu_nodes("x", "y"), gelu_consts(), &["y"]);
        g.value_info = shaped(&["d", "e", "p", "m"], &bsh(4));
        assert_eq!(fuse_gelu(&mut g), 1);
        assert_eq!(ops(&g), ["Gelu"]);
        let n = &g.nodes[0];
        assert_eq!(
            (n.domain.as_str(), n.inputs.clone()),
            (MS_DOMAIN, vec!["x".into()])
        );
        assert_eq!(n.outputs, ["y"]);
        assert!(g.value_info.is_empty());
        assert!(g.opsets.contains(&OpsetImport {
            domain: MS_DOMAIN.into(),
            version: 1
        }));
        // Nothing left to fuse; the import is not duplicated.
        assert_eq!(fuse_gelu(&mut g), 0);
        assert_eq!(g.opsets.len(), 2);

        // Operands of the commutative ops swapped.
        let mut nodes = gelu_nodes("x", "y");
        nodes[2].inputs.reverse();
        nodes[3].inputs.reverse();
        nodes[4].inputs.reverse();
        let mut g = graph(nodes, gelu_consts(), &["y"]);
        assert_eq!(fuse_gelu(&mut g), 1);
        assert_eq!(ops(&g), ["Gelu"]);
    }

    #[test]
    fn erf_gelu_with_the_half_elsewhere_and_a_reciprocal_sqrt2_fuses() {
        let erf = |d: Node| {
            vec![
                d,
                node("Erf", &["d"], &["e"], vec![]),
                node("Add", &["one", "e"], &["p"], vec![]),
            ]
        };
        let div = || node("Div", &["x", "sqrt2"], &["d"], vec![]);
        let mut consts = gelu_consts();
        consts.push(scalar("rsqrt2", std::f32::consts::FRAC_1_SQRT_2));
        let forms: Vec<Vec<Node>> = vec![
            // (x · 0.5) · (1 + erf)
            [
                erf(div()),
                vec![
                    node("Mul", &["half", "x"], &["h"], vec![]),
                    node("Mul", &["p", "h"], &["y"], vec![]),
                ],
            ]
            .concat(),
            // x · ((1 + erf) · 0.5)
            [
                erf(div()),
                vec![
                    node("Mul", &["p", "half"], &["h"], vec![]),
                    node("Mul", &["x", "h"], &["y"], vec![]),
                ],
            ]
            .concat(),
            // erf(x · 1/√2)
            [
                erf(node("Mul", &["x", "rsqrt2"], &["d"], vec![])),
                vec![
                    node("Mul", &["x", "p"], &["m"], vec![]),
                    node("Mul", &["m", "half"], &["y"], vec![]),
                ],
            ]
            .concat(),
        ];
        for (k, nodes) in forms.into_iter().enumerate() {
            let mut g = graph(nodes.clone(), consts.clone(), &["y"]);
            assert_eq!(fuse_gelu(&mut g), 1, "form {k}");
            assert_eq!(ops(&g), ["Gelu"], "form {k}");
            assert_eq!(g.nodes[0].inputs, ["x"], "form {k}");
            // The half applied to another value than x: not GELU.
            let mut g = graph(nodes, consts.clone(), &["y"]);
            g.inputs.push(ferry_ir::Value::new("z", DType::F32, vec![]));
            for n in g.nodes.iter_mut().filter(|n| n.outputs[0] != "d") {
                for i in n.inputs.iter_mut().filter(|i| *i == "x") {
                    *i = "z".into();
                }
            }
            assert_eq!(fuse_gelu(&mut g), 0, "form {k} of another value");
        }
    }

    #[test]
    fn inexact_gelu_patterns_stay() {
        // A constant one ulp away from √2 as float32.
        let mut consts = gelu_consts();
        consts[0] = scalar(
            "sqrt2",
            f32::from_bits(std::f32::consts::SQRT_2.to_bits() + 1),
        );
        let mut g = graph(gelu_nodes("x", "y"), consts, &["y"]);
        assert_eq!(fuse_gelu(&mut g), 0);
        // A half that is a 1-element vector, not a scalar.
        let mut consts = gelu_consts();
        consts[2] = init("half", vec![1], &[0.5]);
        let mut g = graph(gelu_nodes("x", "y"), consts, &["y"]);
        assert_eq!(fuse_gelu(&mut g), 0);
        // An intermediate read elsewhere, or a graph output.
        let mut nodes = gelu_nodes("x", "y");
        nodes.push(node("Relu", &["e"], &["r"], vec![]));
        let mut g = graph(nodes, gelu_consts(), &["y", "r"]);
        assert_eq!(fuse_gelu(&mut g), 0);
        let mut g = graph(gelu_nodes("x", "y"), gelu_consts(), &["y", "m"]);
        assert_eq!(fuse_gelu(&mut g), 0);
        // Div's x is not the x multiplied.
        let mut nodes = gelu_nodes("x", "y");
        nodes[3].inputs[0] = "z".into();
        let mut g = graph(nodes, gelu_consts(), &["y"]);
        assert_eq!(fuse_gelu(&mut g), 0);
        // A constant overridable as a graph input.
        let mut g = graph(gelu_nodes("x", "y"), gelu_consts(), &["y"]);
        g.inputs.push(Value::new("one", DType::F32, vec![]));
        assert_eq!(fuse_gelu(&mut g), 0);
        assert_eq!(g.nodes.len(), 5);
        assert_eq!(g.opsets.len(), 1);
    }

    fn bias_gelu_graph(bias: Initializer) -> Graph {
        let mut nodes = vec![
            node("MatMul", &["x", "w"], &["mm"], vec![]),
            node("Add", &["mm", "b"], &["a"], vec![]),
        ];
        nodes.extend(gelu_nodes("a", "y"));
        let mut inits = gelu_consts();
        inits.push(init("w", vec![4, 3], &[0.0; 12]));
        inits.push(bias);
        let mut g = graph(nodes, inits, &["y"]);
        g.value_info = shaped(&["mm", "a"], &bsh(3));
        g
    }

    #[test]
    fn bias_gelu_fuses() {
        let mut g = bias_gelu_graph(init("b", vec![3], &[1., 2., 3.]));
        assert_eq!(fuse_gelu(&mut g), 1);
        assert_eq!(fuse_bias_gelu(&mut g), 1);
        assert_eq!(ops(&g), ["MatMul", "BiasGelu"]);
        let n = &g.nodes[1];
        assert_eq!(n.inputs, ["mm", "b"]);
        assert_eq!(n.outputs, ["y"]);
        assert_eq!(n.domain, MS_DOMAIN);
        assert_eq!(g.value_info.len(), 1);
    }

    #[test]
    fn bias_gelu_needs_a_matching_1d_bias_used_once() {
        // 2-D bias.
        let mut g = bias_gelu_graph(init("b", vec![1, 3], &[1., 2., 3.]));
        fuse_gelu(&mut g);
        assert_eq!(fuse_bias_gelu(&mut g), 0);
        // Wrong length (broadcasts from 1).
        let mut g = bias_gelu_graph(init("b", vec![1], &[1.]));
        fuse_gelu(&mut g);
        assert_eq!(fuse_bias_gelu(&mut g), 0);
        // The biased value is also a graph output.
        let mut g = bias_gelu_graph(init("b", vec![3], &[1., 2., 3.]));
        g.outputs.push(Value::new("a", DType::F32, bsh(3)));
        fuse_gelu(&mut g);
        assert_eq!(fuse_bias_gelu(&mut g), 0);
        assert_eq!(ops(&g), ["MatMul", "Add", "Gelu"]);
    }

    /// The tanh GELU of `x` into `y`, as ferry exports `gelu_new`.
    fn fast_gelu_nodes(x: &str, y: &str) -> Vec<Node> {
        vec![
            node("Pow", &[x, "three"], &["cube"], vec![]),
            node("Mul", &["cube", "c"], &["cc"], vec![]),
            node("Add", &[x, "cc"], &["inner"], vec![]),
            node("Mul", &["inner", "k"], &["scaled"], vec![]),
            node("Tanh", &["scaled"], &["th"], vec![]),
            node("Add", &["th", "one"], &["p"], vec![]),
            node("Mul", &[x, "half"], &["hx"], vec![]),
            node("Mul", &["hx", "p"], &[y], vec![]),
        ]
    }

    fn fast_gelu_consts() -> Vec<Initializer> {
        vec![
            scalar("three", 3.0),
            scalar("c", 0.044715),
            scalar("k", (2.0f64 / std::f64::consts::PI).sqrt() as f32),
            scalar("one", 1.0),
            scalar("half", 0.5),
        ]
    }

    #[test]
    fn tanh_gelu_fuses_into_fast_gelu() {
        let mut g = graph(fast_gelu_nodes("x", "y"), fast_gelu_consts(), &["y"]);
        g.value_info = shaped(&["cube", "cc", "inner", "scaled", "th", "p", "hx"], &bsh(4));
        assert_eq!(fuse_fast_gelu(&mut g), 1);
        assert_eq!(ops(&g), ["FastGelu"]);
        let n = &g.nodes[0];
        assert_eq!(n.domain, MS_DOMAIN);
        assert_eq!(n.inputs, ["x"]);
        assert_eq!(n.outputs, ["y"]);
        assert!(g.value_info.is_empty());
        assert_eq!(g.opsets.last().map(|o| o.domain.as_str()), Some(MS_DOMAIN));
        assert_eq!(fuse_fast_gelu(&mut g), 0);

        // Every commutative op's operands swapped.
        let mut nodes = fast_gelu_nodes("x", "y");
        for k in [1, 2, 3, 5, 6, 7] {
            nodes[k].inputs.reverse();
        }
        let mut g = graph(nodes, fast_gelu_consts(), &["y"]);
        assert_eq!(fuse_fast_gelu(&mut g), 1);
        assert_eq!(ops(&g), ["FastGelu"]);
    }

    #[test]
    fn inexact_tanh_gelu_patterns_stay() {
        let check = |nodes: Vec<Node>, consts: Vec<Initializer>, outputs: &[&str]| {
            let mut g = graph(nodes, consts, outputs);
            assert_eq!(fuse_fast_gelu(&mut g), 0);
            assert_eq!(g.nodes.len(), 8);
            assert_eq!(g.opsets.len(), 1);
        };
        // √(2/π) one ulp off.
        let k = (2.0f64 / std::f64::consts::PI).sqrt() as f32;
        let mut consts = fast_gelu_consts();
        consts[2] = scalar("k", f32::from_bits(k.to_bits() + 1));
        check(fast_gelu_nodes("x", "y"), consts, &["y"]);
        // 0.0447 (another constant) and exponent 2.
        let mut consts = fast_gelu_consts();
        consts[1] = scalar("c", 0.0447);
        check(fast_gelu_nodes("x", "y"), consts, &["y"]);
        let mut consts = fast_gelu_consts();
        consts[0] = scalar("three", 2.0);
        check(fast_gelu_nodes("x", "y"), consts, &["y"]);
        // A 1-element vector instead of a scalar.
        let mut consts = fast_gelu_consts();
        consts[4] = init("half", vec![1], &[0.5]);
        check(fast_gelu_nodes("x", "y"), consts, &["y"]);
        // An intermediate read elsewhere, or a graph output.
        let mut nodes = fast_gelu_nodes("x", "y");
        nodes.push(node("Relu", &["th"], &["r"], vec![]));
        let mut g = graph(nodes, fast_gelu_consts(), &["y", "r"]);
        assert_eq!(fuse_fast_gelu(&mut g), 0);
        check(
            fast_gelu_nodes("x", "y"),
            fast_gelu_consts(),
            &["y", "inner"],
        );
        // Pow of another value than the x multiplied.
        let mut nodes = fast_gelu_nodes("x", "y");
        nodes[0].inputs[0] = "z".into();
        check(nodes, fast_gelu_consts(), &["y"]);
        // Sigmoid instead of Tanh.
        let mut nodes = fast_gelu_nodes("x", "y");
        nodes[4].op_type = "Sigmoid".into();
        check(nodes, fast_gelu_consts(), &["y"]);
        // A constant overridable as a graph input.
        let mut g = graph(fast_gelu_nodes("x", "y"), fast_gelu_consts(), &["y"]);
        g.inputs.push(Value::new("c", DType::F32, vec![]));
        assert_eq!(fuse_fast_gelu(&mut g), 0);
    }

    fn fast_gelu_bias_graph(bias: Initializer) -> Graph {
        let mut nodes = vec![
            node("MatMul", &["x", "w"], &["mm"], vec![]),
            node("Add", &["b", "mm"], &["a"], vec![]),
        ];
        nodes.extend(fast_gelu_nodes("a", "y"));
        let mut inits = fast_gelu_consts();
        inits.push(init("w", vec![4, 3], &[0.0; 12]));
        inits.push(bias);
        let mut g = graph(nodes, inits, &["y"]);
        g.value_info = shaped(&["mm", "a"], &bsh(3));
        g
    }

    #[test]
    fn fast_gelu_absorbs_a_bias_add() {
        let mut g = fast_gelu_bias_graph(init("b", vec![3], &[1., 2., 3.]));
        assert_eq!(fuse_fast_gelu(&mut g), 1);
        assert_eq!(ops(&g), ["MatMul", "FastGelu"]);
        let n = &g.nodes[1];
        assert_eq!(n.inputs, ["mm", "b"]);
        assert_eq!(n.outputs, ["y"]);
        assert_eq!(g.value_info.len(), 1);

        // 2-D or broadcast bias, or the biased value read elsewhere: FastGelu(a), Add kept.
        for (bias, extra_reader) in [
            (init("b", vec![1, 3], &[1., 2., 3.]), false),
            (init("b", vec![1], &[1.]), false),
            (init("b", vec![3], &[1., 2., 3.]), true),
        ] {
            let mut g = fast_gelu_bias_graph(bias);
            if extra_reader {
                g.nodes.push(node("Relu", &["a"], &["r"], vec![]));
                g.outputs.push(Value::new("r", DType::F32, bsh(3)));
            }
            assert_eq!(fuse_fast_gelu(&mut g), 1);
            let n = g
                .nodes
                .iter()
                .find(|n| n.op_type == "FastGelu")
                .expect("FastGelu");
            assert_eq!(n.inputs, ["a"]);
            assert!(ops(&g).contains(&"Add"));
        }
    }

    #[test]
    fn gelu_approximation_turns_gelu_and_bias_gelu_into_fast_gelu() {
        let mut nodes = vec![
            node("MatMul", &["x", "w"], &["mm"], vec![]),
            node("Add", &["mm", "b"], &["a"], vec![]),
        ];
        nodes.extend(gelu_nodes("a", "y"));
        nodes.extend(gelu_nodes("y", "z").into_iter().map(|mut n| {
            for s in n.outputs.iter_mut().chain(n.inputs.iter_mut()) {
                if ["d", "e", "p", "m"].contains(&s.as_str()) {
                    s.push('2');
                }
            }
            n.name.push('2');
            n
        }));
        let mut inits = gelu_consts();
        inits.push(init("w", vec![4, 3], &[0.0; 12]));
        inits.push(init("b", vec![3], &[1., 2., 3.]));
        let mut g = graph(nodes, inits, &["z"]);
        g.value_info = shaped(&["mm", "a", "y"], &bsh(3));
        assert_eq!(fuse_gelu(&mut g), 2);
        assert_eq!(fuse_bias_gelu(&mut g), 1);
        assert_eq!(ops(&g), ["MatMul", "BiasGelu", "Gelu"]);
        assert_eq!(approximate_gelu(&mut g), 2);
        assert_eq!(ops(&g), ["MatMul", "FastGelu", "FastGelu"]);
        assert_eq!(g.nodes[1].inputs, ["mm", "b"]);
        assert_eq!(g.nodes[2].inputs, ["y"]);
        assert!(g.nodes.iter().skip(1).all(|n| n.domain == MS_DOMAIN));
        assert_eq!(approximate_gelu(&mut g), 0);
    }

    /// `y = LayerNorm(Add(MatMul(x, w) + b, r))` over hidden 2.
    fn skip_ln_graph(ln_attrs: Vec<(&str, Attr)>) -> Graph {
        let mut g = graph(
            vec![
                node("MatMul", &["x", "w"], &["mm"], vec![]),
                node("Add", &["mm", "b"], &["a"], vec![]),
                node("Add", &["a", "r"], &["s"], vec![]),
                node("LayerNormalization", &["s", "g", "be"], &["y"], ln_attrs),
            ],
            vec![
                init("w", vec![2, 2], &[1., 0., 0., 1.]),
                init("b", vec![2], &[1., 2.]),
                init("g", vec![2], &[1., 1.]),
                init("be", vec![2], &[0., 0.]),
            ],
            &["y"],
        );
        g.inputs.push(Value::new("r", DType::F32, bsh(2)));
        g.value_info = shaped(&["mm", "a", "s"], &bsh(2));
        g
    }

    #[test]
    fn skip_layer_norm_fuses_with_bias() {
        let ln = vec![("axis", Attr::Int(-1)), ("epsilon", Attr::Float(1e-7))];
        let mut g = skip_ln_graph(ln);
        assert_eq!(fuse_skip_layer_norm(&mut g), 1);
        assert_eq!(ops(&g), ["MatMul", "SkipLayerNormalization"]);
        let n = &g.nodes[1];
        assert_eq!(n.inputs, ["mm", "r", "g", "be", "b"]);
        assert_eq!(n.outputs, ["y"]);
        assert_eq!(n.domain, MS_DOMAIN);
        assert!(matches!(n.attr("epsilon"), Some(Attr::Float(e)) if *e == 1e-7));
        assert_eq!(g.value_info.len(), 1);
        assert_eq!(g.opsets.last().map(|o| o.domain.as_str()), Some(MS_DOMAIN));
    }

    #[test]
    fn skip_layer_norm_keeps_a_sum_read_elsewhere_as_output_3() {
        let mut g = skip_ln_graph(vec![]);
        g.nodes.push(node("Relu", &["s"], &["z"], vec![]));
        g.outputs.push(Value::new("z", DType::F32, bsh(2)));
        assert_eq!(fuse_skip_layer_norm(&mut g), 1);
        assert_eq!(ops(&g), ["MatMul", "SkipLayerNormalization", "Relu"]);
        let n = &g.nodes[1];
        assert_eq!(n.inputs, ["mm", "r", "g", "be", "b"]);
        assert_eq!(n.outputs, ["y", "", "", "s"]);
        assert!(g.value_info.iter().any(|v| v.name == "s"));
    }

    #[test]
    fn skip_layer_norm_without_bias_and_default_epsilon() {
        // The bias Add's result is read elsewhere too: it stays, and is the first input.
        let mut g = skip_ln_graph(vec![]);
        g.nodes.push(node("Relu", &["a"], &["z"], vec![]));
        g.outputs.push(Value::new("z", DType::F32, bsh(2)));
        assert_eq!(fuse_skip_layer_norm(&mut g), 1);
        assert_eq!(ops(&g), ["MatMul", "Add", "SkipLayerNormalization", "Relu"]);
        let n = &g.nodes[2];
        assert_eq!(n.inputs, ["a", "r", "g", "be"]);
        assert!(matches!(n.attr("epsilon"), Some(Attr::Float(e)) if *e == 1e-5));
    }

    #[test]
    fn skip_layer_norm_without_beta() {
        // nn.LayerNorm(bias=False) (ModernBERT): no beta input, with and without the bias Add.
        let mut g = skip_ln_graph(vec![]);
        g.nodes[3].inputs.truncate(2);
        assert_eq!(fuse_skip_layer_norm(&mut g), 1);
        assert_eq!(ops(&g), ["MatMul", "SkipLayerNormalization"]);
        assert_eq!(g.nodes[1].inputs, ["mm", "r", "g", "", "b"]);
        let mut g = skip_ln_graph(vec![]);
        g.nodes[3].inputs.truncate(2);
        g.nodes.push(node("Relu", &["a"], &["z"], vec![]));
        g.outputs.push(Value::new("z", DType::F32, bsh(2)));
        assert_eq!(fuse_skip_layer_norm(&mut g), 1);
        assert_eq!(g.nodes[2].inputs, ["a", "r", "g"]);
    }

    #[test]
    fn inexact_skip_layer_norm_patterns_stay() {
        // Another axis.
        let mut g = skip_ln_graph(vec![("axis", Attr::Int(1))]);
        assert_eq!(fuse_skip_layer_norm(&mut g), 0);
        // A broadcast residual (the embeddings' [seq, hidden] positions).
        let mut g = skip_ln_graph(vec![]);
        g.inputs[1].shape = Some(vec![Dim::sym("seq"), Dim::Fixed(2)]);
        assert_eq!(fuse_skip_layer_norm(&mut g), 0);
        // Unknown shapes.
        let mut g = skip_ln_graph(vec![]);
        g.value_info.clear();
        assert_eq!(fuse_skip_layer_norm(&mut g), 0);
        // gamma is not an initializer.
        let mut g = skip_ln_graph(vec![]);
        g.initializers.retain(|i| i.name != "g");
        assert_eq!(fuse_skip_layer_norm(&mut g), 0);
        // Mean / inverse-std outputs requested.
        let mut g = skip_ln_graph(vec![]);
        g.nodes[3].outputs.push("mean".into());
        assert_eq!(fuse_skip_layer_norm(&mut g), 0);
        assert_eq!(g.nodes.len(), 4);
        assert_eq!(g.opsets.len(), 1);
    }

    fn ints(name: &str, values: &[i64]) -> Initializer {
        Initializer {
            name: name.into(),
            dtype: DType::I64,
            dims: vec![values.len() as i64],
            data: ferry_ir::TensorData::from_i64(values),
        }
    }

    /// ferry's `multi_head_attention` (hidden 4, 2 heads) over `x` with `additive_mask`
    /// of the graph input `attention_mask`, into `y`.
    fn attention_graph() -> Graph {
        let mut nodes = vec![
            node("Unsqueeze", &["attention_mask", "axes"], &["mu"], vec![]),
            node("Cast", &["mu"], &["mf"], vec![("to", Attr::Int(1))]),
            node("Sub", &["one", "mf"], &["inv"], vec![]),
            node("Mul", &["inv", "fmin"], &["madd"], vec![]),
        ];
        let mut inits = vec![
            ints("axes", &[1, 2]),
            scalar("one", 1.0),
            scalar("fmin", f32::MIN),
            ints("heads_shape", &[0, 0, 2, 2]),
            ints("out_shape", &[0, 0, 4]),
            scalar("scale", (2f64).powf(-0.5) as f32),
        ];
        for (k, (p, perm)) in [
            ("q", vec![0, 2, 1, 3]),
            ("k", vec![0, 2, 3, 1]),
            ("v", vec![0, 2, 1, 3]),
        ]
        .into_iter()
        .enumerate()
        {
            let n = |s: &str| format!("{p}_{s}");
            nodes.extend([
                node("MatMul", &["x", &n("w")], &[&n("mm")], vec![]),
                node("Add", &[&n("mm"), &n("b")], &[&n("a")], vec![]),
                node("Reshape", &[&n("a"), "heads_shape"], &[&n("r")], vec![]),
                node(
                    "Transpose",
                    &[&n("r")],
                    &[&n("t")],
                    vec![("perm", Attr::Ints(perm))],
                ),
            ]);
            let base = 100.0 * k as f32;
            let w: Vec<f32> = (0..16).map(|i| base + i as f32).collect();
            let b: Vec<f32> = (0..4).map(|i| base + 50.0 + i as f32).collect();
            inits.push(init(&n("w"), vec![4, 4], &w));
            inits.push(init(&n("b"), vec![4], &b));
        }
        nodes.extend([
            node("MatMul", &["q_t", "k_t"], &["qk"], vec![]),
            node("Mul", &["qk", "scale"], &["sc"], vec![]),
            node("Add", &["sc", "madd"], &["s"], vec![]),
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
        let mut g = graph(nodes, inits, &["y"]);
        g.inputs = shaped(&["x"], &bsh(4));
        g.inputs.push(Value::new(
            "attention_mask",
            DType::I64,
            vec![Dim::sym("batch"), Dim::sym("seq")],
        ));
        g
    }

    #[test]
    fn attention_packing_streams_the_bytes_the_owned_packing_had() {
        // Weights reach the fusion as folded transposes, as in an exported model.
        let mut g = attention_graph();
        for p in ["q", "k", "v"] {
            let w = g
                .initializers
                .iter_mut()
                .find(|i| i.name == format!("{p}_w"))
                .expect("weight");
            w.name = format!("{p}_w_src");
            g.nodes.insert(
                0,
                node(
                    "Transpose",
                    &[&format!("{p}_w_src")],
                    &[&format!("{p}_w")],
                    vec![],
                ),
            );
        }
        assert_eq!(crate::fold_transposes(&mut g).expect("fold"), 3);
        let value = |name: &str| {
            let i = g
                .initializers
                .iter()
                .find(|i| i.name == name)
                .expect("init");
            i.data.to_f32_vec().expect("values")
        };
        let ws: Vec<Vec<f32>> = ["q_w", "k_w", "v_w"].iter().map(|n| value(n)).collect();
        let bs: Vec<Vec<f32>> = ["q_b", "k_b", "v_b"].iter().map(|n| value(n)).collect();
        // The owned packing this fusion used to build.
        let h = 4;
        let mut want_w = Vec::new();
        for r in 0..h {
            for w in &ws {
                want_w.extend_from_slice(&w[r * h..(r + 1) * h]);
            }
        }
        let want_b: Vec<f32> = bs.concat();
        assert_eq!(fuse_attention(&mut g), 1);
        let att = g
            .nodes
            .iter()
            .find(|n| n.op_type == "Attention")
            .expect("fused");
        let find = |name: &str| {
            g.initializers
                .iter()
                .find(|i| i.name == name)
                .expect("init")
        };
        let (w, b) = (find(&att.inputs[1]), find(&att.inputs[2]));
        assert!(matches!(w.data, ferry_ir::TensorData::Concat { .. }));
        let bytes = |v: &[f32]| -> Vec<u8> { v.iter().flat_map(|x| x.to_le_bytes()).collect() };
        let mut streamed = Vec::new();
        w.data.write_to(&mut streamed).expect("write");
        assert_eq!(streamed, bytes(&want_w));
        assert_eq!(&*w.data.bytes().expect("bytes"), &bytes(&want_w)[..]);
        let mut streamed = Vec::new();
        b.data.write_to(&mut streamed).expect("write");
        assert_eq!(streamed, bytes(&want_b));
    }

    #[test]
    fn attention_fuses_with_packed_weights_and_a_shared_mask_cast() {
        let mut g = attention_graph();
        assert_eq!(fuse_attention(&mut g), 1);
        assert_eq!(
            ops(&g),
            ["Cast", "Unsqueeze", "Cast", "Sub", "Mul", "Attention"]
        );
        let cast = &g.nodes[0];
        assert_eq!(cast.inputs, ["attention_mask"]);
        assert!(matches!(cast.attr("to"), Some(Attr::Int(6))));
        let att = &g.nodes[5];
        assert_eq!(att.domain, MS_DOMAIN);
        assert_eq!(att.outputs, ["y"]);
        assert_eq!(att.inputs[0], "x");
        assert_eq!(att.inputs[3], cast.outputs[0]);
        assert!(matches!(att.attr("num_heads"), Some(Attr::Int(2))));
        assert!(
            matches!(att.attr("scale"), Some(Attr::Float(v)) if *v == (2f64).powf(-0.5) as f32)
        );
        assert!(matches!(att.attr("mask_filter_value"), Some(Attr::Float(v)) if *v == f32::MIN));
        let find = |name: &str| {
            g.initializers
                .iter()
                .find(|i| i.name == name)
                .expect("present")
        };
        let w = find(&att.inputs[1]);
        assert_eq!(w.dims, [4, 12]);
        let w = w.data.to_f32_vec().expect("present");
        // Row 1: q's row 1, then k's, then v's.
        assert_eq!(
            &w[12..24],
            &[
                4., 5., 6., 7., 104., 105., 106., 107., 204., 205., 206., 207.
            ]
        );
        let b = find(&att.inputs[2]);
        assert_eq!(b.dims, [12]);
        assert_eq!(
            b.data.to_f32_vec().expect("present"),
            [
                50., 51., 52., 53., 150., 151., 152., 153., 250., 251., 252., 253.
            ]
        );
        assert!(g.opsets.iter().any(|o| o.domain == MS_DOMAIN));
        // The mask chain is left for dead-node removal.
        assert_eq!(crate::remove_dead_nodes(&mut g), 4);
        assert_eq!(ops(&g), ["Cast", "Attention"]);
    }

    #[test]
    fn attention_scaled_by_a_division_fuses_with_the_reciprocal() {
        let mut g = attention_graph();
        let mul = g
            .nodes
            .iter_mut()
            .find(|n| n.op_type == "Mul" && n.inputs[0] == "qk")
            .expect("scale Mul");
        mul.op_type = "Div".into();
        mul.inputs[1] = "sqrt_d".into();
        g.initializers
            .push(scalar("sqrt_d", std::f32::consts::SQRT_2));
        assert_eq!(fuse_attention(&mut g), 1);
        let att = g
            .nodes
            .iter()
            .find(|n| n.op_type == "Attention")
            .expect("fused");
        let want = 1.0 / std::f32::consts::SQRT_2;
        assert!(matches!(att.attr("scale"), Some(Attr::Float(s)) if *s == want));
        // Dividing by a non-positive number is not a scale.
        let mut g = attention_graph();
        let mul = g
            .nodes
            .iter_mut()
            .find(|n| n.op_type == "Mul" && n.inputs[0] == "qk")
            .expect("scale Mul");
        mul.op_type = "Div".into();
        mul.inputs[1] = "neg".into();
        g.initializers.push(scalar("neg", -2.0));
        assert_eq!(fuse_attention(&mut g), 0);
    }

    #[test]
    fn attention_takes_another_additive_mask_as_attention_bias() {
        let mut g = attention_graph();
        let add = g
            .nodes
            .iter_mut()
            .find(|n| n.inputs.iter().any(|i| i == "madd"))
            .expect("mask add");
        add.inputs = vec!["sc".into(), "ext".into()];
        let (b, s) = (Dim::sym("batch"), Dim::sym("seq"));
        let mask =
            |d1: Dim, d2: Dim| Value::new("ext", DType::F32, vec![b.clone(), d1, d2, s.clone()]);
        let scores = Value::new(
            "sc",
            DType::F32,
            vec![b.clone(), Dim::Fixed(2), s.clone(), s.clone()],
        );
        // Unknown shapes, or a mask that broadcasts over the query axis: left alone.
        let mut g1 = g.clone();
        g1.inputs.push(mask(Dim::Fixed(1), s.clone()));
        assert_eq!(fuse_attention(&mut g1), 0);
        let mut g2 = g.clone();
        g2.inputs.push(mask(Dim::Fixed(1), Dim::Fixed(1)));
        g2.value_info.push(scores.clone());
        assert_eq!(fuse_attention(&mut g2), 0);
        // [batch, 1, seq, seq] for scores [batch, heads, seq, seq]: attention_bias.
        g.inputs.push(mask(Dim::Fixed(1), s.clone()));
        g.value_info.push(scores);
        assert_eq!(fuse_attention(&mut g), 1);
        let att = g
            .nodes
            .iter()
            .find(|n| n.op_type == "Attention")
            .expect("fused");
        assert_eq!(att.inputs.len(), 6);
        assert_eq!(&att.inputs[3..], ["", "", "ext"]);
        assert!(
            g.nodes
                .iter()
                .all(|n| n.op_type != "Cast" || n.inputs[0] != "attention_mask")
        );
    }

    #[test]
    fn head_reshapes_are_recognized_from_known_shapes() {
        // The [0, 0, heads, head_dim] / [0, 0, H] constants replaced by other shape inputs
        // (as a Concat of Shape dims would be), with the shapes known.
        let mut g = attention_graph();
        for n in g.nodes.iter_mut().filter(|n| n.op_type == "Reshape") {
            n.inputs[1] = format!("{}_dyn", n.inputs[1]);
        }
        let mut without = g.clone();
        assert_eq!(fuse_attention(&mut without), 0);
        let (b, s) = (Dim::sym("batch"), Dim::sym("seq"));
        let heads = vec![b.clone(), s.clone(), Dim::Fixed(2), Dim::Fixed(2)];
        for p in ["q", "k", "v"] {
            g.value_info.extend(shaped(&[&format!("{p}_a")], &bsh(4)));
            g.value_info
                .push(Value::new(format!("{p}_r"), DType::F32, heads.clone()));
        }
        g.value_info.push(Value::new("ct", DType::F32, heads));
        g.value_info.extend(shaped(&["y"], &bsh(4)));
        g.inputs.push(Value::new(
            "heads_shape_dyn",
            DType::I64,
            vec![Dim::Fixed(4)],
        ));
        g.inputs
            .push(Value::new("out_shape_dyn", DType::I64, vec![Dim::Fixed(3)]));
        assert_eq!(fuse_attention(&mut g), 1);
        // A reshape that does not split the last axis into heads is not one.
        let mut g = without;
        g.value_info.push(Value::new(
            "q_r",
            DType::F32,
            vec![s.clone(), b.clone(), Dim::Fixed(2), Dim::Fixed(2)],
        ));
        assert_eq!(fuse_attention(&mut g), 0);
    }

    #[test]
    fn two_attention_layers_share_one_mask_cast() {
        let mut g = attention_graph();
        // A second layer over y, reading the same mask and weights.
        let renamed: Vec<Node> = g
            .nodes
            .iter()
            .skip(4)
            .map(|n| {
                let r = |s: &String| match s.as_str() {
                    "x" => "y".to_string(),
                    "y" => "y2".to_string(),
                    s if g.initializers.iter().any(|i| i.name == s) || s == "madd" => s.into(),
                    s => format!("{s}2"),
                };
                Node {
                    name: format!("{}2", n.name),
                    inputs: n.inputs.iter().map(r).collect(),
                    outputs: n.outputs.iter().map(r).collect(),
                    ..n.clone()
                }
            })
            .collect();
        g.nodes.extend(renamed);
        g.outputs = shaped(&["y2"], &bsh(4));
        g.value_info = shaped(&["y"], &bsh(4));
        assert_eq!(fuse_attention(&mut g), 2);
        assert_eq!(ops(&g).iter().filter(|o| **o == "Cast").count(), 2);
        let att: Vec<&Node> = g
            .nodes
            .iter()
            .filter(|n| n.op_type == "Attention")
            .collect();
        assert_eq!(att.len(), 2);
        assert_eq!(att[0].inputs[3], att[1].inputs[3]);
        assert_eq!(att[1].inputs[0], "y");
        assert_ne!(att[0].inputs[1], att[1].inputs[1]);
    }

    #[test]
    fn inexact_attention_patterns_stay() {
        let variants: Vec<fn(&mut Graph)> = vec![
            // A score bias between the scale and the mask.
            |g| {
                let i = g
                    .nodes
                    .iter()
                    .position(|n| n.outputs == ["sc"])
                    .expect("present");
                g.nodes[i].outputs = vec!["sc0".into()];
                g.nodes
                    .insert(i + 1, node("Add", &["sc0", "sb"], &["sc"], vec![]));
                g.inputs.push(Value::new("sb", DType::F32, vec![]));
            },
            // k projects another input.
            |g| {
                let n = g
                    .nodes
                    .iter_mut()
                    .find(|n| n.outputs == ["k_mm"])
                    .expect("present");
                n.inputs[0] = "x2".into();
                g.inputs.extend(shaped(&["x2"], &bsh(4)));
            },
            // k transposed like q.
            |g| {
                let n = g
                    .nodes
                    .iter_mut()
                    .find(|n| n.outputs == ["k_t"])
                    .expect("present");
                n.attrs.insert("perm".into(), Attr::Ints(vec![0, 2, 1, 3]));
            },
            // A mask fill value other than f32::MIN.
            |g| {
                let i = g
                    .initializers
                    .iter_mut()
                    .find(|i| i.name == "fmin")
                    .expect("present");
                *i = scalar("fmin", -10000.0);
            },
            // The mask is not a graph input.
            |g| {
                g.inputs.retain(|v| v.name != "attention_mask");
                g.initializers.push(ints("attention_mask", &[1, 1]));
            },
            // The probabilities are also a graph output.
            |g| g.outputs.extend(shaped(&["pr"], &[])),
            // Softmax over another axis.
            |g| {
                let n = g
                    .nodes
                    .iter_mut()
                    .find(|n| n.op_type == "Softmax")
                    .expect("present");
                n.attrs.insert("axis".into(), Attr::Int(1));
            },
            // The output reshape does not restore the hidden size.
            |g| {
                let i = g
                    .initializers
                    .iter_mut()
                    .find(|i| i.name == "out_shape")
                    .expect("present");
                *i = ints("out_shape", &[0, 0, -1]);
            },
            // A weight that is a graph input (overridable), not a constant.
            |g| g.inputs.extend(shaped(&["v_w"], &[])),
            // Unknown input shape.
            |g| g.inputs[0].shape = None,
        ];
        for (k, change) in variants.iter().enumerate() {
            let mut g = attention_graph();
            change(&mut g);
            let before = ops(&g).len();
            assert_eq!(fuse_attention(&mut g), 0, "variant {k}");
            assert_eq!(ops(&g).len(), before, "variant {k}");
            assert!(!ops(&g).contains(&"Attention"), "variant {k}");
        }
    }

    /// ferry's BERT embeddings (hidden 2) over the int64 graph inputs `input_ids` and
    /// `token_type_ids`, into `y`.
    fn embed_graph() -> Graph {
        let nodes = vec![
            node(
                "Gather",
                &["word", "input_ids"],
                &["we"],
                vec![("axis", Attr::Int(0))],
            ),
            node(
                "Gather",
                &["types", "token_type_ids"],
                &["te"],
                vec![("axis", Attr::Int(0))],
            ),
            node("Add", &["we", "te"], &["e"], vec![]),
            node("Shape", &["input_ids"], &["shape"], vec![]),
            node("Slice", &["shape", "one", "two", "zero"], &["seq"], vec![]),
            node("Slice", &["pos", "zero", "seq", "zero"], &["pe"], vec![]),
            node("Add", &["e", "pe"], &["s"], vec![]),
            node(
                "LayerNormalization",
                &["s", "gamma", "beta"],
                &["y"],
                vec![("axis", Attr::Int(-1)), ("epsilon", Attr::Float(1e-12))],
            ),
        ];
        let inits = vec![
            init("word", vec![3, 2], &[0., 1., 2., 3., 4., 5.]),
            init("types", vec![2, 2], &[0., 1., 2., 3.]),
            init("pos", vec![4, 2], &[0., 1., 2., 3., 4., 5., 6., 7.]),
            init("gamma", vec![2], &[1., 1.]),
            init("beta", vec![2], &[0., 0.]),
            ints("one", &[1]),
            ints("two", &[2]),
            ints("zero", &[0]),
        ];
        let mut g = graph(nodes, inits, &["y"]);
        let bs = vec![Dim::sym("batch"), Dim::sym("seq")];
        g.inputs = vec![
            Value::new("input_ids", DType::I64, bs.clone()),
            Value::new("token_type_ids", DType::I64, bs),
        ];
        g
    }

    #[test]
    fn embed_layer_norm_fuses_with_one_cast_per_ids_input() {
        let mut g = embed_graph();
        // An existing Cast of token_type_ids to int32 is reused.
        g.nodes.insert(
            0,
            node(
                "Cast",
                &["token_type_ids"],
                &["tt32"],
                vec![("to", Attr::Int(6))],
            ),
        );
        assert_eq!(fuse_embed_layer_norm(&mut g), 1);
        assert_eq!(ops(&g), ["Cast", "Cast", "EmbedLayerNormalization"]);
        let cast = &g.nodes[0];
        assert_eq!(cast.inputs, ["input_ids"]);
        assert!(matches!(cast.attr("to"), Some(Attr::Int(6))));
        let e = &g.nodes[2];
        assert_eq!(e.domain, MS_DOMAIN);
        assert_eq!(
            e.inputs,
            [
                cast.outputs[0].as_str(),
                "tt32",
                "word",
                "pos",
                "types",
                "gamma",
                "beta"
            ]
        );
        assert_eq!(e.outputs.len(), 2);
        assert_eq!(e.outputs[0], "y");
        assert!(matches!(e.attr("epsilon"), Some(Attr::Float(v)) if *v == 1e-12));
        assert!(g.opsets.iter().any(|o| o.domain == MS_DOMAIN));
        // Swapped Add operands match too.
        let mut g = embed_graph();
        g.nodes[2].inputs.reverse();
        g.nodes[6].inputs.reverse();
        assert_eq!(fuse_embed_layer_norm(&mut g), 1);
        assert_eq!(ops(&g), ["Cast", "Cast", "EmbedLayerNormalization"]);
        assert_eq!(g.nodes[2].inputs[2], "word");
    }

    #[test]
    fn torch_position_ids_buffer_lookup_fuses() {
        let torch_positions = |g: &mut Graph, buffer: &[i64]| {
            g.nodes.splice(
                3..6,
                [
                    node("Shape", &["input_ids"], &["shape"], vec![]),
                    node("Gather", &["shape", "one_s"], &["seq"], vec![]),
                    node("Unsqueeze", &["seq", "zero"], &["seq1"], vec![]),
                    node(
                        "Slice",
                        &["buf", "zero", "seq1", "one", "one"],
                        &["pidx"],
                        vec![],
                    ),
                    node("Gather", &["pos", "pidx"], &["pe"], vec![]),
                ],
            );
            g.initializers.push(Initializer {
                name: "buf".into(),
                dtype: DType::I64,
                dims: vec![1, buffer.len() as i64],
                data: ferry_ir::TensorData::from_i64(buffer),
            });
            g.initializers.push(Initializer {
                name: "one_s".into(),
                dtype: DType::I64,
                dims: vec![],
                data: ferry_ir::TensorData::from_i64(&[1]),
            });
        };
        let mut g = embed_graph();
        torch_positions(&mut g, &[0, 1, 2, 3]);
        assert_eq!(fuse_embed_layer_norm(&mut g), 1);
        let e = g
            .nodes
            .iter()
            .find(|n| n.op_type == "EmbedLayerNormalization")
            .expect("fused");
        assert_eq!(e.inputs[3], "pos");
        // A buffer that is not 0, 1, …, or longer than the table: left alone.
        for buffer in [&[0, 2, 1, 3][..], &[0, 1, 2, 3, 4][..]] {
            let mut g = embed_graph();
            torch_positions(&mut g, buffer);
            assert_eq!(fuse_embed_layer_norm(&mut g), 0, "{buffer:?}");
        }
    }

    #[test]
    fn distilbert_embeddings_fuse_without_token_types() {
        let mut g = embed_graph();
        // Drop the token-type lookup: LayerNormalization(Add(Gather(word, ids), pos rows)).
        g.nodes.drain(1..3);
        g.nodes[4].inputs = vec!["we".into(), "pe".into()];
        g.inputs.truncate(1);
        assert_eq!(fuse_embed_layer_norm(&mut g), 1);
        assert_eq!(ops(&g), ["Cast", "EmbedLayerNormalization"]);
        let e = &g.nodes[1];
        let ids = g.nodes[0].outputs[0].as_str();
        assert_eq!(e.inputs, [ids, "", "word", "pos", "", "gamma", "beta"]);
        // Word rows from another ids input than the positions' length do not match.
        let mut g = embed_graph();
        g.nodes.drain(1..3);
        g.nodes[4].inputs = vec!["we".into(), "pe".into()];
        g.nodes[0].inputs[1] = "token_type_ids".into();
        assert_eq!(fuse_embed_layer_norm(&mut g), 0);
    }

    #[test]
    fn inexact_embed_layer_norm_patterns_stay() {
        type Change = Box<dyn Fn(&mut Graph)>;
        let variants: Vec<Change> = vec![
            // Not the sequence length: Shape(ids)[1:1].
            Box::new(|g| g.nodes[4].inputs[2] = "one".into()),
            // Rows from 1, not 0.
            Box::new(|g| g.nodes[5].inputs[1] = "one".into()),
            // int32 ids.
            Box::new(|g| g.inputs[0].dtype = DType::I32),
            // Gather on axis 1.
            Box::new(|g| {
                g.nodes[0].attrs.insert("axis".into(), Attr::Int(1));
            }),
            // The embedding sum is read elsewhere.
            Box::new(|g| g.outputs.push(Value::new("e", DType::F32, vec![]))),
            // LayerNormalization over another axis.
            Box::new(|g| {
                g.nodes[7].attrs.insert("axis".into(), Attr::Int(1));
            }),
            // ids that are initializers, not graph inputs.
            Box::new(|g| {
                g.inputs.remove(0);
                g.initializers.push(ints("input_ids", &[0, 1]));
            }),
        ];
        for (k, change) in variants.iter().enumerate() {
            let mut g = embed_graph();
            change(&mut g);
            let before: Vec<String> = ops(&g).iter().map(|o| o.to_string()).collect();
            assert_eq!(fuse_embed_layer_norm(&mut g), 0, "variant {k}");
            assert_eq!(ops(&g), before, "variant {k}");
        }
    }
}
