//! DeBERTa-v2 (the architecture of the DeBERTa-v3 checkpoints), as transformers'
//! `modeling_deberta_v2.py` computes it: disentangled self-attention, whose scores add to
//! the content-to-content term a content-to-position (`c2p`) and a position-to-content
//! (`p2c`) term over the shared relative-position embeddings (`encoder.rel_embeddings`,
//! optionally LayerNorm'ed), with log-bucketed relative positions built from the run-time
//! sequence length; embeddings with optional absolute positions, token types and
//! `embed_proj`, masked after their LayerNorm; a `[batch, 1, seq, seq]` pairwise mask
//! filled in with `finfo.min` as `masked_fill` does. DeBERTa v1 (`modeling_deberta.py`) is
//! a switch on the same module: its attention (`v1_attention`) differs, the rest is shared.

use ferry_ir::{Attr, DType, Dim, ModelConfig};

use crate::config::{attention_width, encoder_dims, flag};
use crate::embeddings::{arange_rows, position_grid};
use crate::heads::{
    ChoiceHead, ClassificationHead, EncoderHeads, INPUTS, MlmHead, SequenceHead, TYPED_INPUTS,
};
use crate::layers::{
    Activation, EncoderDims, HeadActivation, WeightLayout, WeightSource, add_norm, bert_ffn, dense,
    layer_norm, linear, scoped,
};
use crate::{Request, T, TraceError, Tracer};

/// DeBERTa v1's tasks: transformers has no `DebertaForMultipleChoice` (nor optimum a
/// multiple-choice export of it).
pub(crate) const V1_TASKS: &[&str] = &[
    "feature-extraction",
    "fill-mask",
    "text-classification",
    "token-classification",
    "question-answering",
];

/// Which relative terms the attention scores add (`pos_att_type`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct PosAttention {
    /// `c2p`: the query against the position keys.
    c2p: bool,
    /// `p2c`: the key against the position queries.
    p2c: bool,
    /// How many entries `pos_att_type` lists (DeBERTa v1's `scale_factor` counts them).
    listed: i64,
}

impl PosAttention {
    /// Reads `pos_att_type`: a list, or a `|`-separated string, of `c2p` / `p2c` in any
    /// order (the order does not change what transformers computes).
    fn from_config(c: &ModelConfig) -> Result<Self, TraceError> {
        let names: Vec<String> = match c.raw.get("pos_att_type") {
            None | Some(serde_json::Value::Null) => Vec::new(),
            Some(serde_json::Value::String(s)) => s
                .to_lowercase()
                .split('|')
                .map(|x| x.trim().to_string())
                .collect(),
            Some(serde_json::Value::Array(a)) => a
                .iter()
                .map(|v| v.as_str().map(str::to_string))
                .collect::<Option<_>>()
                .ok_or_else(|| TraceError::Unsupported("pos_att_type entries".into()))?,
            Some(other) => {
                return Err(TraceError::Unsupported(format!("pos_att_type {other}")));
            }
        };
        let mut p = Self {
            listed: names.len() as i64,
            ..Self::default()
        };
        for n in &names {
            match n.as_str() {
                "c2p" => p.c2p = true,
                "p2c" => p.p2c = true,
                "" => {}
                other => {
                    return Err(TraceError::Unsupported(format!(
                        "pos_att_type `{other}` (supported: c2p, p2c)"
                    )));
                }
            }
        }
        Ok(p)
    }

    /// `scale_factor`: 1 plus one per relative term named (v2), or per entry listed (v1).
    fn scale_factor(self, v1: bool) -> i64 {
        if v1 {
            1 + self.listed
        } else {
            1 + i64::from(self.c2p) + i64::from(self.p2c)
        }
    }
}

/// The relative-attention settings, when `relative_attention` is on.
#[derive(Debug, Clone, Copy)]
struct Relative {
    /// `position_buckets` (log-bucketing when > 0).
    buckets: i64,
    /// `max_relative_positions`, defaulting to `max_position_embeddings`.
    max_relative: i64,
    /// `pos_ebd_size`: the attention span (`buckets`, else `max_relative`); the table has
    /// twice as many rows.
    span: i64,
    /// `norm_rel_ebd` includes `layer_norm`.
    norm: bool,
    /// `share_att_key`: the position terms reuse `query_proj` / `key_proj`.
    share_key: bool,
}

/// `ACT2FN[name]` for the pooler and the conv layer: `tanh`, `linear` or an [`Activation`].
fn head_activation(name: &str) -> Result<HeadActivation, TraceError> {
    Ok(match name {
        "tanh" => HeadActivation::Tanh,
        "linear" => HeadActivation::Identity,
        other => HeadActivation::Act(Activation::parse(other)?),
    })
}

/// `ConvLayer`: a `Conv1d(hidden, hidden, kernel, padding=(kernel - 1) / 2, groups)` over the
/// sequence, `conv_act`, then LayerNorm with the residual.
#[derive(Debug, Clone, Copy)]
struct Conv {
    /// `conv_kernel_size`.
    kernel: i64,
    /// `conv_groups`.
    groups: i64,
    /// `conv_act`.
    act: HeadActivation,
}

/// The DeBERTa-v2 hyper-parameters ferry needs, validated.
#[derive(Debug, Clone)]
struct DebertaDims {
    /// DeBERTa v1 (`deberta`): packed `in_proj` with `q_bias`/`v_bias`, the query scaled
    /// before the products, `pos_proj`/`pos_q_proj`, no bucketing, no `norm_rel_ebd`.
    v1: bool,
    vocab: i64,
    layers: i64,
    max_positions: i64,
    type_vocab: i64,
    /// `embedding_size` (the word-embedding width; `embed_proj` maps it to `hidden_size`).
    embedding: i64,
    /// `position_biased_input`: absolute position embeddings added to the input.
    position_biased: bool,
    pos_att: PosAttention,
    relative: Option<Relative>,
    /// `legacy` masked-LM head (`cls.predictions`) rather than `lm_predictions.lm_head`.
    legacy_mlm: bool,
    /// `pooler_hidden_act` of `ContextPooler`.
    pooler_act: HeadActivation,
    /// DeBERTa-v2's `ConvLayer` after the first layer (`conv_kernel_size > 0`).
    conv: Option<Conv>,
    enc: EncoderDims,
}

/// An integer from `config.raw` (any sign: `-1` means unset for the relative-position
/// fields), `default` when absent or null.
fn int_or(c: &ModelConfig, key: &str, default: i64) -> Result<i64, TraceError> {
    match c.raw.get(key) {
        None | Some(serde_json::Value::Null) => Ok(default),
        Some(v) => v
            .as_i64()
            .ok_or_else(|| TraceError::Unsupported(format!("`{key}` {v} (not an integer)"))),
    }
}

impl DebertaDims {
    fn from_config(c: &ModelConfig) -> Result<Self, TraceError> {
        let width = attention_width(c)?;
        let (hidden, heads) = width;
        let mut enc = encoder_dims(c, width, "gelu")?;
        enc.eps = c.layer_norm_eps.unwrap_or(1e-7);
        if let Some(size) = c.raw.get("attention_head_size").and_then(|v| v.as_i64())
            && size * heads != hidden
        {
            return Err(TraceError::Unsupported(format!(
                "attention_head_size {size} (only hidden_size / num_attention_heads)"
            )));
        }
        let conv = match int_or(c, "conv_kernel_size", 0)? {
            k if k <= 0 => None,
            kernel => {
                if kernel % 2 == 0 {
                    // padding (k - 1) / 2 shortens the sequence: transformers fails too.
                    return Err(TraceError::Unsupported(format!(
                        "conv_kernel_size {kernel} (even: the output is shorter than the input)"
                    )));
                }
                let groups = int_or(c, "conv_groups", 1)?;
                if groups <= 0 || hidden % groups != 0 {
                    return Err(TraceError::Unsupported(format!(
                        "conv_groups {groups} (must divide hidden_size {hidden})"
                    )));
                }
                let act = c
                    .raw
                    .get("conv_act")
                    .and_then(|v| v.as_str())
                    .unwrap_or("tanh");
                Some(Conv {
                    kernel,
                    groups,
                    act: head_activation(act)?,
                })
            }
        };
        let pooler = int_or(c, "pooler_hidden_size", hidden)?;
        let type_vocab = int_or(c, "type_vocab_size", 0)?;
        let embedding = int_or(c, "embedding_size", hidden)?;
        if type_vocab < 0 || embedding <= 0 {
            return Err(TraceError::Unsupported(format!(
                "type_vocab_size {type_vocab} / embedding_size {embedding}"
            )));
        }
        if pooler != hidden {
            return Err(TraceError::Unsupported(format!(
                "pooler_hidden_size {pooler} != hidden_size {hidden}"
            )));
        }
        let v1 = c.model_type == "deberta";
        if v1 && flag(c, "talking_head", false) {
            return Err(TraceError::Unsupported("talking_head (DeBERTa v1)".into()));
        }
        let max_positions = c.max_position_embeddings.unwrap_or(512);
        let relative = if flag(c, "relative_attention", false) {
            let buckets = if v1 {
                -1
            } else {
                int_or(c, "position_buckets", -1)?
            };
            let mut max_relative = int_or(c, "max_relative_positions", -1)?;
            if max_relative < 1 {
                max_relative = max_positions;
            }
            let norm = c
                .raw
                .get("norm_rel_ebd")
                .and_then(|v| v.as_str())
                .unwrap_or("none")
                .to_lowercase()
                .split('|')
                .any(|x| x.trim() == "layer_norm")
                && !v1;
            Some(Relative {
                buckets,
                max_relative,
                span: if buckets > 0 { buckets } else { max_relative },
                norm,
                share_key: !v1 && flag(c, "share_att_key", false),
            })
        } else {
            None
        };
        let pooler_act = c
            .raw
            .get("pooler_hidden_act")
            .and_then(|v| v.as_str())
            .unwrap_or("gelu");
        Ok(Self {
            v1,
            vocab: c.require(c.vocab_size, "vocab_size")?,
            layers: c.require(c.num_hidden_layers, "num_hidden_layers")?,
            max_positions,
            type_vocab,
            embedding,
            position_biased: flag(c, "position_biased_input", true),
            pos_att: PosAttention::from_config(c)?,
            relative,
            legacy_mlm: flag(c, "legacy", true),
            pooler_act: head_activation(pooler_act)?,
            conv,
            enc,
        })
    }
}

/// `DebertaV2Embeddings`: word (+ absolute position when `position_biased_input`) (+ token
/// type) embeddings, `embed_proj` when `embedding_size != hidden_size`, `LayerNorm`, then
/// multiplied by the attention mask.
fn embeddings(
    t: &mut Tracer,
    w: &WeightSource<'_>,
    d: &DebertaDims,
    ids: &T,
    mask: &T,
    types: Option<&T>,
) -> Result<T, TraceError> {
    let e = d.embedding;
    scoped(t, "embeddings", |t| {
        let word = w.get(t, "embeddings.word_embeddings.weight", &[d.vocab, e])?;
        let mut x = t.gather(&word, ids, 0)?;
        if d.position_biased {
            let table = w.get(
                t,
                "embeddings.position_embeddings.weight",
                &[d.max_positions, e],
            )?;
            let pe = arange_rows(t, &table, ids, e);
            x = t.add(&x, &pe)?;
        }
        if d.type_vocab > 0 {
            let table = w.get(
                t,
                "embeddings.token_type_embeddings.weight",
                &[d.type_vocab, e],
            )?;
            let te = match types {
                Some(types) => t.gather(&table, types, 0)?,
                None => {
                    let zero = t.scalar_i64(0);
                    t.gather(&table, &zero, 0)?
                }
            };
            x = t.add(&x, &te)?;
        }
        if e != d.enc.hidden {
            x = dense(
                t,
                w,
                "embed_proj",
                &x,
                (e, d.enc.hidden),
                WeightLayout::OutIn,
                false,
            )?;
        }
        let x = layer_norm(t, w, "LayerNorm", &x, d.enc.hidden, d.enc.eps)?;
        let m = t.unsqueeze(mask, &[2]);
        let m = t.cast_to_float(&m);
        t.mul(&x, &m)
    })
}

/// `build_relative_position` over the `[seq, seq]` grid of the run-time length of
/// `input_ids`: `q - k`, log-bucketed (`make_log_bucket_position`) when `position_buckets`
/// is set. The bucketing runs in float32 as torch runs it.
fn relative_positions(t: &mut Tracer, r: &Relative, input_ids: &T) -> Result<T, TraceError> {
    let s = input_ids.shape[1].clone();
    let grid = vec![s.clone(), s];
    let (q, k) = position_grid(t, input_ids)?;
    let rel = t.sub(&q, &k)?;
    if r.buckets <= 0 {
        return Ok(rel);
    }
    let mid = r.buckets / 2;
    // abs_pos = where(-mid < rel < mid, mid - 1, |rel|)
    let mid_t = t.scalar_i64(mid);
    let neg_mid = t.scalar_i64(-mid);
    let below = t.op("Less", &[&rel, &mid_t], vec![], DType::Bool, grid.clone());
    let above = t.op(
        "Greater",
        &[&rel, &neg_mid],
        vec![],
        DType::Bool,
        grid.clone(),
    );
    let inside = t.op("And", &[&below, &above], vec![], DType::Bool, grid.clone());
    let mid_less = t.scalar_i64(mid - 1);
    let abs = t.unary("Abs", &rel);
    let abs_pos = t.op(
        "Where",
        &[&inside, &mid_less, &abs],
        vec![],
        DType::I64,
        grid.clone(),
    );
    // log_pos = ceil(log(abs_pos / mid) / log((max_position - 1) / mid) * (mid - 1)) + mid
    let abs_f = t.cast(&abs_pos, DType::F32, 1);
    let mid_f = t.scalar_f32(mid as f32);
    let ratio = t.div(&abs_f, &mid_f)?;
    let log = t.unary("Log", &ratio);
    // torch.log(torch.tensor((max_position - 1) / mid)): a float32 log of a float32.
    let base = ((r.max_relative - 1) as f64 / mid as f64) as f32;
    let log_base = t.scalar_f32(base.ln());
    let scaled = t.div(&log, &log_base)?;
    let steps = t.scalar_f32((mid - 1) as f32);
    let scaled = t.mul(&scaled, &steps)?;
    let ceil = t.unary("Ceil", &scaled);
    let log_pos = t.add(&ceil, &mid_f)?;
    // bucket = where(abs_pos <= mid, rel, log_pos * sign(rel))
    let sign = t.unary("Sign", &rel);
    let sign = t.cast(&sign, DType::F32, 1);
    let signed = t.mul(&log_pos, &sign)?;
    let mid_next = t.scalar_i64(mid + 1);
    let near = t.op(
        "Less",
        &[&abs_pos, &mid_next],
        vec![],
        DType::Bool,
        grid.clone(),
    );
    let rel_f = t.cast(&rel, DType::F32, 1);
    let bucket = t.op("Where", &[&near, &rel_f, &signed], vec![], DType::F32, grid);
    Ok(t.cast(&bucket, DType::I64, 7))
}

/// `clamp(sign * rel + span, 0, 2 span - 1)`: the table rows the c2p (`sign` 1) or p2c
/// (`sign` -1) term gathers.
fn table_index(t: &mut Tracer, rel: &T, span: i64, negate: bool) -> Result<T, TraceError> {
    let r = if negate {
        t.unary("Neg", rel)
    } else {
        rel.clone()
    };
    let span_t = t.scalar_i64(span);
    let shifted = t.add(&r, &span_t)?;
    let zero = t.scalar_i64(0);
    let lo = t.op(
        "Max",
        &[&shifted, &zero],
        vec![],
        DType::I64,
        shifted.shape.clone(),
    );
    let top = t.scalar_i64(2 * span - 1);
    Ok(t.op("Min", &[&lo, &top], vec![], DType::I64, lo.shape.clone()))
}

/// What every layer's attention shares: the pairwise mask, the relative-embedding table
/// and the gather indices of the position terms.
struct Shared {
    /// `[batch, 1, seq, seq]` boolean: both tokens attended.
    mask: T,
    /// `[2 span, hidden]` relative embeddings (after `encoder.LayerNorm` when configured).
    rel_embeddings: Option<T>,
    /// `[seq, seq]` c2p indices.
    c2p_index: Option<T>,
    /// `[seq, seq]` p2c indices.
    p2c_index: Option<T>,
}

/// Splits `[.., n, heads * dim]` into heads: `[.., heads, n, dim]` (`perm` given).
fn heads_of(t: &mut Tracer, x: &T, heads: i64, perm: &[usize]) -> Result<T, TraceError> {
    let head_dim = x.shape.last().and_then(Dim::fixed).unwrap_or(0) / heads;
    let mut target = vec![0i64; x.rank() - 1];
    target.extend([heads, head_dim]);
    let y = t.reshape(x, &target)?;
    t.transpose(&y, perm)
}

/// Gathers the `[.., seq, 2 span]` position scores at `index` (`[seq, seq]`, expanded to
/// `like`'s shape) along the last axis.
fn gather_positions(t: &mut Tracer, scores: &T, index: &T, like: &T) -> T {
    let shape = t.shape_of(like);
    let idx = t.op(
        "Expand",
        &[index, &shape],
        vec![],
        DType::I64,
        like.shape.clone(),
    );
    t.op(
        "GatherElements",
        &[scores, &idx],
        vec![("axis", Attr::Int(-1))],
        scores.dtype,
        like.shape.clone(),
    )
}

/// `DisentangledSelfAttention` (`attention.self`, v1 or v2): the `[batch, seq, hidden]`
/// context.
fn disentangled_attention(
    t: &mut Tracer,
    w: &WeightSource<'_>,
    d: &DebertaDims,
    x: &T,
    sh: &Shared,
) -> Result<T, TraceError> {
    let (q, k, v) = if d.v1 {
        v1_qkv(t, w, d, x)?
    } else {
        let (hidden, heads) = (d.enc.hidden, d.enc.heads);
        let mut heads_of_linear = |name: &str| {
            let y = linear(t, w, name, x, hidden, hidden)?;
            heads_of(t, &y, heads, &[0, 2, 1, 3])
        };
        (
            heads_of_linear("query_proj")?,
            heads_of_linear("key_proj")?,
            heads_of_linear("value_proj")?,
        )
    };
    let scale = attention_scale(t, d);
    let kt = t.transpose(&k, &[0, 1, 3, 2])?;
    // v1 divides the query (which its c2p term then uses), v2 the transposed key.
    let (q, scores) = if d.v1 {
        let q = t.div(&q, &scale)?;
        let scores = t.matmul(&q, &kt)?;
        (q, scores)
    } else {
        let kt = t.div(&kt, &scale)?;
        let scores = t.matmul(&q, &kt)?;
        (q, scores)
    };
    let scores = add_position_terms(t, w, d, sh, (&q, &k), &scale, scores)?;
    masked_context(t, &scores, sh, &v, d.enc.hidden)
}

/// Adds to `scores` the c2p (`q` against the projected position keys, gathered at the c2p
/// index) and p2c (`k` against the projected position queries, gathered at the p2c index,
/// transposed) terms `pos_att_type` names. v2 divides both gathered terms by `scale` and
/// projects with `pos_key_proj`/`pos_query_proj` (or the layer's `key_proj`/`query_proj`
/// with `share_att_key`); v1's `q` is already scaled, and it projects with `pos_proj` (no
/// bias) and `pos_q_proj`, dividing the projected position queries.
fn add_position_terms(
    t: &mut Tracer,
    w: &WeightSource<'_>,
    d: &DebertaDims,
    sh: &Shared,
    (q, k): (&T, &T),
    scale: &T,
    scores: T,
) -> Result<T, TraceError> {
    let (Some(r), Some(rel)) = (&d.relative, &sh.rel_embeddings) else {
        return Ok(scores);
    };
    let (hidden, heads) = (d.enc.hidden, d.enc.heads);
    // (module, has bias) of the position-key and position-query projections.
    let (key_proj, query_proj) = if d.v1 {
        (("pos_proj", false), ("pos_q_proj", true))
    } else if r.share_key {
        (("key_proj", true), ("query_proj", true))
    } else {
        (("pos_key_proj", true), ("pos_query_proj", true))
    };
    let project = |t: &mut Tracer, (name, bias): (&str, bool)| {
        let p = dense(t, w, name, rel, (hidden, hidden), WeightLayout::OutIn, bias)?;
        // [2 span, heads, dim] -> [heads, dim, 2 span]
        heads_of(t, &p, heads, &[1, 2, 0])
    };
    let mut terms: Option<T> = None;
    if let (true, Some(index)) = (d.pos_att.c2p, &sh.c2p_index) {
        let pos_key = project(t, key_proj)?;
        let c2p = t.matmul(q, &pos_key)?;
        let c2p = gather_positions(t, &c2p, index, &scores);
        terms = Some(if d.v1 { c2p } else { t.div(&c2p, scale)? });
    }
    if let (true, Some(index)) = (d.pos_att.p2c, &sh.p2c_index) {
        let mut pos_query = project(t, query_proj)?;
        if d.v1 {
            pos_query = t.div(&pos_query, scale)?;
        }
        let p2c = t.matmul(k, &pos_query)?;
        let p2c = gather_positions(t, &p2c, index, &scores);
        let mut p2c = t.transpose(&p2c, &[0, 1, 3, 2])?;
        if !d.v1 {
            p2c = t.div(&p2c, scale)?;
        }
        terms = Some(match terms {
            Some(c2p) => t.add(&c2p, &p2c)?,
            None => p2c,
        });
    }
    match terms {
        Some(b) => t.add(&scores, &b),
        None => Ok(scores),
    }
}

/// `sqrt(head_dim * scale_factor)` in float32 (`scaled_size_sqrt`), in the compute dtype.
fn attention_scale(t: &mut Tracer, d: &DebertaDims) -> T {
    let head_dim = d.enc.hidden / d.enc.heads;
    let factor = d.pos_att.scale_factor(d.v1) as f32;
    t.scalar(((head_dim as f32) * factor).sqrt())
}

/// `masked_fill(~mask, finfo.min)`, softmax, the weighted values, heads merged.
fn masked_context(
    t: &mut Tracer,
    scores: &T,
    sh: &Shared,
    v: &T,
    hidden: i64,
) -> Result<T, TraceError> {
    let min = t.float_min();
    let scores = t.op(
        "Where",
        &[&sh.mask, scores, &min],
        vec![],
        scores.dtype,
        scores.shape.clone(),
    );
    let probs = t.softmax_last(&scores);
    let ctx = t.matmul(&probs, v)?;
    let ctx = t.transpose(&ctx, &[0, 2, 1, 3])?;
    t.reshape(&ctx, &[0, 0, hidden])
}

/// DeBERTa v1's query, key and value heads: `in_proj` (no bias) split per head into q, k,
/// v, then `q_bias` and `v_bias` added. (transformers slices the relative table to
/// `att_span = min(seq, max_relative_positions)` rows either side of the centre; gathering
/// the whole table at `clamp(±rel + max_relative)` picks the same rows.)
fn v1_qkv(
    t: &mut Tracer,
    w: &WeightSource<'_>,
    d: &DebertaDims,
    x: &T,
) -> Result<(T, T, T), TraceError> {
    let (hidden, heads) = (d.enc.hidden, d.enc.heads);
    let head_dim = hidden / heads;
    let qkv = dense(
        t,
        w,
        "in_proj",
        x,
        (hidden, 3 * hidden),
        WeightLayout::OutIn,
        false,
    )?;
    let qkv = heads_of(t, &qkv, heads, &[0, 2, 1, 3])?;
    let bias = |t: &mut Tracer, name: &str| -> Result<T, TraceError> {
        let path = t.module_path();
        let b = w.get(t, &format!("{path}.{name}"), &[hidden])?;
        t.reshape(&b, &[heads, 1, head_dim])
    };
    let q = t.slice_last(&qkv, 0, head_dim);
    let qb = bias(t, "q_bias")?;
    let q = t.add(&q, &qb)?;
    let k = t.slice_last(&qkv, head_dim, 2 * head_dim);
    let v = t.slice_last(&qkv, 2 * head_dim, 3 * head_dim);
    let vb = bias(t, "v_bias")?;
    let v = t.add(&v, &vb)?;
    Ok((q, k, v))
}

/// `DebertaV2Layer`: disentangled attention, `attention.output` (dense + residual
/// LayerNorm), then the BERT-style feed-forward block.
fn deberta_layer(
    t: &mut Tracer,
    w: &WeightSource<'_>,
    d: &DebertaDims,
    x: &T,
    sh: &Shared,
) -> Result<T, TraceError> {
    let a = scoped(t, "attention", |t| {
        let ctx = scoped(t, "self", |t| disentangled_attention(t, w, d, x, sh))?;
        scoped(t, "output", |t| {
            let o = linear(t, w, "dense", &ctx, d.enc.hidden, d.enc.hidden)?;
            add_norm(t, w, "LayerNorm", &o, x, &d.enc)
        })
    })?;
    bert_ffn(t, w, &a, &d.enc)
}

/// `DebertaV2Model` over `[batch, seq]` inputs.
fn encoder(
    t: &mut Tracer,
    w: &WeightSource<'_>,
    d: &DebertaDims,
    ids: &T,
    attention_mask: &T,
    types: Option<&T>,
) -> Result<T, TraceError> {
    let x = embeddings(t, w, d, ids, attention_mask, types)?;
    scoped(t, "encoder", |t| {
        // get_attention_mask: mask[:, None, None, :] * mask[:, None, :, None], as booleans.
        let m = t.cast(attention_mask, DType::Bool, 9);
        let keys = t.unsqueeze(&m, &[1, 2]);
        let queries = t.unsqueeze(&m, &[1, 3]);
        let b = attention_mask.shape[0].clone();
        let s = attention_mask.shape[1].clone();
        let mask = t.op(
            "And",
            &[&keys, &queries],
            vec![],
            DType::Bool,
            vec![b, Dim::Fixed(1), s.clone(), s],
        );
        let mut sh = Shared {
            mask,
            rel_embeddings: None,
            c2p_index: None,
            p2c_index: None,
        };
        if let Some(r) = &d.relative {
            let table = w.get(
                t,
                "encoder.rel_embeddings.weight",
                &[2 * r.span, d.enc.hidden],
            )?;
            sh.rel_embeddings = Some(if r.norm {
                layer_norm(t, w, "LayerNorm", &table, d.enc.hidden, d.enc.eps)?
            } else {
                table
            });
            let rel = scoped(t, "rel_pos", |t| relative_positions(t, r, ids))?;
            if d.pos_att.c2p {
                sh.c2p_index = Some(table_index(t, &rel, r.span, false)?);
            }
            if d.pos_att.p2c {
                sh.p2c_index = Some(table_index(t, &rel, r.span, true)?);
            }
        }
        let mut y = x.clone();
        for i in 0..d.layers {
            y = scoped(t, &format!("layer.{i}"), |t| {
                deberta_layer(t, w, d, &y, &sh)
            })?;
            if let (0, Some(conv)) = (i, &d.conv) {
                y = scoped(t, "conv", |t| {
                    conv_layer(t, w, d, conv, &x, &y, attention_mask)
                })?;
            }
        }
        Ok(y)
    })
}

/// `ConvLayer(embeddings, layer_0_output, mask)`: the convolution of the embeddings over the
/// sequence (`[batch, hidden, seq]`), zeroed at padding, `conv_act`, `LayerNorm(residual +
/// out)`, times the mask.
fn conv_layer(
    t: &mut Tracer,
    w: &WeightSource<'_>,
    d: &DebertaDims,
    conv: &Conv,
    x: &T,
    residual: &T,
    attention_mask: &T,
) -> Result<T, TraceError> {
    let h = d.enc.hidden;
    let (weight, bias) = scoped(t, "conv", |t| {
        let path = t.module_path();
        let weight = w.get(
            t,
            &format!("{path}.weight"),
            &[h, h / conv.groups, conv.kernel],
        )?;
        let bias = w.get(t, &format!("{path}.bias"), &[h])?;
        Ok((weight, bias))
    })?;
    let channels = t.transpose(x, &[0, 2, 1])?;
    let pad = (conv.kernel - 1) / 2;
    let len = channels.shape[2].clone();
    let y = t.op(
        "Conv",
        &[&channels, &weight, &bias],
        vec![
            ("group", Attr::Int(conv.groups)),
            ("kernel_shape", Attr::Ints(vec![conv.kernel])),
            ("pads", Attr::Ints(vec![pad, pad])),
        ],
        x.dtype,
        vec![channels.shape[0].clone(), Dim::Fixed(h), len],
    );
    let y = t.transpose(&y, &[0, 2, 1])?;
    let m = t.unsqueeze(attention_mask, &[2]);
    let m = t.cast_to_float(&m);
    let y = t.mul(&y, &m)?;
    let y = conv.act.apply(t, y)?;
    let s = t.add(residual, &y)?;
    let y = layer_norm(t, w, "LayerNorm", &s, h, d.enc.eps)?;
    t.mul(&y, &m)
}

/// DeBERTa-v2's heads: `ContextPooler` (`pooler.dense` + `pooler_hidden_act` over the first
/// token, no tanh) then `classifier` for sequence classification and multiple-choice; the
/// masked-LM head `cls.predictions` (legacy: transform to `embedding_size`, decoder tied to
/// the word embeddings, `cls.predictions.bias`) or `lm_predictions.lm_head` (dense,
/// LayerNorm, word embeddings, `bias`); no pooler output for feature-extraction.
fn heads(d: &DebertaDims) -> EncoderHeads {
    let h = d.enc.hidden;
    let pooled = ClassificationHead {
        scope: None,
        dense: "pooler.dense",
        act: d.pooler_act,
        out: "classifier",
    };
    let mlm = if d.legacy_mlm {
        MlmHead {
            transform: Some("transform"),
            // Untied, `cls.predictions.decoder` is an `nn.Linear` with its own bias.
            own_bias_when_untied: true,
            ..MlmHead::new(
                &["cls", "predictions"],
                d.enc.act,
                &d.enc,
                d.embedding,
                d.vocab,
            )
        }
    } else {
        MlmHead::new(
            &["lm_predictions", "lm_head"],
            d.enc.act,
            &d.enc,
            h,
            d.vocab,
        )
    };
    EncoderHeads {
        hidden: h,
        pooler: None,
        sequence: SequenceHead::FirstToken(pooled),
        choice: Some(ChoiceHead::FirstToken(pooled)),
        mlm,
    }
}

/// Traces DeBERTa-v2 with the head of `task` (optimum's task names); `token_type_ids` is
/// an input only when `type_vocab_size > 0`, as in optimum's export.
pub(crate) fn build(t: &mut Tracer, r: &Request<'_>) -> Result<(), TraceError> {
    let d = DebertaDims::from_config(r.config)?;
    let heads = heads(&d);
    if d.type_vocab > 0 {
        heads.trace(t, r, "deberta", TYPED_INPUTS, |t, w, [ids, mask, types]| {
            encoder(t, w, &d, ids, mask, Some(types))
        })
    } else {
        heads.trace(t, r, "deberta", INPUTS, |t, w, [ids, mask]| {
            encoder(t, w, &d, ids, mask, None)
        })
    }
}

#[cfg(test)]
mod tests {
    use ferry_ir::{Graph, ModelConfig};

    use super::DebertaDims;
    use crate::TraceError;

    fn traced(name: &str, task: &str) -> Graph {
        crate::fixed_dims_tests::traced(name, task, &[])
    }

    fn names(v: &[ferry_ir::Value]) -> Vec<&str> {
        v.iter().map(|v| v.name.as_str()).collect()
    }

    fn has_init(g: &Graph, part: &str) -> bool {
        g.initializers.iter().any(|i| i.name.contains(part))
    }

    #[test]
    fn shared_keys_and_buckets_built_once() {
        // share_att_key, c2p and p2c, position_buckets 8, type_vocab_size 0, 2 layers.
        let g = traced("deberta-v2-tiny-feature-extraction", "feature-extraction");
        assert_eq!(names(&g.inputs), ["input_ids", "attention_mask"]);
        assert_eq!(names(&g.outputs), ["last_hidden_state"], "no pooler output");
        let counts = g.op_counts();
        assert_eq!(counts.get("Range"), Some(&1), "one relative-position grid");
        assert_eq!(counts.get("Ceil"), Some(&1), "bucketed once");
        assert_eq!(
            counts.get("GatherElements"),
            Some(&4),
            "c2p + p2c per layer"
        );
        assert!(!has_init(&g, "pos_key_proj") && !has_init(&g, "pos_query_proj"));
        assert!(has_init(&g, "encoder.LayerNorm.weight"), "norm_rel_ebd");
        assert!(
            !has_init(&g, "position_embeddings"),
            "position_biased_input off"
        );
    }

    #[test]
    fn separate_position_projections_and_context_pooler() {
        // share_att_key off, p2c|c2p, token types, tanh ContextPooler, 3 layers.
        let g = traced("deberta-v2-tiny-text-classification", "text-classification");
        assert_eq!(
            names(&g.inputs),
            ["input_ids", "attention_mask", "token_type_ids"]
        );
        assert!(has_init(&g, "layer.2.attention.self.pos_key_proj.weight"));
        assert!(has_init(&g, "layer.2.attention.self.pos_query_proj.weight"));
        assert!(has_init(&g, "pooler.dense.weight") && has_init(&g, "classifier.weight"));
        let counts = g.op_counts();
        assert_eq!(counts.get("Tanh"), Some(&1), "pooler_hidden_act tanh");
        assert_eq!(counts.get("GatherElements"), Some(&6));
        // Only p2c: one gather per layer, no c2p projection.
        let g = traced("deberta-v2-tiny-question-answering", "question-answering");
        assert_eq!(g.op_counts().get("GatherElements"), Some(&2));
        assert!(has_init(&g, "pos_query_proj") && !has_init(&g, "pos_key_proj"));
        // No relative attention: no grid at all.
        let g = traced(
            "deberta-v2-tiny-text-classification-absolute",
            "text-classification",
        );
        assert_eq!(g.op_counts().get("Range"), None);
        assert_eq!(g.op_counts().get("GatherElements"), None);
    }

    #[test]
    fn v1_packed_projection_and_full_table() {
        // c2p|p2c, max_relative_positions 6: the whole 12-row table, gathered per layer.
        let g = traced("deberta-tiny-feature-extraction", "feature-extraction");
        assert!(has_init(&g, "layer.1.attention.self.in_proj.weight"));
        assert!(has_init(&g, "layer.1.attention.self.q_bias"));
        assert!(has_init(&g, "layer.1.attention.self.pos_proj.weight"));
        assert!(has_init(&g, "layer.1.attention.self.pos_q_proj.bias"));
        assert!(!has_init(&g, "query_proj") && !has_init(&g, "encoder.LayerNorm"));
        let counts = g.op_counts();
        assert_eq!(counts.get("Range"), Some(&1));
        assert_eq!(counts.get("Ceil"), None, "no bucketing in v1");
        assert_eq!(counts.get("GatherElements"), Some(&4));
        let table = g
            .initializers
            .iter()
            .find(|i| i.name.ends_with("rel_embeddings.weight"))
            .expect("table");
        assert_eq!(table.dims, [12, 32]);
    }

    fn dims(extra: &str) -> Result<DebertaDims, TraceError> {
        let json = format!(
            r#"{{"model_type":"deberta-v2","vocab_size":10,"hidden_size":8,"num_attention_heads":2,"intermediate_size":16,"num_hidden_layers":1,"relative_attention":true{extra}}}"#
        );
        DebertaDims::from_config(&ModelConfig::from_json(&json).expect("config"))
    }

    #[test]
    fn config_switches_and_rejections() -> Result<(), TraceError> {
        let d = dims(r#","pos_att_type":"P2C|c2p","max_relative_positions":-1"#)?;
        assert!(d.pos_att.c2p && d.pos_att.p2c);
        let r = d.relative.expect("relative");
        assert_eq!((r.max_relative, r.span, r.buckets), (512, 512, -1));
        let d = dims(r#","pos_att_type":["c2p"],"position_buckets":256"#)?;
        assert_eq!(d.pos_att.scale_factor(false), 2);
        assert_eq!(d.relative.map(|r| r.span), Some(256));
        for bad in [
            r#","conv_kernel_size":4"#,
            r#","conv_kernel_size":3,"conv_groups":3"#,
            r#","pos_att_type":"c2c""#,
            r#","pooler_hidden_size":4"#,
            r#","attention_head_size":3"#,
            r#","pooler_hidden_act":"mish""#,
            r#","model_type":"deberta","talking_head":true"#,
        ] {
            assert!(
                matches!(dims(bad), Err(TraceError::Unsupported(_))),
                "{bad}"
            );
        }
        Ok(())
    }
}
