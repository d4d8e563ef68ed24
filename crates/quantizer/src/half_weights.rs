//! Half-precision weights seen through a `Cast` to float32 (`ferry export --dtype bf16`
//! stores bfloat16 weights and casts each where it is used, since ONNX Runtime's CPU
//! provider has no bfloat16 arithmetic): [`expose_half_weights`] turns such a cast weight
//! into a float32 initializer — the same values, converted lazily as the bytes are read —
//! so that int4 ([`crate::int4`], [`crate::gather4`]) quantizes it as it would a float32
//! weight.

use std::collections::{HashMap, HashSet};

use ferry_ir::{Attr, DType, Graph, Initializer, TensorData};

/// Replaces `Cast(to = float)` of a 2-D bfloat16/float16 initializer by a float32
/// initializer of the same name as the cast's output (its data the half tensor converted
/// when read), when every reader of that output is one int4 rewrites: a MatMul's B, a
/// Gather's table (when `gathers`: embedding tables are quantized too), or a `Transpose`
/// (perm `[1, 0]`) read only by MatMuls' B. The half initializer goes when nothing else
/// reads it. Returns how many weights were exposed.
pub fn expose_half_weights(graph: &mut Graph, gathers: bool) -> usize {
    let init_index: HashMap<String, usize> = graph
        .initializers
        .iter()
        .enumerate()
        .map(|(i, t)| (t.name.clone(), i))
        .collect();
    let mut readers: HashMap<&str, Vec<(usize, usize)>> = HashMap::new();
    for (ni, n) in graph.nodes.iter().enumerate() {
        for (k, i) in n.inputs.iter().enumerate() {
            readers.entry(i.as_str()).or_default().push((ni, k));
        }
    }
    let outputs: HashSet<&str> = graph.outputs.iter().map(|v| v.name.as_str()).collect();
    let plain = |n: &ferry_ir::Node| n.domain.is_empty() || n.domain == "ai.onnx";
    let matmul_b = |&(ni, k): &(usize, usize)| {
        let n = &graph.nodes[ni];
        n.op_type == "MatMul" && plain(n) && k == 1
    };
    let quantizable = |&(ni, k): &(usize, usize)| {
        let n = &graph.nodes[ni];
        if !plain(n) {
            return false;
        }
        match n.op_type.as_str() {
            "MatMul" => k == 1,
            "Gather" => gathers && k == 0,
            "Transpose" => {
                n.attr("perm")
                    .is_none_or(|p| matches!(p, Attr::Ints(p) if p.as_slice() == [1, 0]))
                    && n.outputs.len() == 1
                    && !outputs.contains(n.outputs[0].as_str())
                    && readers
                        .get(n.outputs[0].as_str())
                        .is_some_and(|r| r.iter().all(matmul_b))
            }
            _ => false,
        }
    };
    let mut exposed: Vec<(usize, Initializer)> = Vec::new();
    for (ni, n) in graph.nodes.iter().enumerate() {
        if n.op_type != "Cast"
            || !plain(n)
            || n.outputs.len() != 1
            || !matches!(n.attr("to"), Some(Attr::Int(1)))
            || outputs.contains(n.outputs[0].as_str())
        {
            continue;
        }
        let Some(&ti) = n.inputs.first().and_then(|i| init_index.get(i)) else {
            continue;
        };
        let t = &graph.initializers[ti];
        if !matches!(t.dtype, DType::BF16 | DType::F16) || t.dims.len() != 2 {
            continue;
        }
        let Some(r) = readers.get(n.outputs[0].as_str()) else {
            continue;
        };
        if !r.iter().all(quantizable) {
            continue;
        }
        let Some(data) = TensorData::converted(t.data.clone(), t.dtype, DType::F32) else {
            continue;
        };
        exposed.push((
            ni,
            Initializer {
                name: n.outputs[0].clone(),
                dtype: DType::F32,
                dims: t.dims.clone(),
                data,
            },
        ));
    }
    let count = exposed.len();
    if count == 0 {
        return 0;
    }
    let casts: HashSet<usize> = exposed.iter().map(|(ni, _)| *ni).collect();
    let names: HashSet<String> = exposed.iter().map(|(_, t)| t.name.clone()).collect();
    let mut i = 0;
    graph.nodes.retain(|_| {
        let keep = !casts.contains(&i);
        i += 1;
        keep
    });
    graph.value_info.retain(|v| !names.contains(&v.name));
    graph
        .initializers
        .extend(exposed.into_iter().map(|(_, t)| t));
    let used: HashSet<&str> = graph
        .nodes
        .iter()
        .flat_map(|n| n.inputs.iter().map(String::as_str))
        .chain(outputs.iter().copied())
        .collect();
    let dead: HashSet<String> = graph
        .initializers
        .iter()
        .filter(|t| matches!(t.dtype, DType::BF16 | DType::F16) && !used.contains(t.name.as_str()))
        .map(|t| t.name.clone())
        .collect();
    graph.initializers.retain(|t| !dead.contains(&t.name));
    count
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::int4::tests::node;
    use ferry_ir::{Dim, OpsetImport, Value};

    fn half(name: &str, dims: [i64; 2]) -> Initializer {
        let n = (dims[0] * dims[1]) as usize;
        let bytes: Vec<u8> = (0..n)
            .flat_map(|i| half::bf16::from_f32((i as f32 * 0.3).sin()).to_le_bytes())
            .collect();
        Initializer {
            name: name.into(),
            dtype: DType::BF16,
            dims: dims.to_vec(),
            data: TensorData::owned(bytes),
        }
    }

    fn cast(name: &str, input: &str) -> ferry_ir::Node {
        let mut c = node(name, "Cast", &[input], &[&format!("{input}_f32")]);
        c.attrs.insert("to".into(), Attr::Int(1));
        c
    }

    /// Gather(Cast(E)), MatMul(Transpose(Cast(W))), and a Cast(N) that an Add also reads.
    fn graph() -> Graph {
        let mut t = node("t", "Transpose", &["W_f32"], &["Wt"]);
        t.attrs.insert("perm".into(), Attr::Ints(vec![1, 0]));
        Graph {
            name: "g".into(),
            inputs: vec![Value::new("ids", DType::I64, vec![Dim::sym("s")])],
            outputs: vec![Value::new("z", DType::F32, vec![Dim::sym("s"), 8.into()])],
            nodes: vec![
                cast("ce", "E"),
                node("emb", "Gather", &["E_f32", "ids"], &["x"]),
                cast("cw", "W"),
                t,
                node("mm", "MatMul", &["x", "Wt"], &["y"]),
                cast("cn", "N"),
                node("add", "Add", &["y", "N_f32"], &["z"]),
            ],
            initializers: vec![half("E", [12, 8]), half("W", [8, 8]), half("N", [8, 8])],
            value_info: vec![Value::new("E_f32", DType::F32, vec![12.into(), 8.into()])],
            opsets: vec![OpsetImport {
                domain: String::new(),
                version: 17,
            }],
        }
    }

    #[test]
    fn cast_weights_become_lazy_float32_initializers() -> std::io::Result<()> {
        let mut g = graph();
        assert_eq!(expose_half_weights(&mut g, true), 2);
        let ops: Vec<&str> = g.nodes.iter().map(|n| n.name.as_str()).collect();
        assert_eq!(ops, ["emb", "t", "mm", "cn", "add"]);
        let names: Vec<(&str, DType)> = g
            .initializers
            .iter()
            .map(|t| (t.name.as_str(), t.dtype))
            .collect();
        assert_eq!(
            names,
            [
                ("N", DType::BF16),
                ("E_f32", DType::F32),
                ("W_f32", DType::F32)
            ]
        );
        assert!(g.value_info.is_empty());
        // Without embedding quantization the table keeps its Cast.
        let mut g2 = graph();
        assert_eq!(expose_half_weights(&mut g2, false), 1);
        assert!(g2.nodes.iter().any(|n| n.name == "ce"));
        let e = g.initializers[1].data.to_f32_vec()?;
        assert_eq!(e[5], half::bf16::from_f32((5f32 * 0.3).sin()).to_f32());
        Ok(())
    }

    #[test]
    fn then_int4_quantizes_them() -> Result<(), crate::QuantizeError> {
        let mut g = graph();
        expose_half_weights(&mut g, true);
        let opts = crate::int4::Int4Options {
            block_size: 16,
            ..Default::default()
        };
        let s = crate::gather4::quantize_gathers(&mut g, &opts)?;
        let m = crate::int4::quantize_int4(&mut g, &opts)?;
        assert_eq!((s.gathers, m.matmuls_quantized), (1, 1));
        Ok(())
    }
}
