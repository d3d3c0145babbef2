"""Models from libraries nobody here wrote, with random weights from small configs (the ``thirdparty`` extra).

Slow-marked; CI installs the extra and runs them. Each model must be exact at
rank "full" (float32, relative error < 1e-5 on every output), run at rank 1
with unchanged output shapes and fewer MACs, and leave no conv behind but
1x1 and depthwise ones: nothing converts silently to nothing.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import sepify
from sepify.graph.probe import float_leaves

pytestmark = pytest.mark.slow

Built = tuple[nn.Module, tuple[Any, ...]]


def _hf(name: str) -> Built:
    t: Any = importlib.import_module("transformers")
    small = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 128}
    image = torch.randn(1, 3, 32, 32)
    if name == "vit":
        return t.ViTModel(t.ViTConfig(**small, image_size=32, patch_size=8)), (image,)
    if name == "clip-vision":
        return t.CLIPVisionModel(t.CLIPVisionConfig(**small, image_size=32, patch_size=8)), (image,)
    if name == "dinov2":
        return t.Dinov2Model(t.Dinov2Config(**small, image_size=32, patch_size=8)), (image,)
    if name == "wav2vec2":  # a Conv1d feature extractor and a weight-normed grouped positional conv
        config = t.Wav2Vec2Config(
            **small, conv_dim=(32,) * 7, num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4
        )
        return t.Wav2Vec2Model(config), (torch.randn(1, 4000),)
    if name == "whisper-encoder":
        config = t.WhisperConfig(
            d_model=64,
            encoder_layers=2,
            decoder_layers=2,
            encoder_attention_heads=2,
            decoder_attention_heads=2,
            encoder_ffn_dim=128,
            decoder_ffn_dim=128,
            num_mel_bins=16,
            max_source_positions=50,
        )
        return t.WhisperModel(config).encoder, (torch.randn(1, 16, 100),)
    if name == "resnet":
        return t.ResNetModel(t.ResNetConfig(embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1])), (
            torch.randn(1, 3, 64, 64),
        )
    if name == "convnext":
        return t.ConvNextModel(t.ConvNextConfig(hidden_sizes=[16, 32], depths=[1, 1], num_stages=2)), (
            torch.randn(1, 3, 64, 64),
        )
    config = t.SegformerConfig(
        hidden_sizes=[16, 32, 32, 64], depths=[1, 1, 1, 1], num_attention_heads=[1, 1, 2, 2], decoder_hidden_size=32
    )
    return t.SegformerForSemanticSegmentation(config), (torch.randn(1, 3, 64, 64),)


def _diffusers(name: str) -> Built:
    d: Any = importlib.import_module("diffusers")
    image = torch.randn(1, 3, 32, 32)
    if name == "unet2d":
        model = d.UNet2DModel(
            sample_size=32,
            block_out_channels=(16, 32),
            down_block_types=("DownBlock2D", "AttnDownBlock2D"),
            up_block_types=("AttnUpBlock2D", "UpBlock2D"),
            layers_per_block=1,
            norm_num_groups=8,
            attention_head_dim=8,
        )
        return model, (image, torch.tensor([10]))
    model = d.AutoencoderKL(
        block_out_channels=(16, 32),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=8,
        latent_channels=4,
    )
    return model, (image,)


def _monai(name: str) -> Built:
    nets: Any = importlib.import_module("monai.networks.nets")
    if name == "unet3d":  # Conv3d down, ConvTranspose3d up
        model = nets.UNet(
            spatial_dims=3, in_channels=1, out_channels=2, channels=(8, 16, 32), strides=(2, 2), num_res_units=1
        )
        return model, (torch.randn(1, 1, 16, 16, 16),)
    if name == "segresnet3d":
        model = nets.SegResNet(
            spatial_dims=3, init_filters=8, in_channels=1, out_channels=2, blocks_down=(1, 1), blocks_up=(1,)
        )
        return model, (torch.randn(1, 1, 16, 16, 16),)
    if name == "unet2d":
        model = nets.UNet(spatial_dims=2, in_channels=1, out_channels=2, channels=(8, 16, 32), strides=(2, 2))
        return model, (torch.randn(1, 1, 32, 32),)
    model = nets.BasicUNet(spatial_dims=1, in_channels=1, out_channels=2, features=(8, 8, 16, 16, 32, 8))
    return model, (torch.randn(1, 1, 64),)


def _smp(name: str) -> Built:
    smp: Any = importlib.import_module("segmentation_models_pytorch")
    cls = {"unet": smp.Unet, "fpn": smp.FPN, "deeplabv3plus": smp.DeepLabV3Plus, "unetplusplus": smp.UnetPlusPlus}
    return cls[name]("resnet18", encoder_weights=None, classes=2), (torch.randn(1, 3, 64, 64),)


def _torchaudio(name: str) -> Built:
    models: Any = importlib.import_module("torchaudio.models")
    if name == "conv_tasnet":  # Conv1d encoder, ConvTranspose1d decoder
        model = models.ConvTasNet(
            num_sources=2,
            enc_kernel_size=16,
            enc_num_feats=32,
            msk_kernel_size=3,
            msk_num_feats=16,
            msk_num_hidden_feats=32,
            msk_num_layers=2,
            msk_num_stacks=1,
        )
        return model, (torch.randn(1, 1, 800),)
    model = models.wav2vec2_model(
        extractor_mode="group_norm",
        extractor_conv_layer_config=[(32, 10, 5), (32, 3, 2), (32, 2, 2)],
        extractor_conv_bias=False,
        encoder_embed_dim=64,
        encoder_projection_dropout=0.0,
        encoder_pos_conv_kernel=16,
        encoder_pos_conv_groups=4,
        encoder_num_layers=2,
        encoder_num_heads=2,
        encoder_attention_dropout=0.0,
        encoder_ff_interm_features=128,
        encoder_ff_interm_dropout=0.0,
        encoder_dropout=0.0,
        encoder_layer_norm_first=False,
        encoder_layer_drop=0.0,
        aux_num_out=None,
    )
    return model, (torch.randn(1, 4000),)


# (library to import, builder, model name, the conv kinds it has)
MODELS: list[tuple[str, Callable[[str], Built], str, set[str]]] = [
    *[
        ("transformers", _hf, n, {"conv2d"})
        for n in ("vit", "clip-vision", "dinov2", "resnet", "convnext", "segformer")
    ],
    *[("transformers", _hf, n, {"conv1d"}) for n in ("wav2vec2", "whisper-encoder")],
    *[("diffusers", _diffusers, n, {"conv2d"}) for n in ("unet2d", "autoencoder-kl")],
    ("monai", _monai, "unet3d", {"conv3d", "conv_transpose3d"}),
    ("monai", _monai, "segresnet3d", {"conv3d"}),
    ("monai", _monai, "unet2d", {"conv2d", "conv_transpose2d"}),
    ("monai", _monai, "basicunet1d", {"conv1d", "conv_transpose1d"}),
    *[("segmentation_models_pytorch", _smp, n, {"conv2d"}) for n in ("unet", "fpn", "deeplabv3plus", "unetplusplus")],
    ("torchaudio", _torchaudio, "conv_tasnet", {"conv1d", "conv_transpose1d"}),
    ("torchaudio", _torchaudio, "wav2vec2", {"conv1d"}),
]


def _relative_errors(got: Any, expected: Any) -> list[float]:
    pairs = zip(float_leaves(got), float_leaves(expected), strict=True)
    return [float((a - b).norm() / b.norm()) for a, b in pairs if float(b.norm()) > 0]


@pytest.mark.parametrize(("library", "build", "name", "kinds"), MODELS, ids=[f"{m[0]}-{m[2]}" for m in MODELS])
def test_third_party_model(library: str, build: Callable[[str], Built], name: str, kinds: set[str]) -> None:
    pytest.importorskip(library)
    torch.manual_seed(0)
    model, args = build(name)
    model.eval()
    result = sepify.convert(model, args, rank="full")
    report = result.report
    assert {row.kind for row in report.layers} == kinds
    assert report.converted, report.skip_summary()
    assert {str(row.skip_reason) for row in report.skipped} <= {"pointwise", "depthwise"}, report.skip_summary()
    with torch.no_grad():
        expected = model(*args)
        errors = _relative_errors(result.model(*args), expected)
    assert errors and max(errors) < 1e-5
    slim = sepify.convert(model, args, rank=1)
    assert slim.report.macs_after < slim.report.macs_before
    with torch.no_grad():
        shapes = [tuple(t.shape) for t in float_leaves(slim.model(*args))]
    assert shapes == [tuple(t.shape) for t in float_leaves(expected)]
