//! int4 weights produced lazily: `MatMulNBits`' codes, scales and zero points are each a
//! [`TensorData::Produced`] computed band by band (whole columns of the weight) from the
//! float32 source when the writer streams them, so no quantized weight is ever held whole.
//! The block formulas are the ones of [`crate::int4`], shared through [`quantize_column`].

use ferry_ir::{RowProducer, TensorData};
use rayon::prelude::*;

use crate::int8::with_buffer;

/// Quantizes one column of a weight (its `K` values along the reduction axis) block by
/// block into `codes` (`k_blocks × block_size / 2` bytes, zeroed here), `scales`
/// (`k_blocks`) and `zero_points` (`ceil(k_blocks / 2)` bytes, zeroed here; an unused
/// high nibble holds 8). Symmetric blocks store zero point 8 there too.
pub fn quantize_column(
    column: &[f32],
    block_size: usize,
    symmetric: bool,
    codes: &mut [u8],
    scales: &mut [f32],
    zero_points: &mut [u8],
) {
    column_params(column, block_size, symmetric, scales, zero_points);
    let blob = block_size / 2;
    codes.fill(0);
    for (b, vals) in column.chunks(block_size).enumerate() {
        let scale = scales[b];
        let zp = (zero_points[b / 2] >> (4 * (b % 2))) & 15;
        let recip = if scale == 0.0 { 0.0 } else { 1.0 / scale };
        let out = &mut codes[b * blob..(b + 1) * blob];
        // Symmetric: round(x / scale) + zp; asymmetric: round(x / scale + zp).
        let (add, offset) = if symmetric {
            (0.0, f32::from(zp))
        } else {
            (f32::from(zp), 0.0)
        };
        let pairs = vals.chunks_exact(2);
        let tail = pairs.remainder();
        for (o, p) in out.iter_mut().zip(pairs) {
            *o = code(p[0] * recip + add, offset) | code(p[1] * recip + add, offset) << 4;
        }
        if let [x] = tail {
            out[vals.len() / 2] = code(x * recip + add, offset);
        }
    }
}

/// The scales and zero points [`quantize_column`] gives a column, without its codes: a
/// min/max scan per block, all the scale and zero-point tensors are produced from.
pub fn column_params(
    column: &[f32],
    block_size: usize,
    symmetric: bool,
    scales: &mut [f32],
    zero_points: &mut [u8],
) {
    zero_points.fill(0);
    for (b, vals) in column.chunks(block_size).enumerate() {
        let (scale, zp) = if symmetric {
            symmetric_scale(vals)
        } else {
            asymmetric_scale(vals)
        };
        scales[b] = scale;
        zero_points[b / 2] |= zp << (4 * (b % 2));
    }
    if column.len().div_ceil(block_size) % 2 == 1
        && let Some(last) = zero_points.last_mut()
    {
        *last |= 8 << 4;
    }
}

/// The 4-bit code `clamp(round(v) + offset, 0, 15)`, `round` half away from zero as
/// `f32::round` (NaN gives 0, as `NaN as u8`), branch-free so that the loop vectorizes: `v`
/// is clamped to one step outside the codes' range, rounded half to even by the 1.5·2²³
/// trick (exact there), and ties moved away from zero.
#[inline(always)]
fn code(v: f32, offset: f32) -> u8 {
    const MAGIC: f32 = 12_582_912.0;
    let c = v.clamp(-1.0 - offset, 16.0 - offset);
    let even = (c + MAGIC) - MAGIC;
    let d = c - even;
    let up = f32::from(u8::from(d == 0.5 && c > 0.0));
    let down = f32::from(u8::from(d == -0.5 && c < 0.0));
    (even + up - down + offset).clamp(0.0, 15.0) as u8
}

/// Scale of a symmetric block: its value of largest magnitude (first one on ties) over -8.
fn symmetric_scale(vals: &[f32]) -> (f32, u8) {
    let (mut amax, mut vmax) = (0f32, 0f32);
    for &v in vals {
        if amax < v.abs() {
            amax = v.abs();
            vmax = v;
        }
    }
    (vmax / -8.0, 8)
}

/// Scale and zero point of an asymmetric block: min/max widened to include 0 over 15 steps.
fn asymmetric_scale(vals: &[f32]) -> (f32, u8) {
    let (mut lo, mut hi) = (0f32, 0f32);
    for &v in vals {
        lo = lo.min(v);
        hi = hi.max(v);
    }
    let scale = (hi - lo) / 15.0;
    let zp = if scale == 0.0 {
        8
    } else {
        (-lo / scale).round().clamp(0.0, 15.0) as u8
    };
    (scale, zp)
}

/// Which of `MatMulNBits`' inputs a producer computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Part {
    Codes,
    Scales,
    ZeroPoints,
}

/// One of the three int4 tensors of a weight whose columns are the rows of `wt`
/// (`[N, K]` float32, e.g. a linear layer's `[out, in]` weight or a transposed view of a
/// `[K, N]` one); one output row per column.
struct Int4Rows {
    wt: TensorData,
    k: usize,
    block_size: usize,
    symmetric: bool,
    part: Part,
}

impl Int4Rows {
    fn k_blocks(&self) -> usize {
        self.k.div_ceil(self.block_size)
    }

    /// Output bytes per column of the weight for each part.
    fn widths(&self) -> (usize, usize, usize) {
        let kb = self.k_blocks();
        (kb * self.block_size / 2, kb, kb.div_ceil(2))
    }

    fn rows(&self) -> u64 {
        self.wt.len() / (4 * self.k.max(1) as u64)
    }
}

impl RowProducer for Int4Rows {
    fn total_bytes(&self) -> u64 {
        self.rows() * self.row_bytes()
    }

    fn row_bytes(&self) -> u64 {
        let (codes, scales, zps) = self.widths();
        match self.part {
            Part::Codes => codes as u64,
            Part::Scales => 4 * scales as u64,
            Part::ZeroPoints => zps as u64,
        }
    }

    fn row_work(&self) -> u64 {
        4 * self.k as u64 + self.row_bytes()
    }

    fn produce(&self, first: u64, out: &mut [u8]) -> std::io::Result<()> {
        let width = usize::try_from(self.row_bytes()).map_err(std::io::Error::other)?;
        let rows = out.len() / width.max(1);
        let k = self.k;
        with_buffer(4 * k * rows, |buf| {
            self.wt.read_into(4 * k as u64 * first, buf)?;
            let (_, sw, zw) = self.widths();
            out.par_chunks_mut(width.max(1))
                .zip(buf.par_chunks(4 * k.max(1)))
                .for_each_init(
                    || (vec![0f32; k], vec![0f32; sw], vec![0u8; zw]),
                    |(col, scales, zps), (o, src)| {
                        for (v, c) in col.iter_mut().zip(src.as_chunks::<4>().0) {
                            *v = f32::from_le_bytes(*c);
                        }
                        match self.part {
                            Part::Codes => quantize_column(
                                col,
                                self.block_size,
                                self.symmetric,
                                o,
                                scales,
                                zps,
                            ),
                            Part::Scales => {
                                column_params(col, self.block_size, self.symmetric, scales, zps);
                                for (o, s) in o.chunks_exact_mut(4).zip(scales.iter()) {
                                    o.copy_from_slice(&s.to_le_bytes());
                                }
                            }
                            Part::ZeroPoints => {
                                column_params(col, self.block_size, self.symmetric, scales, o)
                            }
                        }
                    },
                );
            Ok(())
        })
    }
}

/// `MatMulNBits`' inputs for one weight, each computed when streamed.
#[derive(Debug, Clone)]
pub struct LazyInt4 {
    /// Codes, uint8 `[N, k_blocks, block_size / 2]`.
    pub data: TensorData,
    /// Scales, float32 `[N, k_blocks]`.
    pub scales: TensorData,
    /// Zero points, uint8 `[N, ceil(k_blocks / 2)]` (asymmetric only).
    pub zero_points: Option<TensorData>,
    /// Blocks per column.
    pub k_blocks: usize,
}

/// The lazily computed int4 form of the weight whose `n` columns of `k` values are the rows
/// of `wt` (`[N, K]` float32 bytes; a [`TensorData::transposed`] view for a `[K, N]`
/// MatMul B). `block_size` must be even. Nothing is read until the tensors are.
pub fn lazy_int4(wt: TensorData, k: usize, block_size: usize, symmetric: bool) -> LazyInt4 {
    let part = |part| {
        TensorData::produced(Int4Rows {
            wt: wt.clone(),
            k,
            block_size,
            symmetric,
            part,
        })
    };
    LazyInt4 {
        data: part(Part::Codes),
        scales: part(Part::Scales),
        zero_points: (!symmetric).then(|| part(Part::ZeroPoints)),
        k_blocks: k.div_ceil(block_size),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::int4::quantize_columns;
    use crate::int8::tests::weights;

    fn streamed(d: &TensorData) -> std::io::Result<Vec<u8>> {
        let mut v = Vec::new();
        d.write_to(&mut v)?;
        Ok(v)
    }

    /// `code` is `f32::round`'s formula exactly: ties, both signs, out of range, NaN, ±inf.
    #[test]
    fn code_equals_round_then_clamp() {
        let mut vals = vec![
            f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            0.0,
            -0.0,
            1e30,
            -1e30,
        ];
        for i in -400..=400 {
            let v = i as f32 / 16.0;
            vals.extend([
                v,
                v + f32::EPSILON,
                v - f32::EPSILON,
                v.next_up(),
                v.next_down(),
            ]);
        }
        for v in vals {
            let sym = ((v.round() + 8.0).clamp(0.0, 15.0)) as u8;
            let asym = (v.round().clamp(0.0, 15.0)) as u8;
            assert_eq!(code(v, 8.0), sym, "symmetric {v}");
            assert_eq!(code(v, 0.0), asym, "asymmetric {v}");
        }
    }

    #[test]
    fn lazy_parts_equal_the_eager_packing_across_bands() -> std::io::Result<()> {
        // K not a multiple of the block (a padded last block, odd block counts) and enough
        // columns for several bands of 16 MiB of work.
        for (n, k, bs) in [(1100usize, 4100usize, 32usize), (9, 77, 16), (3, 128, 128)] {
            let wt = weights(n * k, k as u32);
            let bytes: Vec<u8> = wt.iter().flat_map(|v| v.to_le_bytes()).collect();
            for symmetric in [true, false] {
                let want = quantize_columns(&wt, k, n, bs, symmetric);
                let got = lazy_int4(TensorData::owned(bytes.clone()), k, bs, symmetric);
                let what = format!("{n}x{k} block {bs} symmetric={symmetric}");
                assert_eq!(got.k_blocks, want.k_blocks, "{what}");
                assert!(streamed(&got.data)? == want.data, "{what}");
                let scales: Vec<u8> = want.scales.iter().flat_map(|s| s.to_le_bytes()).collect();
                assert!(streamed(&got.scales)? == scales, "{what}");
                match (&got.zero_points, &want.zero_points) {
                    (Some(g), Some(w)) => assert!(streamed(g)? == *w, "{what}"),
                    (None, None) => {}
                    _ => panic!("zero points present in one only: {what}"),
                }
                // A range that starts and ends inside a column's row.
                let row = want.data.len() / n;
                let (off, len) = (
                    row / 2 + 1,
                    (2 * row + 3).min(want.data.len() - row / 2 - 1),
                );
                let mut part = vec![0u8; len];
                got.data.read_into(off as u64, &mut part)?;
                assert_eq!(part, want.data[off..off + len], "{what}");
            }
        }
        Ok(())
    }
}
