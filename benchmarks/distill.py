"""Distillation at scale: accuracy recovered per CPU-minute, and 1 vs 2 torchrun processes.

Run:  python benchmarks/distill.py [--tasks digits crepe-tiny] [--crepe-steps 600]

(a) digits: the digits CNN converted at rank 1 everywhere (test accuracy
about 0.18, 0.128x MACs) distilled on its 1,400 training images (no labels)
with ``sepify.Distill()``'s defaults (what ``sepify distill`` does with no
option) and with the settings tuned by hand before the defaults were chosen,
each once in one process and once under ``torchrun --nproc-per-node 2`` with
the same global batch, one torch thread per process: test accuracy, wall
time, CPU time, samples/s.
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

SETTINGS = {
    "defaults": {},  # sepify.Distill() as it is: steps 300, batch 64, lr 1e-2, relative mse
    "tuned by hand": {"steps": 300, "batch_size": 64, "lr": 3e-3, "loss": "kl"},
}


def digits_worker(out: str, setting: str) -> None:
    """One run of (a); under torchrun every process runs this and rank 0 writes the result."""
    torch.set_num_threads(1)
    teacher = digits_cnn()
    x_train, _, x_test, y_test = digits_data()
    student = sepify.convert(teacher, x_test[:1], rank=1).model
    options = sepify.Distill(**SETTINGS[setting])  # type: ignore[arg-type]
    t0, c0 = time.perf_counter(), time.process_time()
    result = sepify.distill(student, teacher, x_train, options)
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
    if int(os.environ.get("RANK", "0")) == 0:
        Path(out).write_text(json.dumps({
            "world": result.world_size, "seconds": elapsed, "cpu": cpu * result.world_size,
            "accuracy": accuracy(result.model, x_test, y_test),
            "samples_per_s": options.steps * options.batch_size / elapsed,
        }))  # fmt: skip


def digits() -> None:
    teacher = digits_cnn()
    _, _, x_test, y_test = digits_data()
    before = accuracy(sepify.convert(teacher, x_test[:1], rank=1).model, x_test, y_test)
    print(f"\n## digits at rank 1: original {accuracy(teacher, x_test, y_test):.4f}, converted {before:.4f}")
    print(f"{'settings':<14} {'processes':>9} {'accuracy':>8} {'time':>7} {'CPU':>7} {'samples/s':>9}")
    for setting in SETTINGS:
        runs = {
            1: [sys.executable, __file__, "digits-worker"],
            2: [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", __file__,
                "digits-worker"],
        }  # fmt: skip
        for world, command in runs.items():
            out = Path(f"/tmp/sepify-distill-{world}.json")
            subprocess.run([*command, str(out), setting], check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
            r = json.loads(out.read_text())
            print(f"{setting:<14} {world:>9} {r['accuracy']:>8.4f} {r['seconds']:>6.1f}s {r['cpu']:>6.1f}s "
                  f"{r['samples_per_s']:>9.0f}", flush=True)  # fmt: skip


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
        options = sepify.Distill(steps=chunk, batch_size=32, lr=1e-3, warmup=10)
        result = sepify.distill(student, teacher, Tones(seed=100 + done), options)
        student, done = result.model, done + chunk
        np.random.seed(0)
        print(f"{done:>6} {(time.process_time() - t0) / 60:>7.1f} {task.metric(student):>18.4f}", flush=True)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "digits-worker":
        digits_worker(sys.argv[2], sys.argv[3])
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
