"""Functional convolutions (F.conv2d on parameters, torch.export's aten.conv2d) become convertible modules."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import sepify


class Functional(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.weight = nn.Parameter(torch.randn(16, 4, 3, 3) * 0.1)
        self.bias = nn.Parameter(torch.randn(16))
        self.gate = nn.Parameter(torch.randn(16, 16, 3, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.conv2d(self.stem(x), self.weight, self.bias, stride=2, padding=1, groups=2)
        # a computed weight is not a parameter: it stays functional
        return F.conv2d(y, self.gate * 0.5, padding="same")


def test_functional_conv_on_parameters_is_lifted_and_converted() -> None:
    model = Functional().eval()
    x = torch.randn(2, 3, 12, 12)
    result = sepify.convert(model, x, rank="full")
    report = result.report
    assert [r.name for r in report.converted] == ["stem", "weight_conv"]
    row = report.layer("weight_conv")
    assert (row.in_channels, row.out_channels, row.groups, row.stride, row.output_size) == (8, 16, 2, (2, 2), (6, 6))
    assert report.notes == (
        "lifted 1 functional conv call(s) on parameters into conv modules: weight_conv",
        "the model's own forward calls a functional conv on its parameters, so the converted model is the torch.fx "
        "GraphModule of that forward, not a Functional: its outputs are the same objects, but methods other than "
        "forward are not kept",
    )
    assert isinstance(result.model, torch.fx.GraphModule)
    torch.testing.assert_close(result.model(x), model(x), rtol=1e-4, atol=1e-4)
    keys = set(result.model.state_dict())
    assert "weight" not in keys and "bias" not in keys  # the parameters moved into the pair, not duplicated
    assert "gate" in keys
    # the caller's model still has its parameters
    assert isinstance(model.weight, nn.Parameter)


class Owner(nn.Module):
    """A model whose functional conv sits in a submodule's forward: only that submodule's forward is rewritten."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.inner = Functional()

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"out": self.inner(x[:, :3]) + 1}

    def describe(self) -> str:
        return "an owner"


def test_functional_conv_in_a_submodule_keeps_the_model_class() -> None:
    model = Owner().eval()
    x = torch.randn(2, 3, 12, 12)
    result = sepify.convert(model, x, rank="full")
    assert [r.name for r in result.report.converted] == ["inner.stem", "inner.conv"]
    assert type(result.model) is Owner and result.model.describe() == "an owner"
    assert isinstance(result.model.inner, torch.fx.GraphModule)  # the one forward that had to be rewritten
    assert isinstance(result.model.inner.conv, sepify.SeparableConv2d)
    assert result.report.notes == ("lifted 1 functional conv call(s) on parameters into conv modules: inner.conv",)
    torch.testing.assert_close(result.model(x)["out"], model(x)["out"], rtol=1e-4, atol=1e-4)
    assert isinstance(model.inner, Functional) and isinstance(model.inner.weight, nn.Parameter)


def test_exported_program_converts() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2)).eval()
    x = torch.randn(1, 3, 16, 16)
    exported = torch.export.export(net, (x,)).module()
    result = sepify.convert(exported, x, rank="full")
    assert len(result.report.converted) == 2
    assert result.report.output_error is not None and result.report.output_error < 1e-5
    torch.testing.assert_close(result.model(x), net(x), rtol=1e-4, atol=1e-5)


def test_inplace_conversion_leaves_functional_convs_working() -> None:
    model = Functional().eval()
    x = torch.randn(1, 3, 12, 12)
    result = sepify.convert(model, x, rank="full", inplace=True)
    assert [r.name for r in result.report.converted] == ["stem"]  # no lifting in the caller's own modules
    assert isinstance(model.weight, nn.Parameter)
    torch.testing.assert_close(model(x), result.model(x), rtol=1e-4, atol=1e-4)
