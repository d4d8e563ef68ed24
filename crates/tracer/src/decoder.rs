//! The Llama-style decoders — `llama`, `mistral`, `qwen2`, `qwen3`, `phi3`, `gemma`,
//! `gemma2` — as transformers' `modeling_*.py` compute them (eager attention): one decoder
//! whose differences per `model_type` are a [`Family`] description, and whose per-checkpoint
//! switches ([`DecoderDims`]) come from `config.json`: grouped-query attention, explicit
//! `head_dim`, projection biases, q/k RMSNorm, packed projections, RMSNorm forms, rotary
//! embeddings of every `rope_type` these models ship, sliding windows, soft-capping and
//! tied embeddings.

use std::collections::BTreeMap;

use ferry_ir::{Attr, DType, Dim, ModelConfig, TensorData};
use serde_json::{Map, Value};

use crate::causal::{
    DecoderInputs, append_cache, causal_mask, column_range, last_token, present_outputs,
};
use crate::config::{flag, num_labels};
use crate::layers::{Activation, WeightLayout, WeightSource, dense, scoped};
use crate::{Request, T, TraceError, Tracer};

/// Tasks the decoder family exports.
pub(crate) const DECODER_TASKS: &[&str] = &[
    "feature-extraction",
    "text-generation",
    "text-generation-with-past",
    "text-classification",
];

/// Which layers attend within `sliding_window` when the config has no `layer_types`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sliding {
    /// Every layer, when `sliding_window` is set (mistral, phi3).
    Every,
    /// Layers `i >= max_window_layers`, when `use_sliding_window` (qwen2, qwen3).
    FromMaxWindowLayers,
    /// Even layers (gemma2: `(i + 1) % 2`).
    Even,
    /// None (llama, gemma).
    Never,
}

/// How one member of the family differs from Llama.
#[derive(Debug)]
struct Family {
    model_type: &'static str,
    /// RMSNorm scales by `1 + weight` (Gemma) rather than `weight`.
    norm_plus_one: bool,
    /// Token embeddings are multiplied by `sqrt(hidden_size)` (Gemma).
    embed_scale: bool,
    /// q/k/v in one `qkv_proj` and gate/up in one `gate_up_proj` (Phi-3).
    packed: bool,
    /// Per-head RMSNorm of queries and keys, `q_norm`/`k_norm` (Qwen3).
    qk_norm: bool,
    /// RMSNorms after attention and around the MLP (Gemma 2).
    sandwich: bool,
    /// q/k/v always carry a bias and o_proj none (Qwen2); otherwise `attention_bias`
    /// decides for all four.
    qkv_bias_only: bool,
    /// The config key naming the MLP activation.
    act_key: &'static str,
    /// Its default.
    default_act: &'static str,
    /// `tie_word_embeddings` when the config does not say.
    tie_default: bool,
    /// Sliding-window layers when the config has no `layer_types`.
    sliding: Sliding,
    /// Reads `attn_logit_softcapping`, `final_logit_softcapping` and
    /// `query_pre_attn_scalar` (Gemma 2).
    softcap: bool,
}

const LLAMA: Family = Family {
    model_type: "llama",
    norm_plus_one: false,
    embed_scale: false,
    packed: false,
    qk_norm: false,
    sandwich: false,
    qkv_bias_only: false,
    act_key: "hidden_act",
    default_act: "silu",
    tie_default: false,
    sliding: Sliding::Never,
    softcap: false,
};

/// The family, by `model_type`.
const FAMILIES: &[Family] = &[
    LLAMA,
    Family {
        model_type: "mistral",
        sliding: Sliding::Every,
        ..LLAMA
    },
    Family {
        model_type: "qwen2",
        qkv_bias_only: true,
        sliding: Sliding::FromMaxWindowLayers,
        ..LLAMA
    },
    Family {
        model_type: "qwen3",
        qk_norm: true,
        sliding: Sliding::FromMaxWindowLayers,
        ..LLAMA
    },
    Family {
        model_type: "phi3",
        packed: true,
        sliding: Sliding::Every,
        ..LLAMA
    },
    Family {
        model_type: "gemma",
        norm_plus_one: true,
        embed_scale: true,
        default_act: "gelu_pytorch_tanh",
        tie_default: true,
        ..LLAMA
    },
    Family {
        model_type: "gemma2",
        norm_plus_one: true,
        embed_scale: true,
        sandwich: true,
        act_key: "hidden_activation",
        default_act: "gelu_pytorch_tanh",
        tie_default: true,
        sliding: Sliding::Even,
        softcap: true,
        ..LLAMA
    },
];

/// The `model_type`s of the family.
pub(crate) const MODEL_TYPES: &[&str] = &[
    "llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "gemma2",
];

/// Where the rotary frequencies come from.
#[derive(Debug, Clone)]
enum Freqs {
    /// Fixed inverse frequencies (default, linear, llama3, yarn).
    Fixed(Vec<f32>),
    /// Dynamic NTK: above `max_pos` tokens the base grows with the sequence length
    /// (`max(position_ids) + 1`), computed in the graph.
    Dynamic {
        base: f32,
        factor: f32,
        max_pos: i64,
        /// The frequencies at or below `max_pos`.
        short: Vec<f32>,
    },
    /// LongRoPE: `short` up to `original_max` tokens, `long` beyond.
    LongRope {
        short: Vec<f32>,
        long: Vec<f32>,
        original_max: i64,
    },
}

/// Rotary position embedding of the first `dim` features of each head.
#[derive(Debug, Clone)]
pub(crate) struct Rope {
    dim: i64,
    freqs: Freqs,
    /// Scale of cos and sin (`attention_scaling`).
    scale: f32,
}

impl Rope {
    /// The default rotary embedding (`rope_type` "default") of all `dim` features of a
    /// head, with base `theta` (also used by ModernBERT's global and local tables).
    pub(crate) fn default_theta(theta: f64, dim: i64) -> Self {
        Self {
            dim,
            freqs: Freqs::Fixed(default_inv_freq(theta, dim)),
            scale: 1.0,
        }
    }
}

/// A decoder checkpoint's shapes and switches, read from `config.json`.
#[derive(Debug, Clone)]
struct DecoderDims {
    vocab: i64,
    hidden: i64,
    layers: i64,
    heads: i64,
    kv_heads: i64,
    head_dim: i64,
    intermediate: i64,
    eps: f64,
    act: Activation,
    qkv_bias: bool,
    o_bias: bool,
    mlp_bias: bool,
    rope: Rope,
    /// Each layer's sliding window, if it has one.
    windows: Vec<Option<i64>>,
    scaling: f64,
    attn_softcap: Option<f64>,
    final_softcap: Option<f64>,
    tie: bool,
}

fn int(c: &ModelConfig, key: &str) -> Option<i64> {
    c.raw.get(key).and_then(Value::as_i64)
}

fn float(c: &ModelConfig, key: &str) -> Option<f64> {
    c.raw.get(key).and_then(Value::as_f64)
}

fn required(c: &ModelConfig, v: Option<i64>, key: &'static str) -> Result<i64, TraceError> {
    c.require(v, key).map_err(TraceError::from)
}

impl DecoderDims {
    fn from_config(c: &ModelConfig, f: &Family) -> Result<Self, TraceError> {
        let hidden = required(c, c.hidden_size, "hidden_size")?;
        let heads = required(c, c.num_attention_heads, "num_attention_heads")?;
        let layers = required(c, c.num_hidden_layers, "num_hidden_layers")?;
        let kv_heads = match int(c, "num_key_value_heads") {
            Some(v) => required(c, Some(v), "num_key_value_heads")?,
            None => heads,
        };
        if heads % kv_heads != 0 {
            return Err(TraceError::Unsupported(format!(
                "num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}"
            )));
        }
        let head_dim = match int(c, "head_dim") {
            Some(v) => required(c, Some(v), "head_dim")?,
            None if hidden % heads == 0 => hidden / heads,
            None => {
                return Err(TraceError::Unsupported(format!(
                    "hidden_size {hidden} is not a multiple of num_attention_heads {heads} and config.json gives no head_dim"
                )));
            }
        };
        if flag(c, "use_bidirectional_attention", false) {
            return Err(TraceError::Unsupported(
                "use_bidirectional_attention (an embedding variant without causal attention)"
                    .into(),
            ));
        }
        let act = c
            .raw
            .get(f.act_key)
            .and_then(Value::as_str)
            .unwrap_or(f.default_act);
        // Gemma's legacy "gelu" means the tanh approximation (GemmaConfig converts it).
        let act = if f.model_type == "gemma" && act == "gelu" {
            "gelu_pytorch_tanh"
        } else {
            act
        };
        let attention_bias = flag(c, "attention_bias", false);
        let (qkv_bias, o_bias) = if f.qkv_bias_only {
            (true, false)
        } else {
            (attention_bias, attention_bias)
        };
        let max_pos = int(c, "max_position_embeddings");
        let rope = rope(c, f, head_dim, max_pos)?;
        let windows = windows(c, f, layers)?;
        let (scaling, attn_softcap, final_softcap) = if f.softcap {
            let scalar = float(c, "query_pre_attn_scalar").unwrap_or(256.0);
            (
                scalar.powf(-0.5),
                float(c, "attn_logit_softcapping"),
                float(c, "final_logit_softcapping"),
            )
        } else {
            ((head_dim as f64).powf(-0.5), None, None)
        };
        Ok(Self {
            vocab: required(c, c.vocab_size, "vocab_size")?,
            hidden,
            layers,
            heads,
            kv_heads,
            head_dim,
            intermediate: required(c, c.intermediate_size, "intermediate_size")?,
            eps: float(c, "rms_norm_eps").unwrap_or(1e-6),
            act: Activation::parse(act)?,
            qkv_bias,
            o_bias,
            mlp_bias: flag(c, "mlp_bias", false),
            rope,
            windows,
            scaling,
            attn_softcap,
            final_softcap,
            tie: flag(c, "tie_word_embeddings", f.tie_default),
        })
    }
}

/// Each layer's sliding window: from `layer_types` where the config lists them, else as
/// the family's modeling file decides.
fn windows(c: &ModelConfig, f: &Family, layers: i64) -> Result<Vec<Option<i64>>, TraceError> {
    let window = int(c, "sliding_window");
    if let Some(types) = c.raw.get("layer_types").and_then(Value::as_array) {
        if types.len() as i64 != layers {
            return Err(TraceError::Unsupported(format!(
                "layer_types lists {} layers but num_hidden_layers is {layers}",
                types.len()
            )));
        }
        return types
            .iter()
            .map(|ty| match ty.as_str() {
                Some("full_attention") => Ok(None),
                Some("sliding_attention") => window.map(Some).ok_or_else(|| {
                    TraceError::Unsupported(
                        "layer_types has sliding_attention layers but sliding_window is null"
                            .into(),
                    )
                }),
                other => Err(TraceError::Unsupported(format!(
                    "layer type {other:?} (supported: full_attention, sliding_attention)"
                ))),
            })
            .collect();
    }
    let max_window_layers = int(c, "max_window_layers").unwrap_or(28);
    Ok((0..layers)
        .map(|i| {
            let sliding = match f.sliding {
                Sliding::Every => true,
                Sliding::FromMaxWindowLayers => {
                    flag(c, "use_sliding_window", false) && i >= max_window_layers
                }
                Sliding::Even => i % 2 == 0,
                Sliding::Never => false,
            };
            if sliding { window } else { None }
        })
        .collect())
}

/// The rotary parameters: `rope_parameters` (transformers 5) or `rope_scaling` +
/// `rope_theta` (older configs).
fn rope(
    c: &ModelConfig,
    f: &Family,
    head_dim: i64,
    max_pos: Option<i64>,
) -> Result<Rope, TraceError> {
    let empty = Map::new();
    let params = c
        .raw
        .get("rope_parameters")
        .and_then(Value::as_object)
        .or_else(|| c.raw.get("rope_scaling").and_then(Value::as_object))
        .unwrap_or(&empty);
    if params.values().any(Value::is_object) {
        return Err(TraceError::Unsupported(
            "rope parameters nested per layer type".into(),
        ));
    }
    let get = |key: &str| params.get(key).and_then(Value::as_f64);
    let base = get("rope_theta")
        .or_else(|| float(c, "rope_theta"))
        .unwrap_or(10_000.0);
    let partial = get("partial_rotary_factor")
        .or_else(|| float(c, "partial_rotary_factor"))
        .unwrap_or(1.0);
    let dim = (head_dim as f64 * partial) as i64;
    if dim <= 0 || dim % 2 != 0 || dim > head_dim {
        return Err(TraceError::Unsupported(format!(
            "rotary dimension {dim} (head_dim {head_dim} × partial_rotary_factor {partial})"
        )));
    }
    let mut kind = params
        .get("rope_type")
        .or_else(|| params.get("type"))
        .and_then(Value::as_str)
        .unwrap_or("default");
    if f.model_type == "phi3" && matches!(kind, "su" | "yarn") {
        kind = "longrope";
    }
    let factor = get("factor");
    let need = |v: Option<f64>, key: &str| {
        v.ok_or_else(|| TraceError::Unsupported(format!("rope type `{kind}` without `{key}`")))
    };
    let max_pos_f =
        || max_pos.ok_or_else(|| TraceError::Unsupported("no max_position_embeddings".into()));
    // llama3, yarn and longrope: the pretraining length, the config's top-level value first.
    let original_max = || -> Result<f64, TraceError> {
        Ok(float(c, "original_max_position_embeddings")
            .or_else(|| get("original_max_position_embeddings"))
            .unwrap_or(max_pos_f()? as f64))
    };
    let basic = default_inv_freq(base, dim);
    let mut scale = 1.0f64;
    let freqs = match kind {
        "default" => Freqs::Fixed(basic),
        "linear" => {
            let factor = need(factor, "factor")? as f32;
            Freqs::Fixed(basic.iter().map(|x| x / factor).collect())
        }
        "dynamic" => Freqs::Dynamic {
            base: base as f32,
            factor: need(factor, "factor")? as f32,
            max_pos: max_pos_f()?,
            short: basic,
        },
        "llama3" => Freqs::Fixed(llama3(
            &basic,
            need(factor, "factor")?,
            need(get("low_freq_factor"), "low_freq_factor")?,
            need(get("high_freq_factor"), "high_freq_factor")?,
            original_max()?,
        )),
        "yarn" => {
            let original = original_max()?;
            let factor = match factor {
                Some(v) => v,
                None => max_pos_f()? as f64 / original,
            };
            let (inv, s) = yarn(base, dim, factor, original, params);
            scale = s;
            Freqs::Fixed(inv)
        }
        "longrope" => {
            let original = original_max()?;
            let factor = match factor {
                Some(v) => v,
                None => max_pos_f()? as f64 / original,
            };
            scale = match get("attention_factor") {
                Some(v) => v,
                None if factor <= 1.0 => 1.0,
                None => (1.0 + factor.ln() / original.ln()).sqrt(),
            };
            let list = |key: &str| -> Result<Vec<f32>, TraceError> {
                let v: Option<Vec<f32>> = params.get(key).and_then(Value::as_array).and_then(|a| {
                    a.iter()
                        .map(|x| x.as_f64().map(|x| x as f32))
                        .collect::<Option<Vec<f32>>>()
                });
                match v {
                    Some(v) if v.len() as i64 == dim / 2 => Ok(v),
                    _ => Err(TraceError::Unsupported(format!(
                        "longrope `{key}` must list {} numbers",
                        dim / 2
                    ))),
                }
            };
            let powers = powers(base, dim);
            let with = |ext: Vec<f32>| -> Vec<f32> {
                ext.iter()
                    .zip(&powers)
                    .map(|(e, p)| 1.0 / (e * p))
                    .collect()
            };
            Freqs::LongRope {
                short: with(list("short_factor")?),
                long: with(list("long_factor")?),
                original_max: original as i64,
            }
        }
        other => {
            return Err(TraceError::Unsupported(format!(
                "rope type `{other}` (supported: default, linear, dynamic, llama3, yarn, longrope)"
            )));
        }
    };
    Ok(Rope {
        dim,
        freqs,
        scale: scale as f32,
    })
}

/// `base ** (arange(0, dim, 2) / dim)` in float32, as torch computes it.
fn powers(base: f64, dim: i64) -> Vec<f32> {
    let base = base as f32;
    (0..dim / 2)
        .map(|i| base.powf((2 * i) as f32 / dim as f32))
        .collect()
}

/// The default inverse frequencies `1 / base ** (arange(0, dim, 2) / dim)`.
fn default_inv_freq(base: f64, dim: i64) -> Vec<f32> {
    powers(base, dim).iter().map(|p| 1.0 / p).collect()
}

/// `_compute_llama3_parameters`: low frequencies divided by `factor`, high ones kept, the
/// band between smoothly interpolated.
fn llama3(inv: &[f32], factor: f64, low: f64, high: f64, original: f64) -> Vec<f32> {
    let low_wavelen = (original / low) as f32;
    let high_wavelen = (original / high) as f32;
    let (factor, low_f, span, original) = (
        factor as f32,
        low as f32,
        (high - low) as f32,
        original as f32,
    );
    inv.iter()
        .map(|&f| {
            let wavelen = (2.0 * std::f64::consts::PI) as f32 / f;
            let scaled = if wavelen > low_wavelen { f / factor } else { f };
            // `~(wavelen < high) * ~(wavelen > low)`; frequencies are finite, so this is
            // the closed band.
            let medium = wavelen >= high_wavelen && wavelen <= low_wavelen;
            if medium {
                let smooth = (original / wavelen - low_f) / span;
                (1.0 - smooth) * scaled / factor + smooth * scaled
            } else {
                scaled
            }
        })
        .collect()
}

/// `_compute_yarn_parameters`: frequencies blended between interpolation and extrapolation
/// by a linear ramp over the correction range, and the attention factor.
fn yarn(
    base: f64,
    dim: i64,
    factor: f64,
    original: f64,
    params: &Map<String, Value>,
) -> (Vec<f32>, f64) {
    let get = |key: &str| params.get(key).and_then(Value::as_f64);
    let mscale = |scale: f64, m: f64| {
        if scale <= 1.0 {
            1.0
        } else {
            0.1 * m * scale.ln() + 1.0
        }
    };
    let attention = match get("attention_factor") {
        Some(v) => v,
        None => match (get("mscale"), get("mscale_all_dim")) {
            (Some(m), Some(a)) if m != 0.0 && a != 0.0 => mscale(factor, m) / mscale(factor, a),
            _ => mscale(factor, 1.0),
        },
    };
    let beta_fast = get("beta_fast").filter(|v| *v != 0.0).unwrap_or(32.0);
    let beta_slow = get("beta_slow").filter(|v| *v != 0.0).unwrap_or(1.0);
    let truncate = params
        .get("truncate")
        .and_then(Value::as_bool)
        .unwrap_or(true);
    let d = dim as f64;
    let correction =
        |rot: f64| (d * (original / (rot * 2.0 * std::f64::consts::PI)).ln()) / (2.0 * base.ln());
    let (mut low, mut high) = (correction(beta_fast), correction(beta_slow));
    if truncate {
        low = low.floor();
        high = high.ceil();
    }
    let low = low.max(0.0);
    let mut high = high.min(d - 1.0);
    if low == high {
        high += 0.001;
    }
    let powers = powers(base, dim);
    let inv = powers
        .iter()
        .enumerate()
        .map(|(i, &p)| {
            let extrapolation = 1.0 / p;
            let interpolation = 1.0 / (factor as f32 * p);
            let ramp = ((i as f32 - low as f32) / (high - low) as f32).clamp(0.0, 1.0);
            let extra = 1.0 - ramp;
            interpolation * (1.0 - extra) + extrapolation * extra
        })
        .collect();
    (inv, attention)
}

/// A 1-D float32 constant.
fn floats(t: &mut Tracer, v: &[f32]) -> T {
    let init = ferry_ir::Initializer {
        name: String::new(),
        dtype: DType::F32,
        dims: vec![v.len() as i64],
        data: TensorData::from_f32(v),
    };
    t.op(
        "Constant",
        &[],
        vec![("value", Attr::Tensor(Box::new(init)))],
        DType::F32,
        vec![Dim::Fixed(v.len() as i64)],
    )
}

/// `max(position_ids) + 1` as a float32 scalar: the sequence length the dynamic rope types
/// scale for.
fn seq_len_f32(t: &mut Tracer, positions: &T) -> Result<T, TraceError> {
    // No axes: over every element, in the attribute and the input form alike.
    let max = t.op(
        "ReduceMax",
        &[positions],
        vec![("keepdims", Attr::Int(0))],
        DType::I64,
        vec![],
    );
    let one = t.scalar_i64(1);
    let len = t.add(&max, &one)?;
    Ok(t.cast(&len, DType::F32, 1))
}

/// `long` where the sequence length `len` exceeds `limit`, else the fixed `short`
/// frequencies (both scalars float32).
fn beyond_or(t: &mut Tracer, len: &T, limit: &T, long: &T, short: &[f32]) -> T {
    let beyond = t.op("Greater", &[len, limit], vec![], DType::Bool, vec![]);
    let s = floats(t, short);
    t.op(
        "Where",
        &[&beyond, long, &s],
        vec![],
        DType::F32,
        s.shape.clone(),
    )
}

/// The `[dim / 2]` inverse frequencies for this call.
fn inv_freq(t: &mut Tracer, rope: &Rope, positions: &T) -> Result<T, TraceError> {
    match &rope.freqs {
        Freqs::Fixed(v) => Ok(floats(t, v)),
        Freqs::LongRope {
            short,
            long,
            original_max,
        } => {
            let len = seq_len_f32(t, positions)?;
            let limit = t.scalar_f32(*original_max as f32);
            let l = floats(t, long);
            Ok(beyond_or(t, &len, &limit, &l, short))
        }
        Freqs::Dynamic {
            base,
            factor,
            max_pos,
            short,
        } => {
            // base * ((factor * len / max_pos) - (factor - 1)) ** (dim / (dim - 2))
            let len = seq_len_f32(t, positions)?;
            let f = t.scalar_f32(*factor);
            let fl = t.mul(&f, &len)?;
            let m = t.scalar_f32(*max_pos as f32);
            let ratio = t.div(&fl, &m)?;
            let f1 = t.scalar_f32(factor - 1.0);
            let r = t.sub(&ratio, &f1)?;
            let d = rope.dim as f64;
            let e = t.scalar_f32((d / (d - 2.0)) as f32);
            let p = t.pow(&r, &e)?;
            let b = t.scalar_f32(*base);
            let grown = t.mul(&b, &p)?;
            let exps: Vec<f32> = (0..rope.dim / 2)
                .map(|i| (2 * i) as f32 / rope.dim as f32)
                .collect();
            let exps = floats(t, &exps);
            let pw = t.pow(&grown, &exps)?;
            let one = t.scalar_f32(1.0);
            let long = t.div(&one, &pw)?;
            Ok(beyond_or(t, &len, &m, &long, short))
        }
    }
}

/// cos and sin `[batch, 1, seq, dim]` for `positions` `[batch, seq]`
/// (`LlamaRotaryEmbedding.forward`, unsqueezed for the heads axis).
pub(crate) fn rotary_tables(
    t: &mut Tracer,
    rope: &Rope,
    positions: &T,
) -> Result<(T, T), TraceError> {
    scoped(t, "rotary_emb", |t| {
        let inv = inv_freq(t, rope, positions)?;
        let p = t.cast(positions, DType::F32, 1);
        let p = t.unsqueeze(&p, &[2]);
        let freqs = t.mul(&p, &inv)?;
        let mut shape = freqs.shape.clone();
        shape[2] = Dim::Fixed(rope.dim);
        let emb = t.op(
            "Concat",
            &[&freqs, &freqs],
            vec![("axis", Attr::Int(-1))],
            DType::F32,
            shape,
        );
        let mut table = |op: &str| -> Result<T, TraceError> {
            let mut x = t.unary(op, &emb);
            if rope.scale != 1.0 {
                let s = t.scalar_f32(rope.scale);
                x = t.mul(&x, &s)?;
            }
            let x = t.cast_to_float(&x);
            Ok(t.unsqueeze(&x, &[1]))
        };
        let cos = table("Cos")?;
        let sin = table("Sin")?;
        Ok((cos, sin))
    })
}

fn concat_last(t: &mut Tracer, parts: &[&T], width: i64) -> T {
    let mut shape = parts[0].shape.clone();
    if let Some(last) = shape.last_mut() {
        *last = Dim::Fixed(width);
    }
    t.op(
        "Concat",
        parts,
        vec![("axis", Attr::Int(-1))],
        parts[0].dtype,
        shape,
    )
}

/// `q * cos + rotate_half(q) * sin` over the first `rope.dim` features of each head (the
/// rest pass through, Phi-3's partial rotary).
pub(crate) fn apply_rotary(
    t: &mut Tracer,
    rope: &Rope,
    x: &T,
    (cos, sin): (&T, &T),
) -> Result<T, TraceError> {
    let hd = match x.shape.last() {
        Some(Dim::Fixed(d)) => *d,
        _ => return Err(TraceError::Shape("rotary: head_dim is not fixed".into())),
    };
    let r = rope.dim;
    let rot = if r < hd {
        t.slice_last(x, 0, r)
    } else {
        x.clone()
    };
    let x1 = t.slice_last(&rot, 0, r / 2);
    let x2 = t.slice_last(&rot, r / 2, r);
    let neg = t.unary("Neg", &x2);
    let half = concat_last(t, &[&neg, &x1], r);
    let a = t.mul(&rot, cos)?;
    let b = t.mul(&half, sin)?;
    let out = t.add(&a, &b)?;
    if r < hd {
        let pass = t.slice_last(x, r, hd);
        Ok(concat_last(t, &[&out, &pass], hd))
    } else {
        Ok(out)
    }
}

/// RMSNorm over the last axis: `x * rsqrt(mean(x²) + eps)` scaled by `weight` (or by
/// `1 + weight`, Gemma's form). In a float16 graph the normalization runs in float32, as
/// transformers computes it: Llama's form casts back before the weight, Gemma's after.
pub(crate) fn rms_norm(
    t: &mut Tracer,
    w: &WeightSource<'_>,
    scope: &str,
    x: &T,
    (width, eps): (i64, f64),
    plus_one: bool,
) -> Result<T, TraceError> {
    scoped(t, scope, |t| {
        let path = t.module_path();
        let weight = w.get(t, &format!("{path}.weight"), &[width])?;
        let half = t.float_dtype() != DType::F32;
        let x32 = if half {
            t.cast(x, DType::F32, 1)
        } else {
            x.clone()
        };
        let two = t.scalar_f32(2.0);
        let sq = t.pow(&x32, &two)?;
        let var = t.reduce_mean_last(&sq)?;
        let e = t.scalar_f32(eps as f32);
        let ve = t.add(&var, &e)?;
        let std = t.unary("Sqrt", &ve);
        let one = t.scalar_f32(1.0);
        let inv = t.div(&one, &std)?;
        let n = t.mul(&x32, &inv)?;
        if plus_one {
            let w32 = if half {
                t.cast(&weight, DType::F32, 1)
            } else {
                weight
            };
            let w1 = t.add(&w32, &one)?;
            let y = t.mul(&n, &w1)?;
            Ok(t.cast_to_float(&y))
        } else {
            let n = t.cast_to_float(&n);
            t.mul(&weight, &n)
        }
    })
}

/// `nn.Linear` of the decoder: `[out, in]` weight, bias as `bias` says.
pub(crate) fn linear(
    t: &mut Tracer,
    w: &WeightSource<'_>,
    scope: &str,
    x: &T,
    features: (i64, i64),
    bias: bool,
) -> Result<T, TraceError> {
    dense(t, w, scope, x, features, WeightLayout::OutIn, bias)
}

/// `repeat_kv`: `[b, kv_heads, T, hd]` → `[b, kv_heads * groups, T, hd]`, each key/value
/// head repeated for its `groups` query heads.
fn repeat_kv(t: &mut Tracer, x: &T, groups: i64, heads: i64) -> T {
    if groups == 1 {
        return x.clone();
    }
    let u = t.unsqueeze(x, &[2]);
    let reps = t.ints(&[1, 1, groups, 1, 1]);
    let mut shape = u.shape.clone();
    shape[2] = Dim::Fixed(groups);
    let e = t.op("Expand", &[&u, &reps], vec![], x.dtype, shape);
    let target = t.ints(&[0, heads, -1, x.shape[3].fixed().unwrap_or(-1)]);
    let shape = vec![
        x.shape[0].clone(),
        Dim::Fixed(heads),
        x.shape[2].clone(),
        x.shape[3].clone(),
    ];
    t.reshape_to(&e, &target, shape)
}

/// `x / cap`, `tanh`, `* cap`: Gemma 2's soft-capping.
fn softcap(t: &mut Tracer, x: &T, cap: f64) -> Result<T, TraceError> {
    let c = t.scalar(cap as f32);
    let d = t.div(x, &c)?;
    let th = t.unary("Tanh", &d);
    t.mul(&th, &c)
}

/// What one layer's attention needs besides its input.
struct AttnCtx<'a> {
    mask: &'a T,
    rotary: (&'a T, &'a T),
    past: Option<(&'a T, &'a T)>,
}

/// Self-attention of one layer (`self_attn`): returns the output and the layer's
/// key/value after the cache update.
fn attention(
    t: &mut Tracer,
    w: &WeightSource<'_>,
    f: &Family,
    d: &DecoderDims,
    x: &T,
    ctx: &AttnCtx<'_>,
) -> Result<(T, (T, T)), TraceError> {
    let (h, hd) = (d.hidden, d.head_dim);
    let (qw, kw) = (d.heads * hd, d.kv_heads * hd);
    scoped(t, "self_attn", |t| {
        let (q, k, v) = if f.packed {
            let qkv = linear(t, w, "qkv_proj", x, (h, qw + 2 * kw), d.qkv_bias)?;
            (
                t.slice_last(&qkv, 0, qw),
                t.slice_last(&qkv, qw, qw + kw),
                t.slice_last(&qkv, qw + kw, qw + 2 * kw),
            )
        } else {
            (
                linear(t, w, "q_proj", x, (h, qw), d.qkv_bias)?,
                linear(t, w, "k_proj", x, (h, kw), d.qkv_bias)?,
                linear(t, w, "v_proj", x, (h, kw), d.qkv_bias)?,
            )
        };
        let heads = |t: &mut Tracer, y: &T, n: i64, norm: Option<&str>| -> Result<T, TraceError> {
            let y = t.reshape(y, &[0, 0, n, hd])?;
            let y = match norm {
                Some(scope) => rms_norm(t, w, scope, &y, (hd, d.eps), f.norm_plus_one)?,
                None => y,
            };
            t.transpose(&y, &[0, 2, 1, 3])
        };
        let (qn, kn) = if f.qk_norm {
            (Some("q_norm"), Some("k_norm"))
        } else {
            (None, None)
        };
        let q = heads(t, &q, d.heads, qn)?;
        let k = heads(t, &k, d.kv_heads, kn)?;
        let v = heads(t, &v, d.kv_heads, None)?;
        let q = apply_rotary(t, &d.rope, &q, ctx.rotary)?;
        let k = apply_rotary(t, &d.rope, &k, ctx.rotary)?;
        let (k, v) = append_cache(t, ctx.past, k, v);
        let groups = d.heads / d.kv_heads;
        let kr = repeat_kv(t, &k, groups, d.heads);
        let vr = repeat_kv(t, &v, groups, d.heads);
        let kt = t.transpose(&kr, &[0, 1, 3, 2])?;
        let scores = t.matmul(&q, &kt)?;
        let s = t.scalar(d.scaling as f32);
        let mut scores = t.mul(&scores, &s)?;
        if let Some(cap) = d.attn_softcap {
            scores = softcap(t, &scores, cap)?;
        }
        // The mask and the softmax in float32 (transformers: `softmax(dtype=float32)`).
        let scores = if scores.dtype == DType::F32 {
            scores
        } else {
            t.cast(&scores, DType::F32, 1)
        };
        let scores = t.add(&scores, ctx.mask)?;
        let probs = t.softmax_last(&scores);
        let probs = t.cast_to_float(&probs);
        let out = t.matmul(&probs, &vr)?;
        let out = t.transpose(&out, &[0, 2, 1, 3])?;
        let out = t.reshape(&out, &[0, 0, qw])?;
        let out = linear(t, w, "o_proj", &out, (qw, h), d.o_bias)?;
        Ok((out, (k, v)))
    })
}

/// The gated MLP: `down(act(gate(x)) * up(x))`.
fn mlp(
    t: &mut Tracer,
    w: &WeightSource<'_>,
    f: &Family,
    d: &DecoderDims,
    x: &T,
) -> Result<T, TraceError> {
    let (h, i) = (d.hidden, d.intermediate);
    scoped(t, "mlp", |t| {
        let (gate, up) = if f.packed {
            let gu = linear(t, w, "gate_up_proj", x, (h, 2 * i), d.mlp_bias)?;
            (t.slice_last(&gu, 0, i), t.slice_last(&gu, i, 2 * i))
        } else {
            (
                linear(t, w, "gate_proj", x, (h, i), d.mlp_bias)?,
                linear(t, w, "up_proj", x, (h, i), d.mlp_bias)?,
            )
        };
        let a = d.act.apply(t, &gate)?;
        let m = t.mul(&a, &up)?;
        linear(t, w, "down_proj", &m, (i, h), d.mlp_bias)
    })
}

/// One decoder layer (`layers.{i}`): pre-norm attention and MLP with residuals, plus
/// Gemma 2's post-norms.
fn layer(
    t: &mut Tracer,
    w: &WeightSource<'_>,
    f: &Family,
    d: &DecoderDims,
    x: &T,
    ctx: &AttnCtx<'_>,
) -> Result<(T, (T, T)), TraceError> {
    let norm = (d.hidden, d.eps);
    let p1 = f.norm_plus_one;
    let a = rms_norm(t, w, "input_layernorm", x, norm, p1)?;
    let (mut a, present) = attention(t, w, f, d, &a, ctx)?;
    if f.sandwich {
        a = rms_norm(t, w, "post_attention_layernorm", &a, norm, p1)?;
    }
    let x = t.add(x, &a)?;
    let pre = if f.sandwich {
        "pre_feedforward_layernorm"
    } else {
        "post_attention_layernorm"
    };
    let m = rms_norm(t, w, pre, &x, norm, p1)?;
    let mut m = mlp(t, w, f, d, &m)?;
    if f.sandwich {
        m = rms_norm(t, w, "post_feedforward_layernorm", &m, norm, p1)?;
    }
    Ok((t.add(&x, &m)?, present))
}

/// `arange(seq)` per row, `[batch, seq]`: the positions transformers uses when it is given
/// none (`cache_position`).
pub(crate) fn arange_positions(t: &mut Tracer, ids: &T) -> Result<T, TraceError> {
    let r = column_range(t, ids)?;
    let r = t.unsqueeze(&r, &[0]);
    let shape = t.shape_of(ids);
    Ok(t.op(
        "Expand",
        &[&r, &shape],
        vec![],
        DType::I64,
        ids.shape.clone(),
    ))
}

/// Traces a Llama-family decoder for `task`.
pub(crate) fn build(t: &mut Tracer, r: &Request<'_>) -> Result<(), TraceError> {
    let (config, opts, task) = (r.config, r.opts, r.task);
    let f = crate::config::family(FAMILIES, &config.model_type, |f| f.model_type)?;
    let d = DecoderDims::from_config(config, f)?;
    let w = WeightSource::new(r.weights, "model");
    let inputs = DecoderInputs::declare(t, opts, task, (d.layers, d.kv_heads, d.head_dim));
    let ids = inputs.ids.clone();
    let seq = ids.shape[1].clone();

    let embed = w.get(t, "embed_tokens.weight", &[d.vocab, d.hidden])?;
    let mut x = scoped(t, "embed_tokens", |t| {
        let x = t.gather(&embed, &ids, 0)?;
        if !f.embed_scale {
            return Ok(x);
        }
        let s = t.scalar((d.hidden as f64).sqrt() as f32);
        t.mul(&x, &s)
    })?;
    let positions = match &inputs.position_ids {
        Some(p) => p.clone(),
        None => arange_positions(t, &ids)?,
    };
    let (cos, sin) = rotary_tables(t, &d.rope, &positions)?;
    let past_len = inputs.past_length(t)?;
    let mut masks: BTreeMap<Option<i64>, T> = BTreeMap::new();
    for window in &d.windows {
        if !masks.contains_key(window) {
            let m = causal_mask(t, &inputs.attention_mask, &past_len, &seq, *window)?;
            masks.insert(*window, m);
        }
    }

    let mut presents = Vec::new();
    for (i, window) in d.windows.iter().enumerate() {
        let mask = masks
            .get(window)
            .ok_or_else(|| TraceError::Shape("missing attention mask".into()))?;
        let ctx = AttnCtx {
            mask,
            rotary: (&cos, &sin),
            past: inputs.layer_past(i as i64),
        };
        let (nx, present) = scoped(t, &format!("layers.{i}"), |t| layer(t, &w, f, &d, &x, &ctx))?;
        x = nx;
        presents.push(present);
    }
    let x = rms_norm(t, &w, "norm", &x, (d.hidden, d.eps), f.norm_plus_one)?;

    match task {
        "feature-extraction" => t.output(&x, "last_hidden_state"),
        "text-generation" | "text-generation-with-past" => {
            let mut logits = if d.tie {
                scoped(t, "lm_head", |t| {
                    let wt = t.transpose(&embed, &[1, 0])?;
                    t.matmul(&x, &wt)
                })?
            } else {
                linear(t, &w, "lm_head", &x, (d.hidden, d.vocab), false)?
            };
            if let Some(cap) = d.final_softcap {
                logits = softcap(t, &logits, cap)?;
            }
            t.output(&logits, "logits");
            if task == "text-generation-with-past" {
                present_outputs(t, &presents);
            }
        }
        "text-classification" => {
            let n = num_labels(config);
            let scores = linear(t, &w, "score", &x, (d.hidden, n), false)?;
            let pooled = last_token(t, config, &ids, &scores, n)?;
            t.output(&pooled, "logits");
        }
        other => {
            return Err(TraceError::UnsupportedTask {
                task: other.to_string(),
                model_type: config.model_type.clone(),
                supported: DECODER_TASKS.join(", "),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(json: &str) -> ModelConfig {
        ModelConfig::from_json(json).expect("config")
    }

    #[test]
    fn every_model_type_has_a_family() {
        for m in MODEL_TYPES {
            assert!(FAMILIES.iter().any(|f| f.model_type == *m), "{m}");
        }
        assert_eq!(FAMILIES.len(), MODEL_TYPES.len());
    }

    #[test]
    fn default_frequencies_follow_the_formula() {
        let inv = default_inv_freq(10_000.0, 8);
        assert_eq!(inv.len(), 4);
        assert_eq!(inv[0], 1.0);
        assert!((inv[1] - 0.1).abs() < 1e-7, "{inv:?}");
        assert!((inv[2] - 0.01).abs() < 1e-8, "{inv:?}");
    }

    #[test]
    fn config_errors_name_the_problem() {
        let base = r#""model_type":"llama","vocab_size":10,"hidden_size":16,"num_hidden_layers":1,"intermediate_size":8"#;
        let c = config(&format!(
            r#"{{{base},"num_attention_heads":4,"num_key_value_heads":3}}"#
        ));
        let e = DecoderDims::from_config(&c, &LLAMA).expect_err("gqa");
        assert!(
            e.to_string()
                .contains("num_attention_heads 4 is not a multiple of num_key_value_heads 3"),
            "{e}"
        );
        let c = config(&format!(
            r#"{{{base},"num_attention_heads":4,"rope_scaling":{{"rope_type":"magic","factor":2.0}}}}"#
        ));
        let e = DecoderDims::from_config(&c, &LLAMA).expect_err("rope");
        assert!(e.to_string().contains("rope type `magic`"), "{e}");
    }

    #[test]
    fn windows_follow_layer_types_then_the_family() {
        let c = config(
            r#"{"model_type":"gemma2","sliding_window":3,"layer_types":["full_attention","sliding_attention"]}"#,
        );
        let gemma2 = &FAMILIES[6];
        assert_eq!(windows(&c, gemma2, 2).expect("w"), vec![None, Some(3)]);
        let c = config(r#"{"model_type":"gemma2","sliding_window":3}"#);
        assert_eq!(
            windows(&c, gemma2, 3).expect("w"),
            vec![Some(3), None, Some(3)]
        );
        let c = config(r#"{"model_type":"qwen2","sliding_window":3,"use_sliding_window":false}"#);
        assert_eq!(windows(&c, &FAMILIES[2], 2).expect("w"), vec![None, None]);
    }
}
