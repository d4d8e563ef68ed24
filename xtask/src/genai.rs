//! onnxruntime-genai in xtask: the venv its checks run in (`target/genaivenv`), the
//! consumer check of `ferry export --genai` folders (testdata/verify_genai.py, run by
//! `verify`), and `bench --genai` (ferry against onnxruntime-genai's model builder).

use std::path::{Path, PathBuf};
use std::process::Command;

use super::{Result, ensure_venv, root, run, target};

/// Pinned environment of the onnxruntime-genai checks: the runtime (and the ONNX Runtime it
/// loads), and what its model builder imports besides torch and transformers (which
/// `bench --genai` takes from target/venv, so that a second multi-GB torch is not
/// installed).
const GENAI_PACKAGES: &[&str] = &[
    "onnxruntime-genai==0.18.0",
    "onnxruntime==1.31.1",
    "numpy",
    "safetensors==0.8.0",
    "onnx==1.23.2",
    "onnx-ir==1.1.0",
    "tqdm",
];

/// `target/genaivenv` with [`GENAI_PACKAGES`]; returns its Python.
pub(crate) fn genai_venv() -> Result<PathBuf> {
    ensure_venv(
        "genaivenv",
        GENAI_PACKAGES,
        "onnxruntime_genai, onnxruntime, numpy, safetensors",
    )
}

/// testdata/verify_genai.py: onnxruntime-genai generates with ferry's `--genai` folders
/// (fp32: transformers' greedy tokens; int4: top-1 agreement with fp32); any failure, or
/// no case checked, is an error.
pub(crate) fn verify_genai(py: &Path, ferry: &Path) -> Result<()> {
    println!(
        "\nonnxruntime-genai (0.18.0) on ferry's --genai folders ({}):",
        py.display()
    );
    run(Command::new(py)
        .arg(root().join("testdata").join("verify_genai.py"))
        .arg(ferry)
        .arg(root().join("testdata"))
        .arg(target().join("verify").join("genai")))
    .map_err(|e| format!("onnxruntime-genai check failed: {e}"))
}
