//! ferry-optimizer: graph passes that work on any model's IR, whoever exported it.
//!
//! Each pass is a function over a [`Graph`] that returns how much it changed: constant
//! folding ([`fold_constants`]: `Constant` nodes → initializers; [`fold_transposes`]:
//! `Transpose` of an initializer → the transposed initializer, so later fusions see MatMul
//! weights as plain initializers) and clean-ups ([`remove_dead_nodes`],
//! [`remove_unused_initializers`]) and exact-rewrite fusions into ONNX Runtime's
//! `com.microsoft` contrib ops ([`fuse_gelu`], [`fuse_bias_gelu`], [`fuse_fast_gelu`],
//! [`fuse_skip_layer_norm`], [`fuse_attention`], [`fuse_embed_layer_norm`]), plus the opt-in, approximate [`approximate_gelu`].
//! [`optimize`] / [`optimize_with`] run them in order and return [`Stats`]. Folded tensors are owned; untouched initializers keep borrowing their bytes.

mod fold;
mod fuse;
mod prune;

use std::fmt;

use ferry_ir::Graph;

pub use fold::{fold_constants, fold_transposes};
pub use fuse::{
    MS_DOMAIN, approximate_gelu, fuse_attention, fuse_bias_gelu, fuse_embed_layer_norm,
    fuse_fast_gelu, fuse_gelu, fuse_skip_layer_norm,
};
pub use prune::{remove_dead_nodes, remove_unused_initializers};

/// Why a pass failed. The graph may be partly optimized when this is returned.
#[derive(Debug, thiserror::Error)]
pub enum OptimizeError {
    /// An initializer's bytes could not be read.
    #[error("cannot read tensor `{name}`: {source}")]
    Io {
        /// The tensor.
        name: String,
        /// The cause.
        source: std::io::Error,
    },
    /// A node is inconsistent with its inputs (e.g. a `perm` that is not a permutation).
    #[error("node `{node}` ({op_type}): {reason}")]
    BadNode {
        /// Node name.
        node: String,
        /// Its op type.
        op_type: String,
        /// What is wrong.
        reason: String,
    },
}

/// What [`optimize`] changed, per pass.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// `Constant` nodes turned into initializers.
    pub constants_folded: usize,
    /// `Transpose` nodes of initializers replaced by transposed initializers.
    pub transposes_folded: usize,
    /// Nodes removed because none of their outputs reaches a graph output.
    pub dead_nodes_removed: usize,
    /// Initializers removed because nothing uses them.
    pub unused_initializers_removed: usize,
    /// Erf GELU patterns fused into `Gelu` (those absorbed into `BiasGelu` included).
    pub gelu_fused: usize,
    /// `Gelu` of a MatMul plus 1-D bias fused into `BiasGelu`.
    pub bias_gelu_fused: usize,
    /// Tanh GELU patterns fused into `FastGelu` (with or without its bias input).
    pub fast_gelu_fused: usize,
    /// Residual `Add` + `LayerNormalization` fused into `SkipLayerNormalization`.
    pub skip_layer_norm_fused: usize,
    /// Encoder self-attention blocks fused into `Attention`.
    pub attention_fused: usize,
    /// BERT embeddings (word + token-type + position lookups, Add, LayerNormalization) fused
    /// into `EmbedLayerNormalization`.
    pub embed_layer_norm_fused: usize,
    /// `Gelu` / `BiasGelu` turned into (approximate) `FastGelu` by
    /// [`OptimizeOptions::gelu_approximation`].
    pub gelu_approximated: usize,
}

/// Options of [`optimize_with`]; the default is exact rewrites only.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OptimizeOptions {
    /// After fusion, turn `Gelu` into `FastGelu` and `BiasGelu` into `FastGelu` with bias
    /// ([`approximate_gelu`]). Approximate: outputs change by up to about 1e-3.
    pub gelu_approximation: bool,
}

impl fmt::Display for Stats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "folded {} Constant and {} Transpose nodes; fused {} Gelu ({} into BiasGelu), {} FastGelu, {} SkipLayerNormalization, {} Attention and {} EmbedLayerNormalization; approximated {} Gelu as FastGelu; removed {} dead nodes and {} unused initializers",
            self.constants_folded,
            self.transposes_folded,
            self.gelu_fused,
            self.bias_gelu_fused,
            self.fast_gelu_fused,
            self.skip_layer_norm_fused,
            self.attention_fused,
            self.embed_layer_norm_fused,
            self.gelu_approximated,
            self.dead_nodes_removed,
            self.unused_initializers_removed
        )
    }
}

/// Runs every exact pass once, in order: constants, transposes, Gelu, BiasGelu, FastGelu,
/// SkipLayerNormalization, Attention, EmbedLayerNormalization, dead nodes, unused initializers.
pub fn optimize(graph: &mut Graph) -> Result<Stats, OptimizeError> {
    optimize_with(graph, &OptimizeOptions::default())
}

/// [`optimize`] with options: when `gelu_approximation` is set, [`approximate_gelu`] runs
/// after the fusions.
pub fn optimize_with(graph: &mut Graph, opts: &OptimizeOptions) -> Result<Stats, OptimizeError> {
    let constants_folded = fold_constants(graph);
    let transposes_folded = fold_transposes(graph)?;
    let gelu_fused = fuse_gelu(graph);
    let bias_gelu_fused = fuse_bias_gelu(graph);
    let fast_gelu_fused = fuse_fast_gelu(graph);
    let skip_layer_norm_fused = fuse_skip_layer_norm(graph);
    let attention_fused = fuse_attention(graph);
    let embed_layer_norm_fused = fuse_embed_layer_norm(graph);
    let gelu_approximated = if opts.gelu_approximation {
        approximate_gelu(graph)
    } else {
        0
    };
    let dead_nodes_removed = remove_dead_nodes(graph);
    let unused_initializers_removed = remove_unused_initializers(graph);
    Ok(Stats {
        constants_folded,
        transposes_folded,
        dead_nodes_removed,
        unused_initializers_removed,
        gelu_fused,
        bias_gelu_fused,
        fast_gelu_fused,
        skip_layer_norm_fused,
        attention_fused,
        embed_layer_norm_fused,
        gelu_approximated,
    })
}

#[cfg(test)]
pub(crate) mod test_util {
    use std::collections::BTreeMap;

    use ferry_ir::{Attr, DType, Graph, Initializer, Node, OpsetImport, TensorData, Value};

    pub fn node(op: &str, inputs: &[&str], outputs: &[&str], attrs: Vec<(&str, Attr)>) -> Node {
        Node {
            name: format!("/{op}_{}", outputs.first().copied().unwrap_or("")),
            op_type: op.into(),
            domain: String::new(),
            inputs: inputs.iter().map(|s| s.to_string()).collect(),
            outputs: outputs.iter().map(|s| s.to_string()).collect(),
            attrs: attrs
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect::<BTreeMap<_, _>>(),
        }
    }

    pub fn init(name: &str, dims: Vec<i64>, values: &[f32]) -> Initializer {
        Initializer {
            name: name.into(),
            dtype: DType::F32,
            dims,
            data: TensorData::from_f32(values),
        }
    }

    pub fn graph(nodes: Vec<Node>, initializers: Vec<Initializer>, outputs: &[&str]) -> Graph {
        Graph {
            name: "g".into(),
            inputs: vec![Value::new("x", DType::F32, vec![])],
            outputs: outputs
                .iter()
                .map(|o| Value::new(*o, DType::F32, vec![]))
                .collect(),
            nodes,
            initializers,
            value_info: vec![],
            opsets: vec![OpsetImport {
                domain: String::new(),
                version: 17,
            }],
        }
    }
}

#[cfg(test)]
mod tests {
    use ferry_ir::Attr;

    use super::test_util::{graph, init, node};
    use super::*;

    #[test]
    fn optimize_runs_every_pass() {
        // y = x @ Transpose(w); c is a Constant nobody needs after folding; dead Relu.
        let mut g = graph(
            vec![
                node("Transpose", &["w"], &["wt"], vec![]),
                node("MatMul", &["x", "wt"], &["y"], vec![]),
                node(
                    "Constant",
                    &[],
                    &["c"],
                    vec![("value_float", Attr::Float(2.0))],
                ),
                node("Relu", &["c"], &["r"], vec![]),
            ],
            vec![init("w", vec![2, 3], &[1., 2., 3., 4., 5., 6.])],
            &["y"],
        );
        let stats = optimize(&mut g).expect("optimize");
        assert_eq!(
            stats,
            Stats {
                constants_folded: 1,
                transposes_folded: 1,
                dead_nodes_removed: 1,
                unused_initializers_removed: 2,
                ..Stats::default()
            }
        );
        assert_eq!(g.nodes.len(), 1);
        assert_eq!(g.nodes[0].op_type, "MatMul");
        assert_eq!(g.initializers.len(), 1);
        assert_eq!(g.initializers[0].name, "wt");
        assert_eq!(g.initializers[0].dims, vec![3, 2]);
        assert!(stats.to_string().contains("1 Transpose"));
        assert!(
            stats
                .to_string()
                .contains("0 Attention and 0 EmbedLayerNormalization;")
        );
    }
}
