"""Rendering reports as text tables, Markdown and CSV: one module for every report and the CLI.

Pure functions from report data to strings; counts are formatted with
:func:`format_count` (K/M/G with two decimals, like fvcore's tables) and only
here. The data types live in :mod:`sepify.report.conversion` and
:mod:`sepify.report.audit`.
"""

from __future__ import annotations

import csv
import io
import textwrap
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sepify.planning.plan import Plan
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
    "shorten",
    "conversion_compact",
    "audit_compact",
    "plan_summary",
    "TERMINAL_WIDTH",
]

TERMINAL_WIDTH = 100  # print(report): the compact views fit this many columns; the CLI passes the terminal's
_MIN_NAME = 12


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
    header = (
        "layer|kind|status|Cin|Cout|kernel|stride|out|rank|order|params|params after|MACs|MACs after|weight err".split(
            "|"
        )
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
                r.kind,
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
    on = f" (on {report.measured_on})" if report.measured_on else ""
    verify = f"output error{on}: " + ("-" if report.output_error is None else f"{report.output_error:.3e}")
    if report.output_error is None and report.output_error_reason:
        verify += f" ({report.output_error_reason})"
    elif len(report.output_errors) > 1:
        each = ", ".join("-" if e is None else f"{e:.2e}" for e in report.output_errors[:6])
        more = ", ..." if len(report.output_errors) > 6 else ""
        verify += f" (the worst of {len(report.output_errors)} outputs: {each}{more})"
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
    header = (
        "layer|kind|status|Cin|Cout|kernel|MACs|share|r1 MACs|r1 order|r1 weight err|r1 out err|model err|max r".split(
            "|"
        )
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
            layer.kind,
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
    "kind",
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


# -- compact terminal views ------------------------------------------------------------------------------------------


def shorten(name: str, width: int) -> str:
    """``name`` cut in the middle to at most ``width`` characters, keeping both ends (where layer names differ).

    >>> shorten("features.denseblock4.denselayer16.conv2", 24)
    'features.de…ayer16.conv2'
    >>> shorten("layer1.0.conv1", 24)
    'layer1.0.conv1'
    """
    if len(name) <= width:
        return name
    head = (width - 1) // 2
    return name[:head] + "…" + name[len(name) - (width - 1 - head) :]


def _fit(header: list[str], rows: list[list[str]], width: int, droppable: tuple[str, ...] = ()) -> list[str]:
    """A text table that fits ``width``: the first column (names) shortened in the middle, then the ``droppable``
    columns left out, in that order, while it still does not fit."""
    header, rows = list(header), [list(r) for r in rows]
    for column in (None, *droppable):
        if column is not None and column in header:
            k = header.index(column)
            header, rows = header[:k] + header[k + 1 :], [r[:k] + r[k + 1 :] for r in rows]
        other = sum(max(len(c) for c in col) for col in zip(header[1:], *(r[1:] for r in rows))) + 2 * (len(header) - 1)
        names = max([len(header[0]), *(len(r[0]) for r in rows)])
        room = max(_MIN_NAME, min(names, width - other - 1))
        if room + other + 1 <= width:
            break
    return text_table(header, [[shorten(r[0], room), *r[1:]] for r in rows], left=1)


def _conv(
    in_channels: int, out_channels: int, kernel: tuple[int, ...], stride: tuple[int, ...], groups: int, kind: str
) -> str:
    """``64->128 3x3/2 g2``; kinds other than conv2d are named first (``conv_transpose1d 64->32 4/2``)."""
    text = f"{'' if kind == 'conv2d' else kind + ' '}{in_channels}->{out_channels} {'x'.join(map(str, kernel))}"
    if any(s != 1 for s in stride):
        text += "/" + "x".join(map(str, stride)) if len(set(stride)) > 1 else f"/{stride[0]}"
    return text + (f" g{groups}" if groups > 1 else "")


def _arrow(before: int, after: int) -> str:
    return f"{format_count(before)} -> {format_count(after)}"


def _skipped_line(reasons: list[tuple[str, str]], what: str) -> list[str]:
    """``skipped 36 convs: 36 pointwise`` (with the names when there are few)."""
    if not reasons:
        return []
    counts: dict[str, list[str]] = {}
    for name, reason in reasons:
        counts.setdefault(reason, []).append(name)
    parts = []
    for reason, names in sorted(counts.items(), key=lambda kv: -len(kv[1])):
        listed = f" ({', '.join(shorten(n, 24) for n in names)})" if len(names) <= 3 else ""
        parts.append(f"{len(names)} {reason}{listed}")
    return [f"{what} {len(reasons)} conv{'s' if len(reasons) > 1 else ''}: {'; '.join(parts)} (--all lists them)"]


def conversion_compact(report: ConversionReport, *, all_rows: bool = False, width: int = TERMINAL_WIDTH) -> list[str]:
    """The terminal view of a conversion: totals first, one row per converted conv, skipped convs in one line.

    Columns: layer, conv (``Cin->Cout kernel/stride gGroups``), rank and order (``*``: capped at the exact rank),
    MACs and params before -> after, weight error, and pair/conv time when measured. ``all_rows`` lists skipped
    convs too. Names are shortened in the middle so that the table fits ``width`` columns.
    """
    lines = conversion_summary(report)
    totals, rest = lines[:4], lines[4:]
    timed = any(r.latency_ratio is not None for r in report.layers)
    header = ["layer", "conv", "rank order", "MACs", "params", "w err"] + (["time"] if timed else [])
    rows, skipped = [], []
    for r in report.layers:
        if not r.converted and not all_rows:
            skipped.append((r.name or "(root)", str(r.skip_reason)))
            continue
        structure = f"{r.rank}{'*' if r.rank_capped else ''} {r.order}" if r.converted else f"skip: {r.skip_reason}"
        row = [
            r.name or "(root)",
            _conv(r.in_channels, r.out_channels, r.kernel_size, r.stride, r.groups, r.kind),
            structure + (" (larger)" if r.larger_than_original else ""),
            _arrow(r.macs_before, r.macs_after) if r.converted else format_count(r.macs_before),
            _arrow(r.params_before, r.params_after) if r.converted else format_count(r.params_before),
            "-" if r.weight_error is None else f"{r.weight_error:.3f}",
        ]
        if timed:
            row.append("-" if r.latency_ratio is None else f"{r.latency_ratio:.2f}x")
        rows.append(row)
    table = _fit(header, rows, width, droppable=("params", "w err", "conv")) if rows else []
    prose = _wrapped([*_skipped_line(skipped, "skipped"), *([""] if rest else []), *rest], width)
    return [*_wrapped(totals, width), "", *table, *prose]


def plan_summary(plan: Plan) -> list[str]:
    """What a plan does and what its predicted error means."""
    meta = plan.meta
    lines = [f"plan: {len(plan)} convs; MACs {meta['mac_ratio']:.3f}x, params {meta['param_ratio']:.3f}x"]
    if "latency_ratio" in meta and meta["latency_ratio"] is not None:
        lines[0] += f", latency {meta['latency_ratio']:.3f}x"
    error = meta["predicted_error"]
    lines[0] += f"; predicted output error {error:.3g}"
    lines.append(
        "  (||y_slim - y|| / ||y|| on the example inputs, from each planned layer's measured error and how much of "
        "it reached the output when that layer alone was converted, added in energy"
        + (
            "; above 1 the outputs move by more than their own size: expect the task to suffer unless calibration "
            "recovers it, or relax the budget)"
            if error > 1
            else ")"
        )
    )
    return lines


def audit_compact(
    report: AuditReport, plan: Plan | None = None, *, all_rows: bool = False, width: int = TERMINAL_WIDTH
) -> list[str]:
    """The terminal view of an audit: candidates by MACs with their rank-1 option, the plan's pick per layer.

    Columns: layer, conv, MACs and share of the model, the rank-1 order with the lower error and that error (the
    layer's own output error when measured, else its weight error), the whole-model error with only that layer at
    rank 1, and with a plan the rank and order it picked and the MACs after. Skipped convs are one line unless
    ``all_rows``.
    """
    header = ["layer", "conv", "MACs (share)", "r1 order", "r1 err", "model err"] + (["plan"] if plan else [])
    rows, skipped = [], []
    for layer in sorted(report.layers, key=lambda x: (not x.candidate, -x.macs)):
        if not layer.candidate and not all_rows:
            skipped.append((layer.name, str(layer.skip_reason)))
            continue
        best = layer.best_at(1)
        err = None if best is None else (best.output_error if best.output_error is not None else best.weight_error)
        row = [
            layer.name,
            _conv(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.groups, layer.kind),
            f"{format_count(layer.macs)} ({100 * layer.mac_share:.1f}%)",
            best.order if best else f"skip: {layer.skip_reason}",
            "-" if err is None else f"{err:.3f}",
            "-" if layer.model_error_rank1 is None else f"{layer.model_error_rank1:.3f}",
        ]
        if plan is not None:
            pick = plan.layers.get(layer.name)
            if pick is None:
                row.append("-")
            else:
                chosen = layer.option(pick.rank, pick.order)
                row.append(f"{pick.rank} {pick.order} -> {format_count(chosen.macs_after)}")
        rows.append(row)
    cands = report.candidates
    share = sum(layer.mac_share for layer in cands)
    head = [
        f"{len(cands)} of {len(report.layers)} convs are candidates, {100 * share:.1f}% of the model's "
        f"{format_count(report.macs)} MACs (mode: {report.mode}; inputs: {report.inputs})",
        *(plan_summary(plan) if plan is not None else []),
    ]
    tail = [
        *_skipped_line(skipped, "skipped"),
        "",
        "r1 err = the layer's own output error at rank 1 (weight error where not measured); model err = whole-model "
        "output error with only that layer at rank 1" + ("; plan = rank order -> MACs after" if plan else ""),
    ]
    if report.model_latency is not None:
        tail.append(f"model latency {1e3 * report.model_latency:.2f} ms (median)")
    table = _fit(header, rows, width, droppable=("conv", "r1 order", "MACs (share)")) if rows else []
    return [*_wrapped(head, width), "", *table, *_wrapped(tail + list(report.notes), width)]


def _wrapped(lines: list[str], width: int) -> list[str]:
    """Prose lines wrapped at ``width`` (continuations indented)."""
    out: list[str] = []
    for line in lines:
        if len(line) <= width:
            out.append(line)
        else:
            indent = len(line) - len(line.lstrip())
            out += textwrap.wrap(line, width, subsequent_indent=" " * (indent + 2), break_on_hyphens=False)
    return out
