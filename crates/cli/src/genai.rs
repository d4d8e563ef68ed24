//! `ferry export --genai`: the folder onnxruntime-genai loads. The decoder is traced with
//! its cache, optimized and (with `--quantize int4|fp16`) quantized in memory by the same
//! passes `ferry optimize` / `ferry quantize` run (weights borrowed from the checkpoint and
//! computed lazily, so nothing is held whole), written once as `DIR/model.onnx`; then
//! `genai_config.json` and the tokenizer files (`ferry_pipeline::genai`). Nothing is left
//! behind on an error.

use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::common::{done, human_bytes, stage};
use crate::{ExportArgs, Format, QuantMode, metadata};

/// What the export step produced, for [`write`].
pub struct Export<'a> {
    /// `--model` as given.
    pub model: &'a str,
    /// The checkpoint directory.
    pub dir: &'a Path,
    /// Its configuration.
    pub config: &'a ferry_ir::ModelConfig,
    /// The traced decoder (with the cache).
    pub graph: &'a ferry_ir::Graph,
    /// Its task.
    pub task: &'a str,
    /// `--quantize`'s mode.
    pub quantize: Option<QuantMode>,
    /// Fusions `--disable`d.
    pub disabled: ferry_optimizer::FusionSet,
    /// When the command started.
    pub start: Instant,
}

/// Checks the flags and OUTPUT of `--genai` before anything is loaded.
pub fn check_args(
    a: &ExportArgs,
    output: &Path,
    quantize: Option<QuantMode>,
) -> Result<(), String> {
    if a.format != Format::Onnx {
        return Err("--genai writes ONNX; drop --format torchscript".into());
    }
    if a.check || a.static_shapes {
        return Err(
            "--genai cannot be combined with --check or --static-shapes (onnxruntime-genai runs the decoder with dynamic shapes and its cache)"
                .into(),
        );
    }
    if quantize == Some(QuantMode::Int8) {
        return Err(
            "--genai quantizes to int4 (--quantize int4) or exports float16 (--dtype fp16); int8 is not offered"
                .into(),
        );
    }
    if output.file_name().and_then(|n| n.to_str()) != Some("model.onnx") {
        return Err(format!(
            "--genai writes a folder for onnxruntime-genai: OUTPUT must be DIR/model.onnx, got {}",
            output.display()
        ));
    }
    if output.is_dir() {
        return Err(format!("output {} is a directory", output.display()));
    }
    let dir = folder(output);
    if dir.exists() && !dir.is_dir() {
        return Err(format!(
            "cannot write {}: {} is not a directory",
            output.display(),
            dir.display()
        ));
    }
    if !dir.exists()
        && !dir
            .parent()
            .is_none_or(|p| p.as_os_str().is_empty() || p.is_dir())
    {
        return Err(format!(
            "cannot write {}: directory {} does not exist",
            output.display(),
            dir.parent()
                .map_or(dir.clone(), Path::to_path_buf)
                .display()
        ));
    }
    Ok(())
}

/// The task `--genai` exports: the decoder with its cache; `--task` may only name it.
pub fn task(a: &ExportArgs, config: &ferry_ir::ModelConfig) -> Result<String, String> {
    let model_type = config.model_type.as_str();
    if ferry_pipeline::genai::genai_type(model_type).is_none() {
        return Err(format!(
            "--genai exports decoder LLMs for onnxruntime-genai (llama, mistral, qwen2, qwen3, phi3, gemma, gemma2); `{model_type}` is not one"
        ));
    }
    let want = "text-generation-with-past";
    match a.task.as_deref().map(ferry_tracer::canonical_task) {
        Some(t) if t != want => Err(format!(
            "--genai exports the task {want} (the decoder with its cache); drop --task {t}"
        )),
        _ => Ok(want.to_string()),
    }
}

/// The folder OUTPUT is in.
fn folder(output: &Path) -> PathBuf {
    match output.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Optimizes and quantizes the traced decoder in memory (weights stay borrowed from the
/// checkpoint or computed lazily), writes `output` once, then `genai_config.json` and the
/// tokenizer files beside it. On an error nothing is left: the files this call wrote are
/// removed, and the folder when this call created it (other files in it are kept).
pub fn write(a: &ExportArgs, output: &Path, e: &Export) -> Result<(), String> {
    let dir = folder(output);
    let created = !dir.exists();
    if created {
        std::fs::create_dir(&dir).map_err(|err| format!("{}: {err}", dir.display()))?;
    }
    let mut extra: Vec<PathBuf> = Vec::new();
    let result = stages(a, output, e, &mut extra);
    if result.is_err() {
        for f in &extra {
            let _ = std::fs::remove_file(f);
        }
        if created {
            let _ = std::fs::remove_dir(&dir);
        }
    }
    result
}

fn stages(
    a: &ExportArgs,
    output: &Path,
    e: &Export,
    written: &mut Vec<PathBuf>,
) -> Result<(), String> {
    // The same passes `ferry optimize` and `ferry quantize` run on a file, here on the
    // traced graph itself: one write instead of three.
    let mut graph = e.graph.clone();
    let pb = stage("optimize");
    // onnxruntime-genai's GroupQueryAttention form (shared cache buffer) where it fits.
    let gqa_form = match ferry_pipeline::genai::genai_attention_positions(e.config) {
        Some(max_positions) => ferry_optimizer::GqaForm::Genai { max_positions },
        None => ferry_optimizer::GqaForm::Exact,
    };
    let opts = ferry_optimizer::OptimizeOptions {
        disabled: e.disabled,
        gqa_form,
        ..Default::default()
    };
    let before = graph.nodes.len();
    let stats = ferry_optimizer::optimize_with(&mut graph, &opts).map_err(|e| e.to_string())?;
    done(
        pb,
        format!("{stats} ({before} → {} nodes)", graph.nodes.len()),
    );
    eprintln!(
        "{}",
        crate::optimize::fused_line(&ferry_optimizer::fused_operator_statistics(&graph))
    );
    match e.quantize {
        Some(QuantMode::Int4) => {
            let pb = stage("int4");
            // onnxruntime-genai's model builder's defaults for `-p int4 -e cpu`.
            let opts = ferry_quantizer::int4::Int4Options {
                block_size: 32,
                symmetric: true,
                exclude: Vec::new(),
                accuracy_level: Some(4),
            };
            let (summary, _, _) = crate::quantize::int4_passes(&mut graph, &opts, true)?;
            done(pb, summary);
        }
        Some(QuantMode::Fp16) => {
            let pb = stage("fp16");
            let s = ferry_quantizer::fp16::convert_fp16(&mut graph, &Default::default())
                .map_err(|e| e.to_string())?;
            done(pb, s.to_string());
        }
        Some(QuantMode::Int8) | None => {}
    }
    let pb = stage("write");
    pb.set_message(output.display().to_string());
    let wopts = ferry_onnx::WriteOptions {
        external_data: crate::common::external_data(a.external_data),
        doc_string: format!("exported by ferry from {}", e.model),
        metadata: metadata::for_export(e.dir, e.config, e.task),
        ..Default::default()
    };
    let report = ferry_onnx::write_model(&graph, output, &wopts).map_err(|e| e.to_string())?;
    done(pb, human_bytes(report.model_bytes + report.data_bytes));
    written.push(report.model_path);
    written.extend(report.data_path);

    let pb = stage("genai");
    let decoder = ferry_pipeline::genai::DecoderModel {
        filename: "model.onnx".into(),
        inputs: graph.inputs.iter().map(|v| v.name.clone()).collect(),
        outputs: graph.outputs.iter().map(|v| v.name.clone()).collect(),
        shared_cache_buffer: ferry_pipeline::genai::shares_cache_buffer(&graph),
    };
    drop(graph);
    let config = ferry_pipeline::genai::genai_config(e.dir, &decoder).map_err(|e| e.to_string())?;
    let files = ferry_pipeline::genai::write_folder_files(e.dir, &folder(output), &config)
        .map_err(|e| e.to_string())?;
    written.extend(files.iter().cloned());
    let names: Vec<String> = files
        .iter()
        .filter_map(|f| f.file_name().map(|n| n.to_string_lossy().into_owned()))
        .collect();
    done(pb, names.join(", "));
    if !files
        .iter()
        .any(|f| f.file_name().is_some_and(|n| n == "tokenizer.json"))
    {
        eprintln!(
            "note: {} has no tokenizer.json; onnxruntime-genai runs the model on token ids, og.Tokenizer needs one",
            e.dir.display()
        );
    }
    let size: u64 = std::fs::read_dir(folder(output))
        .map(|rd| {
            rd.flatten()
                .filter_map(|f| f.metadata().ok())
                .filter(|m| m.is_file())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0);
    eprintln!(
        "exported {} for onnxruntime-genai{}: {} ({}; {}) in {:.2}s",
        e.config.model_type,
        match e.quantize {
            Some(m) => format!(" ({m:?})").to_lowercase(),
            None => String::new(),
        },
        folder(output).display(),
        human_bytes(size),
        names.join(", "),
        e.start.elapsed().as_secs_f64()
    );
    if a.json {
        crate::common::outln(serde_json::json!({
            "model_type": e.config.model_type,
            "folder": folder(output).display().to_string(),
            "model": output.display().to_string(),
            "files": names,
            "genai_config": config,
            "seconds": e.start.elapsed().as_secs_f64(),
        }));
    }
    Ok(())
}
