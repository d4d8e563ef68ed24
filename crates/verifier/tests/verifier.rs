//! Verifier tests: golden files, and ONNX Runtime on a model ferry did not write.

use std::path::{Path, PathBuf};

use ferry_verifier::{DummySpec, Golden, Model, check_dummy, compare};

fn testdata(case: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../testdata")
        .join(case)
}

#[test]
fn golden_files_load() {
    let g = Golden::load(&testdata("bert-tiny-gelu/golden.safetensors")).expect("golden");
    assert_eq!(g.inputs["input_ids"].shape, vec![3, 11]);
    let mask = &g.inputs["attention_mask"].data;
    assert!(mask.contains(&0), "goldens are padded");
    assert_eq!(g.outputs["last_hidden_state"].shape, vec![3, 11, 32]);
    assert!(Golden::load(&testdata("bert-tiny-gelu/config.json")).is_err());
}

/// A model whose output is wrong must be reported with a large max-abs, and one with
/// non-finite outputs must fail the dummy check: the verifier can fail.
#[test]
fn verifier_detects_wrong_outputs() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Golden from one tiny model, model from another of the same shapes: outputs differ.
    let ck = ferry_loader::load(&testdata("bert-tiny-gelu")).expect("load");
    let mut cfg = ck.config.clone();
    cfg.hidden_act = Some("relu".into());
    let g = ferry_tracer::trace(&cfg, &ck.weights, &Default::default()).expect("trace");
    let out = dir.path().join("relu.onnx");
    ferry_onnx::write_model(&g, &out, &Default::default()).expect("write");
    let golden = Golden::load(&testdata("bert-tiny-gelu/golden.safetensors")).expect("golden");
    let mut m = Model::load(&out, 1).expect("load in ORT");
    let reports = compare(&mut m, &golden).expect("run");
    assert!(reports.iter().any(|r| r.max_abs > 1e-3), "{reports:?}");
    let spec = DummySpec {
        batch: 2,
        sequence_lengths: vec![5, 9],
        vocab_size: 99,
        type_vocab_size: 3,
    };
    let runs = check_dummy(&mut m, &spec).expect("dummy runs");
    assert_eq!(runs[1].shapes["last_hidden_state"], vec![2, 9, 32]);
    // Token ids beyond the vocabulary make Gather fail in ORT: an error, not a panic.
    let spec = DummySpec {
        vocab_size: 1000,
        ..spec
    };
    assert!(check_dummy(&mut m, &spec).is_err());
}
