//! The symbolic tracer: records ops over symbolic tensors into a [`Graph`].

use std::collections::{BTreeMap, HashMap, HashSet};

use ferry_ir::{Attr, DType, Dim, Graph, Initializer, Node, OpsetImport, TensorData, Value};

use crate::TraceError;

/// A traced tensor: the name of a graph value plus its inferred type and shape.
#[derive(Debug, Clone, PartialEq)]
pub struct T {
    /// Value name in the graph.
    pub name: String,
    /// Element type.
    pub dtype: DType,
    /// Shape, with symbolic dims where the size is only known at run time.
    pub shape: Vec<Dim>,
}

impl T {
    /// Rank.
    pub fn rank(&self) -> usize {
        self.shape.len()
    }
}

/// Records operations into a graph, naming nodes after the module scope they come from.
#[derive(Debug)]
pub struct Tracer {
    graph: Graph,
    opset: i64,
    scope: Vec<String>,
    used_names: HashMap<String, usize>,
    weight_names: HashSet<String>,
    renames: Vec<(String, String)>,
    float: DType,
    weight_casts: HashMap<String, T>,
}

impl Tracer {
    /// A tracer for the given default-domain opset.
    pub fn new(name: &str, opset: i64) -> Self {
        let graph = Graph {
            name: name.to_string(),
            opsets: vec![OpsetImport {
                domain: String::new(),
                version: opset,
            }],
            ..Graph::default()
        };
        Self {
            graph,
            opset,
            scope: Vec::new(),
            used_names: HashMap::new(),
            weight_names: HashSet::new(),
            renames: Vec::new(),
            float: DType::F32,
            weight_casts: HashMap::new(),
        }
    }

    /// Sets the element type of the graph's float compute (float32 by default, float16 for
    /// `--dtype fp16`): the type of [`Tracer::scalar`] constants, masks and outputs.
    pub fn set_float_dtype(&mut self, dtype: DType) {
        self.float = dtype;
    }

    /// The element type of the graph's float compute.
    pub fn float_dtype(&self) -> DType {
        self.float
    }

    /// The opset being traced for.
    pub fn opset(&self) -> i64 {
        self.opset
    }

    /// Enters a module scope (`encoder`, `layer.0`, …).
    pub fn push(&mut self, scope: impl Into<String>) {
        self.scope.push(scope.into());
    }

    /// The checkpoint path of the current module: scope parts joined with dots
    /// (`encoder.layer.0.attention.self.query`).
    pub fn module_path(&self) -> String {
        self.scope.join(".")
    }

    /// Leaves the innermost scope.
    pub fn pop(&mut self) {
        self.scope.pop();
    }

    /// Declares a graph input.
    pub fn input(&mut self, name: &str, dtype: DType, shape: Vec<Dim>) -> T {
        self.graph
            .inputs
            .push(Value::new(name, dtype, shape.clone()));
        T {
            name: name.to_string(),
            dtype,
            shape,
        }
    }

    /// Adds a weight as an initializer under `name` (once, however often it is used).
    pub fn weight(&mut self, name: &str, init: &Initializer) -> T {
        if self.weight_names.insert(name.to_string()) {
            let mut i = init.clone();
            i.name = name.to_string();
            self.graph.initializers.push(i);
        }
        T {
            name: name.to_string(),
            dtype: init.dtype,
            shape: init.dims.iter().map(|&d| Dim::Fixed(d)).collect(),
        }
    }

    /// Marks `t` as a graph output called `name` (the value is renamed when tracing
    /// finishes, so `t` stays usable meanwhile).
    pub fn output(&mut self, t: &T, name: &str) {
        self.renames.push((t.name.clone(), name.to_string()));
        self.graph
            .outputs
            .push(Value::new(name, t.dtype, t.shape.clone()));
    }

    /// Renames the graph output `from` to `to` (the value it marks is unchanged).
    pub fn rename_output(&mut self, from: &str, to: &str) {
        for (_, name) in self.renames.iter_mut().filter(|(_, n)| n == from) {
            *name = to.to_string();
        }
        for v in self.graph.outputs.iter_mut().filter(|v| v.name == from) {
            v.name = to.to_string();
        }
    }

    /// The graph input called `name`, if declared.
    pub fn input_named(&self, name: &str) -> Option<T> {
        let v = self.graph.inputs.iter().find(|v| v.name == name)?;
        Some(T {
            name: v.name.clone(),
            dtype: v.dtype,
            shape: v.shape.clone()?,
        })
    }

    /// The value marked as the graph output `name` (by its name while tracing), if any.
    pub fn output_named(&self, name: &str) -> Option<T> {
        let v = self.graph.outputs.iter().find(|v| v.name == name)?;
        let (traced, _) = self.renames.iter().find(|(_, to)| to == name)?;
        Some(T {
            name: traced.clone(),
            dtype: v.dtype,
            shape: v.shape.clone()?,
        })
    }

    /// Finishes tracing.
    pub fn finish(mut self) -> Graph {
        let renames: HashMap<String, String> = self.renames.drain(..).collect();
        // Graph outputs carry their own type; value_info describes intermediates only.
        self.graph
            .value_info
            .retain(|v| !renames.contains_key(v.name.as_str()));
        for n in &mut self.graph.nodes {
            for s in n.inputs.iter_mut().chain(n.outputs.iter_mut()) {
                if let Some(to) = renames.get(s.as_str()) {
                    *s = to.clone();
                }
            }
        }
        self.graph
    }

    fn node_name(&mut self, op_type: &str) -> String {
        let base = if self.scope.is_empty() {
            format!("/{op_type}")
        } else {
            format!("/{}/{op_type}", self.scope.join("/"))
        };
        let n = self.used_names.entry(base.clone()).or_insert(0);
        let name = if *n == 0 { base } else { format!("{base}_{n}") };
        *n += 1;
        name
    }

    /// Records one node with one output of the given type; the generic building block.
    pub fn op(
        &mut self,
        op_type: &str,
        inputs: &[&T],
        attrs: Vec<(&str, Attr)>,
        dtype: DType,
        shape: Vec<Dim>,
    ) -> T {
        let name = self.node_name(op_type);
        let out = format!("{name}_output_0");
        self.graph
            .value_info
            .push(Value::new(out.clone(), dtype, shape.clone()));
        self.graph.nodes.push(Node {
            name,
            op_type: op_type.to_string(),
            domain: String::new(),
            inputs: inputs.iter().map(|t| t.name.clone()).collect(),
            outputs: vec![out.clone()],
            attrs: attrs
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect::<BTreeMap<_, _>>(),
        });
        T {
            name: out,
            dtype,
            shape,
        }
    }

    fn constant(&mut self, dtype: DType, dims: Vec<i64>, data: TensorData) -> T {
        let shape = dims.iter().map(|&d| Dim::Fixed(d)).collect();
        let init = Initializer {
            name: String::new(),
            dtype,
            dims,
            data,
        };
        self.op(
            "Constant",
            &[],
            vec![("value", Attr::Tensor(Box::new(init)))],
            dtype,
            shape,
        )
    }

    /// A scalar f32 constant (for float32-only arithmetic such as index computations;
    /// values that meet activations use [`Tracer::scalar`]).
    pub fn scalar_f32(&mut self, v: f32) -> T {
        self.constant(DType::F32, vec![], TensorData::from_f32(&[v]))
    }

    /// A scalar constant in the compute dtype (see [`Tracer::set_float_dtype`]), rounded
    /// as torch rounds a Python float it multiplies a half tensor by.
    pub fn scalar(&mut self, v: f32) -> T {
        let bytes = match self.float {
            DType::F16 => half::f16::from_f32(v).to_le_bytes().to_vec(),
            DType::BF16 => half::bf16::from_f32(v).to_le_bytes().to_vec(),
            _ => v.to_le_bytes().to_vec(),
        };
        self.constant(self.float, vec![], TensorData::owned(bytes))
    }

    /// The most negative finite value of the compute dtype (`torch.finfo(dtype).min`),
    /// which transformers puts at masked attention positions.
    pub fn float_min(&mut self) -> T {
        let v = match self.float {
            DType::F16 => half::f16::MIN.to_f32(),
            DType::BF16 => half::bf16::MIN.to_f32(),
            _ => f32::MIN,
        };
        self.scalar(v)
    }

    /// Casts to the compute dtype (a no-op, returning `a`, when it already is).
    pub fn cast_to_float(&mut self, a: &T) -> T {
        if a.dtype == self.float {
            return a.clone();
        }
        let code = match self.float {
            DType::F16 => 10,
            DType::BF16 => 16,
            _ => 1,
        };
        self.cast(a, self.float, code)
    }

    /// A weight stored in a narrower float type than the compute dtype (bfloat16 weights
    /// of a float32-compute graph): the initializer is kept as stored and one `Cast` to the
    /// compute dtype, shared by every use, feeds the graph.
    pub fn weight_cast(&mut self, name: &str, init: &Initializer) -> T {
        if let Some(t) = self.weight_casts.get(name) {
            return t.clone();
        }
        let w = self.weight(name, init);
        let saved = std::mem::take(&mut self.scope);
        self.scope = name.split('.').map(String::from).collect();
        let c = self.cast_to_float(&w);
        self.scope = saved;
        self.weight_casts.insert(name.to_string(), c.clone());
        c
    }

    /// A scalar i64 constant.
    pub fn scalar_i64(&mut self, v: i64) -> T {
        self.constant(DType::I64, vec![], TensorData::from_i64(&[v]))
    }

    /// A 1-D i64 constant.
    pub fn ints(&mut self, v: &[i64]) -> T {
        self.constant(DType::I64, vec![v.len() as i64], TensorData::from_i64(v))
    }

    fn binary(&mut self, op: &str, a: &T, b: &T) -> Result<T, TraceError> {
        if a.dtype != b.dtype {
            return Err(TraceError::Shape(format!(
                "{op}: element types differ ({} and {})",
                a.dtype, b.dtype
            )));
        }
        let shape = broadcast(&a.shape, &b.shape).ok_or_else(|| {
            TraceError::Shape(format!(
                "{op}: cannot broadcast {} with {}",
                fmt_shape(&a.shape),
                fmt_shape(&b.shape)
            ))
        })?;
        Ok(self.op(op, &[a, b], vec![], a.dtype, shape))
    }

    /// Elementwise `a + b` with broadcasting.
    pub fn add(&mut self, a: &T, b: &T) -> Result<T, TraceError> {
        self.binary("Add", a, b)
    }

    /// Elementwise `a - b`.
    pub fn sub(&mut self, a: &T, b: &T) -> Result<T, TraceError> {
        self.binary("Sub", a, b)
    }

    /// Elementwise `a * b`.
    pub fn mul(&mut self, a: &T, b: &T) -> Result<T, TraceError> {
        self.binary("Mul", a, b)
    }

    /// Elementwise `a / b`.
    pub fn div(&mut self, a: &T, b: &T) -> Result<T, TraceError> {
        self.binary("Div", a, b)
    }

    /// Elementwise `a ^ b`.
    pub fn pow(&mut self, a: &T, b: &T) -> Result<T, TraceError> {
        self.binary("Pow", a, b)
    }

    /// A unary elementwise op (`Erf`, `Tanh`, `Relu`, `Sqrt`, `Sigmoid`…).
    pub fn unary(&mut self, op: &str, a: &T) -> T {
        self.op(op, &[a], vec![], a.dtype, a.shape.clone())
    }

    /// Matrix product with numpy semantics (batch dims broadcast).
    pub fn matmul(&mut self, a: &T, b: &T) -> Result<T, TraceError> {
        let err = || {
            TraceError::Shape(format!(
                "MatMul: {} {} x {} {}",
                a.dtype,
                fmt_shape(&a.shape),
                b.dtype,
                fmt_shape(&b.shape)
            ))
        };
        if a.rank() < 2 || b.rank() < 2 || a.dtype != b.dtype {
            return Err(err());
        }
        let (ab, am) = a.shape.split_at(a.rank() - 2);
        let (bb, bm) = b.shape.split_at(b.rank() - 2);
        if !dims_compatible(&am[1], &bm[0]) {
            return Err(err());
        }
        let mut shape = broadcast(ab, bb).ok_or_else(err)?;
        shape.push(am[0].clone());
        shape.push(bm[1].clone());
        Ok(self.op("MatMul", &[a, b], vec![], a.dtype, shape))
    }

    /// `Gemm(a, b, c)` with `transB=1`: `a @ b.T + c` for a 2-D `a` (an `nn.Linear`).
    pub fn gemm_bt(&mut self, a: &T, b: &T, c: &T) -> Result<T, TraceError> {
        if a.rank() != 2 || b.rank() != 2 || !dims_compatible(&a.shape[1], &b.shape[1]) {
            return Err(TraceError::Shape(format!(
                "Gemm: {} x {}^T",
                fmt_shape(&a.shape),
                fmt_shape(&b.shape)
            )));
        }
        let shape = vec![a.shape[0].clone(), b.shape[0].clone()];
        Ok(self.op(
            "Gemm",
            &[a, b, c],
            vec![
                ("alpha", Attr::Float(1.0)),
                ("beta", Attr::Float(1.0)),
                ("transB", Attr::Int(1)),
            ],
            a.dtype,
            shape,
        ))
    }

    /// Permutes axes.
    pub fn transpose(&mut self, a: &T, perm: &[usize]) -> Result<T, TraceError> {
        if perm.len() != a.rank() || perm.iter().any(|&p| p >= a.rank()) {
            return Err(TraceError::Shape(format!(
                "Transpose: perm {perm:?} for {}",
                fmt_shape(&a.shape)
            )));
        }
        let shape = perm.iter().map(|&p| a.shape[p].clone()).collect();
        Ok(self.op(
            "Transpose",
            &[a],
            vec![("perm", Attr::Ints(perm.iter().map(|&p| p as i64).collect()))],
            a.dtype,
            shape,
        ))
    }

    /// Reshapes with a constant target in which `0` copies the input's dim.
    pub fn reshape(&mut self, a: &T, target: &[i64]) -> Result<T, TraceError> {
        let mut shape = Vec::with_capacity(target.len());
        for (i, &d) in target.iter().enumerate() {
            shape.push(match d {
                0 => a.shape.get(i).cloned().ok_or_else(|| {
                    TraceError::Shape(format!("Reshape: no dim {i} in {}", fmt_shape(&a.shape)))
                })?,
                d if d > 0 => Dim::Fixed(d),
                _ => {
                    return Err(TraceError::Shape(format!(
                        "Reshape: unsupported target {target:?}"
                    )));
                }
            });
        }
        let t = self.ints(target);
        Ok(self.op("Reshape", &[a, &t], vec![], a.dtype, shape))
    }

    /// Reshapes to a run-time shape (a 1-D int64 tensor) whose result shape is `shape`.
    pub fn reshape_to(&mut self, a: &T, target: &T, shape: Vec<Dim>) -> T {
        self.op("Reshape", &[a, target], vec![], a.dtype, shape)
    }

    /// `Flatten(a, axis)`: the dims before `axis` and those from it each multiplied out.
    pub fn flatten(&mut self, a: &T, axis: i64, shape: Vec<Dim>) -> T {
        self.op(
            "Flatten",
            &[a],
            vec![("axis", Attr::Int(axis))],
            a.dtype,
            shape,
        )
    }

    /// Gathers along `axis` with a tensor of indices.
    pub fn gather(&mut self, data: &T, indices: &T, axis: usize) -> Result<T, TraceError> {
        if axis >= data.rank() {
            return Err(TraceError::Shape(format!("Gather: axis {axis}")));
        }
        let mut shape = data.shape[..axis].to_vec();
        shape.extend(indices.shape.iter().cloned());
        shape.extend(data.shape[axis + 1..].iter().cloned());
        Ok(self.op(
            "Gather",
            &[data, indices],
            vec![("axis", Attr::Int(axis as i64))],
            data.dtype,
            shape,
        ))
    }

    /// Inserts size-1 axes (sorted, non-negative).
    pub fn unsqueeze(&mut self, a: &T, axes: &[usize]) -> T {
        let mut shape = a.shape.clone();
        for &ax in axes {
            shape.insert(ax.min(shape.len()), Dim::Fixed(1));
        }
        let axes_t = self.ints(&axes.iter().map(|&x| x as i64).collect::<Vec<_>>());
        self.op("Unsqueeze", &[a, &axes_t], vec![], a.dtype, shape)
    }

    /// Casts to another element type.
    pub fn cast(&mut self, a: &T, to: DType, onnx_code: i64) -> T {
        self.op(
            "Cast",
            &[a],
            vec![("to", Attr::Int(onnx_code))],
            to,
            a.shape.clone(),
        )
    }

    /// Softmax over the last axis.
    pub fn softmax_last(&mut self, a: &T) -> T {
        self.op(
            "Softmax",
            &[a],
            vec![("axis", Attr::Int(-1))],
            a.dtype,
            a.shape.clone(),
        )
    }

    /// The shape of `a` as a 1-D int64 tensor.
    pub fn shape_of(&mut self, a: &T) -> T {
        let n = a.rank() as i64;
        self.op("Shape", &[a], vec![], DType::I64, vec![Dim::Fixed(n)])
    }

    /// `Slice(a, starts, ends, axes)` where the caller supplies the resulting shape.
    pub fn slice(&mut self, a: &T, starts: &T, ends: &T, axes: &T, shape: Vec<Dim>) -> T {
        self.op("Slice", &[a, starts, ends, axes], vec![], a.dtype, shape)
    }

    /// `[start, end)` of the last axis (a constant range of features).
    pub fn slice_last(&mut self, x: &T, start: i64, end: i64) -> T {
        let s = self.ints(&[start]);
        let e = self.ints(&[end]);
        let a = self.ints(&[-1]);
        let mut shape = x.shape.clone();
        if let Some(last) = shape.last_mut() {
            *last = Dim::Fixed(end - start);
        }
        self.slice(x, &s, &e, &a, shape)
    }

    /// Mean over the last axis, keeping it (attribute form, valid for opsets < 18).
    pub fn reduce_mean_last(&mut self, a: &T) -> Result<T, TraceError> {
        let mut shape = a.shape.clone();
        if let Some(last) = shape.last_mut() {
            *last = Dim::Fixed(1);
        }
        if self.opset >= 18 {
            let axes = self.ints(&[-1]);
            Ok(self.op(
                "ReduceMean",
                &[a, &axes],
                vec![("keepdims", Attr::Int(1))],
                a.dtype,
                shape,
            ))
        } else {
            Ok(self.op(
                "ReduceMean",
                &[a],
                vec![("axes", Attr::Ints(vec![-1])), ("keepdims", Attr::Int(1))],
                a.dtype,
                shape,
            ))
        }
    }

    /// `LayerNormalization` over the last axis (opset 17+), without bias when `beta` is `None`.
    pub fn layer_norm_op(&mut self, x: &T, gamma: &T, beta: Option<&T>, eps: f32) -> T {
        let inputs: Vec<&T> = [Some(x), Some(gamma), beta].into_iter().flatten().collect();
        self.op(
            "LayerNormalization",
            &inputs,
            vec![("axis", Attr::Int(-1)), ("epsilon", Attr::Float(eps))],
            x.dtype,
            x.shape.clone(),
        )
    }
}

fn dims_compatible(a: &Dim, b: &Dim) -> bool {
    match (a, b) {
        (Dim::Fixed(x), Dim::Fixed(y)) => x == y,
        _ => true,
    }
}

/// Numpy broadcasting over possibly symbolic dims.
pub(crate) fn broadcast(a: &[Dim], b: &[Dim]) -> Option<Vec<Dim>> {
    let n = a.len().max(b.len());
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let da = if i + a.len() >= n {
            a.get(i + a.len() - n)
        } else {
            None
        };
        let db = if i + b.len() >= n {
            b.get(i + b.len() - n)
        } else {
            None
        };
        out.push(match (da, db) {
            (Some(x), None) | (None, Some(x)) => x.clone(),
            (Some(Dim::Fixed(1)), Some(y)) => y.clone(),
            (Some(x), Some(Dim::Fixed(1))) => x.clone(),
            (Some(x), Some(y)) if x == y => x.clone(),
            (Some(Dim::Sym(x)), Some(Dim::Sym(_))) => Dim::Sym(x.clone()),
            (Some(Dim::Sym(_)), Some(f @ Dim::Fixed(_)))
            | (Some(f @ Dim::Fixed(_)), Some(Dim::Sym(_))) => f.clone(),
            _ => return None,
        });
    }
    Some(out)
}

pub(crate) fn fmt_shape(s: &[Dim]) -> String {
    let parts: Vec<String> = s.iter().map(ToString::to_string).collect();
    format!("[{}]", parts.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broadcasting() {
        let b = Dim::sym("batch_size");
        let s = Dim::sym("sequence_length");
        let r = broadcast(
            &[b.clone(), s.clone(), Dim::Fixed(8)],
            &[s.clone(), Dim::Fixed(8)],
        );
        assert_eq!(r, Some(vec![b.clone(), s.clone(), Dim::Fixed(8)]));
        assert_eq!(
            broadcast(&[Dim::Fixed(3)], &[Dim::Fixed(4)]),
            None,
            "3 vs 4 must not broadcast"
        );
        assert_eq!(broadcast(&[], std::slice::from_ref(&b)), Some(vec![b]));
    }

    #[test]
    fn node_names_follow_scope_and_dedupe() -> Result<(), TraceError> {
        let mut t = Tracer::new("g", 17);
        let x = t.input("x", DType::F32, vec![Dim::sym("b"), Dim::Fixed(4)]);
        t.push("encoder");
        t.push("layer.0");
        let a = t.add(&x, &x)?;
        let b = t.add(&a, &x)?;
        t.pop();
        t.pop();
        t.output(&b, "y");
        let g = t.finish();
        assert_eq!(g.nodes[0].name, "/encoder/layer.0/Add");
        assert_eq!(g.nodes[1].name, "/encoder/layer.0/Add_1");
        assert_eq!(g.nodes[1].outputs[0], "y");
        assert_eq!(g.outputs[0].name, "y");
        Ok(())
    }

    #[test]
    fn matmul_shapes() -> Result<(), TraceError> {
        let mut t = Tracer::new("g", 17);
        let x = t.input(
            "x",
            DType::F32,
            vec![Dim::sym("b"), Dim::sym("s"), Dim::Fixed(4)],
        );
        let w = t.input("w", DType::F32, vec![Dim::Fixed(4), Dim::Fixed(6)]);
        let y = t.matmul(&x, &w)?;
        assert_eq!(y.shape, vec![Dim::sym("b"), Dim::sym("s"), Dim::Fixed(6)]);
        let bad = t.input("v", DType::F32, vec![Dim::Fixed(5), Dim::Fixed(6)]);
        assert!(t.matmul(&x, &bad).is_err());
        Ok(())
    }

    #[test]
    fn half_compute_constants_and_dtype_checks() -> Result<(), TraceError> {
        let mut t = Tracer::new("g", 17);
        t.set_float_dtype(DType::F16);
        let x = t.input("x", DType::F16, vec![Dim::Fixed(2)]);
        let c = t.scalar(0.1);
        assert_eq!(c.dtype, DType::F16);
        let min = t.float_min();
        assert_eq!(min.dtype, DType::F16);
        assert!(t.add(&x, &c).is_ok());
        // Mixing element types is a trace error, not a graph ONNX Runtime rejects.
        let f = t.scalar_f32(1.0);
        assert!(t.add(&x, &f).is_err());
        let g = t.finish();
        let consts: Vec<Vec<u8>> = g
            .nodes
            .iter()
            .filter_map(|n| match n.attrs.get("value") {
                Some(Attr::Tensor(i)) => i.data.bytes().ok().map(|b| b.to_vec()),
                _ => None,
            })
            .collect();
        assert_eq!(consts[0], half::f16::from_f32(0.1).to_le_bytes().to_vec());
        assert_eq!(consts[1], half::f16::MIN.to_le_bytes().to_vec());
        Ok(())
    }

    #[test]
    fn bfloat16_weights_are_cast_once() {
        let mut t = Tracer::new("g", 17);
        let init = Initializer {
            name: String::new(),
            dtype: DType::BF16,
            dims: vec![2],
            data: TensorData::owned(vec![0; 4]),
        };
        let a = t.weight_cast("enc.w", &init);
        let b = t.weight_cast("enc.w", &init);
        assert_eq!(a, b);
        assert_eq!(a.dtype, DType::F32);
        let g = t.finish();
        assert_eq!(g.initializers.len(), 1);
        assert_eq!(g.initializers[0].dtype, DType::BF16);
        let casts: Vec<&Node> = g.nodes.iter().filter(|n| n.op_type == "Cast").collect();
        assert_eq!(casts.len(), 1);
        assert_eq!(casts[0].name, "/enc/w/Cast");
    }
}
