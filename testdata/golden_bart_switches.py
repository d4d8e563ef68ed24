"""BART-family switches the seq2seq goldens (golden_seq2seq.py) leave at their defaults,
run by make_golden.py: a non-zero `final_logits_bias` (transformers initialises the buffer
to zeros, so the other cases cannot tell whether it is added), Marian with separate encoder
and decoder embeddings (`share_encoder_decoder_embeddings=False`, a larger
`decoder_vocab_size`) and an untied LM head, BART with `scale_embedding` and the tanh GELU.
Each case has golden_seq2seq.py's layout (`steps.safetensors` from its `steps_golden`,
`case.json` with `"kind": "seq2seq"`).
"""

import os

import torch
from safetensors.torch import save_file
from transformers import BartConfig, BartForConditionalGeneration, MarianConfig, MarianMTModel

import golden_seq2seq as s2s

# (case name, config class, model class, config overrides, generation config)
CASES = [
    ("marian-tiny-untied", MarianConfig, MarianMTModel,
     dict(s2s.BART_BASE, activation_function="gelu", scale_embedding=True,
          share_encoder_decoder_embeddings=False, decoder_vocab_size=s2s.VOCAB + 16,
          tie_word_embeddings=False, pad_token_id=s2s.VOCAB - 1, eos_token_id=0,
          decoder_start_token_id=s2s.VOCAB - 1),
     dict(pad_token_id=s2s.VOCAB - 1, eos_token_id=0, decoder_start_token_id=s2s.VOCAB - 1)),
    ("bart-tiny-scaled", BartConfig, BartForConditionalGeneration,
     dict(s2s.BART_BASE, activation_function="gelu_new", scale_embedding=True, bos_token_id=0,
          pad_token_id=1, eos_token_id=2, decoder_start_token_id=2),
     dict(bos_token_id=0, pad_token_id=1, eos_token_id=2, decoder_start_token_id=2)),
]


def make(root, g):
    for seed, (name, cfg_cls, model_cls, extra, gen_extra) in enumerate(CASES, start=700):
        model = s2s.build(cfg_cls, model_cls, extra, gen_extra, seed)
        with torch.no_grad():
            bias = model.final_logits_bias
            gen = torch.Generator().manual_seed(seed)
            bias.copy_(torch.randn(bias.shape, generator=gen))
        d = os.path.join(root, name)
        g.fresh(d)
        model.save_pretrained(d)
        model = model_cls.from_pretrained(d, dtype=torch.float32).eval()
        assert model.final_logits_bias.abs().max() > 0.1, "final_logits_bias was not saved"
        tensors = s2s.steps_golden(model, torch.Generator().manual_seed(seed + 1000),
                                   model.generation_config)
        save_file(tensors, os.path.join(d, "steps.safetensors"))
        switches = ", ".join(f"{k}={v}" for k, v in extra.items() if k not in s2s.BART_BASE)
        g.write_case(d, {
            "description": f"{model_cls.__name__} ({switches}, random final_logits_bias): "
                           f"encoder on a right-padded batch, decoder prefill of "
                           f"{s2s.DECODER_PREFIX + 1} tokens + 3 cached greedy steps, generate() "
                           f"{s2s.NEW_TOKENS} new tokens greedy and with 4 beams",
            "kind": "seq2seq", "task": "text2text-generation-with-past", "steps": 4,
            "model_type": model.config.model_type, "weights": "model.safetensors",
            "generation": dict(gen_extra, max_new_tokens=s2s.NEW_TOKENS),
        })
