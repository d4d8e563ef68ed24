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

/// Exports testdata `case` with `extra` flags to `file` in a fresh temporary directory
/// (returned, so it lives as long as the caller needs the files).
fn export_case(case: &str, file: &str, extra: &[&str]) -> (tempfile::TempDir, PathBuf, Output) {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join(file);
    let o = export(&testdata(case), &out, extra);
    (dir, out, o)
}

/// A command's stdout as one JSON document.
fn stdout_json(o: &Output) -> serde_json::Value {
    serde_json::from_slice(&o.stdout).expect("stdout is one JSON document")
}

/// Exports `case` with `extra` flags and compares with its golden within `atol`.
fn parity(model: &Path, golden: &Path, extra: &[&str], atol: f64) {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("model.onnx");
    let o = export(model, &out, extra);
    assert!(o.status.success(), "export failed: {}", stderr(&o));
    golden_parity(
        &out,
        golden,
        atol,
        &format!("{} {extra:?}", model.display()),
    );
}

/// Runs `model` in ONNX Runtime on `golden`'s inputs and asserts one report per golden
/// output, each within `atol` max-abs; prints them, labelled `label`.
fn golden_parity(model: &Path, golden: &Path, atol: f64, label: &str) {
    let golden = ferry_verifier::Golden::load(golden).expect("golden");
    let mut m = ferry_verifier::Model::load(model, 2).expect("ONNX Runtime loads the model");
    let reports = ferry_verifier::compare(&mut m, &golden).expect("runs");
    assert_eq!(reports.len(), golden.outputs.len());
    for r in &reports {
        println!(
            "{label} {} {:?}: max-abs {:.3e}",
            r.name, r.shape, r.max_abs
        );
        assert!(
            r.max_abs <= atol,
            "{label}: {} max-abs {} > {atol}",
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

/// The real all-MiniLM-L6-v2 checkpoint (fetched by `cargo xtask verify` into
/// target/models), or `None` (the test is skipped, saying so) when it is absent and
/// FERRY_REQUIRE_REAL_MODEL is unset; absent and required is a failure.
fn minilm_dir() -> Option<PathBuf> {
    let dir = std::env::var_os("FERRY_MINILM_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target/models/all-minilm-l6-v2"));
    if dir.join("model.safetensors").is_file() {
        return Some(dir);
    }
    assert!(
        std::env::var_os("FERRY_REQUIRE_REAL_MODEL").is_none(),
        "real model required but missing at {}",
        dir.display()
    );
    eprintln!(
        "skipped: {} absent (run `cargo xtask fetch-minilm`)",
        dir.display()
    );
    None
}

/// The real all-MiniLM-L6-v2 matches transformers' golden.
#[test]
fn real_minilm_matches_transformers() {
    let Some(dir) = minilm_dir() else {
        return;
    };
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
    assert!(stderr(&o).contains("supported: albert, bart, bert, camembert, deberta, deberta-v2, distilbert, electra, gemma, gemma2, gpt2, llama, marian, mbart, mistral, modernbert, mpnet, mt5, phi3, qwen2, qwen3, roberta, t5, xlm-roberta"), "{}", stderr(&o));
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
    let (dir, out, o) = export_case(
        "bert-tiny-tanh-bin",
        "traced_bert.pt",
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

// ----- ferry run: the task's answer from text, as the transformers pipelines give it -----

/// `ferry run MODEL --json ARGS…`, parsed.
fn run_json(model: &Path, args: &[&str]) -> serde_json::Value {
    let o = run(ferry().arg("run").arg(model).arg("--json").args(args));
    assert!(o.status.success(), "ferry run {args:?}: {}", stderr(&o));
    match serde_json::from_slice(&o.stdout) {
        Ok(v) => v,
        Err(e) => panic!(
            "ferry run {args:?} printed no JSON ({e}): {}",
            String::from_utf8_lossy(&o.stdout)
        ),
    }
}

fn num(v: &serde_json::Value) -> f64 {
    v.as_f64().unwrap_or_else(|| panic!("not a number: {v}"))
}

/// Scores agree within 1e-4 (the pipelines' answers are rounded to 7 digits in case.json).
fn assert_close(got: &serde_json::Value, want: &serde_json::Value, what: &str) -> f64 {
    let d = (num(got) - num(want)).abs();
    assert!(d <= 1e-4, "{what}: {got} vs transformers {want}");
    d
}

/// Exports a testdata case to `dir/<case>.onnx`, checking the metadata `ferry run` reads.
fn export_for_run(case: &Path, dir: &Path, extra: &[&str]) -> PathBuf {
    let name = case.file_name().expect("case name").to_string_lossy();
    let out = dir.join(format!("{name}{}.onnx", extra.join("")));
    let o = export(case, &out, extra);
    assert!(o.status.success(), "export {name}: {}", stderr(&o));
    let meta: std::collections::BTreeMap<String, String> = ferry_onnx::read_metadata(&out)
        .expect("metadata")
        .into_iter()
        .collect();
    let source = std::fs::canonicalize(case).expect("canonical case dir");
    assert_eq!(meta["ferry.source"], source.display().to_string());
    assert!(meta.contains_key("ferry.task") && meta.contains_key("ferry.model_type"));
    out
}

/// Runs every input recorded under "pipeline" in the case's case.json and compares with the
/// pipeline's answers: fill-mask top-5 (tokens, strings, sequences, scores), all
/// text-classification labels and scores, token-classification entities (every
/// aggregation strategy), the question-answering span, multiple-choice scores. Returns the worst
/// score difference.
fn check_pipeline_answers(task: &str, model: &Path, extra: &[&str]) -> f64 {
    let case = testdata(&format!("bert-tiny-{task}"));
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(case.join("case.json")).expect("case.json"))
            .expect("json");
    let items = meta["pipeline"].as_array().expect("pipeline answers");
    assert!(items.len() >= 2, "{task}: pipeline answers");
    let mut worst = 0f64;
    for item in items {
        let input = &item["input"];
        let mut args: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        args.push("--text".into());
        args.push(input["text"].as_str().expect("text").into());
        let pairs = input["text_pair"]
            .as_str()
            .map(|p| vec![serde_json::Value::String(p.into())])
            .or_else(|| input["choices"].as_array().cloned())
            .unwrap_or_default();
        for p in &pairs {
            args.push("--text-pair".into());
            args.push(p.as_str().expect("pair").into());
        }
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        let what = format!("{task} {input}");
        match task {
            "fill-mask" => {
                let got = run_json(model, &argv);
                let want = &item["top5"];
                let want: Vec<serde_json::Value> = if want[0].is_array() {
                    want.as_array().expect("masks").clone()
                } else {
                    vec![want.clone()]
                };
                let got = got["predictions"].as_array().expect("predictions");
                assert_eq!(got.len(), want.len(), "{what}: mask count");
                for (g, w) in got.iter().zip(&want) {
                    for k in 0..5 {
                        for key in ["token", "token_str", "sequence"] {
                            assert_eq!(g[k][key], w[k][key], "{what}: prediction {k} {key}");
                        }
                        worst = worst.max(assert_close(&g[k]["score"], &w[k]["score"], &what));
                    }
                }
            }
            "text-classification" => {
                let got = run_json(model, &argv);
                let want = item["all"].as_array().expect("all labels");
                let got = got["labels"].as_array().expect("labels");
                assert_eq!(got.len(), want.len(), "{what}");
                for (g, w) in got.iter().zip(want) {
                    assert_eq!(g["label"], w["label"], "{what}");
                    worst = worst.max(assert_close(&g["score"], &w["score"], &what));
                }
            }
            "token-classification" => {
                for agg in ["none", "simple", "first", "max", "average"] {
                    let mut a = argv.clone();
                    a.extend(["--aggregation", agg]);
                    let got = run_json(model, &a);
                    let want = item[agg].as_array().expect("entities");
                    let got = got["entities"].as_array().expect("entities");
                    assert_eq!(got.len(), want.len(), "{what} {agg}: {got:?}");
                    for (g, w) in got.iter().zip(want) {
                        for key in ["entity", "entity_group", "index", "word", "start", "end"] {
                            assert_eq!(g[key], w[key], "{what} {agg}: {key}");
                        }
                        worst = worst.max(assert_close(&g["score"], &w["score"], &what));
                    }
                }
            }
            "question-answering" => {
                let got = run_json(model, &argv);
                let want = &item["answer"][0];
                for key in ["answer", "start", "end"] {
                    assert_eq!(got[key], want[key], "{what}: {key}");
                }
                worst = worst.max(assert_close(&got["score"], &want["score"], &what));
            }
            "multiple-choice" => {
                let got = run_json(model, &argv);
                let want = item["scores"].as_array().expect("scores");
                let got_choices = got["choices"].as_array().expect("choices");
                assert_eq!(got_choices.len(), want.len(), "{what}");
                let mut best = 0;
                for (i, (g, w)) in got_choices.iter().zip(want).enumerate() {
                    worst = worst.max(assert_close(&g["score"], w, &what));
                    if num(w) > num(&want[best]) {
                        best = i;
                    }
                }
                assert_eq!(got["best"], best, "{what}: best choice");
            }
            other => panic!("no pipeline check for {other}"),
        }
    }
    worst
}

const RUN_TASKS: [&str; 5] = [
    "fill-mask",
    "text-classification",
    "token-classification",
    "question-answering",
    "multiple-choice",
];

#[test]
fn run_answers_match_transformers_pipelines() {
    let dir = tempfile::tempdir().expect("tempdir");
    for task in RUN_TASKS {
        let model = export_for_run(&testdata(&format!("bert-tiny-{task}")), dir.path(), &[]);
        let worst = check_pipeline_answers(task, &model, &[]);
        println!("ferry run {task}: answers match the pipeline, worst score diff {worst:.2e}");
    }
}

/// Without tokenizer.json, the WordPiece tokenizer is built from vocab.txt (and
/// tokenizer_config.json) and gives the same answers, offsets included.
#[test]
fn run_with_vocab_txt_tokenizer() {
    let dir = tempfile::tempdir().expect("tempdir");
    for task in ["token-classification", "question-answering", "fill-mask"] {
        let case = testdata(&format!("bert-tiny-{task}"));
        let tok = dir.path().join(format!("{task}-vocab"));
        std::fs::create_dir(&tok).expect("mkdir");
        for f in ["vocab.txt", "tokenizer_config.json"] {
            std::fs::copy(case.join(f), tok.join(f)).expect("copy");
        }
        let model = export_for_run(&case, dir.path(), &[]);
        let t = tok.display().to_string();
        let worst = check_pipeline_answers(task, &model, &["--tokenizer", &t]);
        println!("ferry run {task} with vocab.txt: worst score diff {worst:.2e}");
    }
}

/// Greedy text generation against transformers' text-generation pipeline (and generate()'s
/// token ids), with the plain decoder and with the key/value cache fed back.
#[test]
fn run_text_generation_matches_transformers() {
    for case in ["run-gpt2-tiny", "run-qwen2-tiny"] {
        run_text_generation_case(&testdata(case));
    }
}

fn run_text_generation_case(case: &Path) {
    let want: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(case.join("run.json")).expect("run.json"))
            .expect("json");
    let dir = tempfile::tempdir().expect("tempdir");
    for extra in [&[][..], &["--task", "text-generation-with-past"][..]] {
        let model = export_for_run(case, dir.path(), extra);
        for g in want["generation"].as_array().expect("generation") {
            let n = g["max_new_tokens"].to_string();
            let prompt = g["prompt"].as_str().expect("prompt");
            let mut args = vec!["--text", prompt];
            if n != "20" {
                args.extend(["--max-new-tokens", &n]);
            }
            let got = run_json(&model, &args);
            assert_eq!(got["cache"], !extra.is_empty(), "cache use");
            assert_eq!(
                got["new_token_ids"], g["new_token_ids"],
                "{extra:?} {prompt}"
            );
            assert_eq!(
                got["generated_text"], g["generated_text"],
                "{extra:?} {prompt}"
            );
        }
    }
}

/// The real all-MiniLM-L6-v2 export computes `sentence_embedding` itself (modules.json:
/// mean pooling, Normalize) and `ferry run` prints it: it equals sentence-transformers'
/// `encode(…, normalize_embeddings=True)` within 1e-5.
#[test]
fn run_real_minilm_sentence_embeddings() {
    let Some(dir) = minilm_dir() else {
        return;
    };
    let want: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(
            root().join("testdata/real/all-minilm-l6-v2/sentence_embeddings.json"),
        )
        .expect("reference embeddings"),
    )
    .expect("json");
    let tmp = tempfile::tempdir().expect("tempdir");
    let model = export_for_run(&dir, tmp.path(), &[]);
    let mut worst = 0f64;
    for (i, s) in want["sentences"]
        .as_array()
        .expect("sentences")
        .iter()
        .enumerate()
    {
        let got = run_json(&model, &["--text", s.as_str().expect("sentence")]);
        assert_eq!(got["pooled_by"], "model");
        let g = got["sentence_embedding"].as_array().expect("embedding");
        let w = want["normalized"][i].as_array().expect("reference");
        assert_eq!(g.len(), 384);
        assert_eq!(g.len(), w.len());
        for (a, b) in g.iter().zip(w) {
            let d = (num(a) - num(b)).abs();
            worst = worst.max(d);
            assert!(d <= 1e-5, "sentence {i}: {a} vs {b}");
        }
    }
    println!(
        "all-MiniLM-L6-v2 sentence_embedding vs encode(normalize_embeddings=True): max-abs {worst:.2e}"
    );
}

#[test]
fn run_bad_input_is_one_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let none = dir.path().join("no-output");
    // The checkpoint (and its tokenizer) moved away after export.
    let ck = dir.path().join("ck");
    std::fs::create_dir(&ck).expect("mkdir");
    let case = testdata("bert-tiny-fill-mask");
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        std::fs::copy(case.join(f), ck.join(f)).expect("copy");
    }
    let model = export_for_run(&ck, dir.path(), &[]);
    std::fs::remove_dir_all(&ck).expect("rm");
    let o = run(ferry().arg("run").arg(&model).args(["--text", "a [MASK]."]));
    assert_fails_cleanly(&o, &none, "tokenizer directory");
    assert!(stderr(&o).contains("does not exist"), "{}", stderr(&o));
    let o = run(ferry()
        .arg("run")
        .arg(&model)
        .args(["--text", "a [MASK].", "--tokenizer"])
        .arg(dir.path().join("missing")));
    assert_fails_cleanly(&o, &none, "tokenizer directory");
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).expect("mkdir");
    let o = run(ferry()
        .arg("run")
        .arg(&model)
        .args(["--text", "a [MASK].", "--tokenizer"])
        .arg(&empty));
    assert_fails_cleanly(&o, &none, "no tokenizer.json or vocab.txt");

    let model = export_for_run(&case, dir.path(), &[]);
    let o = run(ferry()
        .arg("run")
        .arg(&model)
        .args(["--text", "no mask here"]));
    assert_fails_cleanly(&o, &none, "no mask token ([MASK])");
    let o = run(ferry()
        .arg("run")
        .arg(dir.path().join("absent.onnx"))
        .args(["--text", "x"]));
    assert_fails_cleanly(&o, &none, "does not exist");
    let qa = export_for_run(&testdata("bert-tiny-question-answering"), dir.path(), &[]);
    let o = run(ferry().arg("run").arg(&qa).args(["--text", "Where?"]));
    assert_fails_cleanly(&o, &none, "context as one --text-pair");
    let long = "where does john live and who works at google in new york with a red cat and a dog?";
    let o = run(ferry().arg("run").arg(&qa).args([
        "--text",
        long,
        "--text-pair",
        "John lives in New York.",
    ]));
    assert_fails_cleanly(&o, &none, "the question is");
    // A question that leaves less room per window than doc_stride still answers (the
    // pipeline's tokenizer panics there).
    let got = run_json(
        &qa,
        &[
            "--text",
            "Where does John live and who works at Google?",
            "--text-pair",
            "John lives in New York and works at a bank with a red cat and a dog in Paris.",
        ],
    );
    assert!(got["answer"].is_string(), "{got}");
}

mod decoders;
mod fusions;
mod genai;
mod generate_seq2seq;
mod halfprec;
mod hub;
mod lowbit;
mod optimize;
mod optimize_cli;
mod quantize;
mod sentence;
mod seq2seq;
mod tf;
mod tract_parity;
