"""Every kind of convolution: Conv1d/2d/3d and ConvTranspose1d/2d/3d, exact at full rank, counted as fvcore counts."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import sepify
from sepify import SeparableConv
from sepify.core.decompose import Factorization
from sepify.core.functional import canonical_weight, kind_of, layer_weight
from sepify.core.measure import layer_output_errors, pair_output_error
from sepify.core.modules import dense_kernels, weight_of

ORDERS = ["dw-pw", "pw-dw", "pw-dw-pw"]
CONVS = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
CONVS_T = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
SIZES = {1: (11,), 2: (7, 8), 3: (7, 8, 7)}  # at least the widest dilated kernel (3 taps, dilation 3)


@st.composite
def layers(draw: st.DrawFn) -> tuple[nn.Module, torch.Tensor]:
    """A conv or transposed conv of 1-3 spatial dims with any geometry, in float64, and an input for it."""
    dims = draw(st.sampled_from([1, 2, 3]))
    transposed = draw(st.booleans())
    groups = draw(st.sampled_from([1, 1, 2, 3]))
    per_dim = st.lists(st.integers(1, 3), min_size=dims, max_size=dims)
    kernel, stride, dilation = draw(per_dim), draw(per_dim), draw(per_dim)
    cfg: dict[str, Any] = {
        "in_channels": groups * draw(st.integers(1, 3)),
        "out_channels": groups * draw(st.integers(1, 4)),
        "kernel_size": tuple(kernel),
        "stride": tuple(stride),
        "dilation": tuple(dilation),
        "groups": groups,
        "bias": draw(st.booleans()),
        "dtype": torch.float64,
    }
    if transposed:
        cfg["padding"] = tuple(draw(st.integers(0, (d * (k - 1)) // 2)) for k, d in zip(kernel, dilation))
        # output_padding must be smaller than stride or dilation
        cfg["output_padding"] = tuple(draw(st.integers(0, max(s, d) - 1)) for s, d in zip(stride, dilation))
        conv = CONVS_T[dims](**cfg)
    else:
        cfg["padding"] = tuple(draw(st.integers(0, 2)) for _ in range(dims))
        cfg["padding_mode"] = draw(st.sampled_from(["zeros", "zeros", "reflect", "replicate", "circular"]))
        conv = CONVS[dims](**cfg)
    x = torch.randn(2, cfg["in_channels"], *SIZES[dims], dtype=torch.float64)
    return conv, x


@settings(max_examples=150, deadline=None)
@given(layers(), st.sampled_from(ORDERS))
def test_full_rank_reproduces_every_kind_of_conv(layer: tuple[nn.Module, torch.Tensor], order: str) -> None:
    conv, x = layer
    pair = SeparableConv.from_conv(conv, "full", order)
    assert type(pair).__name__ == "Separable" + type(conv).__name__
    assert pair.weight.shape == conv.weight.shape
    torch.testing.assert_close(pair.weight, conv.weight, rtol=1e-10, atol=1e-10)
    with torch.no_grad():
        expected, got = conv(x), pair(x)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)


@settings(max_examples=60, deadline=None)
@given(layers(), st.sampled_from(["dw-pw", "pw-dw"]), st.integers(1, 4))
def test_rank_r_error_is_the_svd_tail_for_every_kind(
    layer: tuple[nn.Module, torch.Tensor], order: str, rank: int
) -> None:
    conv, x = layer
    f = Factorization.of(weight_of(conv), conv.groups, order)
    pair = SeparableConv.from_conv(conv, rank, order, factorization=f)
    w = conv.weight.detach()
    measured = float((pair.weight - w).norm() / w.norm())
    assert math.isclose(measured, f.relative_error(pair.rank), rel_tol=1e-7, abs_tol=1e-9)
    # The audit's rank-by-rank output errors are those of the pairs it would build.
    errors = layer_output_errors(conv, x, f, f.max_rank)
    built = SeparableConv.from_conv(conv, pair.rank, order)
    assert math.isclose(errors[pair.rank - 1], pair_output_error(conv, built, x), rel_tol=1e-6, abs_tol=1e-9)


@settings(max_examples=80, deadline=None)
@given(layers(), st.sampled_from(ORDERS), st.integers(1, 3), st.booleans())
def test_dense_kernels_compute_what_the_pair_computes(
    layer: tuple[nn.Module, torch.Tensor], order: str, rank: int, same: bool
) -> None:
    """Calibration runs pairs as their dense kernel (``dense_kernels``): the same output for every kind of conv
    (padding modes, "same", transposed with output padding), only without gradients, and the pair is left as it
    was."""
    conv, x = layer
    if same and type(conv) in CONVS.values():  # padding="same" (stride 1)
        conv = type(conv)(conv.in_channels, conv.out_channels, conv.kernel_size, padding="same",
                          dilation=conv.dilation, groups=conv.groups, bias=conv.bias is not None,
                          padding_mode=conv.padding_mode, dtype=torch.float64)  # fmt: skip
    pair = SeparableConv.from_conv(conv, rank, order)
    with torch.no_grad():
        expected = pair(x)
    model = nn.Sequential(pair)
    with dense_kernels(model, ratio=math.inf) as dense:
        assert dense == ["0"]
        with torch.no_grad():
            got = pair(x)
        trained = pair(x)  # with gradients: the pair's own convs, so that training reaches the factors
        trained.sum().backward()
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(trained, expected, rtol=0, atol=0)
    assert all(p.grad is not None for p in pair.parameters())
    assert "_run_dense" not in vars(pair)
    with dense_kernels(model, ratio=0.0) as dense:  # no pair is that cheap
        assert dense == []


def test_canonical_weight_round_trips_and_names_the_kind() -> None:
    w = torch.randn(6, 4, 3, 5)  # a transposed conv's (Cin, Cout/g, k, k) weight with groups 3
    c = canonical_weight(w, transposed=True, groups=3)
    assert c.shape == (12, 2, 3, 5)
    assert torch.equal(c[4:8, 1], w[3, 0:4])  # group 1: input channel 2+1, outputs 4..7
    assert torch.equal(layer_weight(c, transposed=True, groups=3), w)
    assert [kind_of(m(2, 2, 3)) for m in (*CONVS.values(), *CONVS_T.values())] == [
        "conv1d",
        "conv2d",
        "conv3d",
        "conv_transpose1d",
        "conv_transpose2d",
        "conv_transpose3d",
    ]


@pytest.mark.parametrize("order", ORDERS)
def test_transposed_pair_takes_output_size(order: str) -> None:
    conv = nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1).double()
    x = torch.randn(1, 4, 5, 5, dtype=torch.float64)
    pair = SeparableConv.from_conv(conv, "full", order)
    for size in ([9, 9], [10, 10], [1, 6, 10, 9]):
        torch.testing.assert_close(pair(x, output_size=size), conv(x, output_size=size))
    with pytest.raises(TypeError, match="takes no output_size"):
        SeparableConv.from_conv(nn.Conv2d(4, 6, 3), 1)(torch.randn(1, 4, 5, 5), output_size=[3, 3])


def test_a_pair_class_stands_only_for_its_own_kind() -> None:
    with pytest.raises(sepify.ConfigError, match="SeparableConv2d cannot stand in for a Conv1d; use SeparableConv1d"):
        sepify.SeparableConv2d.from_conv(nn.Conv1d(4, 4, 3))


class AudioNet(nn.Module):
    """A 1-D encoder/decoder as vocoders and TCNs are built: weight-normed Conv1d, strided, then ConvTranspose1d."""

    def __init__(self) -> None:
        super().__init__()
        wn = nn.utils.parametrizations.weight_norm
        self.pre = wn(nn.Conv1d(1, 16, 7, padding=3))
        self.down = nn.Conv1d(16, 32, 4, stride=2, padding=1)
        self.mid = nn.Conv1d(32, 32, 3, padding=2, dilation=2, groups=2)
        self.up = nn.ConvTranspose1d(32, 16, 4, stride=2, padding=1)
        self.post = wn(nn.Conv1d(16, 1, 7, padding=3, padding_mode="reflect"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.leaky_relu(self.pre(x), 0.1)
        x = nn.functional.leaky_relu(self.down(x), 0.1)
        x = x + nn.functional.leaky_relu(self.mid(x), 0.1)
        return torch.tanh(self.post(nn.functional.leaky_relu(self.up(x), 0.1)))


def test_a_1d_audio_model_converts_exactly_and_counts_transposed_macs() -> None:
    torch.manual_seed(0)
    model = AudioNet().eval()
    x = torch.randn(2, 1, 64)
    result = sepify.convert(model, x, rank="full")
    report = result.report
    assert report.mode == "fx"
    assert {r.name: r.kind for r in report.layers} == {
        "pre": "conv1d",
        "down": "conv1d",
        "mid": "conv1d",
        "up": "conv_transpose1d",
        "post": "conv1d",
    }
    assert [r.name for r in report.converted] == ["pre", "down", "mid", "up", "post"]
    torch.testing.assert_close(result.model(x), model(x), rtol=1e-5, atol=1e-5)
    up = report.layer("up")
    # fvcore's rule for transposed convs: every input sample times the whole kernel
    assert up.input_size == (32,) and up.output_size == (64,)
    assert up.macs_before == 2 * 32 * 32 * 16 * 4
    small = sepify.convert(model, x, rank=1).report
    assert small.macs_after < small.macs_before
    assert result.model(x).shape == model(x).shape


def test_macs_of_every_kind_equal_fvcore() -> None:
    fvcore_nn = pytest.importorskip("fvcore.nn")

    class Mixed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c1 = nn.Conv1d(4, 16, 5, stride=2)
            self.t1 = nn.ConvTranspose1d(16, 12, 4, stride=2, groups=2)
            self.c3 = nn.Conv3d(3, 8, 3, padding=1)
            self.t3 = nn.ConvTranspose3d(8, 4, (2, 3, 3), stride=(1, 2, 2))
            self.t2 = nn.ConvTranspose2d(3, 5, 3, stride=2, output_padding=1)

        def forward(self, a: torch.Tensor, v: torch.Tensor, i: torch.Tensor) -> tuple[torch.Tensor, ...]:
            return self.t1(self.c1(a)), self.t3(self.c3(v)), self.t2(i)

    model = Mixed().eval()
    args = (torch.randn(2, 4, 21), torch.randn(1, 3, 4, 6, 6), torch.randn(1, 3, 5, 7))

    def fvcore_macs(m: nn.Module) -> dict[str, int]:
        analysis = fvcore_nn.FlopCountAnalysis(m, args).unsupported_ops_warnings(False)
        return dict(analysis.uncalled_modules_warnings(False).by_module())

    for order in ORDERS:
        result = sepify.convert(model, args, rank=1, order=order)
        before, after = fvcore_macs(model), fvcore_macs(result.model)
        for row in result.report.layers:
            assert row.converted, row.name
            assert row.macs_before == before[row.name], (row.name, order)
            assert row.macs_after == after[row.name], (row.name, order)


@pytest.mark.slow  # a torchvision video model: seconds
def test_video_model_converts_exactly() -> None:
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.video.r3d_18(num_classes=10).eval()
    x = torch.randn(1, 3, 4, 32, 32)
    result = sepify.convert(model, x, rank="full", order="pw-dw")
    report = result.report
    assert {r.kind for r in report.layers} == {"conv3d"}
    assert len(report.converted) == 17 and {str(r.skip_reason) for r in report.skipped} == {"pointwise"}
    with torch.no_grad():
        y, expected = result.model(x), model(x)
    assert float((y - expected).norm() / expected.norm()) < 1e-5
    slim = sepify.convert(model, x, rank=1).model
    assert slim(x).shape == expected.shape


def test_1d_model_survives_save_and_load(tmp_path: Any) -> None:
    pytest.importorskip("safetensors")
    from sepify.io.save import save_model

    torch.manual_seed(0)
    model = AudioNet().eval()
    x = torch.randn(1, 1, 32)
    result = sepify.convert(model, x, rank=1)  # (at rank 2 the upsampling layer would not be smaller)
    path = tmp_path / "audio.safetensors"
    save_model(result.model, path, "safetensors", example_args=(x,), plan_json=result.report.to_plan().to_json())
    restored = sepify.load_converted(AudioNet().eval(), path)
    torch.testing.assert_close(restored(x), result.model(x))
    assert type(restored.up).__name__ == "SeparableConvTranspose1d"


def test_1d_model_exports_to_onnx_with_a_dynamic_batch(tmp_path: Any) -> None:
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from sepify.io.save import save_model

    torch.manual_seed(0)
    model = AudioNet().eval()
    result = sepify.convert(model, torch.randn(1, 1, 32), rank=2, order="pw-dw")
    path = tmp_path / "audio.onnx"
    save_model(result.model, path, "onnx", example_args=(torch.randn(1, 1, 32),), plan_json="{}")
    x = torch.randn(3, 1, 32)
    session = ort.InferenceSession(str(path))  # the faster of two exports: each names its input its own way
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    torch.testing.assert_close(torch.from_numpy(got), result.model(x), rtol=1e-4, atol=1e-5)


def test_refit_of_a_1d_model_keeps_improvements_and_says_what_it_skipped() -> None:
    torch.manual_seed(0)
    model = AudioNet().eval()
    x = torch.randn(2, 1, 64)
    calibration = torch.randn(64, 1, 64)
    for order in ("dw-pw", "pw-dw"):
        result = sepify.convert(model, x, rank=1, order=order, calibration=calibration)
        stages = {s.stage: s.output_error for s in result.report.fidelity}
        assert stages["refined"] <= stages["init"], order
    video = nn.Sequential(nn.Conv3d(2, 8, 3, padding=1), nn.ReLU(), nn.Conv3d(8, 4, 3, padding=1)).eval()
    clips = torch.randn(16, 2, 3, 6, 6)
    notes = sepify.convert(video, clips[:1], rank=1, order="pw-dw", calibration=clips).report.notes
    assert "did not refine 0: refitting a 3-D pw-dw pair is not supported" in " ".join(notes)


def test_audit_measures_every_kind_including_parametrized_convs() -> None:
    torch.manual_seed(0)
    model = AudioNet().eval()
    report = sepify.audit(model, torch.randn(4, 1, 64))
    assert {layer.name: layer.kind for layer in report.layers}["up"] == "conv_transpose1d"
    for layer in report.layers:  # pre and post are weight-normed: hooks and swaps reach the module in the model
        best = layer.best_at(1)
        assert best is not None and best.output_error is not None and best.output_error > 0, layer.name
        assert layer.model_error_rank1 is not None and layer.model_error_rank1 > 0, layer.name
    plan = report.plan(max_mac_ratio=0.6)
    result = sepify.convert(model, torch.randn(4, 1, 64), plan=plan)
    assert result.report.macs_after <= 0.6 * result.report.macs_before
