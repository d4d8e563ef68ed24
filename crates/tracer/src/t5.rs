//! T5 and mT5 (`modeling_t5.py` / `modeling_mt5.py`): the shared embedding, pre-norm blocks
//! with T5's RMS-style layer norm (no mean, no bias, variance in float32), unscaled
//! attention with a relative position bias computed in the first layer of each stack and
//! shared by the others (bidirectional buckets in the encoder, causal in the decoder, the
//! decoder's query positions starting at the cache length), the ReLU (v1.0) or gated-GELU
//! (v1.1, Flan, mT5) feed-forward as `feed_forward_proj` says, and the LM head with its
//! `d_model ** -0.5` rescale when the config asks for it.

use ferry_ir::{DType, ModelConfig};

use crate::decoder::{linear, rms_norm};
use crate::layers::{Activation, WeightSource, scoped};
use crate::seq2seq::{
    CacheDims, DecoderInputs, EncoderInputs, LayerCache, Seq2SeqPart, append_self_cache, attend,
    causal_mask, decoder_outputs, padding_mask, positions, split_heads,
};
use crate::{Request, T, TraceError, Tracer};

/// A T5 config's shapes and switches.
#[derive(Debug, Clone)]
struct T5Dims {
    vocab: i64,
    d_model: i64,
    d_kv: i64,
    heads: i64,
    d_ff: i64,
    encoder_layers: i64,
    decoder_layers: i64,
    buckets: i64,
    max_distance: i64,
    eps: f64,
    gated: bool,
    act: Activation,
    /// Multiply the decoder's output by `d_model ** -0.5` before the LM head.
    scale_output: bool,
}

fn int(c: &ModelConfig, key: &str) -> Option<i64> {
    c.raw.get(key).and_then(serde_json::Value::as_i64)
}

fn required(c: &ModelConfig, key: &'static str) -> Result<i64, TraceError> {
    Ok(c.require(int(c, key), key)?)
}

/// `feed_forward_proj` as T5Config reads it: `ACT` or `gated-ACT`; `gated-gelu` means the
/// tanh approximation (`gelu_new`). Returns (gated, activation).
fn feed_forward(proj: &str) -> Result<(bool, Activation), TraceError> {
    let parts: Vec<&str> = proj.split('-').collect();
    let bad = || {
        TraceError::Unsupported(format!(
            "feed_forward_proj `{proj}` (expected `ACT` or `gated-ACT`, e.g. `relu` or `gated-gelu`)"
        ))
    };
    let (gated, act) = match parts.as_slice() {
        [act] => (false, *act),
        ["gated", act] => (true, *act),
        _ => return Err(bad()),
    };
    let act = if proj == "gated-gelu" {
        "gelu_new"
    } else {
        act
    };
    let act = Activation::parse(act).map_err(|_| bad())?;
    Ok((gated, act))
}

impl T5Dims {
    fn from_config(c: &ModelConfig) -> Result<Self, TraceError> {
        let proj = c
            .raw
            .get("feed_forward_proj")
            .and_then(serde_json::Value::as_str)
            .unwrap_or("relu");
        let (gated, act) = feed_forward(proj)?;
        let encoder_layers = required(c, "num_layers")?;
        // T5: transformers ≥ 5 saves `scale_decoder_outputs`; older configs say it through
        // `tie_word_embeddings` (false for v1.1, which does not rescale). mT5 never
        // rescales (its official configs are untied; transformers ≥ 5 drops the switch).
        let scale_output = c.model_type == "t5"
            && c.raw
                .get("scale_decoder_outputs")
                .and_then(serde_json::Value::as_bool)
                .unwrap_or_else(|| crate::config::flag(c, "tie_word_embeddings", true));
        Ok(Self {
            vocab: c.require(c.vocab_size, "vocab_size")?,
            d_model: required(c, "d_model")?,
            d_kv: required(c, "d_kv")?,
            heads: required(c, "num_heads")?,
            d_ff: required(c, "d_ff")?,
            encoder_layers,
            decoder_layers: int(c, "num_decoder_layers").unwrap_or(encoder_layers),
            buckets: int(c, "relative_attention_num_buckets").unwrap_or(32),
            max_distance: int(c, "relative_attention_max_distance").unwrap_or(128),
            eps: c
                .raw
                .get("layer_norm_epsilon")
                .and_then(serde_json::Value::as_f64)
                .unwrap_or(1e-6),
            gated,
            act,
            scale_output,
        })
    }

    fn inner(&self) -> i64 {
        self.heads * self.d_kv
    }
}

/// The shared embedding table (`shared.weight`; a checkpoint that stores only the stacks'
/// tied copies is read from `encoder.embed_tokens.weight` / `decoder.embed_tokens.weight`),
/// under one initializer name wherever it is used.
fn shared_embedding(t: &mut Tracer, w: &WeightSource<'_>, d: &T5Dims) -> Result<T, TraceError> {
    let shape = [d.vocab, d.d_model];
    let name = [
        "shared.weight",
        "encoder.embed_tokens.weight",
        "decoder.embed_tokens.weight",
    ]
    .into_iter()
    .find(|n| w.contains(n))
    .unwrap_or("shared.weight");
    w.get(t, name, &shape)
}

/// The relative position bias `[1, heads, q, k]` of a stack's first self-attention
/// (`compute_bias`) for query positions `q` (`[q, 1]`, from the cache length on) and key
/// positions `k` (`[k]`, see [`positions`]): each pair's bucket
/// (`_relative_position_bucket`) looked up in `relative_attention_bias`.
fn position_bias(
    t: &mut Tracer,
    w: &WeightSource<'_>,
    d: &T5Dims,
    (q, k): (&T, &T),
    bidirectional: bool,
) -> Result<T, TraceError> {
    let path = format!("{}.relative_attention_bias.weight", t.module_path());
    let table = w.get(t, &path, &[d.buckets, d.heads])?;
    let zero = t.scalar_i64(0);
    let rel = t.sub(k, q)?;
    let grid = rel.shape.clone();
    let (mut buckets, mut base, rel) = if bidirectional {
        let half = d.buckets / 2;
        let pos = t.op("Greater", &[&rel, &zero], vec![], DType::Bool, grid.clone());
        let pos = t.cast(&pos, DType::I64, 7);
        let h = t.scalar_i64(half);
        let base = t.mul(&pos, &h)?;
        (half, Some(base), t.unary("Abs", &rel))
    } else {
        let m = t.op("Min", &[&rel, &zero], vec![], DType::I64, grid.clone());
        (d.buckets, None, t.unary("Neg", &m))
    };
    let max_exact = buckets / 2;
    let me = t.scalar_i64(max_exact);
    let small = t.op("Less", &[&rel, &me], vec![], DType::Bool, grid.clone());
    // Float32 arithmetic as torch does it: log(rel / max_exact) / log(max_distance /
    // max_exact) * (buckets - max_exact), truncated to an integer.
    let relf = t.cast(&rel, DType::F32, 1);
    let mef = t.scalar_f32(max_exact as f32);
    let ratio = t.div(&relf, &mef)?;
    let log = t.unary("Log", &ratio);
    let denom = t.scalar_f32((d.max_distance as f64 / max_exact as f64).ln() as f32);
    let scaled = t.div(&log, &denom)?;
    let span = t.scalar_f32((buckets - max_exact) as f32);
    let scaled = t.mul(&scaled, &span)?;
    let large = t.cast(&scaled, DType::I64, 7);
    let large = t.add(&me, &large)?;
    buckets -= 1;
    let last = t.scalar_i64(buckets);
    let large = t.op("Min", &[&large, &last], vec![], DType::I64, grid.clone());
    let mut bucket = t.op("Where", &[&small, &rel, &large], vec![], DType::I64, grid);
    if let Some(b) = base.take() {
        bucket = t.add(&b, &bucket)?;
    }
    let values = t.gather(&table, &bucket, 0)?;
    let values = t.transpose(&values, &[2, 0, 1])?;
    Ok(t.unsqueeze(&values, &[0]))
}

/// `T5LayerFF`: pre-norm feed-forward with its residual.
fn feed_forward_layer(
    t: &mut Tracer,
    w: &WeightSource<'_>,
    d: &T5Dims,
    x: &T,
) -> Result<T, TraceError> {
    let n = rms_norm(t, w, "layer_norm", x, (d.d_model, d.eps), false)?;
    let h = scoped(t, "DenseReluDense", |t| {
        let h = if d.gated {
            let g = linear(t, w, "wi_0", &n, (d.d_model, d.d_ff), false)?;
            let g = d.act.apply(t, &g)?;
            let l = linear(t, w, "wi_1", &n, (d.d_model, d.d_ff), false)?;
            t.mul(&g, &l)?
        } else {
            let h = linear(t, w, "wi", &n, (d.d_model, d.d_ff), false)?;
            d.act.apply(t, &h)?
        };
        linear(t, w, "wo", &h, (d.d_ff, d.d_model), false)
    })?;
    t.add(x, &h)
}

/// The query (of `x`), key and value projections of a `T5Attention` at the current scope,
/// split into heads.
fn project(
    t: &mut Tracer,
    w: &WeightSource<'_>,
    d: &T5Dims,
    name: &str,
    x: &T,
) -> Result<T, TraceError> {
    let p = linear(t, w, name, x, (d.d_model, d.inner()), false)?;
    split_heads(t, &p, d.heads, d.d_kv)
}

/// The encoder stack over `input_ids`: `last_hidden_state`.
fn encoder(
    t: &mut Tracer,
    r: &Request<'_>,
    w: &WeightSource<'_>,
    d: &T5Dims,
) -> Result<(), TraceError> {
    let inputs = EncoderInputs::declare(t, r.opts);
    let embed = shared_embedding(t, w, d)?;
    let mut x = t.gather(&embed, &inputs.ids, 0)?;
    let mask = padding_mask(t, &inputs.attention_mask)?;
    let zero = t.scalar_i64(0);
    let (q_pos, k_pos) = positions(t, &inputs.ids, &zero, inputs.ids.shape[1].clone())?;
    let mut bias: Option<T> = None;
    t.push("encoder");
    let r = (|| {
        for i in 0..d.encoder_layers {
            x = scoped(t, &format!("block.{i}"), |t| {
                let a = scoped(t, "layer.0", |t| {
                    let n = rms_norm(t, w, "layer_norm", &x, (d.d_model, d.eps), false)?;
                    let o = scoped(t, "SelfAttention", |t| {
                        if bias.is_none() {
                            bias = Some(position_bias(t, w, d, (&q_pos, &k_pos), true)?);
                        }
                        let q = project(t, w, d, "q", &n)?;
                        let k = project(t, w, d, "k", &n)?;
                        let v = project(t, w, d, "v", &n)?;
                        let ctx = attend(t, (&q, &k, &v), None, bias.as_ref(), &mask)?;
                        linear(t, w, "o", &ctx, (d.inner(), d.d_model), false)
                    })?;
                    t.add(&x, &o)
                })?;
                scoped(t, "layer.1", |t| feed_forward_layer(t, w, d, &a))
            })?;
        }
        rms_norm(t, w, "final_layer_norm", &x, (d.d_model, d.eps), false)
    })();
    t.pop();
    let x = r?;
    t.output(&x, "last_hidden_state");
    Ok(())
}

/// The decoder stack and LM head for `part` (with or without the cache).
fn decoder(
    t: &mut Tracer,
    r: &Request<'_>,
    w: &WeightSource<'_>,
    d: &T5Dims,
    part: Seq2SeqPart,
) -> Result<(), TraceError> {
    let first = "decoder.block.0.layer.0.SelfAttention.q.weight";
    if !w.contains(first) {
        return Err(TraceError::NoDecoderWeights {
            model_type: r.config.model_type.clone(),
            missing: first.into(),
        });
    }
    let dims = CacheDims {
        layers: d.decoder_layers,
        heads: d.heads,
        head_dim: d.d_kv,
        hidden: d.d_model,
    };
    let inputs = DecoderInputs::declare(t, r.opts, part, dims)?;
    let embed = shared_embedding(t, w, d)?;
    let mut x = t.gather(&embed, &inputs.ids, 0)?;
    let past = inputs.past_length(t)?;
    let causal = causal_mask(t, &inputs.ids, &past, inputs.key_dim())?;
    let cross_mask = padding_mask(t, &inputs.encoder_mask)?;
    let (q_pos, k_pos) = positions(t, &inputs.ids, &past, causal.shape[3].clone())?;
    let mut bias: Option<T> = None;
    let mut presents = Vec::new();
    t.push("decoder");
    let r = (|| {
        for i in 0..d.decoder_layers as usize {
            x = scoped(t, &format!("block.{i}"), |t| {
                let (a, self_kv) = scoped(t, "layer.0", |t| {
                    let n = rms_norm(t, w, "layer_norm", &x, (d.d_model, d.eps), false)?;
                    let (o, kv) = scoped(t, "SelfAttention", |t| {
                        if bias.is_none() {
                            bias = Some(position_bias(t, w, d, (&q_pos, &k_pos), false)?);
                        }
                        let q = project(t, w, d, "q", &n)?;
                        let k = project(t, w, d, "k", &n)?;
                        let v = project(t, w, d, "v", &n)?;
                        let (k, v) = append_self_cache(t, inputs.self_past(i), k, v);
                        let ctx = attend(t, (&q, &k, &v), None, bias.as_ref(), &causal)?;
                        let o = linear(t, w, "o", &ctx, (d.inner(), d.d_model), false)?;
                        Ok((o, (k, v)))
                    })?;
                    Ok((t.add(&x, &o)?, kv))
                })?;
                let (c, cross_kv) = scoped(t, "layer.1", |t| {
                    let n = rms_norm(t, w, "layer_norm", &a, (d.d_model, d.eps), false)?;
                    let (o, kv) = scoped(t, "EncDecAttention", |t| {
                        let q = project(t, w, d, "q", &n)?;
                        let (k, v) = inputs.cross_kv(t, i, |t, states| {
                            Ok((
                                project(t, w, d, "k", states)?,
                                project(t, w, d, "v", states)?,
                            ))
                        })?;
                        let ctx = attend(t, (&q, &k, &v), None, None, &cross_mask)?;
                        let o = linear(t, w, "o", &ctx, (d.inner(), d.d_model), false)?;
                        Ok((o, (k, v)))
                    })?;
                    Ok((t.add(&a, &o)?, kv))
                })?;
                presents.push(LayerCache { self_kv, cross_kv });
                scoped(t, "layer.2", |t| feed_forward_layer(t, w, d, &c))
            })?;
        }
        rms_norm(t, w, "final_layer_norm", &x, (d.d_model, d.eps), false)
    })();
    t.pop();
    let mut x = r?;
    if d.scale_output {
        let s = t.scalar((d.d_model as f64).powf(-0.5) as f32);
        x = t.mul(&x, &s)?;
    }
    // transformers ties the LM head to the shared embedding unless the checkpoint stores
    // its own `lm_head.weight`.
    let logits = if w.contains("lm_head.weight") {
        linear(t, w, "lm_head", &x, (d.d_model, d.vocab), false)?
    } else {
        scoped(t, "lm_head", |t| {
            let wt = t.transpose(&embed, &[1, 0])?;
            t.matmul(&x, &wt)
        })?
    };
    decoder_outputs(t, part, &logits, &presents);
    Ok(())
}

/// Traces `part` of a T5 / mT5 checkpoint.
pub(crate) fn trace_part(
    t: &mut Tracer,
    r: &Request<'_>,
    part: Seq2SeqPart,
) -> Result<(), TraceError> {
    let d = T5Dims::from_config(r.config)?;
    let w = WeightSource::new(r.weights, "transformer");
    match part {
        Seq2SeqPart::Encoder => encoder(t, r, &w, &d),
        Seq2SeqPart::Decoder | Seq2SeqPart::DecoderWithPast => decoder(t, r, &w, &d, part),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn feed_forward_proj_is_parsed_like_t5config() {
        assert_eq!(feed_forward("relu").ok(), Some((false, Activation::Relu)));
        assert_eq!(
            feed_forward("gated-gelu").ok(),
            Some((true, Activation::GeluTanh))
        );
        assert_eq!(
            feed_forward("gated-silu").ok(),
            Some((true, Activation::Silu))
        );
        assert_eq!(
            feed_forward("gelu").ok(),
            Some((false, Activation::GeluErf))
        );
        for bad in ["gated-fancy", "double-gated-gelu", "fancy-gelu", "swiglu"] {
            let e = feed_forward(bad)
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(e.contains("feed_forward_proj"), "{bad}: {e}");
        }
    }
}
