"""Fidelity with the calibration data a user really has, and with none: task metric per MAC budget.

Run:  python benchmarks/realistic.py [--tasks digits crepe-tiny crepe-full] [--threads 2]

Calibration recipes (issue 16): crepe, 32 tones x 8 consecutive frames (256
samples), in recording order and shuffled; digits, 256 training images. For
each budget the audit plans on the same data it will be calibrated with (or
on the example inputs alone for "no data"), convert applies the plan, and the
task metric is measured on held-out test data. The plan is made over all
three structures (dw-pw, pw-dw, pw-dw-pw). "synthetic" is the no-data case
with 64 inputs (``--synthetic-samples``) synthesised to match the model's BatchNorm statistics
(``sepify.synthesize_calibration``; BatchNorm statistics then kept). Times are
wall clock, audit + convert (+ synthesis, once per task). Needs the ``bench``
extra.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import numpy as np
import torch
from tasks import Task, crepe_task, digits_task, tone_recordings

import sepify

RATIOS = {"digits": (0.3, 0.15, 0.12, 0.1), "crepe-tiny": (0.65, 0.55, 0.5), "crepe-full": (0.5, 0.4, 0.35)}


def recipes(task: Task, only: list[str] | None) -> dict[str, torch.Tensor | str | None]:
    found: dict[str, torch.Tensor | str | None] = {"no data": None, "synthetic": "synthetic"}
    if task.name == "digits":
        found["256 images"] = task.calibration
    else:
        recorded = tone_recordings()
        found["recording order"] = recorded
        found["shuffled"] = recorded[torch.randperm(len(recorded), generator=torch.Generator().manual_seed(0))]
    return {k: v for k, v in found.items() if only is None or k in only}


def run_task(task: Task, only: list[str] | None, synthetic_samples: int = 64) -> None:
    model = task.build()
    np.random.seed(0)  # torchcrepe's decoder dithers with numpy's global generator
    print(f"\n## {task.name}: original {task.metric_name} {task.metric(model):.4f}")
    print(f"{'MAC ratio':>9} {'calibration':<16} {'MACs':>6} {task.metric_name:>20} {'time':>7}")
    for label, data in recipes(task, only).items():
        t0 = time.perf_counter()
        calibration: Any = data
        if isinstance(data, str):  # synthesised once, used by the audit and every conversion
            data = sepify.synthesize_calibration(model, task.example, samples=synthetic_samples)
            calibration = sepify.Calibration(data, refresh_bn=False)
        audit = sepify.audit(model, task.example, calibration=data)
        t_audit = time.perf_counter() - t0
        for ratio in RATIOS[task.name]:
            try:
                plan = audit.plan(max_mac_ratio=ratio)
            except sepify.BudgetError:
                print(f"{ratio:>9.2f} {label:<16} unreachable")
                continue
            t0 = time.perf_counter()
            result = sepify.convert(model, task.example, plan=plan, calibration=calibration)
            elapsed = t_audit + time.perf_counter() - t0
            np.random.seed(0)
            metric = task.metric(result.model)
            print(
                f"{ratio:>9.2f} {label:<16} {result.report.mac_ratio:>6.3f} {metric:>20.4f} {elapsed:>6.1f}s",
                flush=True,
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=["digits", "crepe-tiny"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--recipes", nargs="+", default=None, help="only these calibration recipes (labels)")
    parser.add_argument("--synthetic-samples", type=int, default=64, help="inputs synthesised for 'synthetic'")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    builders = {
        "digits": digits_task,
        "crepe-tiny": lambda: crepe_task("tiny"),
        "crepe-full": lambda: crepe_task("full"),
    }
    for name in args.tasks:
        run_task(builders[name](), args.recipes, args.synthetic_samples)


if __name__ == "__main__":
    main()
