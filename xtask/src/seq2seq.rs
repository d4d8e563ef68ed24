//! `cargo xtask bench --seq2seq`: encoder-decoder export at t5-base size.
//!
//! A t5-base-shaped T5 v1.0 checkpoint (222.9 M parameters: 12 + 12 layers, d_model 768,
//! d_ff 3072, 12 heads, vocabulary 32128, tied embeddings; random float32 weights in one
//! 0.89 GB safetensors file as the hub ships t5-base) is exported to optimum's folder
//! (`text2text-generation-with-past`: encoder, decoder, decoder with past and the merged
//! decoder) by `ferry export` and by `optimum-cli export onnx` (target/optvenv), side by side
//! in one run, against `cat` of a file as large as ferry's folder. Wall time, peak RSS
//! (VmHWM) and peak anonymous memory (largest RssAnon) come from /proc while each runs.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::llm::{cat_command, dir_size, mib, write_random};
use super::stages::{Sample, timed};
use super::{Result, consumer_venv, ferry_release, run, target};

const VOCAB: u64 = 32_128;
const D_MODEL: u64 = 768;
const D_FF: u64 = 3072;
const LAYERS: u64 = 12;
const HEADS: u64 = 12;
const BUCKETS: u64 = 32;

/// t5-base's tensors as `save_pretrained` stores them (the tied embedding once, as
/// `shared.weight`; the relative position bias in the first block of each stack).
fn tensors() -> Vec<(String, Vec<u64>)> {
    let sq = vec![D_MODEL, D_MODEL];
    let mut v = vec![("shared.weight".to_string(), vec![VOCAB, D_MODEL])];
    for stack in ["encoder", "decoder"] {
        for l in 0..LAYERS {
            let p = format!("{stack}.block.{l}.layer");
            for m in ["q", "k", "v", "o"] {
                v.push((format!("{p}.0.SelfAttention.{m}.weight"), sq.clone()));
            }
            if l == 0 {
                v.push((
                    format!("{p}.0.SelfAttention.relative_attention_bias.weight"),
                    vec![BUCKETS, HEADS],
                ));
            }
            v.push((format!("{p}.0.layer_norm.weight"), vec![D_MODEL]));
            let ff = if stack == "decoder" {
                for m in ["q", "k", "v", "o"] {
                    v.push((format!("{p}.1.EncDecAttention.{m}.weight"), sq.clone()));
                }
                v.push((format!("{p}.1.layer_norm.weight"), vec![D_MODEL]));
                2
            } else {
                1
            };
            v.push((
                format!("{p}.{ff}.DenseReluDense.wi.weight"),
                vec![D_FF, D_MODEL],
            ));
            v.push((
                format!("{p}.{ff}.DenseReluDense.wo.weight"),
                vec![D_MODEL, D_FF],
            ));
            v.push((format!("{p}.{ff}.layer_norm.weight"), vec![D_MODEL]));
        }
        v.push((format!("{stack}.final_layer_norm.weight"), vec![D_MODEL]));
    }
    v
}

/// t5-base's config.json (v1.0: ReLU feed-forward, tied LM head).
fn config() -> String {
    format!(
        r#"{{"architectures":["T5ForConditionalGeneration"],"model_type":"t5","vocab_size":{VOCAB},"d_model":{D_MODEL},"d_kv":64,"d_ff":{D_FF},"num_layers":{LAYERS},"num_decoder_layers":{LAYERS},"num_heads":{HEADS},"relative_attention_num_buckets":{BUCKETS},"relative_attention_max_distance":128,"dropout_rate":0.1,"layer_norm_epsilon":1e-6,"initializer_factor":1.0,"feed_forward_proj":"relu","is_encoder_decoder":true,"tie_word_embeddings":true,"pad_token_id":0,"eos_token_id":1,"decoder_start_token_id":0}}"#
    )
}

fn write_checkpoint(dir: &Path) -> Result<u64> {
    std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    std::fs::write(dir.join("config.json"), config()).map_err(|e| e.to_string())?;
    std::fs::write(
        dir.join("generation_config.json"),
        r#"{"decoder_start_token_id":0,"eos_token_id":1,"pad_token_id":0}"#,
    )
    .map_err(|e| e.to_string())?;
    let t = tensors();
    write_random(&dir.join("model.safetensors"), &t, 0x7455_0001, true)?;
    Ok(t.iter().map(|(_, s)| s.iter().product::<u64>() * 4).sum())
}

fn files_in(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| format!("{}: {e}", dir.display()))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_file())
        .collect();
    v.sort();
    Ok(v)
}

/// `bench --seq2seq [--runs N] [--no-optimum]`.
pub(crate) fn bench_seq2seq(runs: usize, optimum: bool) -> Result<()> {
    let runs = runs.max(1);
    let base = target().join("bench").join("seq2seq");
    let _ = std::fs::remove_dir_all(&base);
    std::fs::create_dir_all(&base).map_err(|e| e.to_string())?;
    let ferry = ferry_release()?;
    let ck = base.join("t5-base-shaped");
    eprintln!("xtask: writing {}", ck.display());
    let size = write_checkpoint(&ck)?;
    let out = base.join("ferry-out");
    let ferry_cmd: Vec<String> = vec![
        ferry.display().to_string(),
        "export".into(),
        "--model".into(),
        ck.display().to_string(),
        "--task".into(),
        "text2text-generation-with-past".into(),
        out.display().to_string(),
    ];
    // ferry refuses an existing output folder: it is removed (untimed) before each run.
    let clear = |d: &Path| {
        let _ = std::fs::remove_dir_all(d);
    };
    run(Command::new(&ferry_cmd[0]).args(&ferry_cmd[1..]))?; // warm-up; the folder `cat` copies
    let out_bytes = dir_size(&out);
    let files = files_in(&out)?;
    let names = files
        .iter()
        .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .collect::<Vec<_>>()
        .join(", ");
    let reference = base.join("reference.bin");
    run(Command::new("sh")
        .arg("-c")
        .arg(cat_command(&files, &reference)))?;
    let copy = base.join("copy.bin");
    let cat = vec![
        "sh".to_string(),
        "-c".to_string(),
        cat_command(std::slice::from_ref(&reference), &copy),
    ];
    let cat_s = timed(&cat, runs, &|| ())?;
    let _ = std::fs::remove_file(&copy);
    let _ = std::fs::remove_file(&reference);
    let fer = timed(&ferry_cmd, runs, &|| clear(&out))?;
    clear(&out);

    let optimum_row: Option<(Sample, u64)> = if optimum {
        let py = consumer_venv()?;
        let opt_out = base.join("optimum-out");
        let cmd: Vec<String> = vec![
            py.with_file_name("optimum-cli").display().to_string(),
            "export".into(),
            "onnx".into(),
            "--model".into(),
            ck.display().to_string(),
            "--task".into(),
            "text2text-generation-with-past".into(),
            opt_out.display().to_string(),
        ];
        let s = timed(&cmd, runs, &|| clear(&opt_out))?;
        let bytes = dir_size(&opt_out);
        clear(&opt_out);
        Some((s, bytes))
    } else {
        None
    };
    clear(&ck);

    println!(
        "\nt5-base-shaped checkpoint ({:.2} GB float32) → optimum's folder with past, median of {runs}:",
        size as f64 / 1e9
    );
    println!("  ferry wrote {:.2} GB: {names}", out_bytes as f64 / 1e9);
    println!(
        "  cat of a file as large as ferry's folder  {:>7.2} s  peak RSS {:>7.1} MiB",
        cat_s.secs,
        mib(cat_s.rss)
    );
    println!(
        "  ferry export                              {:>7.2} s  ({:.2}x cat)  peak RSS {:>7.1} MiB, peak anonymous {:>6.1} MiB",
        fer.secs,
        fer.secs / cat_s.secs,
        mib(fer.rss),
        mib(fer.anon)
    );
    if let Some((s, bytes)) = optimum_row {
        println!(
            "  optimum-cli export onnx                   {:>7.2} s  ({:.2}x cat, {:.1}x ferry)  peak RSS {:>7.1} MiB, peak anonymous {:>6.1} MiB; wrote {:.2} GB",
            s.secs,
            s.secs / cat_s.secs,
            s.secs / fer.secs,
            mib(s.rss),
            mib(s.anon),
            bytes as f64 / 1e9
        );
    }
    Ok(())
}
