//! Task heads, written once and configured per architecture: the task inputs (with the
//! multiple-choice flattening), poolers, first-token classification heads, masked-LM heads
//! with a tied decoder, `SequenceSummary`, token classification, question answering, and
//! [`EncoderHeads`], which routes an encoder's output to the head of a task.

use ferry_ir::{Attr, DType, Dim, ModelConfig};

use crate::config::num_labels;
use crate::layers::{
    Activation, EncoderDims, HeadActivation, WeightSource, layer_norm, linear, scoped, sym,
};
use crate::{Request, T, TraceError, TraceOptions, Tracer};

/// Tasks every encoder-only architecture exports.
pub(crate) const ENCODER_TASKS: &[&str] = &[
    "feature-extraction",
    "fill-mask",
    "text-classification",
    "token-classification",
    "question-answering",
    "multiple-choice",
];

/// The inputs of the BERT-style encoders that take token types.
pub(crate) const TYPED_INPUTS: [&str; 3] = ["input_ids", "attention_mask", "token_type_ids"];
/// The inputs of the encoders without token types.
pub(crate) const INPUTS: [&str; 2] = ["input_ids", "attention_mask"];

/// The graph inputs of a task, as the encoder sees them.
pub(crate) struct TaskInputs {
    /// The inputs in the order declared, `[batch, seq]` (flattened for multiple-choice).
    pub inputs: Vec<T>,
    /// For multiple-choice, the declared `[batch, num_choices, seq]` `input_ids` (for
    /// [`choice_logits`]).
    pub choices: Option<T>,
}

/// Declares the int64 graph inputs `names` (`input_ids` first). For multiple-choice they
/// are `[batch, num_choices, seq]` and are reshaped to `[batch * num_choices, seq]` as
/// transformers' `view(-1, input_ids.size(-1))` does (a `Reshape` to `[-1, seq]`: tract
/// cannot infer a `Flatten` of two symbolic dims); otherwise `[batch, seq]`.
pub(crate) fn task_inputs(
    t: &mut Tracer,
    opts: &TraceOptions,
    task: &str,
    names: &[&str],
) -> TaskInputs {
    let (b, s) = (sym(&opts.batch_axis), sym(&opts.sequence_axis));
    if task == "multiple-choice" {
        let shape = vec![b, sym("num_choices"), s.clone()];
        let declared: Vec<T> = names
            .iter()
            .map(|n| t.input(n, DType::I64, shape.clone()))
            .collect();
        let flat = vec![sym("batch_size*num_choices"), s];
        let shape = t.shape_of(&declared[0]);
        let (two, three, zero) = (t.ints(&[2]), t.ints(&[3]), t.ints(&[0]));
        let seq = t.slice(&shape, &two, &three, &zero, vec![Dim::Fixed(1)]);
        let rest = t.ints(&[-1]);
        let target = t.op(
            "Concat",
            &[&rest, &seq],
            vec![("axis", Attr::Int(0))],
            DType::I64,
            vec![Dim::Fixed(2)],
        );
        let inputs = declared
            .iter()
            .map(|x| t.reshape_to(x, &target, flat.clone()))
            .collect();
        TaskInputs {
            inputs,
            choices: declared.into_iter().next(),
        }
    } else {
        let shape = vec![b, s];
        let inputs = names
            .iter()
            .map(|n| t.input(n, DType::I64, shape.clone()))
            .collect();
        TaskInputs {
            inputs,
            choices: None,
        }
    }
}

/// Multiple-choice logits: the `[batch * num_choices, 1]` scores reshaped to
/// `[batch, num_choices]` (`logits.view(-1, num_choices)`), sizes read from `choices_ids`.
pub(crate) fn choice_logits(t: &mut Tracer, logits: &T, choices_ids: &T) -> T {
    let bc = t.shape_of(choices_ids);
    let zero = t.ints(&[0]);
    let two = t.ints(&[2]);
    let bc = t.slice(&bc, &zero, &two, &zero, vec![Dim::Fixed(2)]);
    let shape = choices_ids.shape[..2].to_vec();
    t.reshape_to(logits, &bc, shape)
}

/// The hidden state of the first token (`x[:, 0]`).
pub(crate) fn first_token(t: &mut Tracer, x: &T) -> Result<T, TraceError> {
    let zero = t.scalar_i64(0);
    t.gather(x, &zero, 1)
}

/// `ForTokenClassification`: the `classifier` linear over every token, output as `logits`.
pub(crate) fn token_classification(
    t: &mut Tracer,
    w: &WeightSource<'_>,
    config: &ModelConfig,
    x: &T,
    hidden: i64,
) -> Result<(), TraceError> {
    let logits = linear(t, w, "classifier", x, hidden, num_labels(config))?;
    t.output(&logits, "logits");
    Ok(())
}

/// `ForQuestionAnswering`: the `qa_outputs` linear to `[batch, seq, 2]`, split
/// (`logits.split(1, dim=-1)` + `squeeze(-1)`) into the `start_logits` and `end_logits`
/// outputs.
pub(crate) fn question_answering(
    t: &mut Tracer,
    w: &WeightSource<'_>,
    x: &T,
    hidden: i64,
) -> Result<(), TraceError> {
    let logits = linear(t, w, "qa_outputs", x, hidden, 2)?;
    let i0 = t.scalar_i64(0);
    let start = t.gather(&logits, &i0, 2)?;
    let i1 = t.scalar_i64(1);
    let end = t.gather(&logits, &i1, 2)?;
    t.output(&start, "start_logits");
    t.output(&end, "end_logits");
    Ok(())
}

/// A pooler: `tanh(dense(x[:, 0]))` in scope `pooler`, by how its dense layer is emitted.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Pooler {
    /// One `Gemm` with `transB` (what torch exports for `nn.Linear` on a 2-D input), the
    /// layer being `pooler.{scope}`, or `pooler` itself when `None` (ALBERT's bare
    /// `nn.Linear`).
    Gemm(Option<&'static str>),
    /// The layer `pooler.{scope}` as [`linear`] (`Transpose` + `MatMul` + `Add`).
    Linear(&'static str),
}

impl Pooler {
    /// Whether the checkpoint has the pooler's weights.
    pub(crate) fn present(&self, w: &WeightSource<'_>) -> bool {
        match self {
            Pooler::Gemm(Some(dense)) | Pooler::Linear(dense) => {
                w.contains(&format!("pooler.{dense}.weight"))
            }
            Pooler::Gemm(None) => w.contains("pooler.weight"),
        }
    }

    /// Pools the `[n, seq, hidden]` states `x` to `[n, hidden]`.
    pub(crate) fn apply(
        &self,
        t: &mut Tracer,
        w: &WeightSource<'_>,
        hidden: i64,
        x: &T,
    ) -> Result<T, TraceError> {
        scoped(t, "pooler", |t| {
            let first = first_token(t, x)?;
            let gemm = |t: &mut Tracer| {
                let path = t.module_path();
                let weight = w.get(t, &format!("{path}.weight"), &[hidden, hidden])?;
                let bias = w.get(t, &format!("{path}.bias"), &[hidden])?;
                t.gemm_bt(&first, &weight, &bias)
            };
            let dense = match *self {
                Pooler::Gemm(Some(scope)) => scoped(t, scope, gemm)?,
                Pooler::Gemm(None) => gemm(t)?,
                Pooler::Linear(scope) => linear(t, w, scope, &first, hidden, hidden)?,
            };
            Ok(t.unary("Tanh", &dense))
        })
    }
}

/// A two-layer head over the first token: `out(act(dense(x[:, 0])))`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ClassificationHead {
    /// Scope of the head (`classifier`), or `None` when its layers sit at the top level.
    pub scope: Option<&'static str>,
    /// The hidden `nn.Linear` (`dense`, `pre_classifier`).
    pub dense: &'static str,
    /// Activation after it.
    pub act: HeadActivation,
    /// The output `nn.Linear` (`out_proj`, `classifier`).
    pub out: &'static str,
}

impl ClassificationHead {
    /// `classifier.out_proj(act(classifier.dense(x[:, 0])))`, RoBERTa's layout.
    pub(crate) const fn classifier(act: HeadActivation) -> Self {
        Self {
            scope: Some("classifier"),
            dense: "dense",
            act,
            out: "out_proj",
        }
    }

    /// `[n, labels]` logits from `[n, seq, hidden]` states.
    pub(crate) fn apply(
        &self,
        t: &mut Tracer,
        w: &WeightSource<'_>,
        hidden: i64,
        labels: i64,
        x: &T,
    ) -> Result<T, TraceError> {
        let head = |t: &mut Tracer| {
            let first = first_token(t, x)?;
            let y = linear(t, w, self.dense, &first, hidden, hidden)?;
            let y = self.act.apply(t, y)?;
            linear(t, w, self.out, &y, hidden, labels)
        };
        match self.scope {
            Some(scope) => scoped(t, scope, head),
            None => head(t),
        }
    }
}

/// A masked-LM head: transform (dense, activation, LayerNorm), then the decoder, whose
/// weight is the word-embedding matrix unless the config unties it.
#[derive(Debug, Clone)]
pub(crate) struct MlmHead {
    /// Scopes around the whole head (`cls.predictions`, `predictions`, `lm_head`); a
    /// `bias` directly under them is the decoder's bias where the checkpoint has it.
    pub scope: &'static [&'static str],
    /// Scope of the transform inside the head (`transform`), if it has its own.
    pub transform: Option<&'static str>,
    /// The transform's `nn.Linear` (`dense`, `vocab_transform`).
    pub dense: &'static str,
    /// The transform's activation.
    pub act: Activation,
    /// The transform's LayerNorm (`LayerNorm`, `layer_norm`, `vocab_layer_norm`).
    pub norm: &'static str,
    /// The decoder module (`decoder`, `vocab_projector`, `generator_lm_head`).
    pub decoder: &'static str,
    /// Untied, fall back to the word embeddings when the checkpoint has no decoder weight
    /// (otherwise the decoder weight is required).
    pub embeddings_without_decoder: bool,
    /// Untied, prefer the decoder's own bias to the head's `bias` (RoBERTa).
    pub own_bias_when_untied: bool,
    /// Encoder width (the transform's input).
    pub hidden: i64,
    /// Embedding width (the transform's output and the decoder's input).
    pub width: i64,
    /// `vocab_size`.
    pub vocab: i64,
    /// The transform LayerNorm's epsilon.
    pub eps: f64,
}

impl MlmHead {
    /// A head in `scope` with BERT's module names (`dense`, `LayerNorm`, `decoder`) that
    /// falls back to the word embeddings and takes the head's `bias` where there is one;
    /// `width` wide after the transform, LayerNorm epsilon from `enc`.
    pub(crate) fn new(
        scope: &'static [&'static str],
        act: Activation,
        enc: &EncoderDims,
        width: i64,
        vocab: i64,
    ) -> Self {
        Self {
            scope,
            transform: None,
            dense: "dense",
            act,
            norm: "LayerNorm",
            decoder: "decoder",
            embeddings_without_decoder: true,
            own_bias_when_untied: false,
            hidden: enc.hidden,
            width,
            vocab,
            eps: enc.eps,
        }
    }

    /// `[batch, seq, vocab]` logits from `[batch, seq, hidden]` states.
    pub(crate) fn apply(
        &self,
        t: &mut Tracer,
        w: &WeightSource<'_>,
        tied: bool,
        x: &T,
    ) -> Result<T, TraceError> {
        for s in self.scope {
            t.push(*s);
        }
        let r = self.head(t, w, tied, x);
        for _ in self.scope {
            t.pop();
        }
        r
    }

    fn head(
        &self,
        t: &mut Tracer,
        w: &WeightSource<'_>,
        tied: bool,
        x: &T,
    ) -> Result<T, TraceError> {
        let (h, e) = (self.hidden, self.width);
        let head_path = t.module_path();
        let transform = |t: &mut Tracer| {
            let y = linear(t, w, self.dense, x, h, e)?;
            let y = self.act.apply(t, &y)?;
            layer_norm(t, w, self.norm, &y, e, self.eps)
        };
        let y = match self.transform {
            Some(scope) => scoped(t, scope, transform)?,
            None => transform(t)?,
        };
        scoped(t, self.decoder, |t| {
            let path = t.module_path();
            let (own_weight, own_bias) = (format!("{path}.weight"), format!("{path}.bias"));
            let weight = if tied || (self.embeddings_without_decoder && !w.contains(&own_weight)) {
                "embeddings.word_embeddings.weight"
            } else {
                own_weight.as_str()
            };
            let weight = w.get(t, weight, &[self.vocab, e])?;
            let bias = if self.scope.is_empty() {
                own_bias
            } else {
                let head_bias = format!("{head_path}.bias");
                let (first, second) = if self.own_bias_when_untied && !tied {
                    (&own_bias, &head_bias)
                } else {
                    (&head_bias, &own_bias)
                };
                if w.contains(first) {
                    first.clone()
                } else if w.contains(second) {
                    second.clone()
                } else {
                    own_bias.clone()
                }
            };
            let bias = w.get(t, &bias, &[self.vocab])?;
            let wt = t.transpose(&weight, &[1, 0])?;
            let mm = t.matmul(&y, &wt)?;
            t.add(&mm, &bias)
        })
    }
}

/// How `SequenceSummary` reduces the sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SummaryType {
    /// The first token.
    First,
    /// The last token.
    Last,
    /// The mean over the sequence.
    Mean,
}

/// `SequenceSummary` (`ElectraSequenceSummary`): reduce the sequence, optionally project
/// (`summary`), then activate; configured by the config's `summary_*` fields.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SequenceSummary {
    /// The reduction.
    pub kind: SummaryType,
    /// Output width of the `summary` projection, if any.
    pub proj: Option<i64>,
    /// The activation (`get_activation(summary_activation)`).
    pub act: HeadActivation,
}

impl SequenceSummary {
    /// Reads `summary_type`, `summary_use_proj`, `summary_proj_to_labels` and
    /// `summary_activation`, with `ElectraConfig`'s defaults.
    pub(crate) fn from_config(c: &ModelConfig, hidden: i64) -> Result<Self, TraceError> {
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
        let labels = num_labels(c);
        let proj = crate::config::flag(c, "summary_use_proj", true).then(|| {
            if crate::config::flag(c, "summary_proj_to_labels", false) && labels > 0 {
                labels
            } else {
                hidden
            }
        });
        let act = match raw.get("summary_activation") {
            None => HeadActivation::Act(Activation::GeluErf),
            Some(serde_json::Value::Null) => HeadActivation::Identity,
            Some(v) => match v.as_str() {
                Some("" | "linear") => HeadActivation::Identity,
                Some("tanh") => HeadActivation::Tanh,
                Some(name) => HeadActivation::Act(Activation::parse(name)?),
                None => {
                    return Err(TraceError::Unsupported(format!("summary_activation {v}")));
                }
            },
        };
        Ok(Self { kind, proj, act })
    }

    /// Applies the summary to `[n, seq, hidden]` states, giving `[n, out]` and `out`.
    pub(crate) fn apply(
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
            Ok((self.act.apply(t, y)?, out))
        })
    }
}

/// The text-classification head of an encoder.
#[derive(Debug, Clone, Copy)]
pub(crate) enum SequenceHead {
    /// The pooler, then the `classifier` linear (BERT, ALBERT).
    Pooled(Pooler),
    /// A first-token head (RoBERTa, ELECTRA, MPNet, DistilBERT).
    FirstToken(ClassificationHead),
}

/// How an encoder scores each choice of multiple-choice (before [`choice_logits`]).
#[derive(Debug, Clone, Copy)]
pub(crate) enum ChoiceHead {
    /// The pooler, then the `classifier` linear to one score.
    Pooled(Pooler),
    /// A first-token head to one score (DistilBERT).
    FirstToken(ClassificationHead),
    /// `SequenceSummary`, then the `classifier` linear to one score (ELECTRA).
    Summary(SequenceSummary),
}

/// The task heads of an encoder-only architecture, configured from the shared pieces.
#[derive(Debug, Clone)]
pub(crate) struct EncoderHeads {
    /// Encoder output width.
    pub hidden: i64,
    /// The pooler whose output feature-extraction adds as `pooler_output` when the
    /// checkpoint has it.
    pub pooler: Option<Pooler>,
    /// text-classification.
    pub sequence: SequenceHead,
    /// multiple-choice; `None` where the architecture set up no choice head for this
    /// trace (ELECTRA reads its summary config only for multiple-choice).
    pub choice: Option<ChoiceHead>,
    /// fill-mask.
    pub mlm: MlmHead,
}

impl EncoderHeads {
    /// Heads that classify the pooled first token (BERT, ALBERT): the pooler also serves
    /// feature-extraction's `pooler_output` and multiple-choice.
    pub(crate) fn pooled(hidden: i64, pooler: Pooler, mlm: MlmHead) -> Self {
        Self {
            hidden,
            pooler: Some(pooler),
            sequence: SequenceHead::Pooled(pooler),
            choice: Some(ChoiceHead::Pooled(pooler)),
            mlm,
        }
    }

    /// Traces an encoder-only model with these heads for the request: declares the inputs
    /// `names` (see [`task_inputs`]), runs `encoder` over them with the weights found under
    /// the task-model prefix `base_prefix` (`bert`), then the head of the task.
    pub(crate) fn trace<const N: usize>(
        &self,
        t: &mut Tracer,
        r: &Request<'_>,
        base_prefix: &str,
        names: [&str; N],
        encoder: impl FnOnce(&mut Tracer, &WeightSource<'_>, &[T; N]) -> Result<T, TraceError>,
    ) -> Result<(), TraceError> {
        let w = WeightSource::new(r.weights, base_prefix);
        let inputs = task_inputs(t, r.opts, r.task, &names);
        let encoder_inputs: &[T; N] = inputs
            .inputs
            .as_slice()
            .try_into()
            .map_err(|_| TraceError::Shape(format!("expected {N} inputs")))?;
        let x = encoder(t, &w, encoder_inputs)?;
        self.output(t, &w, r.config, r.task, &x, inputs.choices.as_ref())
    }

    /// Traces the head of `task` over the encoder output `x` and marks its outputs;
    /// `choices` is [`TaskInputs::choices`].
    pub(crate) fn output(
        &self,
        t: &mut Tracer,
        w: &WeightSource<'_>,
        config: &ModelConfig,
        task: &str,
        x: &T,
        choices: Option<&T>,
    ) -> Result<(), TraceError> {
        let h = self.hidden;
        match (task, choices, self.choice) {
            ("multiple-choice", Some(choices), Some(choice)) => {
                let logits = match choice {
                    ChoiceHead::Pooled(pooler) => {
                        let pooled = pooler.apply(t, w, h, x)?;
                        linear(t, w, "classifier", &pooled, h, 1)?
                    }
                    ChoiceHead::FirstToken(head) => head.apply(t, w, h, 1, x)?,
                    ChoiceHead::Summary(summary) => {
                        let (pooled, n) = summary.apply(t, w, h, x)?;
                        linear(t, w, "classifier", &pooled, n, 1)?
                    }
                };
                let logits = choice_logits(t, &logits, choices);
                t.output(&logits, "logits");
            }
            ("feature-extraction", ..) => {
                t.output(x, "last_hidden_state");
                if let Some(pooler) = self.pooler.filter(|p| p.present(w)) {
                    let pooled = pooler.apply(t, w, h, x)?;
                    t.output(&pooled, "pooler_output");
                }
            }
            ("fill-mask", ..) => {
                let tied = crate::config::ties_word_embeddings(config);
                let logits = self.mlm.apply(t, w, tied, x)?;
                t.output(&logits, "logits");
            }
            ("text-classification", ..) => {
                let labels = num_labels(config);
                let logits = match self.sequence {
                    SequenceHead::Pooled(pooler) => {
                        let pooled = pooler.apply(t, w, h, x)?;
                        linear(t, w, "classifier", &pooled, h, labels)?
                    }
                    SequenceHead::FirstToken(head) => head.apply(t, w, h, labels, x)?,
                };
                t.output(&logits, "logits");
            }
            ("token-classification", ..) => token_classification(t, w, config, x, h)?,
            ("question-answering", ..) => question_answering(t, w, x, h)?,
            (other, ..) => {
                return Err(TraceError::UnsupportedTask {
                    task: other.to_string(),
                    model_type: config.model_type.clone(),
                    supported: ENCODER_TASKS.join(", "),
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(json: &str) -> ModelConfig {
        ModelConfig::from_json(json).expect("valid test config")
    }

    #[test]
    fn summary_defaults_and_variants() -> Result<(), TraceError> {
        let s = SequenceSummary::from_config(&config(r#"{"model_type":"electra"}"#), 16)?;
        assert_eq!(
            (s.kind, s.proj, s.act),
            (
                SummaryType::First,
                Some(16),
                HeadActivation::Act(Activation::GeluErf)
            )
        );
        let s = SequenceSummary::from_config(
            &config(
                r#"{"model_type":"electra","summary_type":"cls_index","summary_use_proj":false,"summary_activation":"tanh"}"#,
            ),
            16,
        )?;
        assert_eq!(
            (s.kind, s.proj, s.act),
            (SummaryType::Last, None, HeadActivation::Tanh)
        );
        let bad = config(r#"{"model_type":"electra","summary_type":"attn"}"#);
        assert!(SequenceSummary::from_config(&bad, 16).is_err());
        Ok(())
    }
}
