//! `ferry export --genai` (the onnxruntime-genai folder) and int4 embedding tables
//! (`GatherBlockQuantized`). onnxruntime-genai itself runs these folders in
//! testdata/verify_genai.py (`cargo xtask verify`).

use super::*;

use super::lowbit::{assert_dequantized_equal, rewrite};
use ferry_quantizer::gather4::quantize_gathers;
use ferry_quantizer::int4::{Int4Options, dequantize, quantize_int4};

fn int4(block_size: usize, symmetric: bool) -> Int4Options {
    Int4Options {
        block_size,
        symmetric,
        ..Default::default()
    }
}

fn initializer_bytes(g: &ferry_ir::Graph, name: &str) -> Vec<u8> {
    g.initializers
        .iter()
        .find(|t| t.name == name)
        .unwrap_or_else(|| panic!("initializer {name}"))
        .data
        .bytes()
        .expect("bytes")
        .into_owned()
}

fn floats(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

fn int_attr(node: &ferry_ir::Node, name: &str) -> usize {
    match node.attr(name) {
        Some(ferry_ir::Attr::Int(v)) => *v as usize,
        other => panic!("{name}: {other:?}"),
    }
}

/// Replaces every `GatherBlockQuantized` by a float `Gather` of its dequantized table and
/// every `MatMulNBits` by a float `MatMul` of its dequantized weight (the layouts' own
/// meaning, from `ferry_quantizer::int4::dequantize`); returns how many of each.
fn dequantize_graph(g: &mut ferry_ir::Graph) -> (usize, usize) {
    let producers: std::collections::HashMap<String, ferry_ir::Node> = g
        .nodes
        .iter()
        .flat_map(|n| n.outputs.iter().map(move |o| (o.clone(), n.clone())))
        .collect();
    let (mut gathers, mut matmuls) = (0, 0);
    for i in 0..g.nodes.len() {
        let node = g.nodes[i].clone();
        let zps = |g: &ferry_ir::Graph| node.inputs.get(3).map(|z| initializer_bytes(g, z));
        let (name, dims, values) = match node.op_type.as_str() {
            "GatherBlockQuantized" => {
                let bs = int_attr(&node, "block_size");
                assert_eq!(int_attr(&node, "bits"), 4);
                assert_eq!(int_attr(&node, "gather_axis"), 0);
                assert_eq!(int_attr(&node, "quantize_axis"), 1);
                // The codes: an initializer, or the Reshape of the tied LM head's.
                let codes = match producers.get(&node.inputs[0]) {
                    Some(r) if r.op_type == "Reshape" => r.inputs[0].clone(),
                    _ => node.inputs[0].clone(),
                };
                let data = initializer_bytes(g, &codes);
                let scales = floats(&initializer_bytes(g, &node.inputs[2]));
                let rows = g
                    .initializers
                    .iter()
                    .find(|t| t.name == codes)
                    .map(|t| t.dims[0] as usize)
                    .expect("codes");
                let width = data.len() / rows * 2; // padded to whole blocks
                let w = dequantize(&data, &scales, zps(g).as_deref(), width, rows, bs)
                    .expect("layout fits");
                // [width, rows] → the [rows, width] table.
                let table: Vec<f32> = (0..rows * width)
                    .map(|j| w[(j % width) * rows + j / width])
                    .collect();
                gathers += 1;
                g.nodes[i].op_type = "Gather".into();
                g.nodes[i].inputs = vec![format!("{codes}_table"), node.inputs[1].clone()];
                (
                    format!("{codes}_table"),
                    vec![rows as i64, width as i64],
                    table,
                )
            }
            "MatMulNBits" => {
                let (k, n, bs) = (
                    int_attr(&node, "K"),
                    int_attr(&node, "N"),
                    int_attr(&node, "block_size"),
                );
                let data = initializer_bytes(g, &node.inputs[1]);
                let scales = floats(&initializer_bytes(g, &node.inputs[2]));
                let w =
                    dequantize(&data, &scales, zps(g).as_deref(), k, n, bs).expect("layout fits");
                matmuls += 1;
                let name = format!("{}_weight", node.name);
                g.nodes[i].op_type = "MatMul".into();
                g.nodes[i].inputs = vec![node.inputs[0].clone(), name.clone()];
                (name, vec![k as i64, n as i64], w)
            }
            _ => continue,
        };
        g.nodes[i].domain.clear();
        g.nodes[i].attrs.clear();
        if !g.initializers.iter().any(|t| t.name == name) {
            g.initializers.push(ferry_ir::Initializer {
                name,
                dtype: ferry_ir::DType::F32,
                dims,
                data: ferry_ir::TensorData::from_f32(&values),
            });
        }
    }
    (gathers, matmuls)
}

/// `GatherBlockQuantized` (and the tied LM head's `MatMulNBits` over the same codes) compute
/// in ONNX Runtime exactly what float ops over the dequantized table compute: the rows are
/// `(code − zero point) · scale` with MatMulNBits' packing. Tied (qwen2, LM head shares the
/// codes through a Reshape) and untied (llama) tables, blocks 16/32 and 128 (one padded
/// block: the gathered rows are sliced), symmetric and with zero points; measured 0.
#[test]
fn gather_block_quantized_equals_gather_of_the_dequantized_table() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (case, tied) in [("qwen2-tiny-tied", 1), ("llama-tiny-gqa-bias", 0)] {
        let src = dir.path().join(format!("{case}.onnx"));
        let o = export(
            &testdata(case),
            &src,
            &["--task", "text-generation-with-past"],
        );
        assert!(o.status.success(), "{}", stderr(&o));
        let mut reference = None;
        for (bs, symmetric) in [(16, false), (32, true), (128, false)] {
            let q = dir.path().join(format!("{case}-{bs}-{symmetric}-q.onnx"));
            let fq = dir.path().join(format!("{case}-{bs}-{symmetric}-fq.onnx"));
            rewrite(&src, &q, |g| {
                let s = quantize_gathers(g, &int4(bs, symmetric)).expect("gather4");
                assert_eq!((s.gathers, s.tied_matmuls), (1, tied), "{case}");
                quantize_int4(g, &int4(bs, symmetric))
                    .expect("int4")
                    .to_string()
            });
            rewrite(&q, &fq, |g| {
                let (gathers, matmuls) = dequantize_graph(g);
                assert_eq!(gathers, 1);
                assert!(matmuls > 0);
                String::new()
            });
            let inputs = reference.get_or_insert_with(|| {
                let config: serde_json::Value = serde_json::from_str(
                    &std::fs::read_to_string(testdata(case).join("config.json"))
                        .expect("config.json"),
                )
                .expect("config.json is JSON");
                let spec = ferry_verifier::DummySpec {
                    batch: 2,
                    sequence_lengths: vec![3],
                    vocab_size: config["vocab_size"].as_i64().expect("vocab_size"),
                    type_vocab_size: 1,
                };
                let m = ferry_verifier::Model::load(&q, 2).expect("load int4 model");
                ferry_verifier::dummy_inputs(&m, &spec, 3)
            });
            assert_dequantized_equal(
                &format!(
                    "{case} b{bs} sym {symmetric}: int4 ops vs float ops over dequantized weights"
                ),
                &q,
                &fq,
                inputs,
            );
        }
    }
}

/// A copy of testdata `case` (config, generation config, weights) to edit.
fn checkpoint_copy(case: &str, dir: &Path) -> PathBuf {
    let out = dir.join(case);
    std::fs::create_dir_all(&out).expect("mkdir");
    for f in std::fs::read_dir(testdata(case))
        .expect("case dir")
        .flatten()
    {
        std::fs::copy(f.path(), out.join(f.file_name())).expect("copy");
    }
    out
}

fn files_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

fn genai_json(folder: &Path) -> serde_json::Value {
    serde_json::from_str(
        &std::fs::read_to_string(folder.join("genai_config.json")).expect("genai_config.json"),
    )
    .expect("genai_config.json is JSON")
}

/// The folder holds only the model, `genai_config.json` and the tokenizer files; the config
/// describes the model's own inputs and outputs; int4 folders carry MatMulNBits for every
/// projection and the LM head and GatherBlockQuantized for the embedding.
#[test]
fn genai_folder_holds_model_config_and_tokenizer() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let ck = checkpoint_copy("qwen2-tiny-tied", tmp.path());
    std::fs::write(ck.join("tokenizer.json"), r#"{"added_tokens":[]}"#).expect("write");
    std::fs::write(ck.join("tokenizer_config.json"), "{}").expect("write");
    for quantize in [None, Some("int4")] {
        let folder = tmp
            .path()
            .join(format!("out-{}", quantize.unwrap_or("fp32")));
        let out = folder.join("model.onnx");
        let mut flags = vec!["--genai"];
        if let Some(q) = quantize {
            flags.extend(["--quantize", q]);
        }
        let o = export(&ck, &out, &flags);
        assert!(o.status.success(), "{}", stderr(&o));
        assert_eq!(
            files_in(&folder),
            [
                "genai_config.json",
                "model.onnx",
                "tokenizer.json",
                "tokenizer_config.json"
            ]
        );
        let c = genai_json(&folder);
        let graph = ferry_onnx::read_model(&out).expect("read").graph;
        let count = |op: &str| graph.nodes.iter().filter(|n| n.op_type == op).count();
        let m = &c["model"];
        assert_eq!(m["type"], "qwen2");
        assert_eq!(m["vocab_size"], 96);
        assert_eq!(m["context_length"], 64);
        assert_eq!(
            (
                m["bos_token_id"].clone(),
                m["eos_token_id"].clone(),
                m["pad_token_id"].clone()
            ),
            (1.into(), 2.into(), 0.into())
        );
        let d = &m["decoder"];
        assert_eq!(d["filename"], "model.onnx");
        assert_eq!(
            (d["head_size"].clone(), d["hidden_size"].clone()),
            (8.into(), 32.into())
        );
        assert_eq!(
            (
                d["num_attention_heads"].clone(),
                d["num_key_value_heads"].clone(),
                d["num_hidden_layers"].clone()
            ),
            (4.into(), 2.into(), 2.into())
        );
        assert_eq!(d["inputs"]["past_key_names"], "past_key_values.%d.key");
        assert_eq!(d["outputs"]["present_value_names"], "present.%d.value");
        let has_positions = graph.inputs.iter().any(|v| v.name == "position_ids");
        assert_eq!(d["inputs"].get("position_ids").is_some(), has_positions);
        // A shared full-context cache buffer only for GroupQueryAttention without a bias
        // computed from the cache's length (onnxruntime-genai runs both forms in
        // testdata/verify_genai.py).
        let biased = graph.nodes.iter().any(|n| {
            n.op_type == "GroupQueryAttention" && n.inputs.get(10).is_some_and(|b| !b.is_empty())
        });
        assert_eq!(
            c["search"]["past_present_share_buffer"],
            count("GroupQueryAttention") > 0 && !biased
        );
        assert_eq!(c["search"]["do_sample"], false);
        assert_eq!(c["search"]["max_length"], 64);
        if quantize.is_some() {
            assert_eq!(count("GatherBlockQuantized"), 1);
            assert!(
                !graph
                    .nodes
                    .iter()
                    .any(|n| n.op_type == "Gather" && n.inputs.iter().any(|i| i == "input_ids")),
                "the embedding lookup is GatherBlockQuantized"
            );
            let weight_matmuls = graph
                .nodes
                .iter()
                .filter(|n| {
                    n.op_type == "MatMul"
                        && graph
                            .initializers
                            .iter()
                            .any(|t| n.inputs.get(1) == Some(&t.name))
                })
                .count();
            assert_eq!(weight_matmuls, 0, "every projection is MatMulNBits");
            let lm_head = graph
                .nodes
                .iter()
                .find(|n| n.name.contains("lm_head") && n.op_type.starts_with("MatMul"))
                .expect("lm head");
            assert!(
                graph
                    .nodes
                    .iter()
                    .any(|n| n.op_type == "MatMulNBits" && n.name == lm_head.name),
                "LM head {} is MatMulNBits",
                lm_head.name
            );
            let nbits = graph
                .nodes
                .iter()
                .find(|n| n.op_type == "MatMulNBits")
                .expect("nbits");
            assert_eq!(int_attr(nbits, "block_size"), 32);
            assert_eq!(int_attr(nbits, "accuracy_level"), 4);
            assert_eq!(nbits.inputs.len(), 3, "symmetric: no zero points");
        }
    }
}

/// Bad input: one line, non-zero exit, and no folder or file left behind, including when
/// the failure comes after the model was written (no eos id for genai_config.json).
#[test]
fn genai_bad_input_is_one_line_and_leaves_nothing() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let no_eos = checkpoint_copy("qwen2-tiny-tied", tmp.path());
    std::fs::remove_file(no_eos.join("generation_config.json")).expect("rm");
    let cfg = std::fs::read_to_string(no_eos.join("config.json")).expect("config");
    let mut v: serde_json::Value = serde_json::from_str(&cfg).expect("json");
    v.as_object_mut().expect("object").remove("eos_token_id");
    std::fs::write(no_eos.join("config.json"), v.to_string()).expect("write");
    let a_file = tmp.path().join("a-file");
    std::fs::write(&a_file, "x").expect("write");
    let qwen = testdata("qwen2-tiny-tied");
    let cases: Vec<(PathBuf, PathBuf, Vec<&str>, &str)> = vec![
        (
            testdata("bert-tiny-gelu"),
            tmp.path().join("b/model.onnx"),
            vec![],
            "`bert` is not one",
        ),
        (
            qwen.clone(),
            tmp.path().join("c/qwen.onnx"),
            vec![],
            "OUTPUT must be DIR/model.onnx",
        ),
        (
            qwen.clone(),
            a_file.join("model.onnx"),
            vec![],
            "is not a directory",
        ),
        (
            qwen.clone(),
            tmp.path().join("d/model.onnx"),
            vec!["--quantize", "int8"],
            "int8 is not offered",
        ),
        (
            qwen.clone(),
            tmp.path().join("e/model.onnx"),
            vec!["--task", "text-generation"],
            "drop --task",
        ),
        (
            qwen.clone(),
            tmp.path().join("f/model.onnx"),
            vec!["--check"],
            "--check",
        ),
        (
            qwen.clone(),
            tmp.path().join("g/model.onnx"),
            vec!["--format", "torchscript"],
            "torchscript",
        ),
        (
            no_eos,
            tmp.path().join("h/model.onnx"),
            vec![],
            "eos_token_id",
        ),
    ];
    let before = files_in(tmp.path());
    for (model, out, extra, want) in cases {
        let mut flags = vec!["--genai"];
        flags.extend(extra.iter().copied());
        let o = export(&model, &out, &flags);
        let err = stderr(&o);
        assert!(!o.status.success(), "{}: succeeded", out.display());
        let last = err.trim().lines().last().unwrap_or_default();
        assert!(
            last.contains(want),
            "{}: want `{want}` in {err}",
            out.display()
        );
        assert_eq!(files_in(tmp.path()), before, "{} left files", out.display());
    }
    // An existing folder keeps its other files when a run fails inside it.
    let keep = tmp.path().join("keep");
    std::fs::create_dir(&keep).expect("mkdir");
    std::fs::write(keep.join("notes.txt"), "mine").expect("write");
    let o = export(
        &tmp.path().join("qwen2-tiny-tied"),
        &keep.join("model.onnx"),
        &["--genai"],
    );
    assert!(!o.status.success());
    assert_eq!(files_in(&keep), ["notes.txt"]);
}

/// Without generation_config.json the ids and search defaults come from config.json, as the
/// model builder falls back.
#[test]
fn genai_without_generation_config_uses_config() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let ck = checkpoint_copy("llama-tiny-gqa-bias", tmp.path());
    std::fs::remove_file(ck.join("generation_config.json")).expect("rm");
    let folder = tmp.path().join("out");
    let o = export(&ck, &folder.join("model.onnx"), &["--genai", "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let printed = stdout_json(&o);
    let c = genai_json(&folder);
    assert_eq!(printed["genai_config"], c);
    assert_eq!(c["model"]["type"], "llama");
    assert_eq!(c["model"]["eos_token_id"], 2);
    assert_eq!(c["model"]["pad_token_id"], 0);
    assert_eq!(c["search"]["top_k"], 50);
    assert_eq!(files_in(&folder), ["genai_config.json", "model.onnx"]);
}

/// `--quantize` still takes OUTPUT right after it (int8, as before modes existed), and an
/// unknown mode is an error.
#[test]
fn quantize_mode_and_output_parse() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let out = tmp.path().join("m.onnx");
    let o = run(ferry()
        .args(["export", "--model"])
        .arg(testdata("qwen2-tiny-tied"))
        .args(["--task", "text-generation", "--quantize"])
        .arg(&out));
    assert!(o.status.success(), "{}", stderr(&o));
    let q = ferry_onnx::read_model(&tmp.path().join("m-quantized.onnx"))
        .expect("int8 model")
        .graph;
    assert!(q.nodes.iter().any(|n| n.op_type == "MatMulInteger"));
    let o = export(
        &testdata("qwen2-tiny-tied"),
        &tmp.path().join("n.onnx"),
        &["--quantize", "int3"],
    );
    assert!(!o.status.success());
    assert!(stderr(&o).contains("unknown mode `int3`"), "{}", stderr(&o));
}

/// `ferry quantize --mode int4` on decoder exports in float32 and in bfloat16 (weights cast
/// to float where used): every projection and the tied LM head become MatMulNBits, the
/// embedding GatherBlockQuantized, no float weight is left behind a MatMul, and the model
/// runs in ONNX Runtime with the cache.
#[test]
fn int4_quantizes_every_decoder_weight_in_float32_and_bfloat16() {
    let tmp = tempfile::tempdir().expect("tempdir");
    for dtype in ["fp32", "bf16"] {
        let src = tmp.path().join(format!("{dtype}.onnx"));
        let o = export(
            &testdata("qwen2-tiny-tied"),
            &src,
            &["--task", "text-generation-with-past", "--dtype", dtype],
        );
        assert!(o.status.success(), "{}", stderr(&o));
        let q = tmp.path().join(format!("{dtype}-q.onnx"));
        let o = run(ferry()
            .args([
                "quantize",
                "--mode",
                "int4",
                "--block-size",
                "32",
                "--no-report",
            ])
            .arg(&src)
            .arg(&q));
        assert!(o.status.success(), "{}", stderr(&o));
        let g = ferry_onnx::read_model(&q).expect("read").graph;
        let count = |op: &str| g.nodes.iter().filter(|n| n.op_type == op).count();
        // 2 layers × (q, k, v, o, gate, up, down) + the LM head.
        assert_eq!(count("MatMulNBits"), 15, "{dtype}");
        assert_eq!(count("GatherBlockQuantized"), 1, "{dtype}");
        let producers: std::collections::HashMap<&str, &ferry_ir::Node> = g
            .nodes
            .iter()
            .flat_map(|n| n.outputs.iter().map(move |o| (o.as_str(), n)))
            .collect();
        for n in g.nodes.iter().filter(|n| n.op_type == "MatMul") {
            let mut b = n.inputs[1].as_str();
            while let Some(p) = producers
                .get(b)
                .filter(|p| matches!(p.op_type.as_str(), "Transpose" | "Cast"))
            {
                b = p.inputs[0].as_str();
            }
            assert!(
                !g.initializers.iter().any(|t| t.name == b),
                "{dtype}: {} still reads weight {b}",
                n.name
            );
        }
        let config: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(testdata("qwen2-tiny-tied").join("config.json"))
                .expect("config"),
        )
        .expect("json");
        let mut m = ferry_verifier::Model::load(&q, 2).expect("load int4 model");
        let spec = ferry_verifier::DummySpec {
            batch: 2,
            sequence_lengths: vec![3],
            vocab_size: config["vocab_size"].as_i64().expect("vocab"),
            type_vocab_size: 1,
        };
        let inputs = ferry_verifier::dummy_inputs(&m, &spec, 3);
        let out = m.run_inputs(&inputs).expect("runs");
        assert!(out.keys().any(|k| k == "logits"), "{dtype}");
    }
}
