"""Encoder-decoder golden cases (run by make_golden.py): one tiny seeded checkpoint per
model_type and switch — T5 v1.0 (ReLU, tied LM head), T5 v1.1 (gated-GELU, untied), mT5,
BART (post-norm, learned positions), mBART (pre-norm, forced BOS), Marian (sinusoidal
positions, scaled embeddings, final_logits_bias, pad as decoder start, bad_words_ids).

For each case, `steps.safetensors` holds
  encoder.input.input_ids / .attention_mask   a right-padded batch of 2 (lengths 9 and 5)
  encoder.output.last_hidden_state            the encoder's output on it
  step0.input.input_ids      [2, 4]: decoder_start_token_id + 3 random ids (the uncached call)
  step{1,2,3}.input.input_ids [2, 1]: the greedy argmax of the previous step's last logits
  step{k}.output.logits       the decoder's logits at each step (the cache fed back), with
                              encoder_hidden_states = the encoder output above and
                              encoder_attention_mask = the encoder's attention_mask
  generate.input_ids / generate.attention_mask  the same batch
  generate.greedy_ids / generate.beam4_ids      model.generate(max_new_tokens=16) with
                              num_beams 1 / 4 under the checkpoint's generation_config
and case.json has `"kind": "seq2seq"`, task text2text-generation-with-past.

`run-t5-tiny/` (seq2seq_pipelines.py, run in transformers 4.57: version 5 dropped the
translation and summarization pipelines) is a T5 checkpoint with a Unigram tokenizer and
t5-small's `task_specific_params`; run.json records what those pipelines answer.
"""

import os
import subprocess

import torch
from safetensors.torch import save_file
from transformers import (
    BartConfig,
    BartForConditionalGeneration,
    GenerationConfig,
    MarianConfig,
    MarianMTModel,
    MBartConfig,
    MBartForConditionalGeneration,
    MT5Config,
    MT5ForConditionalGeneration,
    T5Config,
    T5ForConditionalGeneration,
)

VOCAB = 96
LENGTHS = (9, 5)
DECODER_PREFIX = 3
NEW_TOKENS = 16

T5_BASE = dict(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=2,
               num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=20,
               dropout_rate=0.0, layer_norm_epsilon=1e-6, initializer_factor=3.0,
               pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
BART_BASE = dict(vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2,
                 encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=48,
                 decoder_ffn_dim=48, max_position_embeddings=64, dropout=0.0,
                 attention_dropout=0.0, activation_dropout=0.0, init_std=0.2)

# (case name, config class, model class, config overrides, generation config)
CASES = [
    ("t5-tiny-v1_0", T5Config, T5ForConditionalGeneration,
     dict(T5_BASE, feed_forward_proj="relu", tie_word_embeddings=True),
     dict(decoder_start_token_id=0, eos_token_id=1, pad_token_id=0)),
    ("t5-tiny-v1_1", T5Config, T5ForConditionalGeneration,
     dict(T5_BASE, feed_forward_proj="gated-gelu", tie_word_embeddings=False, d_kv=12),
     dict(decoder_start_token_id=0, eos_token_id=1, pad_token_id=0, num_beams=4,
          length_penalty=0.6, early_stopping=True)),
    ("mt5-tiny", MT5Config, MT5ForConditionalGeneration,
     dict(T5_BASE, feed_forward_proj="gated-gelu", tie_word_embeddings=False),
     dict(decoder_start_token_id=0, eos_token_id=1, pad_token_id=0)),
    ("bart-tiny", BartConfig, BartForConditionalGeneration,
     dict(BART_BASE, activation_function="gelu", scale_embedding=False, bos_token_id=0,
          pad_token_id=1, eos_token_id=2, decoder_start_token_id=2),
     dict(bos_token_id=0, pad_token_id=1, eos_token_id=2, decoder_start_token_id=2,
          forced_bos_token_id=0, forced_eos_token_id=2, num_beams=4, length_penalty=2.0,
          early_stopping=True)),
    ("mbart-tiny", MBartConfig, MBartForConditionalGeneration,
     dict(BART_BASE, activation_function="relu", scale_embedding=True, bos_token_id=0,
          pad_token_id=1, eos_token_id=2, decoder_start_token_id=2),
     dict(bos_token_id=0, pad_token_id=1, eos_token_id=2, decoder_start_token_id=2,
          forced_bos_token_id=7, forced_eos_token_id=2, num_beams=2, early_stopping=False)),
    ("marian-tiny", MarianConfig, MarianMTModel,
     dict(BART_BASE, activation_function="swish", scale_embedding=True,
          share_encoder_decoder_embeddings=True, pad_token_id=VOCAB - 1, eos_token_id=0,
          decoder_start_token_id=VOCAB - 1),
     dict(pad_token_id=VOCAB - 1, eos_token_id=0, decoder_start_token_id=VOCAB - 1,
          forced_eos_token_id=0, bad_words_ids=[[VOCAB - 1]])),
]


def right_padded(gen, pad, low, high, lengths=LENGTHS):
    seq = max(lengths)
    ids = torch.randint(low, high, (len(lengths), seq), generator=gen)
    mask = torch.zeros((len(lengths), seq), dtype=torch.int64)
    for row, n in enumerate(lengths):
        mask[row, :n] = 1
    return ids.masked_fill(mask == 0, pad), mask


def free_ids(gc):
    """Ids the random inputs may use: everything but the special tokens."""
    special = {gc.pad_token_id, gc.eos_token_id, gc.decoder_start_token_id,
               getattr(gc, "bos_token_id", None)}
    return [i for i in range(VOCAB) if i not in special]


def steps_golden(model, gen, gc):
    ids_pool = torch.tensor(free_ids(gc))
    pick = lambda shape: ids_pool[torch.randint(0, len(ids_pool), shape, generator=gen)]
    ids, mask = right_padded(gen, gc.pad_token_id, 0, 1)
    ids = torch.where(mask == 1, pick(ids.shape), ids)
    tensors = {"encoder.input.input_ids": ids, "encoder.input.attention_mask": mask}
    with torch.no_grad():
        enc = model.get_encoder()(input_ids=ids, attention_mask=mask, return_dict=True)
    hidden = enc.last_hidden_state
    tensors["encoder.output.last_hidden_state"] = hidden.contiguous()
    start = torch.full((2, 1), gc.decoder_start_token_id, dtype=torch.int64)
    dec = torch.cat([start, pick((2, DECODER_PREFIX))], dim=1)
    cache = None
    for step in range(4):
        with torch.no_grad():
            out = model(encoder_outputs=(hidden,), attention_mask=mask, decoder_input_ids=dec,
                        past_key_values=cache, use_cache=True, return_dict=True)
        tensors[f"step{step}.input.input_ids"] = dec.contiguous()
        tensors[f"step{step}.output.logits"] = out.logits.float().contiguous()
        cache = out.past_key_values
        dec = out.logits[:, -1, :].argmax(-1, keepdim=True)
    tensors["generate.input_ids"] = ids.clone()
    tensors["generate.attention_mask"] = mask.clone()
    for name, beams in (("greedy", 1), ("beam4", 4)):
        with torch.no_grad():
            seqs = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW_TOKENS,
                                  num_beams=beams, do_sample=False)
        assert seqs.shape[1] >= 12, f"{name}: generation stopped before 12 tokens; pick another seed"
        tensors[f"generate.{name}_ids"] = seqs.contiguous()
    return tensors


def build(cfg_cls, model_cls, extra, gen_extra, seed):
    cfg = cfg_cls(**extra)
    torch.manual_seed(seed)
    model = model_cls(cfg).eval()
    model.generation_config = GenerationConfig(**gen_extra)
    return model


def make(root, g):
    for seed, (name, cfg_cls, model_cls, extra, gen_extra) in enumerate(CASES, start=500):
        model = build(cfg_cls, model_cls, extra, gen_extra, seed)
        d = os.path.join(root, name)
        g.fresh(d)
        model.save_pretrained(d)
        model = model_cls.from_pretrained(d, dtype=torch.float32).eval()
        tensors = steps_golden(model, torch.Generator().manual_seed(seed + 1000),
                               model.generation_config)
        save_file(tensors, os.path.join(d, "steps.safetensors"))
        switches = ", ".join(f"{k}={v}" for k, v in extra.items()
                             if k not in T5_BASE and k not in BART_BASE)
        g.write_case(d, {
            "description": f"{model_cls.__name__} ({switches}): encoder on a right-padded batch, "
                           f"decoder prefill of {DECODER_PREFIX + 1} tokens + 3 cached greedy steps, "
                           f"generate() {NEW_TOKENS} new tokens greedy and with 4 beams",
            "kind": "seq2seq", "task": "text2text-generation-with-past", "steps": 4,
            "model_type": model.config.model_type, "weights": "model.safetensors",
            "generation": dict(gen_extra, max_new_tokens=NEW_TOKENS),
        })
    # transformers 5 removed the translation and summarization pipelines: their answers come
    # from transformers 4.57 (target/optvenv, the consumer check's environment).
    py = os.environ.get("FERRY_PIPELINES_PYTHON") or os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "..", "target", "optvenv", "bin", "python")
    d = os.path.join(root, "run-t5-tiny")
    g.fresh(d)
    subprocess.run([py, os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                     "seq2seq_pipelines.py"), d], check=True)
