//! What `ferry export` records in an ONNX model's `metadata_props` so that `ferry run` can
//! use the model without its checkpoint at hand: the task, the architecture, where the
//! checkpoint (and its tokenizer) came from, class labels and the end-of-sequence ids.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Key of the exported task (optimum's name).
const TASK: &str = "ferry.task";
/// Key of the checkpoint's `model_type`.
const MODEL_TYPE: &str = "ferry.model_type";
/// Key of the absolute checkpoint directory.
const SOURCE: &str = "ferry.source";
/// Key of `id2label` as a JSON object.
const ID2LABEL: &str = "ferry.id2label";
/// Key of `problem_type`, when the config sets one.
const PROBLEM_TYPE: &str = "ferry.problem_type";
/// Key of the end-of-sequence token ids generation stops at, as a JSON array.
const EOS_TOKEN_ID: &str = "ferry.eos_token_id";
/// Key of the sequence length at which generation recomputes its cache (Phi-3:
/// `original_max_position_embeddings + 1`, where LongRoPE switches to its long factors).
const RESET_CACHE_AT: &str = "ferry.generation.reset_cache_at";

/// Token ids from a config value that is an id or a list of ids.
fn ids(v: Option<&serde_json::Value>) -> Vec<i64> {
    match v {
        Some(serde_json::Value::Number(n)) => n.as_i64().into_iter().collect(),
        Some(serde_json::Value::Array(a)) => a.iter().filter_map(|x| x.as_i64()).collect(),
        _ => Vec::new(),
    }
}

/// The metadata `ferry export` writes for a checkpoint in `dir` exported for `task`.
pub(crate) fn for_export(
    dir: &Path,
    config: &ferry_ir::ModelConfig,
    task: &str,
) -> Vec<(String, String)> {
    let source = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    let mut m = vec![
        (TASK.to_string(), task.to_string()),
        (MODEL_TYPE.to_string(), config.model_type.clone()),
        (SOURCE.to_string(), source.display().to_string()),
    ];
    if !config.id2label.is_empty() {
        let labels = serde_json::to_string(&config.id2label).unwrap_or_default();
        m.push((ID2LABEL.to_string(), labels));
    }
    if let Some(p) = config.raw.get("problem_type").and_then(|v| v.as_str()) {
        m.push((PROBLEM_TYPE.to_string(), p.to_string()));
    }
    // generate() stops at generation_config.json's eos_token_id, else config.json's.
    let generation = std::fs::read_to_string(dir.join("generation_config.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok());
    let mut eos = ids(generation.as_ref().and_then(|g| g.get("eos_token_id")));
    if eos.is_empty() {
        eos = ids(config.raw.get("eos_token_id"));
    }
    if !eos.is_empty() {
        m.push((
            EOS_TOKEN_ID.to_string(),
            serde_json::to_string(&eos).unwrap_or_default(),
        ));
    }
    // Phi3ForCausalLM.prepare_inputs_for_generation drops the cache once when the sequence
    // first reaches original_max_position_embeddings + 1.
    if config.model_type == "phi3"
        && let Some(n) = config
            .raw
            .get("original_max_position_embeddings")
            .and_then(serde_json::Value::as_u64)
    {
        m.push((RESET_CACHE_AT.to_string(), (n + 1).to_string()));
    }
    m
}

/// The ferry metadata of an exported model (all empty for models ferry did not export).
#[derive(Debug, Clone, Default)]
pub(crate) struct ModelMeta {
    /// Task exported.
    pub task: Option<String>,
    /// Checkpoint directory exported from.
    pub source: Option<PathBuf>,
    /// Class labels by id.
    pub id2label: BTreeMap<usize, String>,
    /// `problem_type` of a classification config.
    pub problem_type: Option<String>,
    /// End-of-sequence ids.
    pub eos_token_ids: Vec<u32>,
    /// Sequence length at which generation recomputes its cache (see
    /// `ferry_pipeline::GenerationConfig::reset_cache_at`).
    pub reset_cache_at: Option<usize>,
}

impl ModelMeta {
    /// Reads the metadata of the ONNX model at `path` (only its top-level fields).
    pub fn read(path: &Path) -> Result<Self, String> {
        let props = ferry_onnx::read_metadata(path).map_err(|e| e.to_string())?;
        let mut meta = ModelMeta::default();
        for (k, v) in props {
            match k.as_str() {
                TASK => meta.task = Some(v),
                SOURCE => meta.source = Some(PathBuf::from(v)),
                PROBLEM_TYPE => meta.problem_type = Some(v),
                ID2LABEL => {
                    let map: BTreeMap<String, String> = serde_json::from_str(&v)
                        .map_err(|e| format!("{}: bad {ID2LABEL} metadata: {e}", path.display()))?;
                    meta.id2label = map
                        .into_iter()
                        .filter_map(|(i, l)| i.parse().ok().map(|i| (i, l)))
                        .collect();
                }
                EOS_TOKEN_ID => {
                    let v: serde_json::Value = serde_json::from_str(&v).map_err(|e| {
                        format!("{}: bad {EOS_TOKEN_ID} metadata: {e}", path.display())
                    })?;
                    meta.eos_token_ids = ids(Some(&v))
                        .into_iter()
                        .filter_map(|i| u32::try_from(i).ok())
                        .collect();
                }
                RESET_CACHE_AT => meta.reset_cache_at = v.parse().ok(),
                _ => {}
            }
        }
        Ok(meta)
    }
}
