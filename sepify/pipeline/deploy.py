"""``sepify.save``: a converted model written for deployment, optionally as int8, and what int8 costs and gains.

int8 is post-training static quantization by the runtime's own tool
(:mod:`sepify.runtime.quantize`), with activation ranges from calibration
samples. Whether it pays is measured, not assumed: :func:`compare_deployments`
runs the original and the slim model, each in float32 and int8, against the
original and times them side by side in the runtime (docs/benchmarks.md,
"Slim, int8, or both": on our CPU, depthwise convs in int8 can run slower than
in float32, and int8 of the original can beat a slim model).
"""

from __future__ import annotations

import functools
import math
import os
import time
from dataclasses import dataclass
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
from sepify.runtime.quantize import INT8_SAMPLES, check_int8
from sepify.runtime.timing import interleaved_medians
from sepify.vocab import Format

__all__ = ["Deployment", "Deployments", "compare_deployments", "int8_batches", "save"]


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
            (:func:`sepify.synthesize_calibration`). See what int8 costs and
            saves with :func:`compare_deployments`.
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
        ...     quantized = b"QuantizeLinear" in files[-1].read_bytes()
        >>> [f.name for f in files], quantized
        (['slim.onnx'], True)
    """
    path = Path(path)
    args = normalize_inputs(example_inputs)
    fmt = format or format_of(path, Format.PT).value
    if int8 is not None:
        check_int8(fmt)  # before any samples are synthesised
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


class Deployment(NamedTuple):
    """One way to ship a model: which model, in which precision, how fast and how close to the original."""

    model: str  # "original" or "slim"
    precision: str  # "float32" or "int8"
    time_ratio: float  # median time over the original float32's, same runtime, threads and batch
    error: float | None  # output error against the original PyTorch model on the compared inputs
    agreement: float | None  # top-1 agreement with it (None when the output is not one (N, classes) tensor)

    @property
    def name(self) -> str:
        return f"{self.model} {self.precision}"


@dataclass(frozen=True)
class Deployments:
    """The original and the slim model, each in float32 and int8, run and timed side by side in one runtime.

    Errors are relative output errors (``||y' - y|| / ||y||`` over every
    floating output) against the original PyTorch model on ``samples``
    inputs; times are interleaved medians at batch ``batch``. Each runtime
    runs as deployed: OpenVINO computes "float32" files in its default
    precision (bf16 on CPUs that have it).
    """

    runtime: str
    threads: int
    batch: int
    samples: int
    options: tuple[Deployment, ...]

    def get(self, name: str) -> Deployment:
        """The option called ``name`` (``"slim int8"``...)."""
        return next(o for o in self.options if o.name == name)

    def better_than(self, name: str) -> list[Deployment]:
        """The options faster than ``name`` (beyond timing noise) that are no farther from the original."""
        this = self.get(name)
        return [
            o
            for o in self.options
            if o.name != name
            and o.time_ratio < this.time_ratio * _CLEARLY_FASTER
            and (o.error or 0.0) <= (this.error or 0.0) + _SAME_ERROR
        ]

    def to_text(self, marked: str | None = None) -> str:
        """A small table, ``marked`` (the written option) flagged ``(written)``."""
        lines = [
            f"in {self.runtime} ({self.threads} thread{'s' if self.threads > 1 else ''}, batch {self.batch}; "
            f"errors against the original on {self.samples} samples):",
            f"  {'':<26} {'time':>7} {'output error':>13} {'top-1':>6}",
        ]
        for o in self.options:
            label = o.name + (" (written)" if o.name == marked else "")
            agreement = "-" if o.agreement is None else f"{o.agreement:.0%}"
            lines.append(f"  {label:<26} {o.time_ratio:>6.3f}x {_number(o.error):>13} {agreement:>6}")
        return "\n".join(lines)


_CLEARLY_FASTER = 0.95  # timing noise: an option is faster when it takes under 0.95x the time
_SAME_ERROR = 1e-3  # output errors this close are the same closeness to the original


def compare_deployments(
    original: nn.Module,
    slim: nn.Module | None,
    inputs: Any,
    *,
    int8: Any,
    runtime: str = "onnxruntime",
    threads: int | None = None,
    timed_inputs: Any = None,
    written: str | os.PathLike[str] | None = None,
    reps: int = 10,
) -> Deployments:
    """Run and time the four ways to ship: ``original`` and ``slim``, each in float32 and int8, in ``runtime``.

    Each is exported as :func:`save` would write it (ONNX: the faster of
    torch.onnx's two exports; OpenVINO: its own conversion; int8 with ranges
    from ``int8``, any data :func:`save` takes), run on ``inputs`` against
    ``original`` in PyTorch, and timed interleaved on ``timed_inputs``
    (default ``inputs``). ``written``: the slim int8 file already written, run
    instead of quantizing again (so that the file you ship is what is measured).
    ``slim=None`` compares the original's two precisions alone (the audit's
    int8 baseline).
    Times are medians of at least ``reps`` interleaved rounds, more where a
    round is short (about a second of rounds in all, at most 200).

    Examples:
        >>> import torch, sepify
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 32, 3), torch.nn.ReLU(), torch.nn.Conv2d(32, 32, 3)).eval()
        >>> x = torch.randn(32, 3, 16, 16)
        >>> slim = sepify.convert(net, x[:1], rank=2).model
        >>> found = sepify.compare_deployments(net, slim, x, int8=x, timed_inputs=x[:1], reps=3)
        >>> [o.name for o in found.options]
        ['original float32', 'original int8', 'slim float32', 'slim int8']
        >>> found.get("original float32").time_ratio, found.get("original int8").error < 0.05
        (1.0, True)
    """
    from sepify.runtime.check import runtime_runner
    from sepify.runtime.export import openvino_model
    from sepify.runtime.quantize import int8_onnx, int8_openvino
    from sepify.runtime.runners import fastest_onnx

    if runtime not in ("onnxruntime", "openvino"):
        raise ConfigError(f"deployments are compared in onnxruntime or openvino, not {runtime!r}")
    args = normalize_inputs(inputs)
    timed = args if timed_inputs is None else normalize_inputs(timed_inputs)
    batches = int8_batches(int8, original, timed)
    fmt = Format.ONNX.value if runtime == "onnxruntime" else Format.OPENVINO.value
    sources: dict[str, Any] = {}
    models = [("original", original)] + ([("slim", slim)] if slim is not None else [])
    for label, model in models:
        shipped = Path(written) if label == "slim" and written is not None else None  # measured as written
        if fmt == Format.ONNX:
            graph = fastest_onnx(model, timed, threads)[1]
            sources[f"{label} float32"] = graph
            sources[f"{label} int8"] = shipped or int8_onnx(graph, batches)
        else:
            converted = openvino_model(model, timed)  # NNCF quantizes a copy: one conversion serves both
            sources[f"{label} float32"] = converted
            sources[f"{label} int8"] = shipped or int8_openvino(converted, batches)
    runners = {name: runtime_runner(source, fmt, exact=False, threads=threads)[0] for name, source in sources.items()}
    with torch.no_grad():
        reference = [t for t in tree_leaves(original(*args)) if isinstance(t, Tensor)]
    feeds = [a.detach().float().cpu() for a in args]
    outputs = {name: run(feeds) for name, run in runners.items()}
    timed_feeds = [a.detach().float().cpu() for a in timed]
    calls = [functools.partial(run, timed_feeds) for run in runners.values()]
    medians = interleaved_medians(calls, max(reps, _reps_for(calls)))
    base = medians[0]
    options = []
    for name, t in zip(runners, medians, strict=True):
        model_name, precision = name.split(" ")
        options.append(
            Deployment(
                model_name,
                precision,
                time_ratio=t / base if base > 0 else math.nan,
                error=output_error(reference, outputs[name]),
                agreement=top1_agreement(_single(reference), _single(outputs[name])),
            )
        )
    used_threads = threads or torch.get_num_threads()
    return Deployments(runtime, used_threads, int(timed[0].shape[0]), int(args[0].shape[0]), tuple(options))


def _reps_for(calls: list[Any], seconds: float = 1.0, most: int = 200) -> int:
    """Rounds that take about ``seconds`` in all (at most ``most``): medians of sub-millisecond calls need many."""
    start = time.perf_counter()
    for call in calls:
        call()
    round_s = time.perf_counter() - start
    return min(most, int(seconds / round_s)) if round_s > 0 else most


def _single(outputs: list[Tensor]) -> Tensor | None:
    return outputs[0] if len(outputs) == 1 else None


def _number(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3g}"
