"""Calibration inputs from files: a folder of images, a .pt/.npy tensor, or random noise."""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from sepify.errors import CalibrationError, SepifyWarning

__all__ = ["load_calibration", "nonfinite_samples", "IMAGE_SUFFIXES", "IMAGENET_MEAN", "IMAGENET_STD"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def nonfinite_samples(data: Tensor) -> Tensor:
    """Per sample along dim 0: whether it holds a NaN or an infinity."""
    return ~torch.isfinite(data.reshape(data.shape[0], -1)).all(dim=1)


def _check_finite(source: str, data: Tensor) -> Tensor:
    """NaN or infinite samples would poison every statistic fitted on them: refuse them, saying where."""
    bad = nonfinite_samples(data) if data.is_floating_point() else None
    if bad is not None and bool(bad.any()):
        where = bad.nonzero().flatten()
        count = int((~torch.isfinite(data)).sum())
        raise CalibrationError(
            f"{source}: {count} value(s) are NaN or infinite, in {len(where)} of {data.shape[0]} samples (first: "
            f"sample {int(where[0])}); drop or clean those samples (with images: check that --std has no zeros)"
        )
    return data


def _check_shape(source: str, data: Tensor, sample_shape: Sequence[int] | None) -> Tensor:
    """Samples must have the input's rank and channel count (when it is known); spatial sizes may differ."""
    if data.dim() == 0 or data.shape[0] == 0:
        raise CalibrationError(f"{source}: holds no samples; pass at least one")
    if sample_shape is None:
        return data
    shape = tuple(data.shape[1:])
    if len(shape) != len(sample_shape) or (shape and sample_shape and shape[0] != sample_shape[0]):
        raise CalibrationError(
            f"{source}: samples are {'x'.join(map(str, shape))} but the model's input is "
            f"{'x'.join(map(str, sample_shape))} (from --input-shape); pass samples with that layout and channel count"
        )
    return data


def _load_images(
    folder: Path,
    sample_shape: Sequence[int],
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
    limit: int | None,
) -> Tensor:
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError as e:
        raise CalibrationError("reading an image folder needs Pillow; pip install pillow") from e
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise CalibrationError(f"{folder}: contains no images ({', '.join(IMAGE_SUFFIXES[:4])}, ...); add some")
    if len(sample_shape) != 3 or sample_shape[0] not in (1, 3):
        raise CalibrationError(
            f"{folder}: images need a model input of 1 or 3 channels x H x W, but --input-shape gives "
            f"{'x'.join(map(str, sample_shape))}"
        )
    channels, height, width = sample_shape
    mean = mean if mean is not None else (IMAGENET_MEAN if channels == 3 else (0.5,))
    std = std if std is not None else (IMAGENET_STD if channels == 3 else (0.5,))
    if len(mean) != channels or len(std) != channels:
        raise CalibrationError(f"--mean and --std need {channels} value(s) each for {channels}-channel images")
    if height < 1 or width < 1:
        raise CalibrationError(f"images cannot be resized to {height}x{width}; pass a positive --image-size H,W")
    if any(not math.isfinite(v) for v in mean):
        raise CalibrationError(f"--mean must be finite for every channel, got {list(mean)}")
    if any(not (v > 0 and v < float("inf")) for v in std):
        raise CalibrationError(f"--std must be positive and finite for every channel, got {list(std)}")
    tensors = []
    for path in files[:limit]:
        try:
            with Image.open(path) as img:
                img = img.convert("RGB" if channels == 3 else "L").resize((width, height), Image.Resampling.BILINEAR)
                data = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8)
        except (UnidentifiedImageError, OSError, Image.DecompressionBombError, ValueError) as e:
            raise CalibrationError(f"{path}: cannot be read as an image ({e}); remove or replace it") from e
        tensors.append(data.reshape(height, width, channels).permute(2, 0, 1).float() / 255.0)
    batch = torch.stack(tensors)
    return (batch - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)


def _load_npy(path: Path, samples: int | None) -> Tensor:
    """A numeric .npy array, read through a memory map so that only the samples used are read.

    The header is checked against the file's size first: a header that claims
    more data than the file holds is a truncated or forged file, not a reason
    to allocate it.
    """
    import numpy as np

    try:
        array = np.load(path, allow_pickle=False, mmap_mode="r")
    except (ValueError, OSError, EOFError) as e:
        raise CalibrationError(f"{path}: is not a readable .npy array ({e}); re-save it with numpy.save") from e
    if array.dtype.kind not in "biuf":
        raise CalibrationError(
            f"{path}: holds {array.dtype} values, not numbers; save a numeric array (e.g. float32) of samples"
        )
    if array.ndim == 0 or array.shape[0] == 0:
        raise CalibrationError(f"{path}: holds no samples; pass at least one")
    array = array[:samples] if samples is not None else array
    return torch.from_numpy(np.array(array, dtype=np.float32 if array.dtype.kind != "f" else array.dtype)).float()


def load_calibration(
    source: str | os.PathLike[str],
    sample_shape: Sequence[int] | None,
    *,
    samples: int | None = None,
    image_size: Sequence[int] | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    seed: int = 0,
) -> Tensor:
    """Load calibration samples ``(N, *sample_shape)``.

    Args:
        source: a folder of images (read with Pillow, resized to
            ``image_size`` or the input's H x W, scaled to [0, 1] and
            normalised with ``mean``/``std``: ImageNet's for RGB, 0.5/0.5 for
            grayscale), a ``.pt`` file holding a tensor (read with
            ``weights_only=True``), a ``.npy`` array (no pickle), or
            ``"random"`` (Gaussian noise, with a :class:`~sepify.errors.SepifyWarning`:
            fidelity on real inputs will be worse).
        sample_shape: one sample's shape, e.g. ``(3, 224, 224)`` (None: whatever a tensor file holds; images and
            ``"random"`` need it).
        samples: at most this many (default 256 for ``"random"``).
    """
    if str(source) == "random":
        warnings.warn(
            "calibrating on random noise; fidelity on real inputs will be worse than with real samples",
            SepifyWarning,
            stacklevel=2,
        )
        gen = torch.Generator().manual_seed(seed)
        if sample_shape is None:
            raise CalibrationError("'random' samples need the input's shape; pass --input-shape")
        return torch.randn((samples or 256, *sample_shape), generator=gen)
    path = Path(source)
    if not path.exists():
        raise CalibrationError(f"{path}: no such file or folder; pass an image folder, a .pt/.npy file or 'random'")
    if samples is not None and (isinstance(samples, bool) or not isinstance(samples, int) or samples < 1):
        raise CalibrationError(f"samples must be a positive integer, got {samples!r}")
    if path.is_dir():
        if sample_shape is None:
            raise CalibrationError(f"{path}: images are resized to the model's input; pass --input-shape")
        shape = list(sample_shape)
        if image_size is not None and len(shape) == 3:
            if len(image_size) != 2:
                raise CalibrationError(f"--image-size takes two numbers, H,W; got {list(image_size)}")
            shape[1:] = list(image_size)
        data = _load_images(path, shape, mean, std, samples)
        return _check_finite(str(path), _check_shape(str(path), data, sample_shape))
    suffix = path.suffix.lower()
    if suffix == ".npy":
        data = _load_npy(path, samples)
    elif suffix in (".pt", ".pth"):
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - unpickling refusals and corrupt files alike
            raise CalibrationError(
                f"{path}: cannot be read as a saved tensor ({type(e).__name__}); save one with torch.save(tensor)"
            ) from e
        if not isinstance(obj, Tensor):
            raise CalibrationError(f"{path}: holds a {type(obj).__name__}, not a tensor of samples")
        if obj.layout != torch.strided:
            raise CalibrationError(
                f"{path}: holds a sparse tensor ({obj.layout}); save dense samples (tensor.to_dense())"
            )
        if obj.is_complex() or obj.dtype == torch.bool:
            raise CalibrationError(f"{path}: holds {obj.dtype} values, not real numbers; save float samples")
        data = obj.float() if not obj.is_floating_point() else obj
    else:
        raise CalibrationError(
            f"{path}: unknown calibration file type; pass an image folder, a .pt/.npy file or 'random'"
        )
    data = data[:samples] if samples is not None else data
    return _check_finite(str(path), _check_shape(str(path), data, sample_shape))
