"""Writing a converted model in the formats people deploy: pt, pt2, ONNX, safetensors + plan.

Every file is written atomically (:mod:`sepify.io.atomic`); every problem is an
:class:`~sepify.errors.OutputError` naming the path, the cause and the fix.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from sepify.errors import OutputError, SepifyError
from sepify.io.atomic import atomic_path, write_text_atomic

__all__ = ["FORMATS", "save_model", "plan_path"]

FORMATS = ("pt", "pt2", "onnx", "safetensors")


def plan_path(weights_path: Path) -> Path:
    """Where the plan of ``name.safetensors`` lives: ``name.plan.json`` beside it."""
    return weights_path.with_name(weights_path.name.removesuffix(".safetensors") + ".plan.json")


def save_model(
    model: nn.Module,
    path: str | os.PathLike[str],
    fmt: str,
    *,
    example_args: tuple[Any, ...],
    plan_json: str,
) -> list[Path]:
    """Write ``model`` to ``path`` in ``fmt`` atomically; returns the files written.

    ``safetensors`` also writes ``plan_json`` to ``<name>.plan.json`` beside
    the weights, so that :func:`sepify.load_converted` can rebuild the model
    without pickle.
    """
    path = Path(path)
    if fmt == "pt":
        with atomic_path(path) as tmp:
            torch.save(model, tmp)
        return [path]
    if fmt == "pt2":
        try:
            program = torch.export.export(model, example_args)
        except Exception as e:  # noqa: BLE001 - export failures are many and specific
            raise OutputError(
                f"{path}: torch.export could not export the converted model ({type(e).__name__}: "
                f"{str(e).strip().splitlines()[0][:160]}); save as --format pt or safetensors instead"
            ) from e
        with atomic_path(path) as tmp:
            torch.export.save(program, tmp)
        return [path]
    if fmt == "onnx":
        return [_save_onnx(model, path, example_args)]
    if fmt == "safetensors":
        try:
            from safetensors.torch import save_file
        except ImportError as e:
            raise OutputError("--format safetensors needs the safetensors package; pip install 'sepify[io]'") from e
        state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        with atomic_path(path) as tmp:
            save_file(_dedupe_shared(state), str(tmp), metadata={"format": "sepify", "plan": plan_path(path).name})
        plan_file = plan_path(path)
        write_text_atomic(plan_file, plan_json)
        return [path, plan_file]
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


def _save_onnx(model: nn.Module, path: Path, args: tuple[Any, ...]) -> Path:
    try:
        import onnx  # noqa: F401 - torch.onnx needs it; fail with our message first
        import onnxscript  # noqa: F401
    except ImportError as e:
        raise OutputError("--format onnx needs the onnx and onnxscript packages; pip install 'sepify[onnx]'") from e
    try:
        with atomic_path(path) as tmp:
            onnx_path = tmp.with_suffix(".onnx")
            try:
                program = torch.onnx.export(model, args, dynamo=True, verbose=False, external_data=False)
                assert program is not None
                program.save(str(onnx_path))
                os.replace(onnx_path, tmp)
            finally:
                onnx_path.unlink(missing_ok=True)
    except SepifyError:
        raise
    except Exception as e:  # noqa: BLE001 - exporter failures are many and specific
        raise OutputError(
            f"{path}: ONNX export failed ({type(e).__name__}: {str(e).strip().splitlines()[0][:160]}); "
            "save as --format pt2 or pt instead"
        ) from e
    return path
