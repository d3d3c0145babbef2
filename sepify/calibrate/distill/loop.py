"""The distillation loop: train a student's parameters to reproduce the teacher's outputs, one finite step at a time.

Every step is a function of its index (the batch, the dropout seed), so a resumed run ends with the weights an
uninterrupted one would. A step is kept only if every trained parameter is finite after it; otherwise the
parameters go back to their values before it and a :class:`~sepify.errors.TrainingError` says which step and
what to change. With held-out batches, the loss on them is measured before the first step and every
``eval_every`` steps; the best weights (the starting ones included) are kept, and ``patience`` checks without
improvement stop the run.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from sepify.calibrate.distill.checkpoint import (
    FILENAME,
    CheckpointState,
    RunIdentity,
    load_checkpoint,
    prepare_folder,
    save_checkpoint,
)
from sepify.calibrate.distill.distributed import sum_over_processes
from sepify.calibrate.distill.log import DistillStep, RunLog
from sepify.calibrate.distill.losses import Objective
from sepify.core.modules import SeparableConv
from sepify.errors import CalibrationError, ConfigError, TrainingError, first_line
from sepify.graph.probe import describe_inputs
from sepify.options import Distill

__all__ = ["DistillOutcome", "DistillStep", "Batches", "train", "trainable_parameters"]

ProgressFn = Callable[[str, int, int], None]


class Batches(Protocol):
    """Where a run's batches come from (:class:`~sepify.calibrate.distill.data.Samples`)."""

    batch_size: int

    def __call__(self, step: int) -> tuple[Tensor, ...]: ...

    def passes(self) -> Iterator[tuple[Tensor, ...]]: ...


@dataclass(frozen=True)
class DistillOutcome:
    """What a run did: its log, where it stopped, which weights it kept and how they do on held-out data."""

    history: tuple[DistillStep, ...]
    steps: int  # steps run (fewer than asked when stopped early)
    best_step: int  # the step whose weights were kept (0: the starting weights; the last step without eval data)
    eval_before: float | None  # held-out loss before the first step (None without eval data, or on a resume)
    eval_after: float | None  # held-out loss of the weights kept
    resumed_from: int | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)


def trainable_parameters(student: nn.Module, train_all: bool) -> list[nn.Parameter]:
    """The converted pairs' parameters (each once), or every parameter with ``train_all``."""
    if train_all:
        return list(student.parameters())
    seen: dict[int, nn.Parameter] = {}
    for module in student.modules():
        if isinstance(module, SeparableConv):
            for p in module.parameters():
                seen.setdefault(id(p), p)
    return list(seen.values())


def train(
    student: nn.Module,
    teacher: nn.Module,
    batches: Batches,
    options: Distill,
    *,
    trainable: Sequence[nn.Parameter],
    evals: Iterable[tuple[Tensor, ...]] | Batches | None = None,
    world: int = 1,
    rank: int = 0,
    log: RunLog | None = None,
    resume: bool = False,
    progress: ProgressFn | None = None,
) -> DistillOutcome:
    """Distill ``trainable`` (parameters of ``student``) against ``teacher`` on ``batches``; see the module docstring.

    The student runs in eval mode (BatchNorm statistics frozen) unless ``options.bn_train``; every module's mode
    and every parameter's ``requires_grad`` are restored afterwards. ``log`` records every logged step (rank 0).

    Raises:
        TrainingError: the loss or the weights became non-finite (the weights before that step are kept).
        CalibrationError: the teacher fails on the data.
        CheckpointError: ``resume`` without a usable checkpoint.
    """
    if not trainable:
        raise ConfigError("nothing to distill: the student has no converted layers; pass train_all=True")
    device, dtype = _device_and_dtype(student)
    objective = Objective(
        options.loss, student, teacher, temperature=options.temperature, feature_layers=options.feature_layers
    )
    try:
        # DistributedDataParallel registers the parameters that require grad when it wraps the student
        with _only_trainable(student, teacher, trainable), _modes(student, teacher, options.bn_train):
            run = Run(student, teacher, batches, options, trainable, objective, device, dtype, world, rank)
            return run.go(evals, log or RunLog(None, rank == 0), resume, progress)
    finally:
        objective.remove()


class Run:
    """One run's state: the optimiser, the schedule, the best weights so far."""

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        batches: Batches,
        options: Distill,
        trainable: Sequence[nn.Parameter],
        objective: Objective,
        device: torch.device,
        dtype: torch.dtype,
        world: int,
        rank: int,
    ) -> None:
        self.student, self.teacher, self.batches, self.options = student, teacher, batches, options
        self.trainable, self.objective, self.device, self.dtype = list(trainable), objective, device, dtype
        self.world, self.rank = world, rank
        self.wrapped: nn.Module = nn.parallel.DistributedDataParallel(student) if world > 1 else student
        self.optimizer = _optimizer(options, self.trainable)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, _schedule(options))
        self.identity = RunIdentity(
            options.steps, options.batch_size, options.lr, str(options.loss), options.seed, world,
            sum(p.numel() for p in self.trainable),
        )  # fmt: skip
        folder = options.checkpoint_dir
        self.checkpoint = Path(folder) / FILENAME if folder is not None else None
        if self.checkpoint is not None and rank == 0:
            prepare_folder(self.checkpoint.parent)

    def go(
        self,
        evals: Iterable[tuple[Tensor, ...]] | Batches | None,
        log: RunLog,
        resume: bool,
        progress: ProgressFn | None,
    ) -> DistillOutcome:
        options = self.options
        self._fix_loss_scales()
        state = self._resumed() if resume else CheckpointState(0, [], (math.inf, 0, None))
        history = [DistillStep(**h) for h in state.history]
        log.records = list(history)
        start, best, notes = state.step, state.best, [f"resumed from step {state.step}"] if resume else []
        before = None
        if evals is not None and start == 0:
            before = self._evaluate(evals)
            best = (before, 0, _snapshot(self.student))
        every = options.eval_every or max(1, options.steps // 20)
        stale, completed, seen, t0 = 0, start, 0, time.perf_counter()
        try:
            for step in range(start, options.steps):
                value = self._step(step)
                completed = done = step + 1
                seen += self.batches.batch_size
                if done % every == 0 or done == options.steps or done == start + 1:
                    held = self._evaluate(evals) if evals is not None else None
                    rate = seen / max(time.perf_counter() - t0, 1e-9)
                    (mean,) = sum_over_processes(value)
                    entry = DistillStep(done, mean / self.world, float(self.scheduler.get_last_lr()[0]), rate, held)
                    history.append(entry)
                    log.write(entry)
                    if held is not None:
                        if held < best[0]:
                            best, stale = (held, done, _snapshot(self.student)), 0
                        elif options.patience is not None and (stale := stale + 1) >= options.patience:
                            notes.append(f"stopped early at step {done}: no better held-out loss in {stale} checks")
                            break
                if progress is not None and self.rank == 0:
                    progress(f"distilling (loss {value:.4g})", done, options.steps)
                if self.checkpoint is not None and done % options.checkpoint_every == 0 and done < options.steps:
                    self._save(done, history, best)
        except (KeyboardInterrupt, SystemExit):
            if self.checkpoint is not None and completed > start:
                self._save(completed, history, best)
            raise
        finally:
            log.close()
        if best[2] is not None:
            self.student.load_state_dict(best[2])
        elif history:
            best = (history[-1].eval_loss if history[-1].eval_loss is not None else math.nan, completed, None)
        return DistillOutcome(
            tuple(history), completed, best[1], before, best[0] if math.isfinite(best[0]) else None,
            start if resume else None, tuple(notes),
        )  # fmt: skip

    def _prepared(self, args: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        """On the student's device, floating inputs in its dtype (integer inputs, such as token ids, as they are)."""
        return tuple(a.to(self.device, self.dtype if a.is_floating_point() else None) for a in args)

    def _teacher(self, args: tuple[Tensor, ...]) -> Any:
        try:
            with torch.no_grad(), _autocast(self.device):
                return self.teacher(*args)
        except Exception as e:  # noqa: BLE001 - user code failing on user data is an input problem
            raise CalibrationError(
                f"the teacher failed on a distillation batch {describe_inputs(args)} ({first_line(e)}); pass "
                "samples of the shape and dtype the model takes (float data for a float model)"
            ) from e

    def _fix_loss_scales(self) -> None:
        """The relative losses' divisors, from the teacher on global batch 0 (the same whatever step a run starts)."""
        self.objective.fix_scales(self._teacher(self._prepared(self.batches(0))))

    def _step(self, step: int) -> float:
        options = self.options
        torch.manual_seed((options.seed * 1_000_003 + step) * 64 + self.rank)  # dropout etc.: a function of the step
        args = self._prepared(self.batches(step))
        if options.augment is not None:
            args = (options.augment(args[0]), *args[1:])
        target = self._teacher(args)
        self.optimizer.zero_grad(set_to_none=True)
        with _autocast(self.device):
            value = self.objective(self.wrapped(*args), target)
        loss = float(value.detach())  # one device sync per step
        if not math.isfinite(loss):
            raise TrainingError(
                f"the distillation loss became {loss} at step {step + 1}, so training stopped with the weights of "
                f"step {step}; pass a lower learning rate (--lr, now {options.lr:g})"
            )
        value.backward()  # type: ignore[no-untyped-call]
        if options.clip is not None:
            torch.nn.utils.clip_grad_norm_(self.trainable, options.clip)
        before = [p.detach().clone() for p in self.trainable]
        self.optimizer.step()
        if not bool(torch.stack([torch.isfinite(p).all() for p in self.trainable]).all()):
            with torch.no_grad():
                for p, kept in zip(self.trainable, before):
                    p.copy_(kept)
            raise TrainingError(
                f"step {step + 1} made weights NaN or infinite, so it was undone and training stopped with the "
                f"weights of step {step}; pass a lower learning rate (--lr, now {options.lr:g})"
            )
        self.scheduler.step()
        return loss

    def _evaluate(self, evals: Iterable[tuple[Tensor, ...]] | Batches) -> float:
        """The mean loss over the held-out data (one pass, every process)."""
        total, count = 0.0, 0
        flag = self.student.training
        self.student.eval()
        try:
            with torch.no_grad():
                for args in evals.passes() if hasattr(evals, "passes") else evals:
                    args = self._prepared(args)
                    target = self._teacher(args)
                    with _autocast(self.device):
                        value = self.objective(self.student(*args), target)
                    size = int(args[0].shape[0]) if args[0].dim() else 1
                    total, count = total + float(value) * size, count + size
        finally:
            self.student.train(flag)
        summed, samples = sum_over_processes(total, count)
        if samples == 0:
            raise CalibrationError("the held-out data is empty; pass at least one sample to evaluate on")
        return summed / samples

    def _resumed(self) -> CheckpointState:
        if self.checkpoint is None:
            raise ConfigError("resume=True needs checkpoint_dir (where the interrupted run wrote checkpoint.pt)")
        return load_checkpoint(self.checkpoint, self.identity, self.student, self.optimizer, self.scheduler)

    def _save(self, step: int, history: list[DistillStep], best: tuple[float, int, Any]) -> None:
        if self.rank == 0 and self.checkpoint is not None:
            records = [asdict(h) for h in history]
            save_checkpoint(self.checkpoint, self.identity, step, self.student, self.optimizer, self.scheduler,
                            records, best)  # fmt: skip


def _snapshot(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _optimizer(options: Distill, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    if options.optimizer == "sgd":
        return torch.optim.SGD(params, lr=options.lr, momentum=0.9, weight_decay=options.weight_decay)
    return torch.optim.AdamW(params, lr=options.lr, weight_decay=options.weight_decay)


def _schedule(options: Distill) -> Callable[[int], float]:
    """Linear warm-up, then cosine decay to 0 (or constant)."""
    warmup = options.warmup if options.warmup is not None else max(1, options.steps // 20)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if options.schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, options.steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def _device_and_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    param = next((p for p in model.parameters() if p.is_floating_point()), None)
    if param is None:
        return torch.device("cpu"), torch.float32
    return param.device, param.dtype


def _autocast(device: torch.device) -> Any:
    """bf16 autocast on CUDA where the device supports it; nothing elsewhere."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@contextlib.contextmanager
def _only_trainable(student: nn.Module, teacher: nn.Module, trainable: Sequence[nn.Parameter]) -> Iterator[None]:
    """Only ``trainable`` requires grad inside the block (the teacher nothing); every flag is restored after."""
    flags = [(p, p.requires_grad) for m in (student, teacher) for p in m.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    for p in trainable:
        p.requires_grad_(True)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


@contextlib.contextmanager
def _modes(student: nn.Module, teacher: nn.Module, bn_train: bool) -> Iterator[None]:
    """The teacher in eval mode, the student in eval mode (or train mode with ``bn_train``); restored after."""
    saved = [(m, m.training) for root in (student, teacher) for m in root.modules()]
    teacher.eval()
    student.train(bn_train)
    try:
        yield
    finally:
        for m, flag in saved:
            m.training = flag
