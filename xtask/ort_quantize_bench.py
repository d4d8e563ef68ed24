"""ONNX Runtime's side of `cargo xtask bench --quantize`: quantize_dynamic on the same
optimized float model ferry quantizes (timed, sized), and optionally ONNX Runtime latency of
both int8 models on the same inputs in one process.

Run with target/ortvenv/bin/python (onnxruntime, onnx, numpy). Prints one JSON object.

    python ort_quantize_bench.py --optimized F32.onnx --ort-out ORT_INT8.onnx \
        [--latency FERRY_INT8.onnx] [--seq 128] [--threads 2] [--runs 30]
"""

import argparse
import json
import os
import statistics
import time

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.quantization import QuantType, quantize_dynamic


def quantize(src, dst):
    start = time.perf_counter()
    # On a graph with ONNX Runtime's contrib ops (Attention, EmbedLayerNormalization),
    # quantize_dynamic cannot infer some tensors' types without this option.
    quantize_dynamic(
        src,
        dst,
        weight_type=QuantType.QInt8,
        extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
    )
    return time.perf_counter() - start


def session(path, threads):
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def feed(sess, seq, vocab=1000):
    rng = np.random.default_rng(0)
    inputs = {}
    for i in sess.get_inputs():
        if i.name == "attention_mask":
            v = np.ones((1, seq), dtype=np.int64)
        elif i.name == "token_type_ids":
            v = np.zeros((1, seq), dtype=np.int64)
        else:
            v = rng.integers(0, vocab, size=(1, seq), dtype=np.int64)
        inputs[i.name] = v
    return inputs


def latency(paths, seq, threads, runs):
    sessions = {name: session(p, threads) for name, p in paths.items()}
    inputs = {name: feed(s, seq) for name, s in sessions.items()}
    times = {name: [] for name in sessions}
    for name, s in sessions.items():
        for _ in range(3):
            s.run(None, inputs[name])
    # Interleaved, so that machine load drifts affect both alike.
    for _ in range(runs):
        for name, s in sessions.items():
            start = time.perf_counter()
            s.run(None, inputs[name])
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--optimized", required=True)
    ap.add_argument("--ort-out", required=True)
    ap.add_argument("--latency", metavar="FERRY_INT8")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=30)
    a = ap.parse_args()
    result = {
        "onnxruntime": ort.__version__,
        "ort_quantize_seconds": quantize(a.optimized, a.ort_out),
        "ort_int8_bytes": os.path.getsize(a.ort_out),
    }
    if a.latency:
        ms = latency(
            {"ferry_int8": a.latency, "ort_int8": a.ort_out, "fp32_optimized": a.optimized},
            a.seq,
            a.threads,
            a.runs,
        )
        result.update({f"{k}_ms": v for k, v in ms.items()})
    print(json.dumps(result))


if __name__ == "__main__":
    main()
