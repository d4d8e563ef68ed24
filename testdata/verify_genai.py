"""Checks that onnxruntime-genai runs the folders `ferry export --genai` writes (run by
`cargo xtask verify` with target/genaivenv's Python: onnxruntime-genai and onnxruntime).

For each decoder golden case (a steps.safetensors with generate.* tensors):
* fp32: `ferry export --genai OUT_DIR/<case>/fp32/model.onnx`, loaded with `og.Model`; each
  row of the golden's batch (its prompt without the left padding) is generated greedily with
  `og.Generator`; the new token ids must equal transformers' `generate` (made by
  golden_decoders.py), which pads a row with pad_token_id after it stops at eos, as
  onnxruntime-genai stops there.
* fp16: `ferry export --genai --dtype fp16`; teacher-forced top-1 agreement with the fp32
  folder >= FP16_TOP1 over all positions.
* int4: `ferry export --genai --quantize int4` (block 32, symmetric, accuracy level 4: the
  model builder's CPU defaults); teacher-forced along transformers' greedy sequence, the
  int4 model's top-1 next token must agree with the fp32 folder's at >= INT4_TOP1 of all
  positions and INT4_TOP1_CASE of each case's (figures below).

The tiny checkpoints ship no tokenizer files; onnxruntime-genai loads the model without
them and takes token ids (`append_tokens`).

Usage: verify_genai.py FERRY_BINARY TESTDATA_DIR OUT_DIR
Prints one line per case and check; exits 1 on any failure or when nothing was checked.
"""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import onnxruntime_genai as og
from safetensors.numpy import load_file

from decoder_cases import finish, generate_cases

# Smallest fraction of teacher-forced positions, over all cases and per case, whose top-1
# next token int4 keeps. Measured with ONNX Runtime 1.31.1 / onnxruntime-genai 0.18.0:
# 67.0 % over all (185/276), per case 40.6 % (mistral) to 96.9 % (gemma); these random tiny
# models' 96-way logits are nearly flat, and with hidden size 32 each block of 32 is a whole
# column. A wrong int4 layout agrees at chance (about 1 %).
INT4_TOP1 = 0.60
# The same for `--dtype fp16` folders: measured 99.6-100 % (275-276/276); float16 rounding flips
# a near-tie now and then.
FP16_TOP1 = 0.95
INT4_TOP1_CASE = 0.35


def export(ferry, src, folder, flags):
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(os.path.dirname(folder), exist_ok=True)
    r = subprocess.run([ferry, "export", "--model", src, "--genai", *flags,
                        os.path.join(folder, "model.onnx")], capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"ferry export --genai {' '.join(flags)}: {r.stderr.strip()}")
    return og.Model(folder)


def greedy(model, prompt, new_tokens):
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(prompt) + new_tokens)
    g = og.Generator(model, params)
    g.append_tokens(prompt.astype(np.int32))
    while not g.is_done():
        g.generate_next_token()
    return [int(t) for t in g.get_sequence(0)[len(prompt):]]


def teacher_forced_top1(model, prompt, continuation):
    """The model's argmax after the prompt and after each token of `continuation`
    (fed in turn, whatever the model predicted)."""
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(prompt) + len(continuation) + 1)
    g = og.Generator(model, params)
    tops = []
    feed = prompt
    for tok in continuation:
        g.append_tokens(np.asarray(feed, dtype=np.int32))
        logits = np.asarray(g.get_output("logits"))
        tops.append(int(logits.reshape(-1, logits.shape[-1])[-1].argmax()))
        feed = [tok]
    return tops


def agreement(model, rows, conts, reference):
    """How many of the teacher-forced top-1 tokens of `model` equal `reference`'s, and of
    how many."""
    a = n = 0
    for (prompt, _), cont, ref in zip(rows, conts, reference):
        tops = teacher_forced_top1(model, prompt, cont)
        a += sum(t == r for t, r in zip(tops, ref))
        n += len(ref)
    return a, n


def skip_reason(case, cfg, length):
    """Why onnxruntime-genai cannot reproduce this golden's greedy tokens, or None."""
    if cfg.get("model_type") == "phi3":
        return ("transformers' generate() recomputes Phi-3's cache where LongRoPE switches "
                "factors; onnxruntime-genai keeps the cache")
    if cfg.get("max_position_embeddings", length) < length:
        return (f"context_length {cfg['max_position_embeddings']} (max_position_embeddings) is "
                f"shorter than the golden's {length} tokens; onnxruntime-genai refuses longer "
                "sequences (the model builder's config has the same limit)")
    return None


def main():
    ferry, testdata, out_dir = sys.argv[1:4]
    failures, checked = 0, 0
    agree, total = 0, 0
    agree16, total16 = 0, 0
    for case, src, st in generate_cases(testdata, load_file):
        ids, mask, want = st["generate.input_ids"], st["generate.attention_mask"], st["generate.output_ids"]
        new = want.shape[1] - ids.shape[1]
        cfg = json.load(open(os.path.join(src, "config.json")))
        why = skip_reason(case, cfg, want.shape[1] + 1)
        if why:
            print(f"skip {case}: {why}")
            continue
        pad, eos = cfg.get("pad_token_id", 0), cfg.get("eos_token_id")
        rows = [(ids[b][mask[b] == 1], [int(t) for t in want[b][ids.shape[1]:]]) for b in range(ids.shape[0])]
        # transformers' continuation up to its eos (the padding after it is no model output).
        conts = [w[: w.index(eos) + 1] if eos in w else w for _, w in rows]
        try:
            fp32 = export(ferry, src, os.path.join(out_dir, case, "fp32"), [])
            got = [greedy(fp32, p, new) for p, _ in rows]
            # onnxruntime-genai stops at eos without returning it; transformers writes eos
            # and pads.
            norm = [g + [eos] if len(g) < new and (not g or g[-1] != eos) else g for g in got]
            ok = all(g + [pad] * (new - len(g)) == w for g, (_, w) in zip(norm, rows))
            # Each step's argmax along transformers' sequence (teacher-forced) too.
            fp32_tops = [teacher_forced_top1(fp32, p, c) for (p, _), c in zip(rows, conts)]
            ok_tf = fp32_tops == conts
            checked += 1
            failures += not (ok and ok_tf)
            print(f"{'ok  ' if ok and ok_tf else 'FAIL'} {case} fp32: og.Generator greedy {len(rows)}x{new} tokens "
                  f"{'equal' if ok else 'differ from'} transformers' generate; teacher-forced argmax "
                  f"{'equal' if ok_tf else 'differ'}"
                  + ("" if ok else f"\n  got  {got}\n  want {[w for _, w in rows]}"))
            f16 = export(ferry, src, os.path.join(out_dir, case, "fp16"), ["--dtype", "fp16"])
            a, n = agreement(f16, rows, conts, fp32_tops)
            agree16, total16 = agree16 + a, total16 + n
            print(f"     {case} fp16 (--dtype fp16): top-1 next token agrees with fp32 at {a}/{n} "
                  "teacher-forced positions")
            q4 = export(ferry, src, os.path.join(out_dir, case, "int4"), ["--quantize", "int4"])
            a, n = agreement(q4, rows, conts, fp32_tops)
            agree, total = agree + a, total + n
            ok = a / n >= INT4_TOP1_CASE
            failures += not ok
            print(f"{'ok  ' if ok else 'FAIL'} {case} int4: top-1 next token agrees with fp32 at {a}/{n} "
                  f"teacher-forced positions ({a / n:.1%}, bound {INT4_TOP1_CASE:.0%})")
        except Exception as e:  # a load or run failure is a failure, with its reason
            failures += 1
            print(f"FAIL {case}: {type(e).__name__}: {e}")
    if total16:
        ok = agree16 / total16 >= FP16_TOP1
        failures += not ok
        print(f"{'ok  ' if ok else 'FAIL'} fp16 over all cases: top-1 agreement with fp32 {agree16}/{total16} "
              f"({agree16 / total16:.1%}, bound {FP16_TOP1:.0%})")
    if total:
        ok = agree / total >= INT4_TOP1
        failures += not ok
        print(f"{'ok  ' if ok else 'FAIL'} int4 over all cases: top-1 agreement with fp32 {agree}/{total} "
              f"({agree / total:.1%}, bound {INT4_TOP1:.0%})")
    finish(failures, checked)


if __name__ == "__main__":
    main()
