"""ALBERT golden cases, one per task head (albert-tiny-<task>).

Run by make_golden.py (`--only golden_albert`). ALBERT factorizes its embeddings
(embedding_size != hidden_size, mapped by encoder.embedding_hidden_mapping_in) and shares
layers across depth: layer i runs group int(i / (num_hidden_layers / num_hidden_groups)),
each group holding inner_group_num layers. Some cases use several groups and/or inner
layers (3 layers over 2 groups: groups 0, 0, 1); the others the default single shared
group. Inputs include token_type_ids, as in optimum's ALBERT export; padding uses id 0
(ALBERT's pad_token_id).
"""

import os

import torch
from transformers import (
    AlbertConfig,
    AlbertForMaskedLM,
    AlbertForMultipleChoice,
    AlbertForQuestionAnswering,
    AlbertForSequenceClassification,
    AlbertForTokenClassification,
    AlbertModel,
)

CASES = [
    # (task, model class, output names, config overrides)
    ("feature-extraction", AlbertModel, ["last_hidden_state", "pooler_output"],
     dict(vocab_size=99, hidden_act="gelu", embedding_size=16, hidden_size=32, num_attention_heads=4,
          intermediate_size=37, num_hidden_layers=3, num_hidden_groups=2, inner_group_num=2,
          layer_norm_eps=1e-7, type_vocab_size=3)),
    ("fill-mask", AlbertForMaskedLM, ["logits"],
     dict(vocab_size=80, hidden_act="gelu_new", embedding_size=12, hidden_size=24, num_attention_heads=3,
          intermediate_size=41, num_hidden_layers=2, layer_norm_eps=1e-6)),
    ("text-classification", AlbertForSequenceClassification, ["logits"],
     dict(vocab_size=64, hidden_act="relu", embedding_size=8, hidden_size=20, num_attention_heads=5,
          intermediate_size=30, num_hidden_layers=3, num_labels=3,
          id2label={0: "negative", 1: "neutral", 2: "positive"},
          label2id={"negative": 0, "neutral": 1, "positive": 2})),
    ("token-classification", AlbertForTokenClassification, ["logits"],
     dict(vocab_size=70, hidden_act="gelu", embedding_size=10, hidden_size=16, num_attention_heads=2,
          intermediate_size=28, num_hidden_layers=4, num_hidden_groups=2, num_labels=5,
          layer_norm_eps=1e-5)),
    ("question-answering", AlbertForQuestionAnswering, ["start_logits", "end_logits"],
     dict(vocab_size=90, hidden_act="gelu_new", embedding_size=16, hidden_size=24, num_attention_heads=4,
          intermediate_size=33, num_hidden_layers=2)),
    ("multiple-choice", AlbertForMultipleChoice, ["logits"],
     dict(vocab_size=64, hidden_act="silu", embedding_size=8, hidden_size=16, num_attention_heads=4,
          intermediate_size=24, num_hidden_layers=2, inner_group_num=2)),
]


def make(root, g):
    for seed, (task, cls, names, extra) in enumerate(CASES, start=300):
        cfg = AlbertConfig(max_position_embeddings=40, initializer_range=0.2,
                           **{"type_vocab_size": 2, **extra})
        torch.manual_seed(seed)
        model = cls(cfg).eval()
        d = os.path.join(root, f"albert-tiny-{task}")
        g.fresh(d)
        model.save_pretrained(d)
        gen = torch.Generator().manual_seed(seed + 100)
        inputs = g.task_inputs(gen, cfg.vocab_size, cfg.type_vocab_size, task)
        with torch.no_grad():
            out = model(**inputs, return_dict=False)
        outputs = {n: out[i] for i, n in enumerate(names)}
        groups = f"{cfg.num_hidden_layers} layers, {cfg.num_hidden_groups} group(s) of " \
                 f"{cfg.inner_group_num}"
        g.save_golden(d, inputs, outputs, {
            "description": f"{cls.__name__}, {cfg.hidden_act}, embedding {cfg.embedding_size} "
                           f"-> hidden {cfg.hidden_size}, {groups}, safetensors",
            "weights": "model.safetensors",
        }, task=task)
