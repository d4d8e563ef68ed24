//! `ferry export`: loader → tracer → ONNX or TorchScript writer (→ check).

use std::path::Path;
use std::time::Instant;

use crate::common::{check_output_path, done, human_bytes, stage};
use crate::{ExportArgs, Format, FrameworkArg, Precision, metadata};

pub fn export(a: &ExportArgs) -> Result<(), String> {
    if a.list {
        let table = ferry_tracer::support_table();
        crate::common::outln(table.strip_suffix('\n').unwrap_or(&table));
        return Ok(());
    }
    let (quantize, output) = quantize_mode(a)?;
    let (Some(model), Some(output)) = (a.model.as_deref(), output.as_deref()) else {
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
    if a.genai {
        crate::genai::check_args(a, output, quantize)?;
    } else if !output.is_dir() {
        // An existing folder is checked once the task is known (encoder-decoders write one).
        check_output_path(output)?;
    }
    let disabled = crate::optimize::disabled_fusions(&a.disable)?;
    let fixed_dims = static_dims(a)?;

    let pb = stage("load");
    pb.set_message(model.to_string());
    let opts = ferry_loader::ResolveOptions {
        revision: a.revision.clone(),
        progress: Some(std::sync::Arc::new(DownloadBar(pb.clone()))),
        ..Default::default()
    };
    let dir = ferry_loader::resolve(model, &opts).map_err(|e| e.to_string())?;
    let framework = match a.framework {
        FrameworkArg::Auto => ferry_loader::Framework::Auto,
        FrameworkArg::Pt => ferry_loader::Framework::Pt,
        FrameworkArg::Tf => ferry_loader::Framework::Tf,
    };
    let ckpt = ferry_loader::load_framework(&dir, framework).map_err(|e| e.to_string())?;
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
    let (weights, float_dtype, dtype_note) = export_weights(&ckpt.weights, &dtype, a.dtype)?;
    if a.format == Format::Torchscript
        && !ferry_tracer::exports_torchscript(&ckpt.config.model_type)
        && ferry_tracer::supported_architectures().contains(&ckpt.config.model_type.as_str())
    {
        return Err(format!(
            "TorchScript export is not available for `{}` (decoder LLMs and encoder-decoders export to ONNX only); drop --format torchscript",
            ckpt.config.model_type
        ));
    }
    if a.format == Format::Torchscript && float_dtype != ferry_ir::DType::F32 {
        return Err("TorchScript export is float32 only; use --dtype fp32".into());
    }

    let pb = stage("trace");
    let task = if a.genai {
        crate::genai::task(a, &ckpt.config)?
    } else {
        a.task
            .as_deref()
            .map(ferry_tracer::canonical_task)
            .unwrap_or_else(|| ferry_tracer::infer_task(&ckpt.config))
    };
    let trace_opts = ferry_tracer::TraceOptions {
        task: task.clone(),
        // TorchScript is generated from the opset-17 form (LayerNormalization as one op).
        opset: if a.format == Format::Torchscript {
            17
        } else {
            a.opset
        },
        float_dtype,
        fixed_dims,
        sentence: ckpt.sentence.clone(),
        token_embeddings_name: a.sentence_transformers_names,
        ..Default::default()
    };
    if let Some(parts) = crate::seq2seq::folder_parts(&ckpt.config.model_type, &task) {
        let export = crate::seq2seq::Export {
            model,
            dir: &dir,
            config: &ckpt.config,
            weights: &weights,
            trace: &trace_opts,
            parts,
            quantize,
            disabled,
            start,
            note: format!("{}, {dtype_note}", ckpt.format),
        };
        return crate::seq2seq::write(a, output, &export);
    }
    if !a.genai {
        // `--genai` checked its own OUTPUT above: its folder is made when written.
        check_output_path(output)?;
    }
    let graph =
        ferry_tracer::trace(&ckpt.config, &weights, &trace_opts).map_err(|e| e.to_string())?;
    done(pb, format!("{} nodes", graph.nodes.len()));

    if a.format == Format::Torchscript {
        if a.check || a.external_data || a.optimize || quantize.is_some() || a.json || a.genai {
            return Err(
                "--check, --external-data, --optimize, --quantize, --json and --genai apply to ONNX exports only"
                    .into(),
            );
        }
        return export_torchscript(a, output, &ckpt, &graph, &task, &dtype_note, start);
    }
    if a.genai {
        let export = crate::genai::Export {
            model,
            dir: &dir,
            config: &ckpt.config,
            graph: &graph,
            task: &task,
            quantize,
            disabled,
            start,
        };
        return crate::genai::write(a, output, &export);
    }

    let pb = stage("write");
    pb.set_message(output.display().to_string());
    let wopts = ferry_onnx::WriteOptions {
        external_data: crate::common::external_data(a.external_data),
        doc_string: format!("exported by ferry from {model}"),
        metadata: metadata::for_export(&dir, &ckpt.config, &task),
        ..Default::default()
    };
    let report = ferry_onnx::write_model(&graph, output, &wopts).map_err(|e| e.to_string())?;
    done(pb, human_bytes(report.model_bytes + report.data_bytes));

    if a.check {
        let pb = stage("check");
        let runs = run_check(output, &ckpt.config)?;
        done(pb, runs);
    }

    let (mut optimized_json, mut quantized_json) = (None, None);
    if a.optimize || quantize.is_some() {
        let opts = ferry_optimizer::OptimizeOptions {
            disabled,
            ..Default::default()
        };
        // `--quantize` implies `--optimize` and quantizes the optimized model.
        let result = optimize_export(output, &opts, a.external_data).and_then(|(path, json)| {
            optimized_json = Some(json);
            if let Some(mode) = quantize {
                let (_, q) =
                    crate::quantize::quantize_export(output, &path, a.external_data, mode)?;
                quantized_json = Some(q);
            }
            Ok(())
        });
        if let Err(e) = result {
            // No partial output: the plain export goes too.
            let _ = std::fs::remove_file(&report.model_path);
            if let Some(d) = &report.data_path {
                let _ = std::fs::remove_file(d);
            }
            return Err(e);
        }
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
    if a.json {
        let json = serde_json::json!({
            "model_type": ckpt.config.model_type,
            "task": task,
            "weights": ckpt.format.to_string(),
            "dtype": dtype_note,
            "parameters": graph.parameter_count(),
            "opset": a.opset,
            "ir_version": report.ir_version,
            "model": report.model_path.display().to_string(),
            "model_bytes": report.model_bytes,
            "data": report.data_path.as_ref().map(|d| d.display().to_string()),
            "data_bytes": report.data_bytes,
            "seconds": start.elapsed().as_secs_f64(),
            "check": a.check,
            "optimized": optimized_json,
            "quantized": quantized_json,
        });
        crate::common::outln(json);
    }
    Ok(())
}

/// `--quantize [MODE]`'s mode and OUTPUT. clap gives `--quantize OUTPUT` (no mode, the
/// output right after the flag) the output as the flag's value: a value that is no mode
/// is then the output, quantized with the default mode.
fn quantize_mode(
    a: &ExportArgs,
) -> Result<(Option<crate::QuantMode>, Option<std::path::PathBuf>), String> {
    use clap::ValueEnum;
    let Some(v) = a.quantize.as_deref() else {
        return Ok((None, a.output.clone()));
    };
    match crate::QuantMode::from_str(v, true) {
        Ok(mode) => Ok((Some(mode), a.output.clone())),
        Err(_) if a.output.is_none() => Ok((Some(crate::QuantMode::Int8), Some(v.into()))),
        Err(_) => Err(format!(
            "--quantize: unknown mode `{v}` (int8, int4 or fp16)"
        )),
    }
}

/// `--static-shapes`: the symbolic axes to fix (`batch_size`, `sequence_length`), after
/// checking the flags it combines with; empty without it.
fn static_dims(a: &ExportArgs) -> Result<std::collections::BTreeMap<String, i64>, String> {
    if !a.static_shapes {
        return Ok(Default::default());
    }
    if a.format == Format::Torchscript {
        return Err(
            "--static-shapes applies to ONNX exports (TorchScript traces are fixed-shape unless --dynamic-axes)"
                .into(),
        );
    }
    if a.check {
        return Err(
            "--check runs several sequence lengths and cannot be combined with --static-shapes"
                .into(),
        );
    }
    if a.batch_size < 1 || a.sequence_length < 1 || a.num_choices.is_some_and(|n| n < 1) {
        return Err("--batch-size, --sequence-length and --num-choices must be at least 1".into());
    }
    let defaults = ferry_tracer::TraceOptions::default();
    let mut dims: std::collections::BTreeMap<String, i64> = [
        (defaults.batch_axis, a.batch_size),
        (defaults.sequence_axis, a.sequence_length),
    ]
    .into();
    if let Some(n) = a.num_choices {
        dims.insert("num_choices".into(), n);
    }
    Ok(dims)
}

/// `--optimize`: reads the exported `output`, optimizes it and writes
/// `<stem>-optimized.onnx` beside it (external data as the export did), printing the pass
/// summary and the fused-operator statistics on stderr. Returns the optimized model's path
/// and the `--json` details.
pub fn optimize_export(
    output: &Path,
    opts: &ferry_optimizer::OptimizeOptions,
    external_data: bool,
) -> Result<(std::path::PathBuf, serde_json::Value), String> {
    let target = crate::common::sibling(output, "optimized");
    let o = crate::optimize::optimize_file(output, &target, opts, external_data)?;
    eprintln!("optimized {}: {}", target.display(), o.summary);
    eprintln!("{}", crate::optimize::fused_line(&o.fused));
    let json = serde_json::json!({
        "model": o.report.model_path.display().to_string(),
        "nodes_before": o.nodes.0,
        "nodes_after": o.nodes.1,
        "fused_operators": o.fused,
        "summary": o.summary,
    });
    Ok((o.report.model_path, json))
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
    let names =
        ferry_torchscript::state_dict_names(graph, &ckpt.weights, task != "feature-extraction");
    let report = ferry_torchscript::export(graph, &class, &shapes, a.torchscript, &names, output)
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

/// Shows hub downloads on the `load` stage's bar: bytes of the file being fetched.
struct DownloadBar(indicatif::ProgressBar);

impl ferry_loader::DownloadProgress for DownloadBar {
    fn start(&self, file: &str, bytes: u64) {
        self.0.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} {prefix:>6} {msg} {bar:30} {bytes}/{total_bytes} {bytes_per_sec}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        self.0.set_position(0);
        self.0.set_length(bytes);
        self.0.set_message(format!("downloading {file}"));
    }

    fn advance(&self, _file: &str, done: u64, total: u64) {
        if total > 0 {
            self.0.set_length(total);
        }
        self.0.set_position(done);
    }

    fn finish(&self, file: &str) {
        self.0.set_message(format!("{file} cached"));
    }
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

/// The weights to trace for `--dtype`, the graph's compute dtype, and how the summary
/// describes them. Tensors whose type changes are converted as they stream
/// (`Weights::floats_as`); the others stay borrowed from the checkpoint.
/// - `fp32`: float32 weights and compute;
/// - `fp16`: float16 weights, compute and outputs;
/// - `bf16`: bfloat16 weights, each cast to float32 where it is used (ONNX Runtime's CPU
///   provider has no bfloat16 arithmetic kernels), float32 compute and outputs;
/// - `keep`: one of the above, whichever the checkpoint's float tensors are stored in.
fn export_weights(
    weights: &ferry_ir::Weights,
    dtype: &str,
    precision: Precision,
) -> Result<(ferry_ir::Weights, ferry_ir::DType, String), String> {
    use ferry_ir::DType;
    let target = match precision {
        Precision::Fp32 => DType::F32,
        Precision::Fp16 => DType::F16,
        Precision::Bf16 => DType::BF16,
        Precision::Keep => match dtype {
            "float32" => DType::F32,
            "float16" => DType::F16,
            "bfloat16" => DType::BF16,
            _ => {
                return Err(format!(
                    "--dtype keep: the checkpoint mixes float types ({dtype}); choose --dtype fp32, fp16 or bf16"
                ));
            }
        },
    };
    let compute = if target == DType::F16 {
        DType::F16
    } else {
        DType::F32
    };
    let note = if dtype == target.to_string() {
        dtype.to_string()
    } else {
        format!("{dtype} -> {target}")
    };
    let note = if target == DType::BF16 {
        format!("{note}, float32 compute")
    } else {
        note
    };
    Ok((weights.floats_as(target), compute, note))
}

pub fn run_check(path: &Path, config: &ferry_ir::ModelConfig) -> Result<String, String> {
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
