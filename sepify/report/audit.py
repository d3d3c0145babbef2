"""What :func:`sepify.audit` found, as data: per conv its cost and its options, and a plan under a budget.

Planning itself (the error model and the solver) lives in
:mod:`sepify.planning`; text, Markdown and CSV forms in :mod:`sepify.report.render`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from sepify.errors import PlanError
from sepify.io.atomic import JsonExportable, returned_and_written
from sepify.planning.budget import choose_plan, option_error, predicted_error
from sepify.planning.choice import Option
from sepify.planning.plan import Plan, read_json
from sepify.report import render
from sepify.report.fields import LayerFields
from sepify.vocab import SkipReason

__all__ = ["AuditLayer", "AuditReport", "AUDIT_FORMAT", "AUDIT_VERSION"]

AUDIT_FORMAT = "sepify.audit-report"
AUDIT_VERSION = 2  # 2: rows carry every LayerFields field; options pay in params and MACs


@dataclass(frozen=True)
class AuditLayer(LayerFields):
    """One conv (its configuration: :class:`~sepify.report.conversion.LayerFields`): its cost, why it is skipped,
    or its options."""

    params: int
    macs: int
    mac_share: float  # of the whole model's MACs
    param_share: float
    options: tuple[Option, ...] = ()
    model_error_rank1: float | None = None  # whole-model output error (the worst output), only this layer at rank 1
    sensitivity_order: str | None = None  # the order used for model_error_rank1

    @property
    def candidate(self) -> bool:
        return self.skip_reason is None

    def option(self, rank: int, order: str) -> Option:
        for o in self.options:
            if (o.rank, o.order) == (rank, order):
                return o
        raise KeyError(f"{self.name} has no option rank={rank} order={order!r}")

    def best_at(self, rank: int) -> Option | None:
        """The option at ``rank`` with the lowest (output, then weight) error."""
        found = [o for o in self.options if o.rank == rank]
        return min(found, key=option_error) if found else None

    @property
    def break_even_rank(self) -> int | None:
        """Largest depth multiplier listed (the pair is still smaller there), over dw-pw and pw-dw."""
        return max((o.rank for o in self.options if o.order != "pw-dw-pw"), default=None)

    def to_dict(self) -> dict[str, Any]:
        d = self._fields_dict(("name", "skip_reason"))
        d["options"] = [o.to_dict() for o in self.options]
        return d


@dataclass(frozen=True)
class AuditReport(JsonExportable):
    """What :func:`sepify.audit` found; call :meth:`plan` to choose under a budget."""

    layers: tuple[AuditLayer, ...]
    params: int
    macs: int
    inputs: str
    mode: str
    model_latency: float | None = None  # seconds, median of the whole original model
    notes: tuple[str, ...] = field(default_factory=tuple)
    timed_in: str | None = None  # where latency was measured ("onnxruntime, 1 thread"), when it was
    int8_latency_ratio: float | None = None  # the original as int8 over float32 in timed_in's runtime (calibrated)

    @property
    def candidates(self) -> tuple[AuditLayer, ...]:
        return tuple(layer for layer in self.layers if layer.candidate)

    def layer(self, name: str) -> AuditLayer:
        for row in self.layers:
            if row.name == name:
                return row
        raise KeyError(f"no conv named {name!r} in this audit")

    def predicted_error(self, plan: Plan) -> float:
        """Predicted whole-model relative output error if ``plan`` is applied."""
        return predicted_error({layer.name: layer for layer in self.layers}, plan)

    def plan(
        self,
        *,
        max_mac_ratio: float | None = None,
        max_param_ratio: float | None = None,
        max_latency_ratio: float | None = None,
        max_error: float | None = None,
    ) -> Plan:
        """Pick per layer skip or one (rank, order), under exactly one budget.

        * ``max_mac_ratio`` / ``max_param_ratio`` / ``max_latency_ratio``:
          whole-model MACs / params / latency after <= ratio x before, with
          the least predicted output error (exact multiple-choice knapsack,
          see :mod:`sepify.planning.knapsack`; the budget is never exceeded).
        * ``max_error``: the most MACs saved with predicted whole-model output
          error <= ``max_error``.

        When latency was measured, pairs slower than the conv they replace are
        never chosen, and the plan's ``meta["timed_in"]`` says where (backend
        and threads) they were timed.

        Raises:
            ConfigError: not exactly one budget, or a ratio outside (0, 1].
            BudgetError: the budget cannot be met; says the smallest reachable ratio.

        Examples:
            >>> import torch, sepify
            >>> net = torch.nn.Sequential(torch.nn.Conv2d(8, 32, 3), torch.nn.Conv2d(32, 32, 3))
            >>> report = sepify.audit(net, torch.randn(1, 8, 12, 12))
            >>> plan = report.plan(max_mac_ratio=0.5)
            >>> plan.meta["mac_ratio"] <= 0.5
            True
        """
        budget = {
            "max_mac_ratio": max_mac_ratio,
            "max_param_ratio": max_param_ratio,
            "max_latency_ratio": max_latency_ratio,
            "max_error": max_error,
        }
        return choose_plan(
            self.candidates,
            budget,
            params=self.params,
            macs=self.macs,
            model_latency=self.model_latency,
            meta={"inputs": self.inputs, **({"timed_in": self.timed_in} if self.timed_in else {})},
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": AUDIT_FORMAT,
            "version": AUDIT_VERSION,
            "inputs": self.inputs,
            "mode": self.mode,
            "totals": {
                "params": self.params,
                "macs": self.macs,
                "model_latency": self.model_latency,
                "int8_latency_ratio": self.int8_latency_ratio,
            },
            "timed_in": self.timed_in,
            "notes": list(self.notes),
            "layers": [layer.to_dict() for layer in self.layers],
        }

    @classmethod
    def from_dict(cls, data: Any, source: str = "audit") -> AuditReport:
        """The audit :meth:`to_dict` wrote (``sepify audit --audit-out``): planning again needs no model.

        Raises:
            PlanError: not a sepify audit, another version, or damaged.
        """
        if not isinstance(data, dict) or data.get("format") != AUDIT_FORMAT:
            raise PlanError(f'{source} is not a sepify audit (no "format": "{AUDIT_FORMAT}" field)')
        if data.get("version") != AUDIT_VERSION:
            raise PlanError(f"{source} is a version {data.get('version')!r} audit; this sepify reads {AUDIT_VERSION}")
        try:
            totals = data["totals"]
            return cls(
                layers=tuple(_layer_of(row) for row in data["layers"]),
                params=int(totals["params"]),
                macs=int(totals["macs"]),
                inputs=str(data["inputs"]),
                mode=str(data["mode"]),
                model_latency=totals.get("model_latency"),
                int8_latency_ratio=totals.get("int8_latency_ratio"),
                notes=tuple(data.get("notes", ())),
                timed_in=data.get("timed_in"),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise PlanError(
                f"{source} is a damaged audit ({type(e).__name__}: {e}); write it again with sepify audit --audit-out"
            ) from e

    @classmethod
    def from_json(cls, path: str | os.PathLike[str]) -> AuditReport:
        """Read an audit from the JSON file ``sepify audit --audit-out`` wrote."""
        data, source = read_json(path, "audit")
        return cls.from_dict(data, source)

    def to_csv(self, path: str | os.PathLike[str] | None = None) -> str:
        """One row per (layer, option); written atomically to ``path`` when given."""
        return returned_and_written(render.audit_csv(self), path)

    def to_markdown(self) -> str:
        lines = render.markdown_table(*render.audit_table(self))
        return "\n".join([*lines, "", *(f"- {s}" for s in render.audit_summary(self))]) + "\n"

    def to_text(
        self, plan: Plan | None = None, *, wide: bool = True, all_rows: bool = False, width: int = render.TERMINAL_WIDTH
    ) -> str:
        """The audit as text: the full table (``wide``), or the compact view with ``plan``'s pick per layer."""
        if not wide:
            return "\n".join(render.audit_compact(self, plan, all_rows=all_rows, width=width))
        lines = [*render.text_table(*render.audit_table(self)), "", *render.audit_summary(self)]
        return "\n".join(lines + (render.plan_summary(plan) if plan is not None else []))

    def __str__(self) -> str:
        return self.to_text(wide=False)


_TUPLES = ("kernel_size", "stride", "dilation", "input_size", "output_size")
_OPTION_FIELDS = tuple(Option.__dataclass_fields__)


def _layer_of(row: dict[str, Any]) -> AuditLayer:
    """One row of :meth:`AuditReport.to_dict` back as an :class:`AuditLayer`."""
    fields = {k: v for k, v in row.items() if k in AuditLayer.__dataclass_fields__}
    for key in _TUPLES:
        if fields.get(key) is not None:
            fields[key] = tuple(fields[key])
    if isinstance(fields.get("padding"), list):
        fields["padding"] = tuple(fields["padding"])
    reason = fields.get("skip_reason")
    fields["skip_reason"] = SkipReason(reason) if reason is not None else None
    fields["options"] = tuple(Option(**{k: o[k] for k in _OPTION_FIELDS if k in o}) for o in row.get("options", ()))
    return AuditLayer(**fields)
