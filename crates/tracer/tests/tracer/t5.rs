//! T5 and mT5 against transformers: every `"kind": "seq2seq"` testdata case of those model
//! types traced part by part, written by ferry-onnx at opsets 14, 17 and 21 with dynamic
//! and with fixed batch/encoder axes, run in ONNX Runtime (encoder on the right-padded
//! batch, uncached decoder on the 4-token prefix, three cached steps fed the presents).

use crate::seq2seq_common::{cases, run_case};
use ferry_tracer::{Seq2SeqPart, TraceError, TraceOptions, trace_seq2seq};

const TOLERANCE: f32 = 1e-5;

#[test]
fn t5_family_matches_transformers_step_by_step() {
    let cases = cases(&["t5", "mt5"]);
    assert!(cases.len() >= 2, "t5/mt5 seq2seq cases missing: {cases:?}");
    let mut bad = Vec::new();
    for case in &cases {
        for opset in [14, 17, 21] {
            for fixed in [false, true] {
                let opts = TraceOptions {
                    opset,
                    fixed_dims: if fixed {
                        [
                            ("batch_size".to_string(), 2),
                            ("encoder_sequence_length".to_string(), 9),
                        ]
                        .into()
                    } else {
                        Default::default()
                    },
                    ..Default::default()
                };
                let diffs = run_case(case, &opts);
                eprintln!("{} opset {opset} fixed {fixed}: {diffs:?}", case.display());
                for (what, d) in diffs {
                    if d > TOLERANCE {
                        bad.push(format!(
                            "{} opset {opset} fixed {fixed}: {what} max abs {d}",
                            case.display()
                        ));
                    }
                }
            }
        }
    }
    assert!(bad.is_empty(), "{}", bad.join("\n"));
}

/// A graph value as the recorded optimum signature lists it: name, ONNX element type,
/// dims (numbers fixed, strings symbolic).
fn signature(values: &[ferry_ir::Value]) -> serde_json::Value {
    values
        .iter()
        .map(|v| {
            let elem = match v.dtype {
                ferry_ir::DType::F32 => 1,
                ferry_ir::DType::I64 => 7,
                other => panic!("{}: unexpected {other}", v.name),
            };
            let dims: Vec<serde_json::Value> = v
                .shape
                .iter()
                .flatten()
                .map(|d| match d {
                    ferry_ir::Dim::Fixed(n) => serde_json::json!(n),
                    ferry_ir::Dim::Sym(s) => serde_json::json!(s),
                })
                .collect();
            serde_json::json!([v.name, elem, dims])
        })
        .collect()
}

/// ferry's three graphs have optimum's input and output names, order, element types and
/// axis names (recorded from optimum's export of the same checkpoint, see the file's
/// `source`). One deliberate difference: optimum's decoder-with-past names the logits'
/// sequence axis `"1"` (its trace's constant); ferry keeps `decoder_sequence_length`, the
/// axis of its `input_ids`.
#[test]
fn io_names_and_axes_match_optimum() {
    let recorded: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests/data/t5-tiny-v1_0-optimum-io.json"),
        )
        .expect("recorded signature"),
    )
    .expect("json");
    let c =
        ferry_loader::load(&crate::seq2seq_common::testdata().join("t5-tiny-v1_0")).expect("load");
    for part in [
        Seq2SeqPart::Encoder,
        Seq2SeqPart::Decoder,
        Seq2SeqPart::DecoderWithPast,
    ] {
        let g =
            trace_seq2seq(&c.config, &c.weights, &TraceOptions::default(), part).expect("trace");
        let stem = part.file_name().trim_end_matches(".onnx");
        let mut want = recorded[stem].clone();
        if part == Seq2SeqPart::DecoderWithPast {
            want["outputs"][0][2][1] = serde_json::json!("decoder_sequence_length");
        }
        assert_eq!(signature(&g.inputs), want["inputs"], "{stem} inputs");
        assert_eq!(signature(&g.outputs), want["outputs"], "{stem} outputs");
    }
}

/// An encoder-only checkpoint and an unknown `feed_forward_proj` give typed one-line
/// errors; `trace` exports the encoder for feature-extraction and refuses the multi-file
/// tasks.
#[test]
fn bad_t5_checkpoints_give_typed_errors() {
    let c =
        ferry_loader::load(&crate::seq2seq_common::testdata().join("t5-tiny-v1_0")).expect("load");
    let opts = TraceOptions::default();
    let mut encoder_only = ferry_ir::Weights::new();
    for w in c.weights.iter().filter(|w| !w.name.starts_with("decoder.")) {
        encoder_only.insert(w.clone());
    }
    assert!(trace_seq2seq(&c.config, &encoder_only, &opts, Seq2SeqPart::Encoder).is_ok());
    for part in [Seq2SeqPart::Decoder, Seq2SeqPart::DecoderWithPast] {
        let e = trace_seq2seq(&c.config, &encoder_only, &opts, part).expect_err("no decoder");
        assert!(matches!(e, TraceError::NoDecoderWeights { .. }), "{e:?}");
        let msg = e.to_string();
        assert!(
            !msg.contains('\n') && msg.contains("decoder weights"),
            "{msg}"
        );
    }

    let mut raw = c.config.raw.clone();
    raw["feed_forward_proj"] = serde_json::json!("gated-fancy");
    let bad = ferry_ir::ModelConfig::from_json(&raw.to_string()).expect("config");
    for part in [Seq2SeqPart::Encoder, Seq2SeqPart::Decoder] {
        let e = trace_seq2seq(&bad, &c.weights, &opts, part).expect_err("bad proj");
        let msg = e.to_string();
        assert!(
            matches!(e, TraceError::Unsupported(_))
                && msg.contains("feed_forward_proj `gated-fancy`"),
            "{msg}"
        );
    }

    let fe = TraceOptions {
        task: "feature-extraction".into(),
        ..Default::default()
    };
    let g = ferry_tracer::trace(&c.config, &c.weights, &fe).expect("feature-extraction");
    let names: Vec<&str> = g.outputs.iter().map(|v| v.name.as_str()).collect();
    assert_eq!(names, ["last_hidden_state"]);
    let multi = TraceOptions {
        task: "translation_en_to_de".into(),
        ..Default::default()
    };
    let e = ferry_tracer::trace(&c.config, &c.weights, &multi).expect_err("multi-file task");
    assert!(e.to_string().contains("trace_seq2seq"), "{e}");
}
