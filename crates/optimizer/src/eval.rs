//! A small evaluator of the ONNX ops that appear on constant paths (shape arithmetic,
//! index tensors, masks), with the semantics of the ONNX specification.
//!
//! [`eval`] computes one node's outputs from constant inputs, for float32, int32, int64
//! and bool tensors. It returns `None` for anything it does not handle exactly (an op or
//! dtype outside its set, an attribute it does not know, out-of-range indices, integer
//! division by zero, float → int casts out of range), so the caller leaves the node alone.

use ferry_ir::{Attr, DType, Initializer, Node, TensorData};

/// Elements of a constant tensor, by type.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Data {
    /// float32.
    F32(Vec<f32>),
    /// int32.
    I32(Vec<i32>),
    /// int64.
    I64(Vec<i64>),
    /// bool.
    Bool(Vec<bool>),
}

impl Data {
    fn len(&self) -> usize {
        match self {
            Data::F32(v) => v.len(),
            Data::I32(v) => v.len(),
            Data::I64(v) => v.len(),
            Data::Bool(v) => v.len(),
        }
    }

    fn dtype(&self) -> DType {
        match self {
            Data::F32(_) => DType::F32,
            Data::I32(_) => DType::I32,
            Data::I64(_) => DType::I64,
            Data::Bool(_) => DType::Bool,
        }
    }

    /// The elements at `idx`, in order (callers guarantee the indices are in range).
    fn pick(&self, idx: &[usize]) -> Data {
        match self {
            Data::F32(v) => Data::F32(idx.iter().map(|&i| v[i]).collect()),
            Data::I32(v) => Data::I32(idx.iter().map(|&i| v[i]).collect()),
            Data::I64(v) => Data::I64(idx.iter().map(|&i| v[i]).collect()),
            Data::Bool(v) => Data::Bool(idx.iter().map(|&i| v[i]).collect()),
        }
    }

    /// Integer elements as i64 (for shape, axes and index inputs).
    fn ints(&self) -> Option<Vec<i64>> {
        match self {
            Data::I64(v) => Some(v.clone()),
            Data::I32(v) => Some(v.iter().map(|&x| i64::from(x)).collect()),
            _ => None,
        }
    }
}

/// A constant tensor: dims and row-major elements.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Tensor {
    /// Shape.
    pub dims: Vec<usize>,
    /// Elements (`dims`' product of them).
    pub data: Data,
}

impl Tensor {
    /// A tensor, if the element count matches the dims.
    pub fn new(dims: Vec<usize>, data: Data) -> Option<Tensor> {
        (numel(&dims) == data.len()).then_some(Tensor { dims, data })
    }

    /// A 1-D int64 tensor.
    pub fn i64s(v: Vec<i64>) -> Tensor {
        Tensor {
            dims: vec![v.len()],
            data: Data::I64(v),
        }
    }

    /// The element type.
    pub fn dtype(&self) -> DType {
        self.data.dtype()
    }

    /// Reads an initializer of a handled dtype (`None` for others or unreadable bytes).
    pub fn from_initializer(init: &Initializer) -> Option<Tensor> {
        let dims = init
            .dims
            .iter()
            .map(|&d| usize::try_from(d).ok())
            .collect::<Option<Vec<usize>>>()?;
        let bytes = init.data.bytes().ok()?;
        let data = match init.dtype {
            DType::F32 => Data::F32(
                bytes
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect(),
            ),
            DType::I32 => Data::I32(
                bytes
                    .chunks_exact(4)
                    .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect(),
            ),
            DType::I64 => Data::I64(
                bytes
                    .chunks_exact(8)
                    .map(|c| i64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
                    .collect(),
            ),
            DType::Bool => Data::Bool(bytes.iter().map(|&b| b != 0).collect()),
            _ => return None,
        };
        Tensor::new(dims, data)
    }

    /// An owned initializer named `name` holding this tensor.
    pub fn into_initializer(self, name: &str) -> Initializer {
        let dtype = self.dtype();
        let bytes: Vec<u8> = match &self.data {
            Data::F32(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            Data::I32(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            Data::I64(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            Data::Bool(v) => v.iter().map(|&b| u8::from(b)).collect(),
        };
        Initializer {
            name: name.to_string(),
            dtype,
            dims: self.dims.iter().map(|&d| d as i64).collect(),
            data: TensorData::owned(bytes),
        }
    }

    fn scalar_like(&self) -> bool {
        self.data.len() == 1
    }
}

/// Most elements a computed tensor may have (larger results are left to run time).
const MAX_ELEMENTS: usize = 1 << 24;

/// Product of dims, saturating (so absurd dims never overflow; they fail the length or
/// [`MAX_ELEMENTS`] checks instead).
fn numel(dims: &[usize]) -> usize {
    dims.iter().fold(1usize, |a, &d| a.saturating_mul(d))
}

/// `Some(n)` when a result of `dims` is small enough to compute.
fn bounded(dims: &[usize]) -> Option<usize> {
    let n = numel(dims);
    (n <= MAX_ELEMENTS).then_some(n)
}

fn strides(dims: &[usize]) -> Vec<usize> {
    let mut s = vec![1usize; dims.len()];
    for i in (0..dims.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1].saturating_mul(dims[i + 1]);
    }
    s
}

/// Normalizes a possibly negative axis for a rank.
fn axis(a: i64, rank: usize) -> Option<usize> {
    let r = rank as i64;
    let a = if a < 0 { a + r } else { a };
    (0..r).contains(&a).then_some(a as usize)
}

/// For each element of `out` (row-major), the flat index into a tensor of `dims`
/// broadcast to `out` (numpy rules: `dims` right-aligned, size-1 dims repeated).
fn broadcast_index(dims: &[usize], out: &[usize]) -> Option<Vec<usize>> {
    let pad = out.len() - dims.len();
    let src_strides = strides(dims);
    // Stride of each output axis in the source (0 where broadcast).
    let st: Vec<usize> = (0..out.len())
        .map(|i| {
            if i < pad || dims[i - pad] == 1 {
                0
            } else {
                src_strides[i - pad]
            }
        })
        .collect();
    let total = bounded(out)?;
    let mut idx = Vec::with_capacity(total);
    let mut pos = vec![0usize; out.len()];
    let mut off = 0usize;
    for _ in 0..total {
        idx.push(off);
        for ax in (0..out.len()).rev() {
            pos[ax] += 1;
            off += st[ax];
            if pos[ax] < out[ax] {
                break;
            }
            off -= st[ax] * out[ax];
            pos[ax] = 0;
        }
    }
    Some(idx)
}

/// The multidirectional broadcast shape of several shapes.
fn broadcast_shape(shapes: &[&[usize]]) -> Option<Vec<usize>> {
    let rank = shapes.iter().map(|s| s.len()).max().unwrap_or(0);
    let mut out = vec![1usize; rank];
    for s in shapes {
        let pad = rank - s.len();
        for (i, &d) in s.iter().enumerate() {
            let o = &mut out[pad + i];
            if *o == 1 {
                *o = d;
            } else if d != 1 && d != *o {
                return None;
            }
        }
    }
    Some(out)
}

fn int_attr(n: &Node, name: &str) -> Option<Option<i64>> {
    match n.attr(name) {
        None => Some(None),
        Some(Attr::Int(v)) => Some(Some(*v)),
        Some(_) => None,
    }
}

fn ints_attr(n: &Node, name: &str) -> Option<Option<Vec<i64>>> {
    match n.attr(name) {
        None => Some(None),
        Some(Attr::Ints(v)) => Some(Some(v.clone())),
        Some(_) => None,
    }
}

/// Whether `n` has only attributes from `known`.
fn only_attrs(n: &Node, known: &[&str]) -> bool {
    n.attrs.keys().all(|k| known.contains(&k.as_str()))
}

/// The ONNX `TensorProto.DataType` codes ferry evaluates.
fn dtype_of_code(code: i64) -> Option<DType> {
    match code {
        1 => Some(DType::F32),
        6 => Some(DType::I32),
        7 => Some(DType::I64),
        9 => Some(DType::Bool),
        _ => None,
    }
}

/// Computes node `n`'s outputs from its inputs (`None` for an omitted optional input),
/// under default-domain opset `opset`. `None` when the node is not evaluated (see the
/// module docs). `Shape` is not evaluated here: its input need not be constant (see
/// [`shape_of`]).
pub(crate) fn eval(n: &Node, inputs: &[Option<&Tensor>], opset: i64) -> Option<Vec<Tensor>> {
    let get = |i: usize| inputs.get(i).copied().flatten();
    let out = match n.op_type.as_str() {
        "Identity" if only_attrs(n, &[]) => get(0)?.clone(),
        "Add" | "Sub" | "Mul" | "Div" if only_attrs(n, &[]) => arith(&n.op_type, get(0)?, get(1)?)?,
        "Equal" if only_attrs(n, &[]) => equal(get(0)?, get(1)?)?,
        "Where" if only_attrs(n, &[]) => where_(get(0)?, get(1)?, get(2)?)?,
        "Cast" if only_attrs(n, &["to", "saturate"]) => {
            cast(get(0)?, dtype_of_code(int_attr(n, "to")??)?)?
        }
        "Gather" if only_attrs(n, &["axis"]) => {
            gather(get(0)?, get(1)?, int_attr(n, "axis")?.unwrap_or(0))?
        }
        "Unsqueeze" if only_attrs(n, &["axes"]) => {
            let axes = if opset >= 13 {
                get(1)?.data.ints()?
            } else {
                ints_attr(n, "axes")??
            };
            unsqueeze(get(0)?, &axes)?
        }
        "Squeeze" if only_attrs(n, &["axes"]) => {
            let axes = if opset >= 13 {
                match get(1) {
                    Some(t) => Some(t.data.ints()?),
                    None => None,
                }
            } else {
                ints_attr(n, "axes")?
            };
            squeeze(get(0)?, axes.as_deref())?
        }
        "Concat" if only_attrs(n, &["axis"]) => {
            let parts = (0..n.inputs.len())
                .map(get)
                .collect::<Option<Vec<&Tensor>>>()?;
            concat(&parts, int_attr(n, "axis")??)?
        }
        "Reshape" if only_attrs(n, &["allowzero"]) && opset >= 5 => {
            let allowzero = int_attr(n, "allowzero")?.unwrap_or(0) != 0;
            reshape(get(0)?, &get(1)?.data.ints()?, allowzero)?
        }
        "Transpose" if only_attrs(n, &["perm"]) => {
            transpose(get(0)?, ints_attr(n, "perm")?.as_deref())?
        }
        "Slice" if only_attrs(n, &[]) && opset >= 10 => {
            let ints = |i: usize| match get(i) {
                Some(t) => t.data.ints().map(Some),
                None => Some(None),
            };
            let starts = ints(1)??;
            let ends = ints(2)??;
            slice(
                get(0)?,
                &starts,
                &ends,
                ints(3)?.as_deref(),
                ints(4)?.as_deref(),
            )?
        }
        "ConstantOfShape" if only_attrs(n, &["value"]) => {
            let value = match n.attr("value") {
                None => Tensor::new(vec![1], Data::F32(vec![0.0]))?,
                Some(Attr::Tensor(t)) => Tensor::from_initializer(t)?,
                Some(_) => return None,
            };
            constant_of_shape(&get(0)?.data.ints()?, &value)?
        }
        "Range" if only_attrs(n, &[]) => range(get(0)?, get(1)?, get(2)?)?,
        "Expand" if only_attrs(n, &[]) => expand(get(0)?, &get(1)?.data.ints()?)?,
        _ => return None,
    };
    Some(vec![out])
}

/// `Shape(x)` of a value with fully fixed `dims`, with opset 15's `start`/`end` attributes.
pub(crate) fn shape_of(n: &Node, dims: &[i64]) -> Option<Tensor> {
    if !only_attrs(n, &["start", "end"]) {
        return None;
    }
    let r = dims.len() as i64;
    let clamp = |v: i64| (if v < 0 { v + r } else { v }).clamp(0, r) as usize;
    let start = clamp(int_attr(n, "start")?.unwrap_or(0));
    let end = clamp(int_attr(n, "end")?.unwrap_or(r));
    let v = if start < end {
        dims[start..end].to_vec()
    } else {
        vec![]
    };
    Some(Tensor::i64s(v))
}

fn arith(op: &str, a: &Tensor, b: &Tensor) -> Option<Tensor> {
    let dims = broadcast_shape(&[&a.dims, &b.dims])?;
    let ia = broadcast_index(&a.dims, &dims)?;
    let ib = broadcast_index(&b.dims, &dims)?;
    let data = match (&a.data, &b.data) {
        (Data::F32(x), Data::F32(y)) => {
            let f = match op {
                "Add" => |p: f32, q: f32| p + q,
                "Sub" => |p: f32, q: f32| p - q,
                "Mul" => |p: f32, q: f32| p * q,
                _ => |p: f32, q: f32| p / q,
            };
            Data::F32(ia.iter().zip(&ib).map(|(&i, &j)| f(x[i], y[j])).collect())
        }
        (Data::I64(x), Data::I64(y)) => Data::I64(int_arith(op, x, y, &ia, &ib)?),
        (Data::I32(x), Data::I32(y)) => Data::I32(int_arith(op, x, y, &ia, &ib)?),
        _ => return None,
    };
    Tensor::new(dims, data)
}

/// Integer arithmetic with two's-complement wrap-around, division truncating toward zero
/// (as ONNX Runtime's kernels compute it); `None` on division by zero.
fn int_arith<I>(op: &str, x: &[I], y: &[I], ia: &[usize], ib: &[usize]) -> Option<Vec<I>>
where
    I: Copy + WrappingInt,
{
    ia.iter()
        .zip(ib)
        .map(|(&i, &j)| {
            let (p, q) = (x[i], y[j]);
            match op {
                "Add" => Some(p.wadd(q)),
                "Sub" => Some(p.wsub(q)),
                "Mul" => Some(p.wmul(q)),
                _ => p.cdiv(q),
            }
        })
        .collect()
}

/// The integer operations [`int_arith`] needs.
trait WrappingInt: Sized {
    fn wadd(self, o: Self) -> Self;
    fn wsub(self, o: Self) -> Self;
    fn wmul(self, o: Self) -> Self;
    fn cdiv(self, o: Self) -> Option<Self>;
}

macro_rules! wrapping_int {
    ($t:ty) => {
        impl WrappingInt for $t {
            fn wadd(self, o: Self) -> Self {
                self.wrapping_add(o)
            }
            fn wsub(self, o: Self) -> Self {
                self.wrapping_sub(o)
            }
            fn wmul(self, o: Self) -> Self {
                self.wrapping_mul(o)
            }
            fn cdiv(self, o: Self) -> Option<Self> {
                self.checked_div(o)
            }
        }
    };
}
wrapping_int!(i32);
wrapping_int!(i64);

fn equal(a: &Tensor, b: &Tensor) -> Option<Tensor> {
    let dims = broadcast_shape(&[&a.dims, &b.dims])?;
    let ia = broadcast_index(&a.dims, &dims)?;
    let ib = broadcast_index(&b.dims, &dims)?;
    let pairs = ia.iter().zip(&ib);
    let v: Vec<bool> = match (&a.data, &b.data) {
        (Data::F32(x), Data::F32(y)) => pairs.map(|(&i, &j)| x[i] == y[j]).collect(),
        (Data::I32(x), Data::I32(y)) => pairs.map(|(&i, &j)| x[i] == y[j]).collect(),
        (Data::I64(x), Data::I64(y)) => pairs.map(|(&i, &j)| x[i] == y[j]).collect(),
        (Data::Bool(x), Data::Bool(y)) => pairs.map(|(&i, &j)| x[i] == y[j]).collect(),
        _ => return None,
    };
    Tensor::new(dims, Data::Bool(v))
}

fn where_(c: &Tensor, x: &Tensor, y: &Tensor) -> Option<Tensor> {
    let Data::Bool(cv) = &c.data else {
        return None;
    };
    if x.dtype() != y.dtype() {
        return None;
    }
    let dims = broadcast_shape(&[&c.dims, &x.dims, &y.dims])?;
    let ic = broadcast_index(&c.dims, &dims)?;
    let ix = broadcast_index(&x.dims, &dims)?;
    let iy = broadcast_index(&y.dims, &dims)?;
    // Pick from x and y laid end to end.
    let both = concat_data(&[&x.data, &y.data])?;
    let off = x.data.len();
    let idx: Vec<usize> = (0..ic.len())
        .map(|k| if cv[ic[k]] { ix[k] } else { off + iy[k] })
        .collect();
    Tensor::new(dims, both.pick(&idx))
}

/// Elements of same-typed `parts` end to end.
fn concat_data(parts: &[&Data]) -> Option<Data> {
    let first = parts.first()?;
    macro_rules! join {
        ($variant:ident) => {{
            let mut v = Vec::new();
            for p in parts {
                let Data::$variant(x) = p else {
                    return None;
                };
                v.extend_from_slice(x);
            }
            Data::$variant(v)
        }};
    }
    Some(match first {
        Data::F32(_) => join!(F32),
        Data::I32(_) => join!(I32),
        Data::I64(_) => join!(I64),
        Data::Bool(_) => join!(Bool),
    })
}

fn cast(x: &Tensor, to: DType) -> Option<Tensor> {
    // Float → integer truncates toward zero; NaN or out-of-range values are undefined in
    // ONNX, so they are not folded.
    fn f2i<I: TryFrom<i64>>(v: f32) -> Option<I> {
        if !v.is_finite() || v.abs() >= 9.2e18 {
            return None;
        }
        I::try_from(v.trunc() as i64).ok()
    }
    let data = match (&x.data, to) {
        (d, t) if d.dtype() == t => d.clone(),
        (Data::F32(v), DType::I32) => Data::I32(v.iter().map(|&a| f2i(a)).collect::<Option<_>>()?),
        (Data::F32(v), DType::I64) => Data::I64(v.iter().map(|&a| f2i(a)).collect::<Option<_>>()?),
        (Data::F32(v), DType::Bool) => Data::Bool(v.iter().map(|&a| a != 0.0).collect()),
        (Data::I32(v), DType::F32) => Data::F32(v.iter().map(|&a| a as f32).collect()),
        (Data::I32(v), DType::I64) => Data::I64(v.iter().map(|&a| i64::from(a)).collect()),
        (Data::I32(v), DType::Bool) => Data::Bool(v.iter().map(|&a| a != 0).collect()),
        (Data::I64(v), DType::F32) => Data::F32(v.iter().map(|&a| a as f32).collect()),
        // Narrowing keeps the low 32 bits, as C++ (and ONNX Runtime) does.
        (Data::I64(v), DType::I32) => Data::I32(v.iter().map(|&a| a as i32).collect()),
        (Data::I64(v), DType::Bool) => Data::Bool(v.iter().map(|&a| a != 0).collect()),
        (Data::Bool(v), DType::F32) => {
            Data::F32(v.iter().map(|&a| f32::from(u8::from(a))).collect())
        }
        (Data::Bool(v), DType::I32) => Data::I32(v.iter().map(|&a| i32::from(a)).collect()),
        (Data::Bool(v), DType::I64) => Data::I64(v.iter().map(|&a| i64::from(a)).collect()),
        _ => return None,
    };
    Tensor::new(x.dims.clone(), data)
}

fn gather(data: &Tensor, indices: &Tensor, ax: i64) -> Option<Tensor> {
    let rank = data.dims.len();
    let ax = axis(ax, rank)?;
    let ind = indices.data.ints()?;
    let n = data.dims[ax] as i64;
    let ind = ind
        .iter()
        .map(|&i| {
            let i = if i < 0 { i + n } else { i };
            (0..n).contains(&i).then_some(i as usize)
        })
        .collect::<Option<Vec<usize>>>()?;
    let outer = numel(&data.dims[..ax]);
    let inner = numel(&data.dims[ax + 1..]);
    bounded(&[outer, ind.len(), inner])?;
    let mut idx = Vec::with_capacity(outer * ind.len() * inner);
    for o in 0..outer {
        for &i in &ind {
            let base = (o * data.dims[ax] + i) * inner;
            idx.extend(base..base + inner);
        }
    }
    let mut dims = data.dims[..ax].to_vec();
    dims.extend_from_slice(&indices.dims);
    dims.extend_from_slice(&data.dims[ax + 1..]);
    Tensor::new(dims, data.data.pick(&idx))
}

fn unsqueeze(x: &Tensor, axes: &[i64]) -> Option<Tensor> {
    let rank = x.dims.len() + axes.len();
    let mut ax = axes
        .iter()
        .map(|&a| axis(a, rank))
        .collect::<Option<Vec<usize>>>()?;
    ax.sort_unstable();
    if ax.windows(2).any(|w| w[0] == w[1]) {
        return None;
    }
    let mut dims = x.dims.clone();
    for a in ax {
        dims.insert(a, 1);
    }
    Tensor::new(dims, x.data.clone())
}

fn squeeze(x: &Tensor, axes: Option<&[i64]>) -> Option<Tensor> {
    let rank = x.dims.len();
    let drop: Vec<usize> = match axes {
        Some(axes) => {
            let ax = axes
                .iter()
                .map(|&a| axis(a, rank))
                .collect::<Option<Vec<usize>>>()?;
            if ax.iter().any(|&a| x.dims[a] != 1) {
                return None;
            }
            ax
        }
        None => (0..rank).filter(|&a| x.dims[a] == 1).collect(),
    };
    let dims = (0..rank)
        .filter(|a| !drop.contains(a))
        .map(|a| x.dims[a])
        .collect();
    Tensor::new(dims, x.data.clone())
}

fn concat(parts: &[&Tensor], ax: i64) -> Option<Tensor> {
    let first = parts.first()?;
    let rank = first.dims.len();
    let ax = axis(ax, rank)?;
    for p in parts {
        let same = p.dims.len() == rank
            && (0..rank).all(|i| i == ax || p.dims[i] == first.dims[i])
            && p.dtype() == first.dtype();
        if !same {
            return None;
        }
    }
    let outer = numel(&first.dims[..ax]);
    let mut offsets = Vec::with_capacity(parts.len());
    let mut off = 0;
    for p in parts {
        offsets.push(off);
        off += p.data.len();
    }
    let mut idx = Vec::with_capacity(off);
    for o in 0..outer {
        for (p, &base) in parts.iter().zip(&offsets) {
            let block = numel(&p.dims[ax..]);
            let start = base + o * block;
            idx.extend(start..start + block);
        }
    }
    let all = concat_data(&parts.iter().map(|p| &p.data).collect::<Vec<_>>())?;
    let mut dims = first.dims.clone();
    dims[ax] = parts
        .iter()
        .try_fold(0usize, |n, p| n.checked_add(p.dims[ax]))?;
    Tensor::new(dims, all.pick(&idx))
}

fn reshape(x: &Tensor, shape: &[i64], allowzero: bool) -> Option<Tensor> {
    let mut dims = Vec::with_capacity(shape.len());
    let mut infer = None;
    for (i, &d) in shape.iter().enumerate() {
        match d {
            0 if !allowzero => dims.push(*x.dims.get(i)?),
            -1 if infer.is_none() => {
                infer = Some(i);
                dims.push(1);
            }
            d if d >= 0 => dims.push(d as usize),
            _ => return None,
        }
    }
    let total = x.data.len();
    if let Some(i) = infer {
        let known = numel(&dims);
        if known == 0 || !total.is_multiple_of(known) {
            return None;
        }
        dims[i] = total / known;
    }
    Tensor::new(dims, x.data.clone())
}

fn transpose(x: &Tensor, perm: Option<&[i64]>) -> Option<Tensor> {
    let rank = x.dims.len();
    let perm: Vec<usize> = match perm {
        None => (0..rank).rev().collect(),
        Some(p) => {
            let p = p
                .iter()
                .map(|&a| usize::try_from(a).ok().filter(|&a| a < rank))
                .collect::<Option<Vec<usize>>>()?;
            let mut seen = vec![false; rank];
            for &a in &p {
                if std::mem::replace(&mut seen[a], true) {
                    return None;
                }
            }
            if p.len() != rank {
                return None;
            }
            p
        }
    };
    let out_dims: Vec<usize> = perm.iter().map(|&a| x.dims[a]).collect();
    let src = strides(&x.dims);
    let step: Vec<i128> = perm.iter().map(|&a| src[a] as i128).collect();
    let idx = strided_index(&out_dims, &step, 0);
    Tensor::new(out_dims, x.data.pick(&idx))
}

/// Flat source indices of a row-major walk over `dims`, where axis `i` advances the
/// source by `step[i]` (may be negative) from `start`.
fn strided_index(dims: &[usize], step: &[i128], start: usize) -> Vec<usize> {
    let total = numel(dims);
    let mut idx = Vec::with_capacity(total);
    let mut pos = vec![0usize; dims.len()];
    let mut off = start as i128;
    for _ in 0..total {
        idx.push(off as usize);
        for ax in (0..dims.len()).rev() {
            pos[ax] += 1;
            off += step[ax];
            if pos[ax] < dims[ax] {
                break;
            }
            off -= step[ax] * dims[ax] as i128;
            pos[ax] = 0;
        }
    }
    idx
}

fn slice(
    x: &Tensor,
    starts: &[i64],
    ends: &[i64],
    axes: Option<&[i64]>,
    steps: Option<&[i64]>,
) -> Option<Tensor> {
    let rank = x.dims.len();
    let k = starts.len();
    if ends.len() != k {
        return None;
    }
    let axes: Vec<usize> = match axes {
        Some(a) if a.len() == k => a
            .iter()
            .map(|&a| axis(a, rank))
            .collect::<Option<Vec<_>>>()?,
        Some(_) => return None,
        // Omitted axes are 0..k, which the input must have.
        None if k <= rank => (0..k).collect(),
        None => return None,
    };
    let steps: Vec<i64> = match steps {
        Some(s) if s.len() == k => s.to_vec(),
        Some(_) => return None,
        None => vec![1; k],
    };
    let mut begin: Vec<i64> = vec![0; rank];
    let mut step: Vec<i64> = vec![1; rank];
    let mut dims = x.dims.clone();
    let mut seen = vec![false; rank];
    for i in 0..k {
        let (a, st) = (axes[i], steps[i]);
        if st == 0 || std::mem::replace(&mut seen[a], true) {
            return None;
        }
        let d = x.dims[a] as i64;
        let norm = |v: i64| if v < 0 { v.saturating_add(d) } else { v };
        let (s, e) = if d == 0 {
            (0, 0)
        } else if st > 0 {
            (norm(starts[i]).clamp(0, d), norm(ends[i]).clamp(0, d))
        } else {
            (
                norm(starts[i]).clamp(0, d - 1),
                norm(ends[i]).clamp(-1, d - 1),
            )
        };
        // ceil(|e - s| / |st|) elements when moving in the step's direction.
        let (s128, e128, st128) = (i128::from(s), i128::from(e), i128::from(st));
        let span = if st > 0 { e128 - s128 } else { s128 - e128 };
        let len = if span > 0 {
            (span - 1) / st128.abs() + 1
        } else {
            0
        };
        begin[a] = s;
        step[a] = st;
        dims[a] = len as usize;
    }
    let src = strides(&x.dims);
    let start: i128 = if numel(&dims) == 0 {
        0
    } else {
        (0..rank)
            .map(|a| i128::from(begin[a]) * src[a] as i128)
            .sum()
    };
    let steps: Vec<i128> = (0..rank)
        .map(|a| i128::from(step[a]) * src[a] as i128)
        .collect();
    let idx = strided_index(&dims, &steps, usize::try_from(start).ok()?);
    Tensor::new(dims, x.data.pick(&idx))
}

fn constant_of_shape(shape: &[i64], value: &Tensor) -> Option<Tensor> {
    if !value.scalar_like() {
        return None;
    }
    let dims = shape
        .iter()
        .map(|&d| usize::try_from(d).ok())
        .collect::<Option<Vec<usize>>>()?;
    let idx = vec![0usize; bounded(&dims)?];
    Tensor::new(dims, value.data.pick(&idx))
}

fn range(start: &Tensor, limit: &Tensor, delta: &Tensor) -> Option<Tensor> {
    if !(start.scalar_like() && limit.scalar_like() && delta.scalar_like()) {
        return None;
    }
    let data = match (&start.data, &limit.data, &delta.data) {
        (Data::F32(s), Data::F32(l), Data::F32(d)) => {
            let (s, l, d) = (s[0], l[0], d[0]);
            let n = ((l - s) / d).ceil();
            if d == 0.0 || !n.is_finite() {
                return None;
            }
            let n = bounded(&[n.max(0.0) as usize])?;
            // ONNX defines each element as start + i * delta.
            Data::F32((0..n).map(|i| s + i as f32 * d).collect())
        }
        (Data::I64(s), Data::I64(l), Data::I64(d)) => Data::I64(int_range(s[0], l[0], d[0])?),
        (Data::I32(s), Data::I32(l), Data::I32(d)) => Data::I32(
            int_range(s[0].into(), l[0].into(), d[0].into())?
                .into_iter()
                .map(|v| v as i32)
                .collect(),
        ),
        _ => return None,
    };
    let n = data.len();
    Tensor::new(vec![n], data)
}

fn int_range(s: i64, l: i64, d: i64) -> Option<Vec<i64>> {
    if d == 0 {
        return None;
    }
    let span = i128::from(l) - i128::from(s);
    let d128 = i128::from(d);
    // ceil(span / d), clamped at 0.
    let n = (span / d128 + i128::from(span % d128 != 0 && (span > 0) == (d > 0))).max(0);
    let n = bounded(&[usize::try_from(n).ok()?])?;
    Some((0..n).map(|i| s + i as i64 * d).collect())
}

fn expand(x: &Tensor, shape: &[i64]) -> Option<Tensor> {
    let shape = shape
        .iter()
        .map(|&d| usize::try_from(d).ok())
        .collect::<Option<Vec<usize>>>()?;
    let dims = broadcast_shape(&[&x.dims, &shape])?;
    let idx = broadcast_index(&x.dims, &dims)?;
    Tensor::new(dims, x.data.pick(&idx))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn node(op: &str, n_in: usize, attrs: Vec<(&str, Attr)>) -> Node {
        Node {
            name: format!("/{op}"),
            op_type: op.into(),
            domain: String::new(),
            inputs: (0..n_in).map(|i| format!("i{i}")).collect(),
            outputs: vec!["y".into()],
            attrs: attrs
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect::<BTreeMap<_, _>>(),
        }
    }

    fn f(dims: &[usize], v: &[f32]) -> Tensor {
        Tensor::new(dims.to_vec(), Data::F32(v.to_vec())).expect("f32 tensor")
    }

    fn i(dims: &[usize], v: &[i64]) -> Tensor {
        Tensor::new(dims.to_vec(), Data::I64(v.to_vec())).expect("i64 tensor")
    }

    fn i32t(dims: &[usize], v: &[i32]) -> Tensor {
        Tensor::new(dims.to_vec(), Data::I32(v.to_vec())).expect("i32 tensor")
    }

    fn b(dims: &[usize], v: &[bool]) -> Tensor {
        Tensor::new(dims.to_vec(), Data::Bool(v.to_vec())).expect("bool tensor")
    }

    /// Evaluates at opset 17 with every input present.
    fn ev(op: &str, attrs: Vec<(&str, Attr)>, inputs: &[&Tensor]) -> Option<Tensor> {
        ev_at(
            op,
            attrs,
            &inputs.iter().map(|t| Some(*t)).collect::<Vec<_>>(),
            17,
        )
    }

    fn ev_at(
        op: &str,
        attrs: Vec<(&str, Attr)>,
        inputs: &[Option<&Tensor>],
        opset: i64,
    ) -> Option<Tensor> {
        let n = node(op, inputs.len(), attrs);
        eval(&n, inputs, opset).map(|mut v| v.remove(0))
    }

    #[test]
    fn arithmetic_broadcasts() {
        let a = f(&[2, 3], &[1., 2., 3., 4., 5., 6.]);
        let c = f(&[3], &[10., 20., 30.]);
        assert_eq!(
            ev("Add", vec![], &[&a, &c]),
            Some(f(&[2, 3], &[11., 22., 33., 14., 25., 36.]))
        );
        let col = f(&[2, 1], &[1., 2.]);
        assert_eq!(
            ev("Sub", vec![], &[&a, &col]),
            Some(f(&[2, 3], &[0., 1., 2., 2., 3., 4.]))
        );
        assert_eq!(
            ev("Mul", vec![], &[&f(&[], &[2.]), &a]),
            Some(f(&[2, 3], &[2., 4., 6., 8., 10., 12.]))
        );
        assert_eq!(
            ev("Div", vec![], &[&f(&[1], &[1.]), &f(&[2], &[4., 0.])]),
            Some(f(&[2], &[0.25, f32::INFINITY]))
        );
        // Integer division truncates toward zero; by zero is not folded.
        assert_eq!(
            ev("Div", vec![], &[&i(&[2], &[7, -7]), &i(&[], &[2])]),
            Some(i(&[2], &[3, -3]))
        );
        assert_eq!(ev("Div", vec![], &[&i(&[1], &[7]), &i(&[1], &[0])]), None);
        assert_eq!(
            ev("Mul", vec![], &[&i32t(&[2], &[3, 4]), &i32t(&[1], &[-2])]),
            Some(i32t(&[2], &[-6, -8]))
        );
        // Mixed dtypes and incompatible shapes are left alone.
        assert_eq!(ev("Add", vec![], &[&a, &i(&[1], &[1])]), None);
        assert_eq!(ev("Add", vec![], &[&a, &f(&[2], &[1., 2.])]), None);
        // An unknown attribute is left alone.
        assert_eq!(
            ev("Add", vec![("broadcast", Attr::Int(1))], &[&a, &c]),
            None
        );
    }

    #[test]
    fn equal_and_where() {
        let x = i(&[3], &[1, 2, 3]);
        let eq = ev("Equal", vec![], &[&x, &i(&[], &[2])]);
        assert_eq!(eq, Some(b(&[3], &[false, true, false])));
        let c = b(&[2, 1], &[true, false]);
        let got = ev(
            "Where",
            vec![],
            &[&c, &f(&[3], &[1., 2., 3.]), &f(&[], &[-1.])],
        );
        assert_eq!(got, Some(f(&[2, 3], &[1., 2., 3., -1., -1., -1.])));
        // Condition must be bool, branches the same dtype.
        assert_eq!(ev("Where", vec![], &[&x, &x, &x]), None);
        assert_eq!(ev("Where", vec![], &[&c, &x, &f(&[], &[1.])]), None);
    }

    #[test]
    fn cast_between_handled_types() {
        let to = |c: i64| vec![("to", Attr::Int(c))];
        let x = f(&[4], &[1.7, -1.7, 0.0, 3.0]);
        assert_eq!(ev("Cast", to(7), &[&x]), Some(i(&[4], &[1, -1, 0, 3])));
        assert_eq!(ev("Cast", to(6), &[&x]), Some(i32t(&[4], &[1, -1, 0, 3])));
        assert_eq!(
            ev("Cast", to(9), &[&x]),
            Some(b(&[4], &[true, true, false, true]))
        );
        assert_eq!(
            ev("Cast", to(1), &[&b(&[2], &[true, false])]),
            Some(f(&[2], &[1., 0.]))
        );
        assert_eq!(
            ev("Cast", to(1), &[&i(&[2], &[5, -2])]),
            Some(f(&[2], &[5., -2.]))
        );
        assert_eq!(
            ev("Cast", to(7), &[&i32t(&[1], &[-4])]),
            Some(i(&[1], &[-4]))
        );
        // NaN → int is undefined: not folded. float64 (11) is not handled.
        assert_eq!(ev("Cast", to(7), &[&f(&[1], &[f32::NAN])]), None);
        assert_eq!(ev("Cast", to(11), &[&x]), None);
    }

    #[test]
    fn gather_along_axes() {
        let x = i(&[3, 2], &[0, 1, 10, 11, 20, 21]);
        // Scalar index on axis 0 drops the axis; negative indices wrap.
        assert_eq!(
            ev("Gather", vec![], &[&x, &i(&[], &[-1])]),
            Some(i(&[2], &[20, 21]))
        );
        assert_eq!(
            ev(
                "Gather",
                vec![("axis", Attr::Int(1))],
                &[&x, &i(&[2, 1], &[1, 0])]
            ),
            Some(i(&[3, 2, 1], &[1, 0, 11, 10, 21, 20]))
        );
        assert_eq!(
            ev("Gather", vec![], &[&x, &i32t(&[2], &[2, 0])]),
            Some(i(&[2, 2], &[20, 21, 0, 1]))
        );
        // Out of range is not folded.
        assert_eq!(ev("Gather", vec![], &[&x, &i(&[1], &[3])]), None);
    }

    #[test]
    fn unsqueeze_and_squeeze_inputs_and_attributes() {
        let x = i(&[2], &[4, 5]);
        assert_eq!(
            ev("Unsqueeze", vec![], &[&x, &i(&[2], &[0, -1])]).map(|t| t.dims),
            Some(vec![1, 2, 1])
        );
        // Opset 11: axes attribute.
        let got = ev_at(
            "Unsqueeze",
            vec![("axes", Attr::Ints(vec![1]))],
            &[Some(&x)],
            11,
        );
        assert_eq!(got, Some(i(&[2, 1], &[4, 5])));
        let y = i(&[1, 2, 1], &[4, 5]);
        assert_eq!(
            ev("Squeeze", vec![], &[&y, &i(&[1], &[-1])]).map(|t| t.dims),
            Some(vec![1, 2])
        );
        // No axes: every size-1 axis.
        assert_eq!(ev_at("Squeeze", vec![], &[Some(&y), None], 17), Some(x));
        // Squeezing a non-1 axis is invalid: not folded.
        assert_eq!(ev("Squeeze", vec![], &[&y, &i(&[1], &[1])]), None);
    }

    #[test]
    fn concat_on_inner_axis() {
        let a = i(&[2, 1], &[1, 2]);
        let c = i(&[2, 2], &[3, 4, 5, 6]);
        assert_eq!(
            ev("Concat", vec![("axis", Attr::Int(-1))], &[&a, &c]),
            Some(i(&[2, 3], &[1, 3, 4, 2, 5, 6]))
        );
        assert_eq!(
            ev(
                "Concat",
                vec![("axis", Attr::Int(0))],
                &[&i(&[1], &[1]), &i(&[2], &[2, 3])]
            ),
            Some(i(&[3], &[1, 2, 3]))
        );
        // axis is required; dims must agree off the axis.
        assert_eq!(ev("Concat", vec![], &[&a, &c]), None);
        assert_eq!(ev("Concat", vec![("axis", Attr::Int(0))], &[&a, &c]), None);
    }

    #[test]
    fn reshape_zero_and_minus_one() {
        let x = f(&[2, 3, 4], &[0.; 24]);
        let dims =
            |s: &[i64], attrs| ev("Reshape", attrs, &[&x, &i(&[s.len()], s)]).map(|t| t.dims);
        assert_eq!(dims(&[0, -1], vec![]), Some(vec![2, 12]));
        assert_eq!(dims(&[-1, 3, 2], vec![]), Some(vec![4, 3, 2]));
        assert_eq!(dims(&[5, -1], vec![]), None);
        assert_eq!(dims(&[-1, -1], vec![]), None);
        // allowzero: 0 is a real zero (and 24 elements do not fit).
        assert_eq!(dims(&[0, 24], vec![("allowzero", Attr::Int(1))]), None);
    }

    #[test]
    fn transpose_with_and_without_perm() {
        let x = i(&[2, 3], &[1, 2, 3, 4, 5, 6]);
        assert_eq!(
            ev("Transpose", vec![], &[&x]),
            Some(i(&[3, 2], &[1, 4, 2, 5, 3, 6]))
        );
        let y = i(&[1, 2, 3], &[1, 2, 3, 4, 5, 6]);
        assert_eq!(
            ev(
                "Transpose",
                vec![("perm", Attr::Ints(vec![2, 0, 1]))],
                &[&y]
            ),
            Some(i(&[3, 1, 2], &[1, 4, 2, 5, 3, 6]))
        );
        assert_eq!(
            ev("Transpose", vec![("perm", Attr::Ints(vec![0, 0]))], &[&x]),
            None
        );
    }

    #[test]
    fn slice_clamps_and_steps() {
        let x = i(&[2, 4], &[0, 1, 2, 3, 10, 11, 12, 13]);
        let s = |v: &[i64]| i(&[v.len()], v);
        // Columns 1.. (end past the dim clamps), all rows.
        let got = ev("Slice", vec![], &[&x, &s(&[1]), &s(&[i64::MAX]), &s(&[1])]);
        assert_eq!(got, Some(i(&[2, 3], &[1, 2, 3, 11, 12, 13])));
        // Negative start, default axes (0..k).
        let got = ev("Slice", vec![], &[&x, &s(&[-1, 0]), &s(&[2, 2])]);
        assert_eq!(got, Some(i(&[1, 2], &[10, 11])));
        // Reverse with step -2 along axis 1.
        let got = ev(
            "Slice",
            vec![],
            &[&x, &s(&[-1]), &s(&[i64::MIN]), &s(&[1]), &s(&[-2])],
        );
        assert_eq!(got, Some(i(&[2, 2], &[3, 1, 13, 11])));
        // Empty result.
        let got = ev("Slice", vec![], &[&x, &s(&[3]), &s(&[1]), &s(&[1])]);
        assert_eq!(got.map(|t| t.dims), Some(vec![2, 0]));
        // The shape-of-ids pattern: Slice(Shape, [1], [2], [0]).
        let shape = s(&[2, 7]);
        let got = ev("Slice", vec![], &[&shape, &s(&[1]), &s(&[2]), &s(&[0])]);
        assert_eq!(got, Some(s(&[7])));
        // Step 0 is invalid: not folded. Opset 9 (attributes) is not handled.
        assert_eq!(
            ev(
                "Slice",
                vec![],
                &[&x, &s(&[0]), &s(&[1]), &s(&[0]), &s(&[0])]
            ),
            None
        );
        assert_eq!(ev_at("Slice", vec![], &[Some(&x)], 9), None);
    }

    #[test]
    fn constant_of_shape_range_expand() {
        let v = ferry_ir::Initializer {
            name: String::new(),
            dtype: DType::I64,
            dims: vec![1],
            data: TensorData::from_i64(&[7]),
        };
        assert_eq!(
            ev(
                "ConstantOfShape",
                vec![("value", Attr::Tensor(Box::new(v)))],
                &[&i(&[2], &[2, 1])]
            ),
            Some(i(&[2, 1], &[7, 7]))
        );
        assert_eq!(
            ev("ConstantOfShape", vec![], &[&i(&[1], &[2])]),
            Some(f(&[2], &[0., 0.]))
        );
        let sc = |v: i64| i(&[], &[v]);
        assert_eq!(
            ev("Range", vec![], &[&sc(0), &sc(5), &sc(2)]),
            Some(i(&[3], &[0, 2, 4]))
        );
        assert_eq!(
            ev("Range", vec![], &[&sc(5), &sc(0), &sc(-2)]),
            Some(i(&[3], &[5, 3, 1]))
        );
        assert_eq!(
            ev("Range", vec![], &[&sc(5), &sc(0), &sc(1)]).map(|t| t.dims),
            Some(vec![0])
        );
        assert_eq!(
            ev(
                "Range",
                vec![],
                &[&f(&[], &[1.]), &f(&[], &[2.]), &f(&[], &[0.25])]
            ),
            Some(f(&[4], &[1., 1.25, 1.5, 1.75]))
        );
        assert_eq!(ev("Range", vec![], &[&sc(0), &sc(5), &sc(0)]), None);
        // Expand is bidirectional: [3,1] with shape [2,1,2] → [2,3,2].
        let x = i(&[3, 1], &[1, 2, 3]);
        let got = ev("Expand", vec![], &[&x, &i(&[3], &[2, 1, 2])]);
        assert_eq!(
            got,
            Some(i(&[2, 3, 2], &[1, 1, 2, 2, 3, 3, 1, 1, 2, 2, 3, 3]))
        );
        // A 1-D shape broadcasts against the last axis only; 3 against 2 is an error.
        assert_eq!(
            ev("Expand", vec![], &[&x, &i(&[1], &[2])]).map(|t| t.dims),
            Some(vec![3, 2])
        );
        assert_eq!(ev("Expand", vec![], &[&x, &i(&[2], &[2, 2])]), None);
    }

    /// Absurd sizes from a model's constants are declined, never allocated or overflowed.
    #[test]
    fn huge_or_extreme_values_are_declined() {
        assert_eq!(ev("ConstantOfShape", vec![], &[&i(&[1], &[1 << 40])]), None);
        assert_eq!(
            ev(
                "ConstantOfShape",
                vec![],
                &[&i(&[3], &[1 << 40, 1 << 40, 1 << 40])]
            ),
            None
        );
        assert_eq!(
            ev(
                "Expand",
                vec![],
                &[&i(&[1], &[1]), &i(&[2], &[1 << 31, 1 << 31])]
            ),
            None
        );
        let sc = |v: i64| i(&[], &[v]);
        assert_eq!(
            ev("Range", vec![], &[&sc(i64::MIN), &sc(i64::MAX), &sc(1)]),
            None
        );
        let n = 5000;
        let col = f(&[n, 1], &vec![1.0; n]);
        let row = f(&[1, n], &vec![1.0; n]);
        assert_eq!(ev("Add", vec![], &[&col, &row]), None);
        // Extreme steps and bounds in Slice are exact, not overflows.
        let x = i(&[4], &[0, 1, 2, 3]);
        let s = |v: i64| i(&[1], &[v]);
        assert_eq!(
            ev(
                "Slice",
                vec![],
                &[&x, &s(1), &s(i64::MAX), &s(0), &s(i64::MAX)]
            ),
            Some(i(&[1], &[1]))
        );
        assert_eq!(
            ev(
                "Slice",
                vec![],
                &[&x, &s(i64::MAX), &s(i64::MIN), &s(0), &s(i64::MIN)]
            ),
            Some(i(&[1], &[3]))
        );
        // An initializer whose dims overflow is not a tensor.
        let bad = ferry_ir::Initializer {
            name: "w".into(),
            dtype: DType::F32,
            dims: vec![0, 1 << 40, 1 << 40],
            data: TensorData::owned(vec![]),
        };
        assert!(Tensor::from_initializer(&bad).is_some());
        let bad = ferry_ir::Initializer {
            dims: vec![1 << 40, 1 << 40, 2],
            ..bad
        };
        assert_eq!(Tensor::from_initializer(&bad), None);
    }

    #[test]
    fn shape_with_start_end() {
        let n = node("Shape", 1, vec![]);
        assert_eq!(shape_of(&n, &[2, 7, 4]), Some(i(&[3], &[2, 7, 4])));
        let n = node(
            "Shape",
            1,
            vec![("start", Attr::Int(-2)), ("end", Attr::Int(10))],
        );
        assert_eq!(shape_of(&n, &[2, 7, 4]), Some(i(&[2], &[7, 4])));
    }

    #[test]
    fn initializer_round_trip_and_unhandled_ops() {
        let t = b(&[3], &[true, false, true]);
        let init = t.clone().into_initializer("m");
        assert_eq!((init.dtype, init.dims.clone()), (DType::Bool, vec![3]));
        assert_eq!(Tensor::from_initializer(&init), Some(t));
        let t = i32t(&[2], &[-1, 9]);
        assert_eq!(
            Tensor::from_initializer(&t.clone().into_initializer("x")),
            Some(t)
        );
        // Unhandled op.
        assert_eq!(
            ev("MatMul", vec![], &[&f(&[1], &[1.]), &f(&[1], &[1.])]),
            None
        );
    }
}
