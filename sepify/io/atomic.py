"""Atomic file writes: a temp file in the target's folder, then ``os.replace``; JSON export on top.

An interrupted run leaves the old file (or none), never a half-written one.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["atomic_path", "write_text_atomic", "returned_and_written", "JsonExportable"]


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temp path next to ``path``; on success move it onto ``path``.

    The file gets the permissions a plain ``open()`` would give it (the
    umask), not the owner-only mode of ``mkstemp``.
    """
    target = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_path, 0o666 & ~umask)
        os.replace(tmp_path, target)
    finally:
        tmp_path.unlink(missing_ok=True)


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def returned_and_written(text: str, path: str | os.PathLike[str] | None) -> str:
    """``text``, also written atomically to ``path`` when one is given (the ``to_json``/``to_csv`` pattern)."""
    if path is not None:
        write_text_atomic(path, text)
    return text


class JsonExportable:
    """``to_json`` for the types that define ``to_dict`` (reports, plans)."""

    def to_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    def to_json(self, path: str | os.PathLike[str] | None = None) -> str:
        """JSON text; also written atomically to ``path`` when given."""
        return returned_and_written(json.dumps(self.to_dict(), indent=2) + "\n", path)
