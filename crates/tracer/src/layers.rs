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
        if init.dtype != DType::F32 {
            return Err(TraceError::WeightDtype {
                name: name.to_string(),
                dtype: init.dtype,
            });
        }
        Ok(t.weight(name, init))
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
    t.push(scope);
    let path = t.module_path();
    let weight = w.get(t, &format!("{path}.weight"), &[out_features, in_features]);
    let result = weight.and_then(|weight| {
        let bias = w.get(t, &format!("{path}.bias"), &[out_features])?;
        let wt = t.transpose(&weight, &[1, 0])?;
        let mm = t.matmul(x, &wt)?;
        t.add(&mm, &bias)
    });
    t.pop();
    result
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
    t.push(scope);
    let path = t.module_path();
    let r = (|| {
        let gamma = w.get(t, &format!("{path}.weight"), &[hidden])?;
        let beta = w.get(t, &format!("{path}.bias"), &[hidden])?;
        if t.opset() >= 17 {
            return Ok(t.layer_norm_op(x, &gamma, &beta, eps as f32));
        }
        let mean = t.reduce_mean_last(x)?;
        let d = t.sub(x, &mean)?;
        let two = t.scalar_f32(2.0);
        let sq = t.pow(&d, &two)?;
        let var = t.reduce_mean_last(&sq)?;
        let e = t.scalar_f32(eps as f32);
        let ve = t.add(&var, &e)?;
        let std = t.unary("Sqrt", &ve);
        let n = t.div(&d, &std)?;
        let g = t.mul(&n, &gamma)?;
        t.add(&g, &beta)
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
                let s = t.scalar_f32(std::f32::consts::SQRT_2);
                let d = t.div(x, &s)?;
                let e = t.unary("Erf", &d);
                let one = t.scalar_f32(1.0);
                let p = t.add(&e, &one)?;
                let m = t.mul(x, &p)?;
                let half = t.scalar_f32(0.5);
                t.mul(&m, &half)
            }
            Activation::GeluTanh => {
                // 0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x^3)))
                let three = t.scalar_f32(3.0);
                let cube = t.pow(x, &three)?;
                let c = t.scalar_f32(0.044715);
                let cc = t.mul(&cube, &c)?;
                let inner = t.add(x, &cc)?;
                let k = t.scalar_f32((2.0f64 / std::f64::consts::PI).sqrt() as f32);
                let scaled = t.mul(&inner, &k)?;
                let th = t.unary("Tanh", &scaled);
                let one = t.scalar_f32(1.0);
                let p = t.add(&th, &one)?;
                let half = t.scalar_f32(0.5);
                let hx = t.mul(x, &half)?;
                t.mul(&hx, &p)
            }
            Activation::Relu => Ok(t.unary("Relu", x)),
            Activation::Silu => {
                let s = t.unary("Sigmoid", x);
                t.mul(x, &s)
            }
            Activation::QuickGelu => {
                let k = t.scalar_f32(1.702);
                let kx = t.mul(x, &k)?;
                let s = t.unary("Sigmoid", &kx);
                t.mul(x, &s)
            }
        }
    }
}

/// Shapes of an encoder layer.
#[derive(Debug, Clone)]
pub(crate) struct EncoderDims {
    pub hidden: i64,
    pub heads: i64,
    pub intermediate: i64,
    pub eps: f64,
    pub act: Activation,
}

/// Turns a `[batch, seq]` 0/1 attention mask into the additive `[batch, 1, 1, seq]` mask
/// transformers adds to attention scores: 0 where attended, `finfo(float32).min` elsewhere.
pub(crate) fn additive_mask(t: &mut Tracer, mask: &T) -> Result<T, TraceError> {
    let m = t.unsqueeze(mask, &[1, 2]);
    let f = t.cast(&m, DType::F32, 1);
    let one = t.scalar_f32(1.0);
    let inv = t.sub(&one, &f)?;
    let min = t.scalar_f32(f32::MIN);
    t.mul(&inv, &min)
}

/// BERT-style post-LayerNorm self-attention block (`attention.self` + `attention.output`).
pub(crate) fn bert_attention(
    t: &mut Tracer,
    w: &WeightSource<'_>,
    x: &T,
    mask: &T,
    d: &EncoderDims,
) -> Result<T, TraceError> {
    let head_dim = d.hidden / d.heads;
    t.push("attention");
    let r = (|| {
        t.push("self");
        let ctx = (|| {
            let q = linear(t, w, "query", x, d.hidden, d.hidden)?;
            let k = linear(t, w, "key", x, d.hidden, d.hidden)?;
            let v = linear(t, w, "value", x, d.hidden, d.hidden)?;
            let q = t.reshape(&q, &[0, 0, d.heads, head_dim])?;
            let q = t.transpose(&q, &[0, 2, 1, 3])?;
            let k = t.reshape(&k, &[0, 0, d.heads, head_dim])?;
            let k = t.transpose(&k, &[0, 2, 3, 1])?;
            let v = t.reshape(&v, &[0, 0, d.heads, head_dim])?;
            let v = t.transpose(&v, &[0, 2, 1, 3])?;
            let scores = t.matmul(&q, &k)?;
            let scale = t.scalar_f32((head_dim as f64).powf(-0.5) as f32);
            let scores = t.mul(&scores, &scale)?;
            let scores = t.add(&scores, mask)?;
            let probs = t.softmax_last(&scores);
            let ctx = t.matmul(&probs, &v)?;
            let ctx = t.transpose(&ctx, &[0, 2, 1, 3])?;
            t.reshape(&ctx, &[0, 0, d.hidden])
        })();
        t.pop();
        let ctx = ctx?;
        t.push("output");
        let out = (|| {
            let o = linear(t, w, "dense", &ctx, d.hidden, d.hidden)?;
            let s = t.add(&o, x)?;
            layer_norm(t, w, "LayerNorm", &s, d.hidden, d.eps)
        })();
        t.pop();
        out
    })();
    t.pop();
    r
}

/// BERT-style feed-forward block (`intermediate` + `output`).
pub(crate) fn bert_ffn(
    t: &mut Tracer,
    w: &WeightSource<'_>,
    x: &T,
    d: &EncoderDims,
) -> Result<T, TraceError> {
    t.push("intermediate");
    let h = linear(t, w, "dense", x, d.hidden, d.intermediate).and_then(|h| d.act.apply(t, &h));
    t.pop();
    let h = h?;
    t.push("output");
    let r = (|| {
        let o = linear(t, w, "dense", &h, d.intermediate, d.hidden)?;
        let s = t.add(&o, x)?;
        layer_norm(t, w, "LayerNorm", &s, d.hidden, d.eps)
    })();
    t.pop();
    r
}

/// A symbolic dim by name.
pub(crate) fn sym(name: &str) -> Dim {
    Dim::sym(name)
}
