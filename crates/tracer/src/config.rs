//! Reading the `config.json` values several architectures share: encoder widths, boolean
//! flags, the number of labels, embedding tying, decoder-config rejection.

use ferry_ir::ModelConfig;

use crate::TraceError;
use crate::layers::{Activation, EncoderDims};

/// A boolean from `config.raw`, or `default` when absent (or not a boolean).
pub(crate) fn flag(c: &ModelConfig, key: &str, default: bool) -> bool {
    c.raw
        .get(key)
        .and_then(serde_json::Value::as_bool)
        .unwrap_or(default)
}

/// Number of labels of a classification head.
pub(crate) fn num_labels(c: &ModelConfig) -> i64 {
    if !c.id2label.is_empty() {
        return c.id2label.len() as i64;
    }
    c.raw
        .get("num_labels")
        .and_then(serde_json::Value::as_i64)
        .unwrap_or(2)
}

/// Whether the fill-mask decoder shares the word-embedding matrix (`tie_word_embeddings`,
/// true unless the config says otherwise).
pub(crate) fn ties_word_embeddings(c: &ModelConfig) -> bool {
    flag(c, "tie_word_embeddings", true)
}

/// Rejects decoder configs: their causal self-attention is not exported.
pub(crate) fn reject_decoder(c: &ModelConfig) -> Result<(), TraceError> {
    if flag(c, "is_decoder", false) || flag(c, "add_cross_attention", false) {
        return Err(TraceError::Unsupported(
            "is_decoder / add_cross_attention (causal or cross attention; export the encoder config)"
                .into(),
        ));
    }
    Ok(())
}

/// `hidden_size` and `num_attention_heads`, checked to split into whole heads.
pub(crate) fn attention_width(c: &ModelConfig) -> Result<(i64, i64), TraceError> {
    let hidden = c.require(c.hidden_size, "hidden_size")?;
    let heads = c.require(c.num_attention_heads, "num_attention_heads")?;
    if hidden % heads != 0 {
        return Err(TraceError::Unsupported(format!(
            "hidden_size {hidden} is not a multiple of num_attention_heads {heads}"
        )));
    }
    Ok((hidden, heads))
}

/// The encoder-layer shapes of a BERT-style config (`intermediate_size`, `layer_norm_eps`
/// defaulting to 1e-12, `hidden_act` defaulting to `default_act`) around the widths from
/// [`attention_width`].
pub(crate) fn encoder_dims(
    c: &ModelConfig,
    (hidden, heads): (i64, i64),
    default_act: &str,
) -> Result<EncoderDims, TraceError> {
    Ok(EncoderDims {
        hidden,
        heads,
        intermediate: c.require(c.intermediate_size, "intermediate_size")?,
        eps: c.layer_norm_eps.unwrap_or(1e-12),
        act: Activation::parse(c.hidden_act.as_deref().unwrap_or(default_act))?,
    })
}

/// The entry of a per-`model_type` description table (`name` reads an entry's
/// `model_type`), or the unknown-architecture error.
pub(crate) fn family<'a, F>(
    families: &'a [F],
    model_type: &str,
    name: impl Fn(&F) -> &str,
) -> Result<&'a F, TraceError> {
    families
        .iter()
        .find(|f| name(f) == model_type)
        .ok_or_else(|| TraceError::UnknownArchitecture {
            model_type: model_type.to_string(),
        })
}
