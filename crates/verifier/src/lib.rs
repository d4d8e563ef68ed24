//! ferry-verifier: runs exported models in ONNX Runtime and checks what they compute.
//!
//! ONNX Runtime is loaded at run time (`ort` with `load-dynamic`) from the shared library
//! that `cargo xtask` unpacks from the PyPI `onnxruntime` wheel; [`find_onnxruntime`] says
//! where it looks. [`Golden`] reads golden files (inputs and transformers' outputs in one
//! safetensors file), [`compare`] reports max-abs per output, and [`check_dummy`] runs
//! dummy inputs at several sequence lengths, checking shapes and finiteness.
//! [`compare_models`] runs two models on the same inputs and reports, per output, cosine
//! similarity, max-abs and argmax agreement of classification heads (quantized vs float32).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use ort::session::builder::GraphOptimizationLevel;
use ort::session::{Session, SessionInputValue};
use ort::value::{Tensor, ValueType};

mod agreement;
mod chain;

pub use agreement::{
    Agreement, argmax, compare_models, compare_outputs, cosine, golden_inputs,
    is_classification_output,
};
pub use chain::Values;

/// Why verification could not run or failed.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// The ONNX Runtime library was not found or did not load.
    #[error("ONNX Runtime unavailable: {0}")]
    Runtime(String),
    /// ONNX Runtime refused the model or failed running it.
    #[error("ONNX Runtime: {0}")]
    Ort(String),
    /// A golden file is missing or malformed.
    #[error("golden file {path}: {reason}")]
    Golden {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The model's outputs are wrong (shape, finiteness, names).
    #[error("check failed: {0}")]
    Check(String),
}

impl From<ort::Error> for VerifyError {
    fn from(e: ort::Error) -> Self {
        VerifyError::Ort(e.to_string())
    }
}

/// Places ferry looks for `libonnxruntime`: `$ORT_DYLIB_PATH`, then beside the running
/// executable, then `target/onnxruntime/` above it (where `cargo xtask` unpacks it).
pub fn onnxruntime_candidates() -> Vec<PathBuf> {
    let mut v = Vec::new();
    if let Some(p) = std::env::var_os("ORT_DYLIB_PATH").filter(|p| !p.is_empty()) {
        v.push(PathBuf::from(p));
    }
    if let Ok(exe) = std::env::current_exe() {
        let mut dir = exe.parent().map(Path::to_path_buf);
        while let Some(d) = dir {
            v.push(d.join("libonnxruntime.so"));
            v.push(d.join("onnxruntime").join("libonnxruntime.so"));
            if d.file_name().is_some_and(|n| n == "target") {
                break;
            }
            dir = d.parent().map(Path::to_path_buf);
        }
    }
    v
}

/// The first existing ONNX Runtime library among [`onnxruntime_candidates`].
pub fn find_onnxruntime() -> Result<PathBuf, VerifyError> {
    let c = onnxruntime_candidates();
    c.iter().find(|p| p.is_file()).cloned().ok_or_else(|| {
        let list: Vec<String> = c.iter().map(|p| p.display().to_string()).collect();
        VerifyError::Runtime(format!(
            "libonnxruntime not found (set ORT_DYLIB_PATH, or run `cargo xtask fetch-ort`); looked at: {}",
            list.join(", ")
        ))
    })
}

static ENV: OnceLock<Result<ort::environment::Environment, String>> = OnceLock::new();

fn environment() -> Result<ort::environment::Environment, VerifyError> {
    ENV.get_or_init(|| {
        let path = find_onnxruntime().map_err(|e| e.to_string())?;
        let builder = ort::init_from(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        builder
            .with_name("ferry")
            .with_telemetry(false)
            .build()
            .map_err(|e| e.to_string())
    })
    .clone()
    .map_err(VerifyError::Runtime)
}

/// Input or output metadata of a loaded model.
#[derive(Debug, Clone)]
pub struct IoInfo {
    /// Name.
    pub name: String,
    /// Element type, as ONNX Runtime prints it.
    pub elem: String,
    /// Dims: `Ok(n)` fixed, `Err(symbol)` symbolic.
    pub dims: Vec<Result<i64, String>>,
}

/// How much ONNX Runtime rewrites a graph when it loads it ([`Model::load_with`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionOptimization {
    /// Basic rewrites only (constant folding, redundant nodes): what optimum validates with.
    Basic,
    /// Every level, ONNX Runtime's default (its own load-time transformer fusions included).
    All,
}

/// A model loaded in ONNX Runtime.
pub struct Model {
    session: Session,
}

/// An int64 input tensor.
#[derive(Debug, Clone)]
pub struct I64Tensor {
    /// Shape.
    pub shape: Vec<i64>,
    /// Values, row-major.
    pub data: Vec<i64>,
}

/// A float output tensor.
#[derive(Debug, Clone)]
pub struct F32Tensor {
    /// Shape.
    pub shape: Vec<i64>,
    /// Values, row-major.
    pub data: Vec<f32>,
}

/// A model input of either element type ferry's exports take.
#[derive(Debug, Clone)]
pub enum Input {
    /// Token ids, masks, positions.
    I64(I64Tensor),
    /// Floats (e.g. a key/value cache).
    F32(F32Tensor),
}

impl Model {
    /// Runs the model on inputs of mixed element types, returning every float output.
    pub fn run_inputs(
        &mut self,
        inputs: &BTreeMap<String, Input>,
    ) -> Result<BTreeMap<String, F32Tensor>, VerifyError> {
        self.run_feed(Values::from_inputs(inputs)?.into_feed())
    }

    /// Loads `path` with basic graph optimizations (as optimum validates) on `threads`
    /// intra-op threads.
    pub fn load(path: &Path, threads: usize) -> Result<Self, VerifyError> {
        Self::load_with(path, threads, SessionOptimization::Basic)
    }

    /// Loads `path` on `threads` intra-op threads with the given level of ONNX Runtime's
    /// load-time graph rewriting.
    pub fn load_with(
        path: &Path,
        threads: usize,
        optimization: SessionOptimization,
    ) -> Result<Self, VerifyError> {
        let level = match optimization {
            SessionOptimization::Basic => GraphOptimizationLevel::Level1,
            SessionOptimization::All => GraphOptimizationLevel::All,
        };
        let env = environment()?;
        let session = Session::builder(&env)?
            .with_optimization_level(level)
            .map_err(|e| VerifyError::Ort(e.to_string()))?
            .with_intra_threads(threads)
            .map_err(|e| VerifyError::Ort(e.to_string()))?
            .commit_from_file(path)?;
        Ok(Self { session })
    }

    /// Loads `path` so that ONNX Runtime's own memory stays small whatever the model's
    /// size (the quantizer's accuracy report): no graph rewriting (constant folding would
    /// copy weights, e.g. every `Transpose` of one), no pre-packed weight copies
    /// (`session.disable_prepacking`), no arena and no memory pattern; weights in external
    /// data are then used where ONNX Runtime maps them.
    pub fn load_lean(path: &Path, threads: usize) -> Result<Self, VerifyError> {
        let env = environment()?;
        let session = Session::builder(&env)?
            .with_optimization_level(GraphOptimizationLevel::Disable)
            .map_err(|e| VerifyError::Ort(e.to_string()))?
            .with_intra_threads(threads)
            .map_err(|e| VerifyError::Ort(e.to_string()))?
            .with_memory_pattern(false)
            .map_err(|e| VerifyError::Ort(e.to_string()))?
            .with_config_entry("session.disable_prepacking", "1")
            .map_err(|e| VerifyError::Ort(e.to_string()))?
            .with_execution_providers([ort::ep::CPU::default().with_arena_allocator(false).build()])
            .map_err(|e| VerifyError::Ort(e.to_string()))?
            .commit_from_file(path)?;
        Ok(Self { session })
    }

    fn info(list: &[ort::value::Outlet]) -> Vec<IoInfo> {
        list.iter()
            .map(|o| {
                let (elem, dims) = match o.dtype() {
                    ValueType::Tensor {
                        ty,
                        shape,
                        dimension_symbols,
                    } => (
                        format!("{ty:?}"),
                        shape
                            .iter()
                            .enumerate()
                            .map(|(i, &d)| {
                                if d >= 0 {
                                    Ok(d)
                                } else {
                                    Err(dimension_symbols.get(i).cloned().unwrap_or_default())
                                }
                            })
                            .collect(),
                    ),
                    other => (format!("{other}"), Vec::new()),
                };
                IoInfo {
                    name: o.name().to_string(),
                    elem,
                    dims,
                }
            })
            .collect()
    }

    /// The model's inputs.
    pub fn inputs(&self) -> Vec<IoInfo> {
        Self::info(self.session.inputs())
    }

    /// The model's outputs.
    pub fn outputs(&self) -> Vec<IoInfo> {
        Self::info(self.session.outputs())
    }

    /// Runs a prepared feed, returning every float output by name.
    fn run_feed(
        &mut self,
        feed: Vec<(String, SessionInputValue<'_>)>,
    ) -> Result<BTreeMap<String, F32Tensor>, VerifyError> {
        let outs = self.session.run(feed)?;
        let mut result = BTreeMap::new();
        for (name, value) in outs.iter() {
            // float16 outputs (`--dtype fp16` exports) are widened exactly to f32.
            let t = chain::widen(&value)?;
            result.insert(name.to_string(), t);
        }
        Ok(result)
    }

    /// Runs the model on int64 inputs, returning every float output by name.
    pub fn run(
        &mut self,
        inputs: &BTreeMap<String, I64Tensor>,
    ) -> Result<BTreeMap<String, F32Tensor>, VerifyError> {
        let mut feed: Vec<(String, SessionInputValue<'_>)> = Vec::new();
        for (name, t) in inputs {
            let v = Tensor::from_array((t.shape.clone(), t.data.clone()))?;
            feed.push((name.clone(), SessionInputValue::from(v)));
        }
        self.run_feed(feed)
    }
}

/// Inputs and expected outputs, as `make_golden.py` saves them.
#[derive(Debug, Clone)]
pub struct Golden {
    /// Inputs by name (`input.` prefix removed).
    pub inputs: BTreeMap<String, I64Tensor>,
    /// Expected outputs by name (`output.` prefix removed).
    pub outputs: BTreeMap<String, F32Tensor>,
}

impl Golden {
    /// Reads a golden safetensors file.
    pub fn load(path: &Path) -> Result<Self, VerifyError> {
        let bad = |reason: String| VerifyError::Golden {
            path: path.to_path_buf(),
            reason,
        };
        let bytes = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
        let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| bad(e.to_string()))?;
        let mut g = Golden {
            inputs: BTreeMap::new(),
            outputs: BTreeMap::new(),
        };
        for (name, view) in st.tensors() {
            let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
            let data = view.data();
            if let Some(n) = name.strip_prefix("input.") {
                if view.dtype() != safetensors::Dtype::I64 {
                    return Err(bad(format!("{name} is not int64")));
                }
                let data = data
                    .chunks_exact(8)
                    .map(|c| i64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
                    .collect();
                g.inputs.insert(n.to_string(), I64Tensor { shape, data });
            } else if let Some(n) = name.strip_prefix("output.") {
                if view.dtype() != safetensors::Dtype::F32 {
                    return Err(bad(format!("{name} is not float32")));
                }
                let data = data
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes(c.try_into().unwrap_or([0; 4])))
                    .collect();
                g.outputs.insert(n.to_string(), F32Tensor { shape, data });
            }
        }
        if g.inputs.is_empty() || g.outputs.is_empty() {
            return Err(bad("no input.* or output.* tensors".into()));
        }
        Ok(g)
    }
}

/// How one output compared with its golden.
#[derive(Debug, Clone)]
pub struct OutputReport {
    /// Output name.
    pub name: String,
    /// Shape the model produced.
    pub shape: Vec<i64>,
    /// Largest absolute difference from the golden (infinite when shapes differ or a value
    /// is not finite).
    pub max_abs: f64,
}

/// Runs `model` on the golden inputs and reports max-abs per expected output.
pub fn compare(model: &mut Model, golden: &Golden) -> Result<Vec<OutputReport>, VerifyError> {
    compare_with_golden(&model.run(&golden.inputs)?, golden)
}

/// Reports max-abs per expected output of `golden` for outputs `got` of any engine (ONNX
/// Runtime's or another's run on the golden inputs); an expected output missing is an error.
pub fn compare_with_golden(
    got: &BTreeMap<String, F32Tensor>,
    golden: &Golden,
) -> Result<Vec<OutputReport>, VerifyError> {
    let mut reports = Vec::new();
    for (name, want) in &golden.outputs {
        let Some(have) = got.get(name) else {
            return Err(VerifyError::Check(format!(
                "model has no output `{name}` (it has: {})",
                got.keys().cloned().collect::<Vec<_>>().join(", ")
            )));
        };
        let max_abs = if have.shape != want.shape {
            f64::INFINITY
        } else {
            have.data
                .iter()
                .zip(&want.data)
                .map(|(a, b)| {
                    let d = (f64::from(*a) - f64::from(*b)).abs();
                    if d.is_nan() { f64::INFINITY } else { d }
                })
                .fold(0.0, f64::max)
        };
        reports.push(OutputReport {
            name: name.clone(),
            shape: have.shape.clone(),
            max_abs,
        });
    }
    Ok(reports)
}

/// What dummy inputs to make for [`check_dummy`].
#[derive(Debug, Clone)]
pub struct DummySpec {
    /// Batch size.
    pub batch: i64,
    /// Sequence lengths to run, one run each.
    pub sequence_lengths: Vec<i64>,
    /// Token ids are drawn below this.
    pub vocab_size: i64,
    /// Token type ids are drawn below this.
    pub type_vocab_size: i64,
}

/// The result of one dummy run.
#[derive(Debug, Clone)]
pub struct DummyRun {
    /// Sequence length used.
    pub sequence_length: i64,
    /// Output shapes by name.
    pub shapes: BTreeMap<String, Vec<i64>>,
}

/// Deterministic pseudo-random numbers for dummy inputs (splitmix64).
fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Cache length used for `past_sequence_length` in dummy runs.
const DUMMY_PAST: i64 = 2;
/// Number of choices used for `num_choices` in dummy runs.
const DUMMY_CHOICES: i64 = 2;

/// The size a named symbolic dim takes in a dummy run.
fn dummy_dim(symbol: &str, axis: usize, spec: &DummySpec, seq: i64) -> Option<i64> {
    match symbol {
        "batch_size" => Some(spec.batch),
        "sequence_length" => Some(seq),
        "past_sequence_length" => Some(DUMMY_PAST),
        "past_sequence_length + sequence_length" => Some(DUMMY_PAST + seq),
        "num_choices" => Some(DUMMY_CHOICES),
        "" if axis == 0 => Some(spec.batch),
        _ => None,
    }
}

/// Dummy inputs for every input of `model` at one sequence length: token ids below the
/// vocabulary, right-padded attention masks, positions counting from the cache length,
/// small random floats for cache inputs.
pub fn dummy_inputs(model: &Model, spec: &DummySpec, seq: i64) -> BTreeMap<String, Input> {
    let mut state = 0x5eed ^ seq as u64;
    let mut inputs = BTreeMap::new();
    let infos = model.inputs();
    let has_cache = infos.iter().any(|i| i.name.starts_with("past_key_values."));
    for info in &infos {
        let shape: Vec<i64> = info
            .dims
            .iter()
            .enumerate()
            .map(|(i, d)| match d {
                Ok(n) => *n,
                Err(sym) => dummy_dim(sym, i, spec, seq).unwrap_or(seq),
            })
            .collect();
        let n: i64 = shape.iter().product();
        let cols = shape.last().copied().unwrap_or(1).max(1);
        if info.elem.contains("Float") || info.elem.contains("f32") {
            let data = (0..n)
                .map(|_| (splitmix(&mut state) % 2000) as f32 / 1000.0 - 1.0)
                .collect();
            inputs.insert(info.name.clone(), Input::F32(F32Tensor { shape, data }));
            continue;
        }
        // Positions of new tokens start after the cache (inputs spanning cache + new tokens,
        // i.e. the attention mask, are not positions).
        let spans_cache = info
            .dims
            .iter()
            .any(|d| matches!(d, Err(s) if s.starts_with("past_sequence_length +")));
        let past = if has_cache && !spans_cache {
            DUMMY_PAST
        } else {
            0
        };
        let data = (0..n)
            .map(|i| {
                let (row, col) = (i / cols, i % cols);
                match info.name.as_str() {
                    // Later rows are padded: row r attends to cols - r positions (at least 1).
                    "attention_mask" => i64::from(col < (cols - row).max(1)),
                    "token_type_ids" => {
                        (splitmix(&mut state) % spec.type_vocab_size.max(1) as u64) as i64
                    }
                    "position_ids" => past + col,
                    _ => (splitmix(&mut state) % spec.vocab_size.max(1) as u64) as i64,
                }
            })
            .collect();
        inputs.insert(info.name.clone(), Input::I64(I64Tensor { shape, data }));
    }
    inputs
}

/// Runs dummy inputs at each sequence length and checks every output: its rank and fixed
/// dims match the model's declared output shape, symbolic batch/sequence dims equal the
/// input's, and every value is finite.
pub fn check_dummy(model: &mut Model, spec: &DummySpec) -> Result<Vec<DummyRun>, VerifyError> {
    let declared = model.outputs();
    let mut runs = Vec::new();
    for &seq in &spec.sequence_lengths {
        let inputs = dummy_inputs(model, spec, seq);
        let outs = model.run_inputs(&inputs)?;
        let mut shapes = BTreeMap::new();
        for d in &declared {
            let Some(o) = outs.get(&d.name) else {
                return Err(VerifyError::Check(format!("output `{}` missing", d.name)));
            };
            if o.shape.len() != d.dims.len() {
                return Err(VerifyError::Check(format!(
                    "output `{}` has rank {}, declared {}",
                    d.name,
                    o.shape.len(),
                    d.dims.len()
                )));
            }
            for (i, (got, want)) in o.shape.iter().zip(&d.dims).enumerate() {
                let expected = match want {
                    Ok(n) => Some(*n),
                    Err(s) => dummy_dim(s, i, spec, seq),
                };
                if let Some(e) = expected
                    && e != *got
                {
                    return Err(VerifyError::Check(format!(
                        "output `{}` dim {i} is {got}, expected {e} (sequence length {seq})",
                        d.name
                    )));
                }
            }
            if let Some(bad) = o.data.iter().find(|v| !v.is_finite()) {
                return Err(VerifyError::Check(format!(
                    "output `{}` has a non-finite value ({bad}) at sequence length {seq}",
                    d.name
                )));
            }
            shapes.insert(d.name.clone(), o.shape.clone());
        }
        runs.push(DummyRun {
            sequence_length: seq,
            shapes,
        });
    }
    Ok(runs)
}
