//! ELECTRA, as transformers' `modeling_electra.py` computes it.
//!
//! The encoder is BERT's; the embeddings are `embedding_size` wide and, when that differs
//! from `hidden_size`, followed by the `embeddings_project` linear. There is no pooler.
//! Heads: the generator's masked-LM head (dense to `embedding_size`, erf GELU, LayerNorm,
//! tied decoder), a two-layer classification head with GELU, and the sequence summary of
//! multiple-choice.

use ferry_ir::ModelConfig;

use crate::bert::BertDims;
use crate::config::reject_decoder;
use crate::embeddings::{EmbeddingSpec, Positions, TokenTypes, embeddings};
use crate::heads::{
    ChoiceHead, ClassificationHead, EncoderHeads, MlmHead, SequenceHead, SequenceSummary,
    TYPED_INPUTS,
};
use crate::layers::{
    Activation, HeadActivation, WeightSource, additive_mask, bert_encoder_stack, linear,
};
use crate::{Request, T, TraceError, Tracer};

/// ELECTRA's hyper-parameters: BERT's plus the embedding width.
struct ElectraDims {
    bert: BertDims,
    embedding: i64,
}

impl ElectraDims {
    fn from_config(c: &ModelConfig) -> Result<Self, TraceError> {
        let bert = BertDims::from_config(c)?;
        // ElectraConfig's default embedding_size is 128.
        let embedding = match c.raw.get("embedding_size") {
            None => 128,
            Some(v) => v.as_i64().filter(|e| *e > 0).ok_or_else(|| {
                TraceError::Unsupported(format!("embedding_size {v} (expected a positive int)"))
            })?,
        };
        Ok(Self { bert, embedding })
    }
}

/// `ElectraModel`: `ElectraEmbeddings` (word + token-type + absolute position, LayerNorm,
/// all `embedding_size` wide), `embeddings_project` when `embedding_size != hidden_size`,
/// then the BERT encoder (no pooler).
fn encoder(
    t: &mut Tracer,
    w: &WeightSource<'_>,
    d: &ElectraDims,
    ids: &T,
    attention_mask: &T,
    types: &T,
) -> Result<T, TraceError> {
    let (e, b) = (d.embedding, &d.bert);
    let spec = EmbeddingSpec {
        vocab: b.vocab,
        width: e,
        max_positions: b.max_positions,
        eps: b.enc.eps,
        token_types: TokenTypes::Ids {
            ids: types,
            vocab: b.type_vocab,
        },
        positions: Positions::Arange,
    };
    let mut x = embeddings(t, w, &spec, ids)?;
    if e != b.enc.hidden {
        x = linear(t, w, "embeddings_project", &x, e, b.enc.hidden)?;
    }
    let mask = additive_mask(t, attention_mask)?;
    bert_encoder_stack(t, w, &b.enc, b.layers, x, &mask)
}

/// ELECTRA's heads: `ElectraClassificationHead` (first token, dense, erf GELU, `out_proj`),
/// `summary` (`ElectraSequenceSummary`, multiple-choice only) and the generator's masked-LM
/// head (`generator_predictions`: dense to `embedding_size`, erf GELU, LayerNorm; then
/// `generator_lm_head`, the word embeddings unless untied, plus its bias).
fn heads(d: &ElectraDims, summary: Option<SequenceSummary>) -> EncoderHeads {
    let gelu = Activation::GeluErf;
    EncoderHeads {
        hidden: d.bert.enc.hidden,
        pooler: None,
        sequence: SequenceHead::FirstToken(ClassificationHead::classifier(HeadActivation::Act(
            gelu,
        ))),
        choice: summary.map(ChoiceHead::Summary),
        mlm: MlmHead {
            transform: Some("generator_predictions"),
            decoder: "generator_lm_head",
            embeddings_without_decoder: false,
            ..MlmHead::new(&[], gelu, &d.bert.enc, d.embedding, d.bert.vocab)
        },
    }
}

/// Traces ELECTRA with the head of `task`.
pub(crate) fn build(t: &mut Tracer, r: &Request<'_>) -> Result<(), TraceError> {
    reject_decoder(r.config)?;
    let d = ElectraDims::from_config(r.config)?;
    let summary = if r.task == "multiple-choice" {
        Some(SequenceSummary::from_config(r.config, d.bert.enc.hidden)?)
    } else {
        None
    };
    heads(&d, summary).trace(t, r, "electra", TYPED_INPUTS, |t, w, [ids, mask, types]| {
        encoder(t, w, &d, ids, mask, types)
    })
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::TraceOptions;

    #[test]
    fn projects_embeddings_when_narrower() -> Result<(), TraceError> {
        let dir =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../testdata/electra-tiny-fill-mask");
        let c = ferry_loader::load(&dir).expect("load test checkpoint");
        let opts = TraceOptions {
            task: "fill-mask".into(),
            ..Default::default()
        };
        let g = crate::trace(&c.config, &c.weights, &opts)?;
        let inputs: Vec<&str> = g.inputs.iter().map(|v| v.name.as_str()).collect();
        assert_eq!(inputs, ["input_ids", "attention_mask", "token_type_ids"]);
        assert!(
            g.nodes
                .iter()
                .any(|n| n.name == "/embeddings_project/MatMul")
        );
        let tied = g
            .initializers
            .iter()
            .filter(|i| i.name == "embeddings.word_embeddings.weight")
            .count();
        assert_eq!(tied, 1);
        assert!(
            !g.initializers
                .iter()
                .any(|i| i.name == "generator_lm_head.weight")
        );
        Ok(())
    }
}
