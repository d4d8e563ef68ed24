//! `ferry optimize` fusion breadth: decomposed LayerNorm (opset < 17), DistilBERT, RoBERTa
//! and GPT-2 exports, MultiHeadAttention, and a model exported by `torch.onnx.export`.

use std::collections::BTreeMap;

use super::*;

/// Optimizes `model` into `out` with `flags`, checks the result against `golden` within
/// 1e-4 in ONNX Runtime, and returns the optimized graph's op counts.
fn optimize_and_check(
    model: &Path,
    out: &Path,
    flags: &[&str],
    golden: &Path,
) -> BTreeMap<String, usize> {
    let o = run(ferry().arg("optimize").arg(model).arg(out).args(flags));
    assert!(o.status.success(), "optimize failed: {}", stderr(&o));
    let summary = String::from_utf8_lossy(&o.stdout).into_owned();
    let graph = ferry_onnx::read_graph(out).expect("read optimized");
    golden_parity(out, golden, 1e-4, &format!("{} ({summary})", out.display()));
    graph.op_counts()
}

/// Asserts `counts` has exactly `want` of each listed op type (0 = absent).
fn assert_counts(counts: &BTreeMap<String, usize>, want: &[(&str, usize)], what: &str) {
    for &(op, n) in want {
        assert_eq!(
            counts.get(op).copied().unwrap_or(0),
            n,
            "{what}: {op} in {counts:?}"
        );
    }
}

/// Exports `case` with `flags` into `dir` and returns the model path.
fn export_case(dir: &Path, case: &str, flags: &[&str]) -> PathBuf {
    let model = dir.join(format!("{case}{}.onnx", flags.join("")));
    let o = export(&testdata(case), &model, flags);
    assert!(o.status.success(), "export {case} failed: {}", stderr(&o));
    model
}

/// Fused op counts every BERT-like tiny export (2 layers) reaches, whatever the opset: the
/// decomposed LayerNorm below opset 17 is fused first, so SkipLayerNormalization and
/// EmbedLayerNormalization follow as at opset 17; no piece of a layer norm or GELU is left.
#[test]
fn decomposed_layer_norm_fuses_at_opset_14_as_at_17() {
    let dir = tempfile::tempdir().expect("tempdir");
    // (case, EmbedLayerNormalization, SkipLayerNormalization)
    let cases = [
        ("bert-tiny-gelu", 1, 4),
        ("distilbert-tiny-feature-extraction", 1, 4),
        // RoBERTa's position ids are computed from input_ids: no EmbedLayerNormalization;
        // its embeddings' sum + LayerNorm becomes a SkipLayerNormalization.
        ("roberta-tiny-feature-extraction", 0, 5),
    ];
    for (case, embed, skip) in cases {
        for opset in ["14", "17"] {
            let model = export_case(dir.path(), case, &["--opset", opset]);
            let out = dir.path().join(format!("{case}-{opset}-opt.onnx"));
            let golden = testdata(case).join("golden.safetensors");
            let counts = optimize_and_check(&model, &out, &[], &golden);
            let what = format!("{case} opset {opset}");
            assert_counts(
                &counts,
                &[
                    ("EmbedLayerNormalization", embed),
                    ("Attention", 2),
                    ("SkipLayerNormalization", skip),
                    ("BiasGelu", 2),
                    ("LayerNormalization", 0),
                    ("ReduceMean", 0),
                    ("Sqrt", 0),
                    ("Pow", 0),
                    ("Erf", 0),
                    ("Softmax", 0),
                ],
                &what,
            );
        }
    }
}

/// Below opset 17 the fused `LayerNormalization` is in the default domain too (ONNX defines
/// it from 17; ONNX Runtime registers it at lower opsets as well, while
/// `com.microsoft:LayerNormalization` does not exist): with SkipLayerNormalization and
/// EmbedLayerNormalization disabled, the opset-14 export's five layer norms run as
/// `LayerNormalization` in ONNX Runtime and match.
#[test]
fn layer_norm_alone_runs_at_opset_14() {
    let dir = tempfile::tempdir().expect("tempdir");
    let model = export_case(dir.path(), "bert-tiny-gelu", &["--opset", "14"]);
    let out = dir.path().join("ln.onnx");
    let golden = testdata("bert-tiny-gelu").join("golden.safetensors");
    let flags = ["--disable", "skip-layer-norm,embed-layer-norm"];
    let counts = optimize_and_check(&model, &out, &flags, &golden);
    assert_counts(
        &counts,
        &[
            ("LayerNormalization", 5),
            ("SkipLayerNormalization", 0),
            ("ReduceMean", 0),
        ],
        "opset 14",
    );
    let graph = ferry_onnx::read_graph(&out).expect("read");
    assert!(
        graph
            .nodes
            .iter()
            .filter(|n| n.op_type == "LayerNormalization")
            .all(|n| n.domain.is_empty())
    );
    assert_eq!(graph.onnx_opset(), Some(14));
}

/// GPT-2 (no past): the decomposed LayerNorms fuse, the pre-LN residual sums become
/// SkipLayerNormalization (the sum kept as its output 3), the causal attention becomes
/// `Attention` with `unidirectional = 1`, and the erf / tanh GELU become BiasGelu /
/// FastGelu; the optimized models still match transformers within 1e-4.
#[test]
fn gpt2_fuses_causal_attention_skip_layer_norm_and_gelu() {
    let dir = tempfile::tempdir().expect("tempdir");
    // (case, BiasGelu, FastGelu)
    let cases = [
        ("gpt2-tiny-feature-extraction", 2, 0),
        ("gpt2-tiny-text-generation", 0, 2),
    ];
    for (case, bias_gelu, fast_gelu) in cases {
        for opset in ["14", "17"] {
            let model = export_case(dir.path(), case, &["--opset", opset]);
            let out = dir.path().join(format!("{case}-{opset}-opt.onnx"));
            let golden = testdata(case).join("golden.safetensors");
            let counts = optimize_and_check(&model, &out, &[], &golden);
            let what = format!("{case} opset {opset}");
            assert_counts(
                &counts,
                &[
                    ("Attention", 2),
                    ("SkipLayerNormalization", 5),
                    ("LayerNormalization", 0),
                    ("BiasGelu", bias_gelu),
                    ("FastGelu", fast_gelu),
                    ("Softmax", 0),
                    ("ReduceMean", 0),
                    ("Where", 0),
                ],
                &what,
            );
            let graph = ferry_onnx::read_graph(&out).expect("read");
            for n in graph.nodes.iter().filter(|n| n.op_type == "Attention") {
                assert!(
                    matches!(n.attr("unidirectional"), Some(ferry_ir::Attr::Int(1))),
                    "{what}: {n:?}"
                );
            }
            let sums = graph
                .nodes
                .iter()
                .filter(|n| n.op_type == "SkipLayerNormalization" && n.outputs.len() == 4)
                .count();
            assert_eq!(sums, 4, "{what}: residual sums kept as output 3");
        }
    }
}

/// Where the query bias is not a constant when the fusions run (here it is passed through
/// a float-to-float `Cast`), the Q/K/V projections cannot be packed into `Attention`: the attention
/// cores become `MultiHeadAttention` with the projections kept as MatMul + Add, and the
/// result still matches. `--disable multi-head-attention` (or `--disable attention`, as in
/// ONNX Runtime) leaves them decomposed.
#[test]
fn multi_head_attention_when_projections_are_not_packable() {
    let dir = tempfile::tempdir().expect("tempdir");
    // (case, the query projection's bias)
    let cases = [
        ("bert-tiny-gelu", "attention.self.query.bias"),
        ("distilbert-tiny-feature-extraction", "attention.q_lin.bias"),
    ];
    for (case, bias) in cases {
        let model = export_case(dir.path(), case, &["--opset", "14"]);
        let mut graph = ferry_onnx::read_graph(&model).expect("read export");
        let mut wrapped = 0;
        for k in 0..graph.nodes.len() {
            let n = &graph.nodes[k];
            if n.op_type != "Add" {
                continue;
            }
            let Some(j) = n.inputs.iter().position(|i| i.ends_with(bias)) else {
                continue;
            };
            let via = format!("{}_cast", n.inputs[j]);
            let identity = ferry_ir::Node {
                name: format!("{}/Cast", n.name),
                op_type: "Cast".into(),
                domain: String::new(),
                inputs: vec![n.inputs[j].clone()],
                outputs: vec![via.clone()],
                attrs: [("to".to_string(), ferry_ir::Attr::Int(1))].into(),
            };
            graph.nodes[k].inputs[j] = via;
            graph.nodes.push(identity);
            wrapped += 1;
        }
        assert_eq!(wrapped, 2, "{case}: query biases");
        // The Casts go before their readers.
        let (ids, rest): (Vec<_>, Vec<_>) = graph
            .nodes
            .drain(..)
            .partition(|n| n.outputs[0].ends_with("_cast"));
        graph.nodes = ids.into_iter().chain(rest).collect();
        let edited = dir.path().join(format!("{case}-cast.onnx"));
        ferry_onnx::write_model(&graph, &edited, &Default::default()).expect("write");
        let golden = testdata(case).join("golden.safetensors");
        let out = dir.path().join(format!("{case}-mha.onnx"));
        let counts = optimize_and_check(&edited, &out, &[], &golden);
        assert_counts(
            &counts,
            &[
                ("MultiHeadAttention", 2),
                ("Attention", 0),
                ("Softmax", 0),
                ("SkipLayerNormalization", 4),
                ("EmbedLayerNormalization", 1),
            ],
            case,
        );
        let fused = ferry_onnx::read_graph(&out).expect("read");
        for n in fused
            .nodes
            .iter()
            .filter(|n| n.op_type == "MultiHeadAttention")
        {
            assert_eq!(n.domain, "com.microsoft", "{case}");
            assert_eq!(
                n.inputs.len(),
                5,
                "{case}: q, k, v, no bias, key padding mask"
            );
            assert!(n.inputs[3].is_empty(), "{case}");
        }
        for flag in ["multi-head-attention", "attention"] {
            let out = dir.path().join(format!("{case}-no-{flag}.onnx"));
            let counts = optimize_and_check(&edited, &out, &["--disable", flag], &golden);
            assert_counts(
                &counts,
                &[("MultiHeadAttention", 0), ("Attention", 0), ("Softmax", 2)],
                case,
            );
        }
    }
}

/// A tiny BERT exported by `torch.onnx.export` (TorchScript exporter, at opsets 14 and 17,
/// optimum's names and dynamic axes; testdata/golden_torchexport.py) reaches the same fused
/// counts as ferry's own export of the same checkpoint — its deduplicated parameters behind
/// `Identity`, pre-transposed MatMul weights, bias Adds with swapped operands, Reshapes to
/// `Concat`s of `Shape` dims, no `value_info`, and transformers' vmap-built mask (passed to
/// Attention as its `attention_bias`) notwithstanding — and still matches transformers
/// within 1e-4.
#[test]
fn torch_exported_bert_fuses_like_ferrys_export() {
    let dir = tempfile::tempdir().expect("tempdir");
    let case = testdata("bert-tiny-torchexport");
    let golden = case.join("golden.safetensors");
    let fused = [
        ("EmbedLayerNormalization", 1),
        ("Attention", 2),
        ("SkipLayerNormalization", 4),
        ("BiasGelu", 2),
        ("LayerNormalization", 0),
        ("Softmax", 0),
        ("ReduceMean", 0),
        ("Erf", 0),
        ("Identity", 0),
    ];
    for (file, opset) in [("model.onnx", "14"), ("model-opset17.onnx", "17")] {
        let out = dir.path().join(format!("torch-{opset}-opt.onnx"));
        let counts = optimize_and_check(&case.join(file), &out, &[], &golden);
        assert_counts(&counts, &fused, &format!("torch export, opset {opset}"));
        let graph = ferry_onnx::read_graph(&out).expect("read");
        for n in graph.nodes.iter().filter(|n| n.op_type == "Attention") {
            // No mask_index: the additive mask is the attention_bias input.
            assert_eq!(n.inputs.len(), 6, "{n:?}");
            assert!(n.inputs[3].is_empty() && !n.inputs[5].is_empty(), "{n:?}");
        }
        let ours = export_case(dir.path(), "bert-tiny-gelu", &["--opset", opset]);
        let ours_out = dir.path().join(format!("ours-{opset}-opt.onnx"));
        let ours_counts = optimize_and_check(&ours, &ours_out, &[], &golden);
        assert_counts(
            &ours_counts,
            &fused,
            &format!("ferry export, opset {opset}"),
        );
    }
}

/// ModernBERT (pre-norm layers, LayerNorms without bias, rotary q/k, GeGLU): ONNX Runtime's
/// transformers optimizer (model type bert, onnxruntime 1.31.1) fuses optimum's export of
/// modernbert-tiny-feature-extraction (4 layers) into Gelu 4, LayerNormalization 1 and
/// SkipLayerNormalization 8, and of modernbert-tiny-text-classification (3 layers, relu
/// MLP, biased head dense) into Gelu 1, LayerNormalization 2 and SkipLayerNormalization 6.
/// ferry's exports reach the same at every opset (the head's bias goes into BiasGelu),
/// plus one RotaryEmbedding per query and key, within 1e-4 of the golden.
#[test]
fn modernbert_fuses_what_onnx_runtime_fuses_on_optimums_export() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cases = [
        (
            "modernbert-tiny-feature-extraction",
            [("Gelu", 4), ("BiasGelu", 0), ("LayerNormalization", 1)],
            [("SkipLayerNormalization", 8), ("RotaryEmbedding", 8)],
        ),
        (
            "modernbert-tiny-text-classification",
            [("Gelu", 0), ("BiasGelu", 1), ("LayerNormalization", 2)],
            [("SkipLayerNormalization", 6), ("RotaryEmbedding", 6)],
        ),
    ];
    for (case, norms, rest) in cases {
        let task = if case.ends_with("feature-extraction") {
            "feature-extraction"
        } else {
            "text-classification"
        };
        for (what, counts) in optimized_at_every_opset(dir.path(), case, task) {
            assert_counts(&counts, &norms, &what);
            assert_counts(&counts, &rest, &what);
            // Nothing of a decomposed norm or the erf GELU is left.
            assert_counts(&counts, &[("ReduceMean", 0), ("Erf", 0)], &what);
        }
    }
}

/// Exports `case` for `task` at opsets 14, 17 and 21 into `dir`, optimizes each (checked
/// against the golden as [`optimize_and_check`] does) and returns `("<case> opset <n>",
/// op counts)` per opset.
fn optimized_at_every_opset(
    dir: &Path,
    case: &str,
    task: &str,
) -> Vec<(String, BTreeMap<String, usize>)> {
    ["14", "17", "21"]
        .into_iter()
        .map(|opset| {
            let model = export_case(dir, case, &["--task", task, "--opset", opset]);
            let out = dir.join(format!("{case}-{opset}-opt.onnx"));
            let golden = testdata(case).join("golden.safetensors");
            let counts = optimize_and_check(&model, &out, &[], &golden);
            (format!("{case} opset {opset}"), counts)
        })
        .collect()
}

/// DeBERTa-v2 and v1 (disentangled attention, post-norm layers): ONNX Runtime's transformers
/// optimizer (model type bert, onnxruntime 1.31.1, opt_level 1) fuses optimum-onnx 0.1.0's
/// opset-17 exports of the tiny goldens into (fused-operator statistics, nonzero only):
///
/// - deberta-v2-tiny-feature-extraction: BiasGelu 2, LayerNormalization 1, SkipLayerNormalization 4
/// - deberta-v2-tiny-text-classification: SkipLayerNormalization 7
/// - deberta-v2-tiny-question-answering: FastGelu 2, LayerNormalization 1, SkipLayerNormalization 4
/// - deberta-v2-tiny-fill-mask: FastGelu 3, LayerNormalization 2, SkipLayerNormalization 4
/// - deberta-tiny-text-classification: Gelu 1, LayerNormalization 1, SkipLayerNormalization 4
///
/// and ferry's exports into the same, except: the LayerNorm of `encoder.rel_embeddings`
/// (`norm_rel_ebd`), a constant subgraph ONNX Runtime folds away and ferry keeps (one more
/// LayerNormalization in feature-extraction, one in text-classification); the embedding
/// LayerNorm becomes EmbedLayerNormalization where the embeddings are word + position only
/// (question-answering, v1 text-classification), whose head dense + gelu is BiasGelu.
/// Neither fuses the disentangled attention. Within 1e-4 of the golden at every opset.
#[test]
fn deberta_fusions_match_onnx_runtime_on_optimums_export() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cases = [
        (
            "deberta-v2-tiny-feature-extraction",
            "feature-extraction",
            [
                ("BiasGelu", 2),
                ("FastGelu", 0),
                ("LayerNormalization", 2),
                ("SkipLayerNormalization", 4),
                ("EmbedLayerNormalization", 0),
                ("Gelu", 0),
            ],
        ),
        (
            "deberta-v2-tiny-text-classification",
            "text-classification",
            [
                ("BiasGelu", 0),
                ("FastGelu", 0),
                ("LayerNormalization", 1),
                ("SkipLayerNormalization", 7),
                ("EmbedLayerNormalization", 0),
                ("Gelu", 0),
            ],
        ),
        (
            "deberta-v2-tiny-question-answering",
            "question-answering",
            [
                ("BiasGelu", 0),
                ("FastGelu", 2),
                ("LayerNormalization", 0),
                ("SkipLayerNormalization", 4),
                ("EmbedLayerNormalization", 1),
                ("Gelu", 0),
            ],
        ),
        (
            "deberta-v2-tiny-fill-mask",
            "fill-mask",
            [
                ("BiasGelu", 0),
                ("FastGelu", 3),
                ("LayerNormalization", 2),
                ("SkipLayerNormalization", 4),
                ("EmbedLayerNormalization", 0),
                ("Gelu", 0),
            ],
        ),
        (
            "deberta-tiny-text-classification",
            "text-classification",
            [
                ("BiasGelu", 1),
                ("FastGelu", 0),
                ("LayerNormalization", 0),
                ("SkipLayerNormalization", 4),
                ("EmbedLayerNormalization", 1),
                ("Gelu", 0),
            ],
        ),
    ];
    for (case, task, want) in cases {
        for (what, counts) in optimized_at_every_opset(dir.path(), case, task) {
            assert_counts(&counts, &want, &what);
            assert_counts(
                &counts,
                &[("ReduceMean", 0), ("Erf", 0), ("Attention", 0)],
                &what,
            );
        }
    }
}

/// The BART family's encoders use BERT's attention ops, so `ferry optimize` fuses each
/// encoder layer's self-attention into `Attention` (ONNX Runtime's optimizer, model_type
/// `bart`, fuses none on optimum's export of the same checkpoints); the optimized encoder
/// (`feature-extraction`: the encoder alone) still matches transformers within 1e-5.
#[test]
fn bart_family_encoder_attention_fuses() {
    use ferry_verifier::{I64Tensor, Input, Model};
    let dir = tempfile::tempdir().expect("tempdir");
    for case in ["bart-tiny", "mbart-tiny", "marian-tiny"] {
        let model = export_case(dir.path(), case, &["--task", "feature-extraction"]);
        let out = dir.path().join(format!("{case}-opt.onnx"));
        let o = run(ferry().arg("optimize").arg(&model).arg(&out));
        assert!(o.status.success(), "optimize {case}: {}", stderr(&o));
        let counts = ferry_onnx::read_graph(&out).expect("read").op_counts();
        assert_counts(&counts, &[("Attention", 2), ("Softmax", 0)], case);

        let bytes = std::fs::read(testdata(case).join("steps.safetensors")).expect("steps");
        let st = safetensors::SafeTensors::deserialize(&bytes).expect("safetensors");
        let tensor = |name: &str| {
            let v = st.tensor(name).expect(name);
            let shape: Vec<i64> = v.shape().iter().map(|&d| d as i64).collect();
            (shape, v.data().to_vec())
        };
        let ints = |name: &str| {
            let (shape, data) = tensor(name);
            let data = data
                .chunks_exact(8)
                .map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes")))
                .collect();
            Input::I64(I64Tensor { shape, data })
        };
        let feed = BTreeMap::from([
            ("input_ids".to_string(), ints("encoder.input.input_ids")),
            (
                "attention_mask".to_string(),
                ints("encoder.input.attention_mask"),
            ),
        ]);
        let got = Model::load(&out, 1)
            .expect("load")
            .run_inputs(&feed)
            .expect("run")
            .remove("last_hidden_state")
            .expect("last_hidden_state");
        let (shape, want) = tensor("encoder.output.last_hidden_state");
        assert_eq!(got.shape, shape, "{case}");
        let d = got
            .data
            .iter()
            .zip(want.chunks_exact(4))
            .map(|(a, b)| (a - f32::from_le_bytes(b.try_into().expect("4 bytes"))).abs())
            .fold(0.0f32, f32::max);
        assert!(d <= 1e-5, "{case}: optimized encoder max abs {d}");
    }
}
