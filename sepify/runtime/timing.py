"""Wall-clock timing: interleaved medians, and a separable pair's fastest layout.

Nothing here changes a pair: :func:`time_pair` times views of it
(:meth:`SeparableConv.in_layout`) and returns the choice; the caller
applies it.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch

from sepify.core.functional import ConvLayer
from sepify.core.modules import SeparableConv
from sepify.runtime.context import LayerContext
from sepify.runtime.runners import layer_runner

__all__ = ["interleaved_medians", "PairTiming", "time_pair"]


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


class PairTiming(NamedTuple):
    """Median seconds of a pair in its fastest layout, and of the conv it replaces (if timed)."""

    layout: str | None  # the fastest layout, None where the pair has only one
    pair: float
    conv: float | None


def time_pair(
    pair: SeparableConv,
    input_shape: tuple[int, ...],
    reps: int = 7,
    against: ConvLayer | None = None,
    *,
    backend: str = "eager",
    threads: int | None = None,
    context: LayerContext | None = None,
) -> PairTiming:
    """Time every layout of ``pair`` (and ``against``, the conv it replaces) at ``input_shape`` in ``backend``.

    All candidates run interleaved, one call each in turn, and the median of
    ``reps`` calls after warm-up is compared, so a machine that slows down
    during the measurement slows all of them alike. The layouts are timed in
    every backend: which one a runtime runs fastest differs by runtime and
    shape (crepe's second layer at rank 4 in onnxruntime: grouped 14.4 ms,
    rank-major 0.67 ms, the conv 7.2 ms). Outside eager PyTorch each layer
    runs inside its ``context`` (:mod:`sepify.runtime.context`), the neighbours
    the runtime fuses with it.

    Examples:
        >>> conv = torch.nn.Conv2d(8, 8, 3, padding=1)
        >>> pair = SeparableConv.from_conv(conv, rank=2, order="pw-dw")
        >>> timing = time_pair(pair, (1, 8, 16, 16), reps=3, against=conv)
        >>> timing.layout in pair.layouts, timing.pair > 0, timing.conv > 0, pair.layout
        (True, True, True, 'rank-major')
        >>> time_pair(SeparableConv.from_conv(conv, rank=1), (1, 8, 16, 16), reps=3).layout is None
        True
    """
    w = pair.conv_dw.weight
    context = context if backend != "eager" else None
    shape = context.input_shape(input_shape) if context is not None else input_shape
    x = torch.randn(shape, device=w.device, dtype=w.dtype)
    layouts = pair.layouts
    fns = [layer_runner(pair.in_layout(k), x, backend, threads, context) for k in layouts]
    if against is not None:
        fns.append(layer_runner(against, x, backend, threads, context))
    with torch.no_grad():
        times = interleaved_medians(fns, reps, warmup=2, device=w.device)
    best = min(range(len(layouts)), key=times.__getitem__)
    return PairTiming(
        layouts[best] if len(layouts) > 1 else None, times[best], times[-1] if against is not None else None
    )
