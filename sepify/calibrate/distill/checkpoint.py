"""Distillation checkpoints: written atomically, read with ``weights_only=True``, checked field by field.

A checkpoint holds what an uninterrupted run would hold at its step: the student's weights, the optimiser and
schedule, the log so far, the best held-out weights, Python's and NumPy's RNG (torch's is re-seeded from the step).
Before a resume every field is checked against the run that resumes (its options, the student's parameter names
and shapes, finite values), so a damaged or foreign checkpoint is one sentence, never a traceback halfway in.
"""

from __future__ import annotations

import os
import random
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from sepify.errors import CheckpointError, ConfigError, OutputError, first_line
from sepify.io.atomic import atomic_path

__all__ = ["RunIdentity", "CheckpointState", "FILENAME", "prepare_folder", "save_checkpoint", "load_checkpoint"]

FORMAT = "sepify.distill-checkpoint"
VERSION = 2
FILENAME = "checkpoint.pt"
_FIELDS = ("format", "version", "run", "step", "student", "optimizer", "scheduler", "history", "best", "rng")


@dataclass(frozen=True)
class RunIdentity:
    """What makes two runs the same run: a checkpoint from another is refused."""

    steps: int
    batch_size: int
    lr: float
    loss: str
    seed: int
    world: int
    trainable: int  # parameters trained


@dataclass
class CheckpointState:
    """What a run resumes with."""

    step: int
    history: list[dict[str, Any]]
    best: tuple[float, int, dict[str, Tensor] | None]


def prepare_folder(folder: Path) -> None:
    """Create the checkpoint folder if needed; a sentence if it is a file or cannot be made or written."""
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"{folder}: the checkpoint folder is a file; pass a folder as --checkpoint-dir")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(
            f"{folder}: the checkpoint folder cannot be made ({e.strerror or e}); pass another --checkpoint-dir"
        ) from e
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputError(f"{folder}: the checkpoint folder is not writable; pass another --checkpoint-dir")


def save_checkpoint(
    path: Path,
    run: RunIdentity,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    history: list[dict[str, Any]],
    best: tuple[float, int, dict[str, Tensor] | None],
) -> None:
    """Write the checkpoint of ``step`` atomically (the previous one stays whole until the new one is complete)."""
    state = {
        "format": FORMAT,
        "version": VERSION,
        "run": asdict(run),
        "step": step,
        "student": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "history": history,
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


def load_checkpoint(
    path: Path, run: RunIdentity, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any
) -> CheckpointState:
    """Check the checkpoint at ``path`` against this run, then load it into ``model``, ``optimizer`` and
    ``scheduler`` and restore the RNG; nothing is loaded unless every field is right.

    Raises:
        CheckpointError: no checkpoint, an unreadable or damaged one, or one from another run.
    """
    if not path.is_file():
        raise CheckpointError(f"{path}: no checkpoint to resume from; run without --resume first")
    try:
        state = torch.load(path, map_location=_device(model), weights_only=True)
    except Exception as e:  # noqa: BLE001 - a damaged checkpoint fails in many ways
        raise CheckpointError(
            f"{path}: the checkpoint cannot be read ({first_line(e)}); delete it and start over"
        ) from e
    _check(path, state, run, model)
    try:
        model.load_state_dict(state["student"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        _restore_rng(state["rng"])
    except Exception as e:  # noqa: BLE001 - what the field checks cannot foresee
        raise CheckpointError(f"{path}: the checkpoint does not fit this run ({first_line(e)}); start over") from e
    best = state["best"]
    return CheckpointState(state["step"], list(state["history"]), (best["loss"], best["step"], best["state"]))


def _check(path: Path, state: Any, run: RunIdentity, model: nn.Module) -> None:
    def refuse(what: str) -> CheckpointError:
        return CheckpointError(f"{path}: {what}; delete it and start over, or pass another --checkpoint-dir")

    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise refuse("is not a sepify distillation checkpoint")
    missing = [f for f in _FIELDS if f not in state]
    if missing or state.get("version") != VERSION:
        raise refuse(f"is damaged or from another sepify version (missing {missing or 'nothing'}, version "
                     f"{state.get('version')!r}, this one reads {VERSION})")  # fmt: skip
    if state["run"] != asdict(run):
        raise ConfigError(
            f"{path}: the checkpoint is from another run ({state['run']}); resume with the same steps, batch size, "
            f"lr, loss, seed and process count ({asdict(run)}), or use another checkpoint directory"
        )
    step = state["step"]
    if not isinstance(step, int) or not 0 <= step <= run.steps:
        raise refuse(f"holds step {step!r}, outside this run's 0..{run.steps}")
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    _check_tensors(state["student"], expected, "the student's weights", refuse)
    best = state["best"]
    if not isinstance(best, dict) or not isinstance(best.get("step"), int) or not isinstance(best.get("loss"), float):
        raise refuse("holds a damaged record of the best weights")
    if best.get("state") is not None:
        _check_tensors(best["state"], expected, "the best weights", refuse)
    optimizer = state["optimizer"]
    if not isinstance(optimizer, dict) or not isinstance(optimizer.get("state"), dict):
        raise refuse("holds a damaged optimiser state")
    for slot in optimizer["state"].values():
        for name, value in slot.items() if isinstance(slot, dict) else ():
            if isinstance(value, Tensor) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
                raise refuse(f"holds non-finite optimiser state ({name})")
    history = state["history"]
    if not isinstance(history, list) or not all(
        isinstance(h, dict) and isinstance(h.get("step"), int) for h in history
    ):
        raise refuse("holds a damaged log")
    rng = state["rng"]
    if not isinstance(rng, dict) or not isinstance(rng.get("python"), list) or not isinstance(rng.get("numpy"), list):
        raise refuse("holds a damaged random-number state")


def _check_tensors(tensors: Any, expected: Mapping[str, tuple[int, ...]], what: str, refuse: Any) -> None:
    if not isinstance(tensors, dict) or not all(isinstance(v, Tensor) for v in tensors.values()):
        raise refuse(f"holds {what} in a damaged form")
    shapes = {k: tuple(v.shape) for k, v in tensors.items()}
    if shapes != dict(expected):
        other = sorted(set(shapes) ^ set(expected)) or [k for k in expected if shapes.get(k) != expected[k]]
        raise refuse(f"holds {what} of another model (first difference: {other[0]!r})")
    for k, v in tensors.items():
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            raise refuse(f"holds NaN or infinite values in {what} ({k})")


def _restore_rng(rng: dict[str, Any]) -> None:
    version, internal, gauss = rng["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = rng["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


def _device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")
