//! `cargo xtask bench --llm`: decoder-LLM export at real sizes against `cat`.
//!
//! 1. A Qwen2.5-0.5B-shaped Qwen2 checkpoint (494 M parameters, random bfloat16 weights,
//!    one 0.99 GB safetensors file, tied embeddings, q/k/v biases) is written, exported to
//!    float32 ONNX with the cache (`text-generation-with-past`), timed against `cat` of a file
//!    as large as the export; its export without the cache is checked against
//!    transformers' float32 logits (xtask/llm_parity.py in target/venv; `ferry verify
//!    --atol 1e-4`).
//! 2. A Llama-3-8B-shaped checkpoint (8.0 B parameters, bfloat16, four shards as the hub
//!    ships it, ~16 GB) is written and exported (`--dtype bf16`, so input and output fit the
//!    disk together), timed against `cat` of its shards.
//!
//! Peak memory is read from /proc while the command runs: VmHWM (peak RSS, which counts
//! mapped checkpoint pages that were touched) and the largest RssAnon seen (anonymous
//! memory: what the process itself allocates).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use super::{
    Result, ferry_release, free_bytes, median, root, run, safetensors_header, settle, target,
};

/// The shape of a synthetic Llama-family checkpoint.
pub(crate) struct DecoderShape {
    model_type: &'static str,
    arch: &'static str,
    vocab: u64,
    hidden: u64,
    layers: u64,
    heads: u64,
    kv_heads: u64,
    inter: u64,
    tie: bool,
    qkv_bias: bool,
    shards: u64,
    rope_theta: f64,
}

pub(crate) const QWEN_05B: DecoderShape = DecoderShape {
    model_type: "qwen2",
    arch: "Qwen2ForCausalLM",
    vocab: 151_936,
    hidden: 896,
    layers: 24,
    heads: 14,
    kv_heads: 2,
    inter: 4864,
    tie: true,
    qkv_bias: true,
    shards: 1,
    rope_theta: 1_000_000.0,
};

pub(crate) const LLAMA3_8B: DecoderShape = DecoderShape {
    model_type: "llama",
    arch: "LlamaForCausalLM",
    vocab: 128_256,
    hidden: 4096,
    layers: 32,
    heads: 32,
    kv_heads: 8,
    inter: 14_336,
    tie: false,
    qkv_bias: false,
    shards: 4,
    rope_theta: 500_000.0,
};

impl DecoderShape {
    /// The same shape with `layers` decoder layers.
    pub(crate) const fn with_layers(self, layers: u64) -> Self {
        Self { layers, ..self }
    }

    fn tensors(&self) -> Vec<(String, Vec<u64>)> {
        let (h, hd) = (self.hidden, self.hidden / self.heads);
        let mut v = vec![("model.embed_tokens.weight".to_string(), vec![self.vocab, h])];
        for l in 0..self.layers {
            let p = format!("model.layers.{l}");
            v.push((format!("{p}.input_layernorm.weight"), vec![h]));
            for (m, out) in [
                ("q_proj", self.heads * hd),
                ("k_proj", self.kv_heads * hd),
                ("v_proj", self.kv_heads * hd),
            ] {
                v.push((format!("{p}.self_attn.{m}.weight"), vec![out, h]));
                if self.qkv_bias {
                    v.push((format!("{p}.self_attn.{m}.bias"), vec![out]));
                }
            }
            v.push((format!("{p}.self_attn.o_proj.weight"), vec![h, h]));
            v.push((format!("{p}.post_attention_layernorm.weight"), vec![h]));
            v.push((format!("{p}.mlp.gate_proj.weight"), vec![self.inter, h]));
            v.push((format!("{p}.mlp.up_proj.weight"), vec![self.inter, h]));
            v.push((format!("{p}.mlp.down_proj.weight"), vec![h, self.inter]));
        }
        v.push(("model.norm.weight".into(), vec![h]));
        if !self.tie {
            v.push(("lm_head.weight".into(), vec![self.vocab, h]));
        }
        v
    }

    fn config(&self) -> String {
        format!(
            r#"{{"architectures":["{}"],"model_type":"{}","vocab_size":{},"hidden_size":{},"intermediate_size":{},"num_hidden_layers":{},"num_attention_heads":{},"num_key_value_heads":{},"max_position_embeddings":32768,"rms_norm_eps":1e-6,"rope_theta":{},"tie_word_embeddings":{},"hidden_act":"silu","bos_token_id":1,"eos_token_id":2,"torch_dtype":"bfloat16","use_sliding_window":false}}"#,
            self.arch,
            self.model_type,
            self.vocab,
            self.hidden,
            self.inter,
            self.layers,
            self.heads,
            self.kv_heads,
            self.rope_theta,
            self.tie
        )
    }
}

/// Writes one bfloat16 safetensors file of `tensors` with values uniform in ±0.05
/// (norm weights near 1, so that activations stay in range).
fn write_bf16(path: &Path, tensors: &[(String, Vec<u64>)], seed: u64) -> Result<()> {
    write_random(path, tensors, seed, false)
}

/// Writes one safetensors file of `tensors` (float32 when `f32`, else bfloat16) with
/// values uniform in ±0.05 (weights named `…norm.weight` near 1).
pub(crate) fn write_random(
    path: &Path,
    tensors: &[(String, Vec<u64>)],
    seed: u64,
    f32: bool,
) -> Result<()> {
    let (header, _) = if f32 {
        safetensors_header(tensors, "F32", 4)
    } else {
        safetensors_header(tensors, "BF16", 2)
    };
    let tmp = path.with_extension("part");
    let file = std::fs::File::create(&tmp).map_err(|e| format!("{}: {e}", tmp.display()))?;
    let mut out = std::io::BufWriter::with_capacity(1 << 22, file);
    let err = |e: std::io::Error| e.to_string();
    out.write_all(&(header.len() as u64).to_le_bytes())
        .map_err(err)?;
    out.write_all(header.as_bytes()).map_err(err)?;
    let mut state = seed | 1;
    let mut buf: Vec<u8> = Vec::with_capacity(1 << 21);
    for (name, shape) in tensors {
        let norm = name.ends_with("norm.weight");
        let mut left: u64 = shape.iter().product();
        while left > 0 {
            buf.clear();
            let n = left.min(1 << 20);
            for _ in 0..n {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                let u = (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
                let v = if norm { 1.0 + 0.2 * u } else { 0.1 * u };
                if f32 {
                    buf.extend_from_slice(&v.to_le_bytes());
                } else {
                    buf.extend_from_slice(&((v.to_bits() >> 16) as u16).to_le_bytes());
                }
            }
            out.write_all(&buf).map_err(err)?;
            left -= n;
        }
    }
    out.flush().map_err(err)?;
    drop(out);
    std::fs::rename(&tmp, path).map_err(err)
}

/// Writes the checkpoint (config.json, bf16 safetensors, sharded with an index when
/// `shards > 1`) into `dir`; returns its total size in bytes.
pub(crate) fn write_checkpoint(dir: &Path, shape: &DecoderShape) -> Result<u64> {
    std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    std::fs::write(dir.join("config.json"), shape.config()).map_err(|e| e.to_string())?;
    let tensors = shape.tensors();
    let total: u64 = tensors
        .iter()
        .map(|(_, s)| s.iter().product::<u64>() * 2)
        .sum();
    if shape.shards == 1 {
        write_bf16(&dir.join("model.safetensors"), &tensors, 0x9E37_79B9)?;
    } else {
        // Consecutive tensors into shards of about equal size, as save_pretrained does.
        let per = total.div_ceil(shape.shards);
        let mut groups: Vec<Vec<(String, Vec<u64>)>> = vec![Vec::new()];
        let mut size = 0u64;
        for t in tensors {
            let n = t.1.iter().product::<u64>() * 2;
            if size > 0 && size + n > per && (groups.len() as u64) < shape.shards {
                groups.push(Vec::new());
                size = 0;
            }
            size += n;
            if let Some(g) = groups.last_mut() {
                g.push(t);
            }
        }
        let count = groups.len();
        let mut map = serde_json::Map::new();
        for (i, g) in groups.iter().enumerate() {
            let file = format!("model-{:05}-of-{count:05}.safetensors", i + 1);
            for (name, _) in g {
                map.insert(name.clone(), file.clone().into());
            }
            write_bf16(&dir.join(&file), g, 0x9E37_79B9 + i as u64)?;
        }
        let index = serde_json::json!({"metadata": {"total_size": total}, "weight_map": map});
        std::fs::write(dir.join("model.safetensors.index.json"), index.to_string())
            .map_err(|e| e.to_string())?;
    }
    Ok(total)
}

/// A command's wall time, peak RSS (VmHWM) and the largest anonymous memory (RssAnon) seen
/// while it ran, in seconds and KiB.
pub(crate) fn measure_proc(cmd: &[&str]) -> Result<(f64, u64, u64)> {
    let (prog, args) = cmd.split_first().ok_or("no command")?;
    let start = Instant::now();
    let mut child = Command::new(prog)
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| format!("{prog}: {e}"))?;
    let status_path = format!("/proc/{}/status", child.id());
    let (mut hwm, mut anon) = (0u64, 0u64);
    let field = |text: &str, key: &str| -> Option<u64> {
        text.lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
    };
    let status = loop {
        if let Ok(text) = std::fs::read_to_string(&status_path) {
            hwm = hwm.max(field(&text, "VmHWM:").unwrap_or(0));
            anon = anon.max(field(&text, "RssAnon:").unwrap_or(0));
        }
        if let Some(s) = child.try_wait().map_err(|e| e.to_string())? {
            break s;
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    let secs = start.elapsed().as_secs_f64();
    if !status.success() {
        let mut err = String::new();
        if let Some(mut e) = child.stderr.take() {
            let _ = std::io::Read::read_to_string(&mut e, &mut err);
        }
        return Err(format!("{cmd:?} failed ({status}): {err}"));
    }
    Ok((secs, hwm, anon))
}

/// Median wall time and largest memory of `runs` runs of `cmd` (after a `sync` each).
pub(crate) fn timed(cmd: &[&str], runs: usize) -> Result<(f64, u64, u64)> {
    let (mut t, mut hwm, mut anon) = (Vec::new(), 0, 0);
    for _ in 0..runs {
        settle();
        let (s, h, a) = measure_proc(cmd)?;
        t.push(s);
        hwm = hwm.max(h);
        anon = anon.max(a);
    }
    Ok((median(t), hwm, anon))
}

pub(crate) fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// Total bytes of the files directly in `dir`.
pub(crate) fn dir_size(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

/// `cat` of `files` into one fresh file in `out_dir` (removed first, as ferry's writer
/// removes its output: ext4 flushes a file replaced by truncation).
pub(crate) fn cat_command(files: &[PathBuf], copy: &Path) -> String {
    let list: Vec<String> = files.iter().map(|f| format!("'{}'", f.display())).collect();
    format!(
        "rm -f '{0}' && cat {1} > '{0}'",
        copy.display(),
        list.join(" ")
    )
}

/// A fresh output folder `base/name` and the `ferry export` command line that writes
/// `model.onnx` into it from checkpoint `ck` with the cache, plus `extra` flags.
fn export_command(
    base: &Path,
    name: &str,
    ferry: &str,
    ck: &Path,
    extra: &[&str],
) -> (PathBuf, PathBuf, Vec<String>) {
    let out_dir = base.join(name);
    let _ = std::fs::create_dir_all(&out_dir);
    let out = out_dir.join("model.onnx");
    let mut cmd: Vec<String> = [ferry, "export", "--model"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    cmd.push(ck.display().to_string());
    cmd.extend(extra.iter().map(|s| s.to_string()));
    cmd.extend(["--task".into(), "text-generation-with-past".into()]);
    cmd.push(out.display().to_string());
    (out_dir, out, cmd)
}

/// `bench --llm [--runs N] [--skip-8b]`.
pub(crate) fn bench_llm(runs: usize, skip_8b: bool) -> Result<()> {
    let runs = runs.max(1);
    let base = target().join("bench").join("llm");
    let _ = std::fs::remove_dir_all(&base);
    std::fs::create_dir_all(&base).map_err(|e| e.to_string())?;
    let ferry = ferry_release()?;
    let ferry_s = ferry.display().to_string();

    // --- Qwen2.5-0.5B-shaped, fp32 export with the cache, parity with transformers.
    let ck = base.join("qwen2.5-0.5b");
    eprintln!("xtask: writing {}", ck.display());
    let size = write_checkpoint(&ck, &QWEN_05B)?;
    let (out_dir, out, export) = export_command(&base, "qwen-out", &ferry_s, &ck, &[]);
    let export: Vec<&str> = export.iter().map(String::as_str).collect();
    measure_proc(&export)?; // warm-up, and the file `cat` copies
    let out_bytes = dir_size(&out_dir);
    let outputs: Vec<PathBuf> = std::fs::read_dir(&out_dir)
        .map_err(|e| e.to_string())?
        .flatten()
        .map(|e| e.path())
        .collect();
    let reference = base.join("reference.bin");
    run(Command::new("sh")
        .arg("-c")
        .arg(cat_command(&outputs, &reference)))?;
    let copy = base.join("copy.bin");
    let cat = cat_command(std::slice::from_ref(&reference), &copy);
    let (cat_t, cat_hwm, _) = timed(&["sh", "-c", &cat], runs)?;
    let _ = std::fs::remove_file(&copy);
    let (fer_t, fer_hwm, fer_anon) = timed(&export, runs)?;
    let _ = std::fs::remove_file(&reference);

    // Parity: transformers' float32 logits on a left-padded batch against the same
    // checkpoint exported without the cache (the golden's inputs are the prefill's).
    let golden = base.join("qwen-golden.safetensors");
    let plain = out_dir.join("plain.onnx");
    let parity = match super::golden_venv() {
        Ok(py) => {
            let _ = std::fs::remove_file(&out);
            run(Command::new(&ferry)
                .args(["export", "--task", "text-generation", "--model"])
                .arg(&ck)
                .arg(&plain))?;
            run(Command::new(py)
                .arg(root().join("xtask").join("llm_parity.py"))
                .arg(&ck)
                .arg(&golden))?;
            let lib = super::fetch_ort()?;
            let o = Command::new(&ferry)
                .env("ORT_DYLIB_PATH", &lib)
                .args(["verify", "--atol", "1e-4"])
                .arg(&plain)
                .arg(&golden)
                .output()
                .map_err(|e| e.to_string())?;
            let text = String::from_utf8_lossy(&o.stdout).trim().to_string();
            if !o.status.success() {
                return Err(format!(
                    "parity with transformers failed: {text} {}",
                    String::from_utf8_lossy(&o.stderr)
                ));
            }
            text
        }
        Err(e) => format!("not checked: {e}"),
    };
    let _ = std::fs::remove_dir_all(&out_dir);
    let _ = std::fs::remove_dir_all(&ck);

    println!(
        "\nQwen2.5-0.5B-shaped checkpoint ({:.2} GB bf16) → fp32 ONNX with past ({:.2} GB), median of {runs}:",
        size as f64 / 1e9,
        out_bytes as f64 / 1e9
    );
    println!(
        "  cat of a file as large as the export  {cat_t:>7.2} s  peak RSS {:>7.1} MiB",
        mib(cat_hwm)
    );
    println!(
        "  ferry export                          {fer_t:>7.2} s  ({:.2}x cat)  peak RSS {:>7.1} MiB, peak anonymous {:>6.1} MiB",
        fer_t / cat_t,
        mib(fer_hwm),
        mib(fer_anon)
    );
    println!("  parity with transformers (float32 logits): {parity}");
    println!(
        "  for reference (shared/reference/anchors.md, same checkpoint shape): optimum-cli 80.6 s / 5.78 GB peak RSS; onnxruntime-genai builder (int4) 31.0 s / 4.86 GB"
    );

    if skip_8b {
        return Ok(());
    }
    // --- Llama-3-8B-shaped, 4 shards, bf16 export.
    let need = 36_000_000_000u64;
    let free = free_bytes(&base)?;
    if free < need {
        println!(
            "\nLlama-3-8B-shaped checkpoint skipped: needs ~{:.0} GB free under {}, {:.1} GB available",
            need as f64 / 1e9,
            base.display(),
            free as f64 / 1e9
        );
        return Ok(());
    }
    let ck = base.join("llama3-8b");
    eprintln!("xtask: writing {}", ck.display());
    let size = write_checkpoint(&ck, &LLAMA3_8B)?;
    let shards: Vec<PathBuf> = std::fs::read_dir(&ck)
        .map_err(|e| e.to_string())?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    let copy = base.join("copy.bin");
    let cat = cat_command(&shards, &copy);
    let (cat_t, cat_hwm, _) = timed(&["sh", "-c", &cat], 1)?;
    let _ = std::fs::remove_file(&copy);
    let (out_dir, _, export) =
        export_command(&base, "llama-out", &ferry_s, &ck, &["--dtype", "bf16"]);
    let export: Vec<&str> = export.iter().map(String::as_str).collect();
    let (fer_t, fer_hwm, fer_anon) = timed(&export, 1)?;
    let out_bytes = dir_size(&out_dir);
    let _ = std::fs::remove_dir_all(&out_dir);
    let _ = std::fs::remove_dir_all(&ck);
    println!(
        "\nLlama-3-8B-shaped checkpoint ({:.2} GB bf16, {} shards) → bf16 ONNX with past ({:.2} GB, external data), one run:",
        size as f64 / 1e9,
        shards.len(),
        out_bytes as f64 / 1e9
    );
    println!(
        "  cat of the shards                     {cat_t:>7.2} s  peak RSS {:>7.1} MiB",
        mib(cat_hwm)
    );
    println!(
        "  ferry export --dtype bf16             {fer_t:>7.2} s  ({:.2}x cat)  peak RSS {:>7.1} MiB, peak anonymous {:>6.1} MiB",
        fer_t / cat_t,
        mib(fer_hwm),
        mib(fer_anon)
    );
    Ok(())
}
