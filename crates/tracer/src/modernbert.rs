//! ModernBERT, as transformers' `modeling_modernbert.py` computes it on the padded path
//! (eager attention): token embeddings + LayerNorm, pre-norm layers (the first without
//! `attn_norm`) whose packed `Wqkv` attention applies rotary embeddings of two bases
//! (`full_attention` layers the global theta, `sliding_attention` layers the local one)
//! and alternates global attention with a bidirectional sliding window
//! (`|i - j| <= local_attention // 2`), a GeGLU MLP (`Wi` → chunk → `act(input) * gate`
//! → `Wo`), a final norm, and the `head` (dense, activation, norm) of every task model.
//! Biases follow the config's `norm_bias`, `attention_bias`, `mlp_bias`,
//! `classifier_bias` and `decoder_bias`.

use ferry_ir::{Attr, DType, Dim, ModelConfig};
use serde_json::Value;

use crate::causal::column_range;
use crate::config::{attention_width, flag, num_labels, ties_word_embeddings};
use crate::decoder::{Rope, apply_rotary, rotary_tables};
use crate::heads::{INPUTS, choice_logits, first_token, task_inputs};
use crate::layers::{
    Activation, WeightLayout, WeightSource, additive_mask, dense, layer_norm_with, scoped,
};
use crate::{Request, T, TraceError, Tracer};

/// `ModernBertConfig.default_theta`: the rotary bases when the config names none.
const DEFAULT_GLOBAL_THETA: f64 = 160_000.0;
/// The local (sliding-window) layers' default base.
const DEFAULT_LOCAL_THETA: f64 = 10_000.0;

/// How `…ForSequenceClassification` / `…ForMultipleChoice` pool the sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pooling {
    /// The first token (multiple-choice: the first non-padding one).
    Cls,
    /// The mean over non-padding tokens.
    Mean,
}

/// The ModernBERT hyper-parameters ferry needs, validated.
#[derive(Debug, Clone)]
struct Dims {
    vocab: i64,
    hidden: i64,
    heads: i64,
    intermediate: i64,
    eps: f64,
    act: Activation,
    head_act: Activation,
    norm_bias: bool,
    attention_bias: bool,
    mlp_bias: bool,
    classifier_bias: bool,
    decoder_bias: bool,
    /// Per layer: whether it attends through the sliding window.
    sliding: Vec<bool>,
    /// Half window: a query attends keys at most this far away in sliding layers.
    half_window: i64,
    global_theta: f64,
    local_theta: f64,
    pooling: Pooling,
}

fn float(c: &ModelConfig, key: &str) -> Option<f64> {
    c.raw.get(key).and_then(Value::as_f64)
}

fn text<'c>(c: &'c ModelConfig, key: &str, default: &'c str) -> Result<&'c str, TraceError> {
    match c.raw.get(key) {
        None | Some(Value::Null) => Ok(default),
        Some(v) => v
            .as_str()
            .ok_or_else(|| TraceError::Unsupported(format!("{key} {v} (expected a string)"))),
    }
}

/// Each layer's attention type: `layer_types` (transformers 5) or, in older configs,
/// `global_attn_every_n_layers` (layer `i` global when `i % n == 0`; default 3).
fn sliding_layers(c: &ModelConfig, layers: i64) -> Result<Vec<bool>, TraceError> {
    if let Some(types) = c.raw.get("layer_types").filter(|v| !v.is_null()) {
        let types = types
            .as_array()
            .filter(|a| a.len() as i64 == layers)
            .ok_or_else(|| {
                TraceError::Unsupported(format!(
                    "layer_types must list num_hidden_layers ({layers}) entries"
                ))
            })?;
        return types
            .iter()
            .map(|v| match v.as_str() {
                Some("sliding_attention") => Ok(true),
                Some("full_attention") => Ok(false),
                _ => Err(TraceError::Unsupported(format!(
                    "layer type {v} (supported: full_attention, sliding_attention)"
                ))),
            })
            .collect();
    }
    let every = match c.raw.get("global_attn_every_n_layers") {
        None | Some(Value::Null) => 3,
        Some(v) => v.as_i64().filter(|&n| n > 0).ok_or_else(|| {
            TraceError::Unsupported(format!(
                "global_attn_every_n_layers {v} (expected a positive integer)"
            ))
        })?,
    };
    Ok((0..layers).map(|i| i % every != 0).collect())
}

/// The rotary base of one layer type: `rope_parameters[layer_type].rope_theta`, else the
/// older top-level `legacy` key (`global_rope_theta` / `local_rope_theta`), else the
/// default. Only the default rope type is exported.
fn theta(c: &ModelConfig, layer_type: &str, legacy: &str, default: f64) -> Result<f64, TraceError> {
    if c.raw.get("rope_scaling").is_some_and(|v| !v.is_null()) {
        return Err(TraceError::Unsupported(
            "rope_scaling on ModernBERT (only the default rope type is exported)".into(),
        ));
    }
    let params = c
        .raw
        .get("rope_parameters")
        .and_then(|p| p.get(layer_type))
        .filter(|p| !p.is_null());
    if let Some(p) = params {
        match p.get("rope_type").and_then(Value::as_str) {
            None | Some("default") => {}
            Some(other) => {
                return Err(TraceError::Unsupported(format!(
                    "rope type `{other}` for {layer_type} (ModernBERT: default only)"
                )));
            }
        }
        if let Some(theta) = p.get("rope_theta").and_then(Value::as_f64) {
            return Ok(theta);
        }
    }
    Ok(float(c, legacy).unwrap_or(default))
}

impl Dims {
    fn from_config(c: &ModelConfig) -> Result<Self, TraceError> {
        let (hidden, heads) = attention_width(c)?;
        let layers = c.require(c.num_hidden_layers, "num_hidden_layers")?;
        let local = match c.raw.get("local_attention") {
            None | Some(Value::Null) => 128,
            Some(v) => v.as_i64().filter(|&n| n > 0).ok_or_else(|| {
                TraceError::Unsupported(format!(
                    "local_attention {v} (expected a positive integer)"
                ))
            })?,
        };
        let pooling = match text(c, "classifier_pooling", "cls")? {
            "cls" => Pooling::Cls,
            "mean" => Pooling::Mean,
            other => {
                return Err(TraceError::Unsupported(format!(
                    "classifier_pooling `{other}` (supported: cls, mean)"
                )));
            }
        };
        Ok(Self {
            vocab: c.require(c.vocab_size, "vocab_size")?,
            hidden,
            heads,
            intermediate: c.require(c.intermediate_size, "intermediate_size")?,
            eps: float(c, "norm_eps").unwrap_or(1e-5),
            act: Activation::parse(text(c, "hidden_activation", "gelu")?)?,
            head_act: Activation::parse(text(c, "classifier_activation", "gelu")?)?,
            norm_bias: flag(c, "norm_bias", false),
            attention_bias: flag(c, "attention_bias", false),
            mlp_bias: flag(c, "mlp_bias", false),
            classifier_bias: flag(c, "classifier_bias", false),
            decoder_bias: flag(c, "decoder_bias", true),
            sliding: sliding_layers(c, layers)?,
            half_window: local / 2,
            global_theta: theta(
                c,
                "full_attention",
                "global_rope_theta",
                DEFAULT_GLOBAL_THETA,
            )?,
            local_theta: theta(
                c,
                "sliding_attention",
                "local_rope_theta",
                DEFAULT_LOCAL_THETA,
            )?,
            pooling,
        })
    }

    fn head_dim(&self) -> i64 {
        self.hidden / self.heads
    }
}

/// `nn.LayerNorm(hidden, eps=norm_eps, bias=norm_bias)` in scope `scope`.
fn norm(
    t: &mut Tracer,
    w: &WeightSource<'_>,
    scope: &str,
    x: &T,
    d: &Dims,
) -> Result<T, TraceError> {
    layer_norm_with(t, w, scope, x, (d.hidden, d.eps), d.norm_bias)
}

/// What one layer's attention reads besides its input: the additive mask and the rotary
/// tables of its layer type.
struct LayerCtx<'a> {
    mask: &'a T,
    rope: &'a Rope,
    rotary: (&'a T, &'a T),
}

/// `ModernBertAttention` (scope `attn`): packed `Wqkv` (`view(…, 3, heads, head_dim)`),
/// rotary on q and k, `softmax(q kᵀ · head_dim^-0.5 + mask) v`, `Wo`.
fn attention(
    t: &mut Tracer,
    w: &WeightSource<'_>,
    d: &Dims,
    x: &T,
    ctx: &LayerCtx<'_>,
) -> Result<T, TraceError> {
    let (h, hd) = (d.hidden, d.head_dim());
    scoped(t, "attn", |t| {
        let qkv = dense(
            t,
            w,
            "Wqkv",
            x,
            (h, 3 * h),
            WeightLayout::OutIn,
            d.attention_bias,
        )?;
        let split = |t: &mut Tracer, i: i64| -> Result<T, TraceError> {
            let y = t.slice_last(&qkv, i * h, (i + 1) * h);
            let y = t.reshape(&y, &[0, 0, d.heads, hd])?;
            t.transpose(&y, &[0, 2, 1, 3])
        };
        let (q, k, v) = (split(t, 0)?, split(t, 1)?, split(t, 2)?);
        let q = apply_rotary(t, ctx.rope, &q, ctx.rotary)?;
        let k = apply_rotary(t, ctx.rope, &k, ctx.rotary)?;
        let kt = t.transpose(&k, &[0, 1, 3, 2])?;
        let scores = t.matmul(&q, &kt)?;
        let scale = t.scalar((hd as f64).powf(-0.5) as f32);
        let scores = t.mul(&scores, &scale)?;
        let scores = t.add(&scores, ctx.mask)?;
        let probs = t.softmax_last(&scores);
        let out = t.matmul(&probs, &v)?;
        let out = t.transpose(&out, &[0, 2, 1, 3])?;
        let out = t.reshape(&out, &[0, 0, h])?;
        dense(
            t,
            w,
            "Wo",
            &out,
            (h, h),
            WeightLayout::OutIn,
            d.attention_bias,
        )
    })
}

/// `ModernBertMLP` (scope `mlp`): `Wo(act(input) * gate)` with `input, gate = Wi(x).chunk(2)`.
fn mlp(t: &mut Tracer, w: &WeightSource<'_>, d: &Dims, x: &T) -> Result<T, TraceError> {
    let (h, i) = (d.hidden, d.intermediate);
    scoped(t, "mlp", |t| {
        let wi = dense(t, w, "Wi", x, (h, 2 * i), WeightLayout::OutIn, d.mlp_bias)?;
        let input = t.slice_last(&wi, 0, i);
        let gate = t.slice_last(&wi, i, 2 * i);
        let a = d.act.apply(t, &input)?;
        let m = t.mul(&a, &gate)?;
        dense(t, w, "Wo", &m, (i, h), WeightLayout::OutIn, d.mlp_bias)
    })
}

/// The additive `[batch, 1, seq, seq]` mask of the sliding layers: 0 where key `j` is not
/// padding and `|i - j| <= half_window`, `finfo.min` elsewhere (one value, as transformers'
/// `eager_mask` turns the combined boolean mask into floats once).
fn sliding_mask(t: &mut Tracer, ids: &T, mask: &T, half_window: i64) -> Result<T, TraceError> {
    scoped(t, "sliding_mask", |t| {
        let s = ids.shape[1].clone();
        let (rows, cols) = crate::embeddings::position_grid(t, ids)?;
        let diff = t.sub(&rows, &cols)?;
        let dist = t.unary("Abs", &diff);
        let limit = t.scalar_i64(half_window + 1);
        let near = t.op(
            "Less",
            &[&dist, &limit],
            vec![],
            DType::Bool,
            vec![s.clone(), s],
        );
        let near = t.cast_to_float(&near);
        let keys = t.unsqueeze(mask, &[1, 2]);
        let keys = t.cast_to_float(&keys);
        let allowed = t.mul(&keys, &near)?;
        let one = t.scalar(1.0);
        let blocked = t.sub(&one, &allowed)?;
        let min = t.float_min();
        t.mul(&blocked, &min)
    })
}

/// `ModernBertModel` over `[n, seq]` inputs: the final-normed `[n, seq, hidden]` states.
fn encoder(
    t: &mut Tracer,
    w: &WeightSource<'_>,
    d: &Dims,
    ids: &T,
    mask: &T,
) -> Result<T, TraceError> {
    let mut x = scoped(t, "embeddings", |t| {
        let table = w.get(t, "embeddings.tok_embeddings.weight", &[d.vocab, d.hidden])?;
        let x = scoped(t, "tok_embeddings", |t| t.gather(&table, ids, 0))?;
        norm(t, w, "norm", &x, d)
    })?;
    let global_mask = additive_mask(t, mask)?;
    let local_mask = if d.sliding.contains(&true) {
        Some(sliding_mask(t, ids, mask, d.half_window)?)
    } else {
        None
    };
    // position_ids = arange(seq)[None], expanded to [n, seq] (the position_ids layout
    // ONNX Runtime's RotaryEmbedding reads, which the optimizer can fuse into).
    let positions = crate::decoder::arange_positions(t, ids)?;
    let global_rope = Rope::default_theta(d.global_theta, d.head_dim());
    let local_rope = Rope::default_theta(d.local_theta, d.head_dim());
    let global_tables = if d.sliding.contains(&false) {
        Some(rotary_tables(t, &global_rope, &positions)?)
    } else {
        None
    };
    let local_tables = match local_mask {
        Some(_) => Some(rotary_tables(t, &local_rope, &positions)?),
        None => None,
    };
    for (i, &sliding) in d.sliding.iter().enumerate() {
        let (mask, rope, tables) = match (sliding, &local_mask, &local_tables, &global_tables) {
            (true, Some(m), Some(tb), _) => (m, &local_rope, tb),
            (false, _, _, Some(tb)) => (&global_mask, &global_rope, tb),
            _ => return Err(TraceError::Shape("modernbert: layer tables".into())),
        };
        let ctx = LayerCtx {
            mask,
            rope,
            rotary: (&tables.0, &tables.1),
        };
        x = scoped(t, &format!("layers.{i}"), |t| {
            let a = if i == 0 {
                x.clone()
            } else {
                norm(t, w, "attn_norm", &x, d)?
            };
            let a = attention(t, w, d, &a, &ctx)?;
            let x = t.add(&x, &a)?;
            let m = norm(t, w, "mlp_norm", &x, d)?;
            let m = mlp(t, w, d, &m)?;
            t.add(&x, &m)
        })?;
    }
    norm(t, w, "final_norm", &x, d)
}

/// `ModernBertPredictionHead` (scope `head`): `norm(act(dense(x)))`.
fn prediction_head(t: &mut Tracer, w: &WeightSource<'_>, d: &Dims, x: &T) -> Result<T, TraceError> {
    let h = d.hidden;
    scoped(t, "head", |t| {
        let y = dense(
            t,
            w,
            "dense",
            x,
            (h, h),
            WeightLayout::OutIn,
            d.classifier_bias,
        )?;
        let y = d.head_act.apply(t, &y)?;
        norm(t, w, "norm", &y, d)
    })
}

/// `ReduceSum` over axis 1 (axes as an input: every opset ferry targets is 13+).
fn sum_axis1(t: &mut Tracer, x: &T, keepdims: bool) -> T {
    let axes = t.ints(&[1]);
    let mut shape = x.shape.clone();
    if keepdims {
        shape[1] = Dim::Fixed(1);
    } else {
        shape.remove(1);
    }
    t.op(
        "ReduceSum",
        &[x, &axes],
        vec![("keepdims", Attr::Int(i64::from(keepdims)))],
        x.dtype,
        shape,
    )
}

/// `(x * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)`: `[n, hidden]`.
fn mean_pool(t: &mut Tracer, x: &T, mask: &T) -> Result<T, TraceError> {
    let m = t.cast_to_float(mask);
    let m3 = t.unsqueeze(&m, &[2]);
    let masked = t.mul(x, &m3)?;
    let sum = sum_axis1(t, &masked, false);
    let count = sum_axis1(t, &m, true);
    t.div(&sum, &count)
}

/// Multiple-choice's cls pooling: the state at `attention_mask.argmax(-1)` (the first
/// non-padding token), selected exactly by a one-hot sum.
fn first_attended(t: &mut Tracer, x: &T, ids: &T, mask: &T) -> Result<T, TraceError> {
    let m = t.cast_to_float(mask);
    let n = mask.shape[0].clone();
    let index = t.op(
        "ArgMax",
        &[&m],
        vec![("axis", Attr::Int(-1)), ("keepdims", Attr::Int(1))],
        DType::I64,
        vec![n.clone(), Dim::Fixed(1)],
    );
    let r = column_range(t, ids)?;
    let hit = t.op(
        "Equal",
        &[&r, &index],
        vec![],
        DType::Bool,
        vec![n, ids.shape[1].clone()],
    );
    let hit = t.cast_to_float(&hit);
    let hit = t.unsqueeze(&hit, &[2]);
    let picked = t.mul(x, &hit)?;
    Ok(sum_axis1(t, &picked, false))
}

/// The `classifier` `nn.Linear(hidden, labels)` (always with a bias).
fn classifier(
    t: &mut Tracer,
    w: &WeightSource<'_>,
    d: &Dims,
    x: &T,
    labels: i64,
) -> Result<T, TraceError> {
    dense(
        t,
        w,
        "classifier",
        x,
        (d.hidden, labels),
        WeightLayout::OutIn,
        true,
    )
}

/// `ModernBertForMaskedLM`'s `decoder(head(x))`, its weight the token embeddings unless
/// the config unties them.
fn mlm_logits(
    t: &mut Tracer,
    w: &WeightSource<'_>,
    c: &ModelConfig,
    d: &Dims,
    x: &T,
) -> Result<T, TraceError> {
    let y = prediction_head(t, w, d, x)?;
    scoped(t, "decoder", |t| {
        let name = if ties_word_embeddings(c) {
            "embeddings.tok_embeddings.weight"
        } else {
            "decoder.weight"
        };
        let weight = w.get(t, name, &[d.vocab, d.hidden])?;
        let wt = t.transpose(&weight, &[1, 0])?;
        let logits = t.matmul(&y, &wt)?;
        if !d.decoder_bias {
            return Ok(logits);
        }
        let bias = w.get(t, "decoder.bias", &[d.vocab])?;
        t.add(&logits, &bias)
    })
}

/// Traces ModernBERT with the head of `task` (optimum's task names).
pub(crate) fn build(t: &mut Tracer, r: &Request<'_>) -> Result<(), TraceError> {
    let d = Dims::from_config(r.config)?;
    let w = WeightSource::new(r.weights, "model");
    let inputs = task_inputs(t, r.opts, r.task, &INPUTS);
    let [ids, mask] = inputs.inputs.as_slice() else {
        return Err(TraceError::Shape("expected 2 inputs".into()));
    };
    let x = encoder(t, &w, &d, ids, mask)?;
    let pooled = |t: &mut Tracer, choice: bool| -> Result<T, TraceError> {
        match (d.pooling, choice) {
            (Pooling::Cls, false) => first_token(t, &x),
            (Pooling::Cls, true) => first_attended(t, &x, ids, mask),
            (Pooling::Mean, _) => mean_pool(t, &x, mask),
        }
    };
    match r.task {
        "feature-extraction" => t.output(&x, "last_hidden_state"),
        "fill-mask" => {
            let logits = mlm_logits(t, &w, r.config, &d, &x)?;
            t.output(&logits, "logits");
        }
        "text-classification" => {
            let p = pooled(t, false)?;
            let p = prediction_head(t, &w, &d, &p)?;
            let logits = classifier(t, &w, &d, &p, num_labels(r.config))?;
            t.output(&logits, "logits");
        }
        "multiple-choice" => {
            let choices = inputs
                .choices
                .as_ref()
                .ok_or_else(|| TraceError::Shape("multiple-choice without choices".into()))?;
            let p = pooled(t, true)?;
            let p = prediction_head(t, &w, &d, &p)?;
            let logits = classifier(t, &w, &d, &p, 1)?;
            let logits = choice_logits(t, &logits, choices);
            t.output(&logits, "logits");
        }
        "token-classification" => {
            let y = prediction_head(t, &w, &d, &x)?;
            let logits = classifier(t, &w, &d, &y, num_labels(r.config))?;
            t.output(&logits, "logits");
        }
        "question-answering" => {
            let labels = num_labels(r.config);
            if labels != 2 {
                return Err(TraceError::Unsupported(format!(
                    "question-answering with num_labels {labels} (start and end logits need 2)"
                )));
            }
            let y = prediction_head(t, &w, &d, &x)?;
            let logits = classifier(t, &w, &d, &y, 2)?;
            for (i, name) in ["start_logits", "end_logits"].iter().enumerate() {
                let index = t.scalar_i64(i as i64);
                let part = t.gather(&logits, &index, 2)?;
                t.output(&part, name);
            }
        }
        other => {
            return Err(TraceError::UnsupportedTask {
                task: other.to_string(),
                model_type: r.config.model_type.clone(),
                supported: crate::heads::ENCODER_TASKS.join(", "),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use ferry_ir::Graph;

    use super::*;

    fn config(json: &str) -> ModelConfig {
        ModelConfig::from_json(json).expect("valid test config")
    }

    const BASE: &str = r#""model_type":"modernbert","vocab_size":10,"hidden_size":8,"num_attention_heads":2,"intermediate_size":12,"num_hidden_layers":4"#;

    fn traced(name: &str, task: &str) -> Graph {
        crate::fixed_dims_tests::traced(name, task, &[])
    }

    #[test]
    fn both_config_forms_give_the_same_layers_and_bases() -> Result<(), TraceError> {
        let legacy = Dims::from_config(&config(&format!(
            r#"{{{BASE},"global_attn_every_n_layers":2,"global_rope_theta":500.0,"local_rope_theta":50.0,"local_attention":6}}"#
        )))?;
        let new = Dims::from_config(&config(&format!(
            r#"{{{BASE},"layer_types":["full_attention","sliding_attention","full_attention","sliding_attention"],"rope_parameters":{{"full_attention":{{"rope_theta":500.0,"rope_type":"default"}},"sliding_attention":{{"rope_theta":50.0,"rope_type":"default"}}}},"local_attention":6}}"#
        )))?;
        for d in [&legacy, &new] {
            assert_eq!(d.sliding, [false, true, false, true]);
            assert_eq!(
                (d.global_theta, d.local_theta, d.half_window),
                (500.0, 50.0, 3)
            );
        }
        // transformers' defaults: every third layer global, bases 160000 / 10000, window 128.
        let d = Dims::from_config(&config(&format!("{{{BASE}}}")))?;
        assert_eq!(d.sliding, [false, true, true, false]);
        assert_eq!(
            (d.global_theta, d.local_theta, d.half_window),
            (160_000.0, 10_000.0, 64)
        );
        assert!(!d.norm_bias && !d.attention_bias && !d.mlp_bias && d.decoder_bias);
        Ok(())
    }

    #[test]
    fn config_errors_name_the_problem() {
        let bad = [
            (
                r#""rope_parameters":{"full_attention":{"rope_type":"yarn","factor":2.0}}"#,
                "rope type `yarn`",
            ),
            (
                r#""layer_types":["full_attention"]"#,
                "layer_types must list",
            ),
            (r#""classifier_pooling":"max""#, "classifier_pooling `max`"),
            (r#""hidden_activation":"mish""#, "mish"),
        ];
        for (extra, needle) in bad {
            let e = Dims::from_config(&config(&format!("{{{BASE},{extra}}}")))
                .expect_err(extra)
                .to_string();
            assert!(e.contains(needle), "{extra}: {e}");
        }
    }

    #[test]
    fn one_mask_and_one_rotary_table_per_layer_type() {
        // feature-extraction case: layers G S S G (global_attn_every_n_layers 3).
        let g = traced("modernbert-tiny-feature-extraction", "feature-extraction");
        let inputs: Vec<&str> = g.inputs.iter().map(|v| v.name.as_str()).collect();
        assert_eq!(inputs, ["input_ids", "attention_mask"]);
        let counts = g.op_counts();
        assert_eq!(counts.get("Cos"), Some(&2), "a global and a local table");
        assert_eq!(counts.get("Abs"), Some(&1), "one sliding-window mask");
        let mask = g
            .nodes
            .iter()
            .find(|n| n.name.starts_with("/sliding_mask/") && n.op_type == "Mul")
            .map(|_| ())
            .is_some();
        assert!(mask, "sliding mask nodes");
        // No attn_norm in layer 0; norms without bias (norm_bias false).
        assert!(
            !g.initializers
                .iter()
                .any(|i| i.name.contains("layers.0.attn_norm"))
        );
        assert!(!g.initializers.iter().any(|i| i.name.ends_with("norm.bias")));
        // fill-mask (norm_bias true): the decoder reuses the token embeddings.
        let g = traced("modernbert-tiny-fill-mask", "fill-mask");
        let table = "embeddings.tok_embeddings.weight";
        assert_eq!(g.initializers.iter().filter(|i| i.name == table).count(), 1);
        assert!(
            g.initializers
                .iter()
                .any(|i| i.name.ends_with("final_norm.bias"))
        );
        // Untied (tie_word_embeddings false), without decoder bias: its own weight, no bias.
        let g = traced("modernbert-tiny-fill-mask-untied", "fill-mask");
        assert!(g.initializers.iter().any(|i| i.name == "decoder.weight"));
        assert!(!g.initializers.iter().any(|i| i.name == "decoder.bias"));
    }
}
