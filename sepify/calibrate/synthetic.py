"""Calibration inputs for when there is no data: synthesised to match the model's BatchNorm statistics.

A trained network's BatchNorm layers remember the mean and variance of their
inputs over the training data. Inputs optimised so that every BatchNorm sees
those statistics again (ZeroQ, Cai et al. 2020; "data-free" quantisation)
exercise the network much as its training data did, channel by channel, which
random example inputs do not. sepify refines its pairs on such inputs as on
real samples; BatchNorm statistics are not re-estimated from them (that would
be circular).

Measured (docs/benchmarks.md): the trained digits CNN at 0.30 of its MACs
keeps 0.9924 accuracy with synthetic calibration and 0.3955 with none.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor, nn

from sepify.errors import CalibrationError, ConfigError
from sepify.graph.probe import preserved_state
from sepify.options import Calibration, as_int

__all__ = ["SYNTHETIC", "synthesize_calibration", "batchnorm_layers", "resolve_synthetic"]

SYNTHETIC = "synthetic"  # calibration="synthetic": synthesise the samples (see synthesize_calibration)
_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def batchnorm_layers(model: nn.Module) -> list[nn.Module]:
    """The BatchNorm layers of ``model`` that keep running statistics."""
    return [
        m
        for m in model.modules()
        if isinstance(m, _BATCHNORMS) and m.running_mean is not None and m.running_var is not None
    ]


def synthesize_calibration(
    model: nn.Module,
    example_inputs: Tensor | tuple[Tensor],
    *,
    samples: int = 64,
    steps: int = 100,
    lr: float = 0.1,
    seed: int = 0,
    progress: Callable[[str, int, int], None] | None = None,
) -> Tensor:
    """``samples`` inputs shaped like ``example_inputs`` whose activations match every BatchNorm's running statistics.

    Starts from Gaussian noise with the example's mean and standard deviation
    and takes ``steps`` Adam steps on the inputs (the model is unchanged: run
    in eval mode, its modes, buffers and gradients restored) to minimise, over
    BatchNorm layers, the squared distance of each channel's batch mean and
    standard deviation to the running ones, relative to the layer's running
    variance. Deterministic for a given ``seed``.

    Raises:
        ConfigError: the model does not take exactly one floating tensor.
        CalibrationError: the model has no BatchNorm with running statistics,
            or the optimisation diverged.

    Examples:
        >>> _ = torch.manual_seed(0)  # the net's weights and the example: another draw may need more steps
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU()).eval()
        >>> with torch.no_grad():
        ...     _ = net[1].running_mean.fill_(0.5)
        >>> x = synthesize_calibration(net, torch.randn(1, 3, 8, 8), samples=16, steps=200)
        >>> x.shape
        torch.Size([16, 3, 8, 8])
        >>> with torch.no_grad():  # every channel's mean at the BatchNorm's input is now about 0.5
        ...     torch.allclose(net[0](x).mean((0, 2, 3)), torch.full((8,), 0.5), atol=0.03)
        True
    """
    example = example_inputs[0] if isinstance(example_inputs, tuple) and len(example_inputs) == 1 else example_inputs
    if not (isinstance(example, Tensor) and example.is_floating_point() and example.dim() >= 2):
        raise ConfigError(
            "synthetic calibration needs a model that takes one floating tensor (N, C, ...); pass real samples instead"
        )
    samples, steps = as_int(samples, "synthetic samples", 1), as_int(steps, "synthesis steps", 0)
    norms = batchnorm_layers(model)
    if not norms:
        raise CalibrationError(
            f"the model ({type(model).__name__}) has no BatchNorm layer with running statistics, which synthetic "
            "calibration matches; pass real samples (a few recordings or photos cut into pieces are enough)"
        )
    generator = torch.Generator().manual_seed(seed)
    scale = float(example.std()) if example.numel() > 1 and float(example.std()) > 0 else 1.0
    noise = torch.randn((samples, *example.shape[1:]), generator=generator, dtype=example.dtype)
    x = (noise * scale + float(example.mean())).to(example.device).requires_grad_(True)
    seen: list[tuple[Tensor, nn.Module]] = []

    def hook(module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
        seen.append((inputs[0], module))

    handles = [m.register_forward_hook(hook) for m in norms]
    optimizer = torch.optim.Adam([x], lr=lr)
    try:
        with preserved_state(model), torch.enable_grad():
            model.eval()
            for step in range(steps):
                if progress is not None:
                    progress("synthesising calibration", step, steps)
                seen.clear()
                model(x)
                if not seen:
                    raise CalibrationError(
                        f"no BatchNorm layer of the model ({type(model).__name__}) ran on inputs shaped like "
                        f"{tuple(example.shape)}; synthetic calibration cannot match their statistics; pass real samples"
                    )
                loss = sum(_mismatch(a, m) for a, m in seen)
                if not isinstance(loss, Tensor) or not bool(torch.isfinite(loss)):
                    raise CalibrationError(
                        f"synthetic calibration diverged at step {step} (BatchNorm mismatch {float(loss):.3g}); "
                        "pass real samples"
                    )
                (grad,) = torch.autograd.grad(loss, x)
                x.grad = grad
                optimizer.step()
    finally:
        for h in handles:
            h.remove()
    if progress is not None:
        progress("synthesising calibration", steps, steps)
    return x.detach()


def resolve_synthetic(
    calibration: Calibration | None,
    model: nn.Module,
    args: tuple[Any, ...],
    progress: Callable[[str, int, int], None] | None = None,
) -> tuple[Calibration | None, list[str]]:
    """``calibration`` with ``data="synthetic"`` replaced by synthesised samples (BatchNorm refresh off), and a note.

    Any other calibration is returned as it is, with no note.
    """
    if calibration is None or not (isinstance(calibration.data, str) and calibration.data == SYNTHETIC):
        return calibration, []
    samples = calibration.samples or 64
    data = synthesize_calibration(model, args, samples=samples, progress=progress)
    note = (
        f"calibrated on {samples} synthetic inputs matched to the model's {len(batchnorm_layers(model))} BatchNorm "
        "layers' statistics (no data); real samples, even a few recordings or photos, usually do better"
    )
    return replace(calibration, data=data, samples=None, refresh_bn=False), [note]


def _mismatch(activation: Tensor, norm: nn.Module) -> Tensor:
    """How far a BatchNorm's input batch statistics are from its running ones, relative to its running variance."""
    dims = [0, *range(2, activation.dim())]
    mean = activation.mean(dims)
    std = activation.var(dims, unbiased=False).clamp_min(1e-12).sqrt()
    running_var: Tensor = norm.running_var  # type: ignore[assignment]
    running_mean: Tensor = norm.running_mean  # type: ignore[assignment]
    scale = running_var.mean().clamp_min(1e-12)
    return ((mean - running_mean).square().mean() + (std - running_var.sqrt()).square().mean()) / scale
