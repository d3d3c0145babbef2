"""``sepify.audit``: which convs are worth slimming, at which rank and order.

Never mutates the model. For each candidate conv and every useful rank (from
1 up to where the pair stops being smaller) in each order, the audit reports
params and MACs after, the weight error (from the singular values), and the
layer's own output error on the example inputs (all ranks from one batched
conv of rank-one terms). It also measures how much each layer matters
downstream (whole-model output error with only that layer at rank 1) and,
with ``latency=True``, the median time of the original conv vs each pair.
``AuditReport.plan`` turns this into a :class:`~sepify.Plan` under a budget.
"""

from __future__ import annotations

import contextlib
import csv
import io
import logging
import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sepify.analysis import Analysis, analyze, count_params, normalize_inputs, pair_macs, site_macs, spatial
from sepify.atomic import write_text_atomic
from sepify.calibration import calibration_batches
from sepify.candidates import ConvSite
from sepify.cost import conv_params, exact_rank, separable_params
from sepify.decompose import ORDERS, Factorization
from sepify.errors import ConfigError, SepifyError
from sepify.modules import PairTiming, SeparableConv2d
from sepify.plan import LayerPlan, Plan
from sepify.planner import Choice, max_saving_for_loss, min_loss_for_saving
from sepify.probe import describe_inputs, preserved_state, time_forwards
from sepify.refine import refit_errors
from sepify.report import (
    JsonExportable,
    SkipReason,
    format_count,
    markdown_table,
    ratio,
    text_table,
    tuples_as_lists,
)
from sepify.rewrite import replace_submodule
from sepify.verify import output_error

__all__ = ["audit", "AuditReport", "AuditLayer", "AuditOption", "BudgetError"]

logger = logging.getLogger(__name__)

ProgressFn = Callable[[str, int, int], None]


class BudgetError(SepifyError):
    """A planning budget cannot be met by any combination of layers."""


@dataclass(frozen=True)
class AuditOption:
    """One way to convert one conv."""

    rank: int
    order: str
    params_after: int
    macs_after: int
    weight_error: float
    output_error: float | None = None  # the layer's own ||y_r - y|| / ||y|| on the example inputs
    refit_error: float | None = None  # the same after a least-squares refit of the last factor (calibration)
    latency_before: float | None = None  # seconds, median, original conv
    latency_after: float | None = None  # seconds, median, the pair in its fastest layout
    layout: str | None = None  # the fastest layout, where the pair has a choice and latency was measured

    @property
    def latency_ratio(self) -> float | None:
        return ratio(self.latency_after, self.latency_before)

    def to_dict(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d["latency_ratio"] = self.latency_ratio
        return d


@dataclass(frozen=True)
class AuditLayer:
    """One conv: its cost, why it is skipped, or its options."""

    name: str
    skip_reason: SkipReason | None
    in_channels: int
    out_channels: int
    kernel_size: tuple[int, int]
    stride: tuple[int, int]
    groups: int
    calls: int
    input_size: tuple[int, int] | None
    output_size: tuple[int, int] | None
    params: int
    macs: int
    mac_share: float  # of the whole model's MACs
    param_share: float
    options: tuple[AuditOption, ...] = ()
    model_error_rank1: float | None = None  # whole-model output error, only this layer at rank 1
    sensitivity_order: str | None = None  # the order used for model_error_rank1

    @property
    def candidate(self) -> bool:
        return self.skip_reason is None

    def option(self, rank: int, order: str) -> AuditOption:
        for o in self.options:
            if (o.rank, o.order) == (rank, order):
                return o
        raise KeyError(f"{self.name} has no option rank={rank} order={order!r}")

    def best_at(self, rank: int) -> AuditOption | None:
        """The option at ``rank`` with the lowest (output, then weight) error."""
        found = [o for o in self.options if o.rank == rank]
        return min(found, key=_option_error) if found else None

    @property
    def break_even_rank(self) -> int | None:
        """Largest rank listed (the pair is still smaller there), over both orders."""
        return max((o.rank for o in self.options), default=None)

    def to_dict(self) -> dict[str, Any]:
        d = tuples_as_lists({k: getattr(self, k) for k in self.__dataclass_fields__ if k != "options"})
        d["skip_reason"] = self.skip_reason.value if self.skip_reason else None
        d["options"] = [o.to_dict() for o in self.options]
        return d


def _option_error(o: AuditOption) -> float:
    """The best available predictor of the layer's error: after refit, else measured, else weight error."""
    if o.refit_error is not None:
        return o.refit_error
    return o.output_error if o.output_error is not None else o.weight_error


@dataclass(frozen=True)
class AuditReport(JsonExportable):
    """What :func:`audit` found; call :meth:`plan` to choose under a budget."""

    layers: tuple[AuditLayer, ...]
    params: int
    macs: int
    inputs: str
    mode: str
    model_latency: float | None = None  # seconds, median of the whole original model
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def candidates(self) -> tuple[AuditLayer, ...]:
        return tuple(layer for layer in self.layers if layer.candidate)

    def layer(self, name: str) -> AuditLayer:
        for row in self.layers:
            if row.name == name:
                return row
        raise KeyError(f"no conv named {name!r} in this audit")

    # -- planning ---------------------------------------------------------------

    def _loss(self, layer: AuditLayer, option: AuditOption) -> float:
        """Predicted contribution to the squared whole-model output error.

        The layer's own output error (after the refit that calibration will
        apply, when the audit had calibration data) is scaled by how much of
        the rank-1 error reached the model output when this layer alone was
        converted (measured); independent errors then add in energy:
        e_model^2 ~ sum of the terms.
        """
        own = _option_error(option)
        amplification = 1.0
        if layer.model_error_rank1 is not None and layer.sensitivity_order is not None:
            reference = next((o for o in layer.options if o.rank == 1 and o.order == layer.sensitivity_order), None)
            base = reference.output_error if reference is not None else None
            if base is None and reference is not None:
                base = reference.weight_error
            if base is not None and base > 1e-12:
                amplification = layer.model_error_rank1 / base
        return (own * amplification) ** 2

    def predicted_error(self, plan: Plan) -> float:
        """Predicted whole-model relative output error if ``plan`` is applied."""
        total = 0.0
        for name, lp in plan.layers.items():
            layer = self.layer(name)
            total += self._loss(layer, layer.option(lp.rank, lp.order))
        return math.sqrt(total)

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
          see :mod:`sepify.planner`; the budget is never exceeded).
        * ``max_error``: the most MACs saved with predicted whole-model output
          error <= ``max_error``.

        When latency was measured, pairs slower than the conv they replace are
        never chosen.

        Raises:
            ConfigError: not exactly one budget, or a ratio outside (0, 1].
            BudgetError: the budget cannot be met; says the smallest reachable ratio.

        Example:
            >>> import torch, sepify
            >>> net = torch.nn.Sequential(torch.nn.Conv2d(8, 32, 3), torch.nn.Conv2d(32, 32, 3))
            >>> report = sepify.audit(net, torch.randn(1, 8, 12, 12))
            >>> plan = report.plan(max_mac_ratio=0.5)
            >>> plan.meta["mac_ratio"] <= 0.5
            True
        """
        budgets = {
            "max_mac_ratio": max_mac_ratio,
            "max_param_ratio": max_param_ratio,
            "max_latency_ratio": max_latency_ratio,
            "max_error": max_error,
        }
        given = {k: v for k, v in budgets.items() if v is not None}
        if len(given) != 1:
            raise ConfigError(f"plan() takes exactly one budget ({', '.join(budgets)}), got {len(given)}")
        ((kind, value),) = given.items()
        if kind == "max_error":
            if not (isinstance(value, (int, float)) and value >= 0):
                raise ConfigError(f"max_error must be a number >= 0, got {value!r}")
        elif not (isinstance(value, (int, float)) and 0 < value <= 1):
            raise ConfigError(f"{kind} must be in (0, 1], got {value!r}")

        layers = self.candidates
        usable = [[o for o in layer.options if o.latency_ratio is None or o.latency_ratio < 1.0] for layer in layers]
        if kind == "max_latency_ratio":
            if self.model_latency is None or any(o.latency_ratio is None for opts in usable for o in opts):
                raise ConfigError("max_latency_ratio needs measured latencies; run audit(..., latency=True)")
            total: float = self.model_latency
            savings = [[max(0.0, float(o.latency_before or 0) - float(o.latency_after or 0)) for o in opts]
                       for opts in usable]  # fmt: skip
        elif kind == "max_param_ratio":
            total = self.params
            savings = [[float(layer.params - o.params_after) for o in opts] for layer, opts in zip(layers, usable)]
        else:
            total = self.macs
            savings = [[float(layer.macs - o.macs_after) for o in opts] for layer, opts in zip(layers, usable)]
        tables = [
            [Choice(saving=s, loss=self._loss(layer, o)) for s, o in zip(layer_savings, opts)]
            for layer, opts, layer_savings in zip(layers, usable, savings)
        ]
        if kind == "max_error":
            picks = max_saving_for_loss(tables, float(value) ** 2)
        else:
            required = (1.0 - float(value)) * total
            result = min_loss_for_saving(tables, required)
            if result is None:
                best = sum(max((c.saving for c in t), default=0.0) for t in tables)
                smallest = 1.0 - best / total if total else 1.0
                label = {"max_mac_ratio": "MACs", "max_param_ratio": "params", "max_latency_ratio": "latency"}[kind]
                raise BudgetError(
                    f"no plan reaches {label} <= {value:.3g}x the original: converting every candidate at its "
                    f"cheapest option reaches {smallest:.3f}x at best; relax the budget to at least {smallest:.3f}"
                )
            picks = result
        chosen = {
            layer.name: LayerPlan(opts[j].rank, opts[j].order, opts[j].layout)
            for layer, opts, j in zip(layers, usable, picks)
            if j is not None
        }
        plan = Plan(chosen)
        meta = self._plan_meta(plan)
        meta["budget"] = {kind: value}
        return Plan(chosen, meta)

    def _plan_meta(self, plan: Plan) -> dict[str, Any]:
        macs = self.macs - sum(
            self.layer(n).macs - self.layer(n).option(p.rank, p.order).macs_after for n, p in plan.layers.items()
        )
        params = self.params - sum(
            self.layer(n).params - self.layer(n).option(p.rank, p.order).params_after for n, p in plan.layers.items()
        )
        return {
            "mac_ratio": macs / self.macs if self.macs else None,
            "param_ratio": params / self.params if self.params else None,
            "predicted_error": self.predicted_error(plan),
            "inputs": self.inputs,
        }

    # -- rendering --------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": "sepify.audit-report",
            "version": 1,
            "inputs": self.inputs,
            "mode": self.mode,
            "totals": {"params": self.params, "macs": self.macs, "model_latency": self.model_latency},
            "notes": list(self.notes),
            "layers": [layer.to_dict() for layer in self.layers],
        }

    def to_csv(self, path: str | os.PathLike[str] | None = None) -> str:
        """One row per (layer, option); skipped layers get one row with their reason."""
        fields = ["name", "skip_reason", "in_channels", "out_channels", "kernel_size", "stride", "groups", "params",
                  "macs", "mac_share", "model_error_rank1", "rank", "order", "params_after", "macs_after",
                  "weight_error", "output_error", "refit_error", "latency_before", "latency_after", "latency_ratio"]  # fmt: skip
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n", extrasaction="ignore")
        writer.writeheader()
        for layer in self.layers:
            base = layer.to_dict()
            base["kernel_size"] = "x".join(map(str, layer.kernel_size))
            base["stride"] = "x".join(map(str, layer.stride))
            rows = [o.to_dict() for o in layer.options] or [{}]
            for opt in rows:
                writer.writerow({k: ("" if v is None else v) for k, v in {**base, **opt}.items()})
        text = buf.getvalue()
        if path is not None:
            write_text_atomic(path, text)
        return text

    def _table_rows(self) -> tuple[list[str], list[list[str]]]:
        header = ["layer", "status", "Cin", "Cout", "kernel", "MACs", "share", "r1 MACs", "r1 order",
                  "r1 weight err", "r1 out err", "model err", "max r"]  # fmt: skip
        latency = any(o.latency_ratio is not None for layer in self.layers for o in layer.options)
        if latency:
            header.append("r1 time")
        rows = []
        for layer in sorted(self.layers, key=lambda x: (not x.candidate, -x.macs)):
            best = layer.best_at(1)
            status = "candidate" if layer.candidate else f"skip: {layer.skip_reason}"
            row = [
                layer.name, status, str(layer.in_channels), str(layer.out_channels),
                "x".join(map(str, layer.kernel_size)), format_count(layer.macs), f"{100 * layer.mac_share:.1f}%",
                format_count(best.macs_after) if best else "-", best.order if best else "-",
                f"{best.weight_error:.3f}" if best else "-",
                f"{best.output_error:.3f}" if best and best.output_error is not None else "-",
                f"{layer.model_error_rank1:.3f}" if layer.model_error_rank1 is not None else "-",
                str(layer.break_even_rank or "-"),
            ]  # fmt: skip
            if latency:
                row.append(f"{best.latency_ratio:.2f}x" if best and best.latency_ratio is not None else "-")
            rows.append(row)
        return header, rows

    def summary_lines(self) -> list[str]:
        cands = self.candidates
        share = sum(layer.mac_share for layer in cands)
        lines = [
            f"{len(cands)} of {len(self.layers)} convs are candidates, {100 * share:.1f}% of the model's "
            f"{format_count(self.macs)} MACs (mode: {self.mode}; inputs: {self.inputs})",
            "r1 = rank 1 in the order with the lower output error; model err = whole-model output error "
            "with only that layer at rank 1; max r = largest rank at which the pair is still smaller",
        ]
        if self.model_latency is not None:
            lines.append(f"model latency {1e3 * self.model_latency:.2f} ms (median); r1 time = pair / conv time")
        return lines + list(self.notes)

    def __str__(self) -> str:
        return "\n".join([*text_table(*self._table_rows()), "", *self.summary_lines()])

    def to_markdown(self) -> str:
        lines = markdown_table(*self._table_rows())
        return "\n".join([*lines, "", *(f"- {s}" for s in self.summary_lines())]) + "\n"

    def to_png(self, path: str | os.PathLike[str], plan: Plan | None = None) -> None:
        """Chart: per candidate, MACs saved vs error at every rank (needs the ``plot`` extra)."""
        from sepify.plot import plot_audit

        plot_audit(self, path, plan)


# -- measurement -----------------------------------------------------------------


def _useful_options(
    site: ConvSite, orders: Sequence[str], ranks: Sequence[int] | None
) -> list[tuple[str, int, int, int]]:
    """(order, rank, params_after, macs_after) for every rank where the pair is still smaller."""
    conv = site.module
    kernel = tuple(conv.kernel_size)
    bias = conv.bias is not None
    params = conv_params(conv.in_channels, conv.out_channels, kernel, conv.groups, bias)
    macs = site_macs(site)
    found = []
    for order in orders:
        limit = exact_rank(conv.in_channels, conv.out_channels, kernel, conv.groups, order)
        for r in range(1, limit + 1):
            p = separable_params(conv.in_channels, conv.out_channels, kernel, conv.groups, r, order, bias)
            m = pair_macs(site, r, order)
            if p >= params and m >= macs:
                break  # grows with r: no larger rank is smaller either
            if ranks is None or r in ranks:
                found.append((order, r, p, m))
    return found


def _layer_output_errors(conv: nn.Conv2d, x: Tensor, factorization: Factorization, max_rank: int) -> list[float]:
    """Relative output error of the rank-r pair for r = 1..max_rank, from one input batch.

    Runs the pair at the largest rank one rank component at a time and
    accumulates: the rank-r output is the bias plus the first r components,
    so every rank costs about as much as one pair at ``max_rank`` (not
    ``max_rank`` dense convs), and only one component's activations are held.
    """
    with torch.no_grad():
        y = conv._conv_forward(x, conv.weight, conv.bias)
        norm = float(y.double().norm())
        top = min(max_rank, factorization.max_rank)
        pair = SeparableConv2d.from_conv(conv, top, factorization.order, factorization=factorization)
        dw, pw = pair.conv_dw, pair.conv_pw
        partial = torch.zeros_like(y)
        if conv.bias is not None:
            partial += conv.bias.view(1, -1, 1, 1)
        groups = conv.groups
        top_order = factorization.order
        if top_order == "dw-pw":
            w_dw = dw.weight.reshape(conv.in_channels, top, *dw.weight.shape[2:])  # channel i*R + k
            w_pw = pw.weight.reshape(conv.out_channels, conv.in_channels // groups, top, 1, 1)  # input j*R + k
        else:
            w_pw = pw.weight.reshape(conv.out_channels, top, *pw.weight.shape[1:])  # channel o*R + k
            w_dw = dw.weight  # (Cout, R, kh, kw)
        errors = []
        for k in range(top):  # one rank component at a time: small intermediates, exact sums
            if top_order == "dw-pw":
                z = dw._conv_forward(x, w_dw[:, k : k + 1], None)  # depthwise, groups=Cin
                partial += F.conv2d(z, w_pw[:, :, k], None, 1, 0, 1, groups)
            else:
                u = F.conv2d(x, w_pw[:, k], None, 1, 0, 1, groups)
                partial += dw._conv_forward(u, w_dw[:, k : k + 1], None)  # depthwise, groups=Cout
            errors.append(float((partial - y).double().norm()) / norm if norm > 0 else 0.0)
        return errors


@contextlib.contextmanager
def _temporarily(root: nn.Module, paths: list[str], module: nn.Module) -> Iterator[None]:
    olds = [replace_submodule(root, p, module) for p in paths]
    try:
        yield
    finally:
        for p, old in zip(paths, olds):
            replace_submodule(root, p, old)


def _calibration_args(calibration: Any, n_args: int, limit: int = 32) -> tuple[Any, ...] | None:
    """The first ``limit`` samples of calibration data, concatenated into one set of model arguments."""
    if calibration is None:
        return None
    batches = calibration_batches(calibration, n_args=n_args, limit=limit, heldout_fraction=0).fit
    return tuple(torch.cat(parts) for parts in zip(*batches))


def audit(
    model: nn.Module,
    example_inputs: Any,
    *,
    ranks: Sequence[int] | None = None,
    orders: Sequence[str] = ORDERS,
    calibration: Any = None,
    latency: bool = False,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    skip_shared: bool = False,
    sensitivity: bool = True,
    latency_reps: int = 7,
    refit: bool | None = None,
    progress: ProgressFn | None = None,
) -> AuditReport:
    """Measure what separating each conv would save and cost; never mutates ``model``.

    Args:
        model: any ``nn.Module`` (traced like :func:`sepify.convert`).
        example_inputs: as for :func:`sepify.convert`.
        ranks: restrict the ranks considered (default: 1 up to break-even).
        orders: orders to consider.
        calibration: unlabelled inputs (a tensor, an iterable of batches, or
            a callable returning one); the first 32 samples replace the
            example inputs for the output-error measurements.
        latency: time each conv against each of its pairs (interleaved
            medians after warm-up, on the model's device) and the whole model.
        include, exclude, skip_shared: as for :func:`sepify.convert`.
        sensitivity: measure the whole-model output error with each layer
            alone at rank 1 (one forward per candidate).
        latency_reps: timed repetitions per measurement.
        refit: also measure each option's layer error after the closed-form
            refit that ``convert(..., calibration=...)`` applies, and plan
            with it (default: when ``calibration`` is given).
        progress: called as ``progress(step, done, total)`` while working.

    Returns:
        An :class:`AuditReport`; ``report.plan(max_mac_ratio=0.5)`` picks layers.

    Example:
        >>> import torch, sepify
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 32, 3), torch.nn.ReLU(), torch.nn.Conv2d(32, 64, 3))
        >>> report = sepify.audit(net, torch.randn(1, 3, 16, 16))
        >>> [(layer.name, layer.candidate, layer.break_even_rank) for layer in report.layers]
        [('0', True, 7), ('2', True, 7)]
        >>> plan = report.plan(max_mac_ratio=0.5)
        >>> plan.meta["mac_ratio"] <= 0.5
        True
    """
    if not orders or any(o not in ORDERS for o in orders):
        raise ConfigError(f"orders must be a non-empty subset of {ORDERS}, got {orders!r}")
    if ranks is not None and (not ranks or any(isinstance(r, bool) or not isinstance(r, int) or r < 1 for r in ranks)):
        raise ConfigError(f"ranks must be positive integers, got {ranks!r}")
    args = normalize_inputs(example_inputs)
    analysis = analyze(model, args, include=include, exclude=exclude, skip_shared=skip_shared)
    data_args = _calibration_args(calibration, len(args)) or args
    report_progress = progress or (lambda step, done, total: None)

    candidates = [s for s in analysis.sites if s.eligible]
    options = {s.qualname: _useful_options(s, orders, ranks) for s in candidates}
    factorizations = {
        (s.qualname, o): Factorization.of(s.module.weight, s.module.groups, o) for s in candidates for o in orders
    }
    refit = calibration is not None if refit is None else refit
    refits: dict[tuple[str, str], dict[int, float]] = {}
    out_errors = _measure_layer_errors(
        analysis, data_args, candidates, options, factorizations, report_progress, refit, refits
    )

    reference = None
    if sensitivity and candidates:
        reference = _forward(analysis.target, data_args)
    total_macs = analysis.before.macs
    total_params = count_params(analysis.target)
    rows: list[AuditLayer] = []
    model_latency = None
    if latency:
        (model_latency,) = time_forwards([analysis.target], args, latency_reps)
    n = len(analysis.sites)
    for i, site in enumerate(analysis.sites):
        report_progress("auditing layers", i, n)
        conv = site.module
        kernel = tuple(conv.kernel_size)
        params = conv_params(conv.in_channels, conv.out_channels, kernel, conv.groups, conv.bias is not None)
        macs = site_macs(site)
        called = site.call.calls > 0
        opts: list[AuditOption] = []
        model_err = None
        sens_order = None
        if site.eligible:
            errs = out_errors.get(site.qualname, {})
            times = _time_options(site, options[site.qualname], factorizations, latency_reps) if latency else {}
            for order, r, p, m in options[site.qualname]:
                f = factorizations[(site.qualname, order)]
                layer_err = errs.get(order)
                timing = times.get((order, r))
                opts.append(AuditOption(r, order, p, m, f.relative_error(r), layer_err[r - 1] if layer_err else None,
                                        refits.get((site.qualname, order), {}).get(r),
                                        timing.conv if timing else None, timing.pair if timing else None,
                                        timing.layout if timing else None))  # fmt: skip
            if reference is not None:
                rank1 = [o for o in opts if o.rank == 1]
                if rank1:
                    sens_order = min(rank1, key=_option_error).order
                    factorization = factorizations[(site.qualname, sens_order)]
                    model_err = _model_error_rank1(analysis, site, factorization, data_args, reference)
        rows.append(AuditLayer(
            name=site.qualname, skip_reason=site.skip_reason, in_channels=conv.in_channels,
            out_channels=conv.out_channels, kernel_size=(kernel[0], kernel[1]), stride=(conv.stride[0], conv.stride[1]), groups=conv.groups,
            calls=site.call.calls, input_size=spatial(site.call.input_shape) if called else None,
            output_size=spatial(site.call.output_shape) if called else None, params=params, macs=macs,
            mac_share=macs / total_macs if total_macs else 0.0, param_share=params / total_params if total_params else 0.0,
            options=tuple(opts), model_error_rank1=model_err, sensitivity_order=sens_order,
        ))  # fmt: skip
    report_progress("auditing layers", n, n)
    notes = []
    if calibration is not None:
        notes.append(f"output errors measured on {describe_inputs(data_args)} of calibration data")
    return AuditReport(tuple(rows), total_params, total_macs, describe_inputs(args), analysis.outcome.mode,
                       model_latency, tuple(notes))  # fmt: skip


def _forward(module: nn.Module, args: tuple[Any, ...]) -> Any:
    with preserved_state(module), torch.no_grad():
        return module(*args)


def _measure_layer_errors(
    analysis: Analysis,
    args: tuple[Any, ...],
    candidates: list[ConvSite],
    options: dict[str, list[tuple[str, int, int, int]]],
    factorizations: dict[tuple[str, str], Factorization],
    progress: ProgressFn,
    refit: bool,
    refits: dict[tuple[str, str], dict[int, float]],
) -> dict[str, dict[str, list[float]]]:
    """One forward; each candidate's hook computes its output error at every rank from its first input.

    With ``refit``, also the error after a local least-squares refit, into ``refits``.
    """
    wanted = {s.qualname: s for s in candidates}
    by_id = {id(s.module): s.qualname for s in candidates}
    errors: dict[str, dict[str, list[float]]] = {}
    handles = []
    failures: list[BaseException] = []

    def hook(m: nn.Module, inputs: tuple[Any, ...], _output: Any) -> None:
        name = by_id[id(m)]
        if name in errors or failures:
            return  # first call only
        try:
            measure(name, inputs[0])
        except Exception as e:  # noqa: BLE001 - re-raised below, outside the user's forward
            failures.append(e)

    def measure(name: str, x: Tensor) -> None:
        conv = wanted[name].module
        per_order: dict[str, list[float]] = {}
        for order in sorted({o for o, *_ in options[name]}):
            ranks = [r for o, r, *_ in options[name] if o == order]
            per_order[order] = _layer_output_errors(conv, x, factorizations[(name, order)], max(ranks))
            if refit:
                refits[(name, order)] = refit_errors(conv, x, order, ranks, factorization=factorizations[(name, order)])
        errors[name] = per_order
        progress("measuring layer output errors", len(errors), len(wanted))

    for s in candidates:
        handles.append(s.module.register_forward_hook(hook))
    try:
        _forward(analysis.target, args)
    except Exception as e:  # noqa: BLE001 - calibration inputs the model rejects
        raise ConfigError(
            f"the model failed on the audit inputs {describe_inputs(args)} ({type(e).__name__}: {e}); "
            "pass calibration data shaped like the example inputs"
        ) from e
    finally:
        for h in handles:
            h.remove()
    if failures:
        raise failures[0]  # a bug in sepify, not in the user's inputs: keep the traceback
    return errors


def _model_error_rank1(
    analysis: Analysis, site: ConvSite, factorization: Factorization, args: tuple[Any, ...], reference: Any
) -> float | None:
    pair = SeparableConv2d.from_conv(site.module, 1, factorization.order, factorization=factorization)
    paths = [name for name, m in analysis.target.named_modules(remove_duplicate=False) if m is site.module]
    with _temporarily(analysis.target, paths, pair):
        out = _forward(analysis.target, args)
    return output_error(reference, out)


def _time_options(
    site: ConvSite,
    options: list[tuple[str, int, int, int]],
    factorizations: dict[tuple[str, str], Factorization],
    reps: int,
) -> dict[tuple[str, int], PairTiming]:
    """Median seconds of the conv and of each pair in its fastest layout, interleaved, at the layer's input shape."""
    conv = site.module
    times = {}
    for order, r, _, _ in options:
        factorization = factorizations[(site.qualname, order)]
        pair = SeparableConv2d.from_conv(conv, r, order, factorization=factorization).eval()
        times[(order, r)] = pair.time(site.call.input_shape, reps, against=conv)
    return times
