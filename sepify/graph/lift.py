"""Lifting functional convolutions on parameters into ``nn.Conv1d/2d/3d`` modules the graph pass can swap.

Transposed convolutions called functionally (``F.conv_transpose2d``) are left as they are.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

__all__ = ["lift_functional_convs"]

# each functional conv, and its number of spatial dimensions
_FUNCTIONS: dict[Any, int] = {
    **dict.fromkeys((torch.conv1d, F.conv1d, torch.ops.aten.conv1d.default, torch.ops.aten.conv1d.padding), 1),
    **dict.fromkeys((torch.conv2d, F.conv2d, torch.ops.aten.conv2d.default, torch.ops.aten.conv2d.padding), 2),
    **dict.fromkeys((torch.conv3d, F.conv3d, torch.ops.aten.conv3d.default, torch.ops.aten.conv3d.padding), 3),
}
_MODULES: dict[int, Any] = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_CONV_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_CONV_DEFAULTS: dict[str, Any] = {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1}


def _param_of(gm: fx.GraphModule, node: Any) -> nn.Parameter | None:
    if not (isinstance(node, fx.Node) and node.op == "get_attr"):
        return None
    owner, _, attr = str(node.target).rpartition(".")
    value = getattr(gm.get_submodule(owner), attr, None)
    return value if isinstance(value, nn.Parameter) else None


def _inside_called(target: str, called: set[str]) -> bool:
    owner = target.rpartition(".")[0]
    return any(owner == m or owner.startswith(m + ".") for m in called)


def _fresh_name(gm: fx.GraphModule, target: str, inside: bool) -> str:
    """``owner.conv`` for a conv on ``owner.weight`` (``conv`` in the owner's own graph), else ``<target>_conv``."""
    owner, _, attr = target.rpartition(".")
    if attr == "weight" and (owner or inside):
        base = f"{owner}.conv" if owner else "conv"
    else:
        base = f"{target}_conv"
    name, i = base, 1
    while True:
        try:
            gm.get_submodule(name)
        except AttributeError:
            parent, _, child = name.rpartition(".")
            if not hasattr(gm.get_submodule(parent), child):
                return name
        i += 1
        name = f"{base}{i}"


def lift_functional_convs(gm: fx.GraphModule, *, inside: bool = False) -> list[str]:
    """Turn ``F.conv2d(x, self.weight, self.bias, ...)`` calls (and ``conv1d``/``conv3d``) into conv modules.

    Applies where the weight (and bias) are parameters read with ``get_attr``
    and every other argument is a constant, as in models that call
    ``F.conv2d`` on their own parameters and in ``torch.export`` programs
    (``aten.conv2d``). The new module holds the same Parameter objects; the
    old attributes are removed when nothing else reads them, so no weight is
    stored twice. Parameters of modules the graph also calls are left alone
    (the module needs them). ``inside``: ``gm`` is the graph of a submodule's forward, named as it would be in
    the whole model's graph. Returns the qualnames of the new modules, in graph order.
    """
    lifted = []
    called = {str(n.target) for n in gm.graph.nodes if n.op == "call_module"}
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in _FUNCTIONS:
            continue
        dims = _FUNCTIONS[node.target]
        bound = dict(_CONV_DEFAULTS)
        bound.update(zip(_CONV_ARGS, node.args))
        bound.update(node.kwargs)
        weight = _param_of(gm, bound["weight"])
        bias = _param_of(gm, bound["bias"]) if bound["bias"] is not None else None
        constants = [bound[k] for k in ("stride", "padding", "dilation", "groups")]
        if weight is None or weight.dim() != dims + 2 or (bound["bias"] is not None and bias is None):
            continue  # computed or non-parameter weights stay functional
        if _inside_called(str(bound["weight"].target), called):
            continue  # a module the graph also calls owns it: moving it would break that call
        if any(isinstance(a, fx.Node) for c in constants for a in (c if isinstance(c, (list, tuple)) else [c])):
            continue
        stride, padding, dilation, groups = constants
        conv = _MODULES[dims](
            weight.shape[1] * int(groups),
            weight.shape[0],
            tuple(weight.shape[2:]),
            stride=stride,
            padding=padding,
            dilation=dilation,
            groups=int(groups),
            bias=bias is not None,
            device="meta",
        )
        conv.weight = weight
        conv.bias = bias
        conv.train(gm.training)
        name = _fresh_name(gm, str(bound["weight"].target), inside)
        gm.add_submodule(name, conv)
        with gm.graph.inserting_after(node):
            call = gm.graph.call_module(name, (bound["input"],))
        call.meta = dict(node.meta)
        node.replace_all_uses_with(call)
        gm.graph.erase_node(node)
        lifted.append(name)
    if lifted:
        for node in list(gm.graph.nodes):
            if node.op == "get_attr" and not node.users:
                owner, _, attr = str(node.target).rpartition(".")
                gm.graph.erase_node(node)
                if not any(n.op == "get_attr" and n.target == node.target for n in gm.graph.nodes):
                    module = gm.get_submodule(owner)
                    if isinstance(getattr(module, attr, None), nn.Parameter):
                        delattr(module, attr)
        gm.graph.lint()
        gm.recompile()
    return lifted
