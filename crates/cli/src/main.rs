//! The `ferry` command: export Hugging Face transformers checkpoints to ONNX and check them.
//!
//! It only parses arguments, chains the stage crates (loader → tracer → onnx → verifier),
//! draws progress on stderr and turns errors into one line and exit code 1.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

mod common;
mod export;
mod metadata;
mod optimize;
mod run;
mod tokenizer;
mod verify;

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
        Command::Export(a) => export::export(&a),
        Command::Verify(a) => verify::verify(&a),
        Command::Run(a) => run::run(&a),
        Command::Optimize(a) => optimize::optimize(&a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(msg) => {
            eprintln!("error: {msg}");
            ExitCode::FAILURE
        }
    }
}
