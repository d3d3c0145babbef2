"""BatchNorm statistics refresh on calibration data."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

__all__ = ["refresh_batchnorm"]


def refresh_batchnorm(model: nn.Module, batches: Sequence[tuple[Any, ...]]) -> int:
    """Recompute every BatchNorm's running statistics on ``batches``; returns how many were refreshed.

    Each BN becomes a cumulative average (momentum None) in train mode for
    the pass; every other module keeps its mode.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not bns:
        return 0
    saved = [(m, m.momentum, m.training) for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    try:
        with torch.no_grad():
            for args in batches:
                model(*args)
    finally:
        for m, momentum, training in saved:
            m.momentum = momentum
            m.train(training)
    return len(bns)
