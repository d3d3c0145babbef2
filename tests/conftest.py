"""Shared fixtures: small models covering every skip reason, seeded RNG."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

if os.environ.get("PYTEST_XDIST_WORKER"):
    # pytest-xdist runs one worker per core: one torch thread each, or the workers fight over the cores (their
    # subprocesses, the tutorials among them, keep their own threads)
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


class PlainNet(nn.Module):
    """Three eligible convs, a 1x1, a depthwise conv, BN, dropout and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.body = nn.Sequential(
            nn.Conv2d(8, 16, (3, 5), stride=2, padding=(1, 2), bias=False),
            nn.ReLU(),
            nn.Conv2d(16, 16, 3, padding=1, groups=16),
            nn.Conv2d(16, 12, 1),
            nn.Conv2d(12, 12, 3, padding="same", groups=3, padding_mode="reflect"),
        )
        self.drop = nn.Dropout(0.5)
        self.head = nn.Linear(12, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.stem(x)))
        x = self.body(x)
        return self.head(self.drop(x.mean((2, 3))))


class SkipNet(nn.Module):
    """One conv per skip reason that a model can trigger, plus eligible convs."""

    class MyConv(nn.Conv2d):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x) * 2

    def __init__(self) -> None:
        super().__init__()
        self.gray = nn.Conv2d(1, 4, 3, padding=1)  # eligible: one input channel, four filters
        self.widen = nn.Conv2d(4, 8, 3, padding=1)  # eligible
        self.shared = nn.Conv2d(8, 8, 3, padding=1)  # called twice
        self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.pointwise = nn.Conv2d(8, 8, 1)
        self.subclass = SkipNet.MyConv(8, 8, 3, padding=1)
        self.unused = nn.Conv2d(8, 8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.widen(self.gray(x))
        x = self.shared(self.shared(x))
        return self.subclass(self.pointwise(self.depthwise(x)))


@pytest.fixture
def plain_net() -> nn.Module:
    return PlainNet().eval()


@pytest.fixture
def skip_net() -> nn.Module:
    return SkipNet().eval()


@pytest.fixture
def example_input() -> torch.Tensor:
    return torch.randn(2, 3, 16, 16)
