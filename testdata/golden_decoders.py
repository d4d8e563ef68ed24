"""Decoder-LLM golden cases (run by make_golden.py): one tiny seeded checkpoint per
model_type and switch (GQA/MQA, explicit head_dim, biases, qk-norm, packed projections,
every rope type, sliding windows, soft-capping, tied/untied embeddings, bf16 storage).

For each text-generation case, `steps.safetensors` holds
  step{k}.input.*     the inputs of a prefill on a left-padded batch of 2 (lengths 9 and 5)
                      and of 3 cached greedy steps, as generate() feeds them
  step{k}.output.logits  transformers' logits at each step (eager attention, float32)
  step0.output.logits_fp16  the prefill's logits computed in float16
  generate.input_ids / generate.attention_mask / generate.output_ids
                      model.generate(do_sample=False, max_new_tokens=16) on that batch
  generate.output_ids_no_cache  the same with use_cache=False
and case.json has task text-generation-with-past (exported and checked step by step).
Classification and feature-extraction cases have a golden.safetensors like the encoders.
"""

import os

import torch
from safetensors.torch import save_file
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    GemmaConfig,
    GemmaForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    MistralConfig,
    MistralForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen2Model,
    Qwen3Config,
    Qwen3ForCausalLM,
)

VOCAB = 96
BASE = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
            rms_norm_eps=1e-6, initializer_range=0.2, pad_token_id=0, bos_token_id=1,
            eos_token_id=2, attn_implementation="eager")

# (case name, config class, model class, config overrides, stored dtype)
GENERATION_CASES = [
    ("llama-tiny-gqa-bias", LlamaConfig, LlamaForCausalLM,
     dict(attention_bias=True, mlp_bias=True, tie_word_embeddings=False), torch.float32),
    ("llama-tiny-mqa-linear", LlamaConfig, LlamaForCausalLM,
     dict(num_key_value_heads=1, rope_scaling={"rope_type": "linear", "factor": 2.0},
          rope_theta=500.0), torch.float32),
    ("llama-tiny-dynamic", LlamaConfig, LlamaForCausalLM,
     dict(max_position_embeddings=8, rope_scaling={"rope_type": "dynamic", "factor": 3.0},
          rope_theta=100.0), torch.float32),
    ("llama-tiny-llama3", LlamaConfig, LlamaForCausalLM,
     dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                        "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
          tie_word_embeddings=True), torch.float32),
    ("llama-tiny-yarn", LlamaConfig, LlamaForCausalLM,
     dict(rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
          rope_theta=1000.0), torch.float32),
    ("mistral-tiny-sliding", MistralConfig, MistralForCausalLM,
     dict(sliding_window=4, head_dim=12), torch.float32),
    ("qwen2-tiny-tied", Qwen2Config, Qwen2ForCausalLM,
     dict(tie_word_embeddings=True, rope_theta=1000000.0), torch.float32),
    ("qwen3-tiny-qknorm-bf16", Qwen3Config, Qwen3ForCausalLM,
     dict(head_dim=16, tie_word_embeddings=False), torch.bfloat16),
    ("phi3-tiny-longrope", Phi3Config, Phi3ForCausalLM,
     dict(num_key_value_heads=4, max_position_embeddings=40, original_max_position_embeddings=10,
          partial_rotary_factor=0.5,
          rope_scaling={"type": "longrope", "short_factor": [1.0, 1.2], "long_factor": [1.5, 4.0]},
          sliding_window=None, tie_word_embeddings=False), torch.float32),
    ("gemma-tiny-mqa", GemmaConfig, GemmaForCausalLM,
     dict(num_key_value_heads=1, head_dim=8, hidden_act="gelu_pytorch_tanh"), torch.float32),
    ("gemma2-tiny-softcap", Gemma2Config, Gemma2ForCausalLM,
     dict(head_dim=8, sliding_window=4, query_pre_attn_scalar=12, attn_logit_softcapping=5.0,
          final_logit_softcapping=3.0, hidden_activation="gelu_pytorch_tanh"), torch.float32),
    # head_dim 16 with packed-able q/k/v (biases): the size onnxruntime-genai's in-attention
    # rotary takes, so `--genai` feeds the packed QKV MatMul straight into GroupQueryAttention.
    ("qwen2-tiny-hd16", Qwen2Config, Qwen2ForCausalLM,
     dict(num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False), torch.float32),
]

LENGTHS = (9, 5)
NEW_TOKENS = 16


def left_padded(gen, lengths=LENGTHS):
    seq = max(lengths)
    ids = torch.randint(3, VOCAB, (len(lengths), seq), generator=gen)
    mask = torch.zeros((len(lengths), seq), dtype=torch.int64)
    for row, n in enumerate(lengths):
        mask[row, seq - n:] = 1
    return ids * mask, mask


def positions(mask):
    return (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)


def make_model(cfg_cls, model_cls, extra, seed, dtype):
    cfg = cfg_cls(**{**BASE, **extra})
    torch.manual_seed(seed)
    model = model_cls(cfg).eval()
    if dtype != torch.float32:
        model = model.to(dtype)
    return cfg, model


def steps_golden(g, model, gen, fresh_model):
    """Prefill on a left-padded batch, then three greedy steps fed the cache."""
    tensors = g.cached_steps(model, *left_padded(gen))
    ids, mask = left_padded(gen)
    # A fresh model: dynamic rope keeps state across calls (the longest sequence seen), and
    # an export, like a newly loaded model, starts without it.
    model = fresh_model()
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW_TOKENS,
                             do_sample=False, pad_token_id=0)
    tensors["generate.input_ids"] = ids
    tensors["generate.attention_mask"] = mask
    assert out.shape[1] == ids.shape[1] + NEW_TOKENS, "generation stopped early; pick another seed"
    tensors["generate.output_ids"] = out.contiguous()
    # Without the cache every step recomputes all positions: for rope types whose
    # frequencies follow the length (dynamic, longrope) the tokens may differ.
    model = fresh_model()
    with torch.no_grad():
        plain = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW_TOKENS,
                               do_sample=False, pad_token_id=0, use_cache=False)
    tensors["generate.output_ids_no_cache"] = plain.contiguous()
    return tensors


def make(root, g):
    for seed, (name, cfg_cls, model_cls, extra, dtype) in enumerate(GENERATION_CASES, start=300):
        cfg, model = make_model(cfg_cls, model_cls, extra, seed, dtype)
        d = os.path.join(root, name)
        g.fresh(d)
        model.save_pretrained(d)
        # The reference computes in float32 from the stored weights, loaded afresh (a model
        # cast to bfloat16 and back would also have rounded its rotary frequencies).
        def load():
            return model_cls.from_pretrained(d, dtype=torch.float32,
                                             attn_implementation="eager").eval()
        tensors = steps_golden(g, load(), torch.Generator().manual_seed(seed + 1000), load)
        # The prefill computed in float16 (RMSNorm and softmax inside in float32, as the
        # modeling files do), the reference for `--dtype fp16`.
        half = model_cls.from_pretrained(d, dtype=torch.float16, attn_implementation="eager").eval()
        with torch.no_grad():
            out = half(**{k: tensors[f"step0.input.{k}"] for k in
                          ("input_ids", "attention_mask", "position_ids")}, use_cache=False)
        tensors["step0.output.logits_fp16"] = out.logits.float().contiguous()
        save_file(tensors, os.path.join(d, "steps.safetensors"))
        g.write_case(d, {
            "description": f"{model_cls.__name__} ({', '.join(f'{k}={v}' for k, v in extra.items())}): "
                           f"prefill (left padding) + 3 cached greedy steps, generate() {NEW_TOKENS} tokens",
            "task": "text-generation-with-past", "steps": 4, "outputs": ["logits"],
            "weights": "model.safetensors", "stored_dtype": str(dtype).replace("torch.", ""),
        })

    # `ferry run` text generation through a Llama-family export (word-level tokenizer).
    words = g.generation_words(VOCAB)
    cfg = Qwen2Config(**{**BASE, "bos_token_id": 1, "eos_token_id": 1, "pad_token_id": None,
                         "initializer_range": 0.5, "tie_word_embeddings": True})
    torch.manual_seed(420)
    model = Qwen2ForCausalLM(cfg).eval()
    g.generation_run(os.path.join(root, "run-qwen2-tiny"), model, words,
                     cfg.max_position_embeddings, "Qwen2ForCausalLM")

    # Sequence classification: score at the last non-padding token (right padding, pad id 0).
    cfg = LlamaConfig(**{**BASE, "num_labels": 3})
    torch.manual_seed(400)
    model = LlamaForSequenceClassification(cfg).eval()
    d = os.path.join(root, "llama-tiny-text-classification")
    g.fresh(d)
    model.save_pretrained(d)
    gen = torch.Generator().manual_seed(401)
    inputs = g.padded_inputs(gen, VOCAB, 1)
    del inputs["token_type_ids"]
    with torch.no_grad():
        out = model(**inputs, return_dict=False, use_cache=False)
    g.save_golden(d, inputs, {"logits": out[0]}, {
        "description": "LlamaForSequenceClassification, right padding, pad_token_id 0",
        "weights": "model.safetensors",
    }, task="text-classification")

    # Feature extraction on a left-padded batch (Qwen2Model, biases, GQA).
    cfg = Qwen2Config(**BASE)
    torch.manual_seed(410)
    model = Qwen2Model(cfg).eval()
    d = os.path.join(root, "qwen2-tiny-feature-extraction")
    g.fresh(d)
    model.save_pretrained(d)
    ids, mask = left_padded(torch.Generator().manual_seed(411))
    inputs = {"input_ids": ids, "attention_mask": mask, "position_ids": positions(mask)}
    with torch.no_grad():
        out = model(**inputs, use_cache=False, return_dict=True)
    g.save_golden(d, inputs, {"last_hidden_state": out.last_hidden_state}, {
        "description": "Qwen2Model, left padding, GQA, q/k/v biases",
        "weights": "model.safetensors",
    }, task="feature-extraction")
