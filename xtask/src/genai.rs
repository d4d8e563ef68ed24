//! onnxruntime-genai in xtask: the venv its checks run in (`target/genaivenv`), the
//! consumer check of `ferry export --genai` folders (testdata/verify_genai.py, run by
//! `verify`), and `bench --genai` (ferry against onnxruntime-genai's model builder).

use std::path::{Path, PathBuf};
use std::process::Command;

use super::{Result, ensure_venv, root, run, target};

/// Pinned environment of the onnxruntime-genai checks: the runtime (and the ONNX Runtime it
/// loads), and what its model builder imports besides torch and transformers (which
/// `bench --genai` takes from target/venv, so that a second multi-GB torch is not
/// installed).
const GENAI_PACKAGES: &[&str] = &[
    "onnxruntime-genai==0.18.0",
    "onnxruntime==1.31.1",
    "numpy",
    "safetensors==0.8.0",
    "onnx==1.23.2",
    "onnx-ir==1.1.0",
    "tqdm",
];

/// `target/genaivenv` with [`GENAI_PACKAGES`]; returns its Python.
pub(crate) fn genai_venv() -> Result<PathBuf> {
    ensure_venv(
        "genaivenv",
        GENAI_PACKAGES,
        "onnxruntime_genai, onnxruntime, numpy, safetensors",
    )
}

/// testdata/verify_genai.py: onnxruntime-genai generates with ferry's `--genai` folders
/// (fp32: transformers' greedy tokens; int4: top-1 agreement with fp32); any failure, or
/// no case checked, is an error.
pub(crate) fn verify_genai(py: &Path, ferry: &Path) -> Result<()> {
    println!(
        "\nonnxruntime-genai (0.18.0) on ferry's --genai folders ({}):",
        py.display()
    );
    run(Command::new(py)
        .arg(root().join("testdata").join("verify_genai.py"))
        .arg(ferry)
        .arg(root().join("testdata"))
        .arg(target().join("verify").join("genai")))
    .map_err(|e| format!("onnxruntime-genai check failed: {e}"))
}

/// onnxruntime-genai's model builder run as `python -m onnxruntime_genai.models.builder`
/// with `args`, by the genai venv's Python, with target/venv's site-packages (torch,
/// transformers) appended to its path.
fn builder_command(py: &Path, site: &Path, args: &[String]) -> Vec<String> {
    let code = format!(
        "import sys, runpy; sys.path.append({site:?}); sys.argv = ['builder'] + sys.argv[1:]; \
         runpy.run_module('onnxruntime_genai.models.builder', run_name='__main__')",
        site = site.display().to_string()
    );
    let mut cmd = vec![py.display().to_string(), "-c".into(), code];
    cmd.extend(args.iter().cloned());
    cmd
}

/// `ferry export --model CK --genai --quantize int4 OUT/model.onnx`.
fn ferry_int4_command(ferry: &Path, ck: &Path, out: &Path) -> Vec<String> {
    let mut cmd = vec![
        ferry.display().to_string(),
        "export".into(),
        "--model".into(),
    ];
    cmd.push(ck.display().to_string());
    cmd.extend(["--genai", "--quantize", "int4"].map(String::from));
    cmd.push(out.join("model.onnx").display().to_string());
    cmd
}

/// `generation_config.json` as Qwen2.5-0.5B-Instruct ships it (ids of the Qwen tokenizer).
const QWEN_GENERATION_CONFIG: &str = r#"{"bos_token_id": 151643, "pad_token_id": 151643, "do_sample": true, "eos_token_id": [151645, 151643], "repetition_penalty": 1.1, "temperature": 0.7, "top_p": 0.8, "top_k": 20}"#;

/// `bench --genai [--runs N]`: on the Qwen2.5-0.5B-shaped synthetic checkpoint (with the real
/// Qwen tokenizer files and Qwen2.5's generation config), `ferry export --genai --quantize
/// int4` against onnxruntime-genai's model builder (`-p int4 -e cpu`), interleaved, each
/// timed with the peak RSS and peak anonymous memory of its process tree; then both
/// folders' operator counts and decode latency per token at batch 1 in onnxruntime-genai
/// (xtask/genai_latency.py, one process per folder and round, alternating; see [`latency`]). The checkpoint stays in
/// target/bench/genai for the next run. Then ferry alone on the larger `sizes`
/// ([`bench_genai_size`]).
pub(crate) fn bench_genai(runs: usize, sizes: &[&str]) -> Result<()> {
    let runs = runs.max(1);
    let base = target().join("bench").join("genai");
    std::fs::create_dir_all(&base).map_err(|e| e.to_string())?;
    let ferry = super::ferry_release()?;
    let py = genai_venv()?;
    super::golden_venv()?;
    let site = super::golden_site_packages()
        .ok_or("bench --genai: target/venv has no torch for the model builder")?;
    let tokenizers = super::fetch_tokenizers()?;

    // The checkpoint is kept for the next run (written again only when missing).
    let ck = base.join("qwen2.5-0.5b");
    if !ck.join("model.safetensors").is_file() {
        eprintln!("xtask: writing {}", ck.display());
        super::llm::write_checkpoint(&ck, &super::llm::QWEN_05B)?;
    }
    let size = std::fs::metadata(ck.join("model.safetensors"))
        .map_err(|e| e.to_string())?
        .len();
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(tokenizers.join("qwen3").join(f), ck.join(f)).map_err(|e| e.to_string())?;
    }
    std::fs::write(ck.join("generation_config.json"), QWEN_GENERATION_CONFIG)
        .map_err(|e| e.to_string())?;

    let ferry_dir = base.join("ferry");
    let builder_dir = base.join("builder");
    let ferry_cmd = ferry_int4_command(&ferry, &ck, &ferry_dir);
    let builder_cmd = builder_command(
        &py,
        &site,
        &[
            "-i".into(),
            ck.display().to_string(),
            "-o".into(),
            builder_dir.display().to_string(),
            "-p".into(),
            "int4".into(),
            "-e".into(),
            "cpu".into(),
            "-c".into(),
            base.join("builder-cache").display().to_string(),
        ],
    );
    let (mut ft, mut bt) = (Vec::new(), Vec::new());
    let (mut fs, mut bs) = (
        super::stages::Sample::default(),
        super::stages::Sample::default(),
    );
    for _ in 0..runs {
        for (dir, cmd, times, peak) in [
            (&ferry_dir, &ferry_cmd, &mut ft, &mut fs),
            (&builder_dir, &builder_cmd, &mut bt, &mut bs),
        ] {
            let _ = std::fs::remove_dir_all(dir);
            let _ = std::fs::remove_dir_all(base.join("builder-cache"));
            super::settle();
            let s = super::stages::measure_tree(cmd)?;
            times.push(s.secs);
            peak.rss = peak.rss.max(s.rss);
            peak.anon = peak.anon.max(s.anon);
        }
    }
    let (ft, bt) = (super::median(ft), super::median(bt));
    let lat = latency(&py, &[("ferry", &ferry_dir), ("builder", &builder_dir)])?;
    let mib = |kib: u64| kib as f64 / 1024.0;
    println!(
        "\nQwen2.5-0.5B-shaped checkpoint ({:.2} GB bf16) → int4 folder for onnxruntime-genai (CPU), median of {runs}:",
        size as f64 / 1e9
    );
    println!(
        "  ferry export --genai --quantize int4   {ft:>7.2} s  peak RSS {:>7.1} MiB, peak anonymous {:>7.1} MiB, folder {:.1} MB",
        mib(fs.rss),
        mib(fs.anon),
        super::llm::dir_size(&ferry_dir) as f64 / 1e6
    );
    println!(
        "  model builder -p int4 -e cpu            {bt:>7.2} s  peak RSS {:>7.1} MiB, peak anonymous {:>7.1} MiB, folder {:.1} MB",
        mib(bs.rss),
        mib(bs.anon),
        super::llm::dir_size(&builder_dir) as f64 / 1e6
    );
    println!(
        "  ferry / builder: time {:.3} (target ≤ 0.25), peak RSS {:.3}, peak anonymous {:.3} (target ≤ 1/16 = 0.0625)",
        ft / bt,
        fs.rss as f64 / bs.rss.max(1) as f64,
        fs.anon as f64 / bs.anon.max(1) as f64
    );
    let (fl, bl) = (
        lat["ferry"]["decode_ms_per_token"]
            .as_f64()
            .unwrap_or(f64::NAN),
        lat["builder"]["decode_ms_per_token"]
            .as_f64()
            .unwrap_or(f64::NAN),
    );
    println!(
        "  onnxruntime-genai decode at batch 1 (prompt 32, 64 new tokens, median of 6 processes each): ferry {fl:.2} ms/token, builder {bl:.2} ms/token, ratio {:.3} (target ≤ 1); prefill ferry {:.1} ms, builder {:.1} ms",
        fl / bl,
        lat["ferry"]["prefill_ms"].as_f64().unwrap_or(f64::NAN),
        lat["builder"]["prefill_ms"].as_f64().unwrap_or(f64::NAN),
    );
    for name in ["ferry", "builder"] {
        let ops: Vec<String> = lat[name]["ops"]
            .as_object()
            .map(|m| m.iter().map(|(k, v)| format!("{k} {v}")).collect())
            .unwrap_or_default();
        println!("  {name} operators: {}", ops.join(", "));
    }
    for label in sizes {
        bench_genai_size(&ferry, &base, label)?;
    }
    Ok(())
}

/// Decode latency and operator counts of each folder in onnxruntime-genai: six rounds, each
/// running every folder in a fresh process (xtask/genai_latency.py), the order reversed
/// every other round (ABBA). Two models loaded into one process skewed the ratio by which
/// one ran first (0.93–1.06 on identical graphs); separate processes do not share thread
/// pools or caches. Returns `{name: {ops, decode_ms_per_token, prefill_ms}}` with the
/// medians over rounds.
fn latency(py: &Path, folders: &[(&str, &Path)]) -> Result<serde_json::Value> {
    let mut decode: Vec<Vec<f64>> = vec![Vec::new(); folders.len()];
    let mut prefill: Vec<Vec<f64>> = vec![Vec::new(); folders.len()];
    let mut ops = vec![serde_json::Value::Null; folders.len()];
    for round in 0..6 {
        let order: Vec<usize> = if round % 2 == 0 {
            (0..folders.len()).collect()
        } else {
            (0..folders.len()).rev().collect()
        };
        for i in order {
            let (name, dir) = folders[i];
            let o = Command::new(py)
                .arg(root().join("xtask").join("genai_latency.py"))
                .args(["--rounds", "3"])
                .arg(format!("{name}={}", dir.display()))
                .output()
                .map_err(|e| format!("{}: {e}", py.display()))?;
            if !o.status.success() {
                return Err(format!(
                    "genai_latency.py failed: {}",
                    String::from_utf8_lossy(&o.stderr)
                ));
            }
            let v: serde_json::Value =
                serde_json::from_slice(&o.stdout).map_err(|e| e.to_string())?;
            let field = |k: &str| v[name][k].as_f64().unwrap_or(f64::NAN);
            decode[i].push(field("decode_ms_per_token"));
            prefill[i].push(field("prefill_ms"));
            ops[i] = v[name]["ops"].clone();
        }
    }
    let mut out = serde_json::Map::new();
    for (i, (name, _)) in folders.iter().enumerate() {
        out.insert(
            name.to_string(),
            serde_json::json!({
                "ops": ops[i],
                "decode_ms_per_token": super::median(std::mem::take(&mut decode[i])),
                "prefill_ms": super::median(std::mem::take(&mut prefill[i])),
            }),
        );
    }
    Ok(serde_json::Value::Object(out))
}

/// `--sizes`: Llama-3-8B-shaped checkpoints (bfloat16, untied 128256-token embeddings) cut
/// to 3 layers (3.4 GB) or 14 layers (8.2 GB), exported by ferry alone (the model builder
/// would need several times the machine's memory): time, peak RSS and peak anonymous
/// memory. Each checkpoint and folder is deleted after its run.
fn bench_genai_size(ferry: &Path, base: &Path, label: &str) -> Result<()> {
    let layers = match label {
        "3.5" => 3,
        "8" => 14,
        other => {
            return Err(format!(
                "bench --genai --sizes: unknown size {other} (3.5, 8)"
            ));
        }
    };
    let shape = super::llm::LLAMA3_8B.with_layers(layers);
    let ck = base.join(format!("llama-{label}"));
    let out = base.join(format!("llama-{label}-genai"));
    let _ = std::fs::remove_dir_all(&ck);
    let _ = std::fs::remove_dir_all(&out);
    let need = 3 * layers * 218_000_000 + 3_200_000_000;
    let free = super::free_bytes(base)?;
    if free < need {
        println!(
            "
{label} GB checkpoint skipped: needs ~{:.1} GB free under {}, {:.1} GB available",
            need as f64 / 1e9,
            base.display(),
            free as f64 / 1e9
        );
        return Ok(());
    }
    eprintln!("xtask: writing {}", ck.display());
    let size = super::llm::write_checkpoint(&ck, &shape)?;
    let cmd = ferry_int4_command(ferry, &ck, &out);
    super::settle();
    let result = super::stages::measure_tree(&cmd);
    let bytes = super::llm::dir_size(&out);
    let _ = std::fs::remove_dir_all(&ck);
    let _ = std::fs::remove_dir_all(&out);
    let s = result?;
    println!(
        "
Llama-3-8B-shaped, {layers} layers ({:.2} GB bf16) → ferry export --genai --quantize int4: {:.2} s, peak RSS {:.1} MiB, peak anonymous {:.1} MiB, folder {:.2} GB",
        size as f64 / 1e9,
        s.secs,
        s.rss as f64 / 1024.0,
        s.anon as f64 / 1024.0,
        bytes as f64 / 1e9
    );
    Ok(())
}
