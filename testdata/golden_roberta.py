"""RoBERTa-family golden cases: RoBERTa per task, plus XLM-RoBERTa and CamemBERT.

Run by make_golden.py (`--only golden_roberta`). RoBERTa has no token_type_ids input in
optimum's export, so the saved inputs are input_ids and attention_mask only. Position ids
come from input_ids (padding tokens keep `pad_token_id`, the others count up from
`pad_token_id + 1`), so padded positions hold the config's pad_token_id, not 0; one case
uses a pad id other than the default 1.
"""

import os

import torch
import transformers
from transformers import (
    CamembertConfig,
    CamembertForMaskedLM,
    RobertaConfig,
    RobertaForMaskedLM,
    RobertaForMultipleChoice,
    RobertaForQuestionAnswering,
    RobertaForSequenceClassification,
    RobertaForTokenClassification,
    RobertaModel,
    XLMRobertaConfig,
    XLMRobertaModel,
)

CASES = [
    # (case, config class, model class, output names, config overrides)
    ("roberta-tiny-feature-extraction", RobertaConfig, RobertaModel,
     ["last_hidden_state", "pooler_output"],
     dict(hidden_act="gelu", hidden_size=32, num_attention_heads=4, intermediate_size=37,
          vocab_size=99, layer_norm_eps=1e-7)),
    ("roberta-tiny-fill-mask", RobertaConfig, RobertaForMaskedLM, ["logits"],
     dict(hidden_act="relu", hidden_size=24, num_attention_heads=3, intermediate_size=41,
          vocab_size=80, layer_norm_eps=1e-6)),
    ("roberta-tiny-text-classification", RobertaConfig, RobertaForSequenceClassification,
     ["logits"],
     dict(hidden_act="gelu_new", hidden_size=20, num_attention_heads=5, intermediate_size=30,
          vocab_size=64, num_labels=3,
          id2label={0: "negative", 1: "neutral", 2: "positive"},
          label2id={"negative": 0, "neutral": 1, "positive": 2})),
    ("roberta-tiny-token-classification", RobertaConfig, RobertaForTokenClassification,
     ["logits"],
     dict(hidden_act="relu", hidden_size=16, num_attention_heads=2, intermediate_size=28,
          vocab_size=70, num_labels=5, pad_token_id=3)),
    ("roberta-tiny-question-answering", RobertaConfig, RobertaForQuestionAnswering,
     ["start_logits", "end_logits"],
     dict(hidden_act="gelu", hidden_size=24, num_attention_heads=4, intermediate_size=33,
          vocab_size=90, layer_norm_eps=1e-5)),
    ("roberta-tiny-multiple-choice", RobertaConfig, RobertaForMultipleChoice, ["logits"],
     dict(hidden_act="gelu", hidden_size=16, num_attention_heads=4, intermediate_size=24,
          vocab_size=64)),
    ("xlm-roberta-tiny-feature-extraction", XLMRobertaConfig, XLMRobertaModel,
     ["last_hidden_state", "pooler_output"],
     dict(hidden_act="gelu", hidden_size=24, num_attention_heads=2, intermediate_size=30,
          vocab_size=77, layer_norm_eps=1e-5)),
    ("camembert-tiny-fill-mask", CamembertConfig, CamembertForMaskedLM, ["logits"],
     dict(hidden_act="gelu_new", hidden_size=16, num_attention_heads=4, intermediate_size=26,
          vocab_size=72)),
]


# XLM-RoBERTa and CamemBERT share RoBERTa's code in transformers; give each sibling its own
# case for every task too (smaller still, with configs unlike the RoBERTa ones).
_SIBLING_TASKS = [
    ("feature-extraction", "Model", ["last_hidden_state", "pooler_output"]),
    ("fill-mask", "ForMaskedLM", ["logits"]),
    ("text-classification", "ForSequenceClassification", ["logits"]),
    ("token-classification", "ForTokenClassification", ["logits"]),
    ("question-answering", "ForQuestionAnswering", ["start_logits", "end_logits"]),
    ("multiple-choice", "ForMultipleChoice", ["logits"]),
]
for _prefix, _cls_prefix, _acts in (("xlm-roberta", "XLMRoberta", ("gelu", "relu")),
                                   ("camembert", "Camembert", ("gelu_new", "gelu"))):
    for _i, (_task, _suffix, _names) in enumerate(_SIBLING_TASKS):
        _case = f"{_prefix}-tiny-{_task}"
        if any(c[0] == _case for c in CASES):
            continue
        CASES.append((
            _case, getattr(transformers, f"{_cls_prefix}Config"),
            getattr(transformers, f"{_cls_prefix}{_suffix}"), _names,
            dict(hidden_act=_acts[_i % 2], hidden_size=16, num_attention_heads=2 + 2 * (_i % 2),
                 intermediate_size=20, vocab_size=48, layer_norm_eps=1e-6,
                 num_labels=3 if _task.endswith("classification") else 2),
        ))


def make(root, g):
    for seed, (case, cfg_cls, cls, names, extra) in enumerate(CASES, start=90):
        cfg = cfg_cls(num_hidden_layers=2, initializer_range=0.2, max_position_embeddings=40,
                      type_vocab_size=1, **extra)
        torch.manual_seed(seed)
        model = cls(cfg).eval()
        d = os.path.join(root, case)
        g.fresh(d)
        model.save_pretrained(d)
        gen = torch.Generator().manual_seed(seed + 100)
        pad = cfg.pad_token_id
        inputs = g.pad_id_inputs(gen, cfg.vocab_size, pad, case.split("-tiny-", 1)[1])
        with torch.no_grad():
            out = model(**inputs, return_dict=False)
        outputs = {n: out[i] for i, n in enumerate(names)}
        g.save_golden(d, inputs, outputs, {
            "description": f"{cls.__name__}, {extra['hidden_act']}, pad_token_id {pad}, "
                           "safetensors",
            "weights": "model.safetensors",
        }, task=case.split("-tiny-", 1)[1])
