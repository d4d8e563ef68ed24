"""Golden for `cargo xtask bench --llm`: transformers' float32 logits of a decoder checkpoint
(bfloat16 weights, loaded as float32) on a left-padded batch of 2, with the inputs, as a
safetensors file `ferry verify` reads (input.*, output.logits).

Usage: llm_parity.py CHECKPOINT_DIR OUT.safetensors
"""

import sys

import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM


def main():
    ckpt, out = sys.argv[1:3]
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32,
                                                 attn_implementation="eager").eval()
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(3, model.config.vocab_size, (2, 24), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, :7] = 0
    ids = ids * mask
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions,
                       use_cache=False).logits
    tensors = {"input.input_ids": ids, "input.attention_mask": mask,
               "input.position_ids": positions, "output.logits": logits.float().contiguous()}
    save_file(tensors, out)


if __name__ == "__main__":
    main()
