//! TensorFlow checkpoints: `tf_model.h5` as transformers 4.x saves TF models (Keras HDF5).
//!
//! The file is read with hdf5-reader (pure Rust, no libhdf5). Keras stores one group per
//! top-level layer, and below it one dataset per weight under the weight's TF name
//! (`tf_bert_model/bert/encoder/layer_._0/attention/self/query/kernel:0`), contiguous and
//! unfiltered as h5py writes by default. Only the metadata is parsed: each tensor borrows
//! its byte range of the memory-mapped file, as safetensors weights do.
//!
//! Names become PyTorch state-dict names by the rules of transformers'
//! `convert_tf_weight_name_to_pt_weight_name`: drop `:0` and the top level, `a___b` → `b`,
//! `_._` → `.`, `kernel`/`embeddings`/`gamma` → `weight`, `beta` → `bias`. Dense kernels are
//! `[in, out]` in TF and `[out, in]` in PyTorch; they are exposed transposed, computed when
//! the tensor is written (one tensor at a time), so the model graph is the PyTorch one.

use std::path::Path;
use std::sync::Arc;

use ferry_ir::{DType, Initializer, MappedFile, TensorData, Weights};
use hdf5_reader::group::Group;
use hdf5_reader::messages::HdfMessage;
use hdf5_reader::messages::layout::DataLayout;
use hdf5_reader::{ByteOrder, Dataset, Datatype, Hdf5File};

use crate::LoadError;

/// How a TF weight's layout differs from its PyTorch counterpart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Transpose {
    /// Same layout.
    No,
    /// A 2-D dense kernel: `[in, out]` in TF, `[out, in]` in PyTorch.
    Simple,
}

/// The PyTorch state-dict name of the TF weight `tf_name` with `ndim` dimensions, and
/// whether its data must be transposed; `None` for layouts ferry does not convert
/// (convolution kernels of 3 or more dimensions).
pub(crate) fn pt_name(tf_name: &str, ndim: usize) -> Option<(String, Transpose)> {
    let name = tf_name.replace(":0", "");
    // `scope___name` levels keep only `name` (transformers uses it to rename modules).
    let mut parts: Vec<String> = Vec::new();
    for level in name.split('/') {
        let level = match level.rfind("___") {
            Some(i) => &level[i + 3..],
            None => level,
        };
        // `_._` separates a module list from its index: `layer_._0` → `layer.0`.
        for piece in level.split("_._") {
            if !piece.is_empty() {
                parts.push(piece.to_string());
            }
        }
    }
    if parts.len() > 1 {
        parts.remove(0); // the TF model's own name, e.g. `tf_bert_model`
    }
    let last = parts.last_mut()?;
    let transpose = match (last.as_str(), ndim) {
        ("kernel" | "pointwise_kernel" | "depthwise_kernel", 2) => Transpose::Simple,
        ("kernel" | "pointwise_kernel" | "depthwise_kernel", n) if n >= 3 => return None,
        _ => Transpose::No,
    };
    match last.as_str() {
        "kernel" | "embeddings" | "gamma" => *last = "weight".into(),
        "beta" => *last = "bias".into(),
        _ => {}
    }
    Some((parts.join("."), transpose))
}

/// Indexes the weights of `tf_model.h5` under their PyTorch names.
pub(crate) fn add_tf_h5(path: &Path, weights: &mut Weights) -> Result<(), LoadError> {
    let bad = |reason: String| LoadError::Weights {
        path: path.to_path_buf(),
        reason,
    };
    let mapped = Arc::new(MappedFile::open(path).map_err(|source| LoadError::Io {
        path: path.to_path_buf(),
        source,
    })?);
    let h5 = Hdf5File::open(path).map_err(|e| bad(format!("not a readable HDF5 file: {e}")))?;
    let root = h5
        .root_group()
        .map_err(|e| bad(format!("corrupt HDF5 file: {e}")))?;
    let mut found = Vec::new();
    collect(&root, "", 0, &mut found).map_err(|e| bad(format!("corrupt HDF5 file: {e}")))?;
    if found.is_empty() {
        return Err(bad("no weights (is this a Keras HDF5 checkpoint?)".into()));
    }
    // Keras also saves a weight under every layer that uses it (the masked-LM head repeats
    // the embeddings): each PyTorch name keeps the copy saved by the layer that owns it.
    let mut owned_by_layer = std::collections::BTreeSet::new();
    for (h5_path, ds) in found {
        // `/<layer>/<weight name>`: the weight name is what follows the layer's group.
        let mut levels = h5_path.splitn(3, '/').skip(1);
        let layer = levels.next().unwrap_or("");
        let tf_name = levels.next().unwrap_or(&h5_path);
        // `tf_bert_for_masked_lm/mlm___cls/...` belongs to layer `mlm___cls`.
        let owner = tf_name.split('/').nth(1) == Some(layer);
        let dims: Vec<u64> = ds.shape().to_vec();
        let (name, transpose) = pt_name(tf_name, dims.len())
            .ok_or_else(|| bad(format!("weight `{tf_name}` has an unsupported layout")))?;
        let dtype = match ds.dtype() {
            Datatype::FloatingPoint {
                size: 4,
                byte_order: ByteOrder::LittleEndian,
            } => DType::F32,
            Datatype::FloatingPoint {
                size: 2,
                byte_order: ByteOrder::LittleEndian,
            } => DType::F16,
            other => {
                return Err(bad(format!(
                    "weight `{tf_name}` has unsupported type {other:?}"
                )));
            }
        };
        let numel = dims
            .iter()
            .try_fold(1u64, |n, &d| n.checked_mul(d))
            .ok_or_else(|| bad(format!("weight `{tf_name}` has an impossible shape")))?;
        let len = numel
            .checked_mul(dtype.size() as u64)
            .ok_or_else(|| bad(format!("weight `{tf_name}` has an impossible shape")))?;
        let stored = stored_data(&h5, &ds, &mapped, len)
            .map_err(|e| bad(format!("weight `{tf_name}`: {e}")))?;
        let out_dims: Vec<i64> = match transpose {
            Transpose::No => dims.iter().map(|&d| d as i64).collect(),
            Transpose::Simple => dims.iter().rev().map(|&d| d as i64).collect(),
        };
        if let Some(prev) = weights.get(&name) {
            let same = prev.dims == out_dims && prev.dtype == dtype;
            if !same || (owner && owned_by_layer.contains(&name)) {
                return Err(bad(format!(
                    "two different weights map to the PyTorch name `{name}`"
                )));
            }
            if !owner {
                continue; // a use of a weight already read from its owner
            }
        }
        if owner {
            owned_by_layer.insert(name.clone());
        }
        let data = match transpose {
            Transpose::No => stored,
            // A view transposed band by band when written (ferry-ir), never held whole.
            Transpose::Simple => {
                let shape = [dims[0] as usize, dims[1] as usize];
                TensorData::transposed(stored, &shape, &[1, 0], dtype.size())
                    .map_err(|e| bad(format!("weight `{tf_name}`: {e}")))?
            }
        };
        weights.insert(Initializer {
            name,
            dtype,
            dims: out_dims,
            data,
        });
    }
    Ok(())
}

/// Every dataset below `group`, with its path (`/layer/.../kernel:0`).
fn collect(
    group: &Group,
    prefix: &str,
    depth: usize,
    out: &mut Vec<(String, Dataset)>,
) -> hdf5_reader::error::Result<()> {
    // Keras nests one group per level of a weight name; real checkpoints stay far below this.
    if depth > 64 {
        return Err(hdf5_reader::error::Error::InvalidData(
            "groups nested deeper than 64 levels".into(),
        ));
    }
    let (groups, datasets) = group.members()?;
    for ds in datasets {
        let p = format!("{prefix}/{}", ds.name().rsplit('/').next().unwrap_or(""));
        out.push((p, ds));
    }
    for g in groups {
        let p = format!("{prefix}/{}", g.name().rsplit('/').next().unwrap_or(""));
        collect(&g, &p, depth + 1, out)?;
    }
    Ok(())
}

/// The dataset's bytes: a range of the mapped file when stored contiguous and unfiltered
/// (h5py's default), else read by hdf5-reader into memory.
fn stored_data(
    h5: &Hdf5File,
    ds: &Dataset,
    mapped: &Arc<MappedFile>,
    len: u64,
) -> Result<TensorData, String> {
    let header = h5
        .get_or_parse_header(ds.address())
        .map_err(|e| e.to_string())?;
    let filtered = header
        .messages
        .iter()
        .any(|m| matches!(m, HdfMessage::FilterPipeline(p) if !p.filters.is_empty()));
    let contiguous = header.messages.iter().find_map(|m| match m {
        HdfMessage::DataLayout(l) => match &l.layout {
            DataLayout::Contiguous { address, size } => Some((*address, *size)),
            _ => None,
        },
        _ => None,
    });
    if let (false, Some((address, size))) = (filtered, contiguous) {
        let offset = h5
            .superblock()
            .base_address
            .checked_add(address)
            .ok_or("data address out of range")?;
        let end = offset.checked_add(len).ok_or("data address out of range")?;
        if size < len || end > mapped.bytes().len() as u64 {
            return Err(format!(
                "data ({len} bytes at {offset}) lies outside the file (truncated?)"
            ));
        }
        return Ok(TensorData::Mapped {
            file: Arc::clone(mapped),
            offset,
            len,
        });
    }
    // Filtered (compressed) data may decode larger than the file, but not by this much: a
    // shape that claims more is a corrupt header, not a reason to allocate.
    if len / 64 > mapped.bytes().len() as u64 {
        return Err(format!("claims {len} bytes, far more than the file holds"));
    }
    let bytes = ds.read_raw_bytes().map_err(|e| e.to_string())?;
    if bytes.len() as u64 != len {
        return Err(format!("holds {} bytes, expected {len}", bytes.len()));
    }
    Ok(TensorData::Owned(bytes.into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_transformers_rules() {
        let cases = [
            (
                "tf_bert_model/bert/embeddings/word_embeddings/weight:0",
                2,
                "bert.embeddings.word_embeddings.weight",
                Transpose::No,
            ),
            (
                "tf_bert_model/bert/embeddings/position_embeddings/embeddings:0",
                2,
                "bert.embeddings.position_embeddings.weight",
                Transpose::No,
            ),
            (
                "tf_bert_model/bert/encoder/layer_._1/attention/self/query/kernel:0",
                2,
                "bert.encoder.layer.1.attention.self.query.weight",
                Transpose::Simple,
            ),
            (
                "tf_bert_model/bert/encoder/layer_._0/output/LayerNorm/gamma:0",
                1,
                "bert.encoder.layer.0.output.LayerNorm.weight",
                Transpose::No,
            ),
            (
                "tf_bert_model/bert/encoder/layer_._0/output/LayerNorm/beta:0",
                1,
                "bert.encoder.layer.0.output.LayerNorm.bias",
                Transpose::No,
            ),
            (
                "tf_bert_for_masked_lm/mlm___cls/predictions/transform/dense/kernel:0",
                2,
                "cls.predictions.transform.dense.weight",
                Transpose::Simple,
            ),
            (
                "tf_bert_for_masked_lm/mlm___cls/predictions/bias:0",
                1,
                "cls.predictions.bias",
                Transpose::No,
            ),
            (
                "tf_distil_bert_for_sequence_classification/classifier/bias:0",
                1,
                "classifier.bias",
                Transpose::No,
            ),
            ("final_logits_bias:0", 2, "final_logits_bias", Transpose::No),
        ];
        for (tf, ndim, pt, t) in cases {
            assert_eq!(pt_name(tf, ndim), Some((pt.to_string(), t)), "{tf}");
        }
        assert_eq!(pt_name("m/conv/kernel:0", 3), None);
    }

    /// The TF checkpoint and the PyTorch weights transformers converted from it (both in
    /// testdata/tf-bert-tiny-both, written by make_tf_fixtures.py) hold the same tensors.
    #[test]
    fn h5_weights_equal_transformers_conversion() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../testdata/tf-bert-tiny-both");
        let mut tf = Weights::new();
        add_tf_h5(&dir.join("tf_model.h5"), &mut tf).expect("tf_model.h5 reads");
        let pt = crate::load_framework(&dir, crate::Framework::Pt).expect("safetensors");
        let mut compared = 0;
        for t in pt.weights.iter() {
            let Some(h) = tf.get(&t.name) else {
                panic!("`{}` missing from tf_model.h5's weights", t.name)
            };
            assert_eq!((h.dtype, &h.dims), (t.dtype, &t.dims), "{}", t.name);
            let (a, b) = (h.data.bytes().expect("h5"), t.data.bytes().expect("pt"));
            assert!(a == b, "`{}` differs", t.name);
            if t.name.ends_with("query.weight") {
                assert!(
                    matches!(h.data, TensorData::Transposed { .. }),
                    "{}",
                    t.name
                );
            }
            if t.name.ends_with("word_embeddings.weight") {
                assert!(matches!(h.data, TensorData::Mapped { .. }), "{}", t.name);
            }
            compared += 1;
        }
        assert_eq!(compared, tf.len(), "tf_model.h5 has extra weights");
    }

    #[test]
    fn corrupt_h5_is_an_error() {
        let src = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../testdata/tf-bert-tiny-feature-extraction/tf_model.h5");
        let bytes = std::fs::read(&src).expect("read");
        let dir = tempfile::tempdir().expect("tempdir");
        for (what, data) in [
            ("empty", Vec::new()),
            ("garbage", vec![0x5a; 4096]),
            ("half", bytes[..bytes.len() / 2].to_vec()),
            ("tail cut", bytes[..bytes.len() - 100].to_vec()),
            ("header only", bytes[..1024].to_vec()),
        ] {
            let p = dir.path().join("tf_model.h5");
            std::fs::write(&p, &data).expect("write");
            let mut w = Weights::new();
            let e = add_tf_h5(&p, &mut w).expect_err(what);
            assert!(e.to_string().contains("tf_model.h5"), "{what}: {e}");
        }
    }
}
