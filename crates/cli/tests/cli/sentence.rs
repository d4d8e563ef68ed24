//! sentence-transformers checkpoints (testdata/st-*, saved by sentence-transformers):
//! `sentence_embedding` in the graph (its golden parity at opsets 14/17/21 runs with every
//! golden case), `ferry run` printing it against `encode()`, the token_embeddings naming,
//! and modules.json errors.

use super::*;

/// The st-* golden cases.
fn st_cases() -> Vec<PathBuf> {
    let cases: Vec<PathBuf> = golden_cases()
        .into_iter()
        .map(|(p, _)| p)
        .filter(|p| p.join("modules.json").is_file())
        .collect();
    assert!(cases.len() >= 5, "sentence-transformers cases missing");
    cases
}

fn case_json(case: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(case.join("case.json")).expect("case.json"))
        .expect("case.json is JSON")
}

/// Runs `model` on each recorded `encode()` text and returns the worst max-abs difference
/// of the printed `sentence_embedding`, checking who pooled.
fn run_against_encode(model: &Path, case: &Path, extra: &[&str], pooled_by: &str) -> f64 {
    let mut worst = 0f64;
    for e in case_json(case)["encode"].as_array().expect("encode") {
        let mut args = vec!["--text", e["text"].as_str().expect("text")];
        args.extend(extra);
        let got = run_json(model, &args);
        assert_eq!(got["pooled_by"], pooled_by, "{}", case.display());
        let g = got["sentence_embedding"].as_array().expect("embedding");
        let w = e["sentence_embedding"].as_array().expect("reference");
        assert_eq!(g.len(), w.len(), "{}", case.display());
        for (a, b) in g.iter().zip(w) {
            worst = worst.max((num(a) - num(b)).abs());
        }
    }
    worst
}

/// `ferry run` prints the export's own `sentence_embedding`, equal to
/// sentence-transformers' `encode()` within 1e-5 for every st-* case (every pooling mode,
/// Dense layers, with and without Normalize).
#[test]
fn run_prints_the_models_sentence_embedding() {
    let tmp = tempfile::tempdir().expect("tempdir");
    for case in st_cases() {
        let model = export_for_run(&case, tmp.path(), &[]);
        let worst = run_against_encode(&model, &case, &[], "model");
        println!("{}: max-abs {worst:.2e}", case.display());
        assert!(worst <= 1e-5, "{}: {worst}", case.display());
    }
}

/// An export made without modules.json (token states only) still gets
/// sentence-transformers' pooling from `ferry run`, computed by ferry from the tokenizer
/// directory's modules.json; Dense layers it cannot compute are a clear error.
#[test]
fn run_pools_token_states_of_exports_without_the_output() {
    let tmp = tempfile::tempdir().expect("tempdir");
    for case in st_cases() {
        let name = case
            .file_name()
            .expect("name")
            .to_string_lossy()
            .to_string();
        let plain = tmp.path().join(&name);
        std::fs::create_dir(&plain).expect("mkdir");
        for f in ["config.json", "model.safetensors"] {
            std::fs::copy(case.join(f), plain.join(f)).expect("copy");
        }
        let model = tmp.path().join(format!("{name}.onnx"));
        let o = export(&plain, &model, &[]);
        assert!(o.status.success(), "{}", stderr(&o));
        let outputs: Vec<String> = ferry_verifier::Model::load(&model, 1)
            .expect("load")
            .outputs()
            .into_iter()
            .map(|o| o.name)
            .collect();
        assert!(!outputs.contains(&"sentence_embedding".to_string()));
        let tok = case.to_string_lossy().to_string();
        let modules = ferry_ir::SentenceModules::read(&case)
            .expect("modules.json")
            .expect("a sentence-transformers case");
        if modules.dense.is_empty() {
            let worst = run_against_encode(&model, &case, &["--tokenizer", &tok], "ferry");
            println!("{name} pooled by ferry: max-abs {worst:.2e}");
            assert!(worst <= 1e-5, "{name}: {worst}");
        } else {
            let o = run(ferry().arg("run").arg(&model).args([
                "--text",
                "the cat",
                "--tokenizer",
                &tok,
            ]));
            assert_eq!(o.status.code(), Some(1));
            assert!(stderr(&o).contains("Dense layers"), "{}", stderr(&o));
        }
    }
}

/// `--sentence-transformers-names` renames the token states `token_embeddings` (optimum's
/// sentence-transformers naming); the values are unchanged. Without modules.json there is
/// no `sentence_embedding`; the flag is refused for other tasks.
#[test]
fn sentence_transformers_names_and_plain_checkpoints() {
    let case = testdata("st-bert-tiny-cls-dense");
    let (_dir, out, o) = export_case(
        "st-bert-tiny-cls-dense",
        "m.onnx",
        &["--sentence-transformers-names"],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let golden = ferry_verifier::Golden::load(&case.join("golden.safetensors")).expect("golden");
    let mut m = ferry_verifier::Model::load(&out, 1).expect("load");
    let names: Vec<String> = m.outputs().into_iter().map(|o| o.name).collect();
    assert_eq!(
        names,
        ["token_embeddings", "pooler_output", "sentence_embedding"]
    );
    let got = m.run(&golden.inputs).expect("run");
    for (name, want) in [
        ("token_embeddings", "last_hidden_state"),
        ("sentence_embedding", "sentence_embedding"),
    ] {
        let (g, w) = (&got[name], &golden.outputs[want]);
        assert_eq!(g.shape, w.shape);
        let worst = g
            .data
            .iter()
            .zip(&w.data)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(worst <= 1e-5, "{name}: {worst}");
    }
    // A checkpoint without modules.json: token states only, under last_hidden_state.
    let (_dir, out, o) = export_case("bert-tiny-gelu", "m.onnx", &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let m = ferry_verifier::Model::load(&out, 1).expect("load");
    let names: Vec<String> = m.outputs().into_iter().map(|o| o.name).collect();
    assert_eq!(names, ["last_hidden_state", "pooler_output"]);
    let (_dir, out, o) = export_case(
        "bert-tiny-text-classification",
        "m.onnx",
        &["--sentence-transformers-names"],
    );
    assert_fails_cleanly(
        &o,
        &out,
        "token_embeddings naming applies to feature-extraction",
    );
}

/// modules.json that ferry cannot follow: one line, exit 1, no output file.
#[test]
fn unsupported_sentence_modules_fail_cleanly() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let ck = tmp.path().join("ck");
    std::fs::create_dir(&ck).expect("mkdir");
    let case = testdata("st-bert-tiny-mean-normalize");
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(case.join(f), ck.join(f)).expect("copy");
    }
    let out = tmp.path().join("m.onnx");
    let bad = [
        (
            r#"[{"idx":0,"path":"","type":"sentence_transformers.models.Transformer"},{"idx":1,"path":"1_LSTM","type":"sentence_transformers.models.LSTM"}]"#,
            "",
            "module `sentence_transformers.models.LSTM` (at this place) is not supported",
        ),
        (
            r#"[{"idx":0,"path":"","type":"sentence_transformers.models.Transformer"},{"idx":1,"path":"1_Pooling","type":"sentence_transformers.models.Pooling"}]"#,
            r#"{"embedding_dimension": 16, "pooling_mode": "median"}"#,
            "unknown pooling mode `median`",
        ),
        (
            r#"[{"idx":0,"path":"","type":"sentence_transformers.models.Transformer"},{"idx":1,"path":"1_Pooling","type":"sentence_transformers.models.Pooling"}]"#,
            r#"{"embedding_dimension": 24, "pooling_mode": "mean"}"#,
            "embedding_dimension 24 differs from the model's hidden size 16",
        ),
        ("{not json", "", "modules.json: not valid JSON"),
    ];
    for (modules, pooling, needle) in bad {
        std::fs::write(ck.join("modules.json"), modules).expect("write");
        if !pooling.is_empty() {
            std::fs::create_dir_all(ck.join("1_Pooling")).expect("mkdir");
            std::fs::write(ck.join("1_Pooling/config.json"), pooling).expect("write");
        }
        assert_fails_cleanly(&export(&ck, &out, &[]), &out, needle);
    }
}

/// `--optimize` fuses the encoder under the pooling as it does without it (2 layers:
/// EmbedLayerNormalization, 2 Attention, 2 BiasGelu, 4 SkipLayerNormalization; on the real
/// all-MiniLM-L6-v2, ONNX Runtime's optimizer fuses the same per layer on optimum's export)
/// and the optimized `sentence_embedding` keeps parity with sentence-transformers within 1e-5.
#[test]
fn optimized_sentence_exports_fuse_the_encoder_and_keep_parity() {
    for case in st_cases() {
        let name = case
            .file_name()
            .expect("name")
            .to_string_lossy()
            .to_string();
        let (dir, _out, o) = export_case(&name, "m.onnx", &["--optimize", "--json"]);
        assert!(o.status.success(), "{}", stderr(&o));
        let fused = &stdout_json(&o)["optimized"]["fused_operators"];
        for (op, n) in [
            ("EmbedLayerNormalization", 1),
            ("Attention", 2),
            ("BiasGelu", 2),
            ("SkipLayerNormalization", 4),
        ] {
            assert_eq!(fused[op], n, "{name} {op}: {fused}");
        }
        golden_parity(
            &dir.path().join("m-optimized.onnx"),
            &case.join("golden.safetensors"),
            1e-5,
            &format!("{name} optimized"),
        );
    }
}
