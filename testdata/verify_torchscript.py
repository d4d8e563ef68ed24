"""Checks ferry's TorchScript archives with torch itself (run by `cargo xtask verify --torch`).

For each golden checkpoint under testdata/ this:
  1. exports a fixed-shape archive at the golden's batch x sequence and checks that
     torch.jit.load loads it and `loaded(*inputs)` matches transformers' golden outputs;
  2. checks that the fixed-shape archive rejects inputs of another sequence length;
  3. exports a --dynamic-axes archive and compares it with transformers (BertModel loaded
     from the same checkpoint) at two other batch sizes and sequence lengths.

Usage: verify_torchscript.py FERRY_BINARY TESTDATA_DIR OUT_DIR
Prints one line per check and exits non-zero on any failure.
"""

import json
import os
import subprocess
import sys
import warnings

import torch
from safetensors.torch import load_file
from transformers import AutoModel

warnings.filterwarnings("ignore")
ATOL = 1e-5


def export(ferry, model, out, *flags):
    subprocess.run([ferry, "export", "--format", "torchscript", "--model", model, *flags, out],
                   check=True, capture_output=True)


def inputs_for(batch, seq, vocab, types, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (batch, seq), generator=g)
    mask = torch.ones((batch, seq), dtype=torch.int64)
    for r in range(1, batch):
        mask[r, max(1, seq - 2 * r):] = 0
    ids = ids * mask
    tt = torch.randint(0, types, (batch, seq), generator=g) * mask
    return ids, mask, tt


def main():
    ferry, testdata, out_dir = sys.argv[1:4]
    os.makedirs(out_dir, exist_ok=True)
    failures = 0
    cases = sorted(d for d in os.listdir(testdata)
                   if os.path.isfile(os.path.join(testdata, d, "golden.safetensors"))
                   and os.path.isfile(os.path.join(testdata, d, "config.json")))
    for case in cases:
        model_dir = os.path.join(testdata, case)
        golden = load_file(os.path.join(model_dir, "golden.safetensors"))
        names = sorted(k[len("output."):] for k in golden if k.startswith("output."))
        order = ["last_hidden_state", "pooler_output"]
        names = [n for n in order if n in names]
        ids, mask, tt = (golden["input.input_ids"], golden["input.attention_mask"],
                         golden["input.token_type_ids"])
        batch, seq = ids.shape

        fixed = os.path.join(out_dir, f"{case}-fixed.pt")
        export(ferry, model_dir, fixed, "--batch-size", str(batch), "--sequence-length", str(seq))
        loaded = torch.jit.load(fixed)
        with torch.no_grad():
            out = loaded(ids, mask, tt)
        diffs = [float((out[i] - golden[f"output.{n}"]).abs().max()) for i, n in enumerate(names)]
        ok = max(diffs) <= ATOL
        failures += not ok
        print(f"{'ok  ' if ok else 'FAIL'} {case} fixed {batch}x{seq}: "
              + ", ".join(f"{n} {d:.2e}" for n, d in zip(names, diffs)))

        try:
            with torch.no_grad():
                loaded(ids[:, : seq - 3], mask[:, : seq - 3], tt[:, : seq - 3])
            print(f"FAIL {case} fixed archive accepted another sequence length")
            failures += 1
        except Exception as e:  # torch raises a RuntimeError from the reshape
            print(f"ok   {case} fixed archive rejects sequence length {seq - 3}: "
                  f"{type(e).__name__}")

        dyn = os.path.join(out_dir, f"{case}-dynamic.pt")
        export(ferry, model_dir, dyn, "--dynamic-axes")
        loaded = torch.jit.load(dyn)
        cfg = json.load(open(os.path.join(model_dir, "config.json")))
        ref = AutoModel.from_pretrained(model_dir).eval()
        for b, s in ((1, 5), (4, 17)):
            x = inputs_for(b, s, cfg["vocab_size"], cfg.get("type_vocab_size", 2), 100 + s)
            with torch.no_grad():
                want = ref(*x, return_dict=False)
                got = loaded(*x)
            diffs = [float((got[i] - want[i]).abs().max()) for i in range(len(names))]
            ok = max(diffs) <= ATOL
            failures += not ok
            print(f"{'ok  ' if ok else 'FAIL'} {case} dynamic {b}x{s}: "
                  + ", ".join(f"{n} {d:.2e}" for n, d in zip(names, diffs)))
    print(f"{'FAILED' if failures else 'passed'}: {failures} failure(s)")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
