"""A conv's own output error at every rank of its separable pair, from one input batch."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from sepify.core.decompose import Factorization
from sepify.core.functional import ConvLayer, conv_like, pointwise
from sepify.core.modules import SeparableConv

__all__ = ["layer_output_errors", "pair_output_error", "conv_output", "squared_norm"]

_ROW = 4096  # elements summed in float32 at a time by squared_norm


def squared_norm(t: Tensor) -> float:
    """``||t||^2`` accurate to float64 rounding, without a float64 copy of ``t``.

    A float32 norm of a large activation loses digits (0.6% on 67M elements
    here), and ``t.double()`` costs a copy and 40x the time. Rows of 4096
    elements are normed in float32 (each to about 1e-7 relative) and their
    squares summed in float64.

    >>> t = torch.randn(3, 5000)
    >>> abs(squared_norm(t) / float(t.double().square().sum()) - 1) < 1e-6
    True
    """
    flat = t.detach().reshape(-1)
    if not flat.is_floating_point() or flat.dtype == torch.float64:
        return float(flat.double().square().sum())
    pad = (-flat.numel()) % _ROW
    rows = torch.nn.functional.pad(flat, (0, pad)).view(-1, _ROW) if pad else flat.view(-1, _ROW)
    return float(torch.linalg.vector_norm(rows, dim=1).double().square().sum())


def layer_output_errors(
    conv: ConvLayer, x: Tensor, factorization: Factorization, max_rank: int, y: Tensor | None = None
) -> list[float]:
    """Relative output error ``||y_r - y|| / ||y||`` of the rank-r pair for r = 1..max_rank.

    Runs the pair at the largest rank one rank component at a time and
    accumulates: the rank-r output is the bias plus the first r components,
    so every rank costs about as much as one pair at ``max_rank`` (not
    ``max_rank`` dense convs), and only one component's activations are held.
    ``y`` is the conv's output on ``x`` when the caller has it already.

    Examples:
        >>> conv = torch.nn.Conv2d(4, 8, 3)
        >>> f = Factorization.of(conv.weight, 1, "dw-pw")
        >>> errors = layer_output_errors(conv, torch.randn(1, 4, 8, 8), f, f.max_rank)
        >>> errors[0] > errors[-1], errors[-1] < 1e-5
        (True, True)
    """
    with torch.no_grad():
        y = conv_output(conv, x) if y is None else y
        norm = squared_norm(y) ** 0.5
        top = min(max_rank, factorization.max_rank)
        pair = SeparableConv.from_conv(conv, top, factorization.order, factorization=factorization)
        components = _rank_components(conv, pair, x)
        residual = y.clone()  # y minus the rank-r output, updated in place
        if conv.bias is not None:
            residual -= conv.bias.view(1, -1, *(1,) * (y.dim() - 2))
        errors = []
        for component in components:  # one rank component at a time: small intermediates
            residual -= component
            errors.append(squared_norm(residual) ** 0.5 / norm if norm > 0 else 0.0)
        return errors


def _rank_components(conv: ConvLayer, pair: SeparableConv, x: Tensor) -> Iterator[Tensor]:
    """The pair's output (without bias) one rank component at a time.

    Component ``k`` runs a true depthwise conv (one filter per channel) with
    the ``k``-th filters; :meth:`SeparableConv.depthwise_taps` gives them in
    the same layout for convs and transposed convs.
    """
    dw, pw, top, groups = pair.conv_dw, pair.conv_pw, pair.rank, conv.groups
    taps = pair.depthwise_taps()
    kernel = taps.shape[2:]
    ones = (1,) * len(kernel)
    if pair.order == "dw-pw":
        cin = conv.in_channels
        w_dw = taps.reshape(cin, top, *kernel)  # channel i*R + k
        w_pw = pw.weight.reshape(conv.out_channels, cin // groups, top, *ones)  # input j*R + k
        for k in range(top):
            z = conv_like(dw, x, w_dw[:, k : k + 1], None, groups=cin)
            yield pointwise(z, w_pw[:, :, k], groups=groups)
    else:
        cout = conv.out_channels
        w_pw = pw.weight.reshape(cout, top, *pw.weight.shape[1:])  # channel o*R + k
        for k in range(top):
            u = pointwise(x, w_pw[:, k], groups=groups)
            yield conv_like(dw, u, taps[:, k : k + 1], None, groups=cout)


def conv_output(conv: ConvLayer, x: Tensor) -> Tensor:
    """``conv``'s output on ``x`` without calling the module (its hooks may be what called the caller)."""
    with torch.no_grad():
        return conv_like(conv, x, conv.weight, conv.bias)


def pair_output_error(conv: ConvLayer, pair: SeparableConv, x: Tensor, y: Tensor | None = None) -> float:
    """``||pair(x) - conv(x)|| / ||conv(x)||`` (0.0 when the conv's output is all zeros); ``y``: ``conv(x)`` if known."""
    with torch.no_grad():
        y = conv_output(conv, x) if y is None else y
        norm = squared_norm(y) ** 0.5
        return squared_norm(pair(x) - y) ** 0.5 / norm if norm > 0 else 0.0
