"""Fidelity on real trained weights: task metric after init, refinement and distillation, per MAC budget.

Run:  python benchmarks/fidelity.py [--tasks digits crepe-tiny crepe-full] [--threads 2]

For each task and whole-model MAC ratio, sepify audits the model on its
calibration data, plans the budget (exact knapsack over rank x order per
layer), converts, and reports the task metric after the closed-form init,
after the closed-form refinement (+ BatchNorm refresh when it helps), and after a
short distillation; plus a naive baseline at the same budget (uniform rank 1
dw-pw on the largest layers first, refined the same way). Times are wall
clock for the whole convert() call.
"""

from __future__ import annotations

import argparse
import time

import torch
from tasks import Task, crepe_task, digits_task

import sepify

RATIOS = {"digits": (0.75, 0.5, 0.15), "crepe-tiny": (0.75, 0.55), "crepe-full": (0.75, 0.5, 0.4)}
DISTILL = {"digits": 300, "crepe-tiny": 100, "crepe-full": 0}  # crepe-full: ~1 s per step on 2 cores


def naive_plan(report: sepify.AuditReport, ratio: float) -> sepify.Plan | None:
    """Rank-1 dw-pw on the largest layers first until the MAC budget is met."""
    chosen: dict[str, sepify.LayerPlan] = {}
    macs = report.macs
    for layer in sorted(report.candidates, key=lambda la: -la.macs):
        if macs <= ratio * report.macs:
            break
        opt = next((o for o in layer.options if o.rank == 1 and o.order == "dw-pw"), None)
        if opt is None:
            continue
        chosen[layer.name] = sepify.LayerPlan(1, "dw-pw")
        macs -= layer.macs - opt.macs_after
    return sepify.Plan(chosen) if macs <= ratio * report.macs else None


def run_task(task: Task) -> None:
    model = task.build()
    original = task.metric(model)
    print(f"\n## {task.name}: original {task.metric_name} {original:.4f}")
    t0 = time.perf_counter()
    audit = sepify.audit(model, task.example, calibration=task.calibration)
    print(f"audit: {time.perf_counter() - t0:.1f}s, {len(audit.candidates)} candidates")
    print(
        f"{'MAC ratio':>9} {'plan':<6} {'MACs':>6} {'init':>7} {'refined':>8} {'distilled':>10} {'time (refine)':>14} {'time (distill)':>15}"
    )
    for ratio in RATIOS[task.name]:
        plans = {}
        try:
            plans["audit"] = audit.plan(max_mac_ratio=ratio)
        except sepify.BudgetError as e:
            print(f"{ratio:>9.2f} audit  unreachable: {e}")
        naive = naive_plan(audit, ratio)
        if naive is not None:
            plans["naive"] = naive
        for label, plan in plans.items():
            init = sepify.convert(model, task.example, plan=plan)
            t0 = time.perf_counter()
            refined = sepify.convert(model, task.example, plan=plan, calibration=task.calibration)
            t_ref = time.perf_counter() - t0
            dis_metric, t_dis = "-", "-"
            if DISTILL[task.name]:
                t0 = time.perf_counter()
                distilled = sepify.convert(model, task.example, plan=plan, calibration=task.calibration,
                                           distill=DISTILL[task.name])  # fmt: skip
                t_dis = f"{time.perf_counter() - t0:.1f}s"
                dis_metric = f"{task.metric(distilled.model):.4f}"
            print(f"{ratio:>9.2f} {label:<6} {init.report.mac_ratio:>6.3f} {task.metric(init.model):>7.4f} "
                  f"{task.metric(refined.model):>8.4f} {dis_metric:>10} {t_ref:>13.1f}s {t_dis:>15}", flush=True)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=["digits", "crepe-tiny", "crepe-full"])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)")
    builders = {"digits": digits_task, "crepe-tiny": lambda: crepe_task("tiny"),
                "crepe-full": lambda: crepe_task("full", test_frames=200, calibration_frames=128)}  # fmt: skip
    for name in args.tasks:
        run_task(builders[name]())


if __name__ == "__main__":
    main()
