"""Half-precision checkpoints (run by make_golden.py): tiny BERTs saved in float16 and
bfloat16. The goldens come from the same (rounded) weights upcast to float32, which is
what `ferry export --dtype fp32` (the default) exports, so parity is checked at 1e-5."""

import os

import torch
from transformers import BertConfig, BertModel

CASES = [
    # (case dir, torch dtype, seed)
    ("bert-tiny-fp16", torch.float16, 90),
    ("bert-tiny-bf16", torch.bfloat16, 91),
]


def make(root, g):
    for name, dtype, seed in CASES:
        cfg = BertConfig(
            vocab_size=90, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=40, hidden_act="gelu", max_position_embeddings=32,
            type_vocab_size=2, layer_norm_eps=1e-6, initializer_range=0.2,
        )
        torch.manual_seed(seed)
        model = BertModel(cfg).eval()
        d = os.path.join(root, name)
        g.fresh(d)
        model.to(dtype).save_pretrained(d)
        # Reload the half checkpoint as saved, then compute in float32.
        loaded = BertModel.from_pretrained(d, dtype=dtype).eval()
        assert loaded.embeddings.word_embeddings.weight.dtype == dtype
        loaded = loaded.float()
        gen = torch.Generator().manual_seed(seed + 100)
        inputs = g.padded_inputs(gen, cfg.vocab_size, cfg.type_vocab_size)
        g.save_golden(d, inputs, g.run(loaded, inputs), {
            "description": f"BertModel saved in {str(dtype).removeprefix('torch.')}, "
                           "golden from the weights upcast to float32",
            "weights": "model.safetensors",
        })
