"""Written deployment files are run in their runtime and compared with the PyTorch model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from sepify.io.save import save_model
from sepify.runtime.check import check_export


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
