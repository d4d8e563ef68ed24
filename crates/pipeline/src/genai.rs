//! The folder onnxruntime-genai loads (`og.Model(dir)`): a decoder model, its
//! `genai_config.json` and the checkpoint's tokenizer files.
//!
//! `genai_config.json` is built as onnxruntime-genai's model builder (0.18,
//! `builders/base.py`, `make_genai_config`) builds it from `config.json` and
//! `generation_config.json`:
//!
//! * `model`: `type` (the `model_type`), `context_length` (`seq_length`, else
//!   `max_position_embeddings`), `vocab_size`, `bos_token_id` (default 1), `eos_token_id`
//!   (required; the tokenizer's `eos_token` is added when the configs name another one, as
//!   the builder does for chat models), `pad_token_id` (default: the first eos id), and
//!   `decoder`: the model's `filename`, `head_size` (`head_dim`, else hidden / heads),
//!   `hidden_size`, `num_attention_heads`, `num_hidden_layers`, `num_key_value_heads`,
//!   `session_options`, and the `inputs`/`outputs` names read from the model itself
//!   (`input_ids`, `attention_mask`, `position_ids` when the graph has it, the cache as
//!   `past_key_values.%d.key` patterns).
//! * `search`: the generation defaults (`do_sample`, `temperature`, `top_k`, `top_p`,
//!   `num_beams`, `repetition_penalty`, …) from `generation_config.json`, else
//!   `config.json`, else transformers' defaults; `max_length` = `context_length`;
//!   `past_present_share_buffer` only when the attention is `GroupQueryAttention`, the one
//!   kernel that reads and writes a cache buffer of the full context length in place, and
//!   nothing in the graph depends on the cache's length ([`shares_cache_buffer`]); with
//!   optimum's layout the cache grows by concatenation, so it must be `false`.
//!
//! `generation_config.json` is optional (the builder falls back to `config.json` too).

use std::path::{Path, PathBuf};

use serde_json::{Map, Value, json};

/// Why a genai folder could not be described or written.
#[derive(Debug, thiserror::Error)]
pub enum GenaiError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A configuration file is not valid JSON.
    #[error("{path}: invalid JSON: {source}")]
    Json {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: serde_json::Error,
    },
    /// The model or its configuration cannot be described to onnxruntime-genai.
    #[error("{0}")]
    Unsupported(String),
}

/// The checkpoint files copied beside the model when present: what `tokenizer.save_pretrained`
/// writes for the tokenizers onnxruntime-genai reads (`og.Tokenizer`), and the chat template.
pub const TOKENIZER_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
];

/// onnxruntime-genai's model `type` for a transformers `model_type` ferry exports as a
/// decoder LLM (onnxruntime-genai 0.18's list of LLM types), or `None`.
pub fn genai_type(model_type: &str) -> Option<&'static str> {
    [
        "llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "gemma2",
    ]
    .into_iter()
    .find(|t| *t == model_type)
}

/// The decoder graph as onnxruntime-genai will see it.
#[derive(Debug, Clone)]
pub struct DecoderModel {
    /// File name of the model inside the folder (`model.onnx`).
    pub filename: String,
    /// Graph input names.
    pub inputs: Vec<String>,
    /// Graph output names.
    pub outputs: Vec<String>,
    /// Whether the attention reads and writes one full-context cache buffer in place (past
    /// and present shared): ONNX Runtime's `GroupQueryAttention` taking its lengths from
    /// `attention_mask` alone. See [`shares_cache_buffer`].
    pub shared_cache_buffer: bool,
}

/// Whether onnxruntime-genai may feed `graph` one full-context cache buffer shared by past
/// and present: every attention is `GroupQueryAttention` (there is at least one) and none
/// takes an `attention_bias` (input 10). A bias is computed in the graph from the cache's
/// current length (ferry's exact mask: padding, sliding window), which a full-context
/// buffer would break; without it the kernel takes its lengths from `seqlens_k` and
/// `total_sequence_length`, which come from `attention_mask`.
pub fn shares_cache_buffer(graph: &ferry_ir::Graph) -> bool {
    let mut gqa = graph
        .nodes
        .iter()
        .filter(|n| n.op_type == "GroupQueryAttention")
        .peekable();
    gqa.peek().is_some()
        && gqa.all(|n| n.inputs.get(10).is_none_or(|b| b.is_empty()))
        && !graph.nodes.iter().any(|n| {
            matches!(
                n.op_type.as_str(),
                "Attention" | "MultiHeadAttention" | "Softmax"
            )
        })
}

/// The rows of the constant cos/sin caches onnxruntime-genai's GroupQueryAttention form
/// needs (the context length, `seq_length` else `max_position_embeddings`), or `None` when
/// that form does not fit the checkpoint: a layer may attend within a sliding window shorter
/// than the context (the window lives in the export's mask, which that form drops), or the
/// config has no context length. `layer_types` decides where the config lists them; else a
/// `sliding_window` counts unless the model is a Qwen one without `use_sliding_window`.
pub fn genai_attention_positions(config: &ferry_ir::ModelConfig) -> Option<i64> {
    let raw = &config.raw;
    let context = uint(raw, "seq_length").or_else(|| uint(raw, "max_position_embeddings"))?;
    let window = uint(raw, "sliding_window").filter(|w| *w < context);
    let sliding = match (window, raw.get("layer_types").and_then(Value::as_array)) {
        (None, _) => false,
        (Some(_), Some(types)) => types.iter().any(|t| t == "sliding_attention"),
        (Some(_), None) => {
            !config.model_type.starts_with("qwen")
                || raw.get("use_sliding_window").and_then(Value::as_bool) == Some(true)
        }
    };
    (!sliding).then_some(i64::try_from(context).ok()?)
}

fn read_json(path: &Path) -> Result<Value, GenaiError> {
    let text = std::fs::read_to_string(path).map_err(|source| GenaiError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|source| GenaiError::Json {
        path: path.to_path_buf(),
        source,
    })
}

/// `name` with its first run of digits replaced by `%d`, and that number.
fn layer_pattern(name: &str) -> Option<(String, usize)> {
    let start = name.find(|c: char| c.is_ascii_digit())?;
    let len = name[start..]
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(name.len() - start);
    let n = name[start..start + len].parse().ok()?;
    Some((format!("{}%d{}", &name[..start], &name[start + len..]), n))
}

/// The `%d` pattern of the per-layer names among `names` that start with `prefix` and end
/// with `suffix`; checks that layers `0..layers` are all there.
fn cache_pattern(
    names: &[String],
    prefix: &str,
    suffix: &str,
    layers: usize,
) -> Result<String, GenaiError> {
    let mut pattern: Option<String> = None;
    let mut seen = vec![false; layers];
    for name in names
        .iter()
        .filter(|n| n.starts_with(prefix) && n.ends_with(suffix))
    {
        let Some((p, i)) = layer_pattern(name) else {
            continue;
        };
        if pattern.as_ref().is_some_and(|q| *q != p) || i >= layers {
            return Err(GenaiError::Unsupported(format!(
                "cache name `{name}` does not fit {layers} layers named like {}",
                pattern.unwrap_or(p)
            )));
        }
        seen[i] = true;
        pattern = Some(p);
    }
    match pattern {
        Some(p) if seen.iter().all(|&s| s) => Ok(p),
        _ => Err(GenaiError::Unsupported(format!(
            "the model has no `{prefix}<layer>{suffix}` cache for each of its {layers} layers \
             (onnxruntime-genai needs the decoder with its key/value cache)"
        ))),
    }
}

fn uint(config: &Value, key: &str) -> Option<u64> {
    config.get(key).and_then(Value::as_u64)
}

fn required(config: &Value, key: &str) -> Result<u64, GenaiError> {
    uint(config, key).ok_or_else(|| {
        GenaiError::Unsupported(format!("config.json has no `{key}` (a positive integer)"))
    })
}

/// The id of the tokenizer's `eos_token` (from `tokenizer_config.json`, looked up in
/// `tokenizer.json`'s added tokens), when both files are in `dir`.
fn tokenizer_eos(dir: &Path) -> Option<u64> {
    let cfg = read_json(&dir.join("tokenizer_config.json")).ok()?;
    let eos = cfg.get("eos_token")?;
    let text = eos
        .as_str()
        .or_else(|| eos.get("content").and_then(Value::as_str))?;
    let tok = read_json(&dir.join("tokenizer.json")).ok()?;
    tok.get("added_tokens")?
        .as_array()?
        .iter()
        .find(|t| t.get("content").and_then(Value::as_str) == Some(text))
        .and_then(|t| t.get("id"))
        .and_then(Value::as_u64)
}

/// `genai_config.json` for `model` exported from the checkpoint in `dir` (its
/// `config.json`, optional `generation_config.json` and tokenizer files).
pub fn genai_config(dir: &Path, model: &DecoderModel) -> Result<Value, GenaiError> {
    let config = read_json(&dir.join("config.json"))?;
    let gen_path = dir.join("generation_config.json");
    let generation = if gen_path.is_file() {
        read_json(&gen_path)?
    } else {
        Value::Object(Map::new())
    };
    let model_type = config
        .get("model_type")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let Some(kind) = genai_type(model_type) else {
        return Err(GenaiError::Unsupported(format!(
            "onnxruntime-genai folders are written for decoder LLMs ({}); `{model_type}` is not one",
            [
                "llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "gemma2"
            ]
            .join(", ")
        )));
    };
    let hidden = required(&config, "hidden_size")?;
    let heads = required(&config, "num_attention_heads")?;
    let layers = required(&config, "num_hidden_layers")?;
    let vocab = required(&config, "vocab_size")?;
    if heads == 0 {
        return Err(GenaiError::Unsupported(
            "config.json: num_attention_heads is 0".into(),
        ));
    }
    let kv_heads = uint(&config, "num_key_value_heads").unwrap_or(heads);
    let head_size = uint(&config, "head_dim").unwrap_or(hidden / heads);
    let context = uint(&config, "seq_length")
        .or_else(|| uint(&config, "max_position_embeddings"))
        .ok_or_else(|| {
            GenaiError::Unsupported("config.json has no `max_position_embeddings`".into())
        })?;

    // generation_config.json first, as the builder overrides config.json with it.
    let pick = |key: &str| -> Option<Value> {
        [&generation, &config]
            .into_iter()
            .filter_map(|c| c.get(key))
            .find(|v| !v.is_null())
            .cloned()
    };
    let ids = |v: &Value| -> Option<Vec<u64>> {
        match v {
            Value::Array(a) => a.iter().map(Value::as_u64).collect(),
            v => v.as_u64().map(|i| vec![i]),
        }
    };
    let bos = pick("bos_token_id").unwrap_or(json!(1));
    let eos = pick("eos_token_id").ok_or_else(|| {
        GenaiError::Unsupported("no eos_token_id in generation_config.json or config.json".into())
    })?;
    let mut eos_ids = ids(&eos).ok_or_else(|| {
        GenaiError::Unsupported(format!("eos_token_id {eos} is not an id or a list of ids"))
    })?;
    if eos_ids.is_empty() {
        return Err(GenaiError::Unsupported(
            "eos_token_id is an empty list".into(),
        ));
    }
    let eos = match tokenizer_eos(dir) {
        Some(turn_end) if !eos_ids.contains(&turn_end) => {
            eos_ids.insert(0, turn_end);
            json!(eos_ids)
        }
        _ => eos,
    };
    let pad = pick("pad_token_id").unwrap_or(json!(eos_ids[0]));

    let mut inputs = Map::new();
    for name in ["input_ids", "attention_mask", "position_ids"] {
        if model.inputs.iter().any(|i| i == name) {
            inputs.insert(name.into(), json!(name));
        }
    }
    if !inputs.contains_key("input_ids") {
        return Err(GenaiError::Unsupported(
            "the model has no `input_ids` input".into(),
        ));
    }
    let layers_us = usize::try_from(layers)
        .map_err(|_| GenaiError::Unsupported(format!("num_hidden_layers {layers}")))?;
    inputs.insert(
        "past_key_names".into(),
        json!(cache_pattern(&model.inputs, "past", ".key", layers_us)?),
    );
    inputs.insert(
        "past_value_names".into(),
        json!(cache_pattern(&model.inputs, "past", ".value", layers_us)?),
    );
    if !model.outputs.iter().any(|o| o == "logits") {
        return Err(GenaiError::Unsupported(
            "the model has no `logits` output".into(),
        ));
    }
    let outputs = json!({
        "logits": "logits",
        "present_key_names": cache_pattern(&model.outputs, "present", ".key", layers_us)?,
        "present_value_names": cache_pattern(&model.outputs, "present", ".value", layers_us)?,
    });

    let search_default = |key: &str, default: Value| pick(key).unwrap_or(default);
    let search = json!({
        "diversity_penalty": search_default("diversity_penalty", json!(0.0)),
        "do_sample": search_default("do_sample", json!(false)),
        "early_stopping": true,
        "length_penalty": search_default("length_penalty", json!(1.0)),
        "max_length": context,
        "min_length": 0,
        "no_repeat_ngram_size": search_default("no_repeat_ngram_size", json!(0)),
        "num_beams": search_default("num_beams", json!(1)),
        "num_return_sequences": search_default("num_return_sequences", json!(1)),
        "past_present_share_buffer": model.shared_cache_buffer,
        "repetition_penalty": search_default("repetition_penalty", json!(1.0)),
        "temperature": search_default("temperature", json!(1.0)),
        "top_k": search_default("top_k", json!(50)),
        "top_p": search_default("top_p", json!(1.0)),
    });
    Ok(json!({
        "model": {
            "bos_token_id": bos,
            "context_length": context,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": model.filename,
                "head_size": head_size,
                "hidden_size": hidden,
                "inputs": inputs,
                "outputs": outputs,
                "num_attention_heads": heads,
                "num_hidden_layers": layers,
                "num_key_value_heads": kv_heads,
            },
            "eos_token_id": eos,
            "pad_token_id": pad,
            "type": kind,
            "vocab_size": vocab,
        },
        "search": search,
    }))
}

/// Writes `genai_config.json` (`config`) into `out_dir` and copies the checkpoint's
/// [`TOKENIZER_FILES`] from `dir`; returns the files written, so that a caller can remove
/// them on a later failure. On an error, the files this call wrote are removed again.
pub fn write_folder_files(
    dir: &Path,
    out_dir: &Path,
    config: &Value,
) -> Result<Vec<PathBuf>, GenaiError> {
    let mut written = Vec::new();
    let result = (|| {
        let target = out_dir.join("genai_config.json");
        let text = serde_json::to_string_pretty(config).map_err(|source| GenaiError::Json {
            path: target.clone(),
            source,
        })?;
        write_atomic(&target, text.as_bytes())?;
        written.push(target);
        for name in TOKENIZER_FILES {
            let src = dir.join(name);
            if !src.is_file() {
                continue;
            }
            let bytes = std::fs::read(&src).map_err(|source| GenaiError::Io {
                path: src.clone(),
                source,
            })?;
            let target = out_dir.join(name);
            write_atomic(&target, &bytes)?;
            written.push(target);
        }
        Ok(())
    })();
    match result {
        Ok(()) => Ok(written),
        Err(e) => {
            for f in &written {
                let _ = std::fs::remove_file(f);
            }
            Err(e)
        }
    }
}

/// Writes `bytes` to a temporary file beside `path`, then renames it over `path`.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), GenaiError> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.tmp"));
    let io = |source| GenaiError::Io {
        path: path.to_path_buf(),
        source,
    };
    std::fs::write(&tmp, bytes).map_err(io)?;
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        io(e)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn genai_attention_form_only_without_a_shorter_window() {
        let positions = |json: &str| {
            let c = ferry_ir::ModelConfig::from_json(json).expect("config");
            genai_attention_positions(&c)
        };
        let qwen = r#"{"model_type":"qwen2","max_position_embeddings":64,"sliding_window":8"#;
        assert_eq!(positions(&format!("{qwen}}}")), Some(64));
        assert_eq!(
            positions(&format!(r#"{qwen},"use_sliding_window":true}}"#)),
            None
        );
        let mistral = r#"{"model_type":"mistral","max_position_embeddings":64"#;
        assert_eq!(
            positions(&format!(r#"{mistral},"sliding_window":8}}"#)),
            None
        );
        assert_eq!(
            positions(&format!(r#"{mistral},"sliding_window":64}}"#)),
            Some(64)
        );
        assert_eq!(
            positions(&format!(r#"{mistral},"seq_length":32}}"#)),
            Some(32)
        );
        let types = r#""layer_types":["full_attention","sliding_attention"]"#;
        assert_eq!(
            positions(&format!(r#"{mistral},"sliding_window":8,{types}}}"#)),
            None
        );
        assert_eq!(positions(r#"{"model_type":"llama"}"#), None);
    }

    fn model(layers: usize, position_ids: bool, gqa: bool) -> DecoderModel {
        let mut inputs = vec!["input_ids".to_string(), "attention_mask".to_string()];
        if position_ids {
            inputs.push("position_ids".into());
        }
        let mut outputs = vec!["logits".to_string()];
        for i in 0..layers {
            inputs.push(format!("past_key_values.{i}.key"));
            inputs.push(format!("past_key_values.{i}.value"));
            outputs.push(format!("present.{i}.key"));
            outputs.push(format!("present.{i}.value"));
        }
        DecoderModel {
            filename: "model.onnx".into(),
            inputs,
            outputs,
            shared_cache_buffer: gqa,
        }
    }

    fn checkpoint(config: &str, generation: Option<&str>) -> tempfile::TempDir {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("config.json"), config).expect("config");
        if let Some(g) = generation {
            std::fs::write(dir.path().join("generation_config.json"), g).expect("gen");
        }
        dir
    }

    const QWEN: &str = r#"{"model_type":"qwen2","hidden_size":896,"num_attention_heads":14,
        "num_key_value_heads":2,"num_hidden_layers":2,"vocab_size":151936,
        "max_position_embeddings":32768,"bos_token_id":151643,"eos_token_id":151645}"#;

    #[test]
    fn config_from_config_and_generation_config() -> Result<(), GenaiError> {
        let dir = checkpoint(
            QWEN,
            Some(
                r#"{"eos_token_id":[151645,151643],"pad_token_id":151643,"do_sample":true,"temperature":0.7,"top_k":20,"top_p":0.8,"repetition_penalty":1.05}"#,
            ),
        );
        let c = genai_config(dir.path(), &model(2, true, false))?;
        let m = &c["model"];
        assert_eq!(m["type"], "qwen2");
        assert_eq!(m["context_length"], 32768);
        assert_eq!(m["eos_token_id"], json!([151645, 151643]));
        assert_eq!(m["pad_token_id"], 151643);
        assert_eq!(m["bos_token_id"], 151643);
        let d = &m["decoder"];
        assert_eq!(d["head_size"], 64);
        assert_eq!(d["num_key_value_heads"], 2);
        assert_eq!(d["inputs"]["position_ids"], "position_ids");
        assert_eq!(d["inputs"]["past_key_names"], "past_key_values.%d.key");
        assert_eq!(d["outputs"]["present_value_names"], "present.%d.value");
        let s = &c["search"];
        assert_eq!(s["do_sample"], true);
        assert_eq!(s["temperature"], 0.7);
        assert_eq!(s["top_k"], 20);
        assert_eq!(s["repetition_penalty"], 1.05);
        assert_eq!(s["max_length"], 32768);
        assert_eq!(s["past_present_share_buffer"], false);
        Ok(())
    }

    #[test]
    fn without_generation_config_falls_back_to_config() -> Result<(), GenaiError> {
        let dir = checkpoint(QWEN, None);
        let c = genai_config(dir.path(), &model(2, false, true))?;
        assert_eq!(c["model"]["eos_token_id"], 151645);
        assert_eq!(c["model"]["pad_token_id"], 151645);
        assert_eq!(c["search"]["do_sample"], false);
        assert_eq!(c["search"]["top_k"], 50);
        assert_eq!(c["search"]["past_present_share_buffer"], true);
        assert!(
            c["model"]["decoder"]["inputs"]
                .get("position_ids")
                .is_none()
        );
        Ok(())
    }

    #[test]
    fn tokenizer_end_of_turn_joins_eos() -> Result<(), GenaiError> {
        let dir = checkpoint(QWEN.replace("151645", "151643").as_str(), None);
        std::fs::write(
            dir.path().join("tokenizer_config.json"),
            r#"{"eos_token":"<|im_end|>"}"#,
        )
        .expect("write");
        std::fs::write(
            dir.path().join("tokenizer.json"),
            r#"{"added_tokens":[{"id":151643,"content":"<|endoftext|>"},{"id":151645,"content":"<|im_end|>"}]}"#,
        )
        .expect("write");
        let c = genai_config(dir.path(), &model(2, true, false))?;
        assert_eq!(c["model"]["eos_token_id"], json!([151645, 151643]));
        let out = tempfile::tempdir().expect("tempdir");
        let files = write_folder_files(dir.path(), out.path(), &c)?;
        let names: Vec<String> = files
            .iter()
            .filter_map(|f| f.file_name().map(|n| n.to_string_lossy().into_owned()))
            .collect();
        assert_eq!(
            names,
            [
                "genai_config.json",
                "tokenizer.json",
                "tokenizer_config.json"
            ]
        );
        let back = read_json(&out.path().join("genai_config.json"))?;
        assert_eq!(back, c);
        Ok(())
    }

    #[test]
    fn shared_buffer_only_for_group_query_attention_without_bias() {
        use ferry_ir::{Graph, Node};
        let node = |op: &str, inputs: &[&str]| Node {
            name: op.into(),
            op_type: op.into(),
            domain: String::new(),
            inputs: inputs.iter().map(|s| s.to_string()).collect(),
            outputs: vec![format!("{op}_out")],
            attrs: Default::default(),
        };
        let graph = |nodes: Vec<Node>| Graph {
            nodes,
            ..Default::default()
        };
        let plain = ["q", "k", "v", "pk", "pv", "seqlens_k", "total"];
        let mut biased = plain.to_vec();
        biased.extend(["", "", "", "bias"]);
        let mut empty_bias = plain.to_vec();
        empty_bias.extend(["", "", "", ""]);
        assert!(shares_cache_buffer(&graph(vec![node(
            "GroupQueryAttention",
            &plain
        )])));
        assert!(shares_cache_buffer(&graph(vec![node(
            "GroupQueryAttention",
            &empty_bias
        )])));
        assert!(!shares_cache_buffer(&graph(vec![node(
            "GroupQueryAttention",
            &biased
        )])));
        assert!(!shares_cache_buffer(&graph(vec![node("Softmax", &["x"])])));
        assert!(!shares_cache_buffer(&graph(vec![
            node("GroupQueryAttention", &plain),
            node("Softmax", &["x"])
        ])));
    }

    #[test]
    fn bad_models_and_configs_are_errors() {
        let dir = checkpoint(&QWEN.replace("qwen2", "bert"), None);
        let e = genai_config(dir.path(), &model(2, true, false));
        assert!(matches!(e, Err(GenaiError::Unsupported(m)) if m.contains("`bert` is not one")));
        let dir = checkpoint(QWEN, None);
        // One layer's cache missing; no cache at all.
        let mut m = model(2, true, false);
        m.inputs.retain(|i| i != "past_key_values.1.value");
        assert!(genai_config(dir.path(), &m).is_err());
        assert!(genai_config(dir.path(), &model(0, true, false)).is_err());
        let dir = checkpoint(&QWEN.replace(r#","eos_token_id":151645"#, ""), None);
        let e = genai_config(dir.path(), &model(2, true, false));
        assert!(matches!(e, Err(GenaiError::Unsupported(m)) if m.contains("eos_token_id")));
        let dir = checkpoint("{not json", None);
        assert!(matches!(
            genai_config(dir.path(), &model(2, true, false)),
            Err(GenaiError::Json { .. })
        ));
    }
}
