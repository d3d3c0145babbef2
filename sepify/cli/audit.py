"""``sepify audit``: a thin command over :func:`sepify.audit` and :meth:`AuditReport.plan`."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from sepify.cli import options as o
from sepify.cli.app import app, errors_as_exit_codes
from sepify.cli.groups import command
from sepify.cli.output import print_lines, progress_display, wrote
from sepify.cli.preflight import check_run, data_path, model_path
from sepify.errors import BudgetError, OutputError
from sepify.report.render import plan_summary
from sepify.vocab import TableFormat

if TYPE_CHECKING:
    from sepify.planning.plan import Plan
    from sepify.report.audit import AuditReport

__all__ = ["audit"]

EXAMPLES = [
    ("which layers are worth slimming", "sepify audit torchvision.models:resnet50"),
    ("keep the measurements; plan from them later", "sepify audit model.pt --trust-pickle --audit-out a.json"),
    ("plan for half the MACs", "sepify audit model.pt --trust-pickle --max-mac-ratio 0.5 --plan-out p.json"),
]


@dataclass(frozen=True)
class AuditOutput:
    """What the audit measures and writes."""

    audit_out: Annotated[Path | None, o.option("--audit-out", metavar="FILE", panel=o.COMMON, help="Keep the "
                                           "measurements, for sepify plan.")] = None  # fmt: skip
    plan_out: Annotated[Path | None, o.option("--plan-out", metavar="FILE", panel=o.COMMON, help="Write the plan, for convert "
                                          "--plan.")] = None  # fmt: skip
    ranks: Annotated[str | None, o.option("--ranks", metavar="R,R,...", help="Only these ranks, e.g. 1,2,4.")] = None
    include: o.IncludeOpt = None
    exclude: o.ExcludeOpt = None
    plot: Annotated[Path | None, o.option("--plot", metavar="FILE.png", help="A chart of MACs saved vs error per layer "
                                      "(needs matplotlib).")] = None  # fmt: skip
    fmt: Annotated[TableFormat, o.option("--format", metavar="FORMAT", help="table (default), json, csv or "
                                     "md.")] = TableFormat.TABLE  # fmt: skip
    wide: Annotated[bool, o.option("--wide", metavar="", help="Every column, whole names.")] = False
    all_rows: Annotated[bool, o.option("--all", metavar="", help="List skipped convs in the table too.")] = False
    as_json: Annotated[bool, o.option("--json", metavar="", help="The audit as JSON on stdout, alone.")] = False


@command(app, epilog=o.epilog(EXAMPLES))
def audit(
    model: o.ModelArg,
    load: o.ModelOptions,
    budget: o.BudgetOptions,
    data: o.CalibrationOptions,
    timing: o.TimingOptions,
    written: AuditOutput,
    run: o.RunOptions,
) -> None:
    """Measure which convs are worth slimming, at every useful rank; plan under a budget.

    e.g. [bold]sepify audit model.pt --trust-pickle --audit-out audit.json[/]
    """
    with errors_as_exit_codes(run.debug):
        wanted = budget.budget()
        if written.plan_out is not None and wanted is None:
            raise typer.BadParameter("needs a budget, e.g. --max-mac-ratio 0.5", param_hint="--plan-out")
        if written.plot is not None:
            _check_matplotlib()
        inputs = {"model": model_path(model), "--weights": load.weights, "--calibration": data_path(data.calibration)}
        outputs = {"--audit-out": written.audit_out, "--plan-out": written.plan_out, "--plot": written.plot}
        check_run(inputs, outputs, force=run.force)
        # torch and the pipeline load here, not at import: `sepify --help` and refusals stay fast
        import torch

        from sepify.cli.inputs import calibration_setting, device, load_model, make_inputs, parse_numbers
        from sepify.options import Selection, Timing
        from sepify.pipeline.audit import audit as audit_model

        ranks = [int(r) for r in parse_numbers(written.ranks, "--ranks", int) or []] or None
        if timing.threads is not None:
            torch.set_num_threads(timing.threads)
        on = device(load.device)
        args = make_inputs(load.input_shape, on)
        calibration = calibration_setting(data, args)
        loaded = load_model(model, load, on, run.quiet, command="audit")
        with progress_display("audit", "analysing the model", run.quiet) as progress:
            report = audit_model(
                loaded.model,
                args,
                ranks=ranks,
                select=Selection(written.include, written.exclude),
                calibration=calibration,
                timing=Timing(backend=timing.latency_backend.value, threads=timing.threads)
                if timing.measured
                else None,
                budget=wanted,
                measure_on=load.measured(),
                progress=progress,
            )
        fmt = TableFormat.JSON if written.as_json else written.fmt
        machine = fmt is not TableFormat.TABLE  # machine-readable stdout stays clean: what was written goes to stderr
        if written.audit_out is not None:  # the measurements are kept even when the budget turns out unreachable
            report.to_json(written.audit_out, overwrite=run.force)
            wrote(written.audit_out, to_stderr=machine)
        try:
            plan = report.plan(**wanted.as_dict()) if wanted is not None else None
        except BudgetError:
            if not run.quiet:  # the finished audit is worth showing, and says what is reachable
                _print(report, None, fmt, wide=written.wide, all_rows=written.all_rows)
            raise
        if not run.quiet:
            _print(report, plan, fmt, wide=written.wide, all_rows=written.all_rows)
        elif plan is not None:
            print_lines("\n".join(plan_summary(plan)[:1]))
        if plan is not None and written.plan_out is not None:
            plan.to_json(written.plan_out, overwrite=run.force)
            wrote(written.plan_out, to_stderr=machine)
        if written.plot is not None:
            from sepify.report.plot import plot_audit

            plot_audit(report, written.plot, plan, overwrite=run.force)
            wrote(written.plot, to_stderr=machine)


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
        print_lines(report.to_text(plan, wide=wide, all_rows=all_rows, width=shutil.get_terminal_size().columns))
