"""Distillation at scale: accuracy recovered per CPU-minute, and 1 vs 2 torchrun processes.

Run:  python benchmarks/distill.py [--tasks digits crepe-tiny] [--crepe-steps 600]

(a) digits: the digits CNN converted at rank 1 everywhere (test accuracy
about 0.18, 0.128x MACs) distilled on its 1,400 training images (no labels),
once in one process and once under ``torchrun --nproc-per-node 2`` with the
same global batch, one torch thread per process: test accuracy, wall time,
samples/s.
(b) crepe-tiny planned at <= 0.35 of its MACs (audit + plan with no data)
and distilled on tones generated on the fly by an IterableDataset (unlimited
data, never materialised): raw pitch accuracy on held-out tones vs CPU time.
Needs the ``bench`` extra.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import IterableDataset

import sepify
from sepify.zoo import accuracy, digits_cnn, digits_data

DIGITS = {"steps": 300, "batch_size": 64, "lr": 3e-3, "loss": "kl"}


def digits_worker(out: str) -> None:
    """One run of (a); under torchrun every process runs this and rank 0 writes the result."""
    torch.set_num_threads(1)
    teacher = digits_cnn()
    x_train, _, x_test, y_test = digits_data()
    student = sepify.convert(teacher, x_test[:1], rank=1).model
    t0 = time.perf_counter()
    result = sepify.distill(student, teacher, x_train, **DIGITS)  # type: ignore[arg-type]
    elapsed = time.perf_counter() - t0
    if int(os.environ.get("RANK", "0")) == 0:
        Path(out).write_text(json.dumps({
            "world": result.world_size, "seconds": elapsed, "accuracy": accuracy(result.model, x_test, y_test),
            "samples_per_s": DIGITS["steps"] * DIGITS["batch_size"] / elapsed,
        }))  # fmt: skip


def digits() -> None:
    teacher = digits_cnn()
    _, _, x_test, y_test = digits_data()
    before = accuracy(sepify.convert(teacher, x_test[:1], rank=1).model, x_test, y_test)
    print(f"\n## digits at rank 1: original {accuracy(teacher, x_test, y_test):.4f}, converted {before:.4f}")
    print(f"{'processes':>9} {'steps x batch':>13} {'accuracy':>8} {'time':>7} {'samples/s':>9}")
    runs = {
        1: [sys.executable, __file__, "digits-worker"],
        2: [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", __file__,
            "digits-worker"],
    }  # fmt: skip
    for world, command in runs.items():
        out = Path(f"/tmp/sepify-distill-{world}.json")
        subprocess.run([*command, str(out)], check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        r = json.loads(out.read_text())
        print(f"{world:>9} {DIGITS['steps']:>6} x {DIGITS['batch_size']:<4} {r['accuracy']:>8.4f} "
              f"{r['seconds']:>6.1f}s {r['samples_per_s']:>9.0f}", flush=True)  # fmt: skip


class Tones(IterableDataset[torch.Tensor]):
    """Endless 1024-sample frames at 16 kHz: sines and 5-harmonic tones, 50-1000 Hz, normalised as CREPE does."""

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def __iter__(self):  # type: ignore[no-untyped-def]
        gen = torch.Generator().manual_seed(self.seed)
        t = torch.arange(1024) / 16000
        i = 0
        while True:
            f = math.exp(float(torch.empty(1).uniform_(math.log(50), math.log(1000), generator=gen)))
            phase = float(torch.rand(1, generator=gen)) * 2 * math.pi
            parts = range(5) if i % 2 else range(1)
            x = sum(0.6**k * torch.sin(2 * math.pi * f * (k + 1) * t + phase * (k + 1)) for k in parts)
            x = torch.as_tensor(x) + 0.01 * torch.randn(1024, generator=gen)
            i += 1
            yield (x - x.mean()) / x.std().clamp_min(1e-10)


def crepe(steps: int) -> None:
    sys.path.insert(0, os.path.dirname(__file__))
    from tasks import crepe_task

    task = crepe_task("tiny")
    teacher = task.build()
    np.random.seed(0)
    print(f"\n## crepe-tiny: original raw pitch accuracy {task.metric(teacher):.4f}")
    plan = sepify.audit(teacher, task.example).plan(max_mac_ratio=0.35)
    student = sepify.convert(teacher, task.example, plan=plan).model
    np.random.seed(0)
    print(f"converted at {plan.meta['mac_ratio']:.3f}x MACs, no data: {task.metric(student):.4f}")
    print(f"{'steps':>6} {'CPU min':>7} {'raw pitch accuracy':>18}")
    done, t0 = 0, time.process_time()
    for chunk in (steps // 4,) * 4:
        result = sepify.distill(student, teacher, Tones(seed=100 + done), steps=chunk, batch_size=32, lr=1e-3,
                                warmup=10)  # fmt: skip
        student, done = result.model, done + chunk
        np.random.seed(0)
        print(f"{done:>6} {(time.process_time() - t0) / 60:>7.1f} {task.metric(student):>18.4f}", flush=True)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "digits-worker":
        digits_worker(sys.argv[2])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=["digits", "crepe-tiny"])
    parser.add_argument("--crepe-steps", type=int, default=600)
    args = parser.parse_args()
    print(f"torch {torch.__version__}")
    if "digits" in args.tasks:
        digits()
    if "crepe-tiny" in args.tasks:
        torch.set_num_threads(2)
        crepe(args.crepe_steps)


if __name__ == "__main__":
    main()
