"""Each conv's neighbours in the traced graph that a deployment runtime fuses with it (:mod:`sepify.runtime.context`).

Read from the fx graph, never from module names: the zero padding feeding
the conv (``F.pad`` with constant zeros, ``nn.ZeroPad2d``/``ConstantPad*d``
with value 0, used only by that conv) and the activation on its output,
optionally through an eval-mode BatchNorm, when the conv's output goes
nowhere else. Anything the table below does not know ends the search: the
context is then smaller, never wrong.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from sepify.runtime.context import Activation, LayerContext

__all__ = ["layer_contexts"]

_PAD_MODULES = (nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d, nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)

# module type -> the activation it computes
_ACTIVATION_MODULES: dict[type[nn.Module], Callable[[Any], Activation]] = {
    nn.ReLU: lambda m: Activation("relu"),
    nn.ReLU6: lambda m: Activation("clip", (0.0, 6.0)),
    nn.Hardtanh: lambda m: Activation("clip", (float(m.min_val), float(m.max_val))),
    nn.LeakyReLU: lambda m: Activation("leaky_relu", (float(m.negative_slope),)),
    nn.Sigmoid: lambda m: Activation("sigmoid"),
    nn.Tanh: lambda m: Activation("tanh"),
    nn.SiLU: lambda m: Activation("silu"),
    nn.Hardswish: lambda m: Activation("hardswish"),
    nn.Hardsigmoid: lambda m: Activation("hardsigmoid"),
    nn.PReLU: lambda m: Activation("prelu", weight=m.weight.detach()),
}
# function or method name -> the activation it computes, from its call's extra arguments
_ACTIVATION_CALLS: dict[Any, Callable[[tuple[Any, ...], dict[str, Any]], Activation]] = {
    **dict.fromkeys((F.relu, torch.relu, torch.relu_, "relu", "relu_"), lambda a, k: Activation("relu")),
    **dict.fromkeys((F.relu6,), lambda a, k: Activation("clip", (0.0, 6.0))),
    **dict.fromkeys(
        (F.leaky_relu,), lambda a, k: Activation("leaky_relu", (float(a[0] if a else k.get("negative_slope", 0.01)),))
    ),
    **dict.fromkeys((torch.sigmoid, F.sigmoid, "sigmoid", "sigmoid_"), lambda a, k: Activation("sigmoid")),
    **dict.fromkeys((torch.tanh, F.tanh, "tanh", "tanh_"), lambda a, k: Activation("tanh")),
    **dict.fromkeys((F.silu,), lambda a, k: Activation("silu")),
    **dict.fromkeys((F.hardswish,), lambda a, k: Activation("hardswish")),
    **dict.fromkeys((F.hardsigmoid,), lambda a, k: Activation("hardsigmoid")),
}


def layer_contexts(model: nn.Module) -> dict[str, LayerContext]:
    """The context of every conv module called in ``model``'s graph, by qualname (from its first call).

    ``model`` is a traced ``GraphModule``; any other module (swap mode) has no
    graph to read, and every conv is timed alone.

    Examples:
        >>> import torch.fx
        >>> class Net(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.conv, self.bn = nn.Conv2d(4, 8, 3), nn.BatchNorm2d(8)
        ...     def forward(self, x):
        ...         return F.relu(self.bn(self.conv(F.pad(x, (1, 1, 1, 1)))))
        >>> layer_contexts(torch.fx.symbolic_trace(Net().eval()))["conv"].describe()
        'pad + conv + relu'
    """
    if not isinstance(model, fx.GraphModule):
        return {}
    contexts: dict[str, LayerContext] = {}
    for node in model.graph.nodes:
        if node.op == "call_module" and str(node.target) not in contexts:
            module = model.get_submodule(str(node.target))
            if isinstance(module, (nn.modules.conv._ConvNd)):
                contexts[str(node.target)] = LayerContext(_pad_before(model, node), _activation_after(model, node))
    return contexts


def _pad_before(model: fx.GraphModule, conv: fx.Node) -> tuple[int, ...]:
    """The constant zero padding amounts feeding ``conv`` (and nothing else), or ``()``."""
    if not conv.args or not isinstance(conv.args[0], fx.Node):
        return ()
    pad = conv.args[0]
    if len(pad.users) != 1:
        return ()
    amounts: Any = None
    if pad.op == "call_function" and pad.target is F.pad:  # F.pad(input, pad, mode="constant", value=None)
        amounts = pad.args[1] if len(pad.args) > 1 else pad.kwargs.get("pad")
        mode = pad.args[2] if len(pad.args) > 2 else pad.kwargs.get("mode", "constant")
        value = pad.args[3] if len(pad.args) > 3 else pad.kwargs.get("value", 0.0)
        if mode != "constant" or value not in (0, 0.0, None):
            return ()
    elif pad.op == "call_function" and pad.target is torch.constant_pad_nd:  # (input, pad, value=0)
        amounts = pad.args[1] if len(pad.args) > 1 else pad.kwargs.get("pad")
        if (pad.args[2] if len(pad.args) > 2 else pad.kwargs.get("value", 0)) != 0:
            return ()
    elif pad.op == "call_module" and isinstance(module := model.get_submodule(str(pad.target)), _PAD_MODULES):
        amounts, value = module.padding, getattr(module, "value", 0.0)
        if value != 0:
            return ()
    if not isinstance(amounts, (tuple, list)) or not all(isinstance(a, int) and a >= 0 for a in amounts):
        return ()  # computed at run time (a Proxy), or cropping: not a pad a runtime folds
    return tuple(amounts)


def _activation_after(model: fx.GraphModule, conv: fx.Node) -> Activation | None:
    """The activation on ``conv``'s output (possibly through an eval-mode BatchNorm) when nothing else reads it."""
    node = conv
    for _ in range(2):  # conv -> [batchnorm] -> activation
        if len(node.users) != 1:
            return None
        (user,) = node.users
        if user.args[:1] != (node,):
            return None
        if user.op == "call_module":
            module = model.get_submodule(str(user.target))
            folds = isinstance(module, _NORMS) and not module.training and module.running_mean is not None
            if folds and node is conv:
                node = user
                continue
            make = _ACTIVATION_MODULES.get(type(module))
            return make(module) if make is not None else None
        if user.op in ("call_function", "call_method"):
            make_call = _ACTIVATION_CALLS.get(user.target)
            extra = {k: v for k, v in user.kwargs.items() if k != "inplace"}
            return make_call(tuple(a for a in user.args[1:] if not isinstance(a, bool)), extra) if make_call else None
        return None
    return None
