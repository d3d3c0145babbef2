"""``sepify.save``: a converted model written for deployment, optionally as int8, and what int8 costs and gains.

int8 is post-training static quantization by the runtime's own tool
(:mod:`sepify.runtime.quantize`), with activation ranges from calibration
samples. Whether it pays is measured, not assumed: :func:`int8_fidelity`
runs the written file against the float32 model and the original, and times
it against the float32 export in the same runtime (docs/benchmarks.md,
"int8": on our CPU, depthwise convs in int8 can run slower than in float32).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_leaves

from sepify.calibrate.data import calibration_batches
from sepify.calibrate.synthetic import SYNTHETIC, batchnorm_layers, synthesize_calibration
from sepify.calibrate.verify import output_error, top1_agreement
from sepify.errors import ConfigError
from sepify.graph.analysis import normalize_inputs
from sepify.io.paths import format_of
from sepify.io.save import save_model
from sepify.runtime.quantize import INT8_SAMPLES
from sepify.runtime.runners import model_runner
from sepify.runtime.timing import interleaved_medians
from sepify.vocab import Format

__all__ = ["Int8Fidelity", "int8_batches", "int8_fidelity", "save"]


def save(
    model: nn.Module,
    path: str | os.PathLike[str],
    example_inputs: Any,
    *,
    format: str | None = None,  # noqa: A002 - the word users know from --format
    int8: Any = None,
    plan_json: str = "{}",
    overwrite: bool = False,
) -> list[Path]:
    """Write ``model`` (a converted model, or any module) for deployment; returns the files written.

    Args:
        model: the module to write (``result.model`` of :func:`sepify.convert`).
        path: where; the format follows its extension unless ``format`` is
            given (``.pt``, ``.pt2``, ``.onnx``, ``.xml`` for OpenVINO IR,
            ``.safetensors``).
        example_inputs: what the model is traced on (a tensor or a tuple).
        format: ``"pt"``, ``"pt2"``, ``"onnx"``, ``"openvino"`` or ``"safetensors"``.
        int8: write an int8 ONNX or OpenVINO file, with activation ranges
            from these unlabelled samples (a tensor ``(N, ...)``, a DataLoader
            or a list of batches; the first 256), or ``"synthetic"``
            (:func:`sepify.synthesize_calibration`). Check what it cost with
            :func:`int8_fidelity`.
        plan_json: the plan stored with safetensors weights
            (``result.report.to_plan().to_json()``).
        overwrite: replace existing files (written atomically either way).

    Examples:
        >>> import tempfile, torch, sepify
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3), torch.nn.ReLU(), torch.nn.Conv2d(16, 16, 3)).eval()
        >>> x = torch.randn(32, 3, 16, 16)
        >>> slim = sepify.convert(net, x[:1], rank=2).model
        >>> with tempfile.TemporaryDirectory() as d:
        ...     files = sepify.save(slim, f"{d}/slim.onnx", x[:1], int8=x)
        ...     check = sepify.int8_fidelity(files[-1], slim, x[:8], original=net)
        >>> [f.name for f in files], check.runtime, check.error_vs_float < 0.1
        (['slim.onnx'], 'onnxruntime', True)
    """
    path = Path(path)
    args = normalize_inputs(example_inputs)
    fmt = format or format_of(path, Format.PT).value
    batches = None if int8 is None else int8_batches(int8, model, args)
    return save_model(model, path, fmt, example_args=args, plan_json=plan_json, overwrite=overwrite, int8=batches)


def int8_batches(data: Any, model: nn.Module, args: tuple[Any, ...]) -> list[tuple[Tensor, ...]]:
    """Batches of model arguments to set int8 activation ranges from: ``data`` (the first :data:`INT8_SAMPLES`
    samples), synthesised ones for ``"synthetic"``, or the example inputs alone for ``None``."""
    if data is None:
        return [args]
    if isinstance(data, str) and data == SYNTHETIC:
        if not batchnorm_layers(model):
            raise ConfigError(
                "int8 ranges from synthetic samples need BatchNorm statistics to match, and the model has none; "
                "give calibration data (calibration=...)"
            )
        data = synthesize_calibration(model, args, samples=64)
    prepared = calibration_batches(data, n_args=len(args), limit=INT8_SAMPLES, heldout_fraction=0.0)
    return [tuple(a.detach().cpu() for a in batch) for batch in prepared.fit]


class Int8Fidelity(NamedTuple):
    """An int8 file measured on the same inputs against the float32 model it was written from and the original.

    Errors are relative output errors (``||y' - y|| / ||y||`` over every
    floating output); agreements are the share of samples whose top-1 class
    is unchanged (None when the output is not one ``(N, classes)`` tensor);
    ``float_*`` are the float32 model's own, so that what int8 adds shows;
    ``time_ratio`` is the int8 file's median time over the float32 export's
    in ``runtime``.
    """

    runtime: str
    error_vs_float: float | None
    error_vs_original: float | None = None
    float_error_vs_original: float | None = None
    agreement_vs_original: float | None = None
    float_agreement_vs_original: float | None = None
    time_ratio: float | None = None

    def describe(self) -> str:
        """``"int8 in onnxruntime: output error 0.0194 against float32; against the original 0.182 (float32
        0.170), top-1 agreement 97% (float32 100%); 1.56x the float32 time"``."""
        parts = [f"int8 in {self.runtime}: output error {_number(self.error_vs_float)} against float32"]
        if self.error_vs_original is not None:
            against = f"against the original {_number(self.error_vs_original)} (float32 {_number(self.float_error_vs_original)})"
            if self.agreement_vs_original is not None:
                float_agreement = self.float_agreement_vs_original
                against += f", top-1 agreement {self.agreement_vs_original:.0%}" + (
                    f" (float32 {float_agreement:.0%})" if float_agreement is not None else ""
                )
            parts.append(against)
        if self.time_ratio is not None:
            parts.append(f"{self.time_ratio:.2f}x the float32 time")
        return "; ".join(parts)

    @property
    def slower(self) -> bool:
        """Whether int8 runs no faster than float32 here (beyond timing noise)."""
        return self.time_ratio is not None and self.time_ratio > _NOT_FASTER


_NOT_FASTER = 0.95  # an int8 file under 0.95x of the float32 time is faster; above, it is not worth its error


def int8_fidelity(
    path: str | os.PathLike[str],
    model: nn.Module,
    inputs: Any,
    *,
    original: nn.Module | None = None,
    format: str | None = None,  # noqa: A002 - as in save()
    threads: int | None = None,
    time: bool = True,
    timed_inputs: Any = None,
) -> Int8Fidelity:
    """The int8 file at ``path`` run on ``inputs`` against ``model`` (the float32 model it was written from) and
    ``original``; with ``time``, timed against ``model``'s float32 export in the same runtime on ``timed_inputs``
    (default: ``inputs``)."""
    from sepify.runtime.check import file_runner

    path = Path(path)
    args = normalize_inputs(inputs)
    fmt = format or format_of(path, Format.ONNX).value
    run, runtime, _ = file_runner(path, fmt, exact=False)
    with torch.no_grad():
        want = model(*args)
        reference = original(*args) if original is not None else None
    got = run([a.detach().float().cpu() for a in args])
    floats = [t for t in tree_leaves(want) if isinstance(t, Tensor)]
    against: dict[str, float | None] = {}
    if reference is not None:
        expected = [t for t in tree_leaves(reference) if isinstance(t, Tensor)]
        against = {
            "error_vs_original": output_error(expected, got),
            "float_error_vs_original": output_error(expected, floats),
            "agreement_vs_original": top1_agreement(_single(expected), _single(got)),
            "float_agreement_vs_original": top1_agreement(_single(expected), _single(floats)),
        }
    ratio = None
    if time:
        backend = "openvino" if fmt == Format.OPENVINO else "onnxruntime"
        timed = args if timed_inputs is None else normalize_inputs(timed_inputs)
        float_runner = model_runner(model, timed, backend, threads)
        file_run, _, _ = file_runner(path, fmt, exact=False, threads=threads)
        arrays = [a.detach().float().cpu() for a in timed]
        before, after = interleaved_medians([float_runner, lambda: file_run(arrays)], 10)
        ratio = after / before if before > 0 and math.isfinite(after) else None
    return Int8Fidelity(runtime, output_error(floats, got), time_ratio=ratio, **against)


def _single(outputs: list[Tensor]) -> Tensor | None:
    return outputs[0] if len(outputs) == 1 else None


def _number(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3g}"
