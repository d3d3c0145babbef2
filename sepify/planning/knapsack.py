"""Choosing per-layer (rank, order) under a budget: an exact multiple-choice knapsack.

Each candidate layer offers "skip" plus a few options, each with a saving
(MACs, params or seconds) and a predicted loss. Two problems are solved by
dynamic programming over a discretised resource (vectorised with NumPy, so that re-planning a saved audit
needs no torch):

* ``min_loss_for_saving``: least total loss with total saving >= required.
  Savings are rounded *down* to whole units (``required / max(4000, 200 *
  layers)``); each DP state also carries the exact saving of its path, and a
  final state is accepted only if that exact saving meets the requirement,
  so the budget is never exceeded and exact boundaries are still reachable.
* ``max_saving_for_loss``: most total saving with total loss <= allowed,
  the mirror image (losses rounded *up*, exact loss checked at the end).

Nothing here knows about models; it is tested on random tables.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["Item", "min_loss_for_saving", "max_saving_for_loss"]


@dataclass(frozen=True)
class Item:
    """One option of one layer: its saving and its predicted loss (>= 0)."""

    saving: float
    loss: float


def _buckets(n_layers: int) -> int:
    return max(4000, 200 * n_layers)


Array = np.ndarray


def _backtrack(back: list[Array], prev: list[Array], state: int) -> list[int | None]:
    picks: list[int | None] = [None] * len(back)
    for i in range(len(back) - 1, -1, -1):
        j = int(back[i][state])
        picks[i] = None if j < 0 else j
        state = int(prev[i][state])
    return picks


def _solve(
    layers: Sequence[Sequence[Item]], weights: list[list[int]], size: int, minimise_loss: bool
) -> tuple[Array, Array, Array, list[Array], list[Array]]:
    """Shared DP over buckets ``0..size`` (moves past ``size`` clamp to ``size``).

    Returns per final bucket: objective, exact saving, exact loss, and the
    back-pointers. The objective is the loss (minimised) or the saving
    (maximised, as its negative).
    """
    index = np.arange(size + 1)
    cost = np.full(size + 1, math.inf)
    saving = np.zeros(size + 1)
    loss = np.zeros(size + 1)
    cost[0] = 0.0
    back, prev = [], []
    for options, ws in zip(layers, weights):
        best_cost, best_saving, best_loss = cost.copy(), saving.copy(), loss.copy()
        choice, source = np.full(size + 1, -1), index.copy()
        for j, (c, w) in enumerate(zip(options, ws)):
            if w < 0:
                continue  # option unusable in this problem
            step = c.loss if minimise_loss else -c.saving
            target = np.minimum(index + w, size)
            for_target = np.full(size + 1, math.inf)
            np.minimum.at(for_target, target, cost + step)
            # which source produced each target's minimum (first one on ties)
            hit = (cost + step) == for_target[target]
            src = np.full(size + 1, size + 1)
            np.minimum.at(src, target[hit], index[hit])
            better = for_target < best_cost
            src = np.where(better, src, 0)
            best_cost = np.where(better, for_target, best_cost)
            best_saving = np.where(better, saving[src] + c.saving, best_saving)
            best_loss = np.where(better, loss[src] + c.loss, best_loss)
            choice = np.where(better, j, choice)
            source = np.where(better, src, source)
        back.append(choice)
        prev.append(source)
        cost, saving, loss = best_cost, best_saving, best_loss
    return cost, saving, loss, back, prev


def min_loss_for_saving(layers: Sequence[Sequence[Item]], required: float) -> list[int | None] | None:
    """Per layer, the index of the chosen option (None = skip), or None if unreachable.

    Minimises total loss subject to ``sum(saving) >= required``.

    >>> layers = [[Item(5, 1.0), Item(8, 3.0)], [Item(4, 0.5)]]
    >>> min_loss_for_saving(layers, 9)
    [0, 0]
    >>> min_loss_for_saving(layers, 12)
    [1, 0]
    >>> min_loss_for_saving(layers, 13) is None
    True
    """
    if required <= 0:
        return [None] * len(layers)
    size = _buckets(len(layers))
    unit = required / size if required / size > 0 else required
    # round down: a bucket never over-counts a saving; useless options get -1
    weights = [[int(math.floor(c.saving / unit + 1e-9)) if c.saving > 0 else -1 for c in opts] for opts in layers]
    cost, saving, _, back, prev = _solve(layers, weights, size, minimise_loss=True)
    feasible = np.isfinite(cost) & (saving >= required * (1 - 1e-12))
    if not bool(feasible.any()):
        return None
    state = int(np.argmin(np.where(feasible, cost, math.inf)))
    return _backtrack(back, prev, state)


def max_saving_for_loss(layers: Sequence[Sequence[Item]], allowed: float) -> list[int | None]:
    """Per layer, the chosen option index (None = skip) maximising saving with ``sum(loss) <= allowed``.

    Options with no saving are never chosen.

    >>> layers = [[Item(5, 1.0), Item(8, 3.0)], [Item(4, 0.5)]]
    >>> max_saving_for_loss(layers, 1.5)
    [0, 0]
    >>> max_saving_for_loss(layers, 3.5)
    [1, 0]
    >>> max_saving_for_loss(layers, 0.0)
    [None, None]
    """
    size = _buckets(len(layers))
    # (subnormal bounds would make the unit 0: fall back to one bucket per bound)
    unit = allowed / size if allowed / size > 0 else (allowed if allowed > 0 else 1.0)
    slack = len(layers) + 1  # rounding up adds at most one bucket per layer
    weights = []
    for opts in layers:
        ws = []
        for c in opts:
            if c.saving <= 0 or c.loss > allowed:
                ws.append(-1)  # never worth it, or over the bound on its own
                continue
            w = 0 if c.loss <= 0 else int(math.ceil(c.loss / unit - 1e-9))
            ws.append(w if w <= size + slack else -1)
        weights.append(ws)
    cost, _, loss, back, prev = _solve(layers, weights, size + slack, minimise_loss=False)
    feasible = np.isfinite(cost) & (loss <= allowed * (1 + 1e-12))
    objective = np.where(feasible, cost, math.inf)
    state = int(np.argmin(objective))  # most saving; the first (least loss) on ties
    return _backtrack(back, prev, state)
