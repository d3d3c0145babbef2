r"""Choosing a plan under a budget: the error model and the call into the knapsack solver.

The audit measures, per candidate layer, a few options (rank, order) with
their cost and error; this module predicts each option's contribution to the
whole-model output error and picks at most one option per layer so that the
budget holds with the least predicted error (:mod:`sepify.planning.knapsack`).
It reads the audit's rows through the small protocol below and their
:class:`~sepify.planning.choice.Option`\ s, so it knows nothing about models,
reports or how the numbers were measured.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from sepify.errors import BudgetError, ConfigError
from sepify.options import Budget
from sepify.planning.choice import Option
from sepify.planning.knapsack import Item, max_saving_for_loss, min_loss_for_saving
from sepify.planning.plan import LayerPlan, Plan

__all__ = [
    "BUDGETS",
    "Layer",
    "unreachable_message",
    "option_error",
    "layer_loss",
    "predicted_error",
    "check_budget",
    "choose_plan",
]

BUDGETS = tuple(Budget.__dataclass_fields__)
_LABELS = {"max_mac_ratio": "MACs", "max_param_ratio": "params", "max_latency_ratio": "latency"}


class Layer(Protocol):
    """One candidate layer: its cost, its options and how much its error reaches the model output."""

    @property
    def name(self) -> str: ...
    @property
    def params(self) -> int: ...
    @property
    def macs(self) -> int: ...
    @property
    def options(self) -> Sequence[Option]: ...
    @property
    def model_error_rank1(self) -> float | None: ...
    @property
    def sensitivity_order(self) -> str | None: ...


def option_error(o: Option) -> float:
    """The best available predictor of a layer's own error: after refinement, else measured, else weight error."""
    if o.refined_error is not None:
        return o.refined_error
    return o.output_error if o.output_error is not None else o.weight_error


def layer_loss(layer: Layer, option: Option) -> float:
    """Predicted contribution of ``option`` to the squared whole-model output error.

    The layer's own output error (after the refinement that calibration will
    apply, when the audit had calibration data) is scaled by how much of the
    rank-1 error reached the model output when this layer alone was converted
    (measured); independent errors then add in energy: e_model^2 ~ sum of the
    terms.
    """
    amplification = 1.0
    if layer.model_error_rank1 is not None and layer.sensitivity_order is not None:
        reference = next((o for o in layer.options if o.rank == 1 and o.order == layer.sensitivity_order), None)
        base = None if reference is None else reference.output_error
        if base is None and reference is not None:
            base = reference.weight_error
        if base is not None and base > 1e-12:
            amplification = layer.model_error_rank1 / base
    return (option_error(option) * amplification) ** 2


def predicted_error(layers: Mapping[str, Layer], plan: Plan) -> float:
    """Predicted whole-model relative output error if ``plan`` is applied."""
    return math.sqrt(sum(layer_loss(layers[n], _option(layers[n], lp)) for n, lp in plan.layers.items()))


def _option(layer: Layer, lp: LayerPlan) -> Option:
    for o in layer.options:
        if (o.rank, o.order) == (lp.rank, lp.order):
            return o
    raise KeyError(f"{layer.name} has no option rank={lp.rank} order={lp.order!r}")


def unreachable_message(kind: str, value: float, reachable: float, why: str = "") -> str:
    """The sentence for a budget below what every candidate at its cheapest option reaches."""
    return (
        f"no plan reaches {_LABELS[kind]} <= {value:.3g}x the original: converting every candidate at its "
        f"cheapest option reaches {reachable:.3f}x at best{why}; relax the budget to at least {reachable:.3f}"
    )


def check_budget(budget: Mapping[str, float | None] | Budget) -> tuple[str, float]:
    """``(kind, value)`` of the one budget given; a ConfigError unless exactly one is, in range."""
    return (budget if isinstance(budget, Budget) else Budget(**budget)).bound


def choose_plan(
    candidates: Sequence[Layer],
    budget: Mapping[str, float | None],
    *,
    params: int,
    macs: int,
    model_latency: float | None,
    meta: Mapping[str, Any] | None = None,
) -> Plan:
    """Pick per layer skip or one option under exactly one budget (see :meth:`AuditReport.plan`).

    Options measured slower than the conv they replace are never chosen.

    Raises:
        ConfigError: not exactly one budget, or a value out of range.
        BudgetError: the budget cannot be met; says the smallest reachable ratio.
    """
    kind, value = check_budget(budget)
    usable = [[o for o in layer.options if o.latency_ratio is None or o.latency_ratio < 1.0] for layer in candidates]
    total, savings = _savings(kind, candidates, usable, params, macs, model_latency)
    tables = [
        [Item(saving=s, loss=layer_loss(layer, o)) for s, o in zip(layer_savings, opts)]
        for layer, opts, layer_savings in zip(candidates, usable, savings)
    ]
    if kind == "max_error":
        picks = max_saving_for_loss(tables, value**2)
    else:
        found = min_loss_for_saving(tables, (1.0 - value) * total)
        if found is None:
            best = sum(max((c.saving for c in t), default=0.0) for t in tables)
            smallest = 1.0 - best / total if total else 1.0
            slower = sum(len(layer.options) for layer in candidates) - sum(len(opts) for opts in usable)
            why = (
                f" ({slower} option(s) measured slower than their conv are never chosen; audit without timing to "
                "plan by MACs alone)"
                if slower
                else ""
            )
            raise BudgetError(unreachable_message(kind, value, smallest, why))
        picks = found
    chosen = {
        layer.name: LayerPlan(opts[j].rank, opts[j].order, opts[j].layout)
        for layer, opts, j in zip(candidates, usable, picks)
        if j is not None
    }
    by_name = {layer.name: layer for layer in candidates}
    info = {**_totals(by_name, chosen, params, macs), "predicted_error": predicted_error(by_name, Plan(chosen))}
    return Plan(chosen, {**info, **dict(meta or {}), "budget": {kind: value}})


def _savings(
    kind: str, layers: Sequence[Layer], usable: list[list[Option]], params: int, macs: int, latency: float | None
) -> tuple[float, list[list[float]]]:
    """The budget's total and each usable option's saving in its unit (MACs, params or seconds)."""
    if kind == "max_latency_ratio":
        if latency is None or any(o.latency_ratio is None for opts in usable for o in opts):
            raise ConfigError("max_latency_ratio needs measured latencies; run audit(..., timing=True)")
        return latency, [
            [max(0.0, float(o.latency_before or 0) - float(o.latency_after or 0)) for o in opts] for opts in usable
        ]
    if kind == "max_param_ratio":
        return params, [[float(layer.params - o.params_after) for o in opts] for layer, opts in zip(layers, usable)]
    return macs, [[float(layer.macs - o.macs_after) for o in opts] for layer, opts in zip(layers, usable)]


def _totals(layers: Mapping[str, Layer], chosen: Mapping[str, LayerPlan], params: int, macs: int) -> dict[str, Any]:
    macs_after = macs - sum(layers[n].macs - _option(layers[n], p).macs_after for n, p in chosen.items())
    params_after = params - sum(layers[n].params - _option(layers[n], p).params_after for n, p in chosen.items())
    return {
        "mac_ratio": macs_after / macs if macs else None,
        "param_ratio": params_after / params if params else None,
    }
