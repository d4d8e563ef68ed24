//! Turns every ONNX file in `$FERRY_BURN_MODELS` into Rust with burn-onnx's `ModelGen`, then
//! writes `$OUT_DIR/cases.rs`: one module per model that converted, a typed runner around its
//! generated `Model::forward`, and the conversion error of each model that did not convert.
//!
//! `FERRY_BURN_SKIP` (comma-separated model names) leaves models out of the build: those whose
//! generated code does not compile (the xtask finds them from rustc's errors and rebuilds).

use std::fmt::Write as _;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};

use burn_onnx::ModelGen;
use onnx_ir::Message as _;

fn main() {
    println!("cargo:rerun-if-env-changed=FERRY_BURN_MODELS");
    println!("cargo:rerun-if-env-changed=FERRY_BURN_SKIP");
    println!("cargo:rerun-if-changed=build.rs");
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let skip: Vec<String> = std::env::var("FERRY_BURN_SKIP")
        .unwrap_or_default()
        .split(',')
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect();
    let mut models: Vec<PathBuf> = match std::env::var_os("FERRY_BURN_MODELS") {
        Some(dir) => {
            println!("cargo:rerun-if-changed={}", Path::new(&dir).display());
            std::fs::read_dir(&dir)
                .unwrap_or_else(|e| panic!("FERRY_BURN_MODELS {}: {e}", Path::new(&dir).display()))
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "onnx"))
                .collect()
        }
        None => Vec::new(),
    };
    models.sort();
    // Silence the default hook: a model that does not convert is a result, not a crash.
    std::panic::set_hook(Box::new(|_| {}));
    let mut code = String::new();
    let mut table = String::from("/// Every model of the build.\npub static CASES: &[Case] = &[\n");
    for path in &models {
        println!("cargo:rerun-if-changed={}", path.display());
        let name = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let id = ident(&name);
        if skip.contains(&name) {
            let _ = writeln!(
                table,
                "    Case {{ name: {name:?}, status: Status::NoCompile, inputs: &[], run: None }},"
            );
            continue;
        }
        let info = match onnx_io(path) {
            Ok(info) => info,
            Err(e) => {
                let _ = writeln!(
                    table,
                    "    Case {{ name: {name:?}, status: Status::NoConvert({e:?}), inputs: &[], run: None }},"
                );
                continue;
            }
        };
        let generated = std::panic::catch_unwind(AssertUnwindSafe(|| {
            ModelGen::new()
                .input(&path.display().to_string())
                .out_dir("models/")
                .run_from_script();
        }));
        let rs = out.join("models").join(format!("{name}.rs"));
        let glue = match generated {
            Ok(()) => runner(&name, &id, &rs, &info),
            Err(panic) => Err(panic_text(panic.as_ref())),
        };
        let inputs: String = info
            .inputs
            .iter()
            .map(|(n, dims)| format!("({n:?}, &{dims:?}), "))
            .collect();
        match glue {
            Ok(glue) => {
                code.push_str(&glue);
                let _ = writeln!(
                    table,
                    "    Case {{ name: {name:?}, status: Status::Built, inputs: &[{inputs}], run: Some(run_{id}) }},"
                );
            }
            Err(e) => {
                let _ = writeln!(
                    table,
                    "    Case {{ name: {name:?}, status: Status::NoConvert({e:?}), inputs: &[{inputs}], run: None }},"
                );
            }
        }
    }
    let _ = std::panic::take_hook();
    table.push_str("];\n");
    code.push_str(&table);
    std::fs::write(out.join("cases.rs"), code).expect("write cases.rs");
}

/// The graph inputs (name, dims with `None` for symbolic) and output names of an ONNX file.
struct OnnxIo {
    inputs: Vec<(String, Vec<Option<usize>>)>,
    outputs: Vec<String>,
}

fn onnx_io(path: &Path) -> Result<OnnxIo, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let model = onnx_ir::ModelProto::parse_from_bytes(&bytes)
        .map_err(|e| format!("{}: not an ONNX model: {e}", path.display()))?;
    let graph = model.graph.get_or_default();
    let inputs = graph
        .input
        .iter()
        .map(|i| {
            let dims = i
                .type_
                .tensor_type()
                .shape
                .dim
                .iter()
                .map(|d| {
                    d.has_dim_value()
                        .then(|| usize::try_from(d.dim_value()).unwrap_or(0))
                })
                .collect();
            (i.name.clone(), dims)
        })
        .collect();
    let outputs = graph.output.iter().map(|o| o.name.clone()).collect();
    Ok(OnnxIo { inputs, outputs })
}

fn panic_text(panic: &(dyn std::any::Any + Send)) -> String {
    let text = panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "burn-onnx panicked".into());
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

/// A snake-case Rust identifier from a model or input name (each run of other characters
/// becomes one `_`).
fn ident(name: &str) -> String {
    let mut out = String::new();
    for c in name.chars() {
        if c.is_ascii_alphanumeric() {
            out.push(c.to_ascii_lowercase());
        } else if !out.ends_with('_') {
            out.push('_');
        }
    }
    out
}

/// A tensor parameter or result of `forward`: rank and kind (`""`, `"Int"` or `"Bool"`).
fn tensor_type(ty: &syn::Type) -> Option<(usize, String)> {
    let syn::Type::Path(p) = ty else { return None };
    let last = p.path.segments.last()?;
    if last.ident != "Tensor" {
        return None;
    }
    let syn::PathArguments::AngleBracketed(args) = &last.arguments else {
        return None;
    };
    let mut it = args.args.iter();
    let rank = match it.next()? {
        syn::GenericArgument::Const(syn::Expr::Lit(syn::ExprLit {
            lit: syn::Lit::Int(i),
            ..
        })) => i.base10_parse().ok()?,
        syn::GenericArgument::Type(syn::Type::Path(tp)) => {
            // `Tensor<2>` parses as a type argument whose path is the literal (never here), or
            // as a const expression; anything else is not a tensor we know.
            tp.path.get_ident()?.to_string().parse().ok()?
        }
        _ => return None,
    };
    let kind = match it.next() {
        None => String::new(),
        Some(syn::GenericArgument::Type(syn::Type::Path(tp))) => {
            tp.path.segments.last()?.ident.to_string()
        }
        Some(_) => return None,
    };
    Some((rank, kind))
}

/// The runner's function (`float_input`, `int_output` …) for a tensor kind of `forward`.
fn converter(kind: &str, side: &str, name: &str) -> Result<String, String> {
    let prefix = match kind {
        "" => "float",
        "Int" => "int",
        "Bool" => "bool",
        other => return Err(format!("{side} `{name}`: tensor kind {other}")),
    };
    Ok(format!("{prefix}_{side}"))
}

/// The glue around one generated model: its module and `run_<id>(inputs, device)`.
fn runner(name: &str, id: &str, rs: &Path, info: &OnnxIo) -> Result<String, String> {
    let text = std::fs::read_to_string(rs).map_err(|e| format!("{}: {e}", rs.display()))?;
    let file = syn::parse_file(&text).map_err(|e| format!("generated code does not parse: {e}"))?;
    let forward = file
        .items
        .iter()
        .filter_map(|item| match item {
            syn::Item::Impl(imp) => Some(imp),
            _ => None,
        })
        .filter(|imp| matches!(&*imp.self_ty, syn::Type::Path(p) if p.path.is_ident("Model")))
        .flat_map(|imp| imp.items.iter())
        .find_map(|it| match it {
            syn::ImplItem::Fn(f) if f.sig.ident == "forward" => Some(&f.sig),
            _ => None,
        })
        .ok_or("generated code has no Model::forward")?;
    let mut body = String::new();
    let mut args = Vec::new();
    for (k, arg) in forward.inputs.iter().enumerate() {
        let syn::FnArg::Typed(pt) = arg else { continue };
        let syn::Pat::Ident(pi) = &*pt.pat else {
            return Err("forward has a pattern argument".into());
        };
        let arg_name = pi.ident.to_string();
        let onnx = info
            .inputs
            .iter()
            .map(|(n, _)| n)
            .find(|n| ident(n) == arg_name.trim_start_matches('_'))
            .ok_or_else(|| format!("forward argument `{arg_name}` is no graph input"))?;
        let Some((rank, kind)) = tensor_type(&pt.ty) else {
            let ty = &pt.ty;
            return Err(format!(
                "forward argument `{arg_name}` has type `{}` (not a tensor)",
                quote_type(ty)
            ));
        };
        let f = converter(&kind, "input", &arg_name)?;
        let _ = writeln!(
            body,
            "    let a{k} = crate::{f}::<{rank}>(inputs, {onnx:?}, device)?;"
        );
        args.push(format!("a{k}"));
    }
    let results: Vec<&syn::Type> = match &forward.output {
        syn::ReturnType::Default => Vec::new(),
        syn::ReturnType::Type(_, ty) => match &**ty {
            syn::Type::Tuple(t) => t.elems.iter().collect(),
            other => vec![other],
        },
    };
    if results.len() != info.outputs.len() {
        return Err(format!(
            "forward returns {} values for {} graph outputs",
            results.len(),
            info.outputs.len()
        ));
    }
    let mut outs = Vec::new();
    for (k, (ty, name)) in results.iter().zip(&info.outputs).enumerate() {
        let Some((_, kind)) = tensor_type(ty) else {
            return Err(format!(
                "output `{name}` has type `{}` (not a tensor)",
                quote_type(ty)
            ));
        };
        let f = converter(&kind, "output", name)?;
        outs.push(format!("crate::{f}({name:?}, r{k})"));
    }
    let pattern = match outs.len() {
        1 => "r0".to_string(),
        n => format!(
            "({})",
            (0..n)
                .map(|k| format!("r{k}"))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    Ok(format!(
        "// model: {name}\n#[allow(clippy::all, unused, missing_docs)]\nmod m_{id} {{\n    include!({rs:?});\n}}\n\n\
         #[allow(unused_variables)]\n\
         fn run_{id}(inputs: &crate::Inputs, device: &burn::tensor::Device) -> Result<Vec<crate::Output>, String> {{\n\
         {body}    let model = m_{id}::Model::default();\n\
             let {pattern} = model.forward({});\n\
             Ok(vec![{}])\n}}\n\n",
        args.join(", "),
        outs.join(", ")
    ))
}

fn quote_type(ty: &syn::Type) -> String {
    use quote::ToTokens as _;
    ty.to_token_stream().to_string()
}
