"""Rescaled copies of calibration samples (sepify.calibrate.augment) and where they go in the split."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import sepify
from sepify.calibrate import stages
from sepify.calibrate.augment import OCTAVES, rescaled, rescaled_copies
from sepify.calibrate.data import calibration_batches
from sepify.errors import CalibrationError, ConfigError


def _same(a: tuple[tuple[torch.Tensor, ...], ...], b: tuple[tuple[torch.Tensor, ...], ...]) -> bool:
    return len(a) == len(b) and all(torch.equal(u, v) for p, q in zip(a, b) for u, v in zip(p, q, strict=True))


_SHAPES = [(2, 300), (2, 3, 300), (2, 2, 20, 240), (1, 2, 6, 5, 200)]


@settings(max_examples=30, deadline=None)
@given(shape=st.sampled_from(_SHAPES), factor=st.floats(2**-OCTAVES, 2**OCTAVES))
def test_a_rescaled_sample_keeps_its_shape_and_a_factor_of_one_changes_nothing(
    shape: tuple[int, ...], factor: float
) -> None:
    x = torch.randn(shape)
    assert rescaled(x, factor).shape == x.shape
    assert torch.equal(rescaled(x, 1.0), x)
    assert torch.isfinite(rescaled(x, factor)).all()


@settings(max_examples=30, deadline=None)
@given(
    shape=st.sampled_from(_SHAPES),
    periods=st.floats(6.0, 20.0),
    octaves=st.floats(-OCTAVES, OCTAVES),
)
def test_rescaling_moves_a_wave_by_the_factor(shape: tuple[int, ...], periods: float, octaves: float) -> None:
    """The oracle: a wave of ``periods`` cycles along the last axis has ``periods * factor`` cycles per length
    afterwards; measured by the phase slope over the middle half, which is content on every factor in range."""
    length, factor = shape[-1], 2.0**octaves
    t = torch.arange(length, dtype=torch.float64) / length
    x = torch.sin(2 * math.pi * periods * t).expand(shape).contiguous()
    y = rescaled(x, factor)
    middle = y.reshape(-1, length)[0, length // 4 : 3 * length // 4]
    analytic = torch.fft.ifft(torch.fft.fft(middle) * (torch.arange(len(middle)) < len(middle) // 2) * 2)
    phase = np.unwrap(torch.angle(analytic).numpy())[len(middle) // 8 : -len(middle) // 8]  # away from its ends
    cycles = float(phase[-1] - phase[0]) / (2 * math.pi) * length / (len(phase) - 1)
    assert cycles == pytest.approx(periods * factor, rel=0.03)


def test_copies_depend_on_the_samples_not_their_order_and_stay_on_their_side_of_the_split() -> None:
    """Each sample is a distinct constant signal, which rescaling keeps: a copy names its source."""
    values = torch.randperm(60).double() + 1
    x = values[:, None, None].expand(60, 2, 50).float().contiguous()
    plain = calibration_batches(x, heldout_fraction=0.2)
    data = calibration_batches(x, heldout_fraction=0.2, augment=True)
    assert data.copies == 60 and data.samples == 120
    assert _same(data.given_fit, plain.fit) and data.given_heldout_samples == 12

    def sources(batches: tuple[tuple[torch.Tensor, ...], ...]) -> list[int]:
        return sorted(round(float(v)) for (b,) in batches for v in b[:, 0, 0])  # interpolation: round-off

    fit_copies = data.fit[len(plain.fit) :]
    held_copies = data.heldout[len(plain.heldout) :]
    assert sources(fit_copies) == sources(plain.fit) and sources(held_copies) == sources(plain.heldout)
    shuffled = calibration_batches(x[torch.randperm(60)], heldout_fraction=0.2, augment=True)
    assert _same(shuffled.fit, data.fit) and _same(shuffled.heldout, data.heldout)


@pytest.mark.parametrize(
    "args",
    [(torch.randn(8, 3, 16), torch.randn(8, 4)), (torch.randint(0, 9, (8, 16)),), (torch.randn(8),)],
    ids=["two arguments", "integers", "no spatial axis"],
)
def test_inputs_without_a_spatial_meaning_get_no_copies(args: tuple[torch.Tensor, ...]) -> None:
    assert rescaled_copies((args,)) == ()
    data = calibration_batches([args], n_args=len(args), augment=True)
    assert data.copies == 0 and _same(data.fit, calibration_batches([args], n_args=len(args)).fit)


def test_a_user_augmentation_is_added_as_copies_and_checked() -> None:
    x = torch.randn(40, 2, 30)
    data = calibration_batches(x, augment=lambda b: b.flip(-1))
    assert data.copies == 40
    originals = torch.cat([b[0] for b in data.given_fit])
    assert torch.equal(torch.cat([b[0] for b in data.fit[len(data.given_fit) :]]), originals.flip(-1))
    with pytest.raises(CalibrationError, match=r"augment returned \(32, 2\) for a batch of shape \(32, 2, 30\)"):
        calibration_batches(x, augment=lambda b: b[..., 0])
    with pytest.raises(CalibrationError, match="NaN or infinite"):
        calibration_batches(x, augment=lambda b: b / 0)


@pytest.mark.parametrize(("size", "copied"), [(1, False), (2, True), (8, True)])
def test_auto_copies_samples_cut_from_a_few_sources(size: int, copied: bool) -> None:
    """``"auto"`` copies where the near-duplicate groups are at most half the samples (groups of 2 or more)."""
    x = torch.randn(64, 2, 30)

    def groups(samples: tuple[torch.Tensor, ...]) -> list[int]:
        return [k // size for k in range(len(samples[0]))]

    data = calibration_batches(x, group_by=groups, augment="auto")
    assert data.sources == 64 // size and data.few_sources is copied
    assert data.copies == (64 if copied else 0)
    assert calibration_batches(x, augment="auto").copies == 64  # groups not told apart: copied


def test_augment_must_be_a_flag_or_a_function() -> None:
    with pytest.raises(ConfigError, match="augment must be 'auto', True, False or a function"):
        sepify.Calibration(torch.randn(4, 3), augment="rescale")


def test_batchnorm_statistics_are_recomputed_on_the_users_samples_only(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[int] = []
    real = stages.refresh_batchnorm

    def spy(model: nn.Module, batches: tuple[tuple[torch.Tensor, ...], ...]) -> bool:
        seen.append(sum(len(b[0]) for b in batches))
        return real(model, batches)

    monkeypatch.setattr(stages, "refresh_batchnorm", spy)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3)).eval()
    x = torch.randn(50, 3, 12, 12)
    result = sepify.convert(net, x[:1], rank=2, calibration=sepify.Calibration(x, augment=True))
    assert seen == [40]  # the 40 fit samples, not their 40 copies
    assert [s.samples for s in result.report.fidelity][0] == 10
    assert "a copy of each rescaled by up to half an octave" in result.report.notes[0]
