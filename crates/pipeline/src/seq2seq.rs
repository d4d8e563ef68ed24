//! Encoder-decoder generation over optimum's folder layout (`encoder_model.onnx` plus
//! `decoder_model_merged.onnx`, or `decoder_model.onnx` + `decoder_with_past_model.onnx`),
//! as transformers' `generate` computes it: the encoder runs once, the decoder starts from
//! `decoder_start_token_id` and is fed its own cache (`present.*` → `past_key_values.*`;
//! the cross-attention entries `present.*.encoder.*` come from the first step only), greedy
//! (`_sample` without sampling) or beam search (`_beam_search`: length penalty,
//! `early_stopping` true / false / `"never"`), with the logits processors a generation
//! config turns on (`no_repeat_ngram_size`, single-token `bad_words_ids`, `min_length`,
//! `forced_bos_token_id`, `forced_eos_token_id`). [`run_text2text`] answers as the
//! translation / summarization pipelines do (the task's `task_specific_params`: prefix and
//! generation overrides).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use ferry_ir::DType;
use ferry_verifier::{F32Tensor, I64Tensor, Input, Model, Values, VerifyError};
use serde_json::{Map, Value, json};

use crate::generate::{GenerateError, argmax, empty_cache};
use crate::tasks::Answer;
use crate::tokenizer::{TextTokenizer, TokenizerError};

/// The encoder's file in optimum's folder.
pub const ENCODER_FILE: &str = "encoder_model.onnx";
/// The merged decoder (an `If` on `use_cache_branch`).
pub const MERGED_DECODER_FILE: &str = "decoder_model_merged.onnx";
/// The decoder's first, uncached step.
pub const DECODER_FILE: &str = "decoder_model.onnx";
/// The decoder's cached steps.
pub const DECODER_WITH_PAST_FILE: &str = "decoder_with_past_model.onnx";

/// Why an encoder-decoder folder could not be loaded or run.
#[derive(Debug, thiserror::Error)]
pub enum Seq2SeqError {
    /// ONNX Runtime failed.
    #[error(transparent)]
    Model(#[from] VerifyError),
    /// A model input that cannot be filled, or a malformed output.
    #[error(transparent)]
    Generate(#[from] GenerateError),
    /// The tokenizer failed.
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    /// The folder lacks a file or holds an unreadable one.
    #[error("{0}")]
    Folder(String),
    /// A generation setting is invalid or not implemented.
    #[error("{0}")]
    Config(String),
}

fn config_err(m: impl Into<String>) -> Seq2SeqError {
    Seq2SeqError::Config(m.into())
}

/// `generate`'s `early_stopping`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EarlyStopping {
    /// `False`: stop a batch row once the heuristic says no running beam can do better.
    Heuristic,
    /// `True`: stop a row as soon as it has `num_beams` finished hypotheses.
    Done,
    /// `"never"`: the canonical beam search (the heuristic at `max_length` when the length
    /// penalty favours longer sequences).
    Never,
}

/// The generation settings an encoder-decoder's `generate` reads.
#[derive(Debug, Clone)]
pub struct Seq2SeqConfig {
    /// 1: greedy; more: beam search.
    pub num_beams: usize,
    /// Longest decoder sequence, the start token included (unless `max_new_tokens`).
    pub max_length: usize,
    /// When set, `max_length` is this plus the start token.
    pub max_new_tokens: Option<usize>,
    /// End-of-sequence ids are forbidden while the decoder sequence is shorter than this.
    pub min_length: usize,
    /// Beam scores are divided by `length ** length_penalty`.
    pub length_penalty: f64,
    /// When beam search stops.
    pub early_stopping: EarlyStopping,
    /// The decoder's first token.
    pub decoder_start_token_id: i64,
    /// A row stops after any of these.
    pub eos_token_ids: Vec<i64>,
    /// What finished rows are filled with (None: the first end-of-sequence id).
    pub pad_token_id: Option<i64>,
    /// The token forced right after the start token.
    pub forced_bos_token_id: Option<i64>,
    /// The tokens forced as the last one at `max_length`.
    pub forced_eos_token_ids: Vec<i64>,
    /// Tokens never generated (`bad_words_ids` entries of one token).
    pub bad_words_ids: Vec<i64>,
    /// No n-gram of this size repeats in a decoder sequence (0: off).
    pub no_repeat_ngram_size: usize,
}

/// One id or a list of ids (`eos_token_id: 2` or `[1, 2]`).
fn ids_of(v: &Value, key: &str) -> Result<Vec<i64>, Seq2SeqError> {
    match v {
        Value::Null => Ok(Vec::new()),
        Value::Number(n) => n
            .as_i64()
            .map(|i| vec![i])
            .ok_or_else(|| config_err(format!("`{key}` is not an integer id"))),
        Value::Array(a) => a
            .iter()
            .map(|x| {
                x.as_i64()
                    .ok_or_else(|| config_err(format!("`{key}` holds a non-integer id")))
            })
            .collect(),
        _ => Err(config_err(format!("`{key}` is not an id or a list of ids"))),
    }
}

fn one_id(v: &Value, key: &str) -> Result<Option<i64>, Seq2SeqError> {
    let ids = ids_of(v, key)?;
    match ids.as_slice() {
        [] => Ok(None),
        [i] if !v.is_array() => Ok(Some(*i)),
        _ => Err(config_err(format!("`{key}` must be one id"))),
    }
}

fn count(v: &Value, key: &str) -> Result<usize, Seq2SeqError> {
    v.as_u64()
        .map(|n| n as usize)
        .ok_or_else(|| config_err(format!("`{key}` must be a non-negative integer")))
}

impl Default for Seq2SeqConfig {
    /// transformers' `GenerationConfig` defaults (T5's special ids).
    fn default() -> Self {
        Self {
            num_beams: 1,
            max_length: 20,
            max_new_tokens: None,
            min_length: 0,
            length_penalty: 1.0,
            early_stopping: EarlyStopping::Heuristic,
            decoder_start_token_id: 0,
            eos_token_ids: Vec::new(),
            pad_token_id: None,
            forced_bos_token_id: None,
            forced_eos_token_ids: Vec::new(),
            bad_words_ids: Vec::new(),
            no_repeat_ngram_size: 0,
        }
    }
}

impl Seq2SeqConfig {
    /// The settings of an export folder: `generation_config.json` when present, else the
    /// generation fields of `config.json` (as transformers derives one from the other).
    pub fn from_folder(dir: &Path) -> Result<Self, Seq2SeqError> {
        let gen_path = dir.join("generation_config.json");
        let config = read_json(&dir.join("config.json"))?;
        let source = if gen_path.is_file() {
            read_json(&gen_path)?
        } else {
            config.clone()
        };
        let Value::Object(fields) = &source else {
            return Err(config_err(format!(
                "{} is not a JSON object",
                gen_path.display()
            )));
        };
        let mut cfg = Self {
            decoder_start_token_id: -1,
            ..Self::default()
        };
        cfg.apply(fields)?;
        if cfg.decoder_start_token_id < 0 {
            // `decoder_start_token_id` falls back to the BOS id, then to config.json's.
            let fallback = ["decoder_start_token_id", "bos_token_id"]
                .iter()
                .find_map(|k| {
                    source
                        .get(*k)
                        .or_else(|| config.get(*k))
                        .and_then(Value::as_i64)
                });
            cfg.decoder_start_token_id = fallback.ok_or_else(|| {
                config_err(format!(
                    "{} names no decoder_start_token_id or bos_token_id",
                    dir.display()
                ))
            })?;
        }
        Ok(cfg)
    }

    /// Applies generation fields (a generation config, a pipeline's `task_specific_params`
    /// entry, or a caller's overrides); fields that change what `generate` computes but are
    /// not implemented here are an error, fields that do not matter to it are ignored.
    pub fn apply(&mut self, fields: &Map<String, Value>) -> Result<(), Seq2SeqError> {
        for (key, v) in fields {
            let k = key.as_str();
            match k {
                "num_beams" => {
                    self.num_beams = count(v, k)?;
                    if self.num_beams == 0 {
                        return Err(config_err("`num_beams` must be at least 1"));
                    }
                }
                "max_length" => self.max_length = count(v, k)?,
                "max_new_tokens" => {
                    self.max_new_tokens = if v.is_null() {
                        None
                    } else {
                        Some(count(v, k)?)
                    }
                }
                "min_length" => self.min_length = count(v, k)?,
                "no_repeat_ngram_size" => {
                    self.no_repeat_ngram_size = if v.is_null() { 0 } else { count(v, k)? }
                }
                "length_penalty" => {
                    self.length_penalty = v
                        .as_f64()
                        .ok_or_else(|| config_err("`length_penalty` must be a number"))?
                }
                "early_stopping" => {
                    self.early_stopping = match v {
                        Value::Bool(true) => EarlyStopping::Done,
                        Value::Bool(false) | Value::Null => EarlyStopping::Heuristic,
                        Value::String(s) if s == "never" => EarlyStopping::Never,
                        _ => {
                            return Err(config_err(
                                "`early_stopping` must be true, false or \"never\"",
                            ));
                        }
                    }
                }
                "decoder_start_token_id" => {
                    if let Some(id) = one_id(v, k)? {
                        self.decoder_start_token_id = id;
                    }
                }
                "eos_token_id" => self.eos_token_ids = ids_of(v, k)?,
                "pad_token_id" => self.pad_token_id = one_id(v, k)?,
                "forced_bos_token_id" => self.forced_bos_token_id = one_id(v, k)?,
                "forced_eos_token_id" => self.forced_eos_token_ids = ids_of(v, k)?,
                "bad_words_ids" => {
                    self.bad_words_ids.clear();
                    for entry in v.as_array().into_iter().flatten() {
                        match ids_of(entry, k)?.as_slice() {
                            [id] => self.bad_words_ids.push(*id),
                            _ => {
                                return Err(config_err(
                                    "`bad_words_ids` entries of more than one token are not implemented",
                                ));
                            }
                        }
                    }
                }
                _ => unsupported(k, v)?,
            }
        }
        Ok(())
    }

    /// The longest decoder sequence, the start token included.
    pub fn effective_max_length(&self) -> usize {
        self.max_new_tokens.map_or(self.max_length, |n| n + 1)
    }
}

/// An error for a field whose value would change `generate`'s answer in a way this module
/// does not implement; Ok for the fields that leave greedy and beam search as they are.
fn unsupported(key: &str, v: &Value) -> Result<(), Seq2SeqError> {
    let off = match key {
        "do_sample" => v.as_bool() != Some(true),
        "repetition_penalty" | "encoder_repetition_penalty" => {
            v.is_null() || v.as_f64() == Some(1.0)
        }
        "num_beam_groups" | "num_return_sequences" => v.is_null() || v.as_u64() == Some(1),
        "encoder_no_repeat_ngram_size" | "min_new_tokens" => v.is_null() || v.as_u64() == Some(0),
        "suppress_tokens"
        | "begin_suppress_tokens"
        | "sequence_bias"
        | "force_words_ids"
        | "constraints"
        | "exponential_decay_length_penalty"
        | "guidance_scale" => v.is_null() || v.as_array().is_some_and(Vec::is_empty),
        _ => true,
    };
    if off {
        Ok(())
    } else {
        Err(config_err(format!(
            "generation setting `{key}` = {v} is not implemented by ferry's generation"
        )))
    }
}

fn read_json(path: &Path) -> Result<Value, Seq2SeqError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Seq2SeqError::Folder(format!("cannot read {}: {e}", path.display())))?;
    serde_json::from_str(&text)
        .map_err(|e| Seq2SeqError::Folder(format!("{} is not valid JSON: {e}", path.display())))
}

/// The decoder files of a folder.
enum Decoder {
    /// `decoder_model_merged.onnx`.
    Merged(Model),
    /// `decoder_model.onnx` (first step) and `decoder_with_past_model.onnx`.
    Split { first: Model, with_past: Model },
}

/// An encoder-decoder export loaded in ONNX Runtime.
pub struct Seq2Seq {
    encoder: Model,
    decoder: Decoder,
    /// The folder.
    pub dir: PathBuf,
}

/// What the decoder carries from step to step: the encoder's output and mask (one row per
/// beam) and the cache (`past_key_values.*`, empty before the first step).
pub struct DecoderState {
    hidden: F32Tensor,
    mask: I64Tensor,
    cache: BTreeMap<String, F32Tensor>,
}

impl DecoderState {
    /// A state before the first step for the encoder output `hidden` (`[rows, seq, d]`) and
    /// its attention mask (`rows` rows), each row repeated `repeat` times (beams).
    pub fn new(hidden: &F32Tensor, mask: &[Vec<i64>], repeat: usize) -> Self {
        let rows = mask.len();
        let per_row = hidden.data.len().checked_div(rows).unwrap_or(0);
        let mut shape = hidden.shape.clone();
        if let Some(b) = shape.first_mut() {
            *b = (rows * repeat) as i64;
        }
        let data = (0..rows)
            .flat_map(|r| std::iter::repeat_n(&hidden.data[r * per_row..(r + 1) * per_row], repeat))
            .flatten()
            .copied()
            .collect();
        let seq = mask.first().map_or(0, Vec::len);
        let mask_data = mask
            .iter()
            .flat_map(|m| std::iter::repeat_n(m, repeat))
            .flatten()
            .copied()
            .collect();
        Self {
            hidden: F32Tensor { shape, data },
            mask: I64Tensor {
                shape: vec![(rows * repeat) as i64, seq as i64],
                data: mask_data,
            },
            cache: BTreeMap::new(),
        }
    }

    /// Rows the decoder runs on.
    pub fn rows(&self) -> usize {
        self.mask.shape.first().copied().unwrap_or(0) as usize
    }

    /// Reorders the self-attention cache rows (`from[i]` is the row new row `i` continues).
    /// The cross-attention entries stay: beams of one input share identical encoder rows
    /// and beam search only moves rows within one input's beams.
    fn reorder_beams(&mut self, from: &[usize]) {
        for (name, t) in self.cache.iter_mut() {
            if !name.contains(".decoder.") {
                continue;
            }
            let rows = t.shape.first().copied().unwrap_or(0) as usize;
            if rows == 0 {
                continue;
            }
            let per = t.data.len() / rows;
            let mut data = Vec::with_capacity(t.data.len());
            for &r in from {
                data.extend_from_slice(&t.data[r * per..(r + 1) * per]);
            }
            t.data = data;
        }
    }
}

impl Seq2Seq {
    /// Whether `dir` is an encoder-decoder export folder (it holds `encoder_model.onnx`).
    pub fn is_folder(dir: &Path) -> bool {
        dir.join(ENCODER_FILE).is_file()
    }

    /// Loads the encoder and the merged decoder (or, without it, the two decoders) of
    /// `dir` on `threads` intra-op threads.
    pub fn load(dir: &Path, threads: usize) -> Result<Self, Seq2SeqError> {
        Self::load_files(dir, threads, true)
    }

    /// As [`Seq2Seq::load`]; `merged: false` uses `decoder_model.onnx` and
    /// `decoder_with_past_model.onnx` even when the merged decoder is there.
    pub fn load_files(dir: &Path, threads: usize, merged: bool) -> Result<Self, Seq2SeqError> {
        if !dir.is_dir() {
            return Err(Seq2SeqError::Folder(format!(
                "{} is not a folder",
                dir.display()
            )));
        }
        let file = |name: &str| dir.join(name);
        if !file(ENCODER_FILE).is_file() {
            return Err(Seq2SeqError::Folder(format!(
                "{} has no {ENCODER_FILE} (not an encoder-decoder export)",
                dir.display()
            )));
        }
        let encoder = Model::load(&file(ENCODER_FILE), threads)?;
        let decoder = if merged && file(MERGED_DECODER_FILE).is_file() {
            Decoder::Merged(Model::load(&file(MERGED_DECODER_FILE), threads)?)
        } else if file(DECODER_FILE).is_file() && file(DECODER_WITH_PAST_FILE).is_file() {
            Decoder::Split {
                first: Model::load(&file(DECODER_FILE), threads)?,
                with_past: Model::load(&file(DECODER_WITH_PAST_FILE), threads)?,
            }
        } else {
            return Err(Seq2SeqError::Folder(format!(
                "{} has neither {MERGED_DECODER_FILE} nor {DECODER_FILE} with {DECODER_WITH_PAST_FILE}",
                dir.display()
            )));
        };
        Ok(Self {
            encoder,
            decoder,
            dir: dir.to_path_buf(),
        })
    }

    /// Runs the encoder on a batch (`ids` and `mask` rows of one length); returns
    /// `last_hidden_state`.
    pub fn encode(
        &mut self,
        ids: &[Vec<i64>],
        mask: &[Vec<i64>],
    ) -> Result<F32Tensor, Seq2SeqError> {
        if ids.is_empty() || ids[0].is_empty() || mask.len() != ids.len() {
            return Err(GenerateError::EmptyPrompt.into());
        }
        let mut feed = BTreeMap::new();
        for info in self.encoder.inputs() {
            let rows = match info.name.as_str() {
                "input_ids" => ids,
                "attention_mask" => mask,
                other => return Err(GenerateError::Unfeedable(other.to_string()).into()),
            };
            feed.insert(info.name, Input::I64(matrix(rows)));
        }
        let mut out = self.encoder.run_inputs(&feed)?;
        out.remove("last_hidden_state").ok_or_else(|| {
            Seq2SeqError::Folder(format!("{ENCODER_FILE} has no output `last_hidden_state`"))
        })
    }

    /// One decoder call: `ids` (one row per state row) after what the state's cache holds.
    /// Returns the logits `[rows, ids length, vocab]` and updates the cache.
    pub fn step(
        &mut self,
        state: &mut DecoderState,
        ids: &[Vec<i64>],
    ) -> Result<F32Tensor, Seq2SeqError> {
        let first = state.cache.is_empty();
        let rows = state.rows();
        if ids.len() != rows || ids[0].is_empty() {
            return Err(GenerateError::EmptyPrompt.into());
        }
        let (model, branch) = match &mut self.decoder {
            Decoder::Merged(m) => (m, Some(!first)),
            Decoder::Split { first: f, .. } if first => (f, None),
            Decoder::Split { with_past, .. } => (with_past, None),
        };
        let empty = if first && branch.is_some() {
            empty_cache(model, rows as i64)?
        } else {
            BTreeMap::new()
        };
        let mut feed = BTreeMap::new();
        for info in model.inputs() {
            let v = match info.name.as_str() {
                "use_cache_branch" => continue,
                "input_ids" => Input::I64(matrix(ids)),
                "encoder_attention_mask" => Input::I64(state.mask.clone()),
                "encoder_hidden_states" => Input::F32(state.hidden.clone()),
                name => match state.cache.get(name).or_else(|| empty.get(name)) {
                    Some(t) => Input::F32(t.clone()),
                    None => return Err(GenerateError::Unfeedable(name.to_string()).into()),
                },
            };
            feed.insert(info.name, v);
        }
        let mut values = Values::from_inputs(&feed)?;
        if let Some(use_cache) = branch {
            values.insert_ints(
                "use_cache_branch",
                vec![1],
                vec![i64::from(use_cache)],
                DType::Bool,
            )?;
        }
        let wanted: Vec<String> = model
            .outputs()
            .into_iter()
            .map(|o| o.name)
            .filter(|n| {
                n == "logits" || n.contains(".decoder.") || (first && n.contains(".encoder."))
            })
            .collect();
        let out = model.run_values(&values)?;
        let mut out = out.floats(wanted.iter().map(String::as_str))?;
        let logits = out
            .remove("logits")
            .ok_or_else(|| GenerateError::Logits("the decoder has no such output".into()))?;
        let n = ids[0].len();
        match logits.shape[..] {
            [r, s, v] if r as usize == rows && s as usize == n && v > 0 => {}
            _ => {
                return Err(GenerateError::Logits(format!(
                    "shape {:?}, expected [{rows}, {n}, vocab]",
                    logits.shape
                ))
                .into());
            }
        }
        for (name, t) in out {
            if let Some(rest) = name.strip_prefix("present.") {
                state.cache.insert(format!("past_key_values.{rest}"), t);
            }
        }
        Ok(logits)
    }

    /// Generates for a batch of encoder inputs (`ids`, `mask`: rows of one length, padded
    /// either side) as `model.generate(input_ids, attention_mask)` with `cfg`: each row's
    /// decoder sequence, the start token included, all of one length (shorter ones filled as
    /// transformers fills them).
    pub fn generate(
        &mut self,
        ids: &[Vec<i64>],
        mask: &[Vec<i64>],
        cfg: &Seq2SeqConfig,
    ) -> Result<Vec<Vec<i64>>, Seq2SeqError> {
        if cfg.effective_max_length() < 2 {
            return Err(config_err(
                "max_length leaves no room for a token after the decoder start",
            ));
        }
        let hidden = self.encode(ids, mask)?;
        if cfg.num_beams > 1 {
            self.beam_search(&hidden, mask, cfg)
        } else {
            self.greedy(&hidden, mask, cfg)
        }
    }

    /// `_sample` with `do_sample=False`.
    fn greedy(
        &mut self,
        hidden: &F32Tensor,
        mask: &[Vec<i64>],
        cfg: &Seq2SeqConfig,
    ) -> Result<Vec<Vec<i64>>, Seq2SeqError> {
        let batch = mask.len();
        let max_len = cfg.effective_max_length();
        let pad = cfg.pad_token_id.or(cfg.eos_token_ids.first().copied());
        let mut state = DecoderState::new(hidden, mask, 1);
        let mut seqs = vec![vec![cfg.decoder_start_token_id]; batch];
        let mut unfinished = vec![true; batch];
        let mut feed = seqs.clone();
        loop {
            let logits = self.step(&mut state, &feed)?;
            for (r, seq) in seqs.iter_mut().enumerate() {
                let mut scores = last_row(&logits, r).to_vec();
                process(cfg, seq, max_len, &mut scores);
                let mut token = argmax(&scores) as i64;
                if let Some(p) = pad
                    && !unfinished[r]
                {
                    token = p;
                }
                if cfg.eos_token_ids.contains(&token) {
                    unfinished[r] = false;
                }
                seq.push(token);
            }
            if seqs[0].len() >= max_len || unfinished.iter().all(|u| !u) {
                return Ok(seqs);
            }
            feed = last_tokens(&seqs);
        }
    }

    /// `_beam_search` with `do_sample=False`, one returned sequence per input.
    fn beam_search(
        &mut self,
        hidden: &F32Tensor,
        mask: &[Vec<i64>],
        cfg: &Seq2SeqConfig,
    ) -> Result<Vec<Vec<i64>>, Seq2SeqError> {
        let nb = cfg.num_beams;
        let batch = mask.len();
        let max_len = cfg.effective_max_length();
        let prompt = 1usize;
        let keep = 2.max(1 + cfg.eos_token_ids.len()) * nb;
        let lp = cfg.length_penalty;
        let mut state = DecoderState::new(hidden, mask, nb);
        let start = vec![cfg.decoder_start_token_id];
        let mut running = vec![start.clone(); batch * nb];
        let mut running_scores: Vec<f32> = (0..batch * nb)
            .map(|i| if i % nb == 0 { 0.0 } else { -1e9 })
            .collect();
        let mut finished: Vec<Vec<Hypothesis>> = vec![
            vec![
                Hypothesis {
                    seq: start.clone(),
                    score: -1e9,
                    done: false,
                };
                nb
            ];
            batch
        ];
        let mut unsatisfied = vec![true; batch];
        let mut feed = running.clone();
        let mut cur_len = prompt;
        loop {
            let logits = self.step(&mut state, &feed)?;
            let vocab = *logits.shape.last().unwrap_or(&0) as usize;
            let mut all_hit = true;
            let mut next_running = Vec::with_capacity(batch * nb);
            let mut next_scores = Vec::with_capacity(batch * nb);
            let mut from_rows = Vec::with_capacity(batch * nb);
            for b in 0..batch {
                // Every beam's log-probabilities, processed, plus the beam's score.
                let mut acc = Vec::with_capacity(nb * vocab);
                for beam in 0..nb {
                    let row = b * nb + beam;
                    let mut lp_row = log_softmax(last_row(&logits, row));
                    process(cfg, &running[row], max_len, &mut lp_row);
                    acc.extend(lp_row.into_iter().map(|v| v + running_scores[row]));
                }
                let top = top_k(&acc, keep);
                let cands: Vec<(f32, usize, Vec<i64>, bool)> = top
                    .iter()
                    .map(|&i| {
                        let (beam, token) = (i / vocab, (i % vocab) as i64);
                        let mut seq = running[b * nb + beam].clone();
                        seq.push(token);
                        let hit = cfg.eos_token_ids.contains(&token) || cur_len + 1 >= max_len;
                        (acc[i], b * nb + beam, seq, hit)
                    })
                    .collect();
                all_hit &= cands.iter().all(|c| c.3);
                // The best unfinished continuations run on.
                let run_scores: Vec<f32> = cands
                    .iter()
                    .map(|c| c.0 + if c.3 { -1e9 } else { 0.0 })
                    .collect();
                for j in top_k(&run_scores, nb) {
                    next_running.push(cands[j].2.clone());
                    next_scores.push(run_scores[j]);
                    from_rows.push(cands[j].1);
                }
                // Finished ones among the top `nb` join the hypotheses if good enough.
                let div = ((cur_len + 1 - prompt) as f64).powf(lp) as f32;
                let full =
                    finished[b].iter().all(|h| h.done) && cfg.early_stopping == EarlyStopping::Done;
                let mut merged = finished[b].clone();
                for (j, c) in cands.iter().enumerate() {
                    let just = c.3 && j < nb;
                    let mut score = c.0 / div;
                    for penalty in [full, !unsatisfied[b], !just] {
                        if penalty {
                            score += -1e9;
                        }
                    }
                    merged.push(Hypothesis {
                        seq: c.2.clone(),
                        score,
                        done: just,
                    });
                }
                let scores: Vec<f32> = merged.iter().map(|h| h.score).collect();
                finished[b] = top_k(&scores, nb)
                    .into_iter()
                    .map(|i| merged[i].clone())
                    .collect();
            }
            state.reorder_beams(&from_rows);
            running = next_running;
            running_scores = next_scores;
            cur_len += 1;
            for b in 0..batch {
                let best_len = if cfg.early_stopping == EarlyStopping::Never && lp > 0.0 {
                    max_len - prompt
                } else {
                    cur_len - prompt
                };
                let best = running_scores[b * nb] / (best_len as f64).powf(lp) as f32;
                let worst = finished[b]
                    .iter()
                    .map(|h| h.score)
                    .fold(f32::INFINITY, f32::min);
                let improvable = finished[b]
                    .iter()
                    .any(|h| best > if h.done { worst } else { -1e9 });
                unsatisfied[b] &= improvable;
            }
            let all_done = finished.iter().flatten().all(|h| h.done);
            let open = !(all_done && cfg.early_stopping == EarlyStopping::Done);
            if !(unsatisfied.iter().any(|&u| u) && open && !all_hit) {
                break;
            }
            feed = last_tokens(&running);
        }
        // transformers fills with `pad_token_id or eos_token_id[0]`: a pad id of 0 is falsy.
        let fill = match (cfg.pad_token_id, cfg.eos_token_ids.first()) {
            (_, None) => -1,
            (Some(p), _) if p != 0 => p,
            (_, Some(&e)) => e,
        };
        let len = finished
            .iter()
            .map(|h| h[0].seq.len())
            .max()
            .unwrap_or(prompt);
        Ok(finished
            .into_iter()
            .map(|h| {
                let mut s = h.into_iter().next().map(|h| h.seq).unwrap_or_default();
                s.resize(len, fill);
                s
            })
            .collect())
    }
}

/// A beam-search hypothesis: its sequence, score and whether it has finished.
#[derive(Debug, Clone)]
struct Hypothesis {
    seq: Vec<i64>,
    score: f32,
    done: bool,
}

/// Each sequence's last token, as the next decoder call's `[rows, 1]` input.
fn last_tokens(seqs: &[Vec<i64>]) -> Vec<Vec<i64>> {
    seqs.iter()
        .map(|s| s.last().map(|&t| vec![t]).unwrap_or_default())
        .collect()
}

fn matrix(rows: &[Vec<i64>]) -> I64Tensor {
    I64Tensor {
        shape: vec![rows.len() as i64, rows.first().map_or(0, Vec::len) as i64],
        data: rows.iter().flatten().copied().collect(),
    }
}

/// Row `r`'s logits at the last position of `[rows, steps, vocab]` logits.
fn last_row(logits: &F32Tensor, r: usize) -> &[f32] {
    let (steps, vocab) = (logits.shape[1] as usize, logits.shape[2] as usize);
    let at = (r * steps + steps - 1) * vocab;
    &logits.data[at..at + vocab]
}

/// `log_softmax` in float32 (the sum of exponentials accumulated in float64).
fn log_softmax(x: &[f32]) -> Vec<f32> {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = x.iter().map(|&v| f64::from(v - max).exp()).sum();
    let log_sum = sum.ln() as f32;
    x.iter().map(|&v| v - max - log_sum).collect()
}

/// Indices of the `k` largest values, largest first; ties keep the lower index first.
fn top_k(x: &[f32], k: usize) -> Vec<usize> {
    // A total order (ties by index), so selecting then sorting the first k equals a full sort.
    let order = |a: &usize, b: &usize| x[*b].total_cmp(&x[*a]).then(a.cmp(b));
    let mut idx: Vec<usize> = (0..x.len()).collect();
    if k < idx.len() {
        idx.select_nth_unstable_by(k, order);
        idx.truncate(k);
    }
    idx.sort_by(order);
    idx
}

/// transformers' logits processors for one row whose decoder sequence is `seq`, in
/// `_get_logits_processor`'s order: no-repeat n-grams, bad words, min length, forced BOS,
/// forced EOS.
fn process(cfg: &Seq2SeqConfig, seq: &[i64], max_len: usize, scores: &mut [f32]) {
    let cur = seq.len();
    let ban = |id: i64, scores: &mut [f32]| {
        if let Some(s) = usize::try_from(id).ok().and_then(|i| scores.get_mut(i)) {
            *s = f32::NEG_INFINITY;
        }
    };
    let n = cfg.no_repeat_ngram_size;
    if n > 0 && cur + 1 >= n {
        let tail = &seq[cur + 1 - n..];
        for w in seq.windows(n) {
            if w[..n - 1] == *tail {
                ban(w[n - 1], scores);
            }
        }
    }
    for &id in &cfg.bad_words_ids {
        // `NoBadWordsLogitsProcessor` never bans an end-of-sequence id.
        if !cfg.eos_token_ids.contains(&id) {
            ban(id, scores);
        }
    }
    if cur < cfg.min_length {
        for &id in &cfg.eos_token_ids {
            ban(id, scores);
        }
    }
    let force = |ids: &[i64], scores: &mut [f32]| {
        for s in scores.iter_mut() {
            *s = f32::NEG_INFINITY;
        }
        for &id in ids {
            if let Some(s) = usize::try_from(id).ok().and_then(|i| scores.get_mut(i)) {
                *s = 0.0;
            }
        }
    };
    if cur == 1
        && let Some(bos) = cfg.forced_bos_token_id
    {
        force(&[bos], scores);
    }
    if cur + 1 == max_len && !cfg.forced_eos_token_ids.is_empty() {
        force(&cfg.forced_eos_token_ids, scores);
    }
}

/// The key the pipeline answers under: `translation_text`, `summary_text` or
/// `generated_text`.
pub fn answer_key(task: &str) -> &'static str {
    if task.starts_with("translation") {
        "translation_text"
    } else if task == "summarization" {
        "summary_text"
    } else {
        "generated_text"
    }
}

/// Answers `text` as transformers' translation / summarization / text2text-generation
/// pipeline for `task` does with the export in `model`'s folder: the task's
/// `task_specific_params` (its `prefix` before the text, its generation settings over
/// the folder's generation config), then `overrides` (the caller's generate arguments), the
/// text tokenized with special tokens, generated, decoded without special tokens.
pub fn run_text2text(
    model: &mut Seq2Seq,
    tok: &TextTokenizer,
    task: &str,
    text: &str,
    overrides: &Map<String, Value>,
) -> Result<Answer, Seq2SeqError> {
    let config = read_json(&model.dir.join("config.json"))?;
    let mut params = config
        .get("task_specific_params")
        .and_then(|p| p.get(task))
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default();
    let prefix = match params.remove("prefix") {
        Some(Value::String(p)) => p,
        _ => config
            .get("prefix")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string(),
    };
    let mut cfg = Seq2SeqConfig::from_folder(&model.dir)?;
    cfg.apply(&params)?;
    cfg.apply(overrides)?;
    let enc = tok.encode(format!("{prefix}{text}").as_str())?;
    let ids: Vec<i64> = enc.get_ids().iter().map(|&i| i64::from(i)).collect();
    if ids.is_empty() {
        return Err(GenerateError::EmptyPrompt.into());
    }
    let mask = vec![vec![1; ids.len()]];
    let out = model.generate(&[ids], &mask, &cfg)?;
    let generated: Vec<u32> = out
        .first()
        .into_iter()
        .flatten()
        .filter_map(|&t| u32::try_from(t).ok())
        .collect();
    let answer = tok.decode(&generated, true)?;
    let key = answer_key(task);
    Ok(Answer {
        text: format!("{answer}\n"),
        json: json!([{ key: answer }]),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> Seq2SeqConfig {
        Seq2SeqConfig {
            eos_token_ids: vec![1],
            ..Seq2SeqConfig::default()
        }
    }

    #[test]
    fn no_repeat_ngram_bans_the_completing_token() {
        let c = Seq2SeqConfig {
            no_repeat_ngram_size: 3,
            ..cfg()
        };
        let mut s = vec![0.0; 8];
        // [0 5 6 7 5 6]: the 3-gram (5, 6, 7) exists, so 7 is banned after "5 6".
        process(&c, &[0, 5, 6, 7, 5, 6], 20, &mut s);
        assert_eq!(s[7], f32::NEG_INFINITY);
        assert_eq!(s.iter().filter(|v| v.is_infinite()).count(), 1);
    }

    #[test]
    fn forced_tokens_min_length_and_bad_words() {
        let c = Seq2SeqConfig {
            forced_bos_token_id: Some(3),
            forced_eos_token_ids: vec![1],
            min_length: 3,
            bad_words_ids: vec![4, 1],
            ..cfg()
        };
        let mut s = vec![0.5; 6];
        process(&c, &[0], 10, &mut s);
        assert_eq!(argmax(&s), 3);
        let mut s = vec![0.5; 6];
        process(&c, &[0, 3], 10, &mut s);
        assert_eq!(
            (s[1], s[4], s[2]),
            (f32::NEG_INFINITY, f32::NEG_INFINITY, 0.5)
        );
        let mut s = vec![0.5; 6];
        process(&c, &[0, 3, 2, 2, 2, 2, 2, 2, 2], 10, &mut s);
        assert_eq!(argmax(&s), 1);
    }

    #[test]
    fn config_fields_and_unsupported_ones() {
        let mut c = cfg();
        let fields = json!({"num_beams": 4, "early_stopping": "never", "eos_token_id": [1, 2],
            "bad_words_ids": [[7]], "max_new_tokens": 5, "temperature": 0.7});
        c.apply(fields.as_object().expect("object"))
            .expect("valid fields");
        assert_eq!(c.num_beams, 4);
        assert_eq!(c.early_stopping, EarlyStopping::Never);
        assert_eq!(c.eos_token_ids, vec![1, 2]);
        assert_eq!(c.effective_max_length(), 6);
        for bad in [
            json!({"do_sample": true}),
            json!({"repetition_penalty": 1.2}),
            json!({"bad_words_ids": [[1, 2]]}),
            json!({"early_stopping": "sometimes"}),
        ] {
            assert!(c.apply(bad.as_object().expect("object")).is_err(), "{bad}");
        }
    }

    #[test]
    fn top_k_is_stable_on_ties() {
        assert_eq!(top_k(&[1.0, 3.0, 3.0, -1.0], 3), vec![1, 2, 0]);
    }
}
