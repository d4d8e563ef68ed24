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
    if !a.no_report && ferry_ir::split_merged(&graph).is_some() {
        pb.finish_and_clear();
        return Err(format!(
            "{}: the accuracy report cannot feed a merged decoder's `use_cache_branch`; pass --no-report (its two decoders are quantized and merged again)",
            input.display()
        ));
    }
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
        ..Default::default()
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
            // weights that it makes itself: run segment by segment.
            a.mode == QuantMode::Fp16,
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
        Self::write(
            &m.graph,
            model,
            "report",
            ferry_onnx::WriteOptions {
                doc_string: m.info.doc_string,
                metadata: m.info.metadata,
                ..Default::default()
            },
        )
    }

    /// Writes `graph` (weights mapped from `model`) beside `model` as a view named after
    /// `model` and `tag`, with `opts`' doc string, metadata and output typing.
    fn write(
        graph: &ferry_ir::Graph,
        model: &Path,
        tag: &str,
        opts: ferry_onnx::WriteOptions,
    ) -> Result<Self, String> {
        let name = model
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let path = model.with_file_name(format!(".{name}.ferry-{tag}-{}.onnx", std::process::id()));
        let opts = ferry_onnx::WriteOptions {
            external_data: ferry_onnx::ExternalData::InPlace,
            ..opts
        };
        let mut view = Self {
            path: path.clone(),
            inline: 0,
        };
        let r = ferry_onnx::write_model(graph, &path, &opts).map_err(|e| e.to_string())?;
        view.inline = r.model_bytes + r.data_bytes;
        if let Some(d) = r.data_path {
            // Weights that could not be referenced went to a side file of the view.
            let _ = std::fs::remove_file(d);
            return Err("some weights cannot be referenced in place".into());
        }
        Ok(view)
    }

    /// A view of one segment of `graph` (the model `model`, read with its weights mapped):
    /// the segment's nodes and initializers, its inputs typed as `values` holds them, its
    /// outputs untyped (ONNX Runtime infers them, contrib ops included).
    ///
    /// When the segment starts with a row lookup in a weight table (`lookup_table`), the
    /// view holds only the rows the ids in `values` name, and the lookup reads them through
    /// renumbered ids added to `values`: the same rows, so the same outputs, without ONNX
    /// Runtime's float32 copy of the whole table (EmbedLayerNormalization has no float16
    /// CPU kernel).
    fn segment(
        graph: &ferry_ir::Graph,
        segment: &ferry_ir::Segment,
        values: &mut ferry_verifier::Values,
        model: &Path,
        index: usize,
    ) -> Result<Self, String> {
        let inputs = segment
            .inputs
            .iter()
            .map(|n| {
                let dtype = values
                    .dtype(n)
                    .ok_or_else(|| format!("segment {index}: no tensor computed for `{n}`"))?;
                Ok(ferry_ir::Value {
                    name: n.clone(),
                    dtype,
                    shape: None,
                })
            })
            .collect::<Result<Vec<_>, String>>()?;
        let wanted: std::collections::HashSet<&str> =
            segment.initializers.iter().map(String::as_str).collect();
        let mut sub = ferry_ir::Graph {
            name: graph.name.clone(),
            inputs,
            // Placeholder types, removed below.
            outputs: segment
                .outputs
                .iter()
                .map(|n| ferry_ir::Value {
                    name: n.clone(),
                    dtype: ferry_ir::DType::F32,
                    shape: None,
                })
                .collect(),
            nodes: graph.nodes[segment.nodes.clone()].to_vec(),
            initializers: graph
                .initializers
                .iter()
                .filter(|t| wanted.contains(t.name.as_str()))
                .cloned()
                .collect(),
            value_info: Vec::new(),
            opsets: graph.opsets.clone(),
        };
        if let Some(first) = sub.nodes.first()
            && let Some((table, slot, ids_slot)) = lookup_table(graph, first, &sub.nodes[1..])
            && let Some(ids) = first.inputs.get(ids_slot).cloned()
            && let Some(dtype) = values.dtype(&ids)
            && let Some((shape, data)) = values.ints(&ids)
            && let Some((rows, renumbered)) =
                table_rows(table, &data).map_err(|e| format!("{}: {e}", table.name))?
        {
            let new_ids = format!("{ids}.ferry-rows");
            values
                .insert_ints(&new_ids, shape, renumbered, dtype)
                .map_err(|e| e.to_string())?;
            sub.nodes[0].inputs[ids_slot] = new_ids.clone();
            sub.nodes[0].inputs[slot] = rows.name.clone();
            sub.initializers.retain(|t| t.name != table.name);
            sub.initializers.push(rows);
            let used: std::collections::HashSet<String> =
                sub.nodes.iter().flat_map(|n| n.inputs.clone()).collect();
            sub.inputs.retain(|v| used.contains(&v.name));
            sub.inputs.push(ferry_ir::Value {
                name: new_ids,
                dtype,
                shape: None,
            });
        }
        Self::write(
            &sub,
            model,
            &format!("segment{index}"),
            ferry_onnx::WriteOptions {
                untyped_outputs: true,
                ..Default::default()
            },
        )
    }
}

/// The weight table `node` looks rows up in, when it is a row lookup (`Gather` on axis 0,
/// `EmbedLayerNormalization`'s word embeddings) in an initializer that none of `others`
/// reads: the table, its input slot and the ids' input slot.
fn lookup_table<'g>(
    graph: &'g ferry_ir::Graph,
    node: &ferry_ir::Node,
    others: &[ferry_ir::Node],
) -> Option<(&'g ferry_ir::Initializer, usize, usize)> {
    let (slot, ids) = match (node.domain.as_str(), node.op_type.as_str()) {
        ("" | "ai.onnx", "Gather")
            if matches!(node.attr("axis"), None | Some(ferry_ir::Attr::Int(0))) =>
        {
            (0, 1)
        }
        ("com.microsoft", "EmbedLayerNormalization") => (2, 0),
        _ => return None,
    };
    let name = node.inputs.get(slot)?;
    if others.iter().any(|n| n.inputs.contains(name)) {
        return None;
    }
    let table = graph.initializers.iter().find(|t| &t.name == name)?;
    (table.dims.len() >= 2).then_some((table, slot, ids))
}

/// The rows of `table` that `ids` name (sorted, each once) as a new initializer, and the
/// ids renumbered into it; `None` when an id is negative or past the table (ONNX Runtime
/// then reports it on the whole table).
#[allow(clippy::type_complexity)]
fn table_rows(
    table: &ferry_ir::Initializer,
    ids: &[i64],
) -> std::io::Result<Option<(ferry_ir::Initializer, Vec<i64>)>> {
    let rows = table.dims[0];
    if ids.iter().any(|&i| i < 0 || i >= rows) {
        return Ok(None);
    }
    let mut unique = ids.to_vec();
    unique.sort_unstable();
    unique.dedup();
    let row_bytes = table.data.len() / rows.max(1) as u64;
    let mut bytes = vec![0u8; unique.len() * row_bytes as usize];
    for (row, chunk) in unique
        .iter()
        .zip(bytes.chunks_exact_mut(row_bytes.max(1) as usize))
    {
        table.data.read_into(*row as u64 * row_bytes, chunk)?;
    }
    let renumbered = ids
        .iter()
        .map(|i| unique.binary_search(i).unwrap_or_default() as i64)
        .collect();
    let mut dims = table.dims.clone();
    dims[0] = unique.len() as i64;
    Ok(Some((
        ferry_ir::Initializer {
            name: format!("{}.ferry-rows", table.name),
            dtype: table.dtype,
            dims,
            data: ferry_ir::TensorData::owned(bytes),
        },
        renumbered,
    )))
}

/// Weight bytes ONNX Runtime holds for one segment of a float16 model: its weights, less a
/// lookup table it starts with (`ReportView::segment` keeps only the rows looked up).
fn segment_cost(graph: &ferry_ir::Graph, segment: &ferry_ir::Segment) -> u64 {
    let nodes = &graph.nodes[segment.nodes.clone()];
    let table = nodes
        .first()
        .and_then(|n| lookup_table(graph, n, &nodes[1..]))
        .map_or(0, |(t, ..)| t.data.len());
    segment.weight_bytes.saturating_sub(table)
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

/// Float16 weight bytes one segment of a float16 model holds at most when the report runs
/// it segment by segment (`run_segments`): ONNX Runtime's CPU kernels compute float16
/// MatMuls on float32 copies of the weights that it makes all at once, before the first
/// MatMul runs, so a whole model would need its float32 size.
const SEGMENT_BYTES: u64 = 32 << 20;

/// How the report runs the quantized model.
enum Candidate {
    /// Whole, from a view mapping its weights (or the file itself).
    Whole(Option<ReportView>, std::path::PathBuf),
    /// Segment by segment (float16): its graph, weights mapped, and the segments.
    Segments(ferry_ir::Graph, Vec<ferry_ir::Segment>),
}

/// The float model to load for the report (a view mapping its weights where possible,
/// else the file), how to run the quantized one, and the memory that is estimated to
/// take: twice the bytes ONNX Runtime reads per model (the file and the parsed tensors),
/// for a segmented float16 model twice its largest segment's weights (their float32
/// copies), plus [`REPORT_OVERHEAD`].
fn report_models(
    reference: &Path,
    quantized: &Path,
    segmented: bool,
) -> Result<(Option<ReportView>, std::path::PathBuf, Candidate, u64), String> {
    let mut need = REPORT_OVERHEAD;
    let mut load = |m: &Path| match ReportView::of(m) {
        Ok(v) => {
            need += 2 * v.inline;
            let p = v.path.clone();
            (Some(v), p)
        }
        Err(_) => {
            need += 2 * file_bytes(m);
            (None, m.to_path_buf())
        }
    };
    let (rview, rpath) = load(reference);
    let candidate = if segmented {
        let graph = ferry_onnx::read_model(quantized)
            .map_err(|e| e.to_string())?
            .graph;
        let segments = graph.segments(SEGMENT_BYTES);
        need += 2 * segments
            .iter()
            .map(|s| segment_cost(&graph, s))
            .max()
            .unwrap_or(0);
        Candidate::Segments(graph, segments)
    } else {
        let (v, p) = load(quantized);
        Candidate::Whole(v, p)
    };
    Ok((rview, rpath, candidate, need))
}

/// Runs `graph` (the model file `model`) on `inputs` as a chain of segment models: each
/// segment is written as a view mapping its weights, loaded lean, run on the values
/// earlier segments (or the inputs) computed, and dropped before the next loads; values
/// no later segment or graph output needs are dropped as the chain goes. Returns the
/// graph's float outputs, widened exactly to float32.
fn run_segments(
    graph: &ferry_ir::Graph,
    segments: &[ferry_ir::Segment],
    model: &Path,
    inputs: &std::collections::BTreeMap<String, ferry_verifier::Input>,
) -> Result<
    std::collections::BTreeMap<String, ferry_verifier::F32Tensor>,
    ferry_verifier::VerifyError,
> {
    let mut values = ferry_verifier::Values::from_inputs(inputs)?;
    for (k, seg) in segments.iter().enumerate() {
        let view = ReportView::segment(graph, seg, &mut values, model, k)
            .map_err(|e| ferry_verifier::VerifyError::Runtime(format!("float16 segments: {e}")))?;
        let mut m = ferry_verifier::Model::load_lean(&view.path, 2)?;
        let out = m.run_values(&values)?;
        drop(m);
        drop(view);
        values.extend(out);
        let later: std::collections::HashSet<&str> = segments[k + 1..]
            .iter()
            .flat_map(|s| s.inputs.iter().map(String::as_str))
            .chain(graph.outputs.iter().map(|o| o.name.as_str()))
            .collect();
        values.retain(|n| later.contains(n));
    }
    values.floats(graph.outputs.iter().map(|o| o.name.as_str()))
}

/// Runs the float and quantized models on the golden's inputs (or dummy inputs, batch 2 ×
/// 16 tokens) and compares their outputs. ONNX Runtime loads both lean
/// (`Model::load_lean`) from views that map their weights; a float16 model (`segmented`)
/// runs segment by segment after the float model has run and been dropped. When the
/// estimated memory is above `budget_mib` (default an eighth of physical memory) the
/// report is skipped (`VerifyError::Runtime` with the reason).
fn accuracy(
    reference: &Path,
    quantized: &Path,
    golden: Option<&Path>,
    vocab: &DummyVocab,
    budget_mib: Option<u64>,
    segmented: bool,
) -> Result<(String, Vec<ferry_verifier::Agreement>), ferry_verifier::VerifyError> {
    let budget = budget_mib
        .map(|m| m.saturating_mul(1 << 20))
        .or_else(|| physical_memory().map(|b| b / 8))
        .unwrap_or(4 << 30);
    let (_rview, rpath, candidate, need) =
        report_models(reference, quantized, segmented).map_err(|e| {
            ferry_verifier::VerifyError::Runtime(format!("{}: {e}", quantized.display()))
        })?;
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
    let rows = match candidate {
        Candidate::Whole(_view, qpath) => {
            let mut q = ferry_verifier::Model::load_lean(&qpath, 2)?;
            ferry_verifier::compare_models(&mut r, &mut q, &inputs)?
        }
        Candidate::Segments(graph, segments) => {
            let want = r.run_inputs(&inputs)?;
            drop(r);
            let got = run_segments(&graph, &segments, quantized, &inputs)?;
            ferry_verifier::compare_outputs(&want, &got)?
        }
    };
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn testdata(case: &str) -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../testdata")
            .join(case)
    }

    /// bert-tiny-gelu traced and written to `dir`: plain float32, and optimized (contrib
    /// ops) in float16 with float32 inputs/outputs.
    fn models(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
        let ck = ferry_loader::load(&testdata("bert-tiny-gelu")).expect("load");
        let mut g =
            ferry_tracer::trace(&ck.config, &ck.weights, &Default::default()).expect("trace");
        let f32_path = dir.join("m.onnx");
        ferry_onnx::write_model(&g, &f32_path, &Default::default()).expect("write");
        ferry_optimizer::optimize(&mut g).expect("optimize");
        ferry_quantizer::fp16::convert_fp16(&mut g, &Default::default()).expect("fp16");
        let f16_path = dir.join("h.onnx");
        ferry_onnx::write_model(&g, &f16_path, &Default::default()).expect("write");
        (f32_path, f16_path)
    }

    fn inputs() -> BTreeMap<String, ferry_verifier::Input> {
        let golden = ferry_verifier::Golden::load(&testdata("bert-tiny-gelu/golden.safetensors"))
            .expect("golden");
        ferry_verifier::golden_inputs(&golden)
    }

    type Outputs = BTreeMap<String, ferry_verifier::F32Tensor>;

    fn whole(path: &Path) -> Outputs {
        let mut m = ferry_verifier::Model::load_lean(path, 2).expect("ORT loads the model");
        m.run_inputs(&inputs()).expect("run")
    }

    fn segmented(
        path: &Path,
        edit: impl FnOnce(&mut Vec<ferry_ir::Segment>),
    ) -> Result<Outputs, ferry_verifier::VerifyError> {
        let graph = ferry_onnx::read_model(path).expect("read").graph;
        // Every node with a weight in a segment of its own.
        let mut segments = graph.segments(1);
        assert!(segments.len() > 8, "{} segments", segments.len());
        edit(&mut segments);
        run_segments(&graph, &segments, path, &inputs())
    }

    /// Outputs of `path` run whole and segmented (the same outputs are checked).
    fn whole_and_segmented(path: &Path) -> (Outputs, Outputs) {
        let want = whole(path);
        let got = segmented(path, |_| {}).expect("segmented run");
        assert_eq!(
            want.keys().collect::<Vec<_>>(),
            got.keys().collect::<Vec<_>>()
        );
        (want, got)
    }

    fn max_abs(a: &ferry_verifier::F32Tensor, b: &ferry_verifier::F32Tensor) -> f32 {
        assert_eq!(a.shape, b.shape);
        a.data
            .iter()
            .zip(&b.data)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max)
    }

    /// A model run segment by segment computes what the whole model computes: float32 bit
    /// for bit. The optimized float16 model (Attention, SkipLayerNormalization, …) differs
    /// from ONNX Runtime's whole-model run by about one float16 ulp (2.9e-3 on outputs of
    /// magnitude 2–4 with every weighted node a segment of its own): a value crossing a
    /// boundary is the float16 tensor the graph declares, where the whole run keeps float32
    /// between two nodes it computes in float32. Against the float32 model both stay within
    /// the float16 tolerances (max-abs 1e-2, cosine 0.99999; here 3.8e-3 segmented, 3.5e-3
    /// whole). The embedding lookup reads a table cut to the rows its ids name. A boundary
    /// value that no segment hands on is an error.
    #[test]
    fn segmented_runs_match_whole_model_runs() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (f32_path, f16_path) = models(dir.path());

        let (want, got) = whole_and_segmented(&f32_path);
        for (name, w) in &want {
            assert_eq!(w.shape, got[name].shape, "{name}");
            assert!(
                w.data
                    .iter()
                    .zip(&got[name].data)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "{name}: max-abs {}",
                max_abs(w, &got[name])
            );
        }

        // The float16 model's embedding segment holds only the rows looked up.
        let graph = ferry_onnx::read_model(&f16_path).expect("read").graph;
        let cut = graph
            .segments(1)
            .iter()
            .filter(|s| segment_cost(&graph, s) < s.weight_bytes)
            .map(|s| graph.nodes[s.nodes.start].op_type.clone())
            .collect::<Vec<_>>();
        assert_eq!(cut, ["EmbedLayerNormalization"]);

        let float = want;
        let (want, got) = whole_and_segmented(&f16_path);
        for (name, w) in &want {
            let d = max_abs(w, &got[name]);
            let (dw, dg) = (max_abs(&float[name], w), max_abs(&float[name], &got[name]));
            let (cw, cg) = (
                ferry_verifier::cosine(&float[name].data, &w.data),
                ferry_verifier::cosine(&float[name].data, &got[name].data),
            );
            println!(
                "float16 {name}: segmented vs whole max-abs {d:e}; vs float32: whole {dw:e} \
                 (cosine {cw}), segmented {dg:e} (cosine {cg})"
            );
            assert!(d <= 1e-2, "{name}: segmented vs whole max-abs {d}");
            assert!(dg <= 1e-2 && cg >= 0.99999, "{name}: {dg} {cg}");
        }

        // A boundary value no segment hands on: the next segment has no input.
        let err = segmented(&f16_path, |s| {
            let i = s
                .iter()
                .position(|s| s.outputs.len() > 1)
                .expect("two outputs");
            s[i].outputs.pop();
        })
        .expect_err("a dropped boundary value");
        assert!(err.to_string().contains("no tensor computed"), "{err}");
    }
}
