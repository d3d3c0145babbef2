"""``sepify convert``: plan (to a budget, by default a predicted output error of 0.1), convert and write, in one
command; a thin layer over :func:`sepify.convert` and :func:`sepify.io.save.save_model`."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from sepify.cli import options as o
from sepify.cli.app import app, errors_as_exit_codes
from sepify.cli.groups import command
from sepify.cli.output import (
    check_report_path,
    highlight,
    print_lines,
    progress_display,
    step,
    write_report,
    wrote,
)
from sepify.cli.preflight import check_run, data_path, model_path
from sepify.cli.written import check_written, int8_samples
from sepify.errors import ModelError, NothingConvertedError, OutputError
from sepify.io.paths import check_output_name, default_output, format_of, plan_path, weights_path
from sepify.options import DEFAULT_BUDGET
from sepify.vocab import Format, MemoryFormat, Order, SkipReason

if TYPE_CHECKING:
    import torch

    from sepify.options import Budget
    from sepify.pipeline.convert import ConversionResult

__all__ = ["convert"]

EXAMPLES = [
    ("half the MACs, least predicted error", "sepify convert model.pt --trust-pickle --max-mac-ratio 0.5"),
    ("calibrated on your own images", "sepify convert model.pt --trust-pickle --calibration photos/"),
    ("exact (rank 'full'): checks the pipeline", "sepify convert torchvision.models:resnet18 --rank full"),
    ("a plan from `sepify audit` or `sepify plan`", "sepify convert model.pt --trust-pickle --plan plan.json"),
]


@dataclass(frozen=True)
class ConversionOptions:
    """How each chosen conv becomes a pair, when not by a budget."""

    rank: Annotated[str | None, o.option("--rank", metavar="N|full|auto", help="Convert every conv at depth multiplier "
                                     "N, 'full' (exact) or 'auto' (smallest within --tolerance), not to a budget.")] = None  # fmt: skip
    order: Annotated[Order, o.option("--order", metavar="ORDER", help="With --rank: dw-pw (default), pw-dw, pw-dw-pw "
                                 "(bottleneck; rank = its width) or auto.")] = Order.DW_PW  # fmt: skip
    tolerance: Annotated[float | None, o.option("--tolerance", metavar="E", min=0.0, max=1.0,
                                            help="With --rank auto: the largest weight error per layer.")] = None  # fmt: skip
    plan: Annotated[Path | None, o.option("--plan", metavar="FILE", help="Apply a plan from `sepify audit --plan-out` "
                                      "or `sepify plan`.")] = None  # fmt: skip
    allow_larger: Annotated[bool, o.option("--allow-larger", metavar="", help="Build a pair even where --rank makes it "
                                       "larger than its conv.")] = False  # fmt: skip
    include: o.IncludeOpt = None
    exclude: o.ExcludeOpt = None
    skip_shared: o.SkipSharedOpt = False
    no_refine: Annotated[bool, o.option("--no-refine", metavar="", help="With --calibration: skip the closed-form "
                                    "refinement.")] = False  # fmt: skip
    distill_steps: Annotated[int, o.option("--distill-steps", metavar="N", min=0, help="With --calibration: distill "
                                       "this many steps after refinement.")] = 0  # fmt: skip
    train_all: Annotated[bool, o.option("--train-all", metavar="", help="Distill every parameter, not only the "
                                    "converted layers.")] = False  # fmt: skip
    skip_slower: Annotated[bool, o.option("--skip-slower", metavar="", help="Leave a conv alone where its pair was timed "
                                      "no faster (implies --latency).")] = False  # fmt: skip
    tune_layout: Annotated[bool, o.option("--tune-layout", metavar="", help="Time each pair's equivalent layouts and "
                                      "keep the faster.")] = False  # fmt: skip


@dataclass(frozen=True)
class ConvertOutput:
    """What is written and printed."""

    output: Annotated[Path | None, o.option("-o", "--output", metavar="FILE", panel=o.COMMON, help="Default "
                                        "<stem>.sep.pt beside MODEL.")] = None  # fmt: skip
    fmt: Annotated[Format | None, o.option("--format", metavar="FORMAT", help="pt, pt2, onnx, openvino or safetensors "
                                       "(default: from the -o name, else pt).")] = None  # fmt: skip
    report: Annotated[Path | None, o.option("--report", metavar="FILE", help="Also write the report: .json, .csv or "
                                        ".md.")] = None  # fmt: skip
    int8: Annotated[bool, o.option("--int8", metavar="", help="With --format onnx or openvino: post-training int8, "
                               "ranges from --calibration (else synthetic samples); compared with the original "
                               "and float32.")] = False  # fmt: skip
    memory_format: Annotated[MemoryFormat, o.option("--memory-format", metavar="LAYOUT", help="preserve or "
                                                "channels_last.")] = MemoryFormat.PRESERVE  # fmt: skip
    allow_unchanged: Annotated[bool, o.option("--allow-unchanged", metavar="", help="Write the model even when no conv "
                                          "was converted.")] = False  # fmt: skip
    strict: Annotated[bool, o.option("--strict", metavar="", help="Write nothing (exit 1) when the converted model is far "
                                 "from the original (output error > 0.3 or top-1 agreement < 90%).")] = False  # fmt: skip
    max_output_error: Annotated[float | None, o.option("--max-output-error", metavar="E", min=0.0, help="Write nothing "
                                                   "(exit 1) when the output error (on held-out calibration samples, "
                                                   "else the example inputs) is above E.")] = None  # fmt: skip
    wide: Annotated[bool, o.option("--wide", metavar="", help="Every column, whole names.")] = False
    all_rows: Annotated[bool, o.option("--all", metavar="", help="List skipped convs in the table too.")] = False
    as_json: Annotated[bool, o.option("--json", metavar="", help="The report as JSON on stdout, alone.")] = False


@command(app, epilog=o.epilog(EXAMPLES))
def convert(
    model: o.ModelArg,
    load: o.ModelOptions,
    budget: o.BudgetOptions,
    how: ConversionOptions,
    data: o.CalibrationOptions,
    timing: o.TimingOptions,
    written: ConvertOutput,
    run: o.RunOptions,
) -> None:
    """Slim MODEL's convs into depthwise + pointwise pairs and write the result.

    e.g. [bold]sepify convert model.pt --trust-pickle --max-mac-ratio 0.5[/]
    """
    with errors_as_exit_codes(run.debug):
        wanted = _budget(budget, how)
        target, fmt = _checked_outputs(model, load, how, data, written, run, wanted is not None)
        # torch and the pipeline load here, not at import: `sepify --help` and refusals stay fast
        import torch

        from sepify.cli.inputs import calibration_setting, device, load_model, make_inputs, parse_rank
        from sepify.options import Distill, Selection, Timing
        from sepify.pipeline.convert import convert as convert_model
        from sepify.planning.plan import Plan

        on = device(load.device)
        args = make_inputs(load.input_shape, on)
        calibration = calibration_setting(data, args, refine=not how.no_refine)
        if timing.threads is not None:
            torch.set_num_threads(timing.threads)
        timed = timing.measured or how.skip_slower or how.tune_layout
        loaded = load_model(model, load, on, run.quiet)
        with progress_display("convert", "analysing the model", run.quiet) as progress:
            result = convert_model(
                loaded.model,
                args,
                rank=parse_rank(how.rank) if how.rank is not None else None,
                order=how.order.value,
                tolerance=how.tolerance,
                plan=Plan.from_json(how.plan) if how.plan is not None else wanted,
                select=Selection(how.include, how.exclude, how.skip_shared, allow_larger=how.allow_larger),
                calibration=calibration,
                distill=Distill(steps=how.distill_steps, train_all=how.train_all) if how.distill_steps else None,
                timing=Timing(
                    latency=timing.measured,
                    skip_slower=how.skip_slower,
                    tune_layout=how.tune_layout,
                    backend=timing.latency_backend.value,
                    threads=timing.threads,
                )
                if timed
                else None,  # fmt: skip
                measure_on=load.measured(),
                progress=progress,
            )
        _show(result, written, run.quiet)
        _refuse_unwanted(result, model, written, wanted)
        if written.memory_format is MemoryFormat.CHANNELS_LAST:
            result.model.to(memory_format=torch.channels_last)
        samples = calibration.data if calibration is not None else None
        int8 = int8_samples("convert", loaded.model, args, samples, run.quiet) if written.int8 else None
        for path in _write(result, target, fmt, args, written, run, wanted is not None, int8):
            wrote(path, to_stderr=written.as_json)
        check_written("convert", result.model, loaded.model, target, fmt, args, int8, timing.threads,
                      run.quiet or written.as_json)  # fmt: skip
        if run.quiet and not written.as_json:
            print_lines(result.report.summary_line())


def _budget(budget: o.BudgetOptions, how: ConversionOptions) -> Budget | None:
    """The budget to plan for: the one given, else the default unless --rank or --plan choose otherwise."""
    given = budget.budget()
    if given is not None and (how.rank is not None or how.plan is not None):
        other = "--rank" if how.rank is not None else "--plan"
        raise typer.BadParameter(f"a budget and {other} both choose the ranks; pass one of them", param_hint=other)
    if how.rank is not None and how.plan is not None:
        raise typer.BadParameter("--rank and --plan both choose the ranks; pass one of them", param_hint="--plan")
    if how.rank == "auto" and how.tolerance is None:
        raise typer.BadParameter("--rank auto needs it: the largest weight error per layer, e.g. 0.3",
                                 param_hint="--tolerance")  # fmt: skip
    if how.tolerance is not None and how.rank != "auto":
        raise typer.BadParameter("applies only to --rank auto; drop it or pass --rank auto", param_hint="--tolerance")
    if given is None and how.rank is None and how.plan is None:
        return DEFAULT_BUDGET
    return given


def _checked_outputs(
    model: str,
    load: o.ModelOptions,
    how: ConversionOptions,
    data: o.CalibrationOptions,
    written: ConvertOutput,
    run: o.RunOptions,
    planned: bool,
) -> tuple[Path, str]:
    """Every input and output checked before any work; the model's path and format."""
    source = model_path(model)
    default = Format.PT2 if source is not None and source.suffix == ".pt2" else Format.PT
    fmt = written.fmt or (format_of(written.output, default) if written.output is not None else default)
    target = written.output or default_output(model, fmt)
    check_output_name(target, fmt.value)
    if written.int8:
        from sepify.runtime.quantize import check_int8

        check_int8(fmt.value)
    if written.report is not None:
        check_report_path(written.report)
    inputs = {
        "model": source, "--weights": load.weights, "--calibration": data_path(data.calibration), "--plan": how.plan,
    }  # fmt: skip
    outputs = {
        "-o": target,
        "plan (beside -o)": plan_path(target) if fmt is Format.SAFETENSORS or planned else None,
        "weights (beside -o)": weights_path(target) if fmt is Format.OPENVINO else None,
        "--report": written.report,
    }
    check_run(inputs, outputs, force=run.force)
    return target, fmt.value


def _show(result: ConversionResult, written: ConvertOutput, quiet: bool) -> None:
    report = result.report
    if written.as_json:
        print_lines(report.to_json(), end="")
    elif not quiet:
        print_lines(
            report.to_text(wide=written.wide, all_rows=written.all_rows, width=shutil.get_terminal_size().columns)
        )
    if report.far_from_original:
        error, top1, where = report.closeness
        measured = ", ".join(
            ([f"output error {error:.3g}"] if error is not None else [])
            + ([f"top-1 agreement {top1:.0%}"] if top1 is not None else [])
        )
        highlight(
            f"the converted model is far from the original on {where} ({measured}); plan to a budget "
            "(--max-error 0.1), give --calibration data, or raise --rank"
        )


def _refuse_unwanted(result: ConversionResult, model: str, written: ConvertOutput, wanted: Budget | None) -> None:
    """Nothing converted, or farther from the original than asked: nothing is written."""
    report = result.report
    if not report.converted and not written.allow_unchanged:
        budgeted = wanted is not None and any(row.skip_reason is SkipReason.NOT_PLANNED for row in report.layers)
        if budgeted:
            assert wanted is not None
            default = " (the default)" if wanted == DEFAULT_BUDGET else ""
            raise NothingConvertedError(
                f"no conv of {model} could be converted within {wanted.describe()}{default}, so nothing was written; "
                "relax the budget (--max-error 0.3, --max-mac-ratio 0.5), give --calibration data, or pass "
                "--allow-unchanged to write the copy"
            )
        raise NothingConvertedError(
            f"no conv of {model} was converted ({report.skip_summary()}), so nothing was written; change the "
            "selection, or pass --allow-unchanged to write the unchanged copy"
        )
    error, _, where = report.closeness
    if written.max_output_error is not None and (error is None or error > written.max_output_error):
        raise ModelError(
            f"the converted model's output error on {where}, {error if error is None else format(error, '.3g')}, "
            f"is above --max-output-error {written.max_output_error:g}, so nothing was written; plan to a budget, "
            "give --calibration data, or raise --rank"
        )
    if written.strict and report.far_from_original:
        raise ModelError(
            "--strict: the converted model is far from the original (see the warning), so nothing was written"
        )


def _write(
    result: ConversionResult,
    target: Path,
    fmt: str,
    args: tuple[torch.Tensor, ...],
    written: ConvertOutput,
    run: o.RunOptions,
    planned: bool,
    int8: list[tuple[torch.Tensor, ...]] | None = None,
) -> list[Path]:
    """The plan made for a budget, the model, then the report (written even when the model cannot be)."""
    from sepify.io.save import save_model

    plan_json = result.report.to_plan().to_json()
    files: list[Path] = []
    try:
        with step("convert", f"writing {target}", run.quiet or written.as_json):
            if planned and fmt != Format.SAFETENSORS:  # safetensors keeps its plan beside it anyway
                from sepify.io.atomic import write_text_atomic

                write_text_atomic(plan_path(target), plan_json, overwrite=run.force)
                files.append(plan_path(target))
            files += save_model(
                result.model, target, fmt, example_args=args, plan_json=plan_json, overwrite=run.force, int8=int8
            )
    except OutputError as e:
        if written.report is None:
            raise
        write_report(result.report, written.report, overwrite=run.force)
        raise OutputError(f"{e} (the conversion report was written to {written.report})") from e
    if written.report is not None:
        write_report(result.report, written.report, overwrite=run.force)
        files.append(written.report)
    return files
