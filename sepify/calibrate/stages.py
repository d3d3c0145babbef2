"""The calibration stages after the closed-form initialisation, each judged on held-out data.

In order: refinement of each pair's last factor, BatchNorm statistics refresh
(kept only if held-out fidelity improves), and distillation. Every stage is
measured on the held-out batches and recorded as a :class:`FidelityStage`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from sepify.calibrate.batchnorm import refresh_batchnorm
from sepify.calibrate.data import CalibrationData, near_duplicate_groups
from sepify.calibrate.distill import Samples, train, trainable_parameters
from sepify.calibrate.refine import refine_pairs
from sepify.calibrate.verify import heldout_fidelity
from sepify.core.modules import SeparableConv, dense_kernels
from sepify.errors import CalibrationError, first_line
from sepify.graph.measured import OutputView, viewed
from sepify.graph.probe import describe_inputs, float_leaves
from sepify.options import Calibration, Distill

__all__ = ["FidelityStage", "calibrate_pairs", "grouped_by_outputs"]

ProgressFn = Callable[[str, int, int], None]


@dataclass(frozen=True)
class FidelityStage:
    """Fidelity on held-out calibration data after one stage (init, refined, bn-refreshed, distilled)."""

    stage: str
    output_error: float | None
    top1_agreement: float | None
    samples: int

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


COVERAGE_NOTE = 0.1  # a layer whose calibration coverage is below this gets a note (natural activations: 0.1-0.7)
_SKETCH = 512  # dimensions of the output sketches compared to find near-duplicate samples


def grouped_by_outputs(model: nn.Module, batch: int = 32) -> Callable[[tuple[Tensor, ...]], list[int]]:
    """A ``group_by`` for :func:`calibration_batches`: samples whose outputs from ``model`` nearly coincide.

    Frames cut from one recording, or crops of one photo, make the original
    model answer (nearly) the same; holding such groups out whole makes the
    held-out error a measure of unseen recordings. Outputs are compared as
    fixed random sketches (count sketch, 512 numbers), so large outputs cost
    little memory.
    """

    def group(samples: tuple[Tensor, ...]) -> list[int]:
        count = samples[0].shape[0]
        sketches = []
        with _eval_mode(model), torch.no_grad():
            for i in range(0, count, batch):
                args = tuple(a[i : i + batch] for a in samples)
                outputs = _run_on_calibration(model, args)
                size = args[0].shape[0]
                leaves = float_leaves(outputs)
                if not leaves or any(t.dim() == 0 or t.shape[0] != size for t in leaves):
                    return list(range(count))  # outputs not batched per sample (detections...): every sample alone
                sketches.append(_count_sketch(torch.cat([t.reshape(size, -1).double() for t in leaves], dim=1)))
        return near_duplicate_groups(torch.cat(sketches))

    return group


def _count_sketch(rows: Tensor) -> Tensor:
    """Each row summed into ``_SKETCH`` buckets with fixed signs: cosine similarities are about kept."""
    gen = torch.Generator().manual_seed(0)
    signs = (torch.randint(0, 2, (rows.shape[1],), generator=gen) * 2 - 1).to(rows)
    buckets = (torch.arange(rows.shape[1]) % _SKETCH).to(rows.device)
    out = rows.new_zeros(rows.shape[0], _SKETCH)
    return out.index_add_(1, buckets, rows * signs)


def calibrate_pairs(
    teacher: nn.Module,
    student: nn.Module,
    pairs: Mapping[str, SeparableConv],
    calls: Mapping[str, int],
    data: CalibrationData,
    options: Calibration,
    distillation: Distill | None,
    progress: ProgressFn | None = None,
    view: OutputView | None = None,
) -> tuple[tuple[FidelityStage, ...], list[str]]:
    """Refine, refresh BatchNorm and distill the ``pairs`` of ``student`` against ``teacher``.

    ``calls`` gives each pair's call count in execution order (the probe saw
    first calls in this order); pairs that run at several call sites are not
    refined (one refit cannot fit them all). Both models are run in eval mode
    and every module's own mode is restored. Returns the measured stages and
    notes for the report.
    """
    run = _Run(teacher, student, data, progress, view)
    with _eval_mode(teacher, student):
        _check_batches(teacher, data)
        # measured and refit with the pairs' dense kernels where those are cheaper (the same function)
        with dense_kernels(student):
            run.measure("init")
            if options.refine:
                run.refine(pairs, calls)
                if options.refresh_bn:
                    run.refresh_bn()
        if distillation is not None:
            run.distill(pairs, distillation)
    return tuple(run.stages), run.notes


class _Run:
    """One calibration run: each stage changes the student, then is measured on the held-out batches."""

    def __init__(
        self,
        teacher: nn.Module,
        student: nn.Module,
        data: CalibrationData,
        progress: ProgressFn | None,
        view: OutputView | None = None,
    ):
        self.teacher, self.student, self.data, self.progress = teacher, student, data, progress
        self.view = view  # outputs measured before a saturating activation (their logits)
        self.samples = data.given_heldout_samples  # the user's own; their rescaled copies are judged on too
        self.stages: list[FidelityStage] = []
        self.notes: list[str] = []
        self.references: list[Any] | None = None  # the original's held-out outputs, computed once

    def measure(self, stage: str) -> FidelityStage:
        if self.references is None:
            self.references = [viewed(self.teacher, args, self.view) for args in self.data.heldout]
        err, top1 = heldout_fidelity(self.references, self.student, self.data.heldout, self._forward)
        self.stages.append(FidelityStage(stage, err, top1, self.samples))
        return self.stages[-1]

    def _forward(self, model: nn.Module, args: tuple[Any, ...]) -> Any:
        return viewed(model, args, self.view)

    def refine(self, pairs: Mapping[str, SeparableConv], calls: Mapping[str, int]) -> None:
        for name in pairs:
            if calls.get(name, 0) > 1:
                self.notes.append(f"did not refine {name}: it runs at {calls[name]} call sites, and the refit fits one")
        order = [(n, pairs[n]) for n in calls if n in pairs and calls[n] == 1]
        data = self.data
        before = {n: {k: v.detach().clone() for k, v in pair.state_dict().items()} for n, pair in order}
        result = refine_pairs(self.teacher, self.student, order, data.fit, data.heldout, self.progress)
        self.notes += [f"did not refine {name}: {why}" for name, why in result.skipped.items()]
        self.notes += [
            f"calibration covers little of {name}'s input space (coverage {span:.3f}, 1.0 for white input): its "
            "refinement leaned on the weights; more varied samples would let the data correct more"
            for name, span in result.coverage.items()
            if span < COVERAGE_NOTE
        ]
        init = self.stages[-1]
        if _worse(self.measure("refined"), init):
            # each refit was kept only where it helped its own layer; together they can still hurt the model
            refined = self.stages.pop()
            for name, pair in order:
                pair.load_state_dict(before[name])
            self.notes.append(
                f"refinement raised the held-out output error ({init.output_error:.3g} -> {refined.output_error:.3g}), "
                "so the closed-form pairs were kept"
            )

    def refresh_bn(self) -> None:
        """Recompute BatchNorm statistics on the user's own fit samples (rescaled copies would shift them off the
        inputs the model will see); put the old ones back if held-out fidelity got worse."""
        student = self.student
        saved = {k: v.clone() for k, v in student.state_dict().items() if "running_" in k or "num_batches" in k}
        if not saved or not refresh_batchnorm(student, self.data.given_fit):
            return
        refined = self.stages[-1]
        if _worse(self.measure("bn-refreshed"), refined):
            student.load_state_dict(saved, strict=False)
            self.stages.pop()
            self.notes.append("recomputed BatchNorm statistics were worse on held-out data; kept the original ones")

    def distill(self, pairs: Mapping[str, SeparableConv], options: Distill) -> None:
        """The distillation engine on the fit batches, judged on the held-out ones (the best weights are kept)."""
        student, data = self.student, self.data
        trainable = trainable_parameters(student, options.train_all)
        if not options.train_all:  # the pairs this conversion made (a student may hold others)
            mine = {id(p) for m in pairs.values() for p in m.parameters()}
            trainable = [p for p in trainable if id(p) in mine]
        batches = _fit_batches(data.fit, options)
        outcome = train(student, self.teacher, batches, options, trainable=trainable, evals=data.heldout,
                        progress=self.progress)  # fmt: skip
        self.notes += list(outcome.notes)
        if outcome.best_step == 0:
            self.notes.append("distillation did not lower the held-out loss, so the weights before it were kept")
        self.measure("distilled")


def _fit_batches(fit: tuple[tuple[Any, ...], ...], options: Distill) -> Samples | _Cycled:
    """The fit samples as one source of ``options.batch_size`` batches; batches of different sample sizes (an
    image pyramid) stay as they are, in turn."""
    shapes = {tuple(tuple(a.shape[1:]) for a in args) for args in fit}
    if len(shapes) > 1 or not all(isinstance(a, Tensor) for args in fit for a in args):
        return _Cycled(fit)
    samples = tuple(torch.cat([args[k] for args in fit]) for k in range(len(fit[0])))
    size = min(options.batch_size, int(samples[0].shape[0]))
    return Samples(samples, size, seed=options.seed, n_args=len(samples), what="the calibration data")


class _Cycled:
    """Prepared batches, one per step, in turn."""

    def __init__(self, batches: tuple[tuple[Any, ...], ...]) -> None:
        self.batches = batches
        self.batch_size = int(batches[0][0].shape[0])

    def __call__(self, step: int) -> tuple[Any, ...]:
        return self.batches[step % len(self.batches)]

    def passes(self) -> Iterator[tuple[Any, ...]]:
        return iter(self.batches)


@contextlib.contextmanager
def _eval_mode(*modules: nn.Module) -> Iterator[None]:
    """Calibration measures the deployed (eval) behaviour; every module's own flag is restored."""
    saved = [(m, m.training) for root in modules for m in root.modules()]
    for root in modules:
        root.eval()
    try:
        yield
    finally:
        for m, flag in saved:
            m.training = flag


def _check_batches(teacher: nn.Module, data: CalibrationData) -> None:
    """Fail with a sentence, not a traceback from deep inside the model, if calibration data does not fit."""
    for args in (data.fit[0], data.heldout[0]):
        with torch.no_grad():
            _run_on_calibration(teacher, args)


def _run_on_calibration(model: nn.Module, args: tuple[Any, ...]) -> Any:
    try:
        return model(*args)
    except Exception as e:  # noqa: BLE001 - any failure of user code on user data is an input problem
        raise CalibrationError(
            f"the model failed on calibration batch {describe_inputs(args)}: {first_line(e)}; pass "
            "calibration samples shaped like the example inputs"
        ) from e


def _worse(a: FidelityStage, b: FidelityStage) -> bool:
    if a.output_error is None or b.output_error is None:
        return False
    if math.isnan(a.output_error) or math.isnan(b.output_error):
        return math.isnan(a.output_error) and not math.isnan(b.output_error)  # NaN is worse than any number
    return a.output_error > b.output_error
