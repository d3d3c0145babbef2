"""``sepify.distill``: recover a converted model's accuracy from the original on a user's (unlabelled) data, at scale.

Streams batches from a ``Dataset``, a ``DataLoader``'s dataset, an iterable or
a tensor; never materialises the data. The run is a pure function of the
step: global batch ``k`` holds the samples ``k*B .. (k+1)*B`` of a
permutation of the data seeded by ``(seed, epoch)``, so a run resumed from a
checkpoint sees exactly the batches an uninterrupted one would. Under
``torchrun`` (``torch.distributed`` initialised, or the environment it sets),
each of ``W`` processes takes every ``W``-th sample of each global batch, the
student is wrapped in ``DistributedDataParallel`` (gradients averaged), the
teacher stays frozen on every rank, and only rank 0 logs and writes.

Losses: ``"mse"``, the mean squared error summed over the floating outputs
(a per-sample mean, so ``W`` processes with batch ``b`` step exactly as one
process with batch ``W*b``), or ``"kl"`` on logits with a temperature.
AdamW with linear warm-up and cosine decay, gradient clipping; only the
converted pairs train unless ``train_all``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, IterableDataset

from sepify.calibrate.distill import kl_loss
from sepify.core.modules import SeparableConv
from sepify.errors import CalibrationError, ConfigError, ModelError, OutputError, first_line
from sepify.graph.probe import float_leaves
from sepify.io.atomic import atomic_path
from sepify.pipeline.convert import ConversionResult
from sepify.vocab import LOSSES

__all__ = ["distill", "DistillResult", "DistillStep"]

ProgressFn = Callable[[str, int, int], None]
CHECKPOINT_FORMAT = "sepify.distill-checkpoint"


@dataclass(frozen=True)
class DistillStep:
    """One logged step: training loss, learning rate, samples/s, and the eval loss when it was measured."""

    step: int
    loss: float
    lr: float
    samples_per_s: float
    eval_loss: float | None = None


@dataclass(frozen=True)
class DistillResult:
    """The distilled student (best eval weights when ``eval_data`` was given) and what happened on the way."""

    model: nn.Module
    history: tuple[DistillStep, ...]
    best_step: int
    world_size: int
    global_batch: int
    resumed_from: int | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)


# -- data ---------------------------------------------------------------------------------------------------------


def _input_of(sample: Any) -> Tensor:
    """A sample is a tensor, or a tuple/list whose first element is the model input (labels are ignored)."""
    if isinstance(sample, (tuple, list)) and sample:
        sample = sample[0]
    if not isinstance(sample, Tensor):
        raise CalibrationError(
            f"distillation data yields {type(sample).__name__} samples; yield tensors, or (input, label) tuples"
        )
    return sample


class _Batches:
    """This rank's share of global batch ``k``, for any ``k``: see the module docstring."""

    def __init__(self, data: Any, batch_size: int, seed: int, rank: int, world: int) -> None:
        if isinstance(data, DataLoader):
            data = data.dataset
        self.batch_size, self.seed, self.rank, self.world = batch_size, seed, rank, world
        self.items: Any = None
        self.stream: Iterable[Any] | None = None
        if isinstance(data, Tensor):
            if data.dim() == 0 or data.shape[0] == 0:
                raise CalibrationError("distillation data is an empty tensor; pass N >= 1 samples along dim 0")
            self.items, self.length = data, int(data.shape[0])
        elif isinstance(data, Dataset) and not isinstance(data, IterableDataset) and hasattr(data, "__len__"):
            self.items, self.length = data, len(data)
        elif isinstance(data, Iterable):
            self.stream, self.length = data, 0
        else:
            raise CalibrationError(
                f"distillation data must be a Dataset, a DataLoader, an iterable of samples or a tensor, got "
                f"{type(data).__name__}"
            )
        if self.items is not None and self.length < batch_size:
            raise ConfigError(f"batch_size {batch_size} is larger than the {self.length} samples given")
        self._iterator: Iterator[Any] | None = None
        self._position = 0  # global samples consumed from the stream

    def global_indices(self, step: int) -> Tensor:
        per_epoch = self.length // self.batch_size
        epoch, k = divmod(step, per_epoch)
        order = torch.randperm(self.length, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + epoch))
        return order[k * self.batch_size : (k + 1) * self.batch_size]

    def __call__(self, step: int) -> Tensor:
        if self.items is not None:
            mine = self.global_indices(step)[self.rank :: self.world]
            if isinstance(self.items, Tensor):
                return self.items[mine]
            return torch.stack([_input_of(self.items[int(i)]) for i in mine])
        return torch.stack([_input_of(s) for s in self._from_stream(step)][self.rank :: self.world])

    def _from_stream(self, step: int) -> list[Any]:
        """Global batch ``step`` of an iterable: samples ``step*B ..``; earlier ones are skipped (resume)."""
        assert self.stream is not None
        start = step * self.batch_size
        if self._iterator is None or self._position > start:
            self._iterator, self._position = iter(self.stream), 0
        while self._position < start:
            next(self._iterator, None)
            self._position += 1
        batch = []
        for _ in range(self.batch_size):
            try:
                batch.append(next(self._iterator))
            except StopIteration:  # an iterable that ends: start it again (another epoch)
                self._iterator = iter(self.stream)
                batch.append(next(self._iterator))
            self._position += 1
        return batch


# -- loss, schedule -------------------------------------------------------------------------------------------------


def _loss(student_out: Any, teacher_out: Any, kind: str, temperature: float) -> Tensor:
    s, t = float_leaves(student_out), float_leaves(teacher_out)
    if not s or len(s) != len(t) or any(a.shape != b.shape for a, b in zip(s, t)):
        raise ModelError(
            "the student's outputs do not match the teacher's (structure or shapes differ); pass the model the "
            "student was converted from as the teacher"
        )
    if kind == "kl":
        return kl_loss(s, t, temperature)
    return sum((F.mse_loss(a, b) for a, b in zip(s, t)), start=s[0].new_zeros(()))


class _FeatureTaps:
    """Outputs of the student's pairs and of the teacher's convs at the same qualnames, captured by forward hooks.

    The feature loss is the mean over those layers of the mean squared difference (a per-sample mean, as the
    output loss). Pairs without a teacher counterpart (convs lifted from ``F.conv2d``) are left out.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module) -> None:
        names = dict(teacher.named_modules())
        self.pairs = {n: m for n, m in student.named_modules() if isinstance(m, SeparableConv) and n in names}
        if not self.pairs:
            raise ConfigError("feature matching needs converted layers whose qualnames the teacher has; use loss='mse'")
        self.student_out: dict[str, Tensor] = {}
        self.teacher_out: dict[str, Tensor] = {}
        self.handles = [m.register_forward_hook(self._keep(self.student_out, n)) for n, m in self.pairs.items()]
        self.handles += [names[n].register_forward_hook(self._keep(self.teacher_out, n)) for n in self.pairs]

    @staticmethod
    def _keep(store: dict[str, Tensor], name: str) -> Callable[..., None]:
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            if isinstance(output, Tensor):
                store[name] = output

        return hook

    def loss(self) -> Tensor:
        names = [n for n in self.pairs if n in self.student_out and n in self.teacher_out]
        if not names:
            raise ModelError("no converted layer ran on the distillation batch, so features cannot be matched")
        values = [F.mse_loss(self.student_out[n], self.teacher_out[n].detach()) for n in names]
        self.student_out.clear()
        self.teacher_out.clear()
        return torch.stack(values).mean()

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _schedule(steps: int, warmup: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


# -- distributed ----------------------------------------------------------------------------------------------------


def _distributed() -> tuple[int, int]:
    """``(rank, world)``; initialises the process group from torchrun's environment when it is not yet."""
    if not dist.is_available():
        return 0, 1
    if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        try:
            dist.init_process_group(backend)
        except Exception as e:  # noqa: BLE001 - rendezvous failures are many
            raise ConfigError(
                f"torchrun set WORLD_SIZE={os.environ.get('WORLD_SIZE')} but the process group did not start "
                f"({first_line(e)}); check MASTER_ADDR/MASTER_PORT or --rdzv-endpoint"
            ) from e
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


# -- the loop -------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Run:
    """What identifies a run: a checkpoint from another run is refused."""

    steps: int
    batch_size: int
    lr: float
    loss: str
    seed: int
    world: int
    trainable: int

    def matches(self, other: dict[str, Any]) -> bool:
        return asdict(self) == other


def distill(
    student: nn.Module | ConversionResult,
    teacher: nn.Module,
    data: Any,
    *,
    steps: int = 1000,
    batch_size: int = 32,
    lr: float = 1e-3,
    loss: str = "mse",
    temperature: float = 4.0,
    weight_decay: float = 0.0,
    warmup: int | None = None,
    clip: float | None = 1.0,
    train_all: bool = False,
    bn_train: bool = False,
    eval_data: Any = None,
    eval_every: int = 100,
    checkpoint_dir: str | os.PathLike[str] | None = None,
    checkpoint_every: int = 100,
    resume: bool = False,
    log: str | os.PathLike[str] | None = None,
    seed: int = 0,
    progress: ProgressFn | None = None,
    augment: Callable[[Tensor], Tensor] | None = None,
    tensorboard: str | os.PathLike[str] | None = None,
) -> DistillResult:
    """Train ``student`` to reproduce ``teacher``'s outputs on ``data`` (no labels needed).

    Args:
        student: the converted model (or its :class:`ConversionResult`); trained in place.
        teacher: the original model; never changes (eval mode, no gradients).
        data: a ``Dataset`` (map-style or iterable), a ``DataLoader`` (its dataset is used), an iterable of samples,
            or a tensor of samples along dim 0. A sample is a tensor, or ``(input, label)`` (label ignored).
        steps, batch_size: optimiser steps and the *global* batch (split across processes under torchrun).
        lr, weight_decay, warmup, clip: AdamW, linear warm-up (default steps/20) then cosine decay, gradient norm clip.
        loss: ``"mse"`` on every floating output, ``"kl"`` on logits with ``temperature``, ``"feature"``: the
            outputs of the converted layers against the teacher's convs at the same qualnames, or ``"both"``
            (mse + feature).
        augment: a callable applied to each batch of inputs before teacher and student see it (e.g. noise, crops).
        train_all: train every parameter, not only the converted pairs.
        bn_train: BatchNorm in train mode (statistics update); by default the student runs in eval mode.
        eval_data: held-out samples (same forms as ``data``); the weights with the lowest eval loss are kept.
        checkpoint_dir, checkpoint_every, resume: write ``checkpoint.pt`` atomically every so many steps (and when
            interrupted); ``resume=True`` continues from it and ends with the weights an uninterrupted run would.
        log: one line per logged step (rank 0 only): JSON lines, or CSV when the name ends in ``.csv``.
        tensorboard: a TensorBoard log directory (needs the tensorboard package).

    Examples:
        >>> import torch, sepify
        >>> teacher = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 3)).eval()
        >>> student = sepify.convert(teacher, torch.randn(1, 3, 12, 12), rank=1).model
        >>> result = sepify.distill(student, teacher, torch.randn(64, 3, 12, 12), steps=20, batch_size=16)
        >>> result.history[-1].loss < result.history[0].loss
        True
    """
    model = student.model if isinstance(student, ConversionResult) else student
    _check_options(steps, batch_size, lr, loss, eval_every, checkpoint_every)
    rank, world = _distributed()
    if batch_size % world:
        raise ConfigError(f"batch_size {batch_size} must be divisible by the {world} processes")
    batches = _Batches(data, batch_size, seed, rank, world)
    evals = (
        _Batches(eval_data, min(batch_size, _length(eval_data)), seed + 1, rank, world)
        if eval_data is not None
        else None
    )
    pairs = [m for m in model.modules() if isinstance(m, SeparableConv)]
    trainable = list(model.parameters()) if train_all else [p for m in pairs for p in m.parameters()]
    if not trainable:
        raise ConfigError("nothing to distill: the student has no converted layers; pass train_all=True")
    for p in model.parameters():
        p.requires_grad_(False)
    for p in trainable:
        p.requires_grad_(True)
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    model.train(bn_train)
    wrapped: nn.Module = model
    if world > 1:
        wrapped = nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(steps, warmup or max(1, steps // 20)))
    run = _Run(steps, batch_size, lr, loss, seed, world, sum(p.numel() for p in trainable))
    checkpoint = Path(checkpoint_dir) / "checkpoint.pt" if checkpoint_dir is not None else None
    start = 0
    history: list[DistillStep] = []
    best: tuple[float, int, dict[str, Any] | None] = (math.inf, 0, None)
    notes: list[str] = []
    if resume:
        start, history, best = _load_checkpoint(checkpoint, run, model, optimizer, scheduler, rank)
        notes.append(f"resumed from step {start}")
    logger = _Log(log, rank, append=resume, tensorboard=tensorboard)
    taps = _FeatureTaps(model, teacher) if loss in ("feature", "both") else None
    completed = start  # steps whose update is in the weights: what a checkpoint taken now holds
    device = _device(model)
    try:
        t0, seen = time.perf_counter(), 0
        for step in range(start, steps):
            torch.manual_seed((seed * 1_000_003 + step) * 64 + rank)  # dropout etc.: a function of the step
            x = batches(step).to(device)
            if augment is not None:
                x = augment(x)
            with torch.no_grad(), _autocast(x):
                target = teacher(x)
            optimizer.zero_grad(set_to_none=True)
            with _autocast(x):
                value = _objective(wrapped(x), target, loss, temperature, taps)
            loss_value = float(value.detach())  # one device sync per step
            if not math.isfinite(loss_value):
                notes.append(f"the loss became {loss_value} at step {step + 1}; stopped there")
                break
            value.backward()  # type: ignore[no-untyped-call]
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(trainable, clip)
            optimizer.step()
            scheduler.step()
            completed = done = step + 1
            seen += x.shape[0] * world
            if done % eval_every == 0 or done == steps or done == start + 1:
                eval_loss = _eval_loss(model, teacher, evals, loss, temperature, taps) if evals is not None else None
                rate = seen / max(time.perf_counter() - t0, 1e-9)
                entry = DistillStep(done, _mean_over_ranks(value), float(scheduler.get_last_lr()[0]), rate, eval_loss)
                history.append(entry)
                logger.write(entry)
                if eval_loss is not None and eval_loss < best[0]:
                    best = (eval_loss, done, {k: v.detach().clone() for k, v in model.state_dict().items()})
            if progress is not None and rank == 0:
                progress(f"distilling (loss {loss_value:.4g})", done, steps)
            if checkpoint is not None and done % checkpoint_every == 0 and done < steps:
                _save_checkpoint(checkpoint, run, done, model, optimizer, scheduler, history, best, rank)
    except (KeyboardInterrupt, SystemExit):
        if checkpoint is not None and completed > start:
            _save_checkpoint(checkpoint, run, completed, model, optimizer, scheduler, history, best, rank)
        raise
    finally:
        if taps is not None:
            taps.remove()
        logger.close()
    if best[2] is not None:
        model.load_state_dict(best[2])
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return DistillResult(model, tuple(history), best[1], world, batch_size, start if resume else None, tuple(notes))


def _mean_over_ranks(value: Tensor) -> float:
    """The global batch's loss: each process's loss is over its own share."""
    if not dist.is_initialized():
        return float(value.detach())
    total = value.detach().double().reshape(1).cpu()
    dist.all_reduce(total)
    return float(total) / dist.get_world_size()


def _length(data: Any) -> int:
    if isinstance(data, DataLoader):
        data = data.dataset
    if isinstance(data, Tensor):
        return int(data.shape[0])
    return len(data) if hasattr(data, "__len__") else 32


def _device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def _check_options(steps: int, batch_size: int, lr: float, loss: str, eval_every: int, checkpoint_every: int) -> None:
    for name, value in (("steps", steps), ("batch_size", batch_size), ("eval_every", eval_every),
                        ("checkpoint_every", checkpoint_every)):  # fmt: skip
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")
    if not (isinstance(lr, (int, float)) and lr > 0 and math.isfinite(lr)):
        raise ConfigError(f"lr must be a positive number, got {lr!r}")
    if loss not in LOSSES:
        raise ConfigError(f"loss must be one of {', '.join(LOSSES)}, got {loss!r}")


def _objective(student_out: Any, teacher_out: Any, loss: str, temperature: float, taps: _FeatureTaps | None) -> Tensor:
    """The training loss: output matching, feature matching, or their sum."""
    if loss == "feature":
        assert taps is not None
        return taps.loss()
    value = _loss(student_out, teacher_out, "mse" if loss == "both" else loss, temperature)
    return value + taps.loss() if taps is not None else value


def _autocast(x: Tensor) -> Any:
    """bf16 autocast on CUDA where the device supports it; nothing elsewhere."""
    if x.is_cuda and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _eval_loss(
    model: nn.Module, teacher: nn.Module, evals: _Batches, loss: str, temperature: float, taps: _FeatureTaps | None
) -> float:
    """The eval loss over the eval data (one pass, averaged over every process)."""
    flag = model.training
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for k in range(max(1, evals.length // evals.batch_size)):
            x = evals(k).to(_device(model))
            with _autocast(x):
                value = _objective(model(x), teacher(x), loss, temperature, taps)
            total += float(value) * x.shape[0]
            count += x.shape[0]
    model.train(flag)
    if dist.is_initialized():
        summed = torch.tensor([total, count], dtype=torch.float64)
        dist.all_reduce(summed)
        total, count = float(summed[0]), int(summed[1])
    return total / max(count, 1)


class _Log:
    """One record per logged step, rank 0 only: JSON lines (CSV for a .csv name), and TensorBoard when asked."""

    def __init__(
        self, path: str | os.PathLike[str] | None, rank: int, append: bool, tensorboard: str | os.PathLike[str] | None
    ) -> None:
        self.path = Path(path) if path is not None and rank == 0 else None
        self.csv = self.path is not None and self.path.suffix.lower() == ".csv"
        if self.path is not None and not append:
            self.path.write_text(",".join(DistillStep.__dataclass_fields__) + "\n" if self.csv else "")
        self.board: Any = None
        if tensorboard is not None and rank == 0:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise ConfigError("tensorboard logging needs the tensorboard package; pip install tensorboard") from e
            self.board = SummaryWriter(str(tensorboard))

    def write(self, entry: DistillStep) -> None:
        if self.path is not None:
            row = asdict(entry)
            line = ",".join("" if v is None else str(v) for v in row.values()) if self.csv else json.dumps(row)
            with self.path.open("a") as f:
                f.write(line + "\n")
        if self.board is not None:
            for key in ("loss", "lr", "samples_per_s", "eval_loss"):
                value = getattr(entry, key)
                if value is not None:
                    self.board.add_scalar(f"distill/{key}", value, entry.step)

    def close(self) -> None:
        if self.board is not None:
            self.board.close()


def _save_checkpoint(
    path: Path,
    run: _Run,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    history: Sequence[DistillStep],
    best: tuple[float, int, Any],
    rank: int,
) -> None:
    if rank != 0:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        "format": CHECKPOINT_FORMAT,
        "run": asdict(run),
        "step": step,
        "student": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "history": [asdict(h) for h in history],
        "best": {"loss": best[0], "step": best[1], "state": best[2]},
        "rng": {"python": _listed(random.getstate()), "numpy": _listed(np.random.get_state())},
    }
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def _listed(value: Any) -> Any:
    """RNG states as plain lists and numbers, so that the checkpoint loads with ``weights_only=True``."""
    if isinstance(value, (tuple, list)):
        return [_listed(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def _load_checkpoint(
    path: Path | None,
    run: _Run,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    rank: int,
) -> tuple[int, list[DistillStep], tuple[float, int, Any]]:
    if path is None:
        raise ConfigError("resume=True needs checkpoint_dir (where the interrupted run wrote checkpoint.pt)")
    if not path.is_file():
        raise OutputError(f"{path}: no checkpoint to resume from; run without --resume first")
    try:
        state = torch.load(path, map_location=_device(model), weights_only=True)
    except Exception as e:  # noqa: BLE001 - a damaged checkpoint fails in many ways
        raise OutputError(
            f"{path}: the checkpoint cannot be read ({type(e).__name__}); delete it and start over"
        ) from e
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise OutputError(f"{path}: is not a sepify distillation checkpoint")
    if not run.matches(state["run"]):
        raise ConfigError(
            f"{path}: the checkpoint is from another run ({state['run']}); resume with the same steps, batch size, "
            f"lr, loss, seed and process count ({asdict(run)}), or use another checkpoint directory"
        )
    model.load_state_dict(state["student"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    version, internal, gauss = state["rng"]["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["rng"]["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    best = state["best"]
    return state["step"], [DistillStep(**h) for h in state["history"]], (best["loss"], best["step"], best["state"])
