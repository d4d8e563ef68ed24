//! The BART family of encoder-decoders — `bart`, `mbart`, `marian` — as one module driven
//! by a per-`model_type` [`Family`] description (`modeling_bart.py`, `modeling_mbart.py`,
//! `modeling_marian.py`).
//!
//! All three share the layer: `q/k/v/out_proj` attention (scores times `head_dim^-0.5`),
//! `fc1` → activation → `fc2`, LayerNorms with eps 1e-5, cross-attention over the
//! encoder's states in the decoder. They differ in where the LayerNorms sit (post-norm
//! BART and Marian, pre-norm mBART with a final `layer_norm` on both stacks), in the
//! positions (learned with an offset of 2 for BART/mBART, the fixed sinusoidal table for
//! Marian) and in `layernorm_embedding` (BART/mBART only). The config's switches are
//! `scale_embedding`, `activation_function`, `tie_word_embeddings` and Marian's
//! `share_encoder_decoder_embeddings` / `decoder_vocab_size`; `final_logits_bias` is added
//! to the LM head when the checkpoint has it.

use ferry_ir::{DType, Initializer, ModelConfig, TensorData};

use crate::layers::{
    Activation, AttentionSpec, WeightSource, layer_norm, linear, multi_head_attention, scoped,
};
use crate::seq2seq::{
    CacheDims, DecoderInputs, EncoderInputs, LayerCache, Seq2SeqPart, append_self_cache, attend,
    causal_mask, decoder_outputs, padding_mask, split_heads,
};
use crate::{Request, T, TraceError, Tracer};

/// The `model_type`s this module traces.
pub(crate) const MODEL_TYPES: &[&str] = &["bart", "mbart", "marian"];

/// How a family's positions are computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Positions {
    /// `…LearnedPositionalEmbedding`: a trained table indexed at `position + offset`.
    Learned {
        /// BART's offset of 2 (the table has `max_position_embeddings + 2` rows).
        offset: i64,
    },
    /// `MarianSinusoidalPositionalEmbedding`: the fixed table (sin in the first half of the
    /// features, cos in the second), not stored in checkpoints.
    Sinusoidal,
}

/// What sets one `model_type` of the family apart.
#[derive(Debug)]
struct Family {
    model_type: &'static str,
    /// LayerNorm before each block (mBART) rather than after the residual (BART, Marian).
    pre_norm: bool,
    /// A `layer_norm` after the last layer of each stack (mBART).
    final_norm: bool,
    /// `layernorm_embedding` after embeddings + positions (BART, mBART).
    layernorm_embedding: bool,
    positions: Positions,
    /// Whether the encoder and decoder token embeddings can be separate
    /// (`share_encoder_decoder_embeddings`, Marian).
    separate_embeddings: bool,
}

const FAMILIES: &[Family] = &[
    Family {
        model_type: "bart",
        pre_norm: false,
        final_norm: false,
        layernorm_embedding: true,
        positions: Positions::Learned { offset: 2 },
        separate_embeddings: false,
    },
    Family {
        model_type: "mbart",
        pre_norm: true,
        final_norm: true,
        layernorm_embedding: true,
        positions: Positions::Learned { offset: 2 },
        separate_embeddings: false,
    },
    Family {
        model_type: "marian",
        pre_norm: false,
        final_norm: false,
        layernorm_embedding: false,
        positions: Positions::Sinusoidal,
        separate_embeddings: true,
    },
];

/// LayerNorm epsilon of every `nn.LayerNorm` in the family (torch's default).
const EPS: f64 = 1e-5;

/// One stack's (encoder's or decoder's) shapes.
#[derive(Debug, Clone, Copy)]
struct Stack {
    layers: i64,
    heads: i64,
    ffn: i64,
}

/// The config's shapes and switches.
#[derive(Debug)]
struct Dims {
    hidden: i64,
    encoder: Stack,
    decoder: Stack,
    /// Source (encoder) vocabulary.
    vocab: i64,
    /// Target (decoder, LM head) vocabulary: Marian's `decoder_vocab_size` when the
    /// embeddings are not shared, else `vocab`.
    decoder_vocab: i64,
    max_positions: i64,
    act: Activation,
    /// `sqrt(d_model)` with `scale_embedding`, else none.
    embed_scale: Option<f32>,
    /// Encoder and decoder read one `shared` table.
    shared: bool,
    /// The LM head is the decoder's token embedding.
    tie: bool,
}

fn int(c: &ModelConfig, key: &'static str) -> Result<i64, TraceError> {
    Ok(c.require(c.raw.get(key).and_then(serde_json::Value::as_i64), key)?)
}

impl Dims {
    fn from_config(c: &ModelConfig, f: &Family) -> Result<Self, TraceError> {
        let hidden = int(c, "d_model")?;
        let stack = |prefix: &'static str,
                     layers: &'static str,
                     heads: &'static str,
                     ffn: &'static str|
         -> Result<Stack, TraceError> {
            let s = Stack {
                layers: int(c, layers)?,
                heads: int(c, heads)?,
                ffn: int(c, ffn)?,
            };
            if hidden % s.heads != 0 {
                return Err(TraceError::Unsupported(format!(
                    "d_model {hidden} is not a multiple of {prefix}_attention_heads {}",
                    s.heads
                )));
            }
            Ok(s)
        };
        let encoder = stack(
            "encoder",
            "encoder_layers",
            "encoder_attention_heads",
            "encoder_ffn_dim",
        )?;
        let decoder = stack(
            "decoder",
            "decoder_layers",
            "decoder_attention_heads",
            "decoder_ffn_dim",
        )?;
        let vocab = c.require(c.vocab_size, "vocab_size")?;
        let shared = !f.separate_embeddings
            || crate::config::flag(c, "share_encoder_decoder_embeddings", true);
        let decoder_vocab = match c.raw.get("decoder_vocab_size") {
            Some(v) if !shared && !v.is_null() => c.require(v.as_i64(), "decoder_vocab_size")?,
            _ => vocab,
        };
        let act = c
            .raw
            .get("activation_function")
            .and_then(serde_json::Value::as_str)
            .unwrap_or("gelu");
        Ok(Self {
            hidden,
            encoder,
            decoder,
            vocab,
            decoder_vocab,
            max_positions: c.require(c.max_position_embeddings, "max_position_embeddings")?,
            act: Activation::parse(act)?,
            embed_scale: crate::config::flag(c, "scale_embedding", false)
                .then(|| (hidden as f64).sqrt() as f32),
            shared,
            tie: crate::config::flag(c, "tie_word_embeddings", true),
        })
    }
}

/// What every piece of the trace reads: the checkpoint's weights, the family and the
/// config's shapes.
#[derive(Clone, Copy)]
struct Ctx<'a> {
    w: &'a WeightSource<'a>,
    f: &'a Family,
    d: &'a Dims,
}

/// Traces `part` of a BART-family checkpoint into `t`.
pub(crate) fn build(t: &mut Tracer, r: &Request<'_>, part: Seq2SeqPart) -> Result<(), TraceError> {
    let config = r.config;
    let f = crate::config::family(FAMILIES, &config.model_type, |f| f.model_type)?;
    let d = Dims::from_config(config, f)?;
    let w = WeightSource::new(r.weights, "model");
    let c = Ctx { w: &w, f, d: &d };
    if part == Seq2SeqPart::Encoder {
        let inputs = EncoderInputs::declare(t, r.opts);
        let x = scoped(t, "encoder", |t| {
            encoder(t, c, &inputs.ids, &inputs.attention_mask)
        })?;
        t.output(&x, "last_hidden_state");
        return Ok(());
    }
    require_decoder(&w, &config.model_type)?;
    let dims = CacheDims {
        layers: d.decoder.layers,
        heads: d.decoder.heads,
        head_dim: d.hidden / d.decoder.heads,
        hidden: d.hidden,
    };
    let inputs = DecoderInputs::declare(t, r.opts, part, dims)?;
    let (logits, presents) = decoder(t, c, &inputs)?;
    decoder_outputs(t, part, &logits, &presents);
    Ok(())
}

/// A checkpoint saved without its decoder (an encoder-only save) cannot give the decoder
/// files: say so in one line rather than naming the first missing weight.
fn require_decoder(w: &WeightSource<'_>, model_type: &str) -> Result<(), TraceError> {
    let probe = "decoder.layers.0.self_attn.q_proj.weight";
    if w.contains(probe) {
        return Ok(());
    }
    Err(TraceError::NoDecoderWeights {
        model_type: model_type.to_string(),
        missing: probe.to_string(),
    })
}

/// The token embedding table of a stack: the one `shared` table when encoder and decoder
/// share it (under the checkpoint's name for it), else the stack's own `embed_tokens`.
fn token_table(t: &mut Tracer, c: Ctx<'_>, stack: &str) -> Result<T, TraceError> {
    let Ctx { w, d, .. } = c;
    let own = format!("{stack}.embed_tokens.weight");
    let (name, rows) = if d.shared {
        let name = if w.contains("shared.weight") {
            "shared.weight".to_string()
        } else {
            own
        };
        (name, d.vocab)
    } else if stack == "decoder" {
        (own, d.decoder_vocab)
    } else {
        (own, d.vocab)
    };
    w.get(t, &name, &[rows, d.hidden])
}

/// Token embeddings (scaled by `sqrt(d_model)` with `scale_embedding`) plus positions
/// `start ..` (`start` a scalar int64 tensor), then `layernorm_embedding` where the family
/// has it. Runs in the stack's scope (`encoder` / `decoder`).
fn embed(t: &mut Tracer, c: Ctx<'_>, ids: &T, start: &T) -> Result<T, TraceError> {
    let Ctx { w, f, d } = c;
    let stack = t.module_path();
    let table = token_table(t, c, &stack)?;
    let x = scoped(t, "embed_tokens", |t| {
        let x = t.gather(&table, ids, 0)?;
        match d.embed_scale {
            Some(s) => {
                let s = t.scalar(s);
                t.mul(&x, &s)
            }
            None => Ok(x),
        }
    })?;
    let pos = scoped(t, "embed_positions", |t| positions(t, c, ids, start))?;
    let x = t.add(&x, &pos)?;
    if f.layernorm_embedding {
        return layer_norm(t, w, "layernorm_embedding", &x, d.hidden, EPS);
    }
    Ok(x)
}

/// The position embeddings `[seq, hidden]` of positions `start .. start + seq` (`seq` the
/// length of `ids`), as the family computes them.
fn positions(t: &mut Tracer, c: Ctx<'_>, ids: &T, start: &T) -> Result<T, TraceError> {
    let Ctx { w, f, d } = c;
    let path = format!("{}.weight", t.module_path());
    let (table, offset) = match f.positions {
        Positions::Learned { offset } => {
            let table = w.get(t, &path, &[d.max_positions + offset, d.hidden])?;
            (table, offset)
        }
        Positions::Sinusoidal if w.contains(&path) => {
            (w.get(t, &path, &[d.max_positions, d.hidden])?, 0)
        }
        Positions::Sinusoidal => {
            let init = sinusoidal_table(d.max_positions, d.hidden, t.float_dtype())?;
            (t.weight(&path, &init), 0)
        }
    };
    let first = if offset == 0 {
        start.clone()
    } else {
        let o = t.scalar_i64(offset);
        t.add(start, &o)?
    };
    let shape = t.shape_of(ids);
    let len = crate::causal::element(t, &shape, 1)?;
    let end = t.add(&first, &len)?;
    let one = t.scalar_i64(1);
    let idx = t.op(
        "Range",
        &[&first, &end, &one],
        vec![],
        DType::I64,
        vec![ids.shape[1].clone()],
    );
    t.gather(&table, &idx, 0)
}

/// `MarianSinusoidalPositionalEmbedding.create_weight`: `pos / 10000^(2 (j // 2) / dim)`
/// in float64, `sin` of the even columns in the first `ceil(dim / 2)` features and `cos`
/// of the odd ones after them, rounded to the compute dtype.
fn sinusoidal_table(rows: i64, dim: i64, dtype: DType) -> Result<Initializer, TraceError> {
    let sentinel = (dim + 1) / 2;
    let mut values = Vec::with_capacity((rows * dim) as usize);
    for pos in 0..rows {
        let angle = |j: i64| pos as f64 / 10000f64.powf((2 * (j / 2)) as f64 / dim as f64);
        for c in 0..dim {
            let v = if c < sentinel {
                angle(2 * c).sin()
            } else {
                angle(2 * (c - sentinel) + 1).cos()
            };
            values.push(v as f32);
        }
    }
    let data = match dtype {
        DType::F32 => TensorData::from_f32(&values),
        DType::F16 => TensorData::owned(
            values
                .iter()
                .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
                .collect(),
        ),
        other => {
            return Err(TraceError::Unsupported(format!(
                "{other} compute for Marian's sinusoidal positions"
            )));
        }
    };
    Ok(Initializer {
        name: String::new(),
        dtype,
        dims: vec![rows, dim],
        data,
    })
}

/// Keys and values of `source` through the scope's `k_proj` / `v_proj`, split into heads.
fn key_value(
    t: &mut Tracer,
    w: &WeightSource<'_>,
    source: &T,
    hidden: i64,
    heads: i64,
) -> Result<(T, T), TraceError> {
    let hd = hidden / heads;
    let k = linear(t, w, "k_proj", source, hidden, hidden)?;
    let k = split_heads(t, &k, heads, hd)?;
    let v = linear(t, w, "v_proj", source, hidden, hidden)?;
    let v = split_heads(t, &v, heads, hd)?;
    Ok((k, v))
}

/// `BartAttention` in the current scope with keys and values already projected:
/// `softmax(q kᵀ · head_dim^-0.5 + mask) v` through `out_proj`.
fn attention(
    t: &mut Tracer,
    w: &WeightSource<'_>,
    x: &T,
    (k, v): (&T, &T),
    mask: &T,
    (hidden, heads): (i64, i64),
) -> Result<T, TraceError> {
    let hd = hidden / heads;
    let q = linear(t, w, "q_proj", x, hidden, hidden)?;
    let q = split_heads(t, &q, heads, hd)?;
    let scale = (hd as f64).powf(-0.5);
    let ctx = attend(t, (&q, k, v), Some(scale), None, mask)?;
    linear(t, w, "out_proj", &ctx, hidden, hidden)
}

/// A residual block `x + block(x)` with its LayerNorm `norm` after the sum (post-norm) or
/// before the block (pre-norm).
fn residual<R>(
    t: &mut Tracer,
    Ctx { w, f, d }: Ctx<'_>,
    norm: &str,
    x: &T,
    block: impl FnOnce(&mut Tracer, &T) -> Result<(T, R), TraceError>,
) -> Result<(T, R), TraceError> {
    if f.pre_norm {
        let h = layer_norm(t, w, norm, x, d.hidden, EPS)?;
        let (h, extra) = block(t, &h)?;
        Ok((t.add(x, &h)?, extra))
    } else {
        let (h, extra) = block(t, x)?;
        let s = t.add(x, &h)?;
        Ok((layer_norm(t, w, norm, &s, d.hidden, EPS)?, extra))
    }
}

/// The feed-forward block `fc1` → activation → `fc2` with its residual and `final_layer_norm`.
fn ffn_block(t: &mut Tracer, c: Ctx<'_>, x: &T, ffn: i64) -> Result<T, TraceError> {
    let Ctx { w, d, .. } = c;
    let (x, ()) = residual(t, c, "final_layer_norm", x, |t, h| {
        let h = linear(t, w, "fc1", h, d.hidden, ffn)?;
        let h = d.act.apply(t, &h)?;
        Ok((linear(t, w, "fc2", &h, ffn, d.hidden)?, ()))
    })?;
    Ok(x)
}

/// The encoder stack over `ids`, in scope `encoder`.
fn encoder(t: &mut Tracer, c: Ctx<'_>, ids: &T, mask: &T) -> Result<T, TraceError> {
    let Ctx { w, f, d } = c;
    let zero = t.scalar_i64(0);
    let mut x = embed(t, c, ids, &zero)?;
    let m = padding_mask(t, mask)?;
    let s = d.encoder;
    let spec = AttentionSpec {
        q: "q_proj",
        k: "k_proj",
        v: "v_proj",
        hidden: d.hidden,
        heads: s.heads,
    };
    for i in 0..s.layers {
        x = scoped(t, &format!("layers.{i}"), |t| {
            let (x, ()) = residual(t, c, "self_attn_layer_norm", &x, |t, h| {
                // BERT's attention ops (shared with the encoders), so that the optimizer's
                // Attention fusion applies to the encoder as ONNX Runtime's BART fusion does.
                scoped(t, "self_attn", |t| {
                    let ctx = multi_head_attention(t, w, h, &m, None, &spec)?;
                    Ok((linear(t, w, "out_proj", &ctx, d.hidden, d.hidden)?, ()))
                })
            })?;
            ffn_block(t, c, &x, s.ffn)
        })?;
    }
    if f.final_norm {
        x = layer_norm(t, w, "layer_norm", &x, d.hidden, EPS)?;
    }
    Ok(x)
}

/// The decoder stack (scope `decoder`) and the LM head over the decoder `inputs`: logits
/// and each layer's cache.
fn decoder(
    t: &mut Tracer,
    c: Ctx<'_>,
    inputs: &DecoderInputs,
) -> Result<(T, Vec<LayerCache>), TraceError> {
    let Ctx { w, f, d } = c;
    let s = d.decoder;
    let dims = (d.hidden, s.heads);
    let past_len = inputs.past_length(t)?;
    let x = scoped(t, "decoder", |t| {
        let x = embed(t, c, &inputs.ids, &past_len)?;
        let causal = causal_mask(t, &inputs.ids, &past_len, inputs.key_dim())?;
        let cross = padding_mask(t, &inputs.encoder_mask)?;
        let mut x = x;
        let mut presents = Vec::new();
        for i in 0..s.layers as usize {
            let (nx, present) = scoped(t, &format!("layers.{i}"), |t| {
                let (x, self_kv) = residual(t, c, "self_attn_layer_norm", &x, |t, h| {
                    scoped(t, "self_attn", |t| {
                        let (k, v) = key_value(t, w, h, d.hidden, s.heads)?;
                        let (k, v) = append_self_cache(t, inputs.self_past(i), k, v);
                        let out = attention(t, w, h, (&k, &v), &causal, dims)?;
                        Ok((out, (k, v)))
                    })
                })?;
                let (x, cross_kv) = residual(t, c, "encoder_attn_layer_norm", &x, |t, h| {
                    scoped(t, "encoder_attn", |t| {
                        let (k, v) = inputs.cross_kv(t, i, |t, states| {
                            key_value(t, w, states, d.hidden, s.heads)
                        })?;
                        let out = attention(t, w, h, (&k, &v), &cross, dims)?;
                        Ok((out, (k, v)))
                    })
                })?;
                let x = ffn_block(t, c, &x, s.ffn)?;
                Ok((x, LayerCache { self_kv, cross_kv }))
            })?;
            x = nx;
            presents.push(present);
        }
        if f.final_norm {
            x = layer_norm(t, w, "layer_norm", &x, d.hidden, EPS)?;
        }
        Ok((x, presents))
    })?;
    let (x, presents) = x;
    let logits = lm_head(t, c, &x)?;
    Ok((logits, presents))
}

/// `lm_head` (the decoder's token table when tied) plus `final_logits_bias` when the
/// checkpoint has it (transformers' zero-initialised buffer otherwise, which adds nothing).
fn lm_head(t: &mut Tracer, c: Ctx<'_>, x: &T) -> Result<T, TraceError> {
    let Ctx { w, d, .. } = c;
    let logits = if d.tie {
        let table = scoped(t, "decoder", |t| token_table(t, c, "decoder"))?;
        scoped(t, "lm_head", |t| {
            let wt = t.transpose(&table, &[1, 0])?;
            t.matmul(x, &wt)
        })?
    } else {
        crate::layers::dense(
            t,
            w,
            "lm_head",
            x,
            (d.hidden, d.decoder_vocab),
            crate::layers::WeightLayout::OutIn,
            false,
        )?
    };
    if !w.contains("final_logits_bias") {
        return Ok(logits);
    }
    let bias = w.get(t, "final_logits_bias", &[1, d.decoder_vocab])?;
    t.add(&logits, &bias)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sinusoidal_table_puts_sin_then_cos() -> Result<(), TraceError> {
        let init = sinusoidal_table(3, 5, DType::F32)?;
        let v: Vec<f32> = init
            .data
            .bytes()
            .map_err(|e| TraceError::Shape(e.to_string()))?
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        // Position 0: sin(0) = 0 in the first ceil(5/2) = 3 features, cos(0) = 1 after.
        assert_eq!(&v[..5], &[0.0, 0.0, 0.0, 1.0, 1.0]);
        // Position 2, feature 1: sin(2 / 10000^(2/5)); feature 3: cos(2 / 10000^(0/5)).
        assert!((v[11] - (2.0f64 / 10000f64.powf(0.4)).sin() as f32).abs() < 1e-7);
        assert!((v[13] - 2.0f64.cos() as f32).abs() < 1e-7);
        Ok(())
    }
}
