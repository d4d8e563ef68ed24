//! BERT, as transformers' `modeling_bert.py` computes it.

use ferry_ir::ModelConfig;

use crate::config::{attention_width, encoder_dims};
use crate::embeddings::{EmbeddingSpec, Positions, TokenTypes, embeddings};
use crate::heads::{EncoderHeads, MlmHead, Pooler, TYPED_INPUTS};
use crate::layers::{EncoderDims, WeightSource, additive_mask, bert_encoder_stack};
use crate::{Request, T, TraceError, Tracer};

/// The BERT hyper-parameters ferry needs, validated.
#[derive(Debug, Clone)]
pub(crate) struct BertDims {
    /// `vocab_size`.
    pub vocab: i64,
    /// `num_hidden_layers`.
    pub layers: i64,
    /// `max_position_embeddings`.
    pub max_positions: i64,
    /// `type_vocab_size`.
    pub type_vocab: i64,
    /// The encoder layers' shapes.
    pub enc: EncoderDims,
}

impl BertDims {
    /// Reads and validates the BERT config fields.
    pub(crate) fn from_config(c: &ModelConfig) -> Result<Self, TraceError> {
        let width = attention_width(c)?;
        if let Some(p) = c.position_embedding_type.as_deref()
            && p != "absolute"
        {
            return Err(TraceError::Unsupported(format!(
                "position_embedding_type `{p}` (only `absolute`)"
            )));
        }
        Ok(Self {
            vocab: c.require(c.vocab_size, "vocab_size")?,
            layers: c.require(c.num_hidden_layers, "num_hidden_layers")?,
            max_positions: c.require(c.max_position_embeddings, "max_position_embeddings")?,
            type_vocab: c.type_vocab_size.unwrap_or(2),
            enc: encoder_dims(c, width, "gelu")?,
        })
    }
}

/// `BertPooler`: dense (one `Gemm`) + tanh over the first token.
const POOLER: Pooler = Pooler::Gemm(Some("dense"));

/// BERT's heads: the pooler for classification and multiple-choice, `BertOnlyMLMHead`
/// (`cls.predictions`: transform with `hidden_act`, decoder tied to the word embeddings).
fn heads(d: &BertDims) -> EncoderHeads {
    let mlm = MlmHead {
        transform: Some("transform"),
        ..MlmHead::new(
            &["cls", "predictions"],
            d.enc.act,
            &d.enc,
            d.enc.hidden,
            d.vocab,
        )
    };
    EncoderHeads::pooled(d.enc.hidden, POOLER, mlm)
}

/// The BERT encoder stack (`BertModel` without pooler) over `[batch, seq]` inputs.
fn encoder(
    t: &mut Tracer,
    w: &WeightSource<'_>,
    d: &BertDims,
    input_ids: &T,
    attention_mask: &T,
    token_type_ids: &T,
) -> Result<T, TraceError> {
    let spec = EmbeddingSpec {
        vocab: d.vocab,
        width: d.enc.hidden,
        max_positions: d.max_positions,
        eps: d.enc.eps,
        token_types: TokenTypes::Ids {
            ids: token_type_ids,
            vocab: d.type_vocab,
        },
        positions: Positions::Arange,
    };
    let x = embeddings(t, w, &spec, input_ids)?;
    let mask = additive_mask(t, attention_mask)?;
    bert_encoder_stack(t, w, &d.enc, d.layers, x, &mask)
}

/// Traces BERT with the head of `task` (optimum's task names).
pub(crate) fn build(t: &mut Tracer, r: &Request<'_>) -> Result<(), TraceError> {
    let d = BertDims::from_config(r.config)?;
    heads(&d).trace(t, r, "bert", TYPED_INPUTS, |t, w, [ids, mask, types]| {
        encoder(t, w, &d, ids, mask, types)
    })
}
