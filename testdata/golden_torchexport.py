"""A tiny BERT exported by torch.onnx.export (TorchScript exporter), for the optimizer.

Run by make_golden.py (`--only golden_torchexport`). Writes testdata/bert-tiny-torchexport/:
model.onnx (the bert-tiny-gelu checkpoint exported by `torch.onnx.export(..., dynamo=False)`
at opset 14, where LayerNorm is decomposed, with optimum's input/output names and dynamic
axes), model-opset17.onnx (the same at opset 17, with ONNX's LayerNormalization),
golden.safetensors (the bert-tiny-gelu golden inputs and transformers' outputs) and
case.json. There is no
config.json on purpose: this is not a checkpoint for ferry's exporter but an ONNX model
made by someone else, which `ferry optimize` must fuse as well as ferry's own export.
"""

import os

import torch
from transformers import BertModel

OPSETS = {14: "model.onnx", 17: "model-opset17.onnx"}
NAMES = ["input_ids", "attention_mask", "token_type_ids"]
OUTPUTS = ["last_hidden_state", "pooler_output"]


class Wrapper(torch.nn.Module):
    """Returns the outputs as a tuple, as optimum's feature-extraction config does."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, token_type_ids):
        out = self.model(input_ids=input_ids, attention_mask=attention_mask,
                         token_type_ids=token_type_ids, return_dict=True)
        return out.last_hidden_state, out.pooler_output


def make(root, g):
    src = os.path.join(root, "bert-tiny-gelu")
    model = BertModel.from_pretrained(src, attn_implementation="eager").eval()
    d = os.path.join(root, "bert-tiny-torchexport")
    g.fresh(d)
    # The same inputs as bert-tiny-gelu's golden (same generator seed).
    gen = torch.Generator().manual_seed(11)
    cfg = model.config
    inputs = g.padded_inputs(gen, cfg.vocab_size, cfg.type_vocab_size)
    axes = {n: {0: "batch_size", 1: "sequence_length"} for n in NAMES}
    axes["last_hidden_state"] = {0: "batch_size", 1: "sequence_length"}
    axes["pooler_output"] = {0: "batch_size"}
    # Export with other shapes than the golden's, so nothing is specialized to them.
    dummy = g.padded_inputs(torch.Generator().manual_seed(5), cfg.vocab_size,
                            cfg.type_vocab_size, batch=2, seq=8, lengths=(8, 5))
    for opset, name in OPSETS.items():
        with torch.no_grad():
            torch.onnx.export(
                Wrapper(model), tuple(dummy[n] for n in NAMES), os.path.join(d, name),
                input_names=NAMES, output_names=OUTPUTS, dynamic_axes=axes,
                opset_version=opset, do_constant_folding=True, dynamo=False,
            )
    g.save_golden(d, inputs, g.run(model, inputs), {
        "description": "bert-tiny-gelu exported by torch.onnx.export (dynamo=False)",
        "models": {name: opset for opset, name in OPSETS.items()},
    })
