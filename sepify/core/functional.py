"""A conv's forward with another weight or bias, through public torch functions only.

Six module classes are convolutions sepify separates: ``nn.Conv1d/2d/3d`` and
``nn.ConvTranspose1d/2d/3d`` (:data:`CONV_TYPES`). ``nn.ConvNd`` pads for
``padding_mode != "zeros"`` (and ``padding="same"``) itself before calling
``F.convNd``; :func:`conv_like` does exactly the same, so the separable pair,
the audit and the refinement can run any conv's geometry with factor weights
without touching torch's private ``_conv_forward``, and without running the
module's hooks.

All factorisation code works on one **canonical** weight layout,
``(Cout, Cin/g, *kernel)``: a conv's own weight, and a transposed conv's
``(Cin, Cout/g, *kernel)`` weight regrouped (:func:`canonical_weight`). Both
compute ``y_o = sum_i W[o, i] (*) x_i`` with a kernel that enters linearly, so
a factorisation of the canonical weight is a factorisation of either layer.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.conv import _ConvNd

__all__ = [
    "ConvLayer",
    "CONV_TYPES",
    "TRANSPOSED_TYPES",
    "conv_like",
    "pointwise",
    "kind_of",
    "is_transposed",
    "canonical_weight",
    "layer_weight",
    "pad_amounts",
    "SameConv2d",
    "same_pad_amounts",
]

# The common base of torch's conv classes, for type hints only (its attributes are typed: in_channels, kernel_size,
# stride, padding, groups, weight, bias...); which modules sepify separates is decided by CONV_TYPES.
ConvLayer = _ConvNd

TRANSPOSED_TYPES: tuple[type[ConvLayer], ...] = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
CONV_TYPES: tuple[type[ConvLayer], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d, *TRANSPOSED_TYPES)

_CONV: dict[int, Callable[..., Tensor]] = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_T: dict[int, Callable[..., Tensor]] = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


def is_transposed(conv: nn.Module) -> bool:
    """Whether ``conv`` is a transposed convolution (``nn.ConvTranspose1d/2d/3d`` or a subclass)."""
    return isinstance(conv, TRANSPOSED_TYPES)


def kind_of(conv: ConvLayer) -> str:
    """The report's name for a conv's kind: ``conv1d`` ... ``conv3d``, ``conv_transpose1d`` ... ``conv_transpose3d``.

    >>> kind_of(nn.Conv1d(1, 1, 3)), kind_of(nn.ConvTranspose3d(1, 1, 3))
    ('conv1d', 'conv_transpose3d')
    """
    dims = len(conv.kernel_size)
    return f"conv_transpose{dims}d" if is_transposed(conv) else f"conv{dims}d"


def canonical_weight(weight: Tensor, transposed: bool, groups: int) -> Tensor:
    """A conv weight in the canonical ``(Cout, Cin/g, *kernel)`` layout (a view for non-transposed convs).

    A transposed conv's weight is ``(Cin, Cout/g, *kernel)``; its group ``j``
    maps input channels ``j*Cin/g ...`` to output channels ``j*Cout/g ...``.

    >>> import torch
    >>> canonical_weight(torch.zeros(6, 4, 3), transposed=True, groups=2).shape
    torch.Size([8, 3, 3])
    """
    return _swap_channel_axes(weight, groups) if transposed else weight


def layer_weight(canonical: Tensor, transposed: bool, groups: int) -> Tensor:
    """The inverse of :func:`canonical_weight`: a canonical weight in the layer's own layout."""
    return _swap_channel_axes(canonical, groups) if transposed else canonical


def _swap_channel_axes(weight: Tensor, groups: int) -> Tensor:
    """``(g*A, B, *kernel)`` -> ``(g*B, A, *kernel)``, swapping the two channel axes within each group (its own
    inverse: the move between a transposed conv's layout and the canonical one, in either direction)."""
    a, b = weight.shape[0] // groups, weight.shape[1]
    kernel = weight.shape[2:]
    return weight.reshape(groups, a, b, *kernel).transpose(1, 2).reshape(groups * b, a, *kernel)


def pad_amounts(conv: ConvLayer) -> list[int]:
    """``F.pad`` amounts (last dimension first, e.g. ``[left, right, top, bottom]``) equivalent to the conv's padding.

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


def _padding_tuple(conv: ConvLayer) -> tuple[int | None, ...]:
    dims = len(conv.kernel_size)
    if conv.padding == "same":
        return (None,) * dims
    if conv.padding == "valid":
        return (0,) * dims
    return tuple(int(p) for p in conv.padding)


class SameConv2d(nn.Conv2d):
    """A ``Conv2d`` that zero-pads its input before convolving (``padding`` is then 0): by TensorFlow's dynamic
    "SAME" amounts, as timm's ``Conv2dSame`` (the output is ``ceil(input / stride)``, the odd pixel on the right
    and bottom), or, when ``static_pad`` is set, by those fixed ``[left, right, top, bottom]`` amounts, as
    segmentation_models_pytorch's ``Conv2dStaticSamePadding`` (SAME amounts computed once for one image size).

    Examples:
        >>> import torch
        >>> conv = SameConv2d(3, 8, 3, stride=2)
        >>> conv(torch.randn(1, 3, 15, 16)).shape
        torch.Size([1, 8, 8, 8])
        >>> conv.static_pad = (0, 1, 0, 1)
        >>> conv(torch.randn(1, 3, 15, 16)).shape
        torch.Size([1, 8, 7, 8])
    """

    static_pad: tuple[int, ...] | None = None

    def forward(self, x: Tensor) -> Tensor:
        return conv_like(self, x, self.weight, self.bias)

    def extra_repr(self) -> str:
        pad = f", static_pad={self.static_pad}" if self.static_pad is not None else ", padding=SAME"
        return str(super().extra_repr()) + pad  # type: ignore[no-untyped-call]


def same_pad_amounts(conv: nn.Conv2d, input_size: Sequence[int]) -> list[int]:
    """``F.pad`` amounts ``[left, right, top, bottom]`` of TensorFlow's "SAME" padding for ``input_size`` (H, W),
    or a :class:`SameConv2d`'s fixed ``static_pad``.

    >>> same_pad_amounts(nn.Conv2d(1, 1, 3, stride=2), (15, 16))
    [0, 1, 1, 1]
    """
    static = getattr(conv, "static_pad", None)
    if static is not None:
        return list(static)
    amounts: list[int] = []
    for size, k, s, d in reversed(list(zip(input_size[-2:], conv.kernel_size, conv.stride, conv.dilation))):
        total = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
        amounts += [total // 2, total - total // 2]
    return amounts


def conv_like(
    conv: ConvLayer,
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    *,
    groups: int | None = None,
    output_size: list[int] | None = None,
) -> Tensor:
    """``conv``'s forward on ``x`` with ``weight`` and ``bias`` (in ``conv``'s own layout).

    ``groups`` defaults to what the channel counts imply for a conv
    (``x.shape[1] // weight.shape[1]``) and to ``conv.groups`` for a
    transposed conv, whose weight does not say. ``output_size`` is a
    transposed conv's optional forward argument.

    >>> import torch
    >>> conv = nn.ConvTranspose1d(4, 6, 3, stride=2, output_padding=1)
    >>> x = torch.randn(2, 4, 5)
    >>> torch.equal(conv_like(conv, x, conv.weight, conv.bias), conv(x))
    True
    """
    dims = len(conv.kernel_size)
    if is_transposed(conv):
        g = conv.groups if groups is None else groups
        output_padding = conv.output_padding if output_size is None else _output_padding(conv, x, output_size)
        return _CONV_T[dims](x, weight, bias, conv.stride, conv.padding, output_padding, g, conv.dilation)
    g = x.shape[1] // weight.shape[1] if groups is None else groups
    fn = _CONV[dims]
    if isinstance(conv, SameConv2d):
        return fn(F.pad(x, same_pad_amounts(conv, x.shape[-2:])), weight, bias, conv.stride, 0, conv.dilation, g)
    if conv.padding_mode != "zeros":
        padded = F.pad(x, pad_amounts(conv), mode=conv.padding_mode)
        return fn(padded, weight, bias, conv.stride, 0, conv.dilation, g)
    return fn(x, weight, bias, conv.stride, conv.padding, conv.dilation, g)


def _output_padding(conv: ConvLayer, x: Tensor, output_size: list[int]) -> tuple[int, ...]:
    """The output padding that makes a transposed conv produce ``output_size`` (its last dims are the spatial ones)."""
    dims = len(conv.kernel_size)
    wanted = list(output_size)[-dims:]
    amounts = []
    for d in range(dims):
        smallest = (
            (x.shape[-dims + d] - 1) * conv.stride[d]
            - 2 * int(conv.padding[d])  # a transposed conv's padding is always a tuple of ints
            + conv.dilation[d] * (conv.kernel_size[d] - 1)
            + 1
        )
        extra = int(wanted[d]) - smallest
        if not 0 <= extra < max(conv.stride[d], conv.dilation[d]):
            raise ValueError(f"requested an output size of {wanted}, which this transposed conv cannot produce")
        amounts.append(extra)
    return tuple(amounts)


def pointwise(x: Tensor, weight: Tensor, bias: Tensor | None = None, groups: int = 1) -> Tensor:
    """A 1x1 (1, 1x1x1) conv of ``x`` with ``weight`` ``(Cout, Cin/g, 1, ...)``, for any spatial dimensionality."""
    return _CONV[weight.dim() - 2](x, weight, bias, 1, 0, 1, groups)
