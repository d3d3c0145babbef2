"""The least-squares problem behind refinement: a pair's last factor is linear in its
weights given its first factor, so it is fit by ridge regression from accumulated
float64 normal equations (one small regression per group or per output channel).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from sepify.calibrate import lagged
from sepify.core.functional import pad_amounts
from sepify.core.modules import SeparableConv

__all__ = [
    "NormalEquations",
    "BlendPath",
    "KroneckerGram",
    "ridge_cholesky",
    "solve_ridge",
    "add_to_normals",
    "current_weights",
    "set_weights",
    "gram_bytes",
    "regression_count",
    "refit_unsupported",
    "data_free_normals",
]

ALL = slice(None)  # every regression of a pair


class _Settled:
    """A field of :class:`NormalEquations` that first assembles the long-kernel batches still pending."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = "_" + name

    def __get__(self, normal: NormalEquations, owner: type | None = None) -> Tensor | None:
        normal._settle()
        value: Tensor | None = getattr(normal, self.name)
        return value

    def __set__(self, normal: NormalEquations, value: Tensor | None) -> None:
        normal._settle()
        setattr(normal, self.name, value)


class _SettledGram(_Settled):
    """The Gram matrix: also formed from its known structure (:class:`KroneckerGram`) when first read."""

    def __get__(self, normal: NormalEquations, owner: type | None = None) -> Tensor | None:
        if normal._gram is None and normal.kronecker is not None:
            normal._gram = normal.kronecker.dense()
        return super().__get__(normal, owner)

    def __set__(self, normal: NormalEquations, value: Tensor | None) -> None:
        normal.kronecker = None  # whatever was known of the old matrix
        super().__set__(normal, value)


class NormalEquations:
    """Accumulates X^T X, X^T Y and ||Y||^2 for batched regressions ``(B, f) -> (B, o)``."""

    gram = _SettledGram()
    cross = _Settled()
    yy = _Settled()

    def __init__(self) -> None:
        self._gram: Tensor | None = None
        self._cross: Tensor | None = None
        self._yy: Tensor | None = None
        self._sequences: lagged.SequenceSums | None = None  # long-kernel batches, assembled when first read
        # what `gram` is known to be, for a cheaper factorisation (pw-dw's data-free equations; dropped on add)
        self.kronecker: KroneckerGram | None = None

    def add(self, x: Tensor, y: Tensor) -> None:
        """``x``: (B, M, f) features, ``y``: (B, M, o) targets, M samples per regression."""
        x, y = x.double(), y.double()
        self.add_normals(x.transpose(1, 2) @ x, x.transpose(1, 2) @ y, y.square().sum((1, 2)))

    def add_normals(self, g: Tensor, c: Tensor, t: Tensor) -> None:
        """Add one batch's ``X^T X`` (B, f, f), ``X^T Y`` (B, f, o) and ``||Y||^2`` (B,), already computed."""
        self._settle()
        gram, self.kronecker = self.gram, None  # a structured matrix is formed before anything is added to it
        self._gram = g if gram is None else gram + g
        self._cross = c if self._cross is None else self._cross + c
        self._yy = t if self._yy is None else self._yy + t

    def add_sequences(self, u: Tensor, y: Tensor, *, kernel: int, stride: int, dilation: int, bias: bool) -> None:
        """Add one batch of a 1-D depthwise conv's regressions, in the form of :func:`lagged.sequence_normals`.

        Batches of one conv are summed as correlations and assembled into
        normal equations once, when they are first read (the assembly costs
        as much as a batch's correlations).
        """
        sums = self._sequences
        if sums is not None and not sums.accepts(u, kernel=kernel, stride=stride, dilation=dilation, bias=bias):
            self._settle()
        if self._sequences is None:
            self._sequences = lagged.SequenceSums(kernel=kernel, stride=stride, dilation=dilation, bias=bias)
        self._sequences.add(u, y)

    def _settle(self) -> None:
        if self._sequences is not None:
            sums, self._sequences = self._sequences, None
            self.add_normals(*sums.normals())

    def blended(self, other: NormalEquations, share: float) -> NormalEquations:
        """These equations plus ``other``'s, scaled so that ``other``'s targets carry ``share`` of this energy.

        Each regression is scaled on its own (its target energies matched).
        """
        assert self.gram is not None and self.cross is not None and self.yy is not None
        assert other.gram is not None and other.cross is not None and other.yy is not None
        scale = share * self.yy / other.yy.clamp_min(1e-300)
        out = NormalEquations()
        out.gram = self.gram + scale[:, None, None] * other.gram
        out.cross = self.cross + scale[:, None, None] * other.cross
        out.yy = self.yy + scale * other.yy
        return out

    def error(self, w: Tensor) -> float:
        """Total squared residual ||X W - Y||^2 of weights ``w`` (B, f, o)."""
        assert self.gram is not None and self.cross is not None and self.yy is not None
        quad = (w * (self.gram @ w)).sum()
        return float(quad - 2 * (w * self.cross).sum() + self.yy.sum())


class BlendPath:
    """Every solution of the data's equations blended with the data-free ones, from one factorisation.

    ``data.blended(free, share)`` has matrix ``A + c B`` and right-hand side
    ``a + c b`` with ``c = share * ratio`` per regression. One generalised
    eigendecomposition ``V^T A V = diag(mu)``, ``V^T B V = I`` (``B``
    positive definite: the data-free Gram matrix, a jitter of 1e-10 of its
    mean diagonal added) gives the solution at any share in ``O(f^2)``:
    ``w = V (V^T a + c V^T b) / (mu + c)``. A share search then costs one
    factorisation instead of one per share.

    >>> import torch
    >>> _ = torch.manual_seed(0)
    >>> data, free = NormalEquations(), NormalEquations()
    >>> x, z = torch.randn(1, 50, 3), torch.randn(1, 50, 3)
    >>> data.add(x, x @ torch.ones(1, 3, 1)); free.add(z, z @ torch.full((1, 3, 1), 2.0))
    >>> path = BlendPath.of(data, free)
    >>> [round(v, 4) for v in path.solve(1e-9).flatten().tolist()]  # almost the data's own least squares
    [1.0, 1.0, 1.0]
    >>> [round(v, 4) for v in path.solve(1e9).flatten().tolist()]  # almost the data-free one
    [2.0, 2.0, 2.0]
    """

    def __init__(self, values: Tensor, vectors: Tensor, data: Tensor, free: Tensor, ratio: Tensor) -> None:
        self.values, self.vectors, self.data, self.free, self.ratio = values, vectors, data, free, ratio

    @classmethod
    def of(cls, data: NormalEquations, free: NormalEquations) -> BlendPath | None:
        """The path between ``data`` and ``free``; None if the data-free equations are not positive definite."""
        assert data.gram is not None and data.cross is not None and data.yy is not None
        assert free.cross is not None and free.yy is not None
        factor: _DenseFactor | _KroneckerFactor | None
        if free.kronecker is not None:  # never formed as a dense matrix
            factor = free.kronecker.factor()
        else:
            assert free.gram is not None
            factor = _DenseFactor.of(free.gram)
        if factor is None:
            return None
        inner = factor.solve(data.gram)
        whitened = factor.solve(inner.mT)  # L^-1 A L^-T
        del inner
        values, vectors = torch.linalg.eigh(whitened)  # reads the lower triangle: no symmetrised copy needed
        del whitened
        vectors = factor.solve(vectors, transpose=True)  # V = L^-T U
        return cls(
            values.clamp_min(0),  # A is positive semi-definite: below zero is rounding
            vectors,
            vectors.mT @ data.cross,
            vectors.mT @ free.cross,
            data.yy / free.yy.clamp_min(1e-300),  # a share is relative to the data's target energy
        )

    def solve(self, share: float) -> Tensor:
        """The solution of ``data.blended(free, share)`` (regressions, features, outputs)."""
        c = (share * self.ratio)[:, None, None]
        solution: Tensor = self.vectors @ ((self.data + c * self.free) / (self.values[..., None] + c))
        return solution

    def coverage(self) -> float:
        """How much of a layer's input space the calibration data spans: 1.0 for white input, near 0 for narrow data.

        ``mu`` are the eigenvalues of the data's Gram matrix whitened by the
        data-free one (white input), so the effective rank (exponential of the
        entropy) of the normalised ``mu`` divided by the number of features
        measures it; the mean over the regressions. (A constant feature counts
        as one: against zero-mean white input it carries as much as any other.)
        """
        p = self.values / self.values.sum(-1, keepdim=True).clamp_min(1e-300)
        entropy = -(p * p.clamp_min(1e-300).log()).sum(-1)
        return float((entropy.exp() / self.values.shape[-1]).mean())


def _shifted_cholesky(gram: Tensor, shift: Tensor) -> Tensor | None:
    """The Cholesky factor of ``gram`` with ``shift`` (B, f) added to its diagonal; None unless positive definite.

    The shift goes onto the diagonal in place and the diagonal is put back
    exactly: a copy of the Gram matrices (a part's largest tensors) cost a
    tenth of a long-kernel refit's time, and a ``diag_embed`` as much memory.
    """
    diagonal = torch.diagonal(gram, dim1=-2, dim2=-1)
    kept = diagonal.clone()
    try:
        diagonal.add_(shift)
        factor, info = torch.linalg.cholesky_ex(gram)
    finally:
        diagonal.copy_(kept)
    return None if bool((info != 0).any()) else factor


_JITTER = 1e-10  # of the mean diagonal, added to a data-free Gram matrix's diagonal before it is factorised


class _DenseFactor:
    """The Cholesky factor ``L`` of a Gram matrix plus a jitter on its diagonal, and solves with it."""

    def __init__(self, lower: Tensor) -> None:
        self.lower = lower

    @classmethod
    def of(cls, gram: Tensor) -> _DenseFactor | None:
        """None unless ``gram`` plus the jitter is positive definite."""
        jitter = torch.diagonal(gram, dim1=-2, dim2=-1).mean(-1).clamp_min(1e-300) * _JITTER
        lower = _shifted_cholesky(gram, jitter[:, None])
        return None if lower is None else cls(lower)

    def solve(self, x: Tensor, transpose: bool = False) -> Tensor:
        """``L^-1 x``, or ``L^-T x`` with ``transpose``."""
        solved: Tensor = torch.linalg.solve_triangular(self.lower.mT if transpose else self.lower, x, upper=transpose)
        return solved


@dataclass(frozen=True)
class KroneckerGram:
    """A Gram matrix ``kron(small, I_taps)``, with the constant feature's diagonal ``1`` last if ``bias``.

    What a pw-dw refit's data-free equations are: against white input the
    pointwise outputs are uncorrelated from tap to tap, so features ``(k, t)``
    correlate as ``small[k, l]`` at equal taps and not at all otherwise. Its
    Cholesky factor is ``kron(chol(small), I_taps)``: a long kernel's
    ``(r K)^3`` triangular solves become ``r^3 K^2``.
    """

    small: Tensor  # (B, r, r)
    taps: int
    bias: bool

    def dense(self) -> Tensor:
        """The matrix itself, ``(B, r * taps (+ 1), r * taps (+ 1))``."""
        batch, r = self.small.shape[:2]
        eye = torch.eye(self.taps, dtype=self.small.dtype, device=self.small.device)
        gram = torch.einsum("bkl,tu->bktlu", self.small, eye).reshape(batch, r * self.taps, r * self.taps)
        if self.bias:
            gram = torch.nn.functional.pad(gram, (0, 1, 0, 1))
            gram[:, -1, -1] = 1.0
        return gram

    def factor(self) -> _KroneckerFactor | None:
        """The factor with the jitter :class:`_DenseFactor` adds; None unless positive definite."""
        trace = torch.diagonal(self.small, dim1=-2, dim2=-1).sum(-1) * self.taps + (1 if self.bias else 0)
        mean = trace / (self.small.shape[-1] * self.taps + (1 if self.bias else 0))
        jitter = mean.clamp_min(1e-300) * _JITTER
        eye = torch.eye(self.small.shape[-1], dtype=self.small.dtype, device=self.small.device)
        lower, info = torch.linalg.cholesky_ex(self.small + jitter[:, None, None] * eye)
        if bool((info != 0).any()):
            return None
        return _KroneckerFactor(_DenseFactor(lower), self.taps, (1 + jitter).sqrt() if self.bias else None)


class _KroneckerFactor:
    """``kron(M, I_taps)`` (and the constant feature's ``sqrt(1 + jitter)``), solved without forming it."""

    def __init__(self, small: _DenseFactor, taps: int, bias: Tensor | None) -> None:
        self.small, self.taps, self.bias = small, taps, bias

    def solve(self, x: Tensor, transpose: bool = False) -> Tensor:
        """``L^-1 x``, or ``L^-T x`` with ``transpose``, as :meth:`_DenseFactor.solve`."""
        batch, rows, columns = x.shape
        r = self.small.lower.shape[-1]
        main = x[:, : r * self.taps].reshape(batch, r, self.taps * columns)
        main = self.small.solve(main, transpose).reshape(batch, r * self.taps, columns)
        if self.bias is None:
            return main
        return torch.cat([main, x[:, r * self.taps :] / self.bias[:, None, None]], dim=1)


def ridge_cholesky(gram: Tensor, ridge: float, bias: int | None = None) -> Tensor | None:
    """The Cholesky factor of ``gram`` with ``ridge`` times each regression's mean diagonal added to its diagonal;
    None unless positive definite.

    Feature ``bias`` (the constant one, if any) is never shrunk: it gets only the 1e-12 jitter every feature gets,
    which keeps the factorisation defined.
    """
    scale = torch.diagonal(gram, dim1=-2, dim2=-1).mean(-1).clamp_min(1e-12)  # (B,)
    shrink = torch.full((gram.shape[-1],), ridge + 1e-12, dtype=gram.dtype, device=gram.device)
    if bias is not None:
        shrink[bias] = 1e-12
    return _shifted_cholesky(gram, scale[:, None] * shrink)


def solve_ridge(normal: NormalEquations, ridge: float, free_last: bool) -> Tensor | None:
    """Ridge solution by Cholesky (the regularised Gram is symmetric positive definite); None if it is not."""
    assert normal.gram is not None and normal.cross is not None
    factor = ridge_cholesky(normal.gram, ridge, -1 if free_last else None)
    if factor is None:
        return None
    # two triangular solves: the same numbers as cholesky_solve, several times faster on CPU batches
    half = torch.linalg.solve_triangular(factor, normal.cross, upper=False)
    solution: Tensor = torch.linalg.solve_triangular(factor.mT, half, upper=True)
    return solution


# -- features of each pair kind ------------------------------------------------------


def _pw_features(pair: SeparableConv, x: Tensor) -> tuple[Tensor, int]:
    """dw-pw and pw-dw-pw (last conv pointwise): per group, pixels x (its input channels [+ 1]); (B=groups, M, f), f."""
    z = pair.before_last(x)  # (N, channels, H', W')
    g = pair.groups
    n, ch = z.shape[:2]
    feats = z.reshape(n, g, ch // g, -1).permute(1, 0, 3, 2).reshape(g, -1, ch // g)
    if pair.last.bias is not None:
        feats = torch.cat([feats, torch.ones_like(feats[..., :1])], dim=-1)
    return feats, ch // g


def _pw_targets(pair: SeparableConv, y: Tensor) -> Tensor:
    g = pair.groups
    n, cout = y.shape[:2]
    return y.reshape(n, g, cout // g, -1).permute(1, 0, 3, 2).reshape(g, -1, cout // g)


def refit_unsupported(pair: SeparableConv) -> str | None:
    """Why the refit cannot handle ``pair`` (None when it can): a pw-dw refit unfolds the input into patches,
    which sepify does for 1-D and 2-D convs, not for 3-D or transposed ones."""
    if _pointwise_last(pair) or (pair.dims in (1, 2) and not pair.transposed):
        return None
    kind = f"{'transposed ' if pair.transposed else ''}{pair.dims}-D"
    return f"refitting a {kind} pw-dw pair is not supported (its closed-form initialisation is kept); dw-pw is"


def _padded_pointwise(pair: SeparableConv, x: Tensor, channels: slice = ALL) -> Tensor:
    """pw-dw: the pointwise conv's output for the depthwise conv's output ``channels`` (their ``rank`` inputs
    each), padded as the depthwise conv pads it."""
    conv, pw, r = pair.conv_dw, pair.conv_pw, pair.rank
    start, stop, _ = channels.indices(conv.out_channels)
    rows = slice(start * r, stop * r)
    u: Tensor  # (N, channels * r, H, W) or (N, channels * r, L)
    if pw.groups == 1:  # only the rows wanted: a part of a refit computes its own share
        u = pw._conv_forward(x, pw.weight[rows], None if pw.bias is None else pw.bias[rows])
    else:
        u = pw(x)[:, rows]
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str) or any(conv.padding):
        mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
        u = F.pad(u, pad_amounts(conv), mode=mode)
    return u


def _dw_features(pair: SeparableConv, x: Tensor) -> Tensor:
    """pw-dw: per output channel, output pixels x (r * kernel taps [+ 1]); (B=Cout, M, f)."""
    conv = pair.conv_dw
    u = _padded_pointwise(pair, x)
    if pair.dims == 1:  # a 1-D conv is a 2-D conv over (1, L)
        cols = F.unfold(u[:, :, None], (1, *conv.kernel_size), dilation=(1, *conv.dilation), stride=(1, *conv.stride))
    else:
        cols = F.unfold(u, conv.kernel_size, dilation=conv.dilation, stride=conv.stride)  # (N, Cout*r*K, L)
    cout = conv.out_channels
    n = cols.shape[0]
    feats = cols.reshape(n, cout, -1, cols.shape[-1]).permute(1, 0, 3, 2).reshape(cout, -1, cols.shape[1] // cout)
    if conv.bias is not None:
        feats = torch.cat([feats, torch.ones_like(feats[..., :1])], dim=-1)
    return feats


def _lagged_axis(pair: SeparableConv) -> int | None:
    """The one spatial axis along which a pw-dw pair's depthwise kernel is long (every other axis has one tap),
    or None: then its normal equations come from correlations (:mod:`sepify.calibrate.lagged`)."""
    if _pointwise_last(pair) or pair.transposed:
        return None
    kernel = pair.conv_dw.kernel_size
    long = [axis for axis, taps in enumerate(kernel) if taps > 1]
    return long[0] if len(long) == 1 and kernel[long[0]] >= lagged.LAGGED_MIN_TAPS else None


def _add_sequences(
    normal: NormalEquations, pair: SeparableConv, x: Tensor, y: Tensor, axis: int, channels: slice = ALL
) -> None:
    """Add one batch of a pw-dw pair's regressions along ``axis`` for output ``channels`` to ``normal`` as
    correlations; the other axis (2-D, one tap) becomes part of the batch."""
    conv = pair.conv_dw
    u = _padded_pointwise(pair, x, channels)
    y = y[:, channels]
    n, cout, r = u.shape[0], y.shape[1], pair.rank
    u = u.reshape(n, cout, r, *u.shape[2:])
    if pair.dims == 2:
        other = 1 - axis
        u = u.narrow(3 + other, 0, (u.shape[3 + other] - 1) // conv.stride[other] * conv.stride[other] + 1)
        u = u[:, :, :, :: conv.stride[0]] if other == 0 else u[..., :: conv.stride[1]]
        u = u.movedim(3 + other, 1).flatten(0, 1)  # (N * other, Cout, r, L)
        y = y.movedim(2 + other, 1).flatten(0, 1)  # (N * other, Cout, T)
    normal.add_sequences(
        u,
        y,
        kernel=conv.kernel_size[axis],
        stride=conv.stride[axis],
        dilation=conv.dilation[axis],
        bias=conv.bias is not None,
    )


def _dw_targets(y: Tensor) -> Tensor:
    n, cout = y.shape[:2]
    return y.reshape(n, cout, -1).permute(1, 0, 2).reshape(cout, -1, 1)


def _pointwise_last(pair: SeparableConv) -> bool:
    return pair.order in ("dw-pw", "pw-dw-pw")


def current_weights(pair: SeparableConv) -> Tensor:
    """The refit factor's current weights in regression layout (B, f, o)."""
    if _pointwise_last(pair):
        w = pair.last.weight.detach()  # (Cout, channels/g, 1, 1)
        g = pair.groups
        cout, f = w.shape[:2]
        w = w.reshape(g, cout // g, f).transpose(1, 2)
        if pair.last.bias is not None:
            b = pair.last.bias.detach().reshape(g, 1, cout // g)
            w = torch.cat([w, b], dim=1)
        return w.double()
    w = pair.conv_dw.weight.detach()  # (Cout, r, *kernel)
    cout = w.shape[0]
    w = w.reshape(cout, -1, 1)
    if pair.conv_dw.bias is not None:
        w = torch.cat([w, pair.conv_dw.bias.detach().reshape(cout, 1, 1)], dim=1)
    return w.double()


def set_weights(pair: SeparableConv, w: Tensor) -> None:
    with torch.no_grad():
        if _pointwise_last(pair):
            conv = pair.last
            if conv.bias is not None:
                conv.bias.copy_(w[:, -1, :].reshape(-1))
                w = w[:, :-1, :]
            conv.weight.copy_(w.transpose(1, 2).reshape(conv.weight.shape))
        else:
            conv = pair.conv_dw
            if conv.bias is not None:
                conv.bias.copy_(w[:, -1, 0])
                w = w[:, :-1, :]
            conv.weight.copy_(w.reshape(conv.weight.shape))


def add_to_normals(
    normal: NormalEquations, pair: SeparableConv, x: Tensor, y: Tensor, regressions: slice = ALL
) -> None:
    """One batch of the pair's regression: its input ``x`` and the original layer's output ``y``.

    ``regressions``: only these of the pair's regressions (groups, or output
    channels for pw-dw), so that a large refit can be done a part at a time.
    """
    if _pointwise_last(pair):
        feats, _ = _pw_features(pair, x)
        normal.add(feats[regressions], _pw_targets(pair, y)[regressions])
    elif (axis := _lagged_axis(pair)) is not None:
        _add_sequences(normal, pair, x, y, axis, regressions)
    else:
        normal.add(_dw_features(pair, x)[regressions], _dw_targets(y)[regressions])


def regression_count(pair: SeparableConv) -> int:
    """How many independent regressions the refit of ``pair`` solves (groups, or output channels for pw-dw)."""
    return pair.groups if _pointwise_last(pair) else pair.conv_dw.out_channels


def gram_bytes(pair: SeparableConv) -> int:
    """Bytes of the float64 Gram matrices the refit of ``pair`` accumulates."""
    if _pointwise_last(pair):
        f = pair.last.in_channels // pair.groups + 1
        return pair.groups * f * f * 8
    f = pair.conv_dw.in_channels // pair.conv_dw.out_channels * math.prod(pair.conv_dw.kernel_size) + 1
    return pair.conv_dw.out_channels * f * f * 8


def data_free_normals(
    pair: SeparableConv, weight: Tensor, bias: Tensor | None, regressions: slice = ALL
) -> NormalEquations:
    """The normal equations of the pair's refit for white input: what the weights alone say.

    For input patches with identity covariance (and zero mean), the best last
    factor reproduces ``weight`` as closely as the first factors allow, which
    is the closed-form initialisation. Blending these equations into the
    data's (:meth:`NormalEquations.blended`) keeps the directions that the
    calibration data hardly covers where the weights put them, so that narrow
    data cannot pull a layer far from what the weights say. ``regressions``:
    only these, as in :func:`add_to_normals`.
    """
    w = weight.detach().double()
    g = pair.groups
    normal = NormalEquations()
    if _pointwise_last(pair):
        # (g, f, Cin/g * K): the linear map from a patch to the last conv's input
        first = _before_last_map(pair)[regressions]
        target = w.reshape(g, w.shape[0] // g, -1)[regressions]  # (g, Cout/g, Cin/g * K)
        normal.gram, normal.cross = first @ first.transpose(1, 2), first @ target.transpose(1, 2)
        normal.yy = target.square().sum((1, 2))
        last_bias = bias.detach().double().reshape(g, 1, -1)[regressions] if bias is not None else None
    else:  # pw-dw: per output channel o, features (k, t) = sum_i P[o*r+k, i] x[i, t]
        cout, r = pair.conv_dw.out_channels, pair.rank
        taps = math.prod(pair.kernel_size)
        p = pair.conv_pw.weight.detach().double().reshape(cout, r, -1)[regressions]  # (Cout, r, Cin/g)
        w = w.reshape(cout, -1, taps)[regressions]
        cout = p.shape[0]
        # Features (k, t) = sum_i P[o*r+k, i] x[i, t]: uncorrelated across taps, so the Gram matrix is
        # kron(P P^T, I_taps), the constant feature's 1 appended; kept in that form (formed only if read).
        normal.kronecker = KroneckerGram(p @ p.mT, taps, pair.last.bias is not None)
        normal.cross = torch.einsum("oki,oit->okt", p, w).reshape(cout, r * taps, 1)
        normal.yy = w.reshape(cout, -1).square().sum(1)
        last_bias = bias.detach().double().reshape(-1, 1, 1)[regressions] if bias is not None else None
    if pair.last.bias is not None:  # the constant feature: mean 0 against white input, so only the bias fits it
        cross = normal.cross
        b = last_bias if last_bias is not None else cross.new_zeros(cross.shape[0], 1, cross.shape[2])
        if normal.kronecker is None:
            assert normal.gram is not None
            normal.gram = torch.nn.functional.pad(normal.gram, (0, 1, 0, 1))
            normal.gram[:, -1, -1] = 1.0
        normal.cross = torch.cat([cross, b], dim=1)
        normal.yy = normal.yy + b.square().sum((1, 2))
    return normal


def _before_last_map(pair: SeparableConv) -> Tensor:
    """Per group, the linear map from an input patch (Cin/g channels x K taps) to the last conv's input channels."""
    g, taps = pair.groups, math.prod(pair.kernel_size)
    dw = pair.depthwise_taps().detach().double().reshape(-1, taps)  # one row of taps per depthwise channel
    if pair.order == "pw-dw-pw":
        pw = pair.conv_pw.weight.detach().double().reshape(g, pair.rank, -1)  # (g, R, Cin/g)
        return torch.einsum("gri,grt->grit", pw, dw.reshape(g, pair.rank, taps)).reshape(g, pair.rank, -1)
    cin, r = pair.conv_dw.in_channels, pair.rank  # dw-pw: channel i*r + k filters input channel i
    per_group = cin // g
    rows = dw.reshape(g, per_group, r, taps)
    eye = torch.eye(per_group, dtype=torch.float64, device=dw.device)
    return torch.einsum("gikt,ij->gikjt", rows, eye).reshape(g, per_group * r, per_group * taps)
