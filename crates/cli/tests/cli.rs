//! End-to-end tests of the `ferry` binary: golden parity with transformers in ONNX Runtime,
//! and clean failures on bad input.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn ferry() -> Command {
    Command::new(env!("CARGO_BIN_EXE_ferry"))
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn testdata(case: &str) -> PathBuf {
    root().join("testdata").join(case)
}

fn run(cmd: &mut Command) -> Output {
    match cmd.output() {
        Ok(o) => o,
        Err(e) => panic!("cannot run ferry: {e}"),
    }
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn export(model: &Path, out: &Path, extra: &[&str]) -> Output {
    run(ferry()
        .args(["export", "--model"])
        .arg(model)
        .args(extra)
        .arg(out))
}

/// Exports `case` with `extra` flags and compares with its golden within `atol`.
fn parity(model: &Path, golden: &Path, extra: &[&str], atol: f64) {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("model.onnx");
    let o = export(model, &out, extra);
    assert!(o.status.success(), "export failed: {}", stderr(&o));
    let golden = ferry_verifier::Golden::load(golden).expect("golden");
    let mut m = ferry_verifier::Model::load(&out, 2).expect("ONNX Runtime loads the export");
    let reports = ferry_verifier::compare(&mut m, &golden).expect("runs");
    assert_eq!(reports.len(), golden.outputs.len());
    for r in &reports {
        println!(
            "{} {:?} {} {:?}: max-abs {:.3e}",
            model.display(),
            extra,
            r.name,
            r.shape,
            r.max_abs
        );
        assert!(
            r.max_abs <= atol,
            "{} {:?}: {} max-abs {} > {atol}",
            model.display(),
            extra,
            r.name,
            r.max_abs
        );
    }
}

/// Every golden case under testdata: (checkpoint dir, task it was made for).
fn golden_cases() -> Vec<(PathBuf, String)> {
    let mut cases: Vec<(PathBuf, String)> = std::fs::read_dir(root().join("testdata"))
        .expect("testdata")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.join("golden.safetensors").is_file() && p.join("config.json").is_file())
        .map(|p| {
            let meta: serde_json::Value = serde_json::from_str(
                &std::fs::read_to_string(p.join("case.json")).expect("case.json"),
            )
            .expect("case.json is JSON");
            let task = meta["task"].as_str().expect("case task").to_string();
            (p, task)
        })
        .collect();
    cases.sort();
    assert!(cases.len() >= 8, "golden cases missing: {cases:?}");
    cases
}

#[test]
fn tiny_goldens_match_transformers_at_opsets_14_17_21() {
    for (dir, task) in golden_cases() {
        let golden = dir.join("golden.safetensors");
        for opset in ["14", "17", "21"] {
            parity(&dir, &golden, &["--task", &task, "--opset", opset], 1e-5);
        }
    }
}

#[test]
fn external_data_export_matches() {
    for (dir, task) in golden_cases() {
        let golden = dir.join("golden.safetensors");
        parity(&dir, &golden, &["--task", &task, "--external-data"], 1e-5);
    }
}

#[test]
fn task_is_inferred_from_architectures() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("qa.onnx");
    let o = export(&testdata("bert-tiny-question-answering"), &out, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("task question-answering"),
        "{}",
        stderr(&o)
    );
    let golden = testdata("bert-tiny-question-answering").join("golden.safetensors");
    parity(
        &testdata("bert-tiny-question-answering"),
        &golden,
        &[],
        1e-5,
    );
    // Seed pipeline aliases are accepted.
    let o = export(
        &testdata("bert-tiny-tanh-bin"),
        &out,
        &["--task", "sentiment-analysis"],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("task text-classification"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn task_without_head_weights_is_a_clear_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("x.onnx");
    assert_fails_cleanly(
        &export(
            &testdata("bert-tiny-gelu"),
            &out,
            &["--task", "question-answering"],
        ),
        &out,
        "task `question-answering` needs weight `qa_outputs.weight`",
    );
    assert_fails_cleanly(
        &export(
            &testdata("bert-tiny-gelu"),
            &out,
            &["--task", "text-generation"],
        ),
        &out,
        "task `text-generation` is not supported for `bert`",
    );
}

#[test]
fn check_flag_runs_dummy_inputs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("m.onnx");
    let o = export(&testdata("bert-tiny-gelu"), &out, &["--check"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("check passed"), "{}", stderr(&o));
}

#[test]
fn model_from_hub_cache_offline() {
    let cache = tempfile::tempdir().expect("tempdir");
    let repo = cache.path().join("models--tiny-org--bert-tiny");
    let snap = repo.join("snapshots").join("0123abcd");
    std::fs::create_dir_all(&snap).expect("mkdir");
    std::fs::create_dir_all(repo.join("refs")).expect("mkdir");
    std::fs::write(repo.join("refs/main"), "0123abcd").expect("write");
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(testdata("bert-tiny-gelu").join(f), snap.join(f)).expect("copy");
    }
    let out = cache.path().join("m.onnx");
    let o = run(ferry()
        .env("HF_HUB_CACHE", cache.path())
        .env("HF_HUB_OFFLINE", "1")
        .args(["export", "--model", "tiny-org/bert-tiny"])
        .arg(&out));
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(out.is_file());

    let o = run(ferry()
        .env("HF_HUB_CACHE", cache.path())
        .env("HF_HUB_OFFLINE", "1")
        .args(["export", "--model", "tiny-org/absent"])
        .arg(cache.path().join("x.onnx")));
    assert_fails_cleanly(&o, &cache.path().join("x.onnx"), "models--tiny-org--absent");
    assert!(stderr(&o).contains("offline"), "{}", stderr(&o));
}

/// The real all-MiniLM-L6-v2 (fetched by `cargo xtask verify` into target/models).
#[test]
fn real_minilm_matches_transformers() {
    let dir = std::env::var_os("FERRY_MINILM_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target/models/all-minilm-l6-v2"));
    if !dir.join("model.safetensors").is_file() {
        assert!(
            std::env::var_os("FERRY_REQUIRE_REAL_MODEL").is_none(),
            "real model required but missing at {}",
            dir.display()
        );
        eprintln!(
            "skipped: {} absent (run `cargo xtask fetch-minilm`)",
            dir.display()
        );
        return;
    }
    let golden = root().join("testdata/real/all-minilm-l6-v2/golden.safetensors");
    parity(&dir, &golden, &[], 1e-4);
    parity(&dir, &golden, &["--opset", "14"], 1e-4);
}

// ----- bad input: one line on stderr, exit 1, no output file -----

fn assert_fails_cleanly(o: &Output, out: &Path, needle: &str) {
    let err = stderr(o);
    assert_eq!(o.status.code(), Some(1), "exit code; stderr: {err}");
    assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
    assert!(err.starts_with("error: "), "{err}");
    assert!(err.contains(needle), "expected `{needle}` in: {err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(
        !out.exists(),
        "no output file may be left: {}",
        out.display()
    );
    if let Some(dir) = out.parent()
        && let Ok(entries) = std::fs::read_dir(dir)
    {
        for e in entries.flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            assert!(!n.contains("ferry-tmp"), "temporary file left: {n}");
        }
    }
}

/// A copy of the tiny BERT checkpoint in a temp dir, for corrupting.
fn scratch_checkpoint() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(testdata("bert-tiny-gelu").join(f), dir.path().join(f)).expect("copy");
    }
    dir
}

fn edit_config(dir: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let p = dir.join("config.json");
    let text = std::fs::read_to_string(&p).expect("read config");
    let mut v: serde_json::Value = serde_json::from_str(&text).expect("json");
    f(&mut v);
    std::fs::write(&p, v.to_string()).expect("write config");
}

#[test]
fn missing_config_json() {
    let ck = scratch_checkpoint();
    std::fs::remove_file(ck.path().join("config.json")).expect("rm");
    let out = ck.path().join("out.onnx");
    assert_fails_cleanly(&export(ck.path(), &out, &[]), &out, "no config.json");
}

#[test]
fn unknown_model_type_names_supported_ones() {
    let ck = scratch_checkpoint();
    edit_config(ck.path(), |v| v["model_type"] = "bort".into());
    let out = ck.path().join("out.onnx");
    let o = export(ck.path(), &out, &[]);
    assert_fails_cleanly(&o, &out, "unknown architecture `bort`");
    assert!(stderr(&o).contains("supported: bert"), "{}", stderr(&o));
}

#[test]
fn truncated_safetensors() {
    let ck = scratch_checkpoint();
    let p = ck.path().join("model.safetensors");
    let bytes = std::fs::read(&p).expect("read");
    std::fs::write(&p, &bytes[..bytes.len() / 2]).expect("write");
    let out = ck.path().join("out.onnx");
    assert_fails_cleanly(&export(ck.path(), &out, &[]), &out, "corrupt safetensors");
}

#[test]
fn corrupt_safetensors_header() {
    let ck = scratch_checkpoint();
    let p = ck.path().join("model.safetensors");
    let mut bytes = std::fs::read(&p).expect("read");
    for b in bytes.iter_mut().skip(8).take(16) {
        *b = b'#';
    }
    std::fs::write(&p, &bytes).expect("write");
    let out = ck.path().join("out.onnx");
    assert_fails_cleanly(&export(ck.path(), &out, &[]), &out, "corrupt safetensors");

    std::fs::write(&p, [0xffu8; 4]).expect("write");
    assert_fails_cleanly(&export(ck.path(), &out, &[]), &out, "corrupt safetensors");
}

#[test]
fn weight_shape_disagrees_with_config() {
    let ck = scratch_checkpoint();
    edit_config(ck.path(), |v| v["intermediate_size"] = 40.into());
    let out = ck.path().join("out.onnx");
    assert_fails_cleanly(
        &export(ck.path(), &out, &[]),
        &out,
        "weight `encoder.layer.0.intermediate.dense.weight` has shape [37, 32] but config.json implies [40, 32]",
    );
}

#[test]
fn missing_weight() {
    let ck = scratch_checkpoint();
    edit_config(ck.path(), |v| v["num_hidden_layers"] = 3.into());
    let out = ck.path().join("out.onnx");
    assert_fails_cleanly(
        &export(ck.path(), &out, &[]),
        &out,
        "no weight `encoder.layer.2.attention.self.query.weight`",
    );
}

#[test]
fn missing_weights_file() {
    let ck = scratch_checkpoint();
    std::fs::remove_file(ck.path().join("model.safetensors")).expect("rm");
    let out = ck.path().join("out.onnx");
    assert_fails_cleanly(&export(ck.path(), &out, &[]), &out, "no weights found");
}

#[test]
fn output_in_missing_directory() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("nope").join("out.onnx");
    assert_fails_cleanly(
        &export(&testdata("bert-tiny-gelu"), &out, &[]),
        &out,
        "does not exist",
    );
}

#[test]
fn output_in_read_only_directory() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("tempdir");
    let ro = dir.path().join("ro");
    std::fs::create_dir(&ro).expect("mkdir");
    std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o555)).expect("chmod");
    // root ignores directory permissions; /proc is read-only for everyone.
    let root_user = std::fs::write(ro.join("probe"), b"x").is_ok();
    let out = if root_user {
        PathBuf::from("/proc/ferry-test-out.onnx")
    } else {
        ro.join("out.onnx")
    };
    let o = export(&testdata("bert-tiny-gelu"), &out, &[]);
    assert_fails_cleanly(&o, &out, "cannot write");
    std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o755)).expect("chmod");
}

#[test]
fn unsupported_opset() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("out.onnx");
    assert_fails_cleanly(
        &export(&testdata("bert-tiny-gelu"), &out, &["--opset", "9"]),
        &out,
        "opset 9 is not supported",
    );
}

#[test]
fn model_not_found_lists_what_was_searched() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("out.onnx");
    let o = run(ferry()
        .env("HF_HUB_CACHE", dir.path())
        .env("HF_HUB_OFFLINE", "1")
        .args(["export", "--model", "./no/such/dir/x"])
        .arg(&out));
    assert_fails_cleanly(&o, &out, "not found; searched: local directory");
}

#[test]
fn torchscript_export_writes_an_archive() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("traced_bert.pt");
    let o = export(
        &testdata("bert-tiny-tanh-bin"),
        &out,
        &["--format", "torchscript", "--dynamic-axes"],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let bytes = std::fs::read(&out).expect("archive");
    assert_eq!(&bytes[..4], b"PK\x03\x04", "a zip archive");
    assert!(
        stderr(&o).contains("TorchScript (BertForSequenceClassification, dynamic axes)"),
        "{}",
        stderr(&o)
    );

    let bad = dir.path().join("missing").join("x.pt");
    assert_fails_cleanly(
        &export(
            &testdata("bert-tiny-gelu"),
            &bad,
            &["--format", "torchscript"],
        ),
        &bad,
        "does not exist",
    );
    let bad = dir.path().join("y.pt");
    assert_fails_cleanly(
        &export(
            &testdata("bert-tiny-gelu"),
            &bad,
            &["--format", "torchscript", "--check"],
        ),
        &bad,
        "ONNX exports only",
    );
}

/// `ferry export --list` is generated from the tracer's registry; this snapshot changes
/// whenever an architecture or task is added (rewrite it with FERRY_UPDATE_SNAPSHOTS=1).
#[test]
fn list_matches_snapshot() {
    let o = run(ferry().args(["export", "--list"]));
    assert!(o.status.success(), "{}", stderr(&o));
    let got = String::from_utf8_lossy(&o.stdout).into_owned();
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/snapshots/export-list.txt");
    if std::env::var_os("FERRY_UPDATE_SNAPSHOTS").is_some() {
        std::fs::write(&path, &got).expect("write snapshot");
    }
    let want = std::fs::read_to_string(&path).expect("snapshot");
    assert_eq!(
        got, want,
        "`ferry export --list` changed; rerun with FERRY_UPDATE_SNAPSHOTS=1"
    );
    assert!(got.lines().any(|l| l.starts_with("bert ")), "{got}");
}
