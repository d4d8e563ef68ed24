"""ONNX Runtime's reference figures for ferry's real-model int8 test: quantize_dynamic (per
tensor and per channel) on ferry's float exports of all-MiniLM-L6-v2, scored like
crates/cli/tests/cli/quantize.rs scores ferry's own int8 model — mean-pooled embeddings of
the test's SENTENCES against float32: minimum sentence cosine, Spearman correlation of all
pair similarities, unchanged nearest neighbours, file size.

Run with target/ortvenv/bin/python; the token ids come from target/venv's `tokenizers`
(the same tokenizer.json ferry's test reads):

    ferry export --model target/models/all-minilm-l6-v2 --task feature-extraction --quantize D/m.onnx
    target/ortvenv/bin/python xtask/ort_minilm_int8.py D target/models/all-minilm-l6-v2
"""

import json
import os
import re
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.quantization import QuantType, quantize_dynamic

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def sentences():
    src = open(os.path.join(ROOT, "crates/cli/tests/cli/quantize.rs")).read()
    block = src[src.index("const SENTENCES") :]
    return re.findall(r'"([^"]+)"', block[: block.index("];")])


def encode(tokenizer_dir, texts):
    code = (
        "import json, sys; from tokenizers import Tokenizer\n"
        "t = Tokenizer.from_file(sys.argv[1])\n"
        "print(json.dumps([[e.ids, e.attention_mask, e.type_ids] for e in map(t.encode, json.load(sys.stdin))]))"
    )
    py = os.path.join(ROOT, "target/venv/bin/python")
    out = subprocess.run(
        [py, "-c", code, os.path.join(tokenizer_dir, "tokenizer.json")],
        input=json.dumps(texts),
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout)


def embeddings(path, enc):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    s = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    names = [i.name for i in s.get_inputs()]
    out = []
    for ids, mask, types in enc:
        feed = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
        h = s.run(["last_hidden_state"], {n: np.array([feed[n]], dtype=np.int64) for n in names})[0][0]
        m = np.array(mask, dtype=np.float64)[:, None]
        out.append((h * m).sum(0) / m.sum())
    return np.array(out)


def cos(a, b):
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


def structure(e):
    n = len(e)
    sim = np.array([[cos(e[i], e[j]) for j in range(n)] for i in range(n)])
    pairs = sim[np.triu_indices(n, 1)]
    np.fill_diagonal(sim, -np.inf)
    return pairs, sim.argmax(1)


def ranks(v):
    r = np.empty(len(v))
    r[v.argsort()] = np.arange(len(v))
    return r


def score(label, ref, path):
    e = embeddings(path, ENC)
    pairs, nearest = structure(e)
    rho = np.corrcoef(ranks(REF_PAIRS), ranks(pairs))[0, 1]
    print(
        f"{label}: min sentence cosine {cos(ref, e).min():.4f}, pair-similarity Spearman {rho:.4f}, "
        f"nearest neighbours {int((nearest == REF_NEAREST).sum())}/{len(e)} unchanged, {os.path.getsize(path)} bytes"
    )


if __name__ == "__main__":
    d, tok = sys.argv[1], sys.argv[2]
    ENC = encode(tok, sentences())
    ref = embeddings(os.path.join(d, "m.onnx"), ENC)
    REF_PAIRS, REF_NEAREST = structure(ref)
    for src in ["m.onnx", "m-optimized.onnx"]:
        for per_channel in [False, True]:
            dst = os.path.join(d, f"ort-int8-{src[:-5]}-{'pc' if per_channel else 'pt'}.onnx")
            quantize_dynamic(
                os.path.join(d, src),
                dst,
                weight_type=QuantType.QInt8,
                per_channel=per_channel,
                extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
            )
            score(f"quantize_dynamic({src}, per_channel={per_channel})", ref, dst)
    score("ferry export --quantize (defaults)", ref, os.path.join(d, "m-quantized.onnx"))
