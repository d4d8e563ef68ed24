//! Half precision: `--dtype fp32|fp16|bf16|keep` on float16, bfloat16 and float32
//! checkpoints, against transformers computing in float32 (`golden.safetensors`) and in
//! the half dtype itself (`golden-fp16.safetensors` / `golden-bf16.safetensors`, from
//! testdata/golden_halfprec.py).
//!
//! Tolerances (max-abs; outputs are LayerNorm-scaled hidden states, poolers and logits of
//! magnitude ≲ 4), measured with ONNX Runtime 1.31 CPU against transformers 5.24 / torch
//! 2.15 CPU:
//! - float16 graphs vs transformers computing in float16: ≤ 3.9e-3 (bert-tiny-fp16,
//!   opsets 14 and 17), 1.3e-3 on logits; vs transformers in float32 on the same weights:
//!   ≤ 1.5e-3. transformers' own float16-vs-float32 gap on these cases is 3.7e-3 / 1.4e-3
//!   (case.json `half_vs_float32_max_abs`). Bound [`FP16_ATOL`] = 1e-2.
//! - bfloat16 weights with float32 compute vs transformers in float32: ≤ 1.1e-6 (the same
//!   arithmetic; bound 1e-5); vs transformers computing in bfloat16: 2.7e-2, which is
//!   transformers' own bfloat16-vs-float32 gap. Bound [`BF16_ATOL`] = 6e-2.
//! - float32 checkpoints narrowed while streaming vs their float32 golden (weight rounding
//!   plus compute), every encoder case: `--dtype fp16` ≤ 5.4e-3, `--dtype bf16` ≤ 3.0e-2;
//!   bounds as above.

use ferry_ir::DType;

use super::*;

/// Max-abs bound for float16 compute (see the module doc for the measurements).
const FP16_ATOL: f64 = 1e-2;
/// Max-abs bound for bfloat16 against float32 or bfloat16 compute.
const BF16_ATOL: f64 = 6e-2;

/// Exports `case` with `extra`, returning the temp dir holding `model.onnx`.
fn export_ok(case: &Path, extra: &[&str]) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("model.onnx");
    let o = export(case, &out, extra);
    assert!(o.status.success(), "{extra:?}: {}", stderr(&o));
    (dir, out)
}

/// The worst max-abs of `model` against `golden` over all outputs.
fn worst(model: &Path, golden: &Path, label: &str) -> f64 {
    let g = ferry_verifier::Golden::load(golden).expect("golden");
    let mut m = ferry_verifier::Model::load(model, 2).expect("ONNX Runtime loads the export");
    let reports = ferry_verifier::compare(&mut m, &g).expect("runs");
    assert_eq!(reports.len(), g.outputs.len());
    let mut w = 0f64;
    for r in &reports {
        println!(
            "{label} vs {}: {} max-abs {:.3e}",
            golden.file_name().unwrap_or_default().to_string_lossy(),
            r.name,
            r.max_abs
        );
        w = w.max(r.max_abs);
    }
    w
}

/// Element types of the graph's float initializers (and `Constant`s) and of its outputs.
fn graph_types(model: &Path) -> (Vec<DType>, Vec<DType>) {
    let g = ferry_onnx::read_graph(model).expect("reads the export");
    let mut inits: Vec<DType> = g
        .initializers
        .iter()
        .map(|i| i.dtype)
        .chain(
            g.nodes
                .iter()
                .filter(|n| n.op_type == "Constant")
                .filter_map(|n| match n.attrs.get("value") {
                    Some(ferry_ir::Attr::Tensor(t)) => Some(t.dtype),
                    _ => None,
                }),
        )
        .filter(|d| d.is_float())
        .collect();
    inits.sort_by_key(|d| d.to_string());
    inits.dedup();
    let outs = g.outputs.iter().map(|v| v.dtype).collect();
    (inits, outs)
}

#[test]
fn fp16_checkpoints_keep_float16_and_match_transformers_float16() {
    for (case, task) in [
        ("bert-tiny-fp16", "feature-extraction"),
        ("bert-tiny-fp16-text-classification", "text-classification"),
    ] {
        let dir = testdata(case);
        for opset in ["14", "17"] {
            for dtype in ["keep", "fp16"] {
                let (_tmp, out) =
                    export_ok(&dir, &["--dtype", dtype, "--opset", opset, "--task", task]);
                let (inits, outs) = graph_types(&out);
                assert_eq!(inits, vec![DType::F16], "{case}: float16 throughout");
                assert!(outs.iter().all(|&d| d == DType::F16), "{case}: {outs:?}");
                let label = format!("{case} --dtype {dtype} --opset {opset}");
                let half = worst(&out, &dir.join("golden-fp16.safetensors"), &label);
                assert!(half <= FP16_ATOL, "{label}: vs fp16 golden {half}");
                let full = worst(&out, &dir.join("golden.safetensors"), &label);
                assert!(full <= FP16_ATOL, "{label}: vs fp32 golden {full}");
            }
        }
        // The default upcasts: float32 compute, at float32's tolerance.
        let (_tmp, out) = export_ok(&dir, &["--task", task]);
        assert_eq!(graph_types(&out).0, vec![DType::F32]);
        let w = worst(&out, &dir.join("golden.safetensors"), case);
        assert!(w <= 1e-5, "{case} --dtype fp32: {w}");
    }
}

#[test]
fn bf16_checkpoint_keeps_bfloat16_weights_with_float32_compute() {
    let dir = testdata("bert-tiny-bf16");
    for dtype in ["keep", "bf16"] {
        let (_tmp, out) = export_ok(&dir, &["--dtype", dtype]);
        let g = ferry_onnx::read_graph(&out).expect("reads the export");
        let float_inits: Vec<DType> = g
            .initializers
            .iter()
            .map(|i| i.dtype)
            .filter(|d| d.is_float())
            .collect();
        assert!(!float_inits.is_empty());
        assert!(
            float_inits.iter().all(|&d| d == DType::BF16),
            "weights stay bfloat16: {float_inits:?}"
        );
        // One Cast per weight, however often it is used.
        let casts = g.nodes.iter().filter(|n| n.op_type == "Cast").count();
        assert!(casts >= float_inits.len(), "{casts} casts");
        assert!(g.outputs.iter().all(|v| v.dtype == DType::F32));
        let label = format!("bert-tiny-bf16 --dtype {dtype}");
        let full = worst(&out, &dir.join("golden.safetensors"), &label);
        assert!(full <= 1e-5, "{label}: float32 compute {full}");
        let half = worst(&out, &dir.join("golden-bf16.safetensors"), &label);
        assert!(half <= BF16_ATOL, "{label}: vs bf16 golden {half}");
    }
    // Half the weight bytes of the float32 export.
    let (_a, keep) = export_ok(&dir, &["--dtype", "keep"]);
    let (_b, fp32) = export_ok(&dir, &["--dtype", "fp32"]);
    let weight_bytes = |p: &Path| -> u64 {
        let g = ferry_onnx::read_graph(p).expect("reads the export");
        g.initializers.iter().map(|i| i.data.len()).sum()
    };
    assert_eq!(weight_bytes(&keep) * 2, weight_bytes(&fp32));
}

/// Every float32 encoder golden case (all encoder architectures, every task), narrowed
/// while streaming: worst measured fp16 5.4e-3 (albert-tiny-feature-extraction), bf16
/// 3.0e-2 (bert-tiny-relu-sharded).
#[test]
fn float32_checkpoints_narrow_to_fp16_and_bf16_while_streaming() {
    let cases: Vec<(PathBuf, String)> = golden_cases()
        .into_iter()
        .filter(|(dir, _)| {
            let name = dir.file_name().map(|n| n.to_string_lossy().into_owned());
            name.is_some_and(|n| {
                !n.starts_with("gpt2") && !n.starts_with("tf-") && !n.contains("16")
            }) && dir.join("config.json").is_file()
        })
        .filter(|(dir, _)| {
            ferry_loader::load(dir).is_ok_and(|c| {
                // Decoders are checked at attended positions in decoders.rs: their
                // left-padded rows are float16-min arithmetic in half precision.
                ferry_tracer::exports_half_compute(&c.config.model_type)
                    && !ferry_tracer::is_decoder_llm(&c.config.model_type)
                    && c.weights
                        .iter()
                        .all(|t| t.dtype != DType::F16 && t.dtype != DType::BF16)
            })
        })
        .collect();
    assert!(cases.len() >= 40, "{cases:?}");
    let (mut worst16, mut worst_bf16) = (0f64, 0f64);
    for (dir, task) in &cases {
        let name = dir.display().to_string();
        let golden = dir.join("golden.safetensors");
        let (_a, out) = export_ok(dir, &["--dtype", "fp16", "--task", task]);
        let (consts, outs) = graph_types(&out);
        // MPNet's and DeBERTa-v2's (with `position_buckets`) relative-position buckets are
        // index arithmetic done in float32, as in transformers whatever the model's dtype;
        // everything else is float16.
        let buckets = ferry_loader::load(dir).is_ok_and(|c| {
            c.config.model_type == "deberta-v2"
                && c.config.raw["relative_attention"] == true
                && c.config.raw["position_buckets"].as_i64().unwrap_or(-1) > 0
        });
        let mut want = if name.contains("mpnet") || buckets {
            vec![DType::F16, DType::F32]
        } else {
            vec![DType::F16]
        };
        // sentence-transformers' pooling accumulates in float32 (its result is cast back);
        // cls pooling alone has no float constant.
        if dir.join("modules.json").is_file() && consts.contains(&DType::F32) {
            want = vec![DType::F16, DType::F32];
        }
        assert_eq!(consts, want, "{name}");
        assert!(outs.iter().all(|&d| d == DType::F16), "{name}: {outs:?}");
        let w = worst(&out, &golden, &format!("{name} --dtype fp16"));
        assert!(w <= FP16_ATOL, "{name} fp16: {w}");
        worst16 = worst16.max(w);
        let (_b, out) = export_ok(dir, &["--dtype", "bf16", "--task", task]);
        let w = worst(&out, &golden, &format!("{name} --dtype bf16"));
        assert!(w <= BF16_ATOL, "{name} bf16: {w}");
        worst_bf16 = worst_bf16.max(w);
    }
    println!("narrowed float32 checkpoints: fp16 worst {worst16:.3e}, bf16 worst {worst_bf16:.3e}");
    // keep of a float32 checkpoint is the float32 export.
    let dir = testdata("bert-tiny-text-classification");
    let (_c, out) = export_ok(&dir, &["--dtype", "keep"]);
    assert_eq!(graph_types(&out).0, vec![DType::F32]);
    let w = worst(&out, &dir.join("golden.safetensors"), "keep");
    assert!(w <= 1e-5, "keep: {w}");
}

#[test]
fn fp16_export_passes_check_and_names_its_dtype() {
    let (_dir, out, o) = export_case(
        "bert-tiny-fp16",
        "model.onnx",
        &["--dtype", "keep", "--check"],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("float16"), "{}", stderr(&o));
    let o = export(&testdata("bert-tiny-gelu"), &out, &["--dtype", "fp16"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("float32 -> float16"), "{}", stderr(&o));
}

#[test]
fn half_compute_where_unsupported_fails_cleanly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("out.onnx");
    assert_fails_cleanly(
        &export(
            &testdata("gpt2-tiny-feature-extraction"),
            &out,
            &["--dtype", "fp16"],
        ),
        &out,
        "float16 compute for `gpt2`",
    );
    let pt = dir.path().join("out.pt");
    assert_fails_cleanly(
        &export(
            &testdata("bert-tiny-fp16"),
            &pt,
            &["--dtype", "keep", "--format", "torchscript"],
        ),
        &pt,
        "TorchScript export is float32 only",
    );
}

#[test]
fn keep_of_a_mixed_precision_checkpoint_asks_for_a_dtype() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::copy(
        testdata("bert-tiny-fp16").join("config.json"),
        dir.path().join("config.json"),
    )
    .expect("config");
    let f32_bytes: Vec<u8> = [1.0f32, 2.0].iter().flat_map(|v| v.to_le_bytes()).collect();
    let f16_bytes = vec![0u8; 4];
    let tensors = [
        (
            "a",
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![2], &f32_bytes)
                .expect("view"),
        ),
        (
            "b",
            safetensors::tensor::TensorView::new(safetensors::Dtype::F16, vec![2], &f16_bytes)
                .expect("view"),
        ),
    ];
    safetensors::serialize_to_file(tensors, None, &dir.path().join("model.safetensors"))
        .expect("write");
    let out = dir.path().join("out.onnx");
    assert_fails_cleanly(
        &export(dir.path(), &out, &["--dtype", "keep"]),
        &out,
        "mixes float types (float16+float32)",
    );
}
