//! Decoder LLMs (and GPT-2) against transformers, step by step: every testdata case with a
//! `steps.safetensors` golden is exported with its cache, run on a left-padded prefill and
//! three cached steps (each fed the previous `present.*`), exported without a cache and
//! compared at the prefill, and generates greedily with ferry-pipeline to the token ids of
//! `model.generate`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use ferry_verifier::{F32Tensor, I64Tensor, Input, Model};

use super::{export, root, stderr};

/// Every decoder-only case with a steps golden (the seq2seq cases, `"kind": "seq2seq"` in
/// case.json, have their own).
pub(super) fn step_cases() -> Vec<PathBuf> {
    let seq2seq = |p: &Path| {
        std::fs::read_to_string(p.join("case.json"))
            .ok()
            .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok())
            .is_some_and(|c| c["kind"] == "seq2seq")
    };
    let mut v: Vec<PathBuf> = std::fs::read_dir(root().join("testdata"))
        .expect("testdata")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.join("steps.safetensors").is_file() && !seq2seq(p))
        .collect();
    v.sort();
    assert!(v.len() >= 12, "steps goldens missing: {v:?}");
    v
}

/// A case's `steps.safetensors` golden.
pub(super) struct Steps {
    bytes: Vec<u8>,
}

impl Steps {
    pub(super) fn load(case: &Path) -> Self {
        Self {
            bytes: std::fs::read(case.join("steps.safetensors")).expect("steps golden"),
        }
    }

    fn view(&self) -> safetensors::SafeTensors<'_> {
        safetensors::SafeTensors::deserialize(&self.bytes).expect("safetensors")
    }

    fn has(&self, name: &str) -> bool {
        self.view().tensor(name).is_ok()
    }

    pub(super) fn i64s(&self, name: &str) -> I64Tensor {
        let st = self.view();
        let v = st.tensor(name).expect(name);
        I64Tensor {
            shape: v.shape().iter().map(|&d| d as i64).collect(),
            data: v
                .data()
                .chunks_exact(8)
                .map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes")))
                .collect(),
        }
    }

    pub(super) fn f32s(&self, name: &str) -> Vec<f32> {
        let st = self.view();
        let v = st.tensor(name).expect(name);
        v.data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
            .collect()
    }

    pub(super) fn inputs(&self, step: usize) -> BTreeMap<String, Input> {
        ["input_ids", "attention_mask", "position_ids"]
            .iter()
            .map(|n| {
                let t = self.i64s(&format!("step{step}.input.{n}"));
                (n.to_string(), Input::I64(t))
            })
            .collect()
    }
}

pub(super) fn max_abs(got: &F32Tensor, want: &[f32]) -> f32 {
    assert_eq!(got.data.len(), want.len(), "logits size");
    got.data
        .iter()
        .zip(want)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max)
}

/// Max-abs over the positions of real tokens (attention_mask 1 in its last `S` columns),
/// and over those of padding tokens.
fn real_and_padding_max_abs(got: &F32Tensor, want: &[f32], mask: &I64Tensor) -> (f32, f32) {
    assert_eq!(got.data.len(), want.len(), "logits size");
    let (s, v) = (got.shape[1] as usize, got.shape[2] as usize);
    let t = mask.shape[1] as usize;
    let (mut real, mut pad) = (0f32, 0f32);
    for (k, (a, b)) in got.data.chunks(v).zip(want.chunks(v)).enumerate() {
        let (row, pos) = (k / s, k % s);
        let d = a
            .iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        if mask.data[row * t + t - s + pos] == 1 {
            real = real.max(d);
        } else {
            pad = pad.max(d);
        }
    }
    (real, pad)
}

fn exported(case: &Path, dir: &Path, task: &str, opset: &str) -> PathBuf {
    let out = dir.join(format!("{task}-{opset}.onnx"));
    let o = export(case, &out, &["--task", task, "--opset", opset]);
    assert!(o.status.success(), "{}: {}", case.display(), stderr(&o));
    out
}

pub(super) fn name(case: &Path) -> String {
    case.file_name()
        .expect("case name")
        .to_string_lossy()
        .into_owned()
}

/// Prefill + three cached steps match transformers' logits within 1e-5.
#[test]
fn with_past_matches_transformers_step_by_step() {
    for case in step_cases() {
        let steps = Steps::load(&case);
        for opset in ["17", "14"] {
            let dir = tempfile::tempdir().expect("tempdir");
            let out = exported(&case, dir.path(), "text-generation-with-past", opset);
            let label = format!("{} with past opset {opset}", name(&case));
            cached_steps_match(&out, &steps, 1e-5, &label, false);
        }
    }
}

/// Runs the model at `out` on the golden's left-padded prefill and three cached steps
/// (each fed the previous `present.*`); every step's logits within `tol` of transformers'
/// (with `real_tokens_only`, the logits of the tokens whose attention_mask is 1; those of
/// padding tokens are printed).
fn cached_steps_match(out: &Path, steps: &Steps, tol: f32, label: &str, real_tokens_only: bool) {
    for (step, logits) in cached_steps(out, steps, label).iter().enumerate() {
        let want = steps.f32s(&format!("step{step}.output.logits"));
        let (d, pad) = if real_tokens_only {
            real_and_padding_max_abs(
                logits,
                &want,
                &steps.i64s(&format!("step{step}.input.attention_mask")),
            )
        } else {
            (max_abs(logits, &want), 0.0)
        };
        println!(
            "{label} step {step}: logits {:?} max-abs {d:.3e} (padding tokens {pad:.3e})",
            logits.shape
        );
        assert!(d <= tol, "{label} step {step}: max-abs {d}");
    }
}

/// The logits of the model at `out` at the golden's prefill and three cached steps.
fn cached_steps(out: &Path, steps: &Steps, label: &str) -> Vec<F32Tensor> {
    let mut m = Model::load(out, 2).expect("load");
    let cache = cache_inputs(&m);
    cached_steps_with(steps, &cache, label, |inputs| {
        m.run_inputs(inputs).map_err(|e| e.to_string())
    })
    .expect("run")
}

/// `(name, heads, head dim)` of every `past_key_values.*` input of `m`.
pub(super) fn cache_inputs(m: &Model) -> Vec<(String, i64, i64)> {
    m.inputs()
        .into_iter()
        .filter(|info| info.name.starts_with("past_key_values."))
        .map(|info| {
            let heads = *info.dims[1].as_ref().expect("fixed heads");
            let hd = *info.dims[3].as_ref().expect("fixed head dim");
            (info.name, heads, hd)
        })
        .collect()
}

/// The logits that `run` (one engine's session) gives at the golden's prefill and three
/// cached steps, starting from empty caches for the `(name, heads, head dim)` cache
/// inputs and feeding each step the previous `present.*`; `run`'s first error ends it.
pub(super) fn cached_steps_with(
    steps: &Steps,
    cache_inputs: &[(String, i64, i64)],
    label: &str,
    mut run: impl FnMut(&BTreeMap<String, Input>) -> Result<BTreeMap<String, F32Tensor>, String>,
) -> Result<Vec<F32Tensor>, String> {
    let batch = steps.i64s("step0.input.input_ids").shape[0];
    let mut cache: BTreeMap<String, F32Tensor> = cache_inputs
        .iter()
        .map(|(name, heads, hd)| {
            let empty = F32Tensor {
                shape: vec![batch, *heads, 0, *hd],
                data: vec![],
            };
            (name.clone(), empty)
        })
        .collect();
    let layers = cache.len();
    assert!(layers >= 4, "{label}: cache inputs {layers}");
    let mut all = Vec::new();
    for step in 0..4 {
        let mut inputs = steps.inputs(step);
        for (k, v) in &cache {
            inputs.insert(k.clone(), Input::F32(v.clone()));
        }
        let mut outs = run(&inputs).map_err(|e| format!("{label} step {step}: {e}"))?;
        all.push(outs.remove("logits").expect("logits"));
        cache = outs
            .into_iter()
            .filter(|(k, _)| k.starts_with("present."))
            .map(|(k, v)| (k.replacen("present.", "past_key_values.", 1), v))
            .collect();
        assert_eq!(cache.len(), layers);
    }
    Ok(all)
}

/// The export without a cache gives transformers' prefill logits.
#[test]
fn without_past_matches_the_prefill() {
    for case in step_cases() {
        let steps = Steps::load(&case);
        let dir = tempfile::tempdir().expect("tempdir");
        let out = exported(&case, dir.path(), "text-generation", "17");
        let mut m = Model::load(&out, 2).expect("load");
        let outs = m.run_inputs(&steps.inputs(0)).expect("run");
        let d = max_abs(&outs["logits"], &steps.f32s("step0.output.logits"));
        println!("{} without past: prefill max-abs {d:.3e}", name(&case));
        assert!(d <= 1e-5, "{}: max-abs {d}", name(&case));
    }
}

/// `--dtype fp16` (weights narrowed while streaming; RMSNorm and softmax in float32 as
/// transformers computes them in half precision) against transformers computing the prefill
/// in float16, and `--dtype bf16` (bfloat16 weights, float32 compute) against its float32
/// logits at the positions that attend to something (a fully masked, left-padding query
/// row is `finfo(dtype).min` arithmetic and differs between precisions).
#[test]
fn half_precision_prefill_is_close() {
    for case in step_cases() {
        if name(&case).starts_with("gpt2") {
            continue;
        }
        let steps = Steps::load(&case);
        let inputs = steps.inputs(0);
        let mask = steps.i64s("step0.input.attention_mask");
        let want = steps.f32s("step0.output.logits");
        let dir = tempfile::tempdir().expect("tempdir");
        let want16 = steps.f32s("step0.output.logits_fp16");
        for (dtype, atol, want, all_rows) in [
            // transformers' own float16 logits are up to 1.07e-2 from its float32 ones
            // on these models; two float16 computations may differ by as much.
            ("fp16", 2e-2f32, &want16, true),
            ("bf16", 6e-2, &want, false),
        ] {
            let out = dir.path().join(format!("{dtype}.onnx"));
            let o = export(
                &case,
                &out,
                &["--task", "text-generation", "--dtype", dtype],
            );
            assert!(o.status.success(), "{}: {}", name(&case), stderr(&o));
            let mut m = Model::load(&out, 2).expect("load");
            let got = &m.run_inputs(&inputs).expect("run")["logits"];
            assert_eq!(got.data.len(), want.len());
            let vocab = got.shape[2] as usize;
            let mut worst = 0f32;
            for (pos, &attended) in mask.data.iter().enumerate() {
                if attended == 0 && !all_rows {
                    continue;
                }
                let r = pos * vocab..(pos + 1) * vocab;
                for (a, b) in got.data[r.clone()].iter().zip(&want[r]) {
                    worst = worst.max((a - b).abs());
                }
            }
            println!(
                "{} --dtype {dtype}: prefill max-abs {worst:.3e}",
                name(&case)
            );
            assert!(worst <= atol, "{} {dtype}: max-abs {worst}", name(&case));
        }
    }
}

/// Greedy generation (ferry-pipeline) gives the token ids of `model.generate`, with the
/// cache and without it.
#[test]
fn greedy_generation_matches_generate() {
    let mut checked = 0;
    for case in step_cases() {
        let steps = Steps::load(&case);
        if !steps.has("generate.output_ids") {
            continue;
        }
        let dir = tempfile::tempdir().expect("tempdir");
        // generate() with the cache, and with use_cache=False for the export without one.
        for (task, golden) in [
            ("text-generation-with-past", "generate.output_ids"),
            ("text-generation", "generate.output_ids_no_cache"),
        ] {
            let out = exported(&case, dir.path(), task, "17");
            greedy_matches(
                &case,
                &steps,
                &out,
                golden,
                &format!("{} {task}", name(&case)),
            );
        }
        checked += 1;
    }
    assert!(checked >= 11, "generate goldens: {checked}");
}

/// ferry-pipeline's greedy generation with the model at `out` on the golden's prompts
/// gives the new token ids of the golden `golden` (`generate.output_ids…`).
fn greedy_matches(case: &Path, steps: &Steps, out: &Path, golden: &str, label: &str) {
    let ids = steps.i64s("generate.input_ids");
    let mask = steps.i64s("generate.attention_mask");
    let (rows, len) = (ids.shape[0] as usize, ids.shape[1] as usize);
    let split = |t: &I64Tensor, w: usize| -> Vec<Vec<i64>> {
        t.data.chunks(w).map(<[i64]>::to_vec).collect()
    };
    let want = steps.i64s(golden);
    let total = want.shape[1] as usize;
    let want_new: Vec<Vec<i64>> = split(&want, total)
        .into_iter()
        .map(|r| r[len..].to_vec())
        .collect();
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(case.join("config.json")).expect("config"))
            .expect("json");
    let eos = config["eos_token_id"].as_i64().into_iter().collect();
    let cfg = ferry_pipeline::GenerationConfig {
        max_new_tokens: total - len,
        eos_token_ids: eos,
        pad_token_id: 0,
        // As Phi3ForCausalLM.prepare_inputs_for_generation (ferry run reads it from the
        // export's metadata).
        reset_cache_at: (config["model_type"] == "phi3")
            .then(|| config["original_max_position_embeddings"].as_u64())
            .flatten()
            .map(|n| n as usize + 1),
    };
    let mut m = Model::load(out, 2).expect("load");
    let mut steps_seen = 0;
    let got = ferry_pipeline::greedy(&mut m, split(&ids, len), split(&mask, len), &cfg, |step| {
        assert_eq!(step.len(), rows);
        steps_seen += 1;
        Ok(())
    })
    .expect("generate");
    println!("{label}: generated {got:?}");
    assert_eq!(got, want_new, "{label}");
    assert_eq!(steps_seen, total - len);
    assert!(total - len >= 16);
}

/// The packed q/k/v MatMuls of an optimized decoder (ferry's `qkv_proj/MatMul` names,
/// Phi-3's own included).
fn packed_qkv(graph: &ferry_ir::Graph) -> usize {
    graph
        .nodes
        .iter()
        .filter(|n| n.op_type == "MatMul" && n.name.ends_with("qkv_proj/MatMul"))
        .count()
}

/// Fused counts of `ferry export --optimize` (with past, opset 17) per decoder case:
/// (SimplifiedLayerNormalization, SkipSimplifiedLayerNormalization, packed q/k/v MatMuls,
/// GroupQueryAttention, RotaryEmbedding). Every case has 2 layers: one RMSNorm before
/// layer 0, two residual norms per layer (the last one the final norm), one packed MatMul
/// per layer (Phi-3's own `qkv_proj`), one GroupQueryAttention and two RotaryEmbedding
/// (queries, keys) per layer; Gemma 2's post-attention/post-feedforward norms and Qwen3's
/// q/k norms are 4 more plain ones; mistral-tiny-sliding's head size 12 is not a multiple
/// of 8, which ONNX Runtime's GroupQueryAttention requires, so its attention stays (its
/// rotary embeddings still fuse).
const LLM_FUSED: &[(&str, [usize; 5])] = &[
    ("gemma-tiny-mqa", [1, 4, 2, 2, 4]),
    ("gemma2-tiny-softcap", [5, 4, 2, 2, 4]),
    ("llama-tiny-dynamic", [1, 4, 2, 2, 4]),
    ("llama-tiny-gqa-bias", [1, 4, 2, 2, 4]),
    ("llama-tiny-llama3", [1, 4, 2, 2, 4]),
    ("llama-tiny-mqa-linear", [1, 4, 2, 2, 4]),
    ("llama-tiny-yarn", [1, 4, 2, 2, 4]),
    ("mistral-tiny-sliding", [1, 4, 2, 0, 4]),
    ("phi3-tiny-longrope", [1, 4, 2, 2, 4]),
    ("qwen2-tiny-hd16", [1, 4, 2, 2, 4]),
    ("qwen2-tiny-tied", [1, 4, 2, 2, 4]),
    ("qwen3-tiny-qknorm-bf16", [5, 4, 2, 2, 4]),
];

/// The decoders optimized (`ferry export --optimize`: RMSNorm, residual + RMSNorm, packed
/// q/k/v, GroupQueryAttention + RotaryEmbedding) still match transformers' logits within
/// 1e-4 at the left-padded prefill (real tokens; padding tokens' logits differ once
/// GroupQueryAttention is fused, see `fuse_group_query_attention`) and every cached step,
/// with fixed fused counts per model, and still generate `model.generate`'s tokens.
#[test]
fn optimized_decoders_match_transformers() {
    let mut seen = 0;
    for case in step_cases() {
        let Some((_, want)) = LLM_FUSED.iter().find(|(c, _)| *c == name(&case)) else {
            continue;
        };
        let steps = Steps::load(&case);
        let dir = tempfile::tempdir().expect("tempdir");
        let plain = dir.path().join("model.onnx");
        let o = export(
            &case,
            &plain,
            &[
                "--task",
                "text-generation-with-past",
                "--optimize",
                "--json",
            ],
        );
        assert!(o.status.success(), "{}: {}", name(&case), stderr(&o));
        let json = super::stdout_json(&o);
        let out = dir.path().join("model-optimized.onnx");
        let got = llm_fused_counts(&json, &out);
        println!("{}: fused {got:?}", name(&case));
        assert_eq!(&got, want, "{}: fused counts", name(&case));
        let label = format!("{} optimized", name(&case));
        // GroupQueryAttention is exact for real tokens; rows of padding queries (every
        // key masked) average over the causal keys only, not over all of them.
        cached_steps_match(&out, &steps, 1e-4, &label, want[3] > 0);
        if steps.has("generate.output_ids") {
            greedy_matches(&case, &steps, &out, "generate.output_ids", &label);
        }
        // Without a cache: RMSNorms and RotaryEmbedding (no GroupQueryAttention), every
        // prefill position exact.
        let plain = dir.path().join("nocache.onnx");
        let o = export(
            &case,
            &plain,
            &["--task", "text-generation", "--optimize", "--json"],
        );
        assert!(o.status.success(), "{}: {}", name(&case), stderr(&o));
        let fused = &super::stdout_json(&o)["optimized"]["fused_operators"];
        assert_eq!(fused["GroupQueryAttention"], 0, "{}", name(&case));
        assert_eq!(fused["RotaryEmbedding"], 4, "{}", name(&case));
        let mut m = Model::load(&dir.path().join("nocache-optimized.onnx"), 2).expect("load");
        let outs = m.run_inputs(&steps.inputs(0)).expect("run");
        let d = max_abs(&outs["logits"], &steps.f32s("step0.output.logits"));
        println!(
            "{} optimized without past: prefill max-abs {d:.3e}",
            name(&case)
        );
        assert!(d <= 1e-4, "{}: max-abs {d}", name(&case));
        seen += 1;
    }
    assert_eq!(seen, LLM_FUSED.len());
}

/// A copy of a decoder case's checkpoint whose config.json `edit` changes.
fn edited_copy(case: &str, edit: impl FnOnce(&mut serde_json::Value)) -> tempfile::TempDir {
    let src = root().join("testdata").join(case);
    let dir = tempfile::tempdir().expect("tempdir");
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(src.join(f), dir.path().join(f)).expect("copy");
    }
    let p = dir.path().join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).expect("config")).expect("json");
    edit(&mut cfg);
    std::fs::write(&p, cfg.to_string()).expect("write config");
    dir
}

/// Bad decoder input: one line on stderr, exit 1, no output file.
#[test]
fn bad_decoder_input_fails_cleanly() {
    let out_dir = tempfile::tempdir().expect("tempdir");
    let out = out_dir.path().join("model.onnx");
    let fails = |model: &Path, extra: &[&str], needle: &str| {
        let o = export(model, &out, extra);
        super::assert_fails_cleanly(&o, &out, needle);
    };
    let c = edited_copy("llama-tiny-gqa-bias", |c| {
        c["rope_parameters"] =
            serde_json::json!({"rope_type": "ntk-magic", "factor": 2.0, "rope_theta": 10000.0});
    });
    fails(c.path(), &[], "rope type `ntk-magic`");
    let c = edited_copy("llama-tiny-gqa-bias", |c| {
        c["num_key_value_heads"] = 3.into()
    });
    fails(
        c.path(),
        &[],
        "num_attention_heads 4 is not a multiple of num_key_value_heads 3",
    );
    // head_dim 12: q_proj would be [48, 32]; the checkpoint's is [32, 32].
    let c = edited_copy("llama-tiny-gqa-bias", |c| c["head_dim"] = 12.into());
    fails(c.path(), &[], "self_attn.q_proj.weight` has shape [32, 32]");
    fails(
        &root().join("testdata/llama-tiny-gqa-bias"),
        &["--format", "torchscript"],
        "TorchScript export is not available for `llama`",
    );
    // A shard the index names but the folder lacks.
    let c = edited_copy("qwen2-tiny-tied", |_| {});
    let st = c.path().join("model.safetensors");
    std::fs::rename(&st, c.path().join("model-00001-of-00002.safetensors")).expect("rename");
    let bytes = std::fs::read(c.path().join("model-00001-of-00002.safetensors")).expect("read");
    let names: Vec<String> = safetensors::SafeTensors::deserialize(&bytes)
        .expect("safetensors")
        .names()
        .into_iter()
        .map(str::to_string)
        .collect();
    let mut map = serde_json::Map::new();
    for (i, n) in names.iter().enumerate() {
        let shard = if i == 0 { 2 } else { 1 };
        map.insert(
            n.clone(),
            format!("model-0000{shard}-of-00002.safetensors").into(),
        );
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": map});
    std::fs::write(
        c.path().join("model.safetensors.index.json"),
        index.to_string(),
    )
    .expect("index");
    fails(c.path(), &[], "model-00002-of-00002.safetensors");
}

/// `target/optvenv/bin/NAME` (optimum-onnx and onnxruntime, made by `cargo xtask verify`
/// before the tests), or `None` with a skip message (never in CI).
fn optvenv(name: &str) -> Option<PathBuf> {
    let path = root().join("target/optvenv/bin").join(name);
    if path.is_file() {
        return Some(path);
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "{} missing in CI",
        path.display()
    );
    println!(
        "skipped: no {} (cargo xtask verify makes it)",
        path.display()
    );
    None
}

/// optimum's own exports (`optimum-cli export onnx --task text-generation-with-past`, from
/// target/optvenv, which `cargo xtask verify` makes before the tests) of tiny goldens,
/// optimized by `ferry optimize`: the fused counts of ferry's own exports ([`LLM_FUSED`]:
/// SimplifiedLayerNormalization, SkipSimplifiedLayerNormalization, packed q/k/v MatMuls,
/// GroupQueryAttention, RotaryEmbedding) and the logits of optimum's unoptimized model
/// within 1e-4 for real tokens at every step (optimum 0.1.0's transformers 4.57 export is
/// the reference here: its Qwen2 is itself ~1 away from transformers 5's logits).
/// optimum's sdpa attention (the scale's square root on q and on kᵀ, `Where(IsNaN)` after
/// the softmax, rotary slice bounds and head merge computed from shapes, a boolean mask
/// sliced to the key length) fuses as ferry's.
#[test]
fn optimum_exports_optimize() {
    let Some(optimum) = optvenv("optimum-cli") else {
        return;
    };
    for case in ["llama-tiny-gqa-bias", "qwen2-tiny-tied"] {
        let want = LLM_FUSED
            .iter()
            .find(|(c, _)| *c == case)
            .expect("ferry's counts")
            .1;
        let src = root().join("testdata").join(case);
        let dir = tempfile::tempdir().expect("tempdir");
        let o = std::process::Command::new(&optimum)
            .args(["export", "onnx", "--model"])
            .arg(&src)
            .args(["--task", "text-generation-with-past"])
            .arg(dir.path().join("optimum"))
            .env("HF_HUB_OFFLINE", "1")
            .output()
            .expect("optimum-cli");
        assert!(o.status.success(), "{case}: {}", stderr(&o));
        let out = dir.path().join("optimized.onnx");
        let o = super::run(
            super::ferry()
                .arg("optimize")
                .arg(dir.path().join("optimum/model.onnx"))
                .arg(&out)
                .arg("--json"),
        );
        assert!(o.status.success(), "{case}: {}", stderr(&o));
        let graph = ferry_onnx::read_graph(&out).expect("read optimized");
        let count = |op: &str| graph.nodes.iter().filter(|n| n.op_type == op).count();
        let packed = packed_qkv(&graph);
        let got = [
            count("SimplifiedLayerNormalization"),
            count("SkipSimplifiedLayerNormalization"),
            packed,
            count("GroupQueryAttention"),
            count("RotaryEmbedding"),
        ];
        println!("{case} (optimum export): fused {got:?}");
        assert_eq!(got, want, "{case}: fused counts");
        let steps = Steps::load(&src);
        let label = format!("{case} optimum optimized");
        let plain = cached_steps(&dir.path().join("optimum/model.onnx"), &steps, &label);
        for (step, (got, want)) in cached_steps(&out, &steps, &label)
            .iter()
            .zip(&plain)
            .enumerate()
        {
            let mask = steps.i64s(&format!("step{step}.input.attention_mask"));
            let (d, pad) = real_and_padding_max_abs(got, &want.data, &mask);
            println!(
                "{label} step {step}: max-abs {d:.3e} against optimum's model (padding tokens {pad:.3e})"
            );
            assert!(d <= 1e-4, "{label} step {step}: max-abs {d}");
        }
    }
}

/// Fused counts of `ferry export --dtype fp16 --optimize` (with past) for a case whose
/// float32 counts are `fp32` ([`LLM_FUSED`]): the same, except Gemma's norms, which scale
/// the float32 norm by a float32 `1 + w` and so all stay plain SimplifiedLayerNormalization
/// (SkipSimplifiedLayerNormalization takes one type for input, skip and gamma).
fn fp16_counts(case: &str, fp32: [usize; 5]) -> [usize; 5] {
    if case.starts_with("gemma") {
        [fp32[0] + fp32[1], 0, fp32[2], fp32[3], fp32[4]]
    } else {
        fp32
    }
}

/// Runs the unoptimized and optimized float16 models (ONNX Runtime's Python package in
/// target/optvenv: ferry-verifier feeds float32 caches only) on a golden's left-padded
/// prefill with empty float16 caches; prints the max-abs against transformers' float16
/// logits over real tokens and over padding tokens, one line per model.
const HALF_PREFILL: &str = r#"
import sys, numpy as np, onnxruntime as ort
from safetensors.numpy import load_file
d = load_file(sys.argv[1])
feeds = {k: d[f"step0.input.{k}"] for k in ["input_ids", "attention_mask", "position_ids"]}
want = d["step0.output.logits_fp16"]
real = feeds["attention_mask"][:, -want.shape[1]:] == 1
for path in sys.argv[2:]:
    s = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    f = dict(feeds)
    for i in s.get_inputs():
        if i.name.startswith("past_key_values."):
            f[i.name] = np.zeros((want.shape[0], i.shape[1], 0, i.shape[3]), np.float16)
    got = s.run(["logits"], f)[0].astype(np.float32)
    diff = np.abs(got - want).max(-1)
    print(diff[real].max(), diff[~real].max() if (~real).any() else 0.0)
"#;

/// `--dtype fp16 --optimize` decoders (with past): norms, packed q/k/v, RotaryEmbedding and
/// GroupQueryAttention fused in float16 (ONNX Runtime's CPU provider has float16 kernels for
/// each) with fixed counts per model, and real tokens' prefill logits within the float16
/// bound of `half_precision_prefill_is_close` (2e-2) of transformers' float16 logits, as the
/// unoptimized export. Padding tokens differ once GroupQueryAttention is fused (see
/// `fuse_group_query_attention`).
#[test]
fn half_precision_optimized_is_close() {
    let Some(python) = optvenv("python") else {
        return;
    };
    for &(case, fp32) in LLM_FUSED {
        let want = fp16_counts(case, fp32);
        let src = root().join("testdata").join(case);
        let dir = tempfile::tempdir().expect("tempdir");
        let plain = dir.path().join("model.onnx");
        let json = export_fp16_optimized(&src, &plain, "text-generation-with-past");
        let out = dir.path().join("model-optimized.onnx");
        let got = llm_fused_counts(&json, &out);
        println!("{case} fp16: fused {got:?}");
        assert_eq!(got, want, "{case} fp16: fused counts");
        // Without a cache (RotaryEmbedding, no GroupQueryAttention): every position.
        let nocache = dir.path().join("nocache.onnx");
        let json = export_fp16_optimized(&src, &nocache, "text-generation");
        let fused = &json["optimized"]["fused_operators"];
        assert_eq!(fused["RotaryEmbedding"], 4, "{case} fp16 without past");
        let nocache = dir.path().join("nocache-optimized.onnx");
        let rows = half_prefill(&python, &src, &[&plain, &out, &nocache]);
        for (label, row) in ["export", "optimized", "optimized without past"]
            .iter()
            .zip(&rows)
        {
            println!(
                "{case} fp16 {label}: prefill max-abs {:.3e} (padding tokens {:.3e})",
                row[0], row[1]
            );
            assert!(row[0] <= 2e-2, "{case} fp16 {label}: max-abs {}", row[0]);
        }
        assert!(rows[2][1] <= 2e-2, "{case} fp16 without past: padding");
    }
}

/// `ferry export --task TASK --dtype fp16 --optimize --json` of `src` into `out`: the
/// printed JSON.
fn export_fp16_optimized(src: &Path, out: &Path, task: &str) -> serde_json::Value {
    let o = export(
        src,
        out,
        &["--task", task, "--dtype", "fp16", "--optimize", "--json"],
    );
    assert!(o.status.success(), "{}: {}", src.display(), stderr(&o));
    super::stdout_json(&o)
}

/// The LLM fusions' counts, as [`LLM_FUSED`] lists them, from `ferry export --optimize
/// --json`'s statistics and the optimized file `optimized` (packed q/k/v MatMuls).
fn llm_fused_counts(json: &serde_json::Value, optimized: &Path) -> [usize; 5] {
    let fused = &json["optimized"]["fused_operators"];
    let n = |op: &str| fused[op].as_u64().unwrap_or(0) as usize;
    [
        n("SimplifiedLayerNormalization"),
        n("SkipSimplifiedLayerNormalization"),
        packed_qkv(&ferry_onnx::read_graph(optimized).expect("read optimized")),
        n("GroupQueryAttention"),
        n("RotaryEmbedding"),
    ]
}

/// [`HALF_PREFILL`] on `models`: `[real, padding]` max-abs per model.
fn half_prefill(python: &Path, case: &Path, models: &[&Path]) -> Vec<[f32; 2]> {
    let o = std::process::Command::new(python)
        .arg("-c")
        .arg(HALF_PREFILL)
        .arg(case.join("steps.safetensors"))
        .args(models)
        .output()
        .expect("python");
    assert!(o.status.success(), "{}: {}", case.display(), stderr(&o));
    let text = String::from_utf8_lossy(&o.stdout).into_owned();
    let rows: Vec<[f32; 2]> = text
        .lines()
        .filter_map(|l| {
            let v: Vec<f32> = l
                .split_whitespace()
                .filter_map(|x| x.parse().ok())
                .collect();
            v.try_into().ok()
        })
        .collect();
    assert_eq!(rows.len(), models.len(), "{}: {text}", case.display());
    rows
}

/// `ferry export --genai` writes onnxruntime-genai's GroupQueryAttention form where the
/// head size allows it (16: qwen3-tiny-qknorm-bf16, whose q/k norms keep q, k and v apart,
/// and qwen2-tiny-hd16, whose packed QKV MatMul feeds the attention alone, key and value
/// inputs empty, as the model builder writes it): the rotary inside the attention
/// (`do_rotary`) with constant `[context, hd/2]` cos/sin caches, lengths from
/// `attention_mask`, no `attention_bias`, no `position_ids` input. That form is exact for
/// unpadded rows: the golden's unpadded row 0 alone (batch 1), through the prefill and
/// three cached steps (past and present as separate tensors), gives transformers' logits
/// within 1e-4.
#[test]
fn genai_attention_form_matches_transformers_unpadded() {
    for (name, packed) in [("qwen3-tiny-qknorm-bf16", false), ("qwen2-tiny-hd16", true)] {
        genai_form_case(name, packed);
    }
}

fn genai_form_case(name: &str, packed: bool) {
    let case = root().join("testdata").join(name);
    let steps = Steps::load(&case);
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("genai").join("model.onnx");
    let o = export(&case, &out, &["--genai"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let graph = ferry_onnx::read_graph(&out).expect("read");
    let gqa: Vec<&ferry_ir::Node> = graph
        .nodes
        .iter()
        .filter(|n| n.op_type == "GroupQueryAttention")
        .collect();
    assert_eq!(gqa.len(), 2);
    for n in &gqa {
        assert!(matches!(n.attr("do_rotary"), Some(ferry_ir::Attr::Int(1))));
        assert_eq!(n.inputs.len(), 9, "{}: caches, no attention_bias", n.name);
        let kv_empty = n.inputs[1].is_empty() && n.inputs[2].is_empty();
        assert_eq!(kv_empty, packed, "{name} {}: packed QKV input", n.name);
        let cos = graph.initializers.iter().find(|i| i.name == n.inputs[7]);
        assert_eq!(cos.expect("constant cos cache").dims, [64, 8]);
    }
    assert!(!graph.nodes.iter().any(|n| n.op_type == "RotaryEmbedding"));
    assert!(!graph.inputs.iter().any(|v| v.name == "position_ids"));

    let mut m = Model::load(&out, 2).expect("load");
    let mut cache: BTreeMap<String, F32Tensor> = BTreeMap::new();
    for info in m.inputs() {
        if info.name.starts_with("past_key_values.") {
            let heads = *info.dims[1].as_ref().expect("fixed heads");
            let hd = *info.dims[3].as_ref().expect("fixed head dim");
            let empty = F32Tensor {
                shape: vec![1, heads, 0, hd],
                data: vec![],
            };
            cache.insert(info.name.clone(), empty);
        }
    }
    assert_eq!(cache.len(), 4);
    for step in 0..4 {
        let mut inputs: BTreeMap<String, Input> = BTreeMap::new();
        for name in ["input_ids", "attention_mask"] {
            let t = steps.i64s(&format!("step{step}.input.{name}"));
            let w = t.shape[1];
            let row = t.data[..w as usize].to_vec();
            assert!(name != "attention_mask" || row.iter().all(|&v| v == 1));
            let row = I64Tensor {
                shape: vec![1, w],
                data: row,
            };
            inputs.insert(name.to_string(), Input::I64(row));
        }
        for (k, v) in &cache {
            inputs.insert(k.clone(), Input::F32(v.clone()));
        }
        let mut outs = m.run_inputs(&inputs).expect("run");
        let logits = outs.remove("logits").expect("logits");
        let want = steps.f32s(&format!("step{step}.output.logits"));
        let d = max_abs(&logits, &want[..want.len() / 2]);
        println!("{name} genai form, unpadded row, step {step}: max-abs {d:.3e}");
        assert!(d <= 1e-4, "{name} step {step}: max-abs {d}");
        cache = outs
            .into_iter()
            .filter(|(k, _)| k.starts_with("present."))
            .map(|(k, v)| (k.replacen("present.", "past_key_values.", 1), v))
            .collect();
        assert_eq!(cache.len(), 4);
    }
}
