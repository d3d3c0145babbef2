"""Per-layer choices as pure functions: what a pair would cost, whether it pays, which option a request picks.

Nothing here touches a model or a graph. A layer is its :class:`Geometry` (its configuration and the shapes it
ran at); its factorisations answer one question, the relative weight error of ``(order, rank)``
(:data:`WeightError`); the user's request is a :class:`Request`. :func:`decide` returns the :class:`Option` to
build or the :class:`~sepify.vocab.SkipReason` not to, :func:`useful_options` lists what the audit measures, and
:func:`pays` is the one rule both use: a pair is worth building only when it has fewer parameters *and* fewer
MACs than the conv it replaces.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from sepify.core.cost import conv_macs, conv_params, cp_ranks, exact_rank, ratio, separable_macs, separable_params
from sepify.errors import ConfigError
from sepify.vocab import ORDERS, SVD_ORDERS, SkipReason

__all__ = ["Geometry", "Option", "Request", "WeightError", "pays", "decide", "useful_options"]

Shape = tuple[int, ...]
WeightError = Callable[[str, int], float]  # (order, rank) -> ||W - W_hat|| / ||W||


@dataclass(frozen=True)
class Geometry:
    """One conv: its configuration and the ``(input, output)`` shapes of every call on the example inputs."""

    kind: str  # conv1d ... conv3d, conv_transpose1d ... conv_transpose3d
    in_channels: int
    out_channels: int
    kernel_size: Shape
    stride: Shape
    padding: str | Shape
    dilation: Shape
    groups: int
    padding_mode: str
    bias: bool
    shapes: tuple[tuple[Shape, Shape], ...] = ()

    @property
    def dims(self) -> int:
        return len(self.kernel_size)

    @property
    def transposed(self) -> bool:
        return self.kind.startswith("conv_transpose")

    @property
    def calls(self) -> int:
        return len(self.shapes)

    @property
    def input_size(self) -> Shape | None:
        """The spatial size at the first call (None if never called)."""
        return self._spatial(self.shapes[0][0]) if self.shapes else None

    @property
    def output_size(self) -> Shape | None:
        return self._spatial(self.shapes[0][1]) if self.shapes else None

    @property
    def params(self) -> int:
        return conv_params(self.in_channels, self.out_channels, self.kernel_size, self.groups, self.bias)

    @property
    def macs(self) -> int:
        """MACs over every call (fvcore's rule: a transposed conv at its input size)."""
        return sum(
            conv_macs(
                self.in_channels, self.out_channels, self.kernel_size, self.groups, self._spatial(out),
                self._batch(out), transposed=self.transposed, input_size=self._spatial(inp),
            )
            for inp, out in self.shapes
        )  # fmt: skip

    def exact_rank(self, order: str) -> int:
        return exact_rank(self.in_channels, self.out_channels, self.kernel_size, self.groups, order)

    def cost(self, order: str, rank: int) -> tuple[int, int]:
        """``(params, MACs)`` of the pair ``(order, rank)`` over every call."""
        params = separable_params(
            self.in_channels, self.out_channels, self.kernel_size, self.groups, rank, order, self.bias
        )
        macs = sum(
            separable_macs(
                self.in_channels, self.out_channels, self.kernel_size, self.groups, rank, order,
                self._spatial(inp), self._spatial(out), self._batch(out), transposed=self.transposed,
            )
            for inp, out in self.shapes
        )  # fmt: skip
        return params, macs

    def option(self, order: str, rank: int, weight_error: float) -> Option:
        return Option(rank, order, *self.cost(order, rank), weight_error)

    def report_fields(self) -> dict[str, Any]:
        """The fields every per-layer report row shares (:class:`sepify.report.LayerFields`)."""
        return {
            "kind": self.kind,
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "kernel_size": self.kernel_size,
            "stride": self.stride,
            "padding": self.padding,
            "dilation": self.dilation,
            "groups": self.groups,
            "padding_mode": self.padding_mode,
            "bias": self.bias,
            "calls": self.calls,
            "input_size": self.input_size,
            "output_size": self.output_size,
        }

    def _spatial(self, shape: Shape) -> Shape:
        return tuple(int(s) for s in shape[len(shape) - self.dims :])

    def _batch(self, shape: Shape) -> int:
        return int(shape[0]) if len(shape) == self.dims + 2 else 1  # an unbatched (C, *spatial) input is one sample


@dataclass(frozen=True)
class Option:
    """One way to convert one layer: its structure, cost and errors (measured ones when the audit measured them)."""

    rank: int
    order: str
    params_after: int
    macs_after: int
    weight_error: float
    output_error: float | None = None  # the layer's own ||y_r - y|| / ||y|| on the example (or calibration) inputs
    # the same after refinement (least-squares refit of the last factor, kept only where better, as refinement does)
    refined_error: float | None = None
    latency_before: float | None = None  # seconds, median, the conv it replaces
    latency_after: float | None = None  # seconds, median, the pair in its fastest layout
    layout: str | None = None  # the fastest layout, where the pair has a choice and latency was measured

    @property
    def latency_ratio(self) -> float | None:
        return ratio(self.latency_after, self.latency_before)

    def to_dict(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d["latency_ratio"] = self.latency_ratio
        return d


def pays(geometry: Geometry, option: Option) -> bool:
    """The one rule: a pair pays when it has fewer parameters and fewer MACs than the conv it replaces.

    >>> g = Geometry("conv2d", 64, 128, (3, 3), (1, 1), (1, 1), (1, 1), 1, "zeros", False, (((1, 64, 8, 8), (1, 128, 8, 8)),))
    >>> pays(g, g.option("dw-pw", 1, 0.5)), pays(g, g.option("dw-pw", 9, 0.0))
    (True, False)
    """
    return option.params_after < geometry.params and option.macs_after < geometry.macs


@dataclass(frozen=True)
class Request:
    """What the user asked of a layer: a rank (an int, ``"full"``, or ``"auto"`` within ``tolerance``), an order
    (or ``"auto"``); ``planned`` for a plan's explicit pick; ``allow_larger`` to build a fixed rank that does not pay.
    """

    rank: int | str
    order: str
    tolerance: float | None = None
    planned: bool = False
    allow_larger: bool = False

    def __post_init__(self) -> None:
        if self.rank == "auto" and self.tolerance is None:
            raise ConfigError("rank='auto' needs a tolerance")


def decide(geometry: Geometry, request: Request, weight_error: WeightError) -> Option | SkipReason:
    """The option to build for this layer, or why not (:data:`~sepify.vocab.SkipReason.NO_SAVING`).

    With an int or ``"full"`` rank, each order's rank is capped at its exact rank and the lower weight error
    wins (ties: fewer MACs, then params). With ``rank="auto"`` each order takes its smallest rank within the
    tolerance (the bottleneck: the narrowest width, by bisection up to break-even) and the cheapest of those that
    meet it wins. Plans and ``"full"`` always build; a fixed rank that does not pay is skipped unless
    ``allow_larger``; ``"auto"`` never builds a pair that does not pay.
    """
    if request.order != "auto":
        orders: Sequence[str] = (request.order,)
    else:
        orders = ORDERS if request.rank == "auto" else SVD_ORDERS
    options = [
        geometry.option(o, r, weight_error(o, r)) for o in orders for r in [_rank(geometry, request, o, weight_error)]
    ]
    best = _best(options, request)
    if request.planned or request.rank == "full" or (request.allow_larger and request.rank != "auto"):
        return best
    return best if pays(geometry, best) else SkipReason.NO_SAVING


def _rank(geometry: Geometry, request: Request, order: str, weight_error: WeightError) -> int:
    limit = geometry.exact_rank(order)
    if request.rank == "full":
        return limit
    if request.rank != "auto":
        return min(int(request.rank), limit)
    tolerance = request.tolerance
    assert tolerance is not None  # checked by Request
    if order != "pw-dw-pw":
        return next(k for k in range(1, limit + 1) if weight_error(order, k) <= tolerance or k == limit)
    # the bottleneck: the narrowest width within tolerance, if the widest that still pays is (each width is an ALS run)
    area = math.prod(geometry.kernel_size)
    dense = conv_params(geometry.in_channels, geometry.out_channels, geometry.kernel_size, geometry.groups, False)
    low, high = 1, max(1, min(limit, dense // (geometry.in_channels + geometry.groups * area + geometry.out_channels)))
    while low < high:
        middle = (low + high) // 2
        if weight_error(order, middle) <= tolerance:
            high = middle
        else:
            low = middle + 1
    return high


def _best(options: list[Option], request: Request) -> Option:
    if request.rank == "auto":  # the bottleneck may miss the tolerance even at its widest; the SVD orders never do
        assert request.tolerance is not None
        options = [o for o in options if o.weight_error <= request.tolerance] or options
    best = options[0]
    for option in options[1:]:
        tie = math.isclose(option.weight_error, best.weight_error, rel_tol=1e-6, abs_tol=1e-6)
        if request.rank == "auto" or tie:
            if (option.macs_after, option.params_after) < (best.macs_after, best.params_after):
                best = option
        elif option.weight_error < best.weight_error:
            best = option
    return best


def useful_options(
    geometry: Geometry, orders: Sequence[str], ranks: Sequence[int] | None = None, cp_widths: int = 8
) -> list[tuple[str, int]]:
    """The ``(order, rank)`` pairs worth measuring: every rank that :func:`pays` (the bottleneck: on a geometric
    grid of widths), restricted to ``ranks`` when given."""
    found = []
    for order in orders:
        paying = []
        for r in range(1, geometry.exact_rank(order) + 1):
            if not pays(geometry, geometry.option(order, r, math.nan)):
                break  # cost grows with rank: no larger rank pays either
            paying.append(r)
        if order == "pw-dw-pw" and paying:
            grid = set(cp_ranks(len(paying), cp_widths))
            paying = [r for r in paying if r in grid]
        found += [(order, r) for r in paying if ranks is None or r in ranks]
    return found
