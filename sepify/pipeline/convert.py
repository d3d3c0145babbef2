"""``sepify.convert`` and ``sepify.load_converted``: orchestration only.

The pipeline reads top to bottom in :func:`convert`: analyse (copy, trace,
probe, classify), choose and build a pair per conv, swap them in, calibrate,
verify, report. Each stage lives in its subpackage.
"""

from __future__ import annotations

import copy
import logging
import operator
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from sepify.calibrate.data import calibration_batches
from sepify.calibrate.stages import FidelityStage, calibrate_pairs, grouped_by_outputs
from sepify.calibrate.synthetic import batchnorm_layers, resolve_synthetic
from sepify.calibrate.verify import output_errors, top1_agreement
from sepify.core.cost import ORDERS
from sepify.core.functional import CONV_TYPES
from sepify.core.modules import SeparableConv
from sepify.errors import ConfigError, InputShapeError, ModelError, SepifyWarning
from sepify.graph.analysis import Analysis, analyze, count_params, normalize_inputs
from sepify.graph.candidates import kind_notes, matches_any
from sepify.graph.measured import viewed
from sepify.graph.probe import ProbeResult, all_finite, describe_inputs, probe, time_forwards
from sepify.graph.rewrite import swap_modules
from sepify.options import DEFAULT_BUDGET, Budget, Calibration, Distill, Selection, Timing
from sepify.pipeline.layers import LayerBuilder, Rank
from sepify.pipeline.load import load_converted
from sepify.planning.plan import Plan
from sepify.report.conversion import ConversionReport
from sepify.runtime.sessions import check_backend

__all__ = ["convert", "ConversionResult", "load_converted"]


logger = logging.getLogger(__name__)

ProgressFn = Callable[[str, int, int], None]


@dataclass(frozen=True)
class ConversionResult:
    """The converted model and the report of what was done to it."""

    model: nn.Module
    report: ConversionReport


def convert(
    model: nn.Module,
    example_inputs: Any,
    *,
    rank: Rank | None = None,
    order: str = "dw-pw",
    tolerance: float | None = None,
    plan: Plan | Budget | None = None,
    select: Selection | None = None,
    calibration: Calibration | Any | None = None,
    distill: Distill | int | None = None,
    timing: Timing | bool | None = None,
    measure_on: str | int | None = None,
    inplace: bool = False,
    progress: ProgressFn | None = None,
) -> ConversionResult:
    """Rewrite a model's standard convs into depthwise + pointwise pairs.

    The model is traced with torch.fx (in its current train/eval mode); every
    ``call_module`` node whose module is a convolution with something to
    separate (or a known subclass: parametrized, weight-standardised, TF
    "SAME"; see :func:`~sepify.register_conv`) is replaced by a
    :class:`~sepify.SeparableConv` initialised by per-channel truncated SVD
    of its (effective) weight. Submodules that fx cannot
    trace are kept as leaves and their convs swapped as modules; a model whose
    own forward is untraceable is converted entirely by swapping modules. The
    report says which mode was used.

    Args:
        model: any ``nn.Module``.
        example_inputs: a tensor, or a tuple of positional arguments (tensors,
            or lists/dicts of tensors, e.g. ``([image],)`` for torchvision
            detectors). Used for shapes (hence MACs) and for verification.
        rank: depth multiplier ``r`` (capped per layer at its exact rank; the
            report marks capped layers; a conv it would make larger is skipped
            as ``no-saving`` unless ``Selection(allow_larger=True)``),
            ``"full"`` for the exact rank, or
            ``"auto"``: per layer the smallest rank whose weight error is at
            most ``tolerance`` (layers where that pair would not be smaller
            than the conv are skipped as ``no-saving``).
        order: ``"dw-pw"``, ``"pw-dw"``, ``"pw-dw-pw"`` (the bottleneck;
            ``rank`` is then its width) or ``"auto"``: per layer, with an int
            or ``"full"`` rank the depth-multiplier order with the lower weight
            error (ties go to fewer MACs); with ``rank="auto"`` the cheapest of
            all three that meets the tolerance.
        tolerance: with ``rank="auto"``, the largest relative weight error
            ``||W - W_hat|| / ||W||`` accepted per layer.
        plan: a :class:`~sepify.Plan` (from ``sepify.audit(...).plan(...)``
            or ``Plan.from_json``): convert exactly the convs it lists at its
            rank, order and layout; ``rank``/``order`` are then ignored and
            unlisted convs are skipped as ``not-planned``.
        select: which convs may convert (:class:`~sepify.Selection`:
            include/exclude globs, shared convs, larger pairs).
        calibration: unlabelled inputs, or a :class:`~sepify.Calibration`.
            A held-out share judges every stage and, in order: each pair's
            last factor is refined in closed form, BatchNorm statistics are
            recomputed (kept only if that helps), and with ``distill`` the
            pairs are distilled against the original.
        distill: a :class:`~sepify.Distill`, or a number of steps (needs
            ``calibration``).
        timing: ``True`` or a :class:`~sepify.Timing`: time each pair against
            the conv it replaces at the layer's input shape (every layout, the
            fastest kept) and the whole model; with ``skip_slower`` leave a
            conv alone when its pair was not faster.
        measure_on: what every output error (report, plan, calibration stages) is computed on: ``None``
            (default) the outputs, except those a final softmax, log-softmax or sigmoid makes and saturates,
            which are measured on their logits; ``"outputs"`` the outputs as returned; an int, that output tensor
            alone (the floating-point tensors of the output in order; negative counts from the end); a string,
            that node or module of the traced graph alone (e.g. ``"fc"`` for a classifier's logits).
        inplace: convert ``model`` itself instead of a deep copy (functional
            convs are then not lifted); ``result.model`` is ``model``.
        progress: called as ``progress(step, done, total)`` during calibration.

    Returns:
        :class:`ConversionResult` with ``.model`` and ``.report``. The model
        is the original's class with its convs swapped for pairs (same
        forward, keyword arguments, output objects and methods), on its
        device and dtype and in its train/eval mode. Only where the model's
        own forward calls ``F.convNd`` on its parameters is it the torch.fx
        GraphModule of that forward (the report says so).

    Raises:
        ConfigError: an argument is invalid.
        PlanError: the plan names a conv the model does not have or cannot convert.
        InputShapeError: the model's forward fails on ``example_inputs``.
        CalibrationError: the calibration data is malformed, non-finite, or the model fails on it.
        ModelError: the model has non-finite weights, cannot be deep-copied (use ``inplace=True``),
            is TorchScript, or the converted model fails or turns non-finite where the original ran.

    Examples:
        >>> import torch, sepify
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3), torch.nn.ReLU(), torch.nn.Conv2d(16, 32, 3))
        >>> result = sepify.convert(net, torch.randn(1, 3, 16, 16), rank="full")
        >>> [(r.name, r.converted, r.rank) for r in result.report.layers]
        [('0', True, 9), ('2', True, 9)]
        >>> result.report.output_error < 1e-5
        True
    """
    if rank is None and plan is None:
        plan = DEFAULT_BUDGET
    rank = _checked_rank(1 if rank is None else rank, tolerance)
    if order not in (*ORDERS, "auto"):
        raise ConfigError(f"order must be 'dw-pw', 'pw-dw', 'pw-dw-pw' or 'auto', got {order!r}")
    if plan is not None and not isinstance(plan, (Plan, Budget)):
        raise ConfigError(
            f"plan must be a sepify.Plan (see Plan.from_json) or a sepify.Budget, got {type(plan).__name__}"
        )
    calib, distillation, timed = Calibration.of(calibration), Distill.of(distill), Timing.of(timing)
    if timed is not None:
        check_backend(timed.backend)
    if distillation is not None and calib is None:
        raise ConfigError("distillation needs calibration data; pass calibration=... (unlabelled inputs)")
    args = normalize_inputs(example_inputs)
    calib, synthetic = resolve_synthetic(calib, model, args, progress)

    planning_notes: list[str] = []
    explicit_plan = plan if isinstance(plan, Plan) else None  # a budget's plan follows the selection
    if isinstance(plan, Budget):
        plan, planning_notes = _planned(model, args, plan, select, calib, timed, measure_on, progress)
    plan_meta = dict(plan.meta) if plan is not None and explicit_plan is None else {}
    analysis = analyze(model, args, inplace=inplace, select=select, measure_on=measure_on)
    params_before = count_params(model)  # analyze() leaves it untouched (it lifts only in a copy)
    builder = LayerBuilder(rank, order, tolerance, plan, timed, allow_larger=select.allow_larger if select else False)
    rows, pairs = builder.build(analysis.sites)
    # the teacher for calibration: the traced model before any swap
    teacher = copy.deepcopy(analysis.target) if calib is not None and pairs else None
    view = analysis.view  # saturated outputs are measured on their logits
    reference = viewed(analysis.target, args, view) if view is not None else analysis.before.output
    _swap(analysis, pairs, builder.meta)
    stages, notes = _calibrate(analysis, teacher, pairs, calib, distillation, progress)
    after = _probe_converted(analysis, args)
    measured = viewed(analysis.target, args, view) if view is not None else after.output
    times, timing_notes = _time_models(model if not inplace else teacher, analysis.model, args, timed)

    errors, why = output_errors(reference, measured)
    report = ConversionReport(
        layers=tuple(rows),
        params_before=params_before,
        params_after=count_params(analysis.model),
        macs_before=analysis.before.macs,
        macs_after=after.macs,
        inputs=describe_inputs(args),
        mode=analysis.outcome.mode,
        trace_error=analysis.outcome.error,
        leaves=_leaves_with_convs(analysis),
        output_error=max((e for e in errors if e is not None), default=None),
        output_errors=tuple(errors),
        output_error_reason=why,
        top1_agreement=top1_agreement(reference, measured),
        measured_on=view.description if view is not None else None,
        notes=tuple(
            planning_notes + _lifted_note(analysis) + kind_notes(analysis.sites) + synthetic + notes + timing_notes
        ),
        fidelity=stages,
        latency_before=times[0],
        latency_after=times[1],
        plan_meta=plan_meta,
    )
    logger.info("converted %d of %d convs", len(report.converted), len(rows))
    _warn_if_unselected(report, select, explicit_plan)
    return ConversionResult(model=analysis.model, report=report)


def _probe_converted(analysis: Analysis, args: tuple[Any, ...]) -> ProbeResult:
    """Run the converted model once; a failure or a non-finite output here is sepify's to explain, not the inputs'."""
    try:
        after = probe(analysis.model, args, what="converted model")
    except InputShapeError as e:
        cause = e.__cause__ or e
        raise ModelError(
            f"the converted model failed where the original ran on the same inputs ({type(cause).__name__}: "
            f"{str(cause).strip().splitlines()[0][:160] if str(cause).strip() else ''}); the forward probably uses "
            "a conv's attributes directly (e.g. its .weight): leave that conv out with exclude=[...]"
        ) from cause
    if not all_finite(after.output):
        raise ModelError(
            "the converted model's outputs on the example inputs hold NaN or infinite values where the original's "
            "are finite, so no model is returned; try without calibration or at a higher rank, and report this"
        )
    return after


def _warn_if_unselected(report: ConversionReport, select: Selection | None, plan: Plan | None) -> None:
    """Converting nothing is never silent; neither is a pattern that matches no conv."""
    names = [row.name for row in report.layers]
    for kind, patterns in (
        ("include", select.include if select else None),
        ("exclude", select.exclude if select else None),
    ):
        for pattern in patterns or ():
            if plan is None and not any(matches_any(name, [pattern]) for name in names):
                example = ", ".join(repr(n) for n in names[:3]) or "none"
                warnings.warn(
                    f"{kind} pattern {pattern!r} matches no conv of the model (its convs are named like {example})",
                    SepifyWarning,
                    stacklevel=3,
                )
    if not report.converted:
        warnings.warn(
            f"no conv was converted ({report.skip_summary()}); the model is unchanged", SepifyWarning, stacklevel=3
        )


def _planned(
    model: nn.Module,
    args: tuple[Any, ...],
    budget: Budget,
    select: Selection | None,
    calibration: Calibration | None,
    timing: Timing | None,
    measure_on: str | int | None,
    progress: ProgressFn | None,
) -> tuple[Plan, list[str]]:
    """Audit (with the same calibration and timing) and plan under ``budget``: what ``plan=Budget(...)`` converts."""
    from sepify.pipeline.audit import audit  # the audit is this module's caller's peer: imported where used

    report = audit(model, args, select=select, calibration=calibration, timing=timing, budget=budget,
                   measure_on=measure_on, progress=progress)  # fmt: skip
    plan = report.plan(**budget.as_dict())
    info = plan.meta
    note = (
        f"planned for {budget.describe()}: {len(plan.layers)} conv(s) at {info['mac_ratio']:.3f}x the MACs, "
        f"predicted output error {info['predicted_error']:.3g}"
    )
    notes = [note]
    if calibration is None and budget.bound[0] == "max_error" and info["mac_ratio"] > _LITTLE_SAVED:
        # without data the audit predicts errors of the factors alone, which refinement would mostly remove
        has_bn = bool(batchnorm_layers(model))
        notes.append(
            "little fits this error budget without data: calibration samples (a few hundred of your own inputs)"
            + (" or synthetic calibration (the model has BatchNorm)" if has_bn else "")
            + " usually let far more be slimmed at the same predicted error"
        )
    return plan, notes


_LITTLE_SAVED = 0.9  # a data-free error budget that keeps over 0.9x of the MACs gets the hint above


def _checked_rank(rank: Rank, tolerance: float | None) -> Rank:
    """``rank`` as an int (numpy integers too), ``"full"`` or ``"auto"`` with a valid tolerance."""
    if rank == "auto":
        if tolerance is None or not (isinstance(tolerance, (int, float)) and 0 <= tolerance < 1):
            raise ConfigError(
                f"rank='auto' needs a tolerance in [0, 1) (the largest weight error to accept), got {tolerance!r}"
            )
        return rank
    if tolerance is not None:
        raise ConfigError("tolerance applies only to rank='auto'; drop it or pass rank='auto'")
    if rank == "full":
        return rank
    try:
        value = operator.index(rank) if not isinstance(rank, (bool, str)) else 0
    except TypeError:
        value = 0
    if value < 1:
        raise ConfigError(f"rank must be a positive integer, 'full' or 'auto', got {rank!r}")
    return value


def _swap(analysis: Analysis, pairs: dict[str, SeparableConv], meta: dict[str, dict[str, Any]]) -> None:
    swap_modules(analysis.target, pairs, meta)
    if analysis.target is not analysis.work:
        # The graph has its own containers around the same leaf modules: the same pair goes into `work`, the
        # model returned (with the original's class), which with inplace=True is the caller's own. Convs lifted
        # from the root's own F.conv2d calls exist only in the graph.
        only_in_graph = analysis.lifted if analysis.rewritten_root else []
        swap_modules(analysis.work, {k: v for k, v in pairs.items() if k not in only_in_graph}, {})


def _calibrate(
    analysis: Analysis,
    teacher: nn.Module | None,
    pairs: dict[str, SeparableConv],
    calibration: Calibration | None,
    distillation: Distill | None,
    progress: ProgressFn | None,
) -> tuple[tuple[FidelityStage, ...], list[str]]:
    if calibration is None:
        return (), []
    if teacher is None:
        return (), ["calibration data was given but no conv was converted, so nothing was refined"]
    param = next(analysis.target.parameters(), None)
    data = calibration_batches(
        calibration.data,
        n_args=len(analysis.args),
        limit=calibration.samples,
        heldout_fraction=calibration.heldout,
        device=param.device if param is not None else None,
        group_by=grouped_by_outputs(teacher),
        augment=calibration.augment,
    )
    calls = {name: call.calls for name, call in analysis.before.convs.items()}
    stages, notes = calibrate_pairs(
        teacher, analysis.target, pairs, calls, data, calibration, distillation, progress, analysis.view
    )
    given = data.samples - data.copies
    if data.copies:
        notes.insert(0, f"calibration: {given} samples and a copy of each rescaled by up to half an octave, fit and "
                     "judged together (augment=False / --no-augment: the samples alone)")  # fmt: skip
    elif calibration.augment == "auto" and not data.few_sources:
        notes.insert(0, f"calibration: {given} samples from {data.sources} sources (near-duplicate groups), "
                     "enough variety to fit as given (augment=True / --augment adds rescaled copies)")  # fmt: skip
    return stages, notes


def _time_models(
    original: nn.Module | None, converted: nn.Module, args: tuple[Any, ...], timing: Timing | None
) -> tuple[tuple[float | None, float | None], list[str]]:
    """Whole-model medians, interleaved; the original is the caller's model, or the teacher copy after inplace."""
    if timing is None or not timing.latency:
        return (None, None), []
    if original is None:
        return (None, None), ["whole-model latency not measured: inplace=True left no original model to time against"]
    where = timing.note()
    try:
        before, after = time_forwards(
            [original, converted], args, timing.reps, backend=timing.backend, threads=timing.threads
        )
    except ModelError as e:  # the layers were timed; a model the backend cannot take still converts
        return (None, None), [where, f"whole-model latency not measured: {e}"]
    return (before, after), [where]


def _leaves_with_convs(analysis: Analysis) -> dict[str, str]:
    """The fx leaves worth reporting: those with convs inside (their convs were swapped as modules)."""
    found = {}
    for name, why in analysis.outcome.leaves.items():
        try:
            leaf = analysis.work.get_submodule(name)
        except AttributeError:
            continue
        if any(isinstance(m, CONV_TYPES) for m in leaf.modules()):
            found[name] = why
    return found


def _lifted_note(analysis: Analysis) -> list[str]:
    if not analysis.lifted:
        return []
    names = ", ".join(analysis.lifted)
    notes = [f"lifted {len(analysis.lifted)} functional conv call(s) on parameters into conv modules: {names}"]
    if analysis.rewritten_root:
        notes.append(
            f"the model's own forward calls a functional conv on its parameters, so the converted model is the "
            f"torch.fx GraphModule of that forward, not a {type(analysis.work).__name__}: its outputs are the same "
            "objects, but methods other than forward are not kept"
        )
        if constants := analysis.outcome.constants:
            fixed = ", ".join(f"{name}={value!r}" for name, value in constants.items())
            notes.append(f"that graph was traced with {fixed} fixed, and accepts only these values")
    return notes
