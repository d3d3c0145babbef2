"""Conv subclasses whose forward is a plain convolution of an *effective* weight, and how to read that weight.

A subclass may change ``forward``, so sepify converts only what it knows:
the six torch conv classes themselves (``nn.Conv1d/2d/3d``,
``nn.ConvTranspose1d/2d/3d``), convs whose weight is a parametrization
(``torch.nn.utils.parametrizations.weight_norm``/``spectral_norm``, any
``parametrize.register_parametrization``), convs under the legacy
``torch.nn.utils.weight_norm`` hook, timm's weight-standardised
``StdConv2d``/``ScaledStdConv2d``, and classes registered with
:func:`register_conv`. For each, :func:`plain_view` builds a plain conv of the same torch class
holding the effective weight at this moment, which the rest of the pipeline
factorises as usual; the pair then replaces the original module. In training
mode the original would recompute its weight from its parameters every step,
while the pair trains its own factors: the report says so.

timm's ``Conv2dSame`` and ``ScaledStdConv2dSame`` pad dynamically
(TensorFlow's "SAME", depending on the input size), as does
segmentation_models_pytorch's ``Conv2dDynamicSamePadding``; its
``Conv2dStaticSamePadding`` pads by amounts fixed for one image size. Their
view is a :class:`~sepify.core.functional.SameConv2d` (with ``static_pad``
for the fixed amounts), and the pair pads the same way.
Other subclasses stay skipped as ``subclass``, with their class named in the
report.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

from sepify.core.functional import CONV_TYPES, SameConv2d, is_transposed
from sepify.errors import ConfigError

__all__ = [
    "register_conv",
    "plain_view",
    "effective_weight_of",
    "inherits_forward",
    "class_name",
    "legacy_weight_norm",
]

EffectiveWeight = Callable[[Any], Tensor]
PADDINGS = ("module", "tf-same")
_REGISTERED: dict[type[nn.Module], tuple[EffectiveWeight, str]] = {}  # class -> (effective weight, padding)


def register_conv(
    cls: type[nn.Module] | None = None,
    *,
    effective_weight: EffectiveWeight | None = None,
    padding: str = "module",
) -> Any:
    """Teach sepify a conv subclass (of ``nn.Conv1d/2d/3d`` or ``nn.ConvTranspose1d/2d/3d``) whose forward is
    ``F.convNd(x, effective_weight(self), self.bias, ...)`` with the module's own stride, dilation and groups.

    Args:
        cls: the class; omit it to use ``register_conv(...)`` as a class decorator.
        effective_weight: the weight the forward convolves with, in the base
            class's layout (default: ``module.weight``).
        padding: ``"module"`` (the module's own ``padding`` and
            ``padding_mode``) or ``"tf-same"`` (2-D only: TensorFlow's dynamic
            "SAME" padding for the input size, as timm's ``Conv2dSame``; the
            module's ``padding`` is then ignored).

    Examples:
        >>> class Scaled(nn.Conv2d):
        ...     def forward(self, x):
        ...         return self._conv_forward(x, 2 * self.weight, self.bias)
        >>> _ = register_conv(Scaled, effective_weight=lambda m: 2 * m.weight)
        >>> conv = Scaled(3, 8, 3)
        >>> view = plain_view(conv)
        >>> x = torch.randn(1, 3, 8, 8)
        >>> torch.allclose(view(x), conv(x))
        True
        >>> from sepify.core.functional import same_pad_amounts
        >>> @register_conv(padding="tf-same")
        ... class PadSame(nn.Conv2d):
        ...     def forward(self, x):
        ...         x = F.pad(x, same_pad_amounts(self, x.shape[-2:]))
        ...         return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)
        >>> conv = PadSame(3, 8, 3, stride=2)
        >>> view = plain_view(conv)
        >>> x = torch.randn(1, 3, 15, 16)
        >>> type(view).__name__, torch.allclose(view(x), conv(x))
        ('SameConv2d', True)
    """
    if cls is None:
        return lambda klass: register_conv(klass, effective_weight=effective_weight, padding=padding)
    if not (isinstance(cls, type) and issubclass(cls, CONV_TYPES)):
        raise ConfigError(f"register_conv expects a subclass of a torch conv class (e.g. nn.Conv2d), got {cls!r}")
    if effective_weight is not None and not callable(effective_weight):
        raise ConfigError("register_conv needs effective_weight=a function of the module returning its weight")
    if padding not in PADDINGS:
        raise ConfigError(f"register_conv's padding must be one of {PADDINGS}, got {padding!r}")
    if padding == "tf-same" and not issubclass(cls, nn.Conv2d):
        raise ConfigError("register_conv's padding='tf-same' is for nn.Conv2d subclasses only")
    _REGISTERED[cls] = (effective_weight or _plain, padding)
    return cls


def class_name(module: nn.Module) -> str:
    cls = type(module)
    return f"{cls.__module__}.{cls.__qualname__}"


def legacy_weight_norm(conv: Any) -> object | None:
    """The ``torch.nn.utils.weight_norm`` hook on ``conv``, if that is how its weight is made."""
    from torch.nn.utils.weight_norm import WeightNorm

    hooks = [h for h in conv._forward_pre_hooks.values() if isinstance(h, WeightNorm) and h.name == "weight"]
    return hooks[0] if hooks else None


def _standardised(conv: Any, gain: Tensor | None = None) -> Tensor:
    """timm's weight standardisation: each output filter to zero mean and unit variance, times ``gain``."""
    flat = conv.weight.reshape(1, conv.out_channels, -1)
    out = F.batch_norm(flat, None, None, weight=gain, training=True, momentum=0.0, eps=conv.eps)
    return out.reshape_as(conv.weight)


def _timm_std(conv: Any) -> Tensor:
    return _standardised(conv)


def _timm_scaled_std(conv: Any) -> Tensor:
    return _standardised(conv, (conv.gain * conv.scale).view(-1))


def _plain(conv: Any) -> Tensor:
    weight: Tensor = conv.weight
    return weight


_SMP_EFFICIENTNET = "segmentation_models_pytorch.encoders._efficientnet"
# other libraries' convs, recognised by name so that the library need not be installed
_KNOWN = {
    "timm.layers.std_conv.StdConv2d": _timm_std,
    "timm.layers.std_conv.ScaledStdConv2d": _timm_scaled_std,
    "timm.layers.std_conv.StdConv2dSame": _timm_std,
    "timm.layers.std_conv.ScaledStdConv2dSame": _timm_scaled_std,
    "timm.layers.conv2d_same.Conv2dSame": _plain,
    # segmentation_models_pytorch's EfficientNet encoders (from lukemelas' EfficientNet-PyTorch): TF "SAME"
    # padding at run time, or fixed amounts computed for one image size (a ZeroPad2d in .static_padding)
    f"{_SMP_EFFICIENTNET}.Conv2dDynamicSamePadding": _plain,
    f"{_SMP_EFFICIENTNET}.Conv2dStaticSamePadding": _plain,
}
_DYNAMIC_SAME = ("timm.layers.conv2d_same.Conv2dSame", f"{_SMP_EFFICIENTNET}.Conv2dDynamicSamePadding")
_STATIC_SAME = (f"{_SMP_EFFICIENTNET}.Conv2dStaticSamePadding",)


def _dynamic_same(conv: Any) -> bool:
    """timm's *Same classes pad at run time (Conv2dSame always; the std-conv ones when ``same_pad``), as do smp's
    dynamic class and classes registered with ``padding="tf-same"``."""
    registered = _registration(conv)
    if registered is not None and registered[1] == "tf-same":
        return True
    name = class_name(conv)
    return name in _DYNAMIC_SAME or (name.endswith("Same") and bool(getattr(conv, "same_pad", False)))


def _static_pad(conv: Any) -> tuple[int, ...] | None:
    """The fixed ``[left, right, top, bottom]`` zero padding smp's static class applies before its conv (its own
    ``padding`` added), or None for other classes."""
    if class_name(conv) not in _STATIC_SAME:
        return None
    pad = getattr(getattr(conv, "static_padding", None), "padding", (0, 0, 0, 0))  # nn.Identity: no padding
    (h, w), (left, right, top, bottom) = conv.padding, pad
    return (left + w, right + w, top + h, bottom + h)


# What a subclass must leave alone to compute exactly what its torch base class computes.
_FORWARD_ATTRIBUTES = frozenset({"forward", "_conv_forward", "__call__", "_call_impl", "weight", "bias", "__getattr__"})


def inherits_forward(conv: Any) -> bool:
    """Whether ``conv``'s class is a torch conv class, or a subclass that changes nothing its forward uses.

    torchvision's video ``Conv3DSimple``/``Conv3DNoTemporal`` only add a constructor and a static method: they
    are plain convs. A class that defines ``forward``, ``_conv_forward``, ``weight`` or ``bias`` (parametrized
    convs do) is not.

    >>> class Named(nn.Conv2d):
    ...     pass
    >>> class Doubled(nn.Conv2d):
    ...     def forward(self, x):
    ...         return 2 * super().forward(x)
    >>> inherits_forward(Named(1, 1, 3)), inherits_forward(Doubled(1, 1, 3))
    (True, False)
    """
    base = _plain_class(conv)
    for klass in type(conv).__mro__:
        if klass is base:
            return True
        if _FORWARD_ATTRIBUTES & set(vars(klass)):
            return False
    return False


def _registration(conv: Any) -> tuple[EffectiveWeight, str] | None:
    """What :func:`register_conv` said for the nearest registered class of ``conv`` (its own, else a base's)."""
    return next((_REGISTERED[klass] for klass in type(conv).__mro__ if klass in _REGISTERED), None)


def effective_weight_of(conv: Any) -> EffectiveWeight | None:
    """How to read ``conv``'s effective weight, or None when sepify does not know its forward."""
    cls = type(conv)
    registered = _registration(conv)
    if registered is not None:
        return registered[0]
    if class_name(conv) in _KNOWN:
        return _KNOWN[class_name(conv)]
    if parametrize.is_parametrized(conv) and len(cls.__bases__) == 1 and cls.__bases__[0] in CONV_TYPES:
        return lambda m: m.weight  # the parametrization computes it on access
    if cls in CONV_TYPES and legacy_weight_norm(conv) is not None:
        hook = legacy_weight_norm(conv)
        return lambda m: hook.compute_weight(m)  # type: ignore[attr-defined]
    return None


def plain_view(conv: Any) -> Any:
    """A plain torch conv (or :class:`SameConv2d`) computing what ``conv`` computes now (its effective weight, frozen), or None.

    Shares nothing with ``conv``: the weight and bias are detached copies, on
    its device and dtype, with ``requires_grad`` and the train/eval mode copied.
    """
    read = effective_weight_of(conv)
    if read is None:
        return None
    with torch.no_grad():
        weight = read(conv).detach().clone()
        bias = None if conv.bias is None else conv.bias.detach().clone()
    static = _static_pad(conv)
    base = SameConv2d if static is not None or _dynamic_same(conv) else _plain_class(conv)
    extra: dict[str, Any] = {"output_padding": conv.output_padding} if is_transposed(conv) else {}
    view = base(
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        groups=conv.groups,
        bias=bias is not None,
        padding_mode=conv.padding_mode,
        device="meta",
        **extra,
    )
    trainable = any(p.requires_grad for p in conv.parameters(recurse=False))
    view.weight = nn.Parameter(weight, requires_grad=trainable)
    view.bias = None if bias is None else nn.Parameter(bias, requires_grad=trainable)
    if static is not None:
        view.padding, view.static_pad = (0, 0), static
    view.train(conv.training)
    return view


def _plain_class(conv: Any) -> Any:
    """The torch conv class that ``conv``'s class derives from (``nn.Conv2d`` for a parametrized ``Conv2d``)."""
    return next(klass for klass in type(conv).__mro__ if klass in CONV_TYPES)
