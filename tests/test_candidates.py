"""Eligibility: one test per skip reason, and pattern filters."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import sepify
from sepify import SkipReason
from sepify.graph.candidates import skip_reason_for


class _Sub(nn.Conv2d):
    """A subclass with its own forward is skipped: sepify cannot know what it changes."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x)


class _Named(nn.Conv2d):
    """A subclass that changes nothing its forward uses (as torchvision's Conv3DSimple) is a plain conv."""


@pytest.mark.parametrize(
    ("conv", "calls", "expected"),
    [
        (nn.Conv2d(8, 16, 3), 1, None),
        (nn.Conv2d(8, 16, 3, groups=2), 1, None),  # grouped convs factor group by group
        (nn.Conv2d(8, 16, 1), 1, SkipReason.POINTWISE),
        (nn.Conv2d(8, 8, 3, groups=8), 1, SkipReason.DEPTHWISE),
        (nn.Conv2d(8, 16, 3, groups=8), 1, SkipReason.DEPTHWISE),  # depth multiplier 2 is still depthwise
        (nn.Conv2d(1, 16, 3), 1, None),  # a filter bank on one channel factors into a few filters and a 1x1 mix
        (_Sub(8, 16, 3), 1, SkipReason.SUBCLASS),
        (_Named(8, 16, 3), 1, None),
        (nn.Conv2d(8, 16, 3), 0, SkipReason.NOT_CALLED),
        (nn.Conv2d(8, 16, 3), 3, None),
    ],
    ids=[
        "eligible",
        "grouped",
        "pointwise",
        "depthwise",
        "depthwise-x2",
        "single-in",
        "subclass",
        "subclass-inheriting-forward",
        "uncalled",
        "shared",
    ],
)
def test_skip_reason_for(conv: nn.Conv2d, calls: int, expected: SkipReason | None) -> None:
    assert skip_reason_for(conv, calls) == expected


def test_shared_is_skipped_only_on_request() -> None:
    assert skip_reason_for(nn.Conv2d(8, 16, 3), 2, skip_shared=True) == SkipReason.SHARED


def test_every_model_skip_reason_is_reported(skip_net: nn.Module) -> None:
    report = sepify.convert(
        skip_net, torch.randn(1, 1, 8, 8), rank="full", select=sepify.Selection(skip_shared=True)
    ).report
    reasons = {row.name: row.skip_reason for row in report.layers}
    assert reasons == {
        "gray": None,
        "widen": None,
        "shared": SkipReason.SHARED,
        "depthwise": SkipReason.DEPTHWISE,
        "pointwise": SkipReason.POINTWISE,
        "subclass": SkipReason.SUBCLASS,
        "unused": SkipReason.NOT_CALLED,
    }
    assert report.layer("shared").calls == 2
    assert report.layer("unused").output_size is None and report.layer("unused").macs_before == 0


def test_shared_conv_is_converted_at_every_call_site(skip_net: nn.Module) -> None:
    x = torch.randn(1, 1, 8, 8)
    result = sepify.convert(skip_net, x, rank="full")
    row = result.report.layer("shared")
    assert row.converted and row.calls == 2
    # MACs sum over both calls: 2 x (8x8 output x 8 x 8 x 9)
    assert row.macs_before == 2 * 64 * 8 * 8 * 9
    assert isinstance(result.model.get_submodule("shared"), sepify.SeparableConv2d)
    torch.testing.assert_close(result.model(x), skip_net(x), rtol=1e-4, atol=1e-5)


def test_include_and_exclude_globs(plain_net: nn.Module, example_input: torch.Tensor) -> None:
    report = sepify.convert(
        plain_net, example_input, select=sepify.Selection(include=["body.*"], exclude=["*.4"]), rank=1
    ).report
    status = {row.name: (row.converted, row.skip_reason) for row in report.layers}
    assert status["stem"] == (False, SkipReason.EXCLUDED)  # not included
    assert status["body.0"] == (True, None)
    assert status["body.4"] == (False, SkipReason.EXCLUDED)
    assert status["body.3"] == (False, SkipReason.POINTWISE)  # the structural reason wins
