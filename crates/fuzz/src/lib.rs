//! ferry-fuzz: random ferry IR graphs for the structure-aware fuzz tests of the optimizer
//! and quantizer passes (their integration tests' `fuzz` modules; `cargo xtask fuzz`).
//!
//! A graph is decoded from a byte string that proptest generates and shrinks ([`build`]):
//! each byte is one choice (an opset, a fragment, a perturbation), and a short or zeroed
//! string decodes to a simple, valid graph, so shrinking a failure gives a small graph.
//! Graphs mix fragments of the patterns the passes look for (erf and tanh GELU, the
//! decomposed layer norm, residual + LayerNormalization, encoder and GPT-2 attention chains,
//! embeddings, shape arithmetic, MatMul/Gemm/Gather with initializer weights, contrib
//! Attention and EmbedLayerNormalization) with random nodes, and perturb them: old opsets
//! (7..21), attribute forms of inputs, missing optional inputs, wrong arity (0..4 inputs),
//! unknown ops and domains, zero, huge or symbolic dims, duplicate value names, wrong
//! attribute types and initializers with wrong byte lengths. [`fuzz`] runs one pass over
//! [`cases`] graphs with a fixed seed and reports how many it ran and how many were `Err`.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};

use ferry_ir::{Attr, DType, Dim, Graph, Initializer, Node, OpsetImport, TensorData, Value};
use proptest::collection::vec;
use proptest::prelude::any;
use proptest::strategy::Strategy;
use proptest::test_runner::{Config, RngAlgorithm, TestError, TestRng, TestRunner};

/// Graphs per pass when `FERRY_FUZZ_CASES` is not set.
pub const DEFAULT_CASES: u32 = 10_000;

/// The fixed ChaCha seed of every run.
const SEED: [u8; 32] = *b"ferry structure-aware fuzz seed!";

/// Contrib-op domain.
const MS: &str = "com.microsoft";

/// The number of graphs per pass: `FERRY_FUZZ_CASES`, else [`DEFAULT_CASES`].
pub fn cases() -> u32 {
    std::env::var("FERRY_FUZZ_CASES")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(DEFAULT_CASES)
}

/// The byte strings graphs are decoded from.
pub fn choice_bytes() -> impl Strategy<Value = Vec<u8>> {
    vec(any::<u8>(), 0..320)
}

/// What one [`fuzz`] run saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Report {
    /// Graphs run through the pass.
    pub graphs: usize,
    /// Of those, how many the pass answered with `Err`.
    pub errors: usize,
}

/// Runs `pass` on [`cases`] generated graphs (fixed seed) and prints the counts. The
/// property is only that `pass` does not panic: an `Err` is counted, not a failure. On a
/// panic, proptest shrinks the input and this panics with the smallest graph found.
pub fn fuzz<E>(label: &str, pass: impl Fn(&mut Graph) -> Result<(), E>) -> Report {
    let config = Config {
        cases: cases(),
        failure_persistence: None,
        max_shrink_iters: 4096,
        ..Config::default()
    };
    let rng = TestRng::from_seed(RngAlgorithm::ChaCha, &SEED);
    let mut runner = TestRunner::new_with_rng(config, rng);
    let graphs = AtomicUsize::new(0);
    let errors = AtomicUsize::new(0);
    let result = runner.run(&choice_bytes(), |bytes| {
        let mut g = build(&bytes);
        graphs.fetch_add(1, Ordering::Relaxed);
        if pass(&mut g).is_err() {
            errors.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    });
    let report = Report {
        graphs: graphs.load(Ordering::Relaxed),
        errors: errors.load(Ordering::Relaxed),
    };
    println!(
        "fuzz {label}: {} graphs, {} Err",
        report.graphs, report.errors
    );
    match result {
        Ok(()) => report,
        Err(TestError::Fail(reason, bytes)) => {
            panic!(
                "fuzz {label}: {reason}\nbytes: {bytes:?}\ngraph: {:#?}",
                build(&bytes)
            )
        }
        Err(e) => panic!("fuzz {label}: {e}"),
    }
}

/// The choices a graph is decoded from; past the end every choice is 0 (the simplest).
struct Choices<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl Choices<'_> {
    fn byte(&mut self) -> u8 {
        let b = self.bytes.get(self.at).copied().unwrap_or(0);
        self.at += 1;
        b
    }

    /// A number in `0..n` (0 when `n` is 0).
    fn below(&mut self, n: usize) -> usize {
        if n <= 1 {
            return 0;
        }
        usize::from(self.byte()) % n
    }

    /// True with about `pct` percent chance; false for a zero byte.
    fn rare(&mut self, pct: u32) -> bool {
        (u32::from(self.byte()) * 100) >> 8 >= 100 - pct.min(100)
    }

    fn pick<'t, T>(&mut self, items: &'t [T]) -> &'t T {
        &items[self.below(items.len())]
    }
}

/// A graph under construction.
struct Ctx<'a> {
    c: Choices<'a>,
    g: Graph,
    /// Values nodes may read: graph inputs, initializers, node outputs.
    pool: Vec<String>,
    next: usize,
    opset: i64,
    /// Hidden size of `x`.
    h: i64,
}

impl Ctx<'_> {
    /// A new value name; now and then one already in use (duplicate names).
    fn fresh(&mut self, base: &str) -> String {
        if !self.pool.is_empty() && self.c.rare(2) {
            return self.c.pick(&self.pool).clone();
        }
        self.next += 1;
        format!("{base}{}", self.next)
    }

    /// A value to read: usually `want`, sometimes another one, omitted or unknown.
    fn arg(&mut self, want: &str) -> String {
        if self.c.rare(4) {
            return match self.c.below(3) {
                0 => String::new(),
                1 => "nowhere".to_string(),
                _ => self.c.pick(&self.pool).clone(),
            };
        }
        want.to_string()
    }

    /// Adds an initializer of `dtype`/`dims` holding `bytes`, with rare perturbations
    /// (wrong byte length, other dims, other dtype); returns its name.
    fn init(&mut self, base: &str, dtype: DType, dims: Vec<i64>, bytes: Vec<u8>) -> String {
        let name = self.fresh(base);
        let mut dims = dims;
        let mut bytes = bytes;
        let mut dtype = dtype;
        if self.c.rare(3) {
            match self.c.below(7) {
                0 => {
                    bytes.pop();
                }
                5 => dims = vec![1 << 40; dims.len()],
                1 => bytes.extend([0u8; 3]),
                2 => dims.push(1 << 40),
                3 => dims = vec![],
                4 => {
                    dtype = *self
                        .c
                        .pick(&[DType::F16, DType::I32, DType::U8, DType::F64])
                }
                _ => dims.insert(0, 0),
            }
        }
        self.g.initializers.push(Initializer {
            name: name.clone(),
            dtype,
            dims,
            data: TensorData::owned(bytes),
        });
        self.pool.push(name.clone());
        name
    }

    fn f32s(&mut self, base: &str, dims: Vec<i64>, values: &[f32]) -> String {
        let bytes = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.init(base, DType::F32, dims, bytes)
    }

    /// A float32 tensor of `dims` with small varied values.
    fn weight(&mut self, base: &str, dims: Vec<i64>) -> String {
        let n: i64 = dims.iter().map(|&d| d.clamp(0, 64)).product();
        let seed = f32::from(self.c.byte());
        let special = self.c.rare(5);
        let values: Vec<f32> = (0..n)
            .map(|i| match (special, i % 5) {
                (true, 0) => f32::NAN,
                (true, 1) => f32::INFINITY,
                (true, _) => 0.0,
                _ => ((i as f32 + seed) * 0.37).sin(),
            })
            .collect();
        self.f32s(base, dims, &values)
    }

    /// A float32 scalar, usually `v` (rank 0), sometimes another value or rank 1.
    fn scalar(&mut self, v: f32) -> String {
        let v = if self.c.rare(6) {
            *self
                .c
                .pick(&[0.0, -1.0, f32::NAN, f32::MIN, 1e30, 2.0, f32::INFINITY])
        } else {
            v
        };
        let dims = if self.c.rare(4) { vec![1] } else { vec![] };
        self.f32s("s", dims, &[v])
    }

    /// A 1-D int64 constant, usually `v`.
    fn ints(&mut self, v: &[i64]) -> String {
        let mut v = v.to_vec();
        if self.c.rare(6) {
            let extreme = *self
                .c
                .pick(&[0, -1, 1, 7, i64::MAX, i64::MIN, 1 << 40, -(1 << 40)]);
            match v.len() {
                0 => v.push(extreme),
                n => {
                    let k = self.c.below(n);
                    v[k] = extreme;
                }
            }
        }
        let scalar = v.len() == 1 && self.c.rare(5);
        let dims = if scalar { vec![] } else { vec![v.len() as i64] };
        let bytes = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        self.init("i", DType::I64, dims, bytes)
    }

    /// A rank-0 int64 constant.
    fn int_scalar(&mut self, v: i64) -> String {
        self.init("k", DType::I64, vec![], v.to_le_bytes().to_vec())
    }

    /// Adds node `op` (default domain) reading `inputs`; returns its first output.
    fn op(&mut self, op: &str, inputs: &[&str], attrs: Vec<(&str, Attr)>) -> String {
        self.node("", op, inputs, 1, attrs)
    }

    /// Adds a node with rare perturbations (an input dropped, added or emptied, no
    /// outputs, an extra output, another domain, an attribute dropped or retyped).
    fn node(
        &mut self,
        domain: &str,
        op: &str,
        inputs: &[&str],
        outputs: usize,
        attrs: Vec<(&str, Attr)>,
    ) -> String {
        let mut ins: Vec<String> = inputs.iter().map(|s| self.arg(s)).collect();
        let mut outs: Vec<String> = (0..outputs).map(|_| self.fresh("v")).collect();
        let mut attrs: BTreeMap<String, Attr> =
            attrs.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
        let mut domain = domain.to_string();
        if self.c.rare(5) {
            match self.c.below(8) {
                0 => {
                    ins.pop();
                }
                1 => ins.push(String::new()),
                2 => {
                    let extra = self.c.pick(&self.pool).clone();
                    ins.push(extra);
                }
                3 => outs.clear(),
                4 => outs.push(self.fresh("v")),
                5 => {
                    domain = if domain.is_empty() {
                        MS.to_string()
                    } else {
                        String::new()
                    }
                }
                6 => {
                    if let Some(k) = attrs.keys().next().cloned() {
                        attrs.remove(&k);
                    }
                }
                _ => {
                    if let Some(v) = attrs.values_mut().next() {
                        *v = random_attr(&mut self.c);
                    }
                }
            }
        }
        let first = outs.first().cloned().unwrap_or_else(|| "nowhere".into());
        self.pool.extend(outs.iter().cloned());
        self.g.nodes.push(Node {
            name: format!("/n{}/{op}", self.g.nodes.len()),
            op_type: op.to_string(),
            domain,
            inputs: ins,
            outputs: outs,
            attrs,
        });
        first
    }

    /// `axes` as the attribute (opsets before `input_from`, or by perturbation) or as a
    /// constant second input.
    fn with_axes(&mut self, op: &str, x: &str, axes: &[i64], input_from: i64) -> String {
        let as_attr = (self.opset < input_from) != self.c.rare(5);
        if as_attr {
            self.op(op, &[x], vec![("axes", Attr::Ints(axes.to_vec()))])
        } else {
            let a = self.ints(axes);
            self.op(op, &[x, &a], vec![])
        }
    }

    fn binary(&mut self, op: &str, a: &str, b: &str) -> String {
        if self.c.rare(20) {
            self.op(op, &[b, a], vec![])
        } else {
            self.op(op, &[a, b], vec![])
        }
    }
}

fn random_attr(c: &mut Choices<'_>) -> Attr {
    match c.below(6) {
        0 => Attr::Int(*c.pick(&[-1, 0, 1, 2, 7, 64, i64::MAX, i64::MIN])),
        1 => Attr::Float(*c.pick(&[0.0, 1e-12, -1.0, f32::NAN])),
        2 => Attr::Ints((0..c.below(5)).map(|_| c.below(6) as i64 - 2).collect()),
        3 => Attr::Floats(vec![0.5; c.below(3)]),
        4 => Attr::String("x".into()),
        _ => Attr::Strings(vec![]),
    }
}

/// Ops the random nodes draw from (default domain, then contrib ones).
const OPS: [&str; 44] = [
    "Add",
    "Sub",
    "Mul",
    "Div",
    "Pow",
    "MatMul",
    "Gemm",
    "Gather",
    "Slice",
    "Squeeze",
    "Unsqueeze",
    "ReduceMean",
    "Reshape",
    "Transpose",
    "Shape",
    "Concat",
    "Cast",
    "Where",
    "Range",
    "Expand",
    "ConstantOfShape",
    "Equal",
    "Greater",
    "And",
    "Not",
    "Softmax",
    "Erf",
    "Sqrt",
    "Tanh",
    "Identity",
    "Constant",
    "LayerNormalization",
    "Flatten",
    "Relu",
    "Dropout",
    "NoSuchOp",
    "Gelu",
    "FastGelu",
    "BiasGelu",
    "Attention",
    "EmbedLayerNormalization",
    "SkipLayerNormalization",
    "MultiHeadAttention",
    "QAttention",
];

/// Attribute names the random nodes draw from.
const ATTRS: [&str; 14] = [
    "axis",
    "axes",
    "perm",
    "to",
    "keepdims",
    "starts",
    "ends",
    "epsilon",
    "num_heads",
    "value",
    "transB",
    "alpha",
    "allowzero",
    "qkv_hidden_sizes",
];

/// Decodes a graph from `bytes` (see the crate docs). Never panics.
pub fn build(bytes: &[u8]) -> Graph {
    let mut c = Choices { bytes, at: 0 };
    let opset = *c.pick(&[17, 14, 13, 11, 12, 9, 7, 8, 10, 15, 16, 18, 19, 20, 21]);
    let h = *c.pick(&[4, 2, 8, 6]);
    let dim = |c: &mut Choices<'_>, name: &str| -> Dim {
        match c.below(8) {
            0..=4 => Dim::sym(name),
            5 => Dim::Fixed(0),
            6 => Dim::Fixed(1),
            _ => Dim::Fixed(3),
        }
    };
    let (b, s) = (dim(&mut c, "batch"), dim(&mut c, "seq"));
    let mut x_shape = vec![b.clone(), s.clone(), Dim::Fixed(h)];
    if c.rare(5) {
        x_shape[2] = Dim::sym("hidden");
    }
    let x_shape = (!c.rare(5)).then_some(x_shape);
    let ids_shape = (!c.rare(5)).then(|| vec![b.clone(), s.clone()]);
    let mut g = Graph {
        name: "fuzz".into(),
        inputs: vec![
            Value {
                name: "x".into(),
                dtype: DType::F32,
                shape: x_shape,
            },
            Value {
                name: "ids".into(),
                dtype: DType::I64,
                shape: ids_shape.clone(),
            },
            Value {
                name: "mask".into(),
                dtype: DType::I64,
                shape: ids_shape.clone(),
            },
            Value {
                name: "tt".into(),
                dtype: DType::I64,
                shape: ids_shape,
            },
        ],
        outputs: vec![],
        nodes: vec![],
        initializers: vec![],
        value_info: vec![],
        opsets: vec![OpsetImport {
            domain: String::new(),
            version: opset,
        }],
    };
    if c.rare(3) {
        g.opsets.clear();
    }
    if c.rare(10) {
        g.opsets.push(OpsetImport {
            domain: MS.into(),
            version: 1,
        });
    }
    let pool = vec!["x".into(), "ids".into(), "mask".into(), "tt".into()];
    let mut cx = Ctx {
        c,
        g,
        pool,
        next: 0,
        opset,
        h,
    };
    let fragments = 1 + cx.c.below(4);
    let mut last = "x".to_string();
    for _ in 0..fragments {
        let input = if cx.c.rare(30) {
            cx.c.pick(&cx.pool).clone()
        } else {
            "x".to_string()
        };
        last = fragment(&mut cx, &input);
        if cx.c.rare(30) {
            cx.g.outputs.push(Value {
                name: last.clone(),
                dtype: DType::F32,
                shape: None,
            });
        }
    }
    let shape =
        cx.c.rare(20)
            .then(|| vec![b.clone(), s.clone(), Dim::Fixed(h)]);
    cx.g.outputs.push(Value {
        name: last,
        dtype: DType::F32,
        shape,
    });
    if cx.c.rare(10) {
        // A value_info that may contradict the graph.
        let name = cx.c.pick(&cx.pool).clone();
        let rank = cx.c.below(5);
        let dims = (0..rank)
            .map(|_| match cx.c.below(4) {
                0 => Dim::sym("seq"),
                1 => Dim::Fixed(-1),
                2 => Dim::Fixed(0),
                _ => Dim::Fixed(h),
            })
            .collect();
        cx.g.value_info.push(Value::new(name, DType::F32, dims));
    }
    if cx.c.rare(5) {
        // A graph input that is also an initializer.
        if let Some(i) = cx.g.initializers.first() {
            cx.g.inputs.push(Value {
                name: i.name.clone(),
                dtype: i.dtype,
                shape: None,
            });
        }
    }
    cx.g
}

/// Appends one fragment reading `x`; returns the value it ends in.
fn fragment(cx: &mut Ctx<'_>, x: &str) -> String {
    let h = cx.h;
    match cx.c.below(16) {
        0 => gelu_erf(cx, x),
        1 => {
            // BiasGelu: Gelu(MatMul(x, W) + b).
            let w = cx.weight("w", vec![h, h]);
            let mm = cx.op("MatMul", &[x, &w], vec![]);
            let bias = cx.weight("b", vec![h]);
            let a = cx.binary("Add", &mm, &bias);
            gelu_erf(cx, &a)
        }
        2 => fast_gelu(cx, x),
        3 => layer_norm_decomposed(cx, x),
        4 => {
            // Residual + LayerNormalization (SkipLayerNormalization).
            let w = cx.weight("w", vec![h, h]);
            let r = cx.op("MatMul", &[x, &w], vec![]);
            let sum = cx.binary("Add", x, &r);
            layer_norm_op(cx, &sum)
        }
        5 | 6 => attention(cx, x),
        7 => gpt2_attention(cx, x),
        8 => embeddings(cx),
        9 => shape_arithmetic(cx, x),
        10 => quantizable(cx, x),
        11 => contrib(cx, x),
        12 => old_opset_forms(cx, x),
        13 => masks(cx),
        _ => random_nodes(cx, x),
    }
}

fn gelu_erf(cx: &mut Ctx<'_>, x: &str) -> String {
    let sqrt2 = cx.scalar(std::f32::consts::SQRT_2);
    let d = cx.op("Div", &[x, &sqrt2], vec![]);
    let e = cx.op("Erf", &[&d], vec![]);
    let one = cx.scalar(1.0);
    let a = cx.binary("Add", &e, &one);
    let m = cx.binary("Mul", x, &a);
    let half = cx.scalar(0.5);
    cx.binary("Mul", &m, &half)
}

fn fast_gelu(cx: &mut Ctx<'_>, x: &str) -> String {
    let three = cx.scalar(3.0);
    let p = cx.op("Pow", &[x, &three], vec![]);
    let k = cx.scalar(0.044715);
    let m = cx.binary("Mul", &p, &k);
    let a = cx.binary("Add", x, &m);
    let c = cx.scalar(0.797_884_6);
    let m2 = cx.binary("Mul", &a, &c);
    let t = cx.op("Tanh", &[&m2], vec![]);
    let one = cx.scalar(1.0);
    let a2 = cx.binary("Add", &t, &one);
    let half = cx.scalar(0.5);
    let m3 = cx.binary("Mul", x, &half);
    cx.binary("Mul", &m3, &a2)
}

fn layer_norm_decomposed(cx: &mut Ctx<'_>, x: &str) -> String {
    let h = cx.h;
    let mean = cx.with_axes("ReduceMean", x, &[-1], 18);
    let d = cx.op("Sub", &[x, &mean], vec![]);
    let two = cx.scalar(2.0);
    let p = cx.op("Pow", &[&d, &two], vec![]);
    let var = cx.with_axes("ReduceMean", &p, &[-1], 18);
    let eps = cx.scalar(1e-5);
    let a = cx.binary("Add", &var, &eps);
    let sd = cx.op("Sqrt", &[&a], vec![]);
    let n = cx.op("Div", &[&d, &sd], vec![]);
    let gamma = cx.weight("gamma", vec![h]);
    let m = cx.binary("Mul", &n, &gamma);
    let beta = cx.weight("beta", vec![h]);
    cx.binary("Add", &m, &beta)
}

fn layer_norm_op(cx: &mut Ctx<'_>, x: &str) -> String {
    let h = cx.h;
    let gamma = cx.weight("gamma", vec![h]);
    let beta = cx.weight("beta", vec![h]);
    let attrs = vec![("axis", Attr::Int(-1)), ("epsilon", Attr::Float(1e-5))];
    cx.op("LayerNormalization", &[x, &gamma, &beta], attrs)
}

/// `Transpose(Reshape(Add(MatMul(x, W), b), [0, 0, heads, head_dim]), perm)`.
fn projection(cx: &mut Ctx<'_>, x: &str, perm: &[i64], heads: i64) -> String {
    let h = cx.h;
    let w = cx.weight("w", vec![h, h]);
    let mm = cx.op("MatMul", &[x, &w], vec![]);
    let b = cx.weight("b", vec![h]);
    let a = cx.binary("Add", &mm, &b);
    let shape = cx.ints(&[0, 0, heads, h / heads]);
    let r = cx.op("Reshape", &[&a, &shape], vec![]);
    cx.op(
        "Transpose",
        &[&r],
        vec![("perm", Attr::Ints(perm.to_vec()))],
    )
}

/// ferry's additive mask: `Mul(Sub(1, Cast(Unsqueeze(mask, [1, 2]), float)), f32::MIN)`.
fn additive_mask(cx: &mut Ctx<'_>) -> String {
    let u = cx.with_axes("Unsqueeze", "mask", &[1, 2], 13);
    let f = cx.op("Cast", &[&u], vec![("to", Attr::Int(1))]);
    let one = cx.scalar(1.0);
    let s = cx.op("Sub", &[&one, &f], vec![]);
    let min = cx.scalar(f32::MIN);
    cx.binary("Mul", &s, &min)
}

/// The attention core over head splits `q`, `k`, `v` and the merge-heads Reshape.
fn attention_core(cx: &mut Ctx<'_>, q: &str, k: &str, v: &str, mask: &str) -> String {
    let h = cx.h;
    let qk = cx.op("MatMul", &[q, k], vec![]);
    let scaled = if cx.c.rare(50) {
        let s = cx.scalar(0.5);
        cx.binary("Mul", &qk, &s)
    } else {
        let d = cx.scalar(2.0);
        cx.op("Div", &[&qk, &d], vec![])
    };
    let masked = cx.binary("Add", &scaled, mask);
    let sm = cx.op("Softmax", &[&masked], vec![("axis", Attr::Int(-1))]);
    let ctx = cx.op("MatMul", &[&sm, v], vec![]);
    let t = cx.op(
        "Transpose",
        &[&ctx],
        vec![("perm", Attr::Ints(vec![0, 2, 1, 3]))],
    );
    let shape = cx.ints(&[0, 0, h]);
    cx.op("Reshape", &[&t, &shape], vec![])
}

fn attention(cx: &mut Ctx<'_>, x: &str) -> String {
    let heads = if cx.h % 2 == 0 { 2 } else { 1 };
    let q = projection(cx, x, &[0, 2, 1, 3], heads);
    let k = projection(cx, x, &[0, 2, 3, 1], heads);
    let v = projection(cx, x, &[0, 2, 1, 3], heads);
    let mask = if cx.c.rare(20) {
        cx.weight("bias_mask", vec![1, 1, 3, 3])
    } else {
        additive_mask(cx)
    };
    let out = attention_core(cx, &q, &k, &v, &mask);
    // The output projection and residual, as in an encoder layer.
    let h = cx.h;
    let w = cx.weight("wo", vec![h, h]);
    let o = cx.op("MatMul", &[&out, &w], vec![]);
    let sum = cx.binary("Add", x, &o);
    layer_norm_op(cx, &sum)
}

fn gpt2_attention(cx: &mut Ctx<'_>, x: &str) -> String {
    let h = cx.h;
    let heads = if h % 2 == 0 { 2 } else { 1 };
    let w = cx.weight("c_attn", vec![h, 3 * h]);
    let mm = cx.op("MatMul", &[x, &w], vec![]);
    let b = cx.weight("c_attn_b", vec![3 * h]);
    let qkv = cx.binary("Add", &mm, &b);
    let split = |cx: &mut Ctx<'_>, k: i64, perm: &[i64]| {
        let (st, en) = (cx.ints(&[k * h]), cx.ints(&[(k + 1) * h]));
        let axes = cx.ints(&[-1]);
        let steps = cx.c.rare(30).then(|| cx.ints(&[1]));
        let mut args = vec![qkv.as_str(), &st, &en, &axes];
        args.extend(steps.as_deref());
        let sl = cx.op("Slice", &args, vec![]);
        let shape = cx.ints(&[0, 0, heads, h / heads]);
        let r = cx.op("Reshape", &[&sl, &shape], vec![]);
        cx.op(
            "Transpose",
            &[&r],
            vec![("perm", Attr::Ints(perm.to_vec()))],
        )
    };
    let q = split(cx, 0, &[0, 2, 1, 3]);
    let k = split(cx, 1, &[0, 2, 3, 1]);
    let v = split(cx, 2, &[0, 2, 1, 3]);
    let mask = causal_mask(cx);
    attention_core(cx, &q, &k, &v, &mask)
}

/// ferry's GPT-2 causal + padding mask.
fn causal_mask(cx: &mut Ctx<'_>) -> String {
    let sh = cx.op("Shape", &["mask"], vec![]);
    let one = cx.int_scalar(1);
    let n = cx.op("Gather", &[&sh, &one], vec![("axis", Attr::Int(0))]);
    let (z, o) = (cx.int_scalar(0), cx.int_scalar(1));
    let r1 = cx.op("Range", &[&z, &n, &o], vec![]);
    let r2 = cx.op("Range", &[&z, &n, &o], vec![]);
    let col = cx.with_axes("Unsqueeze", &r2, &[1], 13);
    let gt = cx.op("Greater", &[&r1, &col], vec![]);
    let allowed = cx.op("Not", &[&gt], vec![]);
    let u = cx.with_axes("Unsqueeze", "mask", &[1, 2], 13);
    let pad = cx.op("Cast", &[&u], vec![("to", Attr::Int(9))]);
    let and = cx.binary("And", &allowed, &pad);
    let zero = cx.scalar(0.0);
    let min = cx.scalar(f32::MIN);
    cx.op("Where", &[&and, &zero, &min], vec![])
}

fn embeddings(cx: &mut Ctx<'_>) -> String {
    let h = cx.h;
    let word = cx.weight("word", vec![5, h]);
    let w = cx.op("Gather", &[&word, "ids"], vec![]);
    let pos = cx.weight("pos", vec![6, h]);
    // Slice(pos, [0], Slice(Shape(ids), [1], [2], [0]), [0]).
    let sh = cx.op("Shape", &["ids"], vec![]);
    let (one, two, zero) = (cx.ints(&[1]), cx.ints(&[2]), cx.ints(&[0]));
    let seq = cx.op("Slice", &[&sh, &one, &two, &zero], vec![]);
    let (z2, z3) = (cx.ints(&[0]), cx.ints(&[0]));
    let p = cx.op("Slice", &[&pos, &z2, &seq, &z3], vec![]);
    let mut sum = cx.binary("Add", &w, &p);
    if !cx.c.rare(30) {
        let types = cx.weight("types", vec![2, h]);
        let t = cx.op("Gather", &[&types, "tt"], vec![]);
        sum = cx.binary("Add", &sum, &t);
    }
    layer_norm_op(cx, &sum)
}

fn shape_arithmetic(cx: &mut Ctx<'_>, x: &str) -> String {
    let sh = cx.op("Shape", &[x], vec![]);
    let at = *cx.c.pick(&[0, 1, -1, 2, 5]);
    let k = cx.int_scalar(at);
    let d = cx.op("Gather", &[&sh, &k], vec![("axis", Attr::Int(0))]);
    let u = cx.with_axes("Unsqueeze", &d, &[0], 13);
    let rest = cx.ints(&[-1]);
    let target = cx.op("Concat", &[&u, &rest], vec![("axis", Attr::Int(0))]);
    let r = cx.op("Reshape", &[x, &target], vec![]);
    match cx.c.below(5) {
        0 => {
            let c = cx.op("ConstantOfShape", &[&target], vec![]);
            cx.binary("Mul", &r, &c)
        }
        1 => {
            let e = cx.op("Expand", &[x, &sh], vec![]);
            cx.op("Flatten", &[&e], vec![("axis", Attr::Int(1))])
        }
        2 => {
            let eq = cx.op("Equal", &[&target, &rest], vec![]);
            let w = cx.op("Where", &[&eq, &target, &rest], vec![]);
            cx.op("Reshape", &[x, &w], vec![])
        }
        3 => {
            let two = cx.ints(&[2]);
            let m = cx.op("Mul", &[&target, &two], vec![]);
            let c = cx.op("Cast", &[&m], vec![("to", Attr::Int(7))]);
            cx.op("Reshape", &[&r, &c], vec![])
        }
        _ => r,
    }
}

/// What the quantizers rewrite: MatMul/Gemm with initializer weights (plain or through a
/// Transpose), Gather of a table, contrib Attention and EmbedLayerNormalization.
fn quantizable(cx: &mut Ctx<'_>, x: &str) -> String {
    let h = cx.h;
    let n = *cx.c.pick(&[h, 3, 16, 1]);
    match cx.c.below(6) {
        0 => {
            let w = cx.weight("w", vec![h, n]);
            cx.op("MatMul", &[x, &w], vec![])
        }
        1 => {
            let w = cx.weight("wt", vec![n, h]);
            let perm = if cx.c.rare(80) {
                vec![1, 0]
            } else {
                vec![0, 1]
            };
            let t = cx.op("Transpose", &[&w], vec![("perm", Attr::Ints(perm))]);
            cx.op("MatMul", &[x, &t], vec![])
        }
        2 => {
            let trans_b = cx.c.below(2) as i64;
            let dims = if trans_b == 1 { vec![n, h] } else { vec![h, n] };
            let w = cx.weight("gw", dims);
            let b = cx.weight("gb", vec![n]);
            let attrs = vec![
                ("transB", Attr::Int(trans_b)),
                ("alpha", Attr::Float(1.0)),
                ("beta", Attr::Float(1.0)),
            ];
            cx.op("Gemm", &[x, &w, &b], attrs)
        }
        3 => {
            let table = cx.weight("table", vec![5, h]);
            cx.op("Gather", &[&table, "ids"], vec![("axis", Attr::Int(0))])
        }
        4 => {
            let w = cx.weight("qkv_w", vec![h, 3 * h]);
            let b = cx.weight("qkv_b", vec![3 * h]);
            let mut attrs = vec![("num_heads", Attr::Int(if h % 2 == 0 { 2 } else { 1 }))];
            if cx.c.rare(20) {
                attrs.push(("qkv_hidden_sizes", Attr::Ints(vec![h, h, 2 * h])));
            }
            cx.node(MS, "Attention", &[x, &w, &b, "mask"], 1, attrs)
        }
        _ => {
            let word = cx.weight("word", vec![5, h]);
            let pos = cx.weight("pos", vec![6, h]);
            let types = cx.weight("types", vec![2, h]);
            let gamma = cx.weight("gamma", vec![h]);
            let beta = cx.weight("beta", vec![h]);
            let ins = ["ids", "tt", &word, &pos, &types, &gamma, &beta, "mask"];
            let attrs = vec![("epsilon", Attr::Float(1e-12))];
            cx.node(MS, "EmbedLayerNormalization", &ins, 2, attrs)
        }
    }
}

/// Contrib ops as the fusions emit them (inputs to the later passes and the quantizers).
fn contrib(cx: &mut Ctx<'_>, x: &str) -> String {
    let h = cx.h;
    let op = *cx.c.pick(&[
        "Gelu",
        "FastGelu",
        "BiasGelu",
        "SkipLayerNormalization",
        "MultiHeadAttention",
    ]);
    let inputs = match op {
        "Gelu" => vec![x.to_string()],
        "FastGelu" | "BiasGelu" => vec![x.to_string(), cx.weight("b", vec![h])],
        "SkipLayerNormalization" => {
            vec![
                x.to_string(),
                "x".to_string(),
                cx.weight("g", vec![h]),
                cx.weight("b", vec![h]),
            ]
        }
        _ => vec![x.to_string(), x.to_string(), x.to_string()],
    };
    let refs: Vec<&str> = inputs.iter().map(String::as_str).collect();
    let attrs = if op == "MultiHeadAttention" {
        vec![("num_heads", Attr::Int(1))]
    } else {
        vec![]
    };
    cx.node(MS, op, &refs, 1, attrs)
}

/// Inputs given as attributes (opset 9 Slice, opset 11 Squeeze/Unsqueeze/ReduceMean), at
/// any opset.
fn old_opset_forms(cx: &mut Ctx<'_>, x: &str) -> String {
    match cx.c.below(4) {
        0 => {
            let attrs = vec![
                ("starts", Attr::Ints(vec![0])),
                ("ends", Attr::Ints(vec![1])),
                ("axes", Attr::Ints(vec![-1])),
            ];
            cx.op("Slice", &[x], attrs)
        }
        1 => {
            let u = cx.op("Unsqueeze", &[x], vec![("axes", Attr::Ints(vec![0]))]);
            cx.op("Squeeze", &[&u], vec![("axes", Attr::Ints(vec![0]))])
        }
        2 => {
            let attrs = vec![("axes", Attr::Ints(vec![-1])), ("keepdims", Attr::Int(1))];
            cx.op("ReduceMean", &[x], attrs)
        }
        _ => {
            let c = cx.node(
                "",
                "Constant",
                &[],
                1,
                vec![("value_float", Attr::Float(2.0))],
            );
            cx.op("Mul", &[x, &c], vec![])
        }
    }
}

/// Int64 and bool tensors of the kinds masks are computed from.
fn masks(cx: &mut Ctx<'_>) -> String {
    let a = cx.ints(&[1, 0, 3]);
    let b = cx.ints(&[1, 2, 3]);
    let eq = cx.op("Equal", &[&a, &b], vec![]);
    let w = cx.op("Where", &[&eq, &a, &b], vec![]);
    let (s, l, d) = (cx.int_scalar(0), cx.int_scalar(3), cx.int_scalar(1));
    let r = cx.op("Range", &[&s, &l, &d], vec![]);
    let sum = cx.op("Add", &[&w, &r], vec![]);
    let div = cx.op("Div", &[&sum, &w], vec![]);
    let c = cx.op("Cast", &[&div], vec![("to", Attr::Int(1))]);
    cx.op("Mul", &["x", &c], vec![])
}

/// A few nodes of random ops, arity, inputs and attributes.
fn random_nodes(cx: &mut Ctx<'_>, x: &str) -> String {
    let mut last = x.to_string();
    for _ in 0..1 + cx.c.below(3) {
        let op = *cx.c.pick(&OPS);
        let domain = if OPS.iter().position(|&o| o == op).unwrap_or(0) >= 36 {
            MS
        } else {
            ""
        };
        let arity = cx.c.below(5);
        let mut inputs = vec![last.clone()];
        for _ in 1..arity {
            let v = match cx.c.below(4) {
                0 => cx.ints(&[0, 0, -1]),
                1 => cx.scalar(1.0),
                _ => cx.c.pick(&cx.pool).clone(),
            };
            inputs.push(v);
        }
        inputs.truncate(arity);
        let attrs: Vec<(&str, Attr)> = (0..cx.c.below(3))
            .map(|_| {
                let name = *cx.c.pick(&ATTRS);
                let value = if name == "value" {
                    Attr::Tensor(Box::new(Initializer {
                        name: String::new(),
                        dtype: DType::I64,
                        dims: vec![1],
                        data: TensorData::from_i64(&[1]),
                    }))
                } else {
                    random_attr(&mut cx.c)
                };
                (name, value)
            })
            .collect();
        let refs: Vec<&str> = inputs.iter().map(String::as_str).collect();
        let outputs = *cx.c.pick(&[1, 1, 1, 0, 2, 3]);
        last = cx.node(domain, op, &refs, outputs, attrs);
    }
    last
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_choices_give_a_small_valid_graph() {
        let g = build(&[]);
        assert_eq!(g.onnx_opset(), Some(17));
        assert!(!g.nodes.is_empty());
        assert_eq!(g.outputs.len(), 1);
    }

    #[test]
    fn every_fragment_is_reachable() {
        // The fragment choice is the 6th byte of a graph without rare options.
        for f in 0..16u8 {
            let g = build(&[0, 0, 0, 0, 0, 0, 0, 0, f]);
            assert!(!g.nodes.is_empty(), "fragment {f}");
        }
    }
}
