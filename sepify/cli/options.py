"""Option declarations shared by the commands: each defined once, as an ``Annotated`` alias.

Choices are enums, so help and shell completion list them; panels group the
options in ``--help``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from sepify.vocab import Backend

MODEL, CONVERSION, CALIBRATION, TIMING, OUTPUT = "Model", "Conversion", "Calibration", "Timing", "Output"


def epilog(examples: list[tuple[str, str]]) -> str:
    """A command's help epilog: each example is a comment line saying what it does, then the command."""
    return "[bold]Examples[/]\n\n" + "\n\n".join(f"  [dim]# {what}[/]\n  {command}" for what, command in examples)


def _show_help(ctx: typer.Context, value: bool) -> None:
    if value and not ctx.resilient_parsing:
        typer.echo(ctx.get_help(), nl=False)
        raise typer.Exit()


# Declared by each command (with add_help_option=False) so that it sits in the Output panel without a type.
HelpOpt = Annotated[
    bool,
    typer.Option(
        "--help",
        "-h",
        metavar="",
        is_eager=True,
        expose_value=True,
        callback=_show_help,
        help="Show this message and exit.",
        rich_help_panel=OUTPUT,
    ),
]


ModelArg = Annotated[
    str,
    typer.Argument(
        metavar="MODEL",
        help="A model file saved with torch.save(model) or torch.export (.pt2), or an import spec such as "
        "[bold]torchvision.models:resnet18[/] or [bold]path/to/file.py:build[/] (safest: no pickle).",
        show_default=False,
    ),
]
InputShapeOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--input-shape",
        metavar="SHAPE",
        help="Shape of one example input, e.g. 1,3,224,224; add :int64 (or another dtype) for integer inputs, "
        "which are drawn from [0, 10). Repeat for models with several inputs. Default 1,3,224,224.",
        show_default=False,
        rich_help_panel=MODEL,
    ),
]
TrustPickleOpt = Annotated[
    bool,
    typer.Option(
        "--trust-pickle",
        metavar="",
        help="Allow loading a pickled model or .pt2 archive (runs code from the file).",
        rich_help_panel=MODEL,
    ),
]
KwargsOpt = Annotated[
    str | None,
    typer.Option(
        "--kwargs",
        metavar="JSON",
        help="JSON keyword arguments for an import spec, e.g. '{\"num_classes\": 10}'.",
        rich_help_panel=MODEL,
    ),
]
AttrOpt = Annotated[
    str | None,
    typer.Option(
        "--attr",
        metavar="NAME",
        help="The nn.Module inside what an import spec returns, for wrappers: e.g. ultralytics:YOLO --attr model.",
        show_default=False,
        rich_help_panel=MODEL,
    ),
]
WeightsOpt = Annotated[
    Path | None,
    typer.Option(
        "--weights",
        metavar="FILE",
        help="A state_dict (.pt/.pth, read with weights_only=True) or .safetensors.",
        rich_help_panel=MODEL,
    ),
]
DeviceOpt = Annotated[
    str,
    typer.Option(
        "--device", metavar="DEVICE", help="Device to load and convert on: cpu or cuda.", rich_help_panel=MODEL
    ),
]
TrainOpt = Annotated[
    bool,
    typer.Option(
        "--train",
        metavar="",
        help="Trace and convert in training mode (default: eval mode, as the model is deployed).",
        rich_help_panel=MODEL,
    ),
]
IncludeOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--include",
        metavar="GLOB",
        help="Only convs matching this glob (repeatable).",
        show_default=False,
        rich_help_panel=CONVERSION,
    ),
]
ExcludeOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--exclude",
        metavar="GLOB",
        help="Leave convs matching this glob alone (repeatable).",
        show_default=False,
        rich_help_panel=CONVERSION,
    ),
]
SkipSharedOpt = Annotated[
    bool,
    typer.Option(
        "--skip-shared", metavar="", help="Leave convs called more than once alone.", rich_help_panel=CONVERSION
    ),
]
CalibrationOpt = Annotated[
    str | None,
    typer.Option(
        "--calibration",
        metavar="PATH|synthetic|random",
        help="Unlabelled inputs: an image folder or a .pt/.npy tensor file; with no data, 'synthetic' (inputs "
        "matched to the model's BatchNorm statistics) or 'random' (noise).",
        show_default=False,
        rich_help_panel=CALIBRATION,
    ),
]
CalibrationSamplesOpt = Annotated[
    int | None,
    typer.Option(
        "--calibration-samples",
        metavar="N",
        min=1,
        help="Use at most N calibration samples (default: all; 256 for 'random', 64 for 'synthetic').",
        show_default=False,
        rich_help_panel=CALIBRATION,
    ),
]
ImageSizeOpt = Annotated[
    str | None,
    typer.Option(
        "--image-size",
        metavar="H,W",
        help="Resize calibration images to H,W (default: the input's H,W).",
        show_default=False,
        rich_help_panel=CALIBRATION,
    ),
]
MeanOpt = Annotated[
    str | None,
    typer.Option(
        "--mean",
        metavar="M,M,M",
        help="Per-channel mean for images (default ImageNet's for RGB, 0.5 for grayscale).",
        show_default=False,
        rich_help_panel=CALIBRATION,
    ),
]
StdOpt = Annotated[
    str | None,
    typer.Option(
        "--std",
        metavar="S,S,S",
        help="Per-channel std for images (default ImageNet's for RGB, 0.5 for grayscale).",
        show_default=False,
        rich_help_panel=CALIBRATION,
    ),
]
LatencyOpt = Annotated[
    bool,
    typer.Option(
        "--latency",
        metavar="",
        help="Time each pair against the conv it replaces at the layer's input shape (this machine, "
        "--input-shape's batch), every layout, the fastest kept; and the whole model.",
        rich_help_panel=TIMING,
    ),
]
LatencyBackendOpt = Annotated[
    Backend,
    typer.Option(
        "--latency-backend",
        help="Where to measure time: eager PyTorch, compile (torch.compile; seconds per layer), onnxruntime (each "
        "layer as its ONNX graph with the padding and activation fused with it, the whole model exported; the onnx "
        "extra) or openvino (the openvino extra), where deployed pairs run fused and faster.",
        rich_help_panel=TIMING,
    ),
]
ThreadsOpt = Annotated[
    int | None,
    typer.Option(
        "--threads",
        metavar="N",
        min=1,
        help="Threads to time with (torch, onnxruntime, OpenVINO; default: torch's).",
        show_default=False,
        rich_help_panel=TIMING,
    ),
]
ForceOpt = Annotated[
    bool, typer.Option("--force", metavar="", help="Overwrite existing output files.", rich_help_panel=OUTPUT)
]
QuietOpt = Annotated[
    bool,
    typer.Option(
        "--quiet",
        "-q",
        metavar="",
        help="Print only what was written and one summary line (no table, no progress).",
        rich_help_panel=OUTPUT,
    ),
]
WideOpt = Annotated[
    bool,
    typer.Option(
        "--wide",
        metavar="",
        help="Print the full table (every column) instead of the compact one.",
        rich_help_panel=OUTPUT,
    ),
]
AllRowsOpt = Annotated[
    bool,
    typer.Option(
        "--all",
        metavar="",
        help="List skipped convs in the table too, not only as a summary line.",
        rich_help_panel=OUTPUT,
    ),
]
JsonOpt = Annotated[
    bool,
    typer.Option(
        "--json",
        metavar="",
        help="Print the report as JSON on stdout (and nothing else there).",
        rich_help_panel=OUTPUT,
    ),
]
AllowLargerOpt = Annotated[
    bool,
    typer.Option(
        "--allow-larger",
        metavar="",
        help="Build a pair even where --rank makes it larger than its conv (default: skip it as no-saving).",
        rich_help_panel=CONVERSION,
    ),
]
AllowUnchangedOpt = Annotated[
    bool,
    typer.Option(
        "--allow-unchanged",
        metavar="",
        help="Write the model even when no conv was converted (otherwise that is an error, exit 1).",
        rich_help_panel=OUTPUT,
    ),
]
DebugOpt = Annotated[
    bool, typer.Option("--debug", metavar="", help="Show the traceback of sepify errors.", rich_help_panel=OUTPUT)
]
