"""Conv2d subclasses with known semantics: parametrizations, legacy weight norm, TF "SAME" padding, a registry."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils import parametrizations

import sepify
from sepify.core.functional import SameConv2d
from sepify.core.modules import SeparableConv2d
from sepify.graph.conv_kinds import plain_view

X = torch.randn(2, 3, 17, 15)


def test_parametrized_convs_convert_from_their_effective_weight() -> None:
    net = nn.Sequential(
        parametrizations.weight_norm(nn.Conv2d(3, 8, 3)), nn.ReLU(), parametrizations.spectral_norm(nn.Conv2d(8, 8, 3))
    ).eval()
    result = sepify.convert(net, X, rank="full")
    assert [r.converted for r in result.report.layers] == [True, True]
    assert result.report.output_error is not None and result.report.output_error < 1e-5
    assert result.report.notes[0].startswith(
        "2 conv(s) of other classes were converted from what their forward computes: "
        "torch.nn.utils.parametrize.ParametrizedConv2d (2); where that is a weight computed from parameters"
    )
    assert not any("parametrizations" in k for k in result.model.state_dict())  # plain factors only


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch deprecates the legacy weight_norm we test
def test_legacy_weight_norm_is_not_a_hook_to_refuse() -> None:
    net = nn.Sequential(torch.nn.utils.weight_norm(nn.Conv2d(3, 8, 3)), nn.ReLU(), nn.Conv2d(8, 8, 3)).eval()
    expected = net(X)
    with pytest.raises(sepify.ModelError, match="cannot be deep-copied"):  # legacy weight norm defeats deepcopy
        sepify.convert(net, X, rank=1)
    result = sepify.convert(net, X, rank="full", inplace=True)
    assert [r.converted for r in result.report.layers] == [True, True]
    torch.testing.assert_close(result.model(X), expected, rtol=1e-4, atol=1e-5)
    assert "torch.nn.utils.weight_norm (legacy) (1)" in result.report.notes[0]


@given(
    size=st.tuples(st.integers(5, 12), st.integers(5, 12)),
    kernel=st.tuples(st.integers(1, 4), st.integers(2, 4)),
    stride=st.integers(1, 3),
    dilation=st.integers(1, 2),
    order=st.sampled_from(["dw-pw", "pw-dw", "pw-dw-pw"]),
    bias=st.booleans(),
)
@settings(max_examples=60, deadline=None)
def test_same_padding_pairs_are_exact_at_full_rank(
    size: tuple[int, int], kernel: tuple[int, int], stride: int, dilation: int, order: str, bias: bool
) -> None:
    torch.manual_seed(0)
    conv = SameConv2d(4, 6, kernel, stride=stride, dilation=dilation, bias=bias).double()
    x = torch.randn(2, 4, *size, dtype=torch.float64)
    pair = SeparableConv2d.from_conv(conv, "full", order)
    assert isinstance(pair.conv_dw, SameConv2d)
    expected = conv(x)
    assert expected.shape[-2:] == tuple(-(-s // stride) for s in size)  # TF "SAME": ceil(input / stride)
    torch.testing.assert_close(pair(x), expected, rtol=1e-9, atol=1e-9)


def test_register_conv_teaches_a_subclass_and_unknown_ones_stay_skipped() -> None:
    class Doubled(nn.Conv2d):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self._conv_forward(x, 2 * self.weight, self.bias)

    net = nn.Sequential(Doubled(3, 8, 3), nn.Conv2d(8, 8, 3)).eval()
    assert sepify.convert(net, X, rank=1).report.layer("0").skip_reason is sepify.SkipReason.SUBCLASS
    sepify.register_conv(Doubled, effective_weight=lambda m: 2 * m.weight)
    result = sepify.convert(net, X, rank="full")
    assert result.report.layer("0").converted
    torch.testing.assert_close(result.model(X), net(X), rtol=1e-4, atol=1e-5)
    with pytest.raises(sepify.ConfigError, match="register_conv expects a subclass of a torch conv class"):
        sepify.register_conv(nn.Linear, effective_weight=lambda m: m.weight)  # type: ignore[arg-type]


def test_register_conv_as_a_decorator_with_tf_same_padding_and_for_other_kinds() -> None:
    from sepify.core.functional import same_pad_amounts

    @sepify.register_conv(padding="tf-same")
    class PadSame(nn.Conv2d):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = nn.functional.pad(x, same_pad_amounts(self, x.shape[-2:]))
            return nn.functional.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)

    @sepify.register_conv(effective_weight=lambda m: m.weight / m.weight.norm())
    class Normalised1d(nn.Conv1d):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self._conv_forward(x, self.weight / self.weight.norm(), self.bias)

    image = torch.randn(2, 3, 15, 17, dtype=torch.float64)
    conv = nn.Sequential(PadSame(3, 8, 3, stride=2)).double().eval()
    result = sepify.convert(conv, image, rank="full", order="pw-dw")
    assert result.report.layer("0").converted and result.model(image).shape == (2, 8, 8, 9)
    torch.testing.assert_close(result.model(image), conv(image), rtol=1e-9, atol=1e-9)
    sound = torch.randn(2, 4, 20, dtype=torch.float64)
    conv1d = nn.Sequential(Normalised1d(4, 6, 5)).double().eval()
    result = sepify.convert(conv1d, sound, rank="full")
    assert result.report.layer("0").kind == "conv1d" and result.report.layer("0").converted
    torch.testing.assert_close(result.model(sound), conv1d(sound), rtol=1e-9, atol=1e-9)
    with pytest.raises(sepify.ConfigError, match="padding='tf-same' is for nn.Conv2d subclasses only"):
        sepify.register_conv(Normalised1d, padding="tf-same")
    with pytest.raises(sepify.ConfigError, match=r"padding must be one of \('module', 'tf-same'\), got 'same'"):
        sepify.register_conv(PadSame, padding="same")


def test_a_view_shares_nothing_with_its_conv() -> None:
    conv = parametrizations.weight_norm(nn.Conv2d(3, 8, 3))
    view = plain_view(conv)
    assert view is not None and type(view) is nn.Conv2d
    with torch.no_grad():
        view.weight.zero_()
    assert conv.weight.abs().sum() > 0
    assert plain_view(nn.Conv2d(3, 8, 3)) is None  # a plain conv needs no view


class _StaticSame(nn.Conv2d):
    """smp's ``Conv2dStaticSamePadding`` as it is written (from lukemelas' EfficientNet-PyTorch), under its name."""

    def __init__(self, cin: int, cout: int, k: int, stride: int = 1, image_size: int = 16, **kwargs: object) -> None:
        super().__init__(cin, cout, k, stride, **kwargs)  # type: ignore[arg-type]
        total = max((math.ceil(image_size / stride) - 1) * stride + k - image_size, 0)
        self.static_padding = nn.ZeroPad2d((total // 2, total - total // 2, total // 2, total - total // 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(self.static_padding(x), self.weight, self.bias, self.stride, self.padding, self.dilation)


_StaticSame.__module__ = "segmentation_models_pytorch.encoders._efficientnet"
_StaticSame.__qualname__ = "Conv2dStaticSamePadding"


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("order", ["dw-pw", "pw-dw", "pw-dw-pw"])
def test_smp_static_same_padding_converts_exactly_at_every_input_size(stride: int, order: str) -> None:
    net = nn.Sequential(_StaticSame(3, 8, 3, stride=stride, image_size=16), nn.ReLU(), _StaticSame(8, 8, 5, padding=1))
    result = sepify.convert(net.eval(), torch.randn(1, 3, 16, 16), rank="full", order=order)
    assert [r.converted for r in result.report.layers] == [True, True]
    for size in (16, 15, 21):  # amounts fixed at construction, whatever the input size: the pair pads the same
        x = torch.randn(2, 3, size, size)
        torch.testing.assert_close(result.model(x), net(x), rtol=1e-4, atol=1e-5)
    assert result.model[0].conv_dw.static_pad == ((0, 1, 0, 1) if stride == 2 else (1, 1, 1, 1))
