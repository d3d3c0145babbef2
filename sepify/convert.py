"""``sepify.convert``: orchestration only (analyse, choose, rewrite, verify, report)."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from sepify.analysis import analyze, count_params, normalize_inputs, pair_macs, site_macs, spatial
from sepify.candidates import ConvSite
from sepify.cost import conv_params, exact_rank, separable_params
from sepify.decompose import ORDERS, Factorization
from sepify.errors import ConfigError
from sepify.modules import SeparableConv2d
from sepify.plan import Plan
from sepify.probe import describe_inputs, probe
from sepify.report import ConversionReport, LayerReport, SkipReason
from sepify.rewrite import swap_modules
from sepify.verify import output_error, top1_agreement

__all__ = ["convert", "ConversionResult", "normalize_inputs"]

logger = logging.getLogger(__name__)

Rank = int | str


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
    args = normalize_inputs(example_inputs)
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    params_before = count_params(model)
    analysis = analyze(model, args, inplace=inplace, include=include, exclude=exclude, skip_shared=skip_shared)
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
        )
        rows.append(row)
        meta[site.qualname] = {"rank": choice.rank, "order": choice.order, "weight_error": choice.weight_error}

    target, work = analysis.target, analysis.work
    swap_modules(target, replacements, meta)
    if target is not work:
        # A GraphModule has its own containers; swap in `work` too so that
        # inplace=True really converts the caller's modules.
        # (convs lifted from F.conv2d exist only in the GraphModule)
        swap_modules(work, {k: v for k, v in replacements.items() if k not in analysis.lifted}, {})
    after = probe(target, args, what="converted model")

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
        notes=tuple(
            [
                f"lifted {len(analysis.lifted)} functional conv2d call(s) on parameters into Conv2d modules: "
                + ", ".join(analysis.lifted)
            ]
            if analysis.lifted
            else []
        ),  # fmt: skip
    )
    logger.info("converted %d of %d convs", len(report.converted), len(rows))
    return ConversionResult(model=target, report=report)
