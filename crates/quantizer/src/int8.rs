//! int8 dynamic quantization, as ONNX Runtime's `quantize_dynamic` does it: weights are
//! quantized ahead of time, activations at run time.
//!
//! - `MatMul(A, W)` with a constant float `W` ⇒ `DynamicQuantizeLinear(A) → MatMulInteger →
//!   Cast(float) → Mul(A_scale · W_scale)` (ONNX Runtime fuses this into
//!   `DynamicQuantizeMatMul` at load time).
//! - `Attention` (com.microsoft) ⇒ `QAttention` over the quantized input and packed weights.
//! - `EmbedLayerNormalization` ⇒ `QEmbedLayerNormalization` (tables, gamma and beta as uint8).
//! - `Gather` of a constant float table ⇒ `Gather` of a uint8 table + `DequantizeLinear`.
//!
//! Weights are int8 symmetric (or uint8 asymmetric), per tensor or per output column, with
//! optional `reduce_range`; tables are uint8 asymmetric. The formulas are in
//! [`crate::qparams`]. Tensors are quantized in parallel (rayon), and each large tensor in
//! parallel chunks.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;

use ferry_ir::{Attr, DType, Graph, Initializer, Node, OpsetImport, RowProducer, TensorData};
use rayon::prelude::*;

use crate::QuantizeError;
use crate::qparams::{QType, RangeAxis, Ranges, RowQuantizer, TensorSpec};

/// Domain of ONNX Runtime's contrib ops.
pub const MS_DOMAIN: &str = "com.microsoft";

/// Options of [`quantize_int8`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Int8Options {
    /// Type of quantized weights: int8 (symmetric, the default) or uint8 (asymmetric).
    pub weight_type: QType,
    /// One scale per output column of each weight (MatMul, Attention) and per column of each
    /// Gather table, instead of one per tensor. On by default: it is what keeps small
    /// sentence-embedding models within 0.99 cosine of float32, at the same size.
    pub per_channel: bool,
    /// 7-bit weight ranges (ONNX Runtime's `reduce_range`, for CPUs without VNNI).
    pub reduce_range: bool,
    /// Node names left in float.
    pub exclude: Vec<String>,
}

impl Default for Int8Options {
    fn default() -> Self {
        Self {
            weight_type: QType::Int8,
            per_channel: true,
            reduce_range: false,
            exclude: Vec::new(),
        }
    }
}

/// What [`quantize_int8`] changed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Int8Stats {
    /// MatMuls rewritten to `MatMulInteger`.
    pub matmuls: usize,
    /// `Gemm`s (alpha = beta = 1) rewritten to `MatMulInteger` (+ `Add` of the bias).
    pub gemms: usize,
    /// `Attention` nodes rewritten to `QAttention`.
    pub attentions: usize,
    /// `EmbedLayerNormalization` nodes rewritten to `QEmbedLayerNormalization`.
    pub embed_layer_norms: usize,
    /// `Gather`s of constant tables now reading a uint8 table.
    pub gathers: usize,
    /// Float tensors quantized.
    pub tensors: usize,
    /// Bytes of the float tensors quantized.
    pub float_bytes: u64,
    /// Bytes of their quantized replacements (values, scales, zero points).
    pub quantized_bytes: u64,
}

impl std::ops::Add for Int8Stats {
    type Output = Int8Stats;

    /// Sums the counts of two runs (the two parts of a merged decoder: a weight both read counts twice).
    fn add(self, o: Int8Stats) -> Int8Stats {
        Int8Stats {
            matmuls: self.matmuls + o.matmuls,
            gemms: self.gemms + o.gemms,
            attentions: self.attentions + o.attentions,
            embed_layer_norms: self.embed_layer_norms + o.embed_layer_norms,
            gathers: self.gathers + o.gathers,
            tensors: self.tensors + o.tensors,
            float_bytes: self.float_bytes + o.float_bytes,
            quantized_bytes: self.quantized_bytes + o.quantized_bytes,
        }
    }
}

impl Int8Stats {
    /// Nodes rewritten in total.
    pub fn nodes(&self) -> usize {
        self.matmuls + self.gemms + self.attentions + self.embed_layer_norms + self.gathers
    }
}

impl fmt::Display for Int8Stats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} MatMul and {} Gemm → MatMulInteger, {} Attention → QAttention, {} EmbedLayerNormalization → QEmbedLayerNormalization, {} Gather tables; {} tensors, {:.1} MB → {:.1} MB",
            self.matmuls,
            self.gemms,
            self.attentions,
            self.embed_layer_norms,
            self.gathers,
            self.tensors,
            self.float_bytes as f64 / 1e6,
            self.quantized_bytes as f64 / 1e6,
        )
    }
}

/// What to do with one node.
#[derive(Debug, Clone, Copy)]
enum Kind {
    MatMul,
    /// `Gemm` (alpha = beta = 1, A not transposed) with its bias input, if any.
    Gemm,
    Attention,
    Embed,
    Gather {
        per_column: bool,
    },
}

/// A node to rewrite and the quantized tensors (job indices) it reads.
struct Plan {
    node: usize,
    kind: Kind,
    jobs: Vec<Option<usize>>,
}

/// One initializer to quantize in one way.
struct Job {
    init: usize,
    spec: TensorSpec,
    /// Quantize the 2-D initializer's transpose (it reaches the MatMul through a
    /// `Transpose`, as in ferry's exports, which keep checkpoint layouts).
    transposed: bool,
}

/// Names of a quantized initializer in the rewritten graph.
#[derive(Clone)]
struct QNames {
    data: String,
    scale: String,
    zero_point: String,
}

/// Attributes `QAttention` accepts (ONNX Runtime's schema); Attention nodes with others stay float.
const QATTENTION_ATTRS: [&str; 6] = [
    "num_heads",
    "scale",
    "mask_filter_value",
    "unidirectional",
    "past_present_share_buffer",
    "do_rotary",
];

/// Rewrites a float32 graph for int8 dynamic quantization (see the module docs). Fails when
/// the graph has nothing to quantize, its ONNX opset is below 11 (`DynamicQuantizeLinear`),
/// or a weight's bytes cannot be read.
///
/// A merged decoder ([`ferry_ir::split_merged`]) is rewritten as its two decoders, merged
/// again (stats summed).
pub fn quantize_int8(graph: &mut Graph, opts: &Int8Options) -> Result<Int8Stats, QuantizeError> {
    if let Some(parts) = ferry_ir::map_merged(graph, |g| quantize_int8(g, opts)) {
        let (a, b) = parts?;
        return Ok(a + b);
    }
    crate::no_subgraphs(graph)?;
    let opset = graph.onnx_opset().unwrap_or(0);
    if opset < 11 {
        return Err(QuantizeError::Invalid(format!(
            "int8 dynamic quantization needs ONNX opset 11 or later (DynamicQuantizeLinear); the model imports opset {opset}"
        )));
    }
    let inits: HashMap<&str, usize> = graph
        .initializers
        .iter()
        .enumerate()
        .map(|(i, t)| (t.name.as_str(), i))
        .collect();
    let exclude: HashSet<&str> = opts.exclude.iter().map(String::as_str).collect();
    let float_init = |name: &str, rank: usize| -> Option<usize> {
        let &i = inits.get(name)?;
        let t = &graph.initializers[i];
        (t.dtype == DType::F32 && t.dims.len() == rank && t.dims.iter().all(|&d| d > 0))
            .then_some(i)
    };
    let weight_spec = TensorSpec {
        qtype: opts.weight_type,
        symmetric: opts.weight_type.weight_symmetric(),
        reduce_range: opts.reduce_range,
        per_column: opts.per_channel,
    };
    let table_spec = |per_column: bool| TensorSpec {
        qtype: QType::UInt8,
        symmetric: false,
        reduce_range: false,
        per_column,
    };

    // `Transpose` (perm [1, 0]) of a 2-D float initializer, by output name.
    let transpose_of: HashMap<String, usize> = graph
        .nodes
        .iter()
        .filter(|n| n.op_type == "Transpose" && n.domain.is_empty() && n.inputs.len() == 1)
        .filter(|n| match n.attr("perm") {
            None => true,
            Some(Attr::Ints(p)) => p.as_slice() == [1, 0],
            Some(_) => false,
        })
        .filter_map(|n| Some((n.outputs.first()?.clone(), float_init(&n.inputs[0], 2)?)))
        .collect();

    let mut jobs: Vec<Job> = Vec::new();
    let mut job_of: HashMap<(usize, TensorSpec, bool), usize> = HashMap::new();
    let mut job = |init: usize, spec: TensorSpec, transposed: bool| -> usize {
        *job_of.entry((init, spec, transposed)).or_insert_with(|| {
            jobs.push(Job {
                init,
                spec,
                transposed,
            });
            jobs.len() - 1
        })
    };
    let mut plans: Vec<Plan> = Vec::new();
    for (i, n) in graph.nodes.iter().enumerate() {
        if exclude.contains(n.name.as_str()) {
            continue;
        }
        let input = |k: usize| n.inputs.get(k).map(String::as_str).unwrap_or("");
        let rewritable = matches!(
            (n.domain.as_str(), n.op_type.as_str()),
            ("" | "ai.onnx", "MatMul" | "Gemm" | "Gather")
        );
        if rewritable && (n.outputs.len() != 1 || n.outputs[0].is_empty()) {
            return Err(QuantizeError::Invalid(format!(
                "node `{}` ({}) has {} outputs {:?}, needs one",
                n.name,
                n.op_type,
                n.outputs.len(),
                n.outputs
            )));
        }
        match (n.domain.as_str(), n.op_type.as_str()) {
            ("" | "ai.onnx", "MatMul") if n.inputs.len() == 2 => {
                if inits.contains_key(input(0)) {
                    continue;
                }
                let weight = match (float_init(input(1), 2), transpose_of.get(input(1))) {
                    (Some(w), _) => Some(job(w, weight_spec, false)),
                    (None, Some(&w)) => Some(job(w, weight_spec, true)),
                    _ => None,
                };
                if weight.is_some() {
                    plans.push(Plan {
                        node: i,
                        kind: Kind::MatMul,
                        jobs: vec![weight],
                    });
                }
            }
            ("" | "ai.onnx", "Gemm") if (2..=3).contains(&n.inputs.len()) => {
                let float = |k: &str| match n.attr(k) {
                    None => Some(1.0),
                    Some(Attr::Float(v)) => Some(*v),
                    Some(_) => None,
                };
                let int = |k: &str| match n.attr(k) {
                    None => Some(0),
                    Some(Attr::Int(v)) => Some(*v),
                    Some(_) => None,
                };
                let plain = float("alpha") == Some(1.0)
                    && (float("beta") == Some(1.0) || input(2).is_empty())
                    && int("transA") == Some(0);
                let trans_b = int("transB");
                if !plain || inits.contains_key(input(0)) {
                    continue;
                }
                let weight = match (float_init(input(1), 2), trans_b) {
                    (Some(w), Some(0)) => Some(job(w, weight_spec, false)),
                    (Some(w), Some(1)) => Some(job(w, weight_spec, true)),
                    _ => None,
                };
                if weight.is_some() {
                    plans.push(Plan {
                        node: i,
                        kind: Kind::Gemm,
                        jobs: vec![weight],
                    });
                }
            }
            (MS_DOMAIN, "Attention") => {
                let extra_inputs = n.inputs.iter().skip(5).any(|s| !s.is_empty());
                let attrs_ok = n
                    .attrs
                    .keys()
                    .all(|k| QATTENTION_ATTRS.contains(&k.as_str()));
                if extra_inputs || !attrs_ok || inits.contains_key(input(0)) {
                    continue;
                }
                if let (Some(w), true) = (float_init(input(1), 2), n.inputs.len() >= 3) {
                    plans.push(Plan {
                        node: i,
                        kind: Kind::Attention,
                        jobs: vec![Some(job(w, weight_spec, false))],
                    });
                }
            }
            (MS_DOMAIN, "EmbedLayerNormalization") => {
                let third_output = n.outputs.get(2).is_some_and(|s| !s.is_empty());
                let position_ids = n.inputs.get(8).is_some_and(|s| !s.is_empty());
                if third_output || position_ids || n.inputs.len() < 7 {
                    continue;
                }
                // word, position, segment (optional), gamma, beta.
                let ranks = [
                    (2, 2, false),
                    (3, 2, false),
                    (4, 2, true),
                    (5, 1, false),
                    (6, 1, false),
                ];
                let mut ok = true;
                let mut ids = Vec::new();
                for (k, rank, optional) in ranks {
                    if optional && input(k).is_empty() {
                        ids.push(None);
                        continue;
                    }
                    match float_init(input(k), rank) {
                        Some(t) => ids.push(Some(t)),
                        None => ok = false,
                    }
                }
                if ok {
                    let jobs = ids
                        .into_iter()
                        .map(|t| t.map(|t| job(t, table_spec(false), false)))
                        .collect();
                    plans.push(Plan {
                        node: i,
                        kind: Kind::Embed,
                        jobs,
                    });
                }
            }
            ("" | "ai.onnx", "Gather") if n.inputs.len() == 2 => {
                if inits.contains_key(input(1)) {
                    continue;
                }
                let Some(&t) = inits.get(input(0)) else {
                    continue;
                };
                let table = &graph.initializers[t];
                if table.dtype != DType::F32 || table.dims.is_empty() || table.numel() == 0 {
                    continue;
                }
                let axis = match n.attr("axis") {
                    None => 0,
                    Some(Attr::Int(a)) => *a,
                    Some(_) => continue,
                };
                // Per column only where DequantizeLinear takes an axis (opset 13) and the
                // gathered rows keep the table's columns last.
                let per_column =
                    opts.per_channel && opset >= 13 && axis == 0 && table.dims.len() == 2;
                plans.push(Plan {
                    node: i,
                    kind: Kind::Gather { per_column },
                    jobs: vec![Some(job(t, table_spec(per_column), false))],
                });
            }
            _ => {}
        }
    }
    if plans.is_empty() {
        return Err(QuantizeError::Invalid(
            "nothing to quantize: no MatMul with a constant float weight, Attention, EmbedLayerNormalization or Gather of a constant table".into(),
        ));
    }

    // Quantize every tensor, in parallel.
    let results: Vec<Quantized> = jobs
        .par_iter()
        .map(|j| quantize_initializer(&graph.initializers[j.init], j.spec, j.transposed))
        .collect::<Result<_, _>>()?;

    let mut names = Names::new(graph);
    let mut stats = Int8Stats::default();
    let mut new_inits: Vec<Initializer> = Vec::new();
    let mut qnames: Vec<QNames> = Vec::with_capacity(jobs.len());
    for (j, q) in jobs.iter().zip(results) {
        let src = &graph.initializers[j.init];
        stats.tensors += 1;
        stats.float_bytes += src.data.len();
        let base = if j.transposed {
            format!("{}_transposed", src.name)
        } else {
            src.name.clone()
        };
        let data = names.value(&format!("{base}_quantized"));
        let scale = names.value(&format!("{base}_scale"));
        let zero_point = names.value(&format!("{base}_zero_point"));
        let qdtype = match j.spec.qtype {
            QType::Int8 => DType::I8,
            QType::UInt8 => DType::U8,
        };
        let param_dims = if q.scales.len() == 1 {
            vec![]
        } else {
            vec![q.scales.len() as i64]
        };
        // Symmetric weights have one zero point for every column (0 for int8): stored as a
        // scalar beside per-column scales, which MatMulInteger and QAttention accept, ONNX
        // Runtime's integer GEMM skips the per-column zero-point correction for.
        let uniform = q.zero_points.windows(2).all(|w| w[0] == w[1]);
        let zp_scalar = j.spec.symmetric && uniform;
        let zp_values = if zp_scalar {
            &q.zero_points[..1.min(q.zero_points.len())]
        } else {
            &q.zero_points[..]
        };
        let zp_bytes: Vec<u8> = zp_values.iter().map(|&z| z as u8).collect();
        stats.quantized_bytes += q.data.len() + (4 * q.scales.len() + zp_bytes.len()) as u64;
        new_inits.push(Initializer {
            name: data.clone(),
            dtype: qdtype,
            dims: if j.transposed {
                src.dims.iter().rev().copied().collect()
            } else {
                src.dims.clone()
            },
            data: q.data,
        });
        new_inits.push(Initializer {
            name: scale.clone(),
            dtype: DType::F32,
            dims: param_dims.clone(),
            data: TensorData::from_f32(&q.scales),
        });
        new_inits.push(Initializer {
            name: zero_point.clone(),
            dtype: qdtype,
            dims: if zp_scalar { vec![] } else { param_dims },
            data: TensorData::owned(zp_bytes),
        });
        qnames.push(QNames {
            data,
            scale,
            zero_point,
        });
    }

    // Rewrite the nodes in place, in order; an activation's DynamicQuantizeLinear goes right
    // before its first quantized consumer and is shared by the later ones.
    let plan_of: HashMap<usize, &Plan> = plans.iter().map(|p| (p.node, p)).collect();
    let mut dynamic: HashMap<String, QNames> = HashMap::new();
    let old_nodes = std::mem::take(&mut graph.nodes);
    let mut nodes: Vec<Node> = Vec::with_capacity(old_nodes.len() + 4 * plans.len());
    for (i, n) in old_nodes.into_iter().enumerate() {
        let Some(plan) = plan_of.get(&i) else {
            nodes.push(n);
            continue;
        };
        let q = |k: usize| plan.jobs[k].map(|j| qnames[j].clone());
        match plan.kind {
            Kind::MatMul => {
                stats.matmuls += 1;
                let a = dynamic_quantize(&n.inputs[0], &mut dynamic, &mut names, &mut nodes);
                let w = q(0).ok_or_else(|| QuantizeError::Invalid("internal: no weight".into()))?;
                rewrite_matmul(&n, &a, &w, None, &mut names, &mut nodes);
            }
            Kind::Gemm => {
                stats.gemms += 1;
                let a = dynamic_quantize(&n.inputs[0], &mut dynamic, &mut names, &mut nodes);
                let w = q(0).ok_or_else(|| QuantizeError::Invalid("internal: no weight".into()))?;
                let bias = n.inputs.get(2).filter(|b| !b.is_empty()).cloned();
                rewrite_matmul(&n, &a, &w, bias.as_deref(), &mut names, &mut nodes);
            }
            Kind::Attention => {
                stats.attentions += 1;
                let a = dynamic_quantize(&n.inputs[0], &mut dynamic, &mut names, &mut nodes);
                let w = q(0).ok_or_else(|| QuantizeError::Invalid("internal: no weight".into()))?;
                let opt = |k: usize| n.inputs.get(k).cloned().unwrap_or_default();
                let mut inputs = vec![
                    a.data,
                    w.data,
                    opt(2),
                    a.scale,
                    w.scale,
                    opt(3),
                    a.zero_point,
                    w.zero_point,
                ];
                if !opt(4).is_empty() {
                    inputs.push(opt(4));
                }
                nodes.push(Node {
                    name: names.node(&format!("{}_quant", n.name)),
                    op_type: "QAttention".into(),
                    domain: MS_DOMAIN.into(),
                    inputs,
                    outputs: n.outputs.clone(),
                    attrs: n.attrs.clone(),
                });
            }
            Kind::Embed => {
                stats.embed_layer_norms += 1;
                let t: Vec<Option<QNames>> = (0..5).map(q).collect();
                let pick = |f: fn(&QNames) -> &String| -> Vec<String> {
                    t.iter()
                        .map(|x| x.as_ref().map(|x| f(x).clone()).unwrap_or_default())
                        .collect()
                };
                let mut inputs = vec![n.inputs[0].clone(), n.inputs[1].clone()];
                inputs.extend(pick(|x| &x.data));
                inputs.push(n.inputs.get(7).cloned().unwrap_or_default());
                inputs.extend(pick(|x| &x.scale));
                inputs.extend(pick(|x| &x.zero_point));
                nodes.push(Node {
                    name: names.node(&format!("{}_quant", n.name)),
                    op_type: "QEmbedLayerNormalization".into(),
                    domain: MS_DOMAIN.into(),
                    inputs,
                    outputs: n.outputs.clone(),
                    attrs: n
                        .attrs
                        .iter()
                        .filter(|(k, _)| k.as_str() == "epsilon")
                        .map(|(k, v)| (k.clone(), v.clone()))
                        .collect(),
                });
            }
            Kind::Gather { per_column } => {
                stats.gathers += 1;
                let t = q(0).ok_or_else(|| QuantizeError::Invalid("internal: no table".into()))?;
                let gathered = names.value(&format!("{}_quantized", n.outputs[0]));
                let mut g = n.clone();
                g.inputs[0] = t.data;
                g.outputs = vec![gathered.clone()];
                let dq_name = names.node(&format!("{}_DequantizeLinear", n.name));
                nodes.push(g);
                let mut attrs = BTreeMap::new();
                if per_column {
                    attrs.insert("axis".to_string(), Attr::Int(-1));
                }
                nodes.push(Node {
                    name: dq_name,
                    op_type: "DequantizeLinear".into(),
                    domain: String::new(),
                    inputs: vec![gathered, t.scale, t.zero_point],
                    outputs: vec![n.outputs[0].clone()],
                    attrs,
                });
            }
        }
    }
    graph.nodes = nodes;

    // Transposes of weights that only fed quantized MatMuls are dead now.
    let consumed: HashSet<&str> = graph
        .nodes
        .iter()
        .flat_map(|n| n.inputs.iter().map(String::as_str))
        .chain(graph.outputs.iter().map(|v| v.name.as_str()))
        .collect();
    let dead: HashSet<String> = transpose_of
        .keys()
        .filter(|o| !consumed.contains(o.as_str()))
        .cloned()
        .collect();
    graph.nodes.retain(|n| {
        !(n.op_type == "Transpose" && n.outputs.len() == 1 && dead.contains(&n.outputs[0]))
    });
    graph.value_info.retain(|v| !dead.contains(&v.name));

    // Drop float weights nothing reads any more; add the quantized ones.
    let quantized: HashSet<usize> = jobs.iter().map(|j| j.init).collect();
    let used: HashSet<&str> = graph
        .nodes
        .iter()
        .flat_map(|n| n.inputs.iter().map(String::as_str))
        .chain(graph.outputs.iter().map(|v| v.name.as_str()))
        .collect();
    let keep: Vec<bool> = graph
        .initializers
        .iter()
        .enumerate()
        .map(|(i, t)| !quantized.contains(&i) || used.contains(t.name.as_str()))
        .collect();
    let mut keep = keep.into_iter();
    graph.initializers.retain(|_| keep.next().unwrap_or(true));
    graph.initializers.extend(new_inits);

    if (stats.attentions > 0 || stats.embed_layer_norms > 0)
        && !graph.opsets.iter().any(|o| o.domain == MS_DOMAIN)
    {
        graph.opsets.push(OpsetImport {
            domain: MS_DOMAIN.into(),
            version: 1,
        });
    }
    Ok(stats)
}

/// A quantized initializer: its bytes (computed band by band from the float weight when
/// the writer streams them), scales and zero points.
struct Quantized {
    data: TensorData,
    scales: Vec<f32>,
    zero_points: Vec<i32>,
}

/// Bytes of float weight read at a time by the range scan.
const SCAN_WINDOW: usize = 8 << 20;

/// Feeds `data` to `ranges` in windows of at most [`SCAN_WINDOW`] bytes (whole granules),
/// read with `pread` so the float weight never becomes resident in this process.
pub(crate) fn scan(data: &TensorData, ranges: &mut Ranges) -> std::io::Result<()> {
    let g = ranges.granule() as u64;
    let step = (SCAN_WINDOW as u64 / g).max(1) * g;
    let total = data.len();
    let mut buf = vec![0u8; usize::try_from(step.min(total)).map_err(std::io::Error::other)?];
    let mut done = 0u64;
    while done < total {
        let n = usize::try_from(step.min(total - done)).map_err(std::io::Error::other)?;
        data.read_into(done, &mut buf[..n])?;
        ranges.update(&buf[..n]);
        done += n as u64;
    }
    Ok(())
}

/// An int8/uint8 weight computed band by band from its float32 source (`view`, rows of
/// `columns` elements) with parameters fixed by a first scan.
struct Int8Rows {
    view: TensorData,
    columns: usize,
    quantizer: RowQuantizer,
}

impl RowProducer for Int8Rows {
    fn total_bytes(&self) -> u64 {
        self.view.len() / 4
    }
    fn row_bytes(&self) -> u64 {
        self.columns as u64
    }
    fn row_work(&self) -> u64 {
        5 * self.columns as u64
    }
    fn produce(&self, first: u64, out: &mut [u8]) -> std::io::Result<()> {
        with_buffer(4 * out.len(), |buf| {
            self.view.read_into(4 * first * self.columns as u64, buf)?;
            self.quantizer.quantize(buf, out);
            Ok(())
        })
    }
}

/// Runs `f` on a zeroed-once buffer of `n` bytes reused by this thread across bands (at
/// most one band's worth is kept).
pub(crate) fn with_buffer<T>(
    n: usize,
    f: impl FnOnce(&mut [u8]) -> std::io::Result<T>,
) -> std::io::Result<T> {
    thread_local! {
        static BUF: std::cell::Cell<Vec<u8>> = const { std::cell::Cell::new(Vec::new()) };
    }
    let mut buf = BUF.take();
    buf.resize(n, 0);
    let r = f(&mut buf[..n]);
    if buf.capacity() <= ferry_ir::BAND_BYTES {
        BUF.set(buf);
    }
    r
}

/// Plans the quantization of an initializer's float32 values: a first scan (read in
/// windows, never held) fixes the scales and zero points; the quantized bytes are computed
/// only when read or streamed.
fn quantize_initializer(
    t: &Initializer,
    spec: TensorSpec,
    transposed: bool,
) -> Result<Quantized, QuantizeError> {
    let io = |source| QuantizeError::Io {
        name: t.name.clone(),
        source,
    };
    if t.data.len() != t.numel().saturating_mul(4) {
        return Err(QuantizeError::Invalid(format!(
            "tensor `{}` has {} bytes, expected {} for float32 {:?}",
            t.name,
            t.data.len(),
            t.numel().saturating_mul(4),
            t.dims
        )));
    }
    let (view, columns, axis) = match (transposed, &t.dims[..]) {
        (true, &[rows, cols]) => {
            // The MatMul reads the transpose: quantize [cols, rows], whose columns are the
            // weight's rows.
            let (rows, cols) = (rows as usize, cols as usize);
            let view =
                TensorData::transposed(t.data.clone(), &[rows, cols], &[1, 0], 4).map_err(io)?;
            (view, rows, RangeAxis::Rows(cols))
        }
        _ => {
            let columns = t.dims.last().copied().unwrap_or(1).max(1) as usize;
            (t.data.clone(), columns, RangeAxis::Columns(columns))
        }
    };
    let mut ranges = Ranges::new(if spec.per_column {
        axis
    } else {
        RangeAxis::Tensor
    });
    scan(&t.data, &mut ranges).map_err(io)?;
    let params = ranges.params(spec);
    let quantizer = RowQuantizer::new(&params, columns, spec.qtype);
    Ok(Quantized {
        data: TensorData::produced(Int8Rows {
            view,
            columns,
            quantizer,
        }),
        scales: params.iter().map(|p| p.scale).collect(),
        zero_points: params.iter().map(|p| p.zero_point).collect(),
    })
}

/// The `DynamicQuantizeLinear` outputs for activation `x`, adding the node on first use.
fn dynamic_quantize(
    x: &str,
    cache: &mut HashMap<String, QNames>,
    names: &mut Names,
    nodes: &mut Vec<Node>,
) -> QNames {
    if let Some(q) = cache.get(x) {
        return q.clone();
    }
    let q = QNames {
        data: names.value(&format!("{x}_quantized")),
        scale: names.value(&format!("{x}_scale")),
        zero_point: names.value(&format!("{x}_zero_point")),
    };
    nodes.push(Node {
        name: names.node(&format!("{x}_QuantizeLinear")),
        op_type: "DynamicQuantizeLinear".into(),
        domain: String::new(),
        inputs: vec![x.to_string()],
        outputs: vec![q.data.clone(), q.scale.clone(), q.zero_point.clone()],
        attrs: BTreeMap::new(),
    });
    cache.insert(x.to_string(), q.clone());
    q
}

/// `MatMulInteger → Cast → Mul(scales) (→ Add(bias))` in place of MatMul or Gemm `n`,
/// writing its output name.
fn rewrite_matmul(
    n: &Node,
    a: &QNames,
    w: &QNames,
    bias: Option<&str>,
    names: &mut Names,
    nodes: &mut Vec<Node>,
) {
    let y = &n.outputs[0];
    let base = names.node(&format!("{}_quant", n.name));
    let int_out = names.value(&format!("{y}_output_quantized"));
    let cast_out = names.value(&format!("{int_out}_cast_output"));
    let scales = names.value(&format!("{base}_scales_mul:0"));
    let node = |name: String, op: &str, inputs: Vec<String>, out: String| Node {
        name,
        op_type: op.into(),
        domain: String::new(),
        inputs,
        outputs: vec![out],
        attrs: BTreeMap::new(),
    };
    nodes.push(node(
        base.clone(),
        "MatMulInteger",
        vec![
            a.data.clone(),
            w.data.clone(),
            a.zero_point.clone(),
            w.zero_point.clone(),
        ],
        int_out.clone(),
    ));
    let mut cast = node(
        names.node(&format!("{int_out}_cast")),
        "Cast",
        vec![int_out],
        cast_out.clone(),
    );
    cast.attrs.insert("to".into(), Attr::Int(1));
    nodes.push(cast);
    nodes.push(node(
        names.node(&format!("{base}_scales_mul")),
        "Mul",
        vec![a.scale.clone(), w.scale.clone()],
        scales.clone(),
    ));
    let scaled = match bias {
        Some(_) => names.value(&format!("{y}_before_bias")),
        None => y.clone(),
    };
    nodes.push(node(
        names.node(&format!("{base}_output_scale_mul")),
        "Mul",
        vec![cast_out, scales],
        scaled.clone(),
    ));
    if let Some(b) = bias {
        nodes.push(node(
            names.node(&format!("{base}_bias_add")),
            "Add",
            vec![scaled, b.to_string()],
            y.clone(),
        ));
    }
}

/// Fresh value and node names.
struct Names {
    values: HashSet<String>,
    nodes: HashSet<String>,
}

impl Names {
    fn new(g: &Graph) -> Self {
        let values = g
            .inputs
            .iter()
            .chain(&g.outputs)
            .chain(&g.value_info)
            .map(|v| v.name.clone())
            .chain(g.initializers.iter().map(|t| t.name.clone()))
            .chain(g.nodes.iter().flat_map(|n| n.outputs.iter().cloned()))
            .collect();
        let nodes = g.nodes.iter().map(|n| n.name.clone()).collect();
        Self { values, nodes }
    }

    fn fresh(set: &mut HashSet<String>, base: &str) -> String {
        let mut name = base.to_string();
        let mut k = 1;
        while set.contains(&name) {
            name = format!("{base}_{k}");
            k += 1;
        }
        set.insert(name.clone());
        name
    }

    fn value(&mut self, base: &str) -> String {
        Self::fresh(&mut self.values, base)
    }

    fn node(&mut self, base: &str) -> String {
        Self::fresh(&mut self.nodes, base)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use ferry_ir::Value;

    use super::*;

    fn init(name: &str, dims: Vec<i64>, values: &[f32]) -> Initializer {
        Initializer {
            name: name.into(),
            dtype: DType::F32,
            dims,
            data: TensorData::from_f32(values),
        }
    }

    fn node(name: &str, op: &str, domain: &str, inputs: &[&str], outputs: &[&str]) -> Node {
        Node {
            name: name.into(),
            op_type: op.into(),
            domain: domain.into(),
            inputs: inputs.iter().map(|s| s.to_string()).collect(),
            outputs: outputs.iter().map(|s| s.to_string()).collect(),
            attrs: BTreeMap::new(),
        }
    }

    fn graph(nodes: Vec<Node>, inits: Vec<Initializer>, opset: i64) -> Graph {
        Graph {
            name: "g".into(),
            inputs: vec![Value::new("x", DType::F32, vec![1.into(), 4.into()])],
            outputs: vec![Value::new("y", DType::F32, vec![1.into(), 3.into()])],
            nodes,
            initializers: inits,
            value_info: vec![],
            opsets: vec![OpsetImport {
                domain: String::new(),
                version: opset,
            }],
        }
    }

    fn ops(g: &Graph) -> Vec<&str> {
        g.nodes.iter().map(|n| n.op_type.as_str()).collect()
    }

    fn find<'a>(g: &'a Graph, name: &str) -> &'a Initializer {
        g.initializers
            .iter()
            .find(|t| t.name == name)
            .unwrap_or_else(|| panic!("no initializer {name}"))
    }

    /// An int8 initializer's values.
    fn i8_values(t: &Initializer) -> Vec<i8> {
        let bytes = t.data.bytes().expect("bytes");
        bytes.iter().map(|&b| b as i8).collect()
    }

    const W: [f32; 12] = [
        0.5, -1.0, 0.02, 0.25, 2.0, -0.01, -0.75, 0.3, 0.03, 0.1, -0.4, 0.0,
    ];

    /// Pseudo-random float32 weights in about ±1 with a few outliers per column.
    pub(crate) fn weights(n: usize, seed: u32) -> Vec<f32> {
        let mut x = seed | 1;
        (0..n)
            .map(|i| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                let v = (x >> 8) as f32 / (1u32 << 24) as f32 - 0.5;
                if i % 997 == 0 { v * 40.0 } else { v }
            })
            .collect()
    }

    #[test]
    fn lazy_bytes_equal_the_eager_quantizer_across_bands() -> Result<(), QuantizeError> {
        use crate::qparams::quantize_tensor;
        // Large enough for several bands of the producer (16 MiB of work each), with rows
        // that do not divide a band; small ones with odd shapes too.
        let shapes = [(2003usize, 1777usize), (7, 5), (1, 33)];
        for (rows, cols) in shapes {
            let values = weights(rows * cols, rows as u32);
            let t = init("w", vec![rows as i64, cols as i64], &values);
            let mut tr = vec![0f32; values.len()];
            for r in 0..rows {
                for c in 0..cols {
                    tr[c * rows + r] = values[r * cols + c];
                }
            }
            for (qtype, symmetric) in [(QType::Int8, true), (QType::UInt8, false)] {
                for per_column in [true, false] {
                    let spec = TensorSpec {
                        qtype,
                        symmetric,
                        reduce_range: false,
                        per_column,
                    };
                    for transposed in [false, true] {
                        let (src, columns) = if transposed {
                            (&tr, rows)
                        } else {
                            (&values, cols)
                        };
                        let want = quantize_tensor(src, columns, spec);
                        let got = quantize_initializer(&t, spec, transposed)?;
                        let what = format!("{rows}x{cols} {spec:?} transposed={transposed}");
                        assert_eq!(got.scales, want.scales, "{what}");
                        assert_eq!(got.zero_points, want.zero_points, "{what}");
                        assert!(matches!(got.data, TensorData::Produced(_)), "{what}");
                        let mut streamed = Vec::new();
                        got.data
                            .write_to(&mut streamed)
                            .map_err(|e| QuantizeError::Invalid(e.to_string()))?;
                        assert!(streamed == want.data, "{what}");
                        // A range starting and ending mid-row.
                        let (off, len) = (
                            columns / 2 + 1,
                            (3 * columns).min(want.data.len() - columns / 2 - 1),
                        );
                        let mut part = vec![0u8; len];
                        got.data
                            .read_into(off as u64, &mut part)
                            .map_err(|e| QuantizeError::Invalid(e.to_string()))?;
                        assert_eq!(part, want.data[off..off + len], "{what}");
                    }
                }
            }
        }
        Ok(())
    }

    fn matmul_graph() -> Graph {
        graph(
            vec![
                node("mm1", "MatMul", "", &["x", "w"], &["h"]),
                node("mm2", "MatMul", "", &["x", "w"], &["h2"]),
                node("add", "Add", "", &["h", "h2"], &["y"]),
            ],
            vec![init("w", vec![4, 3], &W)],
            17,
        )
    }

    /// A merged decoder (two copies of [`matmul_graph`], the second reading `past` too) is
    /// quantized as its two parts and merged again, the quantized weight stored once; an
    /// `If` in any other graph is refused rather than risk dropping a weight a branch reads.
    #[test]
    fn merged_decoder_is_quantized_as_its_parts() {
        let mut with_past = matmul_graph();
        with_past
            .inputs
            .push(Value::new("past", DType::F32, vec![1.into(), 3.into()]));
        with_past.nodes[2].inputs[1] = "past".into();
        let mut g = ferry_ir::merge_decoders(matmul_graph(), with_past).expect("merge");
        let stats = quantize_int8(&mut g, &Int8Options::default()).expect("quantize");
        assert_eq!((stats.matmuls, stats.tensors), (4, 2));
        assert_eq!(ops(&g), ["If"]);
        let outer: Vec<&str> = g.initializers.iter().map(|t| t.name.as_str()).collect();
        assert!(
            outer.contains(&"w_quantized") && !outer.contains(&"w"),
            "{outer:?}"
        );
        assert_eq!(outer.iter().filter(|n| **n == "w_quantized").count(), 1);
        let (a, b) = ferry_ir::split_merged(&g).expect("still merged");
        assert_eq!(ops(&a)[1], "MatMulInteger");
        assert_eq!(b.nodes.last().map(|n| n.inputs[1].as_str()), Some("past"));

        let mut other = matmul_graph();
        let mut iff = node("if", "If", "", &["x"], &["z"]);
        let branch = Graph {
            outputs: vec![Value::new("z", DType::F32, vec![])],
            nodes: vec![node("id", "Identity", "", &["w"], &["z"])],
            ..Default::default()
        };
        iff.attrs
            .insert("then_branch".into(), Attr::Graph(Box::new(branch.clone())));
        iff.attrs
            .insert("else_branch".into(), Attr::Graph(Box::new(branch)));
        other.nodes.push(iff);
        assert!(matches!(
            quantize_int8(&mut other, &Int8Options::default()),
            Err(QuantizeError::Invalid(_))
        ));
        assert_eq!(other.initializers.len(), 1, "untouched");
    }

    #[test]
    fn matmul_becomes_dynamic_quantize_matmul_integer_cast_mul() {
        let mut g = matmul_graph();
        let stats = quantize_int8(&mut g, &Int8Options::default()).expect("quantize");
        assert_eq!(stats.matmuls, 2);
        assert_eq!(stats.tensors, 1, "the shared weight is quantized once");
        assert_eq!(
            ops(&g),
            [
                "DynamicQuantizeLinear",
                "MatMulInteger",
                "Cast",
                "Mul",
                "Mul",
                "MatMulInteger",
                "Cast",
                "Mul",
                "Mul",
                "Add"
            ],
            "one DynamicQuantizeLinear shared by both MatMuls"
        );
        let dql = &g.nodes[0];
        let mmi = &g.nodes[1];
        assert_eq!(mmi.inputs[0], dql.outputs[0]);
        assert_eq!(mmi.inputs[1], "w_quantized");
        assert_eq!(mmi.inputs[2], dql.outputs[2]);
        assert_eq!(mmi.inputs[3], "w_zero_point");
        assert_eq!(
            g.nodes[2].attr("to").map(|a| matches!(a, Attr::Int(1))),
            Some(true)
        );
        assert_eq!(
            g.nodes[3].inputs,
            [dql.outputs[1].clone(), "w_scale".to_string()]
        );
        assert_eq!(g.nodes[4].outputs, ["h"]);
        // Per-channel by default: one scale and zero point per output column.
        let wq = find(&g, "w_quantized");
        assert_eq!((wq.dtype, wq.dims.clone()), (DType::I8, vec![4, 3]));
        let q = i8_values(wq);
        // Column 0 as quantize_data(w[:, 0], INT8, symmetric) gives (see qparams tests).
        assert_eq!([q[0], q[3], q[6], q[9]], [85, 42, -127, 17]);
        assert_eq!(find(&g, "w_scale").dims, [3]);
        // Symmetric: one zero point (0) for all columns.
        let zp = find(&g, "w_zero_point");
        assert_eq!((zp.dtype, zp.dims.clone()), (DType::I8, vec![]));
        assert_eq!(zp.data.bytes().expect("bytes").as_ref(), [0]);
        assert!(
            g.initializers.iter().all(|t| t.name != "w"),
            "float weight removed"
        );
    }

    #[test]
    fn gemm_with_transposed_weight_and_bias() {
        let mut gemm = node("pool", "Gemm", "", &["x", "w", "b"], &["y"]);
        gemm.attrs.insert("transB".into(), Attr::Int(1));
        // w is [3, 4] (out, in): the quantized weight is its transpose [4, 3].
        let wt: Vec<f32> = (0..3)
            .flat_map(|c| (0..4).map(move |r| W[r * 3 + c]))
            .collect();
        let mut g = graph(
            vec![gemm],
            vec![
                init("w", vec![3, 4], &wt),
                init("b", vec![3], &[0.1, 0.2, 0.3]),
            ],
            17,
        );
        let stats = quantize_int8(&mut g, &Int8Options::default()).expect("quantize");
        assert_eq!(stats.gemms, 1);
        assert_eq!(
            ops(&g),
            [
                "DynamicQuantizeLinear",
                "MatMulInteger",
                "Cast",
                "Mul",
                "Mul",
                "Add"
            ]
        );
        assert_eq!(g.nodes[5].inputs[1], "b");
        assert_eq!(g.nodes[5].outputs, ["y"]);
        let wq = find(&g, "w_transposed_quantized");
        assert_eq!(wq.dims, [4, 3]);
        let q = i8_values(wq);
        assert_eq!([q[0], q[3], q[6], q[9]], [85, 42, -127, 17]);
        // Gemm with alpha ≠ 1 stays float.
        let mut gemm = node("pool", "Gemm", "", &["x", "w"], &["y"]);
        gemm.attrs.insert("alpha".into(), Attr::Float(0.5));
        let mut g = graph(vec![gemm], vec![init("w", vec![4, 3], &W)], 17);
        assert!(quantize_int8(&mut g, &Int8Options::default()).is_err());
    }

    #[test]
    fn matmul_through_transpose_of_a_weight_quantizes_the_transpose() {
        // ferry's exports: MatMul(x, Transpose(w[out, in])).
        let wt: Vec<f32> = (0..3)
            .flat_map(|c| (0..4).map(move |r| W[r * 3 + c]))
            .collect();
        let mut t = node("t", "Transpose", "", &["w"], &["wT"]);
        t.attrs.insert("perm".into(), Attr::Ints(vec![1, 0]));
        let mut g = graph(
            vec![t, node("mm", "MatMul", "", &["x", "wT"], &["y"])],
            vec![init("w", vec![3, 4], &wt)],
            17,
        );
        let stats = quantize_int8(&mut g, &Int8Options::default()).expect("quantize");
        assert_eq!(stats.matmuls, 1);
        assert!(!ops(&g).contains(&"Transpose"), "the dead Transpose goes");
        assert!(g.initializers.iter().all(|t| t.name != "w"));
        let wq = find(&g, "w_transposed_quantized");
        assert_eq!(wq.dims, [4, 3]);
        let q = i8_values(wq);
        assert_eq!([q[1], q[4], q[7], q[10]], [-64, 127, 19, -25]);
    }

    #[test]
    fn per_tensor_and_uint8_weights() {
        let mut g = matmul_graph();
        let opts = Int8Options {
            per_channel: false,
            weight_type: QType::UInt8,
            ..Default::default()
        };
        quantize_int8(&mut g, &opts).expect("quantize");
        assert_eq!(find(&g, "w_scale").dims, Vec::<i64>::new());
        assert_eq!(find(&g, "w_quantized").dtype, DType::U8);
        let zp = find(&g, "w_zero_point").data.bytes().expect("bytes")[0];
        // uint8 weights are asymmetric: zp = round(0 − (−1.0) / (3.0 / 255)) = 85.
        assert_eq!(zp, 85);
    }

    #[test]
    fn excluded_nodes_stay_float_and_keep_their_weight() {
        let mut g = matmul_graph();
        let opts = Int8Options {
            exclude: vec!["mm2".into()],
            ..Default::default()
        };
        let stats = quantize_int8(&mut g, &opts).expect("quantize");
        assert_eq!(stats.matmuls, 1);
        assert!(ops(&g).contains(&"MatMul"));
        assert!(g.initializers.iter().any(|t| t.name == "w"));
    }

    #[test]
    fn attention_becomes_qattention() {
        let mut att = node(
            "att",
            "Attention",
            MS_DOMAIN,
            &["x", "qkv_w", "qkv_b", "mask"],
            &["y"],
        );
        att.attrs.insert("num_heads".into(), Attr::Int(2));
        let mut g = graph(
            vec![att],
            vec![
                init("qkv_w", vec![4, 12], &[0.1; 48]),
                init("qkv_b", vec![12], &[0.0; 12]),
            ],
            17,
        );
        let stats = quantize_int8(&mut g, &Int8Options::default()).expect("quantize");
        assert_eq!(stats.attentions, 1);
        assert_eq!(ops(&g), ["DynamicQuantizeLinear", "QAttention"]);
        let dql = &g.nodes[0].outputs;
        let q = &g.nodes[1];
        assert_eq!(q.domain, MS_DOMAIN);
        let want = [
            dql[0].as_str(),
            "qkv_w_quantized",
            "qkv_b",
            dql[1].as_str(),
            "qkv_w_scale",
            "mask",
            dql[2].as_str(),
            "qkv_w_zero_point",
        ];
        assert_eq!(q.inputs, want);
        assert!(matches!(q.attr("num_heads"), Some(Attr::Int(2))));
        assert_eq!(find(&g, "qkv_w_scale").dims, [12]);
        assert!(g.opsets.iter().any(|o| o.domain == MS_DOMAIN));
    }

    #[test]
    fn attention_with_unknown_attributes_stays_float() {
        // QAttention has no `qkv_hidden_sizes`: the node is skipped, not rejected, and the
        // rest of the graph (here a MatMul) is quantized as usual.
        let mut att = node("att", "Attention", MS_DOMAIN, &["x", "w", "b"], &["a"]);
        att.attrs
            .insert("qkv_hidden_sizes".into(), Attr::Ints(vec![4, 4, 4]));
        let before = att.clone();
        let mm = node("mm", "MatMul", "", &["a", "w2"], &["y"]);
        let mut g = graph(
            vec![att, mm],
            vec![
                init("w", vec![4, 12], &[0.1; 48]),
                init("b", vec![12], &[0.0; 12]),
                init("w2", vec![12, 3], &[0.2; 36]),
            ],
            17,
        );
        let stats = quantize_int8(&mut g, &Int8Options::default()).expect("quantize");
        assert_eq!((stats.attentions, stats.matmuls), (0, 1), "{stats}");
        assert_eq!(
            ops(&g),
            [
                "Attention",
                "DynamicQuantizeLinear",
                "MatMulInteger",
                "Cast",
                "Mul",
                "Mul"
            ]
        );
        let att = &g.nodes[0];
        assert_eq!(
            (&att.domain, &att.inputs, &att.outputs),
            (&before.domain, &before.inputs, &before.outputs)
        );
        assert!(matches!(att.attr("qkv_hidden_sizes"), Some(Attr::Ints(v)) if v == &[4, 4, 4]));
        // Its weight and bias stay float32, and no quantized copy of them is made.
        assert_eq!(find(&g, "w").dtype, DType::F32);
        assert_eq!(find(&g, "w").data.to_f32_vec().expect("w"), [0.1; 48]);
        assert_eq!(find(&g, "b").dtype, DType::F32);
        assert!(g.initializers.iter().all(|t| !t.name.starts_with("w_")));
        assert!(g.nodes.iter().all(|n| n.op_type != "QAttention"));
        assert_eq!(find(&g, "w2_quantized").dtype, DType::I8);

        // Alone, it leaves nothing to quantize: that error, and the graph untouched.
        let mut alone = graph(vec![before], vec![init("w", vec![4, 12], &[0.1; 48])], 17);
        let e = quantize_int8(&mut alone, &Int8Options::default()).expect_err("nothing");
        assert!(e.to_string().starts_with("nothing to quantize"), "{e}");
        assert_eq!(ops(&alone), ["Attention"]);
        assert_eq!(find(&alone, "w").dtype, DType::F32);
    }

    #[test]
    fn embed_layer_norm_becomes_qembed_layer_norm() {
        let mut e = node(
            "emb",
            "EmbedLayerNormalization",
            MS_DOMAIN,
            &["ids", "seg", "word", "pos", "types", "gamma", "beta"],
            &["y", "mask_index"],
        );
        e.attrs.insert("epsilon".into(), Attr::Float(1e-12));
        let mut g = graph(
            vec![e],
            vec![
                init("word", vec![5, 4], &[0.3; 20]),
                init("pos", vec![6, 4], &[-0.2; 24]),
                init("types", vec![2, 4], &[0.1; 8]),
                init("gamma", vec![4], &[1.0; 4]),
                init("beta", vec![4], &[0.0; 4]),
            ],
            17,
        );
        let stats = quantize_int8(&mut g, &Int8Options::default()).expect("quantize");
        assert_eq!(stats.embed_layer_norms, 1);
        assert_eq!(ops(&g), ["QEmbedLayerNormalization"]);
        let n = &g.nodes[0];
        let t = ["word", "pos", "types", "gamma", "beta"];
        let mut want: Vec<String> = vec!["ids".into(), "seg".into()];
        want.extend(t.iter().map(|s| format!("{s}_quantized")));
        want.push(String::new());
        want.extend(t.iter().map(|s| format!("{s}_scale")));
        want.extend(t.iter().map(|s| format!("{s}_zero_point")));
        assert_eq!(n.inputs, want);
        assert_eq!(n.outputs, ["y", "mask_index"]);
        // Tables are uint8 per tensor (QEmbedLayerNormalization takes scalar scales).
        assert_eq!(find(&g, "word_quantized").dtype, DType::U8);
        assert_eq!(find(&g, "word_scale").dims, Vec::<i64>::new());
        assert_eq!(g.initializers.len(), 15);
    }

    #[test]
    fn gather_of_a_table_reads_uint8_and_dequantizes() {
        let table: Vec<f32> = (0..20).map(|i| i as f32 * 0.1 - 0.5).collect();
        let mk = || {
            graph(
                vec![node("g", "Gather", "", &["table", "ids"], &["y"])],
                vec![init("table", vec![5, 4], &table)],
                17,
            )
        };
        let mut g = mk();
        let stats = quantize_int8(&mut g, &Int8Options::default()).expect("quantize");
        assert_eq!(stats.gathers, 1);
        assert_eq!(ops(&g), ["Gather", "DequantizeLinear"]);
        assert_eq!(g.nodes[0].inputs, ["table_quantized", "ids"]);
        assert_eq!(g.nodes[1].outputs, ["y"]);
        assert!(matches!(g.nodes[1].attr("axis"), Some(Attr::Int(-1))));
        assert_eq!(find(&g, "table_scale").dims, [4]);

        // Without per-channel: as ONNX Runtime, one scale and zero point.
        let mut g = mk();
        let opts = Int8Options {
            per_channel: false,
            ..Default::default()
        };
        quantize_int8(&mut g, &opts).expect("quantize");
        assert!(g.nodes[1].attr("axis").is_none());
        assert_eq!(find(&g, "table_scale").dims, Vec::<i64>::new());
        // [-0.5, 1.4] over uint8: zp = round(0 − (−0.5) / (1.9 / 255)) = 67.
        assert_eq!(find(&g, "table_zero_point").data.bytes().expect("b")[0], 67);
    }

    #[test]
    fn nothing_to_quantize_and_old_opsets_are_errors() {
        let mut g = graph(vec![node("r", "Relu", "", &["x"], &["y"])], vec![], 17);
        let e = quantize_int8(&mut g, &Int8Options::default()).expect_err("no MatMul");
        assert!(e.to_string().contains("nothing to quantize"), "{e}");
        let mut g = matmul_graph();
        g.opsets[0].version = 10;
        let e = quantize_int8(&mut g, &Int8Options::default()).expect_err("opset 10");
        assert!(e.to_string().contains("opset 11"), "{e}");
    }
}
