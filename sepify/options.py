"""Option objects for :func:`sepify.convert` and :func:`sepify.audit`.

Each groups the settings of one pipeline stage (which convs, calibration,
distillation, timing), validates itself on construction with a one-sentence
:class:`~sepify.errors.ConfigError`, and is frozen, like torch.ao's config
objects. Plain values keep working where their meaning is obvious: see each
class's ``of``.
"""

from __future__ import annotations

import math
import operator
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from sepify.errors import ConfigError
from sepify.vocab import BACKENDS, LOSSES, OPTIMIZERS, SCHEDULES

__all__ = ["Selection", "Calibration", "Distill", "Timing", "Budget", "DEFAULT_BUDGET", "LATENCY_BACKENDS", "as_int"]

LATENCY_BACKENDS = BACKENDS  # where time is measured


def as_int(value: Any, what: str, minimum: int) -> int:
    """``value`` as a Python int >= ``minimum`` (numpy integers too; bools refused)."""
    try:
        number = operator.index(value) if not isinstance(value, bool) else None
    except TypeError:
        number = None
    if number is None or number < minimum:
        raise ConfigError(f"{what} must be an integer >= {minimum}, got {value!r}")
    return number


def _globs(what: str, patterns: Sequence[str] | str | None) -> tuple[str, ...] | None:
    if patterns is None:
        return None
    if isinstance(patterns, str):
        return (patterns,)  # a lone glob is a common slip; accept it
    if not all(isinstance(p, str) for p in patterns):
        raise ConfigError(f"{what} must be a list of glob strings, got {patterns!r}")
    return tuple(patterns)


@dataclass(frozen=True)
class Selection:
    """Which convs may be converted.

    Args:
        include: glob patterns over conv qualnames; only matches convert.
        exclude: glob patterns over conv qualnames to leave alone.
        skip_shared: leave convs that run more than once per forward (shared
            heads, recurrent blocks) alone; by default one pair replaces them
            at every call site.
        allow_larger: build a pair even where the integer rank asked for makes
            it larger (more params or MACs) than its conv; by default such convs
            are skipped as ``no-saving``. Rank ``"full"`` and plans always build.

    Examples:
        >>> Selection(include="layer1.*").include
        ('layer1.*',)
    """

    include: Sequence[str] | None = None
    exclude: Sequence[str] | None = None
    skip_shared: bool = False
    allow_larger: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "include", _globs("include", self.include))
        object.__setattr__(self, "exclude", _globs("exclude", self.exclude))


@dataclass(frozen=True)
class Calibration:
    """Unlabelled inputs and what to do with them.

    Args:
        data: a tensor ``(N, ...)``, a DataLoader or iterable of batches
            (labels after the model's arguments are dropped), a callable
            returning either, or ``"synthetic"`` when there is no data:
            inputs synthesised to match the model's BatchNorm statistics
            (:func:`sepify.synthesize_calibration`; BatchNorm statistics are
            then not recomputed).
        samples: use at most this many samples (``"synthetic"``: synthesise
            this many, 64 by default).
        heldout: share of the samples kept back to judge every stage.
        refine: closed-form least-squares refinement of each pair's last
            factor (in :func:`~sepify.audit`: also predict errors after it).
        refresh_bn: recompute BatchNorm statistics after refining, kept only
            if held-out fidelity improves.
        augment: ``"auto"`` (default): where the samples are a few sources cut
            into many (frames of a few recordings: at most half as many
            near-duplicate groups as samples), add to every fit and held-out
            sample a copy rescaled along its spatial axes by up to half an
            octave either way (a recording sped up or slowed down, a photo
            zoomed), so that the refit is fit and judged a little beyond the
            range of the recordings (:mod:`sepify.calibrate.augment`; models
            of one tensor argument); ``True``: always; ``False``: never; or a
            function of a batch of inputs whose result is added as copies.
    """

    data: Any
    samples: int | None = None
    heldout: float = 0.2
    refine: bool = True
    refresh_bn: bool = True
    augment: bool | str | Callable[[Any], Any] = "auto"

    def __post_init__(self) -> None:
        if self.data is None:
            raise ConfigError("Calibration needs data: a tensor, a DataLoader or a list of batches")
        if isinstance(self.data, str) and self.data != "synthetic":
            raise ConfigError(
                f"calibration data must be a tensor, a DataLoader, a list of batches or 'synthetic', got {self.data!r}"
            )
        if self.samples is not None:
            object.__setattr__(self, "samples", as_int(self.samples, "calibration samples", 1))
        if not (isinstance(self.heldout, (int, float)) and 0 <= self.heldout < 1):
            raise ConfigError(f"the held-out share must be in [0, 1), got {self.heldout!r}")
        if not (isinstance(self.augment, bool) or self.augment == "auto" or callable(self.augment)):
            raise ConfigError(
                "the calibration augment must be 'auto', True, False or a function of a batch of inputs, "
                f"got {self.augment!r}"
            )

    @classmethod
    def of(cls, value: Calibration | Any | None) -> Calibration | None:
        """``None`` stays None; anything but a :class:`Calibration` is its ``data``."""
        if value is None or isinstance(value, Calibration):
            return value
        return cls(value)


@dataclass(frozen=True)
class Distill:
    """Knowledge distillation of the converted model against the original: one engine, in
    :func:`sepify.convert` (on the calibration data) and :func:`sepify.distill` (on your data, at scale).

    The defaults bring the digits CNN converted at rank 1 back within a point of the original on its 1,400
    unlabelled training images (docs/benchmarks.md, ``benchmarks/distill.py``).

    Args:
        steps: optimiser steps (the data cycles).
        batch_size: samples per step, over all processes (capped at the calibration samples in convert).
        lr: peak learning rate.
        loss: what is matched (:class:`~sepify.vocab.Loss`): ``"mse"``, each floating output's squared error
            relative to the original's mean square (measured once); ``"kl"`` on ``(N, classes)`` logits, with
            ``temperature``; ``"feature"``, the converted layers' outputs against the original convs', relative
            likewise; ``"both"``, mse + feature.
        train_all: train every parameter, not only the converted pairs'.
        seed: seeds the data order and dropout, for reproducible runs.
        optimizer: ``"adamw"`` or ``"sgd"`` (momentum 0.9), with ``weight_decay``.
        schedule: ``"cosine"`` (to 0 at the last step) or ``"constant"``, after ``warmup`` steps of linear
            warm-up (default: steps / 20).
        clip: gradient norm clip (None: no clipping).
        eval_every: steps between held-out checks (default: steps / 20); the best weights are kept.
        patience: stop after this many checks without improvement (None: never stop early).
        feature_layers: the converted layers ``"feature"`` matches (default: all of them).
        bn_train: run the student's BatchNorm in train mode (statistics update); default eval mode.
        augment: applied to each batch of inputs before both models see it.
        checkpoint_dir: write ``checkpoint.pt`` there every ``checkpoint_every`` steps (and when interrupted),
            atomically; :func:`sepify.distill` ``resume=True`` continues from it.
        checkpoint_every: steps between checkpoints.
        tensorboard: a TensorBoard log directory (needs the tensorboard package).

    Examples:
        >>> Distill.of(300).steps
        300
        >>> Distill(loss="kl", lr=1e-3).loss
        'kl'
    """

    steps: int = 300
    batch_size: int = 64
    lr: float = 1e-2
    loss: str = "mse"
    train_all: bool = False
    seed: int = 0
    optimizer: str = "adamw"
    weight_decay: float = 0.0
    schedule: str = "cosine"
    warmup: int | None = None
    clip: float | None = 1.0
    temperature: float = 4.0
    eval_every: int | None = None
    patience: int | None = 5
    feature_layers: Sequence[str] | None = None
    bn_train: bool = False
    augment: Callable[[Any], Any] | None = None
    checkpoint_dir: str | os.PathLike[str] | None = None
    checkpoint_every: int = 100
    tensorboard: str | os.PathLike[str] | None = None

    def __post_init__(self) -> None:
        for name, minimum in (("steps", 1), ("batch_size", 1), ("checkpoint_every", 1), ("seed", 0)):
            object.__setattr__(self, name, as_int(getattr(self, name), f"the distillation {name}", minimum))
        for name in ("warmup", "eval_every", "patience"):
            if getattr(self, name) is not None:
                object.__setattr__(
                    self, name, as_int(getattr(self, name), f"the distillation {name}", 0 if name == "warmup" else 1)
                )
        for name, low in (("lr", 0.0), ("temperature", 0.0)):
            value = getattr(self, name)
            if not (
                isinstance(value, (int, float)) and not isinstance(value, bool) and value > low and math.isfinite(value)
            ):
                raise ConfigError(
                    f"the distillation {name.replace('lr', 'learning rate')} must be a positive number, got {value!r}"
                )
        for name in ("weight_decay", "clip"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float)) and value >= 0 and math.isfinite(value)):
                raise ConfigError(f"the distillation {name.replace('_', ' ')} must be a number >= 0, got {value!r}")
        for name, allowed in (("loss", LOSSES), ("optimizer", OPTIMIZERS), ("schedule", SCHEDULES)):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"the distillation {name} must be one of {allowed}, got {getattr(self, name)!r}")
            object.__setattr__(self, name, str(getattr(self, name)))
        if self.augment is not None and not callable(self.augment):
            raise ConfigError("the distillation augment must be a function of a batch of inputs")
        object.__setattr__(self, "feature_layers", _globs("feature_layers", self.feature_layers))

    @classmethod
    def of(cls, value: Distill | int | None) -> Distill | None:
        """``None`` or ``0``: no distillation; an int: that many steps."""
        if value is None or isinstance(value, Distill):
            return value
        steps = as_int(value, "distill", 0)
        return cls(steps=steps) if steps else None


@dataclass(frozen=True)
class Timing:
    """Measuring speed on this machine, at the example inputs' batch size and thread count.

    Args:
        latency: time each pair against the conv it replaces at the layer's
            input shape (interleaved medians, every layout, the fastest kept)
            and the whole converted model against the original.
        skip_slower: leave a conv alone when its pair was not faster
            (implies ``latency``).
        tune_layout: only pick each pair's fastest layout; no report columns.
        reps: timed repetitions per measurement.
        backend: where to measure: ``"eager"`` (PyTorch), ``"compile"``
            (``torch.compile`` with inductor: seconds per layer to compile;
            needs a C++ compiler on the CPU), ``"onnxruntime"``
            (each layer as its small ONNX graph, the whole model exported;
            the ``onnx`` extra) or ``"openvino"`` (the same layer graphs, the
            whole model through ``openvino.convert_model``; the ``openvino``
            extra). Pairs are judged faster or slower there.
        threads: threads for onnxruntime and OpenVINO (default: torch's; eager and compile run on torch's).

    Examples:
        >>> Timing(backend="onnxruntime", threads=1).describe()
        'onnxruntime, 1 thread'
    """

    latency: bool = True
    skip_slower: bool = False
    tune_layout: bool = False
    reps: int = 7
    backend: str = "eager"
    threads: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "reps", as_int(self.reps, "timing reps", 1))
        if self.backend not in LATENCY_BACKENDS:
            raise ConfigError(f"latency backend must be one of {LATENCY_BACKENDS}, got {self.backend!r}")
        if self.threads is not None:
            object.__setattr__(self, "threads", as_int(self.threads, "timing threads", 1))
        if self.skip_slower:
            object.__setattr__(self, "latency", True)

    def note(self) -> str:
        """The report note saying where latency was measured."""
        note = f"latency measured in {self.describe()} at the example inputs' batch size"
        if self.backend == "onnxruntime":  # the honest baseline: the original as fast as it can be shipped
            note += "; whole models (the original too) in the faster of torch.onnx's two exports"
        return note

    def describe(self) -> str:
        """Where and how time was measured, for reports: ``"eager PyTorch, 2 threads"``."""
        import torch

        threads = (self.threads if self.backend not in ("eager", "compile") else None) or torch.get_num_threads()
        where = {"eager": "eager PyTorch", "compile": "torch.compile"}.get(self.backend, self.backend)
        return f"{where}, {threads} thread{'s' if threads != 1 else ''}"

    @classmethod
    def of(cls, value: Timing | bool | None) -> Timing | None:
        """``True`` means ``Timing()``; ``None`` or ``False``: nothing is timed."""
        if value is None or value is False:
            return None
        if value is True:
            return cls()
        if isinstance(value, Timing):
            return value
        raise ConfigError(f"timing must be a sepify.Timing or a bool, got {type(value).__name__}")


@dataclass(frozen=True)
class Budget:
    """What a plan must fit: exactly one of four bounds. ``sepify.convert(model, x, plan=Budget(...))`` audits,
    plans and converts in one call; :meth:`sepify.AuditReport.plan` takes the same bounds.

    Args:
        max_mac_ratio: the converted model's MACs at most this share of the original's, with the least
            predicted output error.
        max_param_ratio: the same for parameters.
        max_latency_ratio: the same for measured latency (needs timing).
        max_error: the most MACs saved with a predicted relative output error at most this.

    Examples:
        >>> Budget(max_mac_ratio=0.5).bound
        ('max_mac_ratio', 0.5)
        >>> Budget(max_mac_ratio=1.5)
        Traceback (most recent call last):
        ...
        sepify.errors.ConfigError: max_mac_ratio must be in (0, 1], got 1.5
    """

    max_mac_ratio: float | None = None
    max_param_ratio: float | None = None
    max_latency_ratio: float | None = None
    max_error: float | None = None

    def __post_init__(self) -> None:
        given = {k: v for k, v in self.as_dict().items() if v is not None}
        if len(given) != 1:
            raise ConfigError(f"a budget takes exactly one bound ({', '.join(self.as_dict())}), got {len(given)}")
        ((kind, value),) = given.items()
        number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if kind == "max_error":
            if not (number and value >= 0):
                raise ConfigError(f"max_error must be a number >= 0, got {value!r}")
        elif not (number and 0 < value <= 1):
            raise ConfigError(f"{kind} must be in (0, 1], got {value!r}")
        object.__setattr__(self, kind, float(value))

    def as_dict(self) -> dict[str, float | None]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}

    @property
    def bound(self) -> tuple[str, float]:
        """``(kind, value)`` of the one bound given."""
        return next((k, v) for k, v in self.as_dict().items() if v is not None)

    def describe(self) -> str:
        """``"MACs <= 0.5x"``, ``"predicted output error <= 0.1"``."""
        kind, value = self.bound
        what = {"max_mac_ratio": "MACs", "max_param_ratio": "params", "max_latency_ratio": "latency"}.get(kind)
        return f"{what} <= {value:g}x" if what else f"predicted output error <= {value:g}"


# What `sepify.convert(model, x)` and `sepify convert MODEL` do with no rank, plan or budget: convert what keeps
# the predicted relative output error within 0.1 (never every conv at rank 1, which wrecks trained models).
DEFAULT_BUDGET = Budget(max_error=0.1)
