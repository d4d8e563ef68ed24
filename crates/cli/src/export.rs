//! `ferry export`: loader → tracer → ONNX or TorchScript writer (→ check).

use std::path::Path;
use std::time::Instant;

use crate::common::{check_output_path, done, human_bytes, stage};
use crate::{ExportArgs, Format, Precision, metadata};

pub fn export(a: &ExportArgs) -> Result<(), String> {
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
