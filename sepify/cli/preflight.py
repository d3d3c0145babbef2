"""What a command checks before any work, without torch: every input exists, every output can be written.

Inputs are named by the option that names them (``model``, ``--weights``, ``--data``...); no output may be one
of them (by path, symlink or hard link), two outputs of a run may not share a path, and an existing output needs
``--force`` (:func:`sepify.io.outputs.check_outputs`). A missing input is refused faster than ``import torch``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from sepify.errors import CalibrationError, CheckpointError, ModelLoadError, PlanError, SepifyError
from sepify.io.outputs import check_outputs
from sepify.io.paths import is_import_spec

__all__ = ["Inputs", "check_run", "model_path", "data_path"]

Inputs = dict[str, Path | None]
_NO_DATA = ("random", "synthetic")

# what a missing input of each role is, and what to pass instead
_MISSING: dict[str, tuple[type[SepifyError], str]] = {
    "model": (ModelLoadError, "no such file; check the path of the model"),
    "STUDENT": (ModelLoadError, "no such file; check the path of the student (the converted model)"),
    "--teacher": (ModelLoadError, "no such file; check the path of the teacher (the original model)"),
    "--weights": (ModelLoadError, "no such file; check the path of the weights"),
    "--calibration": (CalibrationError, "no such file or folder; pass an image folder, a .pt/.npy file or 'random'"),
    "--data": (CalibrationError, "no such file or folder; pass an image folder, a .pt/.npy file or 'random'"),
    "--eval-data": (CalibrationError, "no such file or folder; pass an image folder or a .pt/.npy file"),
    "--plan": (PlanError, "no such plan file; pass the plan `sepify audit --plan-out` wrote"),
    "AUDIT": (PlanError, "no such audit file; pass the file `sepify audit --audit-out` wrote"),
    "checkpoint": (CheckpointError, "no checkpoint to resume from; run without --resume first"),
}


def model_path(source: str) -> Path | None:
    """The file a MODEL argument reads (None for an import spec)."""
    return None if is_import_spec(source) else Path(source)


def data_path(source: str | None) -> Path | None:
    """The file or folder a data option reads (None for an import spec, ``random`` and ``synthetic``)."""
    if source is None or source in _NO_DATA or is_import_spec(source):
        return None
    return Path(source)


def check_run(inputs: Mapping[str, Path | None], outputs: Mapping[str, Path | None], *, force: bool) -> None:
    """Refuse a missing input or a model file that is a folder, then every unsafe output (see the module docstring)."""
    for role, path in inputs.items():
        if path is None or path.exists():
            if path is not None and role in ("model", "STUDENT", "--teacher", "--weights") and path.is_dir():
                raise ModelLoadError(f"{path}: is a directory, not a model file; pass the file itself")
            continue
        error, sentence = _MISSING.get(role, (SepifyError, "no such file"))
        raise error(f"{path}: {sentence}")
    check_outputs(outputs, dict(inputs), force=force)
