"""Refinement cost on long 1-D kernels, in forward passes of the model and extra memory: correlations vs patches.

Run:  python benchmarks/long_kernels.py [--threads 2] [--tasks net crepe-tiny crepe-full] [--skip-patches]
          [--order pw-dw-pw --rank 64]

Each model is converted with every conv as a pw-dw pair (or ``--order pw-dw-pw``) at a fixed rank, with 256
calibration samples, once without refinement and once with it; the difference is the refinement's cost, quoted in
forward passes of the original model over the same 256 samples and as the peak resident memory above the start.
The samples are fit as given (``augment=False``): the default also fits a rescaled copy of each, twice the
samples, which costs what 512 samples cost here.
"correlations" is sepify's default for a depthwise kernel of 16 taps or more along one axis
(sepify.calibrate.lagged); "patches" forces the unfolded computation every other layer uses (what sepify did
before). The held-out output errors after refinement must agree.

Models: a Conv1d ResNet with kernels 39-64 (random weights, 32 input channels, 1024 samples), and crepe-tiny's and
crepe-full's trained convs (kernels 512 at stride 4, then 64; their pitch tones as calibration data).
"""

from __future__ import annotations

import argparse
import functools
import math
import resource
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

import sepify
from sepify.calibrate import lagged


class LongKernelNet(nn.Module):
    """A Conv1d ResNet of the kind audio models use: long kernels (39, 64, 48), a residual pair, a strided stage."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv1d(32, 64, 39, padding=19)
        self.a = nn.Conv1d(64, 64, 64, padding="same")
        self.b = nn.Conv1d(64, 64, 64, padding="same")
        self.down = nn.Conv1d(64, 128, 48, stride=2, padding=23)
        self.head = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        x = torch.relu(x + self.b(torch.relu(self.a(x))))
        x = torch.relu(self.down(x))
        return self.head(x.mean(-1))


def _net() -> tuple[nn.Module, torch.Tensor, int]:
    torch.manual_seed(0)
    return LongKernelNet().eval(), torch.randn(256, 32, 1024), 17


def _crepe(size: str) -> tuple[nn.Module, torch.Tensor, int]:
    from tasks import crepe_task

    task = crepe_task(size)
    return task.build(), task.calibration, 4


TASKS: dict[str, Callable[[], tuple[nn.Module, torch.Tensor, int]]] = {
    "net": _net,
    "crepe-tiny": functools.partial(_crepe, "tiny"),
    "crepe-full": functools.partial(_crepe, "full"),
}


@contextmanager
def peak_rss() -> Iterator[list[float]]:
    """Peak resident memory (MB) above the start, sampled every 2 ms; the result is appended on exit."""
    result: list[float] = []
    page = resource.getpagesize()

    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * page

    start, peak, done = rss(), [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss())
            time.sleep(0.002)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield result
    finally:
        done.set()
        thread.join()
        result.append(max(0, peak[0] - start) / 2**20)


def convert(
    model: nn.Module, data: torch.Tensor, rank: int, refine: bool, order: str = "pw-dw"
) -> tuple[float, float, float, int]:
    """(seconds, peak MB, held-out output error, layers refined) of one calibrated conversion in ``order``."""
    calibration = sepify.Calibration(data, refine=refine, refresh_bn=False, augment=False)
    with peak_rss() as peak:
        t0 = time.perf_counter()
        result = sepify.convert(model, data[:2], rank=rank, order=order, calibration=calibration)
        seconds = time.perf_counter() - t0
    report = result.report
    refined = len(report.converted) - sum(note.startswith("did not refine") for note in report.notes)
    return seconds, peak[0], float(report.output_error or 0.0), refined if refine else 0


def forward_seconds(model: nn.Module, data: torch.Tensor) -> float:
    """The fastest of three forward passes over ``data`` in batches of 64, after one batch of that size (the first
    call at a new shape creates oneDNN's kernels: timed with it, one pass varied from 1.7 to 2.9 s)."""
    best = math.inf
    with torch.no_grad():
        model(data[:64])
        for _ in range(3):
            t0 = time.perf_counter()
            for i in range(0, len(data), 64):
                model(data[i : i + 64])
            best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--skip-patches", action="store_true", help="only the default (the patches take minutes)")
    parser.add_argument("--order", default="pw-dw", choices=["pw-dw", "pw-dw-pw"], help="the pairs' structure")
    parser.add_argument("--rank", type=int, default=None, help="instead of each task's (pw-dw-pw: the bottleneck)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'model':<11} {'normal equations':<16} {'refined':>7} {'refine':>8} {'forward passes':>14} "
          f"{'per layer':>9} {'extra MB':>8} {'output error':>12}")  # fmt: skip
    default = lagged.LAGGED_MIN_TAPS
    for name in args.tasks:
        model, data, rank = TASKS[name]()
        rank = args.rank or rank
        once = forward_seconds(model, data)
        base, *_ = convert(model, data, rank, refine=False, order=args.order)
        ways = [("correlations", default)] + ([] if args.skip_patches else [("patches", 10**9)])
        for way, taps in ways:
            lagged.LAGGED_MIN_TAPS = taps
            try:
                seconds, extra, error, refined = convert(model, data, rank, refine=True, order=args.order)
            finally:
                lagged.LAGGED_MIN_TAPS = default
            cost = (seconds - base) / once
            print(f"{name:<11} {way:<16} {refined:>7} {seconds - base:>7.1f}s {cost:>14.0f} {cost / max(refined, 1):>9.1f} "
                  f"{extra:>8.0f} {error:>12.4f}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
