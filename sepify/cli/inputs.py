"""Turning command-line text into what the library takes: example inputs, ranks, numbers, a loaded model."""

from __future__ import annotations

import json
import math
import os
from typing import Any

import torch
import typer
from torch import nn

from sepify.cli.options import CalibrationOptions, LoadOptions
from sepify.cli.output import step
from sepify.errors import ConfigError, ModelLoadError
from sepify.io.datasets import load_calibration
from sepify.io.load import LoadedModel
from sepify.io.load import load_model as load_source

__all__ = [
    "parse_input_shape",
    "make_inputs",
    "device",
    "parse_kwargs",
    "parse_rank",
    "parse_numbers",
    "calibration_tensor",
    "calibration_setting",
    "load_model",
    "check_device",
]

_DTYPES = {
    "float32": torch.float32,
    "float": torch.float32,
    "float64": torch.float64,
    "double": torch.float64,
    "float16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "long": torch.int64,
    "int32": torch.int32,
    "int": torch.int32,
    "bool": torch.bool,
}
_INT_HIGH = 10  # integer example inputs are drawn from [0, 10): valid ids/indices for most models
_MAX_DIM = 2**31
_INPUT_SHARE_OF_MEMORY = 8  # inputs above 1/8 of this machine's memory leave no room for the activations
_DEVICE_TYPES = ("cpu", "cuda", "mps", "xpu")


def _memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def parse_input_shape(text: str) -> tuple[tuple[int, ...], torch.dtype]:
    """``"1,3,224,224"`` -> ``((1, 3, 224, 224), float32)``; ``"1,10:int64"`` -> int64."""
    shape_part, _, dtype_part = text.partition(":")
    try:
        shape = tuple(int(s) for s in shape_part.replace("x", ",").split(",") if s.strip())
    except ValueError:
        raise typer.BadParameter(f"{text!r} is not a shape; write it like 1,3,224,224") from None
    if not shape or any(d < 1 for d in shape):
        raise typer.BadParameter(f"{text!r} is not a shape of positive sizes; write it like 1,3,224,224")
    if any(d >= _MAX_DIM for d in shape):
        raise typer.BadParameter(f"{text!r} has a size of 2^31 or more; no model input is that large")
    dtype_name = dtype_part.strip().lower() or "float32"
    if dtype_name not in _DTYPES:
        raise typer.BadParameter(f"unknown dtype {dtype_part!r} in {text!r}; use one of {', '.join(sorted(_DTYPES))}")
    return shape, _DTYPES[dtype_name]


def make_inputs(shapes: list[str] | None, on: torch.device) -> tuple[torch.Tensor, ...]:
    """Seeded example inputs: Gaussian floats, integers in [0, 10)."""
    gen = torch.Generator().manual_seed(0)
    parsed = [parse_input_shape(text) for text in shapes or ["1,3,224,224"]]
    needed = sum(math.prod(shape) * dtype.itemsize for shape, dtype in parsed)
    memory = _memory_bytes()
    if memory is not None and needed * _INPUT_SHARE_OF_MEMORY > memory:
        raise typer.BadParameter(
            f"the example inputs alone would take {needed / 2**30:.1f} GiB of this machine's "
            f"{memory / 2**30:.0f} GiB, and one forward pass needs many times that; use a smaller batch or size",
            param_hint="--input-shape",
        )
    tensors = []
    for shape, dtype in parsed:
        if dtype.is_floating_point:
            t = torch.randn(shape, generator=gen).to(dtype)
        else:
            t = torch.randint(0, _INT_HIGH, shape, generator=gen).to(dtype)
        tensors.append(t.to(on))
    return tuple(tensors)


def device(name: str) -> torch.device:
    try:
        found = torch.device(name)
    except RuntimeError:
        raise typer.BadParameter(f"unknown device {name!r}; use cpu or cuda", param_hint="--device") from None
    if found.type not in _DEVICE_TYPES:
        raise typer.BadParameter(
            f"{name!r} holds no data to compute with; use one of {', '.join(_DEVICE_TYPES)}", param_hint="--device"
        )
    if not _available(found.type):
        raise ConfigError(
            f"--device {name} was asked for, but torch sees no {found.type} device here; use --device cpu"
        )
    return found


def _available(kind: str) -> bool:
    if kind == "cpu":
        return True
    backend = torch.backends.mps if kind == "mps" else getattr(torch, kind, None)
    return bool(backend is not None and backend.is_available())


def parse_kwargs(text: str | None) -> dict[str, Any]:
    if text is None:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise typer.BadParameter(f"not valid JSON ({e.msg}): {text}", param_hint="--kwargs") from None
    if not isinstance(value, dict):
        raise typer.BadParameter("must be a JSON object like '{\"num_classes\": 10}'", param_hint="--kwargs")
    return value


def parse_rank(text: str) -> int | str:
    """An integer stays an integer; any other word goes to the library, which says what ranks it takes."""
    try:
        return int(text)
    except ValueError:
        return text


def parse_numbers(text: str | None, hint: str, kind: type) -> list[Any] | None:
    """``"0.5,0.5,0.5"`` -> ``[0.5, 0.5, 0.5]`` (``x`` separates too: ``224x224``)."""
    if text is None:
        return None
    try:
        return [kind(v) for v in text.replace("x", ",").split(",") if v.strip()]
    except ValueError:
        raise typer.BadParameter(f"{text!r}; write comma-separated numbers", param_hint=hint) from None


def calibration_tensor(
    source: str, args: tuple[torch.Tensor, ...], samples: int | None, data: CalibrationOptions | None = None
) -> torch.Tensor:
    """Samples from a file or image folder, shaped like the first example input and on its device."""
    tensor = load_calibration(
        source,
        tuple(args[0].shape[1:]),
        samples=samples,
        image_size=parse_numbers(data.image_size, "--image-size", int) if data else None,
        mean=parse_numbers(data.mean, "--mean", float) if data else None,
        std=parse_numbers(data.std, "--std", float) if data else None,
    )
    return tensor.to(args[0].device)


def calibration_setting(data: CalibrationOptions, args: tuple[torch.Tensor, ...], *, refine: bool = True) -> Any:
    """``--calibration`` and its options as what :func:`sepify.convert` and :func:`sepify.audit` take."""
    from sepify.options import Calibration

    if data.calibration is None:
        return None
    augment = "auto" if data.augment is None else data.augment
    if data.calibration == "synthetic":
        return Calibration("synthetic", samples=data.calibration_samples, refine=refine, augment=augment)
    tensor = calibration_tensor(data.calibration, args, data.calibration_samples, data)
    return Calibration(tensor, refine=refine, augment=augment)


def load_model(
    source: str, load: LoadOptions, on: torch.device, quiet: bool, *, command: str = "convert"
) -> LoadedModel:
    """Load MODEL (or the teacher) and put it on ``on`` in the mode to convert in (eval unless ``--train``)."""
    train = bool(getattr(load, "train", False))
    with step(command, f"loading {source}", quiet):
        loaded = load_source(
            source, trust_pickle=load.trust_pickle, kwargs=parse_kwargs(load.kwargs), weights=load.weights,
            attr=load.attr,
        )  # fmt: skip
    check_device(loaded.model, source)
    # fx freezes `self.training` branches into the graph, so the mode is chosen
    # before tracing; deployment (eval) is what a converted model is for.
    loaded.model.to(on)
    if loaded.kind == "pt2":
        # an exported program's graph fixed its mode at export time (and its
        # module refuses .train()); nothing to choose here
        if train:
            raise ConfigError(f"{source}: a torch.export program has its mode fixed at export; drop --train")
        return loaded
    # nn.Module.train itself: wrappers such as ultralytics' YOLO override
    # train() to start a training run.
    nn.Module.train(loaded.model, train)
    return loaded


def check_device(model: nn.Module, source: str) -> None:
    """A model whose parameters have no values (built on the meta device) is refused with a sentence."""
    if any(p.is_meta for p in model.parameters()):
        raise ModelLoadError(
            f"{source}: the model holds parameters on the meta device (shapes without values); build it with its "
            "weights (or pass --weights)"
        )
