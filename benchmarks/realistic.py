"""Fidelity with the calibration data a user really has, and with none: task metric per MAC budget, on several draws.

Run:  python benchmarks/realistic.py [--tasks digits crepe-tiny crepe-full] [--threads 2] [--draws 5]

Calibration recipes (issue 16): crepe, 32 tones x 8 consecutive frames (256
samples), in recording order and shuffled; digits, 256 training images. For
each budget the audit plans on the same data it will be calibrated with (or
on the example inputs alone for "no data"), convert applies the plan, and the
task metric is measured on held-out test data. The plan is made over all
three structures (dw-pw, pw-dw, pw-dw-pw). "synthetic" is the no-data case
with 64 inputs (``--synthetic-samples``) synthesised to match the model's BatchNorm statistics
(``sepify.synthesize_calibration``; BatchNorm statistics then kept). Times are
wall clock, audit + convert (+ synthesis, once per task and draw). Needs the ``bench``
extra.

With ``--draws N`` every recipe runs on N independent draws of the data (``tasks.py``: new test and calibration
tones and recordings for crepe, other calibration images and example inputs for digits; the synthesis seed
follows the draw), and a last table gives the worst and the median per budget and recipe: a user's recordings
are another draw than ours, so the worst is the number to quote.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from tasks import Task, crepe_task, digits_task

import sepify

RATIOS = {"digits": (0.3, 0.15, 0.12, 0.1), "crepe-tiny": (0.65, 0.55, 0.5), "crepe-full": (0.5, 0.4, 0.35)}


def recipes(task: Task, only: list[str] | None) -> dict[str, torch.Tensor | str | None]:
    found: dict[str, torch.Tensor | str | None] = {"no data": None, "synthetic": "synthetic"}
    if task.recordings is None:
        found["256 images"] = task.calibration
    else:
        recorded = task.recordings
        found["recording order"] = recorded
        found["shuffled"] = recorded[torch.randperm(len(recorded), generator=torch.Generator().manual_seed(0))]
    return {k: v for k, v in found.items() if only is None or k in only}


def run_draw(task: Task, model: torch.nn.Module, draw: int, only: list[str] | None, synthetic_samples: int,
             results: dict[tuple[float, str], list[float]]) -> None:  # fmt: skip
    """Every recipe and budget on one draw of the data; each metric printed and appended to ``results``."""
    for label, data in recipes(task, only).items():
        t0 = time.perf_counter()
        calibration: Any = data
        if isinstance(data, str):  # synthesised once, used by the audit and every conversion
            data = sepify.synthesize_calibration(model, task.example, samples=synthetic_samples, seed=draw)
            calibration = sepify.Calibration(data, refresh_bn=False)
        audit = sepify.audit(model, task.example, calibration=data)
        t_audit = time.perf_counter() - t0
        for ratio in RATIOS[task.name]:
            try:
                plan = audit.plan(max_mac_ratio=ratio)
            except sepify.BudgetError:
                print(f"{draw:>4} {ratio:>9.2f} {label:<16} unreachable")
                continue
            t0 = time.perf_counter()
            result = sepify.convert(model, task.example, plan=plan, calibration=calibration)
            elapsed = t_audit + time.perf_counter() - t0
            np.random.seed(0)  # torchcrepe's decoder dithers with numpy's global generator
            metric = task.metric(result.model)
            results.setdefault((ratio, label), []).append(metric)
            print(f"{draw:>4} {ratio:>9.2f} {label:<16} {result.report.mac_ratio:>6.3f} {metric:>20.4f} "
                  f"{elapsed:>6.1f}s", flush=True)  # fmt: skip


def run_task(build: Callable[[int], Task], only: list[str] | None, synthetic_samples: int = 64, draws: int = 1) -> None:
    task = build(0)
    model = task.build()
    np.random.seed(0)
    print(f"\n## {task.name}: original {task.metric_name} {task.metric(model):.4f}")
    print(f"{'draw':>4} {'MAC ratio':>9} {'calibration':<16} {'MACs':>6} {task.metric_name:>20} {'time':>7}")
    results: dict[tuple[float, str], list[float]] = {}
    for draw in range(draws):
        if draw:
            task = build(draw)
            np.random.seed(0)
            print(f"{draw:>4} original {task.metric_name} {task.metric(model):.4f}")
        run_draw(task, model, draw, only, synthetic_samples, results)
    if draws > 1:
        print(f"\n{'MAC ratio':>9} {'calibration':<16} {'worst':>7} {'median':>7}  every draw")
        for (ratio, label), values in results.items():
            each = " ".join(f"{v:.4f}" for v in values)
            print(f"{ratio:>9.2f} {label:<16} {min(values):>7.4f} {statistics.median(values):>7.4f}  {each}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=["digits", "crepe-tiny"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--recipes", nargs="+", default=None, help="only these calibration recipes (labels)")
    parser.add_argument("--synthetic-samples", type=int, default=64, help="inputs synthesised for 'synthetic'")
    parser.add_argument("--draws", type=int, default=1, help="independent draws of test and calibration data")
    parser.add_argument("--ratios", nargs="+", type=float, default=None, help="MAC budgets (default: per task)")
    args = parser.parse_args()
    if args.ratios:
        for name in RATIOS:
            RATIOS[name] = tuple(args.ratios)
    torch.set_num_threads(args.threads)
    builders: dict[str, Callable[[int], Task]] = {
        "digits": digits_task,
        "crepe-tiny": lambda draw: crepe_task("tiny", draw=draw),
        "crepe-full": lambda draw: crepe_task("full", draw=draw),
    }
    for name in args.tasks:
        run_task(builders[name], args.recipes, args.synthetic_samples, args.draws)


if __name__ == "__main__":
    main()
