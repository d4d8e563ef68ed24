//! `verify --burn`: ferry's golden exports as burn users get them. ferry exports every golden
//! case (plain and `--static-shapes`; decoders with and without their cache) into
//! `target/burn/models/`, burn-onnx's `ModelGen` turns each into Rust in the build script of
//! `interop/burn` (its own workspace, built niced into `target/burn`), and the resulting
//! binary runs each model on burn's `flex` backend against transformers' goldens. The table
//! says, per model, the max-abs difference or why it did not run (burn-onnx's conversion
//! error, the compile error of the generated code, or the run's panic); the outcome must
//! equal `interop/burn/expected.tsv` both ways (`--bless` rewrites that list).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use super::{Result, cargo, root, run, target};

/// Largest max-abs difference from transformers that counts as parity.
const ATOL: f32 = 1e-4;
/// Builds that leave out models whose generated code does not compile before giving up.
const MAX_BUILDS: usize = 6;

/// One model the check exports and runs.
struct Model {
    /// File stem: `<case>--<variant>`.
    name: String,
    case: String,
    task: String,
    variant: &'static str,
    golden: PathBuf,
    /// Cached steps to run (0: a plain `input.*`/`output.*` golden).
    steps: usize,
    export_args: Vec<String>,
    /// Also run `ferry optimize` on the export (ONNX Runtime's fused contrib ops).
    optimize: bool,
    /// A folder export's files this row runs: (file in the folder, model name); empty: the
    /// export is one file, model `name`.
    folder: Vec<(&'static str, String)>,
    /// The model of the steps after the first (an encoder-decoder's decoder_with_past).
    later: Option<String>,
    /// Key prefix of a plain golden's tensors (`encoder.` for an encoder-decoder's encoder).
    scope: &'static str,
}

impl Model {
    /// The names of the ONNX files (and generated models) this row needs.
    fn files(&self) -> Vec<String> {
        if self.folder.is_empty() {
            vec![self.name.clone()]
        } else {
            self.folder.iter().map(|(_, n)| n.clone()).collect()
        }
    }
}

/// What happened to one model.
enum Outcome {
    Pass(String),
    Fail(String),
}

impl Outcome {
    fn passed(&self) -> bool {
        matches!(self, Outcome::Pass(_))
    }
}

fn read_json(path: &Path) -> Result<serde_json::Value> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))
}

/// The tensor shapes in a safetensors file's header.
fn tensor_shapes(path: &Path) -> Result<BTreeMap<String, Vec<u64>>> {
    use std::io::Read as _;
    let mut f = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut len = [0u8; 8];
    f.read_exact(&mut len)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let mut header = vec![0u8; u64::from_le_bytes(len) as usize];
    f.read_exact(&mut header)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let header: serde_json::Value =
        serde_json::from_slice(&header).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut out = BTreeMap::new();
    for (name, t) in header.as_object().into_iter().flatten() {
        if let Some(shape) = t.get("shape").and_then(|s| s.as_array()) {
            out.insert(
                name.clone(),
                shape.iter().filter_map(serde_json::Value::as_u64).collect(),
            );
        }
    }
    Ok(out)
}

/// Every model to check: golden cases plain and `--static-shapes` (at the golden's batch,
/// sequence and choices), decoder step cases with their cache (`past`, four steps) and
/// without (`prefill`).
fn models() -> Result<Vec<Model>> {
    let mut v = Vec::new();
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(root().join("testdata"))
        .map_err(|e| e.to_string())?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("config.json").is_file() && p.join("case.json").is_file())
        .collect();
    dirs.sort();
    for dir in dirs {
        let case = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let meta = read_json(&dir.join("case.json"))?;
        let task = meta["task"]
            .as_str()
            .unwrap_or("feature-extraction")
            .to_string();
        let model = |variant: &'static str, task: &str, golden: &Path, steps, extra: &[String]| {
            let mut export_args: Vec<String> = vec![
                "export".into(),
                "--model".into(),
                dir.display().to_string(),
                "--task".into(),
                task.to_string(),
            ];
            export_args.extend(extra.iter().cloned());
            Model {
                name: format!("{case}--{variant}"),
                case: case.clone(),
                task: task.to_string(),
                variant,
                golden: golden.to_path_buf(),
                steps,
                export_args,
                optimize: variant == "optimized",
                folder: Vec::new(),
                later: None,
                scope: "",
            }
        };
        let golden = dir.join("golden.safetensors");
        let steps = dir.join("steps.safetensors");
        if golden.is_file() {
            let shapes = tensor_shapes(&golden)?;
            // Goldens of other layouts (the encoder-decoder folders') are not models here.
            let Some(ids) = shapes.get("input.input_ids") else {
                continue;
            };
            v.push(model("plain", &task, &golden, 0, &[]));
            // One `ferry optimize` output: what a user who exported with `--optimize` gets.
            if case == "bert-tiny-text-classification" {
                v.push(model("optimized", &task, &golden, 0, &[]));
            }
            let mut fixed = vec![
                "--static-shapes".to_string(),
                "--batch-size".into(),
                ids[0].to_string(),
                "--sequence-length".into(),
                ids[ids.len() - 1].to_string(),
            ];
            if ids.len() == 3 {
                fixed.extend(["--num-choices".to_string(), ids[1].to_string()]);
            }
            v.push(model("static", &task, &golden, 0, &fixed));
        } else if steps.is_file() && task == "text-generation-with-past" {
            v.push(model("past", "text-generation-with-past", &steps, 4, &[]));
            v.push(model("prefill", "text-generation", &steps, 1, &[]));
        } else if steps.is_file() && task == "text2text-generation-with-past" {
            // The encoder-decoder folder: encoder; decoder_model for the first step then
            // decoder_with_past_model; the merged decoder (an If on use_cache_branch).
            let file = |f: &str| format!("{case}--{f}");
            let mut encoder = model("encoder", &task, &steps, 0, &[]);
            encoder.folder = vec![("encoder_model.onnx", file("encoder"))];
            encoder.scope = "encoder.";
            let mut decoder = model("decoder", &task, &steps, 4, &[]);
            decoder.folder = vec![
                ("decoder_model.onnx", file("decoder")),
                ("decoder_with_past_model.onnx", file("decoder-with-past")),
            ];
            decoder.later = Some(file("decoder-with-past"));
            let mut merged = model("merged", &task, &steps, 4, &[]);
            merged.folder = vec![("decoder_model_merged.onnx", file("merged"))];
            v.extend([encoder, decoder, merged]);
        }
    }
    Ok(v)
}

/// Runs a `ferry` command; its stderr is the error.
fn ferry_run(cmd: &mut Command) -> Result<()> {
    let o = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
    if o.status.success() {
        Ok(())
    } else {
        let args: Vec<String> = cmd
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        Err(format!(
            "ferry {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&o.stderr).trim()
        ))
    }
}

/// Exports `m` with `ferry` (through `tmp`) into `dir`, replacing each file only when its
/// bytes changed (so an unchanged export does not rerun burn-onnx and recompile its code).
fn export(ferry: &Path, m: &Model, dir: &Path, tmp: &Path) -> Result<()> {
    let fresh = tmp.join(format!("{}.onnx", m.name));
    if fresh.is_dir() {
        std::fs::remove_dir_all(&fresh).map_err(|e| e.to_string())?;
    }
    ferry_run(Command::new(ferry).args(&m.export_args).arg(&fresh))?;
    if m.optimize {
        let optimized = tmp.join(format!("{}.opt.onnx", m.name));
        ferry_run(
            Command::new(ferry)
                .arg("optimize")
                .arg(&fresh)
                .arg(&optimized),
        )?;
        std::fs::rename(&optimized, &fresh).map_err(|e| e.to_string())?;
    }
    let files: Vec<(PathBuf, String)> = if m.folder.is_empty() {
        vec![(fresh.clone(), m.name.clone())]
    } else {
        m.folder
            .iter()
            .map(|(f, n)| (fresh.join(f), n.clone()))
            .collect()
    };
    for (new, name) in files {
        let out = dir.join(format!("{name}.onnx"));
        let same = match (std::fs::read(&out), std::fs::read(&new)) {
            (Ok(a), Ok(b)) => a == b,
            _ => false,
        };
        if !same {
            std::fs::rename(&new, &out).map_err(|e| format!("{}: {e}", new.display()))?;
        }
    }
    if fresh.is_dir() {
        std::fs::remove_dir_all(&fresh).map_err(|e| e.to_string())
    } else if fresh.exists() {
        std::fs::remove_file(&fresh).map_err(|e| e.to_string())
    } else {
        Ok(())
    }
}

/// The model a rustc error belongs to: its span is in `models/<name>.rs`, or in the glue
/// after `// model: <name>` in `cases.rs`.
fn model_of_error(diag: &serde_json::Value) -> Option<String> {
    let spans = diag["spans"].as_array()?;
    for span in spans {
        let file = span["file_name"].as_str().unwrap_or("");
        let path = Path::new(file);
        if path
            .parent()
            .and_then(Path::file_name)
            .is_some_and(|d| d == "models")
        {
            return path.file_stem().map(|s| s.to_string_lossy().into_owned());
        }
        if path.file_name().is_some_and(|f| f == "cases.rs") {
            let line = span["line_start"].as_u64()? as usize;
            let text = std::fs::read_to_string(path).ok()?;
            return text
                .lines()
                .take(line)
                .filter_map(|l| l.strip_prefix("// model: "))
                .last()
                .map(str::to_string);
        }
    }
    // Errors inside macro expansions point at the expansion site through `expansion`.
    None
}

/// Builds interop/burn (niced, `target/burn`) with `skip` left out; `Ok(errors)` maps each
/// model whose generated code failed to compile to its first error (empty: built).
fn build(models_dir: &Path, skip: &BTreeMap<String, String>) -> Result<BTreeMap<String, String>> {
    let manifest = root().join("interop").join("burn").join("Cargo.toml");
    let o = Command::new("nice")
        .args(["-n", "15"])
        .arg(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(["build", "--message-format=json-diagnostic-short"])
        .arg("--manifest-path")
        .arg(&manifest)
        .arg("--target-dir")
        .arg(target().join("burn"))
        .env("FERRY_BURN_MODELS", models_dir)
        .env(
            "FERRY_BURN_SKIP",
            skip.keys().cloned().collect::<Vec<_>>().join(","),
        )
        .stderr(std::process::Stdio::inherit())
        .output()
        .map_err(|e| format!("cargo build of interop/burn: {e}"))?;
    let mut errors = BTreeMap::new();
    let mut unattributed = Vec::new();
    for line in String::from_utf8_lossy(&o.stdout).lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if msg["reason"] != "compiler-message" || msg["message"]["level"] != "error" {
            continue;
        }
        let diag = &msg["message"];
        let first = diag["rendered"]
            .as_str()
            .or(diag["message"].as_str())
            .unwrap_or("")
            .lines()
            .next()
            .unwrap_or("");
        // `…/out/models/<name>.rs:L:C: error…` → `models/<name>.rs:L:C: error…`.
        let text = first
            .rsplit_once("/out/")
            .map_or(first, |(_, rest)| rest)
            .to_string();
        match model_of_error(diag) {
            Some(m) => {
                errors.entry(m).or_insert(text);
            }
            None if text.starts_with("error: aborting") || text.contains("could not compile") => {}
            None => unattributed.push(text),
        }
    }
    if o.status.success() {
        return Ok(BTreeMap::new());
    }
    if errors.is_empty() {
        return Err(format!(
            "cargo build of interop/burn failed ({}){}",
            o.status,
            if unattributed.is_empty() {
                String::new()
            } else {
                format!(": {}", unattributed.join("; "))
            }
        ));
    }
    Ok(errors)
}

/// The models the build holds and their status (`built`, `no-convert\t<error>`,
/// `no-compile`), from `ferry-burn-check list`.
fn listed(bin: &Path) -> Result<BTreeMap<String, String>> {
    let o = Command::new(bin)
        .arg("list")
        .output()
        .map_err(|e| format!("{}: {e}", bin.display()))?;
    if !o.status.success() {
        return Err(format!("{} list failed", bin.display()));
    }
    Ok(String::from_utf8_lossy(&o.stdout)
        .lines()
        .filter_map(|l| l.split_once('\t'))
        .map(|(n, s)| (n.to_string(), s.to_string()))
        .collect())
}

/// Runs one built model against its golden.
fn run_model(bin: &Path, m: &Model) -> Outcome {
    let mut cmd = Command::new(bin);
    cmd.arg("run")
        .arg(&m.name)
        .arg(&m.golden)
        .arg(m.steps.to_string())
        .arg(ATOL.to_string());
    if !m.scope.is_empty() {
        cmd.arg(format!("scope={}", m.scope));
    }
    if !m.folder.is_empty() {
        // Encoder-decoder logits reach ~220 on the T5 goldens: the tolerance scales with the
        // golden's magnitude, as in ONNX Runtime's and tract's seq2seq parity tests.
        cmd.arg("relative=1");
    }
    if let Some(later) = &m.later {
        cmd.arg(format!("later={later}"));
    }
    let o = cmd.output();
    let o = match o {
        Ok(o) => o,
        Err(e) => return Outcome::Fail(format!("{}: {e}", bin.display())),
    };
    let text = String::from_utf8_lossy(&o.stdout).trim().to_string();
    match text.strip_prefix("PASS ") {
        Some(rest) if o.status.success() => Outcome::Pass(rest.to_string()),
        _ if text.is_empty() => Outcome::Fail(format!(
            "crashed ({}): {}",
            o.status,
            String::from_utf8_lossy(&o.stderr)
                .lines()
                .last()
                .unwrap_or("")
        )),
        _ => Outcome::Fail(text),
    }
}

/// The committed expectation: model name → `pass`/`fail`.
fn expected_path() -> PathBuf {
    root().join("interop").join("burn").join("expected.tsv")
}

/// `cargo xtask verify --burn [--bless]`.
pub(crate) fn verify_burn(args: &[String]) -> Result<()> {
    let mut bless = false;
    for a in args {
        match a.as_str() {
            "--burn" => {}
            "--bless" => bless = true,
            other => {
                return Err(format!(
                    "verify --burn: unknown argument {other} (usage: cargo xtask verify --burn [--bless])"
                ));
            }
        }
    }
    let start = Instant::now();
    run(cargo().args(["build", "--quiet", "-p", "ferry-cli"]))?;
    let ferry = target().join("debug").join("ferry");
    let models_dir = target().join("burn").join("models");
    let tmp = target().join("burn").join("export-tmp");
    for d in [&models_dir, &tmp] {
        std::fs::create_dir_all(d).map_err(|e| e.to_string())?;
    }
    let models = models()?;
    let mut outcomes: BTreeMap<String, Outcome> = BTreeMap::new();
    let mut wanted = std::collections::BTreeSet::new();
    for m in &models {
        wanted.extend(m.files().iter().map(|n| format!("{n}.onnx")));
        if let Err(e) = export(&ferry, m, &models_dir, &tmp) {
            outcomes.insert(m.name.clone(), Outcome::Fail(format!("ferry export: {e}")));
            for n in m.files() {
                let _ = std::fs::remove_file(models_dir.join(format!("{n}.onnx")));
            }
        }
    }
    // Models of cases that no longer exist would stay in the build otherwise.
    for e in std::fs::read_dir(&models_dir)
        .map_err(|e| e.to_string())?
        .flatten()
    {
        let n = e.file_name().to_string_lossy().into_owned();
        if !wanted.contains(&n) {
            std::fs::remove_file(e.path()).map_err(|e| e.to_string())?;
        }
    }
    println!(
        "burn: {} exports in {} ({:.0} s); building interop/burn with burn-onnx (niced) …",
        models.len(),
        models_dir.display(),
        start.elapsed().as_secs_f64()
    );
    let mut no_compile: BTreeMap<String, String> = BTreeMap::new();
    let mut builds = 0;
    loop {
        builds += 1;
        let errors = build(&models_dir, &no_compile)?;
        if errors.is_empty() {
            break;
        }
        if builds == MAX_BUILDS {
            return Err(format!(
                "interop/burn still fails to compile after {MAX_BUILDS} builds: {errors:?}"
            ));
        }
        println!(
            "burn: generated code of {} model(s) does not compile; rebuilding without them",
            errors.len()
        );
        no_compile.extend(errors);
    }
    let bin = target().join("burn").join("debug").join("ferry-burn-check");
    let status = listed(&bin)?;
    for m in &models {
        if outcomes.contains_key(&m.name) {
            continue;
        }
        // The row runs when every file it needs was built; else the first one's reason.
        let files = m.files();
        let unbuilt = files
            .iter()
            .find(|n| status.get(*n).is_none_or(|s| s != "built"))
            .unwrap_or(&m.name);
        let outcome = match status.get(unbuilt).map(String::as_str) {
            Some("built") => run_model(&bin, m),
            Some("no-compile") => Outcome::Fail(format!(
                "generated code does not compile: {}",
                no_compile.get(unbuilt).map(String::as_str).unwrap_or("")
            )),
            Some(s) => Outcome::Fail(format!(
                "burn-onnx: {}",
                s.strip_prefix("no-convert\t").unwrap_or(s)
            )),
            None => Outcome::Fail("not in the build".into()),
        };
        outcomes.insert(m.name.clone(), outcome);
    }

    println!(
        "\nburn-onnx + flex against transformers (max-abs ≤ {ATOL:e}; encoder-decoder rows ≤ {ATOL:e} × max(1, |golden|)):"
    );
    let mut passed = 0;
    for m in &models {
        let label = format!("{} {} {}", m.case, m.task, m.variant);
        match &outcomes[&m.name] {
            Outcome::Pass(t) => {
                passed += 1;
                println!("  ok   {label:<66} {t}");
            }
            Outcome::Fail(t) => println!("  --   {label:<66} {t}"),
        }
    }
    println!(
        "burn: {passed} of {} models match transformers ({:.0} s)",
        models.len(),
        start.elapsed().as_secs_f64()
    );

    let expected_file = expected_path();
    if bless {
        let mut text = String::from(
            "# Models of `cargo xtask verify --burn` and whether they match transformers in burn.\n\
             # Written by `cargo xtask verify --burn --bless`; the check fails when a run differs.\n",
        );
        for m in &models {
            let pass = outcomes[&m.name].passed();
            text.push_str(&format!(
                "{}\t{}\n",
                m.name,
                if pass { "pass" } else { "fail" }
            ));
        }
        std::fs::write(&expected_file, text).map_err(|e| e.to_string())?;
        println!("burn: wrote {}", expected_file.display());
        return Ok(());
    }
    let text = std::fs::read_to_string(&expected_file)
        .map_err(|e| format!("{}: {e} (`--bless` writes it)", expected_file.display()))?;
    let expected: BTreeMap<&str, &str> = text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| l.split_once('\t'))
        .collect();
    let mut problems = Vec::new();
    for m in &models {
        let pass = outcomes[&m.name].passed();
        match (expected.get(m.name.as_str()).copied(), pass) {
            (Some("pass"), true) | (Some("fail"), false) => {}
            (Some("pass"), false) => problems.push(format!("{}: regressed (was pass)", m.name)),
            (Some("fail"), true) => problems.push(format!(
                "{}: passes now; mark it pass in {}",
                m.name,
                expected_file.display()
            )),
            (Some(other), _) => problems.push(format!("{}: unknown expectation `{other}`", m.name)),
            (None, _) => problems.push(format!("{}: not in {}", m.name, expected_file.display())),
        }
    }
    for name in expected.keys() {
        if !models.iter().any(|m| m.name == *name) {
            problems.push(format!("{name}: listed but no longer a model"));
        }
    }
    if problems.is_empty() {
        println!(
            "burn: every model as expected in {}",
            expected_file.display()
        );
        Ok(())
    } else {
        Err(format!(
            "burn: {} model(s) differ from {}: {}",
            problems.len(),
            expected_file.display(),
            problems.join("; ")
        ))
    }
}
