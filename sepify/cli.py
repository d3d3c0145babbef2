"""The ``sepify`` command line (typer + rich). The only module that imports either.

Exit codes: 0 success, 1 a sepify error (one sentence on stderr; traceback
with ``--debug`` or ``SEPIFY_DEBUG=1``), 2 a usage error.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any

import torch
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

import sepify
from sepify.datasets import load_calibration
from sepify.errors import SepifyError
from sepify.model_io import FORMATS, LoadedModel, default_output, is_import_spec, load_model, save_model
from sepify.plan import Plan
from sepify.report import ConversionReport, format_count

app = typer.Typer(
    name="sepify",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    rich_markup_mode="rich",
    help="Rewrite a trained model's Conv2d layers into depthwise + pointwise pairs, and report what it saves.",
)
out = Console()
err = Console(stderr=True)

_DTYPES = {
    "float32": torch.float32, "float": torch.float32, "float64": torch.float64, "double": torch.float64,
    "float16": torch.float16, "half": torch.float16, "bfloat16": torch.bfloat16,
    "int64": torch.int64, "long": torch.int64, "int32": torch.int32, "int": torch.int32, "bool": torch.bool,
}  # fmt: skip
_INT_HIGH = 10  # integer example inputs are drawn from [0, 10): valid ids/indices for most models


# -- shared option types -------------------------------------------------------

ModelArg = Annotated[
    str,
    typer.Argument(
        help="A model file saved with torch.save(model) or torch.export (.pt2), or an import spec such as "
        "[bold]torchvision.models:resnet18[/] or [bold]path/to/file.py:build[/] (safest: no pickle).",
        show_default=False,
    ),
]
InputShapeOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--input-shape",
        help="Shape of one example input, e.g. 1,3,224,224; add :int64 (or another dtype) for integer inputs, "
        "which are drawn from [0, 10). Repeat for models with several inputs. Default 1,3,224,224.",
        show_default=False,
    ),
]
TrustPickleOpt = Annotated[
    bool,
    typer.Option("--trust-pickle", help="Allow loading a pickled model or .pt2 archive (runs code from the file)."),
]
KwargsOpt = Annotated[
    str | None,
    typer.Option("--kwargs", help="JSON keyword arguments for an import spec, e.g. '{\"num_classes\": 10}'."),
]
WeightsOpt = Annotated[
    Path | None, typer.Option("--weights", help="A state_dict (.pt/.pth, read with weights_only=True) or .safetensors.")
]
DeviceOpt = Annotated[str, typer.Option("--device", help="Device to load and convert on: cpu or cuda.")]
DebugOpt = Annotated[bool, typer.Option("--debug", help="Show the traceback of sepify errors.")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Overwrite existing output files.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="Print only results and errors (no progress).")]
CalibrationSamplesOpt = Annotated[
    int | None,
    typer.Option("--calibration-samples", help="Use at most N calibration samples (default: all; 256 for "
                 "'random').", show_default=False),
]  # fmt: skip
TrainOpt = Annotated[
    bool,
    typer.Option("--train", help="Trace and convert in training mode (default: eval mode, as the model is deployed)."),
]


def _version_callback(value: bool) -> None:
    if value:
        out.print(f"sepify {sepify.__version__} (torch {torch.__version__})")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version_callback, is_eager=True, help="Show the version and exit.")
    ] = False,
) -> None:
    """sepify: depthwise-separable conversion of trained PyTorch models."""


# -- helpers -------------------------------------------------------------------


def parse_input_shape(text: str) -> tuple[tuple[int, ...], torch.dtype]:
    """``"1,3,224,224"`` -> ``((1, 3, 224, 224), float32)``; ``"1,10:int64"`` -> int64."""
    shape_part, _, dtype_part = text.partition(":")
    try:
        shape = tuple(int(s) for s in shape_part.replace("x", ",").split(",") if s.strip())
    except ValueError:
        raise typer.BadParameter(f"{text!r} is not a shape; write it like 1,3,224,224") from None
    if not shape or any(d < 0 for d in shape):
        raise typer.BadParameter(f"{text!r} is not a shape; write it like 1,3,224,224")
    dtype_name = dtype_part.strip().lower() or "float32"
    if dtype_name not in _DTYPES:
        raise typer.BadParameter(f"unknown dtype {dtype_part!r} in {text!r}; use one of {', '.join(sorted(_DTYPES))}")
    return shape, _DTYPES[dtype_name]


def make_inputs(shapes: list[str] | None, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Seeded example inputs: Gaussian floats, integers in [0, 10)."""
    gen = torch.Generator().manual_seed(0)
    tensors = []
    for text in shapes or ["1,3,224,224"]:
        shape, dtype = parse_input_shape(text)
        if dtype.is_floating_point:
            t = torch.randn(shape, generator=gen).to(dtype)
        else:
            t = torch.randint(0, _INT_HIGH, shape, generator=gen).to(dtype)
        tensors.append(t.to(device))
    return tuple(tensors)


def _device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError:
        raise typer.BadParameter(f"unknown device {name!r}; use cpu or cuda", param_hint="--device") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SepifyError("--device cuda was asked for, but torch sees no CUDA device here; use --device cpu")
    return device


def _parse_kwargs(text: str | None) -> dict[str, Any]:
    if text is None:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise typer.BadParameter(f"not valid JSON ({e.msg}): {text}", param_hint="--kwargs") from None
    if not isinstance(value, dict):
        raise typer.BadParameter("must be a JSON object like '{\"num_classes\": 10}'", param_hint="--kwargs")
    return value


def _rank(text: str) -> int | str:
    if text in ("full", "auto"):
        return text
    try:
        value = int(text)
    except ValueError:
        raise typer.BadParameter(
            f"{text!r} is not a rank; use a positive integer, 'full' or 'auto'", param_hint="--rank"
        ) from None
    if value < 1:
        raise typer.BadParameter(
            f"{text!r} is not a rank; use a positive integer, 'full' or 'auto'", param_hint="--rank"
        )
    return value


@contextlib.contextmanager
def _step(message: str, quiet: bool) -> Iterator[None]:
    """A spinner on stderr while a step runs (nothing when quiet or not a terminal)."""
    if quiet or not err.is_terminal:
        yield
        return
    with err.status(message):
        yield


@contextlib.contextmanager
def _errors(debug: bool) -> Iterator[None]:
    """Turn sepify errors into one line on stderr and exit code 1.

    Only SepifyError is caught: anything else is a bug and keeps its traceback
    (and typer.Exit, a RuntimeError subclass, must pass through untouched).
    """
    try:
        yield
    except SepifyError as e:
        if debug or os.environ.get("SEPIFY_DEBUG") == "1":
            raise
        err.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
        raise typer.Exit(code=1) from None


def _load(model: str, trust_pickle: bool, kwargs: str | None, weights: Path | None, device: torch.device,
          quiet: bool, train: bool) -> LoadedModel:  # fmt: skip
    with _step(f"loading {model}", quiet):
        loaded = load_model(model, trust_pickle=trust_pickle, kwargs=_parse_kwargs(kwargs), weights=weights)
    # fx freezes `self.training` branches into the graph, so the mode is chosen
    # before tracing; deployment (eval) is what a converted model is for.
    loaded.model.to(device)
    if loaded.kind == "pt2":
        # an exported program's graph fixed its mode at export time (and its
        # module refuses .train()); nothing to choose here
        if train:
            raise SepifyError(f"{model}: a torch.export program has its mode fixed at export; drop --train")
        return loaded
    loaded.model.train(train)
    return loaded


def _report_table(report: ConversionReport) -> Table:
    table = Table(title=None, show_lines=False, header_style="bold")
    for name, justify in [("layer", "left"), ("status", "left"), ("Cin", "right"), ("Cout", "right"),
                          ("kernel", "right"), ("stride", "right"), ("out", "right"), ("rank", "right"),
                          ("order", "left"), ("params", "right"), ("→", "right"), ("MACs", "right"), ("→ ", "right"),
                          ("weight err", "right")]:  # fmt: skip
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    for r in report.layers:
        status = "[green]converted[/]" if r.converted else f"[dim]{r.skip_reason}[/]"
        if r.larger_than_original:
            status += " [yellow](larger)[/]"
        rank = "-" if r.rank is None else f"{r.rank}" + ("*" if r.rank_capped else "")
        table.add_row(
            r.name, status, str(r.in_channels), str(r.out_channels), "x".join(map(str, r.kernel_size)),
            "x".join(map(str, r.stride)), "x".join(map(str, r.output_size)) if r.output_size else "-", rank,
            r.order or "-", format_count(r.params_before), format_count(r.params_after),
            format_count(r.macs_before), format_count(r.macs_after),
            "-" if r.weight_error is None else f"{r.weight_error:.4f}",
        )  # fmt: skip
    return table


def _print_report(report: ConversionReport) -> None:
    if not out.is_terminal:
        # Piped or captured: the plain aligned table, never squeezed to 80 columns.
        out.print(str(report), highlight=False, soft_wrap=True, markup=False)
        return
    out.print(_report_table(report))
    for line in str(report).split("\n\n", 1)[-1].splitlines():
        out.print(line, highlight=False, soft_wrap=True, markup=False)


def _check_writable(path: Path, force: bool, protected: Path | None) -> None:
    if protected is not None and protected.exists() and path.resolve() == protected.resolve():
        raise SepifyError(f"{path}: is the input model; sepify never overwrites its input, so choose another -o path")
    if path.exists() and not force:
        raise SepifyError(f"{path}: already exists; pass --force to overwrite it, or -o to choose another path")
    if not path.parent.is_dir():
        raise SepifyError(f"{path}: its folder {path.parent} does not exist; create it or choose another -o path")


_REPORT_SUFFIXES = (".json", ".csv", ".md", ".markdown")


def _check_report_path(path: Path) -> None:
    if path.suffix.lower() not in _REPORT_SUFFIXES:
        raise SepifyError(f"{path}: unknown report format {path.suffix or '(no extension)'!r}; use .json, .csv or .md")


def _write_report(report: ConversionReport | Any, path: Path) -> None:
    _check_report_path(path)
    suffix = path.suffix.lower()
    if suffix == ".json":
        report.to_json(path)
    elif suffix == ".csv":
        report.to_csv(path)
    elif suffix in (".md", ".markdown"):
        from sepify.atomic import write_text_atomic

        write_text_atomic(path, report.to_markdown())


# -- commands ------------------------------------------------------------------


@app.command()
def convert(
    model: ModelArg,
    output: Annotated[
        Path | None,
        typer.Option(
            "-o",
            "--output",
            help="Where to write the converted model. Default: <stem>.sep<ext> beside "
            "the input (for an import spec: <callable>.sep.pt here).",
            show_default=False,
        ),
    ] = None,
    input_shape: InputShapeOpt = None,
    rank: Annotated[
        str,
        typer.Option(
            "--rank",
            help="Depth multiplier: a positive integer, 'full' (exact), or "
            "'auto' (per layer the smallest rank within --tolerance).",
        ),
    ] = "1",
    tolerance: Annotated[
        float | None,
        typer.Option(
            "--tolerance",
            help="With --rank auto: the largest relative weight error to accept per layer, e.g. 0.1.",
            show_default=False,
        ),
    ] = None,
    order: Annotated[str, typer.Option("--order", help="dw-pw, pw-dw or auto (per layer, the lower error).")] = "dw-pw",
    include: Annotated[
        list[str] | None,
        typer.Option("--include", help="Only convert convs matching this glob (repeatable).", show_default=False),
    ] = None,
    exclude: Annotated[
        list[str] | None,
        typer.Option("--exclude", help="Leave convs matching this glob alone (repeatable).", show_default=False),
    ] = None,
    plan: Annotated[
        Path | None,
        typer.Option("--plan", help="Apply a plan file (from `sepify audit --plan-out`).", show_default=False),
    ] = None,
    skip_shared: Annotated[
        bool, typer.Option("--skip-shared", help="Leave convs called more than once alone.")
    ] = False,
    report: Annotated[
        Path | None, typer.Option("--report", help="Also write the report: .json, .csv or .md.", show_default=False)
    ] = None,
    fmt: Annotated[
        str | None,
        typer.Option(
            "--format",
            help="pt, pt2, onnx or safetensors (+ .plan.json). Default: pt2 for a .pt2 input, else pt.",
            show_default=False,
        ),
    ] = None,
    calibration: Annotated[
        str | None,
        typer.Option(
            "--calibration",
            help="Unlabelled inputs to refine (and "
            "distill) with: an image folder, a .pt/.npy tensor file, or 'random'.",
            show_default=False,
        ),
    ] = None,
    calibration_samples: CalibrationSamplesOpt = None,
    image_size: Annotated[
        str | None,
        typer.Option(
            "--image-size", help="Resize calibration images to H,W (default: the input's H,W).", show_default=False
        ),
    ] = None,
    mean: Annotated[
        str | None,
        typer.Option(
            "--mean",
            help="Per-channel mean for images (default ImageNet's for RGB, 0.5 for grayscale).",
            show_default=False,
        ),
    ] = None,
    std: Annotated[
        str | None,
        typer.Option(
            "--std",
            help="Per-channel std for images (default ImageNet's for RGB, 0.5 for grayscale).",
            show_default=False,
        ),
    ] = None,
    distill_steps: Annotated[
        int,
        typer.Option(
            "--distill-steps", help="Knowledge-distillation steps after the closed-form refit (needs --calibration)."
        ),
    ] = 0,
    train_all: Annotated[
        bool, typer.Option("--train-all", help="Distill every parameter, not only the converted layers.")
    ] = False,
    no_refine: Annotated[
        bool, typer.Option("--no-refine", help="Skip the closed-form refit (init only, then distillation if asked).")
    ] = False,
    tune_layout: Annotated[
        bool,
        typer.Option(
            "--tune-layout",
            help="Time the equivalent layouts of each pw-dw pair at rank > 1 on this "
            "machine and keep the faster (outputs then depend on timing, at float rounding level).",
        ),
    ] = False,
    latency: Annotated[
        bool,
        typer.Option(
            "--latency",
            help="Time each pair against the conv it replaces at the layer's input shape (on this machine, "
            "with --input-shape's batch) and report time ratio and realisation per layer; implies --tune-layout.",
        ),
    ] = False,
    skip_slower: Annotated[
        bool,
        typer.Option("--skip-slower", help="Leave a conv alone when its pair was timed no faster (implies --latency)."),
    ] = False,
    memory_format: Annotated[
        str,
        typer.Option(
            "--memory-format",
            help="Store the converted model's conv weights as channels_last (often "
            "faster on CPUs for depthwise convs; see docs/benchmarks.md) or keep them (preserve).",
        ),
    ] = "preserve",
    force: ForceOpt = False,
    quiet: QuietOpt = False,
    trust_pickle: TrustPickleOpt = False,
    kwargs: KwargsOpt = None,
    weights: WeightsOpt = None,
    device: DeviceOpt = "cpu",
    train: TrainOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Convert a model's Conv2d layers into depthwise + pointwise pairs and save it.

    Prints the per-layer report (params, MACs, savings, weight and output
    error) and writes the converted model; the input is never modified.
    """
    with _errors(debug):
        rank_value = _rank(rank)
        if rank_value == "auto" and tolerance is None:
            raise typer.BadParameter("--rank auto needs --tolerance (e.g. 0.1)", param_hint="--tolerance")
        if tolerance is not None and rank_value != "auto":
            raise typer.BadParameter("--tolerance applies only to --rank auto", param_hint="--tolerance")
        if order not in ("dw-pw", "pw-dw", "auto"):
            raise typer.BadParameter(f"{order!r}; use dw-pw, pw-dw or auto", param_hint="--order")
        if memory_format not in ("preserve", "channels_last"):
            raise typer.BadParameter(f"{memory_format!r}; use preserve or channels_last", param_hint="--memory-format")
        if fmt is not None and fmt not in FORMATS:
            raise typer.BadParameter(f"{fmt!r}; use one of {', '.join(FORMATS)}", param_hint="--format")
        dev = _device(device)
        args = make_inputs(input_shape, dev)
        the_plan = Plan.from_json(plan) if plan is not None else None

        input_path = None if is_import_spec(model) else Path(model)
        # Fail before the slow work: decide every output path first.
        chosen_fmt = fmt or ("pt2" if input_path is not None and input_path.suffix == ".pt2" else "pt")
        target = output or default_output(model, chosen_fmt)
        _check_writable(target, force, input_path)
        if chosen_fmt == "safetensors":
            _check_writable(
                target.with_name(target.name.removesuffix(".safetensors") + ".plan.json"), force, input_path
            )
        if report is not None:
            _check_report_path(report)
            _check_writable(report, force, input_path)

        if distill_steps and calibration is None:
            raise typer.BadParameter("--distill-steps needs --calibration", param_hint="--distill-steps")
        calib = None
        if calibration is not None:
            if calibration == "random" and not quiet:
                err.print("warning: calibrating on random noise; fidelity on real inputs will be worse than with "
                          "real samples", highlight=False, soft_wrap=True)  # fmt: skip
            calib = load_calibration(calibration, tuple(args[0].shape[1:]), samples=calibration_samples,
                                     image_size=_floats(image_size, "--image-size", int),
                                     mean=_floats(mean, "--mean", float), std=_floats(std, "--std", float))  # fmt: skip
        loaded = _load(model, trust_pickle, kwargs, weights, dev, quiet, train)
        result = _run_convert(loaded.model, args, quiet, rank=rank_value, order=order, include=include,
                              exclude=exclude, skip_shared=skip_shared, plan=the_plan, tolerance=tolerance,
                              calibration=calib, refine=not no_refine, distill_steps=distill_steps,
                              train_all=train_all, tune_layout=tune_layout, latency=latency,
                              skip_slower=skip_slower)  # fmt: skip
        if not quiet:
            _print_report(result.report)
        if memory_format == "channels_last":
            result.model.to(memory_format=torch.channels_last)
        with _step(f"writing {target}", quiet):
            written = save_model(result.model, target, chosen_fmt, example_args=args, plan=result.report.to_plan())
        if report is not None:
            _write_report(result.report, report)
            written.append(report)
        if not quiet:
            for path in written:
                out.print(f"wrote {path}", highlight=False, soft_wrap=True)


@app.command()
def audit(
    model: ModelArg,
    input_shape: InputShapeOpt = None,
    latency: Annotated[
        bool, typer.Option("--latency", help="Time each conv against its pairs on this machine.")
    ] = False,
    max_mac_ratio: Annotated[
        float | None,
        typer.Option(
            "--max-mac-ratio", help="Plan: whole-model MACs <= R x original, least predicted error.", show_default=False
        ),
    ] = None,
    max_param_ratio: Annotated[
        float | None, typer.Option("--max-param-ratio", help="Plan: params <= R x original.", show_default=False)
    ] = None,
    max_latency_ratio: Annotated[
        float | None,
        typer.Option(
            "--max-latency-ratio", help="Plan: latency <= R x original (needs --latency).", show_default=False
        ),
    ] = None,
    max_error: Annotated[
        float | None,
        typer.Option("--max-error", help="Plan: most MACs saved with predicted output error <= E.", show_default=False),
    ] = None,
    plan_out: Annotated[
        Path | None,
        typer.Option("--plan-out", help="Write the plan (JSON) for `sepify convert --plan`.", show_default=False),
    ] = None,
    plot: Annotated[
        Path | None,
        typer.Option(
            "--plot", help="Write a PNG chart of MACs saved vs error per layer (needs matplotlib).", show_default=False
        ),
    ] = None,
    fmt: Annotated[str, typer.Option("--format", help="table, json, csv or md.")] = "table",
    ranks: Annotated[
        str | None,
        typer.Option("--ranks", help="Only these ranks, e.g. 1,2,4 (default: every useful rank).", show_default=False),
    ] = None,
    include: Annotated[
        list[str] | None, typer.Option("--include", help="Only audit convs matching this glob.", show_default=False)
    ] = None,
    exclude: Annotated[
        list[str] | None, typer.Option("--exclude", help="Skip convs matching this glob.", show_default=False)
    ] = None,
    calibration: Annotated[
        str | None,
        typer.Option(
            "--calibration",
            help="Measure errors on these inputs (an "
            "image folder, a .pt/.npy file or 'random') and plan for the refit `convert "
            "--calibration` applies.",
            show_default=False,
        ),
    ] = None,
    calibration_samples: CalibrationSamplesOpt = None,
    force: ForceOpt = False,
    quiet: QuietOpt = False,
    trust_pickle: TrustPickleOpt = False,
    kwargs: KwargsOpt = None,
    weights: WeightsOpt = None,
    device: DeviceOpt = "cpu",
    train: TrainOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Show which convs are worth slimming: cost, savings and error at every useful rank.

    With a budget (--max-mac-ratio, --max-param-ratio, --max-latency-ratio
    or --max-error) it also picks a rank and order per layer; --plan-out
    saves that plan for `sepify convert --plan`.
    """
    with _errors(debug):
        if fmt not in ("table", "json", "csv", "md"):
            raise typer.BadParameter(f"{fmt!r}; use table, json, csv or md", param_hint="--format")
        rank_list = None
        if ranks is not None:
            try:
                rank_list = [int(r) for r in ranks.split(",") if r.strip()]
            except ValueError:
                raise typer.BadParameter(f"{ranks!r}; write ranks like 1,2,4", param_hint="--ranks") from None
        budgets = {"max_mac_ratio": max_mac_ratio, "max_param_ratio": max_param_ratio,
                   "max_latency_ratio": max_latency_ratio, "max_error": max_error}  # fmt: skip
        given = {k: v for k, v in budgets.items() if v is not None}
        if len(given) > 1:
            raise typer.BadParameter("give one budget: --max-mac-ratio, --max-param-ratio, --max-latency-ratio "
                                     "or --max-error")  # fmt: skip
        if plan_out is not None and not given:
            raise typer.BadParameter("--plan-out needs a budget, e.g. --max-mac-ratio 0.5", param_hint="--plan-out")
        if plot is not None:
            try:
                import matplotlib  # noqa: F401 - checked before any slow work or any output file
            except ImportError:
                raise SepifyError("--plot needs matplotlib; pip install 'sepify[plot]'") from None
        input_path = None if is_import_spec(model) else Path(model)
        for path in (plan_out, plot):
            if path is not None:
                _check_writable(path, force, input_path)
        dev = _device(device)
        args = make_inputs(input_shape, dev)
        calib = None
        if calibration is not None:
            calib = load_calibration(calibration, tuple(args[0].shape[1:]), samples=calibration_samples).to(dev)
        loaded = _load(model, trust_pickle, kwargs, weights, dev, quiet, train)
        report = _run_audit(loaded.model, args, quiet, ranks=rank_list, latency=latency, include=include,
                            exclude=exclude, calibration=calib)  # fmt: skip
        plan = report.plan(**given) if given else None
        if fmt == "json":
            data = report.to_dict()
            if plan is not None:
                data["plan"] = plan.to_dict()
            out.print_json(json.dumps(data))
        elif fmt == "csv":
            out.print(report.to_csv(), end="", highlight=False, markup=False, soft_wrap=True)
        elif fmt == "md":
            out.print(report.to_markdown(), end="", highlight=False, markup=False, soft_wrap=True)
        else:
            out.print(str(report), highlight=False, markup=False, soft_wrap=True)
            if plan is not None:
                meta = plan.meta
                out.print(
                    f"plan: {len(plan)} convs; MACs {meta['mac_ratio']:.3f}x, params {meta['param_ratio']:.3f}x, "
                    f"predicted output error {meta['predicted_error']:.3g}",
                    highlight=False, soft_wrap=True,
                )  # fmt: skip
        if plan is not None and plan_out is not None:
            plan.to_json(plan_out)
            if fmt == "table":
                out.print(f"wrote {plan_out}", highlight=False, soft_wrap=True)
        if plot is not None:
            report.to_png(plot, plan)
            if fmt == "table":
                out.print(f"wrote {plot}", highlight=False, soft_wrap=True)


@contextlib.contextmanager
def _progress_bar(first_step: str) -> Iterator[Callable[[str, int, int], None]]:
    """A transient rich progress bar on stderr; yields the ``progress(step, done, total)`` callback."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=err, transient=True) as bar:  # fmt: skip
        task = bar.add_task(first_step, total=None)

        def progress(step: str, done: int, total: int) -> None:
            bar.update(task, description=step, completed=done, total=total)

        yield progress


def _run_audit(model: torch.nn.Module, args: tuple[torch.Tensor, ...], quiet: bool, **kwargs: Any) -> Any:
    """sepify.audit with a progress bar on a terminal."""
    if quiet or not err.is_terminal:
        return sepify.audit(model, args, **kwargs)
    with _progress_bar("tracing") as progress:
        return sepify.audit(model, args, progress=progress, **kwargs)


def _floats(text: str | None, hint: str, kind: type) -> list[Any] | None:
    if text is None:
        return None
    try:
        return [kind(v) for v in text.replace("x", ",").split(",") if v.strip()]
    except ValueError:
        raise typer.BadParameter(f"{text!r}; write comma-separated numbers", param_hint=hint) from None


def _run_convert(model: torch.nn.Module, args: tuple[torch.Tensor, ...], quiet: bool, **kwargs: Any) -> Any:
    """sepify.convert with a spinner, or a progress bar while calibrating."""
    if quiet or not err.is_terminal:
        return sepify.convert(model, args, **kwargs)
    if kwargs.get("calibration") is None:
        with _step("converting", quiet):
            return sepify.convert(model, args, **kwargs)
    with _progress_bar("converting") as progress:
        return sepify.convert(model, args, progress=progress, **kwargs)


def main() -> None:
    """Entry point of the ``sepify`` script."""
    app()
