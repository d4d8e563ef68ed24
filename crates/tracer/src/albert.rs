//! ALBERT, as transformers' `modeling_albert.py` computes it: factorized embeddings
//! (`embedding_size` → `hidden_size` through `encoder.embedding_hidden_mapping_in`) and
//! layers shared across depth (`num_hidden_groups` groups of `inner_group_num` layers,
//! each stored once and applied wherever the encoder reuses it).
//!
//! Also home of small head helpers the encoder-only architectures share
//! ([`task_inputs`], [`choice_logits`], [`split_qa_logits`]).

use ferry_ir::{DType, Dim, Graph, ModelConfig, Weights};

use crate::bert::num_labels;
use crate::layers::{
    Activation, AttentionSpec, EncoderDims, WeightSource, additive_mask, layer_norm, linear,
    multi_head_attention, scoped, sym,
};
use crate::{T, TraceError, TraceOptions, Tracer};

/// Tasks ALBERT exports.
pub(crate) const ALBERT_TASKS: &[&str] = &[
    "feature-extraction",
    "fill-mask",
    "text-classification",
    "token-classification",
    "question-answering",
    "multiple-choice",
];

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
        let hidden = c.require(c.hidden_size, "hidden_size")?;
        let heads = c.require(c.num_attention_heads, "num_attention_heads")?;
        if hidden % heads != 0 {
            return Err(TraceError::Unsupported(format!(
                "hidden_size {hidden} is not a multiple of num_attention_heads {heads}"
            )));
        }
        Ok(Self {
            vocab: c.require(c.vocab_size, "vocab_size")?,
            embedding: raw_int(c, "embedding_size", 128)?,
            layers: c.require(c.num_hidden_layers, "num_hidden_layers")?,
            groups: raw_int(c, "num_hidden_groups", 1)?,
            inner: raw_int(c, "inner_group_num", 1)?,
            max_positions: c.max_position_embeddings.unwrap_or(512),
            type_vocab: c.type_vocab_size.unwrap_or(2),
            enc: EncoderDims {
                hidden,
                heads,
                intermediate: c.require(c.intermediate_size, "intermediate_size")?,
                eps: c.layer_norm_eps.unwrap_or(1e-12),
                act: Activation::parse(c.hidden_act.as_deref().unwrap_or("gelu_new"))?,
            },
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

/// `AlbertEmbeddings`: word + token-type + absolute-position embeddings (all of width
/// `embedding_size`), then LayerNorm.
fn embeddings(
    t: &mut Tracer,
    w: &WeightSource<'_>,
    d: &AlbertDims,
    input_ids: &T,
    token_type_ids: &T,
) -> Result<T, TraceError> {
    let e = d.embedding;
    scoped(t, "embeddings", |t| {
        let word = w.get(t, "embeddings.word_embeddings.weight", &[d.vocab, e])?;
        let pos = w.get(
            t,
            "embeddings.position_embeddings.weight",
            &[d.max_positions, e],
        )?;
        let typ = w.get(
            t,
            "embeddings.token_type_embeddings.weight",
            &[d.type_vocab, e],
        )?;
        let we = t.gather(&word, input_ids, 0)?;
        let te = t.gather(&typ, token_type_ids, 0)?;
        let x = t.add(&we, &te)?;
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
            vec![input_ids.shape[1].clone(), Dim::Fixed(e)],
        );
        let x = t.add(&x, &pe)?;
        layer_norm(t, w, "LayerNorm", &x, e, d.enc.eps)
    })
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
    let spec = AttentionSpec {
        q: "query",
        k: "key",
        v: "value",
        hidden: d.hidden,
        heads: d.heads,
    };
    let a = scoped(t, "attention", |t| {
        let ctx = multi_head_attention(t, w, x, mask, None, &spec)?;
        let o = linear(t, w, "dense", &ctx, d.hidden, d.hidden)?;
        let s = t.add(x, &o)?;
        layer_norm(t, w, "LayerNorm", &s, d.hidden, d.eps)
    })?;
    let f = linear(t, w, "ffn", &a, d.hidden, d.intermediate)?;
    let f = d.act.apply(t, &f)?;
    let f = linear(t, w, "ffn_output", &f, d.intermediate, d.hidden)?;
    let s = t.add(&f, &a)?;
    layer_norm(t, w, "full_layer_layer_norm", &s, d.hidden, d.eps)
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
    let e = embeddings(t, w, d, input_ids, token_type_ids)?;
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

/// The pooler: `tanh(pooler(x[:, 0]))` (a bare `nn.Linear` named `pooler`).
fn pooler(t: &mut Tracer, w: &WeightSource<'_>, d: &AlbertDims, x: &T) -> Result<T, TraceError> {
    let h = d.enc.hidden;
    scoped(t, "pooler", |t| {
        let zero = t.scalar_i64(0);
        let first = t.gather(x, &zero, 1)?;
        let wt = w.get(t, "pooler.weight", &[h, h])?;
        let b = w.get(t, "pooler.bias", &[h])?;
        let dense = t.gemm_bt(&first, &wt, &b)?;
        Ok(t.unary("Tanh", &dense))
    })
}

/// `AlbertMLMHead`: dense (hidden → embedding), activation, LayerNorm, then the decoder,
/// whose weight is the word-embedding matrix unless the config unties it.
fn mlm_head(
    t: &mut Tracer,
    w: &WeightSource<'_>,
    d: &AlbertDims,
    tied: bool,
    x: &T,
) -> Result<T, TraceError> {
    let (h, e) = (d.enc.hidden, d.embedding);
    scoped(t, "predictions", |t| {
        let y = linear(t, w, "dense", x, h, e)?;
        let y = d.enc.act.apply(t, &y)?;
        let y = layer_norm(t, w, "LayerNorm", &y, e, d.enc.eps)?;
        scoped(t, "decoder", |t| {
            let weight = if tied || !w.contains("predictions.decoder.weight") {
                w.get(t, "embeddings.word_embeddings.weight", &[d.vocab, e])?
            } else {
                w.get(t, "predictions.decoder.weight", &[d.vocab, e])?
            };
            let bias = if w.contains("predictions.bias") {
                w.get(t, "predictions.bias", &[d.vocab])?
            } else {
                w.get(t, "predictions.decoder.bias", &[d.vocab])?
            };
            let wt = t.transpose(&weight, &[1, 0])?;
            let mm = t.matmul(&y, &wt)?;
            t.add(&mm, &bias)
        })
    })
}

/// Declares the int64 graph inputs `names` (`input_ids` first). For multiple-choice they
/// are `[batch, num_choices, seq]` and are flattened to `[batch * num_choices, seq]` as
/// transformers' `view(-1, seq)` does; otherwise `[batch, seq]`. Returns the inputs as the
/// encoder sees them, and for multiple-choice the declared `input_ids` (for
/// [`choice_logits`]).
pub(crate) fn task_inputs(
    t: &mut Tracer,
    opts: &TraceOptions,
    task: &str,
    names: &[&str],
) -> (Vec<T>, Option<T>) {
    let (b, s) = (sym(&opts.batch_axis), sym(&opts.sequence_axis));
    if task == "multiple-choice" {
        let shape = vec![b, sym("num_choices"), s.clone()];
        let declared: Vec<T> = names
            .iter()
            .map(|n| t.input(n, DType::I64, shape.clone()))
            .collect();
        let flat = vec![sym("batch_size*num_choices"), s];
        let inputs = declared
            .iter()
            .map(|x| t.flatten(x, 2, flat.clone()))
            .collect();
        (inputs, declared.into_iter().next())
    } else {
        let shape = vec![b, s];
        let inputs = names
            .iter()
            .map(|n| t.input(n, DType::I64, shape.clone()))
            .collect();
        (inputs, None)
    }
}

/// Multiple-choice logits: the `[batch * num_choices, 1]` scores reshaped to
/// `[batch, num_choices]` (`logits.view(-1, num_choices)`), sizes read from `choices_ids`.
pub(crate) fn choice_logits(t: &mut Tracer, logits: &T, choices_ids: &T) -> T {
    let bc = t.shape_of(choices_ids);
    let zero = t.ints(&[0]);
    let two = t.ints(&[2]);
    let bc = t.slice(&bc, &zero, &two, &zero, vec![Dim::Fixed(2)]);
    let shape = choices_ids.shape[..2].to_vec();
    t.reshape_to(logits, &bc, shape)
}

/// `logits.split(1, dim=-1)` + `squeeze(-1)` of a `[batch, seq, 2]` QA head output:
/// `(start_logits, end_logits)`.
pub(crate) fn split_qa_logits(t: &mut Tracer, logits: &T) -> Result<(T, T), TraceError> {
    let i0 = t.scalar_i64(0);
    let start = t.gather(logits, &i0, 2)?;
    let i1 = t.scalar_i64(1);
    let end = t.gather(logits, &i1, 2)?;
    Ok((start, end))
}

/// Whether the fill-mask decoder shares the word-embedding matrix (`tie_word_embeddings`,
/// true unless the config says otherwise).
pub(crate) fn ties_word_embeddings(c: &ModelConfig) -> bool {
    c.raw
        .get("tie_word_embeddings")
        .and_then(serde_json::Value::as_bool)
        .unwrap_or(true)
}

/// Traces ALBERT with the head of `task` (optimum's task names).
pub(crate) fn trace_albert(
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
    if !ALBERT_TASKS.contains(&task) {
        return Err(TraceError::UnsupportedTask {
            task: task.to_string(),
            model_type: config.model_type.clone(),
            supported: ALBERT_TASKS.join(", "),
        });
    }
    let d = AlbertDims::from_config(config)?;
    let w = WeightSource::new(weights, "albert");
    let h = d.enc.hidden;
    let (inputs, choices) = task_inputs(
        t,
        opts,
        task,
        &["input_ids", "attention_mask", "token_type_ids"],
    );
    let [ids, mask, types] = inputs.as_slice() else {
        return Err(TraceError::Shape("expected three inputs".into()));
    };
    let x = encoder(t, &w, &d, ids, mask, types)?;
    match (task, choices) {
        ("multiple-choice", Some(choices)) => {
            let pooled = pooler(t, &w, &d, &x)?;
            let logits = linear(t, &w, "classifier", &pooled, h, 1)?;
            let logits = choice_logits(t, &logits, &choices);
            t.output(&logits, "logits");
        }
        ("feature-extraction", _) => {
            t.output(&x, "last_hidden_state");
            if w.contains("pooler.weight") {
                let pooled = pooler(t, &w, &d, &x)?;
                t.output(&pooled, "pooler_output");
            }
        }
        ("fill-mask", _) => {
            let logits = mlm_head(t, &w, &d, ties_word_embeddings(config), &x)?;
            t.output(&logits, "logits");
        }
        ("text-classification", _) => {
            let pooled = pooler(t, &w, &d, &x)?;
            let logits = linear(t, &w, "classifier", &pooled, h, num_labels(config))?;
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
                supported: ALBERT_TASKS.join(", "),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

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
