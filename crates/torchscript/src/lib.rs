//! ferry-torchscript: writes a ferry IR graph as a TorchScript archive that
//! `torch.jit.load` (Python or libtorch) accepts, without libtorch.
//!
//! The archive is what `torch.jit.save` writes for a traced module: a zip with one top
//! folder holding `data.pkl` (the module object, pickle protocol 2, parameters as tensors
//! whose bytes live in `data/<n>` records aligned to 64 bytes), `code/__torch__/ferry.py`
//! (the class, its typed attributes and a `forward` calling `torch.*` ops, generated from
//! the graph by [`codegen`]), `constants.pkl`, `.data/version` and `byteorder`. Weights
//! stream from the checkpoint into the zip in bounded chunks.

pub mod codegen;
pub mod pickle;

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use ferry_ir::{DType, Graph, Initializer, Weights};
use zip::write::SimpleFileOptions;

pub use codegen::{Module, Shapes, StateDictNames, Tree, generate};
use pickle::{Pickler, op};

/// File format version written to `.data/version` (10: operators at their current
/// versions, so `gelu(approximate=…)` compiles).
pub const FILE_VERSION: u32 = 10;
/// Alignment of every record's data, as torch's writer does.
pub const RECORD_ALIGN: u16 = 64;
/// Local-header extra field id torch uses for alignment padding (`FB`).
const ALIGN_HEADER_ID: u16 = u16::from_le_bytes(*b"FB");

/// Why an archive could not be written.
#[derive(Debug, thiserror::Error)]
pub enum TsError {
    /// The graph uses an op or form the TorchScript generator does not translate.
    #[error("cannot express in TorchScript: {0}")]
    Unsupported(String),
    /// Output path problem.
    #[error("cannot write {path}: {reason}")]
    OutputPath {
        /// The path.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// I/O failure while writing.
    #[error("writing TorchScript archive failed: {0}")]
    Io(#[from] std::io::Error),
    /// The zip writer failed.
    #[error("writing TorchScript archive failed: {0}")]
    Zip(#[from] zip::result::ZipError),
}

/// What [`write_archive`] produced.
#[derive(Debug, Clone)]
pub struct ArchiveReport {
    /// The archive.
    pub path: PathBuf,
    /// Its size.
    pub bytes: u64,
    /// Number of parameter tensors.
    pub tensors: usize,
}

fn storage_type(d: DType) -> &'static str {
    match d {
        DType::F32 => "FloatStorage",
        DType::F64 => "DoubleStorage",
        DType::F16 => "HalfStorage",
        DType::BF16 => "BFloat16Storage",
        DType::I64 => "LongStorage",
        DType::I32 => "IntStorage",
        DType::I16 => "ShortStorage",
        DType::I8 => "CharStorage",
        DType::U8 => "ByteStorage",
        DType::Bool => "BoolStorage",
    }
}

/// Pickles one tensor whose bytes are storage record `key`.
fn pickle_tensor(p: &mut Pickler, t: &Initializer, key: &str) {
    p.global("torch._utils", "_rebuild_tensor_v2");
    p.op(op::MARK);
    p.op(op::MARK);
    p.str("storage");
    p.global("torch", storage_type(t.dtype));
    p.str(key);
    p.str("cpu");
    p.int(t.numel() as i64);
    p.op(op::TUPLE);
    p.op(op::BINPERSID);
    p.int(0);
    p.int_tuple(&t.dims);
    let mut strides = vec![1i64; t.dims.len()];
    for i in (0..t.dims.len().saturating_sub(1)).rev() {
        strides[i] = strides[i + 1] * t.dims[i + 1].max(1);
    }
    p.int_tuple(&strides);
    p.bool(false);
    p.global("collections", "OrderedDict");
    p.op(op::EMPTY_TUPLE);
    p.op(op::REDUCE);
    p.op(op::TUPLE);
    p.op(op::REDUCE);
}

/// The `data.pkl` of the module tree: nested module objects, each with its parameters
/// (tied aliases pickled against the same storage record) and submodules as attributes.
pub fn module_pickle(m: &Module) -> Vec<u8> {
    let mut p = Pickler::new();
    let package = m
        .qualified_name
        .rsplit_once('.')
        .map_or("__torch__", |(p, _)| p);
    pickle_module(&mut p, &m.tree, package, &m.params, &mut HashMap::new());
    p.finish()
}

/// Pickles one module of the tree; `memo` maps a storage index to the memo slot of its
/// tensor, so a tied name is the same tensor object (as `torch.jit.save` writes it).
fn pickle_module(
    p: &mut Pickler,
    tree: &Tree,
    package: &str,
    params: &[(String, Initializer)],
    memo: &mut HashMap<usize, u32>,
) {
    p.global(package, &tree.class);
    p.op(op::EMPTY_TUPLE);
    p.op(op::NEWOBJ);
    p.op(op::EMPTY_DICT);
    p.op(op::MARK);
    p.str("training");
    p.bool(false);
    for (attr, i) in &tree.params {
        // `Tree::build` indexes `params` itself.
        let t = &params[*i].1;
        p.str(attr);
        if let Some(slot) = memo.get(i) {
            p.get(*slot);
        } else {
            pickle_tensor(p, t, &i.to_string());
            let slot = u32::try_from(memo.len()).unwrap_or(u32::MAX);
            p.put(slot);
            memo.insert(*i, slot);
        }
    }
    for (attr, child) in &tree.children {
        p.str(attr);
        pickle_module(p, child, package, params, memo);
    }
    p.op(op::SETITEMS);
    p.op(op::BUILD);
}

/// Writes `module` as a TorchScript archive at `path` (top folder named after the file
/// stem), atomically: a temporary file renamed into place when complete.
pub fn write_archive(module: &Module, path: &Path) -> Result<ArchiveReport, TsError> {
    let stem = path
        .file_stem()
        .and_then(|s| s.to_str())
        .filter(|s| !s.is_empty())
        .ok_or_else(|| TsError::OutputPath {
            path: path.to_path_buf(),
            reason: "not a file name".into(),
        })?;
    let top: String = stem
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    if !dir.is_dir() {
        return Err(TsError::OutputPath {
            path: path.to_path_buf(),
            reason: format!("directory {} does not exist", dir.display()),
        });
    }
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.ferry-tmp-{}", std::process::id()));
    let file = File::create(&tmp).map_err(|e| TsError::OutputPath {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    let result = write_zip(module, &top, BufWriter::with_capacity(64 << 10, file));
    match result {
        Ok(()) => {
            // Renaming onto an existing file makes ext4 (`auto_da_alloc`) write the whole
            // new file back inside `rename`; remove an existing output first (as the ONNX
            // writer does). The archive is still never partial.
            if std::fs::symlink_metadata(path).is_ok_and(|m| m.is_file()) {
                let _ = std::fs::remove_file(path);
            }
            std::fs::rename(&tmp, path).inspect_err(|_| {
                let _ = std::fs::remove_file(&tmp);
            })?;
            Ok(ArchiveReport {
                path: path.to_path_buf(),
                bytes: std::fs::metadata(path)?.len(),
                tensors: module.params.len(),
            })
        }
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(e)
        }
    }
}

fn write_zip(module: &Module, top: &str, out: BufWriter<File>) -> Result<(), TsError> {
    let mut zip = zip::ZipWriter::new(out);
    let stored = SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Stored)
        .with_alignment_and_header_id(RECORD_ALIGN, ALIGN_HEADER_ID);
    let record = |zip: &mut zip::ZipWriter<BufWriter<File>>, name: &str, bytes: &[u8]| {
        zip.start_file(format!("{top}/{name}"), stored)?;
        zip.write_all(bytes)?;
        Ok::<(), TsError>(())
    };
    record(&mut zip, "data.pkl", &module_pickle(module))?;
    let pkg = module
        .qualified_name
        .trim_start_matches("__torch__.")
        .rsplit_once('.')
        .map(|(p, _)| p.replace('.', "/"))
        .unwrap_or_default();
    record(
        &mut zip,
        &format!("code/__torch__/{pkg}.py"),
        module.source.as_bytes(),
    )?;
    let mut constants = Pickler::new();
    constants.op(op::EMPTY_TUPLE);
    record(&mut zip, "constants.pkl", &constants.finish())?;
    record(
        &mut zip,
        ".data/version",
        format!("{FILE_VERSION}\n").as_bytes(),
    )?;
    record(&mut zip, "byteorder", b"little")?;
    for (i, (_, t)) in module.params.iter().enumerate() {
        let opts = stored.large_file(t.data.len() >= u64::from(u32::MAX) - 1024);
        zip.start_file(format!("{top}/data/{i}"), opts)?;
        t.data.for_each_chunk(256 << 10, |c| zip.write_all(c))?;
    }
    let mut inner = zip.finish()?;
    inner.flush()?;
    Ok(())
}

/// Traces nothing itself: generates the module for `graph` (weights at the state-dict
/// keys `names` gives) and writes it at `path`.
pub fn export(
    graph: &Graph,
    class_name: &str,
    shapes: &Shapes,
    untie: bool,
    names: &StateDictNames,
    path: &Path,
) -> Result<ArchiveReport, TsError> {
    let module = generate(graph, class_name, shapes, untie, names)?;
    write_archive(&module, path)
}

/// The state-dict key of each of `graph`'s weights in the transformers model it was
/// traced from, found in the checkpoint `weights` the graph was traced from. The tracer
/// names a base-model weight without the task model's prefix (`embeddings.…` for
/// `bert.embeddings.…`); in a task model (`task_model`) such a weight takes the prefix the
/// checkpoint stores it under, while a base model's (feature extraction) keys have none.
/// A weight the checkpoint holds under the graph's own name keeps it.
pub fn state_dict_names(graph: &Graph, weights: &Weights, task_model: bool) -> StateDictNames {
    let mut names = StateDictNames::new();
    if !task_model {
        return names;
    }
    for init in &graph.initializers {
        if weights.get(&init.name).is_some() {
            continue;
        }
        let suffix = format!(".{}", init.name);
        let prefixed = weights.iter().map(|t| &t.name).find(|k| {
            k.strip_suffix(&suffix)
                .is_some_and(|p| !p.is_empty() && !p.contains('.'))
        });
        if let Some(k) = prefixed {
            names.insert(init.name.clone(), k.clone());
        }
    }
    names
}
