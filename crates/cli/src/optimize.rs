//! `ferry optimize`: ONNX reader → optimizer passes → ONNX writer.

use crate::OptimizeArgs;
use crate::common::{check_output_path, done, human_bytes, stage};

pub fn optimize(a: &OptimizeArgs) -> Result<(), String> {
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
