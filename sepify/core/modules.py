"""``SeparableConv``: the depthwise + pointwise structure that replaces a convolution of any kind.

One class does the work for every dimensionality and for transposed convs;
six thin subclasses name the kind (``SeparableConv1d`` ... ``SeparableConv3d``,
``SeparableConvTranspose1d`` ... ``SeparableConvTranspose3d``) so that a
printed model says what each pair replaced. :meth:`SeparableConv.from_conv`
picks the subclass from the conv.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from math import prod
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from sepify.core.cost import ORDERS, conv_macs, exact_rank, separable_macs
from sepify.core.cp import CPFactorization
from sepify.core.decompose import Factorization, merge_separable_weight
from sepify.core.functional import ConvLayer, SameConv2d, canonical_weight, conv_like, is_transposed, layer_weight
from sepify.errors import ConfigError, ModelError
from sepify.vocab import LAYOUTS

__all__ = [
    "SeparableConv",
    "SeparableConv1d",
    "SeparableConv2d",
    "SeparableConv3d",
    "SeparableConvTranspose1d",
    "SeparableConvTranspose2d",
    "SeparableConvTranspose3d",
    "pair_class",
    "dense_kernels",
    "LAYOUTS",
]

# Within `dense_kernels`, a pair runs as its dense kernel where that costs at most this many times its own MACs. On
# CPU (oneDNN, 1 thread; docs/benchmarks.md, "Refinement on long kernels") the dense conv was faster at up to 4x the
# MACs (a depthwise conv1d with 39-64 taps: 7.8-17x slower than the dense conv at 1-1.9x its MACs) and slower beyond
# 4.3x (crepe's (64, 1) kernels at rank 4, 5.3x the MACs: 5x slower).
DENSE_MAC_RATIO = 3.0

# A dense weight assigned to a pair within this relative residual of its kernel scaled per output channel is
# folded into its last conv (float32 round-off of BatchNorm folding is ~1e-7).
_FOLD_TOLERANCE = 1e-5

_CONVS: dict[int, type[nn.Module]] = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_CONVS_T: dict[int, type[nn.Module]] = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}


class SeparableConv(nn.Module):
    """Depthwise and pointwise (1x1) convs standing in for one convolution.

    The children are named ``conv_dw`` and ``conv_pw`` (and ``conv_pwl``, the
    last pointwise conv of the bottleneck, as in timm) so that state_dict keys
    read like ``layer1.0.conv1.conv_dw.weight``; ``order`` says which runs first:

    * ``"dw-pw"`` (MobileNet): ``conv_dw`` has ``Cin*rank`` outputs and
      ``groups=Cin`` and carries the original stride, padding, dilation and
      padding mode; ``conv_pw`` maps to ``Cout`` with the original ``groups``
      and bias.
    * ``"pw-dw"`` (blueprint): ``conv_pw`` expands to ``Cout*rank`` channels
      with the original ``groups``; ``conv_dw`` reduces each run of ``rank``
      channels to one output (``groups=Cout``), carries the spatial settings
      and the bias.
    * ``"pw-dw-pw"`` (bottleneck, a CP decomposition; :mod:`sepify.core.cp`):
      ``conv_pw`` maps ``Cin`` to ``groups*rank`` channels, ``conv_dw`` is a
      depthwise conv on them with the spatial settings, ``conv_pwl`` maps them
      to ``Cout`` with the bias. ``rank`` is the bottleneck width per group.

    For a transposed conv the depthwise child is a depthwise *transposed*
    conv (with the stride, padding, output padding and dilation) and the
    pointwise children are ordinary 1x1 convs; every order stays exact,
    because a pointwise map commutes with a per-channel transposed conv.
    ``forward`` then takes the transposed conv's optional ``output_size``.

    Build one from a trained conv with :meth:`from_conv`.

    Examples:
        >>> conv = nn.Conv2d(16, 32, 3, padding=1)
        >>> sep = SeparableConv.from_conv(conv, rank="full")
        >>> x = torch.randn(2, 16, 8, 8)
        >>> torch.allclose(sep(x), conv(x), atol=1e-5)
        True
        >>> type(sep).__name__, sep.rank, sep.conv_dw.weight.shape
        ('SeparableConv2d', 9, torch.Size([144, 1, 3, 3]))
        >>> up = nn.ConvTranspose1d(8, 4, 4, stride=2, padding=1)
        >>> z = torch.randn(1, 8, 10)
        >>> torch.allclose(SeparableConv.from_conv(up, "full")(z), up(z), atol=1e-5)
        True
    """

    dims: ClassVar[int] = 2
    transposed: ClassVar[bool] = False
    # Set on an instance only within `dense_kernels` (a class default, so models pickled before it existed load).
    _run_dense: bool = False

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, ...],
        stride: int | tuple[int, ...] = 1,
        padding: str | int | tuple[int, ...] = 0,
        dilation: int | tuple[int, ...] = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        *,
        output_padding: int | tuple[int, ...] = 0,
        rank: int = 1,
        order: str = "dw-pw",
        same_padding: bool = False,
        static_pad: tuple[int, ...] | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if order not in ORDERS:
            raise ConfigError(f"order must be one of {ORDERS}, got {order!r}")
        if in_channels % groups or out_channels % groups:
            raise ConfigError(
                f"in_channels ({in_channels}) and out_channels ({out_channels}) must be divisible by groups ({groups})"
            )
        if rank < 1:
            raise ConfigError(f"rank must be >= 1, got {rank}")
        if same_padding and (self.dims != 2 or self.transposed):
            raise ConfigError("same_padding (TensorFlow's dynamic SAME padding) is for 2-D convs only")
        dd: dict[str, Any] = {"device": device, "dtype": dtype}
        spatial: dict[str, Any] = {
            "kernel_size": kernel_size,
            "stride": stride,
            "padding": padding,
            "dilation": dilation,
            "padding_mode": padding_mode,
        }
        if self.transposed:
            spatial["output_padding"] = output_padding
        self.order = order
        self.rank = rank
        self.groups = groups
        # How the depthwise step runs at rank > 1 (see `layouts`), set once the children exist. Not a
        # parameter: state_dict is the same for every layout.
        self._layout = "grouped"
        # With TF-style "SAME" padding (timm's Conv2dSame; fixed amounts with static_pad, smp's static variant) only
        # the spatial conv pads: a bias-free 1x1 conv before it commutes with zero padding, so every order is exact.
        spatial_conv: Any = (
            _CONVS_T[self.dims] if self.transposed else SameConv2d if same_padding else _CONVS[self.dims]
        )
        point_conv: Any = _CONVS[self.dims]
        self.conv_dw: ConvLayer
        self.conv_pw: ConvLayer
        self.conv_pwl: ConvLayer
        if order == "dw-pw":
            self.conv_dw = spatial_conv(
                in_channels, in_channels * rank, groups=in_channels, bias=False, **spatial, **dd
            )
            self.conv_pw = point_conv(in_channels * rank, out_channels, 1, groups=groups, bias=bias, **dd)
        elif order == "pw-dw":
            self.conv_pw = point_conv(in_channels, out_channels * rank, 1, groups=groups, bias=False, **dd)
            self.conv_dw = spatial_conv(
                out_channels * rank, out_channels, groups=out_channels, bias=bias, **spatial, **dd
            )
        else:
            width = groups * rank
            self.conv_pw = point_conv(in_channels, width, 1, groups=groups, bias=False, **dd)
            self.conv_dw = spatial_conv(width, width, groups=width, bias=False, **spatial, **dd)
            self.conv_pwl = point_conv(width, out_channels, 1, groups=groups, bias=bias, **dd)
        if isinstance(self.conv_dw, SameConv2d):
            self.conv_dw.static_pad = None if static_pad is None else tuple(static_pad)
        self._layout = self.default_layout

    @classmethod
    def from_conv(
        cls,
        conv: ConvLayer,
        rank: int | str = 1,
        order: str = "dw-pw",
        *,
        factorization: Factorization | CPFactorization | None = None,
    ) -> SeparableConv:
        """Build the structure that best approximates ``conv`` at ``rank``.

        Args:
            conv: a ``nn.Conv1d/2d/3d`` or ``nn.ConvTranspose1d/2d/3d`` (any
                stride, padding incl. ``"same"``, padding mode, output
                padding, dilation, groups, bias, floating dtype).
            rank: an int ``>= 1`` (capped at the exact rank for ``order``) or
                ``"full"`` for the exact rank, where the pair reproduces the
                conv's output to float tolerance.
            order: ``"dw-pw"``, ``"pw-dw"`` or ``"pw-dw-pw"``.
            factorization: the canonical weight's :class:`Factorization` in
                ``order`` (or, for pw-dw-pw, its :class:`CPFactorization` at
                ``rank``) if the caller already computed it.

        Returns:
            The pair class for ``conv``'s kind (:func:`pair_class`) on its
            device and dtype, in its train/eval mode, with ``requires_grad``
            copied from ``conv.weight``.
        """
        if order not in ORDERS:
            raise ConfigError(f"order must be one of {ORDERS}, got {order!r}")
        kernel = tuple(conv.kernel_size)
        limit = exact_rank(conv.in_channels, conv.out_channels, kernel, conv.groups, order)
        if rank == "full":
            r = limit
        elif isinstance(rank, int) and not isinstance(rank, bool) and rank >= 1:
            r = min(rank, limit)
        else:
            raise ConfigError(f"rank must be a positive int or 'full', got {rank!r}")
        weight = conv.weight
        assert isinstance(weight, Tensor)
        sep = cls.shaped_like(conv, r, order)
        with torch.no_grad():
            for child, value in zip(sep._factor_convs(), _factor_weights(conv, r, order, factorization)):
                child.weight.copy_(value.reshape(child.weight.shape))
            if conv.bias is not None:
                assert sep.last.bias is not None  # built with bias above
                sep.last.bias.copy_(conv.bias)
        for p in sep.parameters():
            p.requires_grad_(weight.requires_grad)
        return sep

    @classmethod
    def shaped_like(cls, conv: ConvLayer, rank: int, order: str) -> SeparableConv:
        """An uninitialised pair with ``conv``'s geometry, device, dtype and train/eval mode.

        For loading saved weights into; :meth:`from_conv` fills it from the conv.
        """
        target = pair_class(conv)
        if cls is not SeparableConv and cls is not target:
            raise ConfigError(f"{cls.__name__} cannot stand in for a {type(conv).__name__}; use {target.__name__}")
        weight = conv.weight
        assert isinstance(weight, Tensor)
        extra: dict[str, Any] = {"output_padding": tuple(conv.output_padding)} if target.transposed else {}
        sep = target(
            conv.in_channels,
            conv.out_channels,
            tuple(conv.kernel_size),
            stride=tuple(conv.stride),
            padding=conv.padding,
            dilation=tuple(conv.dilation),
            groups=conv.groups,
            bias=conv.bias is not None,
            padding_mode=conv.padding_mode,
            rank=rank,
            order=order,
            same_padding=isinstance(conv, SameConv2d),
            static_pad=getattr(conv, "static_pad", None),
            device=weight.device,
            dtype=weight.dtype,
            **extra,
        )
        sep.train(conv.training)
        return sep

    @property
    def convs(self) -> tuple[ConvLayer, ...]:
        """The children in the order they run."""
        if self.order == "dw-pw":
            return (self.conv_dw, self.conv_pw)
        if self.order == "pw-dw":
            return (self.conv_pw, self.conv_dw)
        return (self.conv_pw, self.conv_dw, self.conv_pwl)

    def _factor_convs(self) -> tuple[ConvLayer, ...]:
        """The children in the order :func:`_factor_weights` returns their weights."""
        return self.convs if self.order == "pw-dw-pw" else (self.conv_dw, self.conv_pw)

    @property
    def last(self) -> ConvLayer:
        """The conv that runs last and holds the bias (the one refinement refits)."""
        return self.convs[-1]

    def before_last(self, x: Tensor) -> Tensor:
        """The input of :attr:`last` for the pair's input ``x``."""
        for conv in self.convs[:-1]:
            x = conv(x)
        return x

    @property
    def in_channels(self) -> int:
        return self.convs[0].in_channels

    @property
    def out_channels(self) -> int:
        return self.last.out_channels

    @property
    def kernel_size(self) -> tuple[int, ...]:
        return tuple(self.conv_dw.kernel_size)

    # What code commonly reads from the conv a pair replaced (HF's patch embeddings read `projection.weight.dtype`,
    # builders read `out_channels` or `stride`): the spatial settings are the depthwise conv's, and `weight` is the
    # dense kernel the pair computes. It is a computed, detached tensor, not a parameter: reading it is exact,
    # training it does nothing; state_dict and parameters() hold only the factors.

    @property
    def stride(self) -> tuple[int, ...]:
        return tuple(self.conv_dw.stride)

    @property
    def padding(self) -> str | tuple[int, ...]:
        return self.conv_dw.padding

    @property
    def dilation(self) -> tuple[int, ...]:
        return tuple(self.conv_dw.dilation)

    @property
    def padding_mode(self) -> str:
        return self.conv_dw.padding_mode

    @property
    def output_padding(self) -> tuple[int, ...]:
        """A transposed conv's output padding (all zeros for a conv)."""
        return tuple(self.conv_dw.output_padding) if self.transposed else (0,) * self.dims

    @property
    def weight(self) -> Tensor:
        """The dense kernel this pair computes, in the replaced layer's layout (:meth:`effective_weight`; read-only)."""
        return self.effective_weight()

    @property
    def bias(self) -> Tensor | None:
        """The bias, held by :attr:`last`."""
        return self.last.bias

    def __setattr__(self, name: str, value: Any) -> None:
        # Ecosystems assign a conv's weight and bias in place: BatchNorm folding (ultralytics' fuse(), torch.fx's
        # fuse_conv_bn_eval) sets `conv.weight, conv.bias = fused`. A pair takes both where it can hold them.
        if name in ("weight", "bias") and "_layout" in self.__dict__:
            self._assign_bias(value) if name == "bias" else self._assign_weight(value)
            return
        super().__setattr__(name, value)

    def _assign_bias(self, value: Tensor | None) -> None:
        """A new bias is the last conv's (as :attr:`bias` reads it)."""
        last = self.last
        if value is not None and not isinstance(value, nn.Parameter):
            value = nn.Parameter(value.detach(), requires_grad=value.requires_grad)
        last.bias = value

    def _assign_weight(self, value: Tensor) -> None:
        """A new dense weight that is this pair's kernel scaled per output channel (what folding a BatchNorm into
        the conv gives) is folded exactly into the last conv; any other dense weight cannot be held by the
        factors and is refused with a sentence."""
        dense = self.effective_weight().detach()
        if not isinstance(value, Tensor) or value.shape != dense.shape:
            shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise ModelError(
                f"{type(self).__name__}.weight was assigned {shape}, but the pair computes a kernel of shape "
                f"{tuple(dense.shape)}; assign a weight of that shape, or the children's (conv_dw, conv_pw)"
            )
        current = canonical_weight(dense, self.transposed, self.groups).double()
        new = canonical_weight(value.detach(), self.transposed, self.groups).double().flatten(1)
        old = current.flatten(1)
        scale = (new * old).sum(1) / old.square().sum(1).clamp_min(torch.finfo(torch.float64).tiny)
        residual = float((new - scale[:, None] * old).norm()) / max(float(new.norm()), 1e-30)
        if residual > _FOLD_TOLERANCE:
            raise ModelError(
                f"{type(self).__name__}.weight was assigned a dense kernel that is not the pair's own kernel scaled "
                f"per output channel (relative residual {residual:.2g}), so its factors cannot hold it; fold such "
                "changes into the model before converting it, or assign the children's weights (conv_dw, conv_pw)"
            )
        last = self.last
        transposed, groups = is_transposed(last), last.groups
        factor = canonical_weight(last.weight.detach(), transposed, groups).double()
        factor = factor * scale.view(-1, *(1,) * (factor.dim() - 1))
        with torch.no_grad():
            last.weight.copy_(layer_weight(factor.to(last.weight.dtype), transposed, groups))

    def effective_weight(self) -> Tensor:
        """The dense weight this structure computes (float64 sums, its dtype), in the replaced layer's layout:
        ``(Cout, Cin/g, *kernel)`` for a conv, ``(Cin, Cout/g, *kernel)`` for a transposed conv."""
        dtype = self.conv_dw.weight.dtype
        if self.order == "pw-dw-pw":
            g, r = self.groups, self.rank
            first = self.conv_pw.weight.detach().double().reshape(g, r, -1)  # (g, R, Cin/g)
            taps = self.conv_dw.weight.detach().double().reshape(g, r, -1)  # (g, R, K)
            last = self.conv_pwl.weight.detach().double().reshape(g, -1, r)  # (g, Cout/g, R)
            merged = torch.einsum("gor,gri,grk->goik", last, first, taps)
            canonical = merged.reshape(self.out_channels, -1, *self.kernel_size).to(dtype)
        else:
            canonical = merge_separable_weight(
                self.depthwise_taps(), self.conv_pw.weight, groups=self.groups, rank=self.rank, order=self.order
            )
        return layer_weight(canonical, self.transposed, self.groups)

    def depthwise_taps(self) -> Tensor:
        """The depthwise weight in the canonical layout of a depthwise conv: dw-pw ``(Cin*r, 1, *kernel)``,
        pw-dw ``(Cout, r, *kernel)``, pw-dw-pw ``(g*R, 1, *kernel)`` (a view; the same memory as
        ``conv_dw.weight`` for transposed convs too)."""
        return canonical_weight(self.conv_dw.weight, self.transposed, self.conv_dw.groups)

    def forward(self, x: Tensor, output_size: list[int] | None = None) -> Tensor:
        if output_size is not None and not self.transposed:
            raise TypeError(f"{type(self).__name__} takes no output_size (only transposed convs do)")
        if self._run_dense and not torch.is_grad_enabled():  # the dense kernel is detached: never for training
            weight = self.effective_weight()
            return conv_like(self.conv_dw, x, weight, self.bias, groups=self.groups, output_size=output_size)
        if self._layout == "rank-major":
            return self._forward_split(x) if self.order == "dw-pw" else self._forward_rank_major(x)
        for conv in self.convs:
            x = conv(x, output_size) if conv is self.conv_dw and output_size is not None else conv(x)
        return x

    def _forward_split(self, x: Tensor) -> Tensor:
        """dw-pw at rank r > 1 as r true depthwise convs (depth multiplier 1) and one pointwise conv.

        Same parameters and result as ``conv_pw(conv_dw(x))``, but a depthwise
        conv with a depth multiplier often misses the fast depthwise kernels
        (docs/benchmarks.md has the measurements). The pointwise weight is
        permuted to the concatenation's rank-major channel order.
        """
        dw, pw = self.conv_dw, self.conv_pw
        cin, r = dw.groups, self.rank
        taps = dw.weight.view(cin, r, 1, *dw.weight.shape[2:])
        z = torch.cat([conv_like(dw, x, taps[:, k], None) for k in range(r)], dim=1)
        mix = pw.weight.view(pw.out_channels, cin, r).transpose(1, 2).reshape(pw.weight.shape)
        return conv_like(pw, z, mix, pw.bias)

    def _forward_rank_major(self, x: Tensor) -> Tensor:
        """pw-dw at rank r > 1 as one pointwise conv and r true depthwise convs, summed."""
        pw, dw = self.conv_pw, self.conv_dw
        cout, r = dw.out_channels, self.rank
        rows = pw.weight.view(cout, r, *pw.weight.shape[1:]).transpose(0, 1).reshape(pw.weight.shape)
        u = conv_like(pw, x, rows, None)  # channel k*Cout + o: rank component k of output o
        y = conv_like(dw, u[:, :cout], dw.weight[:, :1], dw.bias)
        for k in range(1, r):
            y = y + conv_like(dw, u[:, k * cout : (k + 1) * cout], dw.weight[:, k : k + 1], None)
        return y

    def dense_mac_ratio(self) -> float:
        """MACs of the dense kernel this pair computes over its own, per output position (a strided conv's first
        pointwise conv counted at its input's resolution)."""
        step = prod(self.stride)
        inputs, outputs = ((1,), (step,)) if self.transposed else ((step,), (1,))
        channels = (self.in_channels, self.out_channels, self.kernel_size, self.groups)
        dense = conv_macs(*channels, outputs, transposed=self.transposed, input_size=inputs)
        own = separable_macs(*channels, self.rank, self.order, inputs, outputs, transposed=self.transposed)
        return dense / max(own, 1)

    def in_layout(self, layout: str) -> SeparableConv:
        """A view of this pair that runs in ``layout``: same parameters, same children, this pair unchanged."""
        view = copy.copy(self)
        view.layout = layout
        return view

    @property
    def layout(self) -> str:
        """How the pair runs (see :attr:`layouts`); every layout computes the same function."""
        return self._layout

    @layout.setter
    def layout(self, value: str) -> None:
        if value not in self.layouts:
            raise ConfigError(
                f"layout {value!r} is not available for a {self.order} pair at rank {self.rank} with groups "
                f"{self.groups}; choose from {self.layouts}"
            )
        self._layout = value

    @property
    def layouts(self) -> tuple[str, ...]:
        """The equivalent ways this pair can run; only pairs at rank > 1 with ``groups == 1`` have two.

        * ``"grouped"``: the depthwise step is one conv, with a depth
          multiplier ``rank`` (dw-pw) or ``rank`` inputs per group (pw-dw).
        * ``"rank-major"``: it is ``rank`` true depthwise convs (depth
          multiplier 1), concatenated (dw-pw) or summed (pw-dw).

        Neither is always faster (CPU kernels for depthwise convs with a
        multiplier are often slow, but splitting costs a pass per rank
        component); :func:`sepify.runtime.timing.time_pair` measures both at a
        real input shape.
        """
        if self.rank > 1 and self.groups == 1 and self.order != "pw-dw-pw" and not self.transposed:
            return LAYOUTS
        return LAYOUTS[:1]

    @property
    def default_layout(self) -> str:
        """The layout used until one is timed: ``"rank-major"`` where available for dw-pw and for 2-D pw-dw pairs
        (faster on most shapes measured), else ``"grouped"``.

        With one input channel the grouped depthwise step is a single ordinary conv with ``rank`` filters, which
        rank-major would split into ``rank`` convs (crepe's first layer at rank 64: 59 ms instead of 2 ms). A 2-D
        pw-dw pair's grouped step (``rank`` inputs per group) runs on slow generic kernels: crepe-tiny's conv2 at
        rank 9, batch 8, took 25 ms grouped and 4.4 ms rank-major in PyTorch, 15 ms and 0.66 ms in onnxruntime
        (the conv: 14 ms and 1.7 ms), and on 3x3 convs rank-major was 1.2-1.6x faster in both; as 1-D convs the
        two are within 25% either way.
        """
        if len(self.layouts) == 1:
            return "grouped"
        if self.order == "dw-pw" and self.conv_dw.in_channels > 1:
            return "rank-major"
        return "rank-major" if self.order == "pw-dw" and self.dims == 2 else "grouped"

    def extra_repr(self) -> str:
        layout = f", layout={self.layout!r}" if self.layout != self.default_layout else ""
        return f"order={self.order!r}, rank={self.rank}{layout}"


@contextlib.contextmanager
def dense_kernels(model: nn.Module, ratio: float = DENSE_MAC_RATIO) -> Iterator[list[str]]:
    """Within the block, the pairs in ``model`` whose dense kernel costs at most ``ratio`` times their own MACs
    run as that dense conv when no gradient is recorded; yields their names.

    The same function to float round-off (the kernel is summed in float64), and on CPU several times faster where
    a pair's depthwise step misses the fast kernels (a long 1-D kernel: up to 17x). Calibration measures and refits
    with it; the converted model itself, and any training, run the pair.

    >>> import torch
    >>> pair = SeparableConv.from_conv(nn.Conv1d(8, 8, 39, padding=19), rank=4, order="pw-dw")
    >>> x = torch.randn(2, 8, 100)
    >>> with torch.no_grad(), dense_kernels(nn.Sequential(pair)) as dense:
    ...     fast = pair(x)
    >>> dense, torch.allclose(fast, pair(x), atol=1e-5)
    (['0'], True)
    """
    chosen = [(name, m) for name, m in model.named_modules() if isinstance(m, SeparableConv)]
    chosen = [(name, m) for name, m in chosen if m.dense_mac_ratio() <= ratio]
    for _, pair in chosen:
        pair._run_dense = True
    try:
        yield [name for name, _ in chosen]
    finally:
        for _, pair in chosen:
            del pair._run_dense


def _factor_weights(
    conv: ConvLayer, rank: int, order: str, factorization: Factorization | CPFactorization | None
) -> tuple[Tensor, ...]:
    """The children's weights in :meth:`SeparableConv._factor_convs` order."""
    if order == "pw-dw-pw":
        if not isinstance(factorization, CPFactorization) or factorization.rank != rank:
            factorization = CPFactorization.of(weight_of(conv), conv.groups, rank)
        return factorization.weights()
    if not isinstance(factorization, Factorization):
        factorization = Factorization.of(weight_of(conv), conv.groups, order)
    return factorization.factors(rank)


def weight_of(conv: ConvLayer) -> Tensor:
    """``conv``'s weight in the canonical ``(Cout, Cin/g, *kernel)`` layout that every factorisation works on."""
    weight = conv.weight
    assert isinstance(weight, Tensor)
    return canonical_weight(weight, is_transposed(conv), conv.groups)


def pair_class(conv: ConvLayer) -> type[SeparableConv]:
    """The :class:`SeparableConv` subclass that stands in for ``conv`` (by dimensionality and transposition).

    >>> pair_class(nn.ConvTranspose2d(4, 4, 3)).__name__
    'SeparableConvTranspose2d'
    """
    dims = len(conv.kernel_size)
    return _PAIRS[(dims, is_transposed(conv))]


class SeparableConv1d(SeparableConv):
    """:class:`SeparableConv` standing in for an ``nn.Conv1d``."""

    dims = 1


class SeparableConv2d(SeparableConv):
    """:class:`SeparableConv` standing in for an ``nn.Conv2d``."""

    dims = 2


class SeparableConv3d(SeparableConv):
    """:class:`SeparableConv` standing in for an ``nn.Conv3d``."""

    dims = 3


class SeparableConvTranspose1d(SeparableConv):
    """:class:`SeparableConv` standing in for an ``nn.ConvTranspose1d``."""

    dims, transposed = 1, True


class SeparableConvTranspose2d(SeparableConv):
    """:class:`SeparableConv` standing in for an ``nn.ConvTranspose2d``."""

    dims, transposed = 2, True


class SeparableConvTranspose3d(SeparableConv):
    """:class:`SeparableConv` standing in for an ``nn.ConvTranspose3d``."""

    dims, transposed = 3, True


_PAIRS: dict[tuple[int, bool], type[SeparableConv]] = {
    (c.dims, c.transposed): c
    for c in (
        SeparableConv1d,
        SeparableConv2d,
        SeparableConv3d,
        SeparableConvTranspose1d,
        SeparableConvTranspose2d,
        SeparableConvTranspose3d,
    )
}
