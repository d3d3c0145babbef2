"""A converted model works wherever the original did: each library's own calls, on the converted model (slow).

For each library, a small random-weight model is converted at rank "full" and then run the way its users run
it: attributes of the output objects, ``return_dict=False``, ``output_hidden_states=True``, the library's own
methods (``forward_features``, ``encode``/``decode``, ``predict``, ``fuse``), and compared with the original
(relative error < 1e-5 on every tensor, same output classes). At rank 1 the same calls must run and give outputs of
the same classes and shapes. Needs the ``thirdparty`` extra (CI installs it).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils import _pytree as pytree

import sepify

pytestmark = pytest.mark.slow

Calls = Callable[[nn.Module], dict[str, Any]]  # the library's own calls on a model, by name


@dataclass(frozen=True)
class Case:
    library: str
    name: str
    build: Callable[[], tuple[nn.Module, tuple[Any, ...]]]  # the model, and the example inputs to convert with
    calls: Calls


def _leaves(value: Any) -> list[torch.Tensor]:
    """Every tensor in ``value`` as float64 (integer and boolean ones too: labels, masks)."""
    if hasattr(value, "to_tuple"):  # a transformers/diffusers ModelOutput
        value = value.to_tuple()
    elif hasattr(value, "__dataclass_fields__"):  # diffusers' DecoderOutput-like dataclasses
        value = [getattr(value, f) for f in value.__dataclass_fields__]
    return [t.double() for t in pytree.tree_leaves(value) if isinstance(t, torch.Tensor)]


def _classes(value: Any) -> Any:
    """The structure of ``value``'s containers: what user code indexes and reads attributes of."""
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, [_classes(v) for v in value])
    if isinstance(value, dict):
        return (type(value).__name__, {k: _classes(v) for k, v in value.items()})
    return type(value).__name__


# -- transformers ------------------------------------------------------------------------------------------------


def _transformers() -> Any:
    return importlib.import_module("transformers")


def _hf_image(cls: str, config: str, size: int = 64, **kwargs: Any) -> Callable[[], tuple[nn.Module, tuple]]:
    def build() -> tuple[nn.Module, tuple[Any, ...]]:
        t = _transformers()
        return getattr(t, cls)(getattr(t, config)(**kwargs)), (torch.randn(1, 3, size, size),)

    return build


def _hf_calls(model: nn.Module, *inputs: Any) -> dict[str, Any]:
    """What Hugging Face users do with a model's outputs."""
    out = model(*inputs)
    calls: dict[str, Any] = {"output": out, "tuple": model(*inputs, return_dict=False)}
    first = next(iter(out.keys()))
    calls[f"attribute .{first}"] = getattr(out, first)
    calls["index [0]"] = out[0]
    hidden = model(*inputs, output_hidden_states=True)
    calls["hidden_states"] = hidden.hidden_states
    assert hidden.hidden_states is not None and len(hidden.hidden_states) > 1  # asked for, so returned
    calls["config"] = model.config.to_dict()["model_type"]
    calls["dtype"] = str(model.dtype)
    return calls


def _hf_image_calls(model: nn.Module) -> dict[str, Any]:
    return _hf_calls(model, torch.linspace(-1, 1, 3 * 64 * 64).reshape(1, 3, 64, 64))


def _save_pretrained(model: nn.Module, tmp: Path) -> list[str]:
    model.save_pretrained(tmp)
    return sorted(p.name for p in tmp.iterdir())


def _canine() -> tuple[nn.Module, tuple[Any, ...]]:
    t = _transformers()
    config = t.CanineConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, num_hash_buckets=64,
        num_hash_functions=2, local_transformer_stride=8, downsampling_rate=4, upsampling_kernel_size=4,
    )  # fmt: skip
    return t.CanineModel(config), (torch.randint(0, 1000, (1, 32)),)


def _wav2vec2() -> tuple[nn.Module, tuple[Any, ...]]:
    t = _transformers()
    config = t.Wav2Vec2Config(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, conv_dim=(16,) * 7,
        num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4,
    )  # fmt: skip
    return t.Wav2Vec2Model(config), (torch.randn(1, 4000),)


# -- diffusers ---------------------------------------------------------------------------------------------------


def _diffusers() -> Any:
    return importlib.import_module("diffusers")


_BLOCKS = {"block_out_channels": (16, 32), "norm_num_groups": 8}


def _unet2d() -> tuple[nn.Module, tuple[Any, ...]]:
    model = _diffusers().UNet2DModel(
        sample_size=16, layers_per_block=1, attention_head_dim=8, **_BLOCKS,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    )  # fmt: skip
    return model, (torch.randn(1, 3, 16, 16), torch.tensor([10]))


def _unet2d_calls(model: nn.Module) -> dict[str, Any]:
    x, t = torch.linspace(-1, 1, 3 * 16 * 16).reshape(1, 3, 16, 16), torch.tensor([7])
    return {".sample": model(x, t).sample, "tuple": model(x, t, return_dict=False), "dtype": str(model.dtype)}


def _vae() -> tuple[nn.Module, tuple[Any, ...]]:
    model = _diffusers().AutoencoderKL(
        **_BLOCKS, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
    )  # fmt: skip
    return model, (torch.randn(1, 3, 16, 16),)


def _vae_calls(model: nn.Module) -> dict[str, Any]:
    x = torch.linspace(-1, 1, 3 * 16 * 16).reshape(1, 3, 16, 16)
    posterior = model.encode(x).latent_dist
    z = posterior.mean
    return {
        "encode().latent_dist.mean": z,
        "latent_dist.std": posterior.std,
        "decode(z).sample": model.decode(z).sample,
        "forward .sample": model(x, sample_posterior=False).sample,
    }


def _controlnet() -> tuple[nn.Module, tuple[Any, ...]]:
    model = _diffusers().ControlNetModel(
        **_BLOCKS, in_channels=4, layers_per_block=1, cross_attention_dim=16, attention_head_dim=4,
        conditioning_embedding_out_channels=(8, 16), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    )  # fmt: skip
    args = (torch.randn(1, 4, 16, 16), torch.tensor([10]), torch.randn(1, 4, 16), torch.randn(1, 3, 32, 32))
    return model, args


def _controlnet_calls(model: nn.Module) -> dict[str, Any]:
    torch.manual_seed(1)
    x, t, text, cond = torch.randn(1, 4, 16, 16), torch.tensor([3]), torch.randn(1, 4, 16), torch.randn(1, 3, 32, 32)
    out = model(x, t, encoder_hidden_states=text, controlnet_cond=cond)
    return {
        "down_block_res_samples": out.down_block_res_samples,
        "mid_block_res_sample": out.mid_block_res_sample,
        "conditioning_scale=0.5": model(x, t, text, cond, conditioning_scale=0.5, return_dict=False),
    }


def _vq() -> tuple[nn.Module, tuple[Any, ...]]:
    model = _diffusers().VQModel(
        **_BLOCKS, latent_channels=4, num_vq_embeddings=32,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
    )  # fmt: skip
    return model, (torch.randn(1, 3, 16, 16),)


def _vq_calls(model: nn.Module) -> dict[str, Any]:
    x = torch.linspace(-1, 1, 3 * 16 * 16).reshape(1, 3, 16, 16)
    latents = model.encode(x).latents
    return {"encode().latents": latents, "decode().sample": model.decode(latents).sample}


def _tiny_vae() -> tuple[nn.Module, tuple[Any, ...]]:
    model = _diffusers().AutoencoderTiny(
        encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8), num_encoder_blocks=(1, 1),
        num_decoder_blocks=(1, 1), latent_channels=4,
    )  # fmt: skip
    return model, (torch.randn(1, 3, 16, 16),)


def _tiny_vae_calls(model: nn.Module) -> dict[str, Any]:
    x = torch.linspace(-1, 1, 3 * 16 * 16).reshape(1, 3, 16, 16)
    latents = model.encode(x).latents
    return {"encode().latents": latents, "decode().sample": model.decode(latents).sample}


def _unet1d() -> tuple[nn.Module, tuple[Any, ...]]:  # diffusers' own test configuration
    model = _diffusers().UNet1DModel(
        block_out_channels=(8, 8, 16, 16), in_channels=14, out_channels=14, time_embedding_type="positional",
        use_timestep_embedding=True, flip_sin_to_cos=False, freq_shift=1.0, out_block_type="OutConv1DBlock",
        mid_block_type="MidResTemporalBlock1D", down_block_types=("DownResnetBlock1D",) * 4,
        up_block_types=("UpResnetBlock1D",) * 3, act_fn="swish",
    )  # fmt: skip
    return model, (torch.randn(1, 14, 16), torch.tensor([10]))


def _unet1d_calls(model: nn.Module) -> dict[str, Any]:
    x, t = torch.linspace(-1, 1, 14 * 16).reshape(1, 14, 16), torch.tensor([5])
    return {".sample": model(x, t).sample, "tuple": model(x, t, return_dict=False)}


# -- ultralytics, timm, torchvision, smp, monai, open_clip -------------------------------------------------------


_IMAGE = (np.random.default_rng(0).random((96, 128, 3)) * 255).astype(np.uint8)


def _yolo(config: str) -> Callable[[], tuple[nn.Module, tuple[Any, ...]]]:
    def build() -> tuple[nn.Module, tuple[Any, ...]]:
        yolo = importlib.import_module("ultralytics").YOLO(config)
        return yolo.model, (torch.rand(1, 3, 64, 64),)

    return build


def _yolo_calls(config: str) -> Calls:
    """Put the network back into a YOLO object and predict: ultralytics fuses BatchNorm into the convs first.

    Random weights score every anchor alike, so no threshold or suppression is left to pick among near-ties
    (conf 0, IoU 1: one box per anchor); the boxes are compared in the order of their coordinates.
    """

    def calls(model: nn.Module) -> dict[str, Any]:
        import copy

        yolo = importlib.import_module("ultralytics").YOLO(config)
        yolo.model = copy.deepcopy(model)
        (result,) = yolo.predict(_IMAGE, imgsz=64, conf=0.0, iou=1.0, max_det=1000, verbose=False)
        order = np.lexsort(result.boxes.data.numpy().T[::-1])
        found = {"boxes.data": result.boxes.data[order]}
        if result.masks is not None:
            found["masks.data"] = result.masks.data[order]
        return found

    return calls


def _timm(name: str) -> Callable[[], tuple[nn.Module, tuple[Any, ...]]]:
    def build() -> tuple[nn.Module, tuple[Any, ...]]:
        return importlib.import_module("timm").create_model(name, num_classes=10), (torch.randn(1, 3, 64, 64),)

    return build


def _timm_calls(model: nn.Module) -> dict[str, Any]:
    x = torch.linspace(-1, 1, 3 * 64 * 64).reshape(1, 3, 64, 64)
    features = model.forward_features(x)
    calls = {
        "forward_features": features,
        "forward_head(pre_logits=True)": model.forward_head(features, pre_logits=True),
        "default_cfg": model.default_cfg["architecture"],
        "feature_info": [f["num_chs"] for f in model.feature_info],
    }
    model.reset_classifier(3)
    calls["reset_classifier(3) then forward"] = model(x).shape
    return calls


def _fasterrcnn() -> tuple[nn.Module, tuple[Any, ...]]:
    detection = importlib.import_module("torchvision.models.detection")
    model = detection.fasterrcnn_mobilenet_v3_large_fpn(weights=None, weights_backbone=None, num_classes=3)
    model.roi_heads.score_thresh = 0.0  # random weights: keep every box, so that there are boxes to compare
    return model, ([torch.rand(3, 96, 128)],)


def _detection_calls(model: nn.Module) -> dict[str, Any]:
    torch.manual_seed(0)
    (found,) = model([torch.rand(3, 96, 128)])
    return {"list of dicts": {k: v[:10] for k, v in found.items()}}


def _smp(encoder: str) -> Callable[[], tuple[nn.Module, tuple[Any, ...]]]:
    def build() -> tuple[nn.Module, tuple[Any, ...]]:
        smp = importlib.import_module("segmentation_models_pytorch")
        return smp.Unet(encoder, encoder_weights=None, classes=2), (torch.randn(1, 3, 64, 64),)

    return build


def _smp_calls(model: nn.Module) -> dict[str, Any]:
    x = torch.linspace(-1, 1, 3 * 64 * 64).reshape(1, 3, 64, 64)
    return {"predict": model.predict(x), "encoder features": model.encoder(x)}


def _monai() -> tuple[nn.Module, tuple[Any, ...]]:
    nets = importlib.import_module("monai.networks.nets")
    return nets.UNet(spatial_dims=2, in_channels=1, out_channels=2, channels=(8, 16), strides=(2,)), (
        torch.randn(1, 1, 32, 32),
    )


def _monai_calls(model: nn.Module) -> dict[str, Any]:
    inferers = importlib.import_module("monai.inferers")
    x = torch.linspace(-1, 1, 48 * 48).reshape(1, 1, 48, 48)
    return {"sliding_window_inference": inferers.sliding_window_inference(x, (32, 32), 2, model)}


def _open_clip() -> tuple[nn.Module, tuple[Any, ...]]:
    open_clip = importlib.import_module("open_clip")
    model = open_clip.CLIP(
        embed_dim=32,
        vision_cfg={"layers": [1, 1, 1, 1], "width": 16, "image_size": 64, "head_width": 16},
        text_cfg={"context_length": 16, "vocab_size": 100, "width": 32, "heads": 2, "layers": 1},
    )
    return model, (torch.randn(1, 3, 64, 64), torch.randint(0, 100, (1, 16)))


def _open_clip_calls(model: nn.Module) -> dict[str, Any]:
    image, text = torch.linspace(-1, 1, 3 * 64 * 64).reshape(1, 3, 64, 64), torch.arange(16)[None] % 100
    return {
        "encode_image(normalize=True)": model.encode_image(image, normalize=True),
        "encode_text": model.encode_text(text),
        "forward": model(image, text),
    }


CASES = [
    Case("transformers", "resnet", _hf_image("ResNetModel", "ResNetConfig", embedding_size=16,
                                             hidden_sizes=[16, 32], depths=[1, 1]), _hf_image_calls),
    Case("transformers", "mobilevit", _hf_image("MobileViTForImageClassification", "MobileViTConfig",
                                                image_size=64, hidden_sizes=[16, 16, 16],
                                                neck_hidden_sizes=[8, 8, 16, 16, 16, 16, 32]), _hf_image_calls),
    Case("transformers", "mobilenet_v2", _hf_image("MobileNetV2ForImageClassification", "MobileNetV2Config",
                                                   image_size=64, depth_multiplier=0.25), _hf_image_calls),
    Case("transformers", "efficientnet", _hf_image("EfficientNetForImageClassification", "EfficientNetConfig",
                                                   image_size=64, width_coefficient=0.1, depth_coefficient=0.1,
                                                   hidden_dim=128), _hf_image_calls),
    Case("transformers", "data2vec-vision", _hf_image("Data2VecVisionModel", "Data2VecVisionConfig", image_size=64,
                                                      patch_size=16, hidden_size=32, num_hidden_layers=1,
                                                      num_attention_heads=2, intermediate_size=64),
         _hf_image_calls),
    Case("transformers", "wav2vec2", _wav2vec2, lambda m: _hf_calls(m, torch.linspace(-1, 1, 4000)[None])),
    Case("transformers", "canine", _canine, lambda m: _hf_calls(m, torch.arange(32)[None] * 7 % 1000)),
    Case("diffusers", "unet2d", _unet2d, _unet2d_calls),
    Case("diffusers", "autoencoder-kl", _vae, _vae_calls),
    Case("diffusers", "vq", _vq, _vq_calls),
    Case("diffusers", "controlnet", _controlnet, _controlnet_calls),
    Case("diffusers", "unet1d", _unet1d, _unet1d_calls),
    Case("diffusers", "autoencoder-tiny", _tiny_vae, _tiny_vae_calls),
    Case("ultralytics", "yolov8n", _yolo("yolov8n.yaml"), _yolo_calls("yolov8n.yaml")),
    Case("ultralytics", "yolov8n-seg", _yolo("yolov8n-seg.yaml"), _yolo_calls("yolov8n-seg.yaml")),
    Case("timm", "resnet18", _timm("resnet18"), _timm_calls),
    Case("timm", "convnext_atto", _timm("convnext_atto"), _timm_calls),
    Case("timm", "efficientnet_b0", _timm("efficientnet_b0"), _timm_calls),
    Case("torchvision", "fasterrcnn", _fasterrcnn, _detection_calls),
    Case("segmentation_models_pytorch", "unet-resnet18", _smp("resnet18"), _smp_calls),
    Case("segmentation_models_pytorch", "unet-efficientnet-b0", _smp("efficientnet-b0"), _smp_calls),
    Case("monai", "unet", _monai, _monai_calls),
    Case("open_clip", "clip-rn", _open_clip, _open_clip_calls),
]  # fmt: skip


def _run(calls: Calls, model: nn.Module) -> dict[str, Any]:
    with torch.no_grad():
        return calls(model)


@pytest.mark.parametrize("case", CASES, ids=[f"{c.library}-{c.name}" for c in CASES])
def test_the_librarys_own_calls_work_on_the_converted_model(case: Case, tmp_path: Path) -> None:
    pytest.importorskip(case.library)
    torch.manual_seed(0)
    model, args = case.build()
    model.eval()
    result = sepify.convert(model, args, rank="full")
    assert result.report.converted, result.report.skip_summary()
    assert type(result.model) is type(model)  # the same class, with its methods
    expected, got = _run(case.calls, model), _run(case.calls, result.model)
    assert list(got) == list(expected)
    for call in expected:
        assert _classes(got[call]) == _classes(expected[call]), call
        want, have = _leaves(expected[call]), _leaves(got[call])
        assert len(have) == len(want), call
        for a, b in zip(have, want):
            scale = float(b.norm()) or 1.0
            assert float((a - b).norm()) / scale < 1e-5, call
        if not want:
            assert got[call] == expected[call], call
    if hasattr(model, "save_pretrained"):
        assert _save_pretrained(result.model, tmp_path / "slim") == _save_pretrained(model, tmp_path / "original")
    slim = sepify.convert(model, args, rank=1)
    assert slim.report.macs_after < slim.report.macs_before
    at_rank1 = _run(case.calls, slim.model)
    for call in expected:
        assert _classes(at_rank1[call]) == _classes(expected[call]), call
        assert [t.shape for t in _leaves(at_rank1[call])] == [t.shape for t in _leaves(expected[call])], call
