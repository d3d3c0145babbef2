"""Compare a converted model's outputs with the original's."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from sepify.graph.probe import float_leaves

__all__ = ["output_error", "output_errors", "worst_output_error", "top1_agreement", "heldout_fidelity"]


def _error_energy(reference: Any, converted: Any) -> tuple[float, float] | None:
    """``(||y_converted - y||^2, ||y||^2)`` over all floating tensors, or None if the outputs do not line up."""
    ref, out = float_leaves(reference), float_leaves(converted)
    if not ref or len(ref) != len(out) or any(a.shape != b.shape for a, b in zip(ref, out)):
        return None
    num = sum(float((b.double() - a.double()).square().sum()) for a, b in zip(ref, out))
    den = sum(float(a.double().square().sum()) for a in ref)
    return num, den


def output_error(reference: Any, converted: Any) -> float | None:
    """``||y_converted - y|| / ||y||`` over all floating tensors of the outputs.

    Outputs may be nested (tuples, lists, dicts). Returns None when the two
    outputs do not line up (different structure or shapes, as when a detector
    finds a different number of boxes) or the reference is all zeros.
    """
    energy = _error_energy(reference, converted)
    if energy is None:
        return None
    num, den = energy
    if den == 0.0 or not math.isfinite(num):
        return None if den == 0.0 else math.inf
    return math.sqrt(num / den)


def output_errors(reference: Any, converted: Any) -> tuple[list[float | None], str | None]:
    """``||y_i' - y_i|| / ||y_i||`` for each floating output tensor, and why the comparison is undefined if it is.

    Per output, so that a model whose outputs differ in scale (a detector's class scores beside its box
    coordinates) cannot hide a large change in a small output. An all-zero reference output has no relative
    error (None); the reason is the second element when no output could be compared.

    >>> import torch
    >>> y = (torch.ones(2, 3), torch.zeros(4))
    >>> errors, why = output_errors(y, (torch.ones(2, 3) * 1.5, torch.zeros(4)))
    >>> errors, why
    ([0.5, None], None)
    >>> output_errors(y, (torch.ones(2, 3),))
    ([], 'the outputs do not line up (2 floating tensors in the original, 1 in the converted model)')
    """
    ref, out = float_leaves(reference), float_leaves(converted)
    if not ref:
        return [], "the original model has no floating-point output to compare"
    if len(ref) != len(out):
        return [], (
            f"the outputs do not line up ({len(ref)} floating tensors in the original, {len(out)} in the converted "
            "model)"
        )
    if any(a.shape != b.shape for a, b in zip(ref, out)):
        shapes = next((tuple(a.shape), tuple(b.shape)) for a, b in zip(ref, out) if a.shape != b.shape)
        return [], f"the outputs do not line up (shapes {shapes[0]} and {shapes[1]}; e.g. a detector's box counts)"
    errors: list[float | None] = []
    for a, b in zip(ref, out):
        den = float(a.double().square().sum())
        num = float((b.double() - a.double()).square().sum())
        errors.append(None if den == 0.0 else (math.sqrt(num / den) if math.isfinite(num) else math.inf))
    if all(e is None for e in errors):
        return errors, "the original model's outputs on the example inputs are all zeros"
    return errors, None


def worst_output_error(reference: Any, converted: Any) -> float | None:
    """The largest of :func:`output_errors` (None when none is defined): what a report's ``output_error`` is.

    >>> import torch
    >>> worst_output_error((torch.ones(3), torch.full((3,), 100.0)), (torch.ones(3) * 2, torch.full((3,), 100.0)))
    1.0
    """
    errors, _ = output_errors(reference, converted)
    defined = [e for e in errors if e is not None]
    return max(defined) if defined else None


def top1_agreement(reference: Any, converted: Any) -> float | None:
    """Share of rows whose argmax agrees, when both outputs are 2-D logits ``(N, C>1)``."""
    if not (isinstance(reference, Tensor) and isinstance(converted, Tensor)):
        return None
    if reference.dim() != 2 or reference.shape[1] < 2 or reference.shape != converted.shape:
        return None
    if not reference.is_floating_point():
        return None
    return float((reference.argmax(1) == converted.argmax(1)).to(torch.float64).mean())


def heldout_fidelity(
    references: Sequence[Any],
    student: torch.nn.Module,
    batches: Sequence[Any],
    forward: Callable[[torch.nn.Module, tuple[Any, ...]], Any] | None = None,
) -> tuple[float | None, float | None]:
    """Output error and top-1 agreement of ``student`` over all ``batches`` against the original's outputs on
    them, ``references`` (computed once by the caller: the original does not change between stages; no grad).
    ``forward(model, args)`` gives what is compared (default: the model's outputs)."""
    num = den = 0.0
    agree = rows = 0
    comparable = True
    with torch.no_grad():
        for ref, args in zip(references, batches, strict=True):
            out = forward(student, args) if forward is not None else student(*args)
            energy = _error_energy(ref, out)
            if energy is None:
                comparable = False
                continue
            num += energy[0]
            den += energy[1]
            t1 = top1_agreement(ref, out)
            if t1 is not None:
                agree += round(t1 * ref.shape[0])
                rows += ref.shape[0]
    error = math.sqrt(num / den) if comparable and den > 0 else None
    return error, (agree / rows if rows else None)
