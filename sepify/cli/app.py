"""The typer app, its global options, and the one place where errors become exit codes and sentences in flags."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import threading
import warnings
from collections.abc import Iterator
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from sepify.errors import ConfigError, SepifyError, SepifyWarning

__all__ = ["app", "out", "err", "EXIT_CODES", "errors_as_exit_codes", "in_flags", "safe_path"]

app = typer.Typer(
    name="sepify",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
    help="Rewrite a trained model's convolutions into depthwise + pointwise pairs, and report what it saves.",
)
out = Console()
err = Console(stderr=True)

# The most specific class wins. Anything else is a bug and keeps its traceback
# (and typer.Exit, a RuntimeError subclass, passes through untouched).
EXIT_CODES: dict[type[SepifyError], int] = {
    ConfigError: 2,  # an option value the library refused: a usage error, like Click's own
    SepifyError: 1,
}

# The library's sentences name its Python arguments; on the command line they name the flags.
_FLAGS: list[tuple[str, str]] = [
    (r"\bplan=sepify\.Budget\(max_error=([0-9.]+)\)", r"--max-error \1"),
    (r"\bpass train_all=True\b", "pass --train-all"),
    (r"\btrain_all=True\b", "--train-all"),
    (r"\brank='auto'", "--rank auto"),
    (r"\bexclude=\[\.\.\.\]", "--exclude GLOB"),
    (r"\bcalibration=\.\.\.", "--calibration DATA"),
    (r"\brun audit\(\.\.\., timing=True\)", "pass --latency"),
    (r"\bmeasure_on=", "--measure-on "),
    (r"\bint8=\.\.\.", "--int8"),
    (r"\bformat=(\w+)", r"--format \1"),
    (
        r"\b(measure_on|max_mac_ratio|max_param_ratio|max_latency_ratio|max_error|batch_size|checkpoint_dir|tolerance)\b",
        "",
    ),
]


def in_flags(message: str) -> str:
    """A library sentence with its Python argument names as the CLI's flags.

    >>> in_flags("batch_size 200 is larger than the 96 samples given")
    '--batch-size 200 is larger than the 96 samples given'
    >>> in_flags("nothing to distill: the student has no converted layers; pass train_all=True")
    'nothing to distill: the student has no converted layers; pass --train-all'
    """
    for pattern, flag in _FLAGS:
        message = re.sub(pattern, flag or (lambda m: "--" + m.group(1).replace("_", "-")), message)
    return message


def safe_path(path: object) -> str:
    """A path as the terminal can print it: characters its encoding lacks are escaped, never an error after the
    file was written (``PYTHONIOENCODING=ascii`` and ``-o ü.pt``)."""
    text = str(path)
    encoding = getattr(err.file, "encoding", None) or "utf-8"
    return text.encode(encoding, "backslashreplace").decode(encoding, "replace")


def _exit_code(error: SepifyError) -> int:
    return next(EXIT_CODES[cls] for cls in type(error).__mro__ if cls in EXIT_CODES)


def _terminated(signum: int, frame: object) -> None:
    # Unwind like Ctrl-C does, so that every `finally` runs and no temp file is left behind.
    raise SystemExit(128 + signum)


@contextlib.contextmanager
def _sigterm_unwinds() -> Iterator[None]:
    """While a command runs, SIGTERM (what `kill`, timeouts and job schedulers send) unwinds the stack."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def errors_as_exit_codes(debug: bool) -> Iterator[None]:
    """Sepify errors become ``error: <sentence>`` on stderr and their exit code; warnings ``warning: ...``.

    ``--debug`` or ``SEPIFY_DEBUG=1`` re-raises instead, with the traceback. SIGTERM ends the
    command with exit code 143 after removing its temp files, as Ctrl-C does with 130.
    """
    try:
        with _sigterm_unwinds(), _warnings_after_the_work():
            yield
    except SepifyError as e:
        if debug or os.environ.get("SEPIFY_DEBUG") == "1":
            raise
        err.print(f"[bold red]error:[/] {escape(safe_path(in_flags(str(e))))}", highlight=False, soft_wrap=True)
        raise typer.Exit(code=_exit_code(e)) from None


@contextlib.contextmanager
def _warnings_after_the_work() -> Iterator[None]:
    """Warnings raised while a command works (the model's, torch's, sepify's) are shown once each, after it.

    They are shown only once the recording has stopped: showing one while recording would record it again,
    and the loop over the recorded list would never end (a CLI that hung after every warning).
    """
    recorded: list[warnings.WarningMessage] = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", SepifyWarning)  # others follow Python's filters (DeprecationWarning off)
            try:
                yield
            finally:
                recorded += caught
    finally:
        _show_once(recorded)


def _show_once(recorded: list[warnings.WarningMessage]) -> None:
    """Each distinct warning as one ``warning: ...`` line on stderr, in the order first raised."""
    shown: set[tuple[type[Warning], str]] = set()
    for w in recorded:
        key = (w.category, str(w.message))
        if key in shown:
            continue
        shown.add(key)
        prefix = "" if issubclass(w.category, SepifyWarning) else f"{w.category.__name__}: "
        text = safe_path(in_flags(prefix + str(w.message)))
        err.print(f"[bold yellow]warning:[/] {escape(text)}", highlight=False, soft_wrap=True)


def _version_callback(value: bool) -> None:
    if value:
        import torch

        import sepify

        out.print(f"sepify {sepify.__version__} (torch {torch.__version__})")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool,
        typer.Option(
            "--version", metavar="", callback=_version_callback, is_eager=True, help="Show the version and exit."
        ),
    ] = False,
) -> None:
    """sepify: depthwise-separable conversion of trained PyTorch models."""
