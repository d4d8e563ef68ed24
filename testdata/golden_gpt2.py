"""GPT-2 golden cases (run by make_golden.py): one tiny checkpoint per task, and a
prefill + three cached decoding steps for text-generation-with-past."""

import os

import torch
from safetensors.torch import save_file
from transformers import (
    GPT2Config,
    GPT2ForQuestionAnswering,
    GPT2ForSequenceClassification,
    GPT2ForTokenClassification,
    GPT2LMHeadModel,
    GPT2Model,
)


def config(**extra):
    base = dict(vocab_size=72, n_embd=24, n_layer=2, n_head=3, n_positions=32, n_inner=40,
                activation_function="gelu_new", layer_norm_epsilon=1e-6, initializer_range=0.2,
                pad_token_id=0, attn_implementation="eager")
    base.update(extra)
    return GPT2Config(**base)


def right_padded(g, gen, vocab):
    inputs = g.padded_inputs(gen, vocab, 1)
    del inputs["token_type_ids"]
    return inputs


def with_positions(inputs):
    b, s = inputs["input_ids"].shape
    inputs = dict(inputs)
    inputs["position_ids"] = torch.arange(s).unsqueeze(0).expand(b, s).contiguous()
    return inputs


CASES = [
    # (task, class, config overrides, outputs, positions input)
    ("feature-extraction", GPT2Model, dict(activation_function="gelu"), ["last_hidden_state"], True),
    ("text-generation", GPT2LMHeadModel, dict(), ["logits"], True),
    ("text-classification", GPT2ForSequenceClassification,
     dict(num_labels=3, scale_attn_by_inverse_layer_idx=True), ["logits"], False),
    ("token-classification", GPT2ForTokenClassification, dict(num_labels=4, activation_function="relu"),
     ["logits"], False),
    ("question-answering", GPT2ForQuestionAnswering, dict(), ["start_logits", "end_logits"], False),
]


def make(root, g):
    for seed, (task, cls, extra, names, positions) in enumerate(CASES, start=70):
        cfg = config(**extra)
        torch.manual_seed(seed)
        model = cls(cfg).eval()
        d = os.path.join(root, f"gpt2-tiny-{task}")
        g.fresh(d)
        model.save_pretrained(d)
        gen = torch.Generator().manual_seed(seed + 100)
        inputs = right_padded(g, gen, cfg.vocab_size)
        if positions:
            inputs = with_positions(inputs)
        with torch.no_grad():
            out = model(**inputs, return_dict=False, use_cache=False)
        outputs = {n: out[i] for i, n in enumerate(names)}
        g.save_golden(d, inputs, outputs, {
            "description": f"{cls.__name__}, {cfg.activation_function}, safetensors",
            "weights": "model.safetensors",
        }, task=task)
    with_past(root, g)


def with_past(root, g):
    """Prefill (left-padded batch of 2) then three greedy single-token steps, each fed the
    cache of the previous one, as generate() does."""
    cfg = config(activation_function="gelu_new")
    torch.manual_seed(77)
    model = GPT2LMHeadModel(cfg).eval()
    d = os.path.join(root, "gpt2-tiny-text-generation-with-past")
    g.fresh(d)
    model.save_pretrained(d)
    gen = torch.Generator().manual_seed(177)
    ids = torch.randint(1, cfg.vocab_size, (2, 6), generator=gen)
    mask = torch.ones((2, 6), dtype=torch.int64)
    mask[1, :2] = 0
    ids = ids * mask
    tensors = g.cached_steps(model, ids, mask)
    save_file(tensors, os.path.join(d, "steps.safetensors"))
    import json
    with open(os.path.join(d, "case.json"), "w") as f:
        json.dump({
            "description": "GPT2LMHeadModel: prefill (left padding) + 3 cached greedy steps",
            "task": "text-generation-with-past", "steps": 4, "outputs": ["logits"],
            "weights": "model.safetensors",
        }, f, indent=2, sort_keys=True)
        f.write("\n")
