//! DistilBERT, as transformers' `modeling_distilbert.py` computes it.
//!
//! Differences from BERT: no token types, no pooler; config fields `dim`, `n_heads`,
//! `n_layers`, `hidden_dim`, `activation`; every LayerNorm has `eps = 1e-12` whatever the
//! config says; attention lives in `attention.{q,k,v,out}_lin`, the feed-forward block in
//! `ffn.lin{1,2}`, with post-LayerNorms `sa_layer_norm` / `output_layer_norm`. The position
//! table is a checkpoint weight even with `sinusoidal_pos_embds` (transformers loads it as
//! stored), so it is used as is.

use ferry_ir::{DType, Dim, Graph, ModelConfig, Weights};

use crate::bert::num_labels;
use crate::layers::{
    Activation, AttentionSpec, WeightSource, additive_mask, layer_norm, linear,
    multi_head_attention, scoped, sym,
};
use crate::{T, TraceError, TraceOptions, Tracer};

/// DistilBERT's LayerNorm epsilon: hard-coded in every `nn.LayerNorm` of the model.
const EPS: f64 = 1e-12;

/// The DistilBERT hyper-parameters ferry needs, validated.
#[derive(Debug, Clone)]
struct DistilBertDims {
    vocab: i64,
    dim: i64,
    heads: i64,
    layers: i64,
    hidden_dim: i64,
    max_positions: i64,
    act: Activation,
}

/// A positive integer from `config.json`: DistilBERT's own name first, then the generic
/// alias transformers maps it to (`hidden_size` → `dim`, …).
fn raw_int(c: &ModelConfig, name: &'static str, alias: Option<i64>) -> Result<i64, TraceError> {
    let v = match c.raw.get(name) {
        Some(v) => Some(v.as_i64().ok_or_else(|| {
            TraceError::Config(ferry_ir::ConfigError::Invalid(format!(
                "`{name}` must be an integer, got {v}"
            )))
        })?),
        None => alias,
    };
    Ok(c.require(v, name)?)
}

impl DistilBertDims {
    fn from_config(c: &ModelConfig) -> Result<Self, TraceError> {
        let dim = raw_int(c, "dim", c.hidden_size)?;
        let heads = raw_int(c, "n_heads", c.num_attention_heads)?;
        if dim % heads != 0 {
            return Err(TraceError::Unsupported(format!(
                "dim {dim} is not a multiple of n_heads {heads}"
            )));
        }
        let act = match c.raw.get("activation") {
            None => "gelu",
            Some(v) => v.as_str().ok_or_else(|| {
                TraceError::Config(ferry_ir::ConfigError::Invalid(format!(
                    "`activation` must be a string, got {v}"
                )))
            })?,
        };
        Ok(Self {
            vocab: c.require(c.vocab_size, "vocab_size")?,
            dim,
            heads,
            layers: raw_int(c, "n_layers", c.num_hidden_layers)?,
            hidden_dim: raw_int(c, "hidden_dim", c.intermediate_size)?,
            max_positions: c.require(c.max_position_embeddings, "max_position_embeddings")?,
            act: Activation::parse(act)?,
        })
    }
}

/// `Embeddings`: word + absolute-position embeddings (`position_ids = arange(seq)`), then
/// LayerNorm.
fn embeddings(
    t: &mut Tracer,
    w: &WeightSource<'_>,
    d: &DistilBertDims,
    input_ids: &T,
) -> Result<T, TraceError> {
    scoped(t, "embeddings", |t| {
        let word = w.get(t, "embeddings.word_embeddings.weight", &[d.vocab, d.dim])?;
        let pos = w.get(
            t,
            "embeddings.position_embeddings.weight",
            &[d.max_positions, d.dim],
        )?;
        let we = t.gather(&word, input_ids, 0)?;
        // Rows [0, seq) of the position table.
        let shape = t.shape_of(input_ids);
        let one = t.ints(&[1]);
        let two = t.ints(&[2]);
        let zero = t.ints(&[0]);
        let seq = t.slice(&shape, &one, &two, &zero, vec![Dim::Fixed(1)]);
        let pe = t.slice(
            &pos,
            &zero,
            &seq,
            &zero,
            vec![input_ids.shape[1].clone(), Dim::Fixed(d.dim)],
        );
        let e = t.add(&we, &pe)?;
        layer_norm(t, w, "LayerNorm", &e, d.dim, EPS)
    })
}

/// One `TransformerBlock`: self-attention + `sa_layer_norm`, FFN + `output_layer_norm`
/// (both post-LayerNorm with residual).
fn block(
    t: &mut Tracer,
    w: &WeightSource<'_>,
    d: &DistilBertDims,
    x: &T,
    mask: &T,
) -> Result<T, TraceError> {
    let spec = AttentionSpec {
        q: "q_lin",
        k: "k_lin",
        v: "v_lin",
        hidden: d.dim,
        heads: d.heads,
    };
    let attn = scoped(t, "attention", |t| {
        let ctx = multi_head_attention(t, w, x, mask, None, &spec)?;
        linear(t, w, "out_lin", &ctx, d.dim, d.dim)
    })?;
    let s = t.add(&attn, x)?;
    let a = layer_norm(t, w, "sa_layer_norm", &s, d.dim, EPS)?;
    let f = scoped(t, "ffn", |t| {
        let h = linear(t, w, "lin1", &a, d.dim, d.hidden_dim)?;
        let h = d.act.apply(t, &h)?;
        linear(t, w, "lin2", &h, d.hidden_dim, d.dim)
    })?;
    let s = t.add(&f, &a)?;
    layer_norm(t, w, "output_layer_norm", &s, d.dim, EPS)
}

/// `DistilBertModel` over `[batch, seq]` inputs: the `last_hidden_state`.
fn encoder(
    t: &mut Tracer,
    w: &WeightSource<'_>,
    d: &DistilBertDims,
    input_ids: &T,
    attention_mask: &T,
) -> Result<T, TraceError> {
    let mut x = embeddings(t, w, d, input_ids)?;
    let mask = additive_mask(t, attention_mask)?;
    scoped(t, "transformer", |t| {
        for i in 0..d.layers {
            x = scoped(t, &format!("layer.{i}"), |t| block(t, w, d, &x, &mask))?;
        }
        Ok(x)
    })
}

/// The MLM head: `vocab_transform`, activation, `vocab_layer_norm`, then `vocab_projector`,
/// whose weight is the word-embedding matrix unless the config unties it and the
/// checkpoint has its own.
fn mlm_head(
    t: &mut Tracer,
    w: &WeightSource<'_>,
    d: &DistilBertDims,
    tied: bool,
    x: &T,
) -> Result<T, TraceError> {
    let y = linear(t, w, "vocab_transform", x, d.dim, d.dim)?;
    let y = d.act.apply(t, &y)?;
    let y = layer_norm(t, w, "vocab_layer_norm", &y, d.dim, EPS)?;
    scoped(t, "vocab_projector", |t| {
        let weight = if tied || !w.contains("vocab_projector.weight") {
            w.get(t, "embeddings.word_embeddings.weight", &[d.vocab, d.dim])?
        } else {
            w.get(t, "vocab_projector.weight", &[d.vocab, d.dim])?
        };
        let bias = w.get(t, "vocab_projector.bias", &[d.vocab])?;
        let wt = t.transpose(&weight, &[1, 0])?;
        let mm = t.matmul(&y, &wt)?;
        t.add(&mm, &bias)
    })
}

/// The sequence-classification / multiple-choice head: first token, `pre_classifier`,
/// ReLU, `classifier`.
fn first_token_head(
    t: &mut Tracer,
    w: &WeightSource<'_>,
    d: &DistilBertDims,
    x: &T,
    labels: i64,
) -> Result<T, TraceError> {
    let zero = t.scalar_i64(0);
    let first = t.gather(x, &zero, 1)?;
    let p = linear(t, w, "pre_classifier", &first, d.dim, d.dim)?;
    let p = t.unary("Relu", &p);
    linear(t, w, "classifier", &p, d.dim, labels)
}

/// Traces DistilBERT with the head of `task` (optimum's task names).
pub(crate) fn trace_distilbert(
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
    let d = DistilBertDims::from_config(config)?;
    let w = WeightSource::new(weights, "distilbert");
    let (b, s) = (sym(&opts.batch_axis), sym(&opts.sequence_axis));

    if task == "multiple-choice" {
        let c = sym("num_choices");
        let shape = vec![b.clone(), c.clone(), s.clone()];
        let ids = t.input("input_ids", DType::I64, shape.clone());
        let mask = t.input("attention_mask", DType::I64, shape);
        let flat = vec![sym("batch_size*num_choices"), s];
        let fi = t.flatten(&ids, 2, flat.clone());
        let fm = t.flatten(&mask, 2, flat);
        let x = encoder(t, &w, &d, &fi, &fm)?;
        let logits = first_token_head(t, &w, &d, &x, 1)?;
        let bc = t.shape_of(&ids);
        let zero = t.ints(&[0]);
        let two = t.ints(&[2]);
        let bc = t.slice(&bc, &zero, &two, &zero, vec![Dim::Fixed(2)]);
        let logits = t.reshape_to(&logits, &bc, vec![b, c]);
        t.output(&logits, "logits");
        return Ok(());
    }

    let bs = vec![b, s];
    let ids = t.input("input_ids", DType::I64, bs.clone());
    let mask = t.input("attention_mask", DType::I64, bs);
    let x = encoder(t, &w, &d, &ids, &mask)?;
    match task {
        "feature-extraction" => t.output(&x, "last_hidden_state"),
        "fill-mask" => {
            let tied = config
                .raw
                .get("tie_word_embeddings")
                .and_then(serde_json::Value::as_bool)
                .unwrap_or(true);
            let logits = mlm_head(t, &w, &d, tied, &x)?;
            t.output(&logits, "logits");
        }
        "text-classification" => {
            let logits = first_token_head(t, &w, &d, &x, num_labels(config))?;
            t.output(&logits, "logits");
        }
        "token-classification" => {
            let logits = linear(t, &w, "classifier", &x, d.dim, num_labels(config))?;
            t.output(&logits, "logits");
        }
        "question-answering" => {
            let logits = linear(t, &w, "qa_outputs", &x, d.dim, 2)?;
            let i0 = t.scalar_i64(0);
            let start = t.gather(&logits, &i0, 2)?;
            let i1 = t.scalar_i64(1);
            let end = t.gather(&logits, &i1, 2)?;
            t.output(&start, "start_logits");
            t.output(&end, "end_logits");
        }
        other => {
            return Err(TraceError::UnsupportedTask {
                task: other.to_string(),
                model_type: config.model_type.clone(),
                supported: DISTILBERT_TASKS.join(", "),
            });
        }
    }
    Ok(())
}

/// Tasks DistilBERT exports.
pub(crate) const DISTILBERT_TASKS: &[&str] = &[
    "feature-extraction",
    "fill-mask",
    "text-classification",
    "token-classification",
    "question-answering",
    "multiple-choice",
];

#[cfg(test)]
mod tests {
    use super::*;

    fn config(json: &str) -> ModelConfig {
        ModelConfig::from_json(json).expect("valid test config")
    }

    #[test]
    fn reads_distilbert_field_names() -> Result<(), TraceError> {
        let c = config(
            r#"{"model_type":"distilbert","vocab_size":50,"dim":16,"n_heads":4,"n_layers":2,
                "hidden_dim":30,"max_position_embeddings":20,"activation":"relu"}"#,
        );
        let d = DistilBertDims::from_config(&c)?;
        assert_eq!(
            (d.dim, d.heads, d.layers, d.hidden_dim, d.act),
            (16, 4, 2, 30, Activation::Relu)
        );
        Ok(())
    }

    #[test]
    fn rejects_bad_configs() {
        let bad = [
            r#"{"model_type":"distilbert","vocab_size":50,"dim":18,"n_heads":4,"n_layers":2,"hidden_dim":30,"max_position_embeddings":20}"#,
            r#"{"model_type":"distilbert","vocab_size":50,"dim":16,"n_heads":4,"n_layers":2,"hidden_dim":30,"max_position_embeddings":20,"activation":"mish"}"#,
            r#"{"model_type":"distilbert","vocab_size":50,"dim":"16","n_heads":4,"n_layers":2,"hidden_dim":30,"max_position_embeddings":20}"#,
            r#"{"model_type":"distilbert","vocab_size":50,"dim":16,"n_heads":4,"hidden_dim":30,"max_position_embeddings":20}"#,
        ];
        for json in bad {
            assert!(
                DistilBertDims::from_config(&config(json)).is_err(),
                "{json}"
            );
        }
    }
}
