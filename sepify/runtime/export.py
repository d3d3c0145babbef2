"""Exporting a model for a runtime: the one place that calls ``torch.onnx.export``, ``torch.export.export`` and
``openvino.convert_model``.

Each function raises what its exporter raises; callers say what failed in their own words (an output that cannot
be written, a model that cannot be timed).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from sepify.errors import SepifyWarning, first_line

__all__ = ["onnx_program", "exported_program", "openvino_model", "with_dynamic_batch"]


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
