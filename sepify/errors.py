"""Every exception and warning sepify raises, in one place.

Each class means one thing wherever it is raised, and every message is one
sentence: what failed, where, why, and what to do. The CLI maps these classes
to exit codes (:data:`sepify.cli.app.EXIT_CODES`): a :class:`ConfigError` is
a usage error (2), every other :class:`SepifyError` a failure (1).
"""

from __future__ import annotations

import re

__all__ = [
    "first_line",
    "SepifyError",
    "ConfigError",
    "InputShapeError",
    "CalibrationError",
    "PlanError",
    "BudgetError",
    "ModelLoadError",
    "ModelError",
    "OutputError",
    "NothingConvertedError",
    "CheckpointError",
    "TrainingError",
    "SepifyWarning",
]


class SepifyError(Exception):
    """Base for every error sepify reports to a user."""


class ConfigError(SepifyError, ValueError):
    """An argument or option has an invalid value (a usage error)."""


class InputShapeError(SepifyError, ValueError):
    """The example inputs do not fit the model: its forward raised on them."""


class CalibrationError(SepifyError, ValueError):
    """Calibration data cannot be read, is malformed, or the model fails on it."""


class PlanError(SepifyError):
    """A plan cannot be read, or names layers the model does not have or cannot convert."""


class BudgetError(SepifyError):
    """A planning budget cannot be met by any combination of layers."""


class ModelLoadError(SepifyError):
    """A model or weights file cannot be read or does not fit the architecture."""


class ModelError(SepifyError):
    """The model itself cannot be converted as it is: non-finite parameters, it cannot be copied, or the
    converted model fails (or gives non-finite outputs) where the original ran."""


class OutputError(SepifyError):
    """An output (model, plan, report, chart) cannot be written where asked."""


class NothingConvertedError(SepifyError):
    """A run that must produce a converted model converted no conv (every one skipped, excluded or unmatched)."""


class CheckpointError(SepifyError):
    """A distillation checkpoint cannot be resumed from: missing, unreadable, damaged, or from another model."""


class TrainingError(SepifyError):
    """Distillation cannot go on: its loss or weights became NaN or infinite (the last finite weights are kept)."""


class SepifyWarning(UserWarning):
    """A soft problem: the result is usable, but the user should know."""


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def first_line(e: BaseException) -> str:
    r"""An exception as one short plain line for a message's parenthesis (libraries put colour codes and pages of
    context in theirs).

    >>> first_line(RuntimeError("\x1b[31mno kernel\x1b[0m for op Foo\nwhile running node 7"))
    'RuntimeError: no kernel for op Foo'
    """
    text = _ANSI.sub("", str(e)).strip()
    if not text:
        return type(e).__name__
    line = text.splitlines()[0]
    return f"{type(e).__name__}: {line if len(line) <= 160 else line[:157] + '...'}"
