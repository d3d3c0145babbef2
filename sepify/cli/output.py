"""What the commands write and print: output paths checked before any work, reports, progress."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from sepify.cli.app import err, out
from sepify.errors import OutputError
from sepify.io.atomic import write_text_atomic

__all__ = [
    "step",
    "progress_bar",
    "run_inputs",
    "check_report_path",
    "write_report",
    "print_lines",
    "REPORT_SUFFIXES",
]

REPORT_SUFFIXES = (".json", ".csv", ".md", ".markdown")
ProgressFn = Callable[[str, int, int], None]


@contextlib.contextmanager
def step(message: str, quiet: bool) -> Iterator[None]:
    """A spinner on stderr while a step runs (nothing when quiet or not a terminal)."""
    if quiet or not err.is_terminal:
        yield
        return
    with err.status(message):
        yield


@contextlib.contextmanager
def progress_bar(first_step: str, quiet: bool) -> Iterator[ProgressFn | None]:
    """A transient rich progress bar on stderr; yields the ``progress(step, done, total)`` callback (None if quiet)."""
    if quiet or not err.is_terminal:
        yield None
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        SpinnerColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    # a spinner while the total is unknown (tracing, probing), then a bar with done/total, elapsed and ETA
    columns = (
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=err, transient=True) as bar:
        task = bar.add_task(first_step, total=None)

        def progress(description: str, done: int, total: int) -> None:
            bar.update(task, description=description, completed=done, total=total)

        yield progress


def run_inputs(
    model: str, *, weights: Path | None = None, calibration: str | None = None, plan: Path | None = None
) -> dict[str, Path | None]:
    """The files a run reads, by the option that names them (what no output may overwrite)."""
    from sepify.io.load import is_import_spec

    return {
        "model": None if is_import_spec(model) else Path(model),
        "--weights": weights,
        "--calibration": Path(calibration) if calibration not in (None, "random", "synthetic") else None,
        "--plan": plan,
    }


def check_report_path(path: Path) -> None:
    if path.suffix.lower() not in REPORT_SUFFIXES:
        raise OutputError(f"{path}: unknown report format {path.suffix or '(no extension)'!r}; use .json, .csv or .md")


def write_report(report: Any, path: Path, *, overwrite: bool) -> None:
    """A conversion or audit report as JSON, CSV or Markdown, by ``path``'s extension."""
    check_report_path(path)
    suffix = path.suffix.lower()
    text = report.to_json() if suffix == ".json" else report.to_csv() if suffix == ".csv" else report.to_markdown()
    write_text_atomic(path, text, overwrite=overwrite)


def print_lines(text: str, end: str = "\n") -> None:
    """Plain text on stdout: no markup, no highlighting, never wrapped."""
    out.print(text, end=end, highlight=False, markup=False, soft_wrap=True)
