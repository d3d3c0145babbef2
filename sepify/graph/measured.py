"""What fidelity is measured on: the model's outputs, with saturated ones seen before their activation.

A classifier or detector that ends in a softmax, log-softmax or sigmoid answers with probabilities that are 0 or
1 almost everywhere once it is confident: a conversion that changes the decision on 5% of the inputs moves those
outputs by a few 1e-40, and every error computed from them reads ~0. So where an output of the traced graph is
such an activation's result *and saturates* on the inputs given (at least 95% of its values within 1e-6 of 0 or
1), fidelity is measured on the activation's input, its logits, which move as the task does. An activation that
does not saturate (CREPE's sigmoid pitch bins: 86% of the values in between) is measured as it is: its logits
would weigh the far bins, which do not matter, like the ones near the answer. :func:`output_view` finds those
outputs; :func:`viewed` runs a traced model and returns its outputs with them replaced, in the same structure.
Models without a graph (swap mode) are measured on their outputs.

A user who knows better names what to measure (``measure_on`` in the API, ``--measure-on`` on the CLI):
:func:`chosen_view` turns an output index, a node or module name of the traced graph, or ``"outputs"`` (the
outputs as returned, even saturated ones) into the view every error is then computed on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.utils import _pytree as pytree

from sepify.errors import ConfigError
from sepify.graph.probe import float_leaves, preserved_state

__all__ = ["OUTPUTS", "OutputView", "chosen_view", "output_view", "viewed"]

OUTPUTS = "outputs"  # measure_on: the outputs as the model returns them, saturated or not

_FUNCTIONS = {torch.softmax, F.softmax, torch.log_softmax, F.log_softmax, torch.sigmoid, F.sigmoid}
_METHODS = {"softmax", "log_softmax", "sigmoid"}
_MODULES = (nn.Softmax, nn.LogSoftmax, nn.Sigmoid, nn.Softmax2d)


@dataclass(frozen=True)
class OutputView:
    """What errors are measured on instead of the outputs as returned.

    Either outputs replaced by the input of their saturating activation (``replaced``: output node name -> the
    activation's input node), or, as a user named it, one node's value alone (``node``) or one output tensor alone
    (``index`` into the floating-point tensors of the output, in order).
    """

    replaced: dict[str, str]
    description: str  # for reports: "the inputs of the final softmax (logits)"
    node: str | None = None
    index: int | None = None


def chosen_view(
    target: nn.Module, args: tuple[Any, ...], outputs: Any, measure_on: str | int | None
) -> OutputView | None:
    """The view for a user's ``measure_on`` (None: automatic, :func:`output_view`); ``target`` is the traced graph
    (or the model itself in swap mode) and ``outputs`` its outputs on ``args``.

    >>> net = torch.nn.Sequential()
    >>> net.add_module("fc", torch.nn.Linear(4, 3)); net.add_module("probs", torch.nn.Softmax(-1))
    >>> gm, x = fx.symbolic_trace(net), torch.randn(2, 4)
    >>> chosen_view(gm, (x,), gm(x), "fc").description
    'fc'
    >>> chosen_view(gm, (x,), gm(x), -1).description
    'output 0'
    """
    graph = target if isinstance(target, fx.GraphModule) else None
    if measure_on is None:
        return None if graph is None else output_view(graph, args)
    if measure_on == OUTPUTS:
        return None
    if isinstance(measure_on, int) and not isinstance(measure_on, bool):
        count = len(float_leaves(outputs))
        if not -count <= measure_on < count:
            raise ConfigError(
                f"measure_on={measure_on} is not an output: the model returns {count} floating-point tensor(s); pass "
                f"an index from 0 to {count - 1}"
            )
        index = measure_on % count
        return OutputView({}, f"output {index}", index=index)
    if not isinstance(measure_on, str) or not measure_on:
        raise ConfigError(
            f"measure_on must be an output index, a node or module name, or {OUTPUTS!r}, got {measure_on!r}"
        )
    if graph is None:
        raise ConfigError(
            f"measure_on={measure_on!r} names a graph node, but torch.fx could not trace the model's forward (it is "
            "converted by swapping modules); pass an output index instead"
        )
    node = _named_node(graph, measure_on)
    with preserved_state(graph), torch.no_grad():
        capture = _Capture(graph, {node.name})
        capture.run(*args)
    value = capture.kept.get(node.name)
    if not (isinstance(value, torch.Tensor) and value.is_floating_point()):
        raise ConfigError(
            f"measure_on={measure_on!r} is node {node.name}, whose value is {type(value).__name__}, not a "
            "floating-point tensor; name a node that computes one"
        )
    return OutputView({}, measure_on, node=node.name)


def _named_node(gm: fx.GraphModule, name: str) -> fx.Node:
    """The node called ``name``, or the last call of the module whose qualified name is ``name``."""
    nodes: list[fx.Node] = list(gm.graph.nodes)
    for node in nodes:
        if node.name == name:
            return node
    calls = [n for n in nodes if n.op == "call_module" and n.target == name]
    if calls:
        return calls[-1]
    last = [n.name for n in nodes if n.op not in ("placeholder", "output", "get_attr")][-5:]
    raise ConfigError(
        f"measure_on={name!r} is neither a node nor a module of the traced graph; name one of them (the last nodes "
        f"before the output: {', '.join(last)}), or pass an output index"
    )


def _saturating_input(gm: fx.GraphModule, node: fx.Node) -> tuple[fx.Node, str] | None:
    """The input of ``node`` and the activation's name, when ``node`` is a softmax, log-softmax or sigmoid."""
    if node.op == "call_function" and node.target in _FUNCTIONS:
        kind = getattr(node.target, "__name__", str(node.target))
    elif node.op == "call_method" and node.target in _METHODS:
        kind = str(node.target)
    elif node.op == "call_module" and isinstance(gm.get_submodule(str(node.target)), _MODULES):
        kind = type(gm.get_submodule(str(node.target))).__name__.lower()
    else:
        return None
    first = node.args[0] if node.args else None
    return (first, kind) if isinstance(first, fx.Node) else None


_SATURATED = 0.95  # share of an activation's values within _NEAR of 0 or 1 that makes it saturated
_NEAR = 1e-6


def output_view(gm: fx.GraphModule, args: tuple[Any, ...]) -> OutputView | None:
    """Which outputs of ``gm`` a saturating activation makes and saturates on ``args``, and what to measure instead;
    None when none does."""
    output = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    found = {
        leaf.name: hit
        for leaf in pytree.tree_leaves(output.args[0])
        if isinstance(leaf, fx.Node) and (hit := _saturating_input(gm, leaf)) is not None
    }
    if not found:
        return None
    with preserved_state(gm), torch.no_grad():
        capture = _Capture(gm, set(found))
        capture.run(*args)
    replaced, kinds = {}, []
    for name, (source, kind) in found.items():
        value = capture.kept.get(name)
        if isinstance(value, torch.Tensor) and value.is_floating_point() and _saturated(value, kind):
            replaced[name] = source.name
            kinds.append(kind)
    if not replaced:
        return None
    return OutputView(replaced, f"the inputs of the final {' and '.join(sorted(set(kinds)))} (logits)")


def _saturated(value: torch.Tensor, kind: str) -> bool:
    probabilities = value.double().exp() if "log" in kind else value.double()
    near = (probabilities <= _NEAR) | (probabilities >= 1 - _NEAR)
    return bool(near.numel()) and float(near.double().mean()) >= _SATURATED


class _Capture(fx.Interpreter):
    """Runs a graph and keeps the values of the named nodes."""

    def __init__(self, gm: fx.GraphModule, names: set[str]) -> None:
        super().__init__(gm)
        self.names = names
        self.kept: dict[str, Any] = {}

    def run_node(self, n: fx.Node) -> Any:
        value = super().run_node(n)
        if n.name in self.names:
            self.kept[n.name] = value
        return value


def viewed(module: nn.Module, args: tuple[Any, ...], view: OutputView | None) -> Any:
    """``module(*args)`` without gradients and side effects, its saturated outputs replaced by their logits."""
    with preserved_state(module), torch.no_grad():
        if view is not None and view.index is not None:
            return float_leaves(module(*args))[view.index]
        if view is None or not isinstance(module, fx.GraphModule):
            return module(*args)
        capture = _Capture(module, {view.node} if view.node else set(view.replaced.values()))
        result = capture.run(*args)
    if view.node:
        return capture.kept[view.node]
    output = next(n for n in reversed(module.graph.nodes) if n.op == "output")
    nodes, _ = pytree.tree_flatten(output.args[0])
    values, spec = pytree.tree_flatten(result)
    if len(nodes) != len(values):  # a structure fx and the output do not agree on: measure the outputs
        return result
    for i, node in enumerate(nodes):
        if isinstance(node, fx.Node) and node.name in view.replaced:
            values[i] = capture.kept[view.replaced[node.name]]
    return pytree.tree_unflatten(values, spec)
