"""pw-dw normal equations from correlations (sepify.calibrate.lagged) equal the unfolded patches' to round-off.

The oracle is the unfolded computation every other layer uses (regression._dw_features): the same features,
multiplied out. Hypothesis draws the depthwise conv's geometry (taps, stride, dilation, padding and its mode,
bias, 1-D or a 2-D conv whose kernel is long along one axis only).
"""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from sepify.calibrate import regression
from sepify.calibrate.lagged import LAGGED_MIN_TAPS, sequence_normals
from sepify.calibrate.regression import NormalEquations, add_to_normals
from sepify.core.modules import SeparableConv


def _normals(pair: SeparableConv, x: torch.Tensor, y: torch.Tensor) -> NormalEquations:
    """One sample a batch: the correlations are summed over batches and assembled once."""
    normal = NormalEquations()
    for k in range(len(x)):
        add_to_normals(normal, pair, x[k : k + 1], y[k : k + 1])
    return normal


def _unfolded(pair: SeparableConv, x: torch.Tensor, y: torch.Tensor) -> NormalEquations:
    normal = NormalEquations()
    normal.add(regression._dw_features(pair, x), regression._dw_targets(y))
    return normal


@settings(max_examples=40, deadline=None)
@given(
    taps=st.integers(LAGGED_MIN_TAPS, 40),
    stride=st.integers(1, 4),
    dilation=st.integers(1, 3),
    padding=st.sampled_from([0, 3, "same"]),
    mode=st.sampled_from(["zeros", "reflect", "circular"]),
    bias=st.booleans(),
    layout=st.sampled_from(["1d", "2d-rows", "2d-cols"]),
    rank=st.integers(1, 3),
    seed=st.integers(0, 2**16),
)
def test_lagged_normals_equal_unfolded(
    taps: int, stride: int, dilation: int, padding: int | str, mode: str, bias: bool, layout: str, rank: int, seed: int
) -> None:
    if padding == "same":
        stride = 1  # torch refuses padding="same" with a stride
    torch.manual_seed(seed)
    length = (taps - 1) * dilation + 1 + 2 * stride + 5
    if layout == "1d":
        conv: nn.Module = nn.Conv1d(4, 3, taps, stride, padding, dilation, bias=bias, padding_mode=mode)
        x = torch.randn(3, 4, length)
    else:
        kernel, strides = ((taps, 1), (stride, 2)) if layout == "2d-rows" else ((1, taps), (2, stride))
        dilations = (dilation, 1) if layout == "2d-rows" else (1, dilation)
        pad = padding if isinstance(padding, str) else ((padding, 1) if layout == "2d-rows" else (1, padding))
        if isinstance(pad, str):
            strides = (1, 1)
        conv = nn.Conv2d(4, 3, kernel, strides, pad, dilations, bias=bias, padding_mode=mode)
        shape = (length, 5) if layout == "2d-rows" else (5, length)
        x = torch.randn(3, 4, *shape)
    if mode != "zeros" and padding != "same" and 2 * int(padding) >= length:
        return
    # float64 throughout: in float32 the pointwise conv of one sample and of the batch may round differently
    conv, x = conv.double(), x.double()
    pair = SeparableConv.from_conv(conv, rank, "pw-dw")
    assert regression._lagged_axis(pair) == (1 if layout == "2d-cols" else 0)
    with torch.no_grad():
        y = conv(x)
        fast, slow = _normals(pair, x, y), _unfolded(pair, x, y)
    for name in ("gram", "cross", "yy"):
        got, want = getattr(fast, name), getattr(slow, name)
        assert got.shape == want.shape
        assert torch.allclose(got, want, rtol=1e-9, atol=1e-9 * float(want.abs().max())), name


def test_batches_of_another_length_are_assembled_apart() -> None:
    """Correlations add up only over batches of one length (an image pyramid has several): a batch of another
    length assembles what was summed so far and starts anew, and the equations still equal the patches'."""
    torch.manual_seed(0)
    pair = SeparableConv.from_conv(nn.Conv1d(4, 3, 20, padding=5, bias=True), 2, "pw-dw")
    fast, slow = NormalEquations(), NormalEquations()
    with torch.no_grad():
        for length in (40, 40, 57, 40):
            x = torch.randn(2, 4, length)
            y = pair.conv_dw(pair.conv_pw(x)) + 0.1 * torch.randn(2, 3, length - 9)
            add_to_normals(fast, pair, x, y)
            slow.add(regression._dw_features(pair, x), regression._dw_targets(y))
    for name in ("gram", "cross", "yy"):
        got, want = getattr(fast, name), getattr(slow, name)
        assert torch.allclose(got, want, rtol=1e-9, atol=1e-9 * float(want.abs().max())), name


def test_short_kernels_keep_the_unfolded_patches() -> None:
    pair = SeparableConv.from_conv(nn.Conv2d(8, 8, 3), 2, "pw-dw")
    long_2d = SeparableConv.from_conv(nn.Conv2d(8, 8, (LAGGED_MIN_TAPS, 3)), 2, "pw-dw")
    assert regression._lagged_axis(pair) is None and regression._lagged_axis(long_2d) is None


def test_sequence_normals_scale_with_the_sequence_not_the_patches() -> None:
    """A kernel of 64 taps on 4096 samples: the patches would be 64x larger than the input; the correlations
    need the input's spectra and a few products at each end."""
    u = torch.randn(4, 2, 8, 4096, dtype=torch.float64)
    y = torch.randn(4, 2, 4096 - 63, dtype=torch.float64)
    gram, cross, yy = sequence_normals(u, y, kernel=64, stride=1, dilation=1)
    # Diagonal of the Gram: each channel's energy over its tap's window, exactly.
    k, a = 5, 17
    window = u[:, :, k, a : a + y.shape[-1]]
    assert torch.allclose(gram[:, k * 64 + a, k * 64 + a], window.square().sum((0, 2)), rtol=1e-10)
    assert torch.allclose(cross[:, k * 64 + a, 0], (window * y).sum((0, 2)), rtol=1e-9, atol=1e-9)
    assert torch.allclose(yy, y.square().sum((0, 2)))
