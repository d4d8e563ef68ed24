//! Tensors of any element type carried from one ONNX Runtime session to the next: a model
//! run as a chain of segment models (each loaded, run and dropped before the next), whose
//! boundary values pass between sessions as ONNX Runtime produced them, unconverted.

use std::collections::BTreeMap;

use ferry_ir::DType;
use ort::session::SessionInputValue;
use ort::value::TensorElementType;
use ort::value::{DynValue, Tensor, ValueType};

use crate::{F32Tensor, Input, Model, VerifyError};

/// Named tensors of any element type, as ONNX Runtime holds them.
pub struct Values {
    map: BTreeMap<String, DynValue>,
}

impl std::fmt::Debug for Values {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.map.keys()).finish()
    }
}

/// The ferry dtype of an ONNX Runtime element type, if ferry has one.
fn dtype_of(t: TensorElementType) -> Option<DType> {
    Some(match t {
        TensorElementType::Float32 => DType::F32,
        TensorElementType::Float16 => DType::F16,
        TensorElementType::Bfloat16 => DType::BF16,
        TensorElementType::Float64 => DType::F64,
        TensorElementType::Int64 => DType::I64,
        TensorElementType::Int32 => DType::I32,
        TensorElementType::Int16 => DType::I16,
        TensorElementType::Int8 => DType::I8,
        TensorElementType::Uint8 => DType::U8,
        TensorElementType::Bool => DType::Bool,
        _ => return None,
    })
}

/// A float tensor widened exactly to float32 (float16 and float32 values).
pub(crate) fn widen(value: &DynValue) -> Result<F32Tensor, VerifyError> {
    Ok(match value.try_extract_tensor::<half::f16>() {
        Ok((shape, data)) => F32Tensor {
            shape: shape.to_vec(),
            data: data.iter().map(|v| v.to_f32()).collect(),
        },
        Err(_) => {
            let (shape, data) = value.try_extract_tensor::<f32>()?;
            F32Tensor {
                shape: shape.to_vec(),
                data: data.to_vec(),
            }
        }
    })
}

impl Values {
    /// The mixed-type inputs of a model run as values.
    pub fn from_inputs(inputs: &BTreeMap<String, Input>) -> Result<Self, VerifyError> {
        let mut map = BTreeMap::new();
        for (name, t) in inputs {
            let v = match t {
                Input::I64(t) => Tensor::from_array((t.shape.clone(), t.data.clone()))?.into_dyn(),
                Input::F32(t) => Tensor::from_array((t.shape.clone(), t.data.clone()))?.into_dyn(),
            };
            map.insert(name.clone(), v);
        }
        Ok(Self { map })
    }

    /// Every value as a session feed, by name.
    pub(crate) fn into_feed(self) -> Vec<(String, SessionInputValue<'static>)> {
        self.map
            .into_iter()
            .map(|(k, v)| (k, SessionInputValue::from(v)))
            .collect()
    }

    /// Element type of a value, if present and a tensor of a type ferry has.
    pub fn dtype(&self, name: &str) -> Option<DType> {
        match self.map.get(name)?.dtype() {
            ValueType::Tensor { ty, .. } => dtype_of(*ty),
            _ => None,
        }
    }

    /// An int64 or int32 tensor's shape and values, widened to i64.
    pub fn ints(&self, name: &str) -> Option<(Vec<i64>, Vec<i64>)> {
        let v = self.map.get(name)?;
        if let Ok((shape, data)) = v.try_extract_tensor::<i64>() {
            return Some((shape.to_vec(), data.to_vec()));
        }
        let (shape, data) = v.try_extract_tensor::<i32>().ok()?;
        Some((shape.to_vec(), data.iter().map(|&x| i64::from(x)).collect()))
    }

    /// Adds an integer tensor as `dtype` (int64, int32, or bool: non-zero is true; values
    /// out of int32's range are an error).
    pub fn insert_ints(
        &mut self,
        name: &str,
        shape: Vec<i64>,
        data: Vec<i64>,
        dtype: DType,
    ) -> Result<(), VerifyError> {
        let v = match dtype {
            DType::I64 => Tensor::from_array((shape, data))?.into_dyn(),
            DType::I32 => {
                let narrow = data
                    .into_iter()
                    .map(i32::try_from)
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| VerifyError::Check(format!("`{name}`: {e}")))?;
                Tensor::from_array((shape, narrow))?.into_dyn()
            }
            DType::Bool => {
                let flags: Vec<bool> = data.into_iter().map(|v| v != 0).collect();
                Tensor::from_array((shape, flags))?.into_dyn()
            }
            other => {
                return Err(VerifyError::Check(format!(
                    "`{name}`: {other:?} is not an integer type"
                )));
            }
        };
        self.map.insert(name.to_string(), v);
        Ok(())
    }

    /// Adds (or replaces) every value of `other`.
    pub fn extend(&mut self, other: Values) {
        self.map.extend(other.map);
    }

    /// Drops every value `keep` says no to.
    pub fn retain(&mut self, keep: impl Fn(&str) -> bool) {
        self.map.retain(|k, _| keep(k));
    }

    /// The named float values widened exactly to float32; an error names a missing or
    /// non-float one.
    pub fn floats<'a>(
        &self,
        names: impl IntoIterator<Item = &'a str>,
    ) -> Result<BTreeMap<String, F32Tensor>, VerifyError> {
        let mut out = BTreeMap::new();
        for name in names {
            let v = self
                .map
                .get(name)
                .ok_or_else(|| VerifyError::Check(format!("no value `{name}` was computed")))?;
            out.insert(name.to_string(), widen(v)?);
        }
        Ok(out)
    }
}

impl Model {
    /// Runs the model on the values its inputs name (every input must be present),
    /// returning all its outputs as ONNX Runtime produced them.
    pub fn run_values(&mut self, values: &Values) -> Result<Values, VerifyError> {
        let mut feed: Vec<(String, SessionInputValue<'_>)> = Vec::new();
        for input in self.session.inputs() {
            let name = input.name();
            let v = values.map.get(name).ok_or_else(|| {
                VerifyError::Check(format!("no value was computed for the input `{name}`"))
            })?;
            feed.push((name.to_string(), SessionInputValue::from(v)));
        }
        let outs = self.session.run(feed)?;
        let map = outs
            .into_iter()
            .map(|(name, v)| (name.to_string(), v))
            .collect();
        Ok(Values { map })
    }
}
