//! Two models on the same inputs: how closely a transformed model (quantized, float16)
//! follows its float32 reference, per output.

use std::collections::BTreeMap;

use crate::{F32Tensor, Golden, Input, Model, VerifyError};

/// How one output of a candidate model agrees with the reference model's.
#[derive(Debug, Clone, PartialEq)]
pub struct Agreement {
    /// Output name.
    pub name: String,
    /// Shape (the reference's; a shape mismatch is an error).
    pub shape: Vec<i64>,
    /// Cosine similarity of the two outputs taken as flat vectors (1 when both are zero).
    pub cosine: f64,
    /// Largest absolute difference.
    pub max_abs: f64,
    /// For classification heads (see [`is_classification_output`]): rows (all axes but the
    /// last) whose argmax over the last axis is the same, and the number of rows.
    pub argmax: Option<(usize, usize)>,
}

impl Agreement {
    /// Fraction of rows whose argmax agrees, for classification heads.
    pub fn argmax_rate(&self) -> Option<f64> {
        self.argmax.map(|(same, rows)| {
            if rows == 0 {
                1.0
            } else {
                same as f64 / rows as f64
            }
        })
    }
}

/// Whether an output is a classification head's scores, compared by argmax: `logits`,
/// `start_logits`, `end_logits`.
pub fn is_classification_output(name: &str) -> bool {
    matches!(name, "logits" | "start_logits" | "end_logits")
}

/// A golden file's inputs as a mixed-type feed for [`Model::run_inputs`].
pub fn golden_inputs(golden: &Golden) -> BTreeMap<String, Input> {
    golden
        .inputs
        .iter()
        .map(|(k, v)| (k.clone(), Input::I64(v.clone())))
        .collect()
}

/// Runs `reference` and `candidate` on `inputs` and compares every float output of the
/// reference with the candidate's output of the same name.
pub fn compare_models(
    reference: &mut Model,
    candidate: &mut Model,
    inputs: &BTreeMap<String, Input>,
) -> Result<Vec<Agreement>, VerifyError> {
    let want = reference.run_inputs(inputs)?;
    let got = candidate.run_inputs(inputs)?;
    compare_outputs(&want, &got)
}

/// Compares every output of a reference run with the candidate's output of the same name
/// (what [`compare_models`] does once both have run).
pub fn compare_outputs(
    want: &BTreeMap<String, F32Tensor>,
    got: &BTreeMap<String, F32Tensor>,
) -> Result<Vec<Agreement>, VerifyError> {
    let mut out = Vec::new();
    for (name, r) in want {
        let Some(c) = got.get(name) else {
            return Err(VerifyError::Check(format!(
                "the compared model has no output `{name}`"
            )));
        };
        if c.shape != r.shape {
            return Err(VerifyError::Check(format!(
                "output `{name}` has shape {:?}, the reference {:?}",
                c.shape, r.shape
            )));
        }
        let argmax = is_classification_output(name).then(|| {
            let cols = r.shape.last().copied().unwrap_or(1).max(1) as usize;
            let rows = r.data.len() / cols;
            let same = r
                .data
                .chunks_exact(cols)
                .zip(c.data.chunks_exact(cols))
                .filter(|(a, b)| argmax(a) == argmax(b))
                .count();
            (same, rows)
        });
        out.push(Agreement {
            name: name.clone(),
            shape: r.shape.clone(),
            cosine: cosine(&r.data, &c.data),
            max_abs: max_abs(&r.data, &c.data),
            argmax,
        });
    }
    Ok(out)
}

/// Cosine similarity of two equally long vectors, in float64; 1 when both are all zero,
/// 0 when only one is; NaN inputs give NaN.
pub fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let (mut dot, mut na, mut nb) = (0f64, 0f64, 0f64);
    for (&x, &y) in a.iter().zip(b) {
        let (x, y) = (f64::from(x), f64::from(y));
        dot += x * y;
        na += x * x;
        nb += y * y;
    }
    if na == 0.0 && nb == 0.0 {
        1.0
    } else if na == 0.0 || nb == 0.0 {
        0.0
    } else {
        dot / (na.sqrt() * nb.sqrt())
    }
}

fn max_abs(a: &[f32], b: &[f32]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(&x, &y)| {
            let d = (f64::from(x) - f64::from(y)).abs();
            if d.is_nan() { f64::INFINITY } else { d }
        })
        .fold(0.0, f64::max)
}

/// Index of the largest value (the first of equal ones; NaN never wins).
pub fn argmax(v: &[f32]) -> usize {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] || v[best].is_nan() {
            best = i;
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cosine_and_argmax() {
        assert!((cosine(&[1.0, 0.0], &[1.0, 0.0]) - 1.0).abs() < 1e-12);
        assert!(cosine(&[1.0, 0.0], &[0.0, 2.0]).abs() < 1e-12);
        assert!((cosine(&[1.0, 1.0], &[-1.0, -1.0]) + 1.0).abs() < 1e-12);
        assert_eq!(cosine(&[0.0], &[0.0]), 1.0);
        assert_eq!(cosine(&[0.0], &[1.0]), 0.0);
        assert_eq!(argmax(&[0.1, 0.7, 0.7, -1.0]), 1);
        assert_eq!(argmax(&[f32::NAN, 0.5]), 1);
        assert_eq!(max_abs(&[1.0, 2.0], &[1.5, 1.0]), 1.0);
        assert!(is_classification_output("start_logits"));
        assert!(!is_classification_output("last_hidden_state"));
    }
}
