//! Writer tests: the streamed file decodes as the ModelProto the graph describes, inline and
//! with external data, and failures leave no file behind.

use std::collections::BTreeMap;

use ferry_ir::{Attr, DType, Dim, Graph, Initializer, Node, OpsetImport, TensorData, Value};
use ferry_onnx::proto::{data_location, data_type};
use ferry_onnx::{ExternalData, WriteOptions, read_model_proto, write_model};

fn graph(opset: i64, weight: Vec<f32>) -> Graph {
    let n = weight.len() as i64;
    Graph {
        name: "g".into(),
        inputs: vec![Value::new(
            "x",
            DType::F32,
            vec![Dim::sym("batch_size"), Dim::Fixed(n)],
        )],
        outputs: vec![Value::new(
            "y",
            DType::F32,
            vec![Dim::sym("batch_size"), Dim::Fixed(n)],
        )],
        nodes: vec![Node {
            name: "/Add".into(),
            op_type: "Add".into(),
            domain: String::new(),
            inputs: vec!["x".into(), "w".into()],
            outputs: vec!["y".into()],
            attrs: BTreeMap::from([("note".to_string(), Attr::Ints(vec![1, 2]))]),
        }],
        initializers: vec![Initializer {
            name: "w".into(),
            dtype: DType::F32,
            dims: vec![n],
            data: TensorData::from_f32(&weight),
        }],
        value_info: vec![],
        opsets: vec![OpsetImport {
            domain: String::new(),
            version: opset,
        }],
    }
}

#[test]
fn inline_model_decodes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("m.onnx");
    let g = graph(17, vec![1.0, 2.0, 3.0]);
    let r = write_model(&g, &out, &WriteOptions::default()).expect("write");
    assert_eq!(r.ir_version, 8);
    assert!(r.data_path.is_none());
    let m = read_model_proto(&out).expect("decode");
    assert_eq!(m.ir_version, 8);
    assert_eq!(m.producer_name, "ferry");
    assert_eq!(m.opset_import[0].version, 17);
    let gp = m.graph.expect("graph");
    assert_eq!(gp.node[0].op_type, "Add");
    assert_eq!(gp.node[0].attribute[0].ints, vec![1, 2]);
    assert_eq!(gp.input[0].name, "x");
    let t = &gp.initializer[0];
    assert_eq!(t.name, "w");
    assert_eq!(t.data_type, data_type::FLOAT);
    assert_eq!(t.dims, vec![3]);
    let vals: Vec<f32> = t
        .raw_data
        .chunks(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    assert_eq!(vals, vec![1.0, 2.0, 3.0]);
    let names: Vec<String> = std::fs::read_dir(dir.path())
        .expect("ls")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, vec!["m.onnx".to_string()], "no temporary files left");
}

#[test]
fn external_data_goes_to_one_side_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("m.onnx");
    let weight: Vec<f32> = (0..1000).map(|i| i as f32).collect();
    let g = graph(14, weight.clone());
    let opts = WriteOptions {
        external_data: ExternalData::Always,
        ..Default::default()
    };
    let r = write_model(&g, &out, &opts).expect("write");
    assert_eq!(r.ir_version, 7);
    let data = r.data_path.expect("side file");
    assert_eq!(data, dir.path().join("m.onnx_data"));
    let m = read_model_proto(&out).expect("decode");
    let t = &m.graph.expect("graph").initializer[0];
    assert!(t.raw_data.is_empty());
    assert_eq!(t.data_location, data_location::EXTERNAL);
    let kv: BTreeMap<_, _> = t
        .external_data
        .iter()
        .map(|e| (e.key.as_str(), e.value.clone()))
        .collect();
    assert_eq!(kv["location"], "m.onnx_data");
    let off: usize = kv["offset"].parse().expect("offset");
    let len: usize = kv["length"].parse().expect("length");
    assert_eq!(len, 4000);
    let bytes = std::fs::read(&data).expect("read side file");
    let got: Vec<f32> = bytes[off..off + len]
        .chunks(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    assert_eq!(got, weight);
}

#[test]
fn failures_leave_no_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Tensor whose bytes disagree with its shape.
    let mut g = graph(17, vec![1.0, 2.0]);
    g.initializers[0].dims = vec![3];
    let out = dir.path().join("bad.onnx");
    let e = write_model(&g, &out, &WriteOptions::default()).expect_err("size mismatch");
    assert!(e.to_string().contains("tensor `w` has 8 bytes"), "{e}");
    // Unsupported opset.
    let e = write_model(&graph(8, vec![1.0]), &out, &WriteOptions::default()).expect_err("opset");
    assert!(e.to_string().contains("opset 8 is not supported"), "{e}");
    // Missing directory.
    let e = write_model(
        &graph(17, vec![1.0]),
        &dir.path().join("no/x.onnx"),
        &WriteOptions::default(),
    )
    .expect_err("dir");
    assert!(e.to_string().contains("does not exist"), "{e}");
    // A lazy tensor whose read fails mid-write.
    let mut g = graph(17, vec![1.0]);
    g.initializers[0].data = TensorData::Lazy {
        len: 4,
        read: std::sync::Arc::new(|| Err(std::io::Error::other("disk on fire"))),
    };
    let e = write_model(&g, &out, &WriteOptions::default()).expect_err("read failure");
    assert!(e.to_string().contains("disk on fire"), "{e}");
    assert_eq!(
        std::fs::read_dir(dir.path()).expect("ls").count(),
        0,
        "nothing left behind"
    );
}

/// burn interop: every plain export of every golden checkpoint parses in burn's `onnx-ir`
/// (`OnnxGraphBuilder`), which refuses graphs with operators it does not support.
#[test]
fn every_golden_export_parses_in_burn_onnx_ir() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../testdata");
    let mut cases: Vec<std::path::PathBuf> = std::fs::read_dir(&root)
        .expect("testdata")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.join("config.json").is_file() && p.join("case.json").is_file())
        .collect();
    cases.sort();
    assert!(!cases.is_empty());
    let dir = tempfile::tempdir().expect("tempdir");
    for case in cases {
        let meta: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(case.join("case.json")).expect("case"))
                .expect("json");
        let task = meta["task"]
            .as_str()
            .unwrap_or("feature-extraction")
            .to_string();
        let ck = ferry_loader::load(&case).expect("load");
        for opset in [14, 17] {
            let opts = ferry_tracer::TraceOptions {
                task: task.clone(),
                opset,
                ..Default::default()
            };
            // Half-precision goldens export as float32, as `ferry export` does by default.
            let weights = ck.weights.upcast_to_f32();
            // An encoder-decoder's folder: each of its plain files (the merged decoder's
            // `If` is left to ONNX Runtime).
            let graphs = match ferry_tracer::Seq2SeqPart::for_task(&task)
                .filter(|_| ferry_tracer::is_encoder_decoder(&ck.config.model_type))
            {
                Some(parts) => parts
                    .iter()
                    .map(|&part| {
                        ferry_tracer::trace_seq2seq(&ck.config, &weights, &opts, part)
                            .expect("trace")
                    })
                    .collect(),
                None => vec![ferry_tracer::trace(&ck.config, &weights, &opts).expect("trace")],
            };
            for (k, g) in graphs.iter().enumerate() {
                let out = dir.path().join(format!("m{opset}-{k}.onnx"));
                write_model(g, &out, &WriteOptions::default()).expect("write");
                let parsed = onnx_ir::OnnxGraphBuilder::new().parse_file(&out);
                assert!(
                    parsed.is_ok(),
                    "{} ({task}, opset {opset}, file {k}) does not parse in burn onnx-ir: {:?}",
                    case.display(),
                    parsed.err()
                );
            }
        }
    }
}

/// `WriteOptions::metadata` lands in `ModelProto.metadata_props`, in order, and
/// `read_metadata` finds it without decoding the graph, inline or with external data.
#[test]
fn metadata_props_round_trip() {
    let dir = tempfile::tempdir().expect("tempdir");
    let weight: Vec<f32> = (0..2000).map(|i| i as f32).collect();
    let metadata = vec![
        ("ferry.task".to_string(), "fill-mask".to_string()),
        (
            "ferry.id2label".to_string(),
            r#"{"0":"négatif"}"#.to_string(),
        ),
    ];
    for external in [ExternalData::Auto, ExternalData::Always] {
        let out = dir.path().join("meta.onnx");
        let opts = WriteOptions {
            external_data: external,
            metadata: metadata.clone(),
            ..Default::default()
        };
        write_model(&graph(17, weight.clone()), &out, &opts).expect("write");
        let m = read_model_proto(&out).expect("decode");
        let props: Vec<(String, String)> = m
            .metadata_props
            .iter()
            .map(|e| (e.key.clone(), e.value.clone()))
            .collect();
        assert_eq!(props, metadata);
        assert_eq!(m.graph.expect("graph").node[0].op_type, "Add");
        assert_eq!(ferry_onnx::read_metadata(&out).expect("metadata"), metadata);
    }
    let plain = dir.path().join("plain.onnx");
    write_model(&graph(17, vec![1.0]), &plain, &WriteOptions::default()).expect("write");
    assert!(
        ferry_onnx::read_metadata(&plain)
            .expect("metadata")
            .is_empty()
    );
    let junk = dir.path().join("junk.onnx");
    std::fs::write(&junk, [0xffu8; 16]).expect("write");
    assert!(ferry_onnx::read_metadata(&junk).is_err());
}

/// Traces one golden checkpoint of testdata at `opset`.
fn trace_golden(case: &str, opset: i64) -> Graph {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../testdata")
        .join(case);
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("case.json")).expect("case"))
            .expect("json");
    let task = meta["task"]
        .as_str()
        .unwrap_or("feature-extraction")
        .to_string();
    let ck = ferry_loader::load(&dir).expect("load");
    let opts = ferry_tracer::TraceOptions {
        task,
        opset,
        ..Default::default()
    };
    ferry_tracer::trace(&ck.config, &ck.weights, &opts).expect("trace")
}

/// ONNX → IR → ONNX: golden exports read back with `read_model` (weights mapped, not
/// copied) and written again decode to the same `ModelProto`, inline and with external
/// data, and the model-level fields survive.
#[test]
fn read_graph_round_trips_golden_exports() {
    use ferry_onnx::read_model;
    let dir = tempfile::tempdir().expect("tempdir");
    let (a_dir, b_dir) = (dir.path().join("a"), dir.path().join("b"));
    std::fs::create_dir_all(&a_dir).expect("mkdir");
    std::fs::create_dir_all(&b_dir).expect("mkdir");
    let cases = [
        ("bert-tiny-gelu", 17),
        ("bert-tiny-tanh-bin", 14),
        ("gpt2-tiny-text-generation-with-past", 17),
        ("distilbert-tiny-question-answering", 21),
        ("albert-tiny-fill-mask", 17),
        ("mpnet-tiny-feature-extraction", 14),
    ];
    for (case, opset) in cases {
        let g = trace_golden(case, opset);
        for external in [ExternalData::Auto, ExternalData::Always] {
            let what = format!("{case} (opset {opset}, {external:?})");
            // The same file name in both directories, so external-data locations agree.
            let (a, b) = (a_dir.join("m.onnx"), b_dir.join("m.onnx"));
            let opts = WriteOptions {
                external_data: external,
                doc_string: format!("exported from {case}"),
                metadata: vec![("ferry.task".into(), "x".into()), ("k".into(), "v".into())],
                ..Default::default()
            };
            write_model(&g, &a, &opts).expect("write a");
            let m = read_model(&a).expect("read_model");
            assert_eq!(m.info.producer_name, "ferry", "{what}");
            assert_eq!(m.info.doc_string, opts.doc_string, "{what}");
            assert_eq!(m.info.metadata, opts.metadata, "{what}");
            assert_eq!(m.graph.nodes.len(), g.nodes.len(), "{what}");
            assert_eq!(m.graph.op_counts(), g.op_counts(), "{what}");
            assert_eq!(m.graph.inputs, g.inputs, "{what}");
            assert_eq!(m.graph.outputs, g.outputs, "{what}");
            assert_eq!(m.graph.opsets, g.opsets, "{what}");
            // Every initializer's bytes are a range of the model (or side) file.
            for init in &m.graph.initializers {
                assert!(
                    matches!(init.data, TensorData::Mapped { .. }),
                    "{what}: `{}` is {:?}",
                    init.name,
                    init.data
                );
            }
            let again = WriteOptions {
                external_data: external,
                doc_string: m.info.doc_string.clone(),
                metadata: m.info.metadata.clone(),
                ..Default::default()
            };
            write_model(&m.graph, &b, &again).expect("write b");
            let (pa, pb) = (
                read_model_proto(&a).expect("decode a"),
                read_model_proto(&b).expect("decode b"),
            );
            assert!(pa == pb, "{what}: re-written model differs");
            if external == ExternalData::Always {
                let side = |p: &std::path::Path| {
                    std::fs::read(p.with_file_name("m.onnx_data")).expect("side file")
                };
                assert!(side(&a) == side(&b), "{what}: side files differ");
            }
            // The graph read back is dropped before the files it maps are replaced.
            drop(m);
        }
    }
}

/// Broken files and unsafe external-data locations are errors, not panics.
#[test]
fn read_graph_rejects_bad_files() {
    use ferry_onnx::proto::{AttributeProto, GraphProto, ModelProto, NodeProto, attribute_type};
    use ferry_onnx::{ReadError, read_graph};
    use prost::Message;

    let dir = tempfile::tempdir().expect("tempdir");
    let p = |n: &str| dir.path().join(n);
    let weight: Vec<f32> = (0..1000).map(|i| i as f32).collect();
    let good = p("good.onnx");
    write_model(&graph(17, weight.clone()), &good, &WriteOptions::default()).expect("write");
    let g = read_graph(&good).expect("good model reads");
    assert_eq!(g.initializers[0].data.to_f32_vec().expect("f32"), weight);
    assert!(matches!(g.nodes[0].attr("note"), Some(Attr::Ints(v)) if v == &[1, 2]));

    // Garbage, empty and truncated files.
    std::fs::write(p("junk.onnx"), [0xffu8; 64]).expect("write");
    std::fs::write(p("empty.onnx"), []).expect("write");
    let bytes = std::fs::read(&good).expect("read");
    for cut in [1, 10, bytes.len() / 2, bytes.len() - 1] {
        std::fs::write(p("cut.onnx"), &bytes[..cut]).expect("write");
        assert!(read_graph(&p("cut.onnx")).is_err(), "cut at {cut}");
    }
    assert!(read_graph(&p("junk.onnx")).is_err());
    assert!(read_graph(&p("empty.onnx")).is_err());
    assert!(matches!(
        read_graph(&p("missing.onnx")),
        Err(ReadError::Io { .. })
    ));

    // External data: locations leaving the directory, and ranges past the side file's end.
    let ext = p("ext.onnx");
    let opts = WriteOptions {
        external_data: ExternalData::Always,
        ..Default::default()
    };
    write_model(&graph(17, weight.clone()), &ext, &opts).expect("write");
    let g = read_graph(&ext).expect("external model reads");
    assert_eq!(g.initializers[0].data.to_f32_vec().expect("f32"), weight);
    let with_entry = |key: &str, value: &str| {
        let mut m = read_model_proto(&ext).expect("decode");
        let t = &mut m.graph.as_mut().expect("graph").initializer[0];
        for e in &mut t.external_data {
            if e.key == key {
                e.value = value.into();
            }
        }
        let out = p("edited.onnx");
        std::fs::write(&out, m.encode_to_vec()).expect("write");
        read_graph(&out)
    };
    for loc in ["../x", "/etc/passwd", "a/../../x", ""] {
        let e = with_entry("location", loc).expect_err(loc);
        assert!(
            e.to_string().contains("outside") || e.to_string().contains("not a file inside"),
            "{loc}: {e}"
        );
    }
    let e = with_entry("offset", "4000000").expect_err("offset");
    assert!(e.to_string().contains("runs past the end"), "{e}");
    let e = with_entry("length", "nope").expect_err("length");
    assert!(e.to_string().contains("not a number"), "{e}");

    // An attribute kind the IR does not hold (a sparse tensor) names the node; a graph
    // attribute (an `If` branch) is read.
    let model = |kind: i32, g: Option<Box<GraphProto>>| ModelProto {
        ir_version: 8,
        graph: Some(GraphProto {
            node: vec![NodeProto {
                name: "/If".into(),
                op_type: "If".into(),
                attribute: vec![AttributeProto {
                    name: "then_branch".into(),
                    r#type: kind,
                    g,
                    ..Default::default()
                }],
                ..Default::default()
            }],
            ..Default::default()
        }),
        ..Default::default()
    };
    std::fs::write(p("if.onnx"), model(11, None).encode_to_vec()).expect("write");
    let e = read_graph(&p("if.onnx")).expect_err("sparse tensor attribute");
    assert!(
        e.to_string().contains("/If") && e.to_string().contains("then_branch"),
        "{e}"
    );
    std::fs::write(
        p("if.onnx"),
        model(attribute_type::GRAPH, Some(Box::default())).encode_to_vec(),
    )
    .expect("write");
    let g = read_graph(&p("if.onnx")).expect("graph attribute");
    assert!(matches!(
        g.nodes[0].attr("then_branch"),
        Some(ferry_ir::Attr::Graph(_))
    ));
    std::fs::write(
        p("if.onnx"),
        model(attribute_type::GRAPH, None).encode_to_vec(),
    )
    .expect("write");
    let e = read_graph(&p("if.onnx")).expect_err("graph attribute without a graph");
    assert!(e.to_string().contains("without a graph"), "{e}");
}

/// A merged decoder (`If` branches reading the outer graph's weights) is written with its
/// weights once, in the outer graph, and read back into the same structure: branches as
/// `Attr::Graph`, the with-past branch's empty stand-in a `Constant`, the parts recoverable.
#[test]
fn merged_decoder_round_trips() {
    let weight = |name: &str| Initializer {
        name: name.into(),
        dtype: DType::F32,
        dims: vec![4, 4],
        data: TensorData::from_f32(&[0.5; 16]),
    };
    let part = |inputs: &[&str], outputs: &[&str]| Graph {
        name: "part".into(),
        inputs: inputs
            .iter()
            .map(|n| Value::new(*n, DType::F32, vec![Dim::sym("batch"), 4.into()]))
            .collect(),
        outputs: outputs
            .iter()
            .map(|n| Value::new(*n, DType::F32, vec![Dim::sym("batch"), 4.into()]))
            .collect(),
        nodes: outputs
            .iter()
            .zip(inputs.iter().cycle())
            .map(|(o, i)| Node {
                name: format!("/{o}"),
                op_type: "MatMul".into(),
                domain: String::new(),
                inputs: vec![(*i).into(), "w".into()],
                outputs: vec![(*o).into()],
                attrs: BTreeMap::new(),
            })
            .collect(),
        initializers: vec![weight("w")],
        value_info: Vec::new(),
        opsets: vec![OpsetImport {
            domain: String::new(),
            version: 17,
        }],
    };
    let merged = ferry_ir::merge_decoders(
        part(&["x"], &["logits", "cross"]),
        part(&["past"], &["logits"]),
    )
    .expect("merge");
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("merged.onnx");
    write_model(&merged, &path, &WriteOptions::default()).expect("write");
    let proto = read_model_proto(&path).expect("decode");
    let g = proto.graph.expect("graph");
    assert_eq!(g.initializer.len(), 1, "the shared weight once");
    let back = ferry_onnx::read_graph(&path).expect("read");
    assert_eq!(back.nodes.len(), 1);
    let Some(Attr::Graph(then)) = back.nodes[0].attr("then_branch") else {
        panic!("then_branch is not a graph: {:?}", back.nodes[0].attrs);
    };
    assert_eq!(
        then.nodes
            .iter()
            .map(|n| n.op_type.as_str())
            .collect::<Vec<_>>(),
        ["MatMul", "Constant"]
    );
    assert!(then.initializers.is_empty());
    let (no_past, with_past) = ferry_ir::split_merged(&back).expect("merged form");
    let names = |g: &Graph| g.inputs.iter().map(|v| v.name.clone()).collect::<Vec<_>>();
    assert_eq!(names(&no_past), ["x"]);
    assert_eq!(names(&with_past), ["past"]);
    assert_eq!(names(&back), ["x", "past", "use_cache_branch"]);
    assert_eq!(no_past.initializers.len(), 1);
    assert_eq!(back.inputs.last().map(|v| v.dtype), Some(DType::Bool));
}
