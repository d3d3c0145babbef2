"""The run's log: one record per logged step, by the first process only.

JSON lines, or CSV when the name ends in ``.csv``; the whole file is rewritten atomically at every record (a log
is small), so it is always complete and a resumed run's log is exactly its checkpoint's history plus what follows.
TensorBoard scalars too, when asked for.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sepify.errors import ConfigError
from sepify.io.atomic import write_text_atomic

__all__ = ["DistillStep", "RunLog"]


@dataclass(frozen=True)
class DistillStep:
    """One logged step: training loss, learning rate, samples/s, and the held-out loss when it was measured."""

    step: int
    loss: float
    lr: float
    samples_per_s: float
    eval_loss: float | None = None


_COLUMNS = tuple(DistillStep.__dataclass_fields__)


class RunLog:
    """Where records go (nothing when ``path`` and ``tensorboard`` are None or this is not the first process)."""

    def __init__(
        self,
        path: str | os.PathLike[str] | None,
        first_process: bool,
        tensorboard: str | os.PathLike[str] | None = None,
        history: list[DistillStep] | None = None,
    ) -> None:
        self.path = Path(path) if path is not None and first_process else None
        self.records = list(history or [])
        self.board: Any = None
        if tensorboard is not None and first_process:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise ConfigError("tensorboard logging needs the tensorboard package; pip install tensorboard") from e
            self.board = SummaryWriter(str(tensorboard))
        if self.path is not None:
            self._flush()

    def write(self, entry: DistillStep) -> None:
        self.records.append(entry)
        if self.path is not None:
            self._flush()
        if self.board is not None:
            for key in ("loss", "lr", "samples_per_s", "eval_loss"):
                value = getattr(entry, key)
                if value is not None:
                    self.board.add_scalar(f"distill/{key}", value, entry.step)

    def _flush(self) -> None:
        assert self.path is not None
        if self.path.suffix.lower() == ".csv":
            rows = [",".join(_COLUMNS)]
            rows += [
                ",".join("" if getattr(r, c) is None else str(getattr(r, c)) for c in _COLUMNS) for r in self.records
            ]
        else:
            rows = [json.dumps({c: getattr(r, c) for c in _COLUMNS}) for r in self.records]
        write_text_atomic(self.path, "".join(row + "\n" for row in rows), overwrite=True)

    def close(self) -> None:
        if self.board is not None:
            self.board.close()
