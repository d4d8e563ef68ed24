//! The libtorch C++ check of `cargo xtask verify` (and `cargo xtask verify-cpp` alone):
//! xtask/cpp/ts_check.cpp, built with g++ against the libtorch inside the PyPI torch wheel
//! of `target/venv` (its `torch/lib` and `torch/include`), loads ferry's TorchScript
//! archives with `torch::jit::load` and runs them; this module exports the archives,
//! writes the golden inputs as tensor files, reads back what the program wrote and
//! compares it with the goldens (max-abs ≤ [`ATOL`]).
//!
//! Every golden case that testdata/verify_torchscript.py exports is run as its fixed-shape
//! archive (`--batch-size`/`--sequence-length` of the golden) and its `--dynamic-axes` one
//! (fill-mask cases also with `--torchscript`'s untied weights) on the golden's inputs;
//! each TorchScript decoder's steps golden runs as a with-past archive fed its own
//! `present.*` back (in C++). Model types ferry exports to ONNX only, and seq2seq steps
//! goldens, are skipped saying so. No Python runs in this path: the venv's Python is asked
//! only where torch lives, its version and the C++ ABI its wheel was built with.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use ferry_verifier::{F32Tensor, Golden, I64Tensor, Input};

use crate::{Result, golden_cases, in_ci, root, target, testdata_dirs_with};

/// Largest absolute difference allowed from the fp32 goldens.
const ATOL: f64 = 1e-5;
/// Model types ferry exports to ONNX only (it refuses `--format torchscript`), as in
/// testdata/verify_torchscript.py.
const ONNX_ONLY: &[&str] = &[
    "llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "gemma2",
];
/// The archive's positional inputs, in forward's order (those the golden has).
const INPUT_ORDER: &[&str] = &[
    "input_ids",
    "attention_mask",
    "token_type_ids",
    "position_ids",
];
/// A with-past decoder step's inputs, before the cache.
const STEP_INPUTS: &[&str] = &["input_ids", "attention_mask", "position_ids"];
/// Tensor file magic (see xtask/cpp/ts_check.cpp).
const MAGIC: &[u8; 4] = b"FTT1";
const FLOAT32: u32 = 1;
const INT64: u32 = 2;

/// Where the wheel's libtorch is and how to build against it.
struct Toolchain {
    cxx: String,
    torch: PathBuf,
    abi: String,
    version: String,
}

/// Builds ts_check and runs every case (see the module doc); any mismatch, failed export
/// or failed run, or no archive checked, is an error. Without a C++ compiler or a wheel
/// with headers the check is skipped with one line saying why, except under CI, where
/// that is an error.
pub(crate) fn verify_cpp(py: &Path, ferry: &Path) -> Result<()> {
    println!("\nferry's TorchScript archives run by libtorch from C++ (torch::jit::load):");
    let start = Instant::now();
    let toolchain = match toolchain(py) {
        Ok(t) => t,
        Err(why) if in_ci() => {
            return Err(format!(
                "the C++ libtorch check cannot build under CI: {why}"
            ));
        }
        Err(why) => {
            println!("skip C++ libtorch check: {why}");
            return Ok(());
        }
    };
    let (exe, built) = build(&toolchain)?;
    let build_secs = start.elapsed().as_secs_f64();
    let start = Instant::now();
    let failures = run_cases(&exe, ferry)?;
    println!(
        "C++ libtorch check: torch lookup + build {build_secs:.1} s ({}), exports + run + compare {:.1} s",
        if built { "compiled" } else { "up to date" },
        start.elapsed().as_secs_f64()
    );
    if failures > 0 {
        return Err(format!("C++ libtorch check: {failures} failure(s)"));
    }
    Ok(())
}

/// The compiler and the wheel's libtorch; the error says what is missing.
fn toolchain(py: &Path) -> std::result::Result<Toolchain, String> {
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "g++".into());
    Command::new(&cxx)
        .arg("--version")
        .output()
        .map_err(|e| format!("no C++ compiler `{cxx}` ({e}); set CXX or install g++"))?;
    let o = Command::new(py)
        .args([
            "-c",
            "import os, torch; print(os.path.dirname(torch.__file__)); \
             print(int(torch._C._GLIBCXX_USE_CXX11_ABI)); print(torch.__version__)",
        ])
        .output()
        .map_err(|e| format!("{}: {e}", py.display()))?;
    let text = String::from_utf8_lossy(&o.stdout);
    let lines: Vec<&str> = text.lines().collect();
    let [dir, abi, version] = lines[..] else {
        return Err(format!(
            "{} cannot import torch: {}",
            py.display(),
            String::from_utf8_lossy(&o.stderr).trim()
        ));
    };
    let torch = PathBuf::from(dir);
    for need in [
        "include/torch/csrc/jit/serialization/import.h",
        "lib/libtorch_cpu.so",
        "lib/libc10.so",
    ] {
        if !torch.join(need).is_file() {
            return Err(format!(
                "the torch wheel at {} has no {need}",
                torch.display()
            ));
        }
    }
    Ok(Toolchain {
        cxx,
        torch,
        abi: abi.to_string(),
        version: version.to_string(),
    })
}

/// Compiles ts_check into target/cpp unless the stamp beside it shows the same source,
/// compiler, flags and torch; returns the program and whether it was compiled now. The
/// program is written under a temporary name and renamed, so a failed build leaves none.
fn build(t: &Toolchain) -> Result<(PathBuf, bool)> {
    let source_path = root().join("xtask").join("cpp").join("ts_check.cpp");
    let source = std::fs::read_to_string(&source_path)
        .map_err(|e| format!("{}: {e}", source_path.display()))?;
    let dir = target().join("cpp");
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let exe = dir.join("ts_check");
    let stamp_path = dir.join("ts_check.stamp");
    let lib = t.torch.join("lib");
    let include = t.torch.join("include");
    let args: Vec<String> = vec![
        // The wheel's headers require C++20.
        "-std=c++20".into(),
        "-O1".into(),
        format!("-D_GLIBCXX_USE_CXX11_ABI={}", t.abi),
        format!("-I{}", include.display()),
        source_path.display().to_string(),
        "-o".into(),
        exe.with_extension("tmp").display().to_string(),
        format!("-L{}", lib.display()),
        // torch::jit::load lives in libtorch_cpu: the CUDA libraries are not linked.
        format!("-Wl,-rpath,{}", lib.display()),
        "-ltorch_cpu".into(),
        "-lc10".into(),
    ];
    let stamp = format!(
        "{} {}\ntorch {}\n{source}",
        t.cxx,
        args.join(" "),
        t.version
    );
    if exe.is_file() && std::fs::read_to_string(&stamp_path).is_ok_and(|s| s == stamp) {
        return Ok((exe, false));
    }
    println!("  building {} against torch {}", exe.display(), t.version);
    let o = Command::new(&t.cxx)
        .args(&args)
        .output()
        .map_err(|e| format!("{}: {e}", t.cxx))?;
    if !o.status.success() {
        let stderr = String::from_utf8_lossy(&o.stderr);
        let first = stderr
            .lines()
            .find(|l| l.contains("error"))
            .unwrap_or_else(|| stderr.lines().next().unwrap_or(""));
        return Err(format!(
            "the C++ libtorch check failed to build ({} {}): {first}",
            t.cxx,
            source_path.display()
        ));
    }
    std::fs::rename(exe.with_extension("tmp"), &exe).map_err(|e| e.to_string())?;
    std::fs::write(&stamp_path, stamp).map_err(|e| e.to_string())?;
    Ok((exe, true))
}

/// One archive run by ts_check and what its outputs must match.
struct Job {
    label: String,
    archive: PathBuf,
    /// One forward call each (several: a decoder's steps).
    calls: Vec<Call>,
}

/// One forward call of a [`Job`].
struct Call {
    inputs: PathBuf,
    outputs: PathBuf,
    /// Expected outputs by name, in forward's order (a prefix of what it returns).
    want: Vec<(String, F32Tensor)>,
}

/// Exports every case's archives, runs them in one ts_check process and prints one line
/// per archive; returns the number of failures.
fn run_cases(exe: &Path, ferry: &Path) -> Result<usize> {
    let out_dir = target().join("verify").join("cpp");
    if out_dir.exists() {
        std::fs::remove_dir_all(&out_dir).map_err(|e| e.to_string())?;
    }
    std::fs::create_dir_all(&out_dir).map_err(|e| e.to_string())?;
    let start = Instant::now();
    let mut jobs = Vec::new();
    let mut failures = 0;
    for case in golden_cases()? {
        match case_jobs(&case, ferry, &out_dir, &mut failures) {
            Ok(Some(mut j)) => jobs.append(&mut j),
            Ok(None) => {}
            Err(e) => {
                failures += 1;
                println!("  FAIL {}: {e}", name_of(&case));
            }
        }
    }
    for case in testdata_dirs_with(&["steps.safetensors", "case.json"])? {
        match steps_job(&case, ferry, &out_dir) {
            Ok(Some(j)) => jobs.push(j),
            Ok(None) => {}
            Err(e) => {
                failures += 1;
                println!("  FAIL {} with past: {e}", name_of(&case));
            }
        }
    }
    if jobs.is_empty() {
        return Err("C++ libtorch check: no archive to run".into());
    }
    let exported = start.elapsed().as_secs_f64();
    let list = out_dir.join("jobs.tsv");
    let mut text = String::new();
    for j in &jobs {
        text += if j.calls.len() == 1 { "run" } else { "chain" };
        text += &format!("\t{}", j.archive.display());
        for c in &j.calls {
            text += &format!("\t{}\t{}", c.inputs.display(), c.outputs.display());
        }
        text += "\n";
    }
    std::fs::write(&list, text).map_err(|e| e.to_string())?;
    let o = Command::new(exe)
        .arg(&list)
        .output()
        .map_err(|e| format!("{}: {e}", exe.display()))?;
    let ran = start.elapsed().as_secs_f64() - exported;
    let stdout = String::from_utf8_lossy(&o.stdout);
    // ts_check exits 1 when a job failed (its line says why); anything else is a crash.
    if !o.status.success() && o.status.code() != Some(1) {
        return Err(format!(
            "{} {} failed ({}): {}",
            exe.display(),
            list.display(),
            o.status,
            String::from_utf8_lossy(&o.stderr).trim()
        ));
    }
    let mut status: BTreeMap<String, String> = BTreeMap::new();
    for line in stdout.lines() {
        if let Some(a) = line.strip_prefix("ok ") {
            status.insert(a.to_string(), String::new());
        } else if let Some(rest) = line.strip_prefix("error ") {
            let (a, why) = rest.split_once(": ").unwrap_or((rest, "failed"));
            status.insert(a.to_string(), why.to_string());
        }
    }
    for j in &jobs {
        let verdict = match status.get(&j.archive.display().to_string()) {
            None => Err("ts_check printed no line for it".to_string()),
            Some(why) if !why.is_empty() => Err(format!("torch: {why}")),
            Some(_) => compare_job(j),
        };
        match verdict {
            Ok(text) => println!("  ok   {:<58} {text}", j.label),
            Err(e) => {
                failures += 1;
                println!("  FAIL {:<58} {e}", j.label);
            }
        }
    }
    println!(
        "  {} archive(s) run by libtorch, {failures} failure(s); exports {exported:.1} s, \
         ts_check {ran:.1} s",
        jobs.len()
    );
    Ok(failures)
}

/// Reads what ts_check wrote for each call of `j` and compares it with the golden;
/// returns the max-abs text, or why it does not match.
fn compare_job(j: &Job) -> Result<String> {
    let mut parts = Vec::new();
    let mut worst = 0.0f64;
    for (k, Call { outputs, want, .. }) in j.calls.iter().enumerate() {
        let got = read_tensors(outputs)?;
        if got.len() < want.len() {
            return Err(format!(
                "forward returned {} tensor(s), the golden has {}",
                got.len(),
                want.len()
            ));
        }
        for ((name, w), g) in want.iter().zip(&got) {
            let d = max_abs(g, w);
            worst = worst.max(d);
            let step = if j.calls.len() > 1 {
                format!("step {k} ")
            } else {
                String::new()
            };
            parts.push(format!("{step}{name} {d:.2e}"));
        }
    }
    let text = parts.join(", ");
    if worst <= ATOL {
        Ok(text)
    } else {
        Err(format!("{text} (atol {ATOL:.0e})"))
    }
}

/// Largest absolute difference of `got` from `want`; infinite when the shapes or element
/// types differ or a value is not a number.
fn max_abs(got: &Input, want: &F32Tensor) -> f64 {
    let Input::F32(got) = got else {
        return f64::INFINITY;
    };
    if got.shape != want.shape {
        return f64::INFINITY;
    }
    got.data
        .iter()
        .zip(&want.data)
        .map(|(a, b)| (f64::from(*a) - f64::from(*b)).abs())
        .fold(
            0.0,
            |m, d| if d.is_nan() { f64::INFINITY } else { m.max(d) },
        )
}

/// The last component of `p` (a case's name).
fn name_of(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Parses a JSON file; the error names the file.
fn read_json(path: &Path) -> Result<serde_json::Value> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))
}

/// The case's model type when ferry exports it to ONNX only (its cases are skipped).
fn onnx_only(case: &Path) -> Result<Option<String>> {
    let cfg = read_json(&case.join("config.json"))?;
    let ty = cfg["model_type"].as_str().unwrap_or_default();
    Ok(ONNX_ONLY.contains(&ty).then(|| ty.to_string()))
}

/// Runs `ferry export --format torchscript --model CASE ARGS… OUT`; the error is ferry's
/// stderr.
fn export(ferry: &Path, case: &Path, args: &[&str], out: &Path) -> Result<()> {
    let o = Command::new(ferry)
        .args(["export", "--format", "torchscript", "--model"])
        .arg(case)
        .args(args)
        .arg(out)
        .output()
        .map_err(|e| format!("{}: {e}", ferry.display()))?;
    if o.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ferry export {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&o.stderr).trim()
        ))
    }
}

/// The fixed-shape and dynamic archives of one golden case, exported with their inputs
/// written; `None` for an ONNX-only model type (said on stdout). A failed export is
/// printed as that archive's FAIL line and counted in `failures`.
fn case_jobs(
    case: &Path,
    ferry: &Path,
    out_dir: &Path,
    failures: &mut usize,
) -> Result<Option<Vec<Job>>> {
    let name = name_of(case);
    if let Some(ty) = onnx_only(case)? {
        println!("  skip {name}: {ty} exports to ONNX only");
        return Ok(None);
    }
    let meta = read_json(&case.join("case.json"))?;
    let task = meta["task"].as_str().unwrap_or("feature-extraction");
    let golden = Golden::load(&case.join("golden.safetensors")).map_err(|e| e.to_string())?;
    if let Some(n) = golden
        .inputs
        .keys()
        .find(|n| !INPUT_ORDER.contains(&n.as_str()))
    {
        return Err(format!("golden input {n} is not one of {INPUT_ORDER:?}"));
    }
    let inputs: Vec<Input> = INPUT_ORDER
        .iter()
        .filter_map(|n| golden.inputs.get(*n).cloned().map(Input::I64))
        .collect();
    let want = expected(&meta, &golden.outputs)?;
    let ids = &golden
        .inputs
        .get("input_ids")
        .ok_or("golden has no input_ids")?
        .shape;
    let (batch, seq) = (ids[0], ids[ids.len() - 1]);
    let in_file = out_dir.join(format!("{name}.in"));
    write_tensors(&in_file, &inputs)?;
    let mut jobs = Vec::new();
    let (b, s) = (batch.to_string(), seq.to_string());
    let mut archives = vec![
        (
            format!("fixed {batch}x{seq}"),
            vec!["--task", task, "--batch-size", &b, "--sequence-length", &s],
        ),
        (
            "dynamic".to_string(),
            vec!["--task", task, "--dynamic-axes"],
        ),
    ];
    if task == "fill-mask" {
        // Tied weights untied into separate cloned parameters (`--torchscript`).
        archives.push((
            "untied (--torchscript)".to_string(),
            vec!["--task", task, "--dynamic-axes", "--torchscript"],
        ));
    }
    for (kind, args) in archives {
        let tag = kind.split(' ').next().unwrap_or("fixed");
        let archive = out_dir.join(format!("{name}-{tag}.pt"));
        let label = format!("{name} {kind}");
        // A failed export is that archive's failure; the case's other archives still run.
        if let Err(e) = export(ferry, case, &args, &archive) {
            *failures += 1;
            println!("  FAIL {label:<58} {e}");
            continue;
        }
        jobs.push(Job {
            label,
            archive,
            calls: vec![Call {
                inputs: in_file.clone(),
                outputs: out_dir.join(format!("{name}-{tag}.out")),
                want: want.clone(),
            }],
        });
    }
    Ok(Some(jobs))
}

/// The expected outputs in forward's order: case.json's `outputs` names looked up in
/// `outputs`.
fn expected(
    meta: &serde_json::Value,
    outputs: &BTreeMap<String, F32Tensor>,
) -> Result<Vec<(String, F32Tensor)>> {
    let names = meta["outputs"]
        .as_array()
        .ok_or("case.json has no outputs list")?;
    names
        .iter()
        .map(|n| {
            let n = n.as_str().ok_or("case.json outputs are not names")?;
            let t = outputs.get(n).ok_or(format!("golden has no output {n}"))?;
            Ok((n.to_string(), t.clone()))
        })
        .collect()
}

/// A decoder case's with-past archive and its steps: step 0 gets an empty cache, each
/// later step the previous step's `present.*` (fed back inside ts_check); logits are
/// compared at every step. `None` (said on stdout) for an ONNX-only model type or a steps
/// golden of another task (seq2seq).
fn steps_job(case: &Path, ferry: &Path, out_dir: &Path) -> Result<Option<Job>> {
    const TASK: &str = "text-generation-with-past";
    let name = name_of(case);
    if let Some(ty) = onnx_only(case)? {
        println!("  skip {name} with past: {ty} exports to ONNX only");
        return Ok(None);
    }
    let meta = read_json(&case.join("case.json"))?;
    let task = meta["task"].as_str().unwrap_or_default();
    if task != TASK {
        println!("  skip {name} steps: task {task} (ferry's TorchScript decoders are {TASK})");
        return Ok(None);
    }
    let n = meta["steps"].as_u64().unwrap_or(0);
    if n < 1 {
        return Err("case.json has no steps".into());
    }
    let cfg = read_json(&case.join("config.json"))?;
    let dim = |k: &str| {
        cfg[k]
            .as_i64()
            .filter(|&v| v > 0)
            .ok_or(format!("config.json has no {k}"))
    };
    let (heads, embd, layers) = (dim("n_head")?, dim("n_embd")?, dim("n_layer")?);
    let steps = read_safetensors(&case.join("steps.safetensors"))?;
    let archive = out_dir.join(format!("{name}-with-past.pt"));
    export(ferry, case, &["--task", TASK, "--dynamic-axes"], &archive)?;
    let mut calls = Vec::new();
    for k in 0..n {
        let mut inputs = Vec::new();
        for i in STEP_INPUTS {
            match steps.get(&format!("step{k}.input.{i}")) {
                Some(Input::I64(t)) => inputs.push(Input::I64(t.clone())),
                _ => return Err(format!("steps golden has no int64 step{k}.input.{i}")),
            }
        }
        if k == 0 {
            let batch = match &inputs[0] {
                Input::I64(t) => t.shape[0],
                Input::F32(t) => t.shape[0],
            };
            let empty = F32Tensor {
                shape: vec![batch, heads, 0, embd / heads],
                data: Vec::new(),
            };
            inputs.extend((0..2 * layers).map(|_| Input::F32(empty.clone())));
        }
        let logits = match steps.get(&format!("step{k}.output.logits")) {
            Some(Input::F32(t)) => t.clone(),
            _ => return Err(format!("steps golden has no float32 step{k}.output.logits")),
        };
        let in_file = out_dir.join(format!("{name}-step{k}.in"));
        write_tensors(&in_file, &inputs)?;
        calls.push(Call {
            inputs: in_file,
            outputs: out_dir.join(format!("{name}-step{k}.out")),
            want: vec![("logits".to_string(), logits)],
        });
    }
    Ok(Some(Job {
        label: format!("{name} with past, {n} steps"),
        archive,
        calls,
    }))
}

/// The int64 and float32 tensors of a safetensors file by name.
fn read_safetensors(path: &Path) -> Result<BTreeMap<String, Input>> {
    let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let mut out = BTreeMap::new();
    for (name, view) in st.tensors() {
        let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
        let t = match view.dtype() {
            safetensors::Dtype::I64 => Input::I64(I64Tensor {
                shape,
                data: from_le(view.data(), i64::from_le_bytes),
            }),
            safetensors::Dtype::F32 => Input::F32(F32Tensor {
                shape,
                data: from_le(view.data(), f32::from_le_bytes),
            }),
            _ => continue,
        };
        out.insert(name, t);
    }
    Ok(out)
}

/// Little-endian values of `N` bytes each.
fn from_le<const N: usize, T>(bytes: &[u8], value: fn([u8; N]) -> T) -> Vec<T> {
    bytes
        .chunks_exact(N)
        .map(|c| value(c.try_into().unwrap_or([0; N])))
        .collect()
}

/// Writes tensors in ts_check's tensor file format (see xtask/cpp/ts_check.cpp).
fn write_tensors(path: &Path, tensors: &[Input]) -> Result<()> {
    let mut buf = Vec::new();
    encode(&mut buf, tensors).map_err(|e| e.to_string())?;
    std::fs::write(path, buf).map_err(|e| format!("{}: {e}", path.display()))
}

/// Encodes `tensors` as one tensor file (see xtask/cpp/ts_check.cpp).
fn encode(w: &mut impl Write, tensors: &[Input]) -> std::io::Result<()> {
    w.write_all(MAGIC)?;
    w.write_all(&(tensors.len() as u32).to_le_bytes())?;
    for t in tensors {
        let (code, shape) = match t {
            Input::F32(t) => (FLOAT32, &t.shape),
            Input::I64(t) => (INT64, &t.shape),
        };
        w.write_all(&code.to_le_bytes())?;
        w.write_all(&(shape.len() as u32).to_le_bytes())?;
        for d in shape {
            w.write_all(&d.to_le_bytes())?;
        }
        match t {
            Input::F32(t) => t
                .data
                .iter()
                .try_for_each(|v| w.write_all(&v.to_le_bytes()))?,
            Input::I64(t) => t
                .data
                .iter()
                .try_for_each(|v| w.write_all(&v.to_le_bytes()))?,
        }
    }
    Ok(())
}

/// Reads a tensor file ts_check wrote.
fn read_tensors(path: &Path) -> Result<Vec<Input>> {
    let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    decode(&mut bytes.as_slice()).map_err(|e| format!("{}: {e}", path.display()))
}

/// Decodes one whole tensor file; trailing bytes are an error.
fn decode(r: &mut impl Read) -> std::result::Result<Vec<Input>, String> {
    let mut word = [0u8; 8];
    let mut take = |n: usize| -> std::result::Result<[u8; 8], String> {
        r.read_exact(&mut word[..n])
            .map_err(|_| "truncated tensor file".to_string())?;
        Ok(word)
    };
    if take(4)?[..4] != MAGIC[..] {
        return Err("not a tensor file".into());
    }
    let u32_of = |b: [u8; 8]| u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    let count = u32_of(take(4)?);
    let mut out = Vec::new();
    for _ in 0..count {
        let code = u32_of(take(4)?);
        let rank = u32_of(take(4)?);
        let mut shape = Vec::new();
        for _ in 0..rank {
            shape.push(i64::from_le_bytes(take(8)?));
        }
        let numel = shape
            .iter()
            .try_fold(1usize, |n, &d| {
                usize::try_from(d).ok().and_then(|d| n.checked_mul(d))
            })
            .ok_or("bad tensor shape")?;
        out.push(match code {
            FLOAT32 => Input::F32(F32Tensor {
                shape,
                data: (0..numel)
                    .map(|_| take(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])))
                    .collect::<std::result::Result<_, _>>()?,
            }),
            INT64 => Input::I64(I64Tensor {
                shape,
                data: (0..numel)
                    .map(|_| take(8).map(i64::from_le_bytes))
                    .collect::<std::result::Result<_, _>>()?,
            }),
            other => return Err(format!("unknown dtype code {other}")),
        });
    }
    if take(1).is_ok() {
        return Err("trailing bytes after the last tensor".into());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<Input> {
        vec![
            Input::I64(I64Tensor {
                shape: vec![2, 3],
                data: vec![1, -2, 3, i64::MAX, 0, 7],
            }),
            Input::F32(F32Tensor {
                shape: vec![2, 1, 0, 4],
                data: vec![],
            }),
            Input::F32(F32Tensor {
                shape: vec![3],
                data: vec![0.5, -1.25, f32::MIN_POSITIVE],
            }),
        ]
    }

    fn same(a: &[Input], b: &[Input]) -> bool {
        a.len() == b.len()
            && a.iter().zip(b).all(|(x, y)| match (x, y) {
                (Input::I64(x), Input::I64(y)) => x.shape == y.shape && x.data == y.data,
                (Input::F32(x), Input::F32(y)) => x.shape == y.shape && x.data == y.data,
                _ => false,
            })
    }

    #[test]
    fn tensor_file_round_trip() -> std::result::Result<(), String> {
        let mut buf = Vec::new();
        encode(&mut buf, &sample()).map_err(|e| e.to_string())?;
        // magic, count, then the first tensor's dtype code and rank.
        assert_eq!(&buf[..16], b"FTT1\x03\0\0\0\x02\0\0\0\x02\0\0\0");
        assert!(same(&decode(&mut buf.as_slice())?, &sample()));
        Ok(())
    }

    #[test]
    fn tensor_file_errors() -> std::result::Result<(), String> {
        let mut buf = Vec::new();
        encode(&mut buf, &sample()).map_err(|e| e.to_string())?;
        let error = |bytes: &[u8]| decode(&mut &bytes[..]).err().unwrap_or_default();
        assert_eq!(error(&buf[..buf.len() - 1]), "truncated tensor file");
        let mut long = buf.clone();
        long.push(0);
        assert_eq!(error(&long), "trailing bytes after the last tensor");
        let mut bad = buf.clone();
        bad[0] = b'X';
        assert_eq!(error(&bad), "not a tensor file");
        let mut code = buf;
        code[8] = 9;
        assert_eq!(error(&code), "unknown dtype code 9");
        Ok(())
    }

    #[test]
    fn max_abs_is_infinite_on_shape_type_or_nan() {
        let want = F32Tensor {
            shape: vec![2],
            data: vec![1.0, 2.0],
        };
        let got = |shape: Vec<i64>, data: Vec<f32>| Input::F32(F32Tensor { shape, data });
        assert_eq!(max_abs(&got(vec![2], vec![1.0, 2.5]), &want), 0.5);
        assert_eq!(
            max_abs(&got(vec![1, 2], vec![1.0, 2.0]), &want),
            f64::INFINITY
        );
        assert_eq!(
            max_abs(&got(vec![2], vec![f32::NAN, 2.0]), &want),
            f64::INFINITY
        );
        let ints = Input::I64(I64Tensor {
            shape: vec![2],
            data: vec![1, 2],
        });
        assert_eq!(max_abs(&ints, &want), f64::INFINITY);
    }
}
