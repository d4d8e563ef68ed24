//! Token embeddings shared by the encoders: word + optional token-type + position lookups,
//! summed, then LayerNorm (`BertEmbeddings` and its copies), configured per architecture.

use ferry_ir::{DType, Dim};

use crate::layers::{WeightSource, layer_norm, scoped};
use crate::{T, TraceError, Tracer};

/// Where the token-type embedding comes from.
#[derive(Debug, Clone, Copy)]
pub(crate) enum TokenTypes<'a> {
    /// No token-type table (DistilBERT, MPNet).
    Absent,
    /// Rows of a `[vocab, width]` table at the `token_type_ids` input (BERT, ALBERT, ELECTRA).
    Ids {
        /// The `[batch, seq]` token-type ids.
        ids: &'a T,
        /// `type_vocab_size`.
        vocab: i64,
    },
    /// Row 0 of a `[vocab, width]` table, broadcast: token types all zero (RoBERTa).
    Zero {
        /// `type_vocab_size`.
        vocab: i64,
    },
}

/// How position ids are numbered.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Positions {
    /// `arange(seq)`: rows `[0, seq)` of the position table.
    Arange,
    /// `create_position_ids_from_input_ids(ids, pad)` (RoBERTa, MPNet): see [`position_ids`].
    PastPadding(i64),
}

/// The sizes and variants of an `embeddings` module.
#[derive(Debug, Clone, Copy)]
pub(crate) struct EmbeddingSpec<'a> {
    /// `vocab_size`.
    pub vocab: i64,
    /// Embedding width (`hidden_size`, or `embedding_size` where factorized).
    pub width: i64,
    /// Rows of the position table (`max_position_embeddings`).
    pub max_positions: i64,
    /// The LayerNorm's epsilon.
    pub eps: f64,
    /// Token-type embedding.
    pub token_types: TokenTypes<'a>,
    /// Position numbering.
    pub positions: Positions,
}

/// The `embeddings` module: `word_embeddings[ids]` (+ `token_type_embeddings[types]`) +
/// `position_embeddings[positions]`, then `LayerNorm`.
pub(crate) fn embeddings(
    t: &mut Tracer,
    w: &WeightSource<'_>,
    s: &EmbeddingSpec<'_>,
    ids: &T,
) -> Result<T, TraceError> {
    let width = s.width;
    scoped(t, "embeddings", |t| {
        let word = w.get(t, "embeddings.word_embeddings.weight", &[s.vocab, width])?;
        let pos = w.get(
            t,
            "embeddings.position_embeddings.weight",
            &[s.max_positions, width],
        )?;
        let types = match s.token_types {
            TokenTypes::Absent => None,
            TokenTypes::Ids { vocab, .. } | TokenTypes::Zero { vocab } => Some(w.get(
                t,
                "embeddings.token_type_embeddings.weight",
                &[vocab, width],
            )?),
        };
        let mut e = t.gather(&word, ids, 0)?;
        if let Some(table) = types {
            let te = match s.token_types {
                TokenTypes::Ids { ids: type_ids, .. } => t.gather(&table, type_ids, 0)?,
                _ => {
                    let zero = t.scalar_i64(0);
                    t.gather(&table, &zero, 0)?
                }
            };
            e = t.add(&e, &te)?;
        }
        let pe = match s.positions {
            Positions::Arange => arange_rows(t, &pos, ids, width),
            Positions::PastPadding(pad) => {
                let pids = position_ids(t, ids, pad)?;
                t.gather(&pos, &pids, 0)?
            }
        };
        let e = t.add(&e, &pe)?;
        layer_norm(t, w, "LayerNorm", &e, width, s.eps)
    })
}

/// Rows `[0, seq)` of a `[positions, width]` table, `seq` being the run-time length of the
/// `[batch, seq]` `ids` (the lookup at `position_ids = arange(seq)`).
pub(crate) fn arange_rows(t: &mut Tracer, table: &T, ids: &T, width: i64) -> T {
    let shape = t.shape_of(ids);
    let one = t.ints(&[1]);
    let two = t.ints(&[2]);
    let zero = t.ints(&[0]);
    let seq = t.slice(&shape, &one, &two, &zero, vec![Dim::Fixed(1)]);
    t.slice(
        table,
        &zero,
        &seq,
        &zero,
        vec![ids.shape[1].clone(), Dim::Fixed(width)],
    )
}

/// `create_position_ids_from_input_ids`: `cumsum(ids != pad) * (ids != pad) + pad`, i.e.
/// non-padding tokens numbered from `pad + 1`, padding tokens at `pad`. In transformers'
/// dtypes: the mask, its CumSum and the product are int32 (`.int()`, `.type_as(mask)`),
/// widened to int64 (`.long()`) before `pad` is added (tract evaluates no int64 CumSum of
/// a value derived from the ids).
pub(crate) fn position_ids(t: &mut Tracer, ids: &T, pad: i64) -> Result<T, TraceError> {
    let p = t.scalar_i64(pad);
    let eq = t.op("Equal", &[ids, &p], vec![], DType::Bool, ids.shape.clone());
    let ne = t.op("Not", &[&eq], vec![], DType::Bool, ids.shape.clone());
    let mask = t.cast(&ne, DType::I32, 6);
    let axis = t.scalar_i64(1);
    let count = t.op(
        "CumSum",
        &[&mask, &axis],
        vec![],
        DType::I32,
        ids.shape.clone(),
    );
    let numbered = t.mul(&count, &mask)?;
    let numbered = t.cast(&numbered, DType::I64, 7);
    t.add(&numbered, &p)
}

/// `arange(seq)` over the run-time length of the `[batch, seq]` `ids` as a column
/// (`[seq, 1]`) and a row (`[1, seq]`): the two sides of a relative-position grid
/// (MPNet's `memory - context`, DeBERTa's `q - k`).
pub(crate) fn position_grid(t: &mut Tracer, ids: &T) -> Result<(T, T), TraceError> {
    let range = crate::causal::column_range(t, ids)?;
    Ok((t.unsqueeze(&range, &[1]), t.unsqueeze(&range, &[0])))
}
