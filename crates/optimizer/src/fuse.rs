//! Exact-rewrite fusions into ONNX Runtime's contrib ops (domain `com.microsoft`): a pattern
//! is rewritten only when it matches exactly (op types, constant values, shapes, and no other
//! consumer of any value the rewrite removes); anything else is left alone.

use std::collections::{HashMap, HashSet};

use ferry_ir::{Attr, DType, Dim, Graph, Initializer, Node, OpsetImport};

/// ONNX Runtime's contrib-op domain.
pub const MS_DOMAIN: &str = "com.microsoft";

fn is_onnx_domain(n: &Node) -> bool {
    n.domain.is_empty() || n.domain == "ai.onnx"
}

/// Who produces and who reads each value, and what is known about it.
struct Index<'g> {
    graph: &'g Graph,
    producer: HashMap<&'g str, usize>,
    consumers: HashMap<&'g str, usize>,
    graph_outputs: HashSet<&'g str>,
    /// Initializers that are not overridable graph inputs.
    inits: HashMap<&'g str, &'g Initializer>,
    shapes: HashMap<&'g str, &'g [Dim]>,
}

impl<'g> Index<'g> {
    fn new(graph: &'g Graph) -> Self {
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
    fn producer(&self, value: &str, op: &str) -> Option<(usize, &'g Node)> {
        let &i = self.producer.get(value)?;
        let n = &self.graph.nodes[i];
        (n.op_type == op && is_onnx_domain(n)).then_some((i, n))
    }

    /// Whether `value` is read by exactly one node input and is not a graph output, so the
    /// node producing it can go once that reader is rewritten.
    fn single_use(&self, value: &str) -> bool {
        self.consumers.get(value) == Some(&1) && !self.graph_outputs.contains(value)
    }

    /// Whether `value` is a rank-0 float32 initializer equal to `want` bit for bit.
    fn is_scalar(&self, value: &str, want: f32) -> bool {
        let Some(i) = self.inits.get(value) else {
            return false;
        };
        i.dtype == DType::F32
            && i.dims.is_empty()
            && i.data.len() == 4
            && matches!(i.data.to_f32_vec().as_deref(), Ok([v]) if v.to_bits() == want.to_bits())
    }

    /// Whether `value` is a 1-D float32 initializer of `len` elements.
    fn is_vector(&self, value: &str, len: i64) -> bool {
        self.inits
            .get(value)
            .is_some_and(|i| i.dtype == DType::F32 && i.dims == [len])
    }

    /// The last dimension of `value`, when fixed and known.
    fn last_dim(&self, value: &str) -> Option<i64> {
        self.shapes.get(value)?.last()?.fixed()
    }
}

/// One rewrite: `anchor` becomes `node`, the nodes in `removed` go.
struct Rewrite {
    anchor: usize,
    node: Node,
    removed: Vec<usize>,
}

/// Applies non-overlapping rewrites, drops the `value_info` of values no longer produced,
/// and imports `com.microsoft` (version 1) when a contrib op was emitted. Returns how many
/// were applied.
fn apply(graph: &mut Graph, rewrites: Vec<Rewrite>) -> usize {
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
    graph.value_info.retain(|v| !gone.contains(&v.name));
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
fn unique_name(names: &mut HashSet<String>, base: String) -> String {
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
fn fused_name(names: &mut HashSet<String>, like: &str, op: &str) -> String {
    let scope = like.rsplit_once('/').map_or("", |(s, _)| s);
    unique_name(names, format!("{scope}/{op}"))
}

fn node_names(graph: &Graph) -> HashSet<String> {
    graph.nodes.iter().map(|n| n.name.clone()).collect()
}

fn ms_node(name: String, op: &str, inputs: Vec<String>, outputs: Vec<String>) -> Node {
    Node {
        name,
        op_type: op.to_string(),
        domain: MS_DOMAIN.to_string(),
        inputs,
        outputs,
        attrs: Default::default(),
    }
}

/// The two inputs of a binary node, in both orders (for commutative ops).
fn both_orders(n: &Node) -> [(&str, &str); 2] {
    let (a, b) = (n.inputs[0].as_str(), n.inputs[1].as_str());
    [(a, b), (b, a)]
}

fn is_binary(n: &Node, op: &str) -> bool {
    n.op_type == op && is_onnx_domain(n) && n.inputs.len() == 2 && n.outputs.len() == 1
}

/// Fuses the exact erf GELU torch exports,
/// `Mul(Mul(x, Add(Erf(Div(x, √2)), 1)), 0.5)` (float32 scalars `1.4142135`, `1`, `0.5`;
/// `Add` and `Mul` in either operand order), into `com.microsoft` `Gelu(x)`. Every
/// intermediate must have no other consumer. Returns how many were fused.
pub fn fuse_gelu(graph: &mut Graph) -> usize {
    let ix = Index::new(graph);
    let mut names = node_names(graph);
    let mut taken: HashSet<usize> = HashSet::new();
    let mut rewrites = Vec::new();
    for (i, mul_half) in graph.nodes.iter().enumerate() {
        if !is_binary(mul_half, "Mul") {
            continue;
        }
        let m = both_orders(mul_half).into_iter().find_map(|(p, half)| {
            if !ix.is_scalar(half, 0.5) || !ix.single_use(p) {
                return None;
            }
            let (mi, mul_x) = ix.producer(p, "Mul").filter(|(_, n)| is_binary(n, "Mul"))?;
            both_orders(mul_x).into_iter().find_map(|(x, q)| {
                if !ix.single_use(q) {
                    return None;
                }
                let (ai, add) = ix.producer(q, "Add").filter(|(_, n)| is_binary(n, "Add"))?;
                let e = both_orders(add)
                    .into_iter()
                    .find(|&(e, one)| ix.is_scalar(one, 1.0) && ix.single_use(e))?
                    .0;
                let (ei, erf) = ix.producer(e, "Erf")?;
                let d = erf.inputs.first().filter(|_| erf.inputs.len() == 1)?;
                if !ix.single_use(d) {
                    return None;
                }
                let (di, div) = ix.producer(d, "Div").filter(|(_, n)| is_binary(n, "Div"))?;
                let sqrt2 = std::f32::consts::SQRT_2;
                (div.inputs[0] == x && ix.is_scalar(&div.inputs[1], sqrt2))
                    .then(|| (x.to_string(), vec![mi, ai, ei, di]))
            })
        });
        let Some((x, removed)) = m else { continue };
        if removed.iter().chain([&i]).any(|k| taken.contains(k)) {
            continue;
        }
        taken.extend(removed.iter().copied().chain([i]));
        let name = fused_name(&mut names, &mul_half.name, "Gelu");
        let node = ms_node(name, "Gelu", vec![x], mul_half.outputs.clone());
        rewrites.push(Rewrite {
            anchor: i,
            node,
            removed,
        });
    }
    apply(graph, rewrites)
}

/// Fuses `Gelu(Add(MatMul(..), bias))` (a `com.microsoft` `Gelu`, e.g. from [`fuse_gelu`];
/// bias a 1-D float32 initializer as long as the MatMul output's last axis; the Add's result
/// read only by the Gelu) into `com.microsoft` `BiasGelu(matmul_out, bias)`. Returns how
/// many were fused.
pub fn fuse_bias_gelu(graph: &mut Graph) -> usize {
    let ix = Index::new(graph);
    let mut names = node_names(graph);
    let mut rewrites = Vec::new();
    for (i, gelu) in graph.nodes.iter().enumerate() {
        if gelu.op_type != "Gelu"
            || gelu.domain != MS_DOMAIN
            || gelu.inputs.len() != 1
            || gelu.outputs.len() != 1
            || !ix.single_use(&gelu.inputs[0])
        {
            continue;
        }
        let Some((ai, add)) = ix
            .producer(&gelu.inputs[0], "Add")
            .filter(|(_, n)| is_binary(n, "Add"))
        else {
            continue;
        };
        let m = both_orders(add).into_iter().find(|&(mm, bias)| {
            ix.producer(mm, "MatMul").is_some()
                && ix.last_dim(mm).is_some_and(|h| {
                    ix.is_vector(bias, h) && ix.last_dim(&add.outputs[0]) == Some(h)
                })
        });
        let Some((mm, bias)) = m else { continue };
        let name = fused_name(&mut names, &gelu.name, "BiasGelu");
        let node = ms_node(
            name,
            "BiasGelu",
            vec![mm.to_string(), bias.to_string()],
            gelu.outputs.clone(),
        );
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
    let mut names = node_names(graph);
    let mut taken: HashSet<usize> = HashSet::new();
    let mut rewrites = Vec::new();
    for (i, out) in graph.nodes.iter().enumerate() {
        if !is_binary(out, "Mul") {
            continue;
        }
        let m = both_orders(out).into_iter().find_map(|(h, p)| {
            if !ix.single_use(h) || !ix.single_use(p) {
                return None;
            }
            // hx = Mul(x, 0.5)
            let (hi, hx) = ix.producer(h, "Mul").filter(|(_, n)| is_binary(n, "Mul"))?;
            let x = both_orders(hx)
                .into_iter()
                .find(|&(_, half)| ix.is_scalar(half, 0.5))?
                .0;
            // p = Add(Tanh(..), 1)
            let (pi, add1) = ix.producer(p, "Add").filter(|(_, n)| is_binary(n, "Add"))?;
            let th = both_orders(add1)
                .into_iter()
                .find(|&(th, one)| ix.is_scalar(one, 1.0) && ix.single_use(th))?
                .0;
            let (ti, tanh) = ix.producer(th, "Tanh")?;
            let s = tanh.inputs.first().filter(|_| tanh.inputs.len() == 1)?;
            if !ix.single_use(s) {
                return None;
            }
            // scaled = Mul(inner, √(2/π))
            let (si, scaled) = ix.producer(s, "Mul").filter(|(_, n)| is_binary(n, "Mul"))?;
            let inner = both_orders(scaled)
                .into_iter()
                .find(|&(inner, k)| ix.is_scalar(k, sqrt_2_over_pi()) && ix.single_use(inner))?
                .0;
            // inner = Add(x, Mul(Pow(x, 3), 0.044715))
            let (ii, add_x) = ix
                .producer(inner, "Add")
                .filter(|(_, n)| is_binary(n, "Add"))?;
            let cc = both_orders(add_x)
                .into_iter()
                .find(|&(ax, cc)| ax == x && ix.single_use(cc))?
                .1;
            let (ci, mul_c) = ix
                .producer(cc, "Mul")
                .filter(|(_, n)| is_binary(n, "Mul"))?;
            let cube = both_orders(mul_c)
                .into_iter()
                .find(|&(cube, c)| ix.is_scalar(c, 0.044715) && ix.single_use(cube))?
                .0;
            let (qi, pow) = ix
                .producer(cube, "Pow")
                .filter(|(_, n)| is_binary(n, "Pow"))?;
            (pow.inputs[0] == x && ix.is_scalar(&pow.inputs[1], 3.0))
                .then(|| (x, vec![hi, pi, ti, si, ii, ci, qi]))
        });
        let Some((x, mut removed)) = m else { continue };
        // x read only by Pow, the inner Add and Mul(x, 0.5): a bias Add can be absorbed.
        let bias = (ix.consumers.get(x) == Some(&3) && !ix.graph_outputs.contains(x))
            .then(|| ix.producer(x, "Add").filter(|(_, n)| is_binary(n, "Add")))
            .flatten()
            .and_then(|(bi, badd)| {
                both_orders(badd)
                    .into_iter()
                    .find(|&(mm, bias)| {
                        ix.producer(mm, "MatMul").is_some()
                            && ix
                                .last_dim(mm)
                                .is_some_and(|h| ix.is_vector(bias, h) && ix.last_dim(x) == Some(h))
                    })
                    .map(|(mm, bias)| (bi, mm.to_string(), bias.to_string()))
            })
            .filter(|(bi, _, _)| !taken.contains(bi));
        let inputs = match bias {
            Some((bi, mm, bias)) => {
                removed.push(bi);
                vec![mm, bias]
            }
            None => vec![x.to_string()],
        };
        if removed.iter().chain([&i]).any(|k| taken.contains(k)) {
            continue;
        }
        taken.extend(removed.iter().copied().chain([i]));
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

/// Fuses `LayerNormalization(Add(a, b), gamma, beta)` (default domain, so opset ≥ 17; axis
/// −1, default stash type, one output; `a` and `b` of the same known rank-3 shape; gamma and
/// beta 1-D float32 initializers of the hidden size; the Add's result read only by the
/// LayerNormalization) into `com.microsoft` `SkipLayerNormalization(a, b, gamma, beta)` with
/// its `epsilon`. When `a` (or `b`) is itself `Add(MatMul(..), bias)` with a 1-D bias
/// initializer and no other consumer, that Add is absorbed as the 5th input. Returns how many
/// were fused.
pub fn fuse_skip_layer_norm(graph: &mut Graph) -> usize {
    let ix = Index::new(graph);
    let mut names = node_names(graph);
    let mut taken: HashSet<usize> = HashSet::new();
    let mut rewrites = Vec::new();
    for (i, ln) in graph.nodes.iter().enumerate() {
        if ln.op_type != "LayerNormalization"
            || !is_onnx_domain(ln)
            || ln.inputs.len() != 3
            || ln.outputs.len() != 1
            || !ix.single_use(&ln.inputs[0])
        {
            continue;
        }
        let axis_ok = matches!(ln.attr("axis"), None | Some(Attr::Int(-1)));
        let stash_ok = matches!(ln.attr("stash_type"), None | Some(Attr::Int(1)));
        let epsilon = match ln.attr("epsilon") {
            None => 1e-5,
            Some(Attr::Float(e)) => *e,
            Some(_) => continue,
        };
        let extra = ln
            .attrs
            .keys()
            .any(|k| !["axis", "epsilon", "stash_type"].contains(&k.as_str()));
        if !axis_ok || !stash_ok || extra {
            continue;
        }
        let Some((ai, add)) = ix
            .producer(&ln.inputs[0], "Add")
            .filter(|(_, n)| is_binary(n, "Add"))
        else {
            continue;
        };
        let (a, b) = (add.inputs[0].as_str(), add.inputs[1].as_str());
        let (Some(sa), Some(sb)) = (ix.shapes.get(a), ix.shapes.get(b)) else {
            continue;
        };
        let Some(h) = sa.last().and_then(Dim::fixed) else {
            continue;
        };
        if sa.len() != 3
            || sa != sb
            || !ix.is_vector(&ln.inputs[1], h)
            || !ix.is_vector(&ln.inputs[2], h)
        {
            continue;
        }
        // A bias Add on either side becomes the 5th input.
        let bias_add = |v: &str| {
            if !ix.single_use(v) {
                return None;
            }
            let (bi, badd) = ix.producer(v, "Add").filter(|(_, n)| is_binary(n, "Add"))?;
            both_orders(badd)
                .into_iter()
                .find(|&(mm, bias)| {
                    ix.producer(mm, "MatMul").is_some()
                        && ix.last_dim(mm) == Some(h)
                        && ix.is_vector(bias, h)
                })
                .map(|(mm, bias)| (bi, mm.to_string(), bias.to_string()))
        };
        let with_bias = bias_add(a)
            .map(|r| (r, b))
            .or_else(|| bias_add(b).map(|r| (r, a)))
            .filter(|((bi, _, _), _)| !taken.contains(bi));
        let (removed, inputs) = match with_bias {
            Some(((bi, mm, bias), skip)) => {
                let (gamma, beta) = (ln.inputs[1].clone(), ln.inputs[2].clone());
                (vec![ai, bi], vec![mm, skip.to_string(), gamma, beta, bias])
            }
            None => (
                vec![ai],
                vec![
                    a.to_string(),
                    b.to_string(),
                    ln.inputs[1].clone(),
                    ln.inputs[2].clone(),
                ],
            ),
        };
        if removed.iter().chain([&i]).any(|k| taken.contains(k)) {
            continue;
        }
        taken.extend(removed.iter().copied().chain([i]));
        let name = fused_name(&mut names, &ln.name, "SkipLayerNormalization");
        let mut node = ms_node(name, "SkipLayerNormalization", inputs, ln.outputs.clone());
        node.attrs
            .insert("epsilon".to_string(), Attr::Float(epsilon));
        rewrites.push(Rewrite {
            anchor: i,
            node,
            removed,
        });
    }
    apply(graph, rewrites)
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
        // The sum is read elsewhere.
        let mut g = skip_ln_graph(vec![]);
        g.outputs.push(Value::new("s", DType::F32, bsh(2)));
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
}
