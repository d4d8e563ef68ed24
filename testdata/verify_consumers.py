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

For each encoder-decoder golden case (case.json `"kind": "seq2seq"`) it exports
`text2text-generation-with-past` into OUT_DIR/<case>/ (optimum's folder), loads it with
`ORTModelForSeq2SeqLM.from_pretrained(dir, use_cache=True)` — once with the merged decoder
and once with the separate decoder files — and generates greedily and with 4 beams from the
golden's right-padded batch under the case's generation_config.json; the token ids must equal
transformers' `generate`'s (golden_seq2seq.py, transformers 5). Skipped, saying why: configs
transformers 4.x (which optimum-onnx pins) cannot load, the merged decoder where optimum
sizes T5's empty first-step cache by d_model / num_heads instead of d_kv, and beam search
where transformers 4.x reshapes scores by vocab_size instead of Marian's decoder_vocab_size.

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


def optimum_cannot_size_merged_cache(cfg):
    """Why optimum-onnx 0.1.0 would feed the merged decoder's first step an empty cache of the
    wrong head size (it sizes it d_model / num_heads, where T5's heads are d_kv wide), or None."""
    d_kv, d_model, heads = cfg.get("d_kv"), cfg.get("d_model"), cfg.get("num_heads")
    if d_kv and heads and d_kv != d_model // heads:
        return f"sizes the empty cache d_model / num_heads = {d_model // heads}, not d_kv {d_kv}"
    return None


def seq2seq_cases(testdata):
    """(case, directory) of every encoder-decoder golden case, in name order."""
    for case in sorted(os.listdir(testdata)):
        meta = os.path.join(testdata, case, "case.json")
        if os.path.isfile(meta) and json.load(open(meta)).get("kind") == "seq2seq":
            yield case, os.path.join(testdata, case)


def check_seq2seq(ferry, testdata, out_dir):
    """ORTModelForSeq2SeqLM on ferry's folders; returns (failures, checked)."""
    from optimum.onnxruntime import ORTModelForSeq2SeqLM
    from transformers import AutoConfig

    failures, checked = 0, 0
    os.makedirs(out_dir, exist_ok=True)
    for case, src in seq2seq_cases(testdata):
        try:
            AutoConfig.from_pretrained(src)
        except Exception as e:
            print(f"skip {case}: transformers 4.x cannot read its config ({type(e).__name__})")
            continue
        d = os.path.join(out_dir, case)
        shutil.rmtree(d, ignore_errors=True)
        r = subprocess.run([ferry, "export", "--model", src, "--task",
                            "text2text-generation-with-past", d], capture_output=True, text=True)
        if r.returncode:
            print(f"FAIL {case}: export: {r.stderr.strip()}")
            failures += 1
            continue
        st = load_file(os.path.join(src, "steps.safetensors"))
        ids, mask = st["generate.input_ids"], st["generate.attention_mask"]
        cfg = json.load(open(os.path.join(src, "config.json")))
        for merged in (True, False):
            if merged and optimum_cannot_size_merged_cache(cfg):
                print(f"skip {case} (merged decoder): optimum-onnx 0.1.0's ORTModelForSeq2SeqLM "
                      + optimum_cannot_size_merged_cache(cfg))
                continue
            try:
                model = ORTModelForSeq2SeqLM.from_pretrained(d, use_cache=True, use_merged=merged,
                                                             use_io_binding=False)
                for name, beams in (("greedy", 1), ("beam4", 4)):
                    dv = cfg.get("decoder_vocab_size")
                    if beams > 1 and dv and dv != cfg["vocab_size"]:
                        print(f"skip {case} {name}: transformers 4.x's beam search reshapes the "
                              f"scores by vocab_size {cfg['vocab_size']}, not the logits' "
                              f"decoder_vocab_size {dv}")
                        continue
                    want = st[f"generate.{name}_ids"]
                    with torch.no_grad():
                        got = model.generate(input_ids=ids, attention_mask=mask, num_beams=beams,
                                             max_new_tokens=16, do_sample=False)
                    ok = got.shape == want.shape and torch.equal(got, want)
                    checked += 1
                    failures += not ok
                    print(f"{'ok  ' if ok else 'FAIL'} {case}: ORTModelForSeq2SeqLM "
                          f"({'merged' if merged else 'separate'} decoder) {name} "
                          f"{list(got.shape)} {'equals' if ok else 'differs from'} transformers' "
                          "generate" + ("" if ok else f"\n  got  {got.tolist()}\n  want {want.tolist()}"))
            except Exception as e:  # a load or run failure is a failure, with its reason
                failures += 1
                print(f"FAIL {case}: {type(e).__name__}: {e}")
    if checked == 0:
        print("FAIL: no encoder-decoder case was checked")
        failures += 1
    return failures, checked


def main():
    ferry, testdata, out_dir = sys.argv[1:4]
    from optimum.onnxruntime import ORTModelForCausalLM

    failures, checked = check_seq2seq(ferry, testdata, out_dir)
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
