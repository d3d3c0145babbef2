"""Counting matches fvcore (conv MACs) and FlopCounterMode (whole model)."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import sepify

torchvision = pytest.importorskip("torchvision")
fvcore_nn = pytest.importorskip("fvcore.nn")


def test_resnet18_conv_counts_equal_fvcore() -> None:
    model = torchvision.models.resnet18().eval()
    x = torch.randn(1, 3, 224, 224)
    report = sepify.convert(model, x, rank=1).report
    assert report.conv_macs_before == 1_813_561_344  # fvcore's published number for resnet18
    analysis = fvcore_nn.FlopCountAnalysis(model, x).unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    by_module = analysis.by_module()
    for row in report.layers:
        assert row.macs_before == by_module[row.name], row.name
    assert report.params_before == 11_689_512
    conv_params = {name: m.weight.numel() for name, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)}
    assert {r.name: r.params_before for r in report.layers} == conv_params  # resnet convs have no bias


def test_whole_model_macs_include_linear_layers() -> None:
    model = torchvision.models.resnet18().eval()
    x = torch.randn(1, 3, 64, 64)
    report = sepify.convert(model, x, rank=1).report
    fc = 512 * 1000
    assert report.macs_before == report.conv_macs_before + fc
    with FlopCounterMode(display=False) as counter:
        model(x)
    assert report.macs_before * 2 == counter.get_total_flops()


def test_converted_model_counts_equal_fvcore() -> None:
    model = torchvision.models.resnet18().eval()
    x = torch.randn(1, 3, 64, 64)
    result = sepify.convert(model, x, rank=2, order="pw-dw")
    analysis = fvcore_nn.FlopCountAnalysis(result.model, x).unsupported_ops_warnings(False)
    by_module = analysis.uncalled_modules_warnings(False).by_module()
    for row in result.report.converted:
        assert row.macs_after == by_module[row.name], row.name
