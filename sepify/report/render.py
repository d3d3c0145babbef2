"""Rendering reports as text tables, Markdown and CSV: one module for every report and the CLI.

Pure functions from report data to strings; counts are formatted with
:func:`format_count` (K/M/G with two decimals, like fvcore's tables) and only
here. The data types live in :mod:`sepify.report.conversion` and
:mod:`sepify.report.audit`.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sepify.report.audit import AuditReport
    from sepify.report.conversion import ConversionReport

__all__ = [
    "format_count",
    "text_table",
    "markdown_table",
    "csv_text",
    "conversion_table",
    "conversion_summary",
    "audit_table",
    "audit_summary",
    "audit_csv",
    "conversion_csv",
]


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


def csv_text(fields: list[str], rows: Iterable[Mapping[str, Any]]) -> str:
    """CSV with ``fields`` as header; lists become ``3x3``, None an empty cell, other keys are ignored."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _csv_cell(v) for k, v in row.items()})
    return buf.getvalue()


def _csv_cell(value: Any) -> Any:
    if isinstance(value, list):
        return "x".join(map(str, value))
    return "" if value is None else value


def conversion_table(report: ConversionReport) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the per-layer conversion table."""
    header = "layer|status|Cin|Cout|kernel|stride|out|rank|order|params|params after|MACs|MACs after|weight err".split(
        "|"
    )
    timed = any(r.latency_ratio is not None for r in report.layers)
    if timed:
        header += ["time", "realisation"]
    rows = []
    for r in report.layers:
        status = "converted" if r.converted else f"skip: {r.skip_reason}"
        if r.larger_than_original:
            status += " (larger)"
        rank = "-" if r.rank is None else f"{r.rank}" + ("*" if r.rank_capped else "")
        rows.append(
            [
                r.name or "(root)",
                status,
                str(r.in_channels),
                str(r.out_channels),
                "x".join(map(str, r.kernel_size)),
                "x".join(map(str, r.stride)),
                "x".join(map(str, r.output_size)) if r.output_size else "-",
                rank,
                r.order or "-",
                format_count(r.params_before),
                format_count(r.params_after),
                format_count(r.macs_before),
                format_count(r.macs_after),
                "-" if r.weight_error is None else f"{r.weight_error:.4f}",
            ]
        )
        if timed:
            rows[-1] += [
                "-" if r.latency_ratio is None else f"{r.latency_ratio:.2f}x",
                "-" if r.realisation is None else f"{r.realisation:.2f}",
            ]
    return header, rows


def conversion_summary(report: ConversionReport) -> list[str]:
    """The totals, verification, fidelity, latency and notes under the conversion table."""

    def pct(after: int, before: int) -> str:
        return f"{100 * after / before:.1f}%" if before else "-"

    lines = [
        f"converted {len(report.converted)} of {len(report.layers)} convs (mode: {report.mode}; inputs: {report.inputs})",
        f"params: {format_count(report.params_before)} -> {format_count(report.params_after)} "
        f"({pct(report.params_after, report.params_before)})",
        f"MACs:   {format_count(report.macs_before)} -> {format_count(report.macs_after)} "
        f"({pct(report.macs_after, report.macs_before)}); convs only: {format_count(report.conv_macs_before)} -> "
        f"{format_count(report.conv_macs_after)} ({pct(report.conv_macs_after, report.conv_macs_before)})",
    ]
    verify = "output error: " + ("-" if report.output_error is None else f"{report.output_error:.3e}")
    if report.top1_agreement is not None:
        verify += f"; top-1 agreement: {100 * report.top1_agreement:.1f}%"
    lines.append(verify)
    for st in report.fidelity:
        text = f"held-out calibration ({st.samples} samples), {st.stage}: output error "
        text += "-" if st.output_error is None else f"{st.output_error:.3e}"
        if st.top1_agreement is not None:
            text += f"; top-1 agreement {100 * st.top1_agreement:.1f}%"
        lines.append(text)
    if report.latency_before is not None and report.latency_after is not None:
        lines.append(
            f"whole model: {1e3 * report.latency_before:.2f} ms -> {1e3 * report.latency_after:.2f} ms "
            f"({100 * (report.latency_ratio or 0.0):.1f}%; medians on the example inputs, interleaved)"
        )
    if timed := [r for r in report.layers if r.latency_before is not None and r.latency_after is not None]:
        before = sum(r.latency_before or 0.0 for r in timed)
        after = sum((r.latency_after if r.converted else r.latency_before) or 0.0 for r in timed)
        lines.append(
            f"timed convs: {1e3 * before:.2f} ms -> {1e3 * after:.2f} ms ({100 * after / before:.1f}%; "
            "time = pair / conv, medians at each layer's input shape; realisation = time / MAC ratio)"
        )
    if any(r.rank_capped for r in report.layers):
        lines.append("* rank capped at the layer's exact rank (the pair is exact there)")
    if report.trace_error:
        lines.append(f"fx could not trace the model ({report.trace_error}); convs were swapped as modules")
    for name, why in report.leaves.items():
        lines.append(f"kept {name!r} as an fx leaf ({why}); its convs were swapped as modules")
    lines += list(report.notes)
    return lines


def audit_table(report: AuditReport) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the audit table: candidates by MACs first, then skipped convs."""
    header = "layer|status|Cin|Cout|kernel|MACs|share|r1 MACs|r1 order|r1 weight err|r1 out err|model err|max r".split(
        "|"
    )
    latency = any(o.latency_ratio is not None for layer in report.layers for o in layer.options)
    if latency:
        header.append("r1 time")
    rows = []
    for layer in sorted(report.layers, key=lambda x: (not x.candidate, -x.macs)):
        best = layer.best_at(1)
        status = "candidate" if layer.candidate else f"skip: {layer.skip_reason}"
        row = [
            layer.name,
            status,
            str(layer.in_channels),
            str(layer.out_channels),
            "x".join(map(str, layer.kernel_size)),
            format_count(layer.macs),
            f"{100 * layer.mac_share:.1f}%",
            format_count(best.macs_after) if best else "-",
            best.order if best else "-",
            f"{best.weight_error:.3f}" if best else "-",
            f"{best.output_error:.3f}" if best and best.output_error is not None else "-",
            f"{layer.model_error_rank1:.3f}" if layer.model_error_rank1 is not None else "-",
            str(layer.break_even_rank or "-"),
        ]
        if latency:
            row.append(f"{best.latency_ratio:.2f}x" if best and best.latency_ratio is not None else "-")
        rows.append(row)
    return header, rows


def audit_summary(report: AuditReport) -> list[str]:
    """What the audit table's columns mean, the candidates' share of the MACs, and notes."""
    cands = report.candidates
    share = sum(layer.mac_share for layer in cands)
    lines = [
        f"{len(cands)} of {len(report.layers)} convs are candidates, {100 * share:.1f}% of the model's "
        f"{format_count(report.macs)} MACs (mode: {report.mode}; inputs: {report.inputs})",
        "r1 = rank 1 in the order with the lower output error; model err = whole-model output error "
        "with only that layer at rank 1; max r = largest rank at which the pair is still smaller",
    ]
    if report.model_latency is not None:
        lines.append(f"model latency {1e3 * report.model_latency:.2f} ms (median); r1 time = pair / conv time")
    return lines + list(report.notes)


AUDIT_CSV_FIELDS = [
    "name",
    "skip_reason",
    "in_channels",
    "out_channels",
    "kernel_size",
    "stride",
    "groups",
    "params",
    "macs",
    "mac_share",
    "model_error_rank1",
    "rank",
    "order",
    "params_after",
    "macs_after",
    "weight_error",
    "output_error",
    "refined_error",
    "latency_before",
    "latency_after",
    "latency_ratio",
]


def audit_csv(report: AuditReport) -> str:
    """One row per (layer, option); a skipped layer gets one row with its reason."""
    rows = [
        {**layer.to_dict(), **option}
        for layer in report.layers
        for option in ([o.to_dict() for o in layer.options] or [{}])
    ]
    return csv_text(AUDIT_CSV_FIELDS, rows)


def conversion_csv(report: ConversionReport) -> str:
    """One row per conv, every field of :meth:`LayerReport.to_dict`."""
    rows = [layer.to_dict() for layer in report.layers]
    return csv_text(list(rows[0]) if rows else ["name"], rows)
