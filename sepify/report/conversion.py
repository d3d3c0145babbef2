"""What :func:`sepify.convert` did, as data: one :class:`LayerReport` per conv and model totals.

Counts are raw integers everywhere except in the human-readable forms
(:mod:`sepify.report.render`). MACs are for the example inputs as given
(batch included), one MAC per multiply-add, bias not counted.
"""

from __future__ import annotations

import collections
import os
from dataclasses import dataclass, field
from typing import Any

from sepify.calibrate.stages import FidelityStage
from sepify.core.cost import ratio
from sepify.io.atomic import JsonExportable, returned_and_written
from sepify.planning.plan import LayerPlan, Plan
from sepify.report import render
from sepify.report.fields import LayerFields

__all__ = ["LayerReport", "ConversionReport", "FAR_OUTPUT_ERROR", "FAR_AGREEMENT"]

# Past these, a converted model is far from the original (report.far_from_original, report.closeness)
FAR_OUTPUT_ERROR = 0.3
FAR_AGREEMENT = 0.9


@dataclass(frozen=True)
class LayerReport(LayerFields):
    """One conv of the model, converted or skipped (its configuration: :class:`LayerFields`).

    For a skipped conv ``rank``/``order``/``weight_error`` are None and the
    *after* counts equal the *before* counts. MACs sum over every call.
    """

    converted: bool
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    rank: int | None = None
    requested_rank: int | str | None = None
    rank_capped: bool = False
    order: str | None = None
    weight_error: float | None = None
    layout: str | None = None  # how the pair runs, where it has a choice (SeparableConv.layouts)
    latency_before: float | None = None  # seconds, median, the conv at its input shape (latency=True)
    latency_after: float | None = None  # seconds, median, the pair, timed interleaved with the conv

    @property
    def latency_ratio(self) -> float | None:
        """Pair time / conv time at the layer's input shape, when measured."""
        return ratio(self.latency_after, self.latency_before)

    @property
    def realisation(self) -> float | None:
        """Latency ratio / MAC ratio: 1.0 when the MAC savings became time savings one for one."""
        time_ratio = self.latency_ratio
        if time_ratio is None or not self.converted or not self.macs_before or not self.macs_after:
            return None
        return time_ratio / (self.macs_after / self.macs_before)

    @property
    def larger_than_original(self) -> bool:
        """The pair has more params or MACs than the conv it replaced."""
        return self.converted and (self.params_after > self.params_before or self.macs_after > self.macs_before)

    @property
    def param_savings(self) -> float:
        """Fraction of this layer's params saved (negative when it grew)."""
        return 1.0 - self.params_after / self.params_before if self.params_before else 0.0

    @property
    def mac_savings(self) -> float:
        """Fraction of this layer's MACs saved (negative when it grew)."""
        return 1.0 - self.macs_after / self.macs_before if self.macs_before else 0.0

    def to_dict(self) -> dict[str, Any]:
        d = self._fields_dict(("name", "converted", "skip_reason"))
        d["larger_than_original"] = self.larger_than_original
        d["latency_ratio"] = self.latency_ratio
        d["realisation"] = self.realisation
        return d


@dataclass(frozen=True)
class ConversionReport(JsonExportable):
    """What :func:`sepify.convert` did, per conv and for the whole model.

    Whole-model counts are measured on the original and the converted model
    (``FlopCounterMode``; it counts convolutions, linear layers and matmuls);
    ``conv_*`` counts are the sums over the rows.
    """

    layers: tuple[LayerReport, ...]
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    inputs: str
    mode: str
    trace_error: str | None = None
    leaves: dict[str, str] = field(default_factory=dict)
    output_error: float | None = None  # the worst of output_errors (relative, per floating output tensor)
    output_errors: tuple[float | None, ...] = ()
    output_error_reason: str | None = None  # why output_error is None, when it is
    top1_agreement: float | None = None
    notes: tuple[str, ...] = ()
    fidelity: tuple[FidelityStage, ...] = ()
    latency_before: float | None = None  # seconds, median whole-model forward on the example inputs (latency=True)
    latency_after: float | None = None  # the converted model's, timed interleaved with the original
    plan_meta: dict[str, Any] = field(default_factory=dict)  # a budget's plan: the budget, predicted ratios and error
    measured_on: str | None = None  # where errors were measured when not on the outputs (saturated outputs' logits)

    # -- how far the converted model is from the original ------------------
    @property
    def closeness(self) -> tuple[float | None, float | None, str]:
        """``(output error, top-1 agreement, where)`` that say how far the converted model is from the original:
        on the held-out calibration samples after the last kept stage when it was calibrated (real inputs, and more
        of them: the CLI's example inputs are random when only --input-shape is given), else on the example
        inputs."""
        if self.fidelity:
            last = self.fidelity[-1]
            return last.output_error, last.top1_agreement, f"{last.samples} held-out calibration samples"
        return self.output_error, self.top1_agreement, "the example inputs"

    @property
    def far_from_original(self) -> bool:
        """Whether the converted model's outputs are far from the original's (:attr:`closeness`): relative output
        error above :data:`FAR_OUTPUT_ERROR` or top-1 agreement below :data:`FAR_AGREEMENT` (the CLI says so, and
        ``--strict`` refuses to write such a model)."""
        error, agreement, _ = self.closeness
        return bool(self.converted) and (
            (error is not None and error > FAR_OUTPUT_ERROR) or (agreement is not None and agreement < FAR_AGREEMENT)
        )

    # -- totals ---------------------------------------------------------
    @property
    def latency_ratio(self) -> float | None:
        """Converted / original whole-model time on the example inputs, when measured."""
        return ratio(self.latency_after, self.latency_before)

    @property
    def conv_params_before(self) -> int:
        return sum(layer.params_before for layer in self.layers)

    @property
    def conv_params_after(self) -> int:
        return sum(layer.params_after for layer in self.layers)

    @property
    def conv_macs_before(self) -> int:
        return sum(layer.macs_before for layer in self.layers)

    @property
    def conv_macs_after(self) -> int:
        return sum(layer.macs_after for layer in self.layers)

    @property
    def param_ratio(self) -> float | None:
        return ratio(self.params_after, self.params_before)

    @property
    def mac_ratio(self) -> float | None:
        return ratio(self.macs_after, self.macs_before)

    @property
    def converted(self) -> tuple[LayerReport, ...]:
        return tuple(layer for layer in self.layers if layer.converted)

    @property
    def skipped(self) -> tuple[LayerReport, ...]:
        return tuple(layer for layer in self.layers if not layer.converted)

    def skip_summary(self) -> str:
        """Why the skipped convs were skipped, counted by reason: ``"3 excluded, 1 pointwise"``.

        Examples:
            >>> ConversionReport(layers=(), params_before=0, params_after=0, macs_before=0, macs_after=0,
            ...                  inputs="", mode="fx").skip_summary()
            'the model has no convolution'
        """
        if not self.layers:
            return "the model has no convolution"
        counts = collections.Counter(str(layer.skip_reason) for layer in self.skipped)
        return ", ".join(f"{n} {reason}" for reason, n in counts.most_common()) or "none skipped"

    def to_plan(self) -> Plan:
        """The plan that reproduces this conversion (converted layers only; what a budget planned, in its meta)."""
        return Plan(
            {r.name: LayerPlan(int(r.rank), str(r.order), r.layout) for r in self.converted if r.rank and r.order},
            dict(self.plan_meta),
        )

    def layer(self, name: str) -> LayerReport:
        """The row for the conv at qualname ``name``."""
        for row in self.layers:
            if row.name == name:
                return row
        raise KeyError(f"no conv named {name!r} in this report")

    # -- serialisation --------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict with raw integers."""
        return {
            "format": "sepify.conversion-report",
            "version": 1,
            "inputs": self.inputs,
            "mode": self.mode,
            "trace_error": self.trace_error,
            "leaves": dict(self.leaves),
            "totals": {
                "params_before": self.params_before,
                "params_after": self.params_after,
                "macs_before": self.macs_before,
                "macs_after": self.macs_after,
                "conv_params_before": self.conv_params_before,
                "conv_params_after": self.conv_params_after,
                "conv_macs_before": self.conv_macs_before,
                "conv_macs_after": self.conv_macs_after,
                "converted": len(self.converted),
                "skipped": len(self.skipped),
            },
            "verification": {
                "output_error": self.output_error,
                "output_errors": list(self.output_errors),
                "output_error_reason": self.output_error_reason,
                "top1_agreement": self.top1_agreement,
                "measured_on": self.measured_on or "the outputs",
            },
            "latency": {"before": self.latency_before, "after": self.latency_after, "ratio": self.latency_ratio},
            "fidelity": [stage.to_dict() for stage in self.fidelity],
            "notes": list(self.notes),
            "layers": [layer.to_dict() for layer in self.layers],
        }

    def to_csv(self, path: str | os.PathLike[str] | None = None) -> str:
        """One CSV row per conv (tuples as ``3x3``); written atomically to ``path`` when given."""
        return returned_and_written(render.conversion_csv(self), path)

    def to_markdown(self) -> str:
        """A GitHub-flavoured Markdown table with totals underneath."""
        lines = render.markdown_table(*render.conversion_table(self))
        lines += ["", *(f"- {line}" for line in render.conversion_summary(self))]
        return "\n".join(lines) + "\n"

    def to_text(self, *, wide: bool = True, all_rows: bool = False, width: int = render.TERMINAL_WIDTH) -> str:
        """The report as text: the full table (``wide``), or the compact terminal view that fits ``width``."""
        if not wide:
            return "\n".join(render.conversion_compact(self, all_rows=all_rows, width=width))
        return "\n".join([*render.text_table(*render.conversion_table(self)), "", *render.conversion_summary(self)])

    def summary_line(self) -> str:
        """One line: ``converted 2 of 3 convs; MACs 0.245x, params 0.370x; output error 0.131``."""
        error = "-" if self.output_error is None else f"{self.output_error:.3g}"
        macs = "-" if self.mac_ratio is None else f"{self.mac_ratio:.3f}x"
        params = "-" if self.param_ratio is None else f"{self.param_ratio:.3f}x"
        return f"converted {len(self.converted)} of {len(self.layers)} convs; MACs {macs}, params {params}; output error {error}"

    def __str__(self) -> str:
        return self.to_text(wide=False)
