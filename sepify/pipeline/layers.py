"""Each conv's row of the report and, where it converts, its pair: the decision is planning's
(:func:`sepify.planning.choice.decide`), building the pair and timing it happen here."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sepify.core.factors import LayerFactors
from sepify.core.modules import SeparableConv, weight_of
from sepify.errors import PlanError
from sepify.graph.candidates import ConvSite, SkipReason
from sepify.options import Timing
from sepify.pipeline.load import apply_planned_layout
from sepify.planning.choice import Option, Request, decide
from sepify.planning.plan import Plan
from sepify.report.conversion import LayerReport
from sepify.runtime.timing import time_pair

__all__ = ["Rank", "planned_reasons", "LayerBuilder", "row"]

Rank = int | str


def planned_reasons(sites: Sequence[ConvSite], plan: Plan) -> dict[str, SkipReason | None]:
    """Why each conv is left alone under ``plan`` (None: the plan converts it, whatever include/exclude said).

    Raises:
        PlanError: the plan names a conv the model does not have, or one that cannot be converted.
    """
    by_name = {site.qualname: site for site in sites}
    for name in plan:
        if name not in by_name:
            raise PlanError(
                f"the plan names {name!r}, but the model has no convolution there; regenerate the plan for this model"
            )
        reason = by_name[name].skip_reason
        if reason is not None and reason is not SkipReason.EXCLUDED:
            raise PlanError(
                f"the plan names {name!r}, which cannot be converted ({reason.value}); remove it from the plan"
            )
    return {
        site.qualname: None if site.qualname in plan else (site.skip_reason or SkipReason.NOT_PLANNED) for site in sites
    }


def row(site: ConvSite, reason: SkipReason | None, **after: Any) -> LayerReport:
    """The report row of ``site``: skipped for ``reason``, or converted with the ``after`` fields."""
    geometry = site.geometry
    params, macs = geometry.params, geometry.macs
    fields: dict[str, Any] = {
        "name": site.qualname,
        "skip_reason": reason,
        **geometry.report_fields(),
        "converted": False,
        "params_before": params,
        "params_after": params,
        "macs_before": macs,
        "macs_after": macs,
    }
    return LayerReport(**{**fields, **after})


class LayerBuilder:
    """Decides each conv (:func:`decide`), builds the pairs that convert, and times them when asked."""

    def __init__(
        self, rank: Rank, order: str, tolerance: float | None, plan: Plan | None, timing: Timing | None,
        allow_larger: bool,
    ) -> None:  # fmt: skip
        self.rank, self.order, self.tolerance, self.plan, self.timing = rank, order, tolerance, plan, timing
        self.allow_larger = allow_larger
        self.meta: dict[str, dict[str, Any]] = {}  # node.meta["sepify"] of each converted conv

    def build(self, sites: Sequence[ConvSite]) -> tuple[list[LayerReport], dict[str, SeparableConv]]:
        """One report row per conv, and the pair of each conv that converts."""
        reasons = planned_reasons(sites, self.plan) if self.plan is not None else {}
        rows: list[LayerReport] = []
        pairs: dict[str, SeparableConv] = {}
        for site in sites:
            reason = reasons.get(site.qualname, site.skip_reason) if self.plan is not None else site.skip_reason
            if reason is not None:
                rows.append(row(site, reason))
                continue
            layer_row, pair = self._convert(site)
            rows.append(layer_row)
            if pair is not None:
                pairs[site.qualname] = pair
        return rows, pairs

    def _request(self, site: ConvSite) -> Request:
        if self.plan is not None:
            planned = self.plan[site.qualname]
            return Request(planned.rank, planned.order, planned=True)
        return Request(self.rank, self.order, self.tolerance, allow_larger=self.allow_larger)

    def _convert(self, site: ConvSite) -> tuple[LayerReport, SeparableConv | None]:
        conv = site.module
        request = self._request(site)
        factors = LayerFactors(weight_of(conv), conv.groups)
        decision = decide(site.geometry, request, factors.weight_error)
        if isinstance(decision, SkipReason):
            return row(site, decision), None
        option: Option = decision
        pair = SeparableConv.from_conv(
            conv, option.rank, option.order, factorization=factors.at(option.order, option.rank)
        )
        if self.plan is not None and (layout := self.plan[site.qualname].layout) is not None:
            apply_planned_layout(pair, site.qualname, layout)
        timed = self._time(site, pair)
        if self.timing is not None and self.timing.skip_slower and timed["latency_after"] >= timed["latency_before"]:
            return row(site, SkipReason.SLOWER, **timed), None
        self.meta[site.qualname] = {"rank": option.rank, "order": option.order, "weight_error": option.weight_error}
        wanted = request.rank
        converted = row(
            site,
            None,
            converted=True,
            rank=option.rank,
            requested_rank=wanted,
            rank_capped=isinstance(wanted, int) and option.rank < wanted,
            order=option.order,
            params_after=option.params_after,
            macs_after=option.macs_after,
            weight_error=option.weight_error,
            layout=pair.layout if len(pair.layouts) > 1 else None,
            **timed,
        )
        return converted, pair

    def _time(self, site: ConvSite, pair: SeparableConv) -> dict[str, Any]:
        """Time the pair against its conv (or only pick its fastest layout); the fastest layout is kept."""
        if self.timing is None or not (self.timing.latency or (self.timing.tune_layout and len(pair.layouts) > 1)):
            return {}
        against = site.module if self.timing.latency else None
        timing = time_pair(
            pair,
            site.call.input_shape,
            self.timing.reps,
            against=against,
            backend=self.timing.backend,
            threads=self.timing.threads,
            context=site.context,
        )
        if timing.layout is not None:
            pair.layout = timing.layout
        return {"latency_before": timing.conv, "latency_after": timing.pair} if self.timing.latency else {}
