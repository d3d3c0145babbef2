"""SeparableConv2d: exact at full rank for every conv configuration; structure and metadata."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

from sepify import SeparableConv, SeparableConv2d
from sepify.core.cost import separable_params
from sepify.errors import ModelError
from sepify.runtime.timing import time_pair


@st.composite
def conv_configs(draw: st.DrawFn) -> dict[str, Any]:
    groups = draw(st.sampled_from([1, 1, 1, 2, 3]))
    cfg: dict[str, Any] = {
        "in_channels": groups * draw(st.integers(1, 4)),
        "out_channels": groups * draw(st.integers(1, 5)),
        "kernel_size": (draw(st.integers(1, 4)), draw(st.integers(1, 4))),
        "dilation": (draw(st.integers(1, 2)), draw(st.integers(1, 2))),
        "groups": groups,
        "bias": draw(st.booleans()),
        "padding_mode": draw(st.sampled_from(["zeros", "reflect", "replicate", "circular"])),
    }
    if draw(st.booleans()):
        cfg["padding"] = "same"
        cfg["stride"] = 1
    else:
        cfg["padding"] = (draw(st.integers(0, 2)), draw(st.integers(0, 2)))
        cfg["stride"] = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    return cfg


@settings(max_examples=80, deadline=None)
@given(conv_configs(), st.sampled_from(["dw-pw", "pw-dw", "pw-dw-pw"]), st.sampled_from([torch.float32, torch.float64]))
def test_full_rank_reproduces_conv_output(cfg: dict[str, Any], order: str, dtype: torch.dtype) -> None:
    conv = nn.Conv2d(**cfg, dtype=dtype)
    x = torch.randn(2, cfg["in_channels"], 9, 10, dtype=dtype)
    sep = SeparableConv2d.from_conv(conv, rank="full", order=order)
    with torch.no_grad():
        expected, got = conv(x), sep(x)
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    torch.testing.assert_close(got, expected, rtol=tol, atol=tol * float(expected.abs().max().clamp_min(1)))


@settings(max_examples=40, deadline=None)
@given(conv_configs(), st.sampled_from(["dw-pw", "pw-dw", "pw-dw-pw"]), st.integers(1, 3))
def test_pair_equals_conv_with_its_effective_weight(cfg: dict[str, Any], order: str, rank: int) -> None:
    # At any rank the pair computes a conv whose weight is the merged factors.
    conv = nn.Conv2d(**cfg, dtype=torch.float64)
    sep = SeparableConv2d.from_conv(conv, rank=rank, order=order)
    dense = nn.Conv2d(**cfg, dtype=torch.float64)
    with torch.no_grad():
        dense.weight.copy_(sep.effective_weight())
        if conv.bias is not None:
            dense.bias.copy_(conv.bias)
    x = torch.randn(1, cfg["in_channels"], 8, 7, dtype=torch.float64)
    torch.testing.assert_close(sep(x), dense(x), rtol=1e-10, atol=1e-10)
    assert sum(p.numel() for p in sep.parameters()) == separable_params(
        cfg["in_channels"], cfg["out_channels"], cfg["kernel_size"], cfg["groups"], sep.rank, order, cfg["bias"]
    )


def test_pw_dw_pw_is_a_bottleneck() -> None:
    conv = nn.Conv2d(6, 8, 3, stride=2, padding=1, groups=2)
    sep = SeparableConv2d.from_conv(conv, rank=3, order="pw-dw-pw")
    assert [tuple(c.weight.shape) for c in sep.convs] == [(6, 3, 1, 1), (6, 1, 3, 3), (8, 3, 1, 1)]
    assert [c.groups for c in sep.convs] == [2, 6, 2] and sep.last is sep.conv_pwl
    x = torch.randn(1, 6, 8, 8)
    manual = F.conv2d(
        F.conv2d(F.conv2d(x, sep.conv_pw.weight, groups=2), sep.conv_dw.weight, stride=2, padding=1, groups=6),
        sep.conv_pwl.weight,
        conv.bias,
        groups=2,
    )
    torch.testing.assert_close(sep(x), manual)
    assert list(sep.state_dict()) == ["conv_pw.weight", "conv_dw.weight", "conv_pwl.weight", "conv_pwl.bias"]
    assert sep.in_channels == 6 and sep.out_channels == 8 and sep.layouts == ("grouped",)


def test_dw_pw_is_depthwise_then_pointwise() -> None:
    conv = nn.Conv2d(4, 6, 3, stride=2, padding=1, bias=True)
    sep = SeparableConv2d.from_conv(conv, rank=2, order="dw-pw")
    x = torch.randn(1, 4, 8, 8)
    manual = F.conv2d(F.conv2d(x, sep.conv_dw.weight, stride=2, padding=1, groups=4), sep.conv_pw.weight, conv.bias)
    torch.testing.assert_close(sep(x), manual)
    assert sep.conv_dw.weight.shape == (8, 1, 3, 3) and sep.conv_dw.groups == 4
    assert sep.conv_pw.weight.shape == (6, 8, 1, 1)
    assert list(sep.state_dict()) == ["conv_dw.weight", "conv_pw.weight", "conv_pw.bias"]


def test_pw_dw_puts_bias_and_stride_on_the_depthwise_conv() -> None:
    conv = nn.Conv2d(4, 6, 3, stride=2, padding=1, bias=True)
    sep = SeparableConv2d.from_conv(conv, rank=2, order="pw-dw")
    assert sep.conv_pw.weight.shape == (12, 4, 1, 1) and sep.conv_pw.bias is None
    assert sep.conv_dw.weight.shape == (6, 2, 3, 3) and sep.conv_dw.groups == 6
    assert sep.conv_dw.stride == (2, 2) and sep.conv_dw.bias is not None
    assert (sep.in_channels, sep.out_channels, sep.kernel_size) == (4, 6, (3, 3))


def test_rank_is_capped_at_exact_rank() -> None:
    conv = nn.Conv2d(8, 4, 3)  # dw-pw exact rank = min(Cout, 9) = 4
    assert SeparableConv2d.from_conv(conv, rank=7, order="dw-pw").rank == 4
    assert SeparableConv2d.from_conv(conv, rank=7, order="pw-dw").rank == 7
    assert SeparableConv2d.from_conv(conv, rank="full", order="pw-dw").rank == 8


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_layers_stay_half_and_close(dtype: torch.dtype) -> None:
    conv = nn.Conv2d(8, 16, 3, padding=1).to(dtype)
    sep = SeparableConv2d.from_conv(conv, rank="full")
    assert {p.dtype for p in sep.parameters()} == {dtype}
    merged = sep.effective_weight().detach().double()
    reference = conv.weight.detach().double()
    rel = float((merged - reference).norm() / reference.norm())
    assert rel < 2e-2  # the float64 factors are rounded once to half precision
    x = torch.randn(1, 8, 6, 6, dtype=dtype)
    assert sep(x).dtype == dtype


def test_mode_and_requires_grad_are_copied() -> None:
    conv = nn.Conv2d(4, 4, 3).eval()
    conv.weight.requires_grad_(False)
    sep = SeparableConv2d.from_conv(conv)
    assert not sep.training and not sep.conv_dw.training and not sep.conv_pw.training
    assert not any(p.requires_grad for p in sep.parameters())


def test_bad_arguments_are_rejected() -> None:
    with pytest.raises(ValueError, match="rank must be a positive int or 'full', got 0"):
        SeparableConv2d.from_conv(nn.Conv2d(4, 4, 3), rank=0)
    with pytest.raises(ValueError, match="order must be one of"):
        SeparableConv2d.from_conv(nn.Conv2d(4, 4, 3), order="dw-dw")


@pytest.mark.parametrize("rank", [2, 3])
def test_fast_split_path_equals_the_plain_composition(rank: int) -> None:
    # dw-pw at rank > 1 runs as `rank` multiplier-1 depthwise convs; same parameters, same result
    conv = nn.Conv2d(6, 10, (3, 5), stride=2, padding=(1, 2), padding_mode="reflect", dtype=torch.float64)
    sep = SeparableConv2d.from_conv(conv, rank=rank, order="dw-pw")
    x = torch.randn(2, 6, 9, 11, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(sep(x), sep.conv_pw(sep.conv_dw(x)), rtol=1e-12, atol=1e-12)


def test_rank_major_layout_equals_grouped_and_timing_picks_one() -> None:
    conv = nn.Conv2d(6, 10, (5, 1), stride=(2, 1), padding=(2, 0), dtype=torch.float64)
    sep = SeparableConv2d.from_conv(conv, rank=3, order="pw-dw")
    x = torch.randn(2, 6, 16, 3, dtype=torch.float64)
    with torch.no_grad():
        rank_major = sep(x)  # the default layout of a 2-D pw-dw pair
        sep.layout = "grouped"
        torch.testing.assert_close(sep(x), rank_major, rtol=1e-12, atol=1e-12)
    assert "layout='grouped'" in repr(sep)
    assert time_pair(sep, (2, 6, 16, 3), reps=2).layout in ("grouped", "rank-major")
    # pairs without a choice have nothing to pick
    assert time_pair(SeparableConv2d.from_conv(conv, rank=1, order="pw-dw"), (2, 6, 16, 3), reps=2).layout is None


# -- what ecosystems do to a conv: assign its weight and bias ----------------------------------------------------

_KINDS = {
    (1, False): nn.Conv1d, (2, False): nn.Conv2d, (3, False): nn.Conv3d,
    (1, True): nn.ConvTranspose1d, (2, True): nn.ConvTranspose2d, (3, True): nn.ConvTranspose3d,
}  # fmt: skip
_BNS = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


@settings(max_examples=40, deadline=None)
@given(
    st.sampled_from(sorted(_KINDS)),
    st.sampled_from(["dw-pw", "pw-dw", "pw-dw-pw"]),
    st.integers(1, 3),
    st.sampled_from([1, 2]),
    st.booleans(),
)
def test_folding_a_batchnorm_into_a_pair_is_exact(
    kind: tuple[int, bool], order: str, rank: int, groups: int, bias: bool
) -> None:
    """``conv.weight, conv.bias = fuse_conv_bn_weights(...)`` (ultralytics' fuse, torch.fx's) on a pair."""
    dims, transposed = kind
    groups = 1 if transposed else groups  # torch's fuse_conv_bn_weights folds transposed convs with groups=1 only
    conv = _KINDS[kind](2 * groups, 3 * groups, 3, groups=groups, bias=bias).double()
    pair = SeparableConv.from_conv(conv, rank, order)
    bn = _BNS[dims](3 * groups).double().eval()
    with torch.no_grad():
        for t in (bn.weight, bn.bias, bn.running_mean):
            t.normal_()
        bn.running_var.uniform_(0.5, 2.0)
    x = torch.randn(2, 2 * groups, *(5,) * dims, dtype=torch.float64)
    with torch.no_grad():
        expected = bn(pair(x))
    pair.weight, pair.bias = fuse_conv_bn_weights(
        pair.weight, pair.bias, bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias, transpose=transposed
    )
    with torch.no_grad():
        torch.testing.assert_close(pair(x), expected, rtol=1e-10, atol=1e-10)
    assert {n for n, _ in pair.named_parameters()} <= {
        f"{c}.{w}" for c in ("conv_dw", "conv_pw", "conv_pwl") for w in ("weight", "bias")
    }


def test_a_weight_the_factors_cannot_hold_is_refused_with_a_sentence() -> None:
    pair = SeparableConv2d.from_conv(nn.Conv2d(4, 6, 3), rank=1)
    before = [p.detach().clone() for p in pair.parameters()]
    with pytest.raises(
        ModelError,
        match=r"^SeparableConv2d.weight was assigned a dense kernel that is not the pair's own kernel scaled per output channel \(relative residual .*\), so its factors cannot hold it; fold such changes into the model before converting it, or assign the children's weights \(conv_dw, conv_pw\)$",
    ):
        pair.weight = nn.Parameter(torch.randn(6, 4, 3, 3))
    with pytest.raises(
        ModelError, match=r"assigned \(6, 4, 1, 1\), but the pair computes a kernel of shape \(6, 4, 3, 3\)"
    ):
        pair.weight = nn.Parameter(torch.randn(6, 4, 1, 1))
    assert all(torch.equal(a, b) for a, b in zip(before, pair.parameters()))  # refused: nothing changed
    pair.bias = None
    assert pair.conv_pw.bias is None and pair.bias is None
