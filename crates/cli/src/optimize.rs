//! `ferry optimize` (and `ferry export --optimize`): ONNX reader → optimizer passes → ONNX
//! writer, then ONNX Runtime-style fused-operator statistics.

use std::collections::BTreeMap;
use std::path::Path;

use crate::OptimizeArgs;
use crate::common::{check_output_path, done, human_bytes, stage};

/// What one optimization did.
pub struct Optimized {
    /// The passes' summary line (`folded … (131 → 23 nodes)`).
    pub summary: String,
    /// Count per fused op type of the optimized graph (see
    /// `ferry_optimizer::fused_operator_statistics`).
    pub fused: BTreeMap<&'static str, usize>,
    /// Nodes before and after.
    pub nodes: (usize, usize),
    /// The written model.
    pub report: ferry_onnx::WriteReport,
}

/// Parses `--disable` names (each may be comma-separated already split by clap) into the
/// set of fusions to skip; an unknown name is one error line listing the valid ones.
pub fn disabled_fusions(names: &[String]) -> Result<ferry_optimizer::FusionSet, String> {
    names
        .iter()
        .map(|n| {
            n.parse::<ferry_optimizer::Fusion>()
                .map_err(|e| format!("--disable: {e}"))
        })
        .collect()
}

/// Reads `input`, optimizes it with `opts` and writes `output` (external data when asked or
/// past 2 GiB). The output may be the input: it is written under a temporary name and
/// renamed, and the input's mapped bytes stay valid after the rename.
pub fn optimize_file(
    input: &Path,
    output: &Path,
    opts: &ferry_optimizer::OptimizeOptions,
    external_data: bool,
) -> Result<Optimized, String> {
    let pb = stage("read");
    let model = ferry_onnx::read_model(input).map_err(|e| e.to_string())?;
    let mut graph = model.graph;
    let before = graph.nodes.len();
    done(pb, format!("read {} ({before} nodes)", input.display()));
    let pb = stage("optimize");
    let stats = ferry_optimizer::optimize_with(&mut graph, opts).map_err(|e| e.to_string())?;
    let after = graph.nodes.len();
    let summary = format!("{stats} ({before} → {after} nodes)");
    done(pb, summary.clone());
    let fused = ferry_optimizer::fused_operator_statistics(&graph);
    let pb = stage("write");
    let wopts = ferry_onnx::WriteOptions {
        external_data: crate::common::external_data(external_data),
        doc_string: model.info.doc_string,
        metadata: model.info.metadata,
        ..Default::default()
    };
    let report = ferry_onnx::write_model(&graph, output, &wopts).map_err(|e| e.to_string())?;
    done(
        pb,
        format!(
            "wrote {} ({})",
            report.model_path.display(),
            human_bytes(report.model_bytes + report.data_bytes)
        ),
    );
    Ok(Optimized {
        summary,
        fused,
        nodes: (before, after),
        report,
    })
}

/// The fused-operator statistics as one human line, in ONNX Runtime's order
/// (`fused operators: EmbedLayerNormalization 1, Attention 2, …`).
pub fn fused_line(fused: &BTreeMap<&'static str, usize>) -> String {
    let parts: Vec<String> = ferry_optimizer::FUSED_OP_TYPES
        .iter()
        .map(|op| format!("{op} {}", fused.get(op).copied().unwrap_or(0)))
        .collect();
    format!("fused operators: {}", parts.join(", "))
}

pub fn optimize(a: &OptimizeArgs) -> Result<(), String> {
    let disabled = disabled_fusions(&a.disable)?;
    check_output_path(&a.output)?;
    let opts = ferry_optimizer::OptimizeOptions {
        gelu_approximation: a.gelu_approximation,
        disabled,
        ..Default::default()
    };
    let o = optimize_file(&a.input, &a.output, &opts, a.external_data)?;
    if a.json {
        // Machine-readable on stdout, human text on stderr.
        eprintln!("{}", o.summary);
        eprintln!("{}", fused_line(&o.fused));
        let json = serde_json::json!({
            "input": a.input.display().to_string(),
            "output": o.report.model_path.display().to_string(),
            "nodes_before": o.nodes.0,
            "nodes_after": o.nodes.1,
            "fused_operators": o.fused,
            "summary": o.summary,
        });
        crate::common::outln(json);
    } else {
        crate::common::outln(&o.summary);
        crate::common::outln(fused_line(&o.fused));
    }
    Ok(())
}
