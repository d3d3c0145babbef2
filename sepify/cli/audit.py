"""``sepify audit``: a thin command over :func:`sepify.audit` and :meth:`AuditReport.plan`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from sepify.cli import options as o
from sepify.cli.app import app, err, errors_as_exit_codes, out
from sepify.cli.output import print_lines, progress_bar, run_inputs
from sepify.errors import BudgetError, OutputError
from sepify.io.outputs import check_outputs
from sepify.report.render import plan_summary
from sepify.vocab import Backend, TableFormat

if TYPE_CHECKING:
    from sepify.planning.plan import Plan
    from sepify.report.audit import AuditReport

__all__ = ["audit"]

PLANNING = "Planning"
AUDIT_EXAMPLES = [
    ("which layers are worth slimming", "sepify audit torchvision.models:resnet50 --input-shape 1,3,224,224"),
    (
        "plan for half the MACs, then convert",
        "sepify audit torchvision.models:resnet50 --max-mac-ratio 0.5 --plan-out plan.json",
    ),
    (
        "errors measured after calibration",
        "sepify audit sepify.zoo:digits_cnn --input-shape 1,1,16,16 --calibration digits_calibration.npy",
    ),
]


def _budget(flag: str, what: str, metavar: str = "RATIO") -> object:
    return typer.Option(flag, metavar=metavar, help=what, show_default=False, rich_help_panel=PLANNING)


TimeOpt = Annotated[
    bool,
    typer.Option(
        "--latency", metavar="", help="Time each conv against its pairs on this machine.", rich_help_panel=o.TIMING
    ),
]
MaxMacOpt = Annotated[float | None, _budget("--max-mac-ratio", "Plan: MACs <= R x original, least predicted error.")]
MaxParamOpt = Annotated[float | None, _budget("--max-param-ratio", "Plan: params <= R x original.")]
MaxLatencyOpt = Annotated[
    float | None, _budget("--max-latency-ratio", "Plan: latency <= R x original (needs --latency).")
]
MaxErrorOpt = Annotated[
    float | None, _budget("--max-error", "Plan: most MACs saved with predicted output error <= E.", "ERROR")
]
PlanOutOpt = Annotated[Path | None, _budget("--plan-out", "Write the plan (JSON) for `sepify convert --plan`.", "FILE")]
PlotOpt = Annotated[
    Path | None,
    typer.Option(
        "--plot",
        metavar="FILE.png",
        help="Write a PNG chart of MACs saved vs error per layer (needs matplotlib).",
        show_default=False,
        rich_help_panel=o.OUTPUT,
    ),
]
AuditFormatOpt = Annotated[
    TableFormat,
    typer.Option(
        "--format", metavar="FORMAT", help="How to print the audit: table, json, csv or md.", rich_help_panel=o.OUTPUT
    ),
]
RanksOpt = Annotated[
    str | None,
    typer.Option(
        "--ranks",
        metavar="R,R,...",
        help="Only these ranks, e.g. 1,2,4 (default: every useful rank).",
        show_default=False,
        rich_help_panel=o.CONVERSION,
    ),
]


@app.command(add_help_option=False, epilog=o.epilog(AUDIT_EXAMPLES))
def audit(
    model: o.ModelArg,
    # Model
    input_shape: o.InputShapeOpt = None,
    weights: o.WeightsOpt = None,
    kwargs: o.KwargsOpt = None,
    attr: o.AttrOpt = None,
    trust_pickle: o.TrustPickleOpt = False,
    device_name: o.DeviceOpt = "cpu",
    train: o.TrainOpt = False,
    # Planning
    max_mac_ratio: MaxMacOpt = None,
    max_param_ratio: MaxParamOpt = None,
    max_latency_ratio: MaxLatencyOpt = None,
    max_error: MaxErrorOpt = None,
    plan_out: PlanOutOpt = None,
    # Conversion
    ranks: RanksOpt = None,
    include: o.IncludeOpt = None,
    exclude: o.ExcludeOpt = None,
    # Calibration
    calibration: o.CalibrationOpt = None,
    calibration_samples: o.CalibrationSamplesOpt = None,
    image_size: o.ImageSizeOpt = None,
    mean: o.MeanOpt = None,
    std: o.StdOpt = None,
    # Timing
    latency: TimeOpt = False,
    latency_backend: o.LatencyBackendOpt = Backend.EAGER,
    threads: o.ThreadsOpt = None,
    # Output
    fmt: AuditFormatOpt = TableFormat.TABLE,
    plot: PlotOpt = None,
    force: o.ForceOpt = False,
    quiet: o.QuietOpt = False,
    wide: o.WideOpt = False,
    all_rows: o.AllRowsOpt = False,
    as_json: o.JsonOpt = False,
    debug: o.DebugOpt = False,
    _help: o.HelpOpt = False,
) -> None:
    """Show which convs are worth slimming: cost, savings and error at every useful rank.

    With a budget (--max-mac-ratio, --max-param-ratio, --max-latency-ratio
    or --max-error) it also picks a rank and order per layer; --plan-out
    saves that plan for `sepify convert --plan`. With --calibration the
    errors are measured on those inputs and plans are made for the
    refinement that `convert --calibration` applies.
    """
    with errors_as_exit_codes(debug):
        # torch and the pipeline load here, not at import: `sepify --help` stays fast
        import torch

        from sepify.cli.inputs import calibration_tensor, device, load, make_inputs, parse_numbers
        from sepify.options import Calibration, Selection, Timing
        from sepify.pipeline.audit import audit as audit_model
        from sepify.planning.budget import check_budget

        rank_list = [int(r) for r in parse_numbers(ranks, "--ranks", int) or []] or None
        budget = {
            "max_mac_ratio": max_mac_ratio,
            "max_param_ratio": max_param_ratio,
            "max_latency_ratio": max_latency_ratio,
            "max_error": max_error,
        }
        given = {k: v for k, v in budget.items() if v is not None}
        if given:
            check_budget(given)
        elif plan_out is not None:
            raise typer.BadParameter("--plan-out needs a budget, e.g. --max-mac-ratio 0.5", param_hint="--plan-out")
        if plot is not None:
            _check_matplotlib()
        inputs = run_inputs(model, weights=weights, calibration=calibration)
        check_outputs({"--plan-out": plan_out, "--plot": plot}, inputs, force=force)
        if threads is not None:
            torch.set_num_threads(threads)
        on = device(device_name)
        args = make_inputs(input_shape, on)
        calib = None
        if calibration == "synthetic":
            calib = Calibration("synthetic", samples=calibration_samples)
        elif calibration is not None:
            calib = Calibration(calibration_tensor(calibration, args, calibration_samples, image_size, mean, std))
        loaded = load(
            model, trust_pickle=trust_pickle, kwargs=kwargs, weights=weights, on=on, quiet=quiet, train=train, attr=attr
        )
        with progress_bar("tracing", quiet) as progress:
            report = audit_model(
                loaded.model,
                args,
                ranks=rank_list,
                select=Selection(include, exclude),
                calibration=calib,
                timing=Timing(backend=latency_backend.value, threads=threads) if latency else None,
                progress=progress,
            )
        fmt = TableFormat.JSON if as_json else fmt
        try:
            plan = report.plan(**given) if given else None
        except BudgetError:
            if not quiet:  # the finished audit is worth showing, and says what is reachable
                _print(report, None, fmt, wide=wide, all_rows=all_rows)
            raise
        if not quiet:
            _print(report, plan, fmt, wide=wide, all_rows=all_rows)
        elif plan is not None:
            print_lines("\n".join(plan_summary(plan)[:1]))
        console = out if fmt is TableFormat.TABLE else err  # machine-readable stdout stays clean
        if plan is not None and plan_out is not None:
            plan.to_json(plan_out, overwrite=force)
            console.print(f"wrote {plan_out}", highlight=False, soft_wrap=True)
        if plot is not None:
            from sepify.report.plot import plot_audit

            plot_audit(report, plot, plan, overwrite=force)
            console.print(f"wrote {plot}", highlight=False, soft_wrap=True)


def _check_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401 - checked before any slow work or any output file
    except ImportError:
        raise OutputError("--plot needs matplotlib; pip install matplotlib") from None


def _print(report: AuditReport, plan: Plan | None, fmt: TableFormat, *, wide: bool, all_rows: bool) -> None:
    if fmt is TableFormat.JSON:
        data = report.to_dict()
        if plan is not None:
            data["plan"] = plan.to_dict()
        print_lines(json.dumps(data, indent=2))
    elif fmt is TableFormat.CSV:
        print_lines(report.to_csv(), end="")
    elif fmt is TableFormat.MD:
        print_lines(report.to_markdown(), end="")
    else:
        print_lines(report.to_text(plan, wide=wide, all_rows=all_rows))
