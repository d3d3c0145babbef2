"""Closed-form, training-free refinement of separable pairs with calibration data.

Layer by layer in execution order: the pair's *inputs* come from the
partially refined converted model (so upstream error is corrected
downstream), the *targets* are the original layer's outputs. The pair's last
factor is refit by least squares (:mod:`sepify.calibrate.regression`):

* dw-pw: the pointwise conv (and its bias) from the depthwise outputs, one
  regression per group;
* pw-dw: the depthwise conv (and its bias) from the unfolded pointwise
  outputs, one small regression per output channel.

Narrow data (a few recordings cut into many samples) must not pull a layer
far from what its weights say: the data's normal equations are blended with
the data-free ones (those of white input, whose solution is the closed-form
initialisation; a ridge towards the initialisation rather than towards zero), the
share chosen on held-out samples, and near-duplicate samples are held out
together (:mod:`sepify.calibrate.data`), so the held-out error is that of
unseen recordings. One generalised eigendecomposition per part of a layer gives
the solution at every share (:class:`~sepify.calibrate.regression.BlendPath`).

Targets are captured for a window of layers per pass of the original model,
and each batch's forward through the converted model resumes from the
previous pair (:mod:`sepify.calibrate.capture`): about one forward pass of
each model over the data in all. A refit that is worse on the held-out
batches than the closed-form initialisation is not kept.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from sepify.calibrate.capture import StudentInputs, TeacherOutputs, capture
from sepify.calibrate.regression import (
    BlendPath,
    NormalEquations,
    add_to_normals,
    current_weights,
    data_free_normals,
    gram_bytes,
    refit_unsupported,
    regression_count,
    ridge_cholesky,
    set_weights,
    solve_ridge,
)
from sepify.core.decompose import Factorization
from sepify.core.functional import ConvLayer, canonical_weight, is_transposed
from sepify.core.measure import conv_output
from sepify.core.modules import SeparableConv
from sepify.graph.candidates import dense_weight

__all__ = ["refine_pairs", "refined_errors", "RefineResult"]

logger = logging.getLogger(__name__)

ProgressFn = Callable[[str, int, int], None]
# refine_pairs solves a layer's regressions in parts of at most this many bytes of Gram matrices; a part's refit
# holds about five times that (the data's, held-out and data-free equations, the eigenvectors and a factor; a long
# kernel's pending correlations too). The long-kernel Conv1d net (benchmarks/long_kernels.py) refined in the same time
# with 64 or 128 MB parts (session 11: 1520 and 1765 MB peak above the start); it skipped 3 of its 4 layers when they
# had to fit in one.
PART_BYTES = 1 << 26
# A layer one of whose regressions alone needs more Gram matrix than this is not refit (a part cannot be smaller than
# a regression: a dense dw-pw pair of a 1024-channel conv at rank 60 has one of 61441 features, 30 GB). The audit's
# refined_errors, which runs on every rank of every candidate, skips ranks whose Gram matrices exceed it in all.
GRAM_BYTES = 1 << 29
# Original convs' outputs held at once for several layers (at least one layer's), and converted-model states kept
# to resume each batch's forward from the previous pair: each 1/8 of the memory available when refinement starts,
# between 256 MB and 4 GB (at 224 px and 256 samples a resnet50's early layers need about 200 MB per layer).
MIN_CACHE_BYTES, MAX_CACHE_BYTES = 1 << 28, 1 << 32
TARGET_BYTES: int | None = None  # a fixed budget for the originals' outputs instead (tests, benchmarks/calibration.py)
RESUME_BYTES: int | None = None  # and for the resumed converted-model states (0 switches resuming off)
# How much of the data-free equations (what the weights alone say; regression.data_free_normals) is blended
# into the data's, relative to the data's target energy; chosen per layer on the held-out samples.
DATA_FREE_SHARES: tuple[float, ...] = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0)


@dataclass(frozen=True)
class RefineResult:
    """Per layer: held-out relative error of the layer output before and after the refit."""

    layers: dict[str, tuple[float, float]]
    skipped: dict[str, str]
    coverage: dict[str, float]  # how much of each layer's input space the fit data spans (regression.coverage)


def refine_pairs(
    teacher: nn.Module,
    student: nn.Module,
    pairs: Sequence[tuple[str, SeparableConv]],
    fit: Sequence[tuple[Any, ...]],
    heldout: Sequence[tuple[Any, ...]],
    progress: ProgressFn | None = None,
) -> RefineResult:
    """Refit each pair's last factor in ``pairs`` order (execution order); see the module docstring.

    ``teacher`` must contain the original conv at each qualname; ``student``
    contains the pair there. Both are run without gradients and restored.
    """
    results: dict[str, tuple[float, float]] = {}
    skipped: dict[str, str] = {}
    spans: dict[str, float] = {}
    batches = [*fit, *heldout]
    unsupported = {name: why for name, pair in pairs if (why := _not_refit(pair)) is not None}
    wanted = [name for name, pair in pairs if name not in unsupported]
    budget = cache_budget()
    targets = TeacherOutputs(teacher, wanted, batches, budget if TARGET_BYTES is None else TARGET_BYTES)
    inputs = StudentInputs.for_model(student, wanted, batches, budget if RESUME_BYTES is None else RESUME_BYTES)
    for i, (name, pair) in enumerate(pairs):
        if progress is not None:
            progress("refining layers", i, len(pairs))
        if name not in wanted:
            skipped[name] = unsupported[name]
            continue
        parts = _parts(pair)
        ys: list[Tensor | None] = list(targets.take(name))

        def student_input(k: int, args: tuple[Any, ...], name: str = name, pair: SeparableConv = pair) -> Tensor:
            return inputs.get(name, k) if inputs else capture(student, pair, args, output=False)

        # a layer solved in parts reads its inputs once per part: keep them rather than run the student again
        xs: list[Tensor | None] | None = None
        with torch.no_grad():
            if len(parts) > 1:
                xs = [student_input(k, args) for k, args in enumerate(batches)]
        conv = teacher.get_submodule(name)
        weight = canonical_weight(dense_weight(conv), is_transposed(conv), conv.groups)  # type: ignore[arg-type]
        fits, span, spanned = [], 0.0, 0
        for p, part in enumerate(parts):
            train, held = NormalEquations(), NormalEquations()
            with torch.no_grad():
                for k, args in enumerate(batches):
                    x = xs[k] if xs else student_input(k, args)
                    y = ys[k]
                    assert x is not None and y is not None
                    add_to_normals(train if k < len(fit) else held, pair, x, y, part)
                    if p == len(parts) - 1:  # each batch's tensors are freed once their last part has used them
                        ys[k] = None
                        if xs:
                            xs[k] = None
            free = data_free_normals(pair, weight, conv.bias, part)  # type: ignore[arg-type]
            path = BlendPath.of(train, free)  # None: not positive definite, the closed form is kept
            del train, free
            if path is not None:  # without one there is no whitened spectrum to read coverage from
                span, spanned = span + path.coverage() * (part.stop - part.start), spanned + part.stop - part.start
            fits.append(_candidates(pair, path, held, part))
            del held, path
        if spanned:
            spans[name] = span / spanned
        results[name] = _choose(pair, fits)
        logger.info("refined %s: held-out layer error %.4f -> %.4f", name, *results[name])
    if progress is not None:
        progress("refining layers", len(pairs), len(pairs))
    return RefineResult(results, skipped, spans)


def cache_budget() -> int:
    """Bytes for each of refinement's two caches: 1/8 of the available memory, clamped to [256 MB, 4 GB]."""
    try:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not every platform reports it
        return MIN_CACHE_BYTES
    return max(MIN_CACHE_BYTES, min(MAX_CACHE_BYTES, available // 8))


def _not_refit(pair: SeparableConv) -> str | None:
    """Why :func:`refine_pairs` leaves ``pair``'s closed form (None when it refits it)."""
    if (why := refit_unsupported(pair)) is not None:
        return why
    if gram_bytes(pair) // regression_count(pair) > GRAM_BYTES:  # a part holds at least one regression
        return f"one of its regressions would need more than {GRAM_BYTES / 2**20:g} MB of Gram matrix"
    return None


def _parts(pair: SeparableConv) -> list[slice]:
    """The pair's regressions in parts whose Gram matrices take at most :data:`PART_BYTES` each."""
    count = regression_count(pair)
    per = max(1, PART_BYTES // max(1, gram_bytes(pair) // count))
    return [slice(start, min(start + per, count)) for start in range(0, count, per)]


@dataclass
class _Fits:
    """One part of a layer's refit: the held-out squared error of its current weights, of the solution at each
    data-free share, and those solutions."""

    current: float
    energy: float
    errors: dict[float, float]
    solutions: dict[float, Tensor]


def _candidates(pair: SeparableConv, path: BlendPath | None, held: NormalEquations, part: slice) -> _Fits:
    """The solution at every data-free share of one part of the pair's regressions, scored on held-out data."""
    assert held.yy is not None
    current = current_weights(pair)[part].to(held.yy.device)
    fits = _Fits(max(held.error(current), 0.0), float(held.yy.sum()), {}, {})
    if path is None:
        return fits
    for share in DATA_FREE_SHARES:
        w = path.solve(share)
        if bool(w.isfinite().all()):
            fits.errors[share] = max(held.error(w), 0.0)
            fits.solutions[share] = w
    return fits


def _choose(pair: SeparableConv, parts: Sequence[_Fits]) -> tuple[float, float]:
    """Keep the data-free share best on held-out data over the whole layer, if it beats the current weights.

    Returns the held-out relative layer error before and after.
    """
    energy = sum(p.energy for p in parts) or 1.0
    before = sum(p.current for p in parts) / energy
    solved = [key for key in parts[0].errors if all(key in p.errors for p in parts)]  # in share order
    scores = {key: sum(p.errors[key] for p in parts) / energy for key in solved}
    best = min(scores, key=scores.__getitem__, default=None)  # the first of equals, as before parts
    if best is None or scores[best] >= before:
        return before**0.5, before**0.5
    w = torch.cat([p.solutions[best] for p in parts])
    set_weights(pair, w.to(pair.conv_dw.weight.dtype))
    return before**0.5, scores[best] ** 0.5


def refined_errors(
    conv: ConvLayer,
    x: Tensor,
    order: str,
    ranks: Sequence[int],
    ridge: float = 1e-6,
    factorization: Factorization | None = None,
    pairs: Mapping[int, SeparableConv] | None = None,
    y: Tensor | None = None,
) -> dict[int, float]:
    """Relative output error of the pair after a local refit of its last factor, for each rank.

    Inputs ``x`` and targets ``conv(x)`` both come from the original model, so
    this predicts what :func:`refine_pairs` can reach at each rank. For the
    depth-multiplier orders the first factors are nested across ranks (the
    top-r singular vectors), so one Gram matrix at the largest rank serves all
    of them (pass the weight's ``factorization`` in ``order`` if it is already
    computed); pw-dw-pw bottlenecks are refit one by one (pass ``pairs`` by
    rank if they are built). Ranks whose Gram matrices would exceed
    :data:`GRAM_BYTES`, and pairs the refit does not support
    (:func:`refit_unsupported`), are left out.
    ``y`` is the conv's output on ``x`` when the caller has it already.
    """
    y = conv_output(conv, x) if y is None else y
    if order == "pw-dw-pw":
        built = pairs or {r: SeparableConv.from_conv(conv, r, order) for r in ranks}
        found = {r: _refit_error(x, y, built[r].to(dtype=x.dtype), ridge) for r in ranks}
        return {r: e for r, e in found.items() if e is not None}
    return _nested_refined_errors(conv, x, y, order, ranks, ridge, factorization)


def _refit_error(x: Tensor, y: Tensor, pair: SeparableConv, ridge: float) -> float | None:
    """The relative output error of ``pair`` after the ridge refit of its last factor on ``x`` (targets ``y``)."""
    if gram_bytes(pair) > GRAM_BYTES:
        return None
    residual = total = 0.0
    for part in _parts(pair):
        with torch.no_grad():
            normal = NormalEquations()
            add_to_normals(normal, pair, x, y, part)
        assert normal.yy is not None
        if (energy := float(normal.yy.sum())) <= 0:
            continue
        w = solve_ridge(normal, ridge, pair.last.bias is not None)
        if w is None:
            return None
        residual, total = residual + max(normal.error(w), 0.0), total + energy
    return (residual / total) ** 0.5 if total > 0 else 0.0


def _nested_refined_errors(
    conv: ConvLayer,
    x: Tensor,
    y: Tensor,
    order: str,
    ranks: Sequence[int],
    ridge: float,
    factorization: Factorization | None,
) -> dict[int, float]:
    """:func:`refined_errors` for dw-pw and pw-dw: one Gram matrix at the largest rank, sub-blocks for the others
    (a part of the regressions at a time, as :func:`refine_pairs` solves them, and summed)."""
    top = max(ranks)
    pair = SeparableConv.from_conv(conv, top, order, factorization=factorization).to(dtype=x.dtype)
    top = pair.rank
    if refit_unsupported(pair) is not None or gram_bytes(pair) > GRAM_BYTES:
        return {}
    has_bias = conv.bias is not None
    residuals = dict.fromkeys(sorted({min(k, top) for k in ranks}), 0.0)
    total = 0.0
    for part in _parts(pair):
        with torch.no_grad():
            normal = NormalEquations()
            add_to_normals(normal, pair, x, y, part)
        assert normal.yy is not None
        total += float(normal.yy.sum())
        found = _prefix_residuals(normal, order, top, list(residuals), ridge, has_bias)
        if found is None:  # not positive definite as a whole: solve rank by rank, skipping the ranks that fail
            found = _residuals_one_by_one(normal, order, top, list(residuals), ridge, has_bias)
        residuals = {r: value + found[r] for r, value in residuals.items() if r in found}
    if total <= 0:
        return dict.fromkeys(ranks, 0.0)
    return {k: (residuals[min(k, top)] / total) ** 0.5 for k in ranks if min(k, top) in residuals}


def _rank_features(order: str, top: int, per_channel: int, r: int) -> list[int]:
    """The features of the rank-``r`` regression within the rank-``top`` one (bias aside)."""
    if order == "dw-pw":  # feature i*R + k for input channel i, rank component k
        return [i * top + k for i in range(per_channel) for k in range(r)]
    return list(range(r * per_channel))  # pw-dw: feature k*K + t for rank component k, kernel tap t


def _prefix_residuals(
    normal: NormalEquations, order: str, top: int, ranks: Sequence[int], ridge: float, has_bias: bool
) -> dict[int, float] | None:
    """Every rank's squared refit residual from one Cholesky factorisation; None if the matrix is not positive
    definite.

    The features are put in rank-major order with the bias first, so that each
    rank's regression is a leading block of the largest one. The Cholesky
    factor of a leading block is the leading block of the factor, so one
    factorisation and one forward substitution ``z = L^-1 c`` serve every
    rank: the regularised least-squares objective at its minimum is
    ``||y||^2 - ||z[:m]||^2`` for the first ``m`` features. (That is the
    residual plus the tiny ridge penalty; the ridge is relative to the whole
    Gram matrix's mean diagonal.)
    """
    assert normal.gram is not None and normal.cross is not None and normal.yy is not None
    n_feat = normal.gram.shape[-1] - (1 if has_bias else 0)
    per_channel = n_feat // top
    if order == "dw-pw":  # rank-major: every channel's component 0, then every channel's component 1, ...
        features = [i * top + k for k in range(top) for i in range(per_channel)]
    else:  # pw-dw features are rank-major already
        features = list(range(n_feat))
    perm = torch.tensor(([n_feat] if has_bias else []) + features, device=normal.gram.device)
    gram = normal.gram[:, perm][:, :, perm]
    cross = normal.cross[:, perm]
    factor = ridge_cholesky(gram, ridge, 0 if has_bias else None)  # the bias, first here, is never shrunk
    if factor is None:
        return None
    z = torch.linalg.solve_triangular(factor, cross, upper=False)  # (B, n, o)
    explained = z.square().sum(-1).sum(0).cumsum(0)  # over regressions and outputs, by leading block size
    total = float(normal.yy.sum())
    bias = 1 if has_bias else 0
    return {r: max(total - float(explained[bias + r * per_channel - 1]), 0.0) for r in ranks}


def _residuals_one_by_one(
    normal: NormalEquations, order: str, top: int, ranks: Sequence[int], ridge: float, has_bias: bool
) -> dict[int, float]:
    """Each rank's squared refit residual from its own sub-block (the fallback of :func:`_prefix_residuals`)."""
    assert normal.gram is not None and normal.cross is not None and normal.yy is not None
    n_feat = normal.gram.shape[-1] - (1 if has_bias else 0)
    per_channel = n_feat // top
    errors = {}
    for r in ranks:
        index = torch.tensor(_rank_features(order, top, per_channel, r) + ([n_feat] if has_bias else []))
        sub = NormalEquations()
        sub.gram = normal.gram[:, index][:, :, index]
        sub.cross = normal.cross[:, index]
        sub.yy = normal.yy
        w = solve_ridge(sub, ridge, has_bias)
        if w is not None:
            errors[r] = max(sub.error(w), 0.0)
    return errors
