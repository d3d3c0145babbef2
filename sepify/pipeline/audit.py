"""``sepify.audit``: which convs are worth slimming, at which rank and order (orchestration only).

Never mutates the model. For each candidate conv and every useful rank (from
1 up to where the pair stops being smaller) in each order: params and MACs
after, the weight error (from the singular values), the layer's own output
error (all ranks from one batched conv of rank-one terms), with calibration
the error after refinement, the whole-model output error with only that layer
at rank 1, and with timing the median time of the conv vs each pair.
:meth:`AuditReport.plan` turns this into a :class:`~sepify.Plan`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from sepify.calibrate.capture import first_inputs
from sepify.calibrate.data import calibration_batches
from sepify.calibrate.refine import refined_errors
from sepify.calibrate.synthetic import resolve_synthetic
from sepify.calibrate.verify import worst_output_error
from sepify.core.cost import ORDERS
from sepify.core.cp import CPByRank
from sepify.core.factors import LayerFactors
from sepify.core.functional import ConvLayer
from sepify.core.measure import conv_output, layer_output_errors, pair_output_error
from sepify.core.modules import SeparableConv, weight_of
from sepify.errors import BudgetError, ConfigError, ModelError, first_line
from sepify.graph.analysis import Analysis, analyze, count_params, normalize_inputs
from sepify.graph.candidates import ConvSite, kind_notes
from sepify.graph.measured import viewed
from sepify.graph.probe import describe_inputs, preserved_state, time_forwards
from sepify.graph.rewrite import temporarily_replaced
from sepify.options import Budget, Calibration, Selection, Timing, as_int
from sepify.planning.budget import option_error, unreachable_message
from sepify.planning.choice import Option, useful_options
from sepify.report.audit import AuditLayer, AuditReport
from sepify.runtime.sessions import check_backend
from sepify.runtime.timing import PairTiming, time_pair

__all__ = ["audit"]

ProgressFn = Callable[[str, int, int], None]
Options = dict[str, list[tuple[str, int]]]  # qualname -> the (order, rank) pairs measured
# ALS multiply-adds per audited width: small layers get the sweeps convert will run, large ones their
# start (the strongest per-channel SVD terms), an upper bound of the error convert reaches.
_CP_WORK = 2 * 10**8
_AUDIT_SAMPLES = 32  # calibration samples the layer errors are measured on


def audit(
    model: nn.Module,
    example_inputs: Any,
    *,
    ranks: Sequence[int] | None = None,
    orders: Sequence[str] = ORDERS,
    select: Selection | None = None,
    calibration: Calibration | Any | None = None,
    timing: Timing | bool | None = None,
    sensitivity: bool = True,
    budget: Budget | None = None,
    measure_on: str | int | None = None,
    progress: ProgressFn | None = None,
) -> AuditReport:
    """Measure what separating each conv would save and cost; never mutates ``model``.

    Args:
        model: any ``nn.Module`` (traced like :func:`sepify.convert`).
        example_inputs: as for :func:`sepify.convert`.
        ranks: restrict the ranks considered (default: 1 up to break-even).
        orders: orders to consider.
        select: which convs (:class:`~sepify.Selection`), as for convert.
        calibration: unlabelled inputs or a :class:`~sepify.Calibration`;
            its first 32 samples replace the example inputs for the error
            measurements, and with ``refine`` (the default) each option's
            error after refinement is measured too and plans are made for it.
        timing: ``True`` or a :class:`~sepify.Timing`: time each conv against
            each of its pairs (interleaved medians, fastest layout) and the
            whole model.
        sensitivity: measure the whole-model output error with each layer
            alone at rank 1 (one forward per candidate).
        budget: the :class:`~sepify.Budget` the audit is for: a MAC or
            parameter budget no plan can meet is refused before anything is
            measured (what every candidate at its cheapest option reaches is
            known from the shapes alone).
        measure_on: what whole-model errors are computed on, as for :func:`sepify.convert` (an output index, a
            node or module name, ``"outputs"``; default: the outputs, saturated ones on their logits).
        progress: called as ``progress(step, done, total)`` while working.

    Returns:
        An :class:`AuditReport`; ``report.plan(max_mac_ratio=0.5)`` picks layers.

    Examples:
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
    if ranks is not None:
        if not ranks:
            raise ConfigError("ranks must list at least one positive integer, got none")
        ranks = [as_int(r, "each rank", 1) for r in ranks]
    calib, timed = Calibration.of(calibration), Timing.of(timing)
    if timed is not None:
        check_backend(timed.backend)
    args = normalize_inputs(example_inputs)
    calib, synthetic = resolve_synthetic(calib, model, args, progress)
    analysis = analyze(model, args, select=select, measure_on=measure_on)
    data_args = _calibration_args(calib, len(args)) or args
    report_progress = progress or (lambda step, done, total: None)
    candidates = [s for s in analysis.sites if s.eligible]
    options = {s.qualname: useful_options(s.geometry, orders, ranks) for s in candidates}
    if budget is not None:
        _check_reachable(budget, candidates, options, analysis)
    factors = {s.qualname: LayerFactors(weight_of(s.module), s.module.groups, cp_work=_CP_WORK) for s in candidates}
    errors = _LayerErrors(options, factors, refine=calib is not None and calib.refine)
    errors.measure(analysis, candidates, data_args, report_progress)
    reference = viewed(analysis.target, data_args, analysis.view) if sensitivity and candidates else None
    model_latency, latency_notes = _model_latency(analysis, args, timed)
    rows = []
    total_params = count_params(analysis.target)
    timer = _OptionTimer(timed) if timed is not None else None
    for i, site in enumerate(analysis.sites):
        report_progress("auditing layers", i, len(analysis.sites))
        rows.append(_audit_layer(analysis, site, options, factors, errors, timer, data_args, reference, total_params))
    report_progress("auditing layers", len(rows), len(rows))
    notes = [f"output errors measured on {describe_inputs(data_args)} of calibration data"] if calib else []
    if analysis.view is not None:
        why = ": the outputs saturate" if analysis.view.replaced else ""
        notes.append(f"whole-model errors measured on {analysis.view.description}{why}")
    notes += synthetic
    if timed is not None:
        notes.append(timed.note())
    notes += latency_notes
    int8_ratio, int8_notes = _int8_baseline(model, args, calib, data_args, timed)
    notes += int8_notes
    return AuditReport(
        layers=tuple(rows),
        params=total_params,
        macs=analysis.before.macs,
        inputs=describe_inputs(args),
        mode=analysis.outcome.mode,
        model_latency=model_latency,
        notes=tuple(notes + kind_notes(analysis.sites)),
        timed_in=timed.describe() if timed else None,
        int8_latency_ratio=int8_ratio,
    )


def _int8_baseline(
    model: nn.Module, args: tuple[Any, ...], calib: Calibration | None, samples: tuple[Any, ...], timed: Timing | None
) -> tuple[float | None, list[str]]:
    """The original as int8 in the timing runtime, when there is calibration data to set its ranges: the bar a
    plan has to beat (on small CNNs int8 alone can beat any slim model). A note either way."""
    from sepify.pipeline.deploy import compare_deployments
    from sepify.runtime.quantize import check_int8

    if timed is None or calib is None or timed.backend not in ("onnxruntime", "openvino"):
        return None, []
    try:
        check_int8("onnx" if timed.backend == "onnxruntime" else "openvino")
        found = compare_deployments(model, None, samples, int8=calib.data, runtime=timed.backend,
                                    threads=timed.threads, timed_inputs=args)  # fmt: skip
    except Exception as e:  # noqa: BLE001 - a baseline that cannot be measured is a note, not a failed audit
        return None, [f"int8 of the original not measured ({first_line(e)})"]
    int8 = found.get("original int8")
    agreement = f", top-1 agreement {int8.agreement:.0%}" if int8.agreement is not None else ""
    error = "n/a" if int8.error is None else f"{int8.error:.3g}"
    return int8.time_ratio, [
        f"the original as int8 runs at {int8.time_ratio:.3f}x its float32 time in {timed.backend} (output error "
        f"{error}{agreement} on {found.samples} calibration samples): a plan has to run faster than that to beat "
        "int8 alone (sepify convert --int8 and sepify.compare_deployments compare both)"
    ]


def _model_latency(analysis: Analysis, args: tuple[Any, ...], timed: Timing | None) -> tuple[float | None, list[str]]:
    """The original model's median time, or None with a note when the backend cannot run it."""
    if timed is None:
        return None, []
    try:
        return time_forwards([analysis.target], args, timed.reps, backend=timed.backend, threads=timed.threads)[0], []
    except ModelError as e:
        return None, [f"whole-model latency not measured (max_latency_ratio plans need it): {e}"]


def _audit_layer(
    analysis: Analysis,
    site: ConvSite,
    options: Options,
    factors: dict[str, LayerFactors],
    errors: _LayerErrors,
    timer: _OptionTimer | None,
    args: tuple[Any, ...],
    reference: Any,
    total_params: int,
) -> AuditLayer:
    """One conv's row: its cost, and for a candidate every option, measured."""
    geometry = site.geometry
    params, macs, total_macs = geometry.params, geometry.macs, analysis.before.macs
    opts: list[Option] = []
    model_err = sens_order = None
    if site.eligible:
        layer = factors[site.qualname]
        times = timer.options(site, options[site.qualname], layer) if timer else {}
        opts = [errors.option(site, option, times.get(option)) for option in options[site.qualname]]
        rank1 = [o for o in opts if o.rank == 1]
        if reference is not None and rank1:
            sens_order = min(rank1, key=option_error).order
            model_err = _model_error_rank1(analysis, site, layer, sens_order, args, reference)
    return AuditLayer(
        name=site.qualname,
        skip_reason=site.skip_reason,
        **geometry.report_fields(),
        params=params,
        macs=macs,
        mac_share=macs / total_macs if total_macs else 0.0,
        param_share=params / total_params if total_params else 0.0,
        options=tuple(opts),
        model_error_rank1=model_err,
        sensitivity_order=sens_order,
    )


def _check_reachable(budget: Budget, sites: list[ConvSite], options: Options, analysis: Analysis) -> None:
    """A MAC or parameter budget below what converting every candidate at its cheapest option reaches is refused
    now, before anything is measured (the plan's own check, later, also counts options found slower)."""
    kind, value = budget.bound
    if kind not in ("max_mac_ratio", "max_param_ratio"):
        return
    unit = 1 if kind == "max_mac_ratio" else 0  # Geometry.cost gives (params, MACs)
    total = analysis.before.macs if unit else count_params(analysis.target)
    saved = 0
    for site in sites:
        geometry = site.geometry
        before = geometry.macs if unit else geometry.params
        costs = [geometry.cost(order, rank)[unit] for order, rank in options[site.qualname]]
        saved += max((before - c for c in costs), default=0)
    reachable = 1.0 - saved / total if total else 1.0
    if value < reachable:
        raise BudgetError(unreachable_message(kind, value, reachable))


def _pair(conv: ConvLayer, order: str, rank: int, factors: LayerFactors) -> SeparableConv:
    """The pair ``(order, rank)`` from the layer's already computed factorisations."""
    return SeparableConv.from_conv(conv, rank, order, factorization=factors.at(order, rank))


class _LayerErrors:
    """Each candidate's output error (and error after refinement) at every option, from one forward."""

    def __init__(self, options: Options, factors: dict[str, LayerFactors], *, refine: bool) -> None:
        self.options, self.factors, self.refine = options, factors, refine
        self.output: dict[tuple[str, str], dict[int, float]] = {}  # (qualname, order) -> {rank: error}
        self.refined: dict[tuple[str, str], dict[int, float]] = {}

    def measure(self, analysis: Analysis, sites: list[ConvSite], args: tuple[Any, ...], progress: ProgressFn) -> None:
        """One forward on ``args``; each candidate is measured on the input of its first call."""
        by_module: dict[nn.Module, ConvSite] = {s.in_model: s for s in sites}
        done: list[str] = []

        def on_input(module: nn.Module, x: Tensor) -> None:
            site = by_module[module]
            self._measure_one(site.qualname, site.module, x)
            done.append(site.qualname)
            progress("measuring layer output errors", len(done), len(by_module))

        with preserved_state(analysis.target):
            first_inputs(analysis.target, args, list(by_module), on_input)

    def _measure_one(self, name: str, conv: ConvLayer, x: Tensor) -> None:
        y = conv_output(conv, x)  # every option is compared with this one output
        layer = self.factors[name]
        for order in sorted({o for o, _ in self.options[name]}):
            ranks = [r for o, r in self.options[name] if o == order]
            factorization = layer.of(order)
            if isinstance(factorization, CPByRank):
                pairs = {r: _pair(conv, order, r, layer) for r in ranks}
                self.output[(name, order)] = {r: pair_output_error(conv, pair, x, y) for r, pair in pairs.items()}
                if self.refine:
                    self.refined[(name, order)] = refined_errors(conv, x, order, ranks, pairs=pairs, y=y)
                continue
            errors = layer_output_errors(conv, x, factorization, max(ranks), y)
            self.output[(name, order)] = {r: errors[r - 1] for r in ranks}
            if self.refine:
                self.refined[(name, order)] = refined_errors(conv, x, order, ranks, factorization=factorization, y=y)

    def option(self, site: ConvSite, option: tuple[str, int], timing: PairTiming | None) -> Option:
        name, (order, r) = site.qualname, option
        measured = self.output.get((name, order))
        output = measured.get(r) if measured else None
        refined = self.refined.get((name, order), {}).get(r)
        if refined is not None and output is not None:
            refined = min(refined, output)  # refinement keeps the current weights where its refit is worse
        found = site.geometry.option(order, r, self.factors[name].weight_error(order, r))
        return dataclasses.replace(
            found,
            output_error=output,
            refined_error=refined,
            latency_before=timing.conv if timing else None,
            latency_after=timing.pair if timing else None,
            layout=timing.layout if timing else None,
        )


def _calibration_args(calibration: Calibration | None, n_args: int) -> tuple[Any, ...] | None:
    """The first calibration samples and their copies (half of each when augmented, as many in all as without),
    concatenated into one set of model arguments."""
    if calibration is None:
        return None
    limit = min(_AUDIT_SAMPLES, calibration.samples or _AUDIT_SAMPLES)
    data = None
    if calibration.augment is not False:
        data = calibration_batches(
            calibration.data, n_args=n_args, limit=max(1, limit // 2), heldout_fraction=0, augment=calibration.augment
        )
    if data is None or not data.copies:  # not augmented (or a model of several arguments): the first samples
        data = calibration_batches(calibration.data, n_args=n_args, limit=limit, heldout_fraction=0)
    batches = data.fit
    return tuple(torch.cat(parts) for parts in zip(*batches))


def _model_error_rank1(
    analysis: Analysis, site: ConvSite, factors: LayerFactors, order: str, args: tuple[Any, ...], reference: Any
) -> float | None:
    pair = _pair(site.module, order, 1, factors)
    with temporarily_replaced(analysis.target, site.in_model, pair):
        return worst_output_error(reference, viewed(analysis.target, args, analysis.view))


class _OptionTimer:
    """Times each layer's options in one backend; an option already timed for a conv of the same configuration,
    input shape and context is not timed again (time depends on shapes, not weights: a ResNet's repeated blocks)."""

    def __init__(self, timing: Timing) -> None:
        self.timing = timing
        self.timed: dict[tuple[Any, ...], PairTiming] = {}

    def options(
        self, site: ConvSite, options: list[tuple[str, int]], factors: LayerFactors
    ) -> dict[tuple[str, int], PairTiming]:
        """Median seconds of the conv and of each pair in its fastest layout, interleaved, at the layer's input
        shape, by (order, rank)."""
        times = {}
        for order, r in options:
            key = (*_timing_signature(site), order, r)
            if key not in self.timed:
                pair = _pair(site.module, order, r, factors).eval()
                self.timed[key] = time_pair(
                    pair,
                    site.call.input_shape,
                    self.timing.reps,
                    against=site.module,
                    backend=self.timing.backend,
                    threads=self.timing.threads,
                    context=site.context,
                )
            times[(order, r)] = self.timed[key]
        return times


def _timing_signature(site: ConvSite) -> tuple[Any, ...]:
    """Everything a layer's time depends on: the conv's configuration, its input shape and its context."""
    conv, context = site.module, site.context
    activation = (context.activation.kind, context.activation.args) if context.activation is not None else None
    config = (conv.stride, conv.padding, conv.dilation, conv.groups, conv.padding_mode, conv.output_padding)
    shape = (conv.in_channels, conv.out_channels, tuple(conv.kernel_size), conv.bias is not None)
    return (type(conv), shape, str(config), tuple(site.call.input_shape), context.pad, activation)
