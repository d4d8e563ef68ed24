//! ferry's ONNX exports as burn users get them: each model of the build was turned into Rust
//! by burn-onnx's `ModelGen` (build.rs) and runs here on burn's `flex` CPU backend against
//! transformers' golden outputs.
//!
//! ```text
//! ferry-burn-check list                        every model: built, or why not
//! ferry-burn-check run MODEL FILE STEPS ATOL [scope=PREFIX] [later=MODEL2] [relative=1]
//!                                              run MODEL on FILE's inputs, compare outputs
//! ```
//!
//! `FILE` is a golden safetensors file. With `STEPS` = 0 it holds `PREFIX` + `input.*` and
//! `output.*` (`PREFIX` empty, or `encoder.` for an encoder-decoder's encoder); otherwise
//! `step{k}.input.*` and `step{k}.output.*` for `k < STEPS`, run by MODEL at step 0 and by
//! MODEL2 (default MODEL) after it, each step after the first fed the earlier `present.*` as
//! `past_key_values.*` (the first an empty cache). Prints one line: `PASS`/`FAIL`, the
//! largest max-abs, and each output's.

use std::collections::BTreeMap;
use std::process::ExitCode;

use burn::tensor::{Bool, DType, Device, Int, Tensor, TensorData};

/// Why a model is (not) in the binary.
#[derive(Debug)]
pub enum Status {
    /// Converted and compiled.
    Built,
    /// burn-onnx could not convert it (its error).
    NoConvert(&'static str),
    /// Converted, but the generated code does not compile (left out by `FERRY_BURN_SKIP`).
    NoCompile,
}

/// A model of the build: its graph inputs (name, dims; `None` where symbolic) and runner.
pub struct Case {
    /// File stem of the ONNX model.
    pub name: &'static str,
    /// Whether it converted and compiled.
    pub status: Status,
    /// The ONNX graph inputs.
    pub inputs: &'static [(&'static str, &'static [Option<usize>])],
    /// Runs the generated model on named inputs.
    pub run: Option<Runner>,
}

/// A generated model's runner: named inputs in, named outputs out.
pub type Runner = fn(&Inputs, &Device) -> Result<Vec<Output>, String>;

/// One tensor's values and shape.
#[derive(Clone, Debug)]
pub enum Values {
    /// int64 values.
    I64(Vec<i64>),
    /// float32 values.
    F32(Vec<f32>),
}

/// Named input tensors: shape and values.
pub type Inputs = BTreeMap<String, (Vec<usize>, Values)>;

/// A named output of a generated model, as float32.
#[derive(Debug)]
pub struct Output {
    name: String,
    shape: Vec<usize>,
    data: Vec<f32>,
}

include!(concat!(env!("OUT_DIR"), "/cases.rs"));

fn input<'a>(inputs: &'a Inputs, name: &str) -> Result<&'a (Vec<usize>, Values), String> {
    inputs
        .get(name)
        .ok_or_else(|| format!("the golden has no input `{name}`"))
}

fn rank_check<const D: usize>(name: &str, shape: &[usize]) -> Result<(), String> {
    if shape.len() == D {
        Ok(())
    } else {
        Err(format!(
            "input `{name}`: the golden's rank is {}, the generated model's {D}",
            shape.len()
        ))
    }
}

/// An integer input tensor of rank `D`.
pub fn int_input<const D: usize>(
    inputs: &Inputs,
    name: &str,
    device: &Device,
) -> Result<Tensor<D, Int>, String> {
    let (shape, values) = input(inputs, name)?;
    rank_check::<D>(name, shape)?;
    let data = match values {
        Values::I64(v) => TensorData::new(v.clone(), shape.clone()),
        Values::F32(_) => return Err(format!("input `{name}`: float golden for an int input")),
    };
    // int64 as the ONNX input declares (the generated code's constants are int64 too);
    // without the dtype, flex stores the data as its default int32.
    Ok(Tensor::from_data(data, (device, DType::I64)))
}

/// A float input tensor of rank `D`.
pub fn float_input<const D: usize>(
    inputs: &Inputs,
    name: &str,
    device: &Device,
) -> Result<Tensor<D>, String> {
    let (shape, values) = input(inputs, name)?;
    rank_check::<D>(name, shape)?;
    let data = match values {
        Values::F32(v) => TensorData::new(v.clone(), shape.clone()),
        Values::I64(v) => TensorData::new(
            v.iter().map(|&x| x as f32).collect::<Vec<_>>(),
            shape.clone(),
        ),
    };
    Ok(Tensor::from_data(data, (device, DType::F32)))
}

/// A boolean input tensor of rank `D` (non-zero is true).
pub fn bool_input<const D: usize>(
    inputs: &Inputs,
    name: &str,
    device: &Device,
) -> Result<Tensor<D, Bool>, String> {
    let (shape, values) = input(inputs, name)?;
    rank_check::<D>(name, shape)?;
    let v: Vec<bool> = match values {
        Values::I64(v) => v.iter().map(|&x| x != 0).collect(),
        Values::F32(v) => v.iter().map(|&x| x != 0.0).collect(),
    };
    Ok(Tensor::from_data(TensorData::new(v, shape.clone()), device))
}

fn output(name: &str, shape: Vec<usize>, data: TensorData) -> Output {
    let data = data
        .convert::<f32>()
        .try_to_vec::<f32>()
        .unwrap_or_default();
    Output {
        name: name.to_string(),
        shape,
        data,
    }
}

/// A float output.
pub fn float_output<const D: usize>(name: &str, t: Tensor<D>) -> Output {
    output(name, t.dims().to_vec(), t.into_data())
}

/// An integer output, as float32.
pub fn int_output<const D: usize>(name: &str, t: Tensor<D, Int>) -> Output {
    output(name, t.dims().to_vec(), t.into_data())
}

/// A boolean output, as 0/1.
pub fn bool_output<const D: usize>(name: &str, t: Tensor<D, Bool>) -> Output {
    let dims = t.dims().to_vec();
    output(name, dims, t.int().into_data())
}

/// A golden safetensors file read into named tensors.
fn read_golden(path: &str) -> Result<BTreeMap<String, (Vec<usize>, Values)>, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("{path}: {e}"))?;
    let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| format!("{path}: {e}"))?;
    let mut out = BTreeMap::new();
    for (name, view) in st.tensors() {
        let data = view.data();
        let values = match view.dtype() {
            safetensors::Dtype::I64 => Values::I64(
                data.chunks_exact(8)
                    .map(|c| i64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
                    .collect(),
            ),
            safetensors::Dtype::F32 => Values::F32(
                data.chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect(),
            ),
            // Tensors of other types are no model input or compared output here.
            _ => continue,
        };
        out.insert(name, (view.shape().to_vec(), values));
    }
    Ok(out)
}

/// The golden tensors under `prefix` (`input.` / `step0.output.` …), prefix removed.
fn under(golden: &BTreeMap<String, (Vec<usize>, Values)>, prefix: &str) -> Inputs {
    golden
        .iter()
        .filter_map(|(k, v)| k.strip_prefix(prefix).map(|n| (n.to_string(), v.clone())))
        .collect()
}

/// The largest of `diffs`; NaN if any is NaN (so a NaN output never passes).
fn worst(diffs: impl Iterator<Item = f32>) -> f32 {
    diffs.fold(0.0, |m, x| {
        if x.is_nan() || m.is_nan() {
            f32::NAN
        } else {
            m.max(x)
        }
    })
}

/// How to run a model against its golden.
struct Plan<'a> {
    /// The model of the first (or only) step.
    first: &'a Case,
    /// The model of the later steps (encoder-decoders: `decoder_with_past_model`).
    later: &'a Case,
    /// Cached steps (0: one run on the plain tensors under `scope`).
    steps: usize,
    /// Key prefix of the plain tensors (`""`, or `encoder.` for an encoder).
    scope: String,
}

fn panic_text(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "panic".into())
        .replace('\n', " ")
}

/// Runs the plan on the golden's inputs and returns each compared output's max-abs
/// difference. Each step after the first is fed the previous step's `present.*` as
/// `past_key_values.*` (an encoder-decoder's cross-attention cache: the first step's);
/// the first step gets an empty cache. Encoder-decoder inputs come from the golden's
/// encoder (`encoder_attention_mask`, `encoder_hidden_states`); a merged decoder's
/// `use_cache_branch` is true after the first step.
/// Also returns the largest magnitude among the compared golden values.
fn run_plan(plan: &Plan, path: &str) -> Result<(Vec<(String, f32)>, f32), String> {
    let golden = read_golden(path)?;
    let device = Device::default();
    let mut cache: Inputs = BTreeMap::new();
    let mut diffs = Vec::new();
    let mut scale = 0.0f32;
    for step in 0..plan.steps.max(1) {
        let case = if step == 0 { plan.first } else { plan.later };
        let run = case
            .run
            .ok_or_else(|| format!("{}: not built ({:?})", case.name, case.status))?;
        let prefix = if plan.steps == 0 {
            plan.scope.clone()
        } else {
            format!("step{step}.")
        };
        let mut inputs = under(&golden, &format!("{prefix}input."));
        if inputs.is_empty() {
            return Err(format!("{path}: no `{prefix}input.*` tensors"));
        }
        let batch = inputs
            .get("input_ids")
            .map(|(s, _)| s[0])
            .ok_or("the golden has no input_ids")?;
        for (name, dims) in case.inputs {
            if inputs.contains_key(*name) {
                continue;
            }
            let v = match *name {
                "encoder_attention_mask" => golden.get("encoder.input.attention_mask").cloned(),
                "encoder_hidden_states" => golden.get("encoder.output.last_hidden_state").cloned(),
                "use_cache_branch" => Some((vec![1], Values::I64(vec![i64::from(step > 0)]))),
                n if n.starts_with("past_key_values.") => match cache.get(n) {
                    Some(v) => Some(v.clone()),
                    None if step == 0 => {
                        // The empty cache of the first step: batch × heads × 0 × head dim.
                        let shape: Vec<usize> = dims
                            .iter()
                            .enumerate()
                            .map(|(k, d)| match (k, d) {
                                (0, _) => batch,
                                (2, _) => 0,
                                (_, Some(d)) => *d,
                                (_, None) => 0,
                            })
                            .collect();
                        Some((shape, Values::F32(Vec::new())))
                    }
                    None => return Err(format!("step {step}: no present for `{n}`")),
                },
                _ => None,
            };
            if let Some(v) = v {
                inputs.insert(name.to_string(), v);
            }
        }
        let outs = std::panic::catch_unwind(|| run(&inputs, &device))
            .map_err(|p| format!("step {step}: burn panicked: {}", panic_text(p.as_ref())))??;
        let want = under(&golden, &format!("{prefix}output."));
        for out in outs {
            // An encoder-decoder's cross-attention cache is the first step's (optimum's
            // merged decoder returns empty `present.*.encoder.*` in its cache branch).
            let encoder_cache = out.name.contains(".encoder.") && step > 0;
            if let Some(past) = out.name.strip_prefix("present.").filter(|_| !encoder_cache) {
                cache.insert(
                    format!("past_key_values.{past}"),
                    (out.shape.clone(), Values::F32(out.data.clone())),
                );
            }
            let Some((shape, Values::F32(w))) = want.get(&out.name) else {
                continue;
            };
            if *shape != out.shape || w.len() != out.data.len() {
                return Err(format!(
                    "step {step}: output `{}` has shape {:?}, golden {:?}",
                    out.name, out.shape, shape
                ));
            }
            let d = worst(w.iter().zip(&out.data).map(|(a, b)| (a - b).abs()));
            let label = if plan.steps == 0 {
                out.name.clone()
            } else {
                format!("step{step}.{}", out.name)
            };
            diffs.push((label, d));
            scale = scale.max(worst(w.iter().map(|x| x.abs())));
        }
    }
    if diffs.is_empty() {
        return Err("no output of the model is in the golden".into());
    }
    Ok((diffs, scale))
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["list"] => {
            for c in CASES {
                let status = match &c.status {
                    Status::Built => "built".to_string(),
                    Status::NoConvert(e) => format!("no-convert\t{e}"),
                    Status::NoCompile => "no-compile".to_string(),
                };
                println!("{}\t{status}", c.name);
            }
            ExitCode::SUCCESS
        }
        ["run", name, path, steps, atol, options @ ..] => {
            let (Ok(steps), Ok(atol)) = (steps.parse::<usize>(), atol.parse::<f32>()) else {
                eprintln!("ferry-burn-check: STEPS must be a count and ATOL a number");
                return ExitCode::FAILURE;
            };
            let find = |n: &str| CASES.iter().find(|c| c.name == n);
            let Some(first) = find(name) else {
                eprintln!("ferry-burn-check: no model {name} in this build");
                return ExitCode::FAILURE;
            };
            // relative=1: the tolerance is ATOL × max(1, largest golden magnitude).
            let mut relative = false;
            let mut plan = Plan {
                first,
                later: first,
                steps,
                scope: String::new(),
            };
            for o in options.iter() {
                match o.split_once('=') {
                    Some(("scope", v)) => plan.scope = v.to_string(),
                    Some(("relative", "1")) => relative = true,
                    Some(("later", v)) => match find(v) {
                        Some(c) => plan.later = c,
                        None => {
                            eprintln!("ferry-burn-check: no model {v} in this build");
                            return ExitCode::FAILURE;
                        }
                    },
                    _ => {
                        eprintln!("ferry-burn-check: unknown option {o}");
                        return ExitCode::FAILURE;
                    }
                }
            }
            // Quiet panics: a failing model is reported on one line.
            std::panic::set_hook(Box::new(|_| {}));
            match run_plan(&plan, path) {
                Ok((diffs, scale)) => {
                    let largest = worst(diffs.iter().map(|(_, d)| *d));
                    let tol = if relative { atol * scale.max(1.0) } else { atol };
                    let pass = largest <= tol;
                    let each: Vec<String> =
                        diffs.iter().map(|(n, d)| format!("{n} {d:.2e}")).collect();
                    println!(
                        "{} max-abs {largest:.2e} ({}); golden values up to {scale:.3}",
                        if pass { "PASS" } else { "FAIL" },
                        each.join(", ")
                    );
                    if pass {
                        ExitCode::SUCCESS
                    } else {
                        ExitCode::FAILURE
                    }
                }
                Err(e) => {
                    println!("ERROR {e}");
                    ExitCode::FAILURE
                }
            }
        }
        _ => {
            eprintln!(
                "usage: ferry-burn-check list | run MODEL FILE STEPS ATOL [scope=PREFIX] [later=MODEL] [relative=1]"
            );
            ExitCode::FAILURE
        }
    }
}
