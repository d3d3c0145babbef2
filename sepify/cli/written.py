"""What every command does after writing a deployment file: run it back in its runtime.

A float32 ``pt2``, ``onnx`` or ``openvino`` file is compared with the PyTorch model it was written from (an
exporter can change what a model computes). An int8 file cannot match float32, so it is compared instead with the
other ways to ship the same model (the original and the slim model, each in float32 and int8:
:func:`sepify.compare_deployments`), and a warning says when another is faster and no farther from the original.
``sepify convert`` and ``sepify distill`` both end here.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from sepify.cli.app import out
from sepify.cli.output import highlight, print_lines, step
from sepify.errors import first_line
from sepify.vocab import Format

if TYPE_CHECKING:
    import torch

    from sepify.pipeline.deploy import Deployment

__all__ = ["check_written", "int8_samples"]

Batches = list[tuple["torch.Tensor", ...]]


def int8_samples(
    command: str, original: torch.nn.Module, args: tuple[torch.Tensor, ...], data: Any, quiet: bool
) -> Batches:
    """Samples for int8 activation ranges: ``data`` (the command's calibration or training data), else synthetic
    samples (a model with BatchNorm), else the example inputs alone (with a warning: they may clip other inputs)."""
    from sepify.calibrate.synthetic import SYNTHETIC, batchnorm_layers
    from sepify.pipeline.deploy import int8_batches

    if data is None:
        data = SYNTHETIC if batchnorm_layers(original) else None
    if data is None:
        highlight(
            "--int8 without --calibration: activation ranges come from the example inputs alone and may clip "
            "other inputs; give --calibration DATA"
        )
    with step(command, "collecting int8 activation ranges", quiet):
        return int8_batches(data, original, args)


def check_written(
    command: str,
    model: torch.nn.Module,
    original: torch.nn.Module,
    target: Path,
    fmt: str,
    args: tuple[Any, ...],
    int8: Batches | None,
    threads: int | None,
    quiet: bool,
) -> None:
    """Run the file ``command`` wrote at ``target`` in its runtime: against ``model`` (float32), or beside the
    other ways to ship (``int8``: the samples its ranges came from); one line or table, warnings where it loses."""
    if int8 is not None:
        _compare_int8(command, model, original, target, fmt, args, int8, threads, quiet)
        return
    from sepify.runtime.check import TOLERANCE, check_export

    if fmt not in ("pt2", "onnx", "openvino"):
        return
    try:
        with step(command, f"checking {target}", quiet):
            check = check_export(target, fmt, model, args)
    except Exception as e:  # noqa: BLE001 - a runtime that cannot run the file is worth a warning, not a traceback
        _unreadable(target, e)
        return
    if check is None:
        return
    if not check.ok:
        highlight(
            f"{target}: {check.describe()}, more than {TOLERANCE:g}; the exporter changed what the model computes: "
            "save as --format pt, or report it with the model"
        )
    elif not quiet:
        out.print(f"checked {target}: {check.describe()}", highlight=False, soft_wrap=True)


def _compare_int8(
    command: str,
    model: torch.nn.Module,
    original: torch.nn.Module,
    target: Path,
    fmt: str,
    args: tuple[Any, ...],
    batches: Batches,
    threads: int | None,
    quiet: bool,
) -> None:
    """The written int8 file beside the original and the slim model in float32 and int8: errors on calibration
    samples, times on the example inputs, in the file's runtime."""
    from sepify.pipeline.deploy import compare_deployments
    from sepify.report.conversion import FAR_AGREEMENT, FAR_OUTPUT_ERROR

    runtime = "onnxruntime" if fmt == Format.ONNX else "openvino"
    try:
        with step(command, f"comparing {target} with the original in float32 and int8", quiet):
            found = compare_deployments(original, model, batches[0], int8=batches, runtime=runtime, threads=threads,
                                        timed_inputs=args, written=target)  # fmt: skip
    except Exception as e:  # noqa: BLE001 - a runtime that cannot run the file is worth a warning, not a traceback
        _unreadable(target, e)
        return
    written = found.get("slim int8")
    if not quiet:
        print_lines(f"checked {target} against the other ways to ship this model, " + found.to_text("slim int8"))

    def far(option: Deployment) -> bool:
        return (option.error or 0.0) > FAR_OUTPUT_ERROR or (option.agreement or 1.0) < FAR_AGREEMENT

    if far(written) and not far(found.get("slim float32")):  # a far float32 model was warned about already
        highlight(f"{target} (int8) is far from the original (output error {written.error:.3g}); drop --int8 or "
                  "give --calibration data")  # fmt: skip
    better = found.better_than("slim int8")
    if better:
        best = min(better, key=lambda o: o.time_ratio)
        how = {
            "slim float32": "drop --int8",
            "original int8": "write the original as int8: sepify convert MODEL --exclude '*' --allow-unchanged "
                             f"--format {fmt} --int8",
            "original float32": "ship the original",
        }[best.name]  # fmt: skip
        highlight(f"the {best.name} model runs faster here ({best.time_ratio:.3f}x against {written.time_ratio:.3f}x "
                  f"the original float32's time) and is no farther from the original: {how}")  # fmt: skip


def _unreadable(target: Path, error: Exception) -> None:
    highlight(
        f"{target} was written but could not be run back to check it ({first_line(error)}); load it in your runtime "
        "and compare with the PyTorch model"
    )
