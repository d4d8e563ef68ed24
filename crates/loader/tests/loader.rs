//! Loader tests over the bundled tiny checkpoints.

use std::path::{Path, PathBuf};

use ferry_ir::TensorData;
use ferry_loader::{LoadError, WeightFormat, load};

fn testdata(case: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../testdata")
        .join(case)
}

#[test]
fn safetensors_weights_are_borrowed_from_the_map() {
    let c = load(&testdata("bert-tiny-gelu")).expect("load");
    assert_eq!(c.format, WeightFormat::Safetensors);
    assert_eq!(c.config.model_type, "bert");
    assert_eq!(c.config.hidden_act.as_deref(), Some("gelu"));
    let w = c
        .weights
        .get("embeddings.word_embeddings.weight")
        .expect("word embeddings");
    assert_eq!(w.dims, vec![99, 32]);
    assert!(matches!(w.data, TensorData::Mapped { .. }));
    assert_eq!(w.data.len(), 99 * 32 * 4);
}

#[test]
fn sharded_safetensors() {
    let c = load(&testdata("bert-tiny-relu-sharded")).expect("load");
    assert_eq!(c.format, WeightFormat::ShardedSafetensors(3));
    assert!(c.weights.contains("pooler.dense.weight"));
    assert!(c.weights.contains("embeddings.word_embeddings.weight"));
}

#[test]
fn pytorch_bin_of_a_task_model() {
    let c = load(&testdata("bert-tiny-tanh-bin")).expect("load");
    assert_eq!(c.format, WeightFormat::PytorchBin(1));
    let w = c
        .weights
        .get("bert.embeddings.word_embeddings.weight")
        .expect("prefixed name");
    assert!(matches!(w.data, TensorData::Lazy { .. }));
    let bytes = w.data.bytes().expect("read");
    assert_eq!(bytes.len(), 120 * 48 * 4);
    assert!(c.weights.contains("classifier.weight"));
}

#[test]
fn errors_name_the_problem() {
    let dir = tempfile::tempdir().expect("tempdir");
    assert!(matches!(load(dir.path()), Err(LoadError::MissingConfig(_))));
    std::fs::write(dir.path().join("config.json"), "{\"hidden_size\": 3}").expect("write");
    let e = load(dir.path()).expect_err("no model_type");
    assert!(e.to_string().contains("model_type"), "{e}");
    std::fs::write(dir.path().join("config.json"), "{\"model_type\": \"bert\"}").expect("write");
    let e = load(dir.path()).expect_err("no weights");
    assert!(matches!(e, LoadError::MissingWeights(_)), "{e}");
    std::fs::write(
        dir.path().join("model.safetensors.index.json"),
        "{\"weight_map\": {\"a\": \"../../etc/passwd\"}}",
    )
    .expect("write");
    let e = load(dir.path()).expect_err("unsafe shard path");
    assert!(e.to_string().contains("unsafe path"), "{e}");
    std::fs::write(dir.path().join("pytorch_model.bin"), b"not a pickle").expect("write");
    std::fs::remove_file(dir.path().join("model.safetensors.index.json")).expect("rm");
    let e = load(dir.path()).expect_err("corrupt bin");
    assert!(
        e.to_string().contains("cannot read PyTorch checkpoint"),
        "{e}"
    );
}
