"""sentence-transformers golden cases (st-*): tiny seeded encoders saved by
sentence-transformers itself (modules.json, 1_Pooling/config.json, 2_Dense/…), with
`sentence_embedding` recorded from its forward on a padded batch beside the token states
(`last_hidden_state`, which sentence-transformers calls token_embeddings).

Run by make_golden.py (`--only golden_sentence`). Needs the sentence-transformers pin of
xtask's GOLDEN_PACKAGES. The cases cover every pooling mode (two concatenated in one
case), Dense layers (tanh with bias, identity without, ReLU with a residual), with and
without Normalize, right and left padding, BERT and DistilBERT (no token_type_ids). The
cases also record `encode()` of RUN_TEXTS one sentence at a time (case.json `encode`),
which `ferry run` is checked against.
"""

import json
import os
import tempfile

import torch
from transformers import BertConfig, BertModel, DistilBertConfig, DistilBertModel

RUN_TEXTS = ["The cat sat on the mat.", "Paris is the capital of France.", "I love this movie!"]

CASES = [
    # (name, model kind, pooling modes, dense layers [(out, bias, activation, residual)],
    #  normalize, left padding)
    ("st-bert-tiny-mean-normalize", "bert", "mean", [], True, False),
    ("st-bert-tiny-cls-dense", "bert", "cls", [(12, True, "Tanh", False)], False, False),
    ("st-bert-tiny-max-lasttoken", "bert", ("max", "lasttoken"),
     [(20, False, "Identity", False)], True, True),
    ("st-bert-tiny-sqrt-weightedmean", "bert", ("mean_sqrt_len_tokens", "weightedmean"), [],
     False, True),
    ("st-distilbert-tiny-mean-dense", "distilbert", "mean",
     [(24, True, "ReLU", True), (10, True, "Identity", False)], True, False),
]


def base_model(kind, seed):
    torch.manual_seed(seed)
    if kind == "bert":
        cfg = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=30, max_position_embeddings=40, type_vocab_size=2,
                         initializer_range=0.2, hidden_act="gelu")
        return BertModel(cfg).eval(), cfg.vocab_size
    cfg = DistilBertConfig(vocab_size=64, dim=24, n_layers=2, n_heads=4, hidden_dim=40,
                           max_position_embeddings=40, initializer_range=0.2, activation="gelu")
    return DistilBertModel(cfg).eval(), cfg.vocab_size


def make(root, g):
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.base.modules import Dense, Normalize, Transformer
    from sentence_transformers.sentence_transformer.modules import Pooling
    import sentence_transformers

    for seed, (name, kind, modes, denses, normalize, left) in enumerate(CASES, start=700):
        model, vocab = base_model(kind, seed)
        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(tmp)
            g.save_tokenizer(tmp, vocab, 40)
            transformer = Transformer(tmp, max_seq_length=40)
            width = transformer.get_embedding_dimension()
            modules = [transformer, Pooling(width, pooling_mode=modes)]
            width = modules[-1].get_embedding_dimension()
            for out, bias, act, residual in denses:
                modules.append(Dense(width, out, bias=bias, use_residual=residual,
                                     activation_function=getattr(torch.nn, act)()))
                width = out
            if normalize:
                modules.append(Normalize())
            st = SentenceTransformer(modules=modules, device="cpu").eval()
            d = os.path.join(root, name)
            g.fresh(d)
            st.save(d)
        gen = torch.Generator().manual_seed(seed + 100)
        inputs = g.padded_inputs(gen, vocab, 2)
        if left:
            # Left padding: each row's tokens moved to its end.
            for k in inputs:
                for row, n in enumerate((11, 7, 4)):
                    inputs[k][row] = torch.roll(inputs[k][row], 11 - n)
        if kind == "distilbert":
            del inputs["token_type_ids"]
        with torch.no_grad():
            features = st(dict(inputs))
        # In the export's output order; BERT's pooler_output from the same base model.
        outputs = {"last_hidden_state": features["token_embeddings"]}
        if kind == "bert":
            with torch.no_grad():
                outputs["pooler_output"] = st[0].auto_model(**inputs).pooler_output
        outputs["sentence_embedding"] = features["sentence_embedding"]
        meta = {
            "description": f"sentence-transformers {kind}: pooling {modes}, dense {denses}, "
                           f"normalize {normalize}, {'left' if left else 'right'} padding",
            "weights": "model.safetensors",
            "sentence_transformers": sentence_transformers.__version__,
        }
        emb = st.encode(RUN_TEXTS, batch_size=1, convert_to_numpy=True)
        meta["encode"] = [{"text": s, "sentence_embedding": [float(f"{x:.8g}") for x in e]}
                          for s, e in zip(RUN_TEXTS, emb)]
        g.save_golden(d, inputs, outputs, meta)
