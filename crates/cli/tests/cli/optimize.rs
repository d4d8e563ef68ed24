//! `ferry optimize`: fusion counts and parity of optimized exports.

use super::*;

/// `ferry optimize` on the tiny BERT export: Transposes of weights and Constants are folded,
/// and the optimized model (inline and with external data, and in place) still matches its
/// golden within 1e-4 in ONNX Runtime.
#[test]
fn optimized_tiny_bert_matches_golden() {
    let dir = tempfile::tempdir().expect("tempdir");
    let model = dir.path().join("model.onnx");
    let o = export(&testdata("bert-tiny-gelu"), &model, &[]);
    assert!(o.status.success(), "export failed: {}", stderr(&o));
    let before = ferry_onnx::read_graph(&model).expect("read export");
    let golden =
        ferry_verifier::Golden::load(&testdata("bert-tiny-gelu").join("golden.safetensors"))
            .expect("golden");
    for (name, extra) in [
        ("opt.onnx", &[][..]),
        ("opt-ext.onnx", &["--external-data"][..]),
    ] {
        let out = dir.path().join(name);
        let o = run(ferry().arg("optimize").arg(&model).arg(&out).args(extra));
        assert!(o.status.success(), "optimize failed: {}", stderr(&o));
        let summary = String::from_utf8_lossy(&o.stdout);
        assert!(summary.contains("Transpose"), "{summary}");
        let after = ferry_onnx::read_graph(&out).expect("read optimized");
        let count = |g: &ferry_ir::Graph, op: &str| g.op_counts().get(op).copied().unwrap_or(0);
        assert!(
            count(&before, "Transpose") > count(&after, "Transpose"),
            "{summary}"
        );
        assert_eq!(count(&after, "Constant"), 0, "{summary}");
        assert!(after.nodes.len() < before.nodes.len(), "{summary}");
        let mut m = ferry_verifier::Model::load(&out, 2).expect("ONNX Runtime loads it");
        for r in ferry_verifier::compare(&mut m, &golden).expect("runs") {
            assert!(
                r.max_abs <= 1e-4,
                "{name}: {} max-abs {}",
                r.name,
                r.max_abs
            );
        }
    }
    // In place, and a bad input is one error line.
    let o = run(ferry().arg("optimize").arg(&model).arg(&model));
    assert!(
        o.status.success(),
        "in-place optimize failed: {}",
        stderr(&o)
    );
    let junk = dir.path().join("junk.onnx");
    std::fs::write(&junk, [0xffu8; 32]).expect("write");
    let o = run(ferry()
        .arg("optimize")
        .arg(&junk)
        .arg(dir.path().join("x.onnx")));
    assert!(!o.status.success());
    assert!(stderr(&o).starts_with("error: "), "{}", stderr(&o));
}

/// `ferry optimize` fuses the tiny BERT exports at opset 17 into ONNX Runtime's contrib ops
/// (erf GELU → BiasGelu, residual Add + LayerNormalization → SkipLayerNormalization with the
/// dense bias absorbed) and the result still matches the golden within 1e-4. The tanh GELU
/// checkpoint gets no Gelu/BiasGelu (its tanh pattern becomes FastGelu) and still gets SkipLayerNorm.
#[test]
fn optimize_fuses_contrib_ops_and_keeps_parity() {
    let dir = tempfile::tempdir().expect("tempdir");
    // (case, task flags, BiasGelu, SkipLayerNormalization)
    let cases: [(&str, &[&str], usize, usize); 3] = [
        ("bert-tiny-gelu", &[], 2, 4),
        (
            "bert-tiny-tanh-bin",
            &["--task", "feature-extraction"],
            0,
            6,
        ),
        // The masked-LM head's transform adds a third BiasGelu.
        ("bert-tiny-fill-mask", &[], 3, 4),
    ];
    for (case, extra, bias_gelu, skip_ln) in cases {
        let model = dir.path().join(format!("{case}.onnx"));
        let mut args = vec!["--opset", "17"];
        args.extend_from_slice(extra);
        let o = export(&testdata(case), &model, &args);
        assert!(o.status.success(), "export failed: {}", stderr(&o));
        let out = dir.path().join(format!("{case}-opt.onnx"));
        let o = run(ferry().arg("optimize").arg(&model).arg(&out));
        assert!(o.status.success(), "optimize failed: {}", stderr(&o));
        let summary = String::from_utf8_lossy(&o.stdout).into_owned();
        let proto = ferry_onnx::read_model_proto(&out).expect("read optimized");
        let graph = proto.graph.as_ref().expect("graph");
        let count = |op: &str| graph.node.iter().filter(|n| n.op_type == op).count();
        assert_eq!(count("BiasGelu"), bias_gelu, "{case}: {summary}");
        assert_eq!(
            count("SkipLayerNormalization"),
            skip_ln,
            "{case}: {summary}"
        );
        assert_eq!(count("Gelu"), 0, "{case}: {summary}");
        assert_eq!(count("Erf"), 0, "{case}: {summary}");
        if bias_gelu == 0 {
            assert!(count("Tanh") > 0, "{case}: {summary}");
        }
        // Every fused op is in com.microsoft, which is imported once at version 1.
        for n in &graph.node {
            if ["BiasGelu", "SkipLayerNormalization"].contains(&n.op_type.as_str()) {
                assert_eq!(n.domain, "com.microsoft", "{case}");
            }
        }
        let ms: Vec<i64> = proto
            .opset_import
            .iter()
            .filter(|o| o.domain == "com.microsoft")
            .map(|o| o.version)
            .collect();
        assert_eq!(ms, vec![1], "{case}");
        let golden = ferry_verifier::Golden::load(&testdata(case).join("golden.safetensors"))
            .expect("golden");
        let mut m = ferry_verifier::Model::load(&out, 2).expect("ONNX Runtime loads it");
        let reports = ferry_verifier::compare(&mut m, &golden).expect("runs");
        assert_eq!(reports.len(), golden.outputs.len());
        for r in &reports {
            println!("{case} optimized {}: max-abs {:.3e}", r.name, r.max_abs);
            assert!(
                r.max_abs <= 1e-4,
                "{case}: {} max-abs {}",
                r.name,
                r.max_abs
            );
        }
    }
}

/// `ferry optimize` fuses the tanh GELU (`gelu_new`) of the tiny BERT export into one
/// `FastGelu` per layer (bias absorbed) with parity ≤ 1e-4, leaving only the pooler's Tanh;
/// with `--gelu-approximation` the erf GELU checkpoint's BiasGelus become FastGelu, which is
/// approximate (parity ≤ 1e-3).
#[test]
fn optimize_fuses_fast_gelu_and_approximates_gelu() {
    let dir = tempfile::tempdir().expect("tempdir");
    // (case, export flags, optimize flags, FastGelu, tolerance)
    type Case = (
        &'static str,
        &'static [&'static str],
        &'static [&'static str],
        usize,
        f64,
    );
    let cases: [Case; 2] = [
        (
            "bert-tiny-tanh-bin",
            &["--task", "feature-extraction"],
            &[],
            3,
            1e-4,
        ),
        ("bert-tiny-gelu", &[], &["--gelu-approximation"], 2, 1e-3),
    ];
    for (case, export_flags, opt_flags, fast_gelu, tol) in cases {
        let model = dir.path().join(format!("{case}.onnx"));
        let mut args = vec!["--opset", "17"];
        args.extend_from_slice(export_flags);
        let o = export(&testdata(case), &model, &args);
        assert!(o.status.success(), "export failed: {}", stderr(&o));
        let out = dir.path().join(format!("{case}-fast.onnx"));
        let o = run(ferry()
            .arg("optimize")
            .arg(&model)
            .arg(&out)
            .args(opt_flags));
        assert!(o.status.success(), "optimize failed: {}", stderr(&o));
        let summary = String::from_utf8_lossy(&o.stdout).into_owned();
        assert!(
            summary.contains(&format!("{fast_gelu} FastGelu"))
                || summary.contains(&format!("approximated {fast_gelu} Gelu")),
            "{case}: {summary}"
        );
        let proto = ferry_onnx::read_model_proto(&out).expect("read optimized");
        let graph = proto.graph.as_ref().expect("graph");
        let count = |op: &str| graph.node.iter().filter(|n| n.op_type == op).count();
        assert_eq!(count("FastGelu"), fast_gelu, "{case}: {summary}");
        assert_eq!(count("BiasGelu"), 0, "{case}: {summary}");
        assert_eq!(count("Gelu"), 0, "{case}: {summary}");
        assert_eq!(count("Erf"), 0, "{case}: {summary}");
        assert_eq!(count("Pow"), 0, "{case}: {summary}");
        if case == "bert-tiny-tanh-bin" {
            // Only the pooler's activation is left.
            assert_eq!(count("Tanh"), 1, "{case}: {summary}");
        }
        for n in graph.node.iter().filter(|n| n.op_type == "FastGelu") {
            assert_eq!(n.domain, "com.microsoft", "{case}");
            // The dense layer's bias is absorbed as FastGelu's second input.
            assert_eq!(n.input.len(), 2, "{case}");
        }
        let golden = ferry_verifier::Golden::load(&testdata(case).join("golden.safetensors"))
            .expect("golden");
        let mut m = ferry_verifier::Model::load(&out, 2).expect("ONNX Runtime loads it");
        let reports = ferry_verifier::compare(&mut m, &golden).expect("runs");
        assert_eq!(reports.len(), golden.outputs.len());
        for r in &reports {
            println!("{case} {opt_flags:?} {}: max-abs {:.3e}", r.name, r.max_abs);
            assert!(r.max_abs <= tol, "{case}: {} max-abs {}", r.name, r.max_abs);
        }
    }
}

/// `ferry optimize` fuses each encoder layer's self-attention of the tiny BERT exports
/// (2 layers) at opset 17 into one `com.microsoft` `Attention` (packed q|k|v weights, one
/// shared `Cast(attention_mask → int32)` as the raw mask), and the result still matches the
/// golden within 1e-4.
#[test]
fn optimize_fuses_attention_and_keeps_parity() {
    let dir = tempfile::tempdir().expect("tempdir");
    for case in ["bert-tiny-gelu", "bert-tiny-relu-sharded"] {
        let model = dir.path().join(format!("{case}.onnx"));
        let o = export(&testdata(case), &model, &["--opset", "17"]);
        assert!(o.status.success(), "export failed: {}", stderr(&o));
        let out = dir.path().join(format!("{case}-opt.onnx"));
        let o = run(ferry().arg("optimize").arg(&model).arg(&out));
        assert!(o.status.success(), "optimize failed: {}", stderr(&o));
        let summary = String::from_utf8_lossy(&o.stdout).into_owned();
        assert!(summary.contains("2 Attention"), "{case}: {summary}");
        let proto = ferry_onnx::read_model_proto(&out).expect("read optimized");
        let graph = proto.graph.as_ref().expect("graph");
        let count = |op: &str| graph.node.iter().filter(|n| n.op_type == op).count();
        assert_eq!(count("Attention"), 2, "{case}: {summary}");
        assert_eq!(count("Softmax"), 0, "{case}: {summary}");
        let attention: Vec<_> = graph
            .node
            .iter()
            .filter(|n| n.op_type == "Attention")
            .collect();
        for n in &attention {
            assert_eq!(n.domain, "com.microsoft", "{case}");
            assert_eq!(n.input.len(), 4, "{case}");
        }
        // One Cast of the mask, shared by both layers.
        assert_eq!(attention[0].input[3], attention[1].input[3], "{case}");
        let golden = ferry_verifier::Golden::load(&testdata(case).join("golden.safetensors"))
            .expect("golden");
        let mut m = ferry_verifier::Model::load(&out, 2).expect("ONNX Runtime loads it");
        let reports = ferry_verifier::compare(&mut m, &golden).expect("runs");
        assert_eq!(reports.len(), golden.outputs.len());
        for r in &reports {
            println!(
                "{case} attention-fused {}: max-abs {:.3e}",
                r.name, r.max_abs
            );
            assert!(
                r.max_abs <= 1e-4,
                "{case}: {} max-abs {}",
                r.name,
                r.max_abs
            );
        }
    }
}

#[test]
fn optimize_fuses_embed_layer_norm_and_keeps_parity() {
    let dir = tempfile::tempdir().expect("tempdir");
    let case = "bert-tiny-gelu";
    let model = dir.path().join(format!("{case}.onnx"));
    let o = export(&testdata(case), &model, &["--opset", "17"]);
    assert!(o.status.success(), "export failed: {}", stderr(&o));
    let out = dir.path().join(format!("{case}-opt.onnx"));
    let o = run(ferry().arg("optimize").arg(&model).arg(&out));
    assert!(o.status.success(), "optimize failed: {}", stderr(&o));
    let summary = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(summary.contains("1 EmbedLayerNormalization"), "{summary}");
    let proto = ferry_onnx::read_model_proto(&out).expect("read optimized");
    let graph = proto.graph.as_ref().expect("graph");
    let count = |op: &str| graph.node.iter().filter(|n| n.op_type == op).count();
    assert_eq!(count("EmbedLayerNormalization"), 1, "{summary}");
    assert_eq!(count("Attention"), 2, "{summary}");
    assert_eq!(count("SkipLayerNormalization"), 4, "{summary}");
    assert_eq!(count("BiasGelu"), 2, "{summary}");
    assert_eq!(count("LayerNormalization"), 0, "{summary}");
    let embed = graph
        .node
        .iter()
        .find(|n| n.op_type == "EmbedLayerNormalization")
        .expect("present");
    assert_eq!(embed.domain, "com.microsoft");
    assert_eq!(embed.input.len(), 7);
    let golden =
        ferry_verifier::Golden::load(&testdata(case).join("golden.safetensors")).expect("golden");
    let mut m = ferry_verifier::Model::load(&out, 2).expect("ONNX Runtime loads it");
    let reports = ferry_verifier::compare(&mut m, &golden).expect("runs");
    assert_eq!(reports.len(), golden.outputs.len());
    for r in &reports {
        println!("{case} embed-fused {}: max-abs {:.3e}", r.name, r.max_abs);
        assert!(
            r.max_abs <= 1e-4,
            "{case}: {} max-abs {}",
            r.name,
            r.max_abs
        );
    }
}
