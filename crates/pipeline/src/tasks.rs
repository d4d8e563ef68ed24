//! Each task's answer as its transformers pipeline computes it, from an exported model
//! run in ONNX Runtime: fill-mask, text and token classification, question answering,
//! multiple choice, feature extraction (sentence-transformers pooling) and text generation
//! (greedy, through [`crate::generate`]). `ferry run` prints these answers; a Rust program
//! calls [`run_task`].

use std::collections::BTreeMap;

use ferry_ir::{PoolingMode, SentenceModules};
use ferry_verifier::{F32Tensor, I64Tensor, Input, IoInfo, Model};
use serde_json::{Value, json};
use tokenizers::Encoding;

use crate::tokenizer::TextTokenizer;

/// Why a task could not be answered (bad input for the task, a model that does not fit it,
/// ONNX Runtime or tokenizer failures), as one line.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct PipelineError(pub String);

/// What the pipelines need to know about an export besides its graph: labels, the
/// classification problem type and generation settings (ferry export records them).
#[derive(Debug, Clone, Default)]
pub struct TaskInfo {
    /// Class labels by id.
    pub id2label: BTreeMap<usize, String>,
    /// `problem_type` of a classification config (`multi_label_classification` → sigmoid).
    pub problem_type: Option<String>,
    /// End-of-sequence ids generation stops at.
    pub eos_token_ids: Vec<u32>,
    /// See [`crate::GenerationConfig::reset_cache_at`].
    pub reset_cache_at: Option<usize>,
}

impl TaskInfo {
    /// The label of class `i` (`LABEL_i` when the config named none, as transformers does).
    pub fn label(&self, i: usize) -> String {
        self.id2label
            .get(&i)
            .cloned()
            .unwrap_or_else(|| format!("LABEL_{i}"))
    }
}

/// One question to a task.
#[derive(Debug, Clone)]
pub struct Request<'r> {
    /// The task (optimum's name, without `-with-past`).
    pub task: &'r str,
    /// The text (the question, the prompt, the sentence…).
    pub text: &'r str,
    /// The second texts: a pair, a QA context, or the choices.
    pub text_pair: &'r [String],
    /// Token classification's grouping.
    pub aggregation: Aggregation,
    /// Text generation's limit.
    pub max_new_tokens: usize,
}

/// Called with each piece of generated text as it is decoded (`None`: no streaming).
pub type OnText<'c> = Option<&'c mut dyn FnMut(&str) -> Result<(), String>>;

/// Answers `req` with `model` (an export for `req.task`), its tokenizer and `info`.
pub fn run_task(
    model: &mut Model,
    tok: &TextTokenizer,
    info: &TaskInfo,
    req: &Request<'_>,
    on_text: OnText<'_>,
) -> Result<Answer, PipelineError> {
    if !TASKS.contains(&req.task) {
        return Err(PipelineError(format!(
            "task `{}` has no pipeline here (tasks: {})",
            req.task,
            TASKS.join(", ")
        )));
    }
    check_pairs(req.task, req.text_pair.len())?;
    let mut ctx = Ctx {
        model,
        tok,
        meta: info,
    };
    let r = match req.task {
        "fill-mask" => ctx.fill_mask(req.text),
        "text-classification" => ctx.text_classification(req.text, req.text_pair.first()),
        "token-classification" => ctx.token_classification(req.text, req.aggregation),
        "question-answering" => ctx.question_answering(req.text, &req.text_pair[0]),
        "multiple-choice" => ctx.multiple_choice(req.text, req.text_pair),
        "text-generation" => ctx.text_generation(req.text, req.max_new_tokens, on_text),
        _ => ctx.feature_extraction(req.text),
    };
    r.map_err(PipelineError)
}

/// How token-classification groups tokens into entities: the transformers pipeline's
/// `aggregation_strategy` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Aggregation {
    /// One entity per token (the pipeline's default).
    None,
    /// Adjacent tokens with the same entity type are grouped.
    Simple,
    /// Words take the label of their first token, then grouped.
    First,
    /// Words take the label of their highest-scoring token, then grouped.
    Max,
    /// Words take the label of their tokens' mean scores, then grouped.
    Average,
}

impl Aggregation {
    /// The pipeline's name for it.
    pub fn name(self) -> &'static str {
        match self {
            Aggregation::None => "none",
            Aggregation::Simple => "simple",
            Aggregation::First => "first",
            Aggregation::Max => "max",
            Aggregation::Average => "average",
        }
    }
}

/// Tasks with a pipeline here.
pub const TASKS: &[&str] = &[
    "feature-extraction",
    "fill-mask",
    "text-classification",
    "token-classification",
    "question-answering",
    "multiple-choice",
    "text-generation",
];

/// The answer: JSON, and the same as text for people.
#[derive(Debug, Clone)]
pub struct Answer {
    /// As JSON (what `ferry run --json` prints).
    pub json: Value,
    /// As text for people.
    pub text: String,
}

/// How many `--text-pair` values each task takes.
pub fn check_pairs(task: &str, n: usize) -> Result<(), PipelineError> {
    let ok = match task {
        "question-answering" => n == 1,
        "multiple-choice" => n >= 1,
        "text-classification" => n <= 1,
        _ => n == 0,
    };
    if ok {
        return Ok(());
    }
    Err(PipelineError(match task {
        "question-answering" => {
            "question-answering takes the question as --text and the context as one --text-pair"
                .into()
        }
        "multiple-choice" => {
            "multiple-choice takes the prompt as --text and each choice as a --text-pair".into()
        }
        "text-classification" => "text-classification takes at most one --text-pair".into(),
        _ => format!("task {task} takes no --text-pair"),
    }))
}

struct Ctx<'a> {
    model: &'a mut Model,
    tok: &'a TextTokenizer,
    meta: &'a TaskInfo,
}

/// Token rows of one model call, padded to one length.
struct Batch {
    /// Shape of each int64 input: `[rows, len]`, or `[1, rows, len]` for multiple choice.
    shape: Vec<i64>,
    ids: Vec<i64>,
    mask: Vec<i64>,
    types: Vec<i64>,
}

impl Batch {
    /// Rows from encodings, right-padded with `pad`.
    fn new(encs: &[&Encoding], pad: u32, choices: bool) -> Self {
        let len = encs.iter().map(|e| e.len()).max().unwrap_or(0);
        let mut b = Batch {
            shape: if choices {
                vec![1, encs.len() as i64, len as i64]
            } else {
                vec![encs.len() as i64, len as i64]
            },
            ids: Vec::new(),
            mask: Vec::new(),
            types: Vec::new(),
        };
        for e in encs {
            let n = e.len();
            b.ids.extend(e.get_ids().iter().map(|&i| i64::from(i)));
            b.ids.extend(std::iter::repeat_n(i64::from(pad), len - n));
            b.mask
                .extend(e.get_attention_mask().iter().map(|&m| i64::from(m)));
            b.mask.extend(std::iter::repeat_n(0, len - n));
            b.types
                .extend(e.get_type_ids().iter().map(|&t| i64::from(t)));
            b.types.extend(std::iter::repeat_n(0, len - n));
        }
        b
    }

    /// The model's inputs, by the names it declares.
    fn feed(&self, declared: &[IoInfo]) -> Result<BTreeMap<String, Input>, String> {
        let len = self.shape.last().copied().unwrap_or(0);
        let rows = self.ids.len() as i64 / len.max(1);
        let t = |data: Vec<i64>| {
            Input::I64(I64Tensor {
                shape: self.shape.clone(),
                data,
            })
        };
        let mut feed = BTreeMap::new();
        for info in declared {
            let v = match info.name.as_str() {
                "input_ids" => t(self.ids.clone()),
                "attention_mask" => t(self.mask.clone()),
                "token_type_ids" => t(self.types.clone()),
                "position_ids" => t((0..rows).flat_map(|_| 0..len).collect()),
                other => return Err(unfeedable(other)),
            };
            feed.insert(info.name.clone(), v);
        }
        Ok(feed)
    }
}

fn unfeedable(name: &str) -> String {
    format!("the model has an input `{name}` that `ferry run` cannot fill for this task")
}

/// An output by name, checked to have the `dims` given (`None`: any size) and no empty dim.
fn output<'o>(
    outs: &'o BTreeMap<String, F32Tensor>,
    name: &str,
    dims: &[Option<usize>],
) -> Result<&'o F32Tensor, String> {
    let t = outs.get(name).ok_or_else(|| {
        format!(
            "the model has no output `{name}` (it has: {})",
            outs.keys().cloned().collect::<Vec<_>>().join(", ")
        )
    })?;
    let fits = t.shape.len() == dims.len()
        && t.shape
            .iter()
            .zip(dims)
            .all(|(&got, want)| got > 0 && want.is_none_or(|w| usize::try_from(got) == Ok(w)))
        && t.shape.iter().product::<i64>() as usize == t.data.len();
    if !fits {
        let want: Vec<String> = dims
            .iter()
            .map(|d| d.map_or("_".to_string(), |d| d.to_string()))
            .collect();
        return Err(format!(
            "output `{name}` has shape {:?}, expected [{}]",
            t.shape,
            want.join(", ")
        ));
    }
    Ok(t)
}

fn softmax(x: &[f32]) -> Vec<f64> {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let e: Vec<f64> = x.iter().map(|&v| f64::from(v - max).exp()).collect();
    let s: f64 = e.iter().sum();
    e.into_iter().map(|v| v / s).collect()
}

fn argmax(x: &[f64]) -> usize {
    let mut best = 0;
    for (i, &v) in x.iter().enumerate() {
        if v > x[best] {
            best = i;
        }
    }
    best
}

/// Indices of the `k` largest values, largest first (earlier index first on ties).
fn top_k(x: &[f64], k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..x.len()).collect();
    idx.sort_by(|&a, &b| x[b].total_cmp(&x[a]).then(a.cmp(&b)));
    idx.truncate(k);
    idx
}

/// The characters `start..end` of `s`.
fn char_slice(s: &str, start: usize, end: usize) -> String {
    s.chars()
        .skip(start)
        .take(end.saturating_sub(start))
        .collect()
}

impl Ctx<'_> {
    fn call(&mut self, batch: &Batch) -> Result<BTreeMap<String, F32Tensor>, String> {
        let feed = batch.feed(&self.model.inputs())?;
        self.model.run_inputs(&feed).map_err(|e| e.to_string())
    }

    /// Tokens past the tokenizer's `model_max_length` make an error (as in the pipelines,
    /// which do not truncate these tasks).
    fn check_length(&self, enc: &Encoding) -> Result<(), String> {
        if let Some(max) = self.tok.model_max_length
            && enc.len() > max
        {
            return Err(format!(
                "the input is {} tokens; the model takes at most {max}",
                enc.len()
            ));
        }
        Ok(())
    }

    fn fill_mask(&mut self, text: &str) -> Result<Answer, String> {
        let (mask_token, mask_id) = self
            .tok
            .mask
            .clone()
            .ok_or("the tokenizer has no mask token")?;
        let enc = self.tok.encode(text)?;
        self.check_length(&enc)?;
        let ids = enc.get_ids();
        let positions: Vec<usize> = (0..ids.len()).filter(|&i| ids[i] == mask_id).collect();
        if positions.is_empty() {
            return Err(format!("--text has no mask token ({mask_token})"));
        }
        let outs = self.call(&Batch::new(&[&enc], self.tok.pad_id.unwrap_or(0), false))?;
        let logits = output(&outs, "logits", &[Some(1), Some(ids.len()), None])?;
        let vocab = logits.shape[2] as usize;
        let single = positions.len() == 1;
        let mut all = Vec::new();
        let mut text_out = String::new();
        for (m, &p) in positions.iter().enumerate() {
            let probs = softmax(&logits.data[p * vocab..(p + 1) * vocab]);
            let mut preds = Vec::new();
            if !single {
                text_out.push_str(&format!("mask {} (token {p}):\n", m + 1));
            }
            for t in top_k(&probs, 5) {
                let token_str = self.tok.decode(&[t as u32], false)?;
                // The pipeline's sequence: the prediction in place, padding dropped.
                let seq: Vec<u32> = ids
                    .iter()
                    .enumerate()
                    .map(|(i, &id)| if i == p { t as u32 } else { id })
                    .filter(|&id| Some(id) != self.tok.pad_id)
                    .collect();
                let sequence = self.tok.decode(&seq, single)?;
                text_out.push_str(&format!(
                    "{}{:.4}  {token_str:<16} {sequence}\n",
                    if single { "" } else { "  " },
                    probs[t]
                ));
                preds.push(json!({
                    "score": probs[t],
                    "token": t,
                    "token_str": token_str,
                    "sequence": sequence,
                }));
            }
            all.push(Value::Array(preds));
        }
        Ok(Answer {
            json: json!({ "predictions": all }),
            text: text_out,
        })
    }

    fn text_classification(&mut self, text: &str, pair: Option<&String>) -> Result<Answer, String> {
        let enc = match pair {
            Some(p) => self.tok.encode((text, p.as_str()))?,
            None => self.tok.encode(text)?,
        };
        self.check_length(&enc)?;
        let outs = self.call(&Batch::new(&[&enc], self.tok.pad_id.unwrap_or(0), false))?;
        let logits = output(&outs, "logits", &[Some(1), None])?;
        let n = logits.shape[1] as usize;
        let row = &logits.data[..n];
        // The pipeline's default function_to_apply.
        let (scores, function): (Vec<f64>, &str) = match self.meta.problem_type.as_deref() {
            Some("regression") => (row.iter().map(|&v| f64::from(v)).collect(), "none"),
            Some("multi_label_classification") => (sigmoid(row), "sigmoid"),
            _ if n == 1 => (sigmoid(row), "sigmoid"),
            _ => (softmax(row), "softmax"),
        };
        let mut labels = Vec::new();
        let mut text_out = String::new();
        for i in top_k(&scores, n) {
            let label = self.meta.label(i);
            text_out.push_str(&format!("{:.4}  {label}\n", scores[i]));
            labels.push(json!({ "label": label, "score": scores[i] }));
        }
        Ok(Answer {
            json: json!({ "labels": labels, "function": function }),
            text: text_out,
        })
    }

    fn token_classification(&mut self, text: &str, agg: Aggregation) -> Result<Answer, String> {
        // The pipeline truncates to model_max_length.
        let mut enc = self.tok.encode(text)?;
        if let Some(max) = self.tok.model_max_length
            && enc.len() > max
        {
            enc = self.tok.encode_truncated(text, max)?;
        }
        let outs = self.call(&Batch::new(&[&enc], self.tok.pad_id.unwrap_or(0), false))?;
        let logits = output(&outs, "logits", &[Some(1), Some(enc.len()), None])?;
        let n_labels = logits.shape[2] as usize;
        let wordpiece = self.tok.has_continuing_subword_prefix();
        let chars: Vec<char> = text.chars().collect();
        let mut pre = Vec::new();
        for (idx, &id) in enc.get_ids().iter().enumerate() {
            if enc.get_special_tokens_mask()[idx] == 1 {
                continue;
            }
            let scores = softmax(&logits.data[idx * n_labels..(idx + 1) * n_labels]);
            let (start, end) = enc.get_offsets()[idx];
            let word_ref = char_slice(text, start, end);
            let mut word = self.tok.id_to_token(id);
            let mut is_subword = if wordpiece {
                word.chars().count() != word_ref.chars().count()
            } else {
                start > 0 && !(chars.get(start - 1) == Some(&' ') || chars.get(start) == Some(&' '))
            };
            if Some(id) == self.tok.unk_id {
                word = word_ref;
                is_subword = false;
            }
            pre.push(PreEntity {
                word,
                scores,
                start,
                end,
                index: idx,
                is_subword,
            });
        }
        let entities = aggregate(self, pre, agg)?;
        let mut text_out = String::new();
        for e in &entities {
            text_out.push_str(&format!(
                "{:<12} {:.4}  {:<16} [{}, {})\n",
                e.label, e.score, e.word, e.start, e.end
            ));
        }
        let json_entities: Vec<Value> = entities
            .iter()
            .map(|e| match e.index {
                Some(i) => json!({
                    "entity": e.label, "score": e.score, "index": i,
                    "word": e.word, "start": e.start, "end": e.end,
                }),
                None => json!({
                    "entity_group": e.label, "score": e.score,
                    "word": e.word, "start": e.start, "end": e.end,
                }),
            })
            .collect();
        Ok(Answer {
            json: json!({ "aggregation": agg.name(), "entities": json_entities }),
            text: if text_out.is_empty() {
                "no entities\n".into()
            } else {
                text_out
            },
        })
    }

    fn question_answering(&mut self, question: &str, context: &str) -> Result<Answer, String> {
        const MAX_ANSWER_LEN: usize = 15;
        const TOP_K: usize = 1;
        let max_seq_len = self.tok.model_max_length.unwrap_or(384).min(384);
        // [CLS] question [SEP] context [SEP]: the question must leave room for context.
        let q = self.tok.encode_with(question, false)?.len();
        if q + 4 > max_seq_len {
            return Err(format!(
                "the question is {q} tokens; with the context it must fit in {max_seq_len}"
            ));
        }
        // Windows overlap by doc_stride tokens, less when the question leaves less room per
        // window (where the pipeline's tokenizer panics).
        let stride = (max_seq_len / 2).min(128).min(max_seq_len - q - 4);
        let windows = self
            .tok
            .encode_windows(question, context, max_seq_len, stride)?;
        let mut answers: Vec<(f64, usize, usize, String)> = Vec::new();
        for enc in &windows {
            let outs = self.call(&Batch::new(&[enc], self.tok.pad_id.unwrap_or(0), false))?;
            let n = enc.len();
            let start_logits = output(&outs, "start_logits", &[Some(1), Some(n)])?;
            let end_logits = output(&outs, "end_logits", &[Some(1), Some(n)])?;
            // Only context tokens (and [CLS]) may be in the answer.
            let seq_ids = enc.get_sequence_ids();
            let desired: Vec<bool> = (0..n)
                .map(|i| {
                    let in_context =
                        seq_ids[i] == Some(1) || Some(enc.get_ids()[i]) == self.tok.cls_id;
                    in_context && enc.get_attention_mask()[i] == 1
                })
                .collect();
            let masked = |x: &[f32]| -> Vec<f32> {
                x.iter()
                    .zip(&desired)
                    .map(|(&v, &d)| if d { v } else { -10000.0 })
                    .collect()
            };
            let mut start = softmax(&masked(&start_logits.data[..n]));
            let mut end = softmax(&masked(&end_logits.data[..n]));
            start[0] = 0.0;
            end[0] = 0.0;
            let mut cands = Vec::new();
            for s in (0..n).filter(|&s| desired[s]) {
                for e in (s..n.min(s + MAX_ANSWER_LEN)).filter(|&e| desired[e]) {
                    cands.push((start[s] * end[e], s, e));
                }
            }
            cands.sort_by(|a, b| b.0.total_cmp(&a.0));
            cands.truncate(TOP_K * 2 + 10);
            for (score, s, e) in cands {
                let (a, b) = word_span(enc, s, e);
                let text = char_slice(context, a, b);
                match answers
                    .iter_mut()
                    .find(|x| x.3.to_lowercase() == text.to_lowercase())
                {
                    Some(x) => x.0 += score,
                    None => answers.push((score, a, b, text)),
                }
            }
        }
        answers.sort_by(|a, b| b.0.total_cmp(&a.0));
        let Some((score, start, end, answer)) = answers.into_iter().next() else {
            return Err("no answer span found in the context".into());
        };
        Ok(Answer {
            text: format!(
                "{answer}\n  score {score:.4}, characters [{start}, {end}) of the context\n"
            ),
            json: json!({ "answer": answer, "score": score, "start": start, "end": end }),
        })
    }

    fn multiple_choice(&mut self, prompt: &str, choices: &[String]) -> Result<Answer, String> {
        let encs = choices
            .iter()
            .map(|c| self.tok.encode((prompt, c.as_str())))
            .collect::<Result<Vec<_>, _>>()?;
        for e in &encs {
            self.check_length(e)?;
        }
        let refs: Vec<&Encoding> = encs.iter().collect();
        let outs = self.call(&Batch::new(&refs, self.tok.pad_id.unwrap_or(0), true))?;
        let logits = output(&outs, "logits", &[Some(1), Some(choices.len())])?;
        let scores = softmax(&logits.data);
        let best = argmax(&scores);
        let mut text_out = String::new();
        let mut json_choices = Vec::new();
        for (i, c) in choices.iter().enumerate() {
            text_out.push_str(&format!(
                "{} {:.4}  {c}\n",
                if i == best { "*" } else { " " },
                scores[i]
            ));
            json_choices.push(json!({
                "choice": c, "score": scores[i], "logit": logits.data[i],
            }));
        }
        Ok(Answer {
            json: json!({ "choices": json_choices, "best": best }),
            text: text_out,
        })
    }

    fn feature_extraction(&mut self, text: &str) -> Result<Answer, String> {
        let st = SentenceModules::read(&self.tok.dir).map_err(|e| e.to_string())?;
        let mut enc = self.tok.encode(text)?;
        if let Some(max) = st.as_ref().and_then(|s| s.max_seq_length)
            && enc.len() > max
        {
            enc = self.tok.encode_truncated(text, max)?;
        }
        let outs = self.call(&Batch::new(&[&enc], self.tok.pad_id.unwrap_or(0), false))?;
        let declared = self.model.outputs();
        let name = ["last_hidden_state", "token_embeddings"]
            .iter()
            .find_map(|n| declared.iter().find(|o| o.name == *n))
            .or(declared.first())
            .map(|o| o.name.clone())
            .ok_or("the model has no outputs")?;
        let hidden = output(&outs, &name, &[Some(1), Some(enc.len()), None])?;
        let total: f64 = hidden
            .data
            .iter()
            .map(|&v| f64::from(v) * f64::from(v))
            .sum::<f64>()
            .sqrt();
        let norm = |v: &[f64]| v.iter().map(|x| x * x).sum::<f64>().sqrt();
        let mut json = json!({ "output": name, "shape": hidden.shape, "norm": total });
        let (embedding, how) = if outs.contains_key(SENTENCE_EMBEDDING) {
            // The export computes the embedding itself (sentence-transformers' modules).
            let e = output(&outs, SENTENCE_EMBEDDING, &[Some(1), None])?;
            json["pooled_by"] = json!("model");
            let e: Vec<f64> = e.data.iter().map(|&v| f64::from(v)).collect();
            (e, format!("the model's `{SENTENCE_EMBEDDING}` output"))
        } else {
            let modes = st
                .as_ref()
                .map_or(vec![PoolingMode::Mean], |s| s.pooling.clone());
            let normalize = st.as_ref().is_some_and(|s| s.normalize);
            if st.as_ref().is_some_and(|s| !s.dense.is_empty()) {
                return Err(format!(
                    "the checkpoint's modules.json has Dense layers but the model has no `{SENTENCE_EMBEDDING}` output; export it with ferry to compute them"
                ));
            }
            let (e, mean) = pool(hidden, enc.get_attention_mask(), &modes, normalize)?;
            let names: Vec<&str> = modes.iter().map(|m| m.name()).collect();
            json["pooled_by"] = json!("ferry");
            json["pooling"] = json!(names);
            json["normalize"] = json!(normalize);
            json["mean_pooled"] = json!(mean);
            let how = format!(
                "{} pooling{} by ferry (before normalization {:.4})",
                names.join("+"),
                if normalize { ", normalized" } else { "" },
                norm(&mean)
            );
            (e, how)
        };
        let preview: Vec<String> = embedding
            .iter()
            .take(6)
            .map(|v| format!("{v:.4}"))
            .collect();
        let text_out = format!(
            "{name} {:?}, norm {:.4}\nsentence embedding ({how}): {} values, norm {:.4}\n  [{}, …]\n",
            hidden.shape,
            total,
            embedding.len(),
            norm(&embedding),
            preview.join(", ")
        );
        json["sentence_embedding"] = json!(embedding);
        Ok(Answer {
            json,
            text: text_out,
        })
    }

    /// Greedy continuation of `prompt` ([`crate::greedy`], with the cache when the export
    /// has one). With `on_text`, the prompt and each new piece of text are passed to it as
    /// they come, and the answer's text is only the final newline.
    fn text_generation(
        &mut self,
        prompt: &str,
        max_new: usize,
        mut on_text: OnText<'_>,
    ) -> Result<Answer, String> {
        let enc = self.tok.encode_with(prompt, false)?;
        let ids: Vec<i64> = enc.get_ids().iter().map(|&i| i64::from(i)).collect();
        if ids.is_empty() {
            return Err("the prompt has no tokens".into());
        }
        let eos: Vec<i64> = if self.meta.eos_token_ids.is_empty() {
            self.tok.eos_id.into_iter().map(i64::from).collect()
        } else {
            self.meta
                .eos_token_ids
                .iter()
                .map(|&i| i64::from(i))
                .collect()
        };
        let cfg = crate::GenerationConfig {
            max_new_tokens: max_new,
            pad_token_id: eos.first().copied().unwrap_or(0),
            eos_token_ids: eos,
            reset_cache_at: self.meta.reset_cache_at,
        };
        let with_past = self
            .model
            .inputs()
            .iter()
            .any(|i| i.name.starts_with("past_key_values."));
        let stream = on_text.is_some();
        if let Some(f) = on_text.as_mut() {
            f(prompt)?;
        }
        let mut stream_text = crate::StreamDecoder::new(self.tok);
        let generated = crate::greedy(
            self.model,
            vec![ids.clone()],
            vec![vec![1; ids.len()]],
            &cfg,
            |step| {
                if let Some(f) = on_text.as_mut() {
                    for &t in step {
                        let piece = stream_text
                            .push(t as u32)
                            .map_err(|e| crate::GenerateError::Stopped(e.0))?;
                        f(&piece).map_err(crate::GenerateError::Stopped)?;
                    }
                }
                Ok(())
            },
        )
        .map_err(|e| e.to_string())?;
        let new_ids: Vec<u32> = generated
            .into_iter()
            .next()
            .unwrap_or_default()
            .into_iter()
            .map(|t| t as u32)
            .collect();
        let continuation = self.tok.decode(&new_ids, true)?;
        if let Some(f) = on_text.as_mut() {
            f(&stream_text.finish()?)?;
        }
        let generated = format!("{prompt}{continuation}");
        Ok(Answer {
            text: if stream {
                "\n".to_string()
            } else {
                format!("{generated}\n")
            },
            json: json!({
                "generated_text": generated,
                "prompt_token_ids": ids,
                "new_token_ids": new_ids,
                "cache": with_past,
            }),
        })
    }
}

fn sigmoid(x: &[f32]) -> Vec<f64> {
    x.iter()
        .map(|&v| 1.0 / (1.0 + (-f64::from(v)).exp()))
        .collect()
}

/// Character span of tokens `s..=e` widened to whole words of the context, as the QA
/// pipeline's `align_to_words` does (token offsets when a token has no word).
fn word_span(enc: &Encoding, s: usize, e: usize) -> (usize, usize) {
    let word = |t: usize, first: bool| {
        let (_, w) = enc.token_to_word(t)?;
        let (a, b) = enc.word_to_chars(w, 1)?;
        Some(if first { a } else { b })
    };
    match (word(s, true), word(e, false)) {
        (Some(a), Some(b)) => (a, b),
        _ => (enc.get_offsets()[s].0, enc.get_offsets()[e].1),
    }
}

/// A token before aggregation, as the token-classification pipeline gathers it.
struct PreEntity {
    word: String,
    scores: Vec<f64>,
    start: usize,
    end: usize,
    index: usize,
    is_subword: bool,
}

/// An entity: one token (`index` set) or a group.
struct Entity {
    label: String,
    score: f64,
    word: String,
    start: usize,
    end: usize,
    index: Option<usize>,
}

/// The pipeline's `aggregate`, then `ignore_labels=["O"]`.
fn aggregate(ctx: &Ctx<'_>, pre: Vec<PreEntity>, agg: Aggregation) -> Result<Vec<Entity>, String> {
    let label = |i: usize| ctx.meta.label(i);
    let tokens: Vec<Entity> = match agg {
        Aggregation::None | Aggregation::Simple => pre
            .iter()
            .map(|p| {
                let i = argmax(&p.scores);
                Entity {
                    label: label(i),
                    score: p.scores[i],
                    word: p.word.clone(),
                    start: p.start,
                    end: p.end,
                    index: Some(p.index),
                }
            })
            .collect(),
        _ => {
            // Words: a token and the subwords after it.
            let mut words: Vec<Vec<&PreEntity>> = Vec::new();
            for p in &pre {
                match words.last_mut() {
                    Some(w) if p.is_subword => w.push(p),
                    _ => words.push(vec![p]),
                }
            }
            words
                .into_iter()
                .map(|w| {
                    let toks: Vec<String> = w.iter().map(|p| p.word.clone()).collect();
                    let scores: Vec<f64> = match agg {
                        Aggregation::First => w[0].scores.clone(),
                        // The first token with the highest top score, as Python's max().
                        Aggregation::Max => {
                            let top = |p: &PreEntity| p.scores[argmax(&p.scores)];
                            let mut best = w[0];
                            for p in &w[1..] {
                                if top(p) > top(best) {
                                    best = p;
                                }
                            }
                            best.scores.clone()
                        }
                        _ => (0..w[0].scores.len())
                            .map(|j| w.iter().map(|p| p.scores[j]).sum::<f64>() / w.len() as f64)
                            .collect(),
                    };
                    let i = argmax(&scores);
                    Ok(Entity {
                        label: label(i),
                        score: scores[i],
                        word: ctx.tok.tokens_to_string(&toks)?,
                        start: w[0].start,
                        end: w[w.len() - 1].end,
                        index: None,
                    })
                })
                .collect::<Result<_, String>>()?
        }
    };
    let mut out = if agg == Aggregation::None {
        tokens
    } else {
        group_entities(ctx, tokens)?
    };
    out.retain(|e| e.label != "O");
    Ok(out)
}

/// `B-`/`I-` prefix and entity type of a label (`I` and the whole label when unprefixed).
fn tag(label: &str) -> (&str, &str) {
    if let Some(t) = label.strip_prefix("B-") {
        ("B", t)
    } else if let Some(t) = label.strip_prefix("I-") {
        ("I", t)
    } else {
        ("I", label)
    }
}

/// The pipeline's `group_entities`: adjacent entities of one type (not starting at `B-`)
/// become one group with the mean score.
fn group_entities(ctx: &Ctx<'_>, entities: Vec<Entity>) -> Result<Vec<Entity>, String> {
    let mut groups = Vec::new();
    let mut current: Vec<Entity> = Vec::new();
    let flush = |current: &mut Vec<Entity>, groups: &mut Vec<Entity>| -> Result<(), String> {
        if current.is_empty() {
            return Ok(());
        }
        let first = &current[0];
        let label = first
            .label
            .split_once('-')
            .map(|(_, t)| t.to_string())
            .unwrap_or_else(|| first.label.clone());
        let words: Vec<String> = current.iter().map(|e| e.word.clone()).collect();
        groups.push(Entity {
            label,
            score: current.iter().map(|e| e.score).sum::<f64>() / current.len() as f64,
            word: ctx.tok.tokens_to_string(&words)?,
            start: first.start,
            end: current[current.len() - 1].end,
            index: None,
        });
        current.clear();
        Ok(())
    };
    for e in entities {
        let joins = current.last().is_some_and(|last| {
            let (bi, t) = tag(&e.label);
            let (_, last_t) = tag(&last.label);
            t == last_t && bi != "B"
        });
        if !joins {
            flush(&mut current, &mut groups)?;
        }
        current.push(e);
    }
    flush(&mut current, &mut groups)?;
    Ok(groups)
}

/// The output a sentence-transformers export computes its embedding into.
const SENTENCE_EMBEDDING: &str = "sentence_embedding";

/// sentence-transformers' pooling of one unpadded sequence's token states `hidden`
/// (`[1, len, dim]`), for exports without a `sentence_embedding` output: the modes
/// concatenated, then L2-normalized when `normalize`; with the mean (a diagnostic).
fn pool(
    hidden: &F32Tensor,
    mask: &[u32],
    modes: &[PoolingMode],
    normalize: bool,
) -> Result<(Vec<f64>, Vec<f64>), String> {
    let (len, dim) = (hidden.shape[1] as usize, hidden.shape[2] as usize);
    let rows: Vec<&[f32]> = (0..len)
        .filter(|&i| mask.get(i) == Some(&1))
        .map(|i| &hidden.data[i * dim..(i + 1) * dim])
        .collect();
    let first = rows.first().ok_or("no tokens")?;
    let last = rows.last().ok_or("no tokens")?;
    let mean: Vec<f64> = (0..dim)
        .map(|j| rows.iter().map(|r| f64::from(r[j])).sum::<f64>() / rows.len() as f64)
        .collect();
    let mut embedding = Vec::new();
    for mode in modes {
        match mode {
            PoolingMode::Cls => embedding.extend(first.iter().map(|&v| f64::from(v))),
            PoolingMode::Max => embedding.extend((0..dim).map(|j| {
                rows.iter()
                    .map(|r| f64::from(r[j]))
                    .fold(f64::NEG_INFINITY, f64::max)
            })),
            PoolingMode::Mean => embedding.extend(&mean),
            // Sum over tokens divided by the square root of their count.
            PoolingMode::MeanSqrtLen => {
                let k = (rows.len() as f64).sqrt();
                embedding.extend(mean.iter().map(|v| v * k));
            }
            // Weights 1, 2, … from the first token.
            PoolingMode::WeightedMean => {
                let total: f64 = (1..=rows.len()).map(|w| w as f64).sum();
                embedding.extend((0..dim).map(|j| {
                    rows.iter()
                        .enumerate()
                        .map(|(i, r)| (i + 1) as f64 * f64::from(r[j]))
                        .sum::<f64>()
                        / total
                }));
            }
            PoolingMode::LastToken => embedding.extend(last.iter().map(|&v| f64::from(v))),
        }
    }
    if normalize {
        let n = embedding
            .iter()
            .map(|x| x * x)
            .sum::<f64>()
            .sqrt()
            .max(1e-12);
        embedding.iter_mut().for_each(|v| *v /= n);
    }
    Ok((embedding, mean))
}
