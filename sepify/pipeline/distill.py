"""``sepify.distill``: recover what a conversion lost, on a user's unlabelled data, at scale (orchestration only).

The data is streamed and, under ``torchrun``, sharded (:mod:`sepify.calibrate.distill.data`); the loop, the
losses, checkpoints and the log are the one engine :func:`sepify.convert` also distills with
(:mod:`sepify.calibrate.distill`). Under torchrun each process takes every ``W``-th sample of each global
batch, the student is wrapped in ``DistributedDataParallel``, the teacher stays frozen on every process, and
only the first process logs and writes.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from sepify.calibrate.distill import DistillStep, Samples, train, trainable_parameters
from sepify.calibrate.distill.distributed import process_group
from sepify.calibrate.distill.log import RunLog
from sepify.errors import ConfigError, ModelError, TrainingError
from sepify.graph.analysis import check_finite_parameters
from sepify.graph.probe import all_finite
from sepify.options import Distill
from sepify.pipeline.convert import ConversionResult

__all__ = ["distill", "DistillResult", "DistillStep"]

ProgressFn = Callable[[str, int, int], None]


@dataclass(frozen=True)
class DistillResult:
    """The distilled student and what happened on the way.

    ``model`` holds the best held-out weights when there was held-out data (the starting weights included: a run
    never leaves the student worse on it), else the last step's.
    """

    model: nn.Module
    history: tuple[DistillStep, ...]
    best_step: int
    world_size: int
    global_batch: int
    resumed_from: int | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)
    eval_before: float | None = None  # held-out loss before the first step
    eval_after: float | None = None  # held-out loss of the weights kept


def distill(
    student: nn.Module | ConversionResult,
    teacher: nn.Module,
    data: Any,
    options: Distill | int | None = None,
    *,
    eval_data: Any = None,
    log: str | os.PathLike[str] | None = None,
    resume: bool = False,
    progress: ProgressFn | None = None,
) -> DistillResult:
    """Train ``student`` to reproduce ``teacher``'s outputs on ``data`` (no labels needed).

    Args:
        student: the converted model (or its :class:`ConversionResult`); trained in place.
        teacher: the original model; never changes.
        data: a ``Dataset`` (map-style or iterable), a ``DataLoader`` (its dataset is used), an iterable of samples,
            a tensor of samples along dim 0, or a tuple of such tensors (one per model argument). A sample is a
            tensor, or ``(input, label)`` (the label is ignored).
        options: a :class:`~sepify.Distill` (steps, batch size, learning rate, loss, what trains, checkpoints...),
            or a number of steps; default ``Distill()``.
        eval_data: held-out samples (same forms as ``data``); the weights with the lowest loss on them are kept,
            the starting ones included, and ``options.patience`` checks without improvement stop the run.
        log: one line per logged step (the first process only): JSON lines, or CSV when the name ends in
            ``.csv``; rewritten atomically at every record.
        resume: continue from ``options.checkpoint_dir``'s checkpoint; ends with the weights an uninterrupted
            run would.
        progress: called as ``progress(step, done, total)``.

    Raises:
        ConfigError: an option, or the student is the teacher (or shares its parameters).
        CalibrationError: the data is empty, unreadable, ragged, non-finite, or the teacher fails on it.
        TrainingError: the loss or the weights became non-finite (the last finite weights are kept).
        CheckpointError: ``resume`` without a usable checkpoint.

    Examples:
        >>> import torch, sepify
        >>> teacher = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 3)).eval()
        >>> student = sepify.convert(teacher, torch.randn(1, 3, 12, 12), rank=1).model
        >>> data = torch.randn(64, 3, 12, 12)
        >>> result = sepify.distill(student, teacher, data, sepify.Distill(steps=20, batch_size=16))
        >>> result.history[-1].loss < result.history[0].loss
        True
    """
    settings = Distill.of(options) or Distill()
    model = student.model if isinstance(student, ConversionResult) else student
    _check_models(model, teacher, settings)
    rank, world = process_group()
    if settings.batch_size % world:
        raise ConfigError(f"batch_size {settings.batch_size} must be divisible by the {world} processes")
    n_args = len(data) if isinstance(data, tuple) and all(isinstance(t, Tensor) for t in data) else 1
    batches = Samples(data, settings.batch_size, seed=settings.seed, rank=rank, world=world, n_args=n_args)
    evals = None
    if eval_data is not None:
        size = settings.batch_size if not hasattr(eval_data, "__len__") else min(settings.batch_size, len(eval_data))
        what = "the evaluation data"
        evals = Samples(
            eval_data, max(size, 1), seed=settings.seed + 1, rank=rank, world=world, n_args=n_args, what=what
        )
    outcome = train(
        model,
        teacher,
        batches,
        settings,
        trainable=trainable_parameters(model, settings.train_all),
        evals=evals,
        world=world,
        rank=rank,
        log=RunLog(log, rank == 0, settings.tensorboard),
        resume=resume,
        progress=progress,
    )
    _check_finite_output(model, batches(0))
    return DistillResult(
        model, outcome.history, outcome.best_step, world, settings.batch_size, outcome.resumed_from, outcome.notes,
        outcome.eval_before, outcome.eval_after,
    )  # fmt: skip


def _check_models(student: nn.Module, teacher: nn.Module, options: Distill) -> None:
    """The student and the teacher are two intact models, and training one cannot change the other."""
    for name, model in (("student", student), ("teacher", teacher)):
        if not isinstance(model, nn.Module):
            raise ConfigError(f"the {name} must be a torch.nn.Module, got {type(model).__name__}")
        if any(p.is_meta for p in model.parameters()):
            raise ModelError(
                f"the {name} holds parameters on the meta device (shapes without values); load its weights first"
            )
        check_finite_parameters(model)
    if student is teacher:
        raise ConfigError(
            "the student and the teacher are the same model; pass the converted model as the student and the "
            "original as the teacher"
        )
    teachers = {id(p) for p in teacher.parameters()}
    shared = [p for p in trainable_parameters(student, options.train_all) if id(p) in teachers]
    if shared:
        raise ConfigError(
            f"the student shares {len(shared)} trained parameter(s) with the teacher (converted with inplace=True?), "
            "so training it would change the teacher; pass a copy of the original as the teacher"
        )


def _check_finite_output(model: nn.Module, args: tuple[Tensor, ...]) -> None:
    """Never a model that answers NaN: the distilled student on the first batch."""
    param = next((p for p in model.parameters() if p.is_floating_point()), None)
    if param is not None:
        args = tuple(a.to(param.device, param.dtype if a.is_floating_point() else None) for a in args)
    flag = model.training
    model.eval()
    try:
        with torch.no_grad():
            finite = all_finite(model(*args))
    finally:
        model.train(flag)
    if not finite:
        raise TrainingError(
            "the distilled model's outputs on the data hold NaN or infinite values, so it is not returned; pass a "
            "lower learning rate or check the data"
        )
