//! GPT-2, as transformers' `modeling_gpt2.py` computes it, with optimum's key/value cache
//! interface for `text-generation-with-past`.

use ferry_ir::ModelConfig;

use crate::causal::{DecoderInputs, append_cache, causal_mask, last_token, present_outputs};
use crate::config::{flag, num_labels};
use crate::embeddings::arange_rows;
use crate::heads::{question_answering, token_classification};
use crate::layers::{Activation, WeightLayout, WeightSource, layer_norm, projection, scoped};
use crate::{Request, T, TraceError, Tracer};

/// Tasks GPT-2 exports.
pub(crate) const GPT2_TASKS: &[&str] = &[
    "feature-extraction",
    "text-generation",
    "text-generation-with-past",
    "text-classification",
    "token-classification",
    "question-answering",
];

#[derive(Debug, Clone)]
struct Gpt2Dims {
    vocab: i64,
    hidden: i64,
    heads: i64,
    layers: i64,
    positions: i64,
    inner: i64,
    eps: f64,
    act: Activation,
    scale_weights: bool,
    scale_by_layer: bool,
}

fn int(c: &ModelConfig, key: &'static str) -> Result<i64, TraceError> {
    let v = c.raw.get(key).and_then(serde_json::Value::as_i64);
    c.require(v, key).map_err(TraceError::from)
}

impl Gpt2Dims {
    fn from_config(c: &ModelConfig) -> Result<Self, TraceError> {
        let hidden = int(c, "n_embd")?;
        let heads = int(c, "n_head")?;
        if hidden % heads != 0 {
            return Err(TraceError::Unsupported(format!(
                "n_embd {hidden} is not a multiple of n_head {heads}"
            )));
        }
        if flag(c, "add_cross_attention", false) {
            return Err(TraceError::Unsupported(
                "add_cross_attention (GPT-2 as a decoder of an encoder-decoder)".into(),
            ));
        }
        Ok(Self {
            vocab: c.require(c.vocab_size, "vocab_size")?,
            hidden,
            heads,
            layers: int(c, "n_layer")?,
            positions: int(c, "n_positions")?,
            inner: c
                .raw
                .get("n_inner")
                .and_then(serde_json::Value::as_i64)
                .unwrap_or(4 * hidden),
            eps: c
                .raw
                .get("layer_norm_epsilon")
                .and_then(serde_json::Value::as_f64)
                .unwrap_or(1e-5),
            act: Activation::parse(
                c.raw
                    .get("activation_function")
                    .and_then(serde_json::Value::as_str)
                    .unwrap_or("gelu_new"),
            )?,
            scale_weights: flag(c, "scale_attn_weights", true),
            scale_by_layer: flag(c, "scale_attn_by_inverse_layer_idx", false),
        })
    }
}

/// `Conv1D(nf, nx)`: `x @ W + b` with the checkpoint's `[in, out]` weight used as stored.
fn conv1d(
    t: &mut Tracer,
    w: &WeightSource<'_>,
    scope: &str,
    x: &T,
    nx: i64,
    nf: i64,
) -> Result<T, TraceError> {
    projection(t, w, scope, x, (nx, nf), WeightLayout::InOut)
}

/// Output of one block's attention: the new hidden state and this layer's key/value
/// (after appending to the cache).
struct Attn {
    out: T,
    present: (T, T),
}

#[allow(clippy::too_many_arguments)]
fn attention(
    t: &mut Tracer,
    w: &WeightSource<'_>,
    d: &Gpt2Dims,
    layer: i64,
    x: &T,
    mask: &T,
    past: Option<(&T, &T)>,
) -> Result<Attn, TraceError> {
    let (h, heads) = (d.hidden, d.heads);
    let hd = h / heads;
    scoped(t, "attn", |t| {
        let qkv = conv1d(t, w, "c_attn", x, h, 3 * h)?;
        let split = |t: &mut Tracer, i: i64, perm: &[usize]| -> Result<T, TraceError> {
            let part = t.slice_last(&qkv, i * h, (i + 1) * h);
            let r = t.reshape(&part, &[0, 0, heads, hd])?;
            t.transpose(&r, perm)
        };
        let q = split(t, 0, &[0, 2, 1, 3])?;
        let k = split(t, 1, &[0, 2, 1, 3])?;
        let v = split(t, 2, &[0, 2, 1, 3])?;
        let (k, v) = append_cache(t, past, k, v);
        let kt = t.transpose(&k, &[0, 1, 3, 2])?;
        let scores = t.matmul(&q, &kt)?;
        let mut scale = 1.0f64;
        if d.scale_weights {
            scale = (hd as f64).powf(-0.5);
        }
        if d.scale_by_layer {
            scale /= (layer + 1) as f64;
        }
        let s = t.scalar_f32(scale as f32);
        let scores = t.mul(&scores, &s)?;
        let scores = t.add(&scores, mask)?;
        let probs = t.softmax_last(&scores);
        let ctx = t.matmul(&probs, &v)?;
        let ctx = t.transpose(&ctx, &[0, 2, 1, 3])?;
        let ctx = t.reshape(&ctx, &[0, 0, h])?;
        let out = conv1d(t, w, "c_proj", &ctx, h, h)?;
        Ok(Attn {
            out,
            present: (k, v),
        })
    })
}

fn mlp(t: &mut Tracer, w: &WeightSource<'_>, d: &Gpt2Dims, x: &T) -> Result<T, TraceError> {
    scoped(t, "mlp", |t| {
        let a = conv1d(t, w, "c_fc", x, d.hidden, d.inner)?;
        let a = d.act.apply(t, &a)?;
        conv1d(t, w, "c_proj", &a, d.inner, d.hidden)
    })
}

/// Traces GPT-2 for `task`.
pub(crate) fn build(t: &mut Tracer, r: &Request<'_>) -> Result<(), TraceError> {
    let (config, weights, opts, task) = (r.config, r.weights, r.opts, r.task);
    let d = Gpt2Dims::from_config(config)?;
    let w = WeightSource::new(weights, "transformer");
    let h = d.hidden;
    let hd = h / d.heads;
    let inputs = DecoderInputs::declare(t, opts, task, (d.layers, d.heads, hd));
    let ids = inputs.ids.clone();
    let s = ids.shape[1].clone();

    let wte = w.get(t, "wte.weight", &[d.vocab, h])?;
    let wpe = w.get(t, "wpe.weight", &[d.positions, h])?;
    let tok = t.gather(&wte, &ids, 0)?;
    let pos = match &inputs.position_ids {
        Some(p) => t.gather(&wpe, p, 0)?,
        None => arange_rows(t, &wpe, &ids, h),
    };
    let mut x = t.add(&tok, &pos)?;

    let past_len = inputs.past_length(t)?;
    let mask = causal_mask(t, &inputs.attention_mask, &past_len, &s, None)?;

    let mut presents = Vec::new();
    t.push("h");
    for i in 0..d.layers {
        t.push(i.to_string());
        let layer_past = inputs.layer_past(i);
        let r = (|| {
            let a = layer_norm(t, &w, "ln_1", &x, h, d.eps)?;
            let attn = attention(t, &w, &d, i, &a, &mask, layer_past)?;
            let x1 = t.add(&attn.out, &x)?;
            let m = layer_norm(t, &w, "ln_2", &x1, h, d.eps)?;
            let m = mlp(t, &w, &d, &m)?;
            Ok::<_, TraceError>((t.add(&m, &x1)?, attn.present))
        })();
        t.pop();
        match r {
            Ok((nx, present)) => {
                x = nx;
                presents.push(present);
            }
            Err(e) => {
                t.pop();
                return Err(e);
            }
        }
    }
    t.pop();
    let x = layer_norm(t, &w, "ln_f", &x, h, d.eps)?;

    match task {
        "feature-extraction" => t.output(&x, "last_hidden_state"),
        "text-generation" | "text-generation-with-past" => {
            let logits = scoped(t, "lm_head", |t| {
                let wt = t.transpose(&wte, &[1, 0])?;
                t.matmul(&x, &wt)
            })?;
            t.output(&logits, "logits");
            if task == "text-generation-with-past" {
                present_outputs(t, &presents);
            }
        }
        "token-classification" => token_classification(t, &w, config, &x, h)?,
        "question-answering" => question_answering(t, &w, &x, h)?,
        "text-classification" => {
            let n = num_labels(config);
            let logits = scoped(t, "score", |t| {
                let path = t.module_path();
                let wt = w.get(t, &format!("{path}.weight"), &[n, h])?;
                let wtt = t.transpose(&wt, &[1, 0])?;
                t.matmul(&x, &wtt)
            })?;
            let pooled = last_token(t, config, &ids, &logits, n)?;
            t.output(&pooled, "logits");
        }
        other => {
            return Err(TraceError::UnsupportedTask {
                task: other.to_string(),
                model_type: config.model_type.clone(),
                supported: GPT2_TASKS.join(", "),
            });
        }
    }
    Ok(())
}
