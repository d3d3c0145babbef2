"""The pointwise-depthwise-pointwise bottleneck: a CP decomposition of a conv weight.

A conv weight seen per group as a 3-way tensor ``W[o, i, k]`` (output channel,
input channel, kernel tap) is approximated by ``R`` rank-one terms
``W_hat[o, i, k] = sum_r A[o, r] * C[r, k] * B[r, i]`` (CANDECOMP/PARAFAC;
Lebedev et al. 2015). As layers: a 1x1 conv ``B`` (Cin -> R), a depthwise
conv ``C`` on R channels with the original kernel, stride, padding and
dilation, and a 1x1 conv ``A`` (R -> Cout) with the bias.

The per-channel SVD pairs are special cases: dw-pw at depth multiplier r is
this structure with ``R = Cin * r`` and ``B`` a channel selector, pw-dw with
``R = Cout * r`` and ``A`` a selector. So one start is taken from them: of all
rank-one terms of the per-channel SVDs in the better order, the R with the
largest singular values (the most energy any R of them can hold, since terms
of different channels are orthogonal). A second start takes each factor from
the leading singular vectors of the weight unfolded along that factor's mode
(HOSVD; cycled where R exceeds the mode's size), which finds narrow
bottlenecks that per-channel terms miss. Alternating least squares (ALS,
float64) improves all three factors from each start; each sweep solves three
small linear systems and never increases the error, and a line search
extends each sweep's step when that helps (see :func:`_als`). Both starts get
a few sweeps and only the one ahead goes on, so the result is never worse
than the per-channel pair of the same width. On the trained digits and
crepe-tiny layers this matches tensorly's ``parafac`` after 100 iterations
(relative error -3% to +2%) in about half its time (1.0-10x less, median 2.2x).
Everything is deterministic.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from sepify.core.cost import exact_rank
from sepify.core.decompose import Factorization
from sepify.errors import ConfigError

__all__ = ["CPFactorization", "CPByRank", "CPStarts"]

_SWEEPS = 20  # ALS sweeps at most (with line search; 30 plain ones left errors up to 7% higher); fewer past _TOL
_PROBE_SWEEPS = 5  # sweeps both starts get before only the one ahead goes on
_LS_FAILS = 4  # refused line-search steps before its jumps shrink
_TOL = 1e-5  # of the squared error relative to ||W||^2
# Multiply-adds one factorization may spend on ALS sweeps (about 2 s on one CPU core in float64), counted as
# 3 g*O*I*K*R per sweep (two contractions of W for the updates, one for the line search) of each of the two
# starts, so large layers at large ranks get fewer sweeps. Only one start goes past _PROBE_SWEEPS, so this is
# an upper bound.
_WORK = 2 * 10**10


class CPStarts:
    """What every rank's starts of one weight share, computed once: the per-channel SVDs and the HOSVD bases."""

    def __init__(self, weight: Tensor, groups: int) -> None:
        out_channels, in_per_group = weight.shape[:2]
        self.weight, self.groups = weight, groups
        self.w = weight.detach().to(torch.float64).reshape(groups, out_channels // groups, in_per_group, -1)
        self.limit = exact_rank(in_per_group * groups, out_channels, tuple(weight.shape[2:]), groups, "pw-dw-pw")
        self.energy = float(self.w.square().sum())
        self.svds = {order: Factorization.of(weight, groups, order) for order in ("dw-pw", "pw-dw")}
        self._bases: list[Tensor] | None = None

    def strongest_terms(self, rank: int) -> tuple[tuple[Tensor, Tensor, Tensor], float]:
        """The R strongest rank-one terms of the per-channel SVDs, from the order whose R terms hold more energy.

        Returns ``(A (g, O, R), B (g, I, R), C (g, K, R))`` in float64 and their relative error, exact
        from the singular values (terms of different channels are orthogonal).
        """
        groups = self.groups
        best: tuple[float, tuple[Tensor, Tensor, Tensor]] | None = None
        for order, f in self.svds.items():
            channels = self.w.shape[2] if order == "dw-pw" else self.w.shape[1]  # terms of channel j: u, s, v
            s = f.s.reshape(groups, channels * f.max_rank)
            top = s.topk(min(rank, s.shape[1]), dim=1)
            energy = float(top.values.square().sum())
            if best is not None and energy <= best[0]:
                continue
            u = f.u.reshape(groups, channels, -1, f.max_rank).permute(0, 1, 3, 2)
            u = u.reshape(groups, channels * f.max_rank, -1)
            v = f.vh.reshape(groups, channels * f.max_rank, -1)
            idx = top.indices
            picked_u = torch.gather(u, 1, idx[..., None].expand(-1, -1, u.shape[-1]))  # (g, R', m)
            picked_v = torch.gather(v, 1, idx[..., None].expand(-1, -1, v.shape[-1]))  # (g, R', K)
            select = torch.nn.functional.one_hot(idx // f.max_rank, channels).to(torch.float64)  # (g, R', channels)
            weighted = picked_u * top.values[..., None]
            a, b = (weighted, select) if order == "dw-pw" else (select, weighted)
            best = (energy, tuple(_pad(t, rank).transpose(1, 2) for t in (a, b, picked_v)))  # type: ignore[assignment]
        assert best is not None
        error = math.sqrt(max(self.energy - best[0], 0.0) / self.energy) if self.energy > 0 else 0.0
        return best[1], error

    def hosvd(self, rank: int) -> tuple[Tensor, Tensor, Tensor]:
        """Each factor from the leading left singular vectors of the weight unfolded along its mode, cycled up to R."""
        if self._bases is None:
            self._bases = []
            for mode in (1, 2, 3):  # output channels, input channels, kernel taps
                unfolded = self.w.movedim(mode, 1).reshape(self.w.shape[0], self.w.shape[mode], -1)
                _, vectors = torch.linalg.eigh(unfolded @ unfolded.transpose(1, 2))  # ascending eigenvalues
                self._bases.append(vectors.flip(-1))
        a, b, c = (basis[..., [r % basis.shape[-1] for r in range(rank)]] for basis in self._bases)
        return a, b, c


@dataclass(frozen=True)
class CPFactorization:
    """Factors of one weight at one rank, per group (float64), and their relative error.

    Examples:
        >>> w = torch.randn(8, 4, 3, 3)
        >>> f = CPFactorization.of(w, groups=1, rank=32)  # exact_rank(4, 8, (3, 3), 1, "pw-dw-pw")
        >>> round(f.relative_error, 6)
        0.0
        >>> f.first.shape, f.kernel.shape, f.last.shape
        (torch.Size([1, 32, 4]), torch.Size([1, 32, 9]), torch.Size([1, 8, 32]))
    """

    first: Tensor  # (g, R, Cin/g): the 1x1 conv Cin -> R
    kernel: Tensor  # (g, R, K): the depthwise taps
    last: Tensor  # (g, Cout/g, R): the 1x1 conv R -> Cout
    relative_error: float  # ||W - W_hat||_F / ||W||_F
    weight_shape: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device

    @property
    def rank(self) -> int:
        return int(self.kernel.shape[1])

    @classmethod
    def of(
        cls, weight: Tensor, groups: int, rank: int, work: int = _WORK, starts: CPStarts | None = None
    ) -> CPFactorization:
        """The rank-``rank`` (per group) CP factors of ``weight``; see the module docstring.

        ``work`` bounds the multiply-adds spent on ALS sweeps (counted as
        ``3 * weight.numel() * max(rank, 16)`` per sweep and start, an upper
        bound); with too little for one sweep of both starts the strongest
        SVD terms are kept as they are.
        Pass ``starts`` to share the SVDs between ranks of one weight.
        """
        starts = starts or CPStarts(weight, groups)
        if not 1 <= rank <= starts.limit:
            raise ConfigError(f"a pw-dw-pw rank must be in [1, {starts.limit}] for this weight, got {rank}")
        w = starts.w
        sweeps = min(_SWEEPS, work // (6 * w.numel() * max(rank, 16)))  # narrow ranks cost about as much as R=16
        terms, error = starts.strongest_terms(rank)
        if error < 1e-4:  # from the singular values, a near-exact error is sqrt(cancellation noise) ~ 1e-8: measure it
            error = _relative_error(w, *terms)
        # No budget; already exact (every term of a channel order); or W is a matrix with one input or output
        # channel per group, whose one channel's SVD terms are the best of any R terms (Eckart-Young). (With one
        # tap it is a matrix too, but per-channel terms are not its SVD: ALS runs.)
        if sweeps == 0 or error < 1e-12 or 1 in w.shape[1:3]:
            a, b, c = terms
        else:
            probe = min(sweeps, _PROBE_SWEEPS)
            found = [_als(w, *start, probe) for start in (terms, starts.hosvd(rank))]
            errors = [_relative_error(w, *factors) for factors in found]
            best = min(range(len(found)), key=errors.__getitem__)
            (a, b, c), error = found[best], errors[best]
            if sweeps > probe:
                a, b, c = _als(w, a, b, c, sweeps - probe, done=probe)
                error = _relative_error(w, a, b, c)
        a, b, c = _balanced(a, b, c)
        return cls(b.transpose(1, 2), c.transpose(1, 2), a, error, tuple(weight.shape), weight.dtype, weight.device)

    def weights(self) -> tuple[Tensor, Tensor, Tensor]:
        """``(conv_pw, conv_dw, conv_pwl)`` weights in the original dtype and device.

        Shapes: ``(g*R, Cin/g, 1, 1)``, ``(g*R, 1, kh, kw)``, ``(Cout, R, 1, 1)``.
        """
        kernel = self.weight_shape[2:]
        g, r = self.kernel.shape[:2]
        first = self.first.reshape(g * r, -1, 1, 1)
        taps = self.kernel.reshape(g * r, 1, *kernel)
        last = self.last.reshape(-1, r, 1, 1)
        return tuple(t.to(device=self.device, dtype=self.dtype).contiguous() for t in (first, taps, last))  # type: ignore[return-value]


def _pad(t: Tensor, rank: int) -> Tensor:
    """Extra zero terms where a group has fewer SVD terms than ``rank`` (ALS then leaves them at zero)."""
    missing = rank - t.shape[1]
    return t if missing <= 0 else torch.cat([t, t.new_zeros(t.shape[0], missing, t.shape[2])], dim=1)


def _als(w: Tensor, a: Tensor, b: Tensor, c: Tensor, sweeps: int, done: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """Alternating least squares on ``w (g, O, I, K)`` with line search; stops when a sweep gains less than ``_TOL``.

    After each sweep past the second, the step the sweep took is extended
    ``n ** (1 / p)`` times (``n`` the sweep's number counting the ``done``
    ones before this call) and kept if that lowers the error (Bro's
    extrapolation, as in tensorly's ``parafac(linesearch=True)``); after
    ``_LS_FAILS`` refusals ``p`` grows, so the jumps shrink. It costs one
    contraction of ``W`` per sweep and reaches in 10 sweeps the error plain
    ALS reaches in 20-30 on these layers. Every error comes from products at
    hand: ``||W - W_hat||^2 = ||W||^2 - 2 <W, W_hat> + ||W_hat||^2``.
    """
    norm = float(w.square().sum()) or 1.0
    previous = math.inf
    power, refused = 2.0, 0
    for n in range(done + 1, done + sweeps + 1):  # A last: the 1x1 conv with the bias is then the best for the others
        before = a, b, c
        wa = torch.einsum("goik,gor->gikr", w, a)  # A is fixed while B and C are updated: contract it once
        b = _solve(torch.einsum("gikr,gkr->gir", wa, c), _gram(a) * _gram(c))
        c = _solve(torch.einsum("gikr,gir->gkr", wa, b), _gram(a) * _gram(b))
        products = torch.einsum("goik,gir,gkr->gor", w, b, c)
        gbc = _gram(b) * _gram(c)
        a = _solve(products, gbc)
        error = norm - 2 * float((a * products).sum()) + float((gbc * _gram(a)).sum())
        if n > 2:
            jump = n ** (1 / power)
            a2, b2, c2 = (old + (new - old) * jump for new, old in zip((a, b, c), before))
            inner = float((a2 * torch.einsum("goik,gir,gkr->gor", w, b2, c2)).sum())
            extrapolated = norm - 2 * inner + float((_gram(a2) * _gram(b2) * _gram(c2)).sum())
            if extrapolated < error:
                (a, b, c), error = (a2, b2, c2), extrapolated
            elif (refused := refused + 1) == _LS_FAILS:
                power, refused = power + 1, 0
        if previous - error < _TOL * norm:
            break
        previous = error
    return a, b, c


def _gram(f: Tensor) -> Tensor:
    return f.transpose(1, 2) @ f


def _solve(rhs: Tensor, gram: Tensor) -> Tensor:
    """``rhs @ gram^-1`` with a tiny ridge, so terms that are zero (padding) stay zero instead of failing."""
    eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    scale = torch.diagonal(gram, dim1=-2, dim2=-1).mean(-1).clamp_min(1e-300)[:, None, None]
    solved: Tensor = torch.linalg.solve(gram + 1e-12 * scale * eye, rhs.transpose(1, 2)).transpose(1, 2)
    return solved


def _squared_error(w: Tensor, a: Tensor, b: Tensor, c: Tensor) -> float:
    return float((w - torch.einsum("gor,gir,gkr->goik", a, b, c)).square().sum())


def _relative_error(w: Tensor, a: Tensor, b: Tensor, c: Tensor) -> float:
    total = float(w.square().sum())
    return math.sqrt(_squared_error(w, a, b, c) / total) if total > 0 else 0.0


def _balanced(a: Tensor, b: Tensor, c: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Give each term's three factors the same norm, so no factor's magnitude overflows float16/bfloat16."""
    norms = [f.norm(dim=1, keepdim=True) for f in (a, b, c)]
    scale = (norms[0] * norms[1] * norms[2]).pow(1 / 3)
    return tuple(torch.where(n > 0, f / n.clamp_min(1e-300) * scale, f) for f, n in zip((a, b, c), norms))  # type: ignore[return-value]


class CPByRank:
    """The CP factorizations of one weight at any ranks asked for, each computed once, sharing one :class:`CPStarts`.

    Quacks like :class:`~sepify.core.decompose.Factorization` where the audit
    needs it: ``order``, ``max_rank``, ``relative_error(rank)``; ``at(rank)``
    gives the factors. ``work`` is each rank's ALS budget (see :meth:`CPFactorization.of`).
    """

    order = "pw-dw-pw"

    def __init__(self, weight: Tensor, groups: int, work: int = _WORK) -> None:
        self.weight, self.groups, self.work = weight, groups, work
        self._starts: CPStarts | None = None
        out_channels, in_per_group = weight.shape[:2]
        self.max_rank = exact_rank(in_per_group * groups, out_channels, tuple(weight.shape[2:]), groups, self.order)
        self._found: dict[int, CPFactorization] = {}

    def at(self, rank: int) -> CPFactorization:
        if rank not in self._found:
            self._starts = self._starts or CPStarts(self.weight, self.groups)
            self._found[rank] = CPFactorization.of(self.weight, self.groups, rank, self.work, self._starts)
        return self._found[rank]

    def relative_error(self, rank: int) -> float:
        return self.at(rank).relative_error
