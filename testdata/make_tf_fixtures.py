"""Builds ferry's TensorFlow test cases: tiny seeded `tf_model.h5` checkpoints.

transformers 5 dropped TensorFlow, so this runs in its own venv with transformers 4.x,
TensorFlow (tf-keras, the Keras 2 that transformers' TF models need) and torch:

  python3 -m venv target/tfvenv
  target/tfvenv/bin/pip install "transformers>=4.40,<5" tensorflow-cpu tf-keras torch safetensors
  target/tfvenv/bin/pip uninstall -y triton   # its LLVM clashes with TensorFlow's at import
  target/tfvenv/bin/python testdata/make_tf_fixtures.py testdata

For each case a TF model (TFBertModel, TFDistilBertForSequenceClassification,
TFBertForMaskedLM) is built with seeded weights and saved by `save_pretrained` as
transformers 4.x saves TF models: config.json + tf_model.h5 (Keras HDF5). The golden
outputs are transformers' *PyTorch* outputs for the same weights: the PyTorch class is
built and filled from tf_model.h5 by `load_tf2_checkpoint_in_pytorch_model`, the conversion
`from_pretrained(..., from_tf=True)` runs (called directly: with torch 2.15 transformers
4.57's from_pretrained path leaves the model unrunnable), and run on the inputs; the TF model's outputs are checked against
them too. Files written under testdata/<case>/, in make_golden.py's format (its
`padded_inputs` and `save_golden` are reused):

  config.json + tf_model.h5   the TF checkpoint
  model.safetensors           (tf-bert-tiny-both only) the converted PyTorch weights, so the
                              directory holds both frameworks for the auto-detection tests
  golden.safetensors          inputs (`input.*`) and transformers' PyTorch outputs (`output.*`)
  case.json                   what the case is, which outputs it checks, TF-vs-PT max diff
"""

import os
import sys

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")  # transformers 4.x TF models are Keras 2
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import (  # noqa: E402
    BertConfig,
    BertForMaskedLM,
    BertModel,
    DistilBertConfig,
    DistilBertForSequenceClassification,
    TFBertForMaskedLM,
    TFBertModel,
    TFDistilBertForSequenceClassification,
)

from transformers.modeling_tf_pytorch_utils import load_tf2_checkpoint_in_pytorch_model  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import make_golden as g  # noqa: E402


def build(tf_cls, pt_cls, cfg, seed, d, inputs, names, task, description, also_pt=False):
    tf.keras.utils.set_random_seed(seed)
    tf_model = tf_cls(cfg)
    tf_inputs = {k: tf.constant(v.numpy()) for k, v in inputs.items()}
    tf_out = tf_model(tf_inputs, training=False)  # builds the weights
    g.fresh(d)
    tf_model.save_pretrained(d)  # config.json + tf_model.h5
    assert os.path.isfile(os.path.join(d, "tf_model.h5")), os.listdir(d)

    # transformers' TF -> PyTorch conversion (what `from_pretrained(from_tf=True)` runs), on
    # a freshly built PyTorch model: it rebuilds the TF model, loads tf_model.h5 into it
    # and copies every weight across by name.
    torch.manual_seed(seed)
    pt_model = pt_cls(cfg)
    pt_model, info = load_tf2_checkpoint_in_pytorch_model(
        pt_model, os.path.join(d, "tf_model.h5"), output_loading_info=True)
    # Keys not in the TF checkpoint must be tied to one that is (the MLM decoder).
    state = pt_model.state_dict()
    loaded = {state[k].data_ptr() for k in state if k not in info["missing_keys"]}
    missing = [k for k in info["missing_keys"] if state[k].data_ptr() not in loaded]
    assert not missing and not info["unexpected_keys"], info
    pt_model.eval()
    with torch.no_grad():
        out = pt_model(**inputs, return_dict=True)
    outputs = {k: out[k] for k in names}
    tf_diff = max(
        float(np.abs(tf_out[k].numpy() - outputs[k].numpy()).max()) for k in names
    )
    assert tf_diff < 1e-4, f"TF and PyTorch disagree by {tf_diff}"
    if also_pt:
        pt_model.save_pretrained(d)  # model.safetensors beside tf_model.h5
    g.save_golden(d, inputs, outputs, {
        "description": description,
        "weights": "tf_model.h5",
        "tensorflow": tf.__version__,
        "tf_vs_pt_max_abs": tf_diff,
    }, task=task)
    print(f"{d}: {sorted(os.listdir(d))}, TF vs PT max-abs {tf_diff:.2e}")


def main(root):
    print(f"transformers {transformers.__version__}, tensorflow {tf.__version__}, "
          f"torch {torch.__version__}")

    cfg = BertConfig(
        vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=37, hidden_act="gelu", max_position_embeddings=40,
        type_vocab_size=3, layer_norm_eps=1e-7, initializer_range=0.2,
    )
    gen = torch.Generator().manual_seed(211)
    inputs = g.padded_inputs(gen, cfg.vocab_size, cfg.type_vocab_size)
    build(TFBertModel, BertModel, cfg, 201, os.path.join(root, "tf-bert-tiny-feature-extraction"),
          inputs, ["last_hidden_state", "pooler_output"], "feature-extraction",
          "TFBertModel, gelu (erf), tf_model.h5 (outputs: BertModel, weights converted by transformers)")

    cfg = DistilBertConfig(
        vocab_size=64, dim=32, n_layers=2, n_heads=4, hidden_dim=37, activation="gelu",
        max_position_embeddings=24, initializer_range=0.2, num_labels=3,
        id2label={0: "negative", 1: "neutral", 2: "positive"},
        label2id={"negative": 0, "neutral": 1, "positive": 2},
    )
    gen = torch.Generator().manual_seed(212)
    flat = g.padded_inputs(gen, cfg.vocab_size, 1)
    inputs = {k: flat[k] for k in ("input_ids", "attention_mask")}
    build(TFDistilBertForSequenceClassification, DistilBertForSequenceClassification, cfg, 202,
          os.path.join(root, "tf-distilbert-tiny-text-classification"), inputs, ["logits"],
          "text-classification",
          "TFDistilBertForSequenceClassification, tf_model.h5 "
          "(outputs: DistilBertForSequenceClassification, weights converted by transformers)")

    cfg = BertConfig(
        vocab_size=80, hidden_size=24, num_hidden_layers=2, num_attention_heads=3,
        intermediate_size=30, hidden_act="gelu_new", max_position_embeddings=24,
        type_vocab_size=2, layer_norm_eps=1e-12, initializer_range=0.2,
    )
    gen = torch.Generator().manual_seed(213)
    inputs = g.padded_inputs(gen, cfg.vocab_size, cfg.type_vocab_size)
    build(TFBertForMaskedLM, BertForMaskedLM, cfg, 203, os.path.join(root, "tf-bert-tiny-both"),
          inputs, ["logits"], "fill-mask",
          "TFBertForMaskedLM, tf_model.h5 and the same weights as model.safetensors "
          "(outputs: BertForMaskedLM, weights converted by transformers)", also_pt=True)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else os.path.dirname(os.path.abspath(__file__)))
