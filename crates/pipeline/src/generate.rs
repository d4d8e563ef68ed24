//! Greedy generation over optimum's decoder interface, as transformers' `generate` does it
//! with `do_sample=False`: a left-padded batch, `position_ids` from the attention mask
//! (`cumsum(mask) - 1`, padding at 1), the cache's `present.*` fed back as
//! `past_key_values.*` (or, for an export without a cache, the whole sequence again), each
//! row stopping at an end-of-sequence id and padded after it.

use std::collections::BTreeMap;

use ferry_verifier::{F32Tensor, I64Tensor, Input, Model, VerifyError};

/// How to generate.
#[derive(Debug, Clone)]
pub struct GenerationConfig {
    /// At most this many new tokens per row.
    pub max_new_tokens: usize,
    /// A row stops after producing any of these (`eos_token_id`, a list in many configs).
    pub eos_token_ids: Vec<i64>,
    /// The id left padding and finished rows are filled with.
    pub pad_token_id: i64,
    /// When the sequence (padding included) first reaches this length while the cache
    /// holds at most `reset_cache_at - 1` positions, the cache is dropped and the whole
    /// sequence fed again: Phi-3's `prepare_inputs_for_generation` does this at
    /// `original_max_position_embeddings + 1`, where LongRoPE switches to its long factors.
    pub reset_cache_at: Option<usize>,
}

/// Why generation failed.
#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    /// ONNX Runtime failed.
    #[error(transparent)]
    Model(#[from] VerifyError),
    /// The model declares an input generation does not know how to fill.
    #[error("the model has an input `{0}` that generation cannot fill")]
    Unfeedable(String),
    /// A cache input lacks a fixed head count or head size.
    #[error("cache input `{name}` has no fixed head count and head size: {dims}")]
    CacheShape {
        /// The input.
        name: String,
        /// Its dims, as declared.
        dims: String,
    },
    /// No prompt, or a prompt without tokens.
    #[error("the prompt has no tokens")]
    EmptyPrompt,
    /// The model's `logits` output is missing or has an unexpected shape.
    #[error("output `logits`: {0}")]
    Logits(String),
    /// The caller's step callback stopped generation.
    #[error("{0}")]
    Stopped(String),
}

/// Prompts left-padded to one length with `pad`, and their attention mask.
pub fn left_pad(prompts: &[Vec<i64>], pad: i64) -> (Vec<Vec<i64>>, Vec<Vec<i64>>) {
    let len = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let mut ids = Vec::with_capacity(prompts.len());
    let mut mask = Vec::with_capacity(prompts.len());
    for p in prompts {
        let n = len - p.len();
        ids.push(
            std::iter::repeat_n(pad, n)
                .chain(p.iter().copied())
                .collect(),
        );
        mask.push(
            std::iter::repeat_n(0, n)
                .chain(std::iter::repeat_n(1, p.len()))
                .collect(),
        );
    }
    (ids, mask)
}

/// `cumsum(mask) - 1` with padding positions set to 1, as `generate` computes positions.
fn positions(mask: &[i64]) -> Vec<i64> {
    let mut sum = 0;
    mask.iter()
        .map(|&m| {
            sum += m;
            if m == 0 { 1 } else { sum - 1 }
        })
        .collect()
}

fn i64s(rows: &[Vec<i64>], from: usize) -> Input {
    let n = rows.first().map_or(0, |r| r.len() - from);
    Input::I64(I64Tensor {
        shape: vec![rows.len() as i64, n as i64],
        data: rows
            .iter()
            .flat_map(|r| r[from..].iter().copied())
            .collect(),
    })
}

/// An empty cache for a batch of `batch` rows: `[batch, heads, 0, head_dim]` per
/// `past_key_values.*` input.
pub(crate) fn empty_cache(
    model: &Model,
    batch: i64,
) -> Result<BTreeMap<String, F32Tensor>, GenerateError> {
    let mut cache = BTreeMap::new();
    for info in model
        .inputs()
        .into_iter()
        .filter(|i| i.name.starts_with("past_key_values."))
    {
        let (Some(Ok(heads)), Some(Ok(hd))) = (info.dims.get(1), info.dims.get(3)) else {
            return Err(GenerateError::CacheShape {
                dims: format!("{:?}", info.dims),
                name: info.name,
            });
        };
        cache.insert(
            info.name.clone(),
            F32Tensor {
                shape: vec![batch, *heads, 0, *hd],
                data: Vec::new(),
            },
        );
    }
    Ok(cache)
}

/// Greedy generation for a batch already left-padded (`ids` and `mask` rows of one
/// length, e.g. from [`left_pad`]). `on_step` sees each step's new token per row (the pad
/// id for rows already finished) and may stop generation by returning an error. Returns
/// each row's new tokens; all rows have the same count, as `generate` returns them.
pub fn greedy(
    model: &mut Model,
    mut ids: Vec<Vec<i64>>,
    mut mask: Vec<Vec<i64>>,
    cfg: &GenerationConfig,
    mut on_step: impl FnMut(&[i64]) -> Result<(), GenerateError>,
) -> Result<Vec<Vec<i64>>, GenerateError> {
    let batch = ids.len();
    if batch == 0 || ids[0].is_empty() || mask.len() != batch {
        return Err(GenerateError::EmptyPrompt);
    }
    let declared = model.inputs();
    let mut cache = empty_cache(model, batch as i64)?;
    let with_past = !cache.is_empty();
    let mut cached = 0usize;
    let mut unfinished = vec![true; batch];
    let mut new: Vec<Vec<i64>> = vec![Vec::new(); batch];
    for _ in 0..cfg.max_new_tokens {
        let total = ids[0].len();
        if let Some(at) = cfg.reset_cache_at
            && with_past
            && cached > 0
            && total >= at
            && cached < at
        {
            cache = empty_cache(model, batch as i64)?;
            cached = 0;
        }
        let start = if with_past { cached } else { 0 };
        let pos: Vec<Vec<i64>> = mask.iter().map(|m| positions(m)).collect();
        let mut feed = BTreeMap::new();
        for info in &declared {
            let v = match info.name.as_str() {
                "input_ids" => i64s(&ids, start),
                "attention_mask" => i64s(&mask, 0),
                "position_ids" => i64s(&pos, start),
                name => match cache.get(name) {
                    Some(t) => Input::F32(t.clone()),
                    None => return Err(GenerateError::Unfeedable(name.to_string())),
                },
            };
            feed.insert(info.name.clone(), v);
        }
        let mut outs = model.run_inputs(&feed)?;
        let logits = outs
            .remove("logits")
            .ok_or_else(|| GenerateError::Logits("the model has no such output".into()))?;
        let n = total - start;
        let (rows, steps, vocab) = match logits.shape[..] {
            [r, s, v] if r as usize == batch && s as usize == n && v > 0 => {
                (r as usize, s as usize, v as usize)
            }
            _ => {
                return Err(GenerateError::Logits(format!(
                    "shape {:?}, expected [{batch}, {n}, vocab]",
                    logits.shape
                )));
            }
        };
        if logits.data.len() != rows * steps * vocab {
            return Err(GenerateError::Logits(
                "size disagrees with its shape".into(),
            ));
        }
        if with_past {
            for (k, v) in outs {
                if let Some(rest) = k.strip_prefix("present.") {
                    cache.insert(format!("past_key_values.{rest}"), v);
                }
            }
            cached = total;
        }
        let mut step = Vec::with_capacity(batch);
        for r in 0..batch {
            let last = &logits.data[(r * steps + steps - 1) * vocab..(r * steps + steps) * vocab];
            let next = argmax(last) as i64;
            let token = if unfinished[r] {
                next
            } else {
                cfg.pad_token_id
            };
            if cfg.eos_token_ids.contains(&token) {
                unfinished[r] = false;
            }
            ids[r].push(token);
            mask[r].push(1);
            new[r].push(token);
            step.push(token);
        }
        on_step(&step)?;
        if unfinished.iter().all(|u| !u) {
            break;
        }
    }
    Ok(new)
}

/// Index of the largest value, the first on ties (as `torch.argmax`).
pub(crate) fn argmax(x: &[f32]) -> usize {
    let mut best = 0;
    for (i, &v) in x.iter().enumerate() {
        if v > x[best] {
            best = i;
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn left_padding_and_positions_match_generate() {
        let (ids, mask) = left_pad(&[vec![5, 6, 7], vec![8]], 0);
        assert_eq!(ids, vec![vec![5, 6, 7], vec![0, 0, 8]]);
        assert_eq!(mask, vec![vec![1, 1, 1], vec![0, 0, 1]]);
        assert_eq!(positions(&mask[1]), vec![1, 1, 0]);
        assert_eq!(positions(&[0, 1, 1, 1]), vec![1, 0, 1, 2]);
    }

    #[test]
    fn argmax_takes_the_first_maximum() {
        assert_eq!(argmax(&[0.0, 2.0, 2.0, 1.0]), 1);
        assert_eq!(argmax(&[-1.0]), 0);
    }
}
