"""Pure integer cost arithmetic for convolutions and their separable pairs.

One MAC is one multiply-add; bias additions are not counted (the fvcore and
ptflops convention). Parameter counts include the bias. Callers pass the
spatial sizes, so nothing here needs a tensor or a module.

Transposed convs follow fvcore's (and ``torch.utils.flop_counter``'s) rule:
every *input* pixel multiplies the whole kernel, so their MACs scale with the
input's spatial size, not the output's. The depthwise child of a transposed
pair is itself a transposed conv and is counted the same way.
"""

from __future__ import annotations

from math import prod

from sepify.errors import ConfigError
from sepify.vocab import ORDERS  # dw-pw, pw-dw (rank: depth multiplier), pw-dw-pw (rank: bottleneck width)

__all__ = [
    "ORDERS",
    "conv_params",
    "conv_macs",
    "separable_params",
    "separable_macs",
    "exact_rank",
    "ratio",
    "cp_ranks",
]


def conv_params(in_channels: int, out_channels: int, kernel_size: tuple[int, ...], groups: int, bias: bool) -> int:
    """Parameters of a dense (possibly grouped) convolution, bias included.

    >>> conv_params(64, 128, (3, 3), groups=1, bias=False)
    73728
    """
    return out_channels * (in_channels // groups) * prod(kernel_size) + (out_channels if bias else 0)


def conv_macs(
    in_channels: int,
    out_channels: int,
    kernel_size: tuple[int, ...],
    groups: int,
    output_size: tuple[int, ...],
    batch: int = 1,
    *,
    transposed: bool = False,
    input_size: tuple[int, ...] | None = None,
) -> int:
    """MACs of a convolution producing ``output_size`` (spatial dims) for ``batch`` inputs.

    A transposed conv is counted at its ``input_size`` (see the module docstring).

    >>> conv_macs(64, 128, (3, 3), groups=1, output_size=(56, 56))
    231211008
    >>> conv_macs(64, 32, (4, 4), groups=1, output_size=(56, 56), transposed=True, input_size=(28, 28))
    25690112
    """
    pixels = prod(_size_counted(output_size, transposed, input_size))
    return batch * pixels * out_channels * (in_channels // groups) * prod(kernel_size)


def _size_counted(
    output_size: tuple[int, ...], transposed: bool, input_size: tuple[int, ...] | None
) -> tuple[int, ...]:
    if not transposed:
        return output_size
    if input_size is None:
        raise ConfigError("a transposed conv's MACs need its input_size")
    return input_size


def exact_rank(in_channels: int, out_channels: int, kernel_size: tuple[int, ...], groups: int, order: str) -> int:
    """Depth multiplier at which the separable pair reproduces the conv exactly.

    dw-pw factorises one ``(Cout/g, K)`` matrix per input channel, pw-dw one
    ``(Cin/g, K)`` matrix per output channel, with ``K`` the kernel area.

    >>> exact_rank(64, 128, (3, 3), groups=1, order="dw-pw")
    9
    >>> exact_rank(3, 64, (7, 7), groups=1, order="pw-dw")
    3

    For pw-dw-pw it is the bottleneck width (per group) that holds every
    rank-one term of the better per-channel order:

    >>> exact_rank(64, 128, (3, 3), groups=1, order="pw-dw-pw")
    576
    """
    area = prod(kernel_size)
    cin, cout = in_channels // groups, out_channels // groups
    if order == "dw-pw":
        return min(cout, area)
    if order == "pw-dw":
        return min(cin, area)
    if order == "pw-dw-pw":
        return min(cin * min(cout, area), cout * min(cin, area))
    raise ConfigError(f"unknown order {order!r}")


def separable_params(
    in_channels: int,
    out_channels: int,
    kernel_size: tuple[int, ...],
    groups: int,
    rank: int,
    order: str,
    bias: bool,
) -> int:
    """Parameters of the depthwise + pointwise pair that replaces a conv at ``rank``.

    >>> separable_params(64, 128, (3, 3), groups=1, rank=1, order="dw-pw", bias=False)
    8768
    """
    area = prod(kernel_size)
    if order == "dw-pw":
        # depthwise: Cin*r filters of K taps; pointwise: Cout x (Cin*r/g)
        dense = in_channels * rank * area + out_channels * (in_channels * rank // groups)
    elif order == "pw-dw":
        # pointwise: Cout*r x (Cin/g); depthwise: Cout filters over r channels of K taps
        dense = out_channels * rank * (in_channels // groups) + out_channels * rank * area
    elif order == "pw-dw-pw":
        # pointwise: g*R x (Cin/g); depthwise: g*R filters of K taps; pointwise: Cout x R
        dense = rank * (in_channels + groups * area + out_channels)
    else:
        raise ConfigError(f"unknown order {order!r}")
    return dense + (out_channels if bias else 0)


def separable_macs(
    in_channels: int,
    out_channels: int,
    kernel_size: tuple[int, ...],
    groups: int,
    rank: int,
    order: str,
    input_size: tuple[int, ...],
    output_size: tuple[int, ...],
    batch: int = 1,
    *,
    transposed: bool = False,
) -> int:
    """MACs of the separable pair; ``input_size``/``output_size`` are spatial dims.

    The strided spatial step always sits in the depthwise conv, so in pw-dw
    and pw-dw-pw order the first pointwise conv runs at the *input* resolution
    (and in dw-pw the pointwise conv at the output's). The depthwise step is
    counted at the output resolution, or for a ``transposed`` conv at the
    input's.

    >>> separable_macs(64, 128, (3, 3), 1, 1, "dw-pw", (56, 56), (56, 56))
    27496448
    """
    area = prod(kernel_size)
    out_pixels = batch * prod(output_size)
    in_pixels = batch * prod(input_size)
    dw_pixels = in_pixels if transposed else out_pixels
    if order == "dw-pw":
        return dw_pixels * in_channels * rank * area + out_pixels * out_channels * (in_channels * rank // groups)
    if order == "pw-dw":
        return in_pixels * out_channels * rank * (in_channels // groups) + dw_pixels * out_channels * rank * area
    if order == "pw-dw-pw":
        return in_pixels * rank * in_channels + dw_pixels * rank * groups * area + out_pixels * rank * out_channels
    raise ConfigError(f"unknown order {order!r}")


def ratio(after: float | None, before: float | None) -> float | None:
    """``after / before``; None when either is unknown or ``before`` is not positive.

    >>> ratio(1, 4), ratio(None, 4), ratio(1, 0)
    (0.25, None, None)
    """
    return after / before if after is not None and before is not None and before > 0 else None


def cp_ranks(limit: int, count: int = 12) -> list[int]:
    """About ``count`` ranks from 1 to ``limit``, spaced geometrically (the audit's grid).

    >>> cp_ranks(40, 8)
    [1, 2, 3, 5, 8, 14, 24, 40]
    """
    if limit <= count:
        return list(range(1, limit + 1))
    ranks = {max(1, round(limit ** (k / (count - 1)))) for k in range(count)}
    return sorted(ranks)
