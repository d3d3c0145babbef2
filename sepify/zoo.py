"""Small real models for examples, tests and benchmarks, trained here in seconds.

``digits_cnn()`` is a CNN trained on scikit-learn's bundled handwritten
digits (8x8 scans upsampled to 16x16; 1797 images, no download), reaching
about 99% test accuracy: a real trained model whose accuracy shows what a
conversion keeps. Needs scikit-learn (``pip install scikit-learn``).
"""

from __future__ import annotations

import copy
import functools

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sepify.errors import ModelLoadError

__all__ = ["digits_data", "digits_cnn", "accuracy"]


def digits_data(size: int = 16, seed: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(x_train, y_train, x_test, y_test)``: 1400 / 397 digits as ``(N, 1, size, size)`` in [0, 1]."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise ModelLoadError("the digits example needs scikit-learn; pip install scikit-learn") from e
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    y = torch.tensor(digits.target)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    x, y = x[perm], y[perm]
    return x[:1400], y[:1400], x[1400:], y[1400:]


def _architecture() -> nn.Sequential:
    def block(cin: int, cout: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU()]

    return nn.Sequential(
        *block(1, 32),
        *block(32, 64),
        nn.MaxPool2d(2),
        *block(64, 64),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(64 * 4 * 4, 10),
    )


@functools.lru_cache(maxsize=2)
def _trained(seed: int, epochs: int) -> nn.Sequential:
    x, y, _, _ = digits_data(seed=seed)
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = _architecture()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), 64):
            idx = order[i : i + 64]
            optimizer.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()  # type: ignore[no-untyped-call]
            optimizer.step()
    return model.eval()


def digits_cnn(trained: bool = True, seed: int = 0, epochs: int = 8) -> nn.Sequential:
    """The digits CNN in eval mode; trained here (a few seconds on a CPU, cached per process) unless ``trained=False``.

    Its example input is ``torch.randn(1, 1, 16, 16)`` (``sepify convert
    sepify.zoo:digits_cnn --input-shape 1,1,16,16``).
    """
    if not trained:
        torch.manual_seed(seed)
        return _architecture().eval()
    return copy.deepcopy(_trained(seed, epochs))


def accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    """Top-1 accuracy of ``model`` on ``(x, y)``."""
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())
