//! The `ferry` command: export Hugging Face transformers checkpoints to ONNX and check them.
//!
//! It only parses arguments, chains the stage crates (loader → tracer → onnx → verifier),
//! draws progress on stderr and turns errors into one line and exit code 1.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

mod common;
mod export;
mod genai;
mod metadata;
mod optimize;
mod quantize;
mod run;
mod seq2seq;
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
    /// into ONNX Runtime contrib ops (Gelu, BiasGelu, FastGelu, LayerNormalization,
    /// SkipLayerNormalization, Attention, MultiHeadAttention, EmbedLayerNormalization), evaluate constant
    /// subgraphs (shape arithmetic), remove dead nodes and unused initializers; print ONNX
    /// Runtime-style fused-operator statistics.
    Optimize(OptimizeArgs),
    /// Quantize any ONNX model (int8 dynamic by default, as ONNX Runtime's
    /// `quantize_dynamic`), then compare it with the float model in ONNX Runtime.
    Quantize(QuantizeArgs),
}

/// `ferry quantize` (its options are also `ferry export --quantize`'s).
#[derive(Debug, Args)]
struct QuantizeArgs {
    /// The float32 ONNX model to read (external data is read from beside it).
    input: std::path::PathBuf,
    /// Where to write the quantized model.
    output: std::path::PathBuf,
    /// `int8`: dynamic quantization (int8 weights; activations quantized at run time;
    /// MatMul → MatMulInteger, Attention → QAttention, EmbedLayerNormalization →
    /// QEmbedLayerNormalization, Gather tables uint8). `int4`: weight-only MatMulNBits.
    /// `fp16`: float16 weights and compute.
    #[arg(long, value_enum, default_value_t = QuantMode::Int8)]
    mode: QuantMode,
    /// int8: one scale per output channel of each weight (and per column of lookup tables).
    /// This is the DEFAULT (the flag is accepted for clarity): at no extra size it keeps
    /// sentence embeddings within 0.99 cosine of float32, where per-tensor scales (ONNX
    /// Runtime's default) do not. Turn it off with --no-per-channel.
    #[arg(long, overrides_with = "no_per_channel")]
    per_channel: bool,
    /// int8: one scale per weight tensor (ONNX Runtime's `quantize_dynamic` default).
    #[arg(long, overrides_with = "per_channel")]
    no_per_channel: bool,
    /// int8: 7-bit weight ranges (ONNX Runtime's `reduce_range`, for CPUs without VNNI).
    #[arg(long)]
    reduce_range: bool,
    /// int8: weight type; int8 is symmetric, uint8 asymmetric (as ONNX Runtime).
    #[arg(long, value_enum, default_value_t = WeightType::Int8)]
    weight_type: WeightType,
    /// Node names to leave in float.
    #[arg(long, num_args = 1.., value_name = "NODE")]
    exclude: Vec<String>,
    /// int4: weights per block along K (a power of two ≥ 16; 32, 64 and 128 are usual).
    #[arg(long, default_value_t = ferry_quantizer::int4::Int4Options::default().block_size)]
    block_size: usize,
    /// int4: symmetric blocks (no zero points) instead of min/max with zero points.
    #[arg(long)]
    symmetric: bool,
    /// int4: `accuracy_level` of the MatMulNBits nodes (0 unset, 1 fp32, 2 fp16, 3 bf16,
    /// 4 int8 compute of the activations).
    #[arg(long, value_parser = clap::value_parser!(i64).range(0..=4))]
    accuracy_level: Option<i64>,
    /// int4: keep embedding tables (`Gather` of a constant table) in float instead of
    /// `GatherBlockQuantized` (a tied LM head then quantizes its own copy).
    #[arg(long)]
    float_embeddings: bool,
    /// Golden safetensors file whose inputs the accuracy report runs (default: dummy inputs).
    #[arg(long)]
    golden: Option<std::path::PathBuf>,
    /// Skip the accuracy report (it needs ONNX Runtime).
    #[arg(long)]
    no_report: bool,
    /// Memory the accuracy report may use, in MiB (default: an eighth of physical memory).
    /// ONNX Runtime maps the weights of both models where they lie on disk, so only their
    /// inline bytes count; above the budget the report is skipped with a one-line reason.
    #[arg(long, value_name = "MIB")]
    report_budget: Option<u64>,
    /// Print the summary and accuracy report as JSON.
    #[arg(long)]
    json: bool,
    /// Write weights to `OUTPUT_data` (automatic past protobuf's 2 GiB limit).
    #[arg(long)]
    external_data: bool,
}

/// `ferry quantize --mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum QuantMode {
    /// int8 dynamic quantization.
    Int8,
    /// int4 weight-only (MatMulNBits).
    Int4,
    /// float16.
    Fp16,
}

/// `ferry quantize --weight-type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum WeightType {
    /// Signed, symmetric.
    Int8,
    /// Unsigned, asymmetric.
    Uint8,
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
    /// Fusions to skip, by ONNX Runtime's names: gelu, bias-gelu, fast-gelu, layer-norm,
    /// skip-layer-norm, attention, multi-head-attention, embed-layer-norm,
    /// simplified-layer-norm, skip-simplified-layer-norm, packed-qkv, group-query-attention,
    /// rotary-embedding (repeatable or comma-separated; `_` for `-` and the fused op type are
    /// accepted too).
    #[arg(long, value_delimiter = ',', value_name = "FUSION")]
    disable: Vec<String>,
    /// Print the summary and fused-operator statistics as JSON on stdout (human text goes
    /// to stderr).
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct RunArgs {
    /// The ONNX model (from `ferry export`, which records its task, labels and checkpoint),
    /// or an encoder-decoder export folder (optimum's layout: translation, summarization).
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
    /// Most tokens to generate (text-generation: default 20; an encoder-decoder folder:
    /// default from its generation config and the task's `task_specific_params`).
    #[arg(long)]
    max_new_tokens: Option<usize>,
    /// Encoder-decoder folder: beams of beam search (1: greedy; default from the generation
    /// config and the task's `task_specific_params`).
    #[arg(long)]
    num_beams: Option<usize>,
    /// Encoder-decoder folder: `generate`'s `max_length` (the decoder start token included).
    #[arg(long)]
    max_length: Option<usize>,
    /// Encoder-decoder folder: `generate`'s `min_length`.
    #[arg(long)]
    min_length: Option<usize>,
    /// Task, for models without ferry's metadata (optimum's names); for an encoder-decoder
    /// folder the pipeline (`translation_en_to_fr`, `summarization`, … or
    /// `text2text-generation`, the default), whose `task_specific_params` apply.
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
    /// Which weights to read: `pt` (model.safetensors or pytorch_model.bin), `tf`
    /// (tf_model.h5, TensorFlow/Keras HDF5), or `auto`: safetensors, then
    /// pytorch_model.bin, then tf_model.h5, as transformers does.
    #[arg(long, value_enum, default_value_t = FrameworkArg::Auto)]
    framework: FrameworkArg,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Onnx)]
    format: Format,
    /// Precision: `fp32` converts float16/bfloat16 checkpoint tensors to float32 while
    /// streaming them; `fp16` computes in float16 (float32/bfloat16 weights converted while
    /// streaming); `bf16` stores bfloat16 weights, cast to float32 where used (ONNX Runtime's
    /// CPU provider has no bfloat16 kernels); `keep` is the checkpoint's own dtype.
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
    /// Batch size of a fixed-shape TorchScript trace, or of `--static-shapes`.
    #[arg(long, default_value_t = 1)]
    batch_size: i64,
    /// Sequence length of a fixed-shape TorchScript trace, or of `--static-shapes`.
    #[arg(long, default_value_t = 128)]
    sequence_length: i64,
    /// ONNX: fix the batch and sequence axes to `--batch-size` and `--sequence-length` in
    /// every input, output and intermediate shape (the model then runs at that shape
    /// only; `--optimize` folds its shape arithmetic away).
    #[arg(long)]
    static_shapes: bool,
    /// With `--static-shapes`, multiple-choice: also fix the `num_choices` axis.
    #[arg(long, requires = "static_shapes")]
    num_choices: Option<i64>,
    /// feature-extraction: name the token states `token_embeddings` (as optimum does when
    /// it exports with the sentence-transformers library) instead of `last_hidden_state`
    /// (which transformers.js and optimum's ORTModelForFeatureExtraction read).
    #[arg(long)]
    sentence_transformers_names: bool,
    /// ONNX: also write `<stem>-optimized.onnx` beside OUTPUT, as `ferry optimize` would
    /// (fusions into ONNX Runtime contrib ops, constant folding), and print its
    /// fused-operator statistics.
    #[arg(long)]
    optimize: bool,
    /// ONNX: also write `<stem>-quantized.onnx`: the optimized model (implies `--optimize`)
    /// quantized as `ferry quantize --mode MODE` does with its defaults (`int8`, the default:
    /// per-channel weights; `int4`; `fp16`), with an accuracy report against the float export
    /// on dummy inputs. With `--genai`, the folder's model is the quantized one.
    #[arg(long, num_args = 0..=1, default_missing_value = "int8", value_name = "MODE")]
    quantize: Option<String>,
    /// Write the folder onnxruntime-genai loads (OUTPUT must be `DIR/model.onnx`): the
    /// decoder with its cache, optimized (and quantized with `--quantize int4`, as its model
    /// builder does for CPU: block 32, symmetric, accuracy level 4), `genai_config.json`
    /// from the checkpoint's `config.json` and `generation_config.json`, and its tokenizer
    /// files.
    #[arg(long)]
    genai: bool,
    /// ONNX: print what was written as JSON on stdout (files, parameters, and with
    /// `--optimize` / `--quantize` the fused-operator statistics and the accuracy report);
    /// the human summary stays on stderr.
    #[arg(long)]
    json: bool,
    /// With `--optimize`: fusions to skip (see `ferry optimize --disable`).
    #[arg(
        long,
        value_delimiter = ',',
        value_name = "FUSION",
        requires = "optimize"
    )]
    disable: Vec<String>,
    /// Output file (`.onnx`, or `.pt` with `--format torchscript`); for an encoder-decoder
    /// (t5, mt5, bart, mbart, marian) with a text2text-generation task, a folder in
    /// optimum's layout (`encoder_model.onnx`, `decoder_model.onnx`, …; `--optimize` /
    /// `--quantize` add `-optimized` / `-quantized` siblings of each file in it).
    output: Option<PathBuf>,
}

/// `ferry export --framework`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum FrameworkArg {
    /// PyTorch weights if the checkpoint has them, else tf_model.h5.
    Auto,
    /// PyTorch weights (model.safetensors, pytorch_model.bin).
    Pt,
    /// TensorFlow weights (tf_model.h5).
    Tf,
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
    /// Float16 weights, compute and outputs.
    Fp16,
    /// Bfloat16 weights, each cast to float32 at its use; float32 compute and outputs.
    Bf16,
    /// The checkpoint's own dtype (fp32, fp16 or bf16 as above).
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

/// Exit code of an internal error (a panic): `EX_SOFTWARE` of sysexits.h, distinct from
/// the 1 of an error in the input and from Rust's default 101.
const EXIT_INTERNAL_ERROR: u8 = 70;

/// The one line a panic prints: `internal error: <message> (at <file:line>); please
/// report`, the message's lines joined.
fn internal_error_line(
    payload: &(dyn std::any::Any + Send),
    location: Option<&std::panic::Location<'_>>,
) -> String {
    let msg = payload
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("panic with a non-text payload");
    let msg = msg.split_whitespace().collect::<Vec<_>>().join(" ");
    let at = location.map_or(String::new(), |l| {
        format!(" (at {}:{})", l.file(), l.line())
    });
    format!("internal error: {msg}{at}; please report")
}

fn main() -> ExitCode {
    // Last line of defence: a bug is one line and exit code 70, not a Rust backtrace
    // hint and 101. The panic unwinds to here first, so a half-written output's
    // temporary file is removed as on any error.
    std::panic::set_hook(Box::new(|info| {
        eprintln!("{}", internal_error_line(info.payload(), info.location()));
    }));
    let cli = Cli::parse();
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| match cli.command {
        Command::Export(a) => export::export(&a),
        Command::Verify(a) => verify::verify(&a),
        Command::Run(a) => run::run(&a),
        Command::Optimize(a) => optimize::optimize(&a),
        Command::Quantize(a) => quantize::quantize(&a),
    }));
    match result {
        Ok(Ok(())) => ExitCode::SUCCESS,
        Ok(Err(msg)) => {
            eprintln!("error: {msg}");
            ExitCode::FAILURE
        }
        Err(_) => ExitCode::from(EXIT_INTERNAL_ERROR),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_is_one_line_asking_for_a_report() {
        let here = std::panic::Location::caller();
        let line = internal_error_line(&"index out of bounds:\n  the len is 1", Some(here));
        assert_eq!(
            line,
            format!(
                "internal error: index out of bounds: the len is 1 (at {}:{}); please report",
                here.file(),
                here.line()
            )
        );
        let owned: Box<dyn std::any::Any + Send> = Box::new(String::from("boom"));
        assert_eq!(
            internal_error_line(owned.as_ref(), None),
            "internal error: boom; please report"
        );
        assert_eq!(
            internal_error_line(&42u8, None),
            "internal error: panic with a non-text payload; please report"
        );
        assert_eq!(EXIT_INTERNAL_ERROR, 70);
    }
}
