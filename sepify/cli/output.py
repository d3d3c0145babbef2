"""What the commands print while and after they work: progress, reports, what was written.

Progress goes to stderr. In a terminal it is a live bar (a spinner until a phase knows its total, then done/total,
elapsed and an estimate of what is left); anywhere else (a CI log, ``nohup``) it is a plain line when a phase
starts and at most every ``PLAIN_EVERY_S`` seconds within it, such as ``audit: measuring layer output errors
9/17, eta 3m26s``, so a long run is never silent. ``--quiet`` silences both.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from rich.markup import escape

from sepify.cli.app import err, out, safe_path
from sepify.errors import OutputError
from sepify.io.atomic import write_text_atomic

__all__ = [
    "ProgressFn",
    "step",
    "progress_display",
    "check_report_path",
    "write_report",
    "print_lines",
    "wrote",
    "highlight",
    "REPORT_SUFFIXES",
    "PLAIN_EVERY_S",
]

REPORT_SUFFIXES = (".json", ".csv", ".md", ".markdown")
PLAIN_EVERY_S = 10.0
ProgressFn = Callable[[str, int, int], None]


@contextlib.contextmanager
def step(command: str, message: str, quiet: bool) -> Iterator[None]:
    """A spinner on stderr while a step runs in a terminal; one plain line when stderr is not a terminal."""
    if quiet:
        yield
    elif err.is_terminal:
        with err.status(escape(message)):
            yield
    else:
        err.print(f"{command}: {escape(safe_path(message))}", highlight=False, soft_wrap=True)
        yield


@contextlib.contextmanager
def progress_display(command: str, first_step: str, quiet: bool) -> Iterator[ProgressFn | None]:
    """The ``progress(step, done, total)`` callback a command passes to the library (None when quiet)."""
    if quiet:
        yield None
    elif err.is_terminal:
        with _bar(first_step) as progress:
            yield progress
    else:
        yield _PlainLines(command, first_step)


@contextlib.contextmanager
def _bar(first_step: str) -> Iterator[ProgressFn]:
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        SpinnerColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

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
        task = bar.add_task(escape(first_step), total=None)
        current = [first_step]

        def progress(description: str, done: int, total: int) -> None:
            if description != current[0]:  # a new phase: its own bar and estimate
                current[0] = description
                bar.reset(task, total=total or None, completed=done, description=escape(description))
            else:
                bar.update(task, completed=done, total=total or None)

        yield progress


class _PlainLines:
    """Progress as plain lines: one when a phase starts, then at most every ``PLAIN_EVERY_S`` seconds."""

    def __init__(self, command: str, first_step: str) -> None:
        self.command = command
        self.phase = ""
        self.started = self.last = time.monotonic()
        self(first_step, 0, 0)

    def __call__(self, description: str, done: int, total: int) -> None:
        now = time.monotonic()
        if description != self.phase:
            self.phase, self.started = description, now
        elif now - self.last < PLAIN_EVERY_S:
            return
        self.last = now
        count = f" {done}/{total}" if total else ""
        eta = ""
        if total and 0 < done < total:
            left = (now - self.started) / done * (total - done)
            eta = f", eta {_duration(left)}"
        err.print(f"{self.command}: {escape(description)}{count}{eta}", highlight=False, soft_wrap=True)


def _duration(seconds: float) -> str:
    """``"3m26s"``, ``"42s"``."""
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


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


def wrote(path: Path, *, to_stderr: bool = False) -> None:
    """``wrote <path>``: on stdout, or on stderr when stdout holds machine-readable output alone."""
    (err if to_stderr else out).print(f"wrote {escape(safe_path(path))}", highlight=False, soft_wrap=True)


def highlight(text: str) -> None:
    """One highlighted line on stderr: a result the user must not miss (a converted model far from the original)."""
    err.print(f"[bold yellow]warning:[/] {escape(safe_path(text))}", highlight=False, soft_wrap=True)
