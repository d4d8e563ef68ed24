//! MPNet, as transformers' `modeling_mpnet.py` computes it: RoBERTa-style position ids
//! (counted from the padding index over non-padding tokens), no token types, and a
//! relative position bias (T5-style log buckets, `encoder.relative_attention_bias`)
//! added to every layer's attention scores.

use ferry_ir::{DType, Graph, ModelConfig, Weights};

use crate::albert::{choice_logits, split_qa_logits, task_inputs, ties_word_embeddings};
use crate::bert::num_labels;
use crate::layers::{
    Activation, AttentionSpec, EncoderDims, WeightSource, additive_mask, bert_ffn, layer_norm,
    linear, multi_head_attention, scoped,
};
use crate::{T, TraceError, TraceOptions, Tracer};

/// Tasks MPNet exports.
pub(crate) const MPNET_TASKS: &[&str] = &[
    "feature-extraction",
    "fill-mask",
    "text-classification",
    "token-classification",
    "question-answering",
    "multiple-choice",
];

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
        let hidden = c.require(c.hidden_size, "hidden_size")?;
        let heads = c.require(c.num_attention_heads, "num_attention_heads")?;
        if hidden % heads != 0 {
            return Err(TraceError::Unsupported(format!(
                "hidden_size {hidden} is not a multiple of num_attention_heads {heads}"
            )));
        }
        let buckets = match c.raw.get("relative_attention_num_buckets") {
            None | Some(serde_json::Value::Null) => 32,
            Some(v) => c.require(v.as_i64(), "relative_attention_num_buckets")?,
        };
        Ok(Self {
            vocab: c.require(c.vocab_size, "vocab_size")?,
            layers: c.require(c.num_hidden_layers, "num_hidden_layers")?,
            max_positions: c.max_position_embeddings.unwrap_or(512),
            buckets,
            enc: EncoderDims {
                hidden,
                heads,
                intermediate: c.require(c.intermediate_size, "intermediate_size")?,
                eps: c.layer_norm_eps.unwrap_or(1e-12),
                act: Activation::parse(c.hidden_act.as_deref().unwrap_or("gelu"))?,
            },
        })
    }
}

/// `create_position_ids_from_input_ids(input_ids, 1)`: `cumsum(ids != 1) * (ids != 1) + 1`,
/// so real tokens count from 2 and padding stays at 1.
fn position_ids(t: &mut Tracer, input_ids: &T) -> Result<T, TraceError> {
    let shape = input_ids.shape.clone();
    let pad = t.scalar_i64(PADDING_IDX);
    let is_pad = t.op(
        "Equal",
        &[input_ids, &pad],
        vec![],
        DType::Bool,
        shape.clone(),
    );
    let not_pad = t.op("Not", &[&is_pad], vec![], DType::Bool, shape.clone());
    let mask = t.cast(&not_pad, DType::I64, 7);
    let axis = t.scalar_i64(1);
    let counts = t.op("CumSum", &[&mask, &axis], vec![], DType::I64, shape);
    let counts = t.mul(&counts, &mask)?;
    t.add(&counts, &pad)
}

/// `MPNetEmbeddings`: word + position embeddings (positions from [`position_ids`]), then
/// LayerNorm.
fn embeddings(
    t: &mut Tracer,
    w: &WeightSource<'_>,
    d: &MpnetDims,
    input_ids: &T,
) -> Result<T, TraceError> {
    let h = d.enc.hidden;
    scoped(t, "embeddings", |t| {
        let word = w.get(t, "embeddings.word_embeddings.weight", &[d.vocab, h])?;
        let pos = w.get(
            t,
            "embeddings.position_embeddings.weight",
            &[d.max_positions, h],
        )?;
        let pids = position_ids(t, input_ids)?;
        let we = t.gather(&word, input_ids, 0)?;
        let pe = t.gather(&pos, &pids, 0)?;
        let x = t.add(&we, &pe)?;
        layer_norm(t, w, "LayerNorm", &x, h, d.enc.eps)
    })
}

/// `MPNetEncoder.relative_position_bucket(memory - context, 32, 128)` over the
/// `[seq, seq]` grid, built from the run-time sequence length of `input_ids`.
fn relative_position_bucket(t: &mut Tracer, input_ids: &T) -> Result<T, TraceError> {
    let s = input_ids.shape[1].clone();
    let grid = vec![s.clone(), s.clone()];
    let shape = t.shape_of(input_ids);
    let one = t.scalar_i64(1);
    let seq = t.gather(&shape, &one, 0)?;
    let zero = t.scalar_i64(0);
    let range = t.op(
        "Range",
        &[&zero, &seq, &one],
        vec![],
        DType::I64,
        vec![s.clone()],
    );
    let context = t.unsqueeze(&range, &[1]);
    let memory = t.unsqueeze(&range, &[0]);
    let relative = t.sub(&memory, &context)?;

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
    let spec = AttentionSpec {
        q: "q",
        k: "k",
        v: "v",
        hidden: d.hidden,
        heads: d.heads,
    };
    let a = scoped(t, "attention", |t| {
        let o = scoped(t, "attn", |t| {
            let ctx = multi_head_attention(t, w, x, mask, Some(bias), &spec)?;
            linear(t, w, "o", &ctx, d.hidden, d.hidden)
        })?;
        let s = t.add(&o, x)?;
        layer_norm(t, w, "LayerNorm", &s, d.hidden, d.eps)
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
    let mut x = embeddings(t, w, d, input_ids)?;
    let mask = additive_mask(t, attention_mask)?;
    scoped(t, "encoder", |t| {
        let bias = position_bias(t, w, d, input_ids)?;
        for i in 0..d.layers {
            x = scoped(t, &format!("layer.{i}"), |t| {
                mpnet_layer(t, w, &x, &mask, &bias, &d.enc)
            })?;
        }
        Ok(x)
    })
}

/// `MPNetPooler`: dense + tanh over the first token.
fn pooler(t: &mut Tracer, w: &WeightSource<'_>, d: &MpnetDims, x: &T) -> Result<T, TraceError> {
    let h = d.enc.hidden;
    scoped(t, "pooler", |t| {
        let zero = t.scalar_i64(0);
        let first = t.gather(x, &zero, 1)?;
        let dense = scoped(t, "dense", |t| {
            let wt = w.get(t, "pooler.dense.weight", &[h, h])?;
            let b = w.get(t, "pooler.dense.bias", &[h])?;
            t.gemm_bt(&first, &wt, &b)
        })?;
        Ok(t.unary("Tanh", &dense))
    })
}

/// `MPNetLMHead`: dense, exact (erf) gelu whatever `hidden_act` says, `layer_norm`, then the
/// decoder tied to the word embeddings (unless the config unties it) plus `lm_head.bias`.
fn lm_head(
    t: &mut Tracer,
    w: &WeightSource<'_>,
    d: &MpnetDims,
    tied: bool,
    x: &T,
) -> Result<T, TraceError> {
    let h = d.enc.hidden;
    scoped(t, "lm_head", |t| {
        let y = linear(t, w, "dense", x, h, h)?;
        let y = Activation::GeluErf.apply(t, &y)?;
        let y = layer_norm(t, w, "layer_norm", &y, h, d.enc.eps)?;
        scoped(t, "decoder", |t| {
            let weight = if tied || !w.contains("lm_head.decoder.weight") {
                w.get(t, "embeddings.word_embeddings.weight", &[d.vocab, h])?
            } else {
                w.get(t, "lm_head.decoder.weight", &[d.vocab, h])?
            };
            let bias = if w.contains("lm_head.bias") {
                w.get(t, "lm_head.bias", &[d.vocab])?
            } else {
                w.get(t, "lm_head.decoder.bias", &[d.vocab])?
            };
            let wt = t.transpose(&weight, &[1, 0])?;
            let mm = t.matmul(&y, &wt)?;
            t.add(&mm, &bias)
        })
    })
}

/// `MPNetClassificationHead`: `out_proj(tanh(dense(x[:, 0])))`.
fn classification_head(
    t: &mut Tracer,
    w: &WeightSource<'_>,
    d: &MpnetDims,
    labels: i64,
    x: &T,
) -> Result<T, TraceError> {
    let h = d.enc.hidden;
    scoped(t, "classifier", |t| {
        let zero = t.scalar_i64(0);
        let first = t.gather(x, &zero, 1)?;
        let y = linear(t, w, "dense", &first, h, h)?;
        let y = t.unary("Tanh", &y);
        linear(t, w, "out_proj", &y, h, labels)
    })
}

/// Traces MPNet with the head of `task` (optimum's task names).
pub(crate) fn trace_mpnet(
    config: &ModelConfig,
    weights: &Weights,
    opts: &TraceOptions,
    task: &str,
) -> Result<Graph, TraceError> {
    let mut t = Tracer::new("main_graph", opts.opset);
    build(&mut t, config, weights, opts, task)?;
    Ok(t.finish())
}

fn build(
    t: &mut Tracer,
    config: &ModelConfig,
    weights: &Weights,
    opts: &TraceOptions,
    task: &str,
) -> Result<(), TraceError> {
    if !MPNET_TASKS.contains(&task) {
        return Err(TraceError::UnsupportedTask {
            task: task.to_string(),
            model_type: config.model_type.clone(),
            supported: MPNET_TASKS.join(", "),
        });
    }
    let d = MpnetDims::from_config(config)?;
    let w = WeightSource::new(weights, "mpnet");
    let h = d.enc.hidden;
    let (inputs, choices) = task_inputs(t, opts, task, &["input_ids", "attention_mask"]);
    let [ids, mask] = inputs.as_slice() else {
        return Err(TraceError::Shape("expected two inputs".into()));
    };
    let x = encoder(t, &w, &d, ids, mask)?;
    match (task, choices) {
        ("multiple-choice", Some(choices)) => {
            let pooled = pooler(t, &w, &d, &x)?;
            let logits = linear(t, &w, "classifier", &pooled, h, 1)?;
            let logits = choice_logits(t, &logits, &choices);
            t.output(&logits, "logits");
        }
        ("feature-extraction", _) => {
            t.output(&x, "last_hidden_state");
            if w.contains("pooler.dense.weight") {
                let pooled = pooler(t, &w, &d, &x)?;
                t.output(&pooled, "pooler_output");
            }
        }
        ("fill-mask", _) => {
            let logits = lm_head(t, &w, &d, ties_word_embeddings(config), &x)?;
            t.output(&logits, "logits");
        }
        ("text-classification", _) => {
            let logits = classification_head(t, &w, &d, num_labels(config), &x)?;
            t.output(&logits, "logits");
        }
        ("token-classification", _) => {
            let logits = linear(t, &w, "classifier", &x, h, num_labels(config))?;
            t.output(&logits, "logits");
        }
        ("question-answering", _) => {
            let logits = linear(t, &w, "qa_outputs", &x, h, 2)?;
            let (start, end) = split_qa_logits(t, &logits)?;
            t.output(&start, "start_logits");
            t.output(&end, "end_logits");
        }
        (other, _) => {
            return Err(TraceError::UnsupportedTask {
                task: other.to_string(),
                model_type: config.model_type.clone(),
                supported: MPNET_TASKS.join(", "),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

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
