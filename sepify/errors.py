"""Exceptions sepify raises for problems a user can fix.

Every message is one sentence: what failed, where, why, and what to do.
"""

from __future__ import annotations

__all__ = [
    "SepifyError",
    "ConfigError",
    "InputShapeError",
    "TraceError",
    "SepifyWarning",
]


class SepifyError(Exception):
    """Base for every error sepify reports to a user."""


class ConfigError(SepifyError, ValueError):
    """An argument to a sepify function has an invalid value."""


class InputShapeError(SepifyError, ValueError):
    """The example inputs do not fit the model (its forward raised)."""


class TraceError(SepifyError):
    """torch.fx could not trace the model and no fallback applies."""


class SepifyWarning(UserWarning):
    """A soft problem: the result is usable but the user should know."""
