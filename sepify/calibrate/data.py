"""Unlabelled calibration data: normalising what users pass into batches of model arguments."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from sepify.errors import CalibrationError

__all__ = ["CalibrationData", "calibration_batches"]

_DEFAULT_BATCH = 32


@dataclass(frozen=True)
class CalibrationData:
    """Batches (each a tuple of model arguments) for fitting, and held-out ones for judging."""

    fit: tuple[tuple[Any, ...], ...]
    heldout: tuple[tuple[Any, ...], ...]

    @property
    def samples(self) -> int:
        return sum(_batch_size(b) for b in self.fit + self.heldout)


def _batch_size(args: tuple[Any, ...]) -> int:
    first = args[0]
    return int(first.shape[0]) if isinstance(first, Tensor) and first.dim() > 0 else 1


def _as_args(item: Any, n_args: int) -> tuple[Any, ...]:
    if isinstance(item, Tensor):
        return (item,)
    if isinstance(item, (tuple, list)) and item and all(isinstance(t, Tensor) for t in item[:n_args]):
        # A labelled loader yields (inputs, labels): keep only the model's arguments.
        return tuple(item[:n_args])
    raise CalibrationError(
        f"calibration batches must be tensors or tuples of tensors, got {type(item).__name__}; "
        "pass a tensor (N x ...), a DataLoader, or a list of batches"
    )


def _slice(args: tuple[Any, ...], start: int, stop: int) -> tuple[Any, ...]:
    return tuple(a[start:stop] for a in args)


def calibration_batches(
    calibration: Any,
    *,
    n_args: int = 1,
    limit: int | None = None,
    heldout_fraction: float = 0.2,
    device: torch.device | None = None,
) -> CalibrationData:
    """Turn ``calibration`` into fit and held-out batches.

    Args:
        calibration: a tensor ``(N, ...)`` (cut into batches of 32), an
            iterable of tensors or tuples (a DataLoader; labels after the
            model's ``n_args`` arguments are dropped), or a callable returning
            either.
        n_args: how many positional arguments the model takes.
        limit: use at most this many samples.
        heldout_fraction: share of samples kept back to judge refinement and
            distillation (at least one sample when there are two or more).
        device: move batches here.

    Raises:
        CalibrationError: empty or malformed calibration data.
    """
    batches = _take(_items(calibration, limit), n_args, limit, device)
    count = sum(_batch_size(b) for b in batches)
    if count < 2 or heldout_fraction <= 0:
        return CalibrationData(tuple(batches), tuple(batches))  # too little to split: judge on the fit data
    return _split_tail(batches, count, max(1, round(count * heldout_fraction)))


def _items(calibration: Any, limit: int | None) -> Iterable[Any]:
    """What the user passed, as an iterable of batches (a tensor is cut into batches of 32)."""
    if callable(calibration) and not isinstance(calibration, Tensor):
        calibration = calibration()
    if isinstance(calibration, Tensor):
        if calibration.dim() == 0 or calibration.shape[0] == 0:
            raise CalibrationError("calibration is an empty tensor; pass N >= 1 samples stacked along dim 0")
        data = calibration[:limit] if limit is not None else calibration
        return [data[i : i + _DEFAULT_BATCH] for i in range(0, data.shape[0], _DEFAULT_BATCH)]
    if isinstance(calibration, Iterable):
        return calibration
    raise CalibrationError(
        f"calibration must be a tensor, an iterable of batches or a callable, got {type(calibration).__name__}"
    )


def _take(items: Iterable[Any], n_args: int, limit: int | None, device: torch.device | None) -> list[tuple[Any, ...]]:
    """Batches of model arguments, at most ``limit`` samples in all, on ``device``."""
    batches: list[tuple[Any, ...]] = []
    count = 0
    for item in items:
        args = _as_args(item, n_args)
        size = _batch_size(args)
        if limit is not None and count + size > limit:
            args = _slice(args, 0, limit - count)
            size = limit - count
        if size <= 0:
            break
        batches.append(tuple(a.to(device) if device is not None else a for a in args))
        count += size
        if limit is not None and count >= limit:
            break
    if not batches:
        raise CalibrationError("calibration data is empty; pass at least one batch")
    return batches


def _split_tail(batches: list[tuple[Any, ...]], count: int, keep: int) -> CalibrationData:
    """The last ``keep`` samples are held out, splitting a batch if needed."""
    fit: list[tuple[Any, ...]] = []
    heldout: list[tuple[Any, ...]] = []
    remaining = count - keep
    for args in batches:
        size = _batch_size(args)
        if remaining >= size:
            fit.append(args)
            remaining -= size
        elif remaining > 0:
            fit.append(_slice(args, 0, remaining))
            heldout.append(_slice(args, remaining, size))
            remaining = 0
        else:
            heldout.append(args)
    return CalibrationData(tuple(fit), tuple(heldout))
