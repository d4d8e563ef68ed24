//! sentence-transformers checkpoints: the modules after the transformer that turn token
//! states into one sentence embedding (`modules.json` → `Pooling`, `Dense`, `Normalize`).
//!
//! [`SentenceModules::read`] reads the JSON files only; the loader adds the `Dense`
//! weights to the checkpoint's weights under [`SentenceDense::weight_prefix`], and the
//! tracer appends the modules to a feature-extraction graph.

use std::path::{Path, PathBuf};

use serde_json::Value;

/// One pooling mode of sentence-transformers' `Pooling` module.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolingMode {
    /// The first attended token's state.
    Cls,
    /// Element-wise maximum over attended tokens.
    Max,
    /// Mean over attended tokens.
    Mean,
    /// Sum over attended tokens divided by the square root of their count.
    MeanSqrtLen,
    /// Mean weighted by position (1, 2, … from the first attended token).
    WeightedMean,
    /// The last attended token's state.
    LastToken,
}

impl PoolingMode {
    /// Every mode with its `pooling_mode` name and legacy `pooling_mode_*` key, in
    /// sentence-transformers' concatenation order.
    pub const ALL: [(PoolingMode, &'static str, &'static str); 6] = [
        (PoolingMode::Cls, "cls", "pooling_mode_cls_token"),
        (PoolingMode::Max, "max", "pooling_mode_max_tokens"),
        (PoolingMode::Mean, "mean", "pooling_mode_mean_tokens"),
        (
            PoolingMode::MeanSqrtLen,
            "mean_sqrt_len_tokens",
            "pooling_mode_mean_sqrt_len_tokens",
        ),
        (
            PoolingMode::WeightedMean,
            "weightedmean",
            "pooling_mode_weightedmean_tokens",
        ),
        (
            PoolingMode::LastToken,
            "lasttoken",
            "pooling_mode_lasttoken",
        ),
    ];

    /// The mode's sentence-transformers name (`mean`).
    pub fn name(self) -> &'static str {
        Self::ALL
            .iter()
            .find(|(m, ..)| *m == self)
            .map_or("mean", |(_, n, _)| n)
    }

    fn parse(name: &str) -> Option<Self> {
        Self::ALL
            .iter()
            .find(|(_, n, _)| *n == name)
            .map(|(m, ..)| *m)
    }
}

/// A `Dense` module: `activation(x @ W^T + b)` (plus a residual when configured).
#[derive(Debug, Clone, PartialEq)]
pub struct SentenceDense {
    /// The module's folder in the checkpoint (`2_Dense`); its weights are named
    /// `{weight_prefix}.linear.weight` etc. in the checkpoint's weights.
    pub weight_prefix: String,
    /// Input width.
    pub in_features: i64,
    /// Output width.
    pub out_features: i64,
    /// Whether `linear` has a bias.
    pub bias: bool,
    /// The activation's class name as saved (`torch.nn.modules.activation.Tanh`).
    pub activation: String,
    /// `use_residual`: the input (or its bias-free `residual` projection) is added.
    pub residual: bool,
}

/// A checkpoint's sentence-transformers modules after the transformer.
#[derive(Debug, Clone, PartialEq)]
pub struct SentenceModules {
    /// Pooling modes, concatenated in this order.
    pub pooling: Vec<PoolingMode>,
    /// Token-state width the pooling module was configured for.
    pub embedding_dimension: Option<i64>,
    /// Dense layers applied to the pooled vector, in order.
    pub dense: Vec<SentenceDense>,
    /// Whether a `Normalize` module L2-normalizes the result.
    pub normalize: bool,
    /// `sentence_bert_config.json`'s `max_seq_length` (the tokenizer's truncation).
    pub max_seq_length: Option<usize>,
}

/// Why a sentence-transformers checkpoint's modules could not be read.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {reason}")]
pub struct SentenceError {
    /// The file at fault.
    pub path: PathBuf,
    /// What is wrong.
    pub reason: String,
}

fn read_json(path: &Path) -> Result<Option<Value>, SentenceError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(SentenceError {
                path: path.to_path_buf(),
                reason: e.to_string(),
            });
        }
    };
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| SentenceError {
            path: path.to_path_buf(),
            reason: format!("not valid JSON: {e}"),
        })
}

impl SentenceModules {
    /// Reads `dir/modules.json` and the module configs it lists; `None` when there is no
    /// modules.json. Modules other than `Transformer`, `Pooling`, `Dense` and `Normalize`,
    /// or ones configured to read other features than the sentence embedding, are errors.
    pub fn read(dir: &Path) -> Result<Option<Self>, SentenceError> {
        let modules_path = dir.join("modules.json");
        let Some(modules) = read_json(&modules_path)? else {
            return Ok(None);
        };
        let bad = |path: &Path, reason: String| SentenceError {
            path: path.to_path_buf(),
            reason,
        };
        let list = modules
            .as_array()
            .ok_or_else(|| bad(&modules_path, "expected a JSON array of modules".into()))?;
        let mut st = SentenceModules {
            pooling: Vec::new(),
            embedding_dimension: None,
            dense: Vec::new(),
            normalize: false,
            max_seq_length: read_json(&dir.join("sentence_bert_config.json"))?
                .and_then(|v| v.get("max_seq_length")?.as_u64())
                .map(|n| n as usize),
        };
        for m in list {
            let kind = m.get("type").and_then(Value::as_str).unwrap_or("");
            let path = m.get("path").and_then(Value::as_str).unwrap_or("");
            let class = kind.rsplit('.').next().unwrap_or("");
            let config_path = dir.join(path).join("config.json");
            let config = || -> Result<Value, SentenceError> {
                read_json(&config_path)?.ok_or_else(|| bad(&config_path, "missing".into()))
            };
            let input = |cfg: &Value| -> Result<(), SentenceError> {
                for key in ["module_input_name", "module_output_name"] {
                    match cfg.get(key).and_then(Value::as_str) {
                        None | Some("sentence_embedding") => {}
                        Some(other) => {
                            return Err(bad(
                                &config_path,
                                format!(
                                    "{class} {key} is `{other}`; ferry supports sentence_embedding only"
                                ),
                            ));
                        }
                    }
                }
                Ok(())
            };
            match class {
                "Transformer" if st.pooling.is_empty() => {}
                "Pooling" if st.pooling.is_empty() => {
                    let cfg = config()?;
                    st.pooling = pooling_modes(&cfg).map_err(|r| bad(&config_path, r))?;
                    st.embedding_dimension = cfg
                        .get("embedding_dimension")
                        .or_else(|| cfg.get("word_embedding_dimension"))
                        .and_then(Value::as_i64);
                }
                "Dense" if !st.pooling.is_empty() && !st.normalize => {
                    let cfg = config()?;
                    input(&cfg)?;
                    let dim = |k: &str| {
                        cfg.get(k)
                            .and_then(Value::as_i64)
                            .ok_or_else(|| bad(&config_path, format!("no `{k}`")))
                    };
                    st.dense.push(SentenceDense {
                        weight_prefix: path.to_string(),
                        in_features: dim("in_features")?,
                        out_features: dim("out_features")?,
                        bias: cfg.get("bias").and_then(Value::as_bool).unwrap_or(true),
                        activation: cfg
                            .get("activation_function")
                            .and_then(Value::as_str)
                            .unwrap_or("torch.nn.modules.activation.Tanh")
                            .to_string(),
                        residual: cfg
                            .get("use_residual")
                            .and_then(Value::as_bool)
                            .unwrap_or(false),
                    });
                }
                "Normalize" if !st.pooling.is_empty() => {
                    if let Some(cfg) = read_json(&config_path)? {
                        input(&cfg)?;
                    }
                    st.normalize = true;
                }
                _ => {
                    return Err(bad(
                        &modules_path,
                        format!(
                            "module `{kind}` (at this place) is not supported; ferry exports Transformer → Pooling → Dense… → Normalize"
                        ),
                    ));
                }
            }
        }
        if st.pooling.is_empty() {
            return Err(bad(&modules_path, "no Pooling module".into()));
        }
        Ok(Some(st))
    }
}

/// The modes of a `Pooling` config: `pooling_mode` (a name or a list), else the legacy
/// `pooling_mode_*` booleans in concatenation order (none set: mean), as
/// sentence-transformers converts them.
fn pooling_modes(cfg: &Value) -> Result<Vec<PoolingMode>, String> {
    let names: Vec<&str> = match cfg.get("pooling_mode") {
        Some(Value::String(s)) => vec![s.as_str()],
        Some(Value::Array(a)) => a.iter().filter_map(Value::as_str).collect(),
        Some(other) => return Err(format!("`pooling_mode` {other} is not a name or a list")),
        None => {
            let on: Vec<&str> = PoolingMode::ALL
                .iter()
                .filter(|(_, _, key)| cfg.get(*key).and_then(Value::as_bool) == Some(true))
                .map(|(_, name, _)| *name)
                .collect();
            if on.is_empty() { vec!["mean"] } else { on }
        }
    };
    names
        .iter()
        .map(|n| PoolingMode::parse(n).ok_or_else(|| format!("unknown pooling mode `{n}`")))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pooling_modes_new_and_legacy_keys() {
        let v = |s: &str| serde_json::from_str::<Value>(s).expect("json");
        assert_eq!(
            pooling_modes(&v(r#"{"pooling_mode": ["mean", "cls"]}"#)),
            Ok(vec![PoolingMode::Mean, PoolingMode::Cls])
        );
        assert_eq!(
            pooling_modes(&v(r#"{"pooling_mode": "lasttoken"}"#)),
            Ok(vec![PoolingMode::LastToken])
        );
        // Legacy booleans in concatenation order, whatever the key order.
        assert_eq!(
            pooling_modes(&v(
                r#"{"pooling_mode_mean_tokens": true, "pooling_mode_cls_token": true}"#
            )),
            Ok(vec![PoolingMode::Cls, PoolingMode::Mean])
        );
        assert_eq!(
            pooling_modes(&v(r#"{"pooling_mode_mean_tokens": false}"#)),
            Ok(vec![PoolingMode::Mean])
        );
        assert!(pooling_modes(&v(r#"{"pooling_mode": "median"}"#)).is_err());
    }
}
