"""The ``sepify`` command line (typer + rich): the only subpackage that imports either.

Exit codes: 0 success, 1 a sepify error, 2 a usage error (one sentence on
stderr; the traceback with ``--debug`` or ``SEPIFY_DEBUG=1``). The mapping
from error classes to codes is :data:`sepify.cli.app.EXIT_CODES`.
"""

from __future__ import annotations

from sepify.cli import audit, convert, distill, plan  # noqa: F401 - registers the commands on the app
from sepify.cli.app import app

__all__ = ["app", "main"]


def main() -> None:
    """Entry point of the ``sepify`` script."""
    app()
