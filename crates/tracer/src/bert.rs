//! BERT, as transformers' `modeling_bert.py` computes it.

use ferry_ir::{DType, Dim, Graph, ModelConfig, Weights};

use crate::layers::{
    Activation, EncoderDims, WeightSource, additive_mask, bert_attention, bert_ffn, layer_norm,
    linear, sym,
};
use crate::{T, TraceError, TraceOptions, Tracer};

/// The BERT hyper-parameters ferry needs, validated.
#[derive(Debug, Clone)]
pub(crate) struct BertDims {
    pub vocab: i64,
    pub layers: i64,
    pub max_positions: i64,
    pub type_vocab: i64,
    pub enc: EncoderDims,
}

impl BertDims {
    pub(crate) fn from_config(c: &ModelConfig) -> Result<Self, TraceError> {
        let hidden = c.require(c.hidden_size, "hidden_size")?;
        let heads = c.require(c.num_attention_heads, "num_attention_heads")?;
        if hidden % heads != 0 {
            return Err(TraceError::Unsupported(format!(
                "hidden_size {hidden} is not a multiple of num_attention_heads {heads}"
            )));
        }
        if let Some(p) = c.position_embedding_type.as_deref()
            && p != "absolute"
        {
            return Err(TraceError::Unsupported(format!(
                "position_embedding_type `{p}` (only `absolute`)"
            )));
        }
        Ok(Self {
            vocab: c.require(c.vocab_size, "vocab_size")?,
            layers: c.require(c.num_hidden_layers, "num_hidden_layers")?,
            max_positions: c.require(c.max_position_embeddings, "max_position_embeddings")?,
            type_vocab: c.type_vocab_size.unwrap_or(2),
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

/// `BertEmbeddings`: word + token-type + absolute-position embeddings, then LayerNorm.
fn embeddings(
    t: &mut Tracer,
    w: &WeightSource<'_>,
    d: &BertDims,
    input_ids: &T,
    token_type_ids: &T,
) -> Result<T, TraceError> {
    let h = d.enc.hidden;
    t.push("embeddings");
    let r = (|| {
        let word = w.get(t, "embeddings.word_embeddings.weight", &[d.vocab, h])?;
        let pos = w.get(
            t,
            "embeddings.position_embeddings.weight",
            &[d.max_positions, h],
        )?;
        let typ = w.get(
            t,
            "embeddings.token_type_embeddings.weight",
            &[d.type_vocab, h],
        )?;
        let we = t.gather(&word, input_ids, 0)?;
        let te = t.gather(&typ, token_type_ids, 0)?;
        let e = t.add(&we, &te)?;
        // position_ids = arange(seq): rows [0, seq) of the position table.
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
            vec![input_ids.shape[1].clone(), Dim::Fixed(h)],
        );
        let e = t.add(&e, &pe)?;
        layer_norm(t, w, "LayerNorm", &e, h, d.enc.eps)
    })();
    t.pop();
    r
}

/// The BERT encoder stack (`BertModel` without pooler) over `[batch, seq]` inputs.
fn encoder(
    t: &mut Tracer,
    w: &WeightSource<'_>,
    d: &BertDims,
    input_ids: &T,
    attention_mask: &T,
    token_type_ids: &T,
) -> Result<T, TraceError> {
    let mut x = embeddings(t, w, d, input_ids, token_type_ids)?;
    let mask = additive_mask(t, attention_mask)?;
    t.push("encoder");
    for i in 0..d.layers {
        t.push(format!("layer.{i}"));
        let layer =
            bert_attention(t, w, &x, &mask, &d.enc).and_then(|a| bert_ffn(t, w, &a, &d.enc));
        t.pop();
        x = match layer {
            Ok(x) => x,
            Err(e) => {
                t.pop();
                return Err(e);
            }
        };
    }
    t.pop();
    Ok(x)
}

/// `BertPooler`: dense + tanh over the first token.
fn pooler(t: &mut Tracer, w: &WeightSource<'_>, d: &BertDims, x: &T) -> Result<T, TraceError> {
    let h = d.enc.hidden;
    t.push("pooler");
    let pooled = (|| {
        let zero = t.scalar_i64(0);
        let first = t.gather(x, &zero, 1)?;
        t.push("dense");
        let r = (|| {
            let wt = w.get(t, "pooler.dense.weight", &[h, h])?;
            let b = w.get(t, "pooler.dense.bias", &[h])?;
            t.gemm_bt(&first, &wt, &b)
        })();
        t.pop();
        let dense = r?;
        Ok::<T, TraceError>(t.unary("Tanh", &dense))
    })();
    t.pop();
    pooled
}

/// `BertOnlyMLMHead`: transform (dense, activation, LayerNorm) then the decoder, whose
/// weight is the word-embedding matrix unless the config unties it.
fn mlm_head(
    t: &mut Tracer,
    w: &WeightSource<'_>,
    d: &BertDims,
    tied: bool,
    x: &T,
) -> Result<T, TraceError> {
    let h = d.enc.hidden;
    t.push("cls");
    t.push("predictions");
    let r = (|| {
        t.push("transform");
        let tr = (|| {
            let y = linear(t, w, "dense", x, h, h)?;
            let y = d.enc.act.apply(t, &y)?;
            layer_norm(t, w, "LayerNorm", &y, h, d.enc.eps)
        })();
        t.pop();
        let y = tr?;
        t.push("decoder");
        let dec = (|| {
            let weight = if tied || !w.contains("cls.predictions.decoder.weight") {
                w.get(t, "embeddings.word_embeddings.weight", &[d.vocab, h])?
            } else {
                w.get(t, "cls.predictions.decoder.weight", &[d.vocab, h])?
            };
            let bias = if w.contains("cls.predictions.bias") {
                w.get(t, "cls.predictions.bias", &[d.vocab])?
            } else {
                w.get(t, "cls.predictions.decoder.bias", &[d.vocab])?
            };
            let wt = t.transpose(&weight, &[1, 0])?;
            let mm = t.matmul(&y, &wt)?;
            t.add(&mm, &bias)
        })();
        t.pop();
        dec
    })();
    t.pop();
    t.pop();
    r
}

/// Number of labels of a classification head.
pub(crate) fn num_labels(c: &ModelConfig) -> i64 {
    if !c.id2label.is_empty() {
        return c.id2label.len() as i64;
    }
    c.raw
        .get("num_labels")
        .and_then(serde_json::Value::as_i64)
        .unwrap_or(2)
}

/// Traces BERT with the head of `opts.task` (optimum's task names).
pub(crate) fn trace_bert(
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
    let d = BertDims::from_config(config)?;
    let w = WeightSource::new(weights, "bert");
    let h = d.enc.hidden;
    let (b, s) = (sym(&opts.batch_axis), sym(&opts.sequence_axis));

    if task == "multiple-choice" {
        let c = sym("num_choices");
        let shape = vec![b.clone(), c.clone(), s.clone()];
        let ids = t.input("input_ids", DType::I64, shape.clone());
        let mask = t.input("attention_mask", DType::I64, shape.clone());
        let types = t.input("token_type_ids", DType::I64, shape);
        let flat = vec![sym("batch_size*num_choices"), s.clone()];
        let fi = t.flatten(&ids, 2, flat.clone());
        let fm = t.flatten(&mask, 2, flat.clone());
        let ft = t.flatten(&types, 2, flat);
        let x = encoder(t, &w, &d, &fi, &fm, &ft)?;
        let pooled = pooler(t, &w, &d, &x)?;
        let logits = linear(t, &w, "classifier", &pooled, h, 1)?;
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
    let mask = t.input("attention_mask", DType::I64, bs.clone());
    let types = t.input("token_type_ids", DType::I64, bs);
    let x = encoder(t, &w, &d, &ids, &mask, &types)?;
    match task {
        "feature-extraction" => {
            t.output(&x, "last_hidden_state");
            if w.contains("pooler.dense.weight") {
                let pooled = pooler(t, &w, &d, &x)?;
                t.output(&pooled, "pooler_output");
            }
        }
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
            let pooled = pooler(t, &w, &d, &x)?;
            let logits = linear(t, &w, "classifier", &pooled, h, num_labels(config))?;
            t.output(&logits, "logits");
        }
        "token-classification" => {
            let logits = linear(t, &w, "classifier", &x, h, num_labels(config))?;
            t.output(&logits, "logits");
        }
        "question-answering" => {
            let logits = linear(t, &w, "qa_outputs", &x, h, 2)?;
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
                supported: BERT_TASKS.join(", "),
            });
        }
    }
    Ok(())
}

/// Tasks BERT exports.
pub(crate) const BERT_TASKS: &[&str] = &[
    "feature-extraction",
    "fill-mask",
    "text-classification",
    "token-classification",
    "question-answering",
    "multiple-choice",
];
