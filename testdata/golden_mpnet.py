"""MPNet golden cases, one per task head (mpnet-tiny-<task>).

Run by make_golden.py (`--only golden_mpnet`). MPNet has no token_type_ids input in
optimum's export, so the saved inputs are input_ids and attention_mask only. Position ids
come from input_ids as in RoBERTa with padding index 1 (MPNetEmbeddings fixes it at 1; the
configs keep the default pad_token_id 1), so padded positions hold 1, not 0, and real
tokens avoid it. Every layer adds the relative position bias (log-bucketed, 32 buckets,
max distance 128, looked up in encoder.relative_attention_bias); one case sizes that table
larger than the 32 buckets transformers uses.
"""

import os

import torch
from transformers import (
    MPNetConfig,
    MPNetForMaskedLM,
    MPNetForMultipleChoice,
    MPNetForQuestionAnswering,
    MPNetForSequenceClassification,
    MPNetForTokenClassification,
    MPNetModel,
)

PAD = 1

CASES = [
    # (task, model class, output names, config overrides)
    ("feature-extraction", MPNetModel, ["last_hidden_state", "pooler_output"],
     dict(hidden_act="gelu", hidden_size=32, num_attention_heads=4, intermediate_size=37,
          vocab_size=99, layer_norm_eps=1e-7)),
    ("fill-mask", MPNetForMaskedLM, ["logits"],
     dict(hidden_act="relu", hidden_size=24, num_attention_heads=3, intermediate_size=41,
          vocab_size=80, layer_norm_eps=1e-6)),
    ("text-classification", MPNetForSequenceClassification, ["logits"],
     dict(hidden_act="gelu_new", hidden_size=20, num_attention_heads=5, intermediate_size=30,
          vocab_size=64, num_labels=3, relative_attention_num_buckets=40,
          id2label={0: "negative", 1: "neutral", 2: "positive"},
          label2id={"negative": 0, "neutral": 1, "positive": 2})),
    ("token-classification", MPNetForTokenClassification, ["logits"],
     dict(hidden_act="silu", hidden_size=16, num_attention_heads=2, intermediate_size=28,
          vocab_size=70, num_labels=5)),
    ("question-answering", MPNetForQuestionAnswering, ["start_logits", "end_logits"],
     dict(hidden_act="gelu", hidden_size=24, num_attention_heads=4, intermediate_size=33,
          vocab_size=90, layer_norm_eps=1e-5)),
    ("multiple-choice", MPNetForMultipleChoice, ["logits"],
     dict(hidden_act="gelu", hidden_size=16, num_attention_heads=4, intermediate_size=24,
          vocab_size=64)),
]


def make(root, g):
    for seed, (task, cls, names, extra) in enumerate(CASES, start=400):
        cfg = MPNetConfig(num_hidden_layers=2, initializer_range=0.2,
                          max_position_embeddings=40, **extra)
        assert cfg.pad_token_id == PAD
        torch.manual_seed(seed)
        model = cls(cfg).eval()
        d = os.path.join(root, f"mpnet-tiny-{task}")
        g.fresh(d)
        model.save_pretrained(d)
        gen = torch.Generator().manual_seed(seed + 100)
        inputs = g.pad_id_inputs(gen, cfg.vocab_size, PAD, task)
        with torch.no_grad():
            out = model(**inputs, return_dict=False)
        outputs = {n: out[i] for i, n in enumerate(names)}
        g.save_golden(d, inputs, outputs, {
            "description": f"{cls.__name__}, {cfg.hidden_act}, pad id {PAD}, "
                           f"{cfg.relative_attention_num_buckets} relative buckets, safetensors",
            "weights": "model.safetensors",
        }, task=task)
