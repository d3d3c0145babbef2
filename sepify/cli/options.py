"""The option groups the commands are composed of, each declared once (see :mod:`sepify.cli.groups`).

Options most users need sit in the ``Options`` panel, the first screen of ``--help``; the rest are ``Advanced``
(``--help-all``). Choices are the :mod:`sepify.vocab` enums; numbers are range-checked by typer, so a bad value
is a usage error (exit 2) naming the flag, before torch is even imported.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from sepify.cli.groups import ADVANCED, HelpAllOpt
from sepify.vocab import Backend

if TYPE_CHECKING:
    from sepify.options import Budget

__all__ = [
    "COMMON",
    "ADVANCED",
    "epilog",
    "option",
    "flag",
    "ModelArg",
    "LoadOptions",
    "ModelOptions",
    "BudgetOptions",
    "SelectOptions",
    "CalibrationOptions",
    "TimingOptions",
    "RunOptions",
    "ImageSizeOpt",
    "MeanOpt",
    "StdOpt",
]

COMMON = "Options"


def epilog(examples: list[tuple[str, str]]) -> str:
    """A command's examples: a comment line saying what each does, then the command (each under 78 columns, so
    that a copy from an 80-column terminal is whole)."""
    assert all(len(command) <= 76 for _, command in examples), "examples must fit 80 columns"
    return "[bold]Examples[/]\n\n" + "\n\n".join(f"  [dim]# {what}[/]\n  {command}" for what, command in examples)


def option(*flags: str, metavar: str, help: str, panel: str = ADVANCED, **kwargs: Any) -> Any:
    """A typer option with a value: in the ``Advanced`` panel (behind ``--help-all``) unless ``panel`` says."""
    return typer.Option(*flags, metavar=metavar, help=help, rich_help_panel=panel, show_default=False, **kwargs)


def flag(*flags: str, help: str, panel: str = ADVANCED) -> Any:
    """A typer on/off option, in the ``Advanced`` panel unless ``panel`` says."""
    return typer.Option(*flags, metavar="", help=help, rich_help_panel=panel)


ModelArg = Annotated[
    str,
    typer.Argument(
        metavar="MODEL",
        help="A torch.save file, a .pt2, or package.module:builder.",
        show_default=False,
    ),
]

# -- loading a model -------------------------------------------------------------------------------------------------

InputShapeOpt = Annotated[
    list[str] | None,
    option("--input-shape", metavar="SHAPE", panel=COMMON, help="Example input (default 1,3,224,224)."),
]  # fmt: skip
TrustPickleOpt = Annotated[bool, flag("--trust-pickle", help="Allow a pickled model (runs its code).", panel=COMMON)]
WeightsOpt = Annotated[
    Path | None, option("--weights", metavar="FILE", help="A state_dict (.pt/.pth, no pickle) or .safetensors.")
]
KwargsOpt = Annotated[
    str | None,
    option("--kwargs", metavar="JSON", help="Keyword arguments for an import spec: '{\"num_classes\": 10}'."),
]
AttrOpt = Annotated[
    str | None, option("--attr", metavar="NAME", help="The network inside what an import spec returns (YOLO: model).")
]
DeviceOpt = Annotated[str, option("--device", metavar="DEVICE", help="cpu (default) or cuda.")]
TrainOpt = Annotated[bool, flag("--train", help="Convert in training mode (default: eval, as deployed).")]


def _measure_on(text: str) -> str | int:
    """An output index (an integer, negative from the end) or a node/module name of the traced graph."""
    try:
        return int(text)
    except ValueError:
        return text


MeasureOnOpt = Annotated[
    str | None,
    option("--measure-on", metavar="WHAT", help="Errors on output INDEX, graph node/module NAME, or 'outputs' "
            "(default: the outputs; saturated softmax/sigmoid ones on their logits)."),
]  # fmt: skip


@dataclass(frozen=True)
class LoadOptions:
    """How MODEL (or the teacher) is loaded and what it is run on."""

    input_shape: InputShapeOpt = None
    trust_pickle: TrustPickleOpt = False
    weights: WeightsOpt = None
    kwargs: KwargsOpt = None
    attr: AttrOpt = None
    device: DeviceOpt = "cpu"


@dataclass(frozen=True)
class ModelOptions(LoadOptions):
    """A model to convert or audit: loaded, in which mode, and what its errors are measured on."""

    train: TrainOpt = False
    measure_on: MeasureOnOpt = None

    def measured(self) -> str | int | None:
        """``--measure-on`` as the API takes it: an int for an output index, else the name."""
        return None if self.measure_on is None else _measure_on(self.measure_on)


# -- budgets ---------------------------------------------------------------------------------------------------------


def _ratio(text: str) -> float:
    """A share of the original's cost: a number in (0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise typer.BadParameter(f"{text!r} is not a number; pass a share of the original's, e.g. 0.5") from None
    if not 0 < value <= 1:
        raise typer.BadParameter(f"{value:g} is not in (0, 1]; pass a share of the original's, e.g. 0.5")
    return value


def _nonnegative(text: str) -> float:
    """A predicted relative error: a number >= 0."""
    try:
        value = float(text)
    except ValueError:
        raise typer.BadParameter(f"{text!r} is not a number; pass a relative error, e.g. 0.1") from None
    if not value >= 0:
        raise typer.BadParameter(f"{value:g} is below 0; pass a relative error, e.g. 0.1")
    return value


_RATIO = {"parser": _ratio}
MaxMacOpt = Annotated[
    float | None,
    option("--max-mac-ratio", metavar="R", panel=COMMON, help="At most R x the MACs, least error.", **_RATIO),
]  # fmt: skip
MaxParamOpt = Annotated[
    float | None, option("--max-param-ratio", metavar="R", help="At most R x the original's params.", **_RATIO)
]
MaxLatencyOpt = Annotated[
    float | None,
    option("--max-latency-ratio", metavar="R", help="At most R x the original's latency (needs --latency).", **_RATIO),
]
MaxErrorOpt = Annotated[
    float | None,
    option("--max-error", metavar="E", panel=COMMON, parser=_nonnegative,
            help="Predicted output error <= E (default 0.1)."),
]  # fmt: skip


@dataclass(frozen=True)
class BudgetOptions:
    """At most one budget; a plan picks a rank and order per layer to meet it."""

    max_mac_ratio: MaxMacOpt = None
    max_param_ratio: MaxParamOpt = None
    max_latency_ratio: MaxLatencyOpt = None
    max_error: MaxErrorOpt = None

    def budget(self) -> Budget | None:
        """The :class:`~sepify.Budget` asked for, or None; two at once is a usage error."""
        from sepify.options import Budget

        given = {k: v for k, v in vars(self).items() if v is not None}
        if len(given) > 1:
            flags = " and ".join("--" + k.replace("_", "-") for k in given)
            raise typer.BadParameter(f"{flags} were both given; pass one budget", param_hint="budget")
        return Budget(**given) if given else None


# -- which convs -----------------------------------------------------------------------------------------------------

IncludeOpt = Annotated[list[str] | None, option("--include", metavar="GLOB", help="Only convs matching (repeatable).")]
ExcludeOpt = Annotated[list[str] | None, option("--exclude", metavar="GLOB", help="Leave matching convs alone.")]
SkipSharedOpt = Annotated[bool, flag("--skip-shared", help="Leave convs called more than once alone.")]


@dataclass(frozen=True)
class SelectOptions:
    """Which convs may be converted."""

    include: IncludeOpt = None
    exclude: ExcludeOpt = None
    skip_shared: SkipSharedOpt = False


# -- calibration data ------------------------------------------------------------------------------------------------

CalibrationOpt = Annotated[
    str | None,
    option("--calibration", metavar="DATA", panel=COMMON, help="Images folder, .pt/.npy or 'synthetic'."),
]  # fmt: skip
CalibrationSamplesOpt = Annotated[
    int | None, option("--calibration-samples", metavar="N", min=1, help="Use at most N calibration samples.")
]
ImageSizeOpt = Annotated[
    str | None, option("--image-size", metavar="H,W", help="Resize images (default: the input's).")
]
AugmentOpt = Annotated[
    bool | None,
    flag("--augment/--no-augment", help="Also fit each sample rescaled by up to half an octave (default: when the "
         "samples are a few recordings or photos cut into many)."),
]  # fmt: skip
MeanOpt = Annotated[str | None, option("--mean", metavar="M,M,M", help="Image mean (default ImageNet's; 0.5 gray).")]
StdOpt = Annotated[str | None, option("--std", metavar="S,S,S", help="Image std (default ImageNet's; 0.5 gray).")]


@dataclass(frozen=True)
class CalibrationOptions:
    """Unlabelled inputs the conversion is fitted and judged on."""

    calibration: CalibrationOpt = None
    calibration_samples: CalibrationSamplesOpt = None
    augment: AugmentOpt = None
    image_size: ImageSizeOpt = None
    mean: MeanOpt = None
    std: StdOpt = None


# -- timing ----------------------------------------------------------------------------------------------------------

LatencyOpt = Annotated[bool, flag("--latency", help="Time each conv against its pairs on this machine.")]
LatencyBackendOpt = Annotated[
    Backend,
    option("--latency-backend", metavar="BACKEND", help="eager (default), compile, onnxruntime or openvino: where "
            "time is measured (each layer with what the runtime fuses with it); other than eager implies --latency."),
]  # fmt: skip
ThreadsOpt = Annotated[int | None, option("--threads", metavar="N", min=1, help="Threads to time with.")]


@dataclass(frozen=True)
class TimingOptions:
    """Measured time on this machine, in the runtime you deploy on."""

    latency: LatencyOpt = False
    latency_backend: LatencyBackendOpt = Backend.EAGER
    threads: ThreadsOpt = None

    @property
    def measured(self) -> bool:
        """Whether to time: ``--latency``, or a runtime named with ``--latency-backend`` (naming one is asking)."""
        return self.latency or self.latency_backend is not Backend.EAGER


# -- every command ---------------------------------------------------------------------------------------------------

ForceOpt = Annotated[bool, flag("--force", help="Overwrite existing outputs.")]
QuietOpt = Annotated[bool, flag("--quiet", "-q", help="Print only a summary line.", panel=COMMON)]
DebugOpt = Annotated[bool, flag("--debug", help="Show the traceback of sepify errors.")]


@dataclass(frozen=True)
class RunOptions:
    """What every command takes."""

    force: ForceOpt = False
    quiet: QuietOpt = False
    debug: DebugOpt = False
    help_all: HelpAllOpt = False
