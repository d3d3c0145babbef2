"""Run a model once on the example inputs and record what sepify needs to know.

One forward pass gives: the output (for verification), total MACs (from
``torch.utils.flop_counter.FlopCounterMode``), and, via forward hooks on every
``nn.Conv2d``, how often each conv ran and its input/output shapes. Hooks see
convs inside fx leaf modules and in untraceable models alike, so one
mechanism serves every tracing mode. The pass never leaves a trace: buffers
(e.g. BatchNorm running stats in train mode) are restored and the RNG is
forked with a fixed seed, so two probes see the same dropout masks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree
from torch.utils.flop_counter import FlopCounterMode

from sepify.core.functional import CONV_TYPES
from sepify.errors import InputShapeError, first_line
from sepify.runtime.runners import model_runner
from sepify.runtime.timing import interleaved_medians

__all__ = [
    "ConvCall",
    "ProbeResult",
    "probe",
    "preserved_state",
    "describe_inputs",
    "time_forwards",
    "float_leaves",
    "all_finite",
]


@dataclass
class ConvCall:
    """``(input_shape, output_shape)`` of every call of one conv, in call order."""

    shapes: list[tuple[tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)

    @property
    def calls(self) -> int:
        return len(self.shapes)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self.shapes[0][0]

    @property
    def output_shape(self) -> tuple[int, ...]:
        return self.shapes[0][1]


@dataclass
class ProbeResult:
    output: Any
    macs: int
    convs: dict[str, ConvCall] = field(default_factory=dict)


@contextlib.contextmanager
def preserved_state(module: nn.Module, seed: int = 0) -> Iterator[None]:
    """Restore every buffer after the block and fork the RNG with ``seed`` inside it."""
    saved = [(b, b.detach().clone()) for b in module.buffers()]
    cuda_in_use = torch.cuda.is_available() and torch.cuda.is_initialized()  # type: ignore[no-untyped-call]
    devices = [torch.cuda.current_device()] if cuda_in_use else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        try:
            yield
        finally:
            with torch.no_grad():
                for buffer, value in saved:
                    if buffer.shape == value.shape:
                        buffer.copy_(value)


def time_forwards(
    modules: Sequence[nn.Module],
    args: tuple[Any, ...],
    reps: int,
    *,
    backend: str = "eager",
    threads: int | None = None,
) -> list[float]:
    """Median seconds of each module's forward on ``args`` in ``backend``, interleaved, without gradients; buffers
    restored (:func:`sepify.runtime.runners.model_runner`)."""
    param = next((p for m in modules for p in m.parameters()), None)
    with contextlib.ExitStack() as stack:
        for m in modules:
            stack.enter_context(preserved_state(m))
        stack.enter_context(torch.no_grad())
        fns = [model_runner(m, args, backend, threads) for m in modules]
        return interleaved_medians(fns, reps, device=param.device if param is not None else None)


def float_leaves(output: Any) -> list[Tensor]:
    """The floating-point tensors of a model's output, however nested (tuples, lists, dicts), in order."""
    return [t for t in pytree.tree_leaves(output) if isinstance(t, Tensor) and t.is_floating_point()]


def all_finite(output: Any) -> bool:
    """Whether every floating-point value of a model's output is finite."""
    return all(bool(torch.isfinite(t).all()) for t in float_leaves(output))


def describe_inputs(args: tuple[Any, ...]) -> str:
    """Short text for the example inputs, e.g. ``(1, 3, 224, 224) float32``."""

    def one(a: Any) -> str:
        if isinstance(a, Tensor):
            return f"{tuple(a.shape)} {str(a.dtype).removeprefix('torch.')}"
        if isinstance(a, (list, tuple)):
            return "[" + ", ".join(one(x) for x in a) + "]"
        if isinstance(a, dict):
            return "{" + ", ".join(f"{k}: {one(v)}" for k, v in a.items()) + "}"
        return type(a).__name__

    return ", ".join(one(a) for a in args)


def probe(module: nn.Module, args: tuple[Any, ...], *, what: str = "model") -> ProbeResult:
    """Run ``module(*args)`` once without side effects; see the module docstring.

    Raises:
        InputShapeError: the forward raised; the message names the inputs.
    """
    names: dict[int, str] = {}
    for name, m in module.named_modules():  # first path of each module object
        if isinstance(m, CONV_TYPES):
            names.setdefault(id(m), name)
    convs: dict[str, ConvCall] = {}
    handles = []

    def hook(m: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
        # Never raise from here: a failure would be blamed on the user's inputs.
        name = names.get(id(m))
        if name is not None and inputs and isinstance(inputs[0], Tensor) and isinstance(output, Tensor):
            convs.setdefault(name, ConvCall()).shapes.append((tuple(inputs[0].shape), tuple(output.shape)))

    for name, m in module.named_modules():
        if names.get(id(m)) == name:
            handles.append(m.register_forward_hook(hook))
    counter = FlopCounterMode(display=False)
    try:
        with preserved_state(module), torch.no_grad(), counter:
            output = module(*args)
    except Exception as e:  # noqa: BLE001 - any failure of user code is an input problem
        raise InputShapeError(
            f"the {what} ({type(module).__name__}) failed on example inputs {describe_inputs(args)}: "
            f"{first_line(e)}; "
            "pass inputs of the shape and dtype its forward expects"
        ) from e
    finally:
        for h in handles:
            h.remove()
    # FlopCounterMode counts 2 FLOPs per multiply-add.
    return ProbeResult(output=output, macs=counter.get_total_flops() // 2, convs=convs)
