"""ELECTRA golden cases: one tiny seeded checkpoint per task transformers implements.

Run by make_golden.py (`--only golden_electra`). ELECTRA takes token_type_ids like BERT.
Several cases use an embedding_size different from hidden_size (so ElectraModel has its
`embeddings_project` linear, and the fill-mask generator head projects back to
embedding_size before the tied decoder).
"""

import os

import torch
from transformers import (
    ElectraConfig,
    ElectraForMaskedLM,
    ElectraForMultipleChoice,
    ElectraForQuestionAnswering,
    ElectraForSequenceClassification,
    ElectraForTokenClassification,
    ElectraModel,
)

CASES = {
    # task: (class, output names, config overrides)
    "feature-extraction": (ElectraModel, ["last_hidden_state"], dict(
        hidden_act="gelu", embedding_size=16, hidden_size=32, num_attention_heads=4,
        intermediate_size=37, vocab_size=99, layer_norm_eps=1e-7, type_vocab_size=3)),
    "fill-mask": (ElectraForMaskedLM, ["logits"], dict(
        hidden_act="gelu_new", embedding_size=24, hidden_size=16, num_attention_heads=2,
        intermediate_size=29, vocab_size=80, layer_norm_eps=1e-6)),
    "text-classification": (ElectraForSequenceClassification, ["logits"], dict(
        hidden_act="relu", embedding_size=20, hidden_size=20, num_attention_heads=5,
        intermediate_size=30, vocab_size=64, num_labels=3,
        id2label={0: "negative", 1: "neutral", 2: "positive"},
        label2id={"negative": 0, "neutral": 1, "positive": 2})),
    "token-classification": (ElectraForTokenClassification, ["logits"], dict(
        hidden_act="gelu", embedding_size=12, hidden_size=16, num_attention_heads=2,
        intermediate_size=28, vocab_size=70, num_labels=5)),
    "question-answering": (ElectraForQuestionAnswering, ["start_logits", "end_logits"], dict(
        hidden_act="gelu", embedding_size=24, hidden_size=24, num_attention_heads=4,
        intermediate_size=33, vocab_size=90, layer_norm_eps=1e-5)),
    "multiple-choice": (ElectraForMultipleChoice, ["logits"], dict(
        hidden_act="gelu_new", embedding_size=8, hidden_size=16, num_attention_heads=4,
        intermediate_size=24, vocab_size=64)),
}


def make(root, g):
    for seed, (task, (cls, names, extra)) in enumerate(CASES.items(), start=110):
        extra = dict(extra)
        extra.setdefault("type_vocab_size", 2)
        cfg = ElectraConfig(num_hidden_layers=2, initializer_range=0.2,
                            max_position_embeddings=24, **extra)
        torch.manual_seed(seed)
        model = cls(cfg).eval()
        d = os.path.join(root, f"electra-tiny-{task}")
        g.fresh(d)
        model.save_pretrained(d)
        gen = torch.Generator().manual_seed(seed + 100)
        inputs = g.task_inputs(gen, cfg.vocab_size, cfg.type_vocab_size, task)
        with torch.no_grad():
            out = model(**inputs, return_dict=False)
        outputs = {n: out[i] for i, n in enumerate(names)}
        desc = f"{cls.__name__}, {extra['hidden_act']}, embedding_size {cfg.embedding_size}"
        g.save_golden(d, inputs, outputs, {
            "description": desc + ", hidden_size " + str(cfg.hidden_size) + ", safetensors",
            "weights": "model.safetensors",
        }, task=task)
