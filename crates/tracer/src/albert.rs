//! ALBERT, as transformers' `modeling_albert.py` computes it: factorized embeddings
//! (`embedding_size` → `hidden_size` through `encoder.embedding_hidden_mapping_in`) and
//! layers shared across depth (`num_hidden_groups` groups of `inner_group_num` layers,
//! each stored once and applied wherever the encoder reuses it).

use ferry_ir::ModelConfig;

use crate::config::{attention_width, encoder_dims};
use crate::embeddings::{EmbeddingSpec, Positions, TokenTypes, embeddings};
use crate::heads::{EncoderHeads, MlmHead, Pooler, TYPED_INPUTS};
use crate::layers::{
    AttentionSpec, EncoderDims, WeightSource, add_norm, additive_mask, linear,
    multi_head_attention, scoped,
};
use crate::{Request, T, TraceError, Tracer};

/// The ALBERT hyper-parameters ferry needs, validated.
#[derive(Debug, Clone)]
struct AlbertDims {
    vocab: i64,
    embedding: i64,
    layers: i64,
    groups: i64,
    inner: i64,
    max_positions: i64,
    type_vocab: i64,
    enc: EncoderDims,
}

/// A positive integer from `config.raw`, or `default` when absent.
fn raw_int(c: &ModelConfig, key: &'static str, default: i64) -> Result<i64, TraceError> {
    match c.raw.get(key) {
        None | Some(serde_json::Value::Null) => Ok(default),
        Some(v) => {
            let n = v.as_i64().ok_or_else(|| {
                TraceError::Unsupported(format!("config `{key}` must be an integer, got {v}"))
            })?;
            Ok(c.require(Some(n), key)?)
        }
    }
}

impl AlbertDims {
    fn from_config(c: &ModelConfig) -> Result<Self, TraceError> {
        let width = attention_width(c)?;
        Ok(Self {
            vocab: c.require(c.vocab_size, "vocab_size")?,
            embedding: raw_int(c, "embedding_size", 128)?,
            layers: c.require(c.num_hidden_layers, "num_hidden_layers")?,
            groups: raw_int(c, "num_hidden_groups", 1)?,
            inner: raw_int(c, "inner_group_num", 1)?,
            max_positions: c.max_position_embeddings.unwrap_or(512),
            type_vocab: c.type_vocab_size.unwrap_or(2),
            enc: encoder_dims(c, width, "gelu_new")?,
        })
    }
}

/// The layer group layer `i` runs, as `AlbertTransformer` picks it:
/// `int(i / (num_hidden_layers / num_hidden_groups))`, in floating point like Python.
fn group_index(i: i64, layers: i64, groups: i64) -> Result<i64, TraceError> {
    let g = (i as f64 / (layers as f64 / groups as f64)) as i64;
    if (0..groups).contains(&g) {
        Ok(g)
    } else {
        Err(TraceError::Unsupported(format!(
            "layer {i} maps to group {g} of {groups}"
        )))
    }
}

/// `AlbertLayer`: post-LayerNorm self-attention (`attention.{query,key,value,dense}`,
/// `attention.LayerNorm`), then `ffn` → activation → `ffn_output` and
/// `full_layer_layer_norm` over the residual.
fn albert_layer(
    t: &mut Tracer,
    w: &WeightSource<'_>,
    x: &T,
    mask: &T,
    d: &EncoderDims,
) -> Result<T, TraceError> {
    let spec = AttentionSpec::new(["query", "key", "value"], d);
    let a = scoped(t, "attention", |t| {
        let ctx = multi_head_attention(t, w, x, mask, None, &spec)?;
        let o = linear(t, w, "dense", &ctx, d.hidden, d.hidden)?;
        add_norm(t, w, "LayerNorm", x, &o, d)
    })?;
    let f = linear(t, w, "ffn", &a, d.hidden, d.intermediate)?;
    let f = d.act.apply(t, &f)?;
    let f = linear(t, w, "ffn_output", &f, d.intermediate, d.hidden)?;
    add_norm(t, w, "full_layer_layer_norm", &f, &a, d)
}

/// `AlbertModel` without pooler: embeddings, the mapping to `hidden_size`, then
/// `num_hidden_layers` applications of the shared layer groups.
fn encoder(
    t: &mut Tracer,
    w: &WeightSource<'_>,
    d: &AlbertDims,
    input_ids: &T,
    attention_mask: &T,
    token_type_ids: &T,
) -> Result<T, TraceError> {
    let spec = EmbeddingSpec {
        vocab: d.vocab,
        width: d.embedding,
        max_positions: d.max_positions,
        eps: d.enc.eps,
        token_types: TokenTypes::Ids {
            ids: token_type_ids,
            vocab: d.type_vocab,
        },
        positions: Positions::Arange,
    };
    let e = embeddings(t, w, &spec, input_ids)?;
    let mask = additive_mask(t, attention_mask)?;
    scoped(t, "encoder", |t| {
        let mut x = linear(
            t,
            w,
            "embedding_hidden_mapping_in",
            &e,
            d.embedding,
            d.enc.hidden,
        )?;
        for i in 0..d.layers {
            let g = group_index(i, d.layers, d.groups)?;
            x = scoped(t, &format!("albert_layer_groups.{g}"), |t| {
                let mut h = x;
                for j in 0..d.inner {
                    h = scoped(t, &format!("albert_layers.{j}"), |t| {
                        albert_layer(t, w, &h, &mask, &d.enc)
                    })?;
                }
                Ok(h)
            })?;
        }
        Ok(x)
    })
}

/// The pooler: `tanh(pooler(x[:, 0]))` (a bare `nn.Linear` named `pooler`, one `Gemm`).
const POOLER: Pooler = Pooler::Gemm(None);

/// ALBERT's heads: the pooler for classification and multiple-choice, and `AlbertMLMHead`
/// (`predictions`: dense hidden → embedding, `hidden_act`, LayerNorm, then the decoder,
/// whose weight is the word-embedding matrix unless the config unties it).
fn heads(d: &AlbertDims) -> EncoderHeads {
    let mlm = MlmHead::new(&["predictions"], d.enc.act, &d.enc, d.embedding, d.vocab);
    EncoderHeads::pooled(d.enc.hidden, POOLER, mlm)
}

/// Traces ALBERT with the head of `task` (optimum's task names).
pub(crate) fn build(t: &mut Tracer, r: &Request<'_>) -> Result<(), TraceError> {
    let d = AlbertDims::from_config(r.config)?;
    heads(&d).trace(t, r, "albert", TYPED_INPUTS, |t, w, [ids, mask, types]| {
        encoder(t, w, &d, ids, mask, types)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::TraceOptions;
    use ferry_ir::Graph;

    #[test]
    fn group_index_follows_python_float_division() -> Result<(), TraceError> {
        // 3 layers over 2 groups: int(i / 1.5) = 0, 0, 1.
        let g: Vec<i64> = (0..3)
            .map(|i| group_index(i, 3, 2))
            .collect::<Result<_, _>>()?;
        assert_eq!(g, [0, 0, 1]);
        let g: Vec<i64> = (0..12)
            .map(|i| group_index(i, 12, 1))
            .collect::<Result<_, _>>()?;
        assert!(g.iter().all(|&x| x == 0));
        let g: Vec<i64> = (0..4)
            .map(|i| group_index(i, 4, 4))
            .collect::<Result<_, _>>()?;
        assert_eq!(g, [0, 1, 2, 3]);
        Ok(())
    }

    fn case(name: &str) -> ferry_loader::Checkpoint {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../testdata")
            .join(name);
        ferry_loader::load(&dir).expect("load")
    }

    fn traced(name: &str, task: &str) -> Graph {
        let c = case(name);
        let opts = TraceOptions {
            task: task.into(),
            ..Default::default()
        };
        crate::trace(&c.config, &c.weights, &opts).expect("trace")
    }

    #[test]
    fn shared_layers_are_stored_once_and_applied_per_depth() {
        // 3 layers over 2 groups of 2 inner layers: groups 0, 0, 1 → 6 layer applications
        // of 4 stored layers.
        let g = traced("albert-tiny-feature-extraction", "feature-extraction");
        let inputs: Vec<&str> = g.inputs.iter().map(|v| v.name.as_str()).collect();
        assert_eq!(inputs, ["input_ids", "attention_mask", "token_type_ids"]);
        let outputs: Vec<&str> = g.outputs.iter().map(|v| v.name.as_str()).collect();
        assert_eq!(outputs, ["last_hidden_state", "pooler_output"]);
        let counts = g.op_counts();
        assert_eq!(counts.get("Softmax"), Some(&6));
        let mut names: Vec<&str> = g.initializers.iter().map(|i| i.name.as_str()).collect();
        let n = names.len();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), n, "every initializer stored once");
        let query = |gi: usize, li: usize| {
            format!("encoder.albert_layer_groups.{gi}.albert_layers.{li}.attention.query.weight")
        };
        for (gi, li) in [(0, 0), (0, 1), (1, 0), (1, 1)] {
            assert!(names.contains(&query(gi, li).as_str()), "{gi}.{li}");
        }
        let users = |w: &str| {
            g.nodes
                .iter()
                .filter(|n| n.inputs.iter().any(|i| i == w))
                .count()
        };
        assert_eq!(users(&query(0, 0)), 2, "group 0 runs for layers 0 and 1");
        assert_eq!(users(&query(1, 1)), 1, "group 1 runs for layer 2");
        assert!(g.nodes.iter().any(|n| {
            n.name == "/encoder/albert_layer_groups.0/albert_layers.1/attention/query/MatMul_1"
        }));
    }

    #[test]
    fn fill_mask_ties_decoder_to_factorized_embeddings() {
        let g = traced("albert-tiny-fill-mask", "fill-mask");
        let word = "embeddings.word_embeddings.weight";
        let stored = g.initializers.iter().filter(|i| i.name == word).count();
        assert_eq!(stored, 1, "the tied matrix is stored once");
        let users = g
            .nodes
            .iter()
            .filter(|n| n.inputs.iter().any(|i| i == word))
            .count();
        assert_eq!(users, 2, "embedding Gather and decoder Transpose share it");
        assert!(g.initializers.iter().any(|i| i.name == "predictions.bias"));
    }
}
