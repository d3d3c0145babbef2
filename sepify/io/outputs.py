"""Every output path of a run checked before any work: so that after the work only I/O faults can fail.

A run has inputs (the model file, ``--weights``, ``--calibration``,
``--plan``) and outputs (the model, the plan beside a safetensors file, the
report, a chart). :func:`check_outputs` refuses, each in one sentence:

- an output that is one of the inputs (same file by path, symlink or hard
  link), even with ``--force``: sepify never overwrites what it reads;
- two outputs of the same run at one path (``--report`` equal to ``-o``);
- an existing output without ``--force``, and one that is a folder, FIFO,
  device or socket even with it;
- a folder that is missing, not a folder, or not writable (tried, not
  guessed from permission bits: root and read-only mounts tell the truth
  only to a real ``open``);
- a name longer than the filesystem allows.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Mapping
from pathlib import Path

from sepify.errors import OutputError
from sepify.io.atomic import check_replaceable

__all__ = ["check_outputs", "same_file"]


def same_file(a: Path, b: Path) -> bool:
    """Whether two paths name one file (through symlinks and hard links too)."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return a.resolve() == b.resolve()


def _name_max(folder: Path) -> int:
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):
        return 255


def _check_folder(path: Path, role: str) -> None:
    folder = path.parent
    if not folder.exists():
        raise OutputError(f"{path}: its folder {folder} does not exist; create it or choose another {role} path")
    if not folder.is_dir():
        raise OutputError(f"{path}: {folder} is not a folder; choose another {role} path")
    probe = folder / f".sepify-probe-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as e:
        raise OutputError(
            f"{path}: cannot write in {folder} ({e.strerror}); choose a folder you can write to for {role}"
        ) from e
    os.close(fd)
    probe.unlink(missing_ok=True)


def check_outputs(
    outputs: Mapping[str, Path | None],
    inputs: Mapping[str, Path | None],
    *,
    force: bool,
) -> None:
    """Refuse, before any work, every output path that could lose data or fail later.

    Args:
        outputs: role -> path, e.g. ``{"-o": Path("m.pt"), "--report": None}``
            (None: not asked for).
        inputs: role -> path of every file the run reads.
        force: whether existing regular files may be replaced.

    Examples:
        >>> import tempfile, pathlib
        >>> folder = pathlib.Path(tempfile.mkdtemp())
        >>> (folder / "m.pt").write_bytes(b"x")
        1
        >>> check_outputs({"-o": folder / "m.pt"}, {"--weights": folder / "m.pt"}, force=True)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        sepify.errors.OutputError: ...m.pt: is also the --weights input; sepify never overwrites what it reads, so choose another -o path
    """
    wanted = {role: path for role, path in outputs.items() if path is not None}
    given = {role: path for role, path in inputs.items() if path is not None and path.exists()}
    seen: dict[Path, str] = {}
    for role, path in wanted.items():
        limit = _name_max(path.parent) if path.parent.is_dir() else None
        if limit is not None and len(path.name.encode()) > limit:  # first: stat() on such a name raises
            raise OutputError(
                f"{path}: the name is {len(path.name.encode())} bytes, longer than this filesystem allows "
                f"({limit}); choose a shorter {role} name"
            )
        for in_role, in_path in given.items():
            if same_file(path, in_path) if path.exists() else path.resolve() == in_path.resolve():
                raise OutputError(
                    f"{path}: is also the {in_role} input; sepify never overwrites what it reads, so choose another "
                    f"{role} path"
                )
        key = path.resolve()
        if key in seen:
            raise OutputError(
                f"{path}: is both the {seen[key]} and the {role} output of this run; choose different paths"
            )
        seen[key] = role
        if path.exists() or path.is_symlink():
            check_replaceable(path)
            if not force:
                raise OutputError(
                    f"{path}: already exists; pass --force to overwrite it, or choose another {role} path"
                )
        _check_folder(path, role)
