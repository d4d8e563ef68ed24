//! GPT-2, as transformers' `modeling_gpt2.py` computes it, with optimum's key/value cache
//! interface for `text-generation-with-past`.

use ferry_ir::{Attr, DType, Dim, ModelConfig};

use crate::config::{flag, num_labels};
use crate::embeddings::arange_rows;
use crate::heads::{question_answering, token_classification};
use crate::layers::{Activation, WeightLayout, WeightSource, layer_norm, projection, scoped, sym};
use crate::{Request, T, TraceError, Tracer};

/// Tasks GPT-2 exports.
pub(crate) const GPT2_TASKS: &[&str] = &[
    "feature-extraction",
    "text-generation",
    "text-generation-with-past",
    "text-classification",
    "token-classification",
    "question-answering",
];

/// Name of the cache-length axis.
const PAST: &str = "past_sequence_length";
/// Name of the total (cache + new tokens) axis.
const TOTAL: &str = "past_sequence_length + sequence_length";

#[derive(Debug, Clone)]
struct Gpt2Dims {
    vocab: i64,
    hidden: i64,
    heads: i64,
    layers: i64,
    positions: i64,
    inner: i64,
    eps: f64,
    act: Activation,
    scale_weights: bool,
    scale_by_layer: bool,
}

fn int(c: &ModelConfig, key: &'static str) -> Result<i64, TraceError> {
    let v = c.raw.get(key).and_then(serde_json::Value::as_i64);
    c.require(v, key).map_err(TraceError::from)
}

impl Gpt2Dims {
    fn from_config(c: &ModelConfig) -> Result<Self, TraceError> {
        let hidden = int(c, "n_embd")?;
        let heads = int(c, "n_head")?;
        if hidden % heads != 0 {
            return Err(TraceError::Unsupported(format!(
                "n_embd {hidden} is not a multiple of n_head {heads}"
            )));
        }
        if flag(c, "add_cross_attention", false) {
            return Err(TraceError::Unsupported(
                "add_cross_attention (GPT-2 as a decoder of an encoder-decoder)".into(),
            ));
        }
        Ok(Self {
            vocab: c.require(c.vocab_size, "vocab_size")?,
            hidden,
            heads,
            layers: int(c, "n_layer")?,
            positions: int(c, "n_positions")?,
            inner: c
                .raw
                .get("n_inner")
                .and_then(serde_json::Value::as_i64)
                .unwrap_or(4 * hidden),
            eps: c
                .raw
                .get("layer_norm_epsilon")
                .and_then(serde_json::Value::as_f64)
                .unwrap_or(1e-5),
            act: Activation::parse(
                c.raw
                    .get("activation_function")
                    .and_then(serde_json::Value::as_str)
                    .unwrap_or("gelu_new"),
            )?,
            scale_weights: flag(c, "scale_attn_weights", true),
            scale_by_layer: flag(c, "scale_attn_by_inverse_layer_idx", false),
        })
    }
}

/// `Conv1D(nf, nx)`: `x @ W + b` with the checkpoint's `[in, out]` weight used as stored.
fn conv1d(
    t: &mut Tracer,
    w: &WeightSource<'_>,
    scope: &str,
    x: &T,
    nx: i64,
    nf: i64,
) -> Result<T, TraceError> {
    projection(t, w, scope, x, (nx, nf), WeightLayout::InOut)
}

/// Slices `[start, end)` of the last axis.
fn slice_last(t: &mut Tracer, x: &T, start: i64, end: i64) -> T {
    let s = t.ints(&[start]);
    let e = t.ints(&[end]);
    let a = t.ints(&[-1]);
    let mut shape = x.shape.clone();
    if let Some(last) = shape.last_mut() {
        *last = Dim::Fixed(end - start);
    }
    t.slice(x, &s, &e, &a, shape)
}

/// The scalar at `index` of a 1-D int64 tensor.
fn element(t: &mut Tracer, v: &T, index: i64) -> Result<T, TraceError> {
    let i = t.scalar_i64(index);
    t.gather(v, &i, 0)
}

/// The additive causal + padding mask `[batch, 1, seq, past+seq]`: 0 where query `i`
/// (absolute position `past + i`) may attend key `j` (`j <= past + i` and the key is not
/// padding), `finfo(float32).min` elsewhere, as transformers' `create_causal_mask` makes it.
fn causal_mask(
    t: &mut Tracer,
    attention_mask: &T,
    past_len: &T,
    seq: &Dim,
) -> Result<T, TraceError> {
    let mshape = t.shape_of(attention_mask);
    let total = element(t, &mshape, 1)?;
    let zero = t.scalar_i64(0);
    let one = t.scalar_i64(1);
    let total_dim = attention_mask.shape[1].clone();
    let kv = t.op(
        "Range",
        &[&zero, &total, &one],
        vec![],
        DType::I64,
        vec![total_dim.clone()],
    );
    let q = t.op(
        "Range",
        &[past_len, &total, &one],
        vec![],
        DType::I64,
        vec![seq.clone()],
    );
    let qc = t.unsqueeze(&q, &[1]);
    let later = t.op(
        "Greater",
        &[&kv, &qc],
        vec![],
        DType::Bool,
        vec![seq.clone(), total_dim.clone()],
    );
    let allowed = t.op("Not", &[&later], vec![], DType::Bool, later.shape.clone());
    let m = t.unsqueeze(attention_mask, &[1, 2]);
    let pad = t.cast(&m, DType::Bool, 9);
    let b = attention_mask.shape[0].clone();
    let ok = t.op(
        "And",
        &[&allowed, &pad],
        vec![],
        DType::Bool,
        vec![b, Dim::Fixed(1), seq.clone(), total_dim],
    );
    let zf = t.scalar_f32(0.0);
    let min = t.scalar_f32(f32::MIN);
    Ok(t.op(
        "Where",
        &[&ok, &zf, &min],
        vec![],
        DType::F32,
        ok.shape.clone(),
    ))
}

/// Output of one block's attention: the new hidden state and this layer's key/value
/// (after appending to the cache).
struct Attn {
    out: T,
    present: (T, T),
}

#[allow(clippy::too_many_arguments)]
fn attention(
    t: &mut Tracer,
    w: &WeightSource<'_>,
    d: &Gpt2Dims,
    layer: i64,
    x: &T,
    mask: &T,
    past: Option<(&T, &T)>,
) -> Result<Attn, TraceError> {
    let (h, heads) = (d.hidden, d.heads);
    let hd = h / heads;
    scoped(t, "attn", |t| {
        let qkv = conv1d(t, w, "c_attn", x, h, 3 * h)?;
        let split = |t: &mut Tracer, i: i64, perm: &[usize]| -> Result<T, TraceError> {
            let part = slice_last(t, &qkv, i * h, (i + 1) * h);
            let r = t.reshape(&part, &[0, 0, heads, hd])?;
            t.transpose(&r, perm)
        };
        let q = split(t, 0, &[0, 2, 1, 3])?;
        let mut k = split(t, 1, &[0, 2, 1, 3])?;
        let mut v = split(t, 2, &[0, 2, 1, 3])?;
        if let Some((pk, pv)) = past {
            let mut shape = k.shape.clone();
            shape[2] = Dim::sym(TOTAL);
            k = t.op(
                "Concat",
                &[pk, &k],
                vec![("axis", Attr::Int(2))],
                DType::F32,
                shape.clone(),
            );
            v = t.op(
                "Concat",
                &[pv, &v],
                vec![("axis", Attr::Int(2))],
                DType::F32,
                shape,
            );
        }
        let kt = t.transpose(&k, &[0, 1, 3, 2])?;
        let scores = t.matmul(&q, &kt)?;
        let mut scale = 1.0f64;
        if d.scale_weights {
            scale = (hd as f64).powf(-0.5);
        }
        if d.scale_by_layer {
            scale /= (layer + 1) as f64;
        }
        let s = t.scalar_f32(scale as f32);
        let scores = t.mul(&scores, &s)?;
        let scores = t.add(&scores, mask)?;
        let probs = t.softmax_last(&scores);
        let ctx = t.matmul(&probs, &v)?;
        let ctx = t.transpose(&ctx, &[0, 2, 1, 3])?;
        let ctx = t.reshape(&ctx, &[0, 0, h])?;
        let out = conv1d(t, w, "c_proj", &ctx, h, h)?;
        Ok(Attn {
            out,
            present: (k, v),
        })
    })
}

fn mlp(t: &mut Tracer, w: &WeightSource<'_>, d: &Gpt2Dims, x: &T) -> Result<T, TraceError> {
    scoped(t, "mlp", |t| {
        let a = conv1d(t, w, "c_fc", x, d.hidden, d.inner)?;
        let a = d.act.apply(t, &a)?;
        conv1d(t, w, "c_proj", &a, d.inner, d.hidden)
    })
}

/// Traces GPT-2 for `task`.
pub(crate) fn build(t: &mut Tracer, r: &Request<'_>) -> Result<(), TraceError> {
    let (config, weights, opts, task) = (r.config, r.weights, r.opts, r.task);
    let d = Gpt2Dims::from_config(config)?;
    let w = WeightSource::new(weights, "transformer");
    let h = d.hidden;
    let hd = h / d.heads;
    let (b, s) = (sym(&opts.batch_axis), sym(&opts.sequence_axis));
    let with_past = task == "text-generation-with-past";
    let with_positions = matches!(
        task,
        "feature-extraction" | "text-generation" | "text-generation-with-past"
    );

    let ids = t.input("input_ids", DType::I64, vec![b.clone(), s.clone()]);
    let mask_len = if with_past {
        Dim::sym(TOTAL)
    } else {
        s.clone()
    };
    let attention_mask = t.input("attention_mask", DType::I64, vec![b.clone(), mask_len]);
    let position_ids = if with_positions {
        Some(t.input("position_ids", DType::I64, vec![b.clone(), s.clone()]))
    } else {
        None
    };
    let mut past = Vec::new();
    if with_past {
        let shape = vec![
            b.clone(),
            Dim::Fixed(d.heads),
            Dim::sym(PAST),
            Dim::Fixed(hd),
        ];
        for i in 0..d.layers {
            let k = t.input(
                &format!("past_key_values.{i}.key"),
                DType::F32,
                shape.clone(),
            );
            let v = t.input(
                &format!("past_key_values.{i}.value"),
                DType::F32,
                shape.clone(),
            );
            past.push((k, v));
        }
    }

    let wte = w.get(t, "wte.weight", &[d.vocab, h])?;
    let wpe = w.get(t, "wpe.weight", &[d.positions, h])?;
    let tok = t.gather(&wte, &ids, 0)?;
    let pos = match &position_ids {
        Some(p) => t.gather(&wpe, p, 0)?,
        None => arange_rows(t, &wpe, &ids, h),
    };
    let mut x = t.add(&tok, &pos)?;

    let past_len = match past.first() {
        Some((k, _)) => {
            let ks = t.shape_of(k);
            element(t, &ks, 2)?
        }
        None => t.scalar_i64(0),
    };
    let mask = causal_mask(t, &attention_mask, &past_len, &s)?;

    let mut presents = Vec::new();
    t.push("h");
    for i in 0..d.layers {
        t.push(i.to_string());
        let layer_past = past.get(i as usize).map(|(k, v)| (k, v));
        let r = (|| {
            let a = layer_norm(t, &w, "ln_1", &x, h, d.eps)?;
            let attn = attention(t, &w, &d, i, &a, &mask, layer_past)?;
            let x1 = t.add(&attn.out, &x)?;
            let m = layer_norm(t, &w, "ln_2", &x1, h, d.eps)?;
            let m = mlp(t, &w, &d, &m)?;
            Ok::<_, TraceError>((t.add(&m, &x1)?, attn.present))
        })();
        t.pop();
        match r {
            Ok((nx, present)) => {
                x = nx;
                presents.push(present);
            }
            Err(e) => {
                t.pop();
                return Err(e);
            }
        }
    }
    t.pop();
    let x = layer_norm(t, &w, "ln_f", &x, h, d.eps)?;

    match task {
        "feature-extraction" => t.output(&x, "last_hidden_state"),
        "text-generation" | "text-generation-with-past" => {
            let logits = scoped(t, "lm_head", |t| {
                let wt = t.transpose(&wte, &[1, 0])?;
                t.matmul(&x, &wt)
            })?;
            t.output(&logits, "logits");
            if with_past {
                for (i, (k, v)) in presents.iter().enumerate() {
                    t.output(k, &format!("present.{i}.key"));
                    t.output(v, &format!("present.{i}.value"));
                }
            }
        }
        "token-classification" => token_classification(t, &w, config, &x, h)?,
        "question-answering" => question_answering(t, &w, &x, h)?,
        "text-classification" => {
            let n = num_labels(config);
            let logits = scoped(t, "score", |t| {
                let path = t.module_path();
                let wt = w.get(t, &format!("{path}.weight"), &[n, h])?;
                let wtt = t.transpose(&wt, &[1, 0])?;
                t.matmul(&x, &wtt)
            })?;
            let pooled = last_token(t, config, &ids, &logits, n)?;
            t.output(&pooled, "logits");
        }
        other => {
            return Err(TraceError::UnsupportedTask {
                task: other.to_string(),
                model_type: config.model_type.clone(),
                supported: GPT2_TASKS.join(", "),
            });
        }
    }
    Ok(())
}

/// Logits at each row's last non-padding token (`GPT2ForSequenceClassification`): the
/// rightmost position whose id is not `pad_token_id`, or the last position without one.
fn last_token(
    t: &mut Tracer,
    config: &ModelConfig,
    ids: &T,
    logits: &T,
    n: i64,
) -> Result<T, TraceError> {
    let b = ids.shape[0].clone();
    let index = match config.pad_token_id {
        Some(pad) => {
            let p = t.scalar_i64(pad);
            let is_pad = t.op("Equal", &[ids, &p], vec![], DType::Bool, ids.shape.clone());
            let not_pad = t.op("Not", &[&is_pad], vec![], DType::Bool, ids.shape.clone());
            let np = t.cast(&not_pad, DType::I64, 7);
            let shape = t.shape_of(ids);
            let len = element(t, &shape, 1)?;
            let zero = t.scalar_i64(0);
            let one = t.scalar_i64(1);
            let idx = t.op(
                "Range",
                &[&zero, &len, &one],
                vec![],
                DType::I64,
                vec![ids.shape[1].clone()],
            );
            let weighted = t.mul(&np, &idx)?;
            t.op(
                "ArgMax",
                &[&weighted],
                vec![("axis", Attr::Int(1)), ("keepdims", Attr::Int(1))],
                DType::I64,
                vec![b.clone(), Dim::Fixed(1)],
            )
        }
        None => {
            let shape = t.shape_of(ids);
            let len = element(t, &shape, 1)?;
            let one = t.scalar_i64(1);
            let last = t.sub(&len, &one)?;
            let ones = t.op(
                "Expand",
                &[&last, &shape],
                vec![],
                DType::I64,
                ids.shape.clone(),
            );
            let zero = t.ints(&[0]);
            let onei = t.ints(&[1]);
            let axis = t.ints(&[1]);
            t.slice(&ones, &zero, &onei, &axis, vec![b.clone(), Dim::Fixed(1)])
        }
    };
    // [b, 1] → [b, 1, n] → gather along the sequence axis → [b, n]
    let idx = t.unsqueeze(&index, &[2]);
    let target = {
        let ls = t.shape_of(logits);
        let zero = t.ints(&[0]);
        let one = t.ints(&[1]);
        let bdim = t.slice(&ls, &zero, &one, &zero, vec![Dim::Fixed(1)]);
        let rest = t.ints(&[1, n]);
        t.op(
            "Concat",
            &[&bdim, &rest],
            vec![("axis", Attr::Int(0))],
            DType::I64,
            vec![Dim::Fixed(3)],
        )
    };
    let idx = t.op(
        "Expand",
        &[&idx, &target],
        vec![],
        DType::I64,
        vec![b.clone(), Dim::Fixed(1), Dim::Fixed(n)],
    );
    let g = t.op(
        "GatherElements",
        &[logits, &idx],
        vec![("axis", Attr::Int(1))],
        DType::F32,
        vec![b.clone(), Dim::Fixed(1), Dim::Fixed(n)],
    );
    t.reshape(&g, &[0, n])
}
