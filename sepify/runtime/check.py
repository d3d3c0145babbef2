"""Reading a written deployment file back in its own runtime and comparing it with the PyTorch model.

An exporter can succeed and still write a model that computes something else
(an unsupported op lowered wrongly, a batch dimension baked in). After
``sepify convert --format pt2|onnx|openvino`` writes its file, :func:`check_export`
loads that file (``torch.export.load``, onnxruntime, OpenVINO), runs it on
the example inputs, and on a batch of another size where the file has a
dynamic batch axis, and returns the worst relative difference from the
PyTorch model's outputs. A runtime that is not installed is not a failure:
the check is then None.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_leaves

from sepify.runtime.sessions import installed, onnxruntime_session, openvino_compiled

__all__ = ["ExportCheck", "check_export", "runtime_runner", "relative_difference", "TOLERANCE"]

TOLERANCE = 1e-3  # float32 runtimes reorder sums; a larger relative difference is a wrong export


class ExportCheck(NamedTuple):
    """What was run where, and the worst relative difference from PyTorch over every output and batch."""

    runtime: str
    error: float
    batches: tuple[int, ...]

    @property
    def ok(self) -> bool:
        return self.error <= TOLERANCE

    def describe(self) -> str:
        """``"onnxruntime reproduces PyTorch's outputs to 2.1e-07 (batches 2, 3)"``."""
        sizes = ", ".join(str(b) for b in self.batches)
        verb = "reproduces" if self.ok else "DIFFERS from"
        return f"{self.runtime} {verb} PyTorch's outputs to {self.error:.1e} (batch{'es' if len(self.batches) > 1 else ''} {sizes})"


def check_export(path: Path, fmt: str, model: nn.Module, args: tuple[Any, ...]) -> ExportCheck | None:
    """Run the file at ``path`` (written in ``fmt``) on ``args`` and a batch of another size; None when its
    runtime is not installed or the inputs are not all tensors.

    Examples:
        >>> import tempfile, torch
        >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU()).eval()
        >>> x = torch.randn(2, 3, 8, 8)
        >>> with tempfile.TemporaryDirectory() as d:
        ...     path = Path(d) / "m.pt2"
        ...     torch.export.save(torch.export.export(model, (x,)), path)
        ...     check = check_export(path, "pt2", model, (x,))
        >>> check.runtime, check.ok, check.batches
        ('torch.export', True, (2,))
    """
    if not args or not all(isinstance(a, Tensor) and a.dim() >= 1 for a in args):
        return None
    if not _runtime_installed(fmt):
        return None
    run, runtime, dynamic = runtime_runner(path, fmt)
    batch = int(args[0].shape[0])
    batches = [args]
    if dynamic:
        batches.append(tuple(torch.cat([a, a[:1]]) for a in args))
    worst = 0.0
    with torch.no_grad():
        for inputs in batches:
            want = [t for t in tree_leaves(model(*inputs)) if isinstance(t, Tensor)]
            got = run([a.detach().float().cpu() for a in inputs])
            worst = max(worst, relative_difference(want, got))
    return ExportCheck(runtime, worst, (batch, batch + 1) if dynamic else (batch,))


def relative_difference(want: list[Tensor], got: list[Tensor]) -> float:
    """The worst over outputs of max |difference| / max |PyTorch's|; inf when the outputs do not line up."""
    if len(want) != len(got):
        return float("inf")
    worst = 0.0
    for w, g in zip(want, got):
        w, g = w.detach().float().cpu(), g.float()
        if w.shape != g.shape:
            return float("inf")
        scale = float(w.abs().max()) if w.numel() else 0.0
        difference = float((w - g).abs().max()) if w.numel() else 0.0
        worst = max(worst, difference / scale if scale > 0 else difference)
    return worst


def _runtime_installed(fmt: str) -> bool:
    return fmt == "pt2" or (fmt == "onnx" and installed("onnxruntime")) or (fmt == "openvino" and installed("openvino"))


def runtime_runner(
    path: Path | bytes | Any, fmt: str, *, exact: bool = True, threads: int | None = None
) -> tuple[Callable[[list[Tensor]], list[Tensor]], str, bool]:
    """A function from input tensors to the output tensors of the file at ``path`` in its runtime, the runtime's
    name, and whether the file's batch is dynamic. ``path`` may also be what the file would hold: ONNX bytes, an
    ``openvino.Model``. ``exact``: OpenVINO in float32 (to compare with PyTorch);
    otherwise as deployed (its latency hint and default precision). Raises ValueError for a format with no
    runtime here."""
    if fmt == "pt2":
        assert isinstance(path, (str, Path)), "a pt2 program is read from its file"
        program = torch.export.load(path)
        module = program.module()
        dims = [s.shape[0] for s in _placeholder_values(program)]
        dynamic = bool(dims) and not isinstance(dims[0], int)
        return (lambda xs: [t for t in tree_leaves(module(*xs)) if isinstance(t, Tensor)]), "torch.export", dynamic
    if fmt == "onnx":
        session = onnxruntime_session(path, threads)
        names = [i.name for i in session.get_inputs()]
        dynamic = not isinstance(session.get_inputs()[0].shape[0], int)

        def run_onnx(xs: list[Tensor]) -> list[Tensor]:
            outputs = session.run(None, {n: x.numpy() for n, x in zip(names, xs)})
            return [torch.from_numpy(o) for o in outputs]

        return run_onnx, "onnxruntime", dynamic
    if fmt == "openvino":
        compiled = openvino_compiled(path, threads, exact=exact)
        dynamic = compiled.inputs[0].get_partial_shape()[0].is_dynamic

        def run_openvino(xs: list[Tensor]) -> list[Tensor]:
            outputs = compiled([x.numpy() for x in xs])
            return [torch.from_numpy(outputs[o]) for o in compiled.outputs]

        return run_openvino, "OpenVINO", dynamic
    raise ValueError(f"no runtime runs {fmt} files")


def _placeholder_values(program: Any) -> list[Any]:
    """The example values of a program's user inputs (their shapes hold symbols where dimensions are dynamic)."""
    inputs = set(program.graph_signature.user_inputs)
    return [
        n.meta["val"]
        for n in program.graph.nodes
        if n.op == "placeholder" and n.name in inputs and isinstance(n.meta.get("val"), Tensor)
    ]
