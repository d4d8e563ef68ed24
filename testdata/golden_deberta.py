"""DeBERTa-v2 golden cases (deberta-v2-tiny-<task>[-variant]) and DeBERTa v1 ones
(deberta-tiny-<task>, see V1_CASES).

Run by make_golden.py (`--only golden_deberta`). Disentangled attention in the switches
DeBERTa-v2/v3 checkpoints use: `share_att_key` on and off, `pos_att_type` as c2p|p2c in
both orders (string and list forms) and each term alone, log-bucketed relative positions
(`position_buckets` below the golden sequence length of 11, so both the exact and the log
buckets occur) and plain clamped ones (`max_relative_positions` < 11), `norm_rel_ebd`
layer_norm, `position_biased_input` on and off, token types present or absent
(`type_vocab_size` 0 drops token_type_ids from the inputs, as optimum's export does),
`embedding_size` != `hidden_size` (`embed_proj`), both masked-LM heads (`legacy`
cls.predictions, tied and untied, and lm_predictions.lm_head), ContextPooler activations, the
ConvLayer (`conv_kernel_size`), and one case without relative attention. Padding uses id 0
(DeBERTa-v2's pad_token_id).
"""

import os

import torch
from transformers import (
    DebertaV2Config,
    DebertaV2ForMaskedLM,
    DebertaV2ForMultipleChoice,
    DebertaV2ForQuestionAnswering,
    DebertaV2ForSequenceClassification,
    DebertaV2ForTokenClassification,
    DebertaV2Model,
)

V3 = dict(relative_attention=True, position_biased_input=False, norm_rel_ebd="layer_norm",
          share_att_key=True, type_vocab_size=0)

CASES = [
    # (case suffix, task, model class, output names, config overrides)
    ("feature-extraction", "feature-extraction", DebertaV2Model, ["last_hidden_state"],
     dict(V3, pos_att_type="p2c|c2p", position_buckets=8, max_relative_positions=64,
          vocab_size=99, hidden_size=32, num_attention_heads=4, intermediate_size=37,
          num_hidden_layers=2, hidden_act="gelu")),
    ("fill-mask", "fill-mask", DebertaV2ForMaskedLM, ["logits"],
     dict(relative_attention=True, pos_att_type=["c2p", "p2c"], share_att_key=False,
          max_relative_positions=6, position_biased_input=True, type_vocab_size=2,
          embedding_size=12, vocab_size=80, hidden_size=24, num_attention_heads=3,
          intermediate_size=41, num_hidden_layers=2, hidden_act="gelu_new", layer_norm_eps=1e-6)),
    ("fill-mask-lmhead", "fill-mask", DebertaV2ForMaskedLM, ["logits"],
     dict(V3, legacy=False, pos_att_type=["p2c", "c2p"], position_buckets=6,
          max_relative_positions=20, vocab_size=70, hidden_size=16, num_attention_heads=2,
          intermediate_size=28, num_hidden_layers=2, hidden_act="gelu")),
    ("text-classification", "text-classification", DebertaV2ForSequenceClassification, ["logits"],
     dict(relative_attention=True, pos_att_type=["p2c", "c2p"], share_att_key=False,
          position_buckets=10, max_relative_positions=40, norm_rel_ebd="layer_norm",
          position_biased_input=False, type_vocab_size=2, vocab_size=64, hidden_size=20,
          num_attention_heads=5, intermediate_size=30, num_hidden_layers=3, hidden_act="relu",
          pooler_hidden_act="tanh", num_labels=3,
          id2label={0: "negative", 1: "neutral", 2: "positive"},
          label2id={"negative": 0, "neutral": 1, "positive": 2})),
    ("token-classification", "token-classification", DebertaV2ForTokenClassification, ["logits"],
     dict(V3, pos_att_type=["c2p"], position_buckets=8, max_relative_positions=32,
          vocab_size=70, hidden_size=16, num_attention_heads=2, intermediate_size=28,
          num_hidden_layers=2, num_labels=5, layer_norm_eps=1e-5)),
    ("question-answering", "question-answering", DebertaV2ForQuestionAnswering,
     ["start_logits", "end_logits"],
     dict(relative_attention=True, pos_att_type="p2c", share_att_key=False, position_buckets=4,
          max_relative_positions=16, type_vocab_size=0, vocab_size=90, hidden_size=24,
          num_attention_heads=4, intermediate_size=33, num_hidden_layers=2, hidden_act="gelu_new")),
    ("multiple-choice", "multiple-choice", DebertaV2ForMultipleChoice, ["logits"],
     dict(V3, pos_att_type="p2c|c2p", position_buckets=6, max_relative_positions=24,
          vocab_size=64, hidden_size=16, num_attention_heads=4, intermediate_size=24,
          num_hidden_layers=2, hidden_act="silu")),
    ("text-classification-absolute", "text-classification", DebertaV2ForSequenceClassification,
     ["logits"],
     dict(relative_attention=False, pos_att_type=None, position_biased_input=True,
          type_vocab_size=2, vocab_size=50, hidden_size=16, num_attention_heads=2,
          intermediate_size=20, num_hidden_layers=2, num_labels=2)),
    # Untied legacy head: cls.predictions.decoder keeps its own weight and bias (the head's
    # `bias` is then unused); the zero-initialized biases are randomized below.
    ("fill-mask-untied", "fill-mask", DebertaV2ForMaskedLM, ["logits"],
     dict(relative_attention=True, pos_att_type="c2p|p2c", position_buckets=6,
          share_att_key=False, tie_word_embeddings=False, type_vocab_size=0, vocab_size=50, hidden_size=16,
          num_attention_heads=2, intermediate_size=20, num_hidden_layers=1)),
    # DeBERTa-v2-xlarge's ConvLayer after the first layer (grouped, gelu).
    ("token-classification-conv", "token-classification", DebertaV2ForTokenClassification,
     ["logits"],
     dict(V3, pos_att_type="p2c|c2p", position_buckets=8, max_relative_positions=32,
          conv_kernel_size=3, conv_groups=2, conv_act="gelu", vocab_size=60, hidden_size=16,
          num_attention_heads=2, intermediate_size=24, num_hidden_layers=2, num_labels=4)),
]


def _make_case(root, g, dir_name, seed, model, task, names, describe):
    """Saves `model` (seeded with `seed`) and its outputs on padded inputs (no
    token_type_ids where type_vocab_size is 0) as the case `dir_name`."""
    cfg = model.config
    d = os.path.join(root, dir_name)
    g.fresh(d)
    model.save_pretrained(d)
    gen = torch.Generator().manual_seed(seed + 100)
    inputs = g.task_inputs(gen, cfg.vocab_size, max(cfg.type_vocab_size, 1), task)
    if cfg.type_vocab_size == 0:
        del inputs["token_type_ids"]
    with torch.no_grad():
        out = model(**inputs, return_dict=False)
    outputs = {n: out[i] for i, n in enumerate(names)}
    g.save_golden(d, inputs, outputs, {"description": describe(cfg), "weights": "model.safetensors"},
                  task=task)


def make(root, g):
    for seed, (name, task, cls, names, extra) in enumerate(CASES, start=1400):
        cfg = DebertaV2Config(max_position_embeddings=40, initializer_range=0.2, **extra)
        torch.manual_seed(seed)
        model = cls(cfg).eval()
        if not cfg.tie_word_embeddings:
            with torch.no_grad():
                for n, p in model.named_parameters():
                    if n.startswith("cls.predictions") and n.endswith("bias"):
                        p.normal_(0, 0.5)

        def describe(cfg, cls=cls):
            rel = (f"share_att_key={cfg.share_att_key}, pos_att_type={cfg.pos_att_type}, "
                   f"position_buckets={getattr(cfg, 'position_buckets', -1)}, "
                   f"max_relative_positions={cfg.max_relative_positions}, "
                   f"norm_rel_ebd={getattr(cfg, 'norm_rel_ebd', 'none')}"
                   if cfg.relative_attention else "no relative attention")
            return (f"{cls.__name__}, {cfg.hidden_act}, {rel}, "
                    f"position_biased_input={cfg.position_biased_input}, "
                    f"type_vocab_size={cfg.type_vocab_size}, legacy={cfg.legacy}, safetensors")
        _make_case(root, g, f"deberta-v2-tiny-{name}", seed, model, task, names, describe)
    make_v1(root, g)


# DeBERTa v1 (model_type `deberta`): packed in_proj with q_bias / v_bias, pos_proj /
# pos_q_proj, no bucketing; max_relative_positions below and above the golden length (the
# relative table is sliced to min(seq, max_relative_positions) rows either side).
V1_CASES = [
    ("feature-extraction", "feature-extraction", "DebertaModel", ["last_hidden_state"],
     dict(relative_attention=True, pos_att_type="c2p|p2c", max_relative_positions=6,
          position_biased_input=False, type_vocab_size=0, vocab_size=99, hidden_size=32,
          num_attention_heads=4, intermediate_size=37, num_hidden_layers=2)),
    ("fill-mask", "fill-mask", "DebertaForMaskedLM", ["logits"],
     dict(relative_attention=True, pos_att_type=["p2c", "c2p"], max_relative_positions=-1,
          type_vocab_size=2, vocab_size=80, hidden_size=24, num_attention_heads=3,
          intermediate_size=41, num_hidden_layers=2, hidden_act="gelu_new")),
    ("text-classification", "text-classification", "DebertaForSequenceClassification", ["logits"],
     dict(relative_attention=True, pos_att_type=["c2p"], max_relative_positions=16,
          type_vocab_size=0, vocab_size=64, hidden_size=20, num_attention_heads=5,
          intermediate_size=30, num_hidden_layers=2, hidden_act="relu", num_labels=3)),
    ("token-classification", "token-classification", "DebertaForTokenClassification", ["logits"],
     dict(relative_attention=True, pos_att_type="p2c", max_relative_positions=8,
          position_biased_input=False, vocab_size=70, hidden_size=16, num_attention_heads=2,
          intermediate_size=28, num_hidden_layers=2, num_labels=5)),
    ("question-answering", "question-answering", "DebertaForQuestionAnswering",
     ["start_logits", "end_logits"],
     dict(relative_attention=True, pos_att_type="c2p|p2c", max_relative_positions=32,
          vocab_size=90, hidden_size=24, num_attention_heads=4, intermediate_size=33,
          num_hidden_layers=2)),
]


def make_v1(root, g):
    import transformers
    from transformers import DebertaConfig
    for seed, (name, task, cls_name, names, extra) in enumerate(V1_CASES, start=1500):
        cls = getattr(transformers, cls_name)
        cfg = DebertaConfig(max_position_embeddings=40, initializer_range=0.2, **extra)
        torch.manual_seed(seed)
        model = cls(cfg).eval()
        # q_bias / v_bias start at zero: make them count.
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n.endswith(("q_bias", "v_bias")):
                    p.normal_(0, 0.2)

        def describe(cfg, cls_name=cls_name):
            return (f"{cls_name}, {cfg.hidden_act}, pos_att_type={cfg.pos_att_type}, "
                    f"max_relative_positions={cfg.max_relative_positions}, "
                    f"position_biased_input={cfg.position_biased_input}, "
                    f"type_vocab_size={cfg.type_vocab_size}, safetensors")
        _make_case(root, g, f"deberta-tiny-{name}", seed, model, task, names, describe)
