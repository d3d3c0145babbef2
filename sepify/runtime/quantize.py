"""Post-training static int8 of an exported model, through each runtime's own quantizer.

* ONNX: ``onnxruntime.quantization.quantize_static`` in QDQ form (what onnxruntime
  and OpenVINO both read), int8 weights per output channel, int8 activations
  with ranges from min/max over the calibration batches; every consumer of a
  quantized tensor gets its own dequantize node (``DedicatedQDQPair``), without
  which onnxruntime leaves convs that share an input (a pair's rank-major
  depthwise convs) in float32 between a dequantize and a quantize.
* OpenVINO: NNCF's ``nncf.quantize`` of the model OpenVINO converted (its
  default preset: symmetric per-channel weights), the tool OpenVINO documents.

Both quantize every layer they can: whether that is faster depends on the CPU
and the model (docs/benchmarks.md, "Slim, int8, or both": depthwise convs in
int8 can be slower than in float32), so callers time the result against
float32 rather than assume it (:func:`sepify.compare_deployments`).

Examples:
    >>> import torch
    >>> from sepify.runtime.export import onnx_bytes
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU()).eval()
    >>> batches = [(torch.randn(4, 3, 16, 16),) for _ in range(2)]
    >>> quantized = int8_onnx(onnx_bytes(net, batches[0]), batches)
    >>> b"QuantizeLinear" in quantized
    True
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import tempfile
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from sepify.errors import ConfigError

if TYPE_CHECKING:  # torch loads when there is something to quantize: refusals stay fast
    from torch import Tensor

__all__ = ["INT8_SAMPLES", "int8_onnx", "int8_openvino", "check_int8"]

INT8_SAMPLES = 256  # calibration samples for activation ranges: min/max settles well before this


def check_int8(fmt: str) -> None:
    """A ConfigError unless ``fmt`` can be written as int8 here (the format has a quantizer and it is installed)."""
    from sepify.runtime.sessions import installed

    needs = {"onnx": ("onnxruntime", "onnx"), "openvino": ("nncf", "nncf")}.get(fmt)
    if needs is None:
        raise ConfigError(
            f"int8 is written as ONNX or OpenVINO IR only, not {fmt}; choose format=onnx or format=openvino"
        )
    module, package = needs
    if not installed(module):
        raise ConfigError(f"int8 {fmt} needs {module}'s quantizer, which is not installed; pip install {package}")


def int8_onnx(graph: bytes, batches: Sequence[tuple[Tensor, ...]]) -> bytes:
    """``graph`` (a float32 ONNX model) quantized to int8 QDQ with activation ranges from ``batches``.

    ``batches`` are tuples of model arguments, in the order of the graph's inputs.
    """
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    from sepify.runtime.sessions import onnxruntime_session

    names = [i.name for i in onnxruntime_session(graph, 1).get_inputs()]

    class Reader(CalibrationDataReader):  # type: ignore[misc]  # onnxruntime ships no type hints
        def __init__(self) -> None:
            self.items: Iterator[dict[str, Any]] = iter(
                [{n: t.detach().float().cpu().numpy() for n, t in zip(names, b, strict=True)} for b in batches]
            )

        def get_next(self) -> dict[str, Any] | None:
            return next(self.items, None)

    with tempfile.TemporaryDirectory() as folder, _quiet_quantizer():
        source = _preprocessed(graph, folder)
        target = os.path.join(folder, "int8.onnx")
        quantize_static(
            source, target, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
            activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
            extra_options={"DedicatedQDQPair": True, "ActivationSymmetric": False, "WeightSymmetric": True},
        )  # fmt: skip
        with open(target, "rb") as f:
            return f.read()


def int8_openvino(model: Any, batches: Sequence[tuple[Tensor, ...]]) -> Any:
    """An ``openvino.Model`` quantized to int8 by NNCF with activation ranges from ``batches``."""
    import nncf

    data = [[t.detach().float().cpu().numpy() for t in b] for b in batches]
    dataset = nncf.Dataset(data, lambda item: tuple(item) if len(item) > 1 else item[0])
    with _quiet_quantizer():  # subset_size counts dataset items, here whole batches: use them all
        return nncf.quantize(model, dataset, subset_size=max(1, len(data)))


def _preprocessed(graph: bytes, folder: str) -> str:
    """The path of ``graph`` after onnxruntime's recommended pre-processing (shape inference, constant folding);
    of ``graph`` itself where that step fails (it is an optimisation, not a requirement)."""
    from onnxruntime.quantization import quant_pre_process

    raw = os.path.join(folder, "float32.onnx")
    with open(raw, "wb") as f:
        f.write(graph)
    prepared = os.path.join(folder, "prepared.onnx")
    try:
        quant_pre_process(raw, prepared)
    except Exception:  # noqa: BLE001 - symbolic shape inference fails on some graphs; quantize the graph as it is
        return raw
    return prepared


@contextlib.contextmanager
def _quiet_quantizer() -> Iterator[None]:
    """onnxruntime's quantizer logs every skipped tensor on the root logger and NNCF draws progress bars on stdout
    (which ``--json`` keeps for the report alone); the caller reports what matters: fidelity and time after int8."""
    loggers = [logging.root, logging.getLogger("nncf")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
