"""Where sepify measures time: eager PyTorch, or onnxruntime or OpenVINO as a deployment would run the model.

Eager PyTorch runs a depthwise + pointwise pair as separate kernels with no
fusion, so it often realises less of a pair's MAC savings than the runtimes
models are deployed on (docs/benchmarks.md: resnet50 at rank 1 runs at 0.83x
of the original in eager PyTorch and 0.63x in onnxruntime). A
:class:`Runner` is one module prepared for one backend at a fixed input,
called with no arguments; :func:`interleaved_medians` times runners side by
side.

* ``"eager"``: the module itself, without gradients.
* ``"compile"``: ``torch.compile`` (inductor) of the layer inside its
  context (:class:`~sepify.runtime.context.InContext`), or of the whole model;
  compiled on the first call, before timing. torch.compile's caches are
  reset before each compilation: every timed layer would otherwise add a
  cache entry (and a guard check on every call) to the same ``forward``,
  and past the recompile limit run uncompiled.
* ``"onnxruntime"``: a layer (a conv or a pair, in its layout) as its small
  ONNX graph with the neighbours the runtime fuses with it
  (:func:`sepify.runtime.layers.layer_graph`, :mod:`sepify.runtime.context`);
  a whole model in the faster of torch.onnx's two exports of it
  (:func:`fastest_onnx`: the original too, so a slim model is compared with
  the best way to ship the original), in a session of
  :mod:`sepify.runtime.sessions`.
* ``"openvino"``: the same layer graphs read by OpenVINO; a whole model
  through ``openvino.convert_model``; compiled for the CPU with the latency
  hint, the thread count given, and OpenVINO's default inference precision
  (which may be bf16 on CPUs that have it, as a deployment would run).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_leaves

from sepify.core.functional import ConvLayer
from sepify.core.modules import SeparableConv
from sepify.errors import ModelError, first_line
from sepify.runtime.check import TOLERANCE, relative_difference
from sepify.runtime.context import InContext, LayerContext
from sepify.runtime.export import ONNX_EXPORTERS, onnx_bytes, openvino_model
from sepify.runtime.sessions import onnxruntime_session, openvino_compiled

__all__ = ["Runner", "fastest_onnx", "layer_runner", "model_runner"]

Runner = Callable[[], Any]


def layer_runner(
    module: ConvLayer | SeparableConv,
    x: Tensor,
    backend: str,
    threads: int | None = None,
    context: LayerContext | None = None,
) -> Runner:
    """``module`` (a conv or a pair) on ``x`` in ``backend``, ready to time.

    In onnxruntime and OpenVINO the layer runs inside its ``context`` (``x``
    is then the input before the context's padding). Eager PyTorch fuses
    nothing, so there the neighbours would only add the same time to both
    sides: ``x`` is the conv's own input and ``context`` is not used.
    """
    if backend == "eager":
        return _eager(module, (x,))
    context = context or LayerContext()
    if backend == "compile":
        return _compiled(InContext(module, context), (x,), f"the {type(module).__name__} layer")
    from sepify.runtime.layers import layer_graph

    graph = layer_graph(module, context.conv_input_shape(tuple(x.shape)), context).SerializeToString()
    if backend == "openvino":
        return _openvino(graph, [x], threads)
    # A Pad before a conv stays a node of its own, as in the whole model's faster export (onnxruntime leaves the Pad
    # of torch.onnx's TorchScript export, which computes F.pad's amounts in the graph); folded into the conv, long
    # kernels run on MLAS's slow edge path: crepe-tiny's conv2 (64 taps, 8 x 128 x 128) takes 7.5 ms, 1.8 ms after
    # its own Pad, and the audit took every pair for 4x faster than the conv it replaced.
    return _onnxruntime(graph, [x], threads, fuse_pads=False)


def model_runner(model: nn.Module, args: tuple[Any, ...], backend: str, threads: int | None = None) -> Runner:
    """A whole model on ``args`` in ``backend``; for onnxruntime, exported with ``torch.onnx.export`` first."""
    if backend == "eager":
        return _eager(model, args)
    if backend == "compile":
        return _compiled(model, args, "the model")
    tensors = [a for a in args if isinstance(a, Tensor)]
    if len(tensors) != len(args):
        raise ModelError(f"timing a model in {backend} needs tensor inputs only; time it with the eager backend")
    if backend == "openvino":
        with _failure_is_the_models(model, "convert it with OpenVINO to time it"):
            converted = openvino_model(model, tuple(tensors))
        return _openvino(converted, tensors, threads)
    with _failure_is_the_models(model, "export it to ONNX to time it in onnxruntime"):
        return _fastest_onnx(model, tuple(tensors), threads, dynamic_batch=False)[2]  # its session, already timed


def fastest_onnx(
    model: nn.Module, args: tuple[Tensor, ...], threads: int | None = None, *, dynamic_batch: bool = True, reps: int = 5
) -> tuple[str, bytes]:
    """``(exporter, serialized model)``: the faster in onnxruntime of torch.onnx's two exports of ``model``.

    Each export that succeeds is run on ``args`` (and, with a dynamic batch,
    on a batch one larger) and kept only if it reproduces the model's outputs (:data:`sepify.runtime.check.TOLERANCE`: a
    trace can bake in a branch); those left are timed interleaved (median of
    ``reps``); the dynamo export is kept unless the other takes under 0.9x
    its time (timing noise must not change the file from run to run).
    Raises the first exporter's error when neither is usable.
    """
    exporter, graph, _ = _fastest_onnx(model, args, threads, dynamic_batch=dynamic_batch, reps=reps)
    return exporter, graph


def _fastest_onnx(
    model: nn.Module, args: tuple[Tensor, ...], threads: int | None, *, dynamic_batch: bool, reps: int = 5
) -> tuple[str, bytes, Runner]:
    """:func:`fastest_onnx`, with the winner's onnxruntime session on ``args`` as a runner."""
    from sepify.runtime.timing import interleaved_medians  # timing builds on this module's runners

    batches = [args, tuple(torch.cat([a, a[:1]]) for a in args)] if dynamic_batch else [args]
    with torch.no_grad():
        wants = [[t for t in tree_leaves(model(*inputs)) if isinstance(t, Tensor)] for inputs in batches]
    usable: dict[str, tuple[bytes, Runner]] = {}
    failure: Exception | None = None
    for exporter in ONNX_EXPORTERS:
        try:
            graph = onnx_bytes(model, args, exporter=exporter, dynamic_batch=dynamic_batch)
            runs = [_onnxruntime(graph, list(inputs), threads) for inputs in batches]
            difference = max(
                relative_difference(want, [torch.from_numpy(o) for o in run()]) for want, run in zip(wants, runs)
            )
            run = runs[0]
        except Exception as e:  # noqa: BLE001 - the other exporter may still work; the first error is raised
            failure = failure or e
            continue
        if difference <= TOLERANCE:
            usable[exporter] = (graph, run)
        else:
            failure = failure or ValueError(f"the {exporter} export differs from the model by {difference:.1e}")
    if not usable:
        assert failure is not None
        raise failure
    names = list(usable)
    if len(names) == 1:
        return names[0], *usable[names[0]]
    times = dict(zip(names, interleaved_medians([usable[n][1] for n in names], reps), strict=True))
    first = names[0]  # the default exporter, unless another is clearly faster: files stay the same run to run
    best = min(names, key=lambda n: times[n] / (1.0 if n == first else _CLEARLY_FASTER))
    return best, *usable[best]


_CLEARLY_FASTER = 0.9  # another exporter's graph is chosen over the default only when it takes < 0.9x the time


@contextlib.contextmanager
def _failure_is_the_models(model: nn.Module, doing: str) -> Iterator[None]:
    """Any exporter or converter failure becomes one ModelError sentence naming the model and what failed."""
    try:
        yield
    except Exception as e:  # noqa: BLE001 - exporters fail in many specific ways; the model is what they choke on
        raise ModelError(
            f"could not {doing} ({type(model).__name__}: {first_line(e)}); time it with the eager backend"
        ) from e


def _openvino(model: Any, feeds: list[Tensor], threads: int | None) -> Runner:
    request = openvino_compiled(model, threads).create_infer_request()
    arrays = {i: t.detach().float().cpu().numpy() for i, t in enumerate(feeds)}
    return lambda: request.infer(arrays)


def _compiled(module: nn.Module, args: tuple[Any, ...], what: str) -> Runner:
    """``module`` compiled by torch.compile and run once (the compilation), ready to time."""
    torch.compiler.reset()
    compiled = torch.compile(module, dynamic=False)
    with _failure_is_the_models(module, f"compile {what} with torch.compile"), torch.no_grad():
        compiled(*args)
    return _eager(compiled, args)


def _eager(module: Callable[..., Any], args: tuple[Any, ...]) -> Runner:
    def run() -> Any:
        with torch.no_grad():
            return module(*args)

    return run


def _onnxruntime(model: bytes, feeds: list[Tensor], threads: int | None, *, fuse_pads: bool = True) -> Runner:
    """A session of ``model`` fed ``feeds`` in the order of its inputs (each exporter names them its own way)."""
    session = onnxruntime_session(model, threads, fuse_pads=fuse_pads)
    names = [i.name for i in session.get_inputs()]
    arrays = {name: t.detach().float().cpu().numpy() for name, t in zip(names, feeds, strict=True)}
    return lambda: session.run(None, arrays)
