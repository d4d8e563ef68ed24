//! The `ferry` command: export Hugging Face transformers checkpoints to ONNX and check them.
//!
//! It only parses arguments, chains the stage crates (loader → tracer → onnx → verifier),
//! draws progress on stderr and turns errors into one line and exit code 1.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};

mod metadata;
mod run;
mod tokenizer;

/// Export Hugging Face transformers models to ONNX, without Python.
#[derive(Debug, Parser)]
#[command(name = "ferry", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Export a checkpoint to ONNX.
    Export(ExportArgs),
    /// Run an ONNX model on a golden file's inputs and compare with its outputs.
    Verify(VerifyArgs),
    /// Run an exported model on text and print the task's answer (as the transformers
    /// pipeline for the task gives it).
    Run(RunArgs),
    /// Optimize any ONNX model: fold constants (and transposed weights), fuse exact patterns
    /// into ONNX Runtime contrib ops (Gelu, BiasGelu, FastGelu, SkipLayerNormalization),
    /// remove dead nodes and unused initializers.
    Optimize(OptimizeArgs),
}

#[derive(Debug, Args)]
struct OptimizeArgs {
    /// The ONNX model to read (external data is read from beside it).
    input: PathBuf,
    /// Where to write the optimized model.
    output: PathBuf,
    /// Write weights to `OUTPUT_data` (automatic past protobuf's 2 GiB limit).
    #[arg(long)]
    external_data: bool,
    /// After fusion, replace Gelu with FastGelu and BiasGelu with FastGelu plus bias (ONNX
    /// Runtime's `enable_gelu_approximation`). Approximate: the tanh GELU differs from the
    /// exact erf GELU, so outputs change by up to about 1e-3.
    #[arg(long)]
    gelu_approximation: bool,
}

#[derive(Debug, Args)]
struct RunArgs {
    /// The ONNX model (from `ferry export`, which records its task, labels and checkpoint).
    model: PathBuf,
    /// Input text: the sentence (fill-mask: with the mask token), the question
    /// (question-answering), the prompt (text-generation, multiple-choice).
    #[arg(long)]
    text: String,
    /// Second text: question-answering's context or a text-classification pair; for
    /// multiple-choice, give one per choice.
    #[arg(long = "text-pair")]
    text_pair: Vec<String>,
    /// Tokenizer directory (tokenizer.json, or vocab.txt for WordPiece). Default: the
    /// checkpoint directory the model was exported from.
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Print the answer as JSON.
    #[arg(long)]
    json: bool,
    /// text-generation: most tokens to generate (greedy).
    #[arg(long, default_value_t = 20)]
    max_new_tokens: usize,
    /// Task, for models without ferry's metadata (optimum's names).
    #[arg(long)]
    task: Option<String>,
    /// token-classification: how tokens are grouped into entities (the pipeline's
    /// `aggregation_strategy`).
    #[arg(long, value_enum, default_value_t = run::Aggregation::None)]
    aggregation: run::Aggregation,
}

#[derive(Debug, Args)]
struct ExportArgs {
    /// Print the supported architecture × task table and exit.
    #[arg(long)]
    list: bool,
    /// Checkpoint directory, or a model id (Hugging Face cache, else downloaded).
    #[arg(long, short, required_unless_present = "list")]
    model: Option<String>,
    /// Task to export (optimum's names; seed pipeline names such as `sentiment-analysis`
    /// and `ner` accepted). Default: inferred from `config.architectures`.
    #[arg(long)]
    task: Option<String>,
    /// ONNX opset (14–21).
    #[arg(long, default_value_t = ferry_onnx::DEFAULT_OPSET)]
    opset: i64,
    /// Put weights in one side file (`OUTPUT_data`) in ONNX's external-data format.
    /// Done automatically when the model would exceed protobuf's 2 GiB limit.
    #[arg(long)]
    external_data: bool,
    /// Load the result in ONNX Runtime and run dummy inputs at two sequence lengths.
    #[arg(long)]
    check: bool,
    /// Hub revision (branch, tag or commit) when `--model` is a model id.
    #[arg(long)]
    revision: Option<String>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Onnx)]
    format: Format,
    /// Weight precision: `fp32` converts float16/bfloat16 checkpoint tensors to float32
    /// while streaming them; `keep` exports the checkpoint's dtypes unchanged (float32
    /// checkpoints only, for now).
    #[arg(long, value_enum, default_value_t = Precision::Fp32)]
    dtype: Precision,
    /// TorchScript: untie tied weights (each use gets its own cloned parameter), as
    /// transformers' `torchscript=True` flag does.
    #[arg(long)]
    torchscript: bool,
    /// TorchScript: write size-generic code so one archive serves every batch size and
    /// sequence length (default: a fixed-shape trace, as `torch.jit.trace` produces).
    #[arg(long)]
    dynamic_axes: bool,
    /// Batch size of a fixed-shape TorchScript trace.
    #[arg(long, default_value_t = 1)]
    batch_size: i64,
    /// Sequence length of a fixed-shape TorchScript trace.
    #[arg(long, default_value_t = 128)]
    sequence_length: i64,
    /// Output file (`.onnx`, or `.pt` with `--format torchscript`).
    #[arg(required_unless_present = "list")]
    output: Option<PathBuf>,
}

/// Output formats of `ferry export`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Format {
    /// ONNX (`.onnx`), for ONNX Runtime and other ONNX consumers.
    Onnx,
    /// TorchScript archive (`.pt`), for `torch.jit.load` in Python or libtorch.
    Torchscript,
}

/// `ferry export --dtype`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Precision {
    /// Float32 weights and compute (half-precision tensors upcast while streaming).
    Fp32,
    /// The checkpoint's own dtypes.
    Keep,
}

#[derive(Debug, Args)]
struct VerifyArgs {
    /// The ONNX model.
    model: PathBuf,
    /// Golden safetensors file (`input.*` and `output.*` tensors).
    golden: PathBuf,
    /// Maximum absolute difference allowed.
    #[arg(long, default_value_t = 1e-5)]
    atol: f64,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Export(a) => export(&a),
        Command::Verify(a) => verify(&a),
        Command::Run(a) => run::run(&a),
        Command::Optimize(a) => optimize(&a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(msg) => {
            eprintln!("error: {msg}");
            ExitCode::FAILURE
        }
    }
}

/// A spinner for one stage on stderr (hidden when stderr is not a terminal).
fn stage(name: &str) -> ProgressBar {
    let pb = ProgressBar::new_spinner();
    pb.set_style(
        ProgressStyle::with_template("{spinner} {prefix:>6} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
    );
    pb.set_prefix(name.to_string());
    pb.enable_steady_tick(Duration::from_millis(100));
    pb
}

fn done(pb: ProgressBar, msg: String) {
    pb.finish_and_clear();
    if console_is_tty() {
        eprintln!("  {:>6} {msg}", pb.prefix());
    }
}

fn console_is_tty() -> bool {
    use std::io::IsTerminal;
    std::io::stderr().is_terminal()
}

fn human_bytes(n: u64) -> String {
    let n = n as f64;
    if n >= 1e9 {
        format!("{:.2} GB", n / 1e9)
    } else if n >= 1e6 {
        format!("{:.1} MB", n / 1e6)
    } else if n >= 1e3 {
        format!("{:.1} kB", n / 1e3)
    } else {
        format!("{n} B")
    }
}

fn export(a: &ExportArgs) -> Result<(), String> {
    if a.list {
        print!("{}", ferry_tracer::support_table());
        return Ok(());
    }
    let (Some(model), Some(output)) = (a.model.as_deref(), a.output.as_deref()) else {
        return Err("--model and OUTPUT are required".into());
    };
    let start = Instant::now();
    if !(ferry_onnx::MIN_OPSET..=ferry_onnx::MAX_OPSET).contains(&a.opset) {
        return Err(format!(
            "opset {} is not supported (ferry writes opsets {}..={})",
            a.opset,
            ferry_onnx::MIN_OPSET,
            ferry_onnx::MAX_OPSET
        ));
    }
    check_output_path(output)?;

    let pb = stage("load");
    pb.set_message(model.to_string());
    let opts = ferry_loader::ResolveOptions {
        revision: a.revision.clone(),
        ..Default::default()
    };
    let dir = ferry_loader::resolve(model, &opts).map_err(|e| e.to_string())?;
    let ckpt = ferry_loader::load(&dir).map_err(|e| e.to_string())?;
    let dtype = checkpoint_dtype(&ckpt.weights);
    done(
        pb,
        format!(
            "{} ({} tensors, {}, {dtype})",
            dir.display(),
            ckpt.weights.len(),
            ckpt.format
        ),
    );
    let (weights, dtype_note) = export_weights(&ckpt.weights, &dtype, a.dtype)?;

    let pb = stage("trace");
    let task = a
        .task
        .as_deref()
        .map(ferry_tracer::canonical_task)
        .unwrap_or_else(|| ferry_tracer::infer_task(&ckpt.config));
    let trace_opts = ferry_tracer::TraceOptions {
        task: task.clone(),
        // TorchScript is generated from the opset-17 form (LayerNormalization as one op).
        opset: if a.format == Format::Torchscript {
            17
        } else {
            a.opset
        },
        ..Default::default()
    };
    let graph =
        ferry_tracer::trace(&ckpt.config, &weights, &trace_opts).map_err(|e| e.to_string())?;
    done(pb, format!("{} nodes", graph.nodes.len()));

    if a.format == Format::Torchscript {
        return export_torchscript(a, output, &ckpt, &graph, &task, &dtype_note, start);
    }

    let pb = stage("write");
    pb.set_message(output.display().to_string());
    let wopts = ferry_onnx::WriteOptions {
        external_data: if a.external_data {
            ferry_onnx::ExternalData::Always
        } else {
            ferry_onnx::ExternalData::Auto
        },
        doc_string: format!("exported by ferry from {model}"),
        metadata: metadata::for_export(&dir, &ckpt.config, &task),
    };
    let report = ferry_onnx::write_model(&graph, output, &wopts).map_err(|e| e.to_string())?;
    done(pb, human_bytes(report.model_bytes + report.data_bytes));

    if a.check {
        let pb = stage("check");
        let runs = run_check(output, &ckpt.config)?;
        done(pb, runs);
    }

    let mut files = format!("{} ({})", output.display(), human_bytes(report.model_bytes));
    if let Some(d) = &report.data_path {
        files.push_str(&format!(
            " + {} ({})",
            d.display(),
            human_bytes(report.data_bytes)
        ));
    }
    eprintln!(
        "exported {} [{}, {dtype_note}] task {}: {} parameters, opset {} (IR {}), {} in {:.2}s{}",
        ckpt.config.model_type,
        ckpt.format,
        task,
        graph.parameter_count(),
        a.opset,
        report.ir_version,
        files,
        start.elapsed().as_secs_f64(),
        if a.check { ", check passed" } else { "" }
    );
    Ok(())
}

fn export_torchscript(
    a: &ExportArgs,
    output: &Path,
    ckpt: &ferry_loader::Checkpoint,
    graph: &ferry_ir::Graph,
    task: &str,
    dtype_note: &str,
    start: Instant,
) -> Result<(), String> {
    if a.check || a.external_data {
        return Err("--check and --external-data apply to ONNX exports only".into());
    }
    if !a.dynamic_axes && (a.batch_size < 1 || a.sequence_length < 1) {
        return Err("--batch-size and --sequence-length must be at least 1".into());
    }
    let shapes = if a.dynamic_axes {
        ferry_torchscript::Shapes::Dynamic
    } else {
        ferry_torchscript::Shapes::Fixed(
            [
                ("batch_size".to_string(), a.batch_size),
                ("sequence_length".to_string(), a.sequence_length),
            ]
            .into(),
        )
    };
    let class = ferry_tracer::model_class_name(&ckpt.config.model_type, task);
    let pb = stage("write");
    pb.set_message(output.display().to_string());
    let report = ferry_torchscript::export(graph, &class, &shapes, a.torchscript, output)
        .map_err(|e| e.to_string())?;
    done(pb, human_bytes(report.bytes));
    let shape_note = if a.dynamic_axes {
        "dynamic axes".to_string()
    } else {
        format!("fixed shape {}x{}", a.batch_size, a.sequence_length)
    };
    eprintln!(
        "exported {} [{}, {dtype_note}] task {} as TorchScript ({class}, {shape_note}): {} parameters, {} tensors, {} ({}) in {:.2}s",
        ckpt.config.model_type,
        ckpt.format,
        task,
        graph.parameter_count(),
        report.tensors,
        output.display(),
        human_bytes(report.bytes),
        start.elapsed().as_secs_f64(),
    );
    Ok(())
}

/// The floating-point dtype(s) of a checkpoint's weights, e.g. `float16` or
/// `float16+float32` (integer buffers such as `position_ids` are not counted).
fn checkpoint_dtype(weights: &ferry_ir::Weights) -> String {
    let mut names: Vec<String> = weights
        .iter()
        .filter(|t| t.dtype.is_float())
        .map(|t| t.dtype.to_string())
        .collect();
    names.sort();
    names.dedup();
    if names.is_empty() {
        "float32".into()
    } else {
        names.join("+")
    }
}

/// The weights to trace for `--dtype`, and how the summary describes them: with `fp32`,
/// half-precision tensors become float32 as they are streamed (see
/// `Weights::upcast_to_f32`); `keep` refuses them, as ferry has no fp16 compute yet.
fn export_weights(
    weights: &ferry_ir::Weights,
    dtype: &str,
    precision: Precision,
) -> Result<(ferry_ir::Weights, String), String> {
    let half = weights
        .iter()
        .any(|t| matches!(t.dtype, ferry_ir::DType::F16 | ferry_ir::DType::BF16));
    match (precision, half) {
        (_, false) => Ok((weights.clone(), dtype.to_string())),
        (Precision::Fp32, true) => Ok((weights.upcast_to_f32(), format!("{dtype} -> float32"))),
        (Precision::Keep, true) => Err(format!(
            "--dtype keep: the checkpoint is {dtype}, and fp16/bf16 compute is not supported yet; export with --dtype fp32 (the default)"
        )),
    }
}

/// Fails early (before any work) when the output cannot be written.
fn check_output_path(out: &Path) -> Result<(), String> {
    if out.file_name().is_none() {
        return Err(format!("output {} is not a file path", out.display()));
    }
    if out.is_dir() {
        return Err(format!("output {} is a directory", out.display()));
    }
    let dir = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    if !dir.is_dir() {
        return Err(format!(
            "cannot write {}: directory {} does not exist",
            out.display(),
            dir.display()
        ));
    }
    Ok(())
}

fn run_check(path: &Path, config: &ferry_ir::ModelConfig) -> Result<String, String> {
    let mut model = ferry_verifier::Model::load(path, 2).map_err(|e| e.to_string())?;
    let spec = ferry_verifier::DummySpec {
        batch: 2,
        sequence_lengths: vec![8, 13],
        vocab_size: config.vocab_size.unwrap_or(2),
        type_vocab_size: config.type_vocab_size.unwrap_or(1),
    };
    let runs = ferry_verifier::check_dummy(&mut model, &spec).map_err(|e| e.to_string())?;
    let parts: Vec<String> = runs
        .iter()
        .map(|r| {
            let shapes: Vec<String> = r.shapes.iter().map(|(k, v)| format!("{k} {v:?}")).collect();
            format!("seq {}: {}", r.sequence_length, shapes.join(", "))
        })
        .collect();
    Ok(parts.join("; "))
}

fn verify(a: &VerifyArgs) -> Result<(), String> {
    let golden = ferry_verifier::Golden::load(&a.golden).map_err(|e| e.to_string())?;
    let mut model = ferry_verifier::Model::load(&a.model, 2).map_err(|e| e.to_string())?;
    let reports = ferry_verifier::compare(&mut model, &golden).map_err(|e| e.to_string())?;
    let mut worst = 0.0f64;
    for r in &reports {
        println!(
            "{:<20} {:<16} max-abs {:.3e}",
            r.name,
            format!("{:?}", r.shape),
            r.max_abs
        );
        worst = worst.max(r.max_abs);
    }
    if worst > a.atol {
        return Err(format!(
            "{}: max-abs {worst:.3e} exceeds {:.1e}",
            a.model.display(),
            a.atol
        ));
    }
    Ok(())
}

fn optimize(a: &OptimizeArgs) -> Result<(), String> {
    check_output_path(&a.output)?;
    // The output may replace the input: it is written under a temporary name and renamed,
    // and the input's mapped bytes stay valid after the rename.
    let pb = stage("reading");
    let model = ferry_onnx::read_model(&a.input).map_err(|e| e.to_string())?;
    let mut graph = model.graph;
    let before = graph.nodes.len();
    done(pb, format!("read {} ({before} nodes)", a.input.display()));
    let pb = stage("optimizing");
    let opts = ferry_optimizer::OptimizeOptions {
        gelu_approximation: a.gelu_approximation,
    };
    let stats = ferry_optimizer::optimize_with(&mut graph, &opts).map_err(|e| e.to_string())?;
    let summary = format!("{stats} ({before} → {} nodes)", graph.nodes.len());
    done(pb, summary.clone());
    let pb = stage("writing");
    let opts = ferry_onnx::WriteOptions {
        external_data: if a.external_data {
            ferry_onnx::ExternalData::Always
        } else {
            ferry_onnx::ExternalData::Auto
        },
        doc_string: model.info.doc_string,
        metadata: model.info.metadata,
    };
    let report = ferry_onnx::write_model(&graph, &a.output, &opts).map_err(|e| e.to_string())?;
    done(
        pb,
        format!(
            "wrote {} ({})",
            report.model_path.display(),
            human_bytes(report.model_bytes + report.data_bytes)
        ),
    );
    println!("{summary}");
    Ok(())
}
