//! Shared by the encoder-decoder golden tests: the testdata cases of `"kind": "seq2seq"`,
//! their `steps.safetensors` tensors, parts traced and written at an opset and loaded in
//! ONNX Runtime, and the encoder → decoder → decoder-with-past run compared step by step.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use ferry_tracer::{Seq2SeqPart, TraceError, TraceOptions, trace_seq2seq};
use ferry_verifier::{F32Tensor, I64Tensor, Input, Model};

/// The repository's testdata directory.
pub fn testdata() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../testdata")
}

/// The `"kind": "seq2seq"` cases whose `model_type` is one of `model_types`, sorted.
pub fn cases(model_types: &[&str]) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(testdata())
        .expect("testdata")
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            let Ok(text) = std::fs::read_to_string(p.join("case.json")) else {
                return false;
            };
            let case: serde_json::Value = serde_json::from_str(&text).expect("case.json");
            case["kind"] == "seq2seq"
                && case["model_type"]
                    .as_str()
                    .is_some_and(|m| model_types.contains(&m))
        })
        .collect();
    v.sort();
    v
}

/// A case's `steps.safetensors`.
pub struct Steps {
    bytes: Vec<u8>,
}

impl Steps {
    /// Reads the case's steps.
    pub fn load(case: &Path) -> Self {
        Self {
            bytes: std::fs::read(case.join("steps.safetensors")).expect("steps golden"),
        }
    }

    fn tensor(&self, name: &str) -> (Vec<i64>, Vec<u8>) {
        let st = safetensors::SafeTensors::deserialize(&self.bytes).expect("safetensors");
        let v = st.tensor(name).expect(name);
        (
            v.shape().iter().map(|&d| d as i64).collect(),
            v.data().to_vec(),
        )
    }

    /// An int64 tensor as a model input.
    pub fn i64s(&self, name: &str) -> Input {
        let (shape, data) = self.tensor(name);
        let data = data
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes")))
            .collect();
        Input::I64(I64Tensor { shape, data })
    }

    /// A float32 tensor.
    pub fn f32s(&self, name: &str) -> F32Tensor {
        let (shape, data) = self.tensor(name);
        let data = data
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
            .collect();
        F32Tensor { shape, data }
    }
}

/// Largest absolute difference (the shapes must agree).
pub fn max_abs(got: &F32Tensor, want: &F32Tensor) -> f32 {
    assert_eq!(got.shape, want.shape, "shape");
    got.data
        .iter()
        .zip(&want.data)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max)
}

/// Largest absolute difference divided by `max(1, max |want|)`: float32 noise grows with
/// the values (transformers' own float32 logits of the T5 goldens differ from its float64
/// ones by up to 8e-4 at magnitudes near 200).
pub fn scaled_diff(got: &F32Tensor, want: &F32Tensor) -> f32 {
    let scale = want.data.iter().fold(1.0f32, |m, v| m.max(v.abs()));
    max_abs(got, want) / scale
}

/// Traces `part` with `opts`, writes it into `dir` and loads it in ONNX Runtime.
pub fn load_part(
    c: &ferry_loader::Checkpoint,
    opts: &TraceOptions,
    part: Seq2SeqPart,
    dir: &Path,
) -> Result<Model, TraceError> {
    let g = trace_seq2seq(&c.config, &c.weights, opts, part)?;
    let path = dir.join(part.file_name());
    ferry_onnx::write_model(&g, &path, &Default::default()).expect("write");
    Ok(Model::load(&path, 1).expect("load in ONNX Runtime"))
}

/// The next call's cache from a decoder call's outputs: `present.{i}.*` become
/// `past_key_values.{i}.*`; the encoder's cache is kept from `prev` when the call did not
/// return it (the decoder with past).
pub fn past_from(
    outputs: &BTreeMap<String, F32Tensor>,
    prev: &BTreeMap<String, Input>,
) -> BTreeMap<String, Input> {
    let mut past = prev.clone();
    for (name, t) in outputs {
        if let Some(rest) = name.strip_prefix("present.") {
            past.insert(format!("past_key_values.{rest}"), Input::F32(t.clone()));
        }
    }
    past
}

/// Runs a case's encoder, uncached decoder (step 0) and `steps - 1` cached decoder steps
/// traced with `opts`; returns the largest difference from transformers of each
/// (`encoder`, `step0`, `step1`, …) by name, as [`scaled_diff`] measures it.
pub fn run_case(case: &Path, opts: &TraceOptions) -> Vec<(String, f32)> {
    let c = ferry_loader::load(case).expect("load");
    let steps = Steps::load(case);
    let case_json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(case.join("case.json")).expect("case"))
            .expect("case.json");
    let n = case_json["steps"].as_i64().unwrap_or(4);
    let dir = tempfile::tempdir().expect("tempdir");
    let mask = steps.i64s("encoder.input.attention_mask");
    let mut diffs = Vec::new();

    let mut enc = load_part(&c, opts, Seq2SeqPart::Encoder, dir.path()).expect("encoder");
    let feed = BTreeMap::from([
        (
            "input_ids".to_string(),
            steps.i64s("encoder.input.input_ids"),
        ),
        ("attention_mask".to_string(), mask.clone()),
    ]);
    let out = enc.run_inputs(&feed).expect("run encoder");
    let states = steps.f32s("encoder.output.last_hidden_state");
    diffs.push((
        "encoder".to_string(),
        scaled_diff(&out["last_hidden_state"], &states),
    ));

    let mut dec = load_part(&c, opts, Seq2SeqPart::Decoder, dir.path()).expect("decoder");
    let feed = BTreeMap::from([
        ("encoder_attention_mask".to_string(), mask.clone()),
        ("input_ids".to_string(), steps.i64s("step0.input.input_ids")),
        ("encoder_hidden_states".to_string(), Input::F32(states)),
    ]);
    let out = dec.run_inputs(&feed).expect("run decoder");
    diffs.push((
        "step0".to_string(),
        scaled_diff(&out["logits"], &steps.f32s("step0.output.logits")),
    ));
    let mut past = past_from(&out, &BTreeMap::new());

    let mut with_past =
        load_part(&c, opts, Seq2SeqPart::DecoderWithPast, dir.path()).expect("decoder with past");
    for k in 1..n {
        let mut feed = past.clone();
        feed.insert("encoder_attention_mask".to_string(), mask.clone());
        feed.insert(
            "input_ids".to_string(),
            steps.i64s(&format!("step{k}.input.input_ids")),
        );
        let out = with_past.run_inputs(&feed).expect("run decoder with past");
        let want = steps.f32s(&format!("step{k}.output.logits"));
        diffs.push((format!("step{k}"), scaled_diff(&out["logits"], &want)));
        past = past_from(&out, &past);
    }
    diffs
}
