"""Tracing modes: whole graph, graph with untraceable leaves, and module swap."""

from __future__ import annotations

import torch
from torch import nn

import sepify
from sepify.graph.tracing import SepifyTracer, trace_model


class DataDependent(nn.Module):
    """Branches on a tensor value: torch.fx cannot trace this forward."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return y if y.sum() > -1e9 else -y


class HalfTraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.block = DataDependent()
        self.tail = nn.Conv2d(8, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tail(self.block(self.stem(x)))


class RootDynamic(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.convs = nn.ModuleList([nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(6, 6, 3, padding=1)])

    def forward(self, images: list[torch.Tensor]) -> list[torch.Tensor]:
        out = []
        for img in images:  # iterating a Proxy fails in fx
            x = img[None]
            for conv in self.convs:
                x = conv(x)
            out.append(x[0])
        return out


def test_untraceable_submodule_becomes_leaf_and_still_converts() -> None:
    model = HalfTraceable().eval()
    x = torch.randn(1, 3, 8, 8)
    result = sepify.convert(model, x, rank="full")
    report = result.report
    assert report.mode == "fx+leaves"
    assert list(report.leaves) == ["block"]
    assert "TraceError" in report.leaves["block"]
    assert [row.name for row in report.converted] == ["stem", "block.conv", "tail"]
    assert type(result.model) is HalfTraceable
    assert isinstance(result.model.get_submodule("block.conv"), sepify.SeparableConv2d)
    torch.testing.assert_close(result.model(x), model(x), rtol=1e-4, atol=1e-5)


def test_untraceable_root_falls_back_to_module_swap() -> None:
    model = RootDynamic().eval()
    images = [torch.randn(3, 8, 8), torch.randn(3, 6, 10)]
    result = sepify.convert(model, (images,), rank="full")
    report = result.report
    assert report.mode == "swap"
    assert report.trace_error is not None and "Proxy object cannot be iterated" in report.trace_error
    assert type(result.model) is RootDynamic  # the original class, with swapped convs
    # each conv runs once per image: called twice, converted once, MACs summed
    row = report.layer("convs.1")
    assert row.converted and row.calls == 2
    assert row.macs_before == (8 * 8 + 6 * 10) * 6 * 6 * 9
    for got, want in zip(result.model(images), model(images)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert report.output_error is not None and report.output_error < 1e-5


def test_registered_leaf_is_not_traced_into() -> None:
    @sepify.register_leaf_module
    class Opaque(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(x)

    net = nn.Sequential(Opaque(), nn.Conv2d(4, 4, 3))
    outcome = trace_model(net)
    assert outcome.mode == "fx" and outcome.graph_module is not None
    targets = [n.target for n in outcome.graph_module.graph.nodes if n.op == "call_module"]
    assert targets == ["0", "1"]
    # its conv is still found and converted, by swapping
    result = sepify.convert(net, torch.randn(1, 3, 9, 9), rank=1)
    assert [r.name for r in result.report.converted] == ["0.conv", "1"]


def test_every_conv_is_a_leaf_node() -> None:
    class Sub(nn.Conv2d):
        """A subclass that keeps Conv2d's forward: still a leaf, still one node."""

    net = nn.Sequential(nn.Conv2d(3, 4, 3), Sub(4, 4, 3))
    tracer = SepifyTracer()
    graph = tracer.trace(net)
    assert [n.target for n in graph.nodes if n.op == "call_module"] == ["0", "1"]


class DefaultsInForward(nn.Module):
    """Like diffusers' UNet2DModel: a defaulted argument the example inputs do not pass steers control flow."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.emb = nn.Embedding(4, 8)

    def forward(self, x: torch.Tensor, class_labels: torch.Tensor | None = None, return_dict: bool = True) -> object:
        h = self.a(x)
        if class_labels is not None:
            h = h + self.emb(class_labels)[:, :, None, None]
        out = self.b(h)
        return {"sample": out} if return_dict else (out,)


def test_unpassed_defaults_are_traced_as_constants() -> None:
    model = DefaultsInForward().eval()
    x = torch.randn(1, 3, 8, 8)
    result = sepify.convert(model, x, rank="full")
    assert result.report.mode == "fx" and len(result.report.converted) == 2  # was "swap": a Proxy in `if`
    torch.testing.assert_close(result.model(x)["sample"], model(x)["sample"], rtol=1e-4, atol=1e-5)
    assert result.report.notes == ()  # the graph was traced with them fixed, but the model returned is not the graph
    labels = torch.tensor([1])  # so every argument the original takes works, with its own meaning
    torch.testing.assert_close(result.model(x, labels)["sample"], model(x, labels)["sample"], rtol=1e-4, atol=1e-5)
    (out,) = result.model(x, labels, return_dict=False)
    torch.testing.assert_close(out, model(x, labels, return_dict=False)[0], rtol=1e-4, atol=1e-5)
    both = sepify.convert(model, (x, labels), rank="full")  # passed: a Proxy (`is not None` needs no value)
    assert both.report.mode == "fx"
    torch.testing.assert_close(both.model(x, labels)["sample"], model(x, labels)["sample"], rtol=1e-4, atol=1e-5)
