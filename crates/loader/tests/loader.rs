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
fn half_checkpoints_upcast_to_f32_while_streaming() {
    use ferry_ir::DType;
    for (case, dtype) in [
        ("bert-tiny-fp16", DType::F16),
        ("bert-tiny-bf16", DType::BF16),
    ] {
        let c = load(&testdata(case)).expect("load");
        let name = "encoder.layer.0.attention.self.query.weight";
        let w = c.weights.get(name).expect("query weight");
        assert_eq!(w.dtype, dtype);
        assert_eq!(w.data.len(), 32 * 32 * 2);
        let raw = w.data.bytes().expect("raw bytes");
        let want: Vec<f32> = raw
            .chunks_exact(2)
            .map(|b| match dtype {
                DType::F16 => half::f16::from_le_bytes([b[0], b[1]]).to_f32(),
                _ => half::bf16::from_le_bytes([b[0], b[1]]).to_f32(),
            })
            .collect();
        assert!(want.iter().any(|v| *v != 0.0));

        let up = c.weights.upcast_to_f32();
        assert_eq!(up.len(), c.weights.len());
        assert!(
            up.iter()
                .all(|t| t.dtype != DType::F16 && t.dtype != DType::BF16)
        );
        let t = up.get(name).expect("converted");
        assert_eq!(t.dtype, DType::F32);
        assert_eq!(t.dims, w.dims);
        assert!(matches!(t.data, TensorData::Converted { .. }));
        assert_eq!(t.data.len(), 32 * 32 * 4);
        assert_eq!(t.data.to_f32_vec().expect("convert"), want);
        // Streamed (as the writers do) in small chunks: the same float32 bytes.
        let mut streamed = Vec::new();
        t.data.write_to(&mut streamed).expect("write");
        let mut chunked = Vec::new();
        t.data
            .for_each_chunk(100, |b| {
                chunked.extend_from_slice(b);
                Ok(())
            })
            .expect("chunks");
        let want_bytes: Vec<u8> = want.iter().flat_map(|v| v.to_le_bytes()).collect();
        assert_eq!(streamed, want_bytes);
        assert_eq!(chunked, want_bytes);
    }
    // Float32 checkpoints are shared unchanged.
    let c = load(&testdata("bert-tiny-gelu")).expect("load");
    let up = c.weights.upcast_to_f32();
    assert!(
        up.iter()
            .all(|t| !matches!(t.data, TensorData::Converted { .. }))
    );
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
