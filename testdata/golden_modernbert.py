"""ModernBERT golden cases, one per task head (modernbert-tiny-<task>) plus cls pooling
and an untied, bias-free decoder.

Run by make_golden.py (`--only golden_modernbert`). Eager attention on the padded path.
Every case has sequences longer than its local window (`local_attention` 2 to 6 against
11 tokens, 9 for multiple-choice), so the sliding layers' band mask matters, and mixes
global and sliding layers (`layer_types`, or `global_attn_every_n_layers` in the older
config form the feature-extraction case is rewritten to: transformers reloads it and
must give the same outputs). The bias switches (norm, attention, mlp, classifier,
decoder), activations and `classifier_pooling` vary across cases; multiple-choice rows
are partly left-padded so that its cls pooling (`attention_mask.argmax(-1)`, the first
non-padding token) is not always position 0. Padding uses id 0 (the cases'
pad_token_id); inputs have no token_type_ids.
"""

import json
import os

import torch
from transformers import (
    ModernBertConfig,
    ModernBertForMaskedLM,
    ModernBertForMultipleChoice,
    ModernBertForQuestionAnswering,
    ModernBertForSequenceClassification,
    ModernBertForTokenClassification,
    ModernBertModel,
)

CASES = [
    # (case suffix, task, model class, output names, config overrides)
    ("feature-extraction", "feature-extraction", ModernBertModel, ["last_hidden_state"],
     dict(vocab_size=99, hidden_size=32, num_attention_heads=4, intermediate_size=40,
          num_hidden_layers=4, global_attn_every_n_layers=3, local_attention=4,
          global_rope_theta=1000.0, local_rope_theta=100.0, hidden_activation="gelu")),
    ("fill-mask", "fill-mask", ModernBertForMaskedLM, ["logits"],
     dict(vocab_size=80, hidden_size=24, num_attention_heads=3, intermediate_size=30,
          num_hidden_layers=3, global_attn_every_n_layers=2, local_attention=6,
          hidden_activation="gelu_new", classifier_activation="silu", norm_bias=True,
          attention_bias=True, mlp_bias=True, classifier_bias=True, decoder_bias=True,
          norm_eps=1e-6)),
    ("text-classification", "text-classification", ModernBertForSequenceClassification, ["logits"],
     dict(vocab_size=64, hidden_size=20, num_attention_heads=5, intermediate_size=28,
          num_hidden_layers=3, global_attn_every_n_layers=3, local_attention=2,
          hidden_activation="relu", classifier_pooling="mean", classifier_bias=True, num_labels=3,
          id2label={0: "negative", 1: "neutral", 2: "positive"},
          label2id={"negative": 0, "neutral": 1, "positive": 2})),
    ("text-classification-cls", "text-classification", ModernBertForSequenceClassification, ["logits"],
     dict(vocab_size=64, hidden_size=16, num_attention_heads=2, intermediate_size=24,
          num_hidden_layers=2, global_attn_every_n_layers=2, local_attention=4,
          classifier_pooling="cls", classifier_activation="gelu", norm_bias=True, num_labels=2)),
    ("token-classification", "token-classification", ModernBertForTokenClassification, ["logits"],
     dict(vocab_size=70, hidden_size=16, num_attention_heads=2, intermediate_size=28,
          num_hidden_layers=4, global_attn_every_n_layers=2, local_attention=4,
          attention_bias=True, num_labels=5)),
    ("question-answering", "question-answering", ModernBertForQuestionAnswering,
     ["start_logits", "end_logits"],
     dict(vocab_size=90, hidden_size=24, num_attention_heads=4, intermediate_size=33,
          num_hidden_layers=3, global_attn_every_n_layers=3, local_attention=4,
          mlp_bias=True, hidden_activation="gelu_pytorch_tanh", num_labels=2)),
    ("multiple-choice", "multiple-choice", ModernBertForMultipleChoice, ["logits"],
     dict(vocab_size=64, hidden_size=16, num_attention_heads=4, intermediate_size=24,
          num_hidden_layers=3, global_attn_every_n_layers=3, local_attention=4,
          classifier_pooling="cls", classifier_bias=True)),
    ("fill-mask-untied", "fill-mask", ModernBertForMaskedLM, ["logits"],
     dict(vocab_size=50, hidden_size=16, num_attention_heads=2, intermediate_size=20,
          num_hidden_layers=2, global_attn_every_n_layers=2, local_attention=2,
          tie_word_embeddings=False, decoder_bias=False)),
]


def legacy_config(d):
    """Rewrites config.json to the pre-transformers-5 form the Hub's ModernBERT configs
    use: global_attn_every_n_layers and global/local_rope_theta instead of layer_types and
    rope_parameters."""
    path = os.path.join(d, "config.json")
    with open(path) as f:
        cfg = json.load(f)
    rope = cfg.pop("rope_parameters")
    cfg.pop("layer_types")
    cfg["global_rope_theta"] = rope["full_attention"]["rope_theta"]
    cfg["local_rope_theta"] = rope["sliding_attention"]["rope_theta"]
    with open(path, "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
        f.write("\n")


def left_pad_some(inputs):
    """Moves the padding of every other row to the left (multiple-choice's cls pooling
    reads the first non-padding token)."""
    ids, mask = inputs["input_ids"].clone(), inputs["attention_mask"].clone()
    flat_ids, flat_mask = ids.view(-1, ids.shape[-1]), mask.view(-1, mask.shape[-1])
    for row in range(0, flat_ids.shape[0], 2):
        n = int(flat_mask[row].sum())
        flat_ids[row] = torch.roll(flat_ids[row], flat_ids.shape[1] - n)
        flat_mask[row] = torch.roll(flat_mask[row], flat_mask.shape[1] - n)
    return {"input_ids": ids, "attention_mask": mask}


def make(root, g):
    for seed, (suffix, task, cls, names, extra) in enumerate(CASES, start=1400):
        cfg = ModernBertConfig(max_position_embeddings=64, initializer_range=0.2, pad_token_id=0,
                               bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2,
                               attn_implementation="eager", **extra)
        torch.manual_seed(seed)
        model = cls(cfg).eval()
        d = os.path.join(root, f"modernbert-tiny-{suffix}")
        g.fresh(d)
        model.save_pretrained(d)
        form = "layer_types/rope_parameters config"
        if suffix == "feature-extraction":
            legacy_config(d)
            reloaded = cls.from_pretrained(d, attn_implementation="eager").eval()
            assert reloaded.config.layer_types == cfg.layer_types
            assert reloaded.config.rope_parameters == cfg.rope_parameters
            model = reloaded
            form = "legacy global_attn_every_n_layers/*_rope_theta config"
        gen = torch.Generator().manual_seed(seed + 100)
        inputs = g.task_inputs(gen, cfg.vocab_size, 1, task)
        inputs.pop("token_type_ids")
        if task == "multiple-choice":
            inputs = left_pad_some(inputs)
        with torch.no_grad():
            out = model(**inputs, return_dict=False)
        outputs = {n: out[i] for i, n in enumerate(names)}
        types = "".join("S" if t == "sliding_attention" else "G" for t in cfg.layer_types)
        g.save_golden(d, inputs, outputs, {
            "description": f"{cls.__name__}, {cfg.hidden_activation}, layers {types} "
                           f"(local_attention {cfg.local_attention}), "
                           f"pooling {cfg.classifier_pooling}, {form}, eager attention, "
                           "safetensors",
            "weights": "model.safetensors",
        }, task=task)
