"""Decode latency of onnxruntime-genai folders at batch 1, and their operator counts
(run by `cargo xtask bench --genai` with target/genaivenv's Python).

Usage: genai_latency.py [--prompt N] [--new N] [--rounds N] NAME=FOLDER...
Each round runs every folder in turn (interleaved): a prompt of N token ids (prefill), then
N new tokens greedily; a folder's decode latency is the median over rounds of the mean time
per generated token after the first. Prints one JSON object on stdout.
"""

import argparse
import collections
import json
import os
import statistics
import time

import numpy as np
import onnx
import onnxruntime_genai as og


def op_counts(folder):
    cfg = json.load(open(os.path.join(folder, "genai_config.json")))
    m = onnx.load(os.path.join(folder, cfg["model"]["decoder"]["filename"]), load_external_data=False)
    return dict(sorted(collections.Counter(n.op_type for n in m.graph.node).items()))


def decode(model, prompt, new):
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(prompt) + new)
    g = og.Generator(model, params)
    t0 = time.perf_counter()
    g.append_tokens(prompt)
    g.generate_next_token()
    t1 = time.perf_counter()
    steps = 0
    while not g.is_done():
        g.generate_next_token()
        steps += 1
    t2 = time.perf_counter()
    return t1 - t0, (t2 - t1) / max(steps, 1), steps


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("folders", nargs="+")
    a = ap.parse_args()
    named = [f.split("=", 1) for f in a.folders]
    models = {name: og.Model(folder) for name, folder in named}
    vocab = min(json.load(open(os.path.join(f, "genai_config.json")))["model"]["vocab_size"] for _, f in named)
    rng = np.random.default_rng(0)
    prompt = rng.integers(1000, min(vocab, 100000), size=a.prompt).astype(np.int32)
    for m in models.values():  # warm-up
        decode(m, prompt, 4)
    per = {name: [] for name in models}
    prefill = {name: [] for name in models}
    steps = {}
    for _ in range(a.rounds):
        for name, m in models.items():
            p, t, n = decode(m, prompt, a.new)
            per[name].append(t)
            prefill[name].append(p)
            steps[name] = n
    out = {
        name: {
            "ops": op_counts(folder),
            "decode_ms_per_token": 1000 * statistics.median(per[name]),
            "prefill_ms": 1000 * statistics.median(prefill[name]),
            "decode_steps": steps[name],
        }
        for name, folder in named
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
