//! Translates a ferry IR graph into the TorchScript source of one module class.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write as _;

use ferry_ir::{Attr, DType, Dim, Graph, Initializer, Node};

use crate::TsError;

/// How sizes appear in the generated code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Shapes {
    /// Every symbolic dim replaced by a fixed size, as `torch.jit.trace` records them;
    /// the archive rejects inputs of other shapes.
    Fixed(BTreeMap<String, i64>),
    /// Sizes read from the inputs at run time (`torch.size(x, 1)`), so one archive serves
    /// every batch size and sequence length.
    Dynamic,
}

/// A generated module: class source and the parameters its attributes hold.
#[derive(Debug, Clone)]
pub struct Module {
    /// Class name (`BertModel`).
    pub class_name: String,
    /// Qualified name (`__torch__.ferry.BertModel`).
    pub qualified_name: String,
    /// Parameters with their own storage (record `data/<index>`), in first-use order:
    /// dotted state-dict key and tensor.
    pub params: Vec<(String, Initializer)>,
    /// Tied names sharing another parameter's storage: dotted key and index into
    /// `params`.
    pub aliases: Vec<(String, usize)>,
    /// The module tree the keys make (the root is this class).
    pub tree: Tree,
    /// The `code/__torch__/ferry.py` source: the root class with `forward`, then one
    /// class per submodule.
    pub source: String,
}

#[derive(Debug, Clone)]
enum Val {
    /// A tensor held in a local variable or graph input.
    Tensor(String),
    /// A module parameter attribute.
    Param(String),
    /// `W^T` of a 2-D parameter, not yet materialised.
    ParamT(String),
    /// `x @ W^T`, not yet materialised (becomes `torch.linear` with a following bias add).
    MatMulT { x: String, w: String },
    /// A float scalar constant.
    F(f64),
    /// An int scalar constant.
    I(i64),
    /// A constant int list.
    Ints(Vec<i64>),
    /// A run-time int list expression (`torch.size(x)` or a slice of one).
    IntList(String),
    /// A run-time int scalar expression (one element of an [`Val::IntList`]).
    IntExpr(String),
}

struct Gen<'a> {
    env: HashMap<String, Val>,
    body: String,
    next: usize,
    shapes: &'a Shapes,
    dims: HashMap<String, Vec<Dim>>,
    /// Parameters with their own storage: local variable and tensor.
    params: Vec<(String, Initializer)>,
    /// State-dict key of each of `params`.
    keys: Vec<String>,
    /// Tied aliases: state-dict key, index into `params` whose storage it shares, local.
    aliases: Vec<(String, usize, String)>,
    param_of: HashMap<String, String>,
    alias_of: HashMap<String, String>,
    locals: HashSet<String>,
    names: &'a StateDictNames,
    inits: HashMap<String, &'a Initializer>,
    untie: bool,
}

fn ident(name: &str) -> String {
    let mut s: String = name
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    if s.is_empty() || s.starts_with(|c: char| c.is_ascii_digit()) {
        s.insert_str(0, "p_");
    }
    s
}

fn fmt_f(v: f64) -> String {
    if v.is_finite() {
        let s = format!("{v:?}");
        if s.contains('.') || s.contains('e') {
            s
        } else {
            format!("{s}.")
        }
    } else if v > 0.0 {
        "inf".into()
    } else {
        "-inf".into()
    }
}

fn fmt_ints(v: &[i64]) -> String {
    let parts: Vec<String> = v.iter().map(i64::to_string).collect();
    format!("[{}]", parts.join(", "))
}

/// ONNX `Cast.to` code → torch ScalarType number.
fn torch_scalar_type(onnx: i64) -> Option<i64> {
    Some(match onnx {
        1 => 6,
        7 => 4,
        6 => 3,
        10 => 5,
        16 => 15,
        9 => 11,
        11 => 7,
        _ => return None,
    })
}

impl<'a> Gen<'a> {
    fn tmp(&mut self) -> String {
        let v = format!("_{}", self.next);
        self.next += 1;
        v
    }

    fn emit(&mut self, expr: String) -> String {
        let v = self.tmp();
        let _ = writeln!(self.body, "    {v} = {expr}");
        v
    }

    fn get(&self, name: &str, node: &Node) -> Result<Val, TsError> {
        self.env.get(name).cloned().ok_or_else(|| {
            TsError::Unsupported(format!("{}: input `{name}` is not defined", node.name))
        })
    }

    /// The local variable holding initializer `name` as used by `node`. A use inside
    /// another module's scope (a tied decoder reading the word embeddings or the head's
    /// bias) reads it under that module's name too: an alias sharing the storage, or with
    /// `untie` a separate clone, as transformers' `torchscript` flag makes.
    fn param(&mut self, name: &str, node: &Node) -> Option<String> {
        let init = *self.inits.get(name)?;
        let primary = match self.param_of.get(name) {
            Some(local) => local.clone(),
            None => {
                let key = self.key_of(name);
                self.add_param(name, key, init.clone())
            }
        };
        let scope = node_scope(&node.name);
        let (own, leaf) = name.rsplit_once('.').unwrap_or(("", name));
        let tied = !scope.is_empty()
            && scope != own
            && scope != name
            && !own.starts_with(&format!("{scope}."));
        if !tied {
            return Some(primary);
        }
        let alias_name = format!("{scope}.{leaf}");
        let alias = self.key_of(&alias_name);
        if let Some(local) = self.alias_of.get(&alias) {
            return Some(local.clone());
        }
        if self.keys.contains(&alias) || self.inits.contains_key(&alias_name) {
            return Some(primary);
        }
        let local = if self.untie {
            self.add_param(&alias, alias.clone(), init.clone())
        } else {
            let local = self.fresh_local(&alias);
            let idx = self.params.iter().position(|(l, _)| *l == primary)?;
            self.aliases.push((alias.clone(), idx, local.clone()));
            local
        };
        self.alias_of.insert(alias, local.clone());
        Some(local)
    }

    /// The state-dict key of initializer `name` (its own name unless renamed).
    fn key_of(&self, name: &str) -> String {
        self.names
            .get(name)
            .cloned()
            .unwrap_or_else(|| name.to_string())
    }

    /// A local variable name for `name` used by no parameter, alias or input yet.
    fn fresh_local(&mut self, name: &str) -> String {
        let mut local = ident(name);
        while self.locals.contains(&local) {
            local.push('_');
        }
        self.locals.insert(local.clone());
        local
    }

    /// A new parameter (its own storage) at state-dict `key`; returns its local.
    fn add_param(&mut self, name: &str, key: String, init: Initializer) -> String {
        let local = self.fresh_local(name);
        self.params.push((local.clone(), init));
        self.keys.push(key);
        self.param_of
            .entry(name.to_string())
            .or_insert(local.clone());
        local
    }

    /// A tensor-valued expression for `v`.
    fn tensor(&mut self, v: &Val, node: &Node) -> Result<String, TsError> {
        Ok(match v {
            Val::Tensor(s) => s.clone(),
            Val::Param(a) => a.clone(),
            Val::ParamT(a) => format!("torch.t({a})"),
            Val::MatMulT { x, w } => self.emit(format!("torch.matmul({x}, torch.t({w}))")),
            other => {
                return Err(TsError::Unsupported(format!(
                    "{}: expected a tensor, got {other:?}",
                    node.name
                )));
            }
        })
    }

    fn input_val(&mut self, name: &str, node: &Node) -> Result<Val, TsError> {
        if self.inits.contains_key(name) {
            let attr = self
                .param(name, node)
                .ok_or_else(|| TsError::Unsupported(format!("initializer {name}")))?;
            return Ok(Val::Param(attr));
        }
        self.get(name, node)
    }

    fn dim_expr(&self, tensor: &str, value: &str, axis: usize) -> String {
        if let Shapes::Fixed(map) = self.shapes
            && let Some(d) = self.dims.get(value).and_then(|d| d.get(axis))
        {
            match d {
                Dim::Fixed(n) => return n.to_string(),
                Dim::Sym(s) => {
                    if let Some(n) = map.get(s) {
                        return n.to_string();
                    }
                }
            }
        }
        format!("torch.size({tensor}, {axis})")
    }

    fn constant(&mut self, node: &Node) -> Result<Val, TsError> {
        let Some(Attr::Tensor(t)) = node.attr("value") else {
            return Err(TsError::Unsupported(format!(
                "{}: Constant without a tensor",
                node.name
            )));
        };
        let bytes = t.data.bytes().map_err(TsError::Io)?;
        Ok(match (t.dtype, t.dims.len()) {
            (DType::F32, 0) => {
                let v = f32::from_le_bytes(bytes[..4].try_into().unwrap_or([0; 4]));
                Val::F(f64::from(v))
            }
            (DType::I64, 0) => Val::I(i64::from_le_bytes(bytes[..8].try_into().unwrap_or([0; 8]))),
            (DType::I64, 1) => Val::Ints(
                bytes
                    .chunks_exact(8)
                    .map(|c| i64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
                    .collect(),
            ),
            // A float32 vector (rotary inverse frequencies): written out exactly.
            (DType::F32, 1) => {
                let values: Vec<String> = bytes
                    .chunks_exact(4)
                    .map(|c| {
                        fmt_f(f64::from(f32::from_le_bytes(
                            c.try_into().unwrap_or([0; 4]),
                        )))
                    })
                    .collect();
                Val::Tensor(self.emit(format!("torch.tensor([{}], dtype=6)", values.join(", "))))
            }
            (d, r) => {
                return Err(TsError::Unsupported(format!(
                    "{}: constant of {d} rank {r}",
                    node.name
                )));
            }
        })
    }

    fn ints_attr(node: &Node, name: &str) -> Option<Vec<i64>> {
        match node.attr(name) {
            Some(Attr::Ints(v)) => Some(v.clone()),
            _ => None,
        }
    }

    fn int_attr(node: &Node, name: &str) -> Option<i64> {
        match node.attr(name) {
            Some(Attr::Int(v)) => Some(*v),
            _ => None,
        }
    }

    fn float_attr(node: &Node, name: &str) -> Option<f32> {
        match node.attr(name) {
            Some(Attr::Float(v)) => Some(*v),
            _ => None,
        }
    }

    fn binary(&mut self, node: &Node, a: Val, b: Val) -> Result<Val, TsError> {
        let op = node.op_type.as_str();
        // x @ W^T + b  →  torch.linear
        if op == "Add"
            && let (Val::MatMulT { x, w }, Val::Param(bias))
            | (Val::Param(bias), Val::MatMulT { x, w }) = (&a, &b)
            && self
                .params
                .iter()
                .any(|(a, i)| a == bias && i.dims.len() == 1)
        {
            let e = format!("torch.linear({x}, {w}, {bias})");
            return Ok(Val::Tensor(self.emit(e)));
        }
        // Arithmetic on run-time int scalars (sizes) stays int arithmetic.
        let int_scalar = |v: &Val| match v {
            Val::I(i) => Some(i.to_string()),
            Val::IntExpr(e) => Some(e.clone()),
            _ => None,
        };
        if let (Some(x), Some(y)) = (int_scalar(&a), int_scalar(&b))
            && matches!((&a, &b), (Val::IntExpr(_), _) | (_, Val::IntExpr(_)))
        {
            let sym = match op {
                "Add" => "+",
                "Sub" => "-",
                "Mul" => "*",
                _ => return Err(TsError::Unsupported(format!("{}: int {op}", node.name))),
            };
            return Ok(Val::IntExpr(self.emit(format!("{x} {sym} {y}"))));
        }
        let scalar = |v: &Val| match v {
            Val::F(f) => Some(fmt_f(*f)),
            Val::I(i) => Some(i.to_string()),
            _ => None,
        };
        let (sa, sb) = (scalar(&a), scalar(&b));
        let expr = match (op, sa, sb) {
            (_, Some(_), Some(_)) => {
                return Err(TsError::Unsupported(format!(
                    "{}: scalar op scalar",
                    node.name
                )));
            }
            ("Add", Some(s), None) => format!("torch.add({}, {s})", self.tensor(&b, node)?),
            ("Mul", Some(s), None) => format!("torch.mul({}, {s})", self.tensor(&b, node)?),
            ("Sub", Some(s), None) => format!("torch.rsub({}, {s})", self.tensor(&b, node)?),
            ("Div", Some(s), None) => {
                format!(
                    "torch.mul(torch.reciprocal({}), {s})",
                    self.tensor(&b, node)?
                )
            }
            (_, Some(_), None) => {
                return Err(TsError::Unsupported(format!(
                    "{}: scalar {op} tensor",
                    node.name
                )));
            }
            (_, None, Some(s)) => {
                let f = torch_binary(op);
                format!("{f}({}, {s})", self.tensor(&a, node)?)
            }
            (_, None, None) => {
                let f = torch_binary(op);
                let (x, y) = (self.tensor(&a, node)?, self.tensor(&b, node)?);
                format!("{f}({x}, {y})")
            }
        };
        Ok(Val::Tensor(self.emit(expr)))
    }

    fn node(&mut self, node: &Node) -> Result<(), TsError> {
        let op = node.op_type.as_str();
        let inputs: Vec<String> = node.inputs.clone();
        let mut ins = Vec::with_capacity(inputs.len());
        if op != "Constant" {
            for i in &inputs {
                ins.push(self.input_val(i, node)?);
            }
        }
        let unsupported = || TsError::Unsupported(format!("{}: {op} in this form", node.name));
        let out = match op {
            "Constant" => self.constant(node)?,
            "Identity" => ins[0].clone(),
            "Add" | "Sub" | "Mul" | "Div" | "Pow" => {
                self.binary(node, ins[0].clone(), ins[1].clone())?
            }
            // Ceil and Sign: DeBERTa-v2's log-bucketed relative positions.
            "Erf" | "Tanh" | "Relu" | "Sqrt" | "Sigmoid" | "Neg" | "Exp" | "Cos" | "Sin"
            | "Ceil" | "Sign" => {
                let x = self.tensor(&ins[0], node)?;
                Val::Tensor(self.emit(format!("torch.{}({x})", op.to_lowercase())))
            }
            "MatMul" => match &ins[1] {
                Val::ParamT(w) => {
                    let x = self.tensor(&ins[0], node)?;
                    Val::MatMulT { x, w: w.clone() }
                }
                b => {
                    let b = b.clone();
                    let (x, y) = (self.tensor(&ins[0], node)?, self.tensor(&b, node)?);
                    Val::Tensor(self.emit(format!("torch.matmul({x}, {y})")))
                }
            },
            "Transpose" => {
                let perm = Self::ints_attr(node, "perm").ok_or_else(unsupported)?;
                match &ins[0] {
                    Val::Param(a) if perm == [1, 0] => Val::ParamT(a.clone()),
                    v => {
                        let v = v.clone();
                        let x = self.tensor(&v, node)?;
                        Val::Tensor(self.emit(format!("torch.permute({x}, {})", fmt_ints(&perm))))
                    }
                }
            }
            "Gemm" => {
                let tb = Self::int_attr(node, "transB").unwrap_or(0);
                let ta = Self::int_attr(node, "transA").unwrap_or(0);
                let alpha = Self::float_attr(node, "alpha").unwrap_or(1.0);
                let beta = Self::float_attr(node, "beta").unwrap_or(1.0);
                if ta != 0 || alpha != 1.0 || beta != 1.0 || ins.len() != 3 {
                    return Err(unsupported());
                }
                let (a, b, c) = (
                    self.tensor(&ins[0], node)?,
                    self.tensor(&ins[1], node)?,
                    self.tensor(&ins[2], node)?,
                );
                let e = if tb == 1 {
                    format!("torch.linear({a}, {b}, {c})")
                } else {
                    format!("torch.addmm({c}, {a}, {b})")
                };
                Val::Tensor(self.emit(e))
            }
            // One element of a shape (a sequence length feeding `Range`).
            "Gather"
                if matches!(ins[0], Val::Ints(_) | Val::IntList(_))
                    && matches!(ins[1], Val::I(_)) =>
            {
                if Self::int_attr(node, "axis").unwrap_or(0) != 0 {
                    return Err(unsupported());
                }
                match (&ins[0], &ins[1]) {
                    (Val::Ints(v), Val::I(i)) => {
                        let i = if *i < 0 { *i + v.len() as i64 } else { *i };
                        let e = usize::try_from(i).ok().and_then(|i| v.get(i));
                        Val::I(*e.ok_or_else(unsupported)?)
                    }
                    (Val::IntList(l), Val::I(i)) => Val::IntExpr(self.emit(format!("{l}[{i}]"))),
                    _ => return Err(unsupported()),
                }
            }
            "Gather" => {
                let axis = Self::int_attr(node, "axis").unwrap_or(0);
                let data = self.tensor(&ins[0], node)?;
                match &ins[1] {
                    Val::I(i) => {
                        Val::Tensor(self.emit(format!("torch.select({data}, {axis}, {i})")))
                    }
                    v if axis == 0 => {
                        let v = v.clone();
                        let idx = self.tensor(&v, node)?;
                        Val::Tensor(self.emit(format!("torch.embedding({data}, {idx})")))
                    }
                    _ => return Err(unsupported()),
                }
            }
            "Flatten" => {
                let axis = Self::int_attr(node, "axis").unwrap_or(1);
                if axis < 1 {
                    return Err(unsupported());
                }
                let x = self.tensor(&ins[0], node)?;
                let inner = self.emit(format!("torch.flatten({x}, {axis}, -1)"));
                Val::Tensor(self.emit(format!("torch.flatten({inner}, 0, {})", axis - 1)))
            }
            "Reshape" if matches!(ins[1], Val::IntList(_)) => {
                let Val::IntList(l) = &ins[1] else {
                    return Err(unsupported());
                };
                let l = l.clone();
                let x = self.tensor(&ins[0], node)?;
                Val::Tensor(self.emit(format!("torch.reshape({x}, {l})")))
            }
            "Reshape" => {
                let Val::Ints(target) = &ins[1] else {
                    return Err(unsupported());
                };
                let target = target.clone();
                let x = self.tensor(&ins[0], node)?;
                let parts: Vec<String> = target
                    .iter()
                    .enumerate()
                    .map(|(i, &d)| {
                        if d == 0 {
                            self.dim_expr(&x, &inputs[0], i)
                        } else {
                            d.to_string()
                        }
                    })
                    .collect();
                Val::Tensor(self.emit(format!("torch.reshape({x}, [{}])", parts.join(", "))))
            }
            "Unsqueeze" => {
                let Val::Ints(axes) = &ins[1] else {
                    return Err(unsupported());
                };
                let mut axes = axes.clone();
                axes.sort_unstable();
                let mut x = self.tensor(&ins[0], node)?;
                for a in axes {
                    x = self.emit(format!("torch.unsqueeze({x}, {a})"));
                }
                Val::Tensor(x)
            }
            "Cast" => {
                let to = Self::int_attr(node, "to")
                    .and_then(torch_scalar_type)
                    .ok_or_else(unsupported)?;
                let x = self.tensor(&ins[0], node)?;
                Val::Tensor(self.emit(format!("torch.to({x}, {to})")))
            }
            "Softmax" => {
                let axis = Self::int_attr(node, "axis").unwrap_or(-1);
                let x = self.tensor(&ins[0], node)?;
                Val::Tensor(self.emit(format!("torch.softmax({x}, {axis})")))
            }
            "LayerNormalization" => {
                let eps = Self::float_attr(node, "epsilon").unwrap_or(1e-5);
                let axis = Self::int_attr(node, "axis").unwrap_or(-1);
                if axis != -1 {
                    return Err(unsupported());
                }
                let n = self
                    .inits
                    .get(&inputs[1])
                    .and_then(|g| g.dims.first().copied())
                    .ok_or_else(unsupported)?;
                // The bias is optional (`nn.LayerNorm(…, bias=False)`).
                let (x, g, b) = (
                    self.tensor(&ins[0], node)?,
                    self.tensor(&ins[1], node)?,
                    match ins.get(2) {
                        Some(b) => self.tensor(b, node)?,
                        None => "None".into(),
                    },
                );
                Val::Tensor(self.emit(format!(
                    "torch.layer_norm({x}, [{n}], {g}, {b}, {})",
                    fmt_f(f64::from(eps))
                )))
            }
            "ReduceMean" | "ReduceSum" | "ReduceMax" => {
                let axes = Self::ints_attr(node, "axes")
                    .or_else(|| match ins.get(1) {
                        Some(Val::Ints(v)) => Some(v.clone()),
                        _ => None,
                    })
                    .ok_or_else(unsupported)?;
                let keep = Self::int_attr(node, "keepdims").unwrap_or(1) != 0;
                let x = self.tensor(&ins[0], node)?;
                let keep = if keep { "True" } else { "False" };
                let f = match op {
                    "ReduceSum" => "torch.sum",
                    // sentence-transformers' max pooling.
                    "ReduceMax" => "torch.amax",
                    _ => "torch.mean",
                };
                Val::Tensor(self.emit(format!("{f}({x}, {}, {keep})", fmt_ints(&axes))))
            }
            "Shape" => {
                let x = self.tensor(&ins[0], node)?;
                let dims = self.dims.get(&inputs[0]).cloned();
                match (self.shapes, dims) {
                    (Shapes::Fixed(map), Some(dims)) => {
                        let fixed: Option<Vec<i64>> = dims
                            .iter()
                            .map(|d| match d {
                                Dim::Fixed(n) => Some(*n),
                                Dim::Sym(s) => map.get(s).copied(),
                            })
                            .collect();
                        match fixed {
                            Some(v) => Val::Ints(v),
                            None => Val::IntList(self.emit(format!("torch.size({x})"))),
                        }
                    }
                    _ => Val::IntList(self.emit(format!("torch.size({x})"))),
                }
            }
            "Slice" => self.slice(node, &ins)?,
            "Range" => {
                let arg = |v: &Val| match v {
                    Val::I(i) => Some(i.to_string()),
                    Val::F(f) => Some(fmt_f(*f)),
                    Val::IntExpr(e) => Some(e.clone()),
                    _ => None,
                };
                let args: Option<Vec<String>> = ins.iter().map(arg).collect();
                match args.as_deref() {
                    Some([start, limit, delta]) => {
                        Val::Tensor(self.emit(format!("torch.arange({start}, {limit}, {delta})")))
                    }
                    _ => return Err(unsupported()),
                }
            }
            // DeBERTa-v2's ConvLayer: a 1-D convolution with symmetric padding.
            "Conv" => {
                let kernel = Self::ints_attr(node, "kernel_shape").unwrap_or_default();
                let pads = Self::ints_attr(node, "pads").unwrap_or_else(|| vec![0, 0]);
                let ones = |name: &str| {
                    Self::ints_attr(node, name).is_none_or(|v| v.iter().all(|&x| x == 1))
                };
                let auto_pad =
                    matches!(node.attr("auto_pad"), Some(Attr::String(p)) if p != "NOTSET");
                if kernel.len() != 1
                    || pads.len() != 2
                    || pads[0] != pads[1]
                    || !ones("strides")
                    || !ones("dilations")
                    || auto_pad
                    || ins.len() != 3
                {
                    return Err(unsupported());
                }
                let group = Self::int_attr(node, "group").unwrap_or(1);
                let (x, w, b) = (
                    self.tensor(&ins[0], node)?,
                    self.tensor(&ins[1], node)?,
                    self.tensor(&ins[2], node)?,
                );
                Val::Tensor(self.emit(format!(
                    "torch.conv1d({x}, {w}, {b}, [1], [{}], [1], {group})",
                    pads[0]
                )))
            }
            "Abs" | "Log" => {
                let x = self.tensor(&ins[0], node)?;
                let f = if op == "Abs" {
                    "torch.abs"
                } else {
                    "torch.log"
                };
                Val::Tensor(self.emit(format!("{f}({x})")))
            }
            "Less" | "Greater" => {
                let f = if op == "Less" { "torch.lt" } else { "torch.gt" };
                let x = self.tensor(&ins[0], node)?;
                let y = match &ins[1] {
                    Val::I(i) => i.to_string(),
                    Val::F(v) => fmt_f(*v),
                    v => {
                        let v = v.clone();
                        self.tensor(&v, node)?
                    }
                };
                Val::Tensor(self.emit(format!("{f}({x}, {y})")))
            }
            // Two-input Min / Max; a constant bound becomes clamp_max / clamp_min.
            "Min" | "Max" if ins.len() == 2 => {
                let (tensor_fn, clamp_fn) = if op == "Min" {
                    ("torch.minimum", "torch.clamp_max")
                } else {
                    ("torch.maximum", "torch.clamp_min")
                };
                let scalar = |v: &Val| match v {
                    Val::I(i) => Some(i.to_string()),
                    Val::F(f) => Some(fmt_f(*f)),
                    _ => None,
                };
                let e = match (scalar(&ins[0]), scalar(&ins[1])) {
                    (None, Some(s)) => format!("{clamp_fn}({}, {s})", self.tensor(&ins[0], node)?),
                    (Some(s), None) => format!("{clamp_fn}({}, {s})", self.tensor(&ins[1], node)?),
                    (None, None) => {
                        let (a, b) = (self.tensor(&ins[0], node)?, self.tensor(&ins[1], node)?);
                        format!("{tensor_fn}({a}, {b})")
                    }
                    (Some(_), Some(_)) => return Err(unsupported()),
                };
                Val::Tensor(self.emit(e))
            }
            "Where" => {
                let c = self.tensor(&ins[0], node)?;
                let mut branch = |v: &Val| -> Result<String, TsError> {
                    match v {
                        Val::I(i) => Ok(i.to_string()),
                        Val::F(f) => Ok(fmt_f(*f)),
                        v => self.tensor(v, node),
                    }
                };
                let x = branch(&ins[1])?;
                let y = branch(&ins[2])?;
                Val::Tensor(self.emit(format!("torch.where({c}, {x}, {y})")))
            }
            // RoBERTa's position ids: cumsum(ids != pad) over the sequence axis.
            "Equal" | "Not" | "CumSum" => {
                let x = self.tensor(&ins[0], node)?;
                let e = match (op, ins.get(1)) {
                    ("Equal", Some(Val::I(s))) => format!("torch.eq({x}, {s})"),
                    ("Equal", Some(v)) => {
                        let v = v.clone();
                        format!("torch.eq({x}, {})", self.tensor(&v, node)?)
                    }
                    ("Not", None) => format!("torch.logical_not({x})"),
                    ("CumSum", Some(Val::I(a))) => {
                        if Self::int_attr(node, "exclusive").unwrap_or(0) != 0
                            || Self::int_attr(node, "reverse").unwrap_or(0) != 0
                        {
                            return Err(unsupported());
                        }
                        format!("torch.cumsum({x}, {a})")
                    }
                    _ => return Err(unsupported()),
                };
                Val::Tensor(self.emit(e))
            }
            // GPT-2's causal mask and last-token pooling.
            "And" => {
                let (a, b) = (self.tensor(&ins[0], node)?, self.tensor(&ins[1], node)?);
                Val::Tensor(self.emit(format!("torch.logical_and({a}, {b})")))
            }
            "ArgMax" => {
                let axis = Self::int_attr(node, "axis").unwrap_or(0);
                let keep = Self::int_attr(node, "keepdims").unwrap_or(1) != 0;
                if Self::int_attr(node, "select_last_index").unwrap_or(0) != 0 {
                    return Err(unsupported());
                }
                let x = self.tensor(&ins[0], node)?;
                let keep = if keep { "True" } else { "False" };
                Val::Tensor(self.emit(format!("torch.argmax({x}, {axis}, {keep})")))
            }
            "GatherElements" => {
                let axis = Self::int_attr(node, "axis").unwrap_or(0);
                let (x, i) = (self.tensor(&ins[0], node)?, self.tensor(&ins[1], node)?);
                Val::Tensor(self.emit(format!("torch.gather({x}, {axis}, {i})")))
            }
            "Expand" => {
                let size = match &ins[1] {
                    Val::Ints(v) => fmt_ints(v),
                    Val::IntList(l) => l.clone(),
                    _ => return Err(unsupported()),
                };
                let e = match &ins[0] {
                    Val::I(i) => format!("torch.full({size}, {i})"),
                    Val::IntExpr(i) => format!("torch.full({size}, {i})"),
                    v => {
                        let v = v.clone();
                        format!("torch.expand({}, {size})", self.tensor(&v, node)?)
                    }
                };
                Val::Tensor(self.emit(e))
            }
            "Concat" => {
                let axis = Self::int_attr(node, "axis").unwrap_or(0);
                let lists = ins
                    .iter()
                    .all(|v| matches!(v, Val::Ints(_) | Val::IntList(_)));
                if lists && axis == 0 {
                    if let Some(all) = ins
                        .iter()
                        .map(|v| match v {
                            Val::Ints(v) => Some(v.clone()),
                            _ => None,
                        })
                        .collect::<Option<Vec<_>>>()
                    {
                        Val::Ints(all.concat())
                    } else {
                        let parts: Vec<String> = ins
                            .iter()
                            .map(|v| match v {
                                Val::Ints(v) => fmt_ints(v),
                                Val::IntList(l) => l.clone(),
                                _ => String::new(),
                            })
                            .collect();
                        Val::IntList(self.emit(parts.join(" + ")))
                    }
                } else {
                    let mut parts = Vec::with_capacity(ins.len());
                    for v in &ins {
                        parts.push(self.tensor(v, node)?);
                    }
                    Val::Tensor(self.emit(format!("torch.cat([{}], {axis})", parts.join(", "))))
                }
            }
            _ => return Err(unsupported()),
        };
        if let Some(o) = node.outputs.first() {
            self.env.insert(o.clone(), out);
        }
        Ok(())
    }

    fn slice(&mut self, node: &Node, ins: &[Val]) -> Result<Val, TsError> {
        let unsupported = || TsError::Unsupported(format!("{}: Slice in this form", node.name));
        let starts = match ins.get(1) {
            Some(Val::Ints(v)) => v.clone(),
            _ => return Err(unsupported()),
        };
        let axes = match ins.get(3) {
            Some(Val::Ints(v)) => v.clone(),
            None => (0..starts.len() as i64).collect(),
            _ => return Err(unsupported()),
        };
        let ends: Vec<String> = match ins.get(2) {
            Some(Val::Ints(v)) => v.iter().map(i64::to_string).collect(),
            Some(Val::IntList(e)) => (0..starts.len()).map(|i| format!("{e}[{i}]")).collect(),
            _ => return Err(unsupported()),
        };
        if ins.len() > 4 {
            return Err(unsupported());
        }
        match &ins[0] {
            // Slicing a shape list.
            Val::Ints(v) if axes == [0] => {
                let e: i64 = ends[0].parse().map_err(|_| unsupported())?;
                let n = v.len() as i64;
                let clamp = |x: i64| if x < 0 { (x + n).max(0) } else { x.min(n) } as usize;
                Ok(Val::Ints(v[clamp(starts[0])..clamp(e)].to_vec()))
            }
            Val::IntList(l) if axes == [0] => {
                let l = l.clone();
                Ok(Val::IntList(
                    self.emit(format!("{l}[{}:{}]", starts[0], ends[0])),
                ))
            }
            v => {
                let v = v.clone();
                let mut x = self.tensor(&v, node)?;
                for ((s, e), a) in starts.iter().zip(&ends).zip(&axes) {
                    x = self.emit(format!("torch.slice({x}, {a}, {s}, {e})"));
                }
                Ok(Val::Tensor(x))
            }
        }
    }
}

fn torch_binary(op: &str) -> &'static str {
    match op {
        "Add" => "torch.add",
        "Sub" => "torch.sub",
        "Mul" => "torch.mul",
        "Div" => "torch.div",
        _ => "torch.pow",
    }
}

/// Where each weight sits in the archive's module tree: graph initializer name → dotted
/// state-dict key (`bert.encoder.layer.0.attention.self.query.weight`). Names not listed
/// keep their own.
pub type StateDictNames = HashMap<String, String>;

/// The module scope a node was traced in (`/cls/predictions/decoder/MatMul` →
/// `cls.predictions.decoder`).
fn node_scope(node_name: &str) -> String {
    node_name
        .trim_start_matches('/')
        .rsplit_once('/')
        .map(|(s, _)| s.replace('/', "."))
        .unwrap_or_default()
}

/// Defaults of the optional inputs, as transformers fills them in from `input_ids`.
fn input_default(name: &str, ids: &str) -> Option<String> {
    Some(match name {
        "attention_mask" => format!("torch.ones_like({ids})"),
        "token_type_ids" => format!("torch.zeros_like({ids})"),
        "position_ids" => format!("torch.expand_as(torch.arange(torch.size({ids}, -1)), {ids})"),
        _ => return None,
    })
}

/// Generates the module for `graph`: the root class `class_name` with `forward`, and one
/// class per submodule of the state-dict keys `names` gives the weights. With `untie`, a
/// weight a second module reads (tied weights) is a separate clone under that module's
/// name, as transformers' `torchscript` flag makes; without, the two names share storage.
/// `attention_mask`, `token_type_ids` and `position_ids` trailing the inputs are optional
/// with transformers' defaults.
pub fn generate(
    graph: &Graph,
    class_name: &str,
    shapes: &Shapes,
    untie: bool,
    names: &StateDictNames,
) -> Result<Module, TsError> {
    let package = "ferry";
    let qualified = format!("__torch__.{package}.{class_name}");
    let mut dims = HashMap::new();
    for v in graph
        .inputs
        .iter()
        .chain(&graph.value_info)
        .chain(&graph.outputs)
    {
        if let Some(s) = &v.shape {
            dims.insert(v.name.clone(), s.clone());
        }
    }
    let mut g = Gen {
        env: HashMap::new(),
        body: String::new(),
        next: 0,
        shapes,
        dims,
        params: Vec::new(),
        keys: Vec::new(),
        aliases: Vec::new(),
        param_of: HashMap::new(),
        alias_of: HashMap::new(),
        locals: HashSet::new(),
        names,
        inits: graph
            .initializers
            .iter()
            .map(|i| (i.name.clone(), i))
            .collect(),
        untie,
    };
    // Inputs: the trailing run with a default is optional.
    let first = graph.inputs.first().map(|i| ident(&i.name));
    let optional_from = graph
        .inputs
        .iter()
        .rposition(|i| input_default(&i.name, "").is_none())
        .map_or(0, |p| p + 1)
        .max(1);
    let mut prologue = String::new();
    let mut args = String::new();
    for (k, i) in graph.inputs.iter().enumerate() {
        let arg = g.fresh_local(&i.name);
        match (k >= optional_from, &first) {
            (true, Some(ids)) => {
                let default = input_default(&i.name, ids).unwrap_or_default();
                let local = g.fresh_local(&format!("{arg}0"));
                let _ = write!(args, ",\n    {arg}: Optional[Tensor]=None");
                let _ = write!(
                    prologue,
                    "    if torch.__is__({arg}, None):\n      {local} = {default}\n    else:\n      {local} = unchecked_cast(Tensor, {arg})\n"
                );
                g.env.insert(i.name.clone(), Val::Tensor(local));
            }
            _ => {
                let _ = write!(args, ",\n    {arg}: Tensor");
                g.env.insert(i.name.clone(), Val::Tensor(arg));
            }
        }
    }
    for n in &graph.nodes {
        g.node(n)?;
    }
    let dummy = Node {
        name: "return".into(),
        op_type: "Return".into(),
        domain: String::new(),
        inputs: vec![],
        outputs: vec![],
        attrs: BTreeMap::new(),
    };
    let mut outs = Vec::new();
    for o in &graph.outputs {
        let v = g.get(&o.name, &dummy)?;
        outs.push(g.tensor(&v, &dummy)?);
    }
    let ret = if outs.len() == 1 {
        format!("({},)", outs[0])
    } else {
        format!("({})", outs.join(", "))
    };
    let ret_ty = format!("Tuple[{}]", vec!["Tensor"; outs.len()].join(", "));

    // The module tree: every parameter and alias under its dotted key.
    let entries: Vec<(String, usize)> = g
        .keys
        .iter()
        .enumerate()
        .map(|(i, k)| (k.clone(), i))
        .chain(g.aliases.iter().map(|(k, i, _)| (k.clone(), *i)))
        .collect();
    let tree = Tree::build(class_name, &entries)?;
    let mut src = String::new();
    tree.write_classes(package, &mut src, &mut |src| {
        let _ = writeln!(src, "  def forward(self: {qualified}{args}) -> {ret_ty}:");
        src.push_str(&prologue);
        let locals = g
            .params
            .iter()
            .map(|(l, _)| l)
            .zip(&g.keys)
            .chain(g.aliases.iter().map(|(k, _, l)| (l, k)));
        for (local, key) in locals {
            let _ = writeln!(src, "    {local} = {}", attribute_chain(key));
        }
        src.push_str(&g.body);
        let _ = writeln!(src, "    return {ret}");
    });
    let params = g
        .keys
        .into_iter()
        .zip(g.params.into_iter().map(|(_, t)| t))
        .collect();
    Ok(Module {
        class_name: class_name.to_string(),
        qualified_name: qualified,
        params,
        aliases: g.aliases.into_iter().map(|(k, i, _)| (k, i)).collect(),
        tree,
        source: src,
    })
}

/// TorchScript keywords and names an attribute cannot be written as after a dot.
const RESERVED: &[&str] = &[
    "and", "as", "assert", "break", "class", "continue", "def", "del", "elif", "else", "except",
    "finally", "for", "from", "global", "if", "import", "in", "is", "lambda", "nonlocal", "not",
    "or", "pass", "raise", "return", "try", "while", "with", "yield", "None", "True", "False",
];

/// Whether `s` can be written as `x.s` (else `getattr(x, "s")`).
fn plain_attr(s: &str) -> bool {
    s.chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        && !RESERVED.contains(&s)
}

/// `self.a.b` / `getattr(self.a, "0").c` for the dotted key `a.b` / `a.0.c`.
fn attribute_chain(key: &str) -> String {
    key.split('.').fold("self".to_string(), |e, seg| {
        if plain_attr(seg) {
            format!("{e}.{seg}")
        } else {
            format!("getattr({e}, \"{seg}\")")
        }
    })
}

/// One module of the archive's tree: its class, parameters and submodules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tree {
    /// Class name (`BertForMaskedLM`, `BertForMaskedLM_bert_embeddings`).
    pub class: String,
    /// Parameters directly on this module: attribute name and index of the storage
    /// (into [`Module::params`]).
    pub params: Vec<(String, usize)>,
    /// Submodules in first-use order: attribute name and module.
    pub children: Vec<(String, Tree)>,
}

impl Tree {
    /// The tree of dotted keys `entries` (key, storage index) under a root class `root`.
    /// A key that is also another key's module (`a.b` and `a.b.c`) or twice present is an
    /// error.
    pub fn build(root: &str, entries: &[(String, usize)]) -> Result<Tree, TsError> {
        let mut tree = Tree {
            class: root.to_string(),
            params: Vec::new(),
            children: Vec::new(),
        };
        let clash = |key: &str| {
            TsError::Unsupported(format!(
                "weight name `{key}` clashes with a module or another weight"
            ))
        };
        for (key, idx) in entries {
            let segs: Vec<&str> = key.split('.').collect();
            let (leaf, path) = segs.split_last().ok_or_else(|| clash(key))?;
            let mut node = &mut tree;
            for (depth, seg) in path.iter().enumerate() {
                if node.params.iter().any(|(n, _)| n == seg) {
                    return Err(clash(key));
                }
                let pos = match node.children.iter().position(|(n, _)| n == seg) {
                    Some(p) => p,
                    None => {
                        let class = format!("{root}_{}", ident(&path[..=depth].join("_")));
                        node.children.push((
                            seg.to_string(),
                            Tree {
                                class,
                                params: Vec::new(),
                                children: Vec::new(),
                            },
                        ));
                        node.children.len() - 1
                    }
                };
                node = &mut node.children[pos].1;
            }
            if leaf.is_empty()
                || node.params.iter().any(|(n, _)| n == leaf)
                || node.children.iter().any(|(n, _)| n == leaf)
            {
                return Err(clash(key));
            }
            node.params.push((leaf.to_string(), *idx));
        }
        tree.unique_classes(&mut HashSet::new());
        Ok(tree)
    }

    /// Makes class names unique (`a_b.c` and `a.b_c` both mangle to `…_a_b_c`).
    fn unique_classes(&mut self, seen: &mut HashSet<String>) {
        while !seen.insert(self.class.clone()) {
            self.class.push('_');
        }
        for (_, c) in &mut self.children {
            c.unique_classes(seen);
        }
    }

    /// Every module in the tree, depth first (the root first).
    pub fn modules(&self) -> Vec<&Tree> {
        let mut out = vec![self];
        for (_, c) in &self.children {
            out.extend(c.modules());
        }
        out
    }

    /// Writes every class of the tree; `methods` adds the root's methods.
    fn write_classes(&self, package: &str, src: &mut String, methods: &mut dyn FnMut(&mut String)) {
        for (i, m) in self.modules().into_iter().enumerate() {
            let _ = writeln!(src, "class {}(Module):", m.class);
            let names: Vec<String> = m.params.iter().map(|(a, _)| format!("{a:?}, ")).collect();
            let _ = writeln!(src, "  __parameters__ = [{}]", names.join(""));
            let _ = writeln!(src, "  __buffers__ = []");
            let _ = writeln!(src, "  training : bool");
            let attrs = m
                .params
                .iter()
                .map(|(a, _)| (a, "Tensor".to_string()))
                .chain(
                    m.children
                        .iter()
                        .map(|(a, c)| (a, format!("__torch__.{package}.{}", c.class))),
                );
            for (a, ty) in attrs {
                if plain_attr(a) {
                    let _ = writeln!(src, "  {a} : {ty}");
                } else {
                    let _ = writeln!(src, "  __annotations__[{a:?}] = {ty}");
                }
            }
            if i == 0 {
                methods(src);
            }
        }
    }
}
