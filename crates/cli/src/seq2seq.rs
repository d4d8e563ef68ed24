//! `ferry export` of an encoder-decoder (t5, mt5, bart, mbart, marian) with a generation
//! task: optimum's folder. `encoder_model.onnx`, `decoder_model.onnx`, with the cache
//! `decoder_with_past_model.onnx` and `decoder_model_merged.onnx` (ferry-ir's
//! `merge_decoders`), `config.json`, `generation_config.json` and the checkpoint's tokenizer
//! files. `--optimize` / `--quantize` add `-optimized` / `-quantized` siblings of every
//! model file inside the folder (the merged one merged from the optimized or quantized
//! decoders, as optimum does). The folder is written under a temporary name beside OUTPUT
//! and moved into place at the end: nothing is left behind on an error.

use std::path::{Path, PathBuf};
use std::time::Instant;

use ferry_tracer::Seq2SeqPart;

use crate::common::{done, human_bytes, stage};
use crate::{ExportArgs, Format, QuantMode, metadata};

/// The merged decoder's file name, as optimum writes it.
pub const MERGED_FILE: &str = "decoder_model_merged.onnx";

/// Files copied from the checkpoint beside the models, when present.
const COPIED: &[&str] = &[
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "spiece.model",
    "source.spm",
    "target.spm",
    "vocab.json",
];

/// What the load step produced, for [`write`].
pub struct Export<'a> {
    /// `--model` as given.
    pub model: &'a str,
    /// The checkpoint directory.
    pub dir: &'a Path,
    /// Its configuration.
    pub config: &'a ferry_ir::ModelConfig,
    /// The checkpoint's weights (as exported: converted to float32 when needed).
    pub weights: &'a ferry_ir::Weights,
    /// Trace options (task, opset).
    pub trace: &'a ferry_tracer::TraceOptions,
    /// The parts the task exports.
    pub parts: &'static [Seq2SeqPart],
    /// `--quantize`'s mode.
    pub quantize: Option<QuantMode>,
    /// Fusions `--disable`d.
    pub disabled: ferry_optimizer::FusionSet,
    /// When the command started.
    pub start: Instant,
    /// `weights [dtype]` for the summary line.
    pub note: String,
}

/// The parts `task` exports as a folder for `model_type`: `None` for a single-file export
/// (not an encoder-decoder, or its encoder alone).
pub fn folder_parts(model_type: &str, task: &str) -> Option<&'static [Seq2SeqPart]> {
    if !ferry_tracer::is_encoder_decoder(model_type) {
        return None;
    }
    Seq2SeqPart::for_task(task).filter(|p| p.len() > 1)
}

/// Checks the flags and OUTPUT of a folder export.
pub fn check_args(a: &ExportArgs, output: &Path) -> Result<(), String> {
    if a.format != Format::Onnx || a.genai || a.static_shapes {
        return Err(
            "an encoder-decoder exports optimum's ONNX folder: drop --format torchscript, --genai and --static-shapes"
                .into(),
        );
    }
    if output.is_file() {
        return Err(format!(
            "output {} is a file, but an encoder-decoder export writes a folder (encoder_model.onnx, decoder_model.onnx, …)",
            output.display()
        ));
    }
    let parent = parent_of(output);
    if !parent.is_dir() {
        return Err(format!(
            "cannot write {}: directory {} does not exist",
            output.display(),
            parent.display()
        ));
    }
    Ok(())
}

fn parent_of(p: &Path) -> PathBuf {
    match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// A folder under a temporary name, removed on drop unless moved into place.
struct TempDir {
    path: PathBuf,
    kept: bool,
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if !self.kept {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// Writes the folder (see the module docs) and prints the summary.
pub fn write(a: &ExportArgs, output: &Path, e: &Export) -> Result<(), String> {
    check_args(a, output)?;
    let name = output
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .ok_or_else(|| format!("output {} is not a folder path", output.display()))?;
    let tmp = TempDir {
        path: parent_of(output).join(format!(".{name}.ferry-tmp-{}", std::process::id())),
        kept: false,
    };
    let _ = std::fs::remove_dir_all(&tmp.path);
    std::fs::create_dir(&tmp.path).map_err(|err| format!("{}: {err}", tmp.path.display()))?;
    let files = write_parts(a, &tmp.path, e)?;
    for f in COPIED {
        let src = e.dir.join(f);
        if src.is_file() {
            std::fs::copy(&src, tmp.path.join(f)).map_err(|err| format!("{f}: {err}"))?;
        }
    }
    if a.check {
        let pb = stage("check");
        let runs =
            crate::export::run_check(&tmp.path.join(Seq2SeqPart::Encoder.file_name()), e.config)?;
        done(pb, format!("encoder: {runs}"));
    }
    move_into_place(tmp, output)?;
    let total: u64 = files.iter().map(|(_, b)| b).sum();
    eprintln!(
        "exported {} [{}] task {}: {} files in {} ({}), opset {} in {:.2}s{}",
        e.config.model_type,
        e.note,
        e.trace.task,
        files.len(),
        output.display(),
        human_bytes(total),
        a.opset,
        e.start.elapsed().as_secs_f64(),
        if a.check {
            ", encoder check passed"
        } else {
            ""
        }
    );
    if a.json {
        let json = serde_json::json!({
            "model_type": e.config.model_type,
            "task": e.trace.task,
            "opset": a.opset,
            "folder": output.display().to_string(),
            "files": files.iter().map(|(f, b)| serde_json::json!({"file": f, "bytes": b})).collect::<Vec<_>>(),
            "seconds": e.start.elapsed().as_secs_f64(),
            "check": a.check,
        });
        crate::common::outln(json);
    }
    Ok(())
}

/// Moves the finished temporary folder to `output`: renamed when `output` does not exist,
/// else its files replace same-named files in `output`.
fn move_into_place(mut tmp: TempDir, output: &Path) -> Result<(), String> {
    let err = |p: &Path| {
        let p = p.display().to_string();
        move |e: std::io::Error| format!("{p}: {e}")
    };
    if !output.exists() {
        std::fs::rename(&tmp.path, output).map_err(err(output))?;
        tmp.kept = true;
        return Ok(());
    }
    for entry in std::fs::read_dir(&tmp.path).map_err(err(&tmp.path))? {
        let entry = entry.map_err(err(&tmp.path))?;
        let dest = output.join(entry.file_name());
        std::fs::rename(entry.path(), &dest).map_err(err(&dest))?;
    }
    Ok(())
}

/// One model graph per variant: plain, optimized, quantized.
struct Variants {
    plain: ferry_ir::Graph,
    optimized: Option<ferry_ir::Graph>,
    quantized: Option<ferry_ir::Graph>,
}

/// Traces each part, writes it (and its optimized / quantized forms) into `dir`, then the
/// merged decoders. Returns the files written with their sizes.
fn write_parts(a: &ExportArgs, dir: &Path, e: &Export) -> Result<Vec<(String, u64)>, String> {
    let mut files = Vec::new();
    let mut decoders: Vec<Variants> = Vec::new();
    for &part in e.parts {
        let pb = stage("trace");
        pb.set_message(part.file_name());
        let graph = ferry_tracer::trace_seq2seq(e.config, e.weights, e.trace, part)
            .map_err(|err| err.to_string())?;
        done(
            pb,
            format!("{} ({} nodes)", part.file_name(), graph.nodes.len()),
        );
        let stem = part.file_name().trim_end_matches(".onnx");
        let v = variants(a, e, stem, graph)?;
        write_variants(a, e, dir, stem, &v, &mut files)?;
        if part != Seq2SeqPart::Encoder {
            decoders.push(v);
        }
    }
    // The decoders' graphs are written: they move into the merge rather than being copied.
    if let Ok([no_past, with_past]) = <[Variants; 2]>::try_from(decoders) {
        let merge = |x: ferry_ir::Graph, y: ferry_ir::Graph| {
            ferry_ir::merge_decoders(x, y).map_err(|err| err.to_string())
        };
        let both = |x: Option<ferry_ir::Graph>, y: Option<ferry_ir::Graph>| match (x, y) {
            (Some(x), Some(y)) => merge(x, y).map(Some),
            _ => Ok(None),
        };
        let merged = Variants {
            plain: merge(no_past.plain, with_past.plain)?,
            optimized: both(no_past.optimized, with_past.optimized)?,
            quantized: both(no_past.quantized, with_past.quantized)?,
        };
        write_variants(
            a,
            e,
            dir,
            MERGED_FILE.trim_end_matches(".onnx"),
            &merged,
            &mut files,
        )?;
    }
    Ok(files)
}

/// The plain graph and, with `--optimize` / `--quantize`, its optimized and quantized forms
/// (the passes `ferry optimize` / `ferry quantize` run, in memory; weights stay borrowed or
/// are computed as they are written).
fn variants(
    a: &ExportArgs,
    e: &Export,
    stem: &str,
    plain: ferry_ir::Graph,
) -> Result<Variants, String> {
    if !a.optimize && e.quantize.is_none() {
        return Ok(Variants {
            plain,
            optimized: None,
            quantized: None,
        });
    }
    let mut optimized = plain.clone();
    let opts = ferry_optimizer::OptimizeOptions {
        disabled: e.disabled,
        ..Default::default()
    };
    let pb = stage("optimize");
    let stats =
        ferry_optimizer::optimize_with(&mut optimized, &opts).map_err(|err| err.to_string())?;
    done(pb, stats.to_string());
    eprintln!("optimized {stem}-optimized.onnx: {stats}");
    eprintln!(
        "{}",
        crate::optimize::fused_line(&ferry_optimizer::fused_operator_statistics(&optimized))
    );
    let quantized = match e.quantize {
        None => None,
        Some(mode) => {
            let mut q = optimized.clone();
            let pb = stage("quantize");
            let args = crate::quantize::default_args(Path::new(""), Path::new(""), mode, false);
            let summary = match mode {
                QuantMode::Int8 => {
                    ferry_quantizer::quantize_int8(&mut q, &crate::quantize::int8_options(&args))
                        .map_err(|err| err.to_string())?
                        .to_string()
                }
                QuantMode::Int4 => {
                    crate::quantize::int4_passes(
                        &mut q,
                        &crate::quantize::int4_options(&args),
                        false,
                    )?
                    .0
                }
                QuantMode::Fp16 => ferry_quantizer::fp16::convert_fp16(&mut q, &Default::default())
                    .map_err(|err| err.to_string())?
                    .to_string(),
            };
            done(pb, summary.clone());
            eprintln!("quantized {stem}-quantized.onnx: {summary}");
            Some(q)
        }
    };
    Ok(Variants {
        plain,
        optimized: Some(optimized),
        quantized,
    })
}

/// Writes `stem.onnx` and its `-optimized` / `-quantized` siblings.
fn write_variants(
    a: &ExportArgs,
    e: &Export,
    dir: &Path,
    stem: &str,
    v: &Variants,
    files: &mut Vec<(String, u64)>,
) -> Result<(), String> {
    let wopts = ferry_onnx::WriteOptions {
        external_data: crate::common::external_data(a.external_data),
        doc_string: format!("exported by ferry from {}", e.model),
        metadata: metadata::for_export(e.dir, e.config, &e.trace.task),
        ..Default::default()
    };
    let all = [
        (String::new(), Some(&v.plain)),
        ("-optimized".to_string(), v.optimized.as_ref()),
        ("-quantized".to_string(), v.quantized.as_ref()),
    ];
    for (suffix, graph) in all {
        let Some(graph) = graph else { continue };
        let name = format!("{stem}{suffix}.onnx");
        let pb = stage("write");
        pb.set_message(name.clone());
        let r = ferry_onnx::write_model(graph, &dir.join(&name), &wopts)
            .map_err(|err| err.to_string())?;
        done(pb, human_bytes(r.model_bytes + r.data_bytes));
        files.push((name.clone(), r.model_bytes));
        if let Some(d) = r.data_path {
            let n = d
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            files.push((n, r.data_bytes));
        }
    }
    Ok(())
}
