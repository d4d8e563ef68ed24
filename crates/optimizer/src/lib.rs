//! ferry-optimizer: graph passes that work on any model's IR, whoever exported it.
//!
//! Each pass is a function over a [`Graph`] that returns how much it changed: constant
//! folding ([`fold_constants`]: `Constant` nodes → initializers; [`fold_transposes`]:
//! `Transpose` of an initializer → the transposed initializer, so later fusions see MatMul
//! weights as plain initializers; [`fold_computed`]: nodes whose inputs are all constant,
//! such as shape arithmetic over fixed dims, evaluated into initializers) and clean-ups ([`remove_dead_nodes`],
//! [`remove_unused_initializers`]) and exact-rewrite fusions into ONNX Runtime's
//! `com.microsoft` contrib ops ([`fuse_gelu`], [`fuse_bias_gelu`], [`fuse_fast_gelu`],
//! [`fuse_skip_layer_norm`], [`fuse_attention`], [`fuse_embed_layer_norm`],
//! [`fuse_gpt2_attention`], [`fuse_multi_head_attention`]; [`fuse_layer_norm`] into ONNX's
//! `LayerNormalization`), plus the opt-in, approximate [`approximate_gelu`]. Before the
//! fusions, [`bypass_identities`] and [`infer_shapes`] make models from other exporters
//! (no `value_info`, deduplicated parameters) look like ferry's own to the matchers.
//! [`optimize`] / [`optimize_with`] check the nodes' arity ([`check_nodes`]) and run them in order (skipping [`Fusion`]s the options
//! disable) and return [`Stats`]; [`fused_operator_statistics`] counts the fused ops of the
//! result as ONNX Runtime reports them. Folded tensors are owned; untouched initializers keep borrowing their bytes.

mod alias;
mod check;
mod eval;
mod fold;
mod fuse;
mod fuse_gpt2;
mod fuse_gqa;
mod fuse_layer_norm;
mod fuse_llm;
mod fuse_mha;
mod infer;
mod pattern;
mod prune;
mod slice_bounds;

use std::collections::BTreeMap;
use std::fmt;

use ferry_ir::Graph;

pub use alias::bypass_identities;
pub use check::check_nodes;
pub use fold::{fold_computed, fold_constants, fold_transposes};
pub use fuse::{
    MS_DOMAIN, approximate_gelu, fuse_attention, fuse_bias_gelu, fuse_embed_layer_norm,
    fuse_fast_gelu, fuse_gelu, fuse_skip_layer_norm,
};
pub use fuse_gpt2::fuse_gpt2_attention;
pub use fuse_gqa::{
    drop_unread_position_ids, fuse_group_query_attention, fuse_group_query_attention_as,
    fuse_rotary_embedding,
};
pub use fuse_layer_norm::fuse_layer_norm;
pub use fuse_llm::{fuse_packed_qkv, fuse_simplified_layer_norm, fuse_skip_simplified_layer_norm};
pub use fuse_mha::fuse_multi_head_attention;
pub use infer::infer_shapes;
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
    /// The two parts of a merged decoder could not be merged again.
    #[error(transparent)]
    Merge(#[from] ferry_ir::MergeError),
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
    /// Decomposed layer normalizations (ReduceMean … Sqrt, Div, Mul, Add) fused into
    /// `LayerNormalization`.
    pub layer_norm_fused: usize,
    /// Residual `Add` + `LayerNormalization` fused into `SkipLayerNormalization`.
    pub skip_layer_norm_fused: usize,
    /// Self-attention blocks fused into `Attention`: encoders' ([`fuse_attention`]) and
    /// GPT-2's causal ones ([`fuse_gpt2_attention`], `unidirectional`).
    pub attention_fused: usize,
    /// Attention cores with separate Q/K/V projections fused into `MultiHeadAttention`
    /// ([`fuse_multi_head_attention`]).
    pub multi_head_attention_fused: usize,
    /// BERT embeddings (word + token-type + position lookups, Add, LayerNormalization) fused
    /// into `EmbedLayerNormalization`.
    pub embed_layer_norm_fused: usize,
    /// RMSNorms fused into `SimplifiedLayerNormalization` ([`fuse_simplified_layer_norm`];
    /// those then absorbed into the skip form included).
    pub simplified_layer_norm_fused: usize,
    /// Residual `Add` + `SimplifiedLayerNormalization` fused into
    /// `SkipSimplifiedLayerNormalization` ([`fuse_skip_simplified_layer_norm`]).
    pub skip_simplified_layer_norm_fused: usize,
    /// q/k/v projection triples packed into one MatMul + Split ([`fuse_packed_qkv`]).
    pub packed_qkv_fused: usize,
    /// Decoder attention blocks with a cache fused into `GroupQueryAttention` (with two
    /// `RotaryEmbedding`s each; [`fuse_group_query_attention`]).
    pub group_query_attention_fused: usize,
    /// Rotary embeddings outside a fused attention fused into `RotaryEmbedding`
    /// ([`fuse_rotary_embedding`]).
    pub rotary_embedding_fused: usize,
    /// `Gelu` / `BiasGelu` turned into (approximate) `FastGelu` by
    /// [`OptimizeOptions::gelu_approximation`].
    pub gelu_approximated: usize,
    /// Nodes evaluated on constant inputs by [`fold_computed`] (shape arithmetic, masks).
    pub computed_folded: usize,
    /// `Identity` nodes of initializers bypassed before the fusions ([`bypass_identities`]).
    pub identities_bypassed: usize,
    /// Shapes added to `value_info` before the fusions ([`infer_shapes`]).
    pub shapes_inferred: usize,
}

impl std::ops::Add for Stats {
    type Output = Stats;

    /// Sums two runs' counts (the two parts of a merged decoder).
    fn add(self, o: Stats) -> Stats {
        Stats {
            constants_folded: self.constants_folded + o.constants_folded,
            transposes_folded: self.transposes_folded + o.transposes_folded,
            dead_nodes_removed: self.dead_nodes_removed + o.dead_nodes_removed,
            unused_initializers_removed: self.unused_initializers_removed
                + o.unused_initializers_removed,
            gelu_fused: self.gelu_fused + o.gelu_fused,
            bias_gelu_fused: self.bias_gelu_fused + o.bias_gelu_fused,
            fast_gelu_fused: self.fast_gelu_fused + o.fast_gelu_fused,
            layer_norm_fused: self.layer_norm_fused + o.layer_norm_fused,
            skip_layer_norm_fused: self.skip_layer_norm_fused + o.skip_layer_norm_fused,
            attention_fused: self.attention_fused + o.attention_fused,
            multi_head_attention_fused: self.multi_head_attention_fused
                + o.multi_head_attention_fused,
            embed_layer_norm_fused: self.embed_layer_norm_fused + o.embed_layer_norm_fused,
            simplified_layer_norm_fused: self.simplified_layer_norm_fused
                + o.simplified_layer_norm_fused,
            skip_simplified_layer_norm_fused: self.skip_simplified_layer_norm_fused
                + o.skip_simplified_layer_norm_fused,
            packed_qkv_fused: self.packed_qkv_fused + o.packed_qkv_fused,
            group_query_attention_fused: self.group_query_attention_fused
                + o.group_query_attention_fused,
            rotary_embedding_fused: self.rotary_embedding_fused + o.rotary_embedding_fused,
            gelu_approximated: self.gelu_approximated + o.gelu_approximated,
            computed_folded: self.computed_folded + o.computed_folded,
            identities_bypassed: self.identities_bypassed + o.identities_bypassed,
            shapes_inferred: self.shapes_inferred + o.shapes_inferred,
        }
    }
}

/// Options of [`optimize_with`]; the default is exact rewrites only, every fusion enabled.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OptimizeOptions {
    /// After fusion, turn `Gelu` into `FastGelu` and `BiasGelu` into `FastGelu` with bias
    /// ([`approximate_gelu`]). Approximate: outputs change by up to about 1e-3.
    pub gelu_approximation: bool,
    /// Fusions not to run (ONNX Runtime's `--disable_*` options).
    pub disabled: FusionSet,
    /// The form [`fuse_group_query_attention_as`] writes: exact (the default) or
    /// onnxruntime-genai's.
    pub gqa_form: GqaForm,
}

/// The form of the fused GroupQueryAttention.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum GqaForm {
    /// `RotaryEmbedding` on `position_ids` outside the attention, the export's additive mask
    /// as `attention_bias`: exact for left-padded batches (see
    /// [`fuse_group_query_attention`]).
    #[default]
    Exact,
    /// onnxruntime-genai's model builder's form: packed QKV straight into the attention,
    /// rotary inside it (`do_rotary`, constant cos/sin caches of `max_positions` rows),
    /// lengths from `attention_mask`, no bias, no `position_ids`. Exact for unpadded and
    /// right-padded rows only. See [`fuse_group_query_attention_as`].
    Genai {
        /// Rows of the cos/sin caches: the largest position the model will see plus one
        /// (the config's context length).
        max_positions: i64,
    },
}

/// A fusion pass [`optimize_with`] can skip, named as ONNX Runtime's optimizer options
/// name them (`attention` for `disable_attention`, …).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Fusion {
    /// [`fuse_gelu`] (erf pattern → `Gelu`); without it no `BiasGelu` either.
    Gelu,
    /// [`fuse_bias_gelu`].
    BiasGelu,
    /// [`fuse_fast_gelu`].
    FastGelu,
    /// [`fuse_layer_norm`] (decomposed layer norm → `LayerNormalization`).
    LayerNorm,
    /// [`fuse_skip_layer_norm`].
    SkipLayerNorm,
    /// [`fuse_attention`].
    Attention,
    /// `MultiHeadAttention` fusion (separate Q/K/V projections).
    MultiHeadAttention,
    /// [`fuse_embed_layer_norm`].
    EmbedLayerNorm,
    /// [`fuse_simplified_layer_norm`] (RMSNorm); without it no skip form either.
    SimplifiedLayerNorm,
    /// [`fuse_skip_simplified_layer_norm`].
    SkipSimplifiedLayerNorm,
    /// [`fuse_packed_qkv`].
    PackedQkv,
    /// [`fuse_group_query_attention`] (with its `RotaryEmbedding`s).
    GroupQueryAttention,
    /// [`fuse_rotary_embedding`].
    RotaryEmbedding,
}

impl Fusion {
    /// Every fusion, in pass order.
    pub const ALL: [Fusion; 13] = [
        Fusion::Gelu,
        Fusion::BiasGelu,
        Fusion::FastGelu,
        Fusion::LayerNorm,
        Fusion::SkipLayerNorm,
        Fusion::Attention,
        Fusion::MultiHeadAttention,
        Fusion::EmbedLayerNorm,
        Fusion::SimplifiedLayerNorm,
        Fusion::SkipSimplifiedLayerNorm,
        Fusion::PackedQkv,
        Fusion::GroupQueryAttention,
        Fusion::RotaryEmbedding,
    ];

    /// The name `--disable` takes (`skip-layer-norm`).
    pub const fn name(self) -> &'static str {
        match self {
            Fusion::Gelu => "gelu",
            Fusion::BiasGelu => "bias-gelu",
            Fusion::FastGelu => "fast-gelu",
            Fusion::LayerNorm => "layer-norm",
            Fusion::SkipLayerNorm => "skip-layer-norm",
            Fusion::Attention => "attention",
            Fusion::MultiHeadAttention => "multi-head-attention",
            Fusion::EmbedLayerNorm => "embed-layer-norm",
            Fusion::SimplifiedLayerNorm => "simplified-layer-norm",
            Fusion::SkipSimplifiedLayerNorm => "skip-simplified-layer-norm",
            Fusion::PackedQkv => "packed-qkv",
            Fusion::GroupQueryAttention => "group-query-attention",
            Fusion::RotaryEmbedding => "rotary-embedding",
        }
    }

    /// The contrib (or ONNX) op type the fusion produces (`SkipLayerNormalization`).
    pub const fn op_type(self) -> &'static str {
        match self {
            Fusion::Gelu => "Gelu",
            Fusion::BiasGelu => "BiasGelu",
            Fusion::FastGelu => "FastGelu",
            Fusion::LayerNorm => "LayerNormalization",
            Fusion::SkipLayerNorm => "SkipLayerNormalization",
            Fusion::Attention => "Attention",
            Fusion::MultiHeadAttention => "MultiHeadAttention",
            Fusion::EmbedLayerNorm => "EmbedLayerNormalization",
            Fusion::SimplifiedLayerNorm => "SimplifiedLayerNormalization",
            Fusion::SkipSimplifiedLayerNorm => "SkipSimplifiedLayerNormalization",
            Fusion::PackedQkv => "Split",
            Fusion::GroupQueryAttention => "GroupQueryAttention",
            Fusion::RotaryEmbedding => "RotaryEmbedding",
        }
    }
}

impl fmt::Display for Fusion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A fusion name [`Fusion::from_str`](std::str::FromStr) does not know.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown fusion `{name}`; valid: {}", Fusion::ALL.map(Fusion::name).join(", "))]
pub struct UnknownFusion {
    /// The name given.
    pub name: String,
}

impl std::str::FromStr for Fusion {
    type Err = UnknownFusion;

    /// Accepts the kebab-case name (`skip-layer-norm`), with `_` for `-` and any case
    /// (ONNX Runtime's `disable_skip_layer_norm` spelling without the prefix), or the op
    /// type it produces (`SkipLayerNormalization`).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let key = s.trim().to_ascii_lowercase().replace('_', "-");
        let key = key.strip_prefix("disable-").unwrap_or(&key);
        Fusion::ALL
            .into_iter()
            .find(|f| f.name() == key || f.op_type().eq_ignore_ascii_case(s.trim()))
            .ok_or_else(|| UnknownFusion {
                name: s.to_string(),
            })
    }
}

/// A set of [`Fusion`]s (empty by default).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FusionSet(u16);

impl FusionSet {
    /// Adds a fusion.
    pub fn insert(&mut self, f: Fusion) {
        self.0 |= 1 << f as u16;
    }

    /// Whether the set holds `f`.
    pub fn contains(&self, f: Fusion) -> bool {
        self.0 & (1 << f as u16) != 0
    }
}

impl FromIterator<Fusion> for FusionSet {
    fn from_iter<I: IntoIterator<Item = Fusion>>(iter: I) -> Self {
        let mut s = FusionSet::default();
        for f in iter {
            s.insert(f);
        }
        s
    }
}

/// The op types ONNX Runtime's `get_fused_operator_statistics` reports for BERT-like
/// models, in its order.
pub const FUSED_OP_TYPES: [&str; 13] = [
    "EmbedLayerNormalization",
    "Attention",
    "MultiHeadAttention",
    "Gelu",
    "FastGelu",
    "BiasGelu",
    "GemmFastGelu",
    "LayerNormalization",
    "SimplifiedLayerNormalization",
    "SkipLayerNormalization",
    "SkipSimplifiedLayerNormalization",
    "RotaryEmbedding",
    "GroupQueryAttention",
];

/// Fused-operator statistics, as ONNX Runtime's `get_fused_operator_statistics` gives
/// them: for each op type of [`FUSED_OP_TYPES`], how many nodes of that type the graph has
/// (zeros included), keyed by op type.
pub fn fused_operator_statistics(graph: &Graph) -> BTreeMap<&'static str, usize> {
    let mut counts: BTreeMap<&'static str, usize> =
        FUSED_OP_TYPES.iter().map(|&op| (op, 0)).collect();
    fn count(graph: &Graph, counts: &mut BTreeMap<&'static str, usize>) {
        for n in &graph.nodes {
            if let Some(c) = counts.get_mut(n.op_type.as_str()) {
                *c += 1;
            }
            // `If` branches (a merged decoder's two decoders) count too.
            for g in n.subgraphs() {
                count(g, counts);
            }
        }
    }
    count(graph, &mut counts);
    counts
}

impl fmt::Display for Stats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "folded {} Constant, {} Transpose and {} computed nodes; fused {} Gelu ({} into BiasGelu), {} FastGelu, {} LayerNormalization, {} SkipLayerNormalization, {} Attention and {} EmbedLayerNormalization; approximated {} Gelu as FastGelu; removed {} dead nodes and {} unused initializers",
            self.constants_folded,
            self.transposes_folded,
            self.computed_folded,
            self.gelu_fused,
            self.bias_gelu_fused,
            self.fast_gelu_fused,
            self.layer_norm_fused,
            self.skip_layer_norm_fused,
            self.attention_fused,
            self.embed_layer_norm_fused,
            self.gelu_approximated,
            self.dead_nodes_removed,
            self.unused_initializers_removed
        )
    }
}

/// Runs every exact pass once, in order, after [`check_nodes`] (a malformed node is a
/// [`OptimizeError::BadNode`], the graph untouched): constants, transposes, Gelu, BiasGelu, FastGelu,
/// SkipLayerNormalization, Attention, EmbedLayerNormalization, dead nodes, unused initializers.
pub fn optimize(graph: &mut Graph) -> Result<Stats, OptimizeError> {
    optimize_with(graph, &OptimizeOptions::default())
}

/// [`optimize`] with options: fusions in `disabled` are skipped; when `gelu_approximation`
/// is set, [`approximate_gelu`] runs after the fusions. [`fold_computed`] runs after the
/// fusions (which match the shape arithmetic of dynamic-axis exports, e.g. the position
/// slice EmbedLayerNormalization absorbs) and folds what constant paths remain.
///
/// A merged decoder ([`ferry_ir::split_merged`]) is optimized as its two decoders, merged
/// again (stats summed); any other graph with subgraphs is only pruned (its `If` branches
/// are opaque to the fusions, and every outer value a branch reads stays).
pub fn optimize_with(graph: &mut Graph, opts: &OptimizeOptions) -> Result<Stats, OptimizeError> {
    if let Some(parts) = ferry_ir::map_merged(graph, |g| optimize_with(g, opts)) {
        let (a, b) = parts?;
        return Ok(a + b);
    }
    check_nodes(graph)?;
    if graph.has_subgraphs() {
        return Ok(Stats {
            dead_nodes_removed: remove_dead_nodes(graph),
            unused_initializers_removed: remove_unused_initializers(graph),
            ..Stats::default()
        });
    }
    let on = |f: Fusion| !opts.disabled.contains(f);
    let run = |f: Fusion, pass: fn(&mut Graph) -> usize, g: &mut Graph| {
        if on(f) { pass(g) } else { 0 }
    };
    let constants_folded = fold_constants(graph);
    let identities_bypassed = bypass_identities(graph);
    let transposes_folded = fold_transposes(graph)?;
    let shapes_inferred = infer_shapes(graph);
    let gelu_fused = run(Fusion::Gelu, fuse_gelu, graph);
    let bias_gelu_fused = run(Fusion::BiasGelu, fuse_bias_gelu, graph);
    let fast_gelu_fused = run(Fusion::FastGelu, fuse_fast_gelu, graph);
    let layer_norm_fused = run(Fusion::LayerNorm, fuse_layer_norm, graph);
    let skip_layer_norm_fused = run(Fusion::SkipLayerNorm, fuse_skip_layer_norm, graph);
    let attention_fused = run(Fusion::Attention, fuse_attention, graph)
        + run(Fusion::Attention, fuse_gpt2_attention, graph);
    // As in ONNX Runtime, disabling attention disables its MultiHeadAttention form too.
    let multi_head_attention_fused = if on(Fusion::Attention) {
        run(Fusion::MultiHeadAttention, fuse_multi_head_attention, graph)
    } else {
        0
    };
    let embed_layer_norm_fused = run(Fusion::EmbedLayerNorm, fuse_embed_layer_norm, graph);
    let simplified_layer_norm_fused = run(
        Fusion::SimplifiedLayerNorm,
        fuse_simplified_layer_norm,
        graph,
    );
    let skip_simplified_layer_norm_fused = if on(Fusion::SimplifiedLayerNorm) {
        run(
            Fusion::SkipSimplifiedLayerNorm,
            fuse_skip_simplified_layer_norm,
            graph,
        )
    } else {
        0
    };
    let packed_qkv_fused = run(Fusion::PackedQkv, fuse_packed_qkv, graph);
    let group_query_attention_fused = if on(Fusion::Attention) && on(Fusion::GroupQueryAttention) {
        fuse_group_query_attention_as(graph, opts.gqa_form)
    } else {
        0
    };
    let rotary_embedding_fused = run(Fusion::RotaryEmbedding, fuse_rotary_embedding, graph);
    let gelu_approximated = if opts.gelu_approximation {
        approximate_gelu(graph)
    } else {
        0
    };
    let computed_folded = fold_computed(graph);
    let dead_nodes_removed = remove_dead_nodes(graph);
    if matches!(opts.gqa_form, GqaForm::Genai { .. }) {
        drop_unread_position_ids(graph);
    }
    let unused_initializers_removed = remove_unused_initializers(graph);
    Ok(Stats {
        constants_folded,
        transposes_folded,
        dead_nodes_removed,
        unused_initializers_removed,
        gelu_fused,
        bias_gelu_fused,
        fast_gelu_fused,
        layer_norm_fused,
        skip_layer_norm_fused,
        attention_fused,
        multi_head_attention_fused,
        embed_layer_norm_fused,
        simplified_layer_norm_fused,
        skip_simplified_layer_norm_fused,
        packed_qkv_fused,
        group_query_attention_fused,
        rotary_embedding_fused,
        gelu_approximated,
        computed_folded,
        identities_bypassed,
        shapes_inferred,
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
    fn fusion_names_parse() {
        for f in Fusion::ALL {
            assert_eq!(f.name().parse::<Fusion>(), Ok(f));
            assert_eq!(f.op_type().parse::<Fusion>(), Ok(f));
        }
        assert_eq!(
            "SKIP_LAYER_NORM".parse::<Fusion>(),
            Ok(Fusion::SkipLayerNorm)
        );
        assert_eq!(
            "disable_embed_layer_norm".parse::<Fusion>(),
            Ok(Fusion::EmbedLayerNorm)
        );
        let e = "attn".parse::<Fusion>().expect_err("unknown");
        let msg = e.to_string();
        assert!(
            msg.starts_with("unknown fusion `attn`; valid: gelu, bias-gelu"),
            "{msg}"
        );
        assert!(msg.contains("multi-head-attention"), "{msg}");
        let set: FusionSet = [Fusion::Attention, Fusion::Gelu].into_iter().collect();
        assert!(set.contains(Fusion::Attention) && set.contains(Fusion::Gelu));
        assert!(!set.contains(Fusion::BiasGelu));
        assert!(!FusionSet::default().contains(Fusion::Gelu));
    }

    /// The erf GELU pattern, x * 0.5 * (1 + erf(x / sqrt 2)), as transformers exports it.
    fn gelu_graph() -> Graph {
        graph(
            vec![
                node("Div", &["x", "sqrt2"], &["d"], vec![]),
                node("Erf", &["d"], &["e"], vec![]),
                node("Add", &["e", "one"], &["a"], vec![]),
                node("Mul", &["x", "a"], &["m"], vec![]),
                node("Mul", &["m", "half"], &["y"], vec![]),
            ],
            vec![
                init("sqrt2", vec![], &[std::f32::consts::SQRT_2]),
                init("one", vec![], &[1.0]),
                init("half", vec![], &[0.5]),
            ],
            &["y"],
        )
    }

    #[test]
    fn fused_statistics_and_disabled_fusions() {
        let mut g = gelu_graph();
        let stats = optimize(&mut g).expect("optimize");
        assert_eq!(stats.gelu_fused, 1, "{stats}");
        let counts = fused_operator_statistics(&g);
        assert_eq!(counts.len(), FUSED_OP_TYPES.len());
        assert_eq!(counts["Gelu"], 1);
        assert_eq!(counts["Attention"], 0);
        assert_eq!(counts.values().sum::<usize>(), 1);

        let mut g = gelu_graph();
        let opts = OptimizeOptions {
            disabled: [Fusion::Gelu].into_iter().collect(),
            ..OptimizeOptions::default()
        };
        let stats = optimize_with(&mut g, &opts).expect("optimize");
        assert_eq!(stats.gelu_fused, 0, "{stats}");
        assert_eq!(fused_operator_statistics(&g)["Gelu"], 0);
        assert_eq!(g.nodes.len(), 5);
    }

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
                // The dead Relu's output, of the folded scalar.
                shapes_inferred: 1,
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
