"""``sepify convert``: a thin command over :func:`sepify.convert` and :func:`sepify.io.save.save_model`."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from sepify.cli import options as o
from sepify.cli.app import app, err, errors_as_exit_codes, out
from sepify.cli.output import check_report_path, print_lines, progress_bar, run_inputs, step, write_report
from sepify.errors import NothingConvertedError, OutputError, first_line
from sepify.io.outputs import check_outputs
from sepify.vocab import Backend, Format, MemoryFormat, Order

if TYPE_CHECKING:
    import torch

    from sepify.pipeline.convert import ConversionResult

__all__ = ["convert"]

CONVERT_EXAMPLES = [
    (
        "exact (rank 'full'), to check the pipeline",
        "sepify convert sepify.zoo:digits_cnn --input-shape 1,1,16,16 --rank full",
    ),
    (
        "a torchvision model from your checkpoint",
        "sepify convert torchvision.models:resnet18 --weights ckpt.pt -o slim.pt",
    ),
    ("calibrated on your own images", "sepify convert torchvision.models:resnet18 --calibration photos/ --rank 2"),
    ("a plan from `sepify audit`", "sepify convert torchvision.models:resnet50 --plan plan.json --report r.json"),
]

Inputs = dict[str, Path | None]

OutputOpt = Annotated[
    Path | None,
    typer.Option(
        "-o",
        "--output",
        metavar="FILE",
        help="Where to write the converted model. Default: <stem>.sep<ext> beside the input (for an import spec: "
        "<callable>.sep.pt here).",
        show_default=False,
        rich_help_panel=o.OUTPUT,
    ),
]
RankOpt = Annotated[
    str,
    typer.Option(
        "--rank",
        metavar="N|full|auto",
        help="Depth multiplier: a positive integer, 'full' (exact), or 'auto' (per layer the smallest rank within "
        "--tolerance).",
        rich_help_panel=o.CONVERSION,
    ),
]
ToleranceOpt = Annotated[
    float | None,
    typer.Option(
        "--tolerance",
        metavar="ERROR",
        help="With --rank auto: the largest relative weight error to accept per layer, e.g. 0.1.",
        show_default=False,
        rich_help_panel=o.CONVERSION,
    ),
]
OrderOpt = Annotated[
    Order,
    typer.Option(
        "--order",
        metavar="ORDER",
        help="Per-layer structure: dw-pw (MobileNet), pw-dw, pw-dw-pw (CP bottleneck; rank = its width) or auto "
        "(the lower error).",
        rich_help_panel=o.CONVERSION,
    ),
]
PlanOpt = Annotated[
    Path | None,
    typer.Option(
        "--plan",
        metavar="FILE",
        help="Apply a plan file (from `sepify audit --plan-out`).",
        show_default=False,
        rich_help_panel=o.CONVERSION,
    ),
]
ReportOpt = Annotated[
    Path | None,
    typer.Option(
        "--report",
        metavar="FILE",
        help="Also write the report: .json, .csv or .md.",
        show_default=False,
        rich_help_panel=o.OUTPUT,
    ),
]
FormatOpt = Annotated[
    Format | None,
    typer.Option(
        "--format",
        metavar="FORMAT",
        help="pt, pt2, onnx, openvino (IR: an .xml with its .bin beside it) or safetensors (which writes a "
        ".plan.json beside it). pt2, onnx and openvino files are run in their runtime and checked against PyTorch "
        "after writing. Default: pt2 for a .pt2 input, else pt.",
        show_default=False,
        rich_help_panel=o.OUTPUT,
    ),
]
DistillStepsOpt = Annotated[
    int,
    typer.Option(
        "--distill-steps",
        metavar="N",
        help="Knowledge-distillation steps after the closed-form refinement (needs --calibration).",
        rich_help_panel=o.CALIBRATION,
    ),
]
TrainAllOpt = Annotated[
    bool,
    typer.Option(
        "--train-all",
        metavar="",
        help="Distill every parameter, not only the converted layers.",
        rich_help_panel=o.CALIBRATION,
    ),
]
NoRefineOpt = Annotated[
    bool,
    typer.Option(
        "--no-refine",
        metavar="",
        help="Skip the closed-form refinement (init only, then distillation if asked).",
        rich_help_panel=o.CALIBRATION,
    ),
]
TuneLayoutOpt = Annotated[
    bool,
    typer.Option(
        "--tune-layout",
        metavar="",
        help="Time the equivalent layouts of each pair at rank > 1 on this machine and keep the faster (outputs then "
        "depend on timing, at float rounding level).",
        rich_help_panel=o.TIMING,
    ),
]
SkipSlowerOpt = Annotated[
    bool,
    typer.Option(
        "--skip-slower",
        metavar="",
        help="Leave a conv alone when its pair was timed no faster (implies --latency).",
        rich_help_panel=o.TIMING,
    ),
]
MemoryFormatOpt = Annotated[
    MemoryFormat,
    typer.Option(
        "--memory-format",
        metavar="LAYOUT",
        help="preserve, or channels_last: store the conv weights channels-last (often faster on CPUs for "
        "depthwise convs; see docs/benchmarks.md).",
        rich_help_panel=o.OUTPUT,
    ),
]


@app.command(add_help_option=False, epilog=o.epilog(CONVERT_EXAMPLES))
def convert(
    model: o.ModelArg,
    # Model
    input_shape: o.InputShapeOpt = None,
    weights: o.WeightsOpt = None,
    kwargs: o.KwargsOpt = None,
    attr: o.AttrOpt = None,
    trust_pickle: o.TrustPickleOpt = False,
    device_name: o.DeviceOpt = "cpu",
    train: o.TrainOpt = False,
    # Conversion
    rank: RankOpt = "1",
    order: OrderOpt = Order.DW_PW,
    tolerance: ToleranceOpt = None,
    plan: PlanOpt = None,
    include: o.IncludeOpt = None,
    exclude: o.ExcludeOpt = None,
    skip_shared: o.SkipSharedOpt = False,
    allow_larger: o.AllowLargerOpt = False,
    # Calibration
    calibration: o.CalibrationOpt = None,
    calibration_samples: o.CalibrationSamplesOpt = None,
    image_size: o.ImageSizeOpt = None,
    mean: o.MeanOpt = None,
    std: o.StdOpt = None,
    no_refine: NoRefineOpt = False,
    distill_steps: DistillStepsOpt = 0,
    train_all: TrainAllOpt = False,
    # Timing
    latency: o.LatencyOpt = False,
    latency_backend: o.LatencyBackendOpt = Backend.EAGER,
    threads: o.ThreadsOpt = None,
    skip_slower: SkipSlowerOpt = False,
    tune_layout: TuneLayoutOpt = False,
    # Output
    output: OutputOpt = None,
    fmt: FormatOpt = None,
    report: ReportOpt = None,
    memory_format: MemoryFormatOpt = MemoryFormat.PRESERVE,
    force: o.ForceOpt = False,
    allow_unchanged: o.AllowUnchangedOpt = False,
    quiet: o.QuietOpt = False,
    wide: o.WideOpt = False,
    all_rows: o.AllRowsOpt = False,
    as_json: o.JsonOpt = False,
    debug: o.DebugOpt = False,
    _help: o.HelpOpt = False,
) -> None:
    """Convert a model's convolutions (1-3 D, transposed too) into depthwise + pointwise pairs and save it.

    Prints the per-layer report (params, MACs, savings, weight and output
    error) and writes the converted model; the input is never modified.
    """
    with errors_as_exit_codes(debug):
        # torch and the pipeline load here, not at import: `sepify --help` stays fast
        import torch

        from sepify.cli.inputs import calibration_tensor, device, load, make_inputs, parse_rank
        from sepify.options import Calibration, Distill, Selection, Timing
        from sepify.pipeline.convert import convert as convert_model
        from sepify.planning.plan import Plan

        on = device(device_name)
        args = make_inputs(input_shape, on)
        the_plan = Plan.from_json(plan) if plan is not None else None
        distillation = Distill(steps=distill_steps, train_all=train_all) if distill_steps else None
        timed = latency or skip_slower or tune_layout
        if threads is not None:
            torch.set_num_threads(threads)
        timing = (
            Timing(
                latency=latency,
                skip_slower=skip_slower,
                tune_layout=tune_layout,
                backend=latency_backend.value,
                threads=threads,
            )
            if timed
            else None
        )
        inputs = run_inputs(model, weights=weights, calibration=calibration, plan=plan)
        chosen, target = _checked_outputs(model, output, fmt, report, force, inputs)
        calib = None
        if calibration == "synthetic":
            calib = Calibration("synthetic", samples=calibration_samples, refine=not no_refine)
        elif calibration is not None:
            data = calibration_tensor(calibration, args, calibration_samples, image_size, mean, std)
            calib = Calibration(data, refine=not no_refine)
        loaded = load(
            model, trust_pickle=trust_pickle, kwargs=kwargs, weights=weights, on=on, quiet=quiet, train=train, attr=attr
        )
        with progress_bar("converting", quiet) as progress:
            result = convert_model(
                loaded.model,
                args,
                rank=parse_rank(rank),
                order=order.value,
                tolerance=tolerance,
                plan=the_plan,
                select=Selection(include, exclude, skip_shared, allow_larger=allow_larger),
                calibration=calib,
                distill=distillation,
                timing=timing,
                progress=progress,
            )
        if as_json:
            print_lines(result.report.to_json(), end="")
        elif not quiet:
            print_lines(result.report.to_text(wide=wide, all_rows=all_rows))
        if not result.report.converted and not allow_unchanged:
            raise NothingConvertedError(
                f"no conv of {model} was converted ({result.report.skip_summary()}), so nothing was written; "
                "change the selection, or pass --allow-unchanged to write the unchanged copy"
            )
        if memory_format is MemoryFormat.CHANNELS_LAST:
            result.model.to(memory_format=torch.channels_last)
        written = _write(result, target, chosen, args, report, force, quiet or as_json)
        # with --json stdout holds the JSON alone; what was written goes to stderr
        console = err if as_json else out
        for path in written:
            console.print(f"wrote {path}", highlight=False, soft_wrap=True)
        _check_written(result, target, chosen, args, quiet or as_json)
        if quiet and not as_json:
            print_lines(result.report.summary_line())


def _write(
    result: ConversionResult,
    target: Path,
    fmt: str,
    args: tuple[torch.Tensor, ...],
    report: Path | None,
    force: bool,
    quiet: bool,
) -> list[Path]:
    """The model, then the report; the report is written even when the model cannot be (it says what was done)."""
    from sepify.io.save import save_model

    try:
        with step(f"writing {target}", quiet):
            plan_json = result.report.to_plan().to_json()
            written = save_model(result.model, target, fmt, example_args=args, plan_json=plan_json, overwrite=force)
    except OutputError as e:
        if report is None:
            raise
        write_report(result.report, report, overwrite=force)
        raise OutputError(f"{e} (the conversion report was written to {report})") from e
    if report is not None:
        write_report(result.report, report, overwrite=force)
        written.append(report)
    return written


def _check_written(result: ConversionResult, target: Path, fmt: str, args: tuple[Any, ...], quiet: bool) -> None:
    """Run the written deployment file in its runtime against the PyTorch model; one line, a warning if it differs."""
    from sepify.runtime.check import TOLERANCE, check_export

    if fmt not in ("pt2", "onnx", "openvino"):
        return
    try:
        with step(f"checking {target}", quiet):
            check = check_export(target, fmt, result.model, args)
    except Exception as e:  # noqa: BLE001 - a runtime that cannot run the file is worth a warning, not a traceback
        err.print(
            f"[bold yellow]warning:[/] {target} was written but could not be run back to check it "
            f"({first_line(e)}); load it in your runtime and compare with the PyTorch model",
            highlight=False,
            soft_wrap=True,
        )
        return
    if check is None:
        return
    if not check.ok:
        err.print(
            f"[bold yellow]warning:[/] {target}: {check.describe()}, more than {TOLERANCE:g}; the exporter changed "
            "what the model computes: save as --format pt, or report it with the model",
            highlight=False,
            soft_wrap=True,
        )
    elif not quiet:
        out.print(f"checked {target}: {check.describe()}", highlight=False, soft_wrap=True)


def _checked_outputs(
    model: str, output: Path | None, fmt: Format | None, report: Path | None, force: bool, inputs: Inputs
) -> tuple[str, Path]:
    """The format and model path to write; every output path is checked before any slow work."""
    from sepify.io.load import default_output
    from sepify.io.save import EXTENSIONS, check_output_name, plan_path, weights_path

    input_path = inputs["model"]
    chosen = fmt.value if fmt else ("pt2" if input_path is not None and input_path.suffix == ".pt2" else "pt")
    target = output or default_output(model, EXTENSIONS[chosen])
    check_output_name(target, chosen)
    if report is not None:
        check_report_path(report)
    outputs = {
        "-o": target,
        "plan (beside -o)": plan_path(target) if chosen == "safetensors" else None,
        "weights (beside -o)": weights_path(target) if chosen == "openvino" else None,
    }
    check_outputs({**outputs, "--report": report}, inputs, force=force)
    return chosen, target
