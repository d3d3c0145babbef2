"""Runtime sessions: the one place that builds onnxruntime sessions and compiles OpenVINO models.

Sessions use every graph optimisation the runtime has and ``threads`` threads (default:
``torch.get_num_threads()``), on the CPU, with idle workers sleeping rather than spinning (sessions are timed side by
side, and a spinning pool slows the others). OpenVINO compiles with its latency hint and its default inference
precision (bf16 on CPUs that have it, as a deployment would run), or in float32 when asked for ``exact``
results (checking a file against PyTorch).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from typing import Any

import torch

from sepify.errors import ConfigError

__all__ = ["onnxruntime_session", "openvino_compiled", "check_backend", "installed"]

_NEEDS = {"onnxruntime": ("onnx", "onnxruntime"), "openvino": ("onnx", "openvino")}
_EXTRAS = {"onnxruntime": "onnx", "openvino": "openvino"}


def installed(module: str) -> bool:
    """Whether ``module`` can be imported (without importing it)."""
    return importlib.util.find_spec(module) is not None


def check_backend(backend: str) -> None:
    """A ConfigError unless what ``backend`` needs is installed (a runtime, or a C++ compiler for ``compile``)."""
    if backend == "compile" and not any(shutil.which(c) for c in (os.environ.get("CXX", ""), "g++", "c++", "clang++")):
        raise ConfigError(
            "the compile latency backend needs a C++ compiler for torch.compile's CPU code (no CXX, g++, c++ or "
            "clang++ found); install one (apt install g++) or choose another latency backend"
        )
    needs = _NEEDS.get(backend, ())
    for name in needs:
        if not installed(name):
            raise ConfigError(
                f"the {backend} latency backend needs {' and '.join(needs)} ({name} is missing); "
                f"pip install 'sepify[{_EXTRAS[backend]}]'"
            )


def onnxruntime_session(
    model: bytes | str | os.PathLike[str], threads: int | None = None, *, fuse_pads: bool = True
) -> Any:
    """An onnxruntime CPU session of an ONNX model (its bytes, or a file) with all graph optimisations.

    ``fuse_pads=False`` keeps a zero ``Pad`` before a ``Conv`` as its own node
    (onnxruntime otherwise moves constant padding into the conv): how a model
    exported with ``F.pad`` runs (:func:`sepify.runtime.layers.layer_graph`).
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    # Workers spin after each run by default; sessions timed in turn (interleaved medians) then slow each other
    # unevenly: three sessions of one graph, 2 threads, took 57-72 us per call with spinning, 74-77 us without.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    source = model if isinstance(model, bytes) else str(model)
    disabled = [] if fuse_pads else ["Pad_Fusion"]
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"], disabled_optimizers=disabled)


def openvino_compiled(model: Any, threads: int | None = None, *, exact: bool = False) -> Any:
    """An OpenVINO model compiled for the CPU: an ``ov.Model``, an IR ``.xml`` path, or ONNX bytes.

    ``exact``: float32 inference (to compare with PyTorch); otherwise the latency hint and the device's default
    precision, as a deployment runs.
    """
    import openvino as ov

    core = ov.Core()
    if isinstance(model, bytes):  # OpenVINO reads ONNX from a file
        with tempfile.TemporaryDirectory() as folder:
            path = os.path.join(folder, "model.onnx")
            with open(path, "wb") as f:
                f.write(model)
            model = core.read_model(path)
    elif isinstance(model, (str, os.PathLike)):
        model = str(model)
    config: dict[str, Any] = {"INFERENCE_NUM_THREADS": threads or torch.get_num_threads()}
    config.update({"INFERENCE_PRECISION_HINT": "f32"} if exact else {"PERFORMANCE_HINT": "LATENCY"})
    return core.compile_model(model, "CPU", config)
