"""``sepify.convert``: orchestration only (trace, probe, choose, rewrite, verify, report)."""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from sepify.candidates import ConvSite, find_conv_sites
from sepify.cost import conv_macs, conv_params, exact_rank, separable_macs, separable_params
from sepify.decompose import ORDERS, Factorization
from sepify.errors import ConfigError, InputShapeError
from sepify.modules import SeparableConv2d
from sepify.plan import Plan
from sepify.probe import ProbeResult, describe_inputs, probe
from sepify.report import ConversionReport, LayerReport, SkipReason
from sepify.rewrite import swap_modules
from sepify.tracing import TraceOutcome, shorten_error, trace_model
from sepify.verify import output_error, top1_agreement

__all__ = ["convert", "ConversionResult", "normalize_inputs"]

logger = logging.getLogger(__name__)

Rank = int | str


@dataclass(frozen=True)
class ConversionResult:
    """The converted model and the report of what was done to it."""

    model: nn.Module
    report: ConversionReport


def normalize_inputs(example_inputs: Any) -> tuple[Any, ...]:
    """Positional arguments for ``model(*args)``.

    A tensor is one argument; a tuple is the argument list; anything else (a
    list of images, a dict) is one argument.
    """
    if isinstance(example_inputs, tuple):
        return example_inputs
    return (example_inputs,)


def _check_rank(rank: Rank) -> None:
    if rank == "full":
        return
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ConfigError(f"rank must be a positive integer or 'full', got {rank!r}")


def _check_order(order: str) -> None:
    if order not in (*ORDERS, "auto"):
        raise ConfigError(f"order must be 'dw-pw', 'pw-dw' or 'auto', got {order!r}")


def _check_patterns(name: str, patterns: Sequence[str] | None) -> list[str] | None:
    if patterns is None:
        return None
    if isinstance(patterns, str):
        return [patterns]  # a lone glob is a common slip; accept it
    if not all(isinstance(p, str) for p in patterns):
        raise ConfigError(f"{name} must be a list of glob strings, got {patterns!r}")
    return list(patterns)


def _count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _spatial(shape: tuple[int, ...]) -> tuple[int, int]:
    return (int(shape[-2]), int(shape[-1]))


def _batch(shape: tuple[int, ...]) -> int:
    # An unbatched (C, H, W) input is one sample.
    return int(shape[0]) if len(shape) == 4 else 1


def _layer_macs_before(site: ConvSite) -> int:
    conv = site.module
    return sum(
        conv_macs(conv.in_channels, conv.out_channels, tuple(conv.kernel_size), conv.groups, _spatial(out), _batch(out))
        for _, out in site.call.shapes
    )


def _pair_macs(site: ConvSite, rank: int, order: str) -> int:
    conv = site.module
    return sum(
        separable_macs(conv.in_channels, conv.out_channels, tuple(conv.kernel_size), conv.groups, rank, order,
                       _spatial(inp), _spatial(out), _batch(out))
        for inp, out in site.call.shapes
    )  # fmt: skip


def _choose(site: ConvSite, rank: Rank, order: str) -> tuple[str, int, Factorization]:
    """Pick the order and effective rank for one conv; returns its factorization too."""
    conv = site.module
    orders = ORDERS if order == "auto" else (order,)
    options = []
    for o in orders:
        limit = exact_rank(conv.in_channels, conv.out_channels, tuple(conv.kernel_size), conv.groups, o)
        r = limit if rank == "full" else min(int(rank), limit)
        f = Factorization.of(conv.weight, conv.groups, o)
        options.append((o, r, f, f.relative_error(r), _pair_macs(site, r, o)))
    best = options[0]
    for cand in options[1:]:
        err_best, err_cand = best[3], cand[3]
        if math.isclose(err_cand, err_best, rel_tol=1e-6, abs_tol=1e-6):
            if cand[4] < best[4]:  # a tie in error goes to fewer MACs
                best = cand
        elif err_cand < err_best:
            best = cand
    return best[0], best[1], best[2]


def _row(site: ConvSite, **after: Any) -> LayerReport:
    conv = site.module
    kernel = tuple(conv.kernel_size)
    params = conv_params(conv.in_channels, conv.out_channels, kernel, conv.groups, conv.bias is not None)
    macs = _layer_macs_before(site)
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
        "input_size": _spatial(site.call.input_shape) if called else None,
        "output_size": _spatial(site.call.output_shape) if called else None,
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
            raise ConfigError(f"the plan names {name!r}, but the model has no Conv2d there; regenerate the plan for this model")
        reason = by_name[name].skip_reason
        if reason is not None and reason is not SkipReason.EXCLUDED:
            raise ConfigError(f"the plan names {name!r}, which cannot be converted ({reason.value}); remove it from the plan")
    for site in sites:
        if site.qualname not in plan and site.skip_reason is None:
            site.skip_reason = SkipReason.NOT_PLANNED
        elif site.qualname in plan:
            site.skip_reason = None  # the plan is explicit; it overrides include/exclude


def _trace_and_probe(work: nn.Module, args: tuple[Any, ...]) -> tuple[TraceOutcome, nn.Module, ProbeResult]:
    outcome = trace_model(work)
    if outcome.graph_module is None:
        return outcome, work, probe(work, args)
    try:
        return outcome, outcome.graph_module, probe(outcome.graph_module, args, what="traced model")
    except InputShapeError as traced_failure:
        # A traced graph can bake in shapes or branches that eager code would
        # recompute; if the eager model runs, swap modules in it instead.
        result = probe(work, args)
        reason = f"the traced graph failed where the model runs ({shorten_error(traced_failure.__cause__ or traced_failure)})"
        return TraceOutcome(graph_module=None, error=reason), work, result


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
            report marks capped layers) or ``"full"`` for the exact rank.
        order: ``"dw-pw"``, ``"pw-dw"`` or ``"auto"`` (per layer, the order
            with the lower weight error at that rank; ties go to fewer MACs).
        include: glob patterns over conv qualnames; only matches convert.
        exclude: glob patterns over conv qualnames to leave alone.
        skip_shared: leave convs that run more than once per forward (shared
            heads, recurrent blocks) unconverted; by default the one pair
            replaces them at every call site.
        plan: a :class:`~sepify.Plan` (from ``sepify.audit(...).plan(...)``
            or ``Plan.from_json``): convert exactly the convs it lists at its
            rank and order; ``rank``/``order`` are then ignored and unlisted
            convs are skipped as ``not-planned``.
        inplace: convert ``model`` itself instead of a deep copy. Even then
            the returned model may be a new GraphModule; use ``result.model``.

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
    _check_rank(rank)
    _check_order(order)
    include = _check_patterns("include", include)
    exclude = _check_patterns("exclude", exclude)
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    args = normalize_inputs(example_inputs)

    params_before = _count_params(model)
    # Deep-copy before tracing: fuse() does, and some models (timm's levit)
    # keep tracing state that breaks a second trace of the caller's object.
    work = model if inplace else copy.deepcopy(model)
    outcome, target, before = _trace_and_probe(work, args)

    sites = find_conv_sites(work, before.convs, include=include, exclude=exclude, skip_shared=skip_shared)
    if plan is not None:
        _apply_plan_selection(sites, plan)
    rows: list[LayerReport] = []
    replacements: dict[str, nn.Module] = {}
    meta: dict[str, dict[str, Any]] = {}
    for site in sites:
        if not site.eligible:
            rows.append(_row(site))
            continue
        conv = site.module
        wanted_rank, wanted_order = (plan[site.qualname].rank, plan[site.qualname].order) if plan else (rank, order)
        chosen_order, r, factorization = _choose(site, wanted_rank, wanted_order)
        pair = SeparableConv2d.from_conv(conv, r, chosen_order, factorization=factorization)
        replacements[site.qualname] = pair
        kernel = tuple(conv.kernel_size)
        row = _row(
            site,
            converted=True,
            rank=r,
            requested_rank=wanted_rank,
            rank_capped=wanted_rank != "full" and r < int(wanted_rank),
            order=chosen_order,
            params_after=separable_params(conv.in_channels, conv.out_channels, kernel, conv.groups, r,
                                          chosen_order, conv.bias is not None),
            macs_after=_pair_macs(site, r, chosen_order),
            weight_error=factorization.relative_error(r),
        )  # fmt: skip
        rows.append(row)
        meta[site.qualname] = {"rank": r, "order": chosen_order, "weight_error": row.weight_error}

    swap_modules(target, replacements, meta)
    if target is not work:
        # A GraphModule has its own containers; swap in `work` too so that
        # inplace=True really converts the caller's modules.
        swap_modules(work, replacements, {})
    after = probe(target, args, what="converted model")

    report = ConversionReport(
        layers=tuple(rows),
        params_before=params_before,
        params_after=_count_params(target),
        macs_before=before.macs,
        macs_after=after.macs,
        inputs=describe_inputs(args),
        mode=outcome.mode,
        trace_error=outcome.error,
        leaves=dict(outcome.leaves),
        output_error=output_error(before.output, after.output),
        top1_agreement=top1_agreement(before.output, after.output),
    )
    logger.info("converted %d of %d convs", len(report.converted), len(rows))
    return ConversionResult(model=target, report=report)


