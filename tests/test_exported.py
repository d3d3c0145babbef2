"""Written deployment files are run in their runtime and compared with the PyTorch model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sepify
from sepify.io.save import save_model
from sepify.runtime import runners, timing
from sepify.runtime.check import check_export, relative_difference
from sepify.runtime.export import ONNX_EXPORTERS, onnx_bytes
from sepify.runtime.runners import fastest_onnx
from sepify.runtime.sessions import onnxruntime_session


def _net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3)).eval()


@pytest.mark.parametrize("fmt", ["pt2", "onnx", pytest.param("openvino", marks=pytest.mark.slow)])
def test_a_file_that_computes_something_else_is_caught(tmp_path: Path, fmt: str) -> None:
    pytest.importorskip({"onnx": "onnxruntime", "openvino": "openvino"}.get(fmt, "torch"))
    x = torch.randn(2, 3, 10, 10)
    path = tmp_path / f"m.{'xml' if fmt == 'openvino' else fmt}"
    save_model(_net(0), path, fmt, example_args=(x,), plan_json="{}")
    same = check_export(path, fmt, _net(0), (x,))
    assert same is not None and same.ok and same.error < 1e-5 and same.batches == (2, 3)
    other = check_export(path, fmt, _net(1), (x,))  # as if the exporter had changed the weights
    assert other is not None and not other.ok and other.error > 0.1
    assert "DIFFERS from PyTorch's outputs" in other.describe()


def test_what_cannot_be_checked_is_none(tmp_path: Path) -> None:
    path = tmp_path / "m.pt"
    save_model(_net(0), path, "pt", example_args=(torch.randn(1, 3, 8, 8),), plan_json="{}")
    assert check_export(path, "pt", _net(0), (torch.randn(1, 3, 8, 8),)) is None  # pt is PyTorch itself
    assert check_export(path, "pt2", _net(0), ([torch.randn(1, 3, 8, 8)],)) is None  # not tensor inputs


class PaddedConvs(nn.Module):
    """CREPE's pattern: an explicit F.pad before each conv (the two exporters write it differently)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Conv1d(1, 16, 64, stride=4)
        self.b = nn.Conv1d(16, 8, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.a(F.pad(x[:, None], (30, 30))))
        return self.b(F.pad(x, (7, 8))).mean(-1)


@pytest.mark.parametrize("layout", ["grouped", "rank-major"])
def test_both_exporters_write_a_converted_model_that_runs(layout: str) -> None:
    pytest.importorskip("onnxruntime")
    model = PaddedConvs().eval()
    x = torch.randn(2, 256)
    slim = sepify.convert(model, x, rank=3, order="pw-dw").model
    for pair in slim.modules():
        if isinstance(pair, sepify.SeparableConv) and layout in pair.layouts:
            pair.layout = layout
    for exporter in ONNX_EXPORTERS:
        session = onnxruntime_session(onnx_bytes(slim, (x,), exporter=exporter))
        name = session.get_inputs()[0].name
        for batch in (x, torch.randn(5, 256)):  # a dynamic batch in both
            with torch.no_grad():
                want = slim(batch)
            got = torch.from_numpy(session.run(None, {name: batch.numpy()})[0])
            assert relative_difference([want], [got]) < 1e-5, exporter


class FunctionalRoot(nn.Module):
    """A forward that calls F.conv2d on its own parameters: the converted model is the GraphModule of it."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.w = nn.Parameter(torch.randn(16, 8, 3, 3))
        self.c = nn.Conv2d(16, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(F.relu(F.conv2d(x, self.w, padding=1)))


def test_a_converted_graph_module_exports_with_both_exporters() -> None:
    pytest.importorskip("onnxruntime")
    x = torch.randn(2, 8, 12, 12)
    slim = sepify.convert(FunctionalRoot().eval(), x, rank=2).model
    assert isinstance(slim, torch.fx.GraphModule)  # the TorchScript exporter once mistook its graph for a script's
    for exporter in ONNX_EXPORTERS:
        session = onnxruntime_session(onnx_bytes(slim, (x,), exporter=exporter))
        with torch.no_grad():
            want = slim(x)
        got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
        assert relative_difference([want], [got]) < 1e-5, exporter


def test_the_faster_export_that_reproduces_the_model_is_chosen(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("onnxruntime")
    model, x = PaddedConvs().eval(), torch.randn(2, 256)
    for ts_time, chosen in ((0.5, "torchscript"), (0.89, "torchscript"), (0.91, "dynamo"), (2.0, "dynamo")):
        # dynamo takes 1.0: the other export is kept only when it is clearly (10%) faster
        monkeypatch.setattr(timing, "interleaved_medians", lambda fns, reps, t=ts_time: [1.0, t])
        exporter, graph = fastest_onnx(model, (x,))
        assert exporter == chosen, ts_time
        assert graph == onnx_bytes(model, (x,), exporter=chosen)
    # an export that computes something else is never kept, however fast
    wrong = onnx_bytes(PaddedConvs().eval().requires_grad_(False).apply(_scramble), (x,), exporter="torchscript")
    real = runners.onnx_bytes
    monkeypatch.setattr(runners, "onnx_bytes", lambda m, a, *, exporter, **k: wrong if exporter == "torchscript"
                        else real(m, a, exporter=exporter, **k))  # fmt: skip
    monkeypatch.setattr(timing, "interleaved_medians", lambda fns, reps: [1.0] * len(fns))
    assert fastest_onnx(model, (x,))[0] == "dynamo"


def _scramble(module: nn.Module) -> None:
    if isinstance(module, nn.Conv1d):
        with torch.no_grad():
            module.weight.mul_(-1)
