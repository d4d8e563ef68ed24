"""Half-precision checkpoints (run by make_golden.py): tiny BERTs saved in float16 and
bfloat16, as a base model and with a sequence-classification head.

Each case holds two goldens over the same inputs and the same (rounded) saved weights:

  golden.safetensors         transformers in float32 (the half weights upcast): what
                             `ferry export --dtype fp32` exports, and what `--dtype bf16`
                             computes (bfloat16 weights, float32 compute), checked at 1e-5.
  golden-<dtype>.safetensors transformers computing IN the half dtype on CPU (outputs
                             stored as float32, exactly), which `--dtype keep` is compared
                             with at the dtype's tolerance (crates/cli/tests/cli/halfprec.rs).
"""

import os

import torch
from safetensors.torch import save_file
from transformers import BertConfig, BertForSequenceClassification, BertModel

CASES = [
    # (case dir, model class, torch dtype, seed)
    ("bert-tiny-fp16", BertModel, torch.float16, 90),
    ("bert-tiny-bf16", BertModel, torch.bfloat16, 91),
    ("bert-tiny-fp16-text-classification", BertForSequenceClassification, torch.float16, 92),
]

SHORT = {torch.float16: "fp16", torch.bfloat16: "bf16"}


def outputs_of(model, inputs):
    with torch.no_grad():
        out = model(**inputs, return_dict=True)
    if isinstance(model, BertModel):
        return {"last_hidden_state": out.last_hidden_state, "pooler_output": out.pooler_output}
    return {"logits": out.logits}


def make(root, g):
    for name, cls, dtype, seed in CASES:
        cfg = BertConfig(
            vocab_size=90, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=40, hidden_act="gelu", max_position_embeddings=32,
            type_vocab_size=2, layer_norm_eps=1e-6, initializer_range=0.2,
            **({} if cls is BertModel else {"num_labels": 3}),
        )
        torch.manual_seed(seed)
        model = cls(cfg).eval()
        d = os.path.join(root, name)
        g.fresh(d)
        model.to(dtype).save_pretrained(d)
        task = "feature-extraction" if cls is BertModel else "text-classification"
        gen = torch.Generator().manual_seed(seed + 100)
        inputs = g.padded_inputs(gen, cfg.vocab_size, cfg.type_vocab_size)

        # The half checkpoint as saved, computing in its own dtype.
        half = cls.from_pretrained(d, dtype=dtype).eval()
        base = half.bert if hasattr(half, "bert") else half
        assert base.embeddings.word_embeddings.weight.dtype == dtype
        half_out = outputs_of(half, inputs)
        for v in half_out.values():
            assert v.dtype == dtype
        tensors = {f"input.{k}": v.contiguous() for k, v in inputs.items()}
        tensors.update({f"output.{k}": v.contiguous().float() for k, v in half_out.items()})
        save_file(tensors, os.path.join(d, f"golden-{SHORT[dtype]}.safetensors"))

        # The same weights upcast, computing in float32.
        full = cls.from_pretrained(d, dtype=dtype).eval().float()
        full_out = outputs_of(full, inputs)
        worst = max((full_out[k] - half_out[k].float()).abs().max().item() for k in full_out)
        print(f"{name}: {SHORT[dtype]} compute vs float32 compute, max-abs {worst:.3e}")
        g.save_golden(d, inputs, full_out, {
            "description": f"{cls.__name__} saved in {str(dtype).removeprefix('torch.')}; "
                           "golden.safetensors from the weights upcast to float32, "
                           f"golden-{SHORT[dtype]}.safetensors computed in "
                           f"{str(dtype).removeprefix('torch.')} by transformers on CPU",
            "weights": "model.safetensors",
            "half_golden": f"golden-{SHORT[dtype]}.safetensors",
            "half_vs_float32_max_abs": worst,
        }, task=task)
