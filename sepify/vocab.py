"""sepify's vocabularies, each one ``str`` Enum whose values the API, JSON (reports, plans, checkpoints) and the
CLI share. Every list of names in the package is derived from these; nothing here imports torch.

Members compare equal to their values (``Order.DW_PW == "dw-pw"``), so plain strings work wherever a member does.
"""

from __future__ import annotations

import enum

__all__ = [
    "Order",
    "Layout",
    "Backend",
    "Format",
    "Loss",
    "Optimizer",
    "Schedule",
    "SkipReason",
    "TableFormat",
    "MemoryFormat",
    "values",
    "ORDERS",
    "SVD_ORDERS",
    "LAYOUTS",
    "BACKENDS",
    "FORMATS",
    "LOSSES",
    "OPTIMIZERS",
    "SCHEDULES",
]


class _Vocabulary(str, enum.Enum):
    def __str__(self) -> str:
        return str(self.value)


class Order(_Vocabulary):
    """The structure a conv becomes; ``auto`` lets sepify pick per layer."""

    DW_PW = "dw-pw"  # depthwise, then pointwise (MobileNet); rank = depth multiplier
    PW_DW = "pw-dw"  # pointwise, then depthwise per output channel (blueprint); rank = depth multiplier
    PW_DW_PW = "pw-dw-pw"  # 1x1, depthwise, 1x1 (a CP bottleneck); rank = its width per group
    AUTO = "auto"


class Layout(_Vocabulary):
    """How a pair at rank > 1 runs its depthwise step; both compute the same function."""

    GROUPED = "grouped"  # one depthwise conv with a depth multiplier
    RANK_MAJOR = "rank-major"  # one depthwise conv per rank component


class Backend(_Vocabulary):
    """Where time is measured (:mod:`sepify.runtime`)."""

    EAGER = "eager"
    COMPILE = "compile"
    ONNXRUNTIME = "onnxruntime"
    OPENVINO = "openvino"


class Format(_Vocabulary):
    """What a converted model is written as (:func:`sepify.io.save.save_model`)."""

    PT = "pt"
    PT2 = "pt2"
    ONNX = "onnx"
    OPENVINO = "openvino"
    SAFETENSORS = "safetensors"

    @property
    def extension(self) -> str:
        """The file extension, without the dot (OpenVINO IR is an ``.xml`` with its ``.bin`` beside it)."""
        return "xml" if self is Format.OPENVINO else self.value


class Loss(_Vocabulary):
    """What distillation matches (:mod:`sepify.calibrate.distill.losses` defines each)."""

    MSE = "mse"  # relative mean squared error of every floating output
    KL = "kl"  # KL divergence of softened logits
    FEATURE = "feature"  # relative mean squared error of each converted layer's output
    BOTH = "both"  # mse + feature


class Optimizer(_Vocabulary):
    """How distillation steps."""

    ADAMW = "adamw"
    SGD = "sgd"  # with momentum 0.9


class Schedule(_Vocabulary):
    """The learning rate after the linear warm-up."""

    COSINE = "cosine"  # decays to 0 at the last step
    CONSTANT = "constant"


class SkipReason(_Vocabulary):
    """Why a conv was left as it is."""

    DEPTHWISE = "depthwise"  # groups == in_channels: nothing to separate
    POINTWISE = "pointwise"  # 1x1 kernel: nothing to separate
    SUBCLASS = "subclass"  # a conv subclass may change forward
    SHARED = "shared"  # called from several places, and skip_shared was asked for
    NOT_CALLED = "not-called"  # never ran on the example inputs
    EXCLUDED = "excluded"  # by include/exclude patterns
    NOT_PLANNED = "not-planned"  # a plan was given and does not list it
    NO_SAVING = "no-saving"  # the pair asked for would not be smaller than the conv
    SLOWER = "slower"  # skip_slower: the pair was timed no faster than the conv at its input shape
    HOOKED = "hooked"  # has forward/backward hooks, which would see a different module after the swap
    PARAMS_READ = "params-read"  # the forward uses its weight or bias directly, which a pair does not hold


class TableFormat(_Vocabulary):
    """How the CLI prints a report on stdout."""

    TABLE = "table"
    JSON = "json"
    CSV = "csv"
    MD = "md"


class MemoryFormat(_Vocabulary):
    """How the converted model stores its conv weights."""

    PRESERVE = "preserve"
    CHANNELS_LAST = "channels_last"


def values(vocabulary: type[enum.Enum]) -> tuple[str, ...]:
    """The values of a vocabulary, in definition order.

    >>> values(Layout)
    ('grouped', 'rank-major')
    """
    return tuple(str(member.value) for member in vocabulary)


ORDERS = values(Order)[:3]  # the structures ("auto" is a choice among them)
SVD_ORDERS = ORDERS[:2]  # the orders a per-channel SVD factorises
LAYOUTS = values(Layout)
BACKENDS = values(Backend)
FORMATS = values(Format)
LOSSES = values(Loss)
OPTIMIZERS = values(Optimizer)
SCHEDULES = values(Schedule)
