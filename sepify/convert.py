"""``sepify.convert``: orchestration only (analyse, choose, rewrite, verify, report)."""

from __future__ import annotations

import contextlib
import copy
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from sepify.analysis import Analysis, analyze, count_params, normalize_inputs, pair_macs, site_macs, spatial
from sepify.calibration import CalibrationData, calibration_batches
from sepify.candidates import ConvSite
from sepify.cost import conv_params, exact_rank, separable_params
from sepify.decompose import ORDERS, Factorization
from sepify.distill import LOSSES, distill
from sepify.errors import ConfigError, InputShapeError
from sepify.modules import SeparableConv2d
from sepify.plan import Plan
from sepify.probe import describe_inputs, probe, time_forwards
from sepify.refine import refine_pairs, refresh_batchnorm
from sepify.report import ConversionReport, FidelityStage, LayerReport, SkipReason
from sepify.rewrite import swap_modules
from sepify.verify import heldout_fidelity, output_error, top1_agreement

__all__ = ["convert", "ConversionResult", "normalize_inputs"]

logger = logging.getLogger(__name__)

Rank = int | str
ProgressFn = Callable[[str, int, int], None]


@dataclass(frozen=True)
class ConversionResult:
    """The converted model and the report of what was done to it."""

    model: nn.Module
    report: ConversionReport


def _check_rank(rank: Rank, tolerance: float | None) -> None:
    if rank == "auto":
        if tolerance is None or not (isinstance(tolerance, (int, float)) and 0 <= tolerance < 1):
            raise ConfigError(
                f"rank='auto' needs a tolerance in [0, 1) (the largest weight error to accept), got {tolerance!r}"
            )
        return
    if tolerance is not None:
        raise ConfigError("tolerance applies only to rank='auto'; drop it or pass rank='auto'")
    if rank == "full":
        return
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ConfigError(f"rank must be a positive integer, 'full' or 'auto', got {rank!r}")


def _check_order(order: str) -> None:
    if order not in (*ORDERS, "auto"):
        raise ConfigError(f"order must be 'dw-pw', 'pw-dw' or 'auto', got {order!r}")


@dataclass(frozen=True)
class _Choice:
    order: str
    rank: int
    factorization: Factorization
    weight_error: float
    macs: int
    params: int


def _option(site: ConvSite, order: str, rank: Rank, tolerance: float | None) -> _Choice:
    """The pair for one order: fixed rank (capped), exact rank, or smallest rank within tolerance."""
    conv = site.module
    kernel = tuple(conv.kernel_size)
    limit = exact_rank(conv.in_channels, conv.out_channels, kernel, conv.groups, order)
    f = Factorization.of(conv.weight, conv.groups, order)
    if rank == "full":
        r = limit
    elif rank == "auto":
        assert tolerance is not None  # checked by _check_rank
        r = next(k for k in range(1, limit + 1) if f.relative_error(k) <= tolerance or k == limit)
    else:
        r = min(int(rank), limit)
    params = separable_params(conv.in_channels, conv.out_channels, kernel, conv.groups, r, order, conv.bias is not None)
    return _Choice(order, r, f, f.relative_error(r), pair_macs(site, r, order), params)


def _choose(site: ConvSite, rank: Rank, order: str, tolerance: float | None) -> _Choice:
    """Pick order and rank for one conv. For order='auto': lower weight error, ties to fewer MACs.

    With rank='auto' every order meets the tolerance, so the cheaper pair wins.
    """
    orders = ORDERS if order == "auto" else (order,)
    options = [_option(site, o, rank, tolerance) for o in orders]
    best = options[0]
    for cand in options[1:]:
        tie = math.isclose(cand.weight_error, best.weight_error, rel_tol=1e-6, abs_tol=1e-6)
        if rank == "auto" or tie:
            if (cand.macs, cand.params) < (best.macs, best.params):
                best = cand
        elif cand.weight_error < best.weight_error:
            best = cand
    return best


def _row(site: ConvSite, **after: Any) -> LayerReport:
    conv = site.module
    kernel = tuple(conv.kernel_size)
    params = conv_params(conv.in_channels, conv.out_channels, kernel, conv.groups, conv.bias is not None)
    macs = site_macs(site)
    called = site.call.calls > 0
    fields: dict[str, Any] = {
        "name": site.qualname,
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
        "input_size": spatial(site.call.input_shape) if called else None,
        "output_size": spatial(site.call.output_shape) if called else None,
        "params_before": params,
        "params_after": params,
        "macs_before": macs,
        "macs_after": macs,
    }
    fields.update(after)
    return LayerReport(**fields)


def _apply_plan_selection(sites: list[ConvSite], plan: Plan) -> None:
    """Skip convs the plan does not list; fail loudly on names it lists wrongly."""
    by_name = {site.qualname: site for site in sites}
    for name in plan:
        if name not in by_name:
            raise ConfigError(
                f"the plan names {name!r}, but the model has no Conv2d there; regenerate the plan for this model"
            )
        reason = by_name[name].skip_reason
        if reason is not None and reason is not SkipReason.EXCLUDED:
            raise ConfigError(
                f"the plan names {name!r}, which cannot be converted ({reason.value}); remove it from the plan"
            )
    for site in sites:
        if site.qualname not in plan and site.skip_reason is None:
            site.skip_reason = SkipReason.NOT_PLANNED
        elif site.qualname in plan:
            site.skip_reason = None  # the plan is explicit; it overrides include/exclude


def convert(
    model: nn.Module,
    example_inputs: Any,
    *,
    rank: Rank = 1,
    order: str = "dw-pw",
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    inplace: bool = False,
    skip_shared: bool = False,
    plan: Plan | None = None,
    tolerance: float | None = None,
    calibration: Any = None,
    calibration_samples: int | None = None,
    refine: bool = True,
    refresh_bn: bool = True,
    distill_steps: int = 0,
    distill_lr: float = 1e-3,
    distill_loss: str = "mse",
    train_all: bool = False,
    seed: int = 0,
    tune_layout: bool = False,
    latency: bool = False,
    skip_slower: bool = False,
    latency_reps: int = 7,
    progress: ProgressFn | None = None,
) -> ConversionResult:
    """Rewrite a model's standard convs into depthwise + pointwise pairs.

    The model is traced with torch.fx (in its current train/eval mode); every
    ``call_module`` node whose module is exactly ``nn.Conv2d`` with something
    to separate is replaced by a :class:`~sepify.SeparableConv2d` initialised
    by per-channel truncated SVD of its weight. Submodules that fx cannot
    trace are kept as leaves and their convs swapped as modules; a model whose
    own forward is untraceable is converted entirely by swapping modules. The
    report says which mode was used.

    Args:
        model: any ``nn.Module``.
        example_inputs: a tensor, or a tuple of positional arguments (tensors,
            or lists/dicts of tensors, e.g. ``([image],)`` for torchvision
            detectors). Used for shapes (hence MACs) and for verification.
        rank: depth multiplier ``r`` (capped per layer at its exact rank; the
            report marks capped layers), ``"full"`` for the exact rank, or
            ``"auto"``: per layer the smallest rank whose weight error is at
            most ``tolerance`` (layers where that pair would not be smaller
            than the conv are skipped as ``no-saving``).
        order: ``"dw-pw"``, ``"pw-dw"`` or ``"auto"`` (per layer, the order
            with the lower weight error at that rank; ties go to fewer MACs).
        include: glob patterns over conv qualnames; only matches convert.
        exclude: glob patterns over conv qualnames to leave alone.
        inplace: convert ``model`` itself instead of a deep copy. Even then
            the returned model may be a new GraphModule; use ``result.model``.
        skip_shared: leave convs that run more than once per forward (shared
            heads, recurrent blocks) unconverted; by default the one pair
            replaces them at every call site.
        plan: a :class:`~sepify.Plan` (from ``sepify.audit(...).plan(...)``
            or ``Plan.from_json``): convert exactly the convs it lists at its
            rank and order; ``rank``/``order`` are then ignored and unlisted
            convs are skipped as ``not-planned``.
        tolerance: with ``rank="auto"``, the largest relative weight error
            ``||W - W_hat|| / ||W||`` accepted per layer.
        calibration: unlabelled inputs (a tensor ``(N, ...)``, a DataLoader or
            iterable of batches, or a callable returning one). When given, a
            held-out 20% judges every stage and, in order: each pair's last
            factor is refit in closed form (``refine``), BatchNorm statistics
            are recomputed (``refresh_bn``, kept only if that helps), and the
            pairs are distilled against the original (``distill_steps``).
        calibration_samples: use at most this many calibration samples.
        refine: closed-form least-squares refit of the pairs (default on).
        refresh_bn: recompute BatchNorm running statistics after refitting.
        distill_steps: Adam steps of knowledge distillation (0: none).
        distill_lr: Adam learning rate for distillation.
        distill_loss: ``"mse"`` on outputs or ``"kl"`` on logits.
        train_all: distill every parameter, not only the converted pairs'.
        seed: seeds distillation (dropout, order) for reproducible results.
        tune_layout: time the equivalent layouts of each pw-dw pair at rank
            > 1 at its real input shape and keep the faster
            (:meth:`SeparableConv2d.tune_layout`); off by default because the
            choice depends on timing.
        latency: time each pair against the conv it replaces at the layer's
            input shape (interleaved medians, in its fastest layout, so this
            implies ``tune_layout``), and the whole converted model against
            the original on ``example_inputs``; the report gets per-layer
            time ratios and realisation (time ratio / MAC ratio) and the
            whole-model ``latency_ratio``.
        skip_slower: implies ``latency``; leave a conv alone (skip reason
            ``slower``) when its pair was not faster. Timings are of this
            machine, thread count and batch size (the example inputs').
        latency_reps: timed repetitions per measurement.
        progress: called as ``progress(step, done, total)`` during calibration.

    Returns:
        :class:`ConversionResult` with ``.model`` (on the original's device
        and dtype, in its train/eval mode) and ``.report``.

    Raises:
        ConfigError: an argument is invalid, or the plan names a conv the
            model does not have or cannot convert.
        InputShapeError: the model's forward fails on ``example_inputs``.

    Example:
        >>> import torch, sepify
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3), torch.nn.ReLU(), torch.nn.Conv2d(16, 32, 3))
        >>> result = sepify.convert(net, torch.randn(1, 3, 16, 16), rank="full")
        >>> [(r.name, r.converted, r.rank) for r in result.report.layers]
        [('0', True, 9), ('2', True, 9)]
        >>> result.report.output_error < 1e-5
        True
    """
    _check_rank(rank, tolerance)
    _check_order(order)
    if plan is not None and not isinstance(plan, Plan):
        raise ConfigError(f"plan must be a sepify.Plan (see Plan.from_json), got {type(plan).__name__}")
    if distill_loss not in LOSSES:
        raise ConfigError(f"distill_loss must be one of {LOSSES}, got {distill_loss!r}")
    if isinstance(distill_steps, bool) or not isinstance(distill_steps, int) or distill_steps < 0:
        raise ConfigError(f"distill_steps must be an integer >= 0, got {distill_steps!r}")
    if distill_steps and calibration is None:
        raise ConfigError("distillation needs calibration data; pass calibration=... (unlabelled inputs)")
    if isinstance(latency_reps, bool) or not isinstance(latency_reps, int) or latency_reps < 1:
        raise ConfigError(f"latency_reps must be an integer >= 1, got {latency_reps!r}")
    if calibration_samples is not None and calibration_samples < 1:
        raise ConfigError(f"calibration_samples must be >= 1, got {calibration_samples}")
    args = normalize_inputs(example_inputs)
    analysis = analyze(model, args, inplace=inplace, include=include, exclude=exclude, skip_shared=skip_shared)
    params_before = count_params(model)  # analyze() leaves it untouched (it lifts only in a copy)
    if plan is not None:
        _apply_plan_selection(analysis.sites, plan)

    rows: list[LayerReport] = []
    replacements: dict[str, nn.Module] = {}
    meta: dict[str, dict[str, Any]] = {}
    for site in analysis.sites:
        if not site.eligible:
            rows.append(_row(site))
            continue
        conv = site.module
        wanted_rank, wanted_order = (plan[site.qualname].rank, plan[site.qualname].order) if plan else (rank, order)
        choice = _choose(site, wanted_rank, wanted_order, tolerance)
        kernel = tuple(conv.kernel_size)
        if rank == "auto" and plan is None:
            before = conv_params(conv.in_channels, conv.out_channels, kernel, conv.groups, conv.bias is not None)
            if choice.params >= before or choice.macs >= site_macs(site):
                site.skip_reason = SkipReason.NO_SAVING
                rows.append(_row(site))
                continue
        pair = SeparableConv2d.from_conv(conv, choice.rank, choice.order, factorization=choice.factorization)
        timing = None
        if plan is not None and plan[site.qualname].layout is not None:
            _apply_planned_layout(pair, site.qualname, str(plan[site.qualname].layout))
        if latency or skip_slower:
            timing = pair.time(site.call.input_shape, latency_reps, against=conv)
        elif tune_layout:
            pair.tune_layout(site.call.input_shape)
        timed = {"latency_before": timing.conv, "latency_after": timing.pair} if timing else {}
        if skip_slower and timing is not None and timing.conv is not None and timing.pair >= timing.conv:
            site.skip_reason = SkipReason.SLOWER
            rows.append(_row(site, **timed))
            continue
        replacements[site.qualname] = pair
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
        rows.append(row)
        meta[site.qualname] = {"rank": choice.rank, "order": choice.order, "weight_error": choice.weight_error}

    target, work = analysis.target, analysis.work
    # The teacher for calibration: the traced model before any swap.
    teacher = copy.deepcopy(target) if calibration is not None and replacements else None
    swap_modules(target, replacements, meta)
    if target is not work:
        # A GraphModule has its own containers; swap in `work` too so that
        # inplace=True really converts the caller's modules.
        # (convs lifted from F.conv2d exist only in the GraphModule)
        swap_modules(work, {k: v for k, v in replacements.items() if k not in analysis.lifted}, {})
    stages: tuple[FidelityStage, ...] = ()
    notes: list[str] = []
    if teacher is not None:
        data = calibration_batches(calibration, n_args=len(args), limit=calibration_samples, device=_device_of(target))
        stages, notes = _calibrate(
            analysis, teacher, replacements, data, refine=refine, refresh_bn=refresh_bn, distill_steps=distill_steps,
            distill_lr=distill_lr, distill_loss=distill_loss, train_all=train_all, seed=seed, progress=progress,
        )  # fmt: skip
    elif calibration is not None:
        notes.append("calibration data was given but no conv was converted, so nothing was refined")
    after = probe(target, args, what="converted model")
    model_times: list[float | None] = [None, None]
    if latency or skip_slower:
        # the caller's model is the original unless inplace converted it; then the teacher copy (if any) is
        original = model if not inplace else teacher
        if original is not None:
            model_times = list(time_forwards([original, target], args, latency_reps))
        else:
            notes.append("whole-model latency not measured: inplace=True left no original model to time against")

    lifted_note = (
        [f"lifted {len(analysis.lifted)} functional conv2d call(s) on parameters into Conv2d modules: "
         + ", ".join(analysis.lifted)]
        if analysis.lifted else []
    )  # fmt: skip
    report = ConversionReport(
        layers=tuple(rows),
        params_before=params_before,
        params_after=count_params(target),
        macs_before=analysis.before.macs,
        macs_after=after.macs,
        inputs=describe_inputs(args),
        mode=analysis.outcome.mode,
        trace_error=analysis.outcome.error,
        leaves=dict(analysis.outcome.leaves),
        output_error=output_error(analysis.before.output, after.output),
        top1_agreement=top1_agreement(analysis.before.output, after.output),
        notes=tuple(lifted_note + notes),
        fidelity=stages,
        latency_before=model_times[0],
        latency_after=model_times[1],
    )
    logger.info("converted %d of %d convs", len(report.converted), len(rows))
    return ConversionResult(model=target, report=report)


def _apply_planned_layout(pair: SeparableConv2d, name: str, layout: str) -> None:
    try:
        pair.layout = layout
    except ValueError as e:
        raise ConfigError(f"the plan's layout for {name!r} does not fit its pair: {e}") from e


def _device_of(module: nn.Module) -> Any:
    p = next(module.parameters(), None)
    return p.device if p is not None else None


@contextlib.contextmanager
def _eval_mode(*modules: nn.Module) -> Iterator[None]:
    """Calibration measures the deployed (eval) behaviour; every module's own flag is restored."""
    saved = [(m, m.training) for root in modules for m in root.modules()]
    for root in modules:
        root.eval()
    try:
        yield
    finally:
        for m, flag in saved:
            m.training = flag


def _calibrate(
    analysis: Analysis,
    teacher: nn.Module,
    replacements: dict[str, nn.Module],
    data: CalibrationData,
    *,
    refine: bool,
    refresh_bn: bool,
    distill_steps: int,
    distill_lr: float,
    distill_loss: str,
    train_all: bool,
    seed: int,
    progress: ProgressFn | None,
) -> tuple[tuple[FidelityStage, ...], list[str]]:
    """Refine, refresh BN, distill; each stage measured on the held-out batches."""
    student = analysis.target
    held = sum(int(a[0].shape[0]) for a in data.heldout)
    stages: list[FidelityStage] = []
    notes: list[str] = []

    def measure(stage: str) -> FidelityStage:
        err, top1 = heldout_fidelity(teacher, student, data.heldout)
        stages.append(FidelityStage(stage, err, top1, held))
        return stages[-1]

    with _eval_mode(teacher, student):
        _check_batches(teacher, data)
        measure("init")
        if refine:
            # execution order (the probe saw first calls in this order); shared convs are skipped
            order = [n for n in analysis.before.convs if n in replacements and analysis.before.convs[n].calls == 1]
            for name in replacements:
                calls = analysis.before.convs[name].calls if name in analysis.before.convs else 0
                if calls > 1:
                    notes.append(f"did not refine {name}: it runs at {calls} call sites, and the refit fits one")
            pairs = [(n, replacements[n]) for n in order]
            result = refine_pairs(teacher, student, pairs, data.fit, data.heldout, progress)  # type: ignore[arg-type]
            for name, why in result.skipped.items():
                notes.append(f"did not refine {name}: {why}")
            refined = measure("refined")
            if refresh_bn:
                saved = {k: v.clone() for k, v in student.state_dict().items() if "running_" in k or "num_batches" in k}
                if saved and refresh_batchnorm(student, data.fit):
                    fresh = measure("bn-refreshed")
                    if _worse(fresh, refined):
                        student.load_state_dict(saved, strict=False)
                        stages.pop()
                        notes.append(
                            "recomputed BatchNorm statistics were worse on held-out data; kept the original ones"
                        )
        if distill_steps:
            params = (
                list(student.parameters()) if train_all else [p for m in replacements.values() for p in m.parameters()]
            )
            outcome = distill(teacher, student, data.fit, data.heldout, steps=distill_steps, params=params,
                              lr=distill_lr, loss=distill_loss, seed=seed, progress=progress)  # fmt: skip
            if outcome.steps < distill_steps:
                notes.append(
                    f"distillation stopped early at step {outcome.steps} (best held-out loss at step {outcome.best_step})"
                )
            measure("distilled")
    return tuple(stages), notes


def _check_batches(teacher: nn.Module, data: CalibrationData) -> None:
    """Fail with a sentence, not a traceback from deep inside the model, if calibration data does not fit."""
    for args in (data.fit[0], data.heldout[0]):
        try:
            with torch.no_grad():
                teacher(*args)
        except Exception as e:  # noqa: BLE001 - any failure of user code on user data is an input problem
            raise InputShapeError(
                f"the model failed on calibration batch {describe_inputs(args)}: {type(e).__name__}: "
                f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}; pass calibration samples shaped like "
                "the example inputs"
            ) from e


def _worse(a: FidelityStage, b: FidelityStage) -> bool:
    if a.output_error is None or b.output_error is None:
        return False
    return a.output_error > b.output_error
