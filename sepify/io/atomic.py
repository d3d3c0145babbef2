"""Atomic file writes: a temp file in the target's folder, then one rename or link; JSON export on top.

What a caller can rely on:

- the target is either its old self (or absent) or the complete new file,
  never a half-written one, whatever interrupts the write;
- with ``overwrite=False`` the commit is exclusive (a hard link, which fails
  if the name exists): of two writers racing for one new path, the second
  gets an :class:`~sepify.errors.OutputError` and the first file stays;
- a target that exists but is not a regular file (a folder, FIFO, device,
  socket) is never replaced;
- temp files are named ``.<name>.<pid>-<token>.sepify-tmp<ext>``: short
  enough for any target name, with the target's extension (``torch.export``
  warns otherwise), and swept on the next write to the same path once the
  process that made them is gone (a SIGKILL leaves them behind);
- I/O faults (disk full, permissions) become one ``OutputError`` sentence.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import secrets
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sepify.errors import OutputError

__all__ = [
    "atomic_path",
    "write_text_atomic",
    "returned_and_written",
    "JsonExportable",
    "temp_files_of",
    "sweep_stale_temp_files",
    "check_replaceable",
    "TEMP_MARK",
]

TEMP_MARK = ".sepify-tmp"
_NAME_KEPT = 100  # characters of the target's name kept in its temp name (NAME_MAX is 255 on most filesystems)
_SUFFIX_KEPT = 16


def _temp_stem(target: Path) -> str:
    return f".{target.name[:_NAME_KEPT]}."


def _temp_name(target: Path) -> str:
    suffix = target.suffix if len(target.suffix) <= _SUFFIX_KEPT else ""
    return f"{_temp_stem(target)}{os.getpid()}-{secrets.token_hex(4)}{TEMP_MARK}{suffix}"


def _pattern(target: Path) -> re.Pattern[str]:
    """Temp names of ``target`` exactly: another target's (``a.pt.x`` beside ``a.pt``) never match."""
    return re.compile(rf"{re.escape(_temp_stem(target))}(\d+)-[0-9a-f]{{8}}{re.escape(TEMP_MARK)}.*\Z")


def temp_files_of(target: str | os.PathLike[str]) -> list[Path]:
    """The temp files any sepify process left (or is writing) for ``target``."""
    target = Path(target)
    pattern = _pattern(target)
    try:
        entries = list(target.parent.iterdir())
    except OSError:
        return []
    return [p for p in entries if pattern.match(p.name)]


def _writer_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, owned by someone else
    return True


def sweep_stale_temp_files(target: str | os.PathLike[str]) -> list[Path]:
    """Remove temp files left for ``target`` by sepify processes that no longer run; returns them."""
    target = Path(target)
    pattern = _pattern(target)
    stale = []
    for p in temp_files_of(target):
        found = pattern.match(p.name)
        if found is not None and not _writer_alive(int(found.group(1))):
            stale.append(p)
            p.unlink(missing_ok=True)
    return stale


def check_replaceable(target: Path) -> None:
    """Refuse a target that exists and is not a regular file (a folder, FIFO, device or socket)."""
    try:
        mode = os.stat(target).st_mode
    except FileNotFoundError:
        return
    except OSError as e:
        raise OutputError(f"{target}: cannot be inspected ({e.strerror}); choose another path") from e
    if not stat.S_ISREG(mode):
        kind = "a folder" if stat.S_ISDIR(mode) else "not a regular file (a FIFO, device or socket)"
        raise OutputError(f"{target}: is {kind}, and sepify replaces only regular files; choose a file path")


def _commit(tmp: Path, target: Path, overwrite: bool) -> None:
    check_replaceable(target)
    if overwrite:
        os.replace(tmp, target)
        return
    try:
        os.link(tmp, target)  # atomic and exclusive: fails if the name exists
    except FileExistsError:
        raise _taken(target) from None
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
            raise
        # No hard links here (some network and FAT filesystems): check, then rename.
        if target.exists():
            raise _taken(target) from None
        os.replace(tmp, target)
        return
    tmp.unlink()


def _taken(target: Path) -> OutputError:
    return OutputError(
        f"{target}: was created by someone else while sepify worked (another run?); it was left as it is, "
        "so pass --force to overwrite it or choose another path"
    )


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], *, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temp path next to ``path``; when the block succeeds, move it onto ``path``.

    The file gets the permissions a plain ``open()`` would give it (the
    umask), not the owner-only mode of ``mkstemp``. With ``overwrite=False``
    an existing ``path`` is never replaced (see the module docstring).

    Examples:
        >>> import tempfile, pathlib
        >>> folder = pathlib.Path(tempfile.mkdtemp())
        >>> with atomic_path(folder / "a.txt") as tmp:
        ...     _ = tmp.write_text("hello")
        >>> (folder / "a.txt").read_text(), [p.name for p in folder.iterdir()]
        ('hello', ['a.txt'])
    """
    target = Path(path)
    sweep_stale_temp_files(target)
    tmp = target.parent / _temp_name(target)
    try:
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies, as for open()
        except OSError as e:
            raise _io_error(target, e) from e
        os.close(fd)
        try:
            yield tmp
            _commit(tmp, target, overwrite)
        except OSError as e:
            raise _io_error(target, e) from e
        except RuntimeError as e:
            if not _torch_write_failure(e):
                raise
            # torch.save reports a full disk (or a write refused) from its C++ writer, not as an OSError
            raise _io_error(target, OSError(errno.EIO, "the file could not be written: is the disk full?")) from e
    finally:
        tmp.unlink(missing_ok=True)


def _torch_write_failure(e: RuntimeError) -> bool:
    """Whether ``e`` is torch's serializer failing to write (``PytorchStreamWriter failed writing file ...``)."""
    text = str(e)
    return "PytorchStreamWriter" in text or "inline_container" in text


def _io_error(target: Path, e: OSError) -> OutputError:
    cause = e.strerror or str(e)
    fixes = {
        errno.ENOSPC: "free some space or write elsewhere",
        errno.EDQUOT: "free some space or write elsewhere",
        errno.EACCES: "choose a folder you can write to",
        errno.EPERM: "choose a folder you can write to",
        errno.EROFS: "choose a writable folder",
        errno.ENAMETOOLONG: "choose a shorter name",
        errno.ENOENT: "create the folder first",
        errno.EIO: "free some space or write elsewhere",
    }
    fix = fixes.get(e.errno or 0, "check the path and try again")
    return OutputError(f"{target}: writing failed ({cause}); nothing was replaced, so {fix}")


def write_text_atomic(path: str | os.PathLike[str], text: str, *, overwrite: bool = True) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_path(path, overwrite=overwrite) as tmp:
        tmp.write_text(text, encoding="utf-8")


def returned_and_written(text: str, path: str | os.PathLike[str] | None, *, overwrite: bool = True) -> str:
    """``text``, also written atomically to ``path`` when one is given (the ``to_json``/``to_csv`` pattern)."""
    if path is not None:
        write_text_atomic(path, text, overwrite=overwrite)
    return text


class JsonExportable:
    """``to_json`` for the types that define ``to_dict`` (reports, plans)."""

    def to_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    def to_json(self, path: str | os.PathLike[str] | None = None, *, overwrite: bool = True) -> str:
        """JSON text; also written atomically to ``path`` when given."""
        return returned_and_written(json.dumps(self.to_dict(), indent=2) + "\n", path, overwrite=overwrite)
