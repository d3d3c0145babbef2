"""Wall-clock medians of interleaved calls: one helper for audit, layout tuning and benchmarks."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

__all__ = ["interleaved_medians"]


def interleaved_medians(
    fns: Sequence[Callable[[], Any]], reps: int, *, warmup: int = 1, device: torch.device | None = None
) -> list[float]:
    """Median seconds of each function, called in turn ``reps`` times after ``warmup`` rounds.

    Interleaving puts every function under the same machine noise; on CUDA
    each call is synchronised so its time is the kernel's, not the launch's.
    """

    def sync() -> None:
        if device is not None and device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(warmup):
        for fn in fns:
            fn()
    sync()
    samples: list[list[float]] = [[] for _ in fns]
    for _ in range(reps):
        for i, fn in enumerate(fns):
            start = time.perf_counter()
            fn()
            sync()
            samples[i].append(time.perf_counter() - start)
    return [statistics.median(s) for s in samples]
