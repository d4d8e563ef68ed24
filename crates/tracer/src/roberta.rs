//! RoBERTa, as transformers' `modeling_roberta.py` computes it; XLM-RoBERTa and CamemBERT
//! (`modeling_xlm_roberta.py`, `modeling_camembert.py`) are copies of it with the same
//! weight names (base model prefix `roberta.` in all three).
//!
//! The encoder is BERT's; what differs is the embeddings (position ids counted from the
//! input ids past `pad_token_id`, token types always 0, no `token_type_ids` input) and the
//! heads (`lm_head` with a fixed erf GELU, a two-layer classification head).

use ferry_ir::ModelConfig;

use crate::bert::BertDims;
use crate::config::reject_decoder;
use crate::embeddings::{EmbeddingSpec, Positions, TokenTypes, embeddings};
use crate::heads::{ClassificationHead, EncoderHeads, INPUTS, MlmHead, Pooler, SequenceHead};
use crate::layers::{Activation, HeadActivation, WeightSource, additive_mask, bert_encoder_stack};
use crate::{Request, T, TraceError, Tracer};

/// A config's `pad_token_id` as RoBERTa's embeddings use it (`padding_idx`): `default` when
/// the key is absent, an error when it is `null` (transformers cannot number positions then).
pub(crate) fn padding_idx(c: &ModelConfig, default: i64) -> Result<i64, TraceError> {
    match c.raw.get("pad_token_id") {
        None => Ok(default),
        Some(v) => v.as_i64().filter(|p| *p >= 0).ok_or_else(|| {
            TraceError::Unsupported(format!(
                "pad_token_id {v} (RoBERTa numbers positions past a non-negative pad id)"
            ))
        }),
    }
}

/// `RobertaModel` without pooler: `RobertaEmbeddings` (word + token-type row 0, token
/// types being all zero, + position embeddings at ids counted past the padding, then
/// LayerNorm), then the encoder.
fn encoder(
    t: &mut Tracer,
    w: &WeightSource<'_>,
    d: &BertDims,
    pad: i64,
    ids: &T,
    attention_mask: &T,
) -> Result<T, TraceError> {
    let spec = EmbeddingSpec {
        vocab: d.vocab,
        width: d.enc.hidden,
        max_positions: d.max_positions,
        eps: d.enc.eps,
        token_types: TokenTypes::Zero {
            vocab: d.type_vocab,
        },
        positions: Positions::PastPadding(pad),
    };
    let x = embeddings(t, w, &spec, ids)?;
    let mask = additive_mask(t, attention_mask)?;
    bert_encoder_stack(t, w, &d.enc, d.layers, x, &mask)
}

/// `RobertaPooler`: dense (as `linear`) + tanh over the first token.
const POOLER: Pooler = Pooler::Linear("dense");

/// RoBERTa's heads: `RobertaClassificationHead` (first token, dense, tanh, `out_proj`), the
/// pooler for multiple-choice, and `RobertaLMHead` (dense, erf GELU whatever `hidden_act`
/// is, `layer_norm`, then the decoder: the word-embedding matrix and `lm_head.bias` unless
/// the config unties them).
fn heads(d: &BertDims) -> EncoderHeads {
    let h = d.enc.hidden;
    let mlm = MlmHead {
        norm: "layer_norm",
        embeddings_without_decoder: false,
        own_bias_when_untied: true,
        ..MlmHead::new(&["lm_head"], Activation::GeluErf, &d.enc, h, d.vocab)
    };
    EncoderHeads {
        sequence: SequenceHead::FirstToken(ClassificationHead::classifier(HeadActivation::Tanh)),
        ..EncoderHeads::pooled(h, POOLER, mlm)
    }
}

/// Traces RoBERTa / XLM-RoBERTa / CamemBERT with the head of `task`.
pub(crate) fn build(t: &mut Tracer, r: &Request<'_>) -> Result<(), TraceError> {
    reject_decoder(r.config)?;
    let d = BertDims::from_config(r.config)?;
    let pad = padding_idx(r.config, 1)?;
    heads(&d).trace(t, r, "roberta", INPUTS, |t, w, [ids, mask]| {
        encoder(t, w, &d, pad, ids, mask)
    })
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::TraceOptions;
    use ferry_ir::DType;

    fn load(case: &str) -> ferry_loader::Checkpoint {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../testdata")
            .join(case);
        ferry_loader::load(&dir).expect("load test checkpoint")
    }

    fn opts(task: &str) -> TraceOptions {
        TraceOptions {
            task: task.into(),
            ..Default::default()
        }
    }

    #[test]
    fn pad_token_id_defaults_to_one_and_rejects_null() -> Result<(), TraceError> {
        let c = |json: &str| ModelConfig::from_json(json).expect("valid test config");
        assert_eq!(padding_idx(&c(r#"{"model_type":"roberta"}"#), 1)?, 1);
        assert_eq!(
            padding_idx(&c(r#"{"model_type":"roberta","pad_token_id":3}"#), 1)?,
            3
        );
        assert!(padding_idx(&c(r#"{"model_type":"roberta","pad_token_id":null}"#), 1).is_err());
        assert!(reject_decoder(&c(r#"{"model_type":"roberta","is_decoder":true}"#)).is_err());
        Ok(())
    }

    #[test]
    fn roberta_graph_has_no_token_types_and_numbers_positions() -> Result<(), TraceError> {
        let c = load("roberta-tiny-token-classification");
        let g = crate::trace(&c.config, &c.weights, &opts("token-classification"))?;
        let inputs: Vec<&str> = g.inputs.iter().map(|v| v.name.as_str()).collect();
        assert_eq!(inputs, ["input_ids", "attention_mask"]);
        for op in ["Equal", "Not", "CumSum"] {
            assert!(
                g.nodes
                    .iter()
                    .any(|n| n.name == format!("/embeddings/{op}")),
                "{op} under /embeddings"
            );
        }
        // transformers' dtypes: the mask, its CumSum and their product int32, widened
        // to int64 after (tract cannot run an int64 CumSum of the ids' mask).
        let dtype = |node: &str| {
            let out = &g.nodes.iter().find(|n| n.name == node).expect(node).outputs[0];
            g.value_info
                .iter()
                .find(|v| &v.name == out)
                .map(|v| v.dtype)
        };
        assert_eq!(dtype("/embeddings/CumSum"), Some(DType::I32));
        let mul = g
            .nodes
            .iter()
            .find(|n| n.op_type == "Mul" && n.name.starts_with("/embeddings/"))
            .expect("position Mul");
        assert_eq!(dtype(&mul.name), Some(DType::I32));
        let widen = g
            .nodes
            .iter()
            .find(|n| n.inputs.first() == mul.outputs.first())
            .expect("position ids widened");
        assert_eq!(widen.op_type, "Cast");
        assert_eq!(dtype(&widen.name), Some(DType::I64));
        Ok(())
    }

    #[test]
    fn fill_mask_ties_the_decoder() -> Result<(), TraceError> {
        for case in ["roberta-tiny-fill-mask", "camembert-tiny-fill-mask"] {
            let c = load(case);
            let g = crate::trace(&c.config, &c.weights, &opts("fill-mask"))?;
            let n = g
                .initializers
                .iter()
                .filter(|i| i.name == "embeddings.word_embeddings.weight")
                .count();
            assert_eq!(n, 1, "{case}: word embeddings stored once");
            assert!(
                g.nodes
                    .iter()
                    .any(|n| n.name == "/lm_head/decoder/MatMul" && n.inputs.len() == 2)
            );
        }
        Ok(())
    }
}
