"""Paths a run reads and writes, decided without torch: so that a missing file or a wrong name is refused in
the time it takes to start Python, not after ``import torch``."""

from __future__ import annotations

from pathlib import Path

from sepify.errors import OutputError
from sepify.vocab import Format

__all__ = [
    "is_import_spec",
    "default_output",
    "format_of",
    "check_output_name",
    "plan_path",
    "weights_path",
    "PLAN_METADATA_KEY",
]

PLAN_METADATA_KEY = "sepify.plan"  # a safetensors file's metadata key holding its plan
_SUFFIXES = {f".{f.extension}": f for f in Format}


def is_import_spec(text: str) -> bool:
    """``package.module:callable`` or ``file.py:callable``; an existing path is a file."""
    return ":" in text and not Path(text).exists()


def default_output(source: str, fmt: Format) -> Path:
    """``<stem>.sep.<ext>`` beside a model file; ``<callable>.sep.<ext>`` here for an import spec."""
    if is_import_spec(source):
        name = source.rpartition(":")[2].split(".")[-1] or "model"
        return Path.cwd() / f"{name}.sep.{fmt.extension}"
    path = Path(source)
    return path.with_name(f"{path.stem}.sep.{fmt.extension}")


def format_of(path: Path, default: Format) -> Format:
    """The format an output's suffix names (``.onnx``, ``.xml``...), else ``default``.

    >>> format_of(Path("slim.onnx"), Format.PT).value, format_of(Path("slim.bin"), Format.PT).value
    ('onnx', 'pt')
    """
    return _SUFFIXES.get(path.suffix.lower(), default)


def plan_path(model_path: Path) -> Path:
    """Where the plan of a converted model ``name.<ext>`` lives: ``name.plan.json`` beside it (a path with no name,
    such as ``.``, is its own: the output checks then say what it is)."""
    return model_path.with_name(model_path.stem + ".plan.json") if model_path.name else model_path


def weights_path(xml_path: Path) -> Path:
    """Where the weights of OpenVINO IR ``name.xml`` live: ``name.bin`` beside it (OpenVINO looks there)."""
    return xml_path.with_suffix(".bin")


def check_output_name(path: Path, fmt: str) -> None:
    """An OutputError when ``fmt`` needs a name ``path`` does not have (OpenVINO IR reads ``name.xml`` + ``name.bin``),
    or when ``path``'s suffix names another format than ``fmt`` (a pickle named ``x.safetensors``).

    >>> check_output_name(Path("slim.onnx"), "openvino")
    Traceback (most recent call last):
    ...
    sepify.errors.OutputError: slim.onnx: OpenVINO IR is an .xml file with a .bin beside it; name the output <name>.xml
    """
    if fmt == "openvino" and path.suffix != ".xml":
        raise OutputError(f"{path}: OpenVINO IR is an .xml file with a .bin beside it; name the output <name>.xml")
    named = _SUFFIXES.get(path.suffix.lower())
    if named is not None and named.value != fmt:
        raise OutputError(
            f"{path}: the name says {named.value} but the format is {fmt}; pass --format {named.value}, or name the "
            f"output <name>.{Format(fmt).extension}"
        )
