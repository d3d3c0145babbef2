"""Calibration (closed-form refinement) speed: one partial pass per pair vs teacher windows and resumed student passes.

Run:  python benchmarks/calibration.py [--model resnet50] [--size 112] [--samples 64] [--threads 2]

Converts a torchvision model (random weights) at rank 1 with random
calibration inputs, three times in one run: as sepify did before (a partial
pass of the original and of the converted model per pair and batch), with the
original model's outputs captured for a window of pairs per pass (up to 256
MB), and with that plus each batch's converted-model forward resumed from the
previous pair (up to 256 MB of kept values; the default). Prints wall time
and the held-out fidelity, which must be identical.
"""

from __future__ import annotations

import argparse
import time

import torch
import torchvision

import sepify
from sepify.calibrate import refine


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
    defaults = refine.TARGET_BYTES, refine.RESUME_BYTES
    print(f"torch {torch.__version__}; {args.threads} thread(s); {args.model}, {args.samples} samples at {args.size}")
    print(f"{'passes':<34} {'seconds':>8} {'refined held-out error':>23}")
    variants = {
        "one teacher + student pass per pair": (1, 0),
        "teacher window, student from start": (defaults[0], 0),
        "teacher window, student resumed": defaults,
    }
    for label, (refine.TARGET_BYTES, refine.RESUME_BYTES) in variants.items():
        start = time.perf_counter()
        report = sepify.convert(model, x, rank=1, calibration=data).report
        seconds = time.perf_counter() - start
        refined = next(s for s in report.fidelity if s.stage == "refined")
        print(f"{label:<34} {seconds:>8.1f} {refined.output_error:>23.6g}", flush=True)
    refine.TARGET_BYTES, refine.RESUME_BYTES = defaults


if __name__ == "__main__":
    main()
