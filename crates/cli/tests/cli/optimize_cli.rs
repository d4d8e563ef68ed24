//! `ferry export --optimize`, `--static-shapes`, `ferry optimize --disable` / `--json`:
//! files written, fused-operator statistics, golden parity of the results.

use ferry_ir::{Attr, DType};

use super::*;

fn op_count(path: &Path, op: &str) -> usize {
    let g = ferry_onnx::read_graph(path).expect("read model");
    g.op_counts().get(op).copied().unwrap_or(0)
}

/// `export --optimize` writes the plain model and `<stem>-optimized.onnx`; the plain one
/// matches transformers ≤1e-5, the optimized one ≤1e-4 and has tiny BERT's fused ops (one
/// per layer, as in optimize.rs: Embed 1, Attention 2, SkipLayerNorm 4, BiasGelu 2), which
/// the statistics line on stderr reports.
#[test]
fn export_optimize_writes_both_files() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("model.onnx");
    let case = testdata("bert-tiny-gelu");
    let o = export(&case, &out, &["--optimize"]);
    assert!(o.status.success(), "export failed: {}", stderr(&o));
    let opt = dir.path().join("model-optimized.onnx");
    assert!(out.is_file() && opt.is_file(), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(
        err.contains("fused operators: EmbedLayerNormalization 1, Attention 2, MultiHeadAttention 0, Gelu 0, FastGelu 0, BiasGelu 2"),
        "{err}"
    );
    assert!(err.contains("SkipLayerNormalization 4"), "{err}");
    for (op, n) in [
        ("EmbedLayerNormalization", 1),
        ("Attention", 2),
        ("SkipLayerNormalization", 4),
        ("BiasGelu", 2),
        ("LayerNormalization", 0),
        ("Softmax", 0),
    ] {
        assert_eq!(op_count(&opt, op), n, "{op}: {err}");
    }
    assert!(op_count(&out, "Softmax") > 0);
    let golden = case.join("golden.safetensors");
    golden_parity(&out, &golden, 1e-5, &out.display().to_string());
    golden_parity(&opt, &golden, 1e-4, &opt.display().to_string());
}

/// `--disable attention` (on `ferry optimize` and on `export --optimize`, with a second name
/// comma-separated) leaves the attention blocks unfused, and the result still matches.
#[test]
fn disable_leaves_fusions_out() {
    let dir = tempfile::tempdir().expect("tempdir");
    let case = testdata("bert-tiny-gelu");
    let golden = case.join("golden.safetensors");
    let model = dir.path().join("m.onnx");
    let o = export(&case, &model, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = dir.path().join("no-attn.onnx");
    let o = run(ferry()
        .arg("optimize")
        .arg(&model)
        .arg(&out)
        .args(["--disable", "attention"]));
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(op_count(&out, "Attention"), 0);
    assert_eq!(op_count(&out, "Softmax"), 2);
    // The other fusions still ran.
    assert_eq!(op_count(&out, "EmbedLayerNormalization"), 1);
    assert_eq!(op_count(&out, "BiasGelu"), 2);
    golden_parity(&out, &golden, 1e-4, &out.display().to_string());

    let out = dir.path().join("e.onnx");
    let o = export(
        &case,
        &out,
        &["--optimize", "--disable", "attention,embed_layer_norm"],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let opt = dir.path().join("e-optimized.onnx");
    assert_eq!(op_count(&opt, "Attention"), 0);
    assert_eq!(op_count(&opt, "EmbedLayerNormalization"), 0);
    assert_eq!(op_count(&opt, "SkipLayerNormalization"), 4);
    golden_parity(&opt, &golden, 1e-4, &opt.display().to_string());
}

/// `ferry optimize --json`: stdout is one JSON object whose `fused_operators` are the
/// optimized graph's op counts (every ONNX Runtime statistics key present); the human
/// summary goes to stderr.
#[test]
fn json_statistics() {
    let dir = tempfile::tempdir().expect("tempdir");
    let model = dir.path().join("m.onnx");
    let o = export(&testdata("bert-tiny-text-classification"), &model, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = dir.path().join("o.onnx");
    let o = run(ferry().arg("optimize").arg(&model).arg(&out).arg("--json"));
    assert!(o.status.success(), "{}", stderr(&o));
    let v = stdout_json(&o);
    let fused = v["fused_operators"].as_object().expect("fused_operators");
    let g = ferry_onnx::read_graph(&out).expect("read");
    let counts = g.op_counts();
    // Tiny BERT, 2 layers, gelu_new: the embeddings' LayerNorm fuses into one
    // EmbedLayerNormalization; per layer one Attention, the tanh pattern (with its bias)
    // into one FastGelu, and both residual LayerNorms into SkipLayerNormalization (the
    // classifier head has no LayerNorm).
    for (op, want) in [
        ("EmbedLayerNormalization", 1),
        ("Attention", 2),
        ("MultiHeadAttention", 0),
        ("Gelu", 0),
        ("FastGelu", 2),
        ("BiasGelu", 0),
        ("LayerNormalization", 0),
        ("SkipLayerNormalization", 4),
    ] {
        assert_eq!(fused[op].as_u64(), Some(want), "{op} reported: {v}");
        let in_file = counts.get(op).copied().unwrap_or(0) as u64;
        assert_eq!(in_file, want, "{op} in the written file: {v}");
    }
    assert_eq!(v["nodes_after"].as_u64(), Some(g.nodes.len() as u64));
    assert!(v["nodes_before"].as_u64() > v["nodes_after"].as_u64());
    assert!(stderr(&o).contains("fused operators:"), "{}", stderr(&o));
}

/// An unknown `--disable` name is one error line listing the valid names, before any
/// work: no output file (neither the plain export nor the optimized one).
#[test]
fn unknown_disable_name_fails_cleanly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let model = dir.path().join("m.onnx");
    let o = export(&testdata("bert-tiny-gelu"), &model, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = dir.path().join("o.onnx");
    let o = run(ferry()
        .arg("optimize")
        .arg(&model)
        .arg(&out)
        .args(["--disable", "attention,attn"]));
    assert_fails_cleanly(&o, &out, "unknown fusion `attn`; valid: gelu, bias-gelu");
    assert!(stderr(&o).contains("embed-layer-norm"), "{}", stderr(&o));

    let sub = dir.path().join("sub");
    std::fs::create_dir(&sub).expect("mkdir");
    let out = sub.join("x.onnx");
    let o = export(
        &testdata("bert-tiny-gelu"),
        &out,
        &["--optimize", "--disable", "skip-layernorm"],
    );
    assert_fails_cleanly(&o, &out, "unknown fusion `skip-layernorm`");
    assert!(!sub.join("x-optimized.onnx").exists());
}

/// `--static-shapes` at the golden's batch and sequence length: every dim of the export is
/// fixed, it matches transformers ≤1e-5 and, with `--optimize`, ≤1e-4 with no `Shape` left.
/// With EmbedLayerNormalization disabled the position slice (Shape → Slice → Slice of the
/// position table) is folded by constant evaluation only when the shapes are static.
#[test]
fn static_shapes_export_matches_golden_and_folds_shapes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let case = testdata("bert-tiny-text-classification");
    let golden_path = case.join("golden.safetensors");
    let golden = ferry_verifier::Golden::load(&golden_path).expect("golden");
    let ids = &golden.inputs["input_ids"];
    assert_eq!(ids.shape.len(), 2);
    let (b, s) = (ids.shape[0].to_string(), ids.shape[1].to_string());
    let out = dir.path().join("static.onnx");
    let o = export(
        &case,
        &out,
        &[
            "--task",
            "text-classification",
            "--static-shapes",
            "--batch-size",
            &b,
            "--sequence-length",
            &s,
            "--optimize",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let g = ferry_onnx::read_graph(&out).expect("read");
    for v in g.inputs.iter().chain(&g.outputs).chain(&g.value_info) {
        let shape = v.shape.as_ref().expect("shape");
        assert!(
            shape.iter().all(|d| d.fixed().is_some()),
            "{}: {shape:?}",
            v.name
        );
    }
    assert_eq!(
        g.inputs[0].shape,
        Some(vec![
            ferry_ir::Dim::Fixed(ids.shape[0]),
            ferry_ir::Dim::Fixed(ids.shape[1])
        ])
    );
    assert!(op_count(&out, "Shape") > 0);
    golden_parity(&out, &golden_path, 1e-5, &out.display().to_string());
    let opt = dir.path().join("static-optimized.onnx");
    assert_eq!(op_count(&opt, "Shape"), 0);
    assert_eq!(op_count(&opt, "Attention"), 2);
    golden_parity(&opt, &golden_path, 1e-4, &opt.display().to_string());

    // Without the embeddings fusion: folded away when static, kept when dynamic.
    let folded = dir.path().join("static-noembed.onnx");
    let o = run(ferry()
        .arg("optimize")
        .arg(&out)
        .arg(&folded)
        .args(["--disable", "embed-layer-norm"]));
    assert!(o.status.success(), "{}", stderr(&o));
    for op in ["Shape", "Slice", "EmbedLayerNormalization"] {
        assert_eq!(op_count(&folded, op), 0, "{op}");
    }
    golden_parity(&folded, &golden_path, 1e-4, &folded.display().to_string());
    let dynamic = dir.path().join("dynamic.onnx");
    let o = export(&case, &dynamic, &["--task", "text-classification"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let kept = dir.path().join("dynamic-noembed.onnx");
    let o = run(ferry()
        .arg("optimize")
        .arg(&dynamic)
        .arg(&kept)
        .args(["--disable", "embed-layer-norm"]));
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(op_count(&kept, "Shape"), 1);
    golden_parity(&kept, &golden_path, 1e-4, &kept.display().to_string());
}

/// Multiple choice with `--num-choices` too: the `[batch, choices, seq]` inputs and the
/// flattened `batch*choices` axis are fixed, the export matches transformers at the golden's
/// shape and the optimized model has no `Shape` left.
#[test]
fn static_shapes_multiple_choice() {
    let dir = tempfile::tempdir().expect("tempdir");
    let case = testdata("bert-tiny-multiple-choice");
    let golden_path = case.join("golden.safetensors");
    let golden = ferry_verifier::Golden::load(&golden_path).expect("golden");
    let shape = golden.inputs["input_ids"].shape.clone();
    assert_eq!(shape.len(), 3);
    let [b, c, s] = [0, 1, 2].map(|k| shape[k].to_string());
    let out = dir.path().join("mc.onnx");
    let o = export(
        &case,
        &out,
        &[
            "--task",
            "multiple-choice",
            "--static-shapes",
            "--batch-size",
            &b,
            "--num-choices",
            &c,
            "--sequence-length",
            &s,
            "--optimize",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let g = ferry_onnx::read_graph(&out).expect("read");
    assert!(
        g.inputs.iter().chain(&g.value_info).all(|v| v
            .shape
            .iter()
            .flatten()
            .all(|d| d.fixed().is_some()))
    );
    assert!(op_count(&out, "Shape") > 0);
    golden_parity(&out, &golden_path, 1e-5, &out.display().to_string());
    let opt = dir.path().join("mc-optimized.onnx");
    assert_eq!(op_count(&opt, "Shape"), 0);
    golden_parity(&opt, &golden_path, 1e-4, &opt.display().to_string());
}

/// `--static-shapes` refuses what it cannot honour, before writing anything.
#[test]
fn static_shapes_bad_combinations_fail_cleanly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("m.onnx");
    let case = testdata("bert-tiny-gelu");
    let o = export(&case, &out, &["--static-shapes", "--check"]);
    assert_fails_cleanly(&o, &out, "cannot be combined with --static-shapes");
    let o = export(&case, &out, &["--static-shapes", "--sequence-length", "0"]);
    assert_fails_cleanly(&o, &out, "must be at least 1");
    let pt = dir.path().join("m.pt");
    let o = export(&case, &pt, &["--static-shapes", "--format", "torchscript"]);
    assert_fails_cleanly(&o, &pt, "--static-shapes applies to ONNX exports");
}

/// `ferry export --optimize --quantize --json`: one JSON document on stdout describing the
/// three files — the export, the optimized model with its fused-operator counts (equal to
/// the written graph's) and the int8 model with its accuracy report — human text on stderr.
#[test]
fn export_json_describes_the_three_files() {
    let (dir, model, o) = export_case(
        "bert-tiny-text-classification",
        "m.onnx",
        &["--quantize", "--json"],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let v = stdout_json(&o);
    assert_eq!(v["model_type"], "bert", "{v}");
    assert_eq!(v["task"], "text-classification", "{v}");
    assert_eq!(v["model"], model.display().to_string(), "{v}");
    let optimized = dir.path().join("m-optimized.onnx");
    assert_eq!(v["optimized"]["model"], optimized.display().to_string());
    let g = ferry_onnx::read_graph(&optimized).expect("read optimized");
    let counts = g.op_counts();
    for op in [
        "Attention",
        "SkipLayerNormalization",
        "EmbedLayerNormalization",
    ] {
        let want = counts.get(op).copied().unwrap_or(0) as u64;
        assert!(want > 0, "{op} fused");
        assert_eq!(
            v["optimized"]["fused_operators"][op].as_u64(),
            Some(want),
            "{v}"
        );
    }
    assert!(dir.path().join("m-quantized.onnx").is_file());
    assert!(v["quantized"].is_object(), "{v}");
    let rows = v["quantized"]["accuracy"]["outputs"].as_array();
    assert!(rows.is_some_and(|r| !r.is_empty()), "accuracy report: {v}");
    assert!(stderr(&o).contains("exported bert"), "{}", stderr(&o));
}

/// Writes the one-node model `y = op(inputs)` over a float32 `[2, 3]` input `x` at `opset`.
fn one_node_model(path: &Path, opset: i64, op: &str, inputs: &[&str], attrs: &[(&str, Attr)]) {
    let f = |name: &str| ferry_ir::Value::new(name, DType::F32, vec![2.into(), 3.into()]);
    let graph = ferry_ir::Graph {
        name: "g".into(),
        inputs: vec![f("x")],
        outputs: vec![f("y")],
        nodes: vec![ferry_ir::Node {
            name: format!("/{op}"),
            op_type: op.into(),
            domain: String::new(),
            inputs: inputs.iter().map(|s| s.to_string()).collect(),
            outputs: vec!["y".into()],
            attrs: attrs
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect(),
        }],
        initializers: vec![],
        value_info: vec![],
        opsets: vec![ferry_ir::OpsetImport {
            domain: String::new(),
            version: opset,
        }],
    };
    ferry_onnx::write_model(&graph, path, &Default::default()).expect("write model");
}

/// An opset-9 `Slice` takes `starts`/`ends`/`axes` as attributes (valid ONNX that ONNX
/// Runtime runs); `ferry optimize` used to exit 101 indexing its absent second input.
#[test]
fn optimize_opset9_slice_with_attributes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let model = dir.path().join("slice9.onnx");
    let attrs = [
        ("starts", Attr::Ints(vec![0])),
        ("ends", Attr::Ints(vec![1])),
        ("axes", Attr::Ints(vec![1])),
    ];
    one_node_model(&model, 9, "Slice", &["x"], &attrs);
    let out = dir.path().join("out.onnx");
    let o = run(ferry().arg("optimize").arg(&model).arg(&out));
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let g = ferry_onnx::read_graph(&out).expect("read optimized");
    assert_eq!(g.onnx_opset(), Some(9));
    assert_eq!(g.op_counts().get("Slice"), Some(&1));
}

/// A `Mul` with one input is malformed: one `error:` line naming the node, exit 1, no
/// output file.
#[test]
fn optimize_mul_with_one_input_fails_cleanly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let model = dir.path().join("mul.onnx");
    one_node_model(&model, 17, "Mul", &["x"], &[]);
    let out = dir.path().join("out.onnx");
    let o = run(ferry().arg("optimize").arg(&model).arg(&out));
    assert_fails_cleanly(
        &o,
        &out,
        "node `/Mul` (Mul): has 1 input, needs 2 inputs at opset 17",
    );
}
