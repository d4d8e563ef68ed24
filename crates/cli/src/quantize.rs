//! `ferry quantize`: ONNX reader → quantizer (int8 dynamic, int4, fp16) → ONNX writer, then
//! an accuracy report of the result against the float32 model in ONNX Runtime.

use std::path::Path;
use std::time::Instant;

use crate::common::{check_output_path, done, human_bytes, stage};
use crate::{QuantMode, QuantizeArgs, WeightType};

/// What one quantization run did.
pub struct Outcome {
    /// One-line summary of the rewrite.
    pub summary: String,
    /// Machine-readable details for `--json`.
    pub json: serde_json::Value,
}

/// The int8 options `ferry quantize` (and `ferry export --quantize`) use for `a`.
pub fn int8_options(a: &QuantizeArgs) -> ferry_quantizer::Int8Options {
    ferry_quantizer::Int8Options {
        weight_type: match a.weight_type {
            WeightType::Int8 => ferry_quantizer::QType::Int8,
            WeightType::Uint8 => ferry_quantizer::QType::UInt8,
        },
        per_channel: !a.no_per_channel,
        reduce_range: a.reduce_range,
        exclude: a.exclude.clone(),
    }
}

/// `ferry quantize --mode MODE IN OUT`'s arguments with every default.
pub fn default_args(
    input: &Path,
    output: &Path,
    mode: QuantMode,
    external_data: bool,
) -> QuantizeArgs {
    QuantizeArgs {
        input: input.to_path_buf(),
        output: output.to_path_buf(),
        mode,
        per_channel: true,
        no_per_channel: false,
        reduce_range: false,
        weight_type: WeightType::Int8,
        exclude: Vec::new(),
        block_size: ferry_quantizer::int4::Int4Options::default().block_size,
        symmetric: false,
        accuracy_level: None,
        float_embeddings: false,
        golden: None,
        no_report: false,
        report_budget: None,
        json: false,
        external_data,
    }
}

/// The int4 options (`MatMulNBits`, `GatherBlockQuantized`) `ferry quantize --mode int4`
/// (and `ferry export --quantize int4`) use for `a`.
pub fn int4_options(a: &QuantizeArgs) -> ferry_quantizer::int4::Int4Options {
    ferry_quantizer::int4::Int4Options {
        block_size: a.block_size,
        symmetric: a.symmetric,
        exclude: a.exclude.clone(),
        accuracy_level: a.accuracy_level,
    }
}

/// int4 on `graph`: half-precision weights behind Casts exposed as float32, embedding
/// tables as GatherBlockQuantized (when `embeddings`; a tied LM head shares the table),
/// then MatMulNBits for the remaining MatMuls. Returns the summary line and both passes'
/// statistics. Shared by `ferry quantize --mode int4` and `ferry export --genai`.
pub fn int4_passes(
    graph: &mut ferry_ir::Graph,
    opts: &ferry_quantizer::int4::Int4Options,
    embeddings: bool,
) -> Result<
    (
        String,
        ferry_quantizer::int4::Int4Stats,
        ferry_quantizer::gather4::Gather4Stats,
    ),
    String,
> {
    let half = ferry_quantizer::half_weights::expose_half_weights(graph, embeddings);
    let g = if embeddings {
        ferry_quantizer::gather4::quantize_gathers(graph, opts).map_err(|e| e.to_string())?
    } else {
        Default::default()
    };
    let s = ferry_quantizer::int4::quantize_int4(graph, opts).map_err(|e| e.to_string())?;
    let mut summary = s.to_string();
    if g.gathers > 0 {
        summary.push_str(&format!("; {g}"));
    }
    if half > 0 {
        summary.push_str(&format!("; {half} half-precision weights read as float32"));
    }
    Ok((summary, s, g))
}

pub fn quantize(a: &QuantizeArgs) -> Result<(), String> {
    let outcome = quantize_file(a, &a.input, &a.output, &a.input)?;
    if a.json {
        crate::common::outln(
            serde_json::to_string_pretty(&outcome.json).map_err(|e| e.to_string())?,
        );
    } else {
        crate::common::outln(&outcome.summary);
    }
    Ok(())
}

/// Quantizes `input` into `output` as `a` says, then (unless `--no-report`) compares the
/// result with the float model `reference` in ONNX Runtime. Shared with `ferry export
/// --quantize`.
pub fn quantize_file(
    a: &QuantizeArgs,
    input: &Path,
    output: &Path,
    reference: &Path,
) -> Result<Outcome, String> {
    check_output_path(output)?;
    if !input.is_file() {
        return Err(format!("{}: no such file", input.display()));
    }
    if let Some(g) = &a.golden
        && !g.is_file()
    {
        return Err(format!("golden file {}: no such file", g.display()));
    }
    let pb = stage("reading");
    let model = ferry_onnx::read_model(input).map_err(|e| e.to_string())?;
    let mut graph = model.graph;
    let float_bytes = graph.weight_bytes();
    let vocab = DummyVocab::of(&graph);
    done(
        pb,
        format!("read {} ({} nodes)", input.display(), graph.nodes.len()),
    );

    let pb = stage("quantize");
    let start = Instant::now();
    let (summary, stats_json) = match a.mode {
        QuantMode::Int8 => {
            let opts = int8_options(a);
            let s = ferry_quantizer::quantize_int8(&mut graph, &opts).map_err(|e| e.to_string())?;
            let json = serde_json::json!({
                "per_channel": opts.per_channel,
                "reduce_range": opts.reduce_range,
                "weight_type": format!("{:?}", opts.weight_type).to_lowercase(),
                "matmuls": s.matmuls,
                "gemms": s.gemms,
                "attentions": s.attentions,
                "embed_layer_norms": s.embed_layer_norms,
                "gathers": s.gathers,
                "tensors": s.tensors,
            });
            (s.to_string(), json)
        }
        QuantMode::Int4 => {
            let opts = int4_options(a);
            let (summary, s, g) = int4_passes(&mut graph, &opts, !a.float_embeddings)?;
            let json = serde_json::json!({
                "summary": summary,
                "block_size": opts.block_size,
                "symmetric": opts.symmetric,
                "accuracy_level": opts.accuracy_level,
                "matmul_nbits": s.matmuls_quantized + g.tied_matmuls,
                "gather_block_quantized": g.gathers,
            });
            (summary, json)
        }
        QuantMode::Fp16 => {
            let opts = ferry_quantizer::fp16::Fp16Options {
                exclude: a.exclude.clone(),
                ..Default::default()
            };
            let s = ferry_quantizer::fp16::convert_fp16(&mut graph, &opts)
                .map_err(|e| e.to_string())?;
            (
                s.to_string(),
                serde_json::json!({ "summary": s.to_string() }),
            )
        }
    };
    let seconds = start.elapsed().as_secs_f64();
    done(pb, format!("{summary} in {seconds:.2}s"));

    let pb = stage("writing");
    let wopts = ferry_onnx::WriteOptions {
        external_data: crate::common::external_data(a.external_data),
        doc_string: model.info.doc_string,
        metadata: model.info.metadata,
    };
    let report = ferry_onnx::write_model(&graph, output, &wopts).map_err(|e| e.to_string())?;
    let in_bytes = file_bytes(input);
    let out_bytes = report.model_bytes + report.data_bytes;
    done(
        pb,
        format!("wrote {} ({})", output.display(), human_bytes(out_bytes)),
    );
    drop(graph);

    let mut text = format!(
        "{} {summary} in {seconds:.2}s; {} → {} ({:.1}% of the float model)",
        mode_name(a.mode),
        human_bytes(in_bytes),
        human_bytes(out_bytes),
        100.0 * out_bytes as f64 / in_bytes.max(1) as f64
    );
    let mut json = serde_json::json!({
        "mode": mode_name(a.mode),
        "input": input.display().to_string(),
        "output": output.display().to_string(),
        "input_bytes": in_bytes,
        "output_bytes": out_bytes,
        "float_weight_bytes": float_bytes,
        "seconds": seconds,
        "stats": stats_json,
    });
    if !a.no_report {
        let pb = stage("compare");
        match accuracy(
            reference,
            output,
            a.golden.as_deref(),
            &vocab,
            a.report_budget,
            // ONNX Runtime's CPU kernels run float16 MatMuls on float32 copies of the
            // weights it makes itself: as much memory as the float model's weights.
            if a.mode == QuantMode::Fp16 {
                float_bytes
            } else {
                0
            },
        ) {
            Ok((feed, rows)) => {
                done(pb, format!("{} outputs compared", rows.len()));
                text.push_str(&format!("\naccuracy vs float32 on {feed}:"));
                for r in &rows {
                    text.push_str(&format!(
                        "\n  {} {:?}: cosine {:.6}, max-abs {:.3e}",
                        r.name, r.shape, r.cosine, r.max_abs
                    ));
                    if let Some((same, n)) = r.argmax {
                        text.push_str(&format!(", argmax agreement {same}/{n}"));
                    }
                }
                json["accuracy"] = serde_json::json!({
                    "inputs": feed,
                    "outputs": rows.iter().map(|r| serde_json::json!({
                        "name": r.name,
                        "shape": r.shape,
                        "cosine": r.cosine,
                        "max_abs": r.max_abs,
                        "argmax_agreement": r.argmax_rate(),
                    })).collect::<Vec<_>>(),
                });
            }
            Err(ferry_verifier::VerifyError::Runtime(e)) => {
                pb.finish_and_clear();
                text.push_str(&format!("\naccuracy report skipped: {e}"));
                json["accuracy"] = serde_json::json!({ "skipped": e });
            }
            Err(e) => {
                pb.finish_and_clear();
                let _ = std::fs::remove_file(output);
                if let Some(d) = &report.data_path {
                    let _ = std::fs::remove_file(d);
                }
                return Err(format!("accuracy check of {}: {e}", output.display()));
            }
        }
    }
    Ok(Outcome {
        summary: text,
        json,
    })
}

fn mode_name(m: QuantMode) -> &'static str {
    match m {
        QuantMode::Int8 => "int8",
        QuantMode::Int4 => "int4",
        QuantMode::Fp16 => "fp16",
    }
}

/// Bytes of a model file plus its external-data side files.
fn file_bytes(model: &Path) -> u64 {
    let own = std::fs::metadata(model).map(|m| m.len()).unwrap_or(0);
    let data = model.with_file_name(format!(
        "{}_data",
        model
            .file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default()
    ));
    own + std::fs::metadata(data).map(|m| m.len()).unwrap_or(0)
}

/// Vocabulary sizes for dummy token ids, read off the graph's lookup tables: the largest
/// table's rows for ids, the smallest's (at most 2) for token types.
struct DummyVocab {
    vocab: i64,
    types: i64,
}

impl DummyVocab {
    fn of(g: &ferry_ir::Graph) -> Self {
        let inits: std::collections::HashMap<&str, &ferry_ir::Initializer> = g
            .initializers
            .iter()
            .map(|t| (t.name.as_str(), t))
            .collect();
        let rows: Vec<i64> = g
            .nodes
            .iter()
            .flat_map(|n| match n.op_type.as_str() {
                "Gather" => vec![n.inputs.first()],
                "EmbedLayerNormalization" => vec![n.inputs.get(2), n.inputs.get(4)],
                _ => vec![],
            })
            .flatten()
            .filter_map(|name| inits.get(name.as_str()))
            .filter(|t| t.dims.len() == 2 && t.dtype.is_float())
            .map(|t| t.dims[0])
            .collect();
        Self {
            vocab: rows.iter().copied().max().unwrap_or(2).max(1),
            types: rows.iter().copied().min().unwrap_or(1).clamp(1, 2),
        }
    }
}

/// A view of a model written beside it for the accuracy report: its weights referenced in
/// place as external data (`ExternalData::InPlace`), so ONNX Runtime maps them instead of
/// reading them into memory. Removed when dropped.
struct ReportView {
    path: std::path::PathBuf,
    /// Bytes of the view itself: what ONNX Runtime parses and keeps in memory.
    inline: u64,
}

impl ReportView {
    fn of(model: &Path) -> Result<Self, String> {
        let m = ferry_onnx::read_model(model).map_err(|e| e.to_string())?;
        let name = model
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let path =
            model.with_file_name(format!(".{name}.ferry-report-{}.onnx", std::process::id()));
        let opts = ferry_onnx::WriteOptions {
            external_data: ferry_onnx::ExternalData::InPlace,
            doc_string: m.info.doc_string,
            metadata: m.info.metadata,
        };
        let mut view = Self {
            path: path.clone(),
            inline: 0,
        };
        let r = ferry_onnx::write_model(&m.graph, &path, &opts).map_err(|e| e.to_string())?;
        view.inline = r.model_bytes + r.data_bytes;
        if let Some(d) = r.data_path {
            // Weights that could not be referenced went to a side file of the view.
            let _ = std::fs::remove_file(d);
            return Err("some weights cannot be referenced in place".into());
        }
        Ok(view)
    }
}

impl Drop for ReportView {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Physical memory in bytes (`MemTotal` of /proc/meminfo), if known.
fn physical_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib * 1024)
}

/// Memory ONNX Runtime needs besides the models' inline bytes (graph, activations of the
/// batch-2 × 16 report, threads), measured well under this on the benchmark's models.
const REPORT_OVERHEAD: u64 = 64 << 20;

/// The float and quantized models to load for the report: views mapping their weights
/// where possible (else the files themselves), and the memory loading them is estimated
/// to take: twice the bytes ONNX Runtime reads (the file and the parsed tensors) plus
/// [`REPORT_OVERHEAD`].
fn report_models(
    reference: &Path,
    quantized: &Path,
) -> (Vec<Option<ReportView>>, [std::path::PathBuf; 2], u64) {
    let mut views = Vec::new();
    let mut paths = [reference.to_path_buf(), quantized.to_path_buf()];
    let mut need = REPORT_OVERHEAD;
    for (i, m) in [reference, quantized].into_iter().enumerate() {
        match ReportView::of(m) {
            Ok(v) => {
                need += 2 * v.inline;
                paths[i] = v.path.clone();
                views.push(Some(v));
            }
            Err(_) => {
                need += 2 * file_bytes(m);
                views.push(None);
            }
        }
    }
    (views, paths, need)
}

/// Runs the float and quantized models on the golden's inputs (or dummy inputs, batch 2 ×
/// 16 tokens) and compares their outputs. ONNX Runtime loads both lean
/// (`Model::load_lean`) from views that map their weights; when the estimated memory is
/// above `budget_mib` (default an eighth of physical memory) the report is skipped
/// (`VerifyError::Runtime` with the reason).
fn accuracy(
    reference: &Path,
    quantized: &Path,
    golden: Option<&Path>,
    vocab: &DummyVocab,
    budget_mib: Option<u64>,
    extra: u64,
) -> Result<(String, Vec<ferry_verifier::Agreement>), ferry_verifier::VerifyError> {
    let budget = budget_mib
        .map(|m| m.saturating_mul(1 << 20))
        .or_else(|| physical_memory().map(|b| b / 8))
        .unwrap_or(4 << 30);
    let (_views, [rpath, qpath], need) = report_models(reference, quantized);
    let need = need + extra;
    if need > budget {
        return Err(ferry_verifier::VerifyError::Runtime(format!(
            "ONNX Runtime would need ~{} MiB for the two models, over the report budget of {} MiB{}; rerun with --report-budget {} to get one",
            need.div_ceil(1 << 20),
            budget >> 20,
            if budget_mib.is_none() {
                " (an eighth of physical memory)"
            } else {
                ""
            },
            need.div_ceil(1 << 20)
        )));
    }
    let mut r = ferry_verifier::Model::load_lean(&rpath, 2)?;
    let mut q = ferry_verifier::Model::load_lean(&qpath, 2)?;
    let (feed, inputs) = match golden {
        Some(g) => {
            let golden = ferry_verifier::Golden::load(g)?;
            (
                format!("the inputs of {}", g.display()),
                ferry_verifier::golden_inputs(&golden),
            )
        }
        None => {
            let spec = ferry_verifier::DummySpec {
                batch: 2,
                sequence_lengths: vec![16],
                vocab_size: vocab.vocab,
                type_vocab_size: vocab.types,
            };
            (
                "dummy inputs (batch 2 × 16)".to_string(),
                ferry_verifier::dummy_inputs(&r, &spec, 16),
            )
        }
    };
    let rows = ferry_verifier::compare_models(&mut r, &mut q, &inputs)?;
    Ok((feed, rows))
}

/// `ferry export --quantize`: quantizes the optimized model `optimized` (int8 with the
/// default options) into `<stem>-quantized.onnx` beside the export `output`, and prints
/// the summary and the accuracy report against the optimized float model on stderr; returns
/// the quantized path and the `--json` details. On failure the optimized file is removed
/// too (the caller removes the export).
pub fn quantize_export(
    output: &Path,
    optimized: &Path,
    external_data: bool,
    mode: QuantMode,
) -> Result<(std::path::PathBuf, serde_json::Value), String> {
    let target = crate::common::sibling(output, "quantized");
    let args = default_args(optimized, &target, mode, external_data);
    // The report compares with the optimized float model, the quantizer's own input (ONNX
    // Runtime runs its folded weights as they are, where the plain export's weight
    // Transposes would be computed and held at once).
    match quantize_file(&args, optimized, &target, optimized) {
        Ok(o) => {
            eprintln!("quantized {}: {}", target.display(), o.summary);
            Ok((target, o.json))
        }
        Err(e) => {
            let _ = std::fs::remove_file(optimized);
            let _ = std::fs::remove_file(optimized.with_file_name(format!(
                "{}_data",
                optimized
                    .file_name()
                    .map(|n| n.to_string_lossy())
                    .unwrap_or_default()
            )));
            Err(e)
        }
    }
}
