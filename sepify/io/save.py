"""Writing a converted model in the formats people deploy: pt, pt2, ONNX, OpenVINO IR, safetensors + plan.

Every file is written atomically (:mod:`sepify.io.atomic`); every problem is an
:class:`~sepify.errors.OutputError` naming the path, the cause and the fix.
A safetensors file carries its plan in its own metadata (``sepify.plan``), so
the weights never depend on the ``.plan.json`` beside them, which is written
first and is there for people and tools that read JSON. pt2 and ONNX get a
dynamic batch axis where the model allows it; OpenVINO IR keeps float32
weights (``compress_to_fp16=False``: the file computes what PyTorch does).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from sepify.errors import ConfigError, OutputError, SepifyError, first_line
from sepify.io.atomic import atomic_path, write_text_atomic
from sepify.io.paths import PLAN_METADATA_KEY, check_output_name, plan_path, weights_path
from sepify.runtime.export import exported_program, onnx_program, openvino_model
from sepify.runtime.quantize import check_int8, int8_onnx, int8_openvino
from sepify.runtime.runners import fastest_onnx
from sepify.runtime.sessions import installed
from sepify.vocab import FORMATS

__all__ = ["save_model"]


def save_model(
    model: nn.Module,
    path: str | os.PathLike[str],
    fmt: str,
    *,
    example_args: tuple[Any, ...],
    plan_json: str,
    overwrite: bool = True,
    int8: Sequence[tuple[Tensor, ...]] | None = None,
) -> list[Path]:
    """Write ``model`` to ``path`` in ``fmt`` atomically; returns the files written.

    ``safetensors`` stores ``plan_json`` in the file's metadata and also
    writes it to ``<name>.plan.json`` beside the weights (first), so that
    :func:`sepify.load_converted` can rebuild the model without pickle.
    With ``overwrite=False`` no existing file is replaced. ``int8``: batches of
    model arguments to quantize an ONNX or OpenVINO file with
    (:mod:`sepify.runtime.quantize`); other formats refuse it.
    """
    path = Path(path)
    if int8 is not None:
        try:
            check_int8(fmt)
        except ConfigError as e:
            raise OutputError(f"{path}: {e}") from e
    if fmt == "pt":
        with atomic_path(path, overwrite=overwrite) as tmp:
            torch.save(model, tmp)
        return [path]
    if fmt == "pt2":
        try:
            program = exported_program(model, example_args)
        except Exception as e:  # noqa: BLE001 - export failures are many and specific
            raise OutputError(
                f"{path}: torch.export could not export the converted model ({first_line(e)}); save as "
                "--format pt or safetensors instead"
            ) from e
        with atomic_path(path, overwrite=overwrite) as tmp:
            torch.export.save(program, tmp)
        return [path]
    if fmt == "onnx":
        return [_save_onnx(model, path, example_args, overwrite, int8)]
    if fmt == "openvino":
        return _save_openvino(model, path, example_args, overwrite, int8)
    if fmt == "safetensors":
        try:
            from safetensors.torch import save_file
        except ImportError as e:
            raise OutputError("--format safetensors needs the safetensors package; pip install safetensors") from e
        state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        plan_file = plan_path(path)
        write_text_atomic(plan_file, plan_json, overwrite=overwrite)
        metadata = {"format": "sepify", "plan": plan_file.name, PLAN_METADATA_KEY: plan_json}
        with atomic_path(path, overwrite=overwrite) as tmp:
            save_file(_dedupe_shared(state), str(tmp), metadata=metadata)
        return [plan_file, path]
    raise OutputError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")


def _dedupe_shared(state: dict[str, Tensor]) -> dict[str, Tensor]:
    # safetensors refuses tensors that share storage (tied weights); keep copies.
    seen: set[int] = set()
    out = {}
    for k, v in state.items():
        ptr = v.untyped_storage().data_ptr() if v.numel() else -1
        out[k] = v.clone() if ptr in seen and ptr != -1 else v
        seen.add(ptr)
    return out


def _save_openvino(
    model: nn.Module, path: Path, args: tuple[Any, ...], overwrite: bool, int8: Sequence[tuple[Tensor, ...]] | None
) -> list[Path]:
    """OpenVINO IR: ``path`` (.xml) and its weights beside it (.bin), each written atomically, weights first."""
    import tempfile

    try:
        import openvino as ov
    except ImportError as e:
        raise OutputError("--format openvino needs the openvino package; pip install 'sepify[openvino]'") from e
    check_output_name(path, "openvino")
    weights = weights_path(path)
    try:
        converted = openvino_model(model, args)
    except Exception as e:  # noqa: BLE001 - converter failures are many and specific
        raise OutputError(
            f"{path}: OpenVINO could not convert the model ({first_line(e)}); save as --format onnx (OpenVINO reads "
            "it too) or pt"
        ) from e
    if int8 is not None:
        try:
            converted = int8_openvino(converted, int8)
        except Exception as e:  # noqa: BLE001 - quantizer failures are many and specific
            raise OutputError(
                f"{path}: NNCF could not quantize the model to int8 ({first_line(e)}); write it without int8=..."
            ) from e
    with tempfile.TemporaryDirectory() as folder:
        staged = Path(folder) / "model.xml"
        ov.save_model(converted, str(staged), compress_to_fp16=False)
        with atomic_path(weights, overwrite=overwrite) as tmp:
            tmp.write_bytes(staged.with_suffix(".bin").read_bytes())
        with atomic_path(path, overwrite=overwrite) as tmp:
            tmp.write_bytes(staged.read_bytes())
    return [weights, path]


def _save_onnx(
    model: nn.Module, path: Path, args: tuple[Any, ...], overwrite: bool, int8: Sequence[tuple[Tensor, ...]] | None
) -> Path:
    try:
        import onnx  # noqa: F401 - torch.onnx needs it; fail with our message first
        import onnxscript  # noqa: F401
    except ImportError as e:
        raise OutputError("--format onnx needs the onnx and onnxscript packages; pip install onnx onnxscript") from e
    try:
        with atomic_path(path, overwrite=overwrite) as tmp:
            if installed("onnxruntime") and all(isinstance(a, Tensor) and a.dim() >= 1 for a in args):
                # both exporters, each checked and timed in onnxruntime: the faster is written
                graph = fastest_onnx(model, args)[1]
                tmp.write_bytes(graph if int8 is None else _int8_onnx(graph, int8, path))
            elif int8 is not None:
                raise OutputError(f"{path}: int8 ONNX needs onnxruntime and tensor inputs; write it without int8=...")
            else:
                onnx_program(model, args).save(str(tmp))  # the temp name ends in the target's extension
    except SepifyError:
        raise
    except Exception as e:  # noqa: BLE001 - exporter failures are many and specific
        raise OutputError(
            f"{path}: ONNX export failed ({first_line(e)}); save as --format pt or safetensors instead "
            "(both keep every module as it is)"
        ) from e
    return path


def _int8_onnx(graph: bytes, batches: Sequence[tuple[Tensor, ...]], path: Path) -> bytes:
    try:
        return int8_onnx(graph, batches)
    except Exception as e:  # noqa: BLE001 - quantizer failures are many and specific
        raise OutputError(
            f"{path}: onnxruntime could not quantize the model to int8 ({first_line(e)}); write it without int8=..."
        ) from e
