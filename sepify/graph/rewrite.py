"""The graph pass: swap convs for their separable pairs, keep the graph.

The graph's structure never changes: each ``call_module`` node keeps its
target and only the module behind it is replaced (as torch.fx's ``fuse``
does), then the graph is linted and recompiled.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import torch.fx as fx
from torch import nn

__all__ = ["replace_submodule", "swap_modules", "temporarily_replaced"]


def replace_submodule(root: nn.Module, qualname: str, new: nn.Module) -> nn.Module:
    """Put ``new`` at ``qualname`` in ``root`` and return the module it replaced.

    Resolves the parent with ``get_submodule`` and checks the child exists
    first, so a wrong qualname fails loudly instead of adding an attribute.
    """
    if not qualname:
        raise ValueError("cannot replace the root module")
    parent_name, _, child = qualname.rpartition(".")
    parent = root.get_submodule(parent_name)
    old = parent._modules.get(child)
    if old is None:
        raise AttributeError(f"{type(parent).__name__} at {parent_name or '(root)'!r} has no submodule {child!r}")
    setattr(parent, child, new)
    return old


def swap_modules(root: nn.Module, replacements: Mapping[str, nn.Module], meta: Mapping[str, dict[str, Any]]) -> None:
    """Replace each ``qualname -> module`` in ``root``, at every path it is registered.

    A module registered under two names (``self.a = self.b = conv``) is
    replaced under both, so whichever name forward uses runs the new module.
    For a GraphModule, ``meta[qualname]`` is stored in the conv node's
    ``node.meta["sepify"]``, and the graph is linted and recompiled.
    """
    paths: dict[int, list[str]] = {}
    for name, m in root.named_modules(remove_duplicate=False):
        paths.setdefault(id(m), []).append(name)
    for qualname, new in replacements.items():
        old = root.get_submodule(qualname)
        for path in paths[id(old)]:
            replace_submodule(root, path, new)
    if isinstance(root, fx.GraphModule):
        for node in root.graph.nodes:
            if node.op == "call_module" and node.target in meta:
                node.meta["sepify"] = dict(meta[node.target])
        root.graph.lint()
        root.recompile()


@contextlib.contextmanager
def temporarily_replaced(root: nn.Module, old: nn.Module, new: nn.Module) -> Iterator[None]:
    """Put ``new`` at every path where ``old`` is registered in ``root`` for the block; then put ``old`` back."""
    paths = [name for name, m in root.named_modules(remove_duplicate=False) if m is old]
    for path in paths:
        replace_submodule(root, path, new)
    try:
        yield
    finally:
        for path in paths:
            replace_submodule(root, path, old)
