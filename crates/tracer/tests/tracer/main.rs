//! Tracer tests: graph structure of a traced tiny BERT; the encoder-decoders (`t5`, `bart`)
//! traced part by part against transformers.

mod bart;
mod seq2seq_common;
mod t5;

use std::path::Path;

use ferry_ir::{Dim, TensorData};
use ferry_tracer::{TraceError, TraceOptions, trace};

fn tiny() -> ferry_loader::Checkpoint {
    ferry_loader::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../../testdata/bert-tiny-gelu"))
        .expect("load")
}

fn opts(opset: i64) -> TraceOptions {
    TraceOptions {
        opset,
        ..Default::default()
    }
}

#[test]
fn bert_graph_structure() {
    let c = tiny();
    let g = trace(&c.config, &c.weights, &opts(17)).expect("trace");
    let inputs: Vec<&str> = g.inputs.iter().map(|v| v.name.as_str()).collect();
    assert_eq!(inputs, ["input_ids", "attention_mask", "token_type_ids"]);
    assert_eq!(
        g.inputs[0].shape,
        Some(vec![Dim::sym("batch_size"), Dim::sym("sequence_length")])
    );
    let outputs: Vec<&str> = g.outputs.iter().map(|v| v.name.as_str()).collect();
    assert_eq!(outputs, ["last_hidden_state", "pooler_output"]);
    assert_eq!(
        g.outputs[0].shape,
        Some(vec![
            Dim::sym("batch_size"),
            Dim::sym("sequence_length"),
            Dim::Fixed(32)
        ])
    );
    assert!(
        g.nodes
            .iter()
            .any(|n| n.name == "/encoder/layer.0/attention/self/query/MatMul")
    );
    assert!(
        g.nodes
            .iter()
            .any(|n| n.name == "/encoder/layer.1/output/LayerNorm/LayerNormalization")
    );
    let counts = g.op_counts();
    assert_eq!(
        counts.get("LayerNormalization"),
        Some(&5),
        "embeddings + 2 per layer"
    );
    assert_eq!(counts.get("Erf"), Some(&2), "one gelu per layer");
    assert_eq!(counts.get("Softmax"), Some(&2));
    // Weights are referenced, not copied.
    assert!(
        g.initializers
            .iter()
            .all(|i| matches!(i.data, TensorData::Mapped { .. }))
    );
    assert_eq!(g.parameter_count(), 19242);
}

#[test]
fn fill_mask_ties_decoder_to_word_embeddings() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../testdata/bert-tiny-fill-mask");
    let c = ferry_loader::load(&dir).expect("load");
    assert_eq!(ferry_tracer::infer_task(&c.config), "fill-mask");
    let mut o = opts(17);
    o.task = "fill-mask".into();
    let g = trace(&c.config, &c.weights, &o).expect("trace");
    let n = g
        .initializers
        .iter()
        .filter(|i| i.name == "embeddings.word_embeddings.weight")
        .count();
    assert_eq!(n, 1, "the tied matrix is stored once");
    let users = g
        .nodes
        .iter()
        .filter(|n| {
            n.inputs
                .iter()
                .any(|i| i == "embeddings.word_embeddings.weight")
        })
        .count();
    assert_eq!(users, 2, "embedding Gather and decoder Transpose share it");
}

#[test]
fn opset_14_decomposes_layer_norm() {
    let c = tiny();
    let g = trace(&c.config, &c.weights, &opts(14)).expect("trace");
    let counts = g.op_counts();
    assert_eq!(counts.get("LayerNormalization"), None);
    assert_eq!(counts.get("ReduceMean"), Some(&10));
    assert_eq!(counts.get("Sqrt"), Some(&5));
}

#[test]
fn task_and_architecture_errors() {
    let c = tiny();
    let mut o = opts(17);
    o.task = "text-generation".into();
    assert!(matches!(
        trace(&c.config, &c.weights, &o),
        Err(TraceError::UnsupportedTask { .. })
    ));
    o.task = "question-answering".into();
    assert!(matches!(
        trace(&c.config, &c.weights, &o),
        Err(TraceError::MissingHeadWeight { .. })
    ));
    let mut cfg = c.config.clone();
    cfg.hidden_act = Some("mish".into());
    let e = trace(&cfg, &c.weights, &opts(17)).expect_err("activation");
    assert!(e.to_string().contains("hidden_act `mish`"), "{e}");
    let mut cfg = c.config.clone();
    cfg.num_attention_heads = Some(5);
    let e = trace(&cfg, &c.weights, &opts(17)).expect_err("heads");
    assert!(e.to_string().contains("not a multiple"), "{e}");
}
