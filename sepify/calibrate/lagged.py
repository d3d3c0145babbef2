r"""A pw-dw refit's normal equations along one long axis, from correlations instead of unfolded patches.

The depthwise conv of a pw-dw pair is refit per output channel from its ``r``
input channels at ``K`` taps each. Unfolding the input into patches and
multiplying them costs ``(r K)^2`` per output position: on a long 1-D kernel
(audio models: K of 39 to 512) that is hundreds of forward passes of the whole
model for one layer. Every entry of the Gram matrix is a correlation between
two of the ``r`` channels at a lag, summed over a window::

    G[(k, a), (l, b)] = sum_t u_k[t s + a d] * u_l[t s + b d]

so all of them come from the channels' cross-spectra (one complex matrix
product per frequency, summed over the batch before the inverse FFT), minus the
few products that fall outside each tap's window, near the ends. A stride
splits each channel into ``s`` phases, which are correlated as channels of
their own. The result equals the unfolded computation to float64 round-off.

>>> import torch
>>> u, y = torch.randn(3, 2, 4, 30, dtype=torch.float64), torch.randn(3, 2, 13, dtype=torch.float64)
>>> gram, cross, yy = sequence_normals(u, y, kernel=5, stride=2, dilation=1)
>>> gram.shape, cross.shape, yy.shape
(torch.Size([2, 20, 20]), torch.Size([2, 20, 1]), torch.Size([2]))
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["sequence_normals", "LAGGED_MIN_TAPS"]

LAGGED_MIN_TAPS = 16  # shorter kernels keep the unfolded patches (cheap there, and what every 3x3 layer has used)
_CHUNK_BYTES = 1 << 26  # complex spectra held at once while the cross-spectra are summed (per chunk of channels)


def sequence_normals(
    u: Tensor, y: Tensor, *, kernel: int, stride: int, dilation: int, bias: bool = False
) -> tuple[Tensor, Tensor, Tensor]:
    """``(gram, cross, yy)`` of the per-channel regressions ``u -> y`` of a 1-D depthwise conv.

    Args:
        u: ``(B, C, r, L)`` the depthwise conv's input, already padded: channel ``c`` of the output reads the
            ``r`` sequences ``u[:, c]``.
        y: ``(B, C, T)`` the targets, ``T = (L - (kernel - 1) * dilation - 1) // stride + 1``.
        kernel, stride, dilation: the depthwise conv's, along this axis.
        bias: append the constant feature (the conv's bias) as the last one.

    Returns:
        float64 ``gram (C, f, f)``, ``cross (C, f, 1)`` and ``yy (C,)`` with ``f = r * kernel (+ 1)``, features
        ordered as ``F.unfold`` orders them (channel-major, then tap).
    """
    u, y = u.double(), y.double()
    batch, channels, r, length = u.shape
    steps = y.shape[-1]
    assert steps == (length - (kernel - 1) * dilation - 1) // stride + 1, "targets do not match the conv's output"
    phases, lags = _phases(u, stride), [divmod(a * dilation, stride) for a in range(kernel)]  # tap -> (q, phase)
    span = phases.shape[-1]  # M: samples per phase
    most = max(q for q, _ in lags)  # Q: the longest lag in phase samples
    gram = u.new_zeros(channels, r * kernel, r * kernel)
    cross = u.new_zeros(channels, r * kernel, 1)
    size = _fft_size(span + most)
    # Per channel: its spectra (complex), and the shifted copies the products at the ends are taken from.
    per_channel = batch * r * stride * ((size // 2 + 1) * 16 + (most + span - steps) * (most + 1) * 8)
    chunk = max(1, _CHUNK_BYTES // max(per_channel, 1))
    for start in range(0, channels, chunk):
        part = slice(start, min(start + chunk, channels))
        gram[part], cross[part] = _chunk_normals(phases[:, part], y[:, part], lags, steps, size, r)
    yy = y.square().sum((0, 2))
    if bias:
        window = _window_sums(phases, lags, steps, r)  # (C, r * K): each feature summed over its window
        gram = torch.nn.functional.pad(gram, (0, 1, 0, 1))
        gram[:, :-1, -1] = gram[:, -1, :-1] = window
        gram[:, -1, -1] = batch * steps
        cross = torch.cat([cross, y.sum((0, 2))[:, None, None]], dim=1)
    return gram, cross, yy


def _phases(u: Tensor, stride: int) -> Tensor:
    """``(B, C, r * s, M)``: each sequence split into its ``s`` phases (channel ``k * s + phase``), zero-filled."""
    if stride == 1:
        return u.flatten(2, 2)
    batch, channels, r, length = u.shape
    span = -(-length // stride)
    padded = torch.nn.functional.pad(u, (0, span * stride - length))
    return padded.reshape(batch, channels, r, span, stride).transpose(-1, -2).reshape(batch, channels, r * stride, span)


def _fft_size(n: int) -> int:
    """The smallest 2^a 3^b 5^c at least ``n`` (sizes pocketfft transforms fast)."""
    best = 1 << max(0, math.ceil(math.log2(n)))
    p3 = 1
    while p3 < best:
        p5 = p3
        while p5 < best:
            p2 = p5
            while p2 < n:
                p2 *= 2
            best = min(best, p2)
            p5 *= 5
        p3 *= 3
    return best


def _chunk_normals(
    phases: Tensor, y: Tensor, lags: list[tuple[int, int]], steps: int, size: int, r: int
) -> tuple[Tensor, Tensor]:
    """Gram and cross terms for a chunk of channels (no bias feature)."""
    channels, width, span = phases.shape[1:]
    stride, kernel, most = width // r, len(lags), max(q for q, _ in lags)
    spectra = torch.fft.rfft(phases, n=size)  # (B, C, r*s, F)
    # Full-range correlations: full[c, i, j, lag] = sum_b sum_p x_i[p] x_j[p + lag], for lag 0..Q.
    power = torch.einsum("bcif,bcjf->cijf", spectra.conj(), spectra)
    full = torch.fft.irfft(power, n=size)[..., : most + 1]
    target = torch.fft.irfft(torch.einsum("bcf,bcif->cif", torch.fft.rfft(y, n=size).conj(), spectra), n=size)
    del spectra, power
    # What a tap's window leaves out of the full range: the products before its start q and from q + T on,
    # both within Q + (M - T) positions of the ends.
    ext = torch.nn.functional.pad(phases, (0, most))

    def products(lo: int, hi: int) -> Tensor:  # (C, i, j, lag, p): sum over the batch of x_i[p] x_j[p + lag]
        if hi <= lo:
            return phases.new_zeros(channels, width, width, most + 1, 0)
        shifted = ext[..., lo : hi + most].unfold(-1, most + 1, 1)  # (B, C, j, p, lag), a view
        return torch.einsum("bcip,bcjpl->cijlp", phases[..., lo:hi], shifted)

    before = torch.nn.functional.pad(products(0, most).cumsum(-1), (1, 0))  # [..., q]: sum over p < q
    after = torch.nn.functional.pad(products(steps, span).flip(-1).cumsum(-1).flip(-1), (0, 1))  # p >= T + e
    q, feature = _tap_features(lags, r, stride, phases.device)
    lag = (q[None, :] - q[:, None]).clamp_min(0)  # (a, b) -> q_b - q_a where that is >= 0
    late = (q.clamp_max(span - steps))[:, None]  # (a, 1): position of p = q_a + T among the tail positions
    i, j = feature[:, :, None, None], feature[None, None, :, :]
    a_lag, a_start, a_late = lag[None, :, None, :], q[None, :, None, None], late[None, :, None, :]
    gram = full[:, i, j, a_lag] - before[:, i, j, a_lag, a_start] - after[:, i, j, a_lag, a_late]  # (C, r, K, r, K)
    forward = (q[None, :] >= q[:, None])[None, None, :, None, :]  # lag >= 0: computed directly
    gram = torch.where(forward, gram, gram.permute(0, 3, 4, 1, 2))
    cross = target[:, feature, q[None, :].expand(r, kernel)]  # (C, r, K)
    return gram.reshape(channels, r * kernel, r * kernel), cross.reshape(channels, r * kernel, 1)


def _window_sums(phases: Tensor, lags: list[tuple[int, int]], steps: int, r: int) -> Tensor:
    """``(C, r * K)``: feature ``(k, a)`` summed over the batch and its window of ``steps`` positions."""
    stride = phases.shape[2] // r
    totals = torch.nn.functional.pad(phases.sum(0).cumsum(-1), (1, 0))  # (C, r*s, M+1)
    q, feature = _tap_features(lags, r, stride, phases.device)
    sums = totals[:, feature, q + steps] - totals[:, feature, q]
    return sums.reshape(phases.shape[1], -1)


def _tap_features(lags: list[tuple[int, int]], r: int, stride: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """``q (K,)``: each tap's offset in phase samples; ``feature (r, K)``: the phase channel feature ``(k, a)`` reads."""
    q = torch.tensor([lag for lag, _ in lags], device=device)
    phase = torch.tensor([p for _, p in lags], device=device)
    return q, torch.arange(r, device=device)[:, None] * stride + phase
