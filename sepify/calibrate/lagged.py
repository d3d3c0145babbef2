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

__all__ = ["sequence_normals", "SequenceSums", "LAGGED_MIN_TAPS"]

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
    sums = SequenceSums(kernel=kernel, stride=stride, dilation=dilation, bias=bias)
    sums.add(u, y)
    return sums.normals()


class SequenceSums:
    """What :func:`sequence_normals` needs, summed over batches; the normal equations are assembled once.

    Every term is a sum over the batch (correlations by lag, the products at the ends of the sequences, the
    window sums), so batches add up in that form, and the Gram matrix, whose assembly reads ``(r K)^2`` entries
    out of them, is built once per layer instead of once per batch. Batches must share the conv and ``(C, r, L)``
    (:meth:`accepts`).
    """

    def __init__(self, *, kernel: int, stride: int, dilation: int, bias: bool = False) -> None:
        self.conv = (kernel, stride, dilation, bias)
        self.lags = [divmod(a * dilation, stride) for a in range(kernel)]  # tap -> (q, phase)
        self.shape: tuple[int, ...] | None = None  # (C, r, L) of the batches
        self.terms: dict[str, Tensor] = {}
        self.samples = 0

    def accepts(self, u: Tensor, *, kernel: int, stride: int, dilation: int, bias: bool = False) -> bool:
        """Whether batch ``u`` of that conv adds to these sums (the same conv, channels and length)."""
        return (kernel, stride, dilation, bias) == self.conv and self.shape in (None, tuple(u.shape[1:]))

    def add(self, u: Tensor, y: Tensor) -> None:
        """One batch: ``u (B, C, r, L)`` and ``y (B, C, T)`` as in :func:`sequence_normals`."""
        u, y = u.double(), y.double()
        kernel, stride, dilation, bias = self.conv
        batch, channels, r, length = u.shape
        assert self.shape in (None, (channels, r, length)), "a batch of another shape"
        assert y.shape[-1] == (length - (kernel - 1) * dilation - 1) // stride + 1, "targets do not match the conv"
        self.shape = (channels, r, length)
        phases = _phases(u, stride)
        steps, span, most = y.shape[-1], phases.shape[-1], max(q for q, _ in self.lags)  # T, M: per phase, Q
        size = _fft_size(span + most)
        # Per channel: its spectra (complex), and the shifted copies the products at the ends are taken from.
        per_channel = batch * r * stride * ((size // 2 + 1) * 16 + (most + span - steps) * (most + 1) * 8)
        chunk = max(1, _CHUNK_BYTES // max(per_channel, 1))
        for start in range(0, channels, chunk):
            part = slice(start, min(start + chunk, channels))
            for name, value in _chunk_sums(phases[:, part], y[:, part], most, steps, size).items():
                if name not in self.terms:  # every channel's sums, filled a chunk at a time
                    self.terms[name] = value.new_zeros(channels, *value.shape[1:])
                self.terms[name][part] += value
        sums = {"yy": y.square().sum((0, 2))}
        if bias:
            sums["totals"] = torch.nn.functional.pad(phases.sum(0).cumsum(-1), (1, 0))  # (C, r*s, M+1)
            sums["ysum"] = y.sum((0, 2))
        for name, value in sums.items():
            self.terms[name] = self.terms[name] + value if name in self.terms else value
        self.samples += batch

    def normals(self) -> tuple[Tensor, Tensor, Tensor]:
        """``(gram, cross, yy)`` of every batch added so far (see :func:`sequence_normals`)."""
        assert self.shape is not None, "no batch was added"
        kernel, stride, dilation, bias = self.conv
        (channels, r, length), terms = self.shape, self.terms
        steps, span = (length - (kernel - 1) * dilation - 1) // stride + 1, -(-length // stride)  # T, M as in add
        # What a tap's window leaves out of the full range: the products before its start q and from q + T on,
        # from running sums of the products near each end (no padded or flipped copies: each is the size of the
        # Gram matrix). Before q: head[..., q - 1]; from e = min(q, M - T) on: total - tail[..., e - 1]; both are
        # 0 / total where the index is -1, at the taps with q = 0, whose rows are redone below.
        head = terms["head"].cumsum(-1)
        tail = terms["tail"].cumsum(-1)
        q, feature = _tap_features(self.lags, r, stride, head.device)
        lag = (q[None, :] - q[:, None]).clamp_min(0)  # (a, b) -> q_b - q_a where that is >= 0
        late = (q.clamp_max(span - steps))[:, None]  # (a, 1): position of p = q_a + T among the tail positions
        i, j = feature[:, :, None, None], feature[None, None, :, :]
        a_lag, a_start, a_late = lag[None, :, None, :], q[None, :, None, None], late[None, :, None, :]
        base = terms["full"] - (tail[..., -1] if tail.shape[-1] else 0)  # the full range less the whole tail
        gram = base[:, i, j, a_lag]  # (C, r, K, r, K)
        if head.shape[-1]:
            gram -= head[:, i, j, a_lag, (a_start - 1).clamp_min(0)]
        if tail.shape[-1]:
            gram += tail[:, i, j, a_lag, (a_late - 1).clamp_min(0)]
        del head, tail
        first = (q == 0).nonzero().flatten()  # nothing before them, the whole tail after
        gram[:, :, first] = base[:, i[:, first], j, a_lag[:, first]]
        forward = (q[None, :] >= q[:, None])[None, None, :, None, :]  # lag >= 0: computed directly
        gram = torch.where(forward, gram, gram.permute(0, 3, 4, 1, 2)).reshape(channels, r * kernel, r * kernel)
        cross = terms["target"][:, feature, q[None, :].expand(r, kernel)].reshape(channels, r * kernel, 1)
        if bias:
            totals = terms["totals"]
            window = (totals[:, feature, q + steps] - totals[:, feature, q]).reshape(channels, -1)  # over its window
            gram = torch.nn.functional.pad(gram, (0, 1, 0, 1))
            gram[:, :-1, -1] = gram[:, -1, :-1] = window
            gram[:, -1, -1] = self.samples * steps
            cross = torch.cat([cross, terms["ysum"][:, None, None]], dim=1)
        return gram, cross, terms["yy"]


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


def _chunk_sums(phases: Tensor, y: Tensor, most: int, steps: int, size: int) -> dict[str, Tensor]:
    """A chunk of channels' sums over the batch: full-range correlations and target correlations by lag, and the
    products within ``Q + (M - T)`` positions of the ends, which a tap's window leaves out of the full range."""
    channels, width, span = phases.shape[1:]
    spectra = torch.fft.rfft(phases, n=size).permute(1, 3, 2, 0).contiguous()  # (C, F, r*s, B)
    # Full-range correlations: full[c, i, j, lag] = sum_b sum_p x_i[p] x_j[p + lag], for lag 0..Q. (A matmul of
    # contiguous operands: einsum's complex batched product copied matrix by matrix, 2.6x slower.)
    power = (spectra.conj() @ spectra.mT.contiguous()).permute(0, 2, 3, 1)  # (C, i, j, F)
    full = torch.fft.irfft(power, n=size)[..., : most + 1]
    del power
    spectra_y = torch.fft.rfft(y, n=size).permute(1, 2, 0)[..., None]  # (C, F, B, 1)
    target = torch.fft.irfft((spectra @ spectra_y.conj()).squeeze(-1).mT, n=size)  # (C, i, size)
    del spectra, spectra_y
    ext = torch.nn.functional.pad(phases, (0, most))

    def products(lo: int, hi: int) -> Tensor:  # (C, i, j, lag, p): sum over the batch of x_i[p] x_j[p + lag]
        if hi <= lo:
            return phases.new_zeros(channels, width, width, most + 1, 0)
        shifted = ext[..., lo : hi + most].unfold(-1, most + 1, 1)  # (B, C, j, p, lag), a view
        return torch.einsum("bcip,bcjpl->cijlp", phases[..., lo:hi], shifted)

    return {"full": full.contiguous(), "target": target, "head": products(0, most), "tail": products(steps, span)}


def _tap_features(lags: list[tuple[int, int]], r: int, stride: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """``q (K,)``: each tap's offset in phase samples; ``feature (r, K)``: the phase channel feature ``(k, a)`` reads."""
    q = torch.tensor([lag for lag, _ in lags], device=device)
    phase = torch.tensor([p for _, p in lags], device=device)
    return q, torch.arange(r, device=device)[:, None] * stride + phase
