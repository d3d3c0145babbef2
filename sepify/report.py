"""Report types: one row per conv, model totals, and their text/JSON/CSV/Markdown forms.

Counts are raw integers everywhere except in the human-readable table, which
formats them with :func:`format_count`. MACs are for the example inputs as
given (batch included), one MAC per multiply-add, bias not counted.
"""

from __future__ import annotations

import csv
import dataclasses
import enum
import io
import os
from dataclasses import dataclass, field
from typing import Any

from sepify.atomic import JsonExportable, write_text_atomic
from sepify.plan import LayerPlan, Plan

__all__ = [
    "JsonExportable",
    "markdown_table",
    "text_table",
    "tuples_as_lists",
    "FidelityStage",
    "SkipReason",
    "LayerReport",
    "ConversionReport",
    "format_count",
]


class SkipReason(str, enum.Enum):
    """Why a conv was left as it is. The values are shared with JSON and the CLI."""

    DEPTHWISE = "depthwise"  # groups == in_channels: nothing to separate
    POINTWISE = "pointwise"  # 1x1 kernel: nothing to separate
    SINGLE_INPUT_CHANNEL = "single-input-channel"  # in_channels == 1
    SUBCLASS = "subclass"  # a Conv2d subclass may change forward
    SHARED = "shared"  # called from several places, and skip_shared was asked for
    NOT_CALLED = "not-called"  # never ran on the example inputs
    EXCLUDED = "excluded"  # by include/exclude patterns
    NOT_PLANNED = "not-planned"  # a plan was given and does not list it
    NO_SAVING = "no-saving"  # rank="auto": the pair meeting the tolerance is not smaller
    SLOWER = "slower"  # skip_slower: the pair was timed no faster than the conv at its input shape

    def __str__(self) -> str:
        return self.value


def format_count(n: float | int | None) -> str:
    """Human-readable count: ``1813561344 -> '1.81G'``, ``11689512 -> '11.69M'``.

    >>> format_count(1813561344), format_count(11689512), format_count(4096), format_count(12)
    ('1.81G', '11.69M', '4.10K', '12')
    """
    if n is None:
        return "-"
    for scale, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{suffix}"
    return f"{n:g}" if isinstance(n, float) else str(n)


def ratio(after: float | None, before: float | None) -> float | None:
    """``after / before``; None when either is unknown or ``before`` is not positive."""
    return after / before if after is not None and before is not None and before > 0 else None


def tuples_as_lists(d: dict[str, Any]) -> dict[str, Any]:
    """JSON has no tuples: shapes, strides and sizes become lists."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def text_table(header: list[str], rows: list[list[str]], left: int = 2) -> list[str]:
    """An aligned plain-text table; the first ``left`` columns (names, status) align left."""
    widths = [max(len(c) for c in col) for col in zip(header, *rows)]

    def fmt(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return [fmt(header), "  ".join("-" * w for w in widths), *(fmt(r) for r in rows)]


def markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    """A GitHub-flavoured Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(r) + " |" for r in rows]


@dataclass(frozen=True)
class LayerReport:
    """One conv of the model, converted or skipped.

    For a skipped conv ``rank``/``order``/``weight_error`` are None and the
    *after* counts equal the *before* counts. ``input_size``/``output_size``
    are ``(H, W)`` at the first call (None if never called); ``calls`` counts
    the calls on the example inputs and MACs sum over all of them.
    """

    name: str
    converted: bool
    skip_reason: SkipReason | None
    in_channels: int
    out_channels: int
    kernel_size: tuple[int, int]
    stride: tuple[int, int]
    padding: str | tuple[int, int]
    dilation: tuple[int, int]
    groups: int
    padding_mode: str
    bias: bool
    calls: int
    input_size: tuple[int, int] | None
    output_size: tuple[int, int] | None
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    rank: int | None = None
    requested_rank: int | str | None = None
    rank_capped: bool = False
    order: str | None = None
    weight_error: float | None = None
    layout: str | None = None  # how the pair runs, where it has a choice (SeparableConv2d.layouts)
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
        d = tuples_as_lists(dataclasses.asdict(self))
        d["skip_reason"] = self.skip_reason.value if self.skip_reason else None
        d["larger_than_original"] = self.larger_than_original
        d["latency_ratio"] = self.latency_ratio
        d["realisation"] = self.realisation
        return d


@dataclass(frozen=True)
class FidelityStage:
    """Fidelity on held-out calibration data after one stage (init, refined, bn-refreshed, distilled)."""

    stage: str
    output_error: float | None
    top1_agreement: float | None
    samples: int

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


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
    output_error: float | None = None
    top1_agreement: float | None = None
    notes: tuple[str, ...] = ()
    fidelity: tuple[FidelityStage, ...] = ()
    latency_before: float | None = None  # seconds, median whole-model forward on the example inputs (latency=True)
    latency_after: float | None = None  # the converted model's, timed interleaved with the original

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

    def to_plan(self) -> Plan:
        """The plan that reproduces this conversion (converted layers only)."""
        return Plan({
            r.name: LayerPlan(int(r.rank), str(r.order), r.layout)
            for r in self.converted if r.rank and r.order
        })  # fmt: skip

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
            "verification": {"output_error": self.output_error, "top1_agreement": self.top1_agreement},
            "latency": {"before": self.latency_before, "after": self.latency_after, "ratio": self.latency_ratio},
            "fidelity": [stage.to_dict() for stage in self.fidelity],
            "notes": list(self.notes),
            "layers": [layer.to_dict() for layer in self.layers],
        }

    def to_csv(self, path: str | os.PathLike[str] | None = None) -> str:
        """One CSV row per conv (tuples as ``3x3``); written to ``path`` when given."""
        rows = [layer.to_dict() for layer in self.layers]
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]) if rows else ["name"], lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _csv_cell(v) for k, v in row.items()})
        text = buf.getvalue()
        if path is not None:
            write_text_atomic(path, text)
        return text

    def to_markdown(self) -> str:
        """A GitHub-flavoured Markdown table with totals underneath."""
        lines = markdown_table(*self._table_rows())
        lines += ["", *(f"- {line}" for line in self._summary_lines())]
        return "\n".join(lines) + "\n"

    def __str__(self) -> str:
        return "\n".join([*text_table(*self._table_rows()), "", *self._summary_lines()])

    def _table_rows(self) -> tuple[list[str], list[list[str]]]:
        header = ["layer", "status", "Cin", "Cout", "kernel", "stride", "out", "rank", "order",
                  "params", "params after", "MACs", "MACs after", "weight err"]  # fmt: skip
        timed = any(r.latency_ratio is not None for r in self.layers)
        if timed:
            header += ["time", "realisation"]
        rows = []
        for r in self.layers:
            status = "converted" if r.converted else f"skip: {r.skip_reason}"
            if r.larger_than_original:
                status += " (larger)"
            rank = "-" if r.rank is None else f"{r.rank}" + ("*" if r.rank_capped else "")
            rows.append([
                r.name or "(root)", status, str(r.in_channels), str(r.out_channels),
                "x".join(map(str, r.kernel_size)), "x".join(map(str, r.stride)),
                "x".join(map(str, r.output_size)) if r.output_size else "-", rank, r.order or "-",
                format_count(r.params_before), format_count(r.params_after),
                format_count(r.macs_before), format_count(r.macs_after),
                "-" if r.weight_error is None else f"{r.weight_error:.4f}",
            ])  # fmt: skip
            if timed:
                rows[-1] += [
                    "-" if r.latency_ratio is None else f"{r.latency_ratio:.2f}x",
                    "-" if r.realisation is None else f"{r.realisation:.2f}",
                ]
        return header, rows

    def _summary_lines(self) -> list[str]:
        def pct(after: int, before: int) -> str:
            return f"{100 * after / before:.1f}%" if before else "-"

        lines = [
            f"converted {len(self.converted)} of {len(self.layers)} convs (mode: {self.mode}; inputs: {self.inputs})",
            f"params: {format_count(self.params_before)} -> {format_count(self.params_after)} "
            f"({pct(self.params_after, self.params_before)})",
            f"MACs:   {format_count(self.macs_before)} -> {format_count(self.macs_after)} "
            f"({pct(self.macs_after, self.macs_before)}); convs only: {format_count(self.conv_macs_before)} -> "
            f"{format_count(self.conv_macs_after)} ({pct(self.conv_macs_after, self.conv_macs_before)})",
        ]
        verify = "output error: " + ("-" if self.output_error is None else f"{self.output_error:.3e}")
        if self.top1_agreement is not None:
            verify += f"; top-1 agreement: {100 * self.top1_agreement:.1f}%"
        lines.append(verify)
        for st in self.fidelity:
            text = f"held-out calibration ({st.samples} samples), {st.stage}: output error "
            text += "-" if st.output_error is None else f"{st.output_error:.3e}"
            if st.top1_agreement is not None:
                text += f"; top-1 agreement {100 * st.top1_agreement:.1f}%"
            lines.append(text)
        if self.latency_before is not None and self.latency_after is not None:
            lines.append(
                f"whole model: {1e3 * self.latency_before:.2f} ms -> {1e3 * self.latency_after:.2f} ms "
                f"({100 * (self.latency_ratio or 0.0):.1f}%; medians on the example inputs, interleaved)"
            )
        if timed := [r for r in self.layers if r.latency_before is not None and r.latency_after is not None]:
            before = sum(r.latency_before or 0.0 for r in timed)
            after = sum((r.latency_after if r.converted else r.latency_before) or 0.0 for r in timed)
            lines.append(
                f"timed convs: {1e3 * before:.2f} ms -> {1e3 * after:.2f} ms ({100 * after / before:.1f}%; "
                "time = pair / conv, medians at each layer's input shape; realisation = time / MAC ratio)"
            )
        if any(r.rank_capped for r in self.layers):
            lines.append("* rank capped at the layer's exact rank (the pair is exact there)")
        if self.trace_error:
            lines.append(f"fx could not trace the model ({self.trace_error}); convs were swapped as modules")
        for name, why in self.leaves.items():
            lines.append(f"kept {name!r} as an fx leaf ({why}); its convs were swapped as modules")
        lines += list(self.notes)
        return lines


def _csv_cell(value: Any) -> Any:
    if isinstance(value, list):
        return "x".join(map(str, value))
    return "" if value is None else value
