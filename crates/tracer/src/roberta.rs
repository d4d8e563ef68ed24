//! RoBERTa, as transformers' `modeling_roberta.py` computes it; XLM-RoBERTa and CamemBERT
//! (`modeling_xlm_roberta.py`, `modeling_camembert.py`) are copies of it with the same
//! weight names (base model prefix `roberta.` in all three).
//!
//! The encoder is BERT's; what differs is the embeddings (position ids counted from the
//! input ids past `pad_token_id`, token types always 0, no `token_type_ids` input) and the
//! heads (`lm_head` with a fixed erf GELU, a two-layer classification head).

use ferry_ir::{DType, Dim, Graph, ModelConfig, Weights};

use crate::bert::{BertDims, num_labels};
use crate::layers::{
    Activation, EncoderDims, WeightSource, additive_mask, bert_attention, bert_ffn, layer_norm,
    linear, scoped, sym,
};
use crate::{T, TraceError, TraceOptions, Tracer};

/// Tasks RoBERTa, XLM-RoBERTa and CamemBERT export.
pub(crate) const ROBERTA_TASKS: &[&str] = &[
    "feature-extraction",
    "fill-mask",
    "text-classification",
    "token-classification",
    "question-answering",
    "multiple-choice",
];

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

/// Whether the config ties the output embeddings to the input ones (the default).
pub(crate) fn ties_word_embeddings(c: &ModelConfig) -> bool {
    c.raw
        .get("tie_word_embeddings")
        .and_then(serde_json::Value::as_bool)
        .unwrap_or(true)
}

/// Rejects decoder configs: their causal self-attention is not exported.
pub(crate) fn reject_decoder(c: &ModelConfig) -> Result<(), TraceError> {
    let flag = |k: &str| {
        c.raw
            .get(k)
            .and_then(serde_json::Value::as_bool)
            .unwrap_or(false)
    };
    if flag("is_decoder") || flag("add_cross_attention") {
        return Err(TraceError::Unsupported(
            "is_decoder / add_cross_attention (causal or cross attention; export the encoder config)"
                .into(),
        ));
    }
    Ok(())
}

/// `create_position_ids_from_input_ids`: `cumsum(ids != pad) * (ids != pad) + pad`, i.e.
/// non-padding tokens numbered from `pad + 1`, padding tokens at `pad`.
fn position_ids(t: &mut Tracer, ids: &T, pad: i64) -> Result<T, TraceError> {
    let p = t.scalar_i64(pad);
    let eq = t.op("Equal", &[ids, &p], vec![], DType::Bool, ids.shape.clone());
    let ne = t.op("Not", &[&eq], vec![], DType::Bool, ids.shape.clone());
    let mask = t.cast(&ne, DType::I64, 7);
    let axis = t.scalar_i64(1);
    let count = t.op(
        "CumSum",
        &[&mask, &axis],
        vec![],
        DType::I64,
        ids.shape.clone(),
    );
    let numbered = t.mul(&count, &mask)?;
    t.add(&numbered, &p)
}

/// `RobertaEmbeddings`: word + token-type (row 0: token types are all zero) + position
/// embeddings at ids counted past the padding, then LayerNorm.
fn embeddings(
    t: &mut Tracer,
    w: &WeightSource<'_>,
    d: &BertDims,
    pad: i64,
    ids: &T,
) -> Result<T, TraceError> {
    let h = d.enc.hidden;
    scoped(t, "embeddings", |t| {
        let word = w.get(t, "embeddings.word_embeddings.weight", &[d.vocab, h])?;
        let pos = w.get(
            t,
            "embeddings.position_embeddings.weight",
            &[d.max_positions, h],
        )?;
        let typ = w.get(
            t,
            "embeddings.token_type_embeddings.weight",
            &[d.type_vocab, h],
        )?;
        let we = t.gather(&word, ids, 0)?;
        let zero = t.scalar_i64(0);
        let te = t.gather(&typ, &zero, 0)?;
        let e = t.add(&we, &te)?;
        let pids = position_ids(t, ids, pad)?;
        let pe = t.gather(&pos, &pids, 0)?;
        let e = t.add(&e, &pe)?;
        layer_norm(t, w, "LayerNorm", &e, h, d.enc.eps)
    })
}

/// The BERT-style encoder stack (`encoder.layer.{i}`: post-LayerNorm attention + FFN) over
/// embeddings `x` with an additive mask; shared by the BERT-shaped encoders.
pub(crate) fn bert_encoder_stack(
    t: &mut Tracer,
    w: &WeightSource<'_>,
    enc: &EncoderDims,
    layers: i64,
    x: T,
    mask: &T,
) -> Result<T, TraceError> {
    scoped(t, "encoder", |t| {
        let mut x = x;
        for i in 0..layers {
            x = scoped(t, &format!("layer.{i}"), |t| {
                let a = bert_attention(t, w, &x, mask, enc)?;
                bert_ffn(t, w, &a, enc)
            })?;
        }
        Ok(x)
    })
}

/// The hidden state of the first token (`x[:, 0]`).
pub(crate) fn first_token(t: &mut Tracer, x: &T) -> Result<T, TraceError> {
    let zero = t.scalar_i64(0);
    t.gather(x, &zero, 1)
}

/// `RobertaModel` without pooler: embeddings, then the encoder.
fn encoder(
    t: &mut Tracer,
    w: &WeightSource<'_>,
    d: &BertDims,
    pad: i64,
    ids: &T,
    attention_mask: &T,
) -> Result<T, TraceError> {
    let x = embeddings(t, w, d, pad, ids)?;
    let mask = additive_mask(t, attention_mask)?;
    bert_encoder_stack(t, w, &d.enc, d.layers, x, &mask)
}

/// `RobertaPooler`: dense + tanh over the first token.
fn pooler(t: &mut Tracer, w: &WeightSource<'_>, h: i64, x: &T) -> Result<T, TraceError> {
    scoped(t, "pooler", |t| {
        let first = first_token(t, x)?;
        let dense = linear(t, w, "dense", &first, h, h)?;
        Ok(t.unary("Tanh", &dense))
    })
}

/// `RobertaLMHead`: dense, erf GELU (whatever `hidden_act` is), LayerNorm, then the decoder
/// (the word-embedding matrix and `lm_head.bias` unless the config unties them).
fn lm_head(
    t: &mut Tracer,
    w: &WeightSource<'_>,
    d: &BertDims,
    tied: bool,
    x: &T,
) -> Result<T, TraceError> {
    let h = d.enc.hidden;
    scoped(t, "lm_head", |t| {
        let y = linear(t, w, "dense", x, h, h)?;
        let y = Activation::GeluErf.apply(t, &y)?;
        let y = layer_norm(t, w, "layer_norm", &y, h, d.enc.eps)?;
        scoped(t, "decoder", |t| {
            let weight = if tied {
                w.get(t, "embeddings.word_embeddings.weight", &[d.vocab, h])?
            } else {
                w.get(t, "lm_head.decoder.weight", &[d.vocab, h])?
            };
            // Tied, `decoder.bias` is `lm_head.bias`; untied, the decoder has its own.
            let own = "lm_head.decoder.bias";
            let bias = if (!tied && w.contains(own)) || !w.contains("lm_head.bias") {
                w.get(t, own, &[d.vocab])?
            } else {
                w.get(t, "lm_head.bias", &[d.vocab])?
            };
            let wt = t.transpose(&weight, &[1, 0])?;
            let mm = t.matmul(&y, &wt)?;
            t.add(&mm, &bias)
        })
    })
}

/// `RobertaClassificationHead`: first token, dense, tanh, `out_proj`.
fn classification_head(
    t: &mut Tracer,
    w: &WeightSource<'_>,
    h: i64,
    labels: i64,
    x: &T,
) -> Result<T, TraceError> {
    scoped(t, "classifier", |t| {
        let first = first_token(t, x)?;
        let y = linear(t, w, "dense", &first, h, h)?;
        let y = t.unary("Tanh", &y);
        linear(t, w, "out_proj", &y, h, labels)
    })
}

/// Splits `[batch, seq, 2]` QA logits into `start_logits` and `end_logits` outputs.
pub(crate) fn qa_outputs(t: &mut Tracer, logits: &T) -> Result<(), TraceError> {
    let i0 = t.scalar_i64(0);
    let start = t.gather(logits, &i0, 2)?;
    let i1 = t.scalar_i64(1);
    let end = t.gather(logits, &i1, 2)?;
    t.output(&start, "start_logits");
    t.output(&end, "end_logits");
    Ok(())
}

/// Reshapes `[batch*choices, 1]` logits to `[batch, choices]` (the shape of `ids`' first two
/// axes) and marks them as the `logits` output.
pub(crate) fn choice_logits(t: &mut Tracer, logits: &T, ids: &T) {
    let (b, c) = (ids.shape[0].clone(), ids.shape[1].clone());
    let shape = t.shape_of(ids);
    let zero = t.ints(&[0]);
    let two = t.ints(&[2]);
    let bc = t.slice(&shape, &zero, &two, &zero, vec![Dim::Fixed(2)]);
    let logits = t.reshape_to(logits, &bc, vec![b, c]);
    t.output(&logits, "logits");
}

/// Traces RoBERTa / XLM-RoBERTa / CamemBERT with the head of `task`.
pub(crate) fn trace_roberta(
    config: &ModelConfig,
    weights: &Weights,
    opts: &TraceOptions,
    task: &str,
) -> Result<Graph, TraceError> {
    let mut t = Tracer::new("main_graph", opts.opset);
    build(&mut t, config, weights, opts, task)?;
    Ok(t.finish())
}

fn build(
    t: &mut Tracer,
    config: &ModelConfig,
    weights: &Weights,
    opts: &TraceOptions,
    task: &str,
) -> Result<(), TraceError> {
    reject_decoder(config)?;
    let d = BertDims::from_config(config)?;
    let pad = padding_idx(config, 1)?;
    let w = WeightSource::new(weights, "roberta");
    let h = d.enc.hidden;
    let (b, s) = (sym(&opts.batch_axis), sym(&opts.sequence_axis));

    if task == "multiple-choice" {
        let shape = vec![b, sym("num_choices"), s.clone()];
        let ids = t.input("input_ids", DType::I64, shape.clone());
        let mask = t.input("attention_mask", DType::I64, shape);
        let flat = vec![sym("batch_size*num_choices"), s];
        let fi = t.flatten(&ids, 2, flat.clone());
        let fm = t.flatten(&mask, 2, flat);
        let x = encoder(t, &w, &d, pad, &fi, &fm)?;
        let pooled = pooler(t, &w, h, &x)?;
        let logits = linear(t, &w, "classifier", &pooled, h, 1)?;
        choice_logits(t, &logits, &ids);
        return Ok(());
    }

    let bs = vec![b, s];
    let ids = t.input("input_ids", DType::I64, bs.clone());
    let mask = t.input("attention_mask", DType::I64, bs);
    let x = encoder(t, &w, &d, pad, &ids, &mask)?;
    match task {
        "feature-extraction" => {
            t.output(&x, "last_hidden_state");
            if w.contains("pooler.dense.weight") {
                let pooled = pooler(t, &w, h, &x)?;
                t.output(&pooled, "pooler_output");
            }
        }
        "fill-mask" => {
            let logits = lm_head(t, &w, &d, ties_word_embeddings(config), &x)?;
            t.output(&logits, "logits");
        }
        "text-classification" => {
            let logits = classification_head(t, &w, h, num_labels(config), &x)?;
            t.output(&logits, "logits");
        }
        "token-classification" => {
            let logits = linear(t, &w, "classifier", &x, h, num_labels(config))?;
            t.output(&logits, "logits");
        }
        "question-answering" => {
            let logits = linear(t, &w, "qa_outputs", &x, h, 2)?;
            qa_outputs(t, &logits)?;
        }
        other => {
            return Err(TraceError::UnsupportedTask {
                task: other.to_string(),
                model_type: config.model_type.clone(),
                supported: ROBERTA_TASKS.join(", "),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

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
