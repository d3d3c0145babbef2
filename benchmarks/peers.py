"""Peers at the same MAC budget: tensorly-torch CP / Tucker factorised convs and Torch-Pruning.

Run:  python benchmarks/peers.py [--tasks digits crepe-tiny]

Same tasks, metrics and whole-model MAC ratios as benchmarks/fidelity.py.
Each peer converts the same convs sepify considers (the audit's candidates),
with one rank fraction (tensorly) or pruning ratio (Torch-Pruning) for all
layers, found by bisection as the largest that meets the MAC budget; no
fine-tuning, no calibration (the peers have no closed-form data-aware step).
sepify's numbers in the same table are the audit plan + closed-form refinement
(no distillation), from a fresh run.
"""

from __future__ import annotations

import argparse
import copy
import time
import warnings
from collections.abc import Callable

import torch
from tasks import Task, crepe_task, digits_task
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import sepify

RATIOS = {"digits": (0.5, 0.15), "crepe-tiny": (0.75, 0.55)}


def macs(model: nn.Module, x: torch.Tensor) -> int:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    return counter.get_total_flops() // 2


def bisect(
    build: Callable[[float], nn.Module], x: torch.Tensor, budget: float, lo: float, hi: float
) -> tuple[nn.Module, float] | None:
    """Largest knob in [lo, hi] whose model meets the MAC budget (MACs grow with the knob)."""
    best = None
    for _ in range(12):
        mid = (lo + hi) / 2
        try:
            model = build(mid)
            cost = macs(model, x)
        except Exception:  # noqa: BLE001 - a peer that fails to build or run at a setting cannot use it
            hi = mid
            continue
        if cost <= budget:
            best, lo = (model, mid), mid
        else:
            hi = mid
    return best


def tensorly(model: nn.Module, names: list[str], factorization: str) -> Callable[[float], nn.Module]:
    import tltorch

    def build(rank: float) -> nn.Module:
        m = copy.deepcopy(model)
        for name in names:
            conv = m.get_submodule(name)
            parent, _, child = name.rpartition(".")
            setattr(m.get_submodule(parent), child, tltorch.FactorizedConv.from_conv(
                conv, rank=rank, factorization=factorization, implementation="factorized"))  # fmt: skip
        return m

    return build


def pruning(model: nn.Module, x: torch.Tensor) -> Callable[[float], nn.Module]:
    import torch_pruning as tp

    def build(keep: float) -> nn.Module:
        m = copy.deepcopy(model)
        heads = [mod for mod in m.modules() if isinstance(mod, nn.Linear)][-1:]
        pruner = tp.pruner.MagnitudePruner(m, x, importance=tp.importance.MagnitudeImportance(p=1),
                                           pruning_ratio=1.0 - keep, ignored_layers=heads)  # fmt: skip
        pruner.step()
        return m

    return build


def run(task: Task, ratios: list[float] | None = None) -> None:
    model = task.build()
    x = task.example
    base = macs(model, x)
    print(f"\n## {task.name}: original {task.metric_name} {task.metric(model):.4f}")
    audit = sepify.audit(model, x, calibration=task.calibration)
    names = [layer.name for layer in audit.candidates]
    print(f"{'MAC ratio':>9} {'method':<18} {'MACs':>6} {task.metric_name:>19} {'time':>7}")
    for ratio in ratios or RATIOS[task.name]:
        t0 = time.perf_counter()
        plan = audit.plan(max_mac_ratio=ratio)
        ours = sepify.convert(model, x, plan=plan, calibration=task.calibration)
        print(f"{ratio:>9.2f} {'sepify plan+refine':<18} {ours.report.mac_ratio:>6.3f} {task.metric(ours.model):>19.4f} "
              f"{time.perf_counter() - t0:>6.1f}s", flush=True)  # fmt: skip
        peers = {"tensorly CP": tensorly(model, names, "cp"), "tensorly Tucker": tensorly(model, names, "tucker"),
                 "torch-pruning": pruning(model, x)}  # fmt: skip
        for label, build in peers.items():
            t0 = time.perf_counter()
            found = bisect(build, x, ratio * base, 0.01, 1.0)
            if found is None:
                print(f"{ratio:>9.2f} {label:<18} {'-':>6} {'failed':>19}  (no setting built a working model)")
                continue
            peer, _ = found
            print(f"{ratio:>9.2f} {label:<18} {macs(peer, x) / base:>6.3f} {task.metric(peer):>19.4f} "
                  f"{time.perf_counter() - t0:>6.1f}s", flush=True)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=["digits", "crepe-tiny"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--ratios", nargs="+", type=float, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    builders = {"digits": digits_task, "crepe-tiny": lambda: crepe_task("tiny")}
    for name in args.tasks:
        run(builders[name](), args.ratios)


if __name__ == "__main__":
    main()
