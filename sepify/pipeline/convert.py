"""``sepify.convert`` and ``sepify.load_converted``: orchestration only.

The pipeline reads top to bottom in :func:`convert`: analyse (copy, trace,
probe, classify), choose and build a pair per conv, swap them in, calibrate,
verify, report. Each stage lives in its subpackage.
"""

from __future__ import annotations

import copy
import logging
import math
import operator
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from sepify.calibrate.data import calibration_batches
from sepify.calibrate.stages import FidelityStage, calibrate_pairs, grouped_by_outputs
from sepify.calibrate.synthetic import resolve_synthetic
from sepify.calibrate.verify import output_errors, top1_agreement
from sepify.core.cost import ORDERS, conv_params, exact_rank, separable_params
from sepify.core.cp import CPFactorization
from sepify.core.decompose import SVD_ORDERS, Factorization
from sepify.core.functional import CONV_TYPES
from sepify.core.modules import SeparableConv, weight_of
from sepify.errors import ConfigError, InputShapeError, ModelError, ModelLoadError, PlanError, SepifyWarning
from sepify.graph.analysis import Analysis, analyze, count_params, normalize_inputs, pair_macs, site_macs, spatial
from sepify.graph.candidates import ConvSite, SkipReason, kind_notes, matches_any
from sepify.graph.conv_kinds import inherits_forward, plain_view
from sepify.graph.probe import ProbeResult, all_finite, describe_inputs, probe, time_forwards
from sepify.graph.rewrite import replace_submodule, swap_modules
from sepify.io.load import load_weights_into, safetensors_metadata
from sepify.io.save import PLAN_METADATA_KEY, plan_path
from sepify.options import Calibration, Distill, Selection, Timing
from sepify.planning.plan import Plan
from sepify.report.conversion import ConversionReport, LayerReport
from sepify.runtime.sessions import check_backend
from sepify.runtime.timing import time_pair

__all__ = ["convert", "ConversionResult", "load_converted"]

logger = logging.getLogger(__name__)

Rank = int | str
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
    rank: Rank = 1,
    order: str = "dw-pw",
    tolerance: float | None = None,
    plan: Plan | None = None,
    select: Selection | None = None,
    calibration: Calibration | Any | None = None,
    distill: Distill | int | None = None,
    timing: Timing | bool | None = None,
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
    rank = _checked_rank(rank, tolerance)
    if order not in (*ORDERS, "auto"):
        raise ConfigError(f"order must be 'dw-pw', 'pw-dw', 'pw-dw-pw' or 'auto', got {order!r}")
    if plan is not None and not isinstance(plan, Plan):
        raise ConfigError(f"plan must be a sepify.Plan (see Plan.from_json), got {type(plan).__name__}")
    calib, distillation, timed = Calibration.of(calibration), Distill.of(distill), Timing.of(timing)
    if timed is not None:
        check_backend(timed.backend)
    if distillation is not None and calib is None:
        raise ConfigError("distillation needs calibration data; pass calibration=... (unlabelled inputs)")
    args = normalize_inputs(example_inputs)
    calib, synthetic = resolve_synthetic(calib, model, args, progress)

    analysis = analyze(model, args, inplace=inplace, select=select)
    params_before = count_params(model)  # analyze() leaves it untouched (it lifts only in a copy)
    if plan is not None:
        _apply_plan_selection(analysis.sites, plan)
    chooser = _Chooser(rank, order, tolerance, plan, timed, allow_larger=select.allow_larger if select else False)
    rows, pairs = chooser.build(analysis.sites)
    # the teacher for calibration: the traced model before any swap
    teacher = copy.deepcopy(analysis.target) if calib is not None and pairs else None
    _swap(analysis, pairs, chooser.meta)
    stages, notes = _calibrate(analysis, teacher, pairs, calib, distillation, progress)
    after = _probe_converted(analysis, args)
    times, timing_notes = _time_models(model if not inplace else teacher, analysis.model, args, timed)

    errors, why = output_errors(analysis.before.output, after.output)
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
        top1_agreement=top1_agreement(analysis.before.output, after.output),
        notes=tuple(_lifted_note(analysis) + kind_notes(analysis.sites) + synthetic + notes + timing_notes),
        fidelity=stages,
        latency_before=times[0],
        latency_after=times[1],
    )
    logger.info("converted %d of %d convs", len(report.converted), len(rows))
    _warn_if_unselected(report, select, plan)
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


def _apply_plan_selection(sites: list[ConvSite], plan: Plan) -> None:
    """Skip convs the plan does not list; fail loudly on names it lists wrongly."""
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
    for site in sites:
        if site.qualname not in plan and site.skip_reason is None:
            site.skip_reason = SkipReason.NOT_PLANNED
        elif site.qualname in plan:
            site.skip_reason = None  # the plan is explicit; it overrides include/exclude


@dataclass(frozen=True)
class _Choice:
    order: str
    rank: int
    factorization: Factorization | CPFactorization
    weight_error: float
    macs: int
    params: int


class _Chooser:
    """Picks rank and order per conv, builds its pair, and times it when asked."""

    def __init__(
        self,
        rank: Rank,
        order: str,
        tolerance: float | None,
        plan: Plan | None,
        timing: Timing | None,
        allow_larger: bool = False,
    ):
        self.rank, self.order, self.tolerance, self.plan, self.timing = rank, order, tolerance, plan, timing
        self.allow_larger = allow_larger
        self.meta: dict[str, dict[str, Any]] = {}  # node.meta["sepify"] of each converted conv

    def build(self, sites: list[ConvSite]) -> tuple[list[LayerReport], dict[str, SeparableConv]]:
        """One report row per conv, and the pair of each conv that converts."""
        rows: list[LayerReport] = []
        pairs: dict[str, SeparableConv] = {}
        for site in sites:
            row, pair = self._convert(site) if site.eligible else (_row(site), None)
            rows.append(row)
            if pair is not None:
                pairs[site.qualname] = pair
        return rows, pairs

    def _convert(self, site: ConvSite) -> tuple[LayerReport, SeparableConv | None]:
        planned = self.plan[site.qualname] if self.plan is not None else None
        wanted_rank, wanted_order = (planned.rank, planned.order) if planned else (self.rank, self.order)
        choice = _choose(site, wanted_rank, wanted_order, self.tolerance)
        if self.rank == "auto" and planned is None and not _smaller(site, choice):
            site.skip_reason = SkipReason.NO_SAVING
            return _row(site), None
        if isinstance(self.rank, int) and planned is None and not self.allow_larger and _larger(site, choice):
            site.skip_reason = SkipReason.NO_SAVING  # the user asked for savings; Selection(allow_larger=True) forces
            return _row(site), None
        pair = SeparableConv.from_conv(site.module, choice.rank, choice.order, factorization=choice.factorization)
        if planned is not None and planned.layout is not None:
            _apply_planned_layout(pair, site.qualname, planned.layout)
        timed = self._time(site, pair)
        if self.timing is not None and self.timing.skip_slower and timed["latency_after"] >= timed["latency_before"]:
            site.skip_reason = SkipReason.SLOWER
            return _row(site, **timed), None
        self.meta[site.qualname] = {"rank": choice.rank, "order": choice.order, "weight_error": choice.weight_error}
        row = _row(
            site,
            converted=True,
            rank=choice.rank,
            requested_rank=wanted_rank,
            rank_capped=isinstance(wanted_rank, int) and choice.rank < wanted_rank,
            order=choice.order,
            params_after=choice.params,
            macs_after=choice.macs,
            weight_error=choice.weight_error,
            layout=pair.layout if len(pair.layouts) > 1 else None,
            **timed,
        )
        return row, pair

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


def _option(site: ConvSite, order: str, rank: Rank, tolerance: float | None) -> _Choice:
    """The pair for one order: fixed rank (capped), exact rank, or smallest rank within tolerance."""
    conv = site.module
    kernel = tuple(conv.kernel_size)
    limit = exact_rank(conv.in_channels, conv.out_channels, kernel, conv.groups, order)
    f: Factorization | CPFactorization
    if order == "pw-dw-pw":
        f = cp = _cp_factorization(site, rank, tolerance, limit)
        r, error = cp.rank, cp.relative_error
    else:
        svd = f = Factorization.of(weight_of(conv), conv.groups, order)
        if rank == "full":
            r = limit
        elif rank == "auto":
            assert tolerance is not None  # checked by _checked_rank
            r = next(k for k in range(1, limit + 1) if svd.relative_error(k) <= tolerance or k == limit)
        else:
            r = min(int(rank), limit)
        error = svd.relative_error(r)
    params = separable_params(conv.in_channels, conv.out_channels, kernel, conv.groups, r, order, conv.bias is not None)
    return _Choice(order, r, f, error, pair_macs(site, r, order), params)


def _cp_factorization(site: ConvSite, rank: Rank, tolerance: float | None, limit: int) -> CPFactorization:
    """The bottleneck at a fixed width, or the narrowest one within tolerance (bisection up to break-even)."""
    conv = site.module
    if rank != "auto":
        return CPFactorization.of(weight_of(conv), conv.groups, limit if rank == "full" else min(int(rank), limit))
    assert tolerance is not None  # checked by _checked_rank
    area = math.prod(conv.kernel_size)
    dense = conv_params(conv.in_channels, conv.out_channels, tuple(conv.kernel_size), conv.groups, False)
    low, high = 1, max(1, min(limit, dense // (conv.in_channels + conv.groups * area + conv.out_channels)))
    best = CPFactorization.of(weight_of(conv), conv.groups, high)
    while low < high:  # the narrowest width within tolerance, if the widest that still pays is
        middle = (low + high) // 2
        f = CPFactorization.of(weight_of(conv), conv.groups, middle)
        if f.relative_error <= tolerance:
            best, high = f, middle
        else:
            low = middle + 1
    return best


def _choose(site: ConvSite, rank: Rank, order: str, tolerance: float | None) -> _Choice:
    """Pick order and rank for one conv. For order='auto': lower weight error, ties to fewer MACs.

    With rank='auto' every order meets the tolerance (or is at its widest), so the cheaper pair wins.
    """
    if order != "auto":
        orders: tuple[str, ...] = (order,)
    else:
        orders = ORDERS if rank == "auto" else SVD_ORDERS
    options = [_option(site, o, rank, tolerance) for o in orders]
    if rank == "auto":  # the bottleneck may miss the tolerance even at its widest; the SVD orders never do
        assert tolerance is not None  # checked by _checked_rank
        options = [o for o in options if o.weight_error <= tolerance] or options
    best = options[0]
    for cand in options[1:]:
        tie = math.isclose(cand.weight_error, best.weight_error, rel_tol=1e-6, abs_tol=1e-6)
        if rank == "auto" or tie:
            if (cand.macs, cand.params) < (best.macs, best.params):
                best = cand
        elif cand.weight_error < best.weight_error:
            best = cand
    return best


def _site_cost(site: ConvSite) -> tuple[int, int]:
    """``(params, MACs)`` of the conv at ``site``, as its report row counts them."""
    conv = site.module
    params = conv_params(
        conv.in_channels, conv.out_channels, tuple(conv.kernel_size), conv.groups, conv.bias is not None
    )
    return params, site_macs(site)


def _larger(site: ConvSite, choice: _Choice) -> bool:
    """Whether the chosen pair has more params or more MACs than the conv."""
    params, macs = _site_cost(site)
    return choice.params > params or choice.macs > macs


def _smaller(site: ConvSite, choice: _Choice) -> bool:
    """Whether the chosen pair has fewer params and fewer MACs than the conv."""
    params, macs = _site_cost(site)
    return choice.params < params and choice.macs < macs


def _row(site: ConvSite, **after: Any) -> LayerReport:
    conv = site.module
    kernel = tuple(conv.kernel_size)
    params, macs = _site_cost(site)
    called = site.call.calls > 0
    fields: dict[str, Any] = {
        "name": site.qualname,
        "kind": site.kind,
        "converted": False,
        "skip_reason": site.skip_reason,
        "in_channels": conv.in_channels,
        "out_channels": conv.out_channels,
        "kernel_size": kernel,
        "stride": tuple(conv.stride),
        "padding": conv.padding if isinstance(conv.padding, str) else tuple(conv.padding),
        "dilation": tuple(conv.dilation),
        "groups": conv.groups,
        "padding_mode": conv.padding_mode,
        "bias": conv.bias is not None,
        "calls": site.call.calls,
        "input_size": spatial(site.call.input_shape, len(kernel)) if called else None,
        "output_size": spatial(site.call.output_shape, len(kernel)) if called else None,
        "params_before": params,
        "params_after": params,
        "macs_before": macs,
        "macs_after": macs,
    }
    fields.update(after)
    return LayerReport(**fields)


def _apply_planned_layout(pair: SeparableConv, name: str, layout: str) -> None:
    try:
        pair.layout = layout
    except ConfigError as e:
        raise PlanError(f"the plan's layout for {name!r} does not fit its pair: {e}") from e


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
    )
    calls = {name: call.calls for name, call in analysis.before.convs.items()}
    return calibrate_pairs(teacher, analysis.target, pairs, calls, data, calibration, distillation, progress)


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


def load_converted(
    model: nn.Module, weights_path: str | os.PathLike[str], plan: Plan | str | os.PathLike[str] | None = None
) -> nn.Module:
    """Rebuild a converted model from safetensors weights and its plan, without pickle.

    Args:
        model: a fresh instance of the *original* architecture (it is modified
            in place and returned; on any error it is left as it was).
        weights_path: the ``.safetensors`` file ``sepify convert --format
            safetensors`` wrote.
        plan: the plan, or its path; defaults to the plan stored in the
            weights file's metadata, else ``<name>.plan.json`` beside it.

    Raises:
        PlanError: the plan cannot be read or does not fit ``model``.
        ModelLoadError: the weights cannot be read or do not fit.

    Examples:
        After ``sepify convert torchvision.models:resnet18 --format safetensors``:

        ```python
        model = sepify.load_converted(torchvision.models.resnet18(), "resnet18.sep.safetensors")
        ```
    """
    weights_path = Path(weights_path)
    if not weights_path.is_file():
        raise ModelLoadError(f"{weights_path}: no such weights file; pass the .safetensors file sepify wrote")
    plan = _plan_of(weights_path, plan)
    pairs = {}
    for name, layer in plan.layers.items():
        try:
            conv = model.get_submodule(name)
        except AttributeError as e:
            raise PlanError(
                f"the plan names {name!r}, which this model does not have; pass the original architecture"
            ) from e
        if not isinstance(conv, CONV_TYPES):
            raise PlanError(f"the plan names {name!r}, which is a {type(conv).__name__} here, not a convolution")
        geometry: Any = conv
        if not inherits_forward(conv):  # a known subclass converts through its plain view (same geometry)
            geometry = plain_view(conv)
            if geometry is None:
                raise PlanError(f"the plan names {name!r}, a {type(conv).__name__} sepify does not know how to convert")
        limit = exact_rank(
            geometry.in_channels, geometry.out_channels, tuple(geometry.kernel_size), geometry.groups, layer.order
        )
        if layer.rank > limit:
            raise PlanError(
                f"the plan gives {name!r} rank {layer.rank}, above its exact rank {limit} for {layer.order}; "
                "regenerate the plan for this model"
            )
        pair = SeparableConv.shaped_like(geometry, layer.rank, layer.order)
        if layer.layout is not None:
            _apply_planned_layout(pair, name, layer.layout)
        pairs[name] = (conv, pair)
    for name, (_, pair) in pairs.items():
        replace_submodule(model, name, pair)
    try:
        load_weights_into(model, weights_path)
    except BaseException:
        for name, (conv, _) in pairs.items():  # leave the caller's model as it was
            replace_submodule(model, name, conv)
        raise
    return model


def _plan_of(weights_path: Path, plan: Plan | str | os.PathLike[str] | None) -> Plan:
    """The plan given, else the one in the weights' metadata, else the ``.plan.json`` beside them."""
    if isinstance(plan, Plan):
        return plan
    if plan is None:
        stored = safetensors_metadata(weights_path).get(PLAN_METADATA_KEY)
        if stored is not None:
            return Plan.from_json_text(stored, f"the plan stored in {weights_path}")
    plan_file = Path(plan) if plan is not None else plan_path(weights_path)
    if not plan_file.is_file():
        raise PlanError(
            f"{plan_file}: no such plan file, and {weights_path} stores none; pass the plan sepify wrote with it"
        )
    return Plan.from_json(plan_file)
