"""Latency at equal quality: the trained models' slim versions that keep their task, timed in every backend.

Run:  python benchmarks/equal_quality.py [--tasks digits crepe-tiny] [--batch 8] [--threads 1]

For each trained model, the plan that keeps the task metric within 1 point
(``benchmarks/realistic.py``: digits at 0.12 of its MACs, crepe-tiny at 0.50,
with 256 calibration samples) is made from an audit by MACs alone, and
from audits timed in onnxruntime and in OpenVINO (pairs timed slower there
are never planned; each layer is timed in both layouts, inside the padding
and activation the runtime fuses with it). Each converted model (refined on the calibration data) is timed
against the original in eager PyTorch, onnxruntime and OpenVINO at batch
``--batch`` (interleaved medians), and its metric measured.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from tasks import crepe_task, digits_task, tone_recordings

import sepify
from sepify.graph.probe import time_forwards

BUDGETS = {"digits": 0.12, "crepe-tiny": 0.50, "crepe-full": 0.35}
BACKENDS = ("eager", "onnxruntime", "openvino")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=list(BUDGETS))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--planners", nargs="+", default=["MACs", *BACKENDS[1:]], help="MACs and/or backends")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"batch {args.batch}, {args.threads} thread(s), {args.reps} interleaved reps; latency = slim / original")
    print(f"{'model':<11} {'planned by':<18} {'MACs':>6} {'metric':>7} " + " ".join(f"{b:>12}" for b in BACKENDS))
    for name in args.tasks:
        task = digits_task() if name == "digits" else crepe_task(name.removeprefix("crepe-"))
        model = task.build()
        calibration = task.calibration if name == "digits" else tone_recordings()
        x = torch.cat([task.example] * (args.batch // len(task.example) + 1))[: args.batch]
        np.random.seed(0)
        original = task.metric(model)
        for planner in args.planners:
            timing = None if planner == "MACs" else sepify.Timing(backend=planner, threads=1)
            label = "MACs" if timing is None else f"{planner} time"
            start = time.perf_counter()
            audit = sepify.audit(model, task.example, calibration=calibration, timing=timing)
            audit_s = time.perf_counter() - start
            plan = audit.plan(max_mac_ratio=BUDGETS[name])
            slim = sepify.convert(model, task.example, plan=plan, calibration=calibration)
            np.random.seed(0)
            metric = task.metric(slim.model)
            ratios = []
            for backend in BACKENDS:
                before, after = time_forwards([model, slim.model], (x,), args.reps, backend=backend, threads=1)
                ratios.append(after / before)
            print(
                f"{name:<11} {label:<18} {slim.report.mac_ratio:>6.3f} {metric:>7.4f} "
                + " ".join(f"{r:>11.3f}x" for r in ratios)
                + f"   (original {task.metric_name} {original:.4f}; audit {audit_s:.0f} s)",
                flush=True,
            )


if __name__ == "__main__":
    main()
