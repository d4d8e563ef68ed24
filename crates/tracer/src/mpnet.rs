//! MPNet, as transformers' `modeling_mpnet.py` computes it: RoBERTa-style position ids
//! (counted from the padding index over non-padding tokens), no token types, and a
//! relative position bias (T5-style log buckets, `encoder.relative_attention_bias`)
//! added to every layer's attention scores.

use ferry_ir::{DType, ModelConfig};

use crate::config::{attention_width, encoder_dims};
use crate::embeddings::{EmbeddingSpec, Positions, TokenTypes, embeddings, position_grid};
use crate::heads::{ClassificationHead, EncoderHeads, INPUTS, MlmHead, Pooler, SequenceHead};
use crate::layers::{
    Activation, AttentionSpec, EncoderDims, HeadActivation, WeightSource, add_norm, additive_mask,
    bert_ffn, layer_stack, linear, multi_head_attention, scoped,
};
use crate::{Request, T, TraceError, Tracer};

/// `MPNetEmbeddings.padding_idx`: fixed at 1 in transformers, whatever `pad_token_id` says.
const PADDING_IDX: i64 = 1;
/// `compute_position_bias` buckets relative positions with its default `num_buckets=32`
/// (not `relative_attention_num_buckets`, which only sizes the table).
const NUM_BUCKETS: i64 = 32;
/// `relative_position_bucket`'s `max_distance`.
const MAX_DISTANCE: i64 = 128;

/// The MPNet hyper-parameters ferry needs, validated.
#[derive(Debug, Clone)]
struct MpnetDims {
    vocab: i64,
    layers: i64,
    max_positions: i64,
    buckets: i64,
    enc: EncoderDims,
}

impl MpnetDims {
    fn from_config(c: &ModelConfig) -> Result<Self, TraceError> {
        let width = attention_width(c)?;
        let buckets = match c.raw.get("relative_attention_num_buckets") {
            None | Some(serde_json::Value::Null) => 32,
            Some(v) => c.require(v.as_i64(), "relative_attention_num_buckets")?,
        };
        Ok(Self {
            vocab: c.require(c.vocab_size, "vocab_size")?,
            layers: c.require(c.num_hidden_layers, "num_hidden_layers")?,
            max_positions: c.max_position_embeddings.unwrap_or(512),
            buckets,
            enc: encoder_dims(c, width, "gelu")?,
        })
    }
}

/// `MPNetEncoder.relative_position_bucket(memory - context, 32, 128)` over the
/// `[seq, seq]` grid, built from the run-time sequence length of `input_ids`.
fn relative_position_bucket(t: &mut Tracer, input_ids: &T) -> Result<T, TraceError> {
    let s = input_ids.shape[1].clone();
    let grid = vec![s.clone(), s];
    let (context, memory) = position_grid(t, input_ids)?;
    let relative = t.sub(&memory, &context)?;
    let zero = t.scalar_i64(0);

    let half = NUM_BUCKETS / 2;
    let max_exact = half / 2;
    // n = -relative; ret = (n < 0) * num_buckets / 2; n = |n|
    let n = t.unary("Neg", &relative);
    let is_neg = t.op("Less", &[&n, &zero], vec![], DType::Bool, grid.clone());
    let is_neg = t.cast(&is_neg, DType::I64, 7);
    let half_t = t.scalar_i64(half);
    let ret = t.mul(&is_neg, &half_t)?;
    let n = t.unary("Abs", &n);
    let max_exact_t = t.scalar_i64(max_exact);
    let is_small = t.op(
        "Less",
        &[&n, &max_exact_t],
        vec![],
        DType::Bool,
        grid.clone(),
    );
    // max_exact + (log(n / max_exact) / log(max_distance / max_exact) * (half - max_exact))
    let nf = t.cast(&n, DType::F32, 1);
    let me_f = t.scalar_f32(max_exact as f32);
    let ratio = t.div(&nf, &me_f)?;
    let log = t.unary("Log", &ratio);
    let denom = t.scalar_f32((MAX_DISTANCE as f64 / max_exact as f64).ln() as f32);
    let scaled = t.div(&log, &denom)?;
    let span = t.scalar_f32((half - max_exact) as f32);
    let scaled = t.mul(&scaled, &span)?;
    let large = t.cast(&scaled, DType::I64, 7);
    let large = t.add(&max_exact_t, &large)?;
    let cap = t.scalar_i64(half - 1);
    let large = t.op("Min", &[&large, &cap], vec![], DType::I64, grid.clone());
    let chosen = t.op("Where", &[&is_small, &n, &large], vec![], DType::I64, grid);
    t.add(&ret, &chosen)
}

/// `MPNetEncoder.compute_position_bias`: the bucketed relative positions looked up in
/// `relative_attention_bias`, as a `[1, heads, seq, seq]` score bias (broadcast over the
/// batch instead of `expand`ed).
fn position_bias(
    t: &mut Tracer,
    w: &WeightSource<'_>,
    d: &MpnetDims,
    input_ids: &T,
) -> Result<T, TraceError> {
    let bucket = relative_position_bucket(t, input_ids)?;
    scoped(t, "relative_attention_bias", |t| {
        let table = w.get(
            t,
            "encoder.relative_attention_bias.weight",
            &[d.buckets, d.enc.heads],
        )?;
        let values = t.gather(&table, &bucket, 0)?;
        let values = t.transpose(&values, &[2, 0, 1])?;
        Ok(t.unsqueeze(&values, &[0]))
    })
}

/// `MPNetLayer`: `attention.attn.{q,k,v,o}` with the position bias, `attention.LayerNorm`
/// over the residual, then the BERT-style `intermediate` / `output` feed-forward block.
fn mpnet_layer(
    t: &mut Tracer,
    w: &WeightSource<'_>,
    x: &T,
    mask: &T,
    bias: &T,
    d: &EncoderDims,
) -> Result<T, TraceError> {
    let spec = AttentionSpec::new(["q", "k", "v"], d);
    let a = scoped(t, "attention", |t| {
        let o = scoped(t, "attn", |t| {
            let ctx = multi_head_attention(t, w, x, mask, Some(bias), &spec)?;
            linear(t, w, "o", &ctx, d.hidden, d.hidden)
        })?;
        add_norm(t, w, "LayerNorm", &o, x, d)
    })?;
    bert_ffn(t, w, &a, d)
}

/// `MPNetModel` without pooler over `[batch, seq]` inputs.
fn encoder(
    t: &mut Tracer,
    w: &WeightSource<'_>,
    d: &MpnetDims,
    input_ids: &T,
    attention_mask: &T,
) -> Result<T, TraceError> {
    let spec = EmbeddingSpec {
        vocab: d.vocab,
        width: d.enc.hidden,
        max_positions: d.max_positions,
        eps: d.enc.eps,
        token_types: TokenTypes::Absent,
        positions: Positions::PastPadding(PADDING_IDX),
    };
    let x = embeddings(t, w, &spec, input_ids)?;
    let mask = additive_mask(t, attention_mask)?;
    scoped(t, "encoder", |t| {
        let bias = position_bias(t, w, d, input_ids)?;
        layer_stack(t, d.layers, x, |t, x| {
            mpnet_layer(t, w, x, &mask, &bias, &d.enc)
        })
    })
}

/// `MPNetPooler`: dense (one `Gemm`) + tanh over the first token.
const POOLER: Pooler = Pooler::Gemm(Some("dense"));

/// MPNet's heads: `MPNetClassificationHead` (`out_proj(tanh(dense(x[:, 0])))`), the pooler
/// for multiple-choice, and `MPNetLMHead` (dense, exact (erf) gelu whatever `hidden_act`
/// says, `layer_norm`, then the decoder tied to the word embeddings unless the config
/// unties it, plus `lm_head.bias`).
fn heads(d: &MpnetDims) -> EncoderHeads {
    let h = d.enc.hidden;
    let mlm = MlmHead {
        norm: "layer_norm",
        ..MlmHead::new(&["lm_head"], Activation::GeluErf, &d.enc, h, d.vocab)
    };
    EncoderHeads {
        sequence: SequenceHead::FirstToken(ClassificationHead::classifier(HeadActivation::Tanh)),
        ..EncoderHeads::pooled(h, POOLER, mlm)
    }
}

/// Traces MPNet with the head of `task` (optimum's task names).
pub(crate) fn build(t: &mut Tracer, r: &Request<'_>) -> Result<(), TraceError> {
    let d = MpnetDims::from_config(r.config)?;
    heads(&d).trace(t, r, "mpnet", INPUTS, |t, w, [ids, mask]| {
        encoder(t, w, &d, ids, mask)
    })
}

#[cfg(test)]
mod tests {
    use ferry_ir::Graph;

    use crate::TraceOptions;

    fn traced(name: &str, task: &str) -> Graph {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../testdata")
            .join(name);
        let c = ferry_loader::load(&dir).expect("load");
        let opts = TraceOptions {
            task: task.into(),
            ..Default::default()
        };
        crate::trace(&c.config, &c.weights, &opts).expect("trace")
    }

    #[test]
    fn position_bias_is_computed_once_and_shared_by_layers() {
        let g = traced("mpnet-tiny-feature-extraction", "feature-extraction");
        let inputs: Vec<&str> = g.inputs.iter().map(|v| v.name.as_str()).collect();
        assert_eq!(inputs, ["input_ids", "attention_mask"], "no token_type_ids");
        let outputs: Vec<&str> = g.outputs.iter().map(|v| v.name.as_str()).collect();
        assert_eq!(outputs, ["last_hidden_state", "pooler_output"]);
        let counts = g.op_counts();
        assert_eq!(
            counts.get("Range"),
            Some(&1),
            "bucket grid from the run-time length"
        );
        assert_eq!(counts.get("Log"), Some(&1));
        assert_eq!(counts.get("CumSum"), Some(&1), "position ids");
        let bias = g
            .nodes
            .iter()
            .find(|n| n.name == "/encoder/relative_attention_bias/Unsqueeze")
            .and_then(|n| n.outputs.first())
            .expect("bias node");
        let users = g
            .nodes
            .iter()
            .filter(|n| n.inputs.iter().any(|i| i == bias))
            .count();
        assert_eq!(users, 2, "added to both layers' scores");
        assert!(
            g.nodes
                .iter()
                .any(|n| n.name == "/encoder/layer.1/attention/attn/o/MatMul")
        );
    }

    #[test]
    fn heads_follow_transformers_names() {
        let g = traced("mpnet-tiny-text-classification", "text-classification");
        assert!(
            g.initializers
                .iter()
                .any(|i| i.name == "classifier.out_proj.weight")
        );
        let g = traced("mpnet-tiny-fill-mask", "fill-mask");
        let word = "embeddings.word_embeddings.weight";
        assert_eq!(g.initializers.iter().filter(|i| i.name == word).count(), 1);
        assert_eq!(
            g.op_counts().get("Erf"),
            Some(&1),
            "lm_head gelu; relu layers"
        );
    }
}
