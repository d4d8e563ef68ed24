//! What every decoder-only architecture shares: optimum's inputs and key/value cache
//! interface (names, axes), the causal (optionally sliding-window) attention mask over
//! cache positions, appending to the cache, and the last-non-padding-token pooling of
//! `…ForSequenceClassification`.

use ferry_ir::{Attr, DType, Dim, ModelConfig};

use crate::layers::sym;
use crate::{T, TraceError, TraceOptions, Tracer};

/// Name of the cache-length axis.
pub(crate) const PAST: &str = "past_sequence_length";
/// Name of the total (cache + new tokens) axis.
pub(crate) const TOTAL: &str = "past_sequence_length + sequence_length";

/// The graph inputs of a decoder: `input_ids`, `attention_mask` (over cache + new tokens
/// with past), `position_ids` where optimum declares them, and one
/// `past_key_values.{i}.key/value` pair per layer for `text-generation-with-past`.
pub(crate) struct DecoderInputs {
    /// `input_ids` `[batch, seq]`.
    pub ids: T,
    /// `attention_mask` `[batch, seq]`, or `[batch, past + seq]` with a cache.
    pub attention_mask: T,
    /// `position_ids` `[batch, seq]` (feature-extraction and generation tasks).
    pub position_ids: Option<T>,
    /// The cache, per layer: key and value `[batch, kv_heads, past, head_dim]`.
    pub past: Vec<(T, T)>,
}

impl DecoderInputs {
    /// Declares the inputs optimum's decoder exports take for `task`; the cache has
    /// `layers` layers of `[batch, kv_heads, past_sequence_length, head_dim]` tensors of
    /// the compute dtype.
    pub(crate) fn declare(
        t: &mut Tracer,
        opts: &TraceOptions,
        task: &str,
        (layers, kv_heads, head_dim): (i64, i64, i64),
    ) -> Self {
        let (b, s) = (sym(&opts.batch_axis), sym(&opts.sequence_axis));
        let with_past = task == "text-generation-with-past";
        let ids = t.input("input_ids", DType::I64, vec![b.clone(), s.clone()]);
        let mask_len = if with_past { sym(TOTAL) } else { s.clone() };
        let attention_mask = t.input("attention_mask", DType::I64, vec![b.clone(), mask_len]);
        let position_ids = matches!(
            task,
            "feature-extraction" | "text-generation" | "text-generation-with-past"
        )
        .then(|| t.input("position_ids", DType::I64, vec![b.clone(), s]));
        let mut past = Vec::new();
        if with_past {
            let float = t.float_dtype();
            let shape = vec![b, Dim::Fixed(kv_heads), sym(PAST), Dim::Fixed(head_dim)];
            for i in 0..layers {
                let k = t.input(&format!("past_key_values.{i}.key"), float, shape.clone());
                let v = t.input(&format!("past_key_values.{i}.value"), float, shape.clone());
                past.push((k, v));
            }
        }
        Self {
            ids,
            attention_mask,
            position_ids,
            past,
        }
    }

    /// The cache length as a scalar int64 (0 without a cache).
    pub(crate) fn past_length(&self, t: &mut Tracer) -> Result<T, TraceError> {
        match self.past.first() {
            Some((k, _)) => {
                let ks = t.shape_of(k);
                element(t, &ks, 2)
            }
            None => Ok(t.scalar_i64(0)),
        }
    }

    /// The cache of layer `i`, if any.
    pub(crate) fn layer_past(&self, i: i64) -> Option<(&T, &T)> {
        self.past.get(i as usize).map(|(k, v)| (k, v))
    }
}

/// `arange(x.shape[1])`: the column indices of a `[batch, n]` tensor, `[n]` int64.
pub(crate) fn column_range(t: &mut Tracer, x: &T) -> Result<T, TraceError> {
    let shape = t.shape_of(x);
    let len = element(t, &shape, 1)?;
    let zero = t.scalar_i64(0);
    let one = t.scalar_i64(1);
    Ok(t.op(
        "Range",
        &[&zero, &len, &one],
        vec![],
        DType::I64,
        vec![x.shape[1].clone()],
    ))
}

/// Declares each layer's `(key, value)` as the `present.{i}.key/value` outputs.
pub(crate) fn present_outputs(t: &mut Tracer, presents: &[(T, T)]) {
    for (i, (k, v)) in presents.iter().enumerate() {
        t.output(k, &format!("present.{i}.key"));
        t.output(v, &format!("present.{i}.value"));
    }
}

/// The scalar at `index` of a 1-D int64 tensor.
pub(crate) fn element(t: &mut Tracer, v: &T, index: i64) -> Result<T, TraceError> {
    let i = t.scalar_i64(index);
    t.gather(v, &i, 0)
}

/// `(key, value)` of `[batch, heads, seq, head_dim]` appended to the layer's cache along
/// the sequence axis (the cache's `update`); returned unchanged without a cache.
pub(crate) fn append_cache(t: &mut Tracer, past: Option<(&T, &T)>, k: T, v: T) -> (T, T) {
    append_cache_as(t, past, k, v, TOTAL)
}

/// [`append_cache`] with the appended axis named `total` (an encoder-decoder's decoder
/// names its cache axes after the decoder's sequence).
pub(crate) fn append_cache_as(
    t: &mut Tracer,
    past: Option<(&T, &T)>,
    k: T,
    v: T,
    total: &str,
) -> (T, T) {
    let Some((pk, pv)) = past else {
        return (k, v);
    };
    let mut shape = k.shape.clone();
    shape[2] = sym(total);
    let cat = |t: &mut Tracer, a: &T, b: &T| {
        t.op(
            "Concat",
            &[a, b],
            vec![("axis", Attr::Int(2))],
            b.dtype,
            shape.clone(),
        )
    };
    let k = cat(t, pk, &k);
    let v = cat(t, pv, &v);
    (k, v)
}

/// The additive causal + padding mask `[batch, 1, seq, past+seq]`: 0 where query `i`
/// (cache position `past + i`) may attend key `j` (`j <= past + i`, the key is not
/// padding and, with a `window`, `j > past + i - window`), `finfo(float32).min`
/// elsewhere, as transformers' `create_causal_mask` / `create_sliding_window_causal_mask`
/// make it for eager attention; always float32.
pub(crate) fn causal_mask(
    t: &mut Tracer,
    attention_mask: &T,
    past_len: &T,
    seq: &Dim,
    window: Option<i64>,
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
    let grid = vec![seq.clone(), total_dim.clone()];
    let later = t.op("Greater", &[&kv, &qc], vec![], DType::Bool, grid.clone());
    let mut allowed = t.op("Not", &[&later], vec![], DType::Bool, grid.clone());
    if let Some(w) = window {
        // kv > q - window
        let wt = t.scalar_i64(w);
        let lo = t.sub(&qc, &wt)?;
        let inside = t.op("Greater", &[&kv, &lo], vec![], DType::Bool, grid.clone());
        allowed = t.op("And", &[&allowed, &inside], vec![], DType::Bool, grid);
    }
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
    // Float32 whatever the compute dtype: half-precision graphs add it to their scores in
    // float32 (see the decoder's attention), where finfo(float32).min absorbs a fully
    // masked row's scores exactly as finfo(float16).min does in float16.
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

/// Logits at each row's last non-padding token (`…ForSequenceClassification` of the
/// decoders): the rightmost position whose id is not `pad_token_id`, or the last position
/// without one. `logits` is `[batch, seq, n]`; the result `[batch, n]`.
pub(crate) fn last_token(
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
            // transformers' dtypes: the non-padding mask and the token indices int32
            // (tract's ArgMax cannot take the int64 range it derives from a shape).
            let np = t.cast(&not_pad, DType::I32, 6);
            let idx = column_range(t, ids)?;
            let idx = t.cast(&idx, DType::I32, 6);
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
        logits.dtype,
        vec![b.clone(), Dim::Fixed(1), Dim::Fixed(n)],
    );
    t.reshape(&g, &[0, n])
}
