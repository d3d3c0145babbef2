"""Exporting a model for a runtime: the one place that calls ``torch.onnx.export``, ``torch.export.export`` and
``openvino.convert_model``.

ONNX comes from either of torch.onnx's exporters (:data:`ONNX_EXPORTERS`): the dynamo exporter (the default since
PyTorch 2.9) and the TorchScript one. Neither is always faster in onnxruntime: the TorchScript graph keeps an
``F.pad`` before a conv as its own ``Pad`` node, where the dynamo graph folds it into the conv, and onnxruntime runs
CREPE's padded convs about 2x faster the first way; resnet50 is the same either way. Timing and saving try both
(:func:`sepify.runtime.runners.fastest_onnx`).

Each function raises what its exporter raises; callers say what failed in their own words (an output that cannot
be written, a model that cannot be timed).
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from sepify.errors import SepifyWarning, first_line

__all__ = ["ONNX_EXPORTERS", "onnx_bytes", "onnx_program", "exported_program", "openvino_model", "with_dynamic_batch"]

ONNX_EXPORTERS = ("dynamo", "torchscript")


def with_dynamic_batch(export: Callable[[tuple[Any, ...], Any], Any], args: tuple[Any, ...], what: str) -> Any:
    """``export(args, dynamic_shapes)`` with a dynamic batch axis on every tensor input; a fixed batch (and a
    warning) when that cannot export.

    torch.export specialises dimensions of size 1, so the trace runs on the
    example inputs repeated to a batch of 2 (a deployed model sees many batch
    sizes; the other dimensions stay as given).
    """
    tensors = [a for a in args if isinstance(a, Tensor)]
    dynamic_failure = None
    if tensors and len(tensors) == len(args) and all(a.dim() >= 1 for a in tensors):
        batch = torch.export.Dim("batch", min=1)
        doubled = tuple(torch.cat([a, a]) if a.shape[0] == 1 else a for a in tensors)
        try:
            result = export(doubled, tuple({0: batch} for _ in doubled))
            if result is not None:
                return result
        except Exception as e:  # noqa: BLE001 - a batch-dependent model; try the fixed batch below
            dynamic_failure = e
    result = export(args, None)
    if dynamic_failure is not None:
        warnings.warn(
            f"the {what} export has a fixed batch of {tensors[0].shape[0]}: a dynamic batch did not export "
            f"({first_line(dynamic_failure)})",
            SepifyWarning,
            stacklevel=3,
        )
    return result


def onnx_program(model: nn.Module, args: tuple[Any, ...], *, dynamic_batch: bool = True) -> Any:
    """The ``torch.onnx`` program of ``model`` on ``args`` (the dynamo exporter, weights inside the file)."""

    def export(inputs: tuple[Any, ...], shapes: Any) -> Any:
        with torch.no_grad():
            return torch.onnx.export(
                model, inputs, dynamo=True, verbose=False, external_data=False, dynamic_shapes=shapes
            )

    program = with_dynamic_batch(export, args, "ONNX") if dynamic_batch else export(args, None)
    assert program is not None  # the dynamo exporter always returns its program
    return program


def onnx_bytes(
    model: nn.Module, args: tuple[Any, ...], *, exporter: str = "dynamo", dynamic_batch: bool = True
) -> bytes:
    """``model`` on ``args`` as a serialized ONNX model from ``exporter`` (one of :data:`ONNX_EXPORTERS`).

    The TorchScript exporter names the inputs ``input_0``, ``input_1``... and
    traces the model: a forward whose control flow depends on values can
    export something else, so callers compare its outputs before using it
    (:func:`sepify.runtime.runners.fastest_onnx`).
    """
    if exporter == "dynamo":
        return bytes(onnx_program(model, args, dynamic_batch=dynamic_batch).model_proto.SerializeToString())
    if exporter != "torchscript":
        raise ValueError(f"exporter must be one of {ONNX_EXPORTERS}, got {exporter!r}")
    if isinstance(getattr(model, "graph", None), torch.fx.Graph):
        # the TorchScript exporter takes any module with a `graph` for a ScriptModule and calls `graph.outputs()`
        model = _Forward(model)
    names = [f"input_{i}" for i in range(len(args))]
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        # its deprecation notice and tracer warnings: the result is checked against the model instead
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, args, buffer, dynamo=False, input_names=names,  # type: ignore[arg-type]  # a file object works
            dynamic_axes={n: {0: "batch"} for n in names} if dynamic_batch else None,
        )  # fmt: skip
    return buffer.getvalue()


class _Forward(nn.Module):
    """A module that only calls ``inner``: hides a GraphModule's fx graph from the TorchScript exporter."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, *args: Any) -> Any:
        return self.inner(*args)


def exported_program(model: nn.Module, args: tuple[Any, ...]) -> torch.export.ExportedProgram:
    """``torch.export`` of ``model`` on ``args``, with a dynamic batch where the model allows it."""
    return with_dynamic_batch(  # type: ignore[no-any-return]
        lambda inputs, shapes: torch.export.export(model, inputs, dynamic_shapes=shapes), args, "pt2"
    )


def openvino_model(model: nn.Module, args: tuple[Any, ...]) -> Any:
    """OpenVINO's own conversion of ``model`` (its PyTorch frontend), traced on ``args``."""
    import openvino as ov

    with warnings.catch_warnings():  # OpenVINO's PyTorch frontend traces with torch.jit, which is deprecated
        warnings.filterwarnings("ignore", category=FutureWarning, module="torch.jit")
        with torch.no_grad():
            return ov.convert_model(model, example_input=args)
