"""What an audit costs, in forward passes of the model and seconds, and what a plan from a saved audit costs.

Run:  python benchmarks/audit_cost.py [--models resnet18 resnet50] [--threads 2]

For each torchvision model (random weights, 1x3x224x224): the median time of one forward pass, the time of
``sepify.audit`` with no calibration and no timing (what ``sepify audit MODEL`` and ``sepify convert MODEL
--max-mac-ratio R`` measure), that time in forward passes, and the time of ``sepify plan audit.json
--max-mac-ratio 0.6`` as a command (a fresh process: it imports no torch).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torchvision

import sepify


def forward_seconds(model: torch.nn.Module, x: torch.Tensor, reps: int = 7) -> float:
    with torch.no_grad():
        model(x)
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet18", "resnet50"])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'model':<10} {'forward':>9} {'audit':>8} {'forward passes':>14} {'sepify plan':>11}")
    for name in args.models:
        torch.manual_seed(0)
        model = getattr(torchvision.models, name)().eval()
        x = torch.randn(1, 3, 224, 224)
        once = forward_seconds(model, x)
        t0 = time.perf_counter()
        report = sepify.audit(model, x)
        audit_s = time.perf_counter() - t0
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "audit.json"
            report.to_json(path)
            t0 = time.perf_counter()
            command = [sys.executable, "-m", "sepify", "plan", str(path), "--max-mac-ratio", "0.6", "-q"]
            subprocess.run(command, check=True, capture_output=True)
            plan_s = time.perf_counter() - t0
        print(f"{name:<10} {1e3 * once:>7.0f}ms {audit_s:>7.1f}s {audit_s / once:>14.0f} {plan_s:>10.2f}s", flush=True)


if __name__ == "__main__":
    main()
