"""The decoder golden cases with a recorded `generate` (steps.safetensors holding
generate.* tensors), shared by the consumer checks (verify_consumers.py, verify_genai.py)."""

import os


def generate_cases(testdata, load_file):
    """Yields (case name, its directory, its steps tensors loaded with `load_file`) in
    name order."""
    for case in sorted(os.listdir(testdata)):
        steps = os.path.join(testdata, case, "steps.safetensors")
        if not os.path.isfile(steps):
            continue
        st = load_file(steps)
        if "generate.output_ids" in st:
            yield case, os.path.join(testdata, case), st
