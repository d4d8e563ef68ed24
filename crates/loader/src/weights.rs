//! Weight files: safetensors (single or sharded), pytorch_model.bin and tf_model.h5.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;

use ferry_ir::{DType, Initializer, MappedFile, TensorData, Weights};
use safetensors::SafeTensors;
use safetensors::tensor::Dtype;

use crate::{Framework, LoadError, WeightFormat};

/// Finds and indexes the weights in `dir` as transformers does: safetensors, then
/// `pytorch_model.bin`, then `tf_model.h5`, restricted to `framework`'s files.
pub(crate) fn open_weights(
    dir: &Path,
    framework: Framework,
) -> Result<(Weights, WeightFormat), LoadError> {
    let mut weights = Weights::new();
    let single = dir.join("model.safetensors");
    let index = dir.join("model.safetensors.index.json");
    let bin = dir.join("pytorch_model.bin");
    let bin_index = dir.join("pytorch_model.bin.index.json");
    let tf_h5 = dir.join("tf_model.h5");
    let has_pt = single.is_file() || index.is_file() || bin.is_file() || bin_index.is_file();
    let use_tf = match framework {
        Framework::Tf => true,
        Framework::Pt if !has_pt => return Err(LoadError::MissingPtWeights(dir.to_path_buf())),
        Framework::Pt => false,
        Framework::Auto => !has_pt && tf_h5.is_file(),
    };
    if use_tf {
        if !tf_h5.is_file() {
            return Err(LoadError::MissingTfWeights(dir.to_path_buf()));
        }
        crate::tf::add_tf_h5(&tf_h5, &mut weights)?;
        return Ok((weights, WeightFormat::TfH5));
    }
    let format = if single.is_file() {
        add_safetensors(&single, &mut weights)?;
        WeightFormat::Safetensors
    } else if index.is_file() {
        let shards = shard_files(&index)?;
        for s in &shards {
            add_safetensors(&dir.join(s), &mut weights)?;
        }
        WeightFormat::ShardedSafetensors(shards.len())
    } else if bin.is_file() {
        add_pytorch(&bin, &mut weights)?;
        WeightFormat::PytorchBin(1)
    } else if bin_index.is_file() {
        let shards = shard_files(&bin_index)?;
        for s in &shards {
            add_pytorch(&dir.join(s), &mut weights)?;
        }
        WeightFormat::PytorchBin(shards.len())
    } else {
        return Err(LoadError::MissingWeights(dir.to_path_buf()));
    };
    Ok((rename_legacy(weights), format))
}

/// The distinct shard file names of a `*.index.json`.
fn shard_files(index: &Path) -> Result<Vec<String>, LoadError> {
    let bad = |reason: String| LoadError::Weights {
        path: index.to_path_buf(),
        reason,
    };
    let text = std::fs::read_to_string(index).map_err(|source| LoadError::Io {
        path: index.to_path_buf(),
        source,
    })?;
    let v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| bad(format!("invalid index: {e}")))?;
    let map = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| bad("index has no `weight_map` object".into()))?;
    let mut files = BTreeSet::new();
    for (name, file) in map {
        let file = file
            .as_str()
            .ok_or_else(|| bad(format!("weight_map entry `{name}` is not a file name")))?;
        if file.contains('/') || file.contains('\\') || file.starts_with('.') {
            return Err(bad(format!(
                "weight_map entry `{name}` names an unsafe path `{file}`"
            )));
        }
        files.insert(file.to_string());
    }
    Ok(files.into_iter().collect())
}

fn dtype_of(d: Dtype) -> Option<DType> {
    Some(match d {
        Dtype::F32 => DType::F32,
        Dtype::F16 => DType::F16,
        Dtype::BF16 => DType::BF16,
        Dtype::F64 => DType::F64,
        Dtype::I64 => DType::I64,
        Dtype::I32 => DType::I32,
        Dtype::I16 => DType::I16,
        Dtype::I8 => DType::I8,
        Dtype::U8 => DType::U8,
        Dtype::BOOL => DType::Bool,
        _ => return None,
    })
}

/// Indexes one safetensors file; tensors borrow from its memory map.
fn add_safetensors(path: &Path, weights: &mut Weights) -> Result<(), LoadError> {
    let file = MappedFile::open(path).map_err(|source| LoadError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let file = Arc::new(file);
    let (header_len, meta) =
        SafeTensors::read_metadata(file.bytes()).map_err(|e| LoadError::Weights {
            path: path.to_path_buf(),
            reason: format!("corrupt safetensors file: {e}"),
        })?;
    let data_start = 8 + header_len as u64;
    for (name, info) in meta.tensors() {
        let dtype = dtype_of(info.dtype).ok_or_else(|| LoadError::Weights {
            path: path.to_path_buf(),
            reason: format!("tensor `{name}` has unsupported dtype {:?}", info.dtype),
        })?;
        let (start, end) = info.data_offsets;
        weights.insert(Initializer {
            name,
            dtype,
            dims: info.shape.iter().map(|&d| d as i64).collect(),
            data: TensorData::Mapped {
                file: Arc::clone(&file),
                offset: data_start + start as u64,
                len: (end - start) as u64,
            },
        });
    }
    Ok(())
}

fn pt_dtype(d: pytorch_reader::DType) -> Option<DType> {
    use pytorch_reader::DType as P;
    Some(match d {
        P::F32 => DType::F32,
        P::F16 => DType::F16,
        P::BF16 => DType::BF16,
        P::F64 => DType::F64,
        P::I64 => DType::I64,
        P::I32 => DType::I32,
        P::I16 => DType::I16,
        P::I8 => DType::I8,
        P::U8 => DType::U8,
        P::Bool => DType::Bool,
        P::U64 | P::U32 | P::U16 => return None,
    })
}

/// Indexes a `pytorch_model.bin`; each tensor is read from the file when it is written.
fn add_pytorch(path: &Path, weights: &mut Weights) -> Result<(), LoadError> {
    let reader = pytorch_reader::PytorchReader::new(path).map_err(|e| LoadError::Weights {
        path: path.to_path_buf(),
        reason: format!("cannot read PyTorch checkpoint: {e}"),
    })?;
    for (_, tensor) in reader.into_tensors() {
        let (name, dtype, shape, read) = tensor.into_parts();
        let Some(d) = pt_dtype(dtype) else {
            return Err(LoadError::Weights {
                path: path.to_path_buf(),
                reason: format!("tensor `{name}` has unsupported dtype {dtype:?}"),
            });
        };
        let numel: u64 = shape.iter().map(|&s| s as u64).product();
        weights.insert(Initializer {
            name,
            dtype: d,
            dims: shape.iter().map(|&s| s as i64).collect(),
            data: TensorData::Lazy {
                len: numel * d.size() as u64,
                read: Arc::new(read),
            },
        });
    }
    Ok(())
}

/// Renames TF-era `LayerNorm.gamma`/`beta` to `weight`/`bias`, as transformers does on load.
fn rename_legacy(weights: Weights) -> Weights {
    let needs = weights
        .iter()
        .any(|t| t.name.ends_with(".gamma") || t.name.ends_with(".beta"));
    if !needs {
        return weights;
    }
    let mut renamed: BTreeMap<String, Initializer> = BTreeMap::new();
    for t in weights.iter() {
        let mut t = t.clone();
        if let Some(stem) = t.name.strip_suffix(".gamma") {
            t.name = format!("{stem}.weight");
        } else if let Some(stem) = t.name.strip_suffix(".beta") {
            t.name = format!("{stem}.bias");
        }
        renamed.insert(t.name.clone(), t);
    }
    let mut out = Weights::new();
    for (_, t) in renamed {
        out.insert(t);
    }
    out
}

/// Adds the weights of a sentence-transformers module folder (`2_Dense/model.safetensors`
/// or `pytorch_model.bin`) under `{prefix}.{name}` (`2_Dense.linear.weight`).
pub(crate) fn add_module_weights(
    dir: &Path,
    prefix: &str,
    weights: &mut Weights,
) -> Result<(), LoadError> {
    let mut module = Weights::new();
    let single = dir.join("model.safetensors");
    let bin = dir.join("pytorch_model.bin");
    if single.is_file() {
        add_safetensors(&single, &mut module)?;
    } else if bin.is_file() {
        add_pytorch(&bin, &mut module)?;
    } else {
        return Err(LoadError::MissingWeights(dir.to_path_buf()));
    }
    for t in module.iter() {
        let mut t = t.clone();
        t.name = format!("{prefix}.{}", t.name);
        weights.insert(t);
    }
    Ok(())
}
