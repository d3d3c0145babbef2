"""Calibration (closed-form refit) speed: teacher outputs captured per window of layers vs one layer per pass.

Run:  python benchmarks/calibration.py [--model resnet50] [--size 112] [--samples 64] [--threads 2]

Converts a torchvision model (random weights) at rank 1 with random
calibration inputs, twice in one run: with the default teacher-output window
(several layers per partial pass of the original model, up to 256 MB) and
with a window of one layer (one teacher pass per layer, as before the
window). Prints wall time and the held-out fidelity, which must be
identical.
"""

from __future__ import annotations

import argparse
import time

import torch
import torchvision

import sepify
from sepify import refine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--size", type=int, default=112)
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = torchvision.models.get_model(args.model, weights=None).eval()
    x = torch.randn(1, 3, args.size, args.size)
    data = torch.randn(args.samples, 3, args.size, args.size)
    window = refine._TARGET_BYTES
    print(f"torch {torch.__version__}; {args.threads} thread(s); {args.model}, {args.samples} samples at {args.size}")
    print(f"{'targets per teacher pass':<26} {'seconds':>8} {'refined held-out error':>23}")
    for label, budget in (("one layer", 1), (f"window ({window >> 20} MB)", window)):
        refine._TARGET_BYTES = budget
        start = time.perf_counter()
        report = sepify.convert(model, x, rank=1, calibration=data).report
        seconds = time.perf_counter() - start
        refined = next(s for s in report.fidelity if s.stage == "refined")
        print(f"{label:<26} {seconds:>8.1f} {refined.output_error:>23.6g}", flush=True)
    refine._TARGET_BYTES = window


if __name__ == "__main__":
    main()
