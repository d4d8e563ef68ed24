//! T5 and mT5 against transformers: every `"kind": "seq2seq"` testdata case of those model
//! types traced part by part, written by ferry-onnx at opsets 14, 17 and 21 with dynamic
//! and with fixed batch/encoder axes, run in ONNX Runtime (encoder on the right-padded
//! batch, uncached decoder on the 4-token prefix, three cached steps fed the presents).

mod common;

use common::seq2seq::{cases, run_case};
use ferry_tracer::TraceOptions;

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
