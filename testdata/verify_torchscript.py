"""Checks ferry's TorchScript archives with torch itself (run by `cargo xtask verify --torch`).

For each golden checkpoint under testdata/ this:
  1. exports a fixed-shape archive at the golden's batch x sequence and checks that
     torch.jit.load loads it and `loaded(*inputs)` matches transformers' golden outputs;
  2. checks that the fixed-shape archive rejects inputs of another sequence length;
  3. exports a --dynamic-axes archive and compares it with transformers (the case's task
     class loaded from the same checkpoint) at two other batch sizes and sequence lengths;
  4. checks that the archive's module tree is transformers' own: `state_dict()` keys equal
     the reference model's, weights tied in transformers share one storage in the archive,
     `load_state_dict(reference.state_dict())` into an archive whose weights were zeroed
     brings its outputs back to transformers', and `named_modules()` walks the submodules;
  5. calls the dynamic archive as the seed's snippet does, positionally with one tensor
     (input_ids) and two (input_ids, attention_mask), against transformers with the same
     arguments (transformers' defaults for the rest);
  6. for fill-mask, checks that a --torchscript archive holds separate, equal tensors for
     every pair of names transformers ties (the word embeddings and the decoder).

Usage: verify_torchscript.py FERRY_BINARY TESTDATA_DIR OUT_DIR
Prints one line per check and exits 1 on any failure: a mismatch, a failed export or load
(one FAIL line with the error), or no case checked at all.
"""

import inspect
import json
import os
import subprocess
import sys
import warnings

import torch
import transformers
from safetensors.torch import load_file
from transformers import AutoModel

warnings.filterwarnings("ignore")
ATOL = 1e-5
# Decoder LLMs and encoder-decoders ferry exports to ONNX only (it refuses --format
# torchscript for them, as tests/cli/decoders.rs checks): their cases are skipped, saying so.
# Any other model type must export; with_past reads GPT-2's config keys (n_head, n_embd,
# n_layer).
ONNX_ONLY = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "gemma2",
             "t5", "mt5", "bart", "mbart", "marian")
# References computed with eager attention, as the goldens are: ModernBERT's sliding-window
# padding queries whose whole window is padding get uniform weights in eager attention
# (what ferry exports) and other values in sdpa; real tokens agree either way.
EAGER = ("modernbert",)
# Tied names ferry cannot see yet (its archive names a weight where the graph's node that
# reads it was traced): DeBERTa-v2's non-legacy head reads the word embeddings and its bias
# inside a `decoder` scope transformers does not have; its untied legacy head reads
# `cls.predictions.decoder.bias`, which transformers also holds as `cls.predictions.bias`.
# case -> (missing keys, extra keys) expected; load_state_dict there loads the keys both
# sides have.
KNOWN_KEY_GAPS = {
    "deberta-v2-tiny-fill-mask-lmhead": (
        [], ["lm_predictions.lm_head.decoder.bias", "lm_predictions.lm_head.decoder.weight"]),
    "deberta-v2-tiny-fill-mask-untied": (["cls.predictions.bias"], []),
}


def model_type(model_dir):
    return json.load(open(os.path.join(model_dir, "config.json"))).get("model_type")


def export(ferry, model, out, *flags):
    """Runs `ferry export --format torchscript`; raises RuntimeError with ferry's stderr."""
    cmd = [ferry, "export", "--format", "torchscript", "--model", model, *flags, out]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"`{' '.join(cmd[1:])}` exited {done.returncode}: "
                           + (done.stderr.strip() or done.stdout.strip()))


def error_line(e):
    """One line naming an exception, for a FAIL line."""
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:400]}"


def inputs_for(batch, seq, vocab, types, seed, choices=None):
    rows = batch * (choices or 1)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (rows, seq), generator=g)
    mask = torch.ones((rows, seq), dtype=torch.int64)
    for r in range(1, rows):
        mask[r, max(1, seq - 2 * r):] = 0
    ids = ids * mask
    tt = torch.randint(0, types, (rows, seq), generator=g) * mask
    if choices:
        return tuple(x.view(batch, choices, seq) for x in (ids, mask, tt))
    return ids, mask, tt


def reference_model(model_dir, cfg, task):
    # .float(): half-precision checkpoints are exported as float32 (`--dtype fp32`), so
    # the reference computes in float32 from the same weights.
    kwargs = {"attn_implementation": "eager"} if cfg.get("model_type") in EAGER else {}
    if task == "feature-extraction":
        return AutoModel.from_pretrained(model_dir, **kwargs).float().eval()
    cls = getattr(transformers, cfg["architectures"][0])
    return cls.from_pretrained(model_dir, **kwargs).float().eval()


def sentence_embedding(model_dir, features):
    """sentence-transformers' own `sentence_embedding` for a checkpoint with modules.json."""
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(model_dir, device="cpu").eval()
    return st(dict(features))["sentence_embedding"]


class Tally:
    """Counts checks and failures, printing one line per check."""

    def __init__(self):
        self.checks = 0
        self.failures = 0

    def check(self, ok, line):
        self.checks += 1
        self.failures += not ok
        print(f"{'ok  ' if ok else 'FAIL'} {line}", flush=True)

    def fail(self, line):
        self.check(False, line)


def main():
    ferry, testdata, out_dir = sys.argv[1:4]
    os.makedirs(out_dir, exist_ok=True)
    tally = Tally()
    cases = sorted(d for d in os.listdir(testdata)
                   if os.path.isfile(os.path.join(testdata, d, "golden.safetensors"))
                   and os.path.isfile(os.path.join(testdata, d, "config.json")))
    for case in cases:
        if model_type(os.path.join(testdata, case)) in ONNX_ONLY:
            print(f"skip {case}: {model_type(os.path.join(testdata, case))} exports to ONNX only")
            continue
        # An export, load or reference failure is one FAIL line; the case's remaining
        # checks are not run.
        try:
            check_case(ferry, testdata, out_dir, case, tally)
        except Exception as e:
            tally.fail(f"{case}: {error_line(e)}")
    with_past(ferry, testdata, out_dir, tally)
    for stale in sorted(set(KNOWN_KEY_GAPS) - set(cases)):
        tally.fail(f"KNOWN_KEY_GAPS names {stale}, which is no golden case")
    if tally.checks == 0:
        tally.fail(f"no case checked under {testdata}")
    print(f"{'FAILED' if tally.failures else 'passed'}: {tally.failures} failure(s) "
          f"in {tally.checks} check(s) of {len(cases)} golden case(s)")
    sys.exit(1 if tally.failures else 0)


def check_case(ferry, testdata, out_dir, case, tally):
    """The fixed, dynamic and (fill-mask) untied archives of one golden case."""
    model_dir = os.path.join(testdata, case)
    golden = load_file(os.path.join(model_dir, "golden.safetensors"))
    meta = json.load(open(os.path.join(model_dir, "case.json")))
    task, names = meta["task"], meta["outputs"]
    # The model's inputs, in graph order (token_type_ids only where the model has them).
    in_names = [n for n in ("input_ids", "attention_mask", "token_type_ids", "position_ids")
                if f"input.{n}" in golden]
    xs = [golden[f"input.{n}"] for n in in_names]
    ids = xs[0]
    batch, seq = ids.shape[0], ids.shape[-1]
    choices = ids.shape[1] if ids.dim() == 3 else None

    fixed = os.path.join(out_dir, f"{case}-fixed.pt")
    export(ferry, model_dir, fixed, "--task", task, "--batch-size", str(batch),
           "--sequence-length", str(seq))
    loaded = torch.jit.load(fixed)
    with torch.no_grad():
        out = loaded(*xs)
    diffs = [float((out[i] - golden[f"output.{n}"]).abs().max()) for i, n in enumerate(names)]
    tally.check(max(diffs) <= ATOL, f"{case} fixed {batch}x{seq}: "
                + ", ".join(f"{n} {d:.2e}" for n, d in zip(names, diffs)))

    try:
        with torch.no_grad():
            loaded(*(x[..., : seq - 3] for x in xs))
        tally.fail(f"{case} fixed archive accepted another sequence length")
    except Exception as e:  # torch raises a RuntimeError from the reshape
        tally.check(True, f"{case} fixed archive rejects sequence length {seq - 3}: "
                    f"{type(e).__name__}")

    if not any(os.path.isfile(os.path.join(model_dir, f))
               for f in ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json")):
        # TF-only fixtures: transformers 5 cannot load tf_model.h5, so the size-generic
        # archive has no PyTorch reference here (the fixed one was checked above).
        print(f"skip {case} dynamic archive: no PyTorch weights for a reference model")
        return
    dyn = os.path.join(out_dir, f"{case}-dynamic.pt")
    export(ferry, model_dir, dyn, "--task", task, "--dynamic-axes")
    loaded = torch.jit.load(dyn)
    cfg = json.load(open(os.path.join(model_dir, "config.json")))
    ref = reference_model(model_dir, cfg, task)
    for b, s in ((1, 5), (4, 17)):
        ids_, mask_, tt_ = inputs_for(b, s, cfg["vocab_size"], max(cfg.get("type_vocab_size", 2), 1),
                                      100 + s, choices=choices and choices + 1)
        pos_ = torch.arange(s).expand(ids_.shape).contiguous()
        by_name = {"input_ids": ids_, "attention_mask": mask_, "token_type_ids": tt_,
                   "position_ids": pos_}
        x = [by_name[n] for n in in_names]
        with torch.no_grad():
            ref_out = ref(**dict(zip(in_names, x)), return_dict=False, use_cache=False)
            want = ref_out
            if "sentence_embedding" in names:
                want = tuple(want) + (sentence_embedding(model_dir, dict(zip(in_names, x))),)
            got = loaded(*x)
        diffs = [float((got[i] - want[i]).abs().max()) for i in range(len(names))]
        tally.check(max(diffs) <= ATOL, f"{case} dynamic {b}x{s}: "
                    + ", ".join(f"{n} {d:.2e}" for n, d in zip(names, diffs)))
    tree_checks(case, loaded, ref, ref_out, x, names, tally)
    if "sentence_embedding" not in names:
        seed_calls(case, loaded, ref, in_names, x, names, tally)
    if task == "fill-mask":
        untied = os.path.join(out_dir, f"{case}-untied.pt")
        export(ferry, model_dir, untied, "--task", task, "--dynamic-axes", "--torchscript")
        sd = torch.jit.load(untied).state_dict()
        pairs = tied_pairs(ref.state_dict())
        keys_ok = key_gap(sd, ref.state_dict(), names) == KNOWN_KEY_GAPS.get(case, ([], []))
        if not pairs:
            # An untied checkpoint's decoder has its own weight: nothing to copy.
            tally.check(not tied_pairs(sd) and keys_ok,
                        f"{case} --torchscript: untied checkpoint, no shared or copied tensor")
            return
        ok = all(a in sd and b in sd and torch.equal(sd[a], sd[b])
                 and sd[a].data_ptr() != sd[b].data_ptr() for a, b in pairs)
        tally.check(ok and keys_ok,
                    f"{case} --torchscript: separate equal tensors for "
                    + ", ".join(f"{a} / {b}" for a, b in pairs))


def model_type_of(ref):
    return ref.config.model_type


def tied_pairs(state_dict):
    """Pairs of keys whose tensors share storage (tied weights), sorted."""
    by_ptr = {}
    for k, v in state_dict.items():
        by_ptr.setdefault((v.data_ptr(), tuple(v.shape)), []).append(k)
    return sorted((ks[0], k) for ks in map(sorted, by_ptr.values()) for k in ks[1:])


def key_gap(ours, theirs, names):
    """(keys only transformers has, keys only the archive has), sorted; sentence-transformers'
    Dense weights are no part of the transformers model."""
    missing = sorted(set(theirs) - set(ours))
    extra = sorted(k for k in set(ours) - set(theirs)
                   if "sentence_embedding" not in names or "_Dense." not in k)
    return missing, extra


def tree_checks(case, loaded, ref, ref_out, x, names, tally):
    """state_dict keys, tied storage, load_state_dict and named_modules against transformers
    (`ref_out`: transformers' outputs on `x`)."""
    ours, theirs = loaded.state_dict(), ref.state_dict()
    # A known gap is still a failure if it changes or closes, so its entry cannot go stale.
    gap = key_gap(ours, theirs, names)
    want = KNOWN_KEY_GAPS.get(case, ([], []))
    tally.check(gap == want,
                f"{case} state_dict keys equal transformers' ({len(theirs)})"
                + (f" but the known gap {want}" if case in KNOWN_KEY_GAPS else "")
                + (f": missing {gap[0][:4]}, extra {gap[1][:4]}" if gap != want else ""))
    # A known gap's keys are loaded where both sides have them.
    strict = "sentence_embedding" not in names and case not in KNOWN_KEY_GAPS
    common = set(ours) & set(theirs)  # all keys, but for a known gap
    shared = [p for p in tied_pairs(ours) if set(p) <= common]
    tally.check(shared == [p for p in tied_pairs(theirs) if set(p) <= common],
                f"{case} tied storage as transformers': {shared or 'none'}")
    modules = dict(loaded.named_modules())
    expected = {n for n, _ in ref.named_modules()
                if n and any(k.startswith(n + ".") for k in theirs)}
    tally.check(expected <= set(modules),
                f"{case} named_modules() has transformers' {len(expected)} weight-holding "
                f"submodules" + (f", missing {sorted(expected - set(modules))[:4]}"
                                 if not expected <= set(modules) else ""))
    with torch.no_grad():
        for v in loaded.state_dict().values():
            v.zero_()
        loaded.load_state_dict({k: v for k, v in theirs.items() if strict or k in ours},
                               strict=strict)
        got = loaded(*x)
    d = max(float((got[i] - ref_out[i]).abs().max())
            for i in range(min(len(names), len(ref_out))))
    tally.check(d <= ATOL, f"{case} zeroed archive + load_state_dict(transformers' "
                f"state_dict()) matches transformers: {d:.2e}")


def seed_calls(case, loaded, ref, in_names, x, names, tally):
    """The seed's positional calls: `loaded(input_ids)` and `loaded(input_ids,
    attention_mask)` against transformers called the same way (GPT-2's second positional
    argument is its cache, so it gets the one-tensor call only)."""
    extra = {}
    if x[0].dim() == 3 and getattr(ref.config, "type_vocab_size", None):
        # transformers' own default (its token_type_ids buffer) fails on multiple-choice
        # shapes; zeros are that default.
        extra["token_type_ids"] = torch.zeros_like(x[0])
    # RoBERTa's multiple-choice classes take token_type_ids second; ferry's archive keeps
    # input_ids, attention_mask, token_type_ids (every other class's order), so those are
    # compared with transformers called by keyword.
    order = list(inspect.signature(type(ref).forward).parameters)[1:]
    for n in (1,) if model_type_of(ref) == "gpt2" else (1, 2):
        positional = order[:n] == in_names[:n]
        with torch.no_grad():
            got = loaded(*x[:n])
            if positional:
                want = ref(*x[:n], return_dict=False, use_cache=False, **extra)
            else:
                want = ref(**dict(zip(in_names[:n], x[:n])), return_dict=False,
                           use_cache=False, **extra)
        d = max(float((got[i] - want[i]).abs().max()) for i in range(len(names)))
        how = "" if positional else f" (by keyword: transformers' order is {order[:n]})"
        tally.check(d <= ATOL, f"{case} {n}-tensor call matches transformers{how}: {d:.2e}")


def with_past(ferry, testdata, out_dir, tally):
    """Decoder cases with a steps golden: a --dynamic-axes with-past archive, fed its own
    present.* back as past_key_values.*, matches transformers' logits at every step. Steps
    goldens of ONNX-only decoders are skipped, saying so; none checked is a failure."""
    found = 0
    for case in sorted(os.listdir(testdata)):
        steps_file = os.path.join(testdata, case, "steps.safetensors")
        if not os.path.isfile(steps_file):
            continue
        model_dir = os.path.join(testdata, case)
        if model_type(model_dir) in ONNX_ONLY:
            print(f"skip {case} with past: {model_type(model_dir)} exports to ONNX only")
            continue
        found += 1
        try:
            cfg = json.load(open(os.path.join(model_dir, "config.json")))
            steps = load_file(steps_file)
            path = os.path.join(out_dir, f"{case}-with-past.pt")
            export(ferry, model_dir, path, "--task", "text-generation-with-past", "--dynamic-axes")
            loaded = torch.jit.load(path)
            heads, hd = cfg["n_head"], cfg["n_embd"] // cfg["n_head"]
            past = [torch.zeros(2, heads, 0, hd) for _ in range(2 * cfg["n_layer"])]
            n = json.load(open(os.path.join(model_dir, "case.json")))["steps"]
            if n < 1:
                tally.fail(f"{case} with past: case.json has no steps")
            for k in range(n):
                xs = [steps[f"step{k}.input.{i}"]
                      for i in ("input_ids", "attention_mask", "position_ids")]
                with torch.no_grad():
                    out = loaded(*xs, *past)
                d = float((out[0] - steps[f"step{k}.output.logits"]).abs().max())
                tally.check(d <= ATOL, f"{case} with past, step {k}: logits {d:.2e}")
                past = list(out[1:])
        except Exception as e:
            tally.fail(f"{case} with past: {error_line(e)}")
    if found == 0:
        tally.fail(f"with past: no TorchScript decoder's steps.safetensors under {testdata}")


if __name__ == "__main__":
    main()
