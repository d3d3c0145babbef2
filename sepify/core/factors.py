"""One conv's factorisations in every order, computed when first asked for and kept.

The per-channel SVD of each depth-multiplier order (:class:`~sepify.core.decompose.Factorization`, all ranks at
once) and the bottleneck's CP factors per width (:class:`~sepify.core.cp.CPByRank`, one ALS run per width asked
for). :meth:`LayerFactors.weight_error` is what :func:`sepify.planning.choice.decide` asks;
:meth:`LayerFactors.at` is what :meth:`SeparableConv.from_conv` builds from.
"""

from __future__ import annotations

from torch import Tensor

from sepify.core.cp import _WORK, CPByRank, CPFactorization
from sepify.core.decompose import Factorization

__all__ = ["LayerFactors"]


class LayerFactors:
    """The factorisations of ``weight`` (canonical layout, ``groups``); ``cp_work`` bounds each CP width's ALS."""

    def __init__(self, weight: Tensor, groups: int, cp_work: int = _WORK) -> None:
        self.weight, self.groups, self.cp_work = weight, groups, cp_work
        self._orders: dict[str, Factorization | CPByRank] = {}

    def of(self, order: str) -> Factorization | CPByRank:
        """The factorisation of ``order`` at every rank."""
        if order not in self._orders:
            self._orders[order] = (
                CPByRank(self.weight, self.groups, self.cp_work)
                if order == "pw-dw-pw"
                else Factorization.of(self.weight, self.groups, order)
            )
        return self._orders[order]

    def weight_error(self, order: str, rank: int) -> float:
        """``||W - W_hat|| / ||W||`` of the pair ``(order, rank)``."""
        return self.of(order).relative_error(rank)

    def at(self, order: str, rank: int) -> Factorization | CPFactorization:
        """What :meth:`SeparableConv.from_conv` takes for ``(order, rank)``."""
        found = self.of(order)
        return found.at(rank) if isinstance(found, CPByRank) else found
