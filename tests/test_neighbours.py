"""Each conv's neighbours that a deployment runtime fuses with it, read from the traced graph."""

from __future__ import annotations

import importlib
from typing import Any

import pytest
import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

import sepify
from sepify.graph.neighbours import layer_contexts
from sepify.runtime.context import Activation, LayerContext
from sepify.runtime.timing import PairTiming


class Crepe(nn.Module):
    """torchcrepe's layer: F.pad, conv, ReLU, BatchNorm after the activation."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, 8, (16, 1), stride=(4, 1)), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 4, (8, 1)), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn1(F.relu(self.conv1(F.pad(x[:, None, :, None], (0, 0, 6, 6)))))
        return self.bn2(F.relu(self.conv2(F.pad(x, (0, 0, 3, 4)))))


def _contexts(model: nn.Module) -> dict[str, LayerContext]:
    return layer_contexts(torch.fx.symbolic_trace(model.eval()))


def test_crepes_padding_and_relu_are_found() -> None:
    contexts = _contexts(Crepe())
    assert contexts["conv1"] == LayerContext((0, 0, 6, 6), Activation("relu"))
    assert contexts["conv2"] == LayerContext((0, 0, 3, 4), Activation("relu"))
    assert contexts["conv2"].input_shape((2, 8, 31, 1)) == (2, 8, 24, 1)


@pytest.mark.parametrize(
    ("tail", "expected"),
    [
        (nn.Sequential(nn.BatchNorm2d(8), nn.ReLU6()), Activation("clip", (0.0, 6.0))),
        (nn.Sequential(nn.BatchNorm2d(8), nn.LeakyReLU(0.3)), Activation("leaky_relu", (0.3,))),
        (nn.Sequential(nn.Hardtanh(-2.0, 3.0)), Activation("clip", (-2.0, 3.0))),
        (nn.Sequential(nn.SiLU()), Activation("silu")),
        (nn.Sequential(nn.Hardswish()), Activation("hardswish")),
        (nn.Sequential(nn.BatchNorm2d(8), nn.BatchNorm2d(8), nn.ReLU()), None),  # two norms: not a fused pattern
        (nn.Sequential(nn.Dropout(), nn.ReLU()), None),  # only BatchNorm is looked through
        (nn.Sequential(nn.GELU()), None),  # not an activation runtimes fuse into a conv
        (nn.Sequential(nn.BatchNorm2d(8, track_running_stats=False), nn.ReLU()), None),  # batch statistics: no fold
    ],
)
def test_the_activation_after_a_conv_and_its_batchnorm(tail: nn.Module, expected: Activation | None) -> None:
    model = nn.Sequential(nn.ZeroPad2d((1, 2, 0, 1)), nn.Conv2d(3, 8, 3), *tail)
    context = _contexts(model)["1"]
    assert context.pad == (1, 2, 0, 1)
    assert context.activation == expected


def test_prelu_keeps_its_slopes() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.PReLU(8))
    activation = _contexts(model)["0"].activation
    assert activation is not None and activation.kind == "prelu"
    assert torch.equal(activation.weight, model[1].weight.detach())


def test_constant_pad_nd_is_read_with_its_own_signature() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(torch.constant_pad_nd(self.a(torch.constant_pad_nd(x, (1, 1, 2, 2))), (1, 1, 1, 1), 0.5))

    contexts = _contexts(Net())
    assert contexts["a"].pad == (1, 1, 2, 2)
    assert contexts["b"].pad == ()  # pads with 0.5, which no runtime folds into the conv


def test_functional_activations_with_arguments() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.c = nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3), nn.Conv2d(4, 4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = F.leaky_relu(self.a(x), 0.1, True)
            x = self.b(x).sigmoid()
            return torch.tanh(self.c(x))

    contexts = _contexts(Net())
    assert contexts["a"].activation == Activation("leaky_relu", (0.1,))
    assert contexts["b"].activation == Activation("sigmoid")
    assert contexts["c"].activation == Activation("tanh")


def test_what_a_runtime_cannot_fuse_is_left_out() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.c, self.d = (nn.Conv2d(4, 4, 3) for _ in range(4))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            padded = F.pad(x, (1, 1, 1, 1))
            y = self.a(padded) + padded[:, :, 1:-1, 1:-1]  # the padded tensor is read twice
            z = self.b(F.pad(y, (1, 1, 1, 1), value=1.0))  # not zeros
            w = self.c(F.pad(z, (1, 1, 1, 1), mode="reflect"))  # not constant
            out = self.d(F.pad(w, (-1, -1, 1, 1)))  # cropping
            return torch.relu(out) + out  # the output is read twice

    contexts = _contexts(Net())
    assert all(contexts[name] == LayerContext() for name in "abcd")


def test_an_untraced_model_has_no_contexts() -> None:
    assert layer_contexts(Crepe()) == {}


def test_audit_and_convert_time_each_layer_in_its_context(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[str, LayerContext | None]] = []

    def fake(pair: Any, input_shape: tuple[int, ...], reps: int = 7, against: Any = None, **kw: Any) -> PairTiming:
        seen.append((kw["backend"], kw["context"]))
        return PairTiming(None, 0.5, 1.0 if against is not None else None)

    for module in ("sepify.pipeline.layers", "sepify.pipeline.audit"):
        monkeypatch.setattr(importlib.import_module(module), "time_pair", fake)
    x = torch.randn(2, 64)
    timing = sepify.Timing(reps=1)
    sepify.audit(Crepe().eval(), x, timing=timing, orders=("dw-pw",), ranks=(1,))
    sepify.convert(Crepe().eval(), x, rank=1, order="dw-pw", timing=timing)
    first, second = LayerContext((0, 0, 6, 6), Activation("relu")), LayerContext((0, 0, 3, 4), Activation("relu"))
    assert [context for _, context in seen] == [first, second, first, second]  # audit's two layers, then convert's


def test_a_padded_layer_is_timed_from_its_unpadded_input() -> None:
    pytest.importorskip("onnxruntime")
    from sepify.runtime.timing import time_pair

    conv = nn.Conv2d(8, 4, (8, 1))
    pair = sepify.SeparableConv.from_conv(conv, rank=2)
    context = LayerContext((0, 0, 3, 4), Activation("relu"))
    timing = time_pair(pair, (2, 8, 31, 1), reps=1, against=conv, backend="onnxruntime", threads=1, context=context)
    assert timing.layout in pair.layouts and timing.pair > 0 and timing.conv is not None and timing.conv > 0
