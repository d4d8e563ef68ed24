// Checks that transformers.js (@huggingface/transformers, onnxruntime-node) runs ferry's
// decoder exports and encoder-decoder folders with its own generation loop (run by
// `cargo xtask verify`).
//
// For each decoder golden case (a steps.safetensors with generate.* tensors) the export
// `text-generation-with-past` is placed as OUT_DIR/<case>/onnx/model.onnx beside the case's
// config.json and generation_config.json, loaded with AutoModelForCausalLM (local files
// only, dtype fp32) and generates greedily from the golden's left-padded batch; the token
// ids must equal transformers' `generate`'s (each row up to its first end-of-sequence
// token, after which transformers pads and transformers.js keeps sampling). Phi-3 is skipped (its generate() recomputes
// the cache where LongRoPE switches factors).
//
// For each encoder-decoder golden case (case.json "kind": "seq2seq") the folder
// `text2text-generation-with-past` is exported, its .onnx files placed under onnx/ as the
// hub's transformers.js repos hold them, loaded with AutoModelForSeq2SeqLM (encoder and
// merged decoder) and run greedily on the golden's right-padded batch; the token ids must
// equal transformers' greedy `generate`'s, each row up to its first end-of-sequence token.
// (transformers.js has no beam search.)
//
// Usage: node verify_transformersjs.mjs FERRY_BINARY TESTDATA_DIR OUT_DIR
// (with @huggingface/transformers resolvable, e.g. NODE_PATH or a node_modules above).
// Prints one line per case; exits 1 on any failure or when nothing was checked.

import { execFileSync } from "node:child_process";
import fs from "node:fs";
import path from "node:path";

const [ferry, testdata, outDir] = process.argv.slice(2);
const { AutoModelForCausalLM, AutoModelForSeq2SeqLM, Tensor, env } = await import(
  "@huggingface/transformers"
);
env.allowRemoteModels = false;
env.allowLocalModels = true;
env.localModelPath = outDir;
fs.mkdirSync(outDir, { recursive: true });

/** The int64 tensors of a safetensors file, by name: {shape, data: BigInt64Array}. */
function readI64(file) {
  const buf = fs.readFileSync(file);
  const n = Number(buf.readBigUInt64LE(0));
  const header = JSON.parse(buf.subarray(8, 8 + n).toString("utf8"));
  const out = {};
  for (const [name, t] of Object.entries(header)) {
    if (name === "__metadata__" || t.dtype !== "I64") continue;
    const [a, b] = t.data_offsets;
    const bytes = buf.subarray(8 + n + a, 8 + n + b);
    const data = new BigInt64Array(bytes.length / 8);
    for (let i = 0; i < data.length; i++) data[i] = bytes.readBigInt64LE(i * 8);
    out[name] = { shape: t.shape, data };
  }
  return out;
}

let failures = 0;
let checked = 0;

/** Compares generated ids with transformers' from column `from` on, each row up to its first
 * end-of-sequence token (transformers pads a finished row, transformers.js goes on sampling
 * it until every row is done), and prints the case's line. */
function report(name, what, out, want, from, dir, until = want.shape[1]) {
  const got = Array.from(out.data, (v) => Number(v));
  const exp = Array.from(want.data, (v) => Number(v));
  const config = JSON.parse(fs.readFileSync(path.join(dir, "config.json"), "utf8"));
  const eos = [config.eos_token_id].flat();
  const [rows, width] = want.shape;
  let ok = out.dims.join() === want.shape.join();
  for (let r = 0; ok && r < rows; r++) {
    for (let j = from; j < until; j++) {
      if (got[r * width + j] !== exp[r * width + j]) {
        ok = false;
        break;
      }
      if (eos.includes(exp[r * width + j])) break;
    }
  }
  checked += 1;
  if (!ok) failures += 1;
  console.log(`${ok ? "ok  " : "FAIL"} ${name}: transformers.js ${what} [${out.dims}] ` +
    (ok ? "equals transformers' generate" : `differs:\n  got  ${got}\n  want ${exp}`));
}

/** `model.generate` greedily on the golden's `generate.input_ids`/`attention_mask` batch. */
function greedy(model, st, maxNewTokens, extra) {
  const ids = st["generate.input_ids"];
  const mask = st["generate.attention_mask"];
  return model.generate({
    input_ids: new Tensor("int64", ids.data, ids.shape),
    attention_mask: new Tensor("int64", mask.data, mask.shape),
    max_new_tokens: maxNewTokens,
    do_sample: false,
    ...extra,
  });
}

for (const name of fs.readdirSync(testdata).sort()) {
  const meta = path.join(testdata, name, "case.json");
  if (!fs.existsSync(meta) || JSON.parse(fs.readFileSync(meta, "utf8")).kind !== "seq2seq") continue;
  const st = readI64(path.join(testdata, name, "steps.safetensors"));
  const dir = path.join(outDir, name);
  fs.rmSync(dir, { recursive: true, force: true });
  try {
    execFileSync(ferry, ["export", "--model", path.join(testdata, name), "--task",
      "text2text-generation-with-past", dir], { stdio: "pipe" });
    fs.mkdirSync(path.join(dir, "onnx"));
    for (const f of fs.readdirSync(dir)) {
      if (f.endsWith(".onnx")) fs.renameSync(path.join(dir, f), path.join(dir, "onnx", f));
    }
    const model = await AutoModelForSeq2SeqLM.from_pretrained(name, { dtype: "fp32", device: "cpu" });
    const want = st["generate.greedy_ids"];
    const out = await greedy(model, st, want.shape[1] - 1, { num_beams: 1 });
    // A config.json forced_eos_token_id that generation_config.json lacks: transformers 5
    // reads only the latter, transformers.js applies the former at the last step.
    const config = JSON.parse(fs.readFileSync(path.join(dir, "config.json"), "utf8"));
    const gen = JSON.parse(fs.readFileSync(path.join(dir, "generation_config.json"), "utf8"));
    const forcedOnlyInConfig = config.forced_eos_token_id != null && gen.forced_eos_token_id == null;
    report(name, "seq2seq greedy generate" + (forcedOnlyInConfig ? " (last token not compared: " +
      "config.json's forced_eos_token_id, absent from generation_config.json, is applied by " +
      "transformers.js only)" : ""), out, want, 1, dir,
      want.shape[1] - (forcedOnlyInConfig ? 1 : 0));
    await model.dispose();
  } catch (e) {
    failures += 1;
    console.log(`FAIL ${name}: ${String(e.message || e).split("\n")[0]}`);
  }
}

if (checked === 0) {
  console.log("FAIL: no encoder-decoder case was checked");
  failures += 1;
}

for (const name of fs.readdirSync(testdata).sort()) {
  const steps = path.join(testdata, name, "steps.safetensors");
  if (!fs.existsSync(steps)) continue;
  const st = readI64(steps);
  if (!st["generate.output_ids"]) continue;
  if (name.startsWith("phi3")) {
    console.log(`skip ${name}: generate() resets Phi-3's cache at the LongRoPE switch`);
    continue;
  }
  const dir = path.join(outDir, name);
  fs.rmSync(dir, { recursive: true, force: true });
  fs.mkdirSync(path.join(dir, "onnx"), { recursive: true });
  for (const f of ["config.json", "generation_config.json"]) {
    const src = path.join(testdata, name, f);
    if (fs.existsSync(src)) fs.copyFileSync(src, path.join(dir, f));
  }
  try {
    execFileSync(ferry, ["export", "--model", path.join(testdata, name), "--task",
      "text-generation-with-past", path.join(dir, "onnx", "model.onnx")], { stdio: "pipe" });
    const model = await AutoModelForCausalLM.from_pretrained(name, { dtype: "fp32", device: "cpu" });
    const ids = st["generate.input_ids"];
    const want = st["generate.output_ids"];
    const out = await greedy(model, st, want.shape[1] - ids.shape[1], { pad_token_id: 0 });
    report(name, "generate", out, want, ids.shape[1], dir);
    await model.dispose();
  } catch (e) {
    failures += 1;
    console.log(`FAIL ${name}: ${String(e.message || e).split("\n")[0]}`);
  }
}
if (checked === 0) {
  console.log("FAIL: no case was checked");
  failures += 1;
}
console.log(`${failures ? "FAILED" : "passed"}: ${failures} failure(s) in ${checked} case(s)`);
process.exit(failures ? 1 : 0);
