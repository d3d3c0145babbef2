"""One pass over a model that convert and audit share.

Deep-copy, trace (with leaf and swap fallbacks), probe once on the example
inputs, and classify every conv. Nothing here changes the caller's model
unless ``inplace=True``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from sepify.errors import ConfigError, ModelError, first_line
from sepify.graph.candidates import ConvSite, find_conv_sites
from sepify.graph.lift import lift_functional_convs
from sepify.graph.measured import OutputView, chosen_view
from sepify.graph.neighbours import layer_contexts
from sepify.graph.probe import ProbeResult, all_finite, float_leaves, preserved_state, probe
from sepify.graph.rewrite import replace_submodule
from sepify.graph.tracing import TraceOutcome, trace_model
from sepify.io.load import application_wrapper, wrapped_hint
from sepify.options import Selection

_SAME = 1e-4  # relative difference under which the traced graph computes what the model's forward does

__all__ = [
    "Analysis",
    "analyze",
    "normalize_inputs",
    "count_params",
    "check_finite_parameters",
]


@dataclass
class Analysis:
    """What one pass over a model found.

    ``work`` is the private copy (or the caller's model when inplace): it keeps the original's class, forward,
    output objects and methods, and it is what convert returns. ``target`` is what is analysed, swapped and
    calibrated alongside: the GraphModule traced from ``work`` (both hold the same leaf modules, so a pair
    swapped into both is one object), or ``work`` itself in swap mode. ``model`` is the module to return.
    """

    work: nn.Module
    outcome: TraceOutcome
    target: nn.Module
    before: ProbeResult
    sites: list[ConvSite]
    args: tuple[Any, ...]
    lifted: list[str]  # convs created from functional F.conv2d calls on parameters
    rewritten_root: bool = False  # the root's own forward called F.convNd on its parameters: return the graph
    view: OutputView | None = None  # outputs measured before their saturating activation (graph.measured)

    @property
    def model(self) -> nn.Module:
        """The converted model to hand back: the original's class, unless its own forward had to be rewritten."""
        return self.target if self.rewritten_root else self.work


def normalize_inputs(example_inputs: Any) -> tuple[Any, ...]:
    """Positional arguments for ``model(*args)``.

    A tensor is one argument; a tuple is the argument list; anything else (a
    list of images, a dict) is one argument.
    """
    if isinstance(example_inputs, tuple):
        return example_inputs
    return (example_inputs,)


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _trace_and_probe(
    work: nn.Module, args: tuple[Any, ...], lift: bool
) -> tuple[TraceOutcome, nn.Module, ProbeResult, list[str], bool]:
    """Trace ``work``, lift functional convs, and probe what will be returned (and the graph, if that is not it)."""
    outcome = trace_model(work, given=len(args))
    if outcome.graph_module is None:
        return outcome, work, probe(work, args), [], False
    lifted = lift_functional_convs(outcome.graph_module) if lift else []
    rewritten_root = False
    if lifted:
        if _lift_in_owners(work, lifted):
            outcome = trace_model(work, given=len(args))  # now a graph of call_module nodes at the lifted names
        else:
            rewritten_root = True
    gm = outcome.graph_module
    assert gm is not None  # traced before; the owners' graphs trace as they did inside it
    # The reference is the original's own forward and output objects; where the root's forward is rewritten,
    # the graph (its lifted convs exist only there), once it is known to compute what the model does.
    before = probe(work, args)
    differs = _graph_differs(gm, args, before.output)
    if differs is None and rewritten_root:
        before = probe(gm, args, what="traced model")
    if differs is not None:
        # A traced graph can bake in shapes or branches that eager code would
        # recompute; the eager model runs, so swap modules in it instead.
        return TraceOutcome(graph_module=None, error=differs), work, before, [], False
    return outcome, gm, before, lifted, rewritten_root


def _graph_differs(gm: fx.GraphModule, args: tuple[Any, ...], reference: Any) -> str | None:
    """Why the traced graph cannot stand in for the model whose output on ``args`` is ``reference``, or None."""
    try:
        with preserved_state(gm), torch.no_grad():
            output = gm(*args)
    except Exception as e:  # noqa: BLE001 - any failure of the graph means it cannot be used
        return f"the traced graph failed where the model runs ({first_line(e)})"
    got, want = float_leaves(output), float_leaves(reference)
    if len(got) != len(want) or any(a.shape != b.shape for a, b in zip(got, want)):
        return "the traced graph returns other outputs than the model's forward"
    for a, b in zip(got, want):
        scale = float(b.double().norm())
        if float((a.double() - b.double()).norm()) > _SAME * max(scale, 1e-12):
            return "the traced graph computes other values than the model's forward (a value fixed at tracing)"
    return None


def _lift_in_owners(work: nn.Module, lifted: list[str]) -> bool:
    """Lift the same functional convs inside ``work``, in the submodules that own their parameters.

    Each owner is replaced by the GraphModule of its own forward with the convs lifted, so the model keeps its
    class and every other module. False (``work`` unchanged) when the root owns one, or an owner's own trace does
    not lift the same convs: the caller then returns the whole graph instead.
    """
    owners: dict[str, list[str]] = {}
    for name in lifted:
        owners.setdefault(name.rpartition(".")[0], []).append(name)
    if "" in owners:
        return False
    rewritten = {}
    for owner, names in owners.items():
        module = work.get_submodule(owner)
        sub = trace_model(module).graph_module
        if sub is None:
            return False
        found = [f"{owner}.{n}" for n in lift_functional_convs(sub, inside=True)]
        if sorted(found) != sorted(names):
            return False
        sub.train(module.training)
        rewritten[owner] = sub
    for owner, sub in rewritten.items():
        replace_submodule(work, owner, sub)
    return True


def _broken(value: torch.Tensor, kind: str) -> torch.Tensor:
    """The values that mark a broken tensor: NaN or infinity, except -inf in a buffer (an additive attention
    mask, such as CLIP's causal mask, is -inf by design)."""
    if kind == "buffer":
        return torch.isnan(value) | (value == float("inf"))
    return ~torch.isfinite(value)


def check_finite_parameters(model: nn.Module) -> None:
    """Refuse a model whose floating parameters or buffers hold NaN or infinity, naming the first one
    (buffers may hold -inf: masks)."""
    for kind, named in (("parameter", model.named_parameters()), ("buffer", model.named_buffers())):
        for name, value in named:
            if value.is_floating_point() and value.numel() and bool(_broken(value, kind).any()):
                count = int(_broken(value, kind).sum())
                raise ModelError(
                    f"{kind} {name} holds {count} NaN or infinite value(s) of {value.numel()}: the model is broken "
                    "before any conversion; load intact weights (check the checkpoint, or how it was trained)"
                )


def _check_finite_output(output: Any) -> None:
    if not all_finite(output):
        raise ModelError(
            "the original model's outputs on the example inputs hold NaN or infinite values, so fidelity cannot be "
            "measured; pass example inputs it handles (real samples, or the dtype and value range it expects)"
        )


def _copied(model: nn.Module) -> nn.Module:
    try:
        return copy.deepcopy(model)
    except Exception as e:  # noqa: BLE001 - deepcopy fails on locks, generators, legacy weight_norm, ...
        raise ModelError(
            f"the model cannot be deep-copied ({type(e).__name__}: {str(e).strip()[:120]}), and sepify converts a "
            "copy to leave yours untouched; pass inplace=True to convert the model itself"
        ) from e


# What a forward may read of a conv's parameters without using their values: a pair answers these from the
# dense kernel it computes (HF and hand-written patch embeddings cast inputs to `self.proj.weight.dtype`).
_METADATA_ATTRIBUTES = frozenset({"dtype", "device", "shape", "ndim", "is_cuda", "requires_grad", "layout"})
_METADATA_METHODS = frozenset({"size", "dim", "numel", "get_device"})


def _reads_metadata_only(node: fx.Node) -> bool:
    """Whether every use of a ``get_attr`` node reads only its dtype, device or shape."""
    for user in node.users:
        if user.op == "call_function" and user.target is getattr and user.args[1] in _METADATA_ATTRIBUTES:
            continue
        if user.op == "call_method" and user.target in _METADATA_METHODS and user.args[0] is node:
            continue
        return False
    return True


def _params_read(model: nn.Module) -> frozenset[str]:
    """Modules whose parameters a traced graph uses directly (``get_attr`` nodes such as ``conv.weight`` whose
    values are used, e.g. ``F.conv2d(x, self.conv.weight)``; reading only their dtype or shape is fine)."""
    if not isinstance(model, fx.GraphModule):
        return frozenset()
    return frozenset(
        str(node.target).rpartition(".")[0]
        for node in model.graph.nodes
        if node.op == "get_attr" and not _reads_metadata_only(node)
    )


def analyze(
    model: nn.Module,
    args: tuple[Any, ...],
    *,
    inplace: bool = False,
    select: Selection | None = None,
    measure_on: str | int | None = None,
) -> Analysis:
    """Copy, trace and probe ``model`` and classify its convs; see the module docstring."""
    if not isinstance(model, nn.Module):
        hint = wrapped_hint(model, flag="")
        raise ConfigError(
            f"model must be a torch.nn.Module, got {type(model).__name__}{hint}{': pass that module' if hint else ''}"
        )
    if (inner := application_wrapper(model)) is not None:
        raise ConfigError(
            f"model is a {type(model).__name__}, which wraps its network at .{inner} (its own forward runs a whole "
            f"prediction); convert its .{inner} instead, then put the result back (wrapper.{inner} = result.model)"
        )
    if isinstance(model, torch.jit.ScriptModule):
        raise ModelError(
            f"the model is a TorchScript {type(model).__name__}: torch.fx cannot trace it and TorchScript ignores "
            "swapped submodules; convert the Python model it was scripted from"
        )
    check_finite_parameters(model)
    # Deep-copy before tracing: fuse() does, and some models (timm's levit)
    # keep tracing state that breaks a second trace of the caller's object.
    work = model if inplace else _copied(model)
    # Lifting moves parameters out of the modules that own them; the
    # GraphModule shares those modules with `work`, so only lift in a copy.
    outcome, target, before, lifted, rewritten_root = _trace_and_probe(work, args, lift=not inplace)
    # Sites come from the module that is converted: a GraphModule carries every
    # submodule of the original (see tracing) plus convs lifted from F.conv2d.
    select = select or Selection()
    _check_finite_output(before.output)
    sites = find_conv_sites(
        target,
        before.convs,
        include=select.include,
        exclude=select.exclude,
        skip_shared=select.skip_shared,
        params_read=_params_read(target),
    )
    contexts = layer_contexts(target)
    for site in sites:
        site.context = contexts.get(site.qualname, site.context)
    view = chosen_view(target, args, before.output, measure_on)
    return Analysis(work, outcome, target, before, sites, args, lifted, rewritten_root, view)
