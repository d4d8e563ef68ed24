//! DistilBERT, as transformers' `modeling_distilbert.py` computes it.
//!
//! Differences from BERT: no token types, no pooler; config fields `dim`, `n_heads`,
//! `n_layers`, `hidden_dim`, `activation`; every LayerNorm has `eps = 1e-12` whatever the
//! config says; attention lives in `attention.{q,k,v,out}_lin`, the feed-forward block in
//! `ffn.lin{1,2}`, with post-LayerNorms `sa_layer_norm` / `output_layer_norm`. The position
//! table is a checkpoint weight even with `sinusoidal_pos_embds` (transformers loads it as
//! stored), so it is used as is.

use ferry_ir::ModelConfig;

use crate::embeddings::{EmbeddingSpec, Positions, TokenTypes, embeddings};
use crate::heads::{ChoiceHead, ClassificationHead, EncoderHeads, INPUTS, MlmHead, SequenceHead};
use crate::layers::{
    Activation, AttentionSpec, EncoderDims, HeadActivation, WeightSource, add_norm, additive_mask,
    layer_stack, linear, multi_head_attention, scoped,
};
use crate::{Request, T, TraceError, Tracer};

/// DistilBERT's LayerNorm epsilon: hard-coded in every `nn.LayerNorm` of the model.
const EPS: f64 = 1e-12;

/// The DistilBERT hyper-parameters ferry needs, validated.
#[derive(Debug, Clone)]
struct DistilBertDims {
    vocab: i64,
    layers: i64,
    max_positions: i64,
    /// `dim`, `n_heads`, `hidden_dim`, `activation` and [`EPS`].
    enc: EncoderDims,
}

/// A positive integer from `config.json`: DistilBERT's own name first, then the generic
/// alias transformers maps it to (`hidden_size` → `dim`, …).
fn raw_int(c: &ModelConfig, name: &'static str, alias: Option<i64>) -> Result<i64, TraceError> {
    let v = match c.raw.get(name) {
        Some(v) => Some(v.as_i64().ok_or_else(|| {
            TraceError::Config(ferry_ir::ConfigError::Invalid(format!(
                "`{name}` must be an integer, got {v}"
            )))
        })?),
        None => alias,
    };
    Ok(c.require(v, name)?)
}

impl DistilBertDims {
    fn from_config(c: &ModelConfig) -> Result<Self, TraceError> {
        let dim = raw_int(c, "dim", c.hidden_size)?;
        let heads = raw_int(c, "n_heads", c.num_attention_heads)?;
        if dim % heads != 0 {
            return Err(TraceError::Unsupported(format!(
                "dim {dim} is not a multiple of n_heads {heads}"
            )));
        }
        let act = match c.raw.get("activation") {
            None => "gelu",
            Some(v) => v.as_str().ok_or_else(|| {
                TraceError::Config(ferry_ir::ConfigError::Invalid(format!(
                    "`activation` must be a string, got {v}"
                )))
            })?,
        };
        let vocab = c.require(c.vocab_size, "vocab_size")?;
        let layers = raw_int(c, "n_layers", c.num_hidden_layers)?;
        let intermediate = raw_int(c, "hidden_dim", c.intermediate_size)?;
        let max_positions = c.require(c.max_position_embeddings, "max_position_embeddings")?;
        Ok(Self {
            vocab,
            layers,
            max_positions,
            enc: EncoderDims {
                hidden: dim,
                heads,
                intermediate,
                eps: EPS,
                act: Activation::parse(act)?,
            },
        })
    }
}

/// One `TransformerBlock`: self-attention + `sa_layer_norm`, FFN + `output_layer_norm`
/// (both post-LayerNorm with residual).
fn block(
    t: &mut Tracer,
    w: &WeightSource<'_>,
    d: &EncoderDims,
    x: &T,
    mask: &T,
) -> Result<T, TraceError> {
    let spec = AttentionSpec::new(["q_lin", "k_lin", "v_lin"], d);
    let attn = scoped(t, "attention", |t| {
        let ctx = multi_head_attention(t, w, x, mask, None, &spec)?;
        linear(t, w, "out_lin", &ctx, d.hidden, d.hidden)
    })?;
    let a = add_norm(t, w, "sa_layer_norm", &attn, x, d)?;
    let f = scoped(t, "ffn", |t| {
        let h = linear(t, w, "lin1", &a, d.hidden, d.intermediate)?;
        let h = d.act.apply(t, &h)?;
        linear(t, w, "lin2", &h, d.intermediate, d.hidden)
    })?;
    add_norm(t, w, "output_layer_norm", &f, &a, d)
}

/// `DistilBertModel` over `[batch, seq]` inputs: `Embeddings` (word + absolute-position
/// embeddings, `position_ids = arange(seq)`, then LayerNorm), then the blocks; the
/// `last_hidden_state`.
fn encoder(
    t: &mut Tracer,
    w: &WeightSource<'_>,
    d: &DistilBertDims,
    input_ids: &T,
    attention_mask: &T,
) -> Result<T, TraceError> {
    let spec = EmbeddingSpec {
        vocab: d.vocab,
        width: d.enc.hidden,
        max_positions: d.max_positions,
        eps: EPS,
        token_types: TokenTypes::Absent,
        positions: Positions::Arange,
    };
    let x = embeddings(t, w, &spec, input_ids)?;
    let mask = additive_mask(t, attention_mask)?;
    scoped(t, "transformer", |t| {
        layer_stack(t, d.layers, x, |t, x| block(t, w, &d.enc, x, &mask))
    })
}

/// The sequence-classification / multiple-choice head: first token, `pre_classifier`,
/// ReLU, `classifier`.
const FIRST_TOKEN_HEAD: ClassificationHead = ClassificationHead {
    scope: None,
    dense: "pre_classifier",
    act: HeadActivation::Act(Activation::Relu),
    out: "classifier",
};

/// DistilBERT's heads: no pooler; the first-token head; the MLM head (`vocab_transform`,
/// activation, `vocab_layer_norm`, then `vocab_projector`, whose weight is the
/// word-embedding matrix unless the config unties it and the checkpoint has its own).
fn heads(d: &DistilBertDims) -> EncoderHeads {
    EncoderHeads {
        hidden: d.enc.hidden,
        pooler: None,
        sequence: SequenceHead::FirstToken(FIRST_TOKEN_HEAD),
        choice: Some(ChoiceHead::FirstToken(FIRST_TOKEN_HEAD)),
        mlm: MlmHead {
            dense: "vocab_transform",
            norm: "vocab_layer_norm",
            decoder: "vocab_projector",
            ..MlmHead::new(&[], d.enc.act, &d.enc, d.enc.hidden, d.vocab)
        },
    }
}

/// Traces DistilBERT with the head of `task` (optimum's task names).
pub(crate) fn build(t: &mut Tracer, r: &Request<'_>) -> Result<(), TraceError> {
    let d = DistilBertDims::from_config(r.config)?;
    heads(&d).trace(t, r, "distilbert", INPUTS, |t, w, [ids, mask]| {
        encoder(t, w, &d, ids, mask)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(json: &str) -> ModelConfig {
        ModelConfig::from_json(json).expect("valid test config")
    }

    #[test]
    fn reads_distilbert_field_names() -> Result<(), TraceError> {
        let c = config(
            r#"{"model_type":"distilbert","vocab_size":50,"dim":16,"n_heads":4,"n_layers":2,
                "hidden_dim":30,"max_position_embeddings":20,"activation":"relu"}"#,
        );
        let d = DistilBertDims::from_config(&c)?;
        assert_eq!(
            (
                d.enc.hidden,
                d.enc.heads,
                d.layers,
                d.enc.intermediate,
                d.enc.act
            ),
            (16, 4, 2, 30, Activation::Relu)
        );
        Ok(())
    }

    #[test]
    fn rejects_bad_configs() {
        let bad = [
            r#"{"model_type":"distilbert","vocab_size":50,"dim":18,"n_heads":4,"n_layers":2,"hidden_dim":30,"max_position_embeddings":20}"#,
            r#"{"model_type":"distilbert","vocab_size":50,"dim":16,"n_heads":4,"n_layers":2,"hidden_dim":30,"max_position_embeddings":20,"activation":"mish"}"#,
            r#"{"model_type":"distilbert","vocab_size":50,"dim":"16","n_heads":4,"n_layers":2,"hidden_dim":30,"max_position_embeddings":20}"#,
            r#"{"model_type":"distilbert","vocab_size":50,"dim":16,"n_heads":4,"hidden_dim":30,"max_position_embeddings":20}"#,
        ];
        for json in bad {
            assert!(
                DistilBertDims::from_config(&config(json)).is_err(),
                "{json}"
            );
        }
    }
}
