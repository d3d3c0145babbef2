"""What distillation matches: one function per :class:`~sepify.vocab.Loss`, one meaning per name.

* ``mse``: for each floating output tensor, the mean squared difference from the teacher's, divided by the mean
  square of the teacher's output (measured once, on the first training batch, over every process), summed over
  the outputs. Relative, so outputs of any scale weigh alike and one learning rate suits most models; the
  divisor is fixed, so the loss is a per-sample mean and ``W`` processes with batch ``b`` step exactly as one
  process with batch ``W*b``.
* ``kl``: the KL divergence of the softened logits (Hinton et al.), times ``temperature**2``; one ``(N, classes)``
  output.
* ``feature``: the same relative squared error on each converted layer's output against the teacher's conv of the
  same name, averaged over the layers.
* ``both``: ``mse`` + ``feature``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sepify.calibrate.distill.distributed import sum_over_processes
from sepify.core.modules import SeparableConv
from sepify.errors import ConfigError, ModelError
from sepify.graph.probe import float_leaves

__all__ = ["Objective"]


class _Taps:
    """Outputs of the student's pairs and of the teacher's convs at the same qualnames, captured by forward hooks.

    Pairs without a teacher counterpart (convs lifted from ``F.conv2d``) are left out.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, names: Sequence[str] | None) -> None:
        in_teacher = dict(teacher.named_modules())
        pairs = {n: m for n, m in student.named_modules() if isinstance(m, SeparableConv) and n in in_teacher}
        if names is not None:
            missing = [n for n in names if n not in pairs]
            if missing:
                raise ConfigError(
                    f"feature layers {missing} are not converted layers the teacher also has; choose among "
                    f"{list(pairs)[:8]}"
                )
            pairs = {n: pairs[n] for n in names}
        if not pairs:
            raise ConfigError("feature matching needs converted layers whose qualnames the teacher has; use loss='mse'")
        self.names = list(pairs)
        self.student: dict[str, Tensor] = {}
        self.teacher: dict[str, Tensor] = {}
        self.handles = [m.register_forward_hook(self._keep(self.student, n)) for n, m in pairs.items()]
        self.handles += [in_teacher[n].register_forward_hook(self._keep(self.teacher, n)) for n in pairs]

    @staticmethod
    def _keep(store: dict[str, Tensor], name: str) -> Callable[..., None]:
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            if isinstance(output, Tensor):
                store[name] = output

        return hook

    def taken(self) -> tuple[list[str], list[Tensor], list[Tensor]]:
        """The names, student outputs and teacher outputs of the layers that ran, emptied for the next batch."""
        names = [n for n in self.names if n in self.student and n in self.teacher]
        if not names:
            raise ModelError("no converted layer ran on the distillation batch, so features cannot be matched")
        found = names, [self.student[n] for n in names], [self.teacher[n].detach() for n in names]
        self.student.clear()
        self.teacher.clear()
        return found

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


class Objective:
    """The training loss of one run: :meth:`__call__` on the student's and teacher's outputs of one batch.

    Feature taps are hooks: the teacher's and the student's forward must both run on the batch before the call.
    :meth:`remove` takes the hooks off.
    """

    def __init__(
        self,
        loss: str,
        student: nn.Module,
        teacher: nn.Module,
        *,
        temperature: float = 4.0,
        feature_layers: Sequence[str] | None = None,
    ) -> None:
        self.loss, self.temperature = loss, temperature
        self.taps = _Taps(student, teacher, feature_layers) if loss in ("feature", "both") else None
        # the teacher outputs' mean squares: fixed once (fix_scales), else by the first batch the loss sees
        self.output_scale: list[float] | None = None
        self.feature_scale: dict[str, float] | None = None

    def fix_scales(self, teacher_out: Any) -> None:
        """Fix the relative losses' divisors from the teacher's outputs (and, through the taps, its convs' outputs)
        on one batch, over every process: what ``mse`` and ``feature`` are relative to for the whole run."""
        self.output_scale = _mean_squares(float_leaves(teacher_out))
        if self.taps is not None:
            names = [n for n in self.taps.names if n in self.taps.teacher]
            scales = _mean_squares([self.taps.teacher[n].detach() for n in names])
            self.feature_scale = dict(zip(names, scales))
            self.taps.teacher.clear()
            self.taps.student.clear()

    def __call__(self, student_out: Any, teacher_out: Any) -> Tensor:
        s, t = float_leaves(student_out), float_leaves(teacher_out)
        if not s or len(s) != len(t) or any(a.shape != b.shape for a, b in zip(s, t)):
            raise ModelError(
                "the student's outputs do not match the teacher's (structure or shapes differ); pass the model the "
                "student was converted from as the teacher"
            )
        if self.loss == "kl":
            return _kl(s, t, self.temperature)
        terms = []
        if self.loss in ("mse", "both"):
            if self.output_scale is None:
                self.output_scale = _mean_squares(t)
            terms.append(_relative_squared_error(s, t, self.output_scale))
        if self.taps is not None:
            names, fs, ft = self.taps.taken()
            if self.feature_scale is None:
                self.feature_scale = dict(zip(names, _mean_squares(ft)))
            scales = [self.feature_scale.get(n, 1.0) for n in names]
            terms.append(_relative_squared_error(fs, ft, scales) / len(fs))
        return terms[0] if len(terms) == 1 else terms[0] + terms[1]

    def remove(self) -> None:
        if self.taps is not None:
            self.taps.remove()


def _kl(student: list[Tensor], teacher: list[Tensor], temperature: float) -> Tensor:
    if len(student) != 1 or student[0].dim() != 2:
        raise ConfigError("loss='kl' needs a single (N, classes) logits output; use loss='mse'")
    log_p = F.log_softmax(student[0] / temperature, dim=1)
    q = F.softmax(teacher[0] / temperature, dim=1)
    return F.kl_div(log_p, q, reduction="batchmean") * temperature**2


def _mean_squares(tensors: list[Tensor]) -> list[float]:
    """Each tensor's mean square over every process's batch (at least 1e-12: an all-zero output)."""
    sums = sum_over_processes(*(float(t.detach().double().square().sum()) for t in tensors))
    counts = sum_over_processes(*(float(t.numel()) for t in tensors))
    return [max(total / max(count, 1.0), 1e-12) for total, count in zip(sums, counts)]


def _relative_squared_error(student: list[Tensor], teacher: list[Tensor], scale: list[float]) -> Tensor:
    total = student[0].new_zeros((), dtype=torch.float32)
    for a, b, s in zip(student, teacher, scale):
        total = total + F.mse_loss(a.float(), b.detach().float()) / s
    return total
