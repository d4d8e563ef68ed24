//! The model configuration (`config.json`) as Hugging Face checkpoints carry it.

use std::collections::BTreeMap;

use serde::Deserialize;

/// Why a `config.json` could not be turned into a [`ModelConfig`].
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Not valid JSON, or a field has the wrong type.
    #[error("config.json is not a valid model config: {0}")]
    Parse(#[from] serde_json::Error),
    /// A field the architecture needs is absent.
    #[error("config.json has no `{0}`")]
    Missing(&'static str),
    /// A field has a value that cannot be right.
    #[error("config.json: {0}")]
    Invalid(String),
}

/// The fields of a transformers `PretrainedConfig` that ferry's architectures read.
///
/// Fields an architecture does not use are optional; [`ModelConfig::raw`] keeps the whole
/// JSON for anything else.
#[derive(Debug, Clone, Deserialize)]
pub struct ModelConfig {
    /// `model_type` (`bert`, `gpt2`, …): selects the architecture.
    pub model_type: String,
    /// Class names the checkpoint was saved from (`BertForQuestionAnswering`).
    #[serde(default)]
    pub architectures: Vec<String>,
    /// Vocabulary size.
    pub vocab_size: Option<i64>,
    /// Hidden size.
    pub hidden_size: Option<i64>,
    /// Number of transformer layers.
    pub num_hidden_layers: Option<i64>,
    /// Number of attention heads.
    pub num_attention_heads: Option<i64>,
    /// Feed-forward inner size.
    pub intermediate_size: Option<i64>,
    /// Activation of the feed-forward block (`gelu`, `gelu_new`, `relu`, …).
    pub hidden_act: Option<String>,
    /// Size of the absolute position table.
    pub max_position_embeddings: Option<i64>,
    /// Number of token types (segments).
    pub type_vocab_size: Option<i64>,
    /// LayerNorm epsilon.
    pub layer_norm_eps: Option<f64>,
    /// Padding token id.
    pub pad_token_id: Option<i64>,
    /// Position embedding kind (`absolute` is the only one BERT exports support).
    pub position_embedding_type: Option<String>,
    /// Class labels by id, as strings keyed by the id's decimal form.
    #[serde(default)]
    pub id2label: BTreeMap<String, String>,
    /// Precision the weights were saved in (`float32`, `float16`, `bfloat16`).
    pub torch_dtype: Option<String>,
    /// The whole `config.json`.
    #[serde(skip)]
    pub raw: serde_json::Value,
}

impl ModelConfig {
    /// Parses the text of a `config.json`.
    pub fn from_json(text: &str) -> Result<Self, ConfigError> {
        let raw: serde_json::Value = serde_json::from_str(text)?;
        if raw.get("model_type").is_none() {
            return Err(ConfigError::Missing("model_type"));
        }
        let mut cfg: ModelConfig = serde_json::from_value(raw.clone())?;
        cfg.raw = raw;
        Ok(cfg)
    }

    /// A required positive integer field.
    pub fn require(&self, value: Option<i64>, name: &'static str) -> Result<i64, ConfigError> {
        match value {
            None => Err(ConfigError::Missing(name)),
            Some(v) if v <= 0 => Err(ConfigError::Invalid(format!(
                "`{name}` must be positive, got {v}"
            ))),
            Some(v) => Ok(v),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_bert_config() {
        let c = ModelConfig::from_json(
            r#"{"model_type":"bert","hidden_size":32,"layer_norm_eps":1e-7,"architectures":["BertModel"],"extra":1}"#,
        );
        let c = c.expect("valid config");
        assert_eq!(c.model_type, "bert");
        assert_eq!(c.hidden_size, Some(32));
        assert_eq!(c.layer_norm_eps, Some(1e-7));
        assert_eq!(c.raw["extra"], 1);
        assert!(c.require(c.num_hidden_layers, "num_hidden_layers").is_err());
    }

    #[test]
    fn missing_model_type_is_an_error() {
        let e = ModelConfig::from_json(r#"{"hidden_size":32}"#);
        assert!(matches!(e, Err(ConfigError::Missing("model_type"))));
        assert!(ModelConfig::from_json("{not json").is_err());
    }
}
