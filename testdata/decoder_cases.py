"""The decoder golden cases with a recorded `generate` (steps.safetensors holding
generate.* tensors), shared by the consumer checks (verify_consumers.py, verify_genai.py)."""

import os
import sys


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


def finish(failures, checked):
    """Counts a run that checked nothing as a failure, prints the closing line and exits
    with 1 on any failure (xtask passes the status on to `cargo xtask verify`)."""
    if checked == 0:
        print("FAIL: no decoder case was checked")
        failures += 1
    print(f"{'FAILED' if failures else 'passed'}: {failures} failure(s) in {checked} case(s)")
    sys.exit(1 if failures else 0)
