"""Closed-form factorisation of a conv weight into depthwise + pointwise weights.

A conv weight ``W`` of shape ``(Cout, Cin/g, kh, kw)`` is cut into one small
matrix per channel and each is replaced by its truncated SVD (Eckart-Young:
the best rank-r approximation in the Frobenius norm):

* ``"dw-pw"``: per *input* channel ``i``, ``M_i = W[:, i]`` of shape
  ``(Cout/g, kh*kw)``; the depthwise conv holds the right singular vectors,
  the pointwise conv the left ones.
* ``"pw-dw"``: per *output* channel ``o``, ``N_o = W[o]`` of shape
  ``(Cin/g, kh*kw)``; the pointwise conv holds the left singular vectors,
  the depthwise (grouped) conv the right ones.

All channels are factorised by batched ``torch.linalg.svd`` calls in
float64, in chunks of about 8 MB of input (one call for most layers); the
factors are cast back to the weight's dtype at the end.
Plain tensors only: no modules, no fx.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from sepify.errors import ConfigError
from sepify.vocab import SVD_ORDERS

__all__ = [
    "SVD_ORDERS",
    "Factorization",
    "channel_matrices",
    "singular_values",
    "relative_error_from_singular_values",
    "split_conv_weight",
    "merge_separable_weight",
]


def _check_order(order: str) -> None:
    if order not in SVD_ORDERS:
        raise ConfigError(f"order must be one of {SVD_ORDERS}, got {order!r}")


def channel_matrices(weight: Tensor, groups: int, order: str) -> Tensor:
    """Stack the per-channel matrices that ``order`` factorises, as float64.

    Returns ``(Cin, Cout/g, K)`` for dw-pw (global input-channel order) and
    ``(Cout, Cin/g, K)`` for pw-dw, where ``K = kh*kw``.
    """
    return _channel_stack(weight, order, groups).to(torch.float64)


def _channel_stack(weight: Tensor, order: str, groups: int) -> Tensor:
    """:func:`channel_matrices` in the weight's own dtype (a view where the layout allows)."""
    _check_order(order)
    out_channels, in_per_group = weight.shape[:2]
    area = math.prod(weight.shape[2:])
    w = weight.detach()
    if order == "pw-dw":
        return w.reshape(out_channels, in_per_group, area)
    out_per_group = out_channels // groups
    w = w.reshape(groups, out_per_group, in_per_group, area).permute(0, 2, 1, 3)
    return w.reshape(groups * in_per_group, out_per_group, area)


# Matrices per batched SVD call are capped so that the float64 copy of the
# input (and LAPACK's workspace, about as large again) stays near 8 MB: one call
# for a whole large weight peaked at several times its size (docs/benchmarks.md).
_SVD_CHUNK_ELEMENTS = 1 << 20


def _svd(matrices: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Batched thin float64 SVD with a deterministic sign for every singular pair.

    ``matrices`` may be in any floating dtype; each chunk is promoted to
    float64 only while it is decomposed.
    """
    batch, rows, cols = matrices.shape
    q = min(rows, cols)
    opts: dict[str, Any] = {"dtype": torch.float64, "device": matrices.device}
    u = torch.empty(batch, rows, q, **opts)
    s = torch.empty(batch, q, **opts)
    vh = torch.empty(batch, q, cols, **opts)
    step = max(1, _SVD_CHUNK_ELEMENTS // max(1, rows * cols))
    for i in range(0, batch, step):
        chunk = matrices[i : i + step].to(torch.float64)
        torch.linalg.svd(chunk, full_matrices=False, out=(u[i : i + step], s[i : i + step], vh[i : i + step]))
    # Singular vectors are defined up to sign; pin it (largest |entry| of each
    # right vector positive) so the same weight always gives the same factors.
    pivot = vh.abs().argmax(dim=-1, keepdim=True)
    sign = torch.sign(torch.gather(vh, -1, pivot))
    sign[sign == 0] = 1.0
    return u.mul_(sign.transpose(-1, -2)), s, vh.mul_(sign)


def singular_values(weight: Tensor, groups: int, order: str) -> Tensor:
    """Singular values (descending, float64) of every per-channel matrix: ``(B, q)``."""
    values: Tensor = torch.linalg.svdvals(channel_matrices(weight, groups, order))
    return values


def relative_error_from_singular_values(sv: Tensor, rank: int) -> float:
    """``||W - W_r||_F / ||W||_F`` for per-channel truncation at ``rank``.

    Equals ``sqrt(sum of discarded sigma^2 / sum of all sigma^2)``; 0.0 for an
    all-zero weight.
    """
    energy = sv.to(torch.float64).square()
    total = float(energy.sum())
    if total == 0.0:
        return 0.0
    tail = float(energy[..., rank:].sum())
    return math.sqrt(max(tail, 0.0) / total)


@dataclass(frozen=True)
class Factorization:
    """The per-channel SVD of one conv weight in one order, reusable across ranks.

    Examples:
        >>> f = Factorization.of(torch.randn(8, 4, 3, 3), groups=1, order="dw-pw")
        >>> f.max_rank, round(f.relative_error(f.max_rank), 6)
        (8, 0.0)
    """

    u: Tensor  # (B, m, q) float64
    s: Tensor  # (B, q) float64, descending
    vh: Tensor  # (B, q, K) float64
    weight_shape: tuple[int, ...]
    groups: int
    order: str
    dtype: torch.dtype
    device: torch.device

    @classmethod
    def of(cls, weight: Tensor, groups: int, order: str) -> Factorization:
        u, s, vh = _svd(_channel_stack(weight, order, groups))
        return cls(u, s, vh, tuple(weight.shape), groups, order, weight.dtype, weight.device)

    @property
    def max_rank(self) -> int:
        """The exact rank: at this depth multiplier the pair reproduces the weight."""
        return int(self.s.shape[-1])

    def relative_error(self, rank: int) -> float:
        """``||W - W_r||_F / ||W||_F`` at ``rank``, from the singular values."""
        return relative_error_from_singular_values(self.s, rank)

    def factors(self, rank: int) -> tuple[Tensor, Tensor]:
        """``(depthwise_weight, pointwise_weight)`` at ``rank``; see :func:`split_conv_weight`."""
        if not 1 <= rank <= self.max_rank:
            raise ConfigError(f"rank must be in [1, {self.max_rank}] for this weight and order, got {rank}")
        root = self.s[:, :rank].sqrt()
        # Split each singular value evenly between the two factors so that
        # neither factor's magnitude blows up in float16/bfloat16.
        left = self.u[:, :, :rank] * root[:, None, :]  # (B, m, r)
        right = self.vh[:, :rank, :] * root[:, :, None]  # (B, r, K)
        out_channels, in_per_group = self.weight_shape[:2]
        kernel = self.weight_shape[2:]
        groups = self.groups
        if self.order == "dw-pw":
            in_channels = in_per_group * groups
            out_per_group = out_channels // groups
            depthwise = right.reshape(in_channels * rank, 1, *kernel)
            pointwise = (
                left.reshape(groups, in_per_group, out_per_group, rank)
                .permute(0, 2, 1, 3)
                .reshape(out_channels, in_per_group * rank, 1, 1)
            )
        else:
            pointwise = left.permute(0, 2, 1).reshape(out_channels * rank, in_per_group, 1, 1)
            depthwise = right.reshape(out_channels, rank, *kernel)
        return (
            depthwise.to(device=self.device, dtype=self.dtype).contiguous(),
            pointwise.to(device=self.device, dtype=self.dtype).contiguous(),
        )


def split_conv_weight(weight: Tensor, groups: int, rank: int, order: str) -> tuple[Tensor, Tensor]:
    """Factor a conv weight into the two weights of a separable pair.

    Args:
        weight: conv weight ``(Cout, Cin/g, kh, kw)`` of any floating dtype.
        groups: the conv's ``groups``.
        rank: depth multiplier ``r``, ``1 <= r <= exact rank`` for ``order``.
        order: ``"dw-pw"`` or ``"pw-dw"``.

    Returns:
        ``(depthwise_weight, pointwise_weight)`` in ``weight``'s dtype and device.
        dw-pw: depthwise ``(Cin*r, 1, kh, kw)`` (``groups=Cin``), pointwise
        ``(Cout, Cin*r/g, 1, 1)`` (``groups=g``). pw-dw: pointwise
        ``(Cout*r, Cin/g, 1, 1)`` (``groups=g``), depthwise ``(Cout, r, kh, kw)``
        (``groups=Cout``).

    Examples:
        >>> w = torch.randn(8, 4, 3, 3)
        >>> dw, pw = split_conv_weight(w, groups=1, rank=8, order="dw-pw")
        >>> dw.shape, pw.shape
        (torch.Size([32, 1, 3, 3]), torch.Size([8, 32, 1, 1]))
        >>> torch.allclose(merge_separable_weight(dw, pw, groups=1, rank=8, order="dw-pw"), w, atol=1e-5)
        True
    """
    return Factorization.of(weight, groups, order).factors(rank)


def merge_separable_weight(depthwise: Tensor, pointwise: Tensor, *, groups: int, rank: int, order: str) -> Tensor:
    """The dense conv weight a separable pair computes (inverse of ``split_conv_weight``).

    Computed in float64 and returned in the factors' dtype.
    """
    _check_order(order)
    dw = depthwise.detach().to(torch.float64)
    pw = pointwise.detach().to(torch.float64)
    kernel = dw.shape[2:]
    area = math.prod(kernel)
    if order == "dw-pw":
        in_channels = dw.shape[0] // rank
        out_channels = pw.shape[0]
        in_per_group = in_channels // groups
        d = dw.reshape(groups, in_per_group, rank, area)  # (g, Cin_g, r, K)
        p = pw.reshape(groups, out_channels // groups, in_per_group, rank)  # (g, Cout_g, Cin_g, r)
        w = torch.einsum("gojr,gjrk->gojk", p, d)
        merged = w.reshape(out_channels, in_per_group, *kernel)
    else:
        out_channels = dw.shape[0]
        in_per_group = pw.shape[1]
        p = pw.reshape(out_channels, rank, in_per_group)
        d = dw.reshape(out_channels, rank, area)
        merged = torch.einsum("orj,ork->ojk", p, d).reshape(out_channels, in_per_group, *kernel)
    return merged.to(depthwise.dtype)
