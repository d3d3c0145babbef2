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


@pytest.mark.parametrize(
    ("name", "kind", "converted"),
    [
        ("tf_efficientnet_b0", "timm.layers.conv2d_same.Conv2dSame", 1),  # dynamic TF "SAME" padding
        ("nfnet_l0", "timm.layers.std_conv.ScaledStdConv2d", 28),  # weight standardisation
        pytest.param("dm_nfnet_f0", "timm.layers.std_conv.ScaledStdConv2dSame", 28, marks=pytest.mark.slow),
    ],
)
def test_timm_conv_subclasses_convert_exactly(name: str, kind: str, converted: int) -> None:
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).eval()
    x = torch.randn(1, 3, 65, 63)  # odd sizes: the dynamic padding is asymmetric
    result = sepify.convert(model, x, rank="full")
    assert len(result.report.converted) == converted
    assert result.report.output_error is not None and result.report.output_error < 1e-5
    assert any(kind in note and "converted from what their forward computes" in note for note in result.report.notes)
    slim = sepify.convert(model, x, rank=1).model
    with torch.no_grad():
        assert slim(x).shape == model(x).shape


def test_unknown_conv_subclasses_are_named() -> None:
    class Mystery(torch.nn.Conv2d):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x).tanh()

    net = torch.nn.Sequential(Mystery(3, 8, 3), torch.nn.Conv2d(8, 8, 3)).eval()
    report = sepify.convert(net, torch.randn(1, 3, 16, 16), rank=1).report
    assert report.layer("0").skip_reason == sepify.SkipReason.SUBCLASS
    name = f"{Mystery.__module__}.{Mystery.__qualname__}"
    assert report.notes[0] == (
        f"left 1 conv(s) of conv subclasses sepify does not know alone: {name} (1); if such a forward is a plain "
        "conv of an effective weight, teach it with sepify.register_conv"
    )


def test_traced_through_modules_keep_every_state_dict_key(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """timm's BatchNormAct2d is traced through; its unused num_batches_tracked must survive for safetensors."""
    pytest.importorskip("safetensors")
    from sepify.io.save import save_model

    torch.manual_seed(0)
    model = timm.create_model("tf_efficientnet_b0", pretrained=False).eval()
    x = torch.randn(1, 3, 65, 63)
    result = sepify.convert(model, x, rank=1)
    kept = {k for k in model.state_dict() if not k.startswith("conv_stem.")}  # the one converted conv
    assert kept <= set(result.model.state_dict())
    path = tmp_path / "m.safetensors"
    save_model(result.model, path, "safetensors", example_args=(x,), plan_json=result.report.to_plan().to_json())
    back = sepify.load_converted(timm.create_model("tf_efficientnet_b0", pretrained=False).eval(), path)
    torch.testing.assert_close(back(x), result.model(x), rtol=1e-5, atol=1e-5)
