//! sentence-transformers' modules after the transformer, appended to a feature-extraction
//! graph as the `sentence_embedding` output: `Pooling` (its modes concatenated), `Dense`
//! layers, `Normalize`, following sentence-transformers' `Pooling._forward_padded`,
//! `Dense.forward` and `Normalize.forward` (`F.normalize(x, p=2, dim=-1)`).
//!
//! Pooling runs in float32 (sentence-transformers accumulates half-precision states in
//! float32) and its result is cast to the compute dtype. Selecting one token (cls,
//! lasttoken) multiplies by a one-hot row and sums, which is exact.

use ferry_ir::{Attr, DType, Dim, PoolingMode, SentenceDense, SentenceModules, Weights};

use crate::layers::{Activation, HeadActivation, WeightLayout, WeightSource, dense, scoped};
use crate::{T, TraceError, Tracer};

/// The output the pooled (dense, normalized) sentence vector is written to.
pub(crate) const OUTPUT: &str = "sentence_embedding";

/// Appends `st` after the traced `last_hidden_state` output and marks `sentence_embedding`.
pub(crate) fn append(
    t: &mut Tracer,
    st: &SentenceModules,
    weights: &Weights,
) -> Result<(), TraceError> {
    let missing = |what: &str| {
        TraceError::Unsupported(format!(
            "sentence-transformers pooling needs the graph's {what}"
        ))
    };
    let x = t
        .output_named("last_hidden_state")
        .ok_or_else(|| missing("`last_hidden_state` output"))?;
    let mask = t
        .input_named("attention_mask")
        .ok_or_else(|| missing("`attention_mask` input"))?;
    if x.rank() != 3 || mask.rank() != 2 || x.shape[1] != mask.shape[1] {
        return Err(TraceError::Unsupported(
            "sentence-transformers pooling over a graph whose attention_mask does not cover exactly its tokens (a decoder with a cache)".into(),
        ));
    }
    let hidden = x.shape[2]
        .fixed()
        .ok_or_else(|| missing("fixed hidden size"))?;
    if let Some(d) = st.embedding_dimension
        && d != hidden
    {
        return Err(TraceError::Unsupported(format!(
            "1_Pooling's embedding_dimension {d} differs from the model's hidden size {hidden}"
        )));
    }
    let (mut v, mut width) = scoped(t, "pooling", |t| pooled(t, st, &x, &mask, hidden))?;
    let w = WeightSource::new(weights, "");
    for d in &st.dense {
        (v, width) = (dense_module(t, &w, d, &v, width)?, d.out_features);
    }
    if st.normalize {
        v = scoped(t, "normalize", |t| l2_normalize(t, &v))?;
    }
    t.output(&v, OUTPUT);
    Ok(())
}

/// `ReduceSum`/`ReduceMax` over one axis (axes as an input from opset 13 for ReduceSum,
/// 18 for the others).
fn reduce(t: &mut Tracer, op: &str, x: &T, axis: usize, keep: bool) -> T {
    let mut shape = x.shape.clone();
    if keep {
        shape[axis] = Dim::Fixed(1);
    } else {
        shape.remove(axis);
    }
    let keepdims = ("keepdims", Attr::Int(i64::from(keep)));
    if t.opset() >= if op == "ReduceSum" { 13 } else { 18 } {
        let axes = t.ints(&[axis as i64]);
        t.op(op, &[x, &axes], vec![keepdims], x.dtype, shape)
    } else {
        let axes = ("axes", Attr::Ints(vec![axis as i64]));
        t.op(op, &[x], vec![axes, keepdims], x.dtype, shape)
    }
}

/// `Max(x, eps)`: torch's `clamp(x, min=eps)`.
fn clamp_min(t: &mut Tracer, x: &T, eps: f32) -> Result<T, TraceError> {
    let e = t.scalar_f32(eps);
    let shape = x.shape.clone();
    Ok(t.op("Max", &[x, &e], vec![], x.dtype, shape))
}

/// The `[batch, seq, 1]` rows `weights` (float32 `[batch, seq]`) select, summed over the
/// sequence: `(x * weights[..., None]).sum(1)`.
fn weighted_sum(t: &mut Tracer, x: &T, weights: &T) -> Result<T, TraceError> {
    let w = t.unsqueeze(weights, &[2]);
    let p = t.mul(x, &w)?;
    Ok(reduce(t, "ReduceSum", &p, 1, false))
}

/// One-hot `[batch, seq]` float32 rows with 1 at `index` (`[batch, 1]` int64).
fn one_hot(t: &mut Tracer, positions: &T, index: &T) -> T {
    let shape = vec![index.shape[0].clone(), positions.shape[0].clone()];
    let eq = t.op("Equal", &[positions, index], vec![], DType::Bool, shape);
    t.cast(&eq, DType::F32, 1)
}

/// `ArgMax(x, axis=1, keepdims=1)`: the first position of each row's maximum.
fn argmax_rows(t: &mut Tracer, x: &T) -> T {
    let shape = vec![x.shape[0].clone(), Dim::Fixed(1)];
    t.op(
        "ArgMax",
        &[x],
        vec![("axis", Attr::Int(1)), ("keepdims", Attr::Int(1))],
        DType::I64,
        shape,
    )
}

/// The pooling modes over `x` (`[batch, seq, hidden]`), concatenated; with its width.
fn pooled(
    t: &mut Tracer,
    st: &SentenceModules,
    x: &T,
    mask: &T,
    hidden: i64,
) -> Result<(T, i64), TraceError> {
    let x32 = if x.dtype == DType::F32 {
        x.clone()
    } else {
        t.cast(x, DType::F32, 1)
    };
    let m = t.cast(mask, DType::F32, 1);
    let positions = crate::causal::column_range(t, mask)?;
    let one = t.scalar_i64(1);
    let mut parts = Vec::new();
    // The masked sum and token count, shared by mean and mean_sqrt_len_tokens.
    let mut mean_parts: Option<(T, T)> = None;
    for &mode in &st.pooling {
        let v = match mode {
            PoolingMode::Cls => {
                let first = argmax_rows(t, &m);
                let sel = one_hot(t, &positions, &first);
                weighted_sum(t, &x32, &sel)?
            }
            PoolingMode::LastToken => {
                // The last attended position: the maximum of mask * (position + 1); the
                // gathered row is the masked state, zero for a row without tokens.
                let pos1 = t.add(&positions, &one)?;
                let pos1 = t.cast(&pos1, DType::F32, 1);
                let ranked = t.mul(&m, &pos1)?;
                let last = argmax_rows(t, &ranked);
                let sel = one_hot(t, &positions, &last);
                let sel = t.mul(&sel, &m)?;
                weighted_sum(t, &x32, &sel)?
            }
            PoolingMode::Max => {
                let z = t.scalar_i64(0);
                let shape = mask.shape.clone();
                let off = t.op("Equal", &[mask, &z], vec![], DType::Bool, shape);
                let off = t.unsqueeze(&off, &[2]);
                let ninf = t.scalar_f32(f32::NEG_INFINITY);
                let shape = x32.shape.clone();
                let filled = t.op("Where", &[&off, &ninf, &x32], vec![], DType::F32, shape);
                reduce(t, "ReduceMax", &filled, 1, false)
            }
            PoolingMode::Mean | PoolingMode::MeanSqrtLen => {
                let (sum, count) = match &mean_parts {
                    Some(p) => p.clone(),
                    None => {
                        let sum = weighted_sum(t, &x32, &m)?;
                        let count = reduce(t, "ReduceSum", &m, 1, true);
                        let count = clamp_min(t, &count, 1e-9)?;
                        mean_parts.insert((sum, count)).clone()
                    }
                };
                let denominator = if mode == PoolingMode::Mean {
                    count
                } else {
                    t.unary("Sqrt", &count)
                };
                t.div(&sum, &denominator)?
            }
            PoolingMode::WeightedMean => {
                // Position weights 1, 2, … from each row's first attended token.
                let start = argmax_rows(t, &m);
                let pos1 = t.add(&positions, &one)?;
                let w = t.sub(&pos1, &start)?;
                let w = t.cast(&w, DType::F32, 1);
                let wm = t.mul(&m, &w)?;
                let sum = weighted_sum(t, &x32, &wm)?;
                let total = reduce(t, "ReduceSum", &wm, 1, true);
                let total = clamp_min(t, &total, 1e-9)?;
                t.div(&sum, &total)?
            }
        };
        parts.push(v);
    }
    let width = hidden * parts.len() as i64;
    let v = if parts.len() == 1 {
        parts.remove(0)
    } else {
        let refs: Vec<&T> = parts.iter().collect();
        let shape = vec![x.shape[0].clone(), Dim::Fixed(width)];
        t.op(
            "Concat",
            &refs,
            vec![("axis", Attr::Int(-1))],
            DType::F32,
            shape,
        )
    };
    Ok((t.cast_to_float(&v), width))
}

/// The activation of a `Dense` module, by the class name sentence-transformers saves.
fn dense_activation(name: &str) -> Result<HeadActivation, TraceError> {
    Ok(match name.rsplit('.').next().unwrap_or("") {
        "Identity" => HeadActivation::Identity,
        "Tanh" => HeadActivation::Tanh,
        "ReLU" => HeadActivation::Act(Activation::Relu),
        "GELU" => HeadActivation::Act(Activation::GeluErf),
        "SiLU" => HeadActivation::Act(Activation::Silu),
        _ => {
            return Err(TraceError::Unsupported(format!(
                "Dense activation_function `{name}` (supported: Identity, Tanh, ReLU, GELU, SiLU)"
            )));
        }
    })
}

/// One `Dense` module over the `[batch, width]` vector `x`.
fn dense_module(
    t: &mut Tracer,
    w: &WeightSource<'_>,
    d: &SentenceDense,
    x: &T,
    width: i64,
) -> Result<T, TraceError> {
    if d.in_features != width {
        return Err(TraceError::Unsupported(format!(
            "{}: in_features {} but the vector before it has {width} values",
            d.weight_prefix, d.in_features
        )));
    }
    let act = dense_activation(&d.activation)?;
    let features = (d.in_features, d.out_features);
    let scope = |name: &str| format!("{}.{name}", d.weight_prefix);
    let y = dense(
        t,
        w,
        &scope("linear"),
        x,
        features,
        WeightLayout::OutIn,
        d.bias,
    )?;
    let y = act.apply(t, y)?;
    if !d.residual {
        return Ok(y);
    }
    let r = if d.in_features == d.out_features {
        x.clone()
    } else {
        dense(
            t,
            w,
            &scope("residual"),
            x,
            features,
            WeightLayout::OutIn,
            false,
        )?
    };
    t.add(&y, &r)
}

/// `F.normalize(x, p=2, dim=-1)`: `x / max(‖x‖₂, 1e-12)`.
fn l2_normalize(t: &mut Tracer, x: &T) -> Result<T, TraceError> {
    let sq = t.mul(x, x)?;
    let last = x.rank() - 1;
    let ss = reduce(t, "ReduceSum", &sq, last, true);
    let norm = t.unary("Sqrt", &ss);
    let eps = t.scalar(1e-12);
    let shape = norm.shape.clone();
    let norm = t.op("Max", &[&norm, &eps], vec![], norm.dtype, shape);
    t.div(x, &norm)
}

#[cfg(test)]
mod tests {
    use ferry_ir::Graph;

    use crate::{TraceError, TraceOptions, trace};

    fn traced(case: &str, edit: impl FnOnce(&mut TraceOptions)) -> Result<Graph, TraceError> {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../testdata")
            .join(case);
        let c = ferry_loader::load(&dir).expect("load");
        let mut opts = TraceOptions {
            sentence: c.sentence.clone(),
            ..Default::default()
        };
        edit(&mut opts);
        trace(&c.config, &c.weights, &opts)
    }

    fn outputs(g: &Graph) -> Vec<&str> {
        g.outputs.iter().map(|v| v.name.as_str()).collect()
    }

    #[test]
    fn sentence_embedding_only_for_feature_extraction() -> Result<(), TraceError> {
        let g = traced("st-bert-tiny-cls-dense", |_| {})?;
        assert_eq!(
            outputs(&g),
            ["last_hidden_state", "pooler_output", "sentence_embedding"]
        );
        // The Dense weights come from 2_Dense/, under the module's folder name.
        assert!(
            g.initializers
                .iter()
                .any(|i| i.name == "2_Dense.linear.weight")
        );
        let g = traced("st-bert-tiny-cls-dense", |o| o.token_embeddings_name = true)?;
        assert_eq!(
            outputs(&g),
            ["token_embeddings", "pooler_output", "sentence_embedding"]
        );
        assert!(
            g.nodes
                .iter()
                .all(|n| !n.outputs.iter().any(|o| o == "last_hidden_state"))
        );
        // Without the modules: token states only.
        let g = traced("st-bert-tiny-cls-dense", |o| o.sentence = None)?;
        assert_eq!(outputs(&g), ["last_hidden_state", "pooler_output"]);
        Ok(())
    }

    #[test]
    fn dense_modules_ferry_cannot_compute_are_errors() {
        let unsupported = |edit: fn(&mut ferry_ir::SentenceDense)| {
            let r = traced("st-bert-tiny-cls-dense", |o| {
                if let Some(st) = o.sentence.as_mut() {
                    edit(&mut st.dense[0]);
                }
            });
            match r {
                Err(TraceError::Unsupported(m)) => m,
                other => panic!("expected an unsupported-config error, got {other:?}"),
            }
        };
        let m = unsupported(|d| d.activation = "torch.nn.modules.activation.Sigmoid".into());
        assert!(m.contains("Dense activation_function"), "{m}");
        let m = unsupported(|d| d.in_features = 7);
        assert!(
            m.contains("in_features 7 but the vector before it has 16"),
            "{m}"
        );
    }
}
