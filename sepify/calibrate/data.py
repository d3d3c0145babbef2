"""Unlabelled calibration data: normalising what users pass into batches of model arguments.

The result does not depend on the order of the samples. A user's calibration
set is often a few recordings or photos cut into many similar samples, in
recording order: a held-out tail would then hold only the last recording, and
"the first N" only the first. So every sample gets a key from its content (a
hash of its bytes); samples are put in key order, the held-out share is the
samples with the smallest keys (a pseudo-random sample across the whole set),
and a ``limit`` on a tensor keeps the samples with the smallest keys. The
same samples in any order give the same batches, bit for bit.

Near-duplicates (frames of one recording) are held out together when the
caller can tell them apart (``group_by``; convert groups samples whose
original outputs are nearly identical), so that the held-out error measures
how a layer does on recordings it was not fit on.

With ``augment``, every fit and held-out sample also gets a copy rescaled along its spatial axes
(:mod:`sepify.calibrate.augment`), appended to its own side of the split.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from sepify.calibrate.augment import rescaled_copies
from sepify.errors import CalibrationError
from sepify.io.datasets import nonfinite_samples

__all__ = ["CalibrationData", "calibration_batches", "canonical_order", "near_duplicate_groups"]

_DEFAULT_BATCH = 32

Augment = bool | str | Callable[[Tensor], Tensor]  # True, False, "auto" or a function of a batch


@dataclass(frozen=True)
class CalibrationData:
    """Batches (each a tuple of model arguments) for fitting, and held-out ones for judging.

    Augmentation appends copies to both: the last ``fit_copies`` batches of ``fit`` and the last
    ``heldout_copies`` of ``heldout`` (counted in :attr:`samples`; :attr:`copies` counts them alone).
    """

    fit: tuple[tuple[Any, ...], ...]
    heldout: tuple[tuple[Any, ...], ...]
    fit_copies: int = 0
    heldout_copies: int = 0
    sources: int | None = None  # near-duplicate groups among the samples, where they were told apart

    @property
    def few_sources(self) -> bool:
        """Whether the samples are a few sources cut into many (at most half as many near-duplicate groups as
        samples: 50 groups in crepe's 256 frames of 32 tones) rather than distinct samples (digits: 256 in 256).
        ``True`` where the groups were not told apart."""
        return self.sources is None or 2 * self.sources <= self.samples - self.copies

    @property
    def samples(self) -> int:
        return _samples(self.fit) + (0 if self.heldout is self.fit else _samples(self.heldout))

    @property
    def copies(self) -> int:
        """Samples added by augmentation."""
        added = _samples(self.fit[len(self.fit) - self.fit_copies :])
        return (
            added
            if self.heldout is self.fit
            else added + _samples(self.heldout[len(self.heldout) - self.heldout_copies :])
        )

    @property
    def given_fit(self) -> tuple[tuple[Any, ...], ...]:
        """The fit batches without the copies: what BatchNorm statistics are computed on."""
        return self.fit[: len(self.fit) - self.fit_copies]

    @property
    def given_heldout_samples(self) -> int:
        """Held-out samples of the user's own (the copies left out)."""
        return _samples(self.heldout[: len(self.heldout) - self.heldout_copies])


def _samples(batches: tuple[tuple[Any, ...], ...]) -> int:
    return sum(_batch_size(b) for b in batches)


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
    group_by: Callable[[tuple[Tensor, ...]], list[int]] | None = None,
    augment: Augment = False,
) -> CalibrationData:
    """Turn ``calibration`` into fit and held-out batches.

    Args:
        calibration: a tensor ``(N, ...)``, an iterable of tensors or tuples
            (a DataLoader; labels after the model's ``n_args`` arguments are
            dropped), or a callable returning either. Batches of 32 come out.
        n_args: how many positional arguments the model takes.
        limit: use at most this many samples: of a tensor, those with the
            smallest content keys; of an iterable, the first ones read (it is
            not read further).
        heldout_fraction: share of samples kept back to judge refinement and
            distillation (at least one sample when there are two or more),
            chosen by content key, not by position.
        device: move batches here.
        group_by: given the samples (in canonical order), a group id per
            sample; whole groups are then held out (see the module docstring).
        augment: ``True``: a rescaled copy of every sample
            (:func:`~sepify.calibrate.augment.rescaled_copies`; none for a
            model of several arguments); ``"auto"``: the same where the
            samples are a few sources cut into many
            (:attr:`CalibrationData.few_sources`; always without
            ``group_by``); a function: applied to the first argument of every
            batch, what it returns added as copies.

    Raises:
        CalibrationError: empty or malformed calibration data.
    """
    return _with_copies(_split(calibration, n_args, limit, heldout_fraction, device, group_by), augment)


def _split(
    calibration: Any,
    n_args: int,
    limit: int | None,
    heldout_fraction: float,
    device: torch.device | None,
    group_by: Callable[[tuple[Tensor, ...]], list[int]] | None,
) -> CalibrationData:
    is_tensor = isinstance(calibration, Tensor)
    parts = _take(_items(calibration, None), n_args, None if is_tensor else limit)
    if len({tuple(tuple(a.shape[1:]) for a in part) for part in parts}) > 1:
        return _by_batch(parts, heldout_fraction, device)  # sizes differ (an image pyramid): whole batches
    samples = tuple(torch.cat([part[k] for part in parts]) for k in range(len(parts[0])))
    order = canonical_order(samples)
    if limit is not None:
        order = order[:limit]
    keep = max(1, round(len(order) * heldout_fraction)) if len(order) >= 2 and heldout_fraction > 0 else 0
    if not keep:
        fit = _batched(samples, order, device)
        return CalibrationData(fit, fit)  # too little to split: judge on the fit data
    held, sources = set(range(keep)), None
    if group_by is not None:
        index = torch.tensor(order, dtype=torch.long)
        ids = group_by(tuple(a.index_select(0, index.to(a.device)) for a in samples))
        held, sources = _whole_groups(ids, keep), len(set(ids))
    fit_order = [i for p, i in enumerate(order) if p not in held]
    return CalibrationData(
        _batched(samples, fit_order, device),
        _batched(samples, [i for p, i in enumerate(order) if p in held], device),
        sources=sources,
    )


def _with_copies(data: CalibrationData, augment: Augment) -> CalibrationData:
    """``data`` with the copies ``augment`` makes of its fit and held-out batches appended to each."""
    if augment is False or (augment == "auto" and not data.few_sources):
        return data

    def copies(batches: tuple[tuple[Any, ...], ...]) -> tuple[tuple[Any, ...], ...]:
        if callable(augment):
            return tuple(_augmented(augment, args) for args in batches)
        return rescaled_copies(batches)

    fit = copies(data.fit)
    if data.heldout is data.fit:  # too little to split: judged on the fit data, copies included
        both = data.fit + fit
        return CalibrationData(both, both, len(fit), len(fit), data.sources)
    held = copies(data.heldout)
    return CalibrationData(data.fit + fit, data.heldout + held, len(fit), len(held), data.sources)


def _augmented(augment: Callable[[Tensor], Tensor], args: tuple[Any, ...]) -> tuple[Any, ...]:
    """A user's augmentation of one batch: it must return a finite tensor of the batch's shape."""
    out = augment(args[0])
    if not isinstance(out, Tensor) or out.shape != args[0].shape:
        got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise CalibrationError(
            f"the calibration augment returned {got} for a batch of shape {tuple(args[0].shape)}; "
            "it must return a tensor of the shape it was given"
        )
    _check_finite((out,), 0)
    return (out, *args[1:])


def _whole_groups(ids: list[int], keep: int) -> set[int]:
    """Positions of whole groups, taken in order of their first member, until at least ``keep`` are held out.

    Whole groups are held out only while the fit keeps at least a third of the samples: when nearly every sample
    answers alike (a random-weight net) the samples are one "group", and holding it out left one sample to fit on.
    A big group within that limit is held out whole: MTCNN's R- and O-Net captures are 57-58% background crops
    answered alike, and fitting on the other crops while judging on the background found the faces more precisely
    at every budget tried (mean IoU 0.898 / 0.933 / 0.934 at 0.3 / 0.4 / 0.5 of the MACs, against 0.882 / 0.922 /
    0.915 fitting on the background, and 0.891 / 0.927 / 0.920 holding out a fifth of it). Falls back to the first
    ``keep`` positions when whole groups cannot make up ``keep``.
    """
    members: dict[int, list[int]] = {}
    for position, group in enumerate(ids):
        members.setdefault(group, []).append(position)
    most = max(keep, len(ids) * 2 // 3)
    held: set[int] = set()
    for positions in members.values():
        if len(held) >= keep:
            break
        if len(held) + len(positions) <= most:
            held.update(positions)
    return held if len(held) >= keep else set(range(keep))


def near_duplicate_groups(vectors: Tensor, threshold: float = 0.999) -> list[int]:
    """Group ids joining rows whose cosine similarity exceeds ``threshold`` (transitively).

    >>> v = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.001], [-1.0, 0.0]])
    >>> near_duplicate_groups(v)
    [0, 1, 0, 3]
    """
    unit = vectors.double() / vectors.double().norm(dim=1, keepdim=True).clamp_min(1e-300)
    n = len(unit)
    labels = torch.arange(n)
    while True:  # each row takes the smallest label among its near-duplicates, until nothing changes
        new = labels.clone()
        for start in range(0, n, 1024):  # row blocks keep the similarity matrix small
            similar = (unit[start : start + 1024] @ unit.T) > threshold
            nearest = torch.where(similar, labels[None, :].to(similar.device), n).min(dim=1).values
            new[start : start + 1024] = torch.minimum(new[start : start + 1024], nearest.cpu())
        if torch.equal(new, labels):
            return [int(label) for label in labels]
        labels = new


def canonical_order(samples: tuple[Tensor, ...]) -> list[int]:
    """Sample indices sorted by a key computed from each sample's content alone (ties: by position).

    The same samples in another order come out in the same order:

    >>> x = torch.randn(5, 3)
    >>> perm = [3, 0, 4, 1, 2]
    >>> [perm[j] for j in canonical_order((x[perm],))] == canonical_order((x,))
    True
    """
    keys = [(_content_key(a[i] for a in samples), i) for i in range(samples[0].shape[0])]
    return [i for _, i in sorted(keys)]


def _content_key(tensors: Iterable[Tensor]) -> bytes:
    digest = hashlib.blake2b(digest_size=8)
    for t in tensors:
        digest.update(t.detach().contiguous().cpu().flatten().view(torch.uint8).numpy().tobytes())
    return digest.digest()


def _by_batch(parts: list[tuple[Tensor, ...]], heldout_fraction: float, device: torch.device | None) -> CalibrationData:
    """Batches of different sample sizes stay whole: in content-key order, the held-out share by whole batches."""
    moved = [tuple(a.to(device) if device is not None else a for a in part) for part in parts]
    ordered = [moved[i] for _, i in sorted((_content_key(part), i) for i, part in enumerate(parts))]
    keep = max(1, round(_samples(tuple(ordered)) * heldout_fraction))
    if len(ordered) < 2 or heldout_fraction <= 0:
        return CalibrationData(tuple(ordered), tuple(ordered))
    held = 0
    while held + 1 < len(ordered) and _samples(tuple(ordered[:held])) < keep:
        held += 1
    return CalibrationData(tuple(ordered[held:]), tuple(ordered[:held]))


def _batched(
    samples: tuple[Tensor, ...], indices: list[int], device: torch.device | None
) -> tuple[tuple[Any, ...], ...]:
    index = torch.tensor(indices, dtype=torch.long)
    picked = tuple(a.index_select(0, index.to(a.device)) for a in samples)
    return tuple(
        tuple(a[i : i + _DEFAULT_BATCH].to(device) if device is not None else a[i : i + _DEFAULT_BATCH] for a in picked)
        for i in range(0, len(indices), _DEFAULT_BATCH)
    )


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


def _check_finite(args: tuple[Any, ...], first_sample: int) -> None:
    """NaN or infinite samples would poison every statistic fitted on them: refuse them, naming the first."""
    for a in args:
        if isinstance(a, Tensor) and a.is_floating_point() and not bool(torch.isfinite(a).all()):
            count = int((~torch.isfinite(a)).sum())
            per_sample = nonfinite_samples(a) if a.dim() > 1 else None
            where = first_sample + int(per_sample.nonzero()[0]) if per_sample is not None else first_sample
            raise CalibrationError(
                f"calibration sample {where} holds NaN or infinite values ({count} in its batch); they would "
                "poison every statistic fitted on them, so drop or clean such samples"
            )


def _take(items: Iterable[Any], n_args: int, limit: int | None) -> list[tuple[Tensor, ...]]:
    """The model arguments of every batch read, at most ``limit`` samples in all (the iterable is read no further)."""
    parts: list[tuple[Any, ...]] = []
    count = 0
    for item in items:
        args = _as_args(item, n_args)
        size = _batch_size(args)
        if limit is not None and count + size > limit:
            args, size = _slice(args, 0, limit - count), limit - count
        if size <= 0:
            break
        _check_finite(args, count)
        parts.append(args)
        count += size
        if limit is not None and count >= limit:
            break
    if not parts:
        raise CalibrationError("calibration data is empty; pass at least one batch")
    return parts
