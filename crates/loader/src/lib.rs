//! ferry-loader: finds a Hugging Face checkpoint and opens it without copying its weights.
//!
//! [`resolve`] turns `--model` into a directory: a local checkpoint directory, a model id in
//! the Hugging Face cache, or (online) a download into that cache (`hub.rs`'s small
//! synchronous client).
//! [`load`] reads `config.json` into a typed [`ModelConfig`] and indexes the weights of
//! `model.safetensors`, a sharded `model.safetensors.index.json`, or `pytorch_model.bin`
//! (read by pytorch-reader, which never executes pickle code), or a TensorFlow
//! `tf_model.h5` (Keras HDF5, read in pure Rust; TF names mapped to PyTorch's, see `tf`).
//! Safetensors and HDF5 weights are borrowed from a memory map; `.bin` tensors are read one
//! at a time when written. [`load_framework`] picks PyTorch or TF weights explicitly.
//! A sentence-transformers checkpoint's `modules.json` is read into
//! [`Checkpoint::sentence`], with its `Dense` modules' weights added to the weights.

mod hub;
mod tf;
mod weights;

use std::path::{Path, PathBuf};

use ferry_ir::{ConfigError, Weights};
pub use ferry_ir::{ModelConfig, SentenceModules};
pub use hub::{DownloadProgress, ResolveOptions, hub_cache_dir, resolve};

/// The weight file format a checkpoint was read from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WeightFormat {
    /// One `model.safetensors`.
    Safetensors,
    /// `model.safetensors.index.json` with this many shards.
    ShardedSafetensors(usize),
    /// `pytorch_model.bin` (possibly sharded, with this many files).
    PytorchBin(usize),
    /// `tf_model.h5`: TensorFlow (Keras HDF5) weights under their PyTorch names.
    TfH5,
}

/// Which framework's weights to read when a checkpoint holds several.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Framework {
    /// PyTorch weights if present (safetensors, then `pytorch_model.bin`), else
    /// `tf_model.h5`: transformers' own preference order.
    #[default]
    Auto,
    /// PyTorch weights only (safetensors or `pytorch_model.bin`).
    Pt,
    /// `tf_model.h5` only.
    Tf,
}

impl std::fmt::Display for WeightFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WeightFormat::Safetensors => f.write_str("safetensors"),
            WeightFormat::ShardedSafetensors(n) => write!(f, "safetensors ({n} shards)"),
            WeightFormat::PytorchBin(1) => f.write_str("pytorch_model.bin"),
            WeightFormat::PytorchBin(n) => write!(f, "pytorch_model.bin ({n} shards)"),
            WeightFormat::TfH5 => f.write_str("tf_model.h5"),
        }
    }
}

/// An opened checkpoint: its config and its weights, still on disk.
#[derive(Debug)]
pub struct Checkpoint {
    /// The checkpoint directory.
    pub dir: PathBuf,
    /// `config.json`, typed.
    pub config: ModelConfig,
    /// Every tensor of the checkpoint, by its saved name.
    pub weights: Weights,
    /// Which weight files were read.
    pub format: WeightFormat,
    /// The sentence-transformers modules (`modules.json`), when the checkpoint has them;
    /// their `Dense` weights are in [`Checkpoint::weights`] under each module's folder name.
    pub sentence: Option<SentenceModules>,
}

/// Why a checkpoint could not be found or opened.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// `--model` is neither a directory, nor in the cache, nor downloadable.
    #[error("model `{model}` not found; searched: {searched}")]
    NotFound {
        /// What the user asked for.
        model: String,
        /// Where ferry looked, and why the download did not happen or failed.
        searched: String,
    },
    /// The directory has no `config.json`.
    #[error("{0}: no config.json (is this a Hugging Face checkpoint directory?)")]
    MissingConfig(PathBuf),
    /// `config.json` is unreadable or invalid.
    #[error("{path}: {source}")]
    Config {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: ConfigError,
    },
    /// No weight file of a known format.
    #[error(
        "{0}: no weights found (looked for model.safetensors, model.safetensors.index.json, pytorch_model.bin, pytorch_model.bin.index.json, tf_model.h5)"
    )]
    MissingWeights(PathBuf),
    /// `--framework tf` on a checkpoint without `tf_model.h5`.
    #[error("{0}: no tf_model.h5 (the checkpoint has no TensorFlow weights)")]
    MissingTfWeights(PathBuf),
    /// `--framework pt` on a checkpoint without PyTorch weights.
    #[error(
        "{0}: no PyTorch weights (looked for model.safetensors, model.safetensors.index.json, pytorch_model.bin, pytorch_model.bin.index.json)"
    )]
    MissingPtWeights(PathBuf),
    /// A weight file is unreadable or corrupt.
    #[error("{path}: {reason}")]
    Weights {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// `modules.json` or a module's config is invalid or not supported.
    #[error(transparent)]
    Sentence(#[from] ferry_ir::SentenceError),
    /// An I/O error.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
}

/// Opens the checkpoint in `dir`: config plus an index of its weights (no weight bytes read).
/// PyTorch weights are preferred; `tf_model.h5` is read when there are none.
pub fn load(dir: &Path) -> Result<Checkpoint, LoadError> {
    load_framework(dir, Framework::Auto)
}

/// [`load`], reading the weights of `framework` (see [`Framework`]).
pub fn load_framework(dir: &Path, framework: Framework) -> Result<Checkpoint, LoadError> {
    let config_path = dir.join("config.json");
    if !config_path.is_file() {
        return Err(LoadError::MissingConfig(dir.to_path_buf()));
    }
    let text = std::fs::read_to_string(&config_path).map_err(|source| LoadError::Io {
        path: config_path.clone(),
        source,
    })?;
    let config = ModelConfig::from_json(&text).map_err(|source| LoadError::Config {
        path: config_path.clone(),
        source,
    })?;
    let (mut weights, format) = weights::open_weights(dir, framework)?;
    let sentence = SentenceModules::read(dir)?;
    for d in sentence.iter().flat_map(|s| &s.dense) {
        weights::add_module_weights(&dir.join(&d.weight_prefix), &d.weight_prefix, &mut weights)?;
    }
    Ok(Checkpoint {
        dir: dir.to_path_buf(),
        config,
        weights,
        format,
        sentence,
    })
}
