//! `cargo xtask bench --stages [--sizes 0.5,3.5,8] [--runs N]`: the stages after export at
//! model scale. For each size a synthetic BERT-shaped float32 checkpoint (random weights,
//! real shapes) is written and exported; then `cat` of the export, `ferry optimize` of it
//! and `ferry quantize` (int8, int4, fp16; `--no-report` and with the accuracy report) of
//! the optimized model run side by side, each timed with its peak RSS and peak anonymous
//! memory (RssAnon) sampled from /proc over the process and its descendants. Each size's
//! files are deleted before the next; disk space is checked before each size.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use super::{BertShape, Result, ferry_release, free_bytes, median, settle, synthetic_bert, target};

/// The sizes `--stages` knows: label, shape.
const SIZES: [(&str, BertShape); 3] = [
    // 124 M parameters, 0.50 GB: `bench --scale`'s smallest.
    ("0.5", BertShape::SCALES[0].1),
    // 869 M parameters, 3.48 GB.
    (
        "3.5",
        BertShape {
            vocab: 32000,
            hidden: 2048,
            layers: 16,
            heads: 16,
            inter: 8192,
        },
    ),
    // 2.14 B parameters, 8.55 GB.
    (
        "8",
        BertShape {
            vocab: 32000,
            hidden: 3072,
            layers: 18,
            heads: 24,
            inter: 12288,
        },
    ),
];

/// ONNX Runtime's library, for the accuracy reports of the commands measured.
static ORT: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// One measured command: wall seconds, peak RSS and peak anonymous memory (KiB).
#[derive(Clone, Copy, Default)]
pub(crate) struct Sample {
    pub(crate) secs: f64,
    pub(crate) rss: u64,
    pub(crate) anon: u64,
}

/// The pids of `pid` and all its descendants (from /proc/PID/task/TID/children).
fn tree(pid: u32) -> Vec<u32> {
    let mut all = vec![pid];
    let mut i = 0;
    while i < all.len() {
        let p = all[i];
        if let Ok(tasks) = std::fs::read_dir(format!("/proc/{p}/task")) {
            for t in tasks.flatten() {
                if let Ok(c) = std::fs::read_to_string(t.path().join("children")) {
                    all.extend(c.split_whitespace().filter_map(|s| s.parse::<u32>().ok()));
                }
            }
        }
        i += 1;
    }
    all
}

fn status_field(text: &str, key: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Runs `cmd`, sampling every 5 ms the summed VmRSS and RssAnon of its process tree (and
/// each process's own VmHWM); returns wall time and the peaks. Fails with its stderr when
/// the command fails.
pub(crate) fn measure_tree(cmd: &[String]) -> Result<Sample> {
    let (prog, args) = cmd.split_first().ok_or("no command")?;
    let err_path = target().join("bench").join("stages-stderr.txt");
    let err_file = std::fs::File::create(&err_path).map_err(|e| e.to_string())?;
    let start = Instant::now();
    let mut child = Command::new(prog)
        .args(args)
        .env(
            "ORT_DYLIB_PATH",
            ORT.get().map(String::as_str).unwrap_or(""),
        )
        .stdout(std::process::Stdio::null())
        .stderr(err_file)
        .spawn()
        .map_err(|e| format!("{prog}: {e}"))?;
    let mut s = Sample::default();
    let status = loop {
        let (mut rss, mut anon) = (0u64, 0u64);
        for p in tree(child.id()) {
            if let Ok(text) = std::fs::read_to_string(format!("/proc/{p}/status")) {
                rss += status_field(&text, "VmRSS:");
                anon += status_field(&text, "RssAnon:");
                s.rss = s.rss.max(status_field(&text, "VmHWM:"));
            }
        }
        s.rss = s.rss.max(rss);
        s.anon = s.anon.max(anon);
        if let Some(st) = child.try_wait().map_err(|e| e.to_string())? {
            break st;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    s.secs = start.elapsed().as_secs_f64();
    if !status.success() {
        let err = std::fs::read_to_string(&err_path).unwrap_or_default();
        return Err(format!("{cmd:?} failed ({status}): {err}"));
    }
    Ok(s)
}

/// Median time and largest peaks of `runs` runs (each after a `sync`), running `before`
/// (untimed) ahead of each.
pub(crate) fn timed(cmd: &[String], runs: usize, before: &dyn Fn()) -> Result<Sample> {
    let mut times = Vec::new();
    let mut peak = Sample::default();
    for _ in 0..runs {
        before();
        settle();
        let s = measure_tree(cmd)?;
        times.push(s.secs);
        peak.rss = peak.rss.max(s.rss);
        peak.anon = peak.anon.max(s.anon);
    }
    peak.secs = median(times);
    Ok(peak)
}

/// Bytes of `model` plus its `_data` side file.
fn model_bytes(model: &Path) -> u64 {
    let side = PathBuf::from(format!("{}_data", model.display()));
    [model, side.as_path()]
        .iter()
        .filter_map(|p| std::fs::metadata(p).ok())
        .map(|m| m.len())
        .sum()
}

fn remove_model(model: &Path) {
    let _ = std::fs::remove_file(model);
    let _ = std::fs::remove_file(format!("{}_data", model.display()));
}

fn strs(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

/// One row of the table.
struct Row {
    size: String,
    what: String,
    input_gb: f64,
    output_gb: f64,
    sample: Sample,
    cat: f64,
}

/// `bench --stages`.
pub(crate) fn bench_stages(args: &[String], runs: usize) -> Result<()> {
    let runs = runs.max(1);
    let sizes: Vec<String> = args
        .iter()
        .position(|a| a == "--sizes")
        .and_then(|i| args.get(i + 1))
        .map(|v| v.split(',').map(str::to_string).collect())
        .unwrap_or_else(|| SIZES.iter().map(|(l, _)| l.to_string()).collect());
    let base = target().join("bench").join("stages");
    let _ = std::fs::remove_dir_all(&base);
    std::fs::create_dir_all(&base).map_err(|e| e.to_string())?;
    let ferry = ferry_release()?.display().to_string();
    let lib = super::fetch_ort()?;
    let _ = ORT.set(lib.display().to_string());
    let mut rows: Vec<Row> = Vec::new();
    for label in &sizes {
        let Some((_, shape)) = SIZES.iter().find(|(l, _)| l == label) else {
            return Err(format!(
                "bench --stages: unknown size {label} (known: 0.5, 3.5, 8)"
            ));
        };
        let r = bench_size(&base, label, *shape, &ferry, runs, &mut rows);
        let _ = std::fs::remove_dir_all(base.join(format!("size-{label}")));
        r?;
        print_table(&rows);
    }
    println!(
        "\nbench --stages: median of {runs} run(s) (after a sync each); memory is the peak over the runs, of the process and its children."
    );
    print_table(&rows);
    Ok(())
}

fn print_table(rows: &[Row]) {
    println!(
        "\n| model | command | input GB | output GB | wall s | × cat | peak RSS MiB | peak anon MiB |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for r in rows {
        println!(
            "| {} GB | {} | {:.2} | {:.2} | {:.2} | {:.2} | {:.0} | {:.0} |",
            r.size,
            r.what,
            r.input_gb,
            r.output_gb,
            r.sample.secs,
            r.sample.secs / r.cat.max(1e-9),
            r.sample.rss as f64 / 1024.0,
            r.sample.anon as f64 / 1024.0
        );
    }
}

fn bench_size(
    base: &Path,
    label: &str,
    shape: BertShape,
    ferry: &str,
    runs: usize,
    rows: &mut Vec<Row>,
) -> Result<()> {
    let dir = base.join(format!("size-{label}"));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let params = shape.parameters();
    let bytes = params * 4;
    // Checkpoint + export, then export + optimized (the outputs come after the export is
    // deleted).
    let need = 2 * bytes + 1_000_000_000;
    let free = free_bytes(base)?;
    if free < need {
        println!(
            "\nbench --stages {label} GB skipped: needs ~{:.1} GB free under {}, {:.1} GB available",
            need as f64 / 1e9,
            base.display(),
            free as f64 / 1e9
        );
        return Ok(());
    }
    eprintln!(
        "xtask: {label} GB: writing a {:.2} B-parameter checkpoint",
        params as f64 / 1e9
    );
    let ck = dir.join("checkpoint");
    synthetic_bert(&ck, shape)?;
    let plain = dir.join("model.onnx");
    let export = strs(&[
        ferry,
        "export",
        "--model",
        &ck.display().to_string(),
        &plain.display().to_string(),
    ]);
    eprintln!("xtask: {label} GB: export");
    measure_tree(&export)?;
    let _ = std::fs::remove_dir_all(&ck);
    let in_bytes = model_bytes(&plain);
    let gb = |b: u64| b as f64 / 1e9;

    // cat of the export (model and side file) into one fresh file.
    let copy = dir.join("copy.bin");
    let side = PathBuf::from(format!("{}_data", plain.display()));
    let mut files = format!("'{}'", plain.display());
    if side.is_file() {
        files.push_str(&format!(" '{}'", side.display()));
    }
    let cat = strs(&[
        "sh",
        "-c",
        &format!("rm -f '{0}' && cat {files} > '{0}'", copy.display()),
    ]);
    measure_tree(&cat)?; // warms the page cache
    let c = timed(&cat, runs, &|| {})?;
    let _ = std::fs::remove_file(&copy);
    let mut push = |what: &str, out: u64, s: Sample| {
        eprintln!(
            "xtask: {label} GB: {what}: {:.2} s ({:.2}x cat), peak RSS {:.0} MiB, peak anon {:.0} MiB",
            s.secs,
            s.secs / c.secs,
            s.rss as f64 / 1024.0,
            s.anon as f64 / 1024.0
        );
        rows.push(Row {
            size: label.to_string(),
            what: what.to_string(),
            input_gb: gb(in_bytes),
            output_gb: gb(out),
            sample: s,
            cat: c.secs,
        });
    };
    push("cat", in_bytes, c);

    let opt = dir.join("model-optimized.onnx");
    let optimize = strs(&[
        ferry,
        "optimize",
        &plain.display().to_string(),
        &opt.display().to_string(),
    ]);
    let o = timed(&optimize, runs, &|| remove_model(&opt))?;
    push("ferry optimize", model_bytes(&opt), o);

    if bytes < 1_000_000_000 {
        // The whole chain, while the disk holds checkpoint-free copies of all three.
        let chain = dir.join("chain.onnx");
        let ck2 = dir.join("checkpoint");
        synthetic_bert(&ck2, shape)?;
        let cmd = strs(&[
            ferry,
            "export",
            "--quantize",
            "--model",
            &ck2.display().to_string(),
            &chain.display().to_string(),
        ]);
        let s = timed(&cmd, 1, &|| {})?;
        let q = dir.join("chain-quantized.onnx");
        push(
            "ferry export --quantize (export+optimize+int8+report)",
            model_bytes(&q),
            s,
        );
        for p in ["chain.onnx", "chain-optimized.onnx", "chain-quantized.onnx"] {
            remove_model(&dir.join(p));
        }
        let _ = std::fs::remove_dir_all(&ck2);
    }
    remove_model(&plain);

    let out = dir.join("model-q.onnx");
    for mode in ["int8", "int4", "fp16"] {
        for report in [false, true] {
            let mut cmd = strs(&[
                ferry,
                "quantize",
                "--mode",
                mode,
                &opt.display().to_string(),
                &out.display().to_string(),
            ]);
            if !report {
                cmd.push("--no-report".into());
            }
            let s = timed(&cmd, if report { 1 } else { runs }, &|| remove_model(&out))?;
            let what = format!(
                "ferry quantize --mode {mode}{}",
                if report {
                    " (with report)"
                } else {
                    " --no-report"
                }
            );
            push(&what, model_bytes(&out), s);
            remove_model(&out);
        }
    }
    Ok(())
}
