//! tract (the pure-Rust ONNX engine, `tract-onnx`) as a second verifier: every golden case
//! the ONNX Runtime parity tests export — encoder tasks, sentence cases, the real MiniLM
//! when present, decoder LLMs without a cache and step by step with one — is exported
//! plain and with `--static-shapes` (decoders: the cache-less prefill at its shape), run in
//! ONNX Runtime and in tract on the same golden inputs, and both must be within the same
//! tolerance; of the encoder-decoder folders, the encoder and the first decoder call. Each
//! test prints one table (case, task, export, ONNX Runtime max-abs, tract max-abs);
//! `cargo xtask verify` runs them with `--nocapture` to show it.

use std::collections::BTreeMap;
use std::path::Path;

use ferry_verifier::{F32Tensor, Golden, I64Tensor, Input, Model};
use tract_onnx::prelude::*;

use super::decoders::{Steps, cache_inputs, cached_steps_with, max_abs, name, step_cases};
use super::seq2seq::seq2seq_cases;
use super::{export, golden_cases, minilm_dir, root, stderr};

/// Rows (case, or `*` for every case; export) tract cannot run, with the reason; each must
/// still fail in tract (a stale entry fails the test) and still pass in ONNX Runtime.
const KNOWN_GAPS: &[(&str, &str, &str)] = &[];

/// An export loaded in tract: decluttered and optimized as tract's users run it.
struct Tract {
    plan: Arc<TypedRunnableModel>,
    inputs: Vec<String>,
    outputs: Vec<String>,
    /// `(name, heads, head dim)` of every `past_key_values.*` input.
    cache: Vec<(String, i64, i64)>,
}

impl Tract {
    fn load(path: &Path) -> TractResult<Self> {
        let model = tract_onnx::onnx().model_for_path(path)?.into_optimized()?;
        let inputs = model
            .input_outlets()?
            .iter()
            .map(|o| model.node(o.node).name.clone())
            .collect::<Vec<_>>();
        let outputs = model
            .output_outlets()?
            .iter()
            .map(|o| {
                model
                    .outlet_label(*o)
                    .unwrap_or(&model.node(o.node).name)
                    .to_string()
            })
            .collect();
        let mut cache = Vec::new();
        for (ix, name) in inputs.iter().enumerate() {
            if name.starts_with("past_key_values.") {
                let shape = &model.input_fact(ix)?.shape;
                let fixed = |d: usize| shape.get(d).and_then(|d| d.to_i64().ok());
                let (Some(heads), Some(hd)) = (fixed(1), fixed(3)) else {
                    return Err(TractError::msg(format!(
                        "{name}: heads and head size are not fixed: {shape:?}"
                    )));
                };
                cache.push((name.clone(), heads, hd));
            }
        }
        Ok(Self {
            plan: model.into_runnable()?,
            inputs,
            outputs,
            cache,
        })
    }

    /// Runs on `feed` (every model input by name); the float32 outputs by name.
    fn run(&self, feed: &BTreeMap<String, Input>) -> TractResult<BTreeMap<String, F32Tensor>> {
        let mut values: TVec<TValue> = TVec::new();
        for name in &self.inputs {
            let tensor = match feed.get(name) {
                Some(Input::I64(t)) => Tensor::from_shape(&dims(&t.shape), &t.data)?,
                Some(Input::F32(t)) => Tensor::from_shape(&dims(&t.shape), &t.data)?,
                None => return Err(TractError::msg(format!("no value for input `{name}`"))),
            };
            values.push(tensor.into_tvalue());
        }
        let outs = self.plan.run(values)?;
        let mut got = BTreeMap::new();
        for (name, v) in self.outputs.iter().zip(outs) {
            if v.datum_type() != f32::datum_type() {
                continue;
            }
            let shape = v.shape().iter().map(|&d| d as i64).collect();
            let data = v.to_plain_array_view::<f32>()?.iter().copied().collect();
            got.insert(name.clone(), F32Tensor { shape, data });
        }
        Ok(got)
    }
}

fn dims(shape: &[i64]) -> Vec<usize> {
    shape.iter().map(|&d| d as usize).collect()
}

/// A golden's int64 inputs as a feed.
fn feed(inputs: &BTreeMap<String, I64Tensor>) -> BTreeMap<String, Input> {
    inputs
        .iter()
        .map(|(k, v)| (k.clone(), Input::I64(v.clone())))
        .collect()
}

/// Largest max-abs over a golden's outputs.
fn worst(got: &BTreeMap<String, F32Tensor>, golden: &Golden) -> Result<f64, String> {
    let reports = ferry_verifier::compare_with_golden(got, golden).map_err(|e| e.to_string())?;
    Ok(reports.iter().map(|r| r.max_abs).fold(0.0, f64::max))
}

/// One row of the table: ONNX Runtime's and tract's max-abs (or tract's error).
struct Row {
    case: String,
    task: String,
    export: String,
    tol: f64,
    ort: f64,
    tract: Result<f64, String>,
}

/// The rows of every case, in order.
#[derive(Default)]
struct Table {
    rows: Vec<Row>,
}

impl Table {
    /// Prints the table and asserts every row: ONNX Runtime within `tol`, tract within
    /// `tol` unless the row is a [`KNOWN_GAPS`] entry, which must still fail in tract.
    fn check(self, title: &str) {
        println!("\n{title}: ONNX Runtime and tract against the goldens (max-abs)");
        println!(
            "  {:<44} {:<26} {:<22} {:>11} {:>11}  status",
            "case", "task", "export", "ORT", "tract"
        );
        let mut bad = Vec::new();
        let mut gaps_seen = 0;
        for r in &self.rows {
            let gap = KNOWN_GAPS
                .iter()
                .find(|(c, e, _)| (*c == "*" || *c == r.case) && *e == r.export);
            let tract_ok = r.tract.as_ref().is_ok_and(|d| *d <= r.tol);
            let status = match (gap, tract_ok) {
                (_, _) if r.ort > r.tol => "FAIL (ONNX Runtime)".to_string(),
                (None, true) => "ok".to_string(),
                (Some((_, _, why)), false) => {
                    gaps_seen += 1;
                    format!("known gap: {why}")
                }
                (Some(_), true) => "FAIL (listed as a known gap but passes)".to_string(),
                (None, false) => "FAIL (tract)".to_string(),
            };
            let tract = match &r.tract {
                Ok(d) => format!("{d:.3e}"),
                Err(_) => "error".to_string(),
            };
            println!(
                "  {:<44} {:<26} {:<22} {:>11} {:>11}  {status}",
                r.case,
                r.task,
                r.export,
                format!("{:.3e}", r.ort),
                tract
            );
            if let Err(e) = &r.tract {
                println!("      tract: {}", e.lines().next().unwrap_or_default());
            }
            if status.starts_with("FAIL") {
                bad.push(format!("{} {}: {status}", r.case, r.export));
            }
        }
        println!(
            "  {} rows, tolerance as ONNX Runtime's parity tests; {gaps_seen} known gap(s)",
            self.rows.len()
        );
        assert!(bad.is_empty(), "{title}: {bad:#?}");
    }
}

/// Exports `model` with `extra` flags into `dir/file`, panicking with ferry's error.
fn exported(model: &Path, dir: &Path, file: &str, extra: &[&str]) -> std::path::PathBuf {
    let out = dir.join(file);
    let o = export(model, &out, extra);
    assert!(
        o.status.success(),
        "{} {extra:?}: {}",
        model.display(),
        stderr(&o)
    );
    out
}

/// ONNX Runtime's and tract's worst max-abs of the export at `path` on `golden`.
fn both(path: &Path, golden: &Golden) -> (f64, Result<f64, String>) {
    let mut m = Model::load(path, 2).expect("ONNX Runtime loads the export");
    let ort = ferry_verifier::compare(&mut m, golden).expect("ONNX Runtime runs");
    let ort = ort.iter().map(|r| r.max_abs).fold(0.0, f64::max);
    let tract = Tract::load(path)
        .and_then(|t| t.run(&feed(&golden.inputs)))
        .map_err(|e| format!("{e:#}"))
        .and_then(|got| worst(&got, golden));
    (ort, tract)
}

/// `--static-shapes` flags at the shape of the golden `input_ids` (`[batch, seq]` or
/// `[batch, choices, seq]`).
fn static_flags(ids: &I64Tensor) -> Vec<String> {
    let mut flags = vec!["--static-shapes".to_string(), "--batch-size".into()];
    flags.push(ids.shape[0].to_string());
    if ids.shape.len() == 3 {
        flags.extend(["--num-choices".into(), ids.shape[1].to_string()]);
    }
    flags.extend([
        "--sequence-length".into(),
        ids.shape[ids.shape.len() - 1].to_string(),
    ]);
    flags
}

/// Every encoder/sentence golden (and the real MiniLM when present), plain and with
/// `--static-shapes`, in ONNX Runtime and tract within 1e-5 (MiniLM 1e-4), as
/// `tiny_goldens_match_transformers_at_opsets_14_17_21`.
#[test]
fn goldens_run_in_tract_as_in_onnx_runtime() {
    let mut cases: Vec<(std::path::PathBuf, std::path::PathBuf, String, f64)> = golden_cases()
        .into_iter()
        .map(|(dir, task)| {
            let golden = dir.join("golden.safetensors");
            (dir, golden, task, 1e-5)
        })
        .collect();
    if let Some(dir) = minilm_dir() {
        let golden = root().join("testdata/real/all-minilm-l6-v2/golden.safetensors");
        cases.push((dir, golden, "feature-extraction".into(), 1e-4));
    }
    let mut table = Table::default();
    for (dir, golden_path, task, tol) in cases {
        let golden = Golden::load(&golden_path).expect("golden");
        let tmp = tempfile::tempdir().expect("tempdir");
        let ids = golden.inputs.get("input_ids").expect("input_ids");
        let mut variants = vec![("plain", vec!["--task".to_string(), task.clone()])];
        let mut fixed = vec!["--task".to_string(), task.clone()];
        fixed.extend(static_flags(ids));
        variants.push(("static-shapes", fixed));
        for (export, flags) in variants {
            let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
            let path = exported(&dir, tmp.path(), &format!("{export}.onnx"), &flags);
            let (ort, tract) = both(&path, &golden);
            table.rows.push(Row {
                case: name(&dir),
                task: task.clone(),
                export: export.into(),
                tol,
                ort,
                tract,
            });
        }
    }
    table.check("golden cases");
}

/// Every decoder with a steps golden: without a cache (plain and `--static-shapes` at the
/// prefill's shape) against transformers' prefill logits, and with one over the prefill and
/// three cached steps (each fed the previous `present.*`), in ONNX Runtime and tract within
/// 1e-5, as `decoders::with_past_matches_transformers_step_by_step`.
#[test]
fn decoders_run_in_tract_step_by_step() {
    let mut table = Table::default();
    for case in step_cases() {
        let steps = Steps::load(&case);
        let tmp = tempfile::tempdir().expect("tempdir");
        let prefill = steps.inputs(0);
        let want = steps.f32s("step0.output.logits");
        let Some(Input::I64(ids)) = prefill.get("input_ids") else {
            panic!("{}: no int64 input_ids", name(&case));
        };
        let mut fixed = vec!["--task".to_string(), "text-generation".into()];
        fixed.extend(static_flags(ids));
        let plain = vec!["--task".to_string(), "text-generation".into()];
        for (export, flags) in [("no-cache", plain), ("no-cache static-shapes", fixed)] {
            let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
            let path = exported(&case, tmp.path(), "prefill.onnx", &flags);
            let mut m = Model::load(&path, 2).expect("ONNX Runtime loads the export");
            let ort = max_abs(&m.run_inputs(&prefill).expect("runs")["logits"], &want);
            let tract = Tract::load(&path)
                .and_then(|t| t.run(&prefill))
                .map_err(|e| format!("{e:#}"))
                .and_then(|got| {
                    let logits = got.get("logits").ok_or("no logits output")?;
                    Ok(f64::from(max_abs(logits, &want)))
                });
            table.rows.push(Row {
                case: name(&case),
                task: "text-generation".into(),
                export: export.into(),
                tol: 1e-5,
                ort: f64::from(ort),
                tract,
            });
        }
        let path = exported(
            &case,
            tmp.path(),
            "with-past.onnx",
            &["--task", "text-generation-with-past"],
        );
        let label = format!("{} with past", name(&case));
        let worst_step = |logits: Vec<F32Tensor>| {
            logits
                .iter()
                .enumerate()
                .map(|(k, l)| f64::from(max_abs(l, &steps.f32s(&format!("step{k}.output.logits")))))
                .fold(0.0, f64::max)
        };
        let mut m = Model::load(&path, 2).expect("ONNX Runtime loads the export");
        let ort_cache = cache_inputs(&m);
        let ort = cached_steps_with(&steps, &ort_cache, &label, |f| {
            m.run_inputs(f).map_err(|e| e.to_string())
        })
        .map(worst_step)
        .expect("ONNX Runtime runs");
        let tract = Tract::load(&path)
            .map_err(|e| format!("{e:#}"))
            .and_then(|t| {
                cached_steps_with(&steps, &t.cache, &label, |f| {
                    t.run(f).map_err(|e| format!("{e:#}"))
                })
            })
            .map(worst_step);
        table.rows.push(Row {
            case: name(&case),
            task: "text-generation-with-past".into(),
            export: "prefill + 3 steps".into(),
            tol: 1e-5,
            ort,
            tract,
        });
    }
    table.check("decoder cases");
}

/// Max-abs relative to the golden's largest magnitude (at least 1), as
/// `seq2seq::folder_matches` measures the encoder-decoders (T5's logits reach ~220).
fn scaled_max_abs(got: &F32Tensor, want: &[f32]) -> f64 {
    let scale = want.iter().fold(1f32, |m, v| m.max(v.abs()));
    f64::from(max_abs(got, want) / scale)
}

/// Every encoder-decoder golden, exported as optimum's folder: `encoder_model.onnx` on the
/// golden's encoder inputs and `decoder_model.onnx` on its first decoder step (the golden
/// encoder output fed in), in ONNX Runtime and tract within 1e-5 relative to the golden's
/// magnitude, as `seq2seq::seq2seq_folders_match_transformers_at_opsets_14_17_21`.
#[test]
fn seq2seq_folders_run_in_tract() {
    let mut table = Table::default();
    for case in seq2seq_cases() {
        let steps = Steps::load(&case);
        let tmp = tempfile::tempdir().expect("tempdir");
        let folder = exported(
            &case,
            tmp.path(),
            "folder",
            &["--task", "text2text-generation-with-past"],
        );
        let mask = Input::I64(steps.i64s("encoder.input.attention_mask"));
        let encoder_feed: BTreeMap<String, Input> = [
            (
                "input_ids".to_string(),
                Input::I64(steps.i64s("encoder.input.input_ids")),
            ),
            ("attention_mask".to_string(), mask.clone()),
        ]
        .into();
        let hidden = steps.f32s("encoder.output.last_hidden_state");
        let mut encoder = Model::load(&folder.join("encoder_model.onnx"), 2).expect("ONNX Runtime");
        let ort_out = encoder
            .run_inputs(&encoder_feed)
            .expect("ONNX Runtime runs");
        let shape = ort_out["last_hidden_state"].shape.clone();
        let decoder_feed: BTreeMap<String, Input> = [
            ("encoder_attention_mask".to_string(), mask),
            (
                "encoder_hidden_states".to_string(),
                Input::F32(F32Tensor {
                    shape,
                    data: hidden.clone(),
                }),
            ),
            (
                "input_ids".to_string(),
                Input::I64(steps.i64s("step0.input.input_ids")),
            ),
        ]
        .into();
        let logits = steps.f32s("step0.output.logits");
        for (file, feed, output, want) in [
            (
                "encoder_model.onnx",
                &encoder_feed,
                "last_hidden_state",
                &hidden,
            ),
            ("decoder_model.onnx", &decoder_feed, "logits", &logits),
        ] {
            let path = folder.join(file);
            let mut m = Model::load(&path, 2).expect("ONNX Runtime loads the file");
            let ort = scaled_max_abs(
                &m.run_inputs(feed).expect("ONNX Runtime runs")[output],
                want,
            );
            let tract = Tract::load(&path)
                .and_then(|t| t.run(feed))
                .map_err(|e| format!("{e:#}"))
                .and_then(|got| {
                    let got = got.get(output).ok_or(format!("no {output} output"))?;
                    Ok(scaled_max_abs(got, want))
                });
            table.rows.push(Row {
                case: name(&case),
                task: "text2text-generation".into(),
                export: file.into(),
                tol: 1e-5,
                ort,
                tract,
            });
        }
        // The 4-token prefill through decoder_model.onnx, then three cached steps through
        // decoder_with_past_model.onnx fed each engine's own presents (worst step).
        let (first, cached) = (
            folder.join("decoder_model.onnx"),
            folder.join("decoder_with_past_model.onnx"),
        );
        let mut ort_first = Model::load(&first, 2).expect("ONNX Runtime loads the decoder");
        let mut ort_cached = Model::load(&cached, 2).expect("ONNX Runtime loads the decoder");
        let ort = seq2seq_steps(
            &steps,
            &decoder_feed,
            |f| ort_first.run_inputs(f).map_err(|e| e.to_string()),
            |f| ort_cached.run_inputs(f).map_err(|e| e.to_string()),
        )
        .expect("ONNX Runtime runs the cached steps");
        let tract = Tract::load(&first)
            .and_then(|a| Ok((a, Tract::load(&cached)?)))
            .map_err(|e| format!("{e:#}"))
            .and_then(|(a, b)| {
                seq2seq_steps(
                    &steps,
                    &decoder_feed,
                    |f| a.run(f).map_err(|e| format!("{e:#}")),
                    |f| b.run(f).map_err(|e| format!("{e:#}")),
                )
            });
        table.rows.push(Row {
            case: name(&case),
            task: "text2text-generation-with-past".into(),
            export: "decoder + decoder_with_past".into(),
            tol: 1e-5,
            ort,
            tract,
        });
    }
    table.check("encoder-decoder folders (max-abs / max(1, |golden|))");
}

/// One engine's worst scaled logits difference over an encoder-decoder's decoder steps:
/// `first` (the uncached decoder) on `first_feed` (step 0), then `cached` (the decoder with
/// past) on steps 1–3, each fed the previous step's `present.*.decoder.*` and step 0's
/// `present.*.encoder.*` as `past_key_values.*`.
fn seq2seq_steps(
    steps: &Steps,
    first_feed: &BTreeMap<String, Input>,
    mut first: impl FnMut(&BTreeMap<String, Input>) -> Result<BTreeMap<String, F32Tensor>, String>,
    mut cached: impl FnMut(&BTreeMap<String, Input>) -> Result<BTreeMap<String, F32Tensor>, String>,
) -> Result<f64, String> {
    let logits = |out: &BTreeMap<String, F32Tensor>, k: usize| -> Result<f64, String> {
        let got = out.get("logits").ok_or("no logits output")?;
        Ok(scaled_max_abs(
            got,
            &steps.f32s(&format!("step{k}.output.logits")),
        ))
    };
    let as_past = |name: &str| name.replacen("present.", "past_key_values.", 1);
    let mut out = first(first_feed)?;
    let mut worst = logits(&out, 0)?;
    let encoder: Vec<(String, F32Tensor)> = out
        .iter()
        .filter(|(n, _)| n.starts_with("present.") && n.contains(".encoder."))
        .map(|(n, t)| (as_past(n), t.clone()))
        .collect();
    for k in 1..4 {
        let mut feed: BTreeMap<String, Input> = encoder
            .iter()
            .map(|(n, t)| (n.clone(), Input::F32(t.clone())))
            .collect();
        for (n, t) in &out {
            if n.starts_with("present.") && n.contains(".decoder.") {
                feed.insert(as_past(n), Input::F32(t.clone()));
            }
        }
        feed.insert(
            "encoder_attention_mask".into(),
            first_feed
                .get("encoder_attention_mask")
                .ok_or("no encoder_attention_mask")?
                .clone(),
        );
        feed.insert(
            "input_ids".into(),
            Input::I64(steps.i64s(&format!("step{k}.input.input_ids"))),
        );
        out = cached(&feed)?;
        worst = worst.max(logits(&out, k)?);
    }
    Ok(worst)
}
