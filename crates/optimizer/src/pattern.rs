//! One small pattern matcher the fusions declare their subgraphs to (as ONNX Runtime's
//! `fusion_*.py` share one path matcher).
//!
//! A pattern is a tree of [`P`] rooted at the node a fusion rewrites: each [`Op`] names the
//! op type(s) it accepts and, input by input, what feeds it: another [`Op`] (the producer of
//! that input), a captured value ([`P::Value`], equal wherever the same name recurs), a
//! captured initializer with a predicate ([`P::Init`]), alternatives ([`P::Either`], first
//! that matches wins) or anything ([`P::Any`]). Binary ops marked
//! [`commutative`](Op::commutative) match their inputs in either order;
//! [`optional`](Op::optional) unary ops (a `Cast` one exporter writes and another does not)
//! match when present and are skipped when not. A named [`Op`] reached twice (a value read
//! by two pattern nodes, e.g. the `x` of `x * rsqrt(mean(x²))`) must be the same node.
//!
//! Every value produced by a non-root pattern node must be read only inside the match (by
//! default exactly once and not a graph output; [`Op::uses`] sets another count), so a
//! fusion can remove those nodes; a [`kept`](Op::kept) subtree (a mask all layers share) is
//! matched but neither counted nor removed. [`Pattern::at`] returns the bound nodes and values as a
//! [`Match`].

use ferry_ir::{DType, Initializer, Node};

use crate::fuse::{Index, input_at, is_onnx_domain};

/// What feeds one input of a pattern node.
#[derive(Clone)]
pub(crate) enum P {
    /// Produced by a node matching this pattern.
    Op(Box<Op>),
    /// Any non-empty value, bound to the name (the same value wherever the name recurs).
    Value(&'static str),
    /// An initializer (not overridable as a graph input) the predicate accepts, bound to
    /// the name.
    Init(&'static str, fn(&Initializer) -> bool),
    /// The first alternative that matches.
    Either(Vec<P>),
    /// Any non-empty value, not bound.
    #[cfg_attr(not(test), allow(dead_code))]
    Any,
}

/// A pattern node: a default-domain (unless [`domain`](Op::domain) says otherwise) node
/// whose op type is one of `ops`, with one output, exactly as many inputs as the pattern
/// lists (unless [`min_inputs`](Op::min_inputs)), each matching its [`P`].
#[derive(Clone)]
pub(crate) struct Op {
    name: &'static str,
    ops: Vec<&'static str>,
    domain: &'static str,
    inputs: Vec<P>,
    min_inputs: Option<usize>,
    commutative: bool,
    optional: bool,
    kept: bool,
    uses: Option<usize>,
    shape_readers: bool,
    check: Option<fn(&Index<'_>, &Node) -> bool>,
}

/// A pattern node of one op type; see [`Op`].
pub(crate) fn op(op_type: &'static str, inputs: Vec<P>) -> Op {
    one_of(&[op_type], inputs)
}

/// A pattern node accepting any of `ops` (structurally alike, e.g. `Sqrt`-free forms).
pub(crate) fn one_of(ops: &[&'static str], inputs: Vec<P>) -> Op {
    Op {
        name: "",
        ops: ops.to_vec(),
        domain: "",
        inputs,
        min_inputs: None,
        commutative: false,
        optional: false,
        kept: false,
        uses: Some(1),
        shape_readers: false,
        check: None,
    }
}

/// A captured value ([`P::Value`]).
pub(crate) fn val(name: &'static str) -> P {
    P::Value(name)
}

/// A captured initializer ([`P::Init`]).
pub(crate) fn init(name: &'static str, pred: fn(&Initializer) -> bool) -> P {
    P::Init(name, pred)
}

impl Op {
    /// Binds the matched node under `name` ([`Match::node`]); a name reached again must
    /// be the same node.
    pub(crate) fn named(mut self, name: &'static str) -> Self {
        self.name = name;
        self
    }

    /// Matches the two inputs in either order.
    pub(crate) fn commutative(mut self) -> Self {
        self.commutative = true;
        self
    }

    /// When the value is not produced by this (unary) op, its input pattern is matched
    /// against the value itself.
    #[cfg_attr(not(test), allow(dead_code))]
    pub(crate) fn optional(mut self) -> Self {
        self.optional = true;
        self
    }

    /// The output must have exactly `n` readers (and not be a graph output); `None`: any
    /// number (the node is kept by the rewrite, or shared with another match).
    pub(crate) fn uses(mut self, n: Option<usize>) -> Self {
        self.uses = n;
        self
    }

    /// `Shape` nodes reading the output are not counted by [`uses`](Op::uses) (a fusion
    /// that removes the node re-points them; optimum's exports read shapes everywhere).
    pub(crate) fn shape_readers(mut self) -> Self {
        self.shape_readers = true;
        self
    }

    /// Matched where it is and left by the rewrite (a mask subgraph other layers share):
    /// neither this node nor any node below it is in [`Match::interior`], and their
    /// readers are not counted.
    pub(crate) fn kept(mut self) -> Self {
        self.kept = true;
        self.uses = None;
        self
    }

    /// Accepts nodes with more inputs than the pattern lists (the rest unchecked).
    pub(crate) fn min_inputs(mut self) -> Self {
        self.min_inputs = Some(self.inputs.len());
        self
    }

    /// The node's domain (`com.microsoft` for a contrib op an earlier pass emitted).
    #[allow(dead_code)]
    pub(crate) fn domain(mut self, domain: &'static str) -> Self {
        self.domain = domain;
        self
    }

    /// An extra predicate on the node (attributes, shapes).
    pub(crate) fn check(mut self, f: fn(&Index<'_>, &Node) -> bool) -> Self {
        self.check = Some(f);
        self
    }

    /// As a [`P`] input of another pattern node.
    pub(crate) fn p(self) -> P {
        P::Op(Box::new(self))
    }
}

impl From<Op> for P {
    fn from(o: Op) -> P {
        o.p()
    }
}

/// A whole pattern: its root [`Op`] is the node a fusion rewrites.
pub(crate) struct Pattern {
    root: Op,
}

/// What a pattern bound: named nodes and values, and every node matched below the root.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Match {
    /// The root node's index.
    pub(crate) root: usize,
    /// Named pattern nodes → node index.
    nodes: Vec<(&'static str, usize)>,
    /// Captured values and initializers → value name.
    values: Vec<(&'static str, String)>,
    /// Every matched node except the root (what a rewrite of the root removes), in match
    /// order, without duplicates.
    pub(crate) interior: Vec<usize>,
    /// How many [`kept`](Op::kept) nodes enclose the node being matched.
    kept: usize,
}

impl Match {
    /// The captured value `name` (`""` when the pattern has none by that name).
    pub(crate) fn value(&self, name: &str) -> &str {
        self.values
            .iter()
            .find(|(n, _)| *n == name)
            .map_or("", |(_, v)| v.as_str())
    }

    /// The node bound to `name`.
    pub(crate) fn node(&self, name: &str) -> Option<usize> {
        self.nodes.iter().find(|(n, _)| *n == name).map(|&(_, i)| i)
    }
}

impl Pattern {
    /// A pattern rooted at `root`.
    pub(crate) fn new(root: Op) -> Self {
        Self { root }
    }

    /// Matches the pattern with its root at node `i`.
    pub(crate) fn at(&self, ix: &Index<'_>, i: usize) -> Option<Match> {
        let mut m = Match {
            root: i,
            ..Match::default()
        };
        // The root's own readers and `optional` are not looked at (`match_value` does).
        match_node(ix, &self.root, i, &mut m).then_some(m)
    }

    /// Matches the pattern with its root at the node producing `value`.
    pub(crate) fn at_value(&self, ix: &Index<'_>, value: &str) -> Option<Match> {
        self.at(ix, *ix.producer.get(value)?)
    }

    /// Every node index where the pattern matches, with its match.
    #[cfg_attr(not(test), allow(dead_code))]
    pub(crate) fn all(&self, ix: &Index<'_>) -> Vec<Match> {
        (0..ix.graph.nodes.len())
            .filter_map(|i| self.at(ix, i))
            .collect()
    }
}

/// Matches `p` against the value `v`, extending `m`; on failure `m` is unchanged.
fn match_value(ix: &Index<'_>, p: &P, v: &str, m: &mut Match) -> bool {
    if v.is_empty() {
        return false;
    }
    match p {
        P::Any => true,
        P::Value(name) => bind(m, name, v),
        P::Init(name, pred) => ix.inits.get(v).is_some_and(|i| pred(i)) && bind(m, name, v),
        P::Either(alts) => alts
            .iter()
            .any(|a| attempt(m, |m| match_value(ix, a, v, m))),
        P::Op(o) => {
            let produced = ix.producer.get(v).copied();
            let is_op = produced.is_some_and(|i| op_fits(ix, o, &ix.graph.nodes[i]));
            if !is_op {
                return o.optional
                    && o.inputs.len() == 1
                    && attempt(m, |m| match_value(ix, &o.inputs[0], v, m));
            }
            let Some(i) = produced else { return false };
            if let Some(n) = o.uses.filter(|_| m.kept == 0) {
                let mut readers = ix.consumers.get(v).copied().unwrap_or(0);
                if o.shape_readers {
                    readers = readers.saturating_sub(shape_readers(ix, v).len());
                }
                if readers != n || ix.graph_outputs.contains(v) {
                    return false;
                }
            }
            attempt(m, |m| match_node(ix, o, i, m))
        }
    }
}

/// The `Shape` nodes reading `v`.
pub(crate) fn shape_readers(ix: &Index<'_>, v: &str) -> Vec<usize> {
    (ix.graph.nodes.iter().enumerate())
        .filter(|(_, n)| {
            n.op_type == "Shape" && is_onnx_domain(n) && n.inputs.iter().any(|i| i == v)
        })
        .map(|(i, _)| i)
        .collect()
}

/// Binds `name` to `v`, or checks an earlier binding is `v`.
fn bind(m: &mut Match, name: &'static str, v: &str) -> bool {
    match m.values.iter().find(|(n, _)| *n == name) {
        Some((_, old)) => old == v,
        None => {
            m.values.push((name, v.to_string()));
            true
        }
    }
}

/// Runs `f` on `m`, restoring `m` when it fails.
fn attempt(m: &mut Match, f: impl FnOnce(&mut Match) -> bool) -> bool {
    // Matching only appends, so a failed branch is undone by truncating.
    let saved = (m.nodes.len(), m.values.len(), m.interior.len(), m.kept);
    let ok = f(m);
    if !ok {
        m.nodes.truncate(saved.0);
        m.values.truncate(saved.1);
        m.interior.truncate(saved.2);
        m.kept = saved.3;
    }
    ok
}

/// Whether node `n` has the op type, domain, arity and extra check of `o`.
fn op_fits(ix: &Index<'_>, o: &Op, n: &Node) -> bool {
    let domain_ok = if o.domain.is_empty() {
        is_onnx_domain(n)
    } else {
        n.domain == o.domain
    };
    let arity_ok = match o.min_inputs {
        Some(k) => n.inputs.len() >= k,
        None => n.inputs.len() == o.inputs.len(),
    };
    domain_ok
        && arity_ok
        && n.outputs.len() == 1
        && o.ops.contains(&n.op_type.as_str())
        && o.check.is_none_or(|f| f(ix, n))
}

/// Matches `o` at node `i` (already known to produce the value being matched).
fn match_node(ix: &Index<'_>, o: &Op, i: usize, m: &mut Match) -> bool {
    let n = &ix.graph.nodes[i];
    if !op_fits(ix, o, n) {
        return false;
    }
    if !o.name.is_empty() {
        match m.node(o.name) {
            // Reached again through another path: the same node, already matched.
            Some(k) => return k == i,
            None => m.nodes.push((o.name, i)),
        }
    }
    let kept = o.kept || m.kept > 0;
    if i != m.root && !kept && !m.interior.contains(&i) {
        m.interior.push(i);
    }
    m.kept += usize::from(o.kept);
    let inputs = |order: [usize; 2], m: &mut Match| {
        o.inputs.iter().enumerate().all(|(k, p)| {
            let k = if k < 2 && o.inputs.len() == 2 {
                order[k]
            } else {
                k
            };
            match_value(ix, p, input_at(n, k), m)
        })
    };
    let ok = attempt(m, |m| inputs([0, 1], m))
        || (o.commutative && o.inputs.len() == 2 && attempt(m, |m| inputs([1, 0], m)));
    m.kept -= usize::from(o.kept);
    ok
}

/// A float32 initializer holding one value (rank 0 or `[1]`), that value.
pub(crate) fn single_f32(i: &Initializer) -> Option<f32> {
    if i.dtype != DType::F32 || i.dims.iter().product::<i64>() != 1 || i.dims.len() > 1 {
        return None;
    }
    match i.data.to_f32_vec().ok()?.as_slice() {
        [v] => Some(*v),
        _ => None,
    }
}

/// A rank-0 float32 initializer's value.
pub(crate) fn rank0_f32(i: &Initializer) -> Option<f32> {
    if i.dtype != DType::F32 || !i.dims.is_empty() || i.data.len() != 4 {
        return None;
    }
    match i.data.to_f32_vec().ok()?.as_slice() {
        [v] => Some(*v),
        _ => None,
    }
}

/// Whether `i` is a rank-0 float32 initializer equal to `want` bit for bit.
pub(crate) fn is_f32_scalar(i: &Initializer, want: f32) -> bool {
    rank0_f32(i).is_some_and(|v| v.to_bits() == want.to_bits())
}

/// A rank-0 int64 initializer's value.
pub(crate) fn rank0_i64(i: &Initializer) -> Option<i64> {
    if i.dtype != DType::I64 || !i.dims.is_empty() {
        return None;
    }
    Some(i64::from_le_bytes(
        i.data.bytes().ok()?.get(..8)?.try_into().ok()?,
    ))
}

/// A 1-D int64 initializer's values.
pub(crate) fn i64_values(i: &Initializer) -> Option<Vec<i64>> {
    if i.dtype != DType::I64 || i.dims.len() != 1 {
        return None;
    }
    let v: Vec<i64> = i
        .data
        .bytes()
        .ok()?
        .chunks_exact(8)
        .map(|c| c.try_into().map_or(0, i64::from_le_bytes))
        .collect();
    (v.len() as i64 == i.dims[0]).then_some(v)
}

/// A 1-D int64 initializer (a shape, Slice starts/ends/axes).
pub(crate) fn is_i64_vector(i: &Initializer) -> bool {
    i.dtype == DType::I64 && i.dims.len() == 1
}

/// A 1-D float32 initializer (a norm's weight, a bias).
pub(crate) fn is_f32_vector(i: &Initializer) -> bool {
    i.dtype == DType::F32 && i.dims.len() == 1
}

/// A float32 initializer of rank 2 (a MatMul weight).
pub(crate) fn is_f32_matrix(i: &Initializer) -> bool {
    i.dtype == DType::F32 && i.dims.len() == 2
}

#[cfg(test)]
mod tests {
    use ferry_ir::Graph;

    use super::*;
    use crate::test_util::{graph, init as tensor, node};

    fn is_two(i: &Initializer) -> bool {
        single_f32(i) == Some(2.0)
    }

    /// `Mul(w, Mul(x, Div(1, Sqrt(Add(ReduceMean(Pow(x, 2)), eps)))))` — an RMSNorm.
    fn rms() -> Pattern {
        let pow = op("Pow", vec![val("x"), init("two", is_two)]);
        let mean = op("ReduceMean", vec![pow.p()]).min_inputs();
        let add = op(
            "Add",
            vec![mean.p(), init("eps", |i| single_f32(i).is_some())],
        );
        let sqrt = op("Sqrt", vec![add.p()]);
        let inv = op(
            "Div",
            vec![init("one", |i| single_f32(i) == Some(1.0)), sqrt.p()],
        );
        let norm = op("Mul", vec![val("x"), inv.p()])
            .commutative()
            .named("norm");
        Pattern::new(op("Mul", vec![init("w", is_f32_vector), norm.p()]).commutative())
    }

    fn rms_graph(swap: bool) -> Graph {
        let (a, b) = if swap { ("inv", "x") } else { ("x", "inv") };
        graph(
            vec![
                node("Pow", &["x", "two"], &["sq"], vec![]),
                node("ReduceMean", &["sq"], &["var"], vec![]),
                node("Add", &["var", "eps"], &["ve"], vec![]),
                node("Sqrt", &["ve"], &["s"], vec![]),
                node("Div", &["one", "s"], &["inv"], vec![]),
                node("Mul", &[a, b], &["n"], vec![]),
                node("Mul", &["n", "w"], &["y"], vec![]),
            ],
            vec![
                tensor("two", vec![], &[2.0]),
                tensor("eps", vec![], &[1e-6]),
                tensor("one", vec![], &[1.0]),
                tensor("w", vec![2], &[1.0, 2.0]),
            ],
            &["y"],
        )
    }

    #[test]
    fn binds_nodes_values_and_initializers_in_either_order() {
        for swap in [false, true] {
            let g = rms_graph(swap);
            let ix = Index::new(&g);
            let m = rms().at(&ix, 6).expect("matches");
            assert_eq!(m.value("x"), "x");
            assert_eq!(m.value("w"), "w");
            assert_eq!(m.value("eps"), "eps");
            assert_eq!(m.node("norm"), Some(5));
            let mut interior = m.interior.clone();
            interior.sort();
            assert_eq!(interior, [0, 1, 2, 3, 4, 5]);
            assert_eq!(rms().all(&ix).len(), 1);
        }
    }

    #[test]
    fn rejects_other_values_readers_and_constants() {
        let pat = rms();
        // The interior `inv` read elsewhere.
        let mut g = rms_graph(false);
        g.nodes.push(node("Relu", &["inv"], &["r"], vec![]));
        assert!(pat.at(&Index::new(&g), 6).is_none());
        // A graph output inside the pattern.
        let mut g = rms_graph(false);
        g.outputs
            .push(ferry_ir::Value::new("s", DType::F32, vec![]));
        assert!(pat.at(&Index::new(&g), 6).is_none());
        // The squared value is not the normalized one.
        let mut g = rms_graph(false);
        g.nodes[0].inputs[0] = "z".into();
        assert!(pat.at(&Index::new(&g), 6).is_none());
        // Exponent 3.
        let mut g = rms_graph(false);
        g.initializers[0] = tensor("two", vec![], &[3.0]);
        assert!(pat.at(&Index::new(&g), 6).is_none());
        // A non-commutative op in the other order.
        let mut g = rms_graph(false);
        g.nodes[4].inputs.swap(0, 1);
        assert!(pat.at(&Index::new(&g), 6).is_none());
        // Another op type at the root, or another domain.
        let mut g = rms_graph(false);
        g.nodes[6].op_type = "Add".into();
        assert!(pat.at(&Index::new(&g), 6).is_none());
        let mut g = rms_graph(false);
        g.nodes[3].domain = "com.microsoft".into();
        assert!(pat.at(&Index::new(&g), 6).is_none());
    }

    #[test]
    fn optional_nodes_alternatives_and_shared_nodes() {
        // Relu(Cast?(x)) with the Cast present or absent.
        let pat = Pattern::new(op(
            "Relu",
            vec![op("Cast", vec![val("x")]).optional().named("cast").p()],
        ));
        let g = graph(
            vec![
                node("Cast", &["x"], &["c"], vec![]),
                node("Relu", &["c"], &["y"], vec![]),
            ],
            vec![],
            &["y"],
        );
        let m = pat.at(&Index::new(&g), 1).expect("with the cast");
        assert_eq!((m.value("x"), m.node("cast")), ("x", Some(0)));
        let g = graph(vec![node("Relu", &["x"], &["y"], vec![])], vec![], &["y"]);
        let m = pat.at(&Index::new(&g), 0).expect("without");
        assert_eq!((m.value("x"), m.node("cast")), ("x", None));
        assert!(m.interior.is_empty());

        // Neg(Either(Exp(a), Log(a))), and Add(s, s') where s = Sqrt(x) read twice.
        let pat = Pattern::new(op(
            "Neg",
            vec![P::Either(vec![
                op("Exp", vec![val("a")]).p(),
                op("Log", vec![val("a")]).p(),
            ])],
        ));
        let g = graph(
            vec![
                node("Log", &["x"], &["l"], vec![]),
                node("Neg", &["l"], &["y"], vec![]),
            ],
            vec![],
            &["y"],
        );
        assert_eq!(pat.at(&Index::new(&g), 1).expect("log").value("a"), "x");
        // Any value in one operand, not bound.
        let any = Pattern::new(op("Neg", vec![op("Log", vec![P::Any]).p()]));
        let m = any.at(&Index::new(&g), 1).expect("any");
        assert!(m.values.is_empty());
        let sqrt = || op("Sqrt", vec![val("x")]).named("s").uses(Some(2));
        let pat = Pattern::new(op("Add", vec![sqrt().p(), sqrt().p()]));
        let g = graph(
            vec![
                node("Sqrt", &["x"], &["s"], vec![]),
                node("Add", &["s", "s"], &["y"], vec![]),
            ],
            vec![],
            &["y"],
        );
        let m = pat.at(&Index::new(&g), 1).expect("shared");
        assert_eq!(m.interior, [0]);
        // Two different Sqrt nodes cannot both be `s`.
        let sqrt = || op("Sqrt", vec![val("x")]).named("s").uses(None);
        let pat = Pattern::new(op("Add", vec![sqrt().p(), sqrt().p()]));
        let g = graph(
            vec![
                node("Sqrt", &["x"], &["s"], vec![]),
                node("Sqrt", &["x"], &["t"], vec![]),
                node("Add", &["s", "t"], &["y"], vec![]),
            ],
            vec![],
            &["y"],
        );
        assert!(pat.at(&Index::new(&g), 2).is_none());
    }

    #[test]
    fn kept_nodes_are_matched_but_not_removed() {
        // Add(x, Exp(Log(a))) where Exp and Log are read elsewhere too.
        let pat = |kept: bool| {
            let exp = op("Exp", vec![op("Log", vec![val("a")]).p()]);
            let exp = if kept { exp.kept() } else { exp };
            Pattern::new(op("Add", vec![val("x"), exp.p()]))
        };
        let g = graph(
            vec![
                node("Log", &["a"], &["l"], vec![]),
                node("Exp", &["l"], &["e"], vec![]),
                node("Add", &["x", "e"], &["y"], vec![]),
                node("Relu", &["e"], &["r"], vec![]),
                node("Relu", &["l"], &["r2"], vec![]),
            ],
            vec![],
            &["y", "r", "r2"],
        );
        let ix = Index::new(&g);
        let m = pat(true).at(&ix, 2).expect("kept");
        assert_eq!(m.value("a"), "a");
        assert!(m.interior.is_empty());
        assert!(pat(false).at(&ix, 2).is_none());
    }
}
