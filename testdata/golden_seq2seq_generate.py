"""Generation-settings goldens for the encoder-decoder cases (run by make_golden.py after
golden_seq2seq.py, whose checkpoints it loads): for each case, `model.generate` on the case's
`generate.input_ids` / `generate.attention_mask` under settings the case's own
generation_config does not exercise — early_stopping "never" / False / True with positive,
zero and negative length penalties, no_repeat_ngram_size, min_length, max_length without
max_new_tokens, a list of end-of-sequence ids that rows reach at different steps (finished
rows padded, beam outputs filled as transformers fills them) and single-token bad_words_ids.

Written to `seq2seq-generate/<case>.json`: {"kwargs": generate's extra arguments,
"ids": the returned sequences} per setting. ferry's reference for
crates/cli/tests/cli/generate_seq2seq.rs.
"""

import json
import os

import torch
import transformers
from safetensors.torch import load_file

CASES = ["t5-tiny-v1_0", "t5-tiny-v1_1", "mt5-tiny", "bart-tiny", "mbart-tiny", "marian-tiny"]


def variants(greedy, eos):
    """Settings for one case; `greedy` is its greedy golden, from which an id that row 1
    generates early (and row 0 never, if there is one) becomes an end-of-sequence id, alone
    and with the case's own `eos`."""
    early = next((t for t in greedy[1][2:] if t not in greedy[0]), greedy[1][3])
    # The first distinct generated ids: as extra end-of-sequence ids, t5-tiny-v1_0's rows
    # finish early enough that early_stopping=True's frozen hypotheses and "never"'s
    # max_length heuristic change the answer (found by patching them out in transformers).
    frequent = [t for t in dict.fromkeys(greedy[0][1:] + greedy[1][1:]) if t != eos]
    return [
        dict(num_beams=4, early_stopping="never", length_penalty=1.5),
        dict(num_beams=3, no_repeat_ngram_size=2),
        dict(num_beams=1, no_repeat_ngram_size=2, min_length=10),
        dict(num_beams=2, early_stopping=False, length_penalty=-0.5),
        dict(num_beams=5, early_stopping=True, length_penalty=0.0, max_new_tokens=7),
        dict(num_beams=4, early_stopping="never", length_penalty=-1.0, no_repeat_ngram_size=3),
        dict(num_beams=2, max_length=9, max_new_tokens=None),
        dict(num_beams=1, eos_token_id=[early]),
        dict(num_beams=4, eos_token_id=[eos, early]),
        dict(num_beams=3, bad_words_ids=[[early]]),
        dict(num_beams=4, eos_token_id=[eos, early], early_stopping="never", length_penalty=2.0),
        dict(num_beams=6, eos_token_id=[eos, early], early_stopping="never", length_penalty=0.5),
        dict(num_beams=4, eos_token_id=[eos, early], early_stopping=True, length_penalty=1.0),
        dict(num_beams=6, eos_token_id=[eos, early], early_stopping=False, length_penalty=2.0),
        dict(num_beams=2, eos_token_id=[eos] + frequent[:1], early_stopping=True,
             length_penalty=1.0),
        dict(num_beams=2, eos_token_id=[eos] + frequent[:2], early_stopping="never",
             length_penalty=2.0),
    ]


def make(root, g):
    out_dir = os.path.join(root, "seq2seq-generate")
    g.fresh(out_dir)
    for case in CASES:
        d = os.path.join(root, case)
        model = transformers.AutoModelForSeq2SeqLM.from_pretrained(d, dtype=torch.float32).eval()
        steps = load_file(os.path.join(d, "steps.safetensors"))
        ids, mask = steps["generate.input_ids"], steps["generate.attention_mask"]
        answers = []
        eos = model.generation_config.eos_token_id
        for v in variants(steps["generate.greedy_ids"].tolist(), eos):
            kwargs = dict(max_new_tokens=16)
            kwargs.update(v)
            with torch.no_grad():
                seqs = model.generate(input_ids=ids, attention_mask=mask, do_sample=False,
                                      **kwargs)
            answers.append({"kwargs": kwargs, "ids": seqs.tolist()})
        with open(os.path.join(out_dir, f"{case}.json"), "w") as f:
            json.dump({"transformers": transformers.__version__, "torch": torch.__version__,
                       "case": case, "generate": answers}, f)
            f.write("\n")
