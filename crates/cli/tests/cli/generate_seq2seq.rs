//! Encoder-decoder generation against transformers: every testdata case with
//! `generate.*_ids` goldens is exported as optimum's folder and generates, greedy and with 4
//! beams, through the merged decoder and through the two separate ones, the token ids
//! `model.generate` returned, and under the other settings of `seq2seq-generate/<case>.json`; `ferry run` on the exported `run-t5-tiny` prints what the
//! translation and summarization pipelines answered (run.json); bad folders and settings fail
//! with one line.

use std::path::{Path, PathBuf};

use ferry_pipeline::{Seq2Seq, Seq2SeqConfig};

use super::{assert_fails_cleanly, export, ferry, root, run, stderr, testdata};

const TASK: &str = "text2text-generation-with-past";

/// Cases whose steps golden holds `generate.greedy_ids` (the seq2seq goldens).
fn generate_cases() -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(root().join("testdata"))
        .expect("testdata")
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            std::fs::read(p.join("steps.safetensors")).is_ok_and(|b| {
                safetensors::SafeTensors::deserialize(&b)
                    .is_ok_and(|st| st.tensor("generate.greedy_ids").is_ok())
            })
        })
        .collect();
    v.sort();
    assert!(v.len() >= 6, "seq2seq generate goldens missing: {v:?}");
    v
}

/// An int64 `[rows, n]` golden as rows.
fn rows(case: &Path, name: &str) -> Vec<Vec<i64>> {
    let bytes = std::fs::read(case.join("steps.safetensors")).expect("steps.safetensors");
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("safetensors");
    let t = st.tensor(name).expect(name);
    let n = t.shape()[1];
    let flat: Vec<i64> = t
        .data()
        .chunks_exact(8)
        .map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes")))
        .collect();
    flat.chunks(n).map(<[i64]>::to_vec).collect()
}

/// Exports `case` as a folder into a fresh temporary directory.
fn export_folder(case: &Path) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("out");
    let o = export(case, &out, &["--task", TASK]);
    assert!(
        o.status.success(),
        "export {}: {}",
        case.display(),
        stderr(&o)
    );
    (dir, out)
}

#[test]
fn greedy_and_beam_search_match_generate() {
    let mut settings = 0;
    for case in generate_cases() {
        let name = case.file_name().map(|n| n.to_string_lossy().into_owned());
        let meta: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(case.join("case.json")).expect("case.json"),
        )
        .expect("case.json is JSON");
        let new_tokens = meta["generation"]["max_new_tokens"]
            .as_u64()
            .expect("case.json: generation.max_new_tokens") as usize;
        let (_tmp, out) = export_folder(&case);
        let ids = rows(&case, "generate.input_ids");
        let mask = rows(&case, "generate.attention_mask");
        for merged in [true, false] {
            let mut model = Seq2Seq::load_files(&out, 1, merged).expect("load folder");
            for (beams, golden) in [(1, "generate.greedy_ids"), (4, "generate.beam4_ids")] {
                let mut cfg = Seq2SeqConfig::from_folder(&out).expect("generation config");
                cfg.num_beams = beams;
                cfg.max_new_tokens = Some(new_tokens);
                let got = model.generate(&ids, &mask, &cfg).expect("generate");
                let want = rows(&case, golden);
                assert!(
                    want.iter().all(|r| r.len() > 12),
                    "{name:?}: golden {golden} has fewer than 12 new tokens"
                );
                assert_eq!(got, want, "{name:?} {golden} (merged decoder: {merged})");
            }
        }
        settings += usize::from(settings_match_generate(&case, &out, &ids, &mask));
    }
    assert!(settings >= 6, "seq2seq-generate/ goldens: {settings} cases");
}

/// The settings goldens of `seq2seq-generate/<case>.json` (early stopping modes, length
/// penalties, n-gram blocking, min/max length, end-of-sequence lists, bad words), if the
/// case has them.
fn settings_match_generate(case: &Path, out: &Path, ids: &[Vec<i64>], mask: &[Vec<i64>]) -> bool {
    let name = case.file_name().expect("case name").to_string_lossy();
    let path = testdata("seq2seq-generate").join(format!("{name}.json"));
    if !path.is_file() {
        return false;
    }
    let golden: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("settings golden"))
            .expect("settings golden is JSON");
    let settings = golden["generate"].as_array().expect("generate");
    assert!(settings.len() >= 10, "{}", path.display());
    let mut model = Seq2Seq::load(out, 1).expect("load folder");
    for s in settings {
        let mut cfg = Seq2SeqConfig::from_folder(out).expect("generation config");
        cfg.apply(s["kwargs"].as_object().expect("kwargs"))
            .expect("settings apply");
        let got = model.generate(ids, mask, &cfg).expect("generate");
        let want: Vec<Vec<i64>> =
            serde_json::from_value(s["ids"].clone()).expect("ids are int rows");
        assert_eq!(got, want, "{name} {}", s["kwargs"]);
    }
    true
}

/// `ferry run` arguments for a pipeline call's generate kwargs.
fn kwarg_flags(kwargs: &serde_json::Value) -> Vec<String> {
    let mut flags = Vec::new();
    for (k, v) in kwargs.as_object().expect("kwargs object") {
        let flag = match k.as_str() {
            "max_new_tokens" => "--max-new-tokens",
            "max_length" => "--max-length",
            "min_length" => "--min-length",
            "num_beams" => "--num-beams",
            other => panic!("run.json kwarg `{other}` has no ferry run flag"),
        };
        flags.push(flag.to_string());
        flags.push(v.to_string());
    }
    flags
}

#[test]
fn run_prints_the_translation_and_summarization_answers() {
    let case = testdata("run-t5-tiny");
    let (_tmp, out) = export_folder(&case);
    let recorded: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(case.join("run.json")).expect("run.json"))
            .expect("run.json is JSON");
    let answers = recorded["answers"].as_array().expect("answers");
    assert!(answers.len() >= 4, "run.json answers");
    for a in answers {
        let task = a["task"].as_str().expect("task");
        let key = if task == "summarization" {
            "summary_text"
        } else {
            "translation_text"
        };
        let want = a[key].as_str().expect("answer text");
        let flags = kwarg_flags(&a["kwargs"]);
        let o = run(ferry()
            .arg("run")
            .arg(&out)
            .args(["--task", task, "--text", a["text"].as_str().expect("text")])
            .args(&flags));
        assert!(o.status.success(), "{task}: {}", stderr(&o));
        assert_eq!(
            String::from_utf8_lossy(&o.stdout),
            format!("{want}\n"),
            "{task}"
        );
        let o = run(ferry()
            .arg("run")
            .arg(&out)
            .args([
                "--task",
                task,
                "--json",
                "--text",
                a["text"].as_str().expect("text"),
            ])
            .args(&flags));
        assert!(o.status.success(), "{task} --json: {}", stderr(&o));
        let json: serde_json::Value = serde_json::from_slice(&o.stdout).expect("one JSON document");
        assert_eq!(json, serde_json::json!([{ key: want }]), "{task} --json");
    }
    // Without its tokenizer.json the folder uses the checkpoint's it was exported from.
    std::fs::remove_file(out.join("tokenizer.json")).expect("remove tokenizer.json");
    let a = &answers[0];
    let o = run(ferry()
        .arg("run")
        .arg(&out)
        .args(["--task", a["task"].as_str().expect("task")])
        .args(["--text", a["text"].as_str().expect("text")])
        .args(kwarg_flags(&a["kwargs"])));
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        format!("{}\n", a["translation_text"].as_str().expect("translation"))
    );
}

#[test]
fn run_refuses_bad_folders_and_settings() {
    let (tmp, out) = export_folder(&testdata("marian-tiny"));
    let never = tmp.path().join("no-output");
    let ferry_run = |dir: &Path, extra: &[&str]| {
        run(ferry()
            .arg("run")
            .arg(dir)
            .args(["--text", "a text"])
            .args(extra))
    };
    // Marian ships SentencePiece models, no tokenizer.json.
    std::fs::write(out.join("source.spm"), b"").expect("write");
    let o = ferry_run(&out, &[]);
    assert_fails_cleanly(
        &o,
        &never,
        "source.spm/target.spm (Marian) but no tokenizer.json",
    );
    // A tokenizer from elsewhere, but generation settings ferry does not implement.
    let t5 = export_folder(&testdata("run-t5-tiny"));
    let gen_path = t5.1.join("generation_config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&gen_path).expect("read")).expect("json");
    cfg["repetition_penalty"] = serde_json::json!(1.3);
    std::fs::write(&gen_path, cfg.to_string()).expect("write");
    let o = ferry_run(&t5.1, &[]);
    assert_fails_cleanly(&o, &never, "`repetition_penalty` = 1.3 is not implemented");
    // A task an encoder-decoder does not answer.
    let o = ferry_run(&out, &["--task", "fill-mask"]);
    assert_fails_cleanly(&o, &never, "not `fill-mask`");
    // A folder without the encoder, and one without any decoder.
    let o = ferry_run(tmp.path(), &[]);
    assert_fails_cleanly(&o, &never, "without encoder_model.onnx");
    for f in [
        "decoder_model_merged.onnx",
        "decoder_model.onnx",
        "tokenizer.json",
    ] {
        let _ = std::fs::remove_file(t5.1.join(f));
    }
    let o = ferry_run(&t5.1, &["--tokenizer", &case_str("run-t5-tiny")]);
    assert_fails_cleanly(&o, &never, "has neither decoder_model_merged.onnx nor");
}

fn case_str(case: &str) -> String {
    testdata(case).to_string_lossy().into_owned()
}
