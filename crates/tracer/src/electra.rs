//! ELECTRA, as transformers' `modeling_electra.py` computes it.
//!
//! The encoder is BERT's; the embeddings are `embedding_size` wide and, when that differs
//! from `hidden_size`, followed by the `embeddings_project` linear. There is no pooler.
//! Heads: the generator's masked-LM head (dense to `embedding_size`, erf GELU, LayerNorm,
//! tied decoder), a two-layer classification head with GELU, and the sequence summary of
//! multiple-choice.

use ferry_ir::{Attr, DType, Dim, Graph, ModelConfig, Weights};

use crate::bert::{BertDims, num_labels};
use crate::layers::{Activation, WeightSource, additive_mask, layer_norm, linear, scoped, sym};
use crate::roberta::{
    bert_encoder_stack, choice_logits, first_token, qa_outputs, reject_decoder,
    ties_word_embeddings,
};
use crate::{T, TraceError, TraceOptions, Tracer};

/// Tasks ELECTRA exports.
pub(crate) const ELECTRA_TASKS: &[&str] = &[
    "feature-extraction",
    "fill-mask",
    "text-classification",
    "token-classification",
    "question-answering",
    "multiple-choice",
];

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

/// `ElectraEmbeddings` (word + token-type + absolute position, LayerNorm, all
/// `embedding_size` wide), then `embeddings_project` when `embedding_size != hidden_size`.
fn embeddings(
    t: &mut Tracer,
    w: &WeightSource<'_>,
    d: &ElectraDims,
    ids: &T,
    types: &T,
) -> Result<T, TraceError> {
    let e = d.embedding;
    let b = &d.bert;
    let x = scoped(t, "embeddings", |t| {
        let word = w.get(t, "embeddings.word_embeddings.weight", &[b.vocab, e])?;
        let pos = w.get(
            t,
            "embeddings.position_embeddings.weight",
            &[b.max_positions, e],
        )?;
        let typ = w.get(
            t,
            "embeddings.token_type_embeddings.weight",
            &[b.type_vocab, e],
        )?;
        let we = t.gather(&word, ids, 0)?;
        let te = t.gather(&typ, types, 0)?;
        let x = t.add(&we, &te)?;
        // position_ids = arange(seq): rows [0, seq) of the position table.
        let shape = t.shape_of(ids);
        let one = t.ints(&[1]);
        let two = t.ints(&[2]);
        let zero = t.ints(&[0]);
        let seq = t.slice(&shape, &one, &two, &zero, vec![Dim::Fixed(1)]);
        let pe = t.slice(
            &pos,
            &zero,
            &seq,
            &zero,
            vec![ids.shape[1].clone(), Dim::Fixed(e)],
        );
        let x = t.add(&x, &pe)?;
        layer_norm(t, w, "LayerNorm", &x, e, b.enc.eps)
    })?;
    if e == b.enc.hidden {
        return Ok(x);
    }
    linear(t, w, "embeddings_project", &x, e, b.enc.hidden)
}

/// `ElectraModel`: embeddings, then the BERT encoder (no pooler).
fn encoder(
    t: &mut Tracer,
    w: &WeightSource<'_>,
    d: &ElectraDims,
    ids: &T,
    attention_mask: &T,
    types: &T,
) -> Result<T, TraceError> {
    let x = embeddings(t, w, d, ids, types)?;
    let mask = additive_mask(t, attention_mask)?;
    bert_encoder_stack(t, w, &d.bert.enc, d.bert.layers, x, &mask)
}

/// `ElectraGeneratorPredictions` + `generator_lm_head`: dense to `embedding_size`, erf
/// GELU, LayerNorm, then the decoder (the word embeddings unless untied) plus its bias.
fn generator_head(
    t: &mut Tracer,
    w: &WeightSource<'_>,
    d: &ElectraDims,
    tied: bool,
    x: &T,
) -> Result<T, TraceError> {
    let (e, h, vocab) = (d.embedding, d.bert.enc.hidden, d.bert.vocab);
    let y = scoped(t, "generator_predictions", |t| {
        let y = linear(t, w, "dense", x, h, e)?;
        let y = Activation::GeluErf.apply(t, &y)?;
        layer_norm(t, w, "LayerNorm", &y, e, d.bert.enc.eps)
    })?;
    scoped(t, "generator_lm_head", |t| {
        let weight = if tied {
            w.get(t, "embeddings.word_embeddings.weight", &[vocab, e])?
        } else {
            w.get(t, "generator_lm_head.weight", &[vocab, e])?
        };
        let bias = w.get(t, "generator_lm_head.bias", &[vocab])?;
        let wt = t.transpose(&weight, &[1, 0])?;
        let mm = t.matmul(&y, &wt)?;
        t.add(&mm, &bias)
    })
}

/// `ElectraClassificationHead`: first token, dense, erf GELU, `out_proj`.
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
        let y = Activation::GeluErf.apply(t, &y)?;
        linear(t, w, "out_proj", &y, h, labels)
    })
}

/// How `ElectraSequenceSummary` reduces the sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SummaryType {
    First,
    Last,
    Mean,
}

/// The summary's activation (`get_activation(summary_activation)`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SummaryAct {
    Identity,
    Tanh,
    Act(Activation),
}

/// `ElectraSequenceSummary`'s configuration, with `ElectraConfig`'s defaults.
struct Summary {
    kind: SummaryType,
    proj: Option<i64>,
    act: SummaryAct,
}

impl Summary {
    fn from_config(c: &ModelConfig, hidden: i64) -> Result<Self, TraceError> {
        let raw = &c.raw;
        let kind = match raw.get("summary_type").map(|v| v.as_str()) {
            None | Some(Some("first")) => SummaryType::First,
            // `cls_index` without a cls_index input takes the last token.
            Some(Some("last" | "cls_index")) => SummaryType::Last,
            Some(Some("mean")) => SummaryType::Mean,
            Some(other) => {
                return Err(TraceError::Unsupported(format!(
                    "summary_type {other:?} (supported: first, last, mean, cls_index)"
                )));
            }
        };
        let flag = |k: &str, default: bool| {
            raw.get(k)
                .and_then(serde_json::Value::as_bool)
                .unwrap_or(default)
        };
        let labels = num_labels(c);
        let proj = flag("summary_use_proj", true).then(|| {
            if flag("summary_proj_to_labels", false) && labels > 0 {
                labels
            } else {
                hidden
            }
        });
        let act = match raw.get("summary_activation") {
            None => SummaryAct::Act(Activation::GeluErf),
            Some(serde_json::Value::Null) => SummaryAct::Identity,
            Some(v) => match v.as_str() {
                Some("" | "linear") => SummaryAct::Identity,
                Some("tanh") => SummaryAct::Tanh,
                Some(name) => SummaryAct::Act(Activation::parse(name)?),
                None => {
                    return Err(TraceError::Unsupported(format!("summary_activation {v}")));
                }
            },
        };
        Ok(Self { kind, proj, act })
    }

    /// Applies the summary to `[n, seq, hidden]` states, giving `[n, out]`.
    fn apply(
        &self,
        t: &mut Tracer,
        w: &WeightSource<'_>,
        hidden: i64,
        x: &T,
    ) -> Result<(T, i64), TraceError> {
        scoped(t, "sequence_summary", |t| {
            let pooled = match self.kind {
                SummaryType::First => first_token(t, x)?,
                SummaryType::Last => {
                    let last = t.scalar_i64(-1);
                    t.gather(x, &last, 1)?
                }
                SummaryType::Mean => {
                    let shape = vec![x.shape[0].clone(), Dim::Fixed(hidden)];
                    let keep = ("keepdims", Attr::Int(0));
                    if t.opset() >= 18 {
                        let axes = t.ints(&[1]);
                        t.op("ReduceMean", &[x, &axes], vec![keep], x.dtype, shape)
                    } else {
                        let axes = ("axes", Attr::Ints(vec![1]));
                        t.op("ReduceMean", &[x], vec![axes, keep], x.dtype, shape)
                    }
                }
            };
            let (y, out) = match self.proj {
                Some(n) => (linear(t, w, "summary", &pooled, hidden, n)?, n),
                None => (pooled, hidden),
            };
            let y = match self.act {
                SummaryAct::Identity => y,
                SummaryAct::Tanh => t.unary("Tanh", &y),
                SummaryAct::Act(a) => a.apply(t, &y)?,
            };
            Ok((y, out))
        })
    }
}

/// Traces ELECTRA with the head of `task`.
pub(crate) fn trace_electra(
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
    let d = ElectraDims::from_config(config)?;
    let w = WeightSource::new(weights, "electra");
    let h = d.bert.enc.hidden;
    let (b, s) = (sym(&opts.batch_axis), sym(&opts.sequence_axis));

    if task == "multiple-choice" {
        let summary = Summary::from_config(config, h)?;
        let shape = vec![b, sym("num_choices"), s.clone()];
        let ids = t.input("input_ids", DType::I64, shape.clone());
        let mask = t.input("attention_mask", DType::I64, shape.clone());
        let types = t.input("token_type_ids", DType::I64, shape);
        let flat = vec![sym("batch_size*num_choices"), s];
        let fi = t.flatten(&ids, 2, flat.clone());
        let fm = t.flatten(&mask, 2, flat.clone());
        let ft = t.flatten(&types, 2, flat);
        let x = encoder(t, &w, &d, &fi, &fm, &ft)?;
        let (pooled, n) = summary.apply(t, &w, h, &x)?;
        let logits = linear(t, &w, "classifier", &pooled, n, 1)?;
        choice_logits(t, &logits, &ids);
        return Ok(());
    }

    let bs = vec![b, s];
    let ids = t.input("input_ids", DType::I64, bs.clone());
    let mask = t.input("attention_mask", DType::I64, bs.clone());
    let types = t.input("token_type_ids", DType::I64, bs);
    let x = encoder(t, &w, &d, &ids, &mask, &types)?;
    match task {
        "feature-extraction" => t.output(&x, "last_hidden_state"),
        "fill-mask" => {
            let logits = generator_head(t, &w, &d, ties_word_embeddings(config), &x)?;
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
                supported: ELECTRA_TASKS.join(", "),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    fn config(json: &str) -> ModelConfig {
        ModelConfig::from_json(json).expect("valid test config")
    }

    #[test]
    fn summary_defaults_and_variants() -> Result<(), TraceError> {
        let s = Summary::from_config(&config(r#"{"model_type":"electra"}"#), 16)?;
        assert_eq!(
            (s.kind, s.proj, s.act),
            (
                SummaryType::First,
                Some(16),
                SummaryAct::Act(Activation::GeluErf)
            )
        );
        let s = Summary::from_config(
            &config(
                r#"{"model_type":"electra","summary_type":"cls_index","summary_use_proj":false,"summary_activation":"tanh"}"#,
            ),
            16,
        )?;
        assert_eq!(
            (s.kind, s.proj, s.act),
            (SummaryType::Last, None, SummaryAct::Tanh)
        );
        let bad = config(r#"{"model_type":"electra","summary_type":"attn"}"#);
        assert!(Summary::from_config(&bad, 16).is_err());
        Ok(())
    }

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
