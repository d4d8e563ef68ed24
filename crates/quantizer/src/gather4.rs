//! int4 embedding tables: a `Gather` of a constant float32 `[V, H]` table becomes ONNX
//! Runtime's `GatherBlockQuantized` (`com.microsoft`), 4 bits per value in blocks along H.
//!
//! The table is quantized row by row exactly as [`crate::int4`] quantizes a `MatMulNBits`
//! weight column by column (the same codes, scales and zero points), because a tied LM head
//! (`MatMul(x, Transpose(table))`, as decoder LLMs with `tie_word_embeddings` export) reads
//! the same table: both then share **one** quantized copy, as onnxruntime-genai's model
//! builder does. A MatMul whose B is an initializer holding exactly the transposed table
//! (the Transpose folded by `ferry optimize`, or a tied weight an exporter duplicated;
//! compared bit for bit, band by band) shares it the same way. The LM head becomes `MatMulNBits` (`K = H`, `N = V`) over the codes
//! `[V, k_blocks, block_size / 2]`; the lookup reads them through a `Reshape` to
//! `[V, k_blocks · block_size / 2]`. An untied table gets its codes stored 2-D directly.
//!
//! `GatherBlockQuantized` (ONNX Runtime's CPU kernel, uint8 data with `bits = 4`):
//! `gather_axis = 0`, `quantize_axis = 1` (the last axis, required for uint8 data), codes
//! packed two per byte low nibble first along that axis, `scales` `[V, k_blocks]` of the
//! output's float type, optional `zero_points` uint8 `[V, ceil(k_blocks / 2)]` packed like
//! `MatMulNBits`' (absent: 8). A row is `(code − zero point) · scale`, the same values
//! `MatMulNBits` computes with. When H is not a multiple of the block size the gathered rows
//! carry the zero padding of the last block, and a `Slice` keeps the first H values.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;

use ferry_ir::{Attr, DType, Graph, Initializer, Node, TensorData};

use crate::QuantizeError;
use crate::int4::{
    Int4Options, dim, ensure_opset, f32_matrix_dims, push_initializer, taken_names, unique,
};
use crate::int4_lazy::lazy_int4;

/// What [`quantize_gathers`] changed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Gather4Stats {
    /// `Gather`s rewritten to `GatherBlockQuantized`.
    pub gathers: usize,
    /// Tied MatMuls (`MatMul(x, Transpose(table))`) rewritten to `MatMulNBits` over the same
    /// quantized table.
    pub tied_matmuls: usize,
    /// Bytes of the float tables replaced.
    pub float_bytes: u64,
    /// Bytes of the codes, scales and zero points that replaced them.
    pub quantized_bytes: u64,
}

impl fmt::Display for Gather4Stats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} Gather → GatherBlockQuantized ({} tied MatMul sharing the table); tables {} → {} bytes",
            self.gathers, self.tied_matmuls, self.float_bytes, self.quantized_bytes
        )
    }
}

/// One embedding table to quantize and who reads it.
struct Table {
    init: usize,
    gathers: Vec<usize>,
    /// MatMuls reading the table transposed.
    tied: Vec<usize>,
    /// Initializers holding the transposed table for some of them.
    copies: Vec<usize>,
}

/// Rewrites `Gather`s of constant float32 `[V, H]` tables (axis 0) into
/// `GatherBlockQuantized`, and MatMuls that read the same table through a `Transpose`
/// (perm `[1, 0]`) into `MatMulNBits` sharing its quantized codes. Run it before
/// [`crate::int4::quantize_int4`], which then quantizes the remaining MatMuls.
/// `opts.exclude` names Gather or MatMul nodes left in float; a table read by an excluded
/// node, or by anything else than such Gathers and tied MatMuls, keeps its float copy for
/// those readers.
pub fn quantize_gathers(
    graph: &mut Graph,
    opts: &Int4Options,
) -> Result<Gather4Stats, QuantizeError> {
    let bs = opts.block_size;
    if bs < 16 || !bs.is_power_of_two() {
        return Err(QuantizeError::Invalid(format!(
            "int4 block size must be a power of two ≥ 16, got {bs}"
        )));
    }
    let mut stats = Gather4Stats::default();
    let exclude: HashSet<&str> = opts.exclude.iter().map(String::as_str).collect();
    let init_index: HashMap<&str, usize> = graph
        .initializers
        .iter()
        .enumerate()
        .map(|(i, t)| (t.name.as_str(), i))
        .collect();
    let is_table = |i: usize| {
        let t = &graph.initializers[i];
        t.dtype == DType::F32 && t.dims.len() == 2 && t.dims.iter().all(|&d| d > 0)
    };
    let default_domain = |n: &Node| n.domain.is_empty() || n.domain == "ai.onnx";

    let mut tables: BTreeMap<usize, Table> = BTreeMap::new();
    for (ni, node) in graph.nodes.iter().enumerate() {
        if node.op_type != "Gather" || !default_domain(node) || exclude.contains(node.name.as_str())
        {
            continue;
        }
        let axis_ok = match node.attr("axis") {
            None => true,
            Some(Attr::Int(a)) => *a == 0 || *a == -2,
            _ => false,
        };
        let Some(&ti) = node.inputs.first().and_then(|d| init_index.get(d.as_str())) else {
            continue;
        };
        if axis_ok && node.inputs.len() == 2 && node.outputs.len() == 1 && is_table(ti) {
            tables
                .entry(ti)
                .or_insert_with(|| Table {
                    init: ti,
                    gathers: Vec::new(),
                    tied: Vec::new(),
                    copies: Vec::new(),
                })
                .gathers
                .push(ni);
        }
    }
    if tables.is_empty() {
        return Ok(stats);
    }
    // Tied readers: MatMul(x, Transpose(table)).
    let transposes: HashMap<&str, (usize, usize)> = graph
        .nodes
        .iter()
        .enumerate()
        .filter(|(_, n)| n.op_type == "Transpose" && default_domain(n) && n.outputs.len() == 1)
        .filter(|(_, n)| match n.attr("perm") {
            Some(Attr::Ints(p)) => p.as_slice() == [1, 0],
            None => true,
            _ => false,
        })
        .filter_map(|(i, n)| {
            let ti = *init_index.get(n.inputs.first()?.as_str())?;
            Some((n.outputs[0].as_str(), (i, ti)))
        })
        .collect();
    for (ni, node) in graph.nodes.iter().enumerate() {
        if node.op_type != "MatMul"
            || !default_domain(node)
            || exclude.contains(node.name.as_str())
            || node.inputs.len() != 2
        {
            continue;
        }
        if let Some(&(_, ti)) = transposes.get(node.inputs[1].as_str())
            && let Some(t) = tables.get_mut(&ti)
        {
            t.tied.push(ni);
        } else if let Some(&bi) = init_index.get(node.inputs[1].as_str()) {
            // A B that holds the table's transpose as its own initializer (an optimizer
            // folded the Transpose, or the exporter duplicated the tied weight): shared only
            // when it is bit for bit the transposed table.
            let b = &graph.initializers[bi];
            for t in tables.values_mut() {
                let table = &graph.initializers[t.init];
                if b.dtype == DType::F32
                    && b.dims.len() == 2
                    && b.dims[0] == table.dims[1]
                    && b.dims[1] == table.dims[0]
                    && is_transpose_of(&b.data, &table.data, &table.dims).map_err(|source| {
                        QuantizeError::Io {
                            name: b.name.clone(),
                            source,
                        }
                    })?
                {
                    t.tied.push(ni);
                    t.copies.push(bi);
                    break;
                }
            }
        }
    }

    let mut taken = taken_names(graph);
    let mut new_inits: Vec<Initializer> = Vec::new();
    let mut replaced: BTreeMap<usize, Vec<Node>> = BTreeMap::new();
    let mut touched: Vec<usize> = Vec::new();
    for table in tables.values() {
        let t = &graph.initializers[table.init];
        let (v, h) = f32_matrix_dims(t)?;
        // Rows of the table are the columns of the tied MatMul's B. Nothing is quantized
        // here: the writer computes the codes band by band.
        let p = lazy_int4(t.data.clone(), h, bs, opts.symmetric);
        stats.float_bytes += t.data.len();
        let (v64, kb) = (v as i64, p.k_blocks as i64);
        let row_bytes = kb * (bs as i64) / 2;
        let tied = !table.tied.is_empty();
        let mut add = |suffix: &str, dtype: DType, dims: Vec<i64>, data: TensorData| {
            stats.quantized_bytes += data.len();
            let want = format!("{}_{suffix}", t.name);
            push_initializer(&mut taken, &mut new_inits, &want, dtype, dims, data)
        };
        let codes_dims = if tied {
            vec![v64, kb, (bs / 2) as i64]
        } else {
            vec![v64, row_bytes]
        };
        let codes = add("Q4", DType::U8, codes_dims, p.data);
        let scales = add("scales", DType::F32, vec![v64, kb], p.scales);
        let zero_points = p
            .zero_points
            .map(|z| add("zero_points", DType::U8, vec![v64, (kb + 1) / 2], z));
        let mut quant_inputs = vec![scales];
        quant_inputs.extend(zero_points);

        let reshape_to = tied.then(|| {
            add(
                "Q4_shape",
                DType::I64,
                vec![2],
                TensorData::from_i64(&[v64, row_bytes]),
            )
        });
        let padded = p.k_blocks * bs != h;
        let slice_consts = padded.then(|| {
            let mut c =
                |suffix: &str, v: i64| add(suffix, DType::I64, vec![1], TensorData::from_i64(&[v]));
            [
                c("slice_start", 0),
                c("slice_end", h as i64),
                c("slice_axis", -1),
            ]
        });

        // The lookup's data: the codes, 2-D (through a Reshape when they are shared).
        let mut prefix: Vec<Node> = Vec::new();
        let data = match reshape_to {
            Some(shape) => {
                let out = unique(&mut taken, &format!("{}_Q4_2d", t.name));
                prefix.push(Node {
                    name: out.clone(),
                    op_type: "Reshape".into(),
                    domain: String::new(),
                    inputs: vec![codes.clone(), shape],
                    outputs: vec![out.clone()],
                    attrs: BTreeMap::new(),
                });
                out
            }
            None => codes.clone(),
        };
        for (k, &gi) in table.gathers.iter().enumerate() {
            let g = &graph.nodes[gi];
            let mut attrs = BTreeMap::new();
            attrs.insert("bits".to_string(), Attr::Int(4));
            attrs.insert("block_size".to_string(), Attr::Int(bs as i64));
            attrs.insert("gather_axis".to_string(), Attr::Int(0));
            attrs.insert("quantize_axis".to_string(), Attr::Int(1));
            let mut inputs = vec![data.clone(), g.inputs[1].clone()];
            inputs.extend(quant_inputs.iter().cloned());
            let mut nodes = if k == 0 {
                std::mem::take(&mut prefix)
            } else {
                Vec::new()
            };
            let gbq_out = match &slice_consts {
                Some(_) => unique(&mut taken, &format!("{}_padded", g.outputs[0])),
                None => g.outputs[0].clone(),
            };
            nodes.push(Node {
                name: g.name.clone(),
                op_type: "GatherBlockQuantized".into(),
                domain: "com.microsoft".into(),
                inputs,
                outputs: vec![gbq_out.clone()],
                attrs,
            });
            if let Some([start, end, axis]) = &slice_consts {
                nodes.push(Node {
                    name: unique(&mut taken, &format!("{}_slice", g.name)),
                    op_type: "Slice".into(),
                    domain: String::new(),
                    inputs: vec![gbq_out, start.clone(), end.clone(), axis.clone()],
                    outputs: g.outputs.clone(),
                    attrs: BTreeMap::new(),
                });
            }
            replaced.insert(gi, nodes);
            stats.gathers += 1;
        }
        for &mi in &table.tied {
            let mm = &graph.nodes[mi];
            let mut inputs = vec![mm.inputs[0].clone(), codes.clone()];
            inputs.extend(quant_inputs.iter().cloned());
            let node = crate::int4::matmul_nbits(mm, inputs, h as i64, v64, bs, opts);
            replaced.insert(mi, vec![node]);
            stats.tied_matmuls += 1;
        }
        touched.push(table.init);
        touched.extend(&table.copies);
    }

    // Splice the replacements in (a Reshape before the first lookup of a shared table).
    let old = std::mem::take(&mut graph.nodes);
    for (i, node) in old.into_iter().enumerate() {
        match replaced.remove(&i) {
            Some(nodes) => graph.nodes.extend(nodes),
            None => graph.nodes.push(node),
        }
    }
    graph.initializers.extend(new_inits);
    // Transposes of the tables and the float tables nothing reads any more.
    let graph_outputs: HashSet<String> = graph.outputs.iter().map(|v| v.name.clone()).collect();
    loop {
        let used: HashSet<&str> = graph
            .nodes
            .iter()
            .flat_map(|n| n.inputs.iter().map(String::as_str))
            .collect();
        let dead = graph.nodes.iter().position(|n| {
            n.op_type == "Transpose"
                && n.inputs
                    .first()
                    .is_some_and(|s| touched.iter().any(|&ti| graph.initializers[ti].name == *s))
                && n.outputs
                    .iter()
                    .all(|o| !used.contains(o.as_str()) && !graph_outputs.contains(o))
        });
        match dead {
            Some(i) => {
                let removed = graph.nodes.remove(i);
                graph
                    .value_info
                    .retain(|v| !removed.outputs.contains(&v.name));
            }
            None => break,
        }
    }
    let used: HashSet<String> = graph
        .nodes
        .iter()
        .flat_map(|n| n.inputs.iter().cloned())
        .collect();
    let dead: HashSet<String> = touched
        .iter()
        .map(|&i| graph.initializers[i].name.clone())
        .filter(|n| !used.contains(n) && !graph_outputs.contains(n))
        .collect();
    graph.initializers.retain(|t| !dead.contains(&t.name));
    ensure_opset(graph, "com.microsoft", 1);
    Ok(stats)
}

/// Whether two tensors are views of the very same bytes (same mapped range, same owned
/// buffer, same conversion or permutation of such): equal without reading them.
fn same_bytes(a: &TensorData, b: &TensorData) -> bool {
    use std::sync::Arc;
    match (a, b) {
        (
            TensorData::Mapped {
                file: f1,
                offset: o1,
                len: l1,
            },
            TensorData::Mapped {
                file: f2,
                offset: o2,
                len: l2,
            },
        ) => Arc::ptr_eq(f1, f2) && o1 == o2 && l1 == l2,
        (TensorData::Owned(x), TensorData::Owned(y)) => Arc::ptr_eq(x, y),
        (
            TensorData::Converted {
                source: s1,
                from: f1,
                to: t1,
            },
            TensorData::Converted {
                source: s2,
                from: f2,
                to: t2,
            },
        ) => f1 == f2 && t1 == t2 && (Arc::ptr_eq(s1, s2) || same_bytes(s1, s2)),
        (
            TensorData::Transposed {
                source: s1,
                dims: d1,
                perm: p1,
                elem: e1,
            },
            TensorData::Transposed {
                source: s2,
                dims: d2,
                perm: p2,
                elem: e2,
            },
        ) => d1 == d2 && p1 == p2 && e1 == e2 && (Arc::ptr_eq(s1, s2) || same_bytes(s1, s2)),
        _ => false,
    }
}

/// Whether `b` (float32 `[H, V]`) is the transpose of `table` (`[V, H]` = `dims`). A view of
/// the table's own bytes (a folded Transpose) is recognised without reading; otherwise the
/// two are compared band by band: a band of the table's rows, contiguous, against the same
/// columns of each row of `b`.
fn is_transpose_of(b: &TensorData, table: &TensorData, dims: &[i64]) -> std::io::Result<bool> {
    if b.len() != table.len() {
        return Ok(false);
    }
    let (v, h) = (
        dim(dims[0]).map_err(std::io::Error::other)?,
        dim(dims[1]).map_err(std::io::Error::other)?,
    );
    if same_bytes(
        &TensorData::transposed(b.clone(), &[h, v], &[1, 0], 4)?,
        table,
    ) {
        return Ok(true);
    }
    let rows = (ferry_ir::BAND_BYTES / 2 / (h * 4).max(1)).max(1);
    let (mut band, mut col) = (Vec::new(), Vec::new());
    let mut v0 = 0;
    while v0 < v {
        let n = rows.min(v - v0);
        band.resize(n * h * 4, 0);
        table.read_into((v0 * h * 4) as u64, &mut band)?;
        col.resize(n * 4, 0);
        for hh in 0..h {
            b.read_into(((hh * v + v0) * 4) as u64, &mut col)?;
            for (i, c) in col.chunks_exact(4).enumerate() {
                let at = (i * h + hh) * 4;
                if c != &band[at..at + 4] {
                    return Ok(false);
                }
            }
        }
        v0 += n;
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::int4::tests::node;
    use ferry_ir::{Dim, OpsetImport, Value};

    fn table(name: &str, v: usize, h: usize) -> Initializer {
        let vals: Vec<f32> = (0..v * h).map(|i| (i as f32 * 0.61).sin()).collect();
        Initializer {
            name: name.into(),
            dtype: DType::F32,
            dims: vec![v as i64, h as i64],
            data: TensorData::from_f32(&vals),
        }
    }

    /// ids → Gather(E) → MatMul(Transpose(E)) (tied LM head); ids → Gather(P) (untied).
    fn graph(h: usize) -> Graph {
        let mut t = node("t", "Transpose", &["E"], &["Et"]);
        t.attrs.insert("perm".into(), Attr::Ints(vec![1, 0]));
        Graph {
            name: "g".into(),
            inputs: vec![Value::new("ids", DType::I64, vec![Dim::sym("s")])],
            outputs: vec![
                Value::new("logits", DType::F32, vec![Dim::sym("s"), 12.into()]),
                Value::new("p", DType::F32, vec![Dim::sym("s"), (h as i64).into()]),
            ],
            nodes: vec![
                node("emb", "Gather", &["E", "ids"], &["x"]),
                t,
                node("head", "MatMul", &["x", "Et"], &["logits"]),
                node("pos", "Gather", &["P", "ids"], &["p"]),
            ],
            initializers: vec![table("E", 12, h), table("P", 5, h)],
            value_info: vec![],
            opsets: vec![OpsetImport {
                domain: String::new(),
                version: 17,
            }],
        }
    }

    fn opts(symmetric: bool) -> Int4Options {
        Int4Options {
            block_size: 16,
            symmetric,
            ..Default::default()
        }
    }

    #[test]
    fn tied_table_is_shared_by_lookup_and_lm_head() -> Result<(), QuantizeError> {
        let mut g = graph(32);
        let s = quantize_gathers(&mut g, &opts(false))?;
        assert_eq!((s.gathers, s.tied_matmuls), (2, 1));
        let ops: Vec<&str> = g.nodes.iter().map(|n| n.op_type.as_str()).collect();
        assert_eq!(
            ops,
            [
                "Reshape",
                "GatherBlockQuantized",
                "MatMulNBits",
                "GatherBlockQuantized"
            ]
        );
        let (reshape, gbq, mm) = (&g.nodes[0], &g.nodes[1], &g.nodes[2]);
        assert_eq!(reshape.inputs[0], "E_Q4");
        assert_eq!(mm.inputs, ["x", "E_Q4", "E_scales", "E_zero_points"]);
        assert_eq!(
            gbq.inputs,
            [
                reshape.outputs[0].as_str(),
                "ids",
                "E_scales",
                "E_zero_points"
            ]
        );
        assert_eq!(gbq.outputs, ["x"]);
        assert!(matches!(mm.attr("K"), Some(Attr::Int(32))));
        assert!(matches!(mm.attr("N"), Some(Attr::Int(12))));
        for (a, v) in [
            ("bits", 4),
            ("block_size", 16),
            ("gather_axis", 0),
            ("quantize_axis", 1),
        ] {
            assert!(matches!(gbq.attr(a), Some(Attr::Int(x)) if *x == v), "{a}");
        }
        let dims = |n: &str| {
            g.initializers
                .iter()
                .find(|t| t.name == n)
                .map(|t| t.dims.clone())
        };
        assert_eq!(dims("E_Q4"), Some(vec![12, 2, 8]));
        assert_eq!(dims("P_Q4"), Some(vec![5, 16]));
        assert_eq!(dims("E_zero_points"), Some(vec![12, 1]));
        // The float tables and the Transpose are gone.
        assert!(dims("E").is_none() && dims("P").is_none());
        assert!(g.opsets.iter().any(|o| o.domain == "com.microsoft"));
        Ok(())
    }

    /// The shared codes are the ones int4 gives the LM head on its own.
    #[test]
    fn codes_match_int4_of_the_transposed_table() -> Result<(), QuantizeError> {
        for symmetric in [true, false] {
            let mut a = graph(40);
            quantize_gathers(&mut a, &opts(symmetric))?;
            let mut b = graph(40);
            b.nodes.retain(|n| n.name != "emb" && n.name != "pos");
            crate::int4::quantize_int4(&mut b, &opts(symmetric))?;
            let bytes = |g: &Graph, n: &str| {
                g.initializers
                    .iter()
                    .find(|t| t.name == n)
                    .and_then(|t| t.data.bytes().ok().map(|b| b.to_vec()))
            };
            assert_eq!(bytes(&a, "E_Q4"), bytes(&b, "E_T_Q4"));
            assert_eq!(bytes(&a, "E_scales"), bytes(&b, "E_T_scales"));
            assert_eq!(bytes(&a, "E_zero_points"), bytes(&b, "E_T_zero_points"));
        }
        Ok(())
    }

    #[test]
    fn padded_rows_are_sliced_and_excluded_nodes_keep_float() -> Result<(), QuantizeError> {
        let mut g = graph(20);
        let s = quantize_gathers(
            &mut g,
            &Int4Options {
                exclude: vec!["pos".into()],
                ..opts(true)
            },
        )?;
        assert_eq!((s.gathers, s.tied_matmuls), (1, 1));
        let ops: Vec<&str> = g.nodes.iter().map(|n| n.op_type.as_str()).collect();
        assert_eq!(
            ops,
            [
                "Reshape",
                "GatherBlockQuantized",
                "Slice",
                "MatMulNBits",
                "Gather"
            ]
        );
        assert_eq!(g.nodes[2].outputs, ["x"]);
        assert_eq!(g.nodes[1].inputs.len(), 3, "symmetric: no zero points");
        assert!(g.initializers.iter().any(|t| t.name == "P"));
        Ok(())
    }

    /// The LM head's B stored as its own `[H, V]` initializer (a folded Transpose): shared
    /// when it is exactly the transposed table, quantized on its own by int4 otherwise.
    #[test]
    fn folded_transpose_is_shared_only_when_identical() -> Result<(), QuantizeError> {
        for change in [false, true] {
            let mut g = graph(32);
            let e = g.initializers[0]
                .data
                .to_f32_vec()
                .map_err(|e| QuantizeError::Io {
                    name: "E".into(),
                    source: e,
                })?;
            let mut et: Vec<f32> = (0..32 * 12).map(|i| e[(i % 12) * 32 + i / 12]).collect();
            if change {
                et[100] = f32::from_bits(et[100].to_bits() ^ 1);
            }
            g.initializers.push(Initializer {
                name: "Et_folded".into(),
                dtype: DType::F32,
                dims: vec![32, 12],
                data: TensorData::from_f32(&et),
            });
            g.nodes.retain(|n| n.op_type != "Transpose");
            g.nodes[1].inputs[1] = "Et_folded".into();
            let s = quantize_gathers(&mut g, &opts(true))?;
            assert_eq!(s.tied_matmuls, usize::from(!change), "changed: {change}");
            let kept = g.initializers.iter().any(|t| t.name == "Et_folded");
            assert_eq!(kept, change, "the copy goes only when shared");
        }
        Ok(())
    }

    #[test]
    fn bad_block_size_is_an_error() {
        let r = quantize_gathers(
            &mut graph(32),
            &Int4Options {
                block_size: 24,
                ..Default::default()
            },
        );
        assert!(matches!(r, Err(QuantizeError::Invalid(_))));
    }
}
