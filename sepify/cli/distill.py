"""``sepify distill``: a thin command over :func:`sepify.distill`; runs the same under ``torchrun``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from sepify.cli import options as o
from sepify.cli.app import app, err, errors_as_exit_codes, out
from sepify.cli.output import print_lines, progress_bar, run_inputs, step
from sepify.errors import ConfigError
from sepify.io.outputs import check_outputs

if TYPE_CHECKING:
    from torch import nn

__all__ = ["distill"]

TRAINING = "Training"
DISTILL_EXAMPLES = [
    (
        "recover a slim digits CNN on its training images",
        "sepify distill digits.sep.pt --trust-pickle --teacher sepify.zoo:digits_cnn --data digits_calibration.npy "
        "--input-shape 1,1,16,16 -o digits.distilled.pt",
    ),
    (
        "match the converted layers' outputs too",
        "sepify distill slim.pt --trust-pickle --teacher sepify.zoo:digits_cnn --data x.npy --loss both -o d.pt",
    ),
    (
        "two processes on one machine (torch.distributed, gloo on CPU)",
        "torchrun --standalone --nproc-per-node 2 -m sepify distill slim.pt --trust-pickle --teacher ... --data ...",
    ),
]

StudentArg = Annotated[
    str,
    typer.Argument(
        metavar="STUDENT",
        help="The converted model: a .pt written by `sepify convert` (needs --trust-pickle), or a .safetensors written "
        "by `sepify convert --format safetensors` (rebuilt on the teacher's architecture, no pickle).",
        show_default=False,
    ),
]
TeacherOpt = Annotated[
    str,
    typer.Option(
        "--teacher",
        metavar="MODEL",
        help="The original model, as `convert` takes it (an import spec with --weights/--kwargs/--attr, or a file).",
        show_default=False,
        rich_help_panel=o.MODEL,
    ),
]
DataOpt = Annotated[
    str,
    typer.Option(
        "--data",
        metavar="PATH|SPEC",
        help="Unlabelled training inputs: an image folder, a .pt/.npy tensor, or package.module:factory returning a "
        "torch Dataset (streamed, never loaded whole).",
        show_default=False,
        rich_help_panel=TRAINING,
    ),
]
EvalDataOpt = Annotated[
    str | None,
    typer.Option(
        "--eval-data",
        metavar="PATH|SPEC",
        help="Held-out inputs, same forms as --data; the weights with the lowest eval loss are kept.",
        show_default=False,
        rich_help_panel=TRAINING,
    ),
]
StepsOpt = Annotated[
    int, typer.Option("--steps", min=1, metavar="N", help="Optimiser steps.", rich_help_panel=TRAINING)
]
BatchOpt = Annotated[
    int,
    typer.Option(
        "--batch-size",
        min=1,
        metavar="B",
        help="Global batch (split across torchrun processes).",
        rich_help_panel=TRAINING,
    ),
]
LrOpt = Annotated[float, typer.Option("--lr", metavar="LR", help="AdamW peak learning rate.", rich_help_panel=TRAINING)]
LossOpt = Annotated[
    str,
    typer.Option("--loss", metavar="mse|kl", help="Output matching: mse, or kl on logits.", rich_help_panel=TRAINING),
]
TrainAllOpt = Annotated[
    bool,
    typer.Option(
        "--train-all", metavar="", help="Train every parameter, not only the converted pairs.", rich_help_panel=TRAINING
    ),
]
CheckpointOpt = Annotated[
    Path | None,
    typer.Option(
        "--checkpoint-dir",
        metavar="DIR",
        help="Write checkpoint.pt here every --checkpoint-every steps and when interrupted.",
        show_default=False,
        rich_help_panel=TRAINING,
    ),
]
CheckpointEveryOpt = Annotated[
    int,
    typer.Option("--checkpoint-every", min=1, metavar="N", help="Steps between checkpoints.", rich_help_panel=TRAINING),
]
ResumeOpt = Annotated[
    bool,
    typer.Option(
        "--resume", metavar="", help="Continue from --checkpoint-dir (ends as an uninterrupted run would).",
        rich_help_panel=TRAINING,
    ),
]  # fmt: skip
LogOpt = Annotated[
    Path | None,
    typer.Option(
        "--log", metavar="FILE", help="A JSON-lines log of step, loss, lr, samples/s, eval loss.", show_default=False,
        rich_help_panel=o.OUTPUT,
    ),
]  # fmt: skip
OutOpt = Annotated[
    Path,
    typer.Option(
        "-o", "--output", metavar="FILE", help="Where to write the distilled model (.pt).", rich_help_panel=o.OUTPUT
    ),
]


@app.command(add_help_option=False, epilog=o.epilog(DISTILL_EXAMPLES))
def distill(
    student: StudentArg,
    teacher: TeacherOpt,
    data: DataOpt,
    output: OutOpt,
    # Model
    input_shape: o.InputShapeOpt = None,
    weights: o.WeightsOpt = None,
    kwargs: o.KwargsOpt = None,
    attr: o.AttrOpt = None,
    trust_pickle: o.TrustPickleOpt = False,
    device_name: o.DeviceOpt = "cpu",
    # Training
    eval_data: EvalDataOpt = None,
    steps: StepsOpt = 1000,
    batch_size: BatchOpt = 32,
    lr: LrOpt = 1e-3,
    loss: LossOpt = "output",
    train_all: TrainAllOpt = False,
    checkpoint_dir: CheckpointOpt = None,
    checkpoint_every: CheckpointEveryOpt = 100,
    resume: ResumeOpt = False,
    image_size: o.ImageSizeOpt = None,
    mean: o.MeanOpt = None,
    std: o.StdOpt = None,
    # Output
    log: LogOpt = None,
    force: o.ForceOpt = False,
    quiet: o.QuietOpt = False,
    debug: o.DebugOpt = False,
    _help: o.HelpOpt = False,
) -> None:
    """Distill a converted model from the original on unlabelled data, to recover what the conversion lost.

    Streams --data in batches (AdamW, warm-up then cosine decay), keeps the
    best --eval-data weights, checkpoints and resumes exactly, and runs the
    same under torchrun (one process per core or GPU; rank 0 writes).
    """
    with errors_as_exit_codes(debug):
        from sepify.cli.inputs import device, load, make_inputs
        from sepify.options import Distill
        from sepify.pipeline.distill import distill as distill_model

        rank = int(os.environ.get("RANK", "0"))
        inputs = run_inputs(teacher, weights=weights, calibration=data if Path(data).exists() else None)
        inputs["student"] = Path(student)
        check_outputs({"-o": output, "--log": None if resume else log}, inputs, force=force)  # resume appends
        on = device(device_name)
        args = make_inputs(input_shape, on)
        teacher_model = load(
            teacher,
            trust_pickle=trust_pickle,
            kwargs=kwargs,
            weights=weights,
            on=on,
            quiet=quiet,
            train=False,
            attr=attr,
        ).model
        student_model = _student(Path(student), teacher_model, trust_pickle, quiet).to(on)
        train_data = _data(data, args, image_size, mean, std)
        held = _data(eval_data, args, image_size, mean, std) if eval_data is not None else None
        with progress_bar("distilling", quiet or rank != 0) as progress:
            settings = Distill(
                steps=steps,
                batch_size=batch_size,
                lr=lr,
                loss="mse" if loss == "output" else loss,
                train_all=train_all,
                checkpoint_dir=checkpoint_dir,
                checkpoint_every=checkpoint_every,
            )
            result = distill_model(
                student_model,
                teacher_model,
                train_data,
                settings,
                eval_data=held,
                resume=resume,
                log=log,
                progress=progress,
            )
        if rank != 0:
            return
        last = result.history[-1] if result.history else None
        summary = f"distilled {steps} steps, global batch {result.global_batch} on {result.world_size} process(es)"
        if last is not None:
            summary += f"; final loss {last.loss:.4g}" + (
                f", eval {last.eval_loss:.4g}" if last.eval_loss is not None else ""
            )
        if not quiet:
            print_lines(summary)
            for note in result.notes:
                print_lines(note)
        from sepify.io.save import save_model

        with step(f"writing {output}", quiet):
            save_model(result.model, output, "pt", example_args=args, plan_json="", overwrite=force)
        (err if quiet else out).print(f"wrote {output}", highlight=False, soft_wrap=True)


def _student(path: Path, teacher: nn.Module, trust_pickle: bool, quiet: bool) -> nn.Module:
    """A converted model from `sepify convert`'s .pt (pickle) or .safetensors (rebuilt on a copy of the teacher)."""
    import copy

    from sepify.io.load import detect_kind, load_model

    if path.is_file() and detect_kind(path) == "safetensors":
        from sepify.pipeline.convert import load_converted

        return load_converted(copy.deepcopy(teacher), path)
    with step(f"loading {path}", quiet):
        return load_model(str(path), trust_pickle=trust_pickle).model


def _data(source: str, args: tuple[Any, ...], image_size: str | None, mean: str | None, std: str | None) -> Any:
    """A tensor from a file or image folder (as --calibration reads them), or the Dataset a factory returns."""
    from sepify.io.load import is_import_spec

    if is_import_spec(source):
        from sepify.io.load import import_callable  # the same import rules as MODEL

        made = import_callable(source)()
        if not hasattr(made, "__getitem__") and not hasattr(made, "__iter__"):
            raise ConfigError(f"{source!r}: returned a {type(made).__name__}, not a Dataset or an iterable of samples")
        return made
    from sepify.cli.inputs import calibration_tensor

    return calibration_tensor(source, args, None, image_size, mean, std)
