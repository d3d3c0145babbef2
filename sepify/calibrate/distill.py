"""Knowledge distillation of a converted model (student) against the original (teacher).

Plain PyTorch: Adam on the chosen parameters, MSE on outputs (or KL with a
temperature for logits), early stopping on held-out batches, deterministic
under a seed. Knows nothing about fx or about how the student was built.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sepify.errors import ConfigError
from sepify.graph.probe import float_leaves
from sepify.options import Distill

__all__ = ["distill", "DistillOutcome", "kl_loss"]

logger = logging.getLogger(__name__)

ProgressFn = Callable[[str, int, int], None]
LossFn = Callable[[int, float], None]


@dataclass(frozen=True)
class DistillOutcome:
    steps: int  # steps run (fewer than asked when stopped early)
    best_step: int  # the step whose weights were kept
    heldout_before: float
    heldout_after: float
    history: tuple[tuple[int, float], ...]  # (step, held-out loss)


def kl_loss(student: list[Tensor], teacher: list[Tensor], temperature: float) -> Tensor:
    """KL divergence of softened logits (Hinton et al.), scaled by ``temperature**2``; a per-sample mean."""
    if len(student) != 1 or student[0].dim() != 2:
        raise ConfigError("loss='kl' needs a single (N, classes) logits output; use loss='mse'")
    log_p = F.log_softmax(student[0] / temperature, dim=1)
    q = F.softmax(teacher[0] / temperature, dim=1)
    return F.kl_div(log_p, q, reduction="batchmean") * temperature**2


def _loss(student_out: Any, teacher_out: Any, kind: str, temperature: float) -> Tensor:
    s, t = float_leaves(student_out), float_leaves(teacher_out)
    if len(s) != len(t) or not s:
        raise ConfigError(
            "the student's outputs do not line up with the teacher's; distillation needs equal structures"
        )
    if kind == "kl":
        return kl_loss(s, t, temperature)
    # relative MSE per output tensor, so outputs of different scales weigh alike
    total = s[0].new_zeros(())
    for a, b in zip(s, t):
        total = total + (a - b).square().mean() / b.square().mean().clamp_min(1e-12)
    return total


def distill(
    teacher: nn.Module,
    student: nn.Module,
    fit: Sequence[tuple[Any, ...]],
    heldout: Sequence[tuple[Any, ...]],
    options: Distill,
    *,
    params: Sequence[nn.Parameter] | None = None,
    temperature: float = 4.0,
    eval_every: int | None = None,
    patience: int = 5,
    progress: ProgressFn | None = None,
    on_loss: LossFn | None = None,
) -> DistillOutcome:
    """Train ``params`` of ``student`` to match ``teacher``'s outputs; keeps the best held-out weights.

    The student runs in its own train/eval mode (eval freezes BatchNorm
    statistics, the usual choice when only some layers are retrained); the
    teacher never changes. Teacher outputs are computed once per batch.

    Args:
        options: steps (batches cycle), Adam learning rate, loss (``"mse"``,
            relative on every floating output, or ``"kl"`` on logits with
            ``temperature``) and the seed of torch's RNG (dropout, order).
        params: parameters to train (default: all of the student's).
        eval_every: steps between held-out checks (default: steps / 20, >= 1).
        patience: stop after this many checks without improvement.
    """
    steps, loss = options.steps, options.loss
    trainable = list(params) if params is not None else list(student.parameters())
    if not trainable:
        raise ConfigError("nothing to distill: no trainable parameters were selected")
    every = eval_every or max(1, steps // 20)
    with torch.no_grad():
        targets_fit = [teacher(*a) for a in fit]
        targets_held = [teacher(*a) for a in heldout]

    def heldout_loss() -> float:
        with torch.no_grad():
            values = [float(_loss(student(*a), t, loss, temperature)) for a, t in zip(heldout, targets_held)]
        return sum(values) / len(values)

    with _only_trainable(student, trainable, options.seed):
        optimizer = torch.optim.Adam(trainable, lr=options.lr)
        start = heldout_loss()
        best, best_step, best_state = start, 0, [p.detach().clone() for p in trainable]
        history = [(0, start)]
        stale = step = 0
        try:
            order = itertools.cycle(range(len(fit)))
            for step in range(1, steps + 1):
                i = next(order)
                optimizer.zero_grad(set_to_none=True)
                value = _loss(student(*fit[i]), targets_fit[i], loss, temperature)
                if not math.isfinite(float(value.detach())):
                    logger.warning("distillation loss became %s at step %d; keeping the best weights", value, step)
                    break
                value.backward()  # type: ignore[no-untyped-call]
                optimizer.step()
                if on_loss is not None:
                    on_loss(step, float(value))
                if progress is not None:
                    progress(f"distilling (loss {float(value.detach()):.4g})", step, steps)
                if step % every == 0 or step == steps:
                    history.append((step, heldout_loss()))
                    if history[-1][1] < best:
                        best, best_step, stale = history[-1][1], step, 0
                        best_state = [p.detach().clone() for p in trainable]
                    elif (stale := stale + 1) >= patience:
                        break
        finally:
            with torch.no_grad():
                for p, value in zip(trainable, best_state):
                    p.copy_(value)
    return DistillOutcome(step, best_step, start, best, tuple(history))


@contextlib.contextmanager
def _only_trainable(student: nn.Module, trainable: Sequence[nn.Parameter], seed: int) -> Iterator[None]:
    """Only ``trainable`` requires grad and torch's RNG is seeded inside the block; both are restored after."""
    frozen = [(p, p.requires_grad) for p in student.parameters()]
    for p, _ in frozen:
        p.requires_grad_(False)
    for p in trainable:
        p.requires_grad_(True)
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        yield
    finally:
        for p, flag in frozen:
            p.requires_grad_(flag)
        torch.random.set_rng_state(gen_state)
