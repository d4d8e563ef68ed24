//! BERT, as transformers' `modeling_bert.py` computes it.

use ferry_ir::{DType, Dim, Graph, ModelConfig, Weights};

use crate::layers::{
    Activation, EncoderDims, WeightSource, additive_mask, bert_attention, bert_ffn, layer_norm, sym,
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

/// Traces `BertModel` for feature extraction: outputs `last_hidden_state` and, when the
/// checkpoint has a pooler, `pooler_output`.
pub(crate) fn trace_bert(
    config: &ModelConfig,
    weights: &Weights,
    opts: &TraceOptions,
) -> Result<Graph, TraceError> {
    let d = BertDims::from_config(config)?;
    let w = WeightSource::new(weights, "bert");
    let mut t = Tracer::new("main_graph", opts.opset);
    let bs = vec![sym(&opts.batch_axis), sym(&opts.sequence_axis)];
    let input_ids = t.input("input_ids", DType::I64, bs.clone());
    let attention_mask = t.input("attention_mask", DType::I64, bs.clone());
    let token_type_ids = t.input("token_type_ids", DType::I64, bs);

    let mut x = embeddings(&mut t, &w, &d, &input_ids, &token_type_ids)?;
    let mask = additive_mask(&mut t, &attention_mask)?;
    t.push("encoder");
    for i in 0..d.layers {
        t.push(format!("layer.{i}"));
        let layer = bert_attention(&mut t, &w, &x, &mask, &d.enc)
            .and_then(|a| bert_ffn(&mut t, &w, &a, &d.enc));
        t.pop();
        x = layer?;
    }
    t.pop();
    t.output(&x, "last_hidden_state");

    let has_pooler =
        weights.contains("pooler.dense.weight") || weights.contains("bert.pooler.dense.weight");
    if has_pooler {
        let h = d.enc.hidden;
        t.push("pooler");
        let pooled = (|| {
            let zero = t.scalar_i64(0);
            let first = t.gather(&x, &zero, 1)?;
            t.push("dense");
            let r = (|| {
                let wt = w.get(&mut t, "pooler.dense.weight", &[h, h])?;
                let b = w.get(&mut t, "pooler.dense.bias", &[h])?;
                t.gemm_bt(&first, &wt, &b)
            })();
            t.pop();
            let dense = r?;
            Ok::<T, TraceError>(t.unary("Tanh", &dense))
        })();
        t.pop();
        t.output(&pooled?, "pooler_output");
    }
    Ok(t.finish())
}
