//! ONNX Runtime's linear quantization formulas (`quant_utils.py`): integer ranges, scale and
//! zero point from a min/max range, and `q = clip(round(x / scale) + zero_point)`.
//!
//! Rounding is half-to-even, as numpy's `round`, so the integers match ONNX Runtime's
//! `quantize_dynamic` bit for bit.

use std::fmt;

use rayon::prelude::*;

/// An integer type quantized values are stored in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QType {
    /// Signed 8-bit (`int8`): weights, symmetric.
    Int8,
    /// Unsigned 8-bit (`uint8`): activations and tables, asymmetric.
    UInt8,
}

impl QType {
    /// The type's full range (what values are clipped to).
    pub const fn full_range(self) -> QRange {
        match self {
            QType::Int8 => QRange {
                qmin: -128,
                qmax: 127,
            },
            QType::UInt8 => QRange { qmin: 0, qmax: 255 },
        }
    }

    /// Whether ONNX Runtime quantizes weights of this type symmetrically by default
    /// (`is_weight_symmetric`: signed types are symmetric, unsigned ones are not).
    pub const fn weight_symmetric(self) -> bool {
        matches!(self, QType::Int8)
    }
}

/// An inclusive integer range `[qmin, qmax]` that contains 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct QRange {
    /// Smallest quantized value.
    pub qmin: i32,
    /// Largest quantized value.
    pub qmax: i32,
}

impl QRange {
    /// The range ONNX Runtime quantizes into (`get_qmin_qmax_for_qType`): int8 [-128, 127],
    /// symmetric int8 [-127, 127], reduced int8 [-64, 64]; uint8 [0, 255], reduced [0, 127].
    /// `reduce_range` takes precedence over `symmetric`, as in ONNX Runtime.
    pub const fn for_type(ty: QType, reduce_range: bool, symmetric: bool) -> Self {
        match (ty, reduce_range, symmetric) {
            (QType::Int8, true, _) => QRange {
                qmin: -64,
                qmax: 64,
            },
            (QType::UInt8, true, _) => QRange { qmin: 0, qmax: 127 },
            (QType::Int8, false, true) => QRange {
                qmin: -127,
                qmax: 127,
            },
            (ty, false, _) => ty.full_range(),
        }
    }
}

/// Scale and zero point: a real value `r` is represented by `q` with `r = scale · (q − zp)`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct QParams {
    /// Scale (float32, as stored in the model).
    pub scale: f32,
    /// Zero point (within the range's type).
    pub zero_point: i32,
}

/// ONNX Runtime's `compute_scale_zp`: the range is widened to include 0 (and made
/// `±max(|rmin|, |rmax|)` when symmetric); `scale = (rmax − rmin) / (qmax − qmin)`
/// (computed in float64, stored as float32); `zp = round(qmin − rmin / scale)`, or
/// `round((qmin + qmax) / 2)` when symmetric. A scale below float32's smallest normal
/// (an all-zero tensor) becomes scale 1, zero point 0.
pub fn compute_scale_zp(rmin: f32, rmax: f32, range: QRange, symmetric: bool) -> QParams {
    let mut rmin = f64::from(rmin.min(0.0));
    let mut rmax = f64::from(rmax.max(0.0));
    if symmetric {
        let absmax = rmin.abs().max(rmax.abs());
        rmin = -absmax;
        rmax = absmax;
    }
    let (qmin, qmax) = (f64::from(range.qmin), f64::from(range.qmax));
    let scale = (rmax - rmin) / (qmax - qmin);
    if scale.is_nan() || scale < f64::from(f32::MIN_POSITIVE) {
        return QParams {
            scale: 1.0,
            zero_point: 0,
        };
    }
    let zp = if symmetric {
        ((qmin + qmax) / 2.0).round_ties_even()
    } else {
        (qmin - rmin / scale).round_ties_even()
    };
    QParams {
        scale: scale as f32,
        zero_point: zp.clamp(qmin, qmax) as i32,
    }
}

/// `clip(round(x / scale) + zp)` into `ty`'s full range (ONNX Runtime's `quantize_nparray`),
/// half-to-even rounding, computed in float32.
#[inline]
pub fn quantize_value(x: f32, p: QParams, ty: QType) -> i32 {
    let r = ty.full_range();
    let v = (x / p.scale).round_ties_even() + p.zero_point as f32;
    v.clamp(r.qmin as f32, r.qmax as f32) as i32
}

/// How one tensor is quantized.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TensorSpec {
    /// Target type.
    pub qtype: QType,
    /// Symmetric range (zero point fixed at the middle of the range).
    pub symmetric: bool,
    /// ONNX Runtime's `reduce_range` (7-bit ranges, for CPUs without VNNI).
    pub reduce_range: bool,
    /// One scale and zero point per column (the last axis: a MatMul weight's output
    /// channels) instead of one per tensor.
    pub per_column: bool,
}

/// A quantized tensor: its integers (one byte each, in the layout of the float tensor) and
/// one scale/zero point per tensor or per column.
#[derive(Debug, Clone, PartialEq)]
pub struct QuantizedTensor {
    /// The quantized values as stored bytes (`int8` two's complement or `uint8`).
    pub data: Vec<u8>,
    /// Scales: one, or one per column.
    pub scales: Vec<f32>,
    /// Zero points, parallel to `scales`.
    pub zero_points: Vec<i32>,
}

/// Elements per parallel work item.
const CHUNK: usize = 1 << 16;

/// One little-endian float32.
type Le = [u8; 4];

#[inline(always)]
fn val(c: &Le) -> f32 {
    f32::from_le_bytes(*c)
}

fn min_max(values: &[Le]) -> (f32, f32) {
    values
        .par_chunks(CHUNK)
        .map(|c| {
            c.iter()
                .fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), v| {
                    (lo.min(val(v)), hi.max(val(v)))
                })
        })
        .reduce(
            || (f32::INFINITY, f32::NEG_INFINITY),
            |a, b| (a.0.min(b.0), a.1.max(b.1)),
        )
}

fn finite_or_zero(v: f32) -> f32 {
    if v.is_finite() { v } else { 0.0 }
}

/// [`quantize_value`] with its constants prepared, written so that the loop vectorizes:
/// clip `x / scale` to `[qmin − zp, qmax − zp]` (clipping to integers commutes with
/// rounding; NaN becomes the lower bound), round half-to-even with the 1.5·2²³ trick, add
/// the zero point exactly, and take the low byte of the float's mantissa, which holds the
/// integer (two's complement for int8).
#[derive(Clone, Copy)]
struct Kernel {
    scale: f32,
    lo: f32,
    hi: f32,
    zp_magic: f32,
}

const MAGIC: f32 = 12_582_912.0; // 1.5 · 2^23

impl Kernel {
    fn new(p: QParams, ty: QType) -> Self {
        let r = ty.full_range();
        Self {
            scale: p.scale,
            lo: (r.qmin - p.zero_point) as f32,
            hi: (r.qmax - p.zero_point) as f32,
            zp_magic: p.zero_point as f32 + MAGIC,
        }
    }

    #[inline(always)]
    fn q(&self, x: f32) -> u8 {
        let v = (x / self.scale).max(self.lo).min(self.hi);
        let r = (v + MAGIC) - MAGIC;
        ((r + self.zp_magic).to_bits() & 0xff) as u8
    }
}

/// Quantizes a row-major float tensor whose last axis has `columns` elements.
///
/// Per tensor, the range is the tensor's min/max; per column, each column's. Work is
/// spread over rayon's threads in chunks.
pub fn quantize_tensor(values: &[f32], columns: usize, spec: TensorSpec) -> QuantizedTensor {
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    let mut data = vec![0u8; values.len()];
    let (scales, zero_points) = quantize_le_into(&bytes, columns, spec, &mut data);
    QuantizedTensor {
        data,
        scales,
        zero_points,
    }
}

/// [`quantize_tensor`] straight from little-endian float32 bytes (e.g. a mapped weight,
/// without decoding it into a copy) into `out` (one byte per element). Returns the scales
/// and zero points.
pub fn quantize_le_into(
    bytes: &[u8],
    columns: usize,
    spec: TensorSpec,
    out: &mut [u8],
) -> (Vec<f32>, Vec<i32>) {
    let mut ranges = Ranges::new(if spec.per_column {
        RangeAxis::Columns(columns.max(1))
    } else {
        RangeAxis::Tensor
    });
    ranges.update(bytes);
    let params = ranges.params(spec);
    RowQuantizer::new(&params, columns, spec.qtype).quantize(bytes, out);
    (
        params.iter().map(|p| p.scale).collect(),
        params.iter().map(|p| p.zero_point).collect(),
    )
}

/// What one min/max range of [`Ranges`] covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RangeAxis {
    /// The whole tensor.
    Tensor,
    /// Each of this many columns (the last axis).
    Columns(usize),
    /// Each row of this many elements (the columns of the tensor's transpose).
    Rows(usize),
}

/// Min/max ranges of a float32 tensor accumulated over its bytes in pieces of whole rows
/// (or, for [`RangeAxis::Tensor`], whole elements), so a weight can be scanned in bounded
/// windows and the result equals one pass over all of it.
#[derive(Debug, Clone)]
pub struct Ranges {
    axis: RangeAxis,
    lo: Vec<f32>,
    hi: Vec<f32>,
    /// Elements seen so far.
    seen: usize,
}

impl Ranges {
    /// Empty ranges along `axis`.
    pub fn new(axis: RangeAxis) -> Self {
        let n = match axis {
            RangeAxis::Tensor => 1,
            RangeAxis::Columns(c) => c.max(1),
            RangeAxis::Rows(_) => 0,
        };
        Self {
            axis,
            lo: vec![f32::INFINITY; n],
            hi: vec![f32::NEG_INFINITY; n],
            seen: 0,
        }
    }

    /// Bytes per unit that [`Ranges::update`] pieces must be a multiple of.
    pub fn granule(&self) -> usize {
        4 * match self.axis {
            RangeAxis::Tensor => 1,
            RangeAxis::Columns(c) | RangeAxis::Rows(c) => c.max(1),
        }
    }

    /// Takes in the next `bytes` of the tensor (a multiple of [`Ranges::granule`]).
    pub fn update(&mut self, bytes: &[u8]) {
        let (values, _) = bytes.as_chunks::<4>();
        self.seen += values.len();
        match self.axis {
            RangeAxis::Tensor => {
                if !values.is_empty() {
                    let (l, h) = min_max(values);
                    self.lo[0] = self.lo[0].min(l);
                    self.hi[0] = self.hi[0].max(h);
                }
            }
            RangeAxis::Rows(width) => {
                let width = width.max(1);
                let (lo, hi): (Vec<f32>, Vec<f32>) = values
                    .par_chunks(width)
                    .map(|row| {
                        row.iter()
                            .fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), v| {
                                (lo.min(val(v)), hi.max(val(v)))
                            })
                    })
                    .unzip();
                self.lo.extend(lo);
                self.hi.extend(hi);
            }
            RangeAxis::Columns(columns) => {
                let columns = columns.max(1);
                let block = (CHUNK / columns).max(1) * columns;
                // Column ranges over blocks of rows in parallel, then merged.
                let (lo, hi) = values
                    .par_chunks(block)
                    .map(|b| {
                        let mut lo = vec![f32::INFINITY; columns];
                        let mut hi = vec![f32::NEG_INFINITY; columns];
                        for row in b.chunks_exact(columns) {
                            for ((l, h), v) in lo.iter_mut().zip(hi.iter_mut()).zip(row) {
                                *l = l.min(val(v));
                                *h = h.max(val(v));
                            }
                        }
                        (lo, hi)
                    })
                    .reduce(
                        || {
                            (
                                vec![f32::INFINITY; columns],
                                vec![f32::NEG_INFINITY; columns],
                            )
                        },
                        merge,
                    );
                let (l, h) = merge(
                    (std::mem::take(&mut self.lo), std::mem::take(&mut self.hi)),
                    (lo, hi),
                );
                self.lo = l;
                self.hi = h;
            }
        }
    }

    /// Elements taken in so far.
    pub fn seen(&self) -> usize {
        self.seen
    }

    /// ONNX Runtime's scale and zero point of each range (non-finite bounds count as 0).
    pub fn params(&self, spec: TensorSpec) -> Vec<QParams> {
        let range = QRange::for_type(spec.qtype, spec.reduce_range, spec.symmetric);
        self.lo
            .iter()
            .zip(&self.hi)
            .map(|(&l, &h)| {
                compute_scale_zp(finite_or_zero(l), finite_or_zero(h), range, spec.symmetric)
            })
            .collect()
    }
}

/// Element-wise min of the lows and max of the highs.
fn merge(
    (mut l1, mut h1): (Vec<f32>, Vec<f32>),
    (l2, h2): (Vec<f32>, Vec<f32>),
) -> (Vec<f32>, Vec<f32>) {
    for (a, b) in l1.iter_mut().zip(&l2) {
        *a = a.min(*b);
    }
    for (a, b) in h1.iter_mut().zip(&h2) {
        *a = a.max(*b);
    }
    (l1, h1)
}

/// Quantizes whole rows of a float32 tensor with fixed parameters: one for the tensor, or
/// one per column. What a lazily quantized weight runs on each band it streams.
#[derive(Clone)]
pub struct RowQuantizer {
    columns: usize,
    scale: Vec<f32>,
    lo: Vec<f32>,
    hi: Vec<f32>,
    zp_magic: Vec<f32>,
}

impl fmt::Debug for RowQuantizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "RowQuantizer({} params, {} columns)",
            self.scale.len(),
            self.columns
        )
    }
}

impl RowQuantizer {
    /// A quantizer for `params` (one, or one per column of `columns`) into `ty`.
    pub fn new(params: &[QParams], columns: usize, ty: QType) -> Self {
        // Each constant in its own array, so the loop over a row's columns vectorizes.
        let kernels: Vec<Kernel> = params.iter().map(|&p| Kernel::new(p, ty)).collect();
        Self {
            columns: columns.max(1),
            scale: kernels.iter().map(|k| k.scale).collect(),
            lo: kernels.iter().map(|k| k.lo).collect(),
            hi: kernels.iter().map(|k| k.hi).collect(),
            zp_magic: kernels.iter().map(|k| k.zp_magic).collect(),
        }
    }

    /// Quantizes `bytes` (little-endian float32, whole rows when per column) into `out`
    /// (one byte per element), in parallel chunks.
    pub fn quantize(&self, bytes: &[u8], out: &mut [u8]) {
        let (values, _) = bytes.as_chunks::<4>();
        if let ([scale], [lo], [hi], [zp_magic]) = (
            &self.scale[..],
            &self.lo[..],
            &self.hi[..],
            &self.zp_magic[..],
        ) {
            let k = Kernel {
                scale: *scale,
                lo: *lo,
                hi: *hi,
                zp_magic: *zp_magic,
            };
            out.par_chunks_mut(CHUNK)
                .zip(values.par_chunks(CHUNK))
                .for_each(|(o, inp)| {
                    for (o, v) in o.iter_mut().zip(inp) {
                        *o = k.q(val(v));
                    }
                });
            return;
        }
        let columns = self.columns;
        let block = (CHUNK / columns).max(1) * columns;
        out.par_chunks_mut(block)
            .zip(values.par_chunks(block))
            .for_each(|(o, inp)| {
                for (orow, irow) in o.chunks_exact_mut(columns).zip(inp.chunks_exact(columns)) {
                    let consts = self
                        .scale
                        .iter()
                        .zip(&self.lo)
                        .zip(&self.hi)
                        .zip(&self.zp_magic);
                    for ((o, v), (((&scale, &lo), &hi), &zp_magic)) in
                        orow.iter_mut().zip(irow).zip(consts)
                    {
                        let k = Kernel {
                            scale,
                            lo,
                            hi,
                            zp_magic,
                        };
                        *o = k.q(val(v));
                    }
                }
            });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Every expected number below was printed by ONNX Runtime 1.x's Python quantizer in
    // target/ortvenv:
    //   qmin, qmax = quant_utils.get_qmin_qmax_for_qType(qType, reduce_range, symmetric)
    //   zp, scale = quant_utils.compute_scale_zp(np.float32(rmin), np.float32(rmax), qmin, qmax, symmetric)
    //   zp, scale, q = quant_utils.quantize_data(data, qType, symmetric, reduce_range)

    fn check(rmin: f32, rmax: f32, ty: QType, reduce: bool, sym: bool, zp: i32, scale: f64) {
        let r = QRange::for_type(ty, reduce, sym);
        let p = compute_scale_zp(rmin, rmax, r, sym);
        assert_eq!(
            p.zero_point, zp,
            "zp of [{rmin}, {rmax}] {ty:?} reduce={reduce}"
        );
        assert_eq!(
            f64::from(p.scale),
            scale,
            "scale of [{rmin}, {rmax}] {ty:?} reduce={reduce}"
        );
    }

    #[test]
    fn ranges_match_onnxruntime() {
        assert_eq!(
            QRange::for_type(QType::Int8, false, true),
            QRange {
                qmin: -127,
                qmax: 127
            }
        );
        assert_eq!(
            QRange::for_type(QType::Int8, true, true),
            QRange {
                qmin: -64,
                qmax: 64
            }
        );
        assert_eq!(
            QRange::for_type(QType::Int8, false, false),
            QRange {
                qmin: -128,
                qmax: 127
            }
        );
        assert_eq!(
            QRange::for_type(QType::UInt8, false, false),
            QRange { qmin: 0, qmax: 255 }
        );
        assert_eq!(
            QRange::for_type(QType::UInt8, true, false),
            QRange { qmin: 0, qmax: 127 }
        );
    }

    #[test]
    fn scale_and_zero_point_match_compute_scale_zp() {
        use QType::*;
        check(-0.73, 1.21, Int8, false, true, 0, 0.009527559392154217);
        check(-0.73, 1.21, Int8, true, true, 0, 0.018906250596046448);
        check(-0.73, 1.21, UInt8, false, false, 96, 0.0076078432612121105);
        check(-0.73, 1.21, UInt8, true, false, 48, 0.015275591053068638);
        check(-0.73, 1.21, Int8, false, false, -32, 0.0076078432612121105);
        check(0.25, 3.5, Int8, false, true, 0, 0.027559055015444756);
        check(0.25, 3.5, Int8, true, true, 0, 0.0546875);
        check(0.25, 3.5, UInt8, false, false, 0, 0.013725490309298038);
        check(0.25, 3.5, UInt8, true, false, 0, 0.027559055015444756);
        check(0.25, 3.5, Int8, false, false, -128, 0.013725490309298038);
        check(-2.0, -0.5, Int8, true, true, 0, 0.03125);
        check(-2.0, -0.5, UInt8, false, false, 255, 0.007843137718737125);
        check(-2.0, -0.5, UInt8, true, false, 127, 0.015748031437397003);
        check(-2.0, -0.5, Int8, false, false, 127, 0.007843137718737125);
    }

    #[test]
    fn all_zero_tensor_gets_unit_scale() {
        let p = compute_scale_zp(
            0.0,
            0.0,
            QRange::for_type(QType::UInt8, false, false),
            false,
        );
        assert_eq!(
            p,
            QParams {
                scale: 1.0,
                zero_point: 0
            }
        );
    }

    const DATA: [f32; 8] = [-0.73, 0.1, 0.5, 1.21, -0.2, 0.333, 0.0, 0.9];

    fn spec(qtype: QType, symmetric: bool, reduce_range: bool, per_column: bool) -> TensorSpec {
        TensorSpec {
            qtype,
            symmetric,
            reduce_range,
            per_column,
        }
    }

    fn as_i8(b: &[u8]) -> Vec<i32> {
        b.iter().map(|&v| i32::from(v as i8)).collect()
    }

    #[test]
    fn per_tensor_values_match_quantize_data() {
        let q = quantize_tensor(&DATA, 8, spec(QType::Int8, true, false, false));
        assert_eq!(as_i8(&q.data), [-77, 10, 52, 127, -21, 35, 0, 94]);
        assert_eq!(
            (q.scales[0] as f64, q.zero_points[0]),
            (0.009527559392154217, 0)
        );

        let q = quantize_tensor(&DATA, 8, spec(QType::UInt8, false, false, false));
        let got: Vec<i32> = q.data.iter().map(|&v| i32::from(v)).collect();
        assert_eq!(got, [0, 109, 162, 255, 70, 140, 96, 214]);
        assert_eq!(
            (q.scales[0] as f64, q.zero_points[0]),
            (0.0076078432612121105, 96)
        );

        let q = quantize_tensor(&DATA, 8, spec(QType::Int8, true, true, false));
        assert_eq!(as_i8(&q.data), [-39, 5, 26, 64, -11, 18, 0, 48]);
        assert_eq!(q.scales[0] as f64, 0.018906250596046448);
    }

    #[test]
    fn per_column_values_match_quantize_data_per_column() {
        // w[4, 3]; ONNX Runtime: quantize_data(w[:, c], INT8, symmetric=True) per column c.
        let w = [
            0.5, -1.0, 0.02, //
            0.25, 2.0, -0.01, //
            -0.75, 0.3, 0.03, //
            0.1, -0.4, 0.0,
        ];
        let q = quantize_tensor(&w, 3, spec(QType::Int8, true, false, true));
        let cols: Vec<Vec<i32>> = (0..3)
            .map(|c| (0..4).map(|r| i32::from(q.data[r * 3 + c] as i8)).collect())
            .collect();
        assert_eq!(cols[0], [85, 42, -127, 17]);
        assert_eq!(cols[1], [-64, 127, 19, -25]);
        assert_eq!(cols[2], [85, -42, 127, 0]);
        let scales: Vec<f64> = q.scales.iter().map(|&s| f64::from(s)).collect();
        assert_eq!(
            scales,
            [
                0.005905511789023876,
                0.015748031437397003,
                0.000236220468650572
            ]
        );
        assert_eq!(q.zero_points, [0, 0, 0]);
    }

    #[test]
    fn fast_kernel_matches_quantize_value() {
        // Ties, near-ties, out-of-range values and NaN, over int8 and uint8 parameters.
        let xs = [
            -2.5f32,
            -1.5,
            -0.5,
            0.5,
            1.5,
            2.5,
            3.49,
            -3.51,
            126.5,
            127.5,
            -127.5,
            300.0,
            -300.0,
            1e9,
            -1e9,
            0.0,
            -0.0,
            0.49999997,
            -0.50000006,
            85.5,
            -64.5,
        ];
        for (p, ty) in [
            (
                QParams {
                    scale: 1.0,
                    zero_point: 0,
                },
                QType::Int8,
            ),
            (
                QParams {
                    scale: 1.0,
                    zero_point: 96,
                },
                QType::UInt8,
            ),
            (
                QParams {
                    scale: 0.5,
                    zero_point: -32,
                },
                QType::Int8,
            ),
            (
                QParams {
                    scale: 0.0076078433,
                    zero_point: 128,
                },
                QType::UInt8,
            ),
        ] {
            let k = Kernel::new(p, ty);
            for x in xs {
                let want = quantize_value(x, p, ty);
                let got = match ty {
                    QType::Int8 => i32::from(k.q(x) as i8),
                    QType::UInt8 => i32::from(k.q(x)),
                };
                assert_eq!(got, want, "{x} {p:?} {ty:?}");
            }
            let nan = k.q(f32::NAN);
            assert_eq!(nan, k.q(-1e30), "NaN clips low");
        }
    }
}
