"""timm models: tracing-state quirks (levit), untraceable blocks (mobilevit), untraceable roots (crossvit)."""

from __future__ import annotations

import pytest
import torch

import sepify

timm = pytest.importorskip("timm")


@pytest.mark.parametrize(
    ("name", "mode"),
    [("levit_128s", "fx"), ("mobilevit_xxs", "fx+leaves"), ("crossvit_tiny_240", "swap"), ("resnet18d", "fx")],
)
def test_timm_models_convert_exactly_at_full_rank(name: str, mode: str) -> None:
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).eval()
    size = model.pretrained_cfg["input_size"]
    x = torch.randn(1, *size)
    result = sepify.convert(model, x, rank="full")
    assert result.report.mode == mode
    assert len(result.report.converted) >= 1
    assert result.report.output_error is not None and result.report.output_error < 1e-4
    # the caller's model still traces and runs: sepify deep-copies before tracing
    with torch.no_grad():
        model(x)


def test_conv2d_same_subclass_is_reported() -> None:
    model = timm.create_model("tf_efficientnet_b0", pretrained=False).eval()
    with pytest.warns(sepify.SepifyWarning, match=r"no conv was converted \(64 pointwise, 12 depthwise, 5 subclass\)"):
        report = sepify.convert(model, torch.randn(1, 3, 64, 64)).report
    assert report.layer("conv_stem").skip_reason == sepify.SkipReason.SUBCLASS
