//! What every encoder-decoder (T5, mT5, BART, mBART, Marian) shares: the parts optimum
//! exports (`encoder_model`, `decoder_model`, `decoder_with_past_model`) with optimum's
//! input/output names, order and axis names, the decoder's self-attention cache and the
//! cross-attention cache (computed from `encoder_hidden_states` without a cache, read
//! from `past_key_values.{i}.encoder.*` with one), the causal and encoder masks, and the
//! attention core. Each architecture traces its layers with these pieces behind
//! [`trace_seq2seq`].

use ferry_ir::{DType, Dim, Graph, ModelConfig, Weights};

use crate::causal::element;
use crate::layers::{additive_mask, sym};
use crate::{Request, T, TraceError, TraceOptions, Tracer};

/// The `model_type`s traced as encoder-decoders.
pub(crate) const MODEL_TYPES: &[&str] = &["t5", "mt5", "bart", "mbart", "marian"];

/// The tasks of an encoder-decoder, by optimum's names.
pub(crate) const SEQ2SEQ_TASKS: &[&str] = &[
    "feature-extraction",
    "text2text-generation",
    "text2text-generation-with-past",
];

/// Axis of the encoder's (source) tokens.
pub(crate) const ENCODER_SEQ: &str = "encoder_sequence_length";
/// Axis of the decoder's new tokens.
pub(crate) const DECODER_SEQ: &str = "decoder_sequence_length";
/// Axis of the decoder's self-attention cache.
pub(crate) const PAST_DECODER: &str = "past_decoder_sequence_length";
/// Axis of the decoder's self-attention keys after the cache update.
pub(crate) const TOTAL_DECODER: &str = "past_decoder_sequence_length + decoder_sequence_length";

/// One of the graphs optimum exports for an encoder-decoder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seq2SeqPart {
    /// `encoder_model.onnx`: `input_ids`, `attention_mask` → `last_hidden_state`.
    Encoder,
    /// `decoder_model.onnx`: the first, uncached decoder call: `encoder_attention_mask`,
    /// `input_ids`, `encoder_hidden_states` → `logits`, `present.{i}.decoder.key/value`,
    /// `present.{i}.encoder.key/value`.
    Decoder,
    /// `decoder_with_past_model.onnx`: `encoder_attention_mask`, `input_ids`,
    /// `past_key_values.{i}.decoder.key/value`, `past_key_values.{i}.encoder.key/value` →
    /// `logits`, `present.{i}.decoder.key/value`.
    DecoderWithPast,
}

impl Seq2SeqPart {
    /// The file optimum writes this part to (`encoder_model.onnx`, …).
    pub fn file_name(self) -> &'static str {
        match self {
            Seq2SeqPart::Encoder => "encoder_model.onnx",
            Seq2SeqPart::Decoder => "decoder_model.onnx",
            Seq2SeqPart::DecoderWithPast => "decoder_with_past_model.onnx",
        }
    }

    /// The parts a (canonical or alias) task exports, in optimum's order: the encoder
    /// alone for `feature-extraction`, encoder + decoder for `text2text-generation`, and
    /// the decoder with its cache too for `text2text-generation-with-past`. `None` for
    /// other tasks.
    pub fn for_task(task: &str) -> Option<&'static [Seq2SeqPart]> {
        use Seq2SeqPart::*;
        match crate::canonical_task(task).as_str() {
            "feature-extraction" => Some(&[Encoder]),
            "text2text-generation" => Some(&[Encoder, Decoder]),
            "text2text-generation-with-past" => Some(&[Encoder, Decoder, DecoderWithPast]),
            _ => None,
        }
    }
}

/// Whether `model_type` is an encoder-decoder ferry exports as optimum's folder.
pub fn is_encoder_decoder(model_type: &str) -> bool {
    MODEL_TYPES.contains(&model_type)
}

/// Traces one part of an encoder-decoder behind [`trace_seq2seq`].
type PartFn = fn(&mut Tracer, &Request<'_>, Seq2SeqPart) -> Result<(), TraceError>;

/// The part tracer of an encoder-decoder `model_type`.
fn part_tracer(model_type: &str) -> Option<PartFn> {
    match model_type {
        "t5" | "mt5" => Some(crate::t5::trace_part),
        m if crate::bart::MODEL_TYPES.contains(&m) => Some(crate::bart::build),
        _ => None,
    }
}

/// Traces `part` of the encoder-decoder described by `config` over `weights` (borrowed:
/// initializers map the checkpoint's bytes). The shared embedding and a tied LM head keep
/// one initializer name wherever they are used. `opts.task` is not consulted: the part
/// says what to trace.
pub fn trace_seq2seq(
    config: &ModelConfig,
    weights: &Weights,
    opts: &TraceOptions,
    part: Seq2SeqPart,
) -> Result<Graph, TraceError> {
    if !is_encoder_decoder(&config.model_type) {
        return Err(TraceError::Unsupported(format!(
            "`{}` is not an encoder-decoder (encoder-decoders: {})",
            config.model_type,
            MODEL_TYPES.join(", ")
        )));
    }
    let Some(trace_part) = part_tracer(&config.model_type) else {
        return Err(TraceError::Unsupported(format!(
            "encoder-decoder `{}` is not traced yet",
            config.model_type
        )));
    };
    if opts.float_dtype != DType::F32 {
        return Err(TraceError::Unsupported(format!(
            "{} compute for encoder-decoder `{}` (they export in float32)",
            opts.float_dtype, config.model_type
        )));
    }
    let mut t = Tracer::new("main_graph", opts.opset);
    let task = match part {
        Seq2SeqPart::Encoder => "feature-extraction",
        Seq2SeqPart::Decoder => "text2text-generation",
        Seq2SeqPart::DecoderWithPast => "text2text-generation-with-past",
    };
    let request = Request {
        config,
        weights,
        opts,
        task,
    };
    trace_part(&mut t, &request, part)?;
    Ok(crate::fix_dims(t.finish(), &opts.fixed_dims))
}

/// The registry's build function: `feature-extraction` is the encoder graph (one file);
/// the generation tasks export several graphs through [`trace_seq2seq`].
pub(crate) fn build(t: &mut Tracer, r: &Request<'_>) -> Result<(), TraceError> {
    if r.task != "feature-extraction" {
        return Err(TraceError::Unsupported(format!(
            "task `{}` of encoder-decoder `{}` exports several files (encoder_model.onnx, decoder_model.onnx, …); trace each with trace_seq2seq",
            r.task, r.config.model_type
        )));
    }
    let trace_part = part_tracer(&r.config.model_type).ok_or_else(|| {
        TraceError::Unsupported(format!(
            "encoder-decoder `{}` is not traced yet",
            r.config.model_type
        ))
    })?;
    trace_part(t, r, Seq2SeqPart::Encoder)
}

/// Sizes of the decoder's attention caches.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CacheDims {
    /// Decoder layers.
    pub layers: i64,
    /// Attention heads.
    pub heads: i64,
    /// Width of one head.
    pub head_dim: i64,
    /// Width of the encoder's states (`encoder_hidden_states`' last axis).
    pub hidden: i64,
}

/// The encoder's graph inputs: `input_ids` and `attention_mask`, both
/// `[batch_size, encoder_sequence_length]` int64.
pub(crate) struct EncoderInputs {
    /// `input_ids`.
    pub ids: T,
    /// `attention_mask`.
    pub attention_mask: T,
}

impl EncoderInputs {
    /// Declares the encoder's inputs.
    pub(crate) fn declare(t: &mut Tracer, opts: &TraceOptions) -> Self {
        let shape = vec![sym(&opts.batch_axis), sym(ENCODER_SEQ)];
        let ids = t.input("input_ids", DType::I64, shape.clone());
        let attention_mask = t.input("attention_mask", DType::I64, shape);
        Self {
            ids,
            attention_mask,
        }
    }
}

/// One decoder layer's cache: self-attention and cross-attention key/value, each
/// `[batch, heads, len, head_dim]`.
#[derive(Debug, Clone)]
pub(crate) struct LayerCache {
    /// Self-attention key and value (length: the decoder tokens so far).
    pub self_kv: (T, T),
    /// Cross-attention key and value (length: the encoder's tokens).
    pub cross_kv: (T, T),
}

/// The decoder's graph inputs for [`Seq2SeqPart::Decoder`] or
/// [`Seq2SeqPart::DecoderWithPast`], in optimum's order.
pub(crate) struct DecoderInputs {
    /// `encoder_attention_mask` `[batch, encoder_sequence_length]` int64.
    pub encoder_mask: T,
    /// `input_ids` `[batch, decoder_sequence_length]` int64.
    pub ids: T,
    /// `encoder_hidden_states` `[batch, encoder_sequence_length, hidden]` (uncached
    /// decoder only).
    pub encoder_states: Option<T>,
    /// `past_key_values.{i}.decoder/encoder.key/value` per layer (decoder with past only).
    pub past: Vec<LayerCache>,
}

impl DecoderInputs {
    /// Declares the inputs of the decoder `part` (not the encoder) with caches of `dims`.
    pub(crate) fn declare(
        t: &mut Tracer,
        opts: &TraceOptions,
        part: Seq2SeqPart,
        dims: CacheDims,
    ) -> Result<Self, TraceError> {
        let b = sym(&opts.batch_axis);
        let float = t.float_dtype();
        let encoder_mask = t.input(
            "encoder_attention_mask",
            DType::I64,
            vec![b.clone(), sym(ENCODER_SEQ)],
        );
        let ids = t.input("input_ids", DType::I64, vec![b.clone(), sym(DECODER_SEQ)]);
        let mut encoder_states = None;
        let mut past = Vec::new();
        match part {
            Seq2SeqPart::Encoder => {
                return Err(TraceError::Shape(
                    "decoder inputs asked for the encoder".into(),
                ));
            }
            Seq2SeqPart::Decoder => {
                encoder_states = Some(t.input(
                    "encoder_hidden_states",
                    float,
                    vec![b, sym(ENCODER_SEQ), Dim::Fixed(dims.hidden)],
                ));
            }
            Seq2SeqPart::DecoderWithPast => {
                let cache = |len: &str| {
                    vec![
                        b.clone(),
                        Dim::Fixed(dims.heads),
                        sym(len),
                        Dim::Fixed(dims.head_dim),
                    ]
                };
                for i in 0..dims.layers {
                    let p = format!("past_key_values.{i}");
                    let dk = t.input(&format!("{p}.decoder.key"), float, cache(PAST_DECODER));
                    let dv = t.input(&format!("{p}.decoder.value"), float, cache(PAST_DECODER));
                    let ek = t.input(&format!("{p}.encoder.key"), float, cache(ENCODER_SEQ));
                    let ev = t.input(&format!("{p}.encoder.value"), float, cache(ENCODER_SEQ));
                    past.push(LayerCache {
                        self_kv: (dk, dv),
                        cross_kv: (ek, ev),
                    });
                }
            }
        }
        Ok(Self {
            encoder_mask,
            ids,
            encoder_states,
            past,
        })
    }

    /// The self-attention cache length as a scalar int64 (0 without a cache).
    pub(crate) fn past_length(&self, t: &mut Tracer) -> Result<T, TraceError> {
        match self.past.first() {
            Some(c) => {
                let ks = t.shape_of(&c.self_kv.0);
                element(t, &ks, 2)
            }
            None => Ok(t.scalar_i64(0)),
        }
    }

    /// The self-attention key axis: the decoder's sequence without a cache, the cache
    /// plus it with one.
    pub(crate) fn key_dim(&self) -> Dim {
        if self.past.is_empty() {
            self.ids.shape[1].clone()
        } else {
            sym(TOTAL_DECODER)
        }
    }

    /// Layer `i`'s self-attention cache, if any.
    pub(crate) fn self_past(&self, i: usize) -> Option<(&T, &T)> {
        self.past.get(i).map(|c| (&c.self_kv.0, &c.self_kv.1))
    }

    /// Layer `i`'s cross-attention key and value `[batch, heads, enc, head_dim]`: the
    /// cached ones with a cache, else `project` applied to `encoder_hidden_states`.
    pub(crate) fn cross_kv(
        &self,
        t: &mut Tracer,
        i: usize,
        project: impl FnOnce(&mut Tracer, &T) -> Result<(T, T), TraceError>,
    ) -> Result<(T, T), TraceError> {
        if let Some(c) = self.past.get(i) {
            return Ok(c.cross_kv.clone());
        }
        let states = self.encoder_states.as_ref().ok_or_else(|| {
            TraceError::Shape("decoder has neither encoder_hidden_states nor a cache".into())
        })?;
        project(t, states)
    }
}

/// `[batch, len, heads * head_dim]` → `[batch, heads, len, head_dim]`.
pub(crate) fn split_heads(
    t: &mut Tracer,
    x: &T,
    heads: i64,
    head_dim: i64,
) -> Result<T, TraceError> {
    let r = t.reshape(x, &[0, 0, heads, head_dim])?;
    t.transpose(&r, &[0, 2, 1, 3])
}

/// Self-attention `(key, value)` appended to the layer's cache along the sequence axis
/// (the decoder-only models' cache update); returned unchanged without a cache. The
/// presents get optimum's axis name in [`decoder_outputs`].
pub(crate) fn append_self_cache(t: &mut Tracer, past: Option<(&T, &T)>, k: T, v: T) -> (T, T) {
    crate::causal::append_cache_as(t, past, k, v, TOTAL_DECODER)
}

/// The query positions `past + arange(len)` of `ids` (`[batch, len]`) as a `[len, 1]`
/// column and the key positions `arange(past + len)` `[keys]`, `keys` naming the key axis.
pub(crate) fn positions(
    t: &mut Tracer,
    ids: &T,
    past_len: &T,
    keys: Dim,
) -> Result<(T, T), TraceError> {
    let shape = t.shape_of(ids);
    let seq = element(t, &shape, 1)?;
    let total = t.add(past_len, &seq)?;
    let zero = t.scalar_i64(0);
    let one = t.scalar_i64(1);
    let range = |t: &mut Tracer, start: &T, dim: Dim| {
        t.op(
            "Range",
            &[start, &total, &one],
            vec![],
            DType::I64,
            vec![dim],
        )
    };
    let q = range(t, past_len, ids.shape[1].clone());
    let k = range(t, &zero, keys);
    Ok((t.unsqueeze(&q, &[1]), k))
}

/// The additive causal mask `[1, 1, dec, keys]` of the decoder's self-attention
/// (optimum's decoders take no decoder attention mask): 0 where key `j <= past + i`,
/// `finfo(dtype).min` elsewhere, in the compute dtype. `keys` names the key axis
/// ([`DecoderInputs::key_dim`]).
pub(crate) fn causal_mask(
    t: &mut Tracer,
    ids: &T,
    past_len: &T,
    keys: Dim,
) -> Result<T, TraceError> {
    let (q, k) = positions(t, ids, past_len, keys)?;
    let grid = vec![q.shape[0].clone(), k.shape[0].clone()];
    let later = t.op("Greater", &[&k, &q], vec![], DType::Bool, grid.clone());
    let zf = t.scalar(0.0);
    let min = t.float_min();
    let m = t.op("Where", &[&later, &min, &zf], vec![], t.float_dtype(), grid);
    Ok(t.unsqueeze(&m, &[0, 1]))
}

/// The additive encoder (padding) mask `[batch, 1, 1, enc]` of an encoder's
/// self-attention or a decoder's cross-attention: 0 where attended, `finfo(dtype).min`
/// at padding.
pub(crate) fn padding_mask(t: &mut Tracer, mask: &T) -> Result<T, TraceError> {
    additive_mask(t, mask)
}

/// The attention core over split heads: `softmax(q kᵀ · scale + bias + mask) v` with heads
/// merged back, `[batch, q_len, heads * head_dim]`. `q` is `[batch, heads, q_len, hd]`,
/// `k`/`v` `[batch, heads, k_len, hd]`; `scale` `None` means unscaled (T5); `bias` an
/// additive score bias (T5's relative positions).
pub(crate) fn attend(
    t: &mut Tracer,
    (q, k, v): (&T, &T, &T),
    scale: Option<f64>,
    bias: Option<&T>,
    mask: &T,
) -> Result<T, TraceError> {
    let inner = match (&q.shape[1], &q.shape[3]) {
        (Dim::Fixed(h), Dim::Fixed(d)) => h * d,
        _ => return Err(TraceError::Shape("attention heads must be static".into())),
    };
    let kt = t.transpose(k, &[0, 1, 3, 2])?;
    let mut scores = t.matmul(q, &kt)?;
    if let Some(s) = scale {
        let s = t.scalar(s as f32);
        scores = t.mul(&scores, &s)?;
    }
    if let Some(b) = bias {
        scores = t.add(&scores, b)?;
    }
    let scores = t.add(&scores, mask)?;
    let probs = t.softmax_last(&scores);
    let ctx = t.matmul(&probs, v)?;
    let ctx = t.transpose(&ctx, &[0, 2, 1, 3])?;
    t.reshape(&ctx, &[0, 0, inner])
}

/// Declares the decoder's outputs in optimum's order: `logits`, then per layer
/// `present.{i}.decoder.key/value` and, for the uncached decoder,
/// `present.{i}.encoder.key/value`.
pub(crate) fn decoder_outputs(
    t: &mut Tracer,
    part: Seq2SeqPart,
    logits: &T,
    presents: &[LayerCache],
) {
    t.output(logits, "logits");
    // Without a cache the first keys are named as the cached ones (optimum's presents).
    let total = |x: &T| {
        let mut x = x.clone();
        x.shape[2] = sym(TOTAL_DECODER);
        x
    };
    for (i, c) in presents.iter().enumerate() {
        t.output(&total(&c.self_kv.0), &format!("present.{i}.decoder.key"));
        t.output(&total(&c.self_kv.1), &format!("present.{i}.decoder.value"));
        if part == Seq2SeqPart::Decoder {
            t.output(&c.cross_kv.0, &format!("present.{i}.encoder.key"));
            t.output(&c.cross_kv.1, &format!("present.{i}.encoder.value"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_follow_the_task() {
        use Seq2SeqPart::*;
        assert_eq!(
            Seq2SeqPart::for_task("feature-extraction"),
            Some(&[Encoder][..])
        );
        assert_eq!(
            Seq2SeqPart::for_task("translation_en_to_fr"),
            Some(&[Encoder, Decoder, DecoderWithPast][..])
        );
        assert_eq!(
            Seq2SeqPart::for_task("text2text-generation"),
            Some(&[Encoder, Decoder][..])
        );
        assert_eq!(Seq2SeqPart::for_task("fill-mask"), None);
        assert!(is_encoder_decoder("mt5") && !is_encoder_decoder("bert"));
    }
}
