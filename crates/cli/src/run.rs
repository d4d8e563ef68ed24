//! `ferry run`: tokenize text, run an exported model in ONNX Runtime and print the task's
//! answer the way the transformers pipeline for that task computes it (the answers come
//! from ferry-pipeline's `run_task`; this module reads the arguments and the export's
//! metadata, and prints).
//!
//! An encoder-decoder export folder runs the translation / summarization pipeline
//! (`--task`, default text2text-generation) with the folder's `tokenizer.json`.
//!
//! The task, labels and tokenizer directory come from the metadata `ferry export` records
//! (see [`crate::metadata`]); `--task` and `--tokenizer` override them (e.g. for models
//! exported by other tools).

use ferry_pipeline::TextTokenizer;
use ferry_pipeline::seq2seq::{self, Seq2Seq};
use ferry_pipeline::tasks::{self, Request, TaskInfo};
use ferry_verifier::Model;
use serde_json::Value;

use crate::RunArgs;
use crate::metadata::ModelMeta;

/// How token-classification groups tokens into entities: the transformers pipeline's
/// `aggregation_strategy` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Aggregation {
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

impl From<Aggregation> for tasks::Aggregation {
    fn from(a: Aggregation) -> Self {
        match a {
            Aggregation::None => tasks::Aggregation::None,
            Aggregation::Simple => tasks::Aggregation::Simple,
            Aggregation::First => tasks::Aggregation::First,
            Aggregation::Max => tasks::Aggregation::Max,
            Aggregation::Average => tasks::Aggregation::Average,
        }
    }
}

/// Runs `ferry run`.
pub(crate) fn run(a: &RunArgs) -> Result<(), String> {
    if a.model.is_dir() {
        return run_seq2seq(a);
    }
    if !a.model.is_file() {
        return Err(format!("model {} does not exist", a.model.display()));
    }
    let meta = ModelMeta::read(&a.model)?;
    let task = match a.task.as_deref().or(meta.task.as_deref()) {
        Some(t) => ferry_tracer::canonical_task(t),
        None => {
            return Err(format!(
                "{} has no ferry metadata (was it exported by ferry?); pass --task",
                a.model.display()
            ));
        }
    };
    // A decoder exported with its cache runs the same way, feeding the cache back.
    let task = task
        .strip_suffix("-with-past")
        .map(str::to_string)
        .unwrap_or(task);
    if !tasks::TASKS.contains(&task.as_str()) {
        return Err(format!(
            "`ferry run` does not handle task `{task}` (it handles: {})",
            tasks::TASKS.join(", ")
        ));
    }
    tasks::check_pairs(&task, a.text_pair.len()).map_err(|e| e.to_string())?;
    let tok_dir = match (&a.tokenizer, &meta.source) {
        (Some(d), _) => d.clone(),
        (None, Some(d)) => d.clone(),
        (None, None) => {
            return Err(format!(
                "{} does not say where its checkpoint is; pass --tokenizer DIR",
                a.model.display()
            ));
        }
    };
    let tok = TextTokenizer::load(&tok_dir)?;
    let mut model = Model::load(&a.model, threads()).map_err(|e| e.to_string())?;
    let info = TaskInfo {
        id2label: meta.id2label.clone(),
        problem_type: meta.problem_type.clone(),
        eos_token_ids: meta.eos_token_ids.clone(),
        reset_cache_at: meta.reset_cache_at,
    };
    let req = Request {
        task: &task,
        text: &a.text,
        text_pair: &a.text_pair,
        aggregation: a.aggregation.into(),
        max_new_tokens: a.max_new_tokens.unwrap_or(20),
    };
    // Generated text is printed as it is decoded (not with --json).
    let mut print = |text: &str| emit(text);
    let on_text: tasks::OnText<'_> = if a.json { None } else { Some(&mut print) };
    let answer =
        tasks::run_task(&mut model, &tok, &info, &req, on_text).map_err(|e| e.to_string())?;
    if a.json {
        let mut json = answer.json;
        if let Value::Object(o) = &mut json {
            o.insert("task".into(), Value::String(task));
        }
        let text = serde_json::to_string_pretty(&json).map_err(|e| e.to_string())?;
        emit(&format!("{text}\n"))
    } else {
        emit(&answer.text)
    }
}

/// `ferry run` on an encoder-decoder export folder: the translation, summarization or
/// text2text-generation pipeline (ferry-pipeline's `run_text2text`), with `--tokenizer`, the
/// folder's `tokenizer.json` or that of the checkpoint it was exported from.
fn run_seq2seq(a: &RunArgs) -> Result<(), String> {
    let dir = &a.model;
    if !Seq2Seq::is_folder(dir) {
        return Err(format!(
            "{} is a folder without {} (only encoder-decoder exports are folders)",
            dir.display(),
            seq2seq::ENCODER_FILE
        ));
    }
    let task = match a.task.as_deref() {
        None | Some("text2text-generation" | "text2text-generation-with-past") => {
            "text2text-generation"
        }
        Some(t) if t == "summarization" || t.starts_with("translation") => t,
        Some(t) => {
            return Err(format!(
                "an encoder-decoder folder runs text2text-generation, summarization or \
                 translation_xx_to_yy, not `{t}`"
            ));
        }
    };
    if !a.text_pair.is_empty() {
        return Err(format!("{task} takes no --text-pair"));
    }
    // The folder's own tokenizer (export copies it), else the checkpoint's it came from.
    let source = ModelMeta::read(&dir.join(seq2seq::ENCODER_FILE))
        .ok()
        .and_then(|m| m.source)
        .filter(|s| s.join("tokenizer.json").is_file());
    let tok_dir = match (&a.tokenizer, source) {
        (Some(t), _) => t.clone(),
        (None, Some(s)) if !dir.join("tokenizer.json").is_file() => s,
        _ => dir.clone(),
    };
    let tok_dir = tok_dir.as_path();
    if !tok_dir.join("tokenizer.json").is_file() {
        let spm = ["source.spm", "target.spm"]
            .iter()
            .any(|f| tok_dir.join(f).is_file());
        return Err(if spm {
            format!(
                "{} has SentencePiece source.spm/target.spm (Marian) but no tokenizer.json, \
                 the only tokenizer `ferry run` reads for encoder-decoders; pass --tokenizer DIR \
                 with a tokenizer.json",
                tok_dir.display()
            )
        } else {
            format!(
                "{} has no tokenizer.json; pass --tokenizer DIR with one",
                tok_dir.display()
            )
        });
    }
    let tok = TextTokenizer::load(tok_dir)?;
    let mut model = Seq2Seq::load(dir, threads()).map_err(|e| e.to_string())?;
    let mut overrides = serde_json::Map::new();
    for (key, v) in [
        ("num_beams", a.num_beams),
        ("max_new_tokens", a.max_new_tokens),
        ("max_length", a.max_length),
        ("min_length", a.min_length),
    ] {
        if let Some(v) = v {
            overrides.insert(key.into(), v.into());
        }
    }
    let answer = seq2seq::run_text2text(&mut model, &tok, task, &a.text, &overrides)
        .map_err(|e| e.to_string())?;
    if a.json {
        let text = serde_json::to_string_pretty(&answer.json).map_err(|e| e.to_string())?;
        emit(&format!("{text}\n"))
    } else {
        emit(&answer.text)
    }
}

/// Intra-op threads for ONNX Runtime: the machine's cores, at most 8.
fn threads() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get().min(8))
        .unwrap_or(1)
}

/// Writes to stdout; a closed pipe (`ferry run … | head`) is not an error.
fn emit(text: &str) -> Result<(), String> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            Err(format!("cannot write to stdout: {e}"))
        }
        _ => Ok(()),
    }
}
