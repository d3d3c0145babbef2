"""torch.fx tracing that reaches every conv it can, and says what it could not.

``trace_model`` first traces the whole model. When a submodule's forward
cannot be traced (data-dependent control flow, iteration over a Proxy, ...),
that submodule becomes a leaf and the trace is retried, so the rest of the
model stays a graph; convs inside such leaves are later converted by swapping
modules. When the root's own forward is untraceable there is no graph at all
and the caller falls back to swapping modules in the whole model.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch.fx as fx
from torch import nn

from sepify.core.functional import CONV_TYPES
from sepify.errors import ConfigError, first_line

__all__ = [
    "register_leaf_module",
    "is_registered_leaf",
    "SepifyTracer",
    "TraceOutcome",
    "trace_model",
    "unpassed_defaults",
]

logger = logging.getLogger(__name__)

_LEAF_TYPES: list[type[nn.Module]] = []  # the only module-level state in sepify

M = TypeVar("M", bound=type[nn.Module])

# Retries add one leaf each; a model needing more than this many leaves is
# better handled by swapping modules in the whole model.
_MAX_LEAVES = 64


def register_leaf_module(cls: M) -> M:
    """Class decorator: never trace into modules of this type (and its subclasses).

    Use it for modules whose forward torch.fx cannot trace; convs inside them
    are still converted, by swapping modules.

    Examples:
        >>> @register_leaf_module
        ... class Dynamic(nn.Module):
        ...     def forward(self, x):
        ...         return x if x.sum() > 0 else -x
    """
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ConfigError(f"register_leaf_module expects an nn.Module subclass, got {cls!r}")
    if cls not in _LEAF_TYPES:
        _LEAF_TYPES.append(cls)
    return cls


def is_registered_leaf(module: nn.Module) -> bool:
    """Whether ``module``'s type was registered with :func:`register_leaf_module`."""
    return isinstance(module, tuple(_LEAF_TYPES))


class SepifyTracer(fx.Tracer):
    """An fx tracer whose leaves are convs, registered types and named qualnames.

    Every conv (:data:`~sepify.core.functional.CONV_TYPES`, subclasses included) is a leaf, so each conv
    call is one ``call_module`` node: standard convs can be swapped, and
    subclasses are visible and reported instead of being traced through.
    The tracer also records the innermost submodule whose forward raised, so
    the caller can retry with that submodule as a leaf.
    """

    def __init__(self, leaf_qualnames: frozenset[str] = frozenset()) -> None:
        super().__init__()
        self.leaf_qualnames = leaf_qualnames
        self.failed_qualname: str | None = None

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, CONV_TYPES) or is_registered_leaf(m):
            return True
        if module_qualified_name in self.leaf_qualnames:
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(
        self,
        m: nn.Module,
        forward: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Any:
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            # The first frame to see the exception is the innermost module
            # whose forward failed; outer frames must not overwrite it.
            if self.failed_qualname is None:
                self.failed_qualname = self.path_of_module(m)
            raise


@dataclass
class TraceOutcome:
    """What tracing produced.

    ``graph_module`` is None when the root itself is untraceable (then
    ``error`` holds the reason); ``leaves`` lists the submodules that had to be
    kept as leaves, with the shortened fx error for each.
    """

    graph_module: fx.GraphModule | None
    leaves: dict[str, str] = field(default_factory=dict)
    error: str | None = None
    constants: dict[str, Any] = field(default_factory=dict)  # forward parameters traced as fixed values

    @property
    def mode(self) -> str:
        """``"fx"``, ``"fx+leaves"`` or ``"swap"``."""
        if self.graph_module is None:
            return "swap"
        return "fx+leaves" if self.leaves else "fx"


def _parent_qualname(qualname: str) -> str:
    return qualname.rpartition(".")[0]


def _attach_unused_modules(gm: fx.GraphModule, model: nn.Module) -> None:
    """Give ``gm`` the submodules its graph never calls.

    GraphModule copies only the modules its graph uses, so a model's unused
    parts (aux heads in eval mode, modules called only in training) would
    vanish from the converted model's state_dict. Re-attaching them keeps the
    converted model's state_dict keys and params those of the original, apart
    from the converted convs; the graph, and so forward, is unchanged.
    """
    for name, module in model.named_modules():
        if not name:
            continue
        parent_name, _, child = name.rpartition(".")
        try:
            parent = gm.get_submodule(parent_name)
        except AttributeError:
            continue  # its parent was attached whole, or is not a module path in gm
        if child not in parent._modules:
            parent.add_module(child, module)
    _attach_unused_tensors(gm, model)


def _attach_unused_tensors(gm: fx.GraphModule, model: nn.Module) -> None:
    """Give ``gm``'s copies of traced-through modules the parameters and buffers the graph never reads.

    fx copies into a traced-through module only the attributes its graph reads
    (e.g. a BatchNorm whose forward was traced keeps its running statistics
    but loses ``num_batches_tracked``), so without this its state_dict would
    miss keys the original has and safetensors round trips would not fit.
    """
    for name, module in model.named_modules():
        try:
            copy = gm.get_submodule(name)
        except AttributeError:
            continue
        if copy is module:
            continue
        for attr, param in module._parameters.items():
            if param is not None and attr not in copy._parameters and not hasattr(copy, attr):
                copy.register_parameter(attr, param)
        for attr, buffer in module._buffers.items():
            if buffer is not None and attr not in copy._buffers and not hasattr(copy, attr):
                copy.register_buffer(attr, buffer, persistent=attr not in module._non_persistent_buffers_set)


_CONSTANT_DEFAULTS = (type(None), bool, int, float, str)


def unpassed_defaults(model: nn.Module, given: int) -> dict[str, Any]:
    """Parameters of ``model.forward`` after the first ``given`` positional ones that have simple defaults.

    The example inputs do not pass them, so the model runs with their
    defaults; tracing them as constants (fx ``concrete_args``) rather than
    Proxies keeps ``if class_labels is not None:`` branches traceable.

    >>> class Net(nn.Module):
    ...     def forward(self, x, labels=None, scale=1.0, *rest, flag=True, **extra):
    ...         return x
    >>> unpassed_defaults(Net(), given=1)
    {'labels': None, 'scale': 1.0, 'flag': True}
    """
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return {}
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return {
        p.name: p.default
        for i, p in enumerate(params)
        if i >= given
        and p.kind in kinds
        and p.default is not inspect.Parameter.empty
        and isinstance(p.default, _CONSTANT_DEFAULTS)
    }


def trace_model(
    model: nn.Module, extra_leaves: frozenset[str] = frozenset(), *, given: int | None = None
) -> TraceOutcome:
    """Trace ``model`` with :class:`SepifyTracer`, turning failing submodules into leaves.

    The model is traced in its current train/eval mode. ``model`` itself is not
    modified, but the returned GraphModule shares its submodules. With
    ``given`` (how many positional example inputs the caller will pass),
    defaulted parameters after those are traced as the constants they will be
    (:func:`unpassed_defaults`); first as Proxies, which keeps the graph
    general, and only when that fails.
    """
    outcome = _trace(model, extra_leaves, None)
    constants = unpassed_defaults(model, given) if given is not None else {}
    if constants and (outcome.graph_module is None or outcome.leaves):
        with_constants = _trace(model, extra_leaves, constants)
        if with_constants.graph_module is not None and len(with_constants.leaves) < (
            len(outcome.leaves) if outcome.graph_module is not None else _MAX_LEAVES + 1
        ):
            return with_constants
    return outcome


def _trace(model: nn.Module, extra_leaves: frozenset[str], concrete: dict[str, Any] | None) -> TraceOutcome:
    leaves: dict[str, str] = {}
    leaf_set = set(extra_leaves)
    while True:
        tracer = SepifyTracer(frozenset(leaf_set))
        try:
            graph = tracer.trace(model, concrete_args=concrete)
        except Exception as e:  # noqa: BLE001 - any fx failure means "not traceable"
            failed = tracer.failed_qualname
            reason = first_line(e)
            # A failure reported at an existing leaf really happened in the
            # caller's forward (e.g. control flow on the leaf's output).
            while failed and failed in leaf_set:
                failed = _parent_qualname(failed)
            if not failed or len(leaves) >= _MAX_LEAVES:
                logger.info("fx cannot trace %s: %s", type(model).__name__, reason)
                return TraceOutcome(graph_module=None, leaves={}, error=reason)
            logger.info("fx cannot trace %r (%s); keeping it as a leaf", failed, reason)
            leaves[failed] = reason
            leaf_set.add(failed)
            continue
        gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
        _attach_unused_modules(gm, model)
        # GraphModule builds fresh containers (training=True) along the paths
        # to the modules it uses; copy each flag from the module at the same
        # path (not recursively: children may deliberately be in another mode).
        for name, m in gm.named_modules():
            try:
                m.training = model.get_submodule(name).training
            except AttributeError:
                continue
        gm.graph.lint()
        return TraceOutcome(graph_module=gm, leaves=leaves, constants=dict(concrete or {}))
