"""DistilBERT golden cases: one tiny seeded checkpoint per task transformers implements.

Run by make_golden.py (`--only golden_distilbert`). DistilBERT has no token_type_ids, so
the saved inputs are input_ids and attention_mask only. Each case differs from the
library defaults and from the others (activation, sizes, sinusoidal position table).
"""

import os

import torch
from transformers import (
    DistilBertConfig,
    DistilBertForMaskedLM,
    DistilBertForMultipleChoice,
    DistilBertForQuestionAnswering,
    DistilBertForSequenceClassification,
    DistilBertForTokenClassification,
    DistilBertModel,
)

CASES = {
    # task: (class, output names, config overrides)
    "feature-extraction": (DistilBertModel, ["last_hidden_state"], dict(
        activation="gelu", dim=32, n_heads=4, hidden_dim=37, vocab_size=99,
        max_position_embeddings=40, sinusoidal_pos_embds=True)),
    "fill-mask": (DistilBertForMaskedLM, ["logits"], dict(
        activation="relu", dim=24, n_heads=3, hidden_dim=41, vocab_size=80)),
    "text-classification": (DistilBertForSequenceClassification, ["logits"], dict(
        activation="gelu", dim=20, n_heads=5, hidden_dim=30, vocab_size=64, num_labels=3,
        id2label={0: "negative", 1: "neutral", 2: "positive"},
        label2id={"negative": 0, "neutral": 1, "positive": 2})),
    "token-classification": (DistilBertForTokenClassification, ["logits"], dict(
        activation="relu", dim=16, n_heads=2, hidden_dim=28, vocab_size=70, num_labels=5)),
    "question-answering": (DistilBertForQuestionAnswering, ["start_logits", "end_logits"], dict(
        activation="gelu_new", dim=24, n_heads=4, hidden_dim=33, vocab_size=90)),
    "multiple-choice": (DistilBertForMultipleChoice, ["logits"], dict(
        activation="gelu", dim=16, n_heads=4, hidden_dim=24, vocab_size=64)),
}


def make(root, g):
    for seed, (task, (cls, names, extra)) in enumerate(CASES.items(), start=70):
        extra = dict(extra)
        extra.setdefault("max_position_embeddings", 24)
        cfg = DistilBertConfig(n_layers=2, initializer_range=0.2, **extra)
        torch.manual_seed(seed)
        model = cls(cfg).eval()
        d = os.path.join(root, f"distilbert-tiny-{task}")
        g.fresh(d)
        model.save_pretrained(d)
        gen = torch.Generator().manual_seed(seed + 100)
        if task == "multiple-choice":
            flat = g.padded_inputs(gen, cfg.vocab_size, 1, batch=6, seq=9,
                                   lengths=(9, 7, 4, 9, 2, 5))
            inputs = {k: flat[k].view(2, 3, 9) for k in ("input_ids", "attention_mask")}
        else:
            flat = g.padded_inputs(gen, cfg.vocab_size, 1)
            inputs = {k: flat[k] for k in ("input_ids", "attention_mask")}
        with torch.no_grad():
            out = model(**inputs, return_dict=False)
        outputs = {n: out[i] for i, n in enumerate(names)}
        desc = f"{cls.__name__}, {extra['activation']}"
        if extra.get("sinusoidal_pos_embds"):
            desc += ", sinusoidal position table"
        g.save_golden(d, inputs, outputs, {
            "description": desc + ", safetensors", "weights": "model.safetensors",
        }, task=task)
