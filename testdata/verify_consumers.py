"""Checks that optimum's ORTModelForCausalLM runs ferry's decoder exports with its own
generation loop (run by `cargo xtask verify` with target/optvenv's Python: optimum-onnx,
which pins transformers 4.x, and onnxruntime).

For each decoder golden case (a steps.safetensors with generate.* tensors) this exports
`text-generation-with-past` with ferry into OUT_DIR/<case>/model.onnx beside the case's
config.json and generation_config.json, loads the folder with
`ORTModelForCausalLM.from_pretrained(dir, use_cache=True)` and generates greedily from the
golden's left-padded batch; the new token ids must equal transformers' `generate`'s (made by
golden_decoders.py with transformers 5). Skipped, saying why: Phi-3 (its generate()
recomputes the cache where LongRoPE switches factors, which optimum's loop does not), and
cases whose cache optimum-onnx 0.1.0 sizes wrongly (an explicit head_dim outside gemma,
gemma2's grouped key/value heads): its own runtime, not the export, is what fails there.

Usage: verify_consumers.py FERRY_BINARY TESTDATA_DIR OUT_DIR
Prints one line per case and exits 1 on any failure or when nothing was checked.
"""

import json
import os
import shutil
import subprocess
import sys
import warnings

import torch
from safetensors.torch import load_file

from decoder_cases import finish, generate_cases

warnings.filterwarnings("ignore")


def optimum_cannot_size_cache(cfg):
    """Why optimum-onnx 0.1.0 would feed an empty cache of the wrong shape (its
    modeling_decoder.py: head size hidden_size / num_attention_heads except for gemma, and
    num_attention_heads key/value heads for model types outside its GQA list), or None."""
    heads = cfg["num_attention_heads"]
    kv = cfg.get("num_key_value_heads") or heads
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    if cfg["model_type"] != "gemma" and head_dim != cfg["hidden_size"] // heads:
        return (f"sizes the cache with hidden_size / num_attention_heads = "
                f"{cfg['hidden_size'] // heads}, not head_dim {head_dim}")
    gqa = {"gemma", "llama", "mistral", "qwen2", "qwen3"}
    if cfg["model_type"] not in gqa and kv != heads:
        return f"sizes {cfg['model_type']}'s cache with {heads} heads, not num_key_value_heads {kv}"
    return None


def main():
    ferry, testdata, out_dir = sys.argv[1:4]
    from optimum.onnxruntime import ORTModelForCausalLM

    failures, checked = 0, 0
    for case, src, st in generate_cases(testdata, load_file):
        if case.startswith("phi3"):
            print(f"skip {case}: generate() resets Phi-3's cache at the LongRoPE switch")
            continue
        why = optimum_cannot_size_cache(json.load(open(os.path.join(testdata, case, "config.json"))))
        if why:
            print(f"skip {case}: optimum-onnx 0.1.0's ORTModelForCausalLM {why}")
            continue
        d = os.path.join(out_dir, case)
        shutil.rmtree(d, ignore_errors=True)
        os.makedirs(d)
        for f in ("config.json", "generation_config.json"):
            if os.path.isfile(os.path.join(src, f)):
                shutil.copy(os.path.join(src, f), d)
        r = subprocess.run([ferry, "export", "--model", src, "--task", "text-generation-with-past",
                            os.path.join(d, "model.onnx")], capture_output=True, text=True)
        if r.returncode:
            print(f"FAIL {case}: export: {r.stderr.strip()}")
            failures += 1
            continue
        try:
            model = ORTModelForCausalLM.from_pretrained(d, use_cache=True, use_io_binding=False)
            ids, mask = st["generate.input_ids"], st["generate.attention_mask"]
            want = st["generate.output_ids"]
            with torch.no_grad():
                got = model.generate(input_ids=ids, attention_mask=mask,
                                     max_new_tokens=want.shape[1] - ids.shape[1],
                                     do_sample=False, pad_token_id=0)
            ok = got.shape == want.shape and torch.equal(got, want)
            checked += 1
            failures += not ok
            print(f"{'ok  ' if ok else 'FAIL'} {case}: ORTModelForCausalLM.generate "
                  f"{list(got.shape)} {'equals' if ok else 'differs from'} transformers' generate"
                  + ("" if ok else f"\n  got  {got.tolist()}\n  want {want.tolist()}"))
        except Exception as e:  # a load or run failure is a failure, with its reason
            failures += 1
            print(f"FAIL {case}: {type(e).__name__}: {e}")
    finish(failures, checked)


if __name__ == "__main__":
    main()
