"""Real architectures: torchvision's zoo with random weights.

The full sweep over every classification model is marked ``slow`` (CI runs
it; ``-m "not slow"`` skips it locally).
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch import nn

import sepify
from sepify.core.functional import CONV_TYPES
from sepify.graph.probe import float_leaves

torchvision = pytest.importorskip("torchvision")

CLASSIFIERS = torchvision.models.list_models(module=torchvision.models)
# resnet18 runs by default; the others with the slow sweep
REPRESENTATIVE = ["resnet18"] + [
    pytest.param(name, marks=pytest.mark.slow)
    for name in (
        "vgg11",
        "densenet121",
        "googlenet",
        "inception_v3",
        "efficientnet_b0",
        "regnet_x_400mf",
        "convnext_tiny",
        "mobilenet_v3_small",
        "shufflenet_v2_x1_0",
    )
]


def build(name: str) -> tuple[nn.Module, torch.Tensor]:
    """A random-weight model in eval mode and the smallest input it accepts comfortably."""
    kwargs: dict[str, Any] = {}
    size = 64
    if name.startswith("vit_"):
        size = 28 if "_14" in name else 32
        kwargs["image_size"] = size
    elif name in ("inception_v3", "googlenet"):
        kwargs.update(aux_logits=False, init_weights=False)
        size = 80 if name == "inception_v3" else 64
    elif name.startswith("maxvit"):
        size = 224  # its attention partitions are sized for 224x224
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None, **kwargs).eval()
    return model, torch.randn(1, 3, size, size)


def assert_every_eligible_conv_reached(model: nn.Module, report: sepify.ConversionReport) -> None:
    """No standard, called, separable conv (of any kind) is left in the converted model."""
    inside_pairs = {id(c) for m in model.modules() if isinstance(m, sepify.SeparableConv) for c in m.children()}
    left = {row.name for row in report.skipped if row.skip_reason in (sepify.SkipReason.NOT_CALLED,)}
    for name, m in model.named_modules():
        if type(m) not in CONV_TYPES or id(m) in inside_pairs or name in left:
            continue
        separable = math.prod(m.kernel_size) > 1 and m.in_channels > 1 and m.groups != m.in_channels
        assert not separable, f"{name} was not converted"
    pairs = sum(isinstance(m, sepify.SeparableConv) for m in model.modules())
    assert pairs == len(report.converted)


@pytest.mark.slow
@pytest.mark.parametrize("name", CLASSIFIERS)
def test_every_classifier_converts_at_rank_1(name: str) -> None:
    model, x = build(name)
    result = sepify.convert(model, x, rank=1)
    with torch.no_grad():
        y, y_conv = model(x), result.model(x)
    assert y_conv.shape == y.shape
    assert torch.isfinite(y_conv).all()
    assert result.report.macs_after < result.report.macs_before
    assert_every_eligible_conv_reached(result.model, result.report)


@pytest.mark.parametrize("name", REPRESENTATIVE)
def test_full_rank_reproduces_representative_models(name: str) -> None:
    model, x = build(name)
    model = model.double()
    x = x.double()
    result = sepify.convert(model, x, rank="full", order="auto")
    assert result.report.mode == "fx"
    assert len(result.report.converted) > 0
    with torch.no_grad():
        torch.testing.assert_close(result.model(x), model(x), rtol=1e-8, atol=1e-9)
    assert result.report.output_error is not None and result.report.output_error < 1e-9
    assert result.report.top1_agreement == 1.0


def test_detection_model_converts_through_the_fallback() -> None:
    torch.manual_seed(0)
    model = torchvision.models.detection.fasterrcnn_mobilenet_v3_large_320_fpn(
        weights=None, weights_backbone=None, min_size=128, max_size=128
    ).eval()
    images = [torch.rand(3, 128, 128)]
    result = sepify.convert(model, (images,), rank="full")
    report = result.report
    assert report.mode == "swap" and "Proxy object cannot be iterated" in (report.trace_error or "")
    # the RPN head conv runs once per pyramid level (two backbone levels and
    # the extra max-pool level) and is converted once
    assert report.layer("rpn.head.conv.0.0").converted and report.layer("rpn.head.conv.0.0").calls == 3
    assert_every_eligible_conv_reached(result.model, report)
    with torch.no_grad():
        (got,), (want,) = result.model(images), model(images)
    assert set(got) == {"boxes", "labels", "scores"}
    assert got["boxes"].shape[1] == 4 and got["scores"].shape == got["labels"].shape
    # exact at full rank: the backbone features agree, so do the detections
    torch.testing.assert_close(got["scores"], want["scores"], rtol=1e-3, atol=1e-4)


VIDEO_INPUTS = {"s3d": (16, 224), "mvit_v1_b": (16, 224), "mvit_v2_s": (16, 224), "swin3d_t": (4, 64)}


@pytest.mark.slow
@pytest.mark.parametrize("name", torchvision.models.list_models(module=torchvision.models.video))
def test_every_video_model_is_exact_at_full_rank_and_runs_at_rank_1(name: str) -> None:
    frames, size = VIDEO_INPUTS.get(name, VIDEO_INPUTS["swin3d_t"] if name.startswith("swin3d") else (4, 32))
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None, num_classes=10).eval().double()
    x = torch.randn(1, 3, frames, size, size, dtype=torch.float64)
    result = sepify.convert(model, x, rank="full")
    report = result.report
    assert report.mode == "fx" and len(report.converted) >= 1
    assert {r.kind for r in report.layers} == {"conv3d"}
    # what is left is 1x1x1 or depthwise, never an unknown class
    assert {str(r.skip_reason) for r in report.skipped} <= {"pointwise", "depthwise"}
    with torch.no_grad():
        y, expected = result.model(x), model(x)
    assert float((y - expected).norm() / expected.norm()) < 1e-10
    slim = sepify.convert(model, x, rank=1)
    assert slim.report.macs_after < slim.report.macs_before
    with torch.no_grad():
        assert slim.model(x).shape == expected.shape


@pytest.mark.slow
@pytest.mark.parametrize("name", torchvision.models.list_models(module=torchvision.models.segmentation))
def test_every_segmentation_model_is_exact_at_full_rank(name: str) -> None:
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None, weights_backbone=None, num_classes=5, aux_loss=False)
    model.eval()
    x = torch.randn(1, 3, 64, 64)
    result = sepify.convert(model, x, rank="full")
    assert result.report.mode == "fx"
    assert_every_eligible_conv_reached(result.model, result.report)
    with torch.no_grad():
        got, expected = result.model(x)["out"], model(x)["out"]
    assert float((got - expected).norm() / expected.norm()) < 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("name", torchvision.models.list_models(module=torchvision.models.detection))
def test_every_detection_model_converts_every_conv_it_can(name: str) -> None:
    torch.manual_seed(0)
    sizes = {} if name.startswith("ssd") else {"min_size": 128, "max_size": 128}
    model = torchvision.models.get_model(name, weights=None, weights_backbone=None, num_classes=5, **sizes).eval()
    images = [torch.rand(3, 128, 128)]
    result = sepify.convert(model, (images,), rank="full")
    report = result.report
    assert_every_eligible_conv_reached(result.model, report)
    if name.startswith(("maskrcnn", "keypointrcnn")):  # their heads upsample with a ConvTranspose2d
        assert any(r.kind == "conv_transpose2d" and r.converted for r in report.layers)
    with torch.no_grad():
        (got,), (expected,) = result.model(images), model(images)
    assert {k: v.shape for k, v in got.items()} == {k: v.shape for k, v in expected.items()}
    assert all(bool(torch.isfinite(t).all()) for t in float_leaves(got))
