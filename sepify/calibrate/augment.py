"""Rescaled copies of calibration samples: inputs a little outside the ones the user recorded.

A user's calibration set is a few recordings or photos cut into many similar
samples: one band of pitches, one scale of objects. A refit judged only on
them may extrapolate badly just outside it (crepe-tiny calibrated on tones
that stopped at 818 Hz lost 2-5 points of pitch accuracy on test tones up to
1 kHz, although the held-out frames approved the refit). So every fit and
held-out sample gets one copy resampled along its spatial axes by a factor
between 2^-0.5 and 2^0.5: a recording sped up or slowed down by up to half an
octave (its pitch moves with it), a photo zoomed in (centre crop) or out
(reflected border). Copies of held-out samples are held out, so the checks
judge on the wider range too.

The spatial axes are those after the channel axis of ``(N, C, *spatial)``
(1 to 3 of them), or the last axis of a ``(N, L)`` signal. Only a model with
a single floating-point tensor argument gets copies: which axes of several
arguments belong together cannot be told from their shapes.

>>> import torch
>>> x = torch.randn(4, 3, 16, 16)
>>> copies = rescaled_copies(((x,),))
>>> copies[0][0].shape
torch.Size([4, 3, 16, 16])
>>> rescaled_copies(((x, torch.randn(4, 7)),))  # two arguments: none
()
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["OCTAVES", "rescaled", "rescaled_copies", "augmentable"]

OCTAVES = 0.5  # copies are rescaled by 2^u, u uniform in [-OCTAVES, OCTAVES]


def augmentable(args: tuple[Any, ...]) -> bool:
    """Whether samples of these model arguments get rescaled copies (one float tensor with 1-3 spatial axes)."""
    return len(args) == 1 and isinstance(args[0], Tensor) and args[0].is_floating_point() and 2 <= args[0].dim() <= 5


def rescaled(x: Tensor, factor: float) -> Tensor:
    """``x`` (one or more samples) with its content shrunk by ``factor`` along every spatial axis, same shape.

    ``factor > 1`` shrinks the content (a recording sped up, a photo zoomed out) and fills the border by
    reflection; ``factor < 1`` enlarges it and keeps the centre.

    >>> t = torch.arange(64.0) / 64
    >>> wave = torch.sin(2 * torch.pi * 8 * t)[None]  # 8 periods
    >>> slower = rescaled(wave, 0.5)  # the middle half, stretched: 4 periods
    >>> int(torch.fft.rfft(slower[0]).abs().argmax()), slower.shape
    (4, torch.Size([1, 64]))
    """
    signal = x.dim() == 2  # (N, L)
    y = x[:, None] if signal else x
    spatial = tuple(y.shape[2:])
    size = [max(1, round(n / factor)) for n in spatial]
    if len(spatial) == 3:
        y = F.interpolate(y, size=size, mode="trilinear", align_corners=False)
    else:  # 1-D as 2-D of height 1, for the antialiasing filter when shrinking
        flat = y[..., None, :] if len(spatial) == 1 else y
        flat = F.interpolate(flat, size=[1, *size] if len(spatial) == 1 else size, mode="bilinear",
                             align_corners=False, antialias=factor > 1)  # fmt: skip
        y = flat[..., 0, :] if len(spatial) == 1 else flat
    crop = tuple(slice((m - n) // 2, (m - n) // 2 + n) if m > n else slice(None) for m, n in zip(size, spatial))
    y = y[(Ellipsis,) + crop]
    pad: list[int] = []
    narrow = True  # reflection needs a border narrower than what it reflects (2^0.5 leaves 0.15 of a side to fill)
    for m, n in zip(reversed(size), reversed(spatial)):  # F.pad lists the last axis first
        short = max(0, n - m)
        pad += [short // 2, short - short // 2]
        narrow = narrow and short - short // 2 < m
    if any(pad):
        y = F.pad(y, pad, mode="reflect" if narrow else "replicate")
    return y[:, 0] if signal else y


def rescaled_copies(batches: tuple[tuple[Any, ...], ...], seed: int = 0) -> tuple[tuple[Tensor], ...]:
    """One rescaled copy of every sample of ``batches`` (batches of one model argument), batched alike.

    The factors come from ``seed`` in the order of the samples, so the same batches give the same copies.
    Returns ``()`` when the batches are not :func:`augmentable`.
    """
    if not batches or not all(augmentable(args) for args in batches):
        return ()
    generator = torch.Generator().manual_seed(seed)
    copies = []
    for (x,) in batches:
        octaves = torch.empty(len(x), dtype=torch.float64).uniform_(-OCTAVES, OCTAVES, generator=generator)
        copies.append((torch.cat([rescaled(x[i : i + 1], 2.0 ** float(u)) for i, u in enumerate(octaves)]),))
    return tuple(copies)
