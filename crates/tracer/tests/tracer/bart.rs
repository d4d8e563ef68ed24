//! BART, mBART and Marian against transformers: every `"kind": "seq2seq"` testdata case of
//! those model types traced part by part (dynamic axes and fixed batch/source length),
//! written by ferry-onnx at opsets 14, 17 and 21, run in ONNX Runtime (encoder on the right-padded batch, uncached decoder on the 4-token
//! prefix, three cached steps fed the presents) and compared with transformers' outputs;
//! optimum's input/output names, order and axes; the missing-decoder error.

use crate::seq2seq_common::{cases, run_case, testdata};
use ferry_ir::{Dim, Graph, Weights};
use ferry_tracer::{Seq2SeqPart, TraceError, TraceOptions, trace_seq2seq};

const TOLERANCE: f32 = 1e-5;

#[test]
fn bart_family_matches_transformers_step_by_step() {
    let cases = cases(&["bart", "mbart", "marian"]);
    assert!(
        cases.len() >= 5,
        "bart/mbart/marian cases (golden_seq2seq.py, golden_bart_switches.py) missing: {cases:?}"
    );
    let mut bad = Vec::new();
    for case in &cases {
        // Dynamic axes, and `--static-shapes` with the goldens' batch and source length.
        let fixed = [
            ("batch_size".to_string(), 2),
            ("encoder_sequence_length".to_string(), 9),
        ];
        for (opset, fixed_dims) in [14, 17, 21]
            .into_iter()
            .flat_map(|o| [(o, Default::default()), (o, fixed.clone().into())])
        {
            let what = format!("{} opset {opset} fixed {fixed_dims:?}", case.display());
            let opts = TraceOptions {
                opset,
                fixed_dims,
                ..Default::default()
            };
            let diffs = run_case(case, &opts);
            eprintln!("{what}: {diffs:?}");
            assert_eq!(diffs.len(), 5, "encoder and 4 decoder steps");
            bad.extend(
                diffs
                    .iter()
                    .filter(|(_, d)| *d > TOLERANCE)
                    .map(|(part, d)| format!("{what}: {part} diff {d}")),
            );
        }
    }
    assert!(bad.is_empty(), "{}", bad.join("\n"));
}

fn marian() -> ferry_loader::Checkpoint {
    ferry_loader::load(&testdata().join("marian-tiny")).expect("load")
}

/// `(name, dims)` of each of a graph's inputs or outputs, dims as optimum prints them.
fn io(values: &[ferry_ir::Value]) -> Vec<(String, Vec<String>)> {
    values
        .iter()
        .map(|v| {
            let dims = v.shape.iter().flatten().map(Dim::to_string).collect();
            (v.name.clone(), dims)
        })
        .collect()
}

/// `{prefix}.{i}.decoder.key/value` (with `own` dims) then, given `cross` dims,
/// `{prefix}.{i}.encoder.key/value`, for marian-tiny's 2 layers.
fn cache_io(prefix: &str, own: &[String], cross: Option<&[String]>) -> Vec<(String, Vec<String>)> {
    let mut v = Vec::new();
    for i in 0..2 {
        let kinds = [("decoder", Some(own)), ("encoder", cross)];
        for (kind, dims) in kinds {
            for kv in ["key", "value"] {
                if let Some(dims) = dims {
                    v.push((format!("{prefix}.{i}.{kind}.{kv}"), dims.to_vec()));
                }
            }
        }
    }
    v
}

fn part(c: &ferry_loader::Checkpoint, weights: &Weights, p: Seq2SeqPart) -> Graph {
    trace_seq2seq(&c.config, weights, &TraceOptions::default(), p).expect("trace")
}

/// The names, order and axes optimum-onnx 0.1.0 gave `optimum-cli export onnx --task
/// text2text-generation-with-past` of testdata/marian-tiny (2 layers, 4 heads of 8).
#[test]
fn marian_parts_have_optimums_inputs_and_outputs() {
    let c = marian();
    let s = |v: &[&str]| v.iter().map(|d| d.to_string()).collect::<Vec<_>>();
    let enc_ids = s(&["batch_size", "encoder_sequence_length"]);
    let g = part(&c, &c.weights, Seq2SeqPart::Encoder);
    assert_eq!(
        io(&g.inputs),
        [
            ("input_ids".to_string(), enc_ids.clone()),
            ("attention_mask".to_string(), enc_ids.clone()),
        ]
    );
    assert_eq!(
        io(&g.outputs),
        [(
            "last_hidden_state".to_string(),
            s(&["batch_size", "encoder_sequence_length", "32"])
        )]
    );
    let past = s(&["batch_size", "4", "past_decoder_sequence_length", "8"]);
    let total = s(&[
        "batch_size",
        "4",
        "past_decoder_sequence_length + decoder_sequence_length",
        "8",
    ]);
    let cross = s(&["batch_size", "4", "encoder_sequence_length", "8"]);
    let dec_ids = s(&["batch_size", "decoder_sequence_length"]);

    let g = part(&c, &c.weights, Seq2SeqPart::Decoder);
    let inputs = io(&g.inputs);
    assert_eq!(
        inputs,
        [
            ("encoder_attention_mask".to_string(), enc_ids.clone()),
            ("input_ids".to_string(), dec_ids.clone()),
            (
                "encoder_hidden_states".to_string(),
                s(&["batch_size", "encoder_sequence_length", "32"])
            ),
        ]
    );
    let mut outputs = vec![(
        "logits".to_string(),
        s(&["batch_size", "decoder_sequence_length", "96"]),
    )];
    outputs.extend(cache_io("present", &total, Some(&cross)));
    assert_eq!(io(&g.outputs), outputs);

    let g = part(&c, &c.weights, Seq2SeqPart::DecoderWithPast);
    let mut inputs = vec![
        ("encoder_attention_mask".to_string(), enc_ids),
        ("input_ids".to_string(), dec_ids),
    ];
    inputs.extend(cache_io("past_key_values", &past, Some(&cross)));
    assert_eq!(io(&g.inputs), inputs);
    // optimum names the logits' sequence axis `1` here (a traced constant); ferry keeps
    // `decoder_sequence_length`, which also runs several new tokens at once.
    let outputs = io(&g.outputs);
    assert_eq!(outputs[0].0, "logits");
    assert_eq!(outputs[1..], cache_io("present", &total, None));
    // The shared table is one initializer, used by the embedding and the tied LM head;
    // Marian's sinusoidal positions are computed, not read from the checkpoint.
    for name in ["shared.weight", "decoder.embed_positions.weight"] {
        assert_eq!(
            g.initializers.iter().filter(|i| i.name == name).count(),
            1,
            "{name}"
        );
    }
    assert!(
        c.weights
            .get("model.decoder.embed_positions.weight")
            .is_none()
    );
}

#[test]
fn checkpoint_without_decoder_weights_exports_only_the_encoder() {
    let c = marian();
    let mut encoder_only = Weights::new();
    for w in c.weights.iter().filter(|w| !w.name.contains("decoder.")) {
        encoder_only.insert(w.clone());
    }
    part(&c, &encoder_only, Seq2SeqPart::Encoder);
    for p in [Seq2SeqPart::Decoder, Seq2SeqPart::DecoderWithPast] {
        let e = trace_seq2seq(&c.config, &encoder_only, &TraceOptions::default(), p)
            .expect_err("no decoder");
        let msg = e.to_string();
        assert!(
            matches!(&e, TraceError::NoDecoderWeights { model_type, .. } if model_type == "marian"),
            "{msg}"
        );
        assert!(msg.contains("no decoder weights"), "{msg}");
        assert!(!msg.contains('\n'), "one line: {msg}");
    }
}
