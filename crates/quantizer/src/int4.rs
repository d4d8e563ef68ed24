//! int4 weight-only quantization: float MatMuls with constant weights become ONNX Runtime's
//! `MatMulNBits` (`com.microsoft`), 4 bits per weight in blocks along K.
//!
//! The layout is the one ONNX Runtime's `MatMulNBitsQuantizer` writes (its C++
//! `quantize_matmul_4bits`), checked byte for byte in the unit tests:
//!
//! * `B`: uint8 `[N, k_blocks, block_size / 2]`, the weight's column `n` quantized block by
//!   block along K, two codes per byte, **low nibble first**; when K is not a multiple of
//!   `block_size` the last block is padded with zero nibbles (MatMulNBits reads only K;
//!   ONNX Runtime's quantizer leaves a stale value in the one unused nibble of an odd K's
//!   last code byte, the only byte where its output and ferry's may differ).
//! * `scales`: float `[N, k_blocks]`.
//! * `zero_points` (asymmetric only): uint8 `[N, ceil(k_blocks / 2)]`, two per byte, low
//!   nibble first, an unused high nibble holding the default zero point 8.
//! * Symmetric: `scale = v / -8` where `v` is the block's value of largest magnitude (sign
//!   kept), `q = clamp(round(x / scale) + 8, 0, 15)`. Asymmetric: `min`/`max` widened to
//!   include 0, `scale = (max - min) / 15`, `zp = clamp(round(-min / scale), 0, 15)`,
//!   `q = clamp(round(x / scale + zp), 0, 15)`. Dequantized: `(q - zp) * scale`.

use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;

use ferry_ir::{Attr, DType, Graph, Initializer, Node, OpsetImport, TensorData};

use crate::QuantizeError;
use crate::int4_lazy::{lazy_int4, quantize_column};

/// Options of [`quantize_int4`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Int4Options {
    /// Weights per quantization block along K (a power of two ≥ 16; ONNX Runtime's default 128).
    pub block_size: usize,
    /// Symmetric blocks (no zero points) instead of min/max with zero points.
    pub symmetric: bool,
    /// Node names left in float.
    pub exclude: Vec<String>,
    /// `accuracy_level` attribute of the `MatMulNBits` nodes (0–4: unset, fp32, fp16, bf16,
    /// int8 compute of A); `None` leaves it out, as ONNX Runtime's quantizer does for 0.
    pub accuracy_level: Option<i64>,
}

impl Default for Int4Options {
    fn default() -> Self {
        Self {
            block_size: 128,
            symmetric: false,
            exclude: Vec::new(),
            accuracy_level: None,
        }
    }
}

/// What [`quantize_int4`] changed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Int4Stats {
    /// MatMuls rewritten to `MatMulNBits`.
    pub matmuls_quantized: usize,
    /// MatMuls left in float because their name was excluded.
    pub excluded: usize,
    /// MatMuls left in float because B is not a constant 2-D float32 weight (activations,
    /// batched weights).
    pub skipped: usize,
    /// Bytes of the float weights that were replaced.
    pub float_bytes: u64,
    /// Bytes of the packed weights, scales and zero points that replaced them.
    pub quantized_bytes: u64,
    /// Block size used.
    pub block_size: usize,
    /// Whether blocks were symmetric.
    pub symmetric: bool,
}

impl std::ops::Add for Int4Stats {
    type Output = Int4Stats;

    /// Sums the counts of two runs (the two parts of a merged decoder: a weight both read counts twice).
    fn add(self, o: Int4Stats) -> Int4Stats {
        Int4Stats {
            matmuls_quantized: self.matmuls_quantized + o.matmuls_quantized,
            excluded: self.excluded + o.excluded,
            skipped: self.skipped + o.skipped,
            float_bytes: self.float_bytes + o.float_bytes,
            quantized_bytes: self.quantized_bytes + o.quantized_bytes,
            block_size: self.block_size,
            symmetric: self.symmetric,
        }
    }
}

impl fmt::Display for Int4Stats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} MatMul → MatMulNBits (4-bit, block {}, {}); {} excluded, {} left in float \
             (B not a constant 2-D float32 weight); weights {} → {} bytes",
            self.matmuls_quantized,
            self.block_size,
            if self.symmetric {
                "symmetric"
            } else {
                "with zero points"
            },
            self.excluded,
            self.skipped,
            self.float_bytes,
            self.quantized_bytes
        )
    }
}

/// A weight quantized into `MatMulNBits`' inputs (see the module docs for the layout).
#[derive(Debug, Clone, PartialEq)]
pub struct PackedInt4 {
    /// Codes, `[N, k_blocks, block_size / 2]`.
    pub data: Vec<u8>,
    /// Scales, `[N, k_blocks]`.
    pub scales: Vec<f32>,
    /// Zero points, `[N, ceil(k_blocks / 2)]` (asymmetric only).
    pub zero_points: Option<Vec<u8>>,
    /// Blocks per column.
    pub k_blocks: usize,
}

/// Quantizes a weight given **column by column**: `wt` is `[N, K]` row-major (the
/// transpose of MatMul's `[K, N]` B, i.e. a linear layer's `[out, in]` weight).
/// `block_size` must be an even number.
pub fn quantize_columns(
    wt: &[f32],
    k: usize,
    n: usize,
    block_size: usize,
    symmetric: bool,
) -> PackedInt4 {
    let k_blocks = k.div_ceil(block_size);
    let blob = block_size / 2;
    let zp_row = k_blocks.div_ceil(2);
    let mut data = vec![0u8; n * k_blocks * blob];
    let mut scales = vec![0f32; n * k_blocks];
    let mut zps = vec![0u8; n * zp_row];
    for col in 0..n {
        quantize_column(
            &wt[col * k..(col + 1) * k],
            block_size,
            symmetric,
            &mut data[col * k_blocks * blob..(col + 1) * k_blocks * blob],
            &mut scales[col * k_blocks..(col + 1) * k_blocks],
            &mut zps[col * zp_row..(col + 1) * zp_row],
        );
    }
    PackedInt4 {
        data,
        scales,
        zero_points: (!symmetric).then_some(zps),
        k_blocks,
    }
}

/// The `[K, N]` row-major float weight a `MatMulNBits` computes with: `(q - zp) * scale` for
/// each code of `data` (`[N, k_blocks, block_size / 2]`), `scales` (`[N, k_blocks]`) and
/// `zero_points` (`[N, ceil(k_blocks / 2)]`, 8 when absent). `None` when the lengths do not
/// fit `k`, `n` and `block_size`.
pub fn dequantize(
    data: &[u8],
    scales: &[f32],
    zero_points: Option<&[u8]>,
    k: usize,
    n: usize,
    block_size: usize,
) -> Option<Vec<f32>> {
    let k_blocks = k.div_ceil(block_size);
    let zp_row = k_blocks.div_ceil(2);
    if !block_size.is_multiple_of(2)
        || data.len() != n * k_blocks * block_size / 2
        || scales.len() != n * k_blocks
        || zero_points.is_some_and(|z| z.len() != n * zp_row)
    {
        return None;
    }
    let mut w = vec![0f32; k * n];
    for col in 0..n {
        for kk in 0..k {
            let b = kk / block_size;
            let byte = data[(col * k_blocks + b) * block_size / 2 + (kk % block_size) / 2];
            let q = (byte >> (4 * (kk % 2))) & 15;
            let zp = zero_points.map_or(8, |z| (z[col * zp_row + b / 2] >> (4 * (b % 2))) & 15);
            w[kk * n + col] = (f32::from(q) - f32::from(zp)) * scales[col * k_blocks + b];
        }
    }
    Some(w)
}

/// A MatMul weight found in the graph: its initializer and whether the MatMul sees it through
/// a `Transpose` (perm `[1, 0]`) node.
struct WeightRef {
    init: usize,
    transpose_node: Option<usize>,
}

/// Rewrites MatMuls with constant float weights into `MatMulNBits` (4 bits).
///
/// A MatMul (default domain) qualifies when its B is a 2-D float32 initializer `[K, N]`, or
/// the output of a `Transpose` (perm `[1, 0]`) of a 2-D float32 initializer `[N, K]` (a plain
/// ferry export). The `MatMulNBits` node keeps the MatMul's name and output; a bias `Add`
/// after it stays as it is. Transposes and float weights nothing else uses are removed. A
/// weight shared by several MatMuls is quantized once.
///
/// A merged decoder ([`ferry_ir::split_merged`]) is rewritten as its two decoders, merged
/// again (stats summed).
pub fn quantize_int4(graph: &mut Graph, opts: &Int4Options) -> Result<Int4Stats, QuantizeError> {
    if let Some(parts) = ferry_ir::map_merged(graph, |g| quantize_int4(g, opts)) {
        let (a, b) = parts?;
        return Ok(a + b);
    }
    crate::no_subgraphs(graph)?;
    let bs = opts.block_size;
    if bs < 16 || !bs.is_power_of_two() {
        return Err(QuantizeError::Invalid(format!(
            "int4 block size must be a power of two ≥ 16, got {bs}"
        )));
    }
    if let Some(level) = opts.accuracy_level
        && !(0..=4).contains(&level)
    {
        return Err(QuantizeError::Invalid(format!(
            "int4 accuracy level must be 0..=4, got {level}"
        )));
    }
    let mut stats = Int4Stats {
        block_size: bs,
        symmetric: opts.symmetric,
        ..Int4Stats::default()
    };
    let exclude: HashSet<&str> = opts.exclude.iter().map(String::as_str).collect();
    let init_index: HashMap<String, usize> = graph
        .initializers
        .iter()
        .enumerate()
        .map(|(i, t)| (t.name.clone(), i))
        .collect();
    let producer: HashMap<&str, usize> = graph
        .nodes
        .iter()
        .enumerate()
        .flat_map(|(i, n)| n.outputs.iter().map(move |o| (o.as_str(), i)))
        .collect();
    let is_weight = |i: usize| {
        let t = &graph.initializers[i];
        t.dtype == DType::F32 && t.dims.len() == 2 && t.dims.iter().all(|&d| d > 0)
    };

    // Find the MatMuls to rewrite.
    let mut targets: Vec<(usize, WeightRef)> = Vec::new();
    for (ni, node) in graph.nodes.iter().enumerate() {
        if node.op_type != "MatMul" || !(node.domain.is_empty() || node.domain == "ai.onnx") {
            continue;
        }
        if exclude.contains(node.name.as_str()) {
            stats.excluded += 1;
            continue;
        }
        let Some(b) = node.inputs.get(1) else {
            stats.skipped += 1;
            continue;
        };
        let found = if let Some(&i) = init_index.get(b) {
            is_weight(i).then_some(WeightRef {
                init: i,
                transpose_node: None,
            })
        } else if let Some(&ti) = producer.get(b.as_str()) {
            let t = &graph.nodes[ti];
            let perm_ok = match t.attr("perm") {
                Some(Attr::Ints(p)) => p.as_slice() == [1, 0],
                None => true,
                _ => false,
            };
            match (t.op_type.as_str(), t.domain.is_empty(), t.inputs.first()) {
                ("Transpose", true, Some(src)) if perm_ok => init_index
                    .get(src)
                    .copied()
                    .filter(|&i| is_weight(i))
                    .map(|i| WeightRef {
                        init: i,
                        transpose_node: Some(ti),
                    }),
                _ => None,
            }
        } else {
            None
        };
        match found {
            Some(w) => targets.push((ni, w)),
            None => stats.skipped += 1,
        }
    }
    if targets.is_empty() {
        return Ok(stats);
    }

    // Quantize each distinct (weight, layout) once.
    let mut new_inits: Vec<Initializer> = Vec::new();
    let mut done: HashMap<(usize, bool), (Vec<String>, i64, i64)> = HashMap::new();
    let mut taken = taken_names(graph);
    let mut touched_transposes: HashSet<usize> = HashSet::new();
    let mut touched_inits: HashSet<usize> = HashSet::new();
    let mut replacements: BTreeMap<usize, Node> = BTreeMap::new();
    for (ni, w) in &targets {
        let transposed = w.transpose_node.is_some();
        let key = (w.init, transposed);
        if let Entry::Vacant(slot) = done.entry(key) {
            let t = &graph.initializers[w.init];
            let io = |source| QuantizeError::Io {
                name: t.name.clone(),
                source,
            };
            let (d0, d1) = f32_matrix_dims(t)?;
            // `[N, K]` rows are the columns of B: a `[K, N]` B is read through a transposed
            // view. Nothing is quantized here; the writer computes the bytes band by band.
            let (k, n, wt) = if transposed {
                (d1, d0, t.data.clone())
            } else {
                let view =
                    TensorData::transposed(t.data.clone(), &[d0, d1], &[1, 0], 4).map_err(io)?;
                (d0, d1, view)
            };
            let p = lazy_int4(wt, k, bs, opts.symmetric);
            stats.float_bytes += t.data.len();
            let base = if transposed {
                format!("{}_T", t.name)
            } else {
                t.name.clone()
            };
            let (n64, kb64) = (n as i64, p.k_blocks as i64);
            let mut names = Vec::new();
            let mut add = |suffix: &str, dtype: DType, dims: Vec<i64>, data: TensorData| {
                stats.quantized_bytes += data.len();
                let want = format!("{base}_{suffix}");
                names.push(push_initializer(
                    &mut taken,
                    &mut new_inits,
                    &want,
                    dtype,
                    dims,
                    data,
                ));
            };
            add("Q4", DType::U8, vec![n64, kb64, (bs / 2) as i64], p.data);
            add("scales", DType::F32, vec![n64, kb64], p.scales);
            if let Some(z) = p.zero_points {
                add("zero_points", DType::U8, vec![n64, (kb64 + 1) / 2], z);
            }
            slot.insert((names, k as i64, n as i64));
        }
        let (names, k, n) = &done[&key];
        let mm = &graph.nodes[*ni];
        let mut inputs = vec![mm.inputs[0].clone()];
        inputs.extend(names.iter().cloned());
        replacements.insert(*ni, matmul_nbits(mm, inputs, *k, *n, bs, opts));
        stats.matmuls_quantized += 1;
        touched_inits.insert(w.init);
        if let Some(t) = w.transpose_node {
            touched_transposes.insert(t);
        }
    }
    for (ni, node) in replacements {
        graph.nodes[ni] = node;
    }
    graph.initializers.extend(new_inits);

    // Drop the Transposes and float weights nothing reads any more.
    let graph_outputs: HashSet<String> = graph.outputs.iter().map(|v| v.name.clone()).collect();
    let mut remove = vec![false; graph.nodes.len()];
    loop {
        let used = used_names(graph, &remove);
        let mut changed = false;
        for &t in &touched_transposes {
            if !remove[t]
                && graph.nodes[t]
                    .outputs
                    .iter()
                    .all(|o| !used.contains(o.as_str()) && !graph_outputs.contains(o))
            {
                remove[t] = true;
                changed = true;
            }
        }
        if !changed {
            break;
        }
    }
    let used: HashSet<String> = used_names(graph, &remove)
        .into_iter()
        .map(str::to_string)
        .collect();
    let dead_inits: HashSet<String> = touched_inits
        .iter()
        .map(|&i| graph.initializers[i].name.clone())
        .filter(|name| !used.contains(name) && !graph_outputs.contains(name))
        .collect();
    let removed_values: HashSet<String> = graph
        .nodes
        .iter()
        .zip(&remove)
        .filter(|(_, r)| **r)
        .flat_map(|(n, _)| n.outputs.iter().cloned())
        .collect();
    let mut idx = 0;
    graph.nodes.retain(|_| {
        let keep = !remove[idx];
        idx += 1;
        keep
    });
    graph.initializers.retain(|t| !dead_inits.contains(&t.name));
    graph
        .value_info
        .retain(|v| !removed_values.contains(&v.name));
    ensure_opset(graph, "com.microsoft", 1);
    Ok(stats)
}

/// The `MatMulNBits` node (4 bits) replacing MatMul `mm`, reading `inputs` (A, then the
/// packed weight, scales and optional zero points), with `accuracy_level` from `opts`.
pub(crate) fn matmul_nbits(
    mm: &Node,
    inputs: Vec<String>,
    k: i64,
    n: i64,
    block_size: usize,
    opts: &Int4Options,
) -> Node {
    let mut attrs = BTreeMap::new();
    attrs.insert("K".to_string(), Attr::Int(k));
    attrs.insert("N".to_string(), Attr::Int(n));
    attrs.insert("bits".to_string(), Attr::Int(4));
    attrs.insert("block_size".to_string(), Attr::Int(block_size as i64));
    if let Some(level) = opts.accuracy_level.filter(|&l| l != 0) {
        attrs.insert("accuracy_level".to_string(), Attr::Int(level));
    }
    Node {
        name: mm.name.clone(),
        op_type: "MatMulNBits".into(),
        domain: "com.microsoft".into(),
        inputs,
        outputs: mm.outputs.clone(),
        attrs,
    }
}

/// Names read by the nodes not marked removed.
fn used_names<'a>(graph: &'a Graph, removed: &[bool]) -> HashSet<&'a str> {
    graph
        .nodes
        .iter()
        .zip(removed)
        .filter(|(_, r)| !**r)
        .flat_map(|(n, _)| n.inputs.iter().map(String::as_str))
        .collect()
}

/// Adds an opset import for `domain` unless the graph has one.
pub(crate) fn ensure_opset(graph: &mut Graph, domain: &str, version: i64) {
    if !graph.opsets.iter().any(|o| o.domain == domain) {
        graph.opsets.push(OpsetImport {
            domain: domain.to_string(),
            version,
        });
    }
}

/// Adds an initializer named `want` (or a free variant of it, see [`unique`]) to `inits`;
/// returns its name.
pub(crate) fn push_initializer(
    taken: &mut HashSet<String>,
    inits: &mut Vec<Initializer>,
    want: &str,
    dtype: DType,
    dims: Vec<i64>,
    data: TensorData,
) -> String {
    let name = unique(taken, want);
    inits.push(Initializer {
        name: name.clone(),
        dtype,
        dims,
        data,
    });
    name
}

/// Every name the graph already uses (initializers, node outputs, inputs), for [`unique`].
pub(crate) fn taken_names(graph: &Graph) -> HashSet<String> {
    graph
        .initializers
        .iter()
        .map(|t| t.name.clone())
        .chain(graph.nodes.iter().flat_map(|n| n.outputs.iter().cloned()))
        .chain(graph.inputs.iter().map(|v| v.name.clone()))
        .collect()
}

/// The two dims of a 2-D float32 initializer, checked against its byte length.
pub(crate) fn f32_matrix_dims(t: &Initializer) -> Result<(usize, usize), QuantizeError> {
    let (d0, d1) = (dim(t.dims[0])?, dim(t.dims[1])?);
    let expected = (d0 as u64).saturating_mul(d1 as u64).saturating_mul(4);
    if t.data.len() != expected {
        return Err(QuantizeError::Invalid(format!(
            "initializer `{}` has {} bytes, its float32 shape {:?} needs {expected}",
            t.name,
            t.data.len(),
            t.dims,
        )));
    }
    Ok((d0, d1))
}

/// `want`, or `want_1`, `want_2`… whichever is not yet taken (and takes it).
pub(crate) fn unique(taken: &mut HashSet<String>, want: &str) -> String {
    let mut name = want.to_string();
    let mut i = 1;
    while taken.contains(&name) {
        name = format!("{want}_{i}");
        i += 1;
    }
    taken.insert(name.clone());
    name
}

pub(crate) fn dim(d: i64) -> Result<usize, QuantizeError> {
    usize::try_from(d).map_err(|_| QuantizeError::Invalid(format!("negative dimension {d}")))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use ferry_ir::{Dim, Value};

    /// `[rows, cols]` row-major → `[cols, rows]` row-major.
    fn transpose(v: &[f32], rows: usize, cols: usize) -> Vec<f32> {
        let mut out = vec![0f32; v.len()];
        for r in 0..rows {
            for c in 0..cols {
                out[c * rows + r] = v[r * cols + c];
            }
        }
        out
    }

    /// The `[K, N]` test weight: `((k*37 + n*101) % 61 - 30) / 8 + n/2`, exact in float32.
    fn test_weight(k: usize, n: usize) -> Vec<f32> {
        let mut w = Vec::with_capacity(k * n);
        for kk in 0..k {
            for nn in 0..n {
                w.push(((kk * 37 + nn * 101) % 61) as f32 / 8.0 - 30.0 / 8.0 + nn as f32 * 0.5);
            }
        }
        w
    }

    // Reference values from ONNX Runtime 1.32's `quantize_matmul_4bits` (the C++ kernel
    // `MatMulNBitsQuantizer` calls for its default QOperator format; the full
    // `MatMulNBitsQuantizer(..., DefaultWeightOnlyQuantConfig(block_size=16, is_symmetric=...))`
    // on a one-MatMul model gives the same bytes, shapes [2, 2, 8], [2, 2], [2, 1] and names
    // `W_Q4`, `W_scales`, `W_zero_points`), run as
    // `quantize_matmul_4bits(packed, np.pad(w, ((0, 12), (0, 0))), scales, zp, 16, 2, 20,
    // is_symmetric)` on `test_weight(20, 2)` (K = 20, N = 2, block 16: two blocks per column,
    // the second padded), with `packed`, `scales` and `zp` zero-initialised numpy arrays of
    // shapes [2, 2, 8], [2, 2] and [2, 1]. It printed the scales as float64 reprs of float32s
    // (0.44999998807907104, 0.3083333373069763, 0.4333333373069763, 0.4000000059604645), the
    // float32 literals below.
    #[test]
    fn packing_matches_onnxruntime_bytes() {
        let (k, n) = (20, 2);
        let wt = transpose(&test_weight(k, n), k, n);
        let sym = quantize_columns(&wt, k, n, 16, true);
        assert_eq!(
            sym.data,
            [
                160, 211, 23, 74, 126, 177, 229, 40, 180, 112, 0, 0, 0, 0, 0, 0, 180, 113, 77, 26,
                215, 163, 96, 60, 9, 198, 0, 0, 0, 0, 0, 0
            ]
        );
        assert_eq!(sym.scales, [0.46875, -0.40625, -0.484375, -0.515625]);
        assert_eq!(sym.zero_points, None);
        let asym = quantize_columns(&wt, k, n, 16, false);
        assert_eq!(
            asym.data,
            [
                160, 227, 7, 75, 126, 177, 244, 24, 9, 95, 0, 0, 0, 0, 0, 0, 58, 126, 176, 228, 23,
                75, 143, 193, 244, 8, 0, 0, 0, 0, 0, 0
            ]
        );
        assert_eq!(asym.scales, [0.45, 0.308_333_34, 0.433_333_34, 0.4]);
        assert_eq!(asym.zero_points, Some(vec![72, 86]));
    }

    // `MatMulNBitsQuantizer(model, algo_config=DefaultWeightOnlyQuantConfig(block_size=16,
    // is_symmetric=...)).process()` (ONNX Runtime 1.32) on a one-MatMul model whose weight is
    // `test_weight(21, 2)`: K odd, so the last code byte of each column holds one code and an
    // unused high nibble. ONNX Runtime leaves a stale value in that nibble (it repeats the
    // preceding byte's high nibble here, and differs in other shapes); ferry writes 0 there,
    // and MatMulNBits never reads it. The reference bytes below have it masked to 0 (bytes
    // 10 and 26: ONNX Runtime wrote 127 and 195 symmetric, 128 and 12 asymmetric).
    #[test]
    fn odd_k_matches_onnxruntime_quantizer() {
        let (k, n) = (21, 2);
        let wt = transpose(&test_weight(k, n), k, n);
        let sym = quantize_columns(&wt, k, n, 16, true);
        assert_eq!(
            sym.data,
            [
                160, 211, 23, 74, 126, 177, 229, 40, 180, 112, 15, 0, 0, 0, 0, 0, 180, 113, 77, 26,
                215, 163, 96, 60, 9, 198, 3, 0, 0, 0, 0, 0
            ]
        );
        assert_eq!(sym.scales, [0.46875, -0.40625, -0.484375, -0.515625]);
        let asym = quantize_columns(&wt, k, n, 16, false);
        assert_eq!(
            asym.data,
            [
                160, 227, 7, 75, 126, 177, 244, 24, 75, 143, 0, 0, 0, 0, 0, 0, 58, 126, 176, 228,
                23, 75, 143, 193, 244, 8, 12, 0, 0, 0, 0, 0
            ]
        );
        assert_eq!(asym.scales, [0.45, 0.4, 0.433_333_34, 0.4]);
        assert_eq!(asym.zero_points, Some(vec![120, 86]));
    }

    // Same call with K = 40 (three blocks of 16): ONNX Runtime fills the unused high nibble
    // of each column's last zero-point byte with 8: zp [[104, 137], [118, 135]].
    #[test]
    fn odd_block_count_zero_points_match_onnxruntime() {
        let (k, n) = (40, 2);
        let wt = transpose(&test_weight(k, n), k, n);
        let asym = quantize_columns(&wt, k, n, 16, false);
        assert_eq!(asym.zero_points, Some(vec![104, 137, 118, 135]));
        assert_eq!(&asym.data[16..24], [8, 75, 143, 193, 0, 0, 0, 0]);
        let sym = quantize_columns(&wt, k, n, 16, true);
        assert_eq!(&sym.data[16..24], [7, 74, 126, 177, 0, 0, 0, 0]);
    }

    /// Dequantizing gives back each weight within half a step of its block, except that a
    /// symmetric block reaches only 7 steps on the side opposite its largest value (code 15),
    /// where up to one step is lost.
    #[test]
    fn dequantized_weights_stay_within_their_step() {
        let (k, n, bs) = (37, 5, 32);
        let w: Vec<f32> = (0..k * n)
            .map(|i| ((i * 7919) % 1000) as f32 / 300.0 - 1.7)
            .collect();
        for symmetric in [true, false] {
            let p = quantize_columns(&w, k, n, bs, symmetric);
            let deq = dequantize(&p.data, &p.scales, p.zero_points.as_deref(), k, n, bs);
            let Some(deq) = deq else {
                panic!("layout lengths")
            };
            for col in 0..n {
                for kk in 0..k {
                    let b = kk / bs;
                    let byte = p.data[(col * p.k_blocks + b) * bs / 2 + (kk % bs) / 2];
                    let q = (byte >> (4 * (kk % 2))) & 15;
                    let scale = p.scales[col * p.k_blocks + b];
                    let back = deq[kk * n + col];
                    let x = w[col * k + kk];
                    let steps = if symmetric && q == 15 { 1.0 } else { 0.5 };
                    assert!(
                        (back - x).abs() <= scale.abs() * steps + 1e-6,
                        "sym {symmetric} col {col} k {kk}: {x} → {back} (scale {scale})"
                    );
                }
            }
        }
        assert!(dequantize(&[0; 3], &[1.0], None, 4, 1, 16).is_none());
        assert!(dequantize(&[0; 8], &[1.0], Some(&[]), 4, 1, 16).is_none());
    }

    /// A default-domain node (also used by the other quantizers' tests).
    pub(crate) fn node(name: &str, op: &str, inputs: &[&str], outputs: &[&str]) -> Node {
        Node {
            name: name.into(),
            op_type: op.into(),
            domain: String::new(),
            inputs: inputs.iter().map(|s| s.to_string()).collect(),
            outputs: outputs.iter().map(|s| s.to_string()).collect(),
            attrs: BTreeMap::new(),
        }
    }

    fn weight(name: &str, dims: [i64; 2]) -> Initializer {
        let n = (dims[0] * dims[1]) as usize;
        let v: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
        Initializer {
            name: name.into(),
            dtype: DType::F32,
            dims: dims.to_vec(),
            data: TensorData::from_f32(&v),
        }
    }

    /// x → MatMul(W [8, 4]) → MatMul(Transpose(V [4, 8])) → MatMul(x2) (activation B, left)
    fn tiny_graph() -> Graph {
        let mut t = node("t", "Transpose", &["V"], &["Vt"]);
        t.attrs.insert("perm".into(), Attr::Ints(vec![1, 0]));
        Graph {
            name: "g".into(),
            inputs: vec![Value::new("x", DType::F32, vec![Dim::sym("b"), 8.into()])],
            outputs: vec![Value::new("z", DType::F32, vec![Dim::sym("b"), 8.into()])],
            nodes: vec![
                node("mm0", "MatMul", &["x", "W"], &["y"]),
                t,
                node("mm1", "MatMul", &["y", "Vt"], &["y2"]),
                node("mm2", "MatMul", &["y2", "y2"], &["z"]),
            ],
            initializers: vec![weight("W", [8, 4]), weight("V", [8, 4])],
            value_info: vec![Value::new("Vt", DType::F32, vec![4.into(), 8.into()])],
            opsets: vec![OpsetImport {
                domain: String::new(),
                version: 17,
            }],
        }
    }

    #[test]
    fn rewrites_plain_and_transposed_weights() -> Result<(), QuantizeError> {
        let mut g = tiny_graph();
        let stats = quantize_int4(
            &mut g,
            &Int4Options {
                block_size: 16,
                ..Default::default()
            },
        )?;
        assert_eq!((stats.matmuls_quantized, stats.skipped), (2, 1));
        let ops: Vec<&str> = g.nodes.iter().map(|n| n.op_type.as_str()).collect();
        assert_eq!(ops, ["MatMulNBits", "MatMulNBits", "MatMul"]);
        let mm1 = &g.nodes[1];
        assert_eq!(mm1.inputs, ["y", "V_T_Q4", "V_T_scales", "V_T_zero_points"]);
        assert!(matches!(mm1.attr("K"), Some(Attr::Int(4))));
        assert!(matches!(mm1.attr("N"), Some(Attr::Int(8))));
        assert!(matches!(mm1.attr("block_size"), Some(Attr::Int(16))));
        assert!(mm1.attr("accuracy_level").is_none());
        let names: Vec<&str> = g.initializers.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "W_Q4",
                "W_scales",
                "W_zero_points",
                "V_T_Q4",
                "V_T_scales",
                "V_T_zero_points"
            ]
        );
        let q = &g.initializers[0];
        assert_eq!((q.dtype, q.dims.as_slice()), (DType::U8, &[4i64, 1, 8][..]));
        assert_eq!(g.initializers[1].dims, [4, 1]);
        assert_eq!(g.initializers[2].dims, [4, 1]);
        assert!(g.value_info.is_empty());
        assert!(g.opsets.iter().any(|o| o.domain == "com.microsoft"));
        Ok(())
    }

    #[test]
    fn excluded_and_shared_weights() -> Result<(), QuantizeError> {
        let mut g = tiny_graph();
        // V is also read directly elsewhere: it must stay, the Transpose goes.
        g.nodes.push(node("keep", "Identity", &["V"], &["v_out"]));
        let stats = quantize_int4(
            &mut g,
            &Int4Options {
                block_size: 32,
                symmetric: true,
                exclude: vec!["mm0".into()],
                accuracy_level: Some(4),
            },
        )?;
        assert_eq!((stats.matmuls_quantized, stats.excluded), (1, 1));
        assert_eq!(g.nodes[0].op_type, "MatMul");
        assert_eq!(g.nodes[1].inputs, ["y", "V_T_Q4", "V_T_scales"]);
        assert!(matches!(
            g.nodes[1].attr("accuracy_level"),
            Some(Attr::Int(4))
        ));
        assert!(g.nodes.iter().all(|n| n.op_type != "Transpose"));
        assert!(g.initializers.iter().any(|t| t.name == "V"));
        assert!(g.initializers.iter().any(|t| t.name == "W"));
        Ok(())
    }

    #[test]
    fn bad_options_are_errors() {
        for bs in [0, 8, 24, 100] {
            let r = quantize_int4(
                &mut tiny_graph(),
                &Int4Options {
                    block_size: bs,
                    ..Default::default()
                },
            );
            assert!(matches!(r, Err(QuantizeError::Invalid(_))), "{bs}");
        }
        let r = quantize_int4(
            &mut tiny_graph(),
            &Int4Options {
                accuracy_level: Some(7),
                ..Default::default()
            },
        );
        assert!(matches!(r, Err(QuantizeError::Invalid(_))));
        // A weight whose bytes do not fill its shape.
        let mut g = tiny_graph();
        g.initializers[0].data = TensorData::from_f32(&[1.0; 5]);
        let r = quantize_int4(&mut g, &Int4Options::default());
        assert!(matches!(r, Err(QuantizeError::Invalid(m)) if m.contains("`W`")));
    }
}
