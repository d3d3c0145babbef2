"""Which convs of a model can be separated, and why the others cannot (:class:`SkipReason`).

Pure decisions over modules and probe records: nothing here mutates a model.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from sepify.core.functional import CONV_TYPES, ConvLayer, SameConv2d, kind_of
from sepify.graph.conv_kinds import (
    class_name,
    effective_weight_of,
    inherits_forward,
    legacy_weight_norm,
    plain_view,
)
from sepify.graph.probe import ConvCall
from sepify.planning.choice import Geometry
from sepify.runtime.context import LayerContext
from sepify.vocab import SkipReason

__all__ = [
    "SkipReason",
    "ConvSite",
    "skip_reason_for",
    "find_conv_sites",
    "matches_any",
    "has_hooks",
    "dense_weight",
    "kind_notes",
]


@dataclass
class ConvSite:
    """One conv of the model (any of :data:`~sepify.core.functional.CONV_TYPES`, or a subclass), with the shapes
    it ran at.

    For a known subclass (:mod:`sepify.graph.conv_kinds`) ``module`` is a plain
    conv holding its effective weight and ``subclass`` names the class; an
    unknown subclass keeps its module, ``subclass`` and reason ``subclass``.
    """

    qualname: str
    module: ConvLayer
    call: ConvCall = field(default_factory=ConvCall)
    skip_reason: SkipReason | None = None
    subclass: str | None = None  # the class, when not a plain torch conv (or it carries legacy weight norm)
    registered: nn.Module | None = None  # the module in the model, when ``module`` is a plain view of it
    context: LayerContext = field(default_factory=LayerContext)  # what a runtime fuses with it (per-layer timing)

    @property
    def in_model(self) -> nn.Module:
        """The module registered in the model at ``qualname`` (hooks and swaps go there, not to a view)."""
        return self.registered if self.registered is not None else self.module

    @property
    def kind(self) -> str:
        """``conv1d`` ... ``conv3d``, ``conv_transpose1d`` ... ``conv_transpose3d`` (the report's kind column)."""
        return kind_of(self.module)

    @property
    def eligible(self) -> bool:
        return self.skip_reason is None

    @property
    def geometry(self) -> Geometry:
        """What the planner and the reports see of this conv (its configuration and the shapes it ran at)."""
        conv = self.module
        return Geometry(
            kind=self.kind,
            in_channels=conv.in_channels,
            out_channels=conv.out_channels,
            kernel_size=tuple(conv.kernel_size),
            stride=tuple(conv.stride),
            padding=conv.padding if isinstance(conv.padding, str) else tuple(conv.padding),
            dilation=tuple(conv.dilation),
            groups=conv.groups,
            padding_mode=conv.padding_mode,
            bias=conv.bias is not None,
            shapes=tuple(self.call.shapes),
        )


def skip_reason_for(conv: ConvLayer, calls: int, *, skip_shared: bool = False) -> SkipReason | None:
    """Why ``conv`` (called ``calls`` times) cannot be separated; None if it can.

    A conv called from several places (an FPN head run on every pyramid
    level, a recurrent update block) is converted like any other: the one
    replacement runs at every call site. ``skip_shared=True`` leaves such
    convs alone instead.

    >>> skip_reason_for(nn.Conv2d(8, 8, 1), calls=1)
    <SkipReason.POINTWISE: 'pointwise'>
    >>> skip_reason_for(nn.Conv2d(8, 16, 3), calls=1) is None
    True
    """
    # Exact type test (as torch.fx's fuse does): a subclass such as timm's
    # Conv2dSame has its own forward that a swap would silently drop.
    if type(conv) is not SameConv2d and not inherits_forward(conv):
        return SkipReason.SUBCLASS
    if has_hooks(conv):
        return SkipReason.HOOKED
    if calls == 0:
        return SkipReason.NOT_CALLED
    if calls > 1 and skip_shared:
        return SkipReason.SHARED
    if math.prod(conv.kernel_size) == 1:
        return SkipReason.POINTWISE
    # One input channel: the conv is a bank of Cout filters, and factoring that
    # (Cout, K) matrix (a few filters, then a 1x1 mix) is a real saving; it is
    # depthwise only in the degenerate sense that groups == in_channels.
    if conv.groups == conv.in_channels and conv.in_channels > 1:
        return SkipReason.DEPTHWISE
    return None


def has_hooks(module: nn.Module) -> bool:
    """Whether hooks are registered on ``module`` itself (forward, pre-forward, backward; state-dict hooks aside).

    The legacy ``weight_norm`` pre-hook does not count: it computes the weight, which sepify reads instead.
    """
    norm = legacy_weight_norm(module)
    pre = [h for h in getattr(module, "_forward_pre_hooks", {}).values() if h is not norm]
    hooks = ("_forward_hooks", "_backward_hooks", "_backward_pre_hooks")
    return bool(pre) or any(bool(getattr(module, name, None)) for name in hooks)


def _subclass(conv: nn.Module) -> str | None:
    """The class to name in reports, when ``conv`` does not compute what its torch conv class computes."""
    if not inherits_forward(conv):
        return class_name(conv)
    return "torch.nn.utils.weight_norm (legacy)" if legacy_weight_norm(conv) is not None else None


def kind_notes(sites: Sequence[ConvSite]) -> list[str]:
    """Report notes on convs of other classes: which were converted from what they compute, which were left."""
    known: dict[str, int] = {}
    unknown: dict[str, int] = {}
    for site in sites:
        if site.subclass is not None:
            bucket = unknown if site.skip_reason is SkipReason.SUBCLASS else known
            bucket[site.subclass] = bucket.get(site.subclass, 0) + 1

    def listed(counts: dict[str, int]) -> str:
        return ", ".join(f"{name} ({n})" for name, n in sorted(counts.items(), key=lambda kv: -kv[1]))

    notes = []
    if known:
        notes.append(
            f"{sum(known.values())} conv(s) of other classes were converted from what their forward computes: "
            f"{listed(known)}; where that is a weight computed from parameters (weight norm, standardisation), the "
            "pairs hold its value now (in training the original would recompute it every step)"
        )
    if unknown:
        notes.append(
            f"left {sum(unknown.values())} conv(s) of conv subclasses sepify does not know alone: {listed(unknown)}; "
            "if such a forward is a plain conv of an effective weight, teach it with sepify.register_conv"
        )
    return notes


def dense_weight(conv: ConvLayer) -> torch.Tensor:
    """The weight ``conv`` convolves with: its effective weight for a known subclass, else ``conv.weight``."""
    read = effective_weight_of(conv)
    if read is None:
        return conv.weight
    with torch.no_grad():
        return read(conv)


def matches_any(qualname: str, patterns: Sequence[str]) -> bool:
    """fnmatch ``qualname`` against glob patterns (``layer1.*``, ``*.conv2``)."""
    return any(fnmatch.fnmatchcase(qualname, p) for p in patterns)


def find_conv_sites(
    model: nn.Module,
    calls: dict[str, ConvCall],
    *,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    skip_shared: bool = False,
    params_read: frozenset[str] = frozenset(),
) -> list[ConvSite]:
    """Every conv (:data:`~sepify.core.functional.CONV_TYPES`, subclasses included) of ``model`` in definition
    order, classified.

    Args:
        model: the model (its first path to each module is the qualname).
        calls: probe records keyed by qualname.
        include: if given, only convs matching one of these globs are eligible.
        exclude: convs matching any of these globs are skipped as excluded.
        skip_shared: skip convs called more than once (see :func:`skip_reason_for`).
        params_read: qualnames of convs whose parameters the forward reads
            directly (fx ``get_attr`` nodes): a pair would break that read.
    """
    sites = []
    for name, m in model.named_modules():
        if not isinstance(m, CONV_TYPES):
            continue
        call = calls.get(name, ConvCall())
        subclass = _subclass(m)
        if has_hooks(m):  # checked on the module itself: a view has no hooks
            sites.append(ConvSite(name, m, call, SkipReason.HOOKED, subclass))
            continue
        view = plain_view(m) if subclass is not None else None
        registered, m = (m, view) if view is not None else (None, m)
        reason = skip_reason_for(m, call.calls, skip_shared=skip_shared)
        if reason is None and name in params_read:
            reason = SkipReason.PARAMS_READ
        if reason is None:
            if (include is not None and not matches_any(name, include)) or (exclude and matches_any(name, exclude)):
                reason = SkipReason.EXCLUDED
        sites.append(ConvSite(name, m, call, reason, subclass, registered))
    return sites
