//! TensorFlow checkpoints (`tf_model.h5`, made by testdata/make_tf_fixtures.py with
//! transformers 4.x): golden parity with transformers' PyTorch outputs, `--framework`
//! selection and auto-detection, and clean failures on bad HDF5 files.

use super::*;

/// The TF-only fixtures and the one holding both frameworks' weights.
const TF_ONLY: [&str; 2] = [
    "tf-bert-tiny-feature-extraction",
    "tf-distilbert-tiny-text-classification",
];
const BOTH: &str = "tf-bert-tiny-both";

/// The weights the export summary says it read (`exported bert [tf_model.h5, float32] …`).
fn weights_used(o: &Output) -> String {
    let err = stderr(o);
    let line = err
        .lines()
        .find(|l| l.starts_with("exported "))
        .unwrap_or_else(|| panic!("no summary line in: {err}"));
    let start = line.find('[').expect("summary has [format, dtype]") + 1;
    let end = line[start..].find(',').expect("format, dtype") + start;
    line[start..end].to_string()
}

fn export_ok(model: &Path, extra: &[&str]) -> String {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("model.onnx");
    let o = export(model, &out, extra);
    assert!(o.status.success(), "export failed: {}", stderr(&o));
    assert!(out.is_file());
    weights_used(&o)
}

#[test]
fn tf_checkpoints_match_transformers_pytorch_outputs() {
    for case in TF_ONLY.iter().chain([&BOTH]) {
        let dir = testdata(case);
        let golden = dir.join("golden.safetensors");
        for opset in ["14", "17"] {
            parity(
                &dir,
                &golden,
                &["--framework", "tf", "--opset", opset],
                1e-5,
            );
        }
    }
    // The same weights read from model.safetensors give the same outputs.
    parity(
        &testdata(BOTH),
        &testdata(BOTH).join("golden.safetensors"),
        &["--framework", "pt"],
        1e-5,
    );
}

#[test]
fn framework_auto_prefers_pytorch_weights_then_tf() {
    // Only tf_model.h5: auto reads it.
    for case in TF_ONLY {
        assert_eq!(export_ok(&testdata(case), &[]), "tf_model.h5", "{case}");
    }
    // Both: safetensors first, as transformers does; each framework on request.
    let both = testdata(BOTH);
    assert_eq!(export_ok(&both, &[]), "safetensors");
    assert_eq!(export_ok(&both, &["--framework", "auto"]), "safetensors");
    assert_eq!(export_ok(&both, &["--framework", "pt"]), "safetensors");
    assert_eq!(export_ok(&both, &["--framework", "tf"]), "tf_model.h5");

    // pytorch_model.bin beside a broken tf_model.h5: the .bin wins, and tf_model.h5 is
    // not even opened unless asked for.
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::copy(
        testdata("bert-tiny-tanh-bin").join("pytorch_model.bin"),
        dir.path().join("pytorch_model.bin"),
    )
    .expect("copy");
    std::fs::copy(
        testdata("bert-tiny-tanh-bin").join("config.json"),
        dir.path().join("config.json"),
    )
    .expect("copy");
    std::fs::write(dir.path().join("tf_model.h5"), b"not hdf5").expect("write");
    assert_eq!(export_ok(dir.path(), &[]), "pytorch_model.bin");
    let out = dir.path().join("out.onnx");
    assert_fails_cleanly(
        &export(dir.path(), &out, &["--framework", "tf"]),
        &out,
        "tf_model.h5",
    );
}

#[test]
fn framework_tf_without_tf_model_h5_is_an_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("out.onnx");
    let o = export(&testdata("bert-tiny-gelu"), &out, &["--framework", "tf"]);
    assert_fails_cleanly(&o, &out, "no tf_model.h5");
}

#[test]
fn framework_pt_with_only_tf_model_h5_is_an_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("out.onnx");
    let o = export(&testdata(TF_ONLY[0]), &out, &["--framework", "pt"]);
    assert_fails_cleanly(&o, &out, "no PyTorch weights");
}

#[test]
fn corrupt_tf_model_h5_fails_cleanly() {
    let src = testdata(TF_ONLY[0]);
    let h5 = std::fs::read(src.join("tf_model.h5")).expect("read");
    let cases: [(&str, Vec<u8>); 4] = [
        ("truncated to half", h5[..h5.len() / 2].to_vec()),
        ("last bytes cut", h5[..h5.len() - 64].to_vec()),
        ("not HDF5", b"this is not an HDF5 file".to_vec()),
        ("empty", Vec::new()),
    ];
    for (what, bytes) in cases {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::copy(src.join("config.json"), dir.path().join("config.json")).expect("copy");
        std::fs::write(dir.path().join("tf_model.h5"), &bytes).expect("write");
        let out = dir.path().join("out.onnx");
        for extra in [&[][..], &["--framework", "tf"][..]] {
            let o = export(dir.path(), &out, extra);
            assert!(!o.status.success(), "{what} {extra:?}: export succeeded");
            assert_fails_cleanly(&o, &out, "tf_model.h5");
        }
    }
}

/// TF kernels are transposed views; `--optimize` folds the tracer's Transpose into them
/// (a transpose of a transpose) and the fused model still matches transformers.
#[test]
fn optimized_tf_export_matches() {
    let case = testdata(TF_ONLY[0]);
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("model.onnx");
    let o = export(&case, &out, &["--framework", "tf", "--optimize"]);
    assert!(o.status.success(), "export failed: {}", stderr(&o));
    let optimized = dir.path().join("model-optimized.onnx");
    let golden = ferry_verifier::Golden::load(&case.join("golden.safetensors")).expect("golden");
    let mut m = ferry_verifier::Model::load(&optimized, 2).expect("ONNX Runtime loads it");
    let reports = ferry_verifier::compare(&mut m, &golden).expect("runs");
    assert_eq!(reports.len(), 2);
    for r in &reports {
        println!("optimized {}: max-abs {:.3e}", r.name, r.max_abs);
        assert!(r.max_abs <= 1e-4, "{}: max-abs {}", r.name, r.max_abs);
    }
}
