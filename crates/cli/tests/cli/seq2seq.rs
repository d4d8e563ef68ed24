//! Encoder-decoders (t5, mt5, bart, mbart, marian) exported as optimum's folder, against
//! transformers: every testdata case whose `case.json` says `"kind": "seq2seq"` is exported
//! at opsets 14, 17 and 21; the encoder's output, the first (uncached) decoder call and three
//! cached steps (each fed the previous presents) must match its `steps.safetensors` within
//! 1e-5, through the separate decoders and through both branches of the merged one. Then
//! the folder's bad inputs.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use ferry_ir::DType;
use ferry_verifier::{F32Tensor, I64Tensor, Input, Model, Values};

use super::{assert_fails_cleanly, export, ferry, root, stderr, testdata};

const ATOL: f32 = 1e-5;

/// Every seq2seq golden case.
pub(super) fn seq2seq_cases() -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(root().join("testdata"))
        .expect("testdata")
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            std::fs::read_to_string(p.join("case.json"))
                .ok()
                .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
                .is_some_and(|c| c["kind"] == "seq2seq")
        })
        .collect();
    v.sort();
    assert!(v.len() >= 6, "seq2seq goldens missing: {v:?}");
    v
}

/// A case's `steps.safetensors`.
struct Golden {
    bytes: Vec<u8>,
}

impl Golden {
    fn load(case: &Path) -> Self {
        Self {
            bytes: std::fs::read(case.join("steps.safetensors")).expect("steps.safetensors"),
        }
    }

    fn raw(&self, name: &str) -> (Vec<i64>, Vec<u8>) {
        let st = safetensors::SafeTensors::deserialize(&self.bytes).expect("safetensors");
        let v = st.tensor(name).expect(name);
        (
            v.shape().iter().map(|&d| d as i64).collect(),
            v.data().to_vec(),
        )
    }

    fn ints(&self, name: &str) -> Input {
        let (shape, data) = self.raw(name);
        Input::I64(I64Tensor {
            shape,
            data: data
                .chunks_exact(8)
                .map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes")))
                .collect(),
        })
    }

    fn floats(&self, name: &str) -> F32Tensor {
        let (shape, data) = self.raw(name);
        F32Tensor {
            shape,
            data: data
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
                .collect(),
        }
    }
}

fn max_abs(got: &F32Tensor, want: &F32Tensor) -> f32 {
    assert_eq!(got.shape, want.shape, "shape");
    got.data
        .iter()
        .zip(&want.data)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max)
}

/// Runs `model` on `inputs` (plus `use_cache_branch` when given), every output as f32.
fn run(
    model: &mut Model,
    inputs: &BTreeMap<String, Input>,
    use_cache: Option<bool>,
) -> BTreeMap<String, F32Tensor> {
    let mut values = Values::from_inputs(inputs).expect("values");
    if let Some(flag) = use_cache {
        values
            .insert_ints(
                "use_cache_branch",
                vec![1],
                vec![i64::from(flag)],
                DType::Bool,
            )
            .expect("bool");
    }
    let names: Vec<String> = model.outputs().into_iter().map(|o| o.name).collect();
    let out = model.run_values(&values).expect("runs");
    out.floats(names.iter().map(String::as_str))
        .expect("float outputs")
}

/// `present.*` outputs as the next step's `past_key_values.*` inputs (the encoder's part
/// kept from `keep` when a with-past call does not return it).
fn as_past(
    out: &BTreeMap<String, F32Tensor>,
    keep: &BTreeMap<String, Input>,
) -> BTreeMap<String, Input> {
    let mut past: BTreeMap<String, Input> = keep.clone();
    for (k, v) in out {
        if let Some(rest) = k.strip_prefix("present.") {
            // The merged with-past branch returns empty stand-ins for the encoder's cache.
            if v.data.is_empty() && k.contains(".encoder.") {
                continue;
            }
            past.insert(format!("past_key_values.{rest}"), Input::F32(v.clone()));
        }
    }
    past
}

/// Checks one exported folder against the golden; returns the worst max-abs.
fn folder_matches(out: &Path, g: &Golden, label: &str) -> f32 {
    let mut worst = 0f32;
    let mut check = |what: &str, got: &F32Tensor, want: &F32Tensor| {
        // Relative to the golden's largest magnitude (at least 1): the T5 goldens' logits
        // reach ~220, where transformers' own float32 logits differ from its float64 ones
        // by up to 8e-4 (and optimum's export of the same checkpoint by ~2e-4).
        let scale = want.data.iter().fold(1f32, |m, v| m.max(v.abs()));
        let d = max_abs(got, want) / scale;
        println!("{label} {what}: max-abs / max(1, |golden|) {d:.3e}");
        assert!(
            d <= ATOL,
            "{label} {what}: max-abs / max(1, |golden|) {d} > {ATOL}"
        );
        worst = worst.max(d);
    };
    let load = |f: &str| Model::load(&out.join(f), 2).expect("ONNX Runtime loads the file");
    let mask = g.ints("encoder.input.attention_mask");
    let enc_in: BTreeMap<String, Input> = [
        ("input_ids".to_string(), g.ints("encoder.input.input_ids")),
        ("attention_mask".to_string(), mask.clone()),
    ]
    .into();
    let enc = run(&mut load("encoder_model.onnx"), &enc_in, None);
    let hidden = g.floats("encoder.output.last_hidden_state");
    check("encoder", &enc["last_hidden_state"], &hidden);

    let base: BTreeMap<String, Input> = [
        ("encoder_attention_mask".to_string(), mask),
        ("encoder_hidden_states".to_string(), Input::F32(hidden)),
    ]
    .into();
    let ids = |k: usize| {
        (
            "input_ids".to_string(),
            g.ints(&format!("step{k}.input.input_ids")),
        )
    };
    let logits = |k: usize| g.floats(&format!("step{k}.output.logits"));

    // The separate files: decoder_model for step 0, decoder_with_past_model after.
    let mut feed = base.clone();
    feed.extend([ids(0)]);
    let first = run(&mut load("decoder_model.onnx"), &feed, None);
    check("step0 decoder_model", &first["logits"], &logits(0));
    let mut past = as_past(&first, &BTreeMap::new());
    let mut with_past = load("decoder_with_past_model.onnx");
    for k in 1..=3 {
        let mut feed = base.clone();
        feed.extend(past.clone());
        feed.extend([ids(k)]);
        let o = run(&mut with_past, &feed, None);
        check(
            &format!("step{k} decoder_with_past_model"),
            &o["logits"],
            &logits(k),
        );
        past = as_past(&o, &past);
    }

    // The merged file: the no-past branch, then the with-past branch fed its own presents.
    let mut merged = load("decoder_model_merged.onnx");
    let mut feed = base.clone();
    feed.extend(empty_past(&merged));
    feed.extend([ids(0)]);
    let first_merged = run(&mut merged, &feed, Some(false));
    check(
        "step0 merged (no past)",
        &first_merged["logits"],
        &logits(0),
    );
    for (k, v) in &first {
        let d = max_abs(&first_merged[k], v);
        assert!(
            d <= ATOL,
            "{label} merged {k} differs from decoder_model's by {d}"
        );
    }
    let mut past = as_past(&first_merged, &BTreeMap::new());
    for k in 1..=3 {
        let mut feed = base.clone();
        feed.extend(past.clone());
        feed.extend([ids(k)]);
        let o = run(&mut merged, &feed, Some(true));
        check(
            &format!("step{k} merged (with past)"),
            &o["logits"],
            &logits(k),
        );
        past = as_past(&o, &past);
    }
    worst
}

/// The merged decoder `merged` gives what the separate decoders `decoder` and
/// `with_past` give, output for output (≤ 1e-6), on the golden's inputs: the no-past branch
/// at step 0, the with-past branch for three cached steps fed its own presents.
fn merged_equals_parts(dir: &Path, decoder: &str, with_past: &str, merged: &str, g: &Golden) {
    let load = |f: &str| Model::load(&dir.join(f), 2).expect("ONNX Runtime loads the file");
    let base: BTreeMap<String, Input> = [
        (
            "encoder_attention_mask".to_string(),
            g.ints("encoder.input.attention_mask"),
        ),
        (
            "encoder_hidden_states".to_string(),
            Input::F32(g.floats("encoder.output.last_hidden_state")),
        ),
    ]
    .into();
    let ids = |k: usize| {
        (
            "input_ids".to_string(),
            g.ints(&format!("step{k}.input.input_ids")),
        )
    };
    let same =
        |what: &str, got: &BTreeMap<String, F32Tensor>, want: &BTreeMap<String, F32Tensor>| {
            for (k, v) in want {
                let d = max_abs(&got[k], v);
                assert!(
                    d <= 1e-6,
                    "{merged} {what} {k}: differs from the separate file by {d}"
                );
            }
        };
    let mut m = load(merged);
    let mut feed = base.clone();
    feed.extend([ids(0)]);
    let first = run(&mut load(decoder), &feed, None);
    feed.extend(empty_past(&m));
    same("step0", &run(&mut m, &feed, Some(false)), &first);
    let mut past = as_past(&first, &BTreeMap::new());
    let mut wp = load(with_past);
    for k in 1..=3 {
        let mut feed = base.clone();
        feed.extend(past.clone());
        feed.extend([ids(k)]);
        let want = run(&mut wp, &feed, None);
        let got = run(&mut m, &feed, Some(true));
        same(&format!("step{k}"), &got, &want);
        past = as_past(&want, &past);
    }
}

#[test]
fn seq2seq_folders_match_transformers_at_opsets_14_17_21() {
    for case in seq2seq_cases() {
        let g = Golden::load(&case);
        for opset in ["14", "17", "21"] {
            let dir = tempfile::tempdir().expect("tempdir");
            let out = dir.path().join("folder");
            let o = export(
                &case,
                &out,
                &["--task", "text2text-generation-with-past", "--opset", opset],
            );
            assert!(o.status.success(), "{}: {}", case.display(), stderr(&o));
            for f in [
                "encoder_model.onnx",
                "decoder_model.onnx",
                "decoder_with_past_model.onnx",
                "decoder_model_merged.onnx",
                "config.json",
            ] {
                assert!(out.join(f).is_file(), "{}: {f} missing", case.display());
            }
            let label = format!(
                "{} opset {opset}",
                case.file_name().unwrap_or_default().to_string_lossy()
            );
            folder_matches(&out, &g, &label);
        }
    }
}

/// The merged decoder stores each weight once: smaller than the two decoders together.
#[test]
fn merged_decoder_stores_shared_weights_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("t5");
    let case = testdata("t5-tiny-v1_0");
    let o = export(&case, &out, &["--task", "text2text-generation-with-past"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let size = |f: &str| std::fs::metadata(out.join(f)).expect(f).len();
    let weights = |f: &str| {
        ferry_onnx::read_graph(&out.join(f))
            .expect("reads")
            .weight_bytes()
    };
    let merged = ferry_onnx::read_graph(&out.join("decoder_model_merged.onnx")).expect("reads");
    assert_eq!(merged.nodes.len(), 1);
    assert_eq!(merged.nodes[0].op_type, "If");
    // Every weight the two decoders read, once.
    let (a, b) = ferry_ir::split_merged(&merged).expect("merged form");
    assert_eq!(a.weight_bytes(), weights("decoder_model.onnx"));
    assert_eq!(b.weight_bytes(), weights("decoder_with_past_model.onnx"));
    assert!(
        merged.weight_bytes() < a.weight_bytes() + b.weight_bytes(),
        "shared weights are stored twice"
    );
    assert!(
        size("decoder_model_merged.onnx")
            < size("decoder_model.onnx") + size("decoder_with_past_model.onnx")
    );
}

/// `--optimize` and `--quantize` write `-optimized` / `-quantized` siblings of every file
/// in the folder; the optimized merged decoder (merged from the optimized decoders) still
/// matches transformers, and so does `ferry optimize` run on the plain merged file (its two
/// decoders optimized and merged again).
#[test]
fn optimized_folder_keeps_parity() {
    let case = testdata("bart-tiny");
    let g = Golden::load(&case);
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("bart");
    let o = export(
        &case,
        &out,
        &[
            "--task",
            "text2text-generation-with-past",
            "--quantize",
            "int8",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let opt = dir.path().join("optimized");
    std::fs::create_dir(&opt).expect("mkdir");
    for stem in [
        "encoder_model",
        "decoder_model",
        "decoder_with_past_model",
        "decoder_model_merged",
    ] {
        for suffix in ["-optimized", "-quantized"] {
            let f = out.join(format!("{stem}{suffix}.onnx"));
            assert!(f.is_file(), "{} missing", f.display());
        }
        std::fs::copy(
            out.join(format!("{stem}-optimized.onnx")),
            opt.join(format!("{stem}.onnx")),
        )
        .expect("copy");
    }
    let fused = |f: &Path| {
        let graph = ferry_onnx::read_graph(f).expect("reads");
        ferry_optimizer::fused_operator_statistics(&graph)["SkipLayerNormalization"]
    };
    let merged_fused = fused(&opt.join("decoder_model_merged.onnx"));
    assert!(
        merged_fused > 0,
        "no fusion inside the merged decoder's branches"
    );
    assert_eq!(
        merged_fused,
        fused(&opt.join("decoder_model.onnx")) + fused(&opt.join("decoder_with_past_model.onnx"))
    );
    folder_matches(&opt, &g, "bart-tiny optimized");
    // The quantized merged decoder is the two quantized decoders, weights stored once.
    merged_equals_parts(
        &out,
        "decoder_model-quantized.onnx",
        "decoder_with_past_model-quantized.onnx",
        "decoder_model_merged-quantized.onnx",
        &g,
    );
    let weights = |f: &str| {
        ferry_onnx::read_graph(&out.join(f))
            .expect("reads")
            .weight_bytes()
    };
    assert!(
        weights("decoder_model_merged-quantized.onnx")
            < weights("decoder_model-quantized.onnx")
                + weights("decoder_with_past_model-quantized.onnx")
    );

    // `ferry optimize` on the plain merged file.
    let o = super::run(
        ferry()
            .arg("optimize")
            .arg(out.join("decoder_model_merged.onnx"))
            .arg(opt.join("decoder_model_merged.onnx")),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(fused(&opt.join("decoder_model_merged.onnx")), merged_fused);
    folder_matches(&opt, &g, "bart-tiny ferry optimize merged");
}

/// A fused op type and its count in the encoder, decoder and decoder with past.
type FusedCounts = (&'static str, [usize; 3]);

/// `--optimize` fuses in each file of a T5 v1.1 and a BART folder what ONNX Runtime's
/// transformers optimizer fuses in the same plain files (onnxruntime 1.31.1,
/// `optimizer.optimize_model(path, model_type="t5"/"bart", num_heads=4, hidden_size=32,
/// opt_level=0)` on ferry's export of t5-tiny-v1_1 / bart-tiny: per file encoder, decoder,
/// decoder with past), BART's encoder self-attention besides, and the optimized folder still
/// matches transformers.
#[test]
fn optimized_folders_fuse_what_onnx_runtime_fuses() {
    let cases: [(&str, &[FusedCounts]); 2] = [
        (
            "t5-tiny-v1_1",
            &[
                ("FastGelu", [2, 2, 2]),
                ("SimplifiedLayerNormalization", [1, 1, 1]),
                ("SkipSimplifiedLayerNormalization", [4, 6, 6]),
            ],
        ),
        (
            "bart-tiny",
            &[
                ("BiasGelu", [2, 2, 2]),
                ("LayerNormalization", [1, 1, 1]),
                ("SkipLayerNormalization", [4, 6, 6]),
            ],
        ),
    ];
    for (name, want) in cases {
        let case = testdata(name);
        let dir = tempfile::tempdir().expect("tempdir");
        let out = dir.path().join(name);
        let o = export(
            &case,
            &out,
            &["--task", "text2text-generation-with-past", "--optimize"],
        );
        assert!(o.status.success(), "{}", stderr(&o));
        let opt = dir.path().join("optimized");
        std::fs::create_dir(&opt).expect("mkdir");
        for (k, stem) in [
            "encoder_model",
            "decoder_model",
            "decoder_with_past_model",
            "decoder_model_merged",
        ]
        .iter()
        .enumerate()
        {
            let f = out.join(format!("{stem}-optimized.onnx"));
            let graph = ferry_onnx::read_graph(&f).expect("reads");
            let fused = ferry_optimizer::fused_operator_statistics(&graph);
            for (op, counts) in want {
                // The merged file holds both decoders.
                let n = if k == 3 {
                    counts[1] + counts[2]
                } else {
                    counts[k]
                };
                assert_eq!(fused[op], n, "{name} {stem}: {op}");
            }
            std::fs::copy(&f, opt.join(format!("{stem}.onnx"))).expect("copy");
        }
        folder_matches(&opt, &Golden::load(&case), &format!("{name} optimized"));
    }
}

/// `ferry quantize --no-report` on a merged decoder quantizes its two decoders and merges
/// them again: the same results as the two decoders quantized on their own; with the
/// report it is a clear one-line error.
#[test]
fn ferry_quantize_on_a_merged_file() {
    let case = testdata("bart-tiny");
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("bart");
    let o = export(&case, &out, &["--task", "text2text-generation-with-past"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let q = dir.path().join("q");
    std::fs::create_dir(&q).expect("mkdir");
    for stem in [
        "decoder_model",
        "decoder_with_past_model",
        "decoder_model_merged",
    ] {
        let o = super::run(
            ferry()
                .args(["quantize", "--no-report"])
                .arg(out.join(format!("{stem}.onnx")))
                .arg(q.join(format!("{stem}.onnx"))),
        );
        assert!(o.status.success(), "{stem}: {}", stderr(&o));
    }
    merged_equals_parts(
        &q,
        "decoder_model.onnx",
        "decoder_with_past_model.onnx",
        "decoder_model_merged.onnx",
        &Golden::load(&case),
    );
    let target = dir.path().join("report.onnx");
    let o = super::run(
        ferry()
            .arg("quantize")
            .arg(out.join("decoder_model_merged.onnx"))
            .arg(&target),
    );
    assert_fails_cleanly(&o, &target, "--no-report");
}

/// With `--external-data` every model file of the folder has its own side file.
#[test]
fn external_data_per_file() {
    let case = testdata("mbart-tiny");
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("mbart");
    let o = export(
        &case,
        &out,
        &[
            "--task",
            "text2text-generation-with-past",
            "--external-data",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    for f in [
        "encoder_model.onnx",
        "decoder_model.onnx",
        "decoder_with_past_model.onnx",
        "decoder_model_merged.onnx",
    ] {
        assert!(out.join(format!("{f}_data")).is_file(), "{f}_data missing");
    }
    folder_matches(&out, &Golden::load(&case), "mbart-tiny external data");
}

#[test]
fn folder_output_that_is_a_file_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("out");
    std::fs::write(&out, b"keep me").expect("write");
    let o = export(
        &testdata("t5-tiny-v1_0"),
        &out,
        &["--task", "text2text-generation-with-past"],
    );
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
    assert!(err.contains("is a file"), "{err}");
    assert_eq!(std::fs::read(&out).expect("still there"), b"keep me");
    let left: Vec<String> = std::fs::read_dir(dir.path())
        .expect("dir")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(left, ["out"]);
}

/// A copy of the tiny T5 checkpoint, its weights filtered by `keep`.
fn t5_copy(keep: impl Fn(&str) -> bool) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    let src = testdata("t5-tiny-v1_0");
    for f in ["config.json", "generation_config.json"] {
        std::fs::copy(src.join(f), dir.path().join(f)).expect("copy");
    }
    let bytes = std::fs::read(src.join("model.safetensors")).expect("weights");
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("safetensors");
    let kept: Vec<(String, safetensors::tensor::TensorView<'_>)> =
        st.tensors().into_iter().filter(|(n, _)| keep(n)).collect();
    safetensors::serialize_to_file(kept, None, &dir.path().join("model.safetensors"))
        .expect("write weights");
    dir
}

#[test]
fn checkpoint_without_decoder_weights_is_refused() {
    let ck = t5_copy(|n| !n.starts_with("decoder."));
    let out = ck.path().join("out");
    let o = export(
        ck.path(),
        &out,
        &["--task", "text2text-generation-with-past"],
    );
    assert_fails_cleanly(&o, &out, "decoder");
}

#[test]
fn unknown_feed_forward_proj_is_refused() {
    let ck = t5_copy(|_| true);
    super::edit_config(ck.path(), |c| {
        c["feed_forward_proj"] = "gated-swishy".into()
    });
    let out = ck.path().join("out");
    let o = export(ck.path(), &out, &["--task", "text2text-generation"]);
    assert_fails_cleanly(&o, &out, "feed_forward_proj");
}

/// The merged decoder's first-step cache: every `past_key_values.*` input empty (batch 2,
/// symbolic lengths 0), as optimum feeds it with `use_cache_branch` false.
fn empty_past(m: &Model) -> BTreeMap<String, Input> {
    m.inputs()
        .into_iter()
        .filter(|i| i.name.starts_with("past_key_values."))
        .map(|i| {
            let shape = i
                .dims
                .iter()
                .enumerate()
                .map(|(axis, d)| match d {
                    Ok(n) => *n,
                    Err(_) if axis == 0 => 2,
                    Err(_) => 0,
                })
                .collect();
            let t = F32Tensor {
                shape,
                data: Vec::new(),
            };
            (i.name, Input::F32(t))
        })
        .collect()
}
