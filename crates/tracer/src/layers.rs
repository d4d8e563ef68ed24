//! Building blocks shared by architectures: weight lookup, linear layers, LayerNorm,
//! activations, self-attention and the feed-forward block.

use ferry_ir::{DType, Dim, Initializer, Weights};

use crate::{T, TraceError, Tracer};

/// Looks weights up by module path, trying the task-model prefix (`bert.`) as well, and
/// checks their shape against what the config implies.
pub(crate) struct WeightSource<'a> {
    weights: &'a Weights,
    prefix: String,
}

impl<'a> WeightSource<'a> {
    /// `prefix` is the base model's attribute name in task models (`bert`).
    pub(crate) fn new(weights: &'a Weights, base_prefix: &str) -> Self {
        Self {
            weights,
            prefix: format!("{base_prefix}."),
        }
    }

    /// Adds the weight `name` (with shape `expected`) to the graph.
    pub(crate) fn get(
        &self,
        t: &mut Tracer,
        name: &str,
        expected: &[i64],
    ) -> Result<T, TraceError> {
        let init = self.lookup(name)?;
        if init.dims != expected {
            return Err(TraceError::WeightShape {
                name: name.to_string(),
                expected: expected.to_vec(),
                actual: init.dims.clone(),
            });
        }
        let float = t.float_dtype();
        if init.dtype == float {
            return Ok(t.weight(name, init));
        }
        // bfloat16 storage with float32 compute: ONNX Runtime's CPU provider has almost
        // no bfloat16 kernels, so the weight is cast once at its use.
        if init.dtype == DType::BF16 && float == DType::F32 {
            return Ok(t.weight_cast(name, init));
        }
        Err(TraceError::WeightDtype {
            name: name.to_string(),
            dtype: init.dtype,
            compute: float,
        })
    }

    /// Whether the checkpoint has `name` (with or without the prefix).
    pub(crate) fn contains(&self, name: &str) -> bool {
        self.lookup(name).is_ok()
    }

    fn lookup(&self, name: &str) -> Result<&'a Initializer, TraceError> {
        self.weights
            .get(name)
            .or_else(|| self.weights.get(&format!("{}{name}", self.prefix)))
            .ok_or_else(|| TraceError::MissingWeight {
                name: name.to_string(),
                prefix: self.prefix.clone(),
            })
    }
}

/// How a projection's weight is stored in the checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum WeightLayout {
    /// `nn.Linear`: `[out, in]`, used as stored behind a `Transpose` node (which ONNX
    /// Runtime folds when it loads the model).
    OutIn,
    /// GPT-2's `Conv1D`: `[in, out]`, multiplied as stored.
    InOut,
}

/// The affine projection `scope` (weight and bias at the scope's module path) of `x`
/// (last axis `in_features`) to `out_features`: `x @ W + b`, `W` read as `layout` says.
pub(crate) fn projection(
    t: &mut Tracer,
    w: &WeightSource<'_>,
    scope: &str,
    x: &T,
    features: (i64, i64),
    layout: WeightLayout,
) -> Result<T, TraceError> {
    dense(t, w, scope, x, features, layout, true)
}

/// [`projection`] with or without its bias (`nn.Linear(…, bias=False)`).
pub(crate) fn dense(
    t: &mut Tracer,
    w: &WeightSource<'_>,
    scope: &str,
    x: &T,
    (in_features, out_features): (i64, i64),
    layout: WeightLayout,
    bias: bool,
) -> Result<T, TraceError> {
    scoped(t, scope, |t| {
        let path = t.module_path();
        let shape = match layout {
            WeightLayout::OutIn => [out_features, in_features],
            WeightLayout::InOut => [in_features, out_features],
        };
        let weight = w.get(t, &format!("{path}.weight"), &shape)?;
        let weight = match layout {
            WeightLayout::OutIn => t.transpose(&weight, &[1, 0])?,
            WeightLayout::InOut => weight,
        };
        let mm = t.matmul(x, &weight)?;
        if !bias {
            return Ok(mm);
        }
        let bias = w.get(t, &format!("{path}.bias"), &[out_features])?;
        t.add(&mm, &bias)
    })
}

/// `nn.Linear(in, out)` applied to `x` (last axis `in`): `x @ W^T + b`.
///
/// The checkpoint's `[out, in]` weight is used as stored (no copy) behind a `Transpose`
/// node, which ONNX Runtime folds when it loads the model.
pub(crate) fn linear(
    t: &mut Tracer,
    w: &WeightSource<'_>,
    scope: &str,
    x: &T,
    in_features: i64,
    out_features: i64,
) -> Result<T, TraceError> {
    let features = (in_features, out_features);
    projection(t, w, scope, x, features, WeightLayout::OutIn)
}

/// `nn.LayerNorm(hidden, eps)` over the last axis: the `LayerNormalization` op from opset 17,
/// the decomposed pattern torch exports below that.
pub(crate) fn layer_norm(
    t: &mut Tracer,
    w: &WeightSource<'_>,
    scope: &str,
    x: &T,
    hidden: i64,
    eps: f64,
) -> Result<T, TraceError> {
    layer_norm_with(t, w, scope, x, (hidden, eps), true)
}

/// [`layer_norm`] with or without its bias (`nn.LayerNorm(…, bias=False)`: the
/// `LayerNormalization` op without its optional third input, or the decomposed pattern
/// without the final `Add`).
pub(crate) fn layer_norm_with(
    t: &mut Tracer,
    w: &WeightSource<'_>,
    scope: &str,
    x: &T,
    (hidden, eps): (i64, f64),
    bias: bool,
) -> Result<T, TraceError> {
    t.push(scope);
    let path = t.module_path();
    let r = (|| {
        let gamma = w.get(t, &format!("{path}.weight"), &[hidden])?;
        let beta = if bias {
            Some(w.get(t, &format!("{path}.bias"), &[hidden])?)
        } else {
            None
        };
        if t.opset() >= 17 {
            return Ok(t.layer_norm_op(x, &gamma, beta.as_ref(), eps as f32));
        }
        let mean = t.reduce_mean_last(x)?;
        let d = t.sub(x, &mean)?;
        let two = t.scalar(2.0);
        let sq = t.pow(&d, &two)?;
        let var = t.reduce_mean_last(&sq)?;
        // In a float16 graph an epsilon below float16's smallest subnormal (BERT's 1e-12)
        // would round to 0; keep it at 2^-24 so a zero variance cannot divide by zero.
        let eps = if t.float_dtype() == DType::F16 {
            eps.max(f64::from(half::f16::from_bits(1).to_f32()))
        } else {
            eps
        };
        let e = t.scalar(eps as f32);
        let ve = t.add(&var, &e)?;
        let std = t.unary("Sqrt", &ve);
        let n = t.div(&d, &std)?;
        let g = t.mul(&n, &gamma)?;
        match &beta {
            Some(beta) => t.add(&g, beta),
            None => Ok(g),
        }
    })();
    t.pop();
    r
}

/// The activations of transformers' `ACT2FN` that ferry exports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Activation {
    /// `gelu`: exact, with erf.
    GeluErf,
    /// `gelu_new`, `gelu_pytorch_tanh`, `gelu_fast`: the tanh approximation.
    GeluTanh,
    /// `relu`.
    Relu,
    /// `silu` / `swish`.
    Silu,
    /// `quick_gelu`: `x * sigmoid(1.702 x)`.
    QuickGelu,
}

impl Activation {
    /// Parses a config's `hidden_act`.
    pub(crate) fn parse(name: &str) -> Result<Self, TraceError> {
        Ok(match name {
            "gelu" => Activation::GeluErf,
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Activation::GeluTanh,
            "relu" => Activation::Relu,
            "silu" | "swish" => Activation::Silu,
            "quick_gelu" => Activation::QuickGelu,
            other => {
                return Err(TraceError::Unsupported(format!(
                    "hidden_act `{other}` (supported: gelu, gelu_new, gelu_pytorch_tanh, gelu_fast, relu, silu, swish, quick_gelu)"
                )));
            }
        })
    }

    /// Applies the activation, in the op pattern torch exports (which ONNX Runtime's
    /// fusions recognise).
    pub(crate) fn apply(self, t: &mut Tracer, x: &T) -> Result<T, TraceError> {
        match self {
            Activation::GeluErf => {
                let s = t.scalar(std::f32::consts::SQRT_2);
                let d = t.div(x, &s)?;
                let e = t.unary("Erf", &d);
                let one = t.scalar(1.0);
                let p = t.add(&e, &one)?;
                let m = t.mul(x, &p)?;
                let half = t.scalar(0.5);
                t.mul(&m, &half)
            }
            Activation::GeluTanh => {
                // 0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x^3)))
                let three = t.scalar(3.0);
                let cube = t.pow(x, &three)?;
                let c = t.scalar(0.044715);
                let cc = t.mul(&cube, &c)?;
                let inner = t.add(x, &cc)?;
                let k = t.scalar((2.0f64 / std::f64::consts::PI).sqrt() as f32);
                let scaled = t.mul(&inner, &k)?;
                let th = t.unary("Tanh", &scaled);
                let one = t.scalar(1.0);
                let p = t.add(&th, &one)?;
                let half = t.scalar(0.5);
                let hx = t.mul(x, &half)?;
                t.mul(&hx, &p)
            }
            Activation::Relu => Ok(t.unary("Relu", x)),
            Activation::Silu => {
                let s = t.unary("Sigmoid", x);
                t.mul(x, &s)
            }
            Activation::QuickGelu => {
                let k = t.scalar(1.702);
                let kx = t.mul(x, &k)?;
                let s = t.unary("Sigmoid", &kx);
                t.mul(x, &s)
            }
        }
    }
}

/// The activation of a head's hidden layer: one of [`Activation`], `tanh`, or none
/// (`get_activation` / `SequenceSummary` names).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum HeadActivation {
    /// No activation (`linear`).
    Identity,
    /// `tanh`.
    Tanh,
    /// One of the `ACT2FN` activations.
    Act(Activation),
}

impl HeadActivation {
    /// Applies the activation.
    pub(crate) fn apply(self, t: &mut Tracer, x: T) -> Result<T, TraceError> {
        match self {
            HeadActivation::Identity => Ok(x),
            HeadActivation::Tanh => Ok(t.unary("Tanh", &x)),
            HeadActivation::Act(a) => a.apply(t, &x),
        }
    }
}

/// Shapes of an encoder layer.
#[derive(Debug, Clone)]
pub(crate) struct EncoderDims {
    /// Model width (`hidden_size`).
    pub hidden: i64,
    /// Number of attention heads.
    pub heads: i64,
    /// Feed-forward width (`intermediate_size`).
    pub intermediate: i64,
    /// LayerNorm epsilon.
    pub eps: f64,
    /// Feed-forward activation.
    pub act: Activation,
}

/// Turns a `[batch, seq]` 0/1 attention mask into the additive `[batch, 1, 1, seq]` mask
/// transformers adds to attention scores: 0 where attended, `finfo(dtype).min` elsewhere, in
/// the compute dtype.
pub(crate) fn additive_mask(t: &mut Tracer, mask: &T) -> Result<T, TraceError> {
    let m = t.unsqueeze(mask, &[1, 2]);
    let f = t.cast_to_float(&m);
    let one = t.scalar(1.0);
    let inv = t.sub(&one, &f)?;
    let min = t.float_min();
    t.mul(&inv, &min)
}

/// Names and sizes of a multi-head self-attention's projections.
#[derive(Debug, Clone)]
pub(crate) struct AttentionSpec<'n> {
    /// Module names (relative to the current scope) of the query, key and value
    /// `nn.Linear`s: `query`/`key`/`value` in BERT, `q_lin`/`k_lin`/`v_lin` in DistilBERT.
    pub q: &'n str,
    /// Key projection name.
    pub k: &'n str,
    /// Value projection name.
    pub v: &'n str,
    /// Model width (`hidden_size`).
    pub hidden: i64,
    /// Number of heads.
    pub heads: i64,
}

impl<'n> AttentionSpec<'n> {
    /// The query, key and value projections `[q, k, v]` of an encoder of shape `d`.
    pub(crate) fn new([q, k, v]: [&'n str; 3], d: &EncoderDims) -> Self {
        Self {
            q,
            k,
            v,
            hidden: d.hidden,
            heads: d.heads,
        }
    }
}

/// The multi-head attention core shared by the encoders: project q/k/v with the three
/// linears named in `spec`, split heads, `softmax(q kᵀ · head_dim^-0.5 + bias + mask)`,
/// weight v, merge heads. `mask` is an additive `[batch, 1, 1, seq]` mask (see
/// [`additive_mask`]); `bias` an optional additive score bias (MPNet's relative position
/// bias, `[batch|1, heads, seq, seq]`). Returns the `[batch, seq, hidden]` context before
/// the output projection.
pub(crate) fn multi_head_attention(
    t: &mut Tracer,
    w: &WeightSource<'_>,
    x: &T,
    mask: &T,
    bias: Option<&T>,
    spec: &AttentionSpec<'_>,
) -> Result<T, TraceError> {
    let (hidden, heads) = (spec.hidden, spec.heads);
    let head_dim = hidden / heads;
    let q = linear(t, w, spec.q, x, hidden, hidden)?;
    let k = linear(t, w, spec.k, x, hidden, hidden)?;
    let v = linear(t, w, spec.v, x, hidden, hidden)?;
    let q = t.reshape(&q, &[0, 0, heads, head_dim])?;
    let q = t.transpose(&q, &[0, 2, 1, 3])?;
    let k = t.reshape(&k, &[0, 0, heads, head_dim])?;
    let k = t.transpose(&k, &[0, 2, 3, 1])?;
    let v = t.reshape(&v, &[0, 0, heads, head_dim])?;
    let v = t.transpose(&v, &[0, 2, 1, 3])?;
    let scores = t.matmul(&q, &k)?;
    let scale = t.scalar((head_dim as f64).powf(-0.5) as f32);
    let mut scores = t.mul(&scores, &scale)?;
    if let Some(b) = bias {
        scores = t.add(&scores, b)?;
    }
    let scores = t.add(&scores, mask)?;
    let probs = t.softmax_last(&scores);
    let ctx = t.matmul(&probs, &v)?;
    let ctx = t.transpose(&ctx, &[0, 2, 1, 3])?;
    t.reshape(&ctx, &[0, 0, hidden])
}

/// Runs `f` inside scope `name`, leaving the scope whatever `f` returns.
pub(crate) fn scoped<R>(
    t: &mut Tracer,
    name: &str,
    f: impl FnOnce(&mut Tracer) -> Result<R, TraceError>,
) -> Result<R, TraceError> {
    t.push(name);
    let r = f(t);
    t.pop();
    r
}

/// The post-LayerNorm residual: `LayerNorm(a + b)` with the LayerNorm module `norm`.
pub(crate) fn add_norm(
    t: &mut Tracer,
    w: &WeightSource<'_>,
    norm: &str,
    a: &T,
    b: &T,
    d: &EncoderDims,
) -> Result<T, TraceError> {
    let s = t.add(a, b)?;
    layer_norm(t, w, norm, &s, d.hidden, d.eps)
}

/// `layers` applications of `layer`, the `i`-th in scope `layer.{i}`, each over the
/// previous one's output.
pub(crate) fn layer_stack(
    t: &mut Tracer,
    layers: i64,
    x: T,
    mut layer: impl FnMut(&mut Tracer, &T) -> Result<T, TraceError>,
) -> Result<T, TraceError> {
    let mut x = x;
    for i in 0..layers {
        x = scoped(t, &format!("layer.{i}"), |t| layer(t, &x))?;
    }
    Ok(x)
}

/// The BERT-style encoder stack (`encoder.layer.{i}`: post-LayerNorm attention + FFN) over
/// embeddings `x` with an additive mask; shared by the BERT-shaped encoders.
pub(crate) fn bert_encoder_stack(
    t: &mut Tracer,
    w: &WeightSource<'_>,
    enc: &EncoderDims,
    layers: i64,
    x: T,
    mask: &T,
) -> Result<T, TraceError> {
    scoped(t, "encoder", |t| {
        layer_stack(t, layers, x, |t, x| {
            let a = bert_attention(t, w, x, mask, enc)?;
            bert_ffn(t, w, &a, enc)
        })
    })
}

/// BERT-style post-LayerNorm self-attention block (`attention.self` + `attention.output`).
pub(crate) fn bert_attention(
    t: &mut Tracer,
    w: &WeightSource<'_>,
    x: &T,
    mask: &T,
    d: &EncoderDims,
) -> Result<T, TraceError> {
    let spec = AttentionSpec::new(["query", "key", "value"], d);
    scoped(t, "attention", |t| {
        let ctx = scoped(t, "self", |t| {
            multi_head_attention(t, w, x, mask, None, &spec)
        })?;
        scoped(t, "output", |t| {
            let o = linear(t, w, "dense", &ctx, d.hidden, d.hidden)?;
            add_norm(t, w, "LayerNorm", &o, x, d)
        })
    })
}

/// BERT-style feed-forward block (`intermediate` + `output`).
pub(crate) fn bert_ffn(
    t: &mut Tracer,
    w: &WeightSource<'_>,
    x: &T,
    d: &EncoderDims,
) -> Result<T, TraceError> {
    let h = scoped(t, "intermediate", |t| {
        let h = linear(t, w, "dense", x, d.hidden, d.intermediate)?;
        d.act.apply(t, &h)
    })?;
    scoped(t, "output", |t| {
        let o = linear(t, w, "dense", &h, d.intermediate, d.hidden)?;
        add_norm(t, w, "LayerNorm", &o, x, d)
    })
}

/// A symbolic dim by name.
pub(crate) fn sym(name: &str) -> Dim {
    Dim::sym(name)
}
