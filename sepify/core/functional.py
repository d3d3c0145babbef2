"""A conv's forward with another weight or bias, through public torch functions only.

``nn.Conv2d`` pads for ``padding_mode != "zeros"`` (and ``padding="same"``)
itself before calling ``F.conv2d``; :func:`conv2d_like` does exactly the same,
so the separable pair, the audit and the refinement can run a conv's geometry
with factor weights without touching torch's private ``_conv_forward``, and
without running the module's hooks.
"""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["conv2d_like", "pad_amounts", "SameConv2d", "same_pad_amounts"]


def pad_amounts(conv: nn.Conv2d) -> list[int]:
    """``F.pad`` amounts ``[left, right, top, bottom]`` equivalent to the conv's padding.

    >>> pad_amounts(nn.Conv2d(1, 1, 3, padding=(1, 2)))
    [2, 2, 1, 1]
    >>> pad_amounts(nn.Conv2d(1, 1, (2, 4), padding="same"))
    [1, 2, 0, 1]
    """
    amounts: list[int] = []
    for k, d, p in reversed(list(zip(conv.kernel_size, conv.dilation, _padding_tuple(conv)))):
        if p is None:  # "same": torch puts the odd extra pixel on the right/bottom
            total = d * (k - 1)
            amounts += [total // 2, total - total // 2]
        else:
            amounts += [p, p]
    return amounts


def _padding_tuple(conv: nn.Conv2d) -> tuple[int | None, ...]:
    if conv.padding == "same":
        return (None,) * len(conv.kernel_size)
    if conv.padding == "valid":
        return (0,) * len(conv.kernel_size)
    return tuple(int(p) for p in conv.padding)


class SameConv2d(nn.Conv2d):
    """A ``Conv2d`` with TensorFlow's dynamic "SAME" padding, as timm's ``Conv2dSame``: the input is padded so
    that the output is ``ceil(input / stride)``, the odd pixel on the right and bottom. ``padding`` is 0.

    Examples:
        >>> import torch
        >>> conv = SameConv2d(3, 8, 3, stride=2)
        >>> conv(torch.randn(1, 3, 15, 16)).shape
        torch.Size([1, 8, 8, 8])
    """

    def forward(self, x: Tensor) -> Tensor:
        return conv2d_like(self, x, self.weight, self.bias)


def same_pad_amounts(conv: nn.Conv2d, x: Tensor) -> list[int]:
    """``F.pad`` amounts ``[left, right, top, bottom]`` of TensorFlow's "SAME" padding for ``x``."""
    amounts: list[int] = []
    for size, k, s, d in reversed(list(zip(x.shape[-2:], conv.kernel_size, conv.stride, conv.dilation))):
        total = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
        amounts += [total // 2, total - total // 2]
    return amounts


def conv2d_like(conv: nn.Conv2d, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``conv``'s forward on ``x`` with ``weight`` and ``bias``; groups follow from their channel counts."""
    groups = x.shape[1] // weight.shape[1]
    if isinstance(conv, SameConv2d):
        return F.conv2d(F.pad(x, same_pad_amounts(conv, x)), weight, bias, conv.stride, 0, conv.dilation, groups)
    if conv.padding_mode != "zeros":
        padded = F.pad(x, pad_amounts(conv), mode=conv.padding_mode)
        return F.conv2d(padded, weight, bias, conv.stride, 0, conv.dilation, groups)
    return F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, groups)
