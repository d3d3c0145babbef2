"""``sepify distill``: a thin command over :func:`sepify.distill`; runs the same under ``torchrun``.

It keeps convert's promises: every input (student, teacher, weights, data, evaluation data, the checkpoint it
resumes from) and every output (the model and the files beside it, the log, the checkpoint) is checked before
any work; nothing is written that is not finite; every write is atomic.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from sepify.cli import options as o
from sepify.cli.app import app, errors_as_exit_codes
from sepify.cli.groups import command
from sepify.cli.output import print_lines, progress_display, step, wrote
from sepify.cli.preflight import Inputs, check_run, data_path, model_path
from sepify.cli.written import check_written, int8_samples
from sepify.errors import OutputError
from sepify.io.paths import check_output_name, format_of, plan_path, weights_path
from sepify.vocab import Format, Loss

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = ["distill"]

EXAMPLES = [
    ("recover a slim model on its training images (defaults: the benchmark's)",
     "sepify distill slim.pt --trust-pickle --teacher model.pt --data train.npy"),
    ("on two processes (torch.distributed, gloo on CPU)",
     "torchrun --nproc-per-node 2 -m sepify distill slim.pt --teacher ..."),
    ("keep checkpoints; continue after an interruption",
     "sepify distill ... --checkpoint-dir ckpt  (then the same with --resume)"),
]  # fmt: skip


StudentArg = Annotated[
    str,
    typer.Argument(metavar="STUDENT", help="The converted model (.pt, or .safetensors: no pickle).",
                   show_default=False),
]  # fmt: skip


@dataclass(frozen=True)
class TrainingOptions:
    """The teacher, the data and how long to train (unset: :class:`sepify.Distill`'s defaults)."""

    teacher: Annotated[str, o.option("--teacher", metavar="MODEL", panel=o.COMMON, help="The original model.")]  # fmt: skip
    data: Annotated[str, o.option("--data", metavar="DATA", panel=o.COMMON, help="Images, .pt/.npy or module:fn.")]  # fmt: skip
    eval_data: Annotated[str | None, o.option("--eval-data", metavar="DATA", help="Held-out inputs; the best weights on "
                                          "them are kept.")] = None  # fmt: skip
    steps: Annotated[int | None, o.option("--steps", metavar="N", min=1, help="Optimiser steps (default 300).")] = None
    batch_size: Annotated[int | None, o.option("--batch-size", metavar="B", min=1, help="Global batch, split across "
                                           "processes (default 64).")] = None  # fmt: skip
    lr: Annotated[float | None, o.option("--lr", metavar="LR", min=0.0, help="Peak learning rate (default 0.01).")] = (
        None
    )
    loss: Annotated[Loss | None, o.option("--loss", metavar="LOSS", help="mse (default; relative to the outputs' mean "
                                      "square), kl (logits), feature (converted layers) or both.")] = None  # fmt: skip
    train_all: Annotated[bool, o.option("--train-all", metavar="", help="Train every parameter, not only the "
                                    "pairs.")] = False  # fmt: skip
    checkpoint_dir: Annotated[Path | None, o.option("--checkpoint-dir", metavar="DIR", help="Write checkpoint.pt here "
                                                "every --checkpoint-every steps and when interrupted.")] = None  # fmt: skip
    checkpoint_every: Annotated[int, o.option("--checkpoint-every", metavar="N", min=1, help="Steps between "
                                          "checkpoints (default 100).")] = 100  # fmt: skip
    resume: Annotated[bool, o.option("--resume", metavar="", help="Continue from --checkpoint-dir's checkpoint (ends as "
                                 "an uninterrupted run would).")] = False  # fmt: skip
    image_size: o.ImageSizeOpt = None
    mean: o.MeanOpt = None
    std: o.StdOpt = None


@dataclass(frozen=True)
class DistillOutput:
    """What is written."""

    output: Annotated[Path, o.option("-o", "--output", metavar="FILE", panel=o.COMMON, help="The result.")]  # fmt: skip
    fmt: Annotated[Format | None, o.option("--format", metavar="FORMAT", help="pt, pt2, onnx, openvino or safetensors "
                                       "(default: from the -o name, else pt).")] = None  # fmt: skip
    log: Annotated[Path | None, o.option("--log", metavar="FILE", help="One line per logged step: JSON lines, or CSV "
                                     "for a .csv name.")] = None  # fmt: skip
    int8: Annotated[bool, o.option("--int8", metavar="", help="With --format onnx or openvino: post-training int8, "
                               "ranges from --data; compared with the teacher and float32.")] = False  # fmt: skip


@command(app, epilog=o.epilog(EXAMPLES))
def distill(
    student: StudentArg, load: o.LoadOptions, train: TrainingOptions, written: DistillOutput, run: o.RunOptions
) -> None:
    """Distill STUDENT from the original on unlabelled data (torchrun: several processes).

    e.g. [bold]sepify distill slim.pt --trust-pickle --teacher model.pt --data x.npy -o out.pt[/]
    """
    with errors_as_exit_codes(run.debug):
        rank = int(os.environ.get("RANK", "0"))
        fmt, checkpoint = _checked(student, load, train, written, run)

        from sepify.cli.inputs import device, load_model
        from sepify.options import Distill
        from sepify.pipeline.distill import distill as distill_model

        on = device(load.device)
        teacher = load_model(train.teacher, load, on, run.quiet or rank != 0, command="distill").model
        student_model = _student(Path(student), teacher, load, run.quiet).to(on)
        train_data, args = _data(train.data, load, train, on)
        held = _data(train.eval_data, load, train, on, args)[0] if train.eval_data is not None else None
        defaults = Distill()
        settings = Distill(
            steps=train.steps or defaults.steps,
            batch_size=train.batch_size or defaults.batch_size,
            lr=train.lr or defaults.lr,
            loss=(train.loss or defaults.loss).__str__(),
            train_all=train.train_all,
            checkpoint_dir=train.checkpoint_dir,
            checkpoint_every=train.checkpoint_every,
        )
        if checkpoint is not None and rank == 0:
            _check_room(checkpoint.parent, student_model)
        with progress_display("distill", "distilling", run.quiet or rank != 0) as progress:
            result = distill_model(
                student_model, teacher, train_data, settings, eval_data=held, log=written.log, resume=train.resume,
                progress=progress,
            )  # fmt: skip
        if rank != 0:
            return
        if not run.quiet:
            print_lines(_summary(result, settings))
            for note in result.notes:
                print_lines(note)
        from sepify.io.save import save_model

        int8 = int8_samples("distill", teacher, args, train_data, run.quiet) if written.int8 else None
        with step("distill", f"writing {written.output}", run.quiet):
            plan_json = _plan_json(result.model) if fmt is Format.SAFETENSORS else ""
            files = save_model(result.model, written.output, fmt.value, example_args=args, plan_json=plan_json,
                               overwrite=run.force, int8=int8)  # fmt: skip
        for path in files:
            wrote(path, to_stderr=run.quiet)
        check_written("distill", result.model, teacher, written.output, fmt.value, args, int8, None, run.quiet)
        if run.quiet:
            print_lines(_summary(result, settings))


def _checked(
    student: str, load: o.LoadOptions, train: TrainingOptions, written: DistillOutput, run: o.RunOptions
) -> tuple[Format, Path | None]:
    """Every input and output of the run, checked before any work: the format, and the checkpoint file."""
    if train.resume and train.checkpoint_dir is None:
        raise typer.BadParameter("needs --checkpoint-dir, where the interrupted run wrote its checkpoint",
                                 param_hint="--resume")  # fmt: skip
    fmt = written.fmt or format_of(written.output, Format.PT)
    check_output_name(written.output, fmt.value)
    if written.int8:
        from sepify.runtime.quantize import check_int8

        check_int8(fmt.value)
    folder = train.checkpoint_dir
    checkpoint = folder / "checkpoint.pt" if folder is not None else None
    if folder is not None and folder.exists() and not folder.is_dir():
        raise OutputError(f"{folder}: the checkpoint folder is a file; pass a folder as --checkpoint-dir")
    inputs: Inputs = {
        "STUDENT": Path(student),
        "--teacher": model_path(train.teacher),
        "--weights": load.weights,
        "--data": data_path(train.data),
        "--eval-data": data_path(train.eval_data),
        "checkpoint": checkpoint if train.resume else None,
    }
    model_files = {
        "-o": written.output,
        "plan (beside -o)": plan_path(written.output) if fmt is Format.SAFETENSORS else None,
        "weights (beside -o)": weights_path(written.output) if fmt is Format.OPENVINO else None,
    }
    # the log, and the checkpoint (written over and over; its folder is made if missing): a resumed run continues
    # its own, a new run replaces an old one's only with --force
    run_files = {"--log": written.log, "checkpoint": checkpoint if folder is not None and folder.is_dir() else folder}
    # no output may be an input or another output, whatever --force says ...
    check_run({k: v for k, v in inputs.items() if k != "checkpoint"}, {**model_files, **run_files}, force=True)
    check_run({"checkpoint": inputs["checkpoint"]}, model_files | {"--log": written.log}, force=True)
    # ... and an existing one needs --force
    check_run({}, model_files, force=run.force)
    check_run({}, run_files, force=run.force or train.resume)
    return fmt, checkpoint


def _check_room(folder: Path, student: nn.Module) -> None:
    """A checkpoint holds the weights, the optimiser's two moments and the best weights: about 4x the student."""
    folder = folder if folder.exists() else folder.parent
    need = 4 * sum(p.numel() * p.element_size() for p in student.parameters())
    free = shutil.disk_usage(folder).free
    if free < need:
        raise OutputError(
            f"{folder}: {free / 2**20:.0f} MiB free, but a checkpoint needs about {need / 2**20:.0f} MiB; free some "
            "space or pass another --checkpoint-dir"
        )


def _summary(result: Any, settings: Any) -> str:
    last = result.history[-1] if result.history else None
    summary = f"distilled {settings.steps} steps, global batch {result.global_batch} on {result.world_size} process(es)"
    if last is not None:
        summary += f"; final loss {last.loss:.4g}" + (
            f", eval {last.eval_loss:.4g}" if last.eval_loss is not None else ""
        )
    return summary


def _plan_json(model: nn.Module) -> str:
    """The plan a safetensors student needs to be rebuilt: its pairs' ranks, orders and layouts."""
    from sepify.core.modules import SeparableConv
    from sepify.planning.plan import LayerPlan, Plan

    layers = {
        name: LayerPlan(m.rank, m.order, m.layout if len(m.layouts) > 1 else None)
        for name, m in model.named_modules()
        if isinstance(m, SeparableConv)
    }
    return Plan(layers).to_json()


def _student(path: Path, teacher: nn.Module, load: o.LoadOptions, quiet: bool) -> nn.Module:
    """A converted model from `sepify convert`'s .pt (pickle) or .safetensors (rebuilt on a copy of the teacher)."""
    import copy

    from sepify.cli.inputs import check_device
    from sepify.io.load import detect_kind, load_model

    if path.is_file() and detect_kind(path) == "safetensors":
        from sepify.pipeline.load import load_converted

        return load_converted(copy.deepcopy(teacher), path)
    with step("distill", f"loading {path}", quiet):
        model = load_model(str(path), trust_pickle=load.trust_pickle).model
    check_device(model, str(path))
    return model


def _data(
    source: str, load: o.LoadOptions, train: TrainingOptions, on: torch.device, args: tuple[Any, ...] | None = None
) -> tuple[Any, tuple[Any, ...]]:
    """The samples (a tensor from a file or image folder, or the Dataset a factory returns) and example inputs:
    ``--input-shape``'s, else the data's first sample."""
    from sepify.cli.inputs import calibration_tensor, make_inputs
    from sepify.io.load import import_callable
    from sepify.io.paths import is_import_spec

    if args is None and load.input_shape:
        args = make_inputs(load.input_shape, on)
    if is_import_spec(source):
        from sepify.calibrate.distill.data import Samples

        try:
            made = import_callable(source)()
        except Exception as e:  # noqa: BLE001 - a user's factory may raise anything
            from sepify.errors import CalibrationError, first_line

            raise CalibrationError(f"{source!r}: building the data raised {first_line(e)}; fix the factory") from e
        if args is None:  # the first sample, as a batch of one
            args = tuple(t[:1].to(on) for t in Samples(made, 1)(0))
        return made, args
    shaped = args if args is not None else make_inputs(["1,3,224,224"], on) if Path(source).is_dir() else None
    data = calibration_tensor(source, shaped, None, _images(train)) if shaped else _tensor(source)
    return data, args if args is not None else (data[:1].to(on),)


def _images(train: TrainingOptions) -> o.CalibrationOptions:
    return o.CalibrationOptions(image_size=train.image_size, mean=train.mean, std=train.std)


def _tensor(source: str) -> Any:
    from sepify.io.datasets import load_calibration

    return load_calibration(source, None)
