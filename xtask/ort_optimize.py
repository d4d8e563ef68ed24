"""ONNX Runtime's side of `cargo xtask bench --latency`: runs ONNX Runtime's transformers
optimizer (onnxruntime.transformers.optimizer, model type bert) on ferry's plain export, so
that its output can be timed in ONNX Runtime next to ferry's own optimized export.

Run with target/ortvenv/bin/python (onnxruntime, onnx, numpy). Prints one JSON object: the
onnxruntime version, the optimizer's wall time, its fused-operator statistics, and the op
counts (by domain and op type) of its output and of every --count file.

    python ort_optimize.py --input PLAIN.onnx --output ORT_OPT.onnx \
        [--num-heads 12] [--hidden-size 768] [--opt-level 1] [--count OTHER.onnx ...] \
        [--torch-site DIR]

At opt_level >= 1 onnxruntime's optimizer imports torch (only to check its version). When the
onnxruntime venv has no torch, --torch-site names another environment's site-packages
directory (e.g. target/venv's), appended at the end of sys.path so that nothing else is
taken from it.
"""

import argparse
import collections
import json
import sys
import time

import onnx
import onnxruntime
from onnxruntime.transformers.optimizer import optimize_model

assert onnx and onnxruntime  # imported before --torch-site can widen sys.path


def op_counts(path):
    model = onnx.load(path, load_external_data=False)
    counts = collections.Counter(
        (n.domain + "." if n.domain else "") + n.op_type for n in model.graph.node
    )
    return dict(sorted(counts.items()))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--input", required=True)
    ap.add_argument("--output", required=True)
    ap.add_argument("--num-heads", type=int, default=12)
    ap.add_argument("--hidden-size", type=int, default=768)
    ap.add_argument("--opt-level", type=int, default=1)
    ap.add_argument("--count", nargs="*", default=[])
    ap.add_argument("--torch-site")
    a = ap.parse_args()
    if a.torch_site:
        sys.path.append(a.torch_site)

    start = time.perf_counter()
    model = optimize_model(
        a.input,
        model_type="bert",
        num_heads=a.num_heads,
        hidden_size=a.hidden_size,
        opt_level=a.opt_level,
        use_gpu=False,
    )
    model.save_model_to_file(a.output)
    seconds = time.perf_counter() - start
    fused = {k: v for k, v in model.get_fused_operator_statistics().items() if v}
    print(
        json.dumps(
            {
                "onnxruntime": onnxruntime.__version__,
                "seconds": seconds,
                "fused": fused,
                "ops": {p: op_counts(p) for p in [a.output, *a.count]},
            }
        )
    )


if __name__ == "__main__":
    main()
