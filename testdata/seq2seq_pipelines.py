"""`run-t5-tiny`: what transformers' translation and summarization pipelines answer on a
tiny T5 with a real tokenizer. Run by golden_seq2seq.py in transformers 4.57 (target/optvenv):
transformers 5 removed those pipelines. Usage: seq2seq_pipelines.py OUT_DIR."""

import json
import math
import os
import sys


import torch
import transformers
from transformers import GenerationConfig, T5Config, T5ForConditionalGeneration

VOCAB = 96
T5_BASE = dict(d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=2,
               num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=20,
               dropout_rate=0.0, layer_norm_epsilon=1e-6, initializer_factor=3.0,
               pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)

CORPUS = [
    "the house is wonderful and the garden is green",
    "translate English to French: the cat sleeps on the warm stone",
    "summarize: a small model runs on a small machine without python",
    "the weather today is cold but the sun is bright",
    "ferry exports transformer models to onnx files",
    "la maison est belle et le jardin est vert",
    "le chat dort sur la pierre chaude",
    "a quick brown fox jumps over the lazy dog",
    "models translate sentences from english to german and romanian",
    "das haus ist wunderbar und der garten ist gruen",
]

# t5-small's task_specific_params (its config.json).
T5_TASKS = {
    "summarization": {"early_stopping": True, "length_penalty": 2.0, "max_length": 200,
                      "min_length": 30, "no_repeat_ngram_size": 3, "num_beams": 4,
                      "prefix": "summarize: "},
    "translation_en_to_de": {"early_stopping": True, "max_length": 300, "num_beams": 4,
                             "prefix": "translate English to German: "},
    "translation_en_to_fr": {"early_stopping": True, "max_length": 300, "num_beams": 4,
                             "prefix": "translate English to French: "},
    "translation_en_to_ro": {"early_stopping": True, "max_length": 300, "num_beams": 4,
                             "prefix": "translate English to Romanian: "},
}

RUN_TEXTS = [
    ("translation_en_to_fr", "the house is wonderful"),
    ("translation_en_to_de", "the cat sleeps on the warm stone"),
    ("translation_en_to_ro", "a quick brown fox"),
    ("summarization", "a small model runs on a small machine without python and the sun is bright"),
]


def main(d):
    """A T5 v1.1 checkpoint with a Unigram tokenizer over CORPUS (T5's special tokens:
    <pad> 0, </s> 1, <unk> 2, `</s>` appended), t5-small's task_specific_params, and the
    translation/summarization pipelines' answers."""
    from tokenizers import SentencePieceUnigramTokenizer, Tokenizer, processors
    from transformers import PreTrainedTokenizerFast, pipeline

    backend = SentencePieceUnigramTokenizer()
    backend.train_from_iterator(CORPUS, vocab_size=VOCAB, special_tokens=["<pad>", "</s>", "<unk>"],
                                unk_token="<unk>", show_progress=False)
    backend.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)])
    # The trainer's piece scores (and so the pieces kept) vary from run to run. The model's
    # vocabulary is instead counted here: every character of CORPUS, `▁`, then whole words
    # `▁word` by frequency; score = log(count / total). Same bytes every time.
    spec = json.loads(backend._tokenizer.to_str())
    counts = {}
    for line in CORPUS:
        for word in line.split():
            counts["\u2581" + word] = counts.get("\u2581" + word, 0) + 1
            for ch in word:
                counts[ch] = counts.get(ch, 0) + 1
            counts["\u2581"] = counts.get("\u2581", 0) + 1
    singles = sorted(p for p in counts if len(p) == 1)
    words = sorted((p for p in counts if len(p) > 1), key=lambda p: (-counts[p], p))
    kept = singles + words[:VOCAB - 3 - len(singles)]
    total = sum(counts[p] for p in kept)
    spec["model"]["vocab"] = spec["model"]["vocab"][:3] + [
        [p, round(math.log(counts[p] / total), 6)] for p in kept]
    backend = Tokenizer.from_str(json.dumps(spec))
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>",
                                  eos_token="</s>", unk_token="<unk>", model_max_length=512)
    assert tok.convert_tokens_to_ids(["<pad>", "</s>", "<unk>"]) == [0, 1, 2]
    cfg = T5Config(**dict(T5_BASE, vocab_size=len(tok), feed_forward_proj="gated-gelu",
                          tie_word_embeddings=False, task_specific_params=T5_TASKS))
    torch.manual_seed(560)
    model = T5ForConditionalGeneration(cfg).eval()
    model.generation_config = GenerationConfig(decoder_start_token_id=0, eos_token_id=1,
                                               pad_token_id=0)
    model.save_pretrained(d)
    tok.save_pretrained(d)
    answers = []
    for task, text in RUN_TEXTS:
        p = pipeline(task, model=model, tokenizer=tok)
        key = "summary_text" if task == "summarization" else "translation_text"
        kwargs = {"max_new_tokens": 20}
        if task == "summarization":
            kwargs["min_length"] = 4
        out = p(text, **kwargs)[0][key]
        answers.append({"task": task, "text": text, "kwargs": kwargs, key: out})
    with open(os.path.join(d, "run.json"), "w") as f:
        json.dump({"description": "T5ForConditionalGeneration (gated-gelu) + Unigram tokenizer "
                   "trained on a toy corpus, t5-small's task_specific_params: the translation "
                   "and summarization pipelines' answers",
                   "transformers": transformers.__version__, "answers": answers}, f, indent=2)
        f.write("\n")


if __name__ == "__main__":
    torch.use_deterministic_algorithms(True)
    main(sys.argv[1])
