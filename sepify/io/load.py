"""Reading models, weights and import specs, without surprises.

Loading never unpickles code unless the caller passes ``trust_pickle=True``:
file kinds are told apart from zip member names and headers alone, and a
``torch.save`` archive is first read with ``torch.load(weights_only=True)``.
Every problem is a :class:`~sepify.errors.ModelLoadError` whose message names the file, what was found, and what to do.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import pickle
import pickletools
import struct
import sys
import warnings
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from sepify.errors import ModelLoadError
from sepify.io.paths import is_import_spec

__all__ = [
    "LoadedModel",
    "detect_kind",
    "load_model",
    "is_import_spec",
    "load_state_dict_file",
    "load_weights_into",
    "safetensors_metadata",
    "wrapped_hint",
    "application_wrapper",
    "import_callable",
]

_SAFE_ROUTE = "use an import spec such as torchvision.models:resnet18 with --weights FILE (no pickle)"


@dataclass
class LoadedModel:
    """A model and where it came from (``kind``: pickle, pt2 or import-spec)."""

    model: nn.Module
    kind: str
    source: str


# -- telling files apart without running them -----------------------------------


def detect_kind(path: Path) -> str:
    """Classify a file by its bytes: ``torch-save``, ``torchscript``, ``pt2``,
    ``legacy-pickle``, ``safetensors``, ``truncated-safetensors``, ``onnx``,
    ``empty``, ``corrupt-zip`` or ``unknown``. Reads headers and zip member names only.
    """
    size = path.stat().st_size
    if size == 0:
        return "empty"
    with path.open("rb") as f:
        head = f.read(16)
    if head.startswith(b"PK"):
        try:
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
        except (zipfile.BadZipFile, OSError):
            return "corrupt-zip"
        members = {n.split("/", 1)[1] if "/" in n else n for n in names}
        if "archive_format" in members:
            return "pt2"
        if "constants.pkl" in members or any(m.startswith("code/") for m in members):
            return "torchscript"
        if "data.pkl" in members:
            return "torch-save"
        return "unknown"
    if head[:2] in (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05"):
        return "legacy-pickle"
    if len(head) >= 9 and head[8:9] == b"{":
        (header_len,) = struct.unpack("<Q", head[:8])
        if 0 < header_len <= size - 8:
            return "safetensors"
        return "truncated-safetensors"
    if path.suffix.lower() == ".onnx":
        return "onnx"
    return "unknown"


def _unsafe_globals(path: Path, kind: str) -> list[str]:
    """The globals a pickle would import that torch's weights-only loader does not allow (no code runs)."""
    if kind == "torch-save":
        try:
            return sorted(torch.serialization.get_unsafe_globals_in_checkpoint(path))
        except Exception:  # noqa: BLE001 - only used to word a message
            return []
    found: set[str] = set()
    try:
        with path.open("rb") as f:
            while True:  # a legacy torch.save file is several pickles in a row
                strings: list[str] = []
                for op, arg, _ in pickletools.genops(f):
                    if op.name in ("GLOBAL", "INST"):
                        found.add(str(arg).replace(" ", "."))
                    elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                        found.add(f"{strings[-2]}.{strings[-1]}")
                    elif isinstance(arg, str):
                        strings.append(arg)
                    if op.name == "STOP":
                        break
                else:
                    break
    except Exception:  # noqa: BLE001 - the tail of a legacy file is raw storage bytes, not pickle
        pass
    return sorted(g for g in found if not g.startswith(("torch.", "collections.OrderedDict")))


# Globals that are code, not data: unpickling a file that names them runs
# commands, evaluates strings or opens files. No model needs any of them.
_CODE_MODULES = (
    "os.",
    "posix.",
    "nt.",
    "subprocess.",
    "sys.",
    "shutil.",
    "socket.",
    "pty.",
    "runpy.",
    "importlib.",
    "pickle.",
    "marshal.",
    "ctypes.",
    "code.",
    "webbrowser.",
    "torch.hub.",
    "commands.",
    "platform.",
)
_CODE_BUILTINS = {
    f"builtins.{name}" for name in ("exec", "eval", "compile", "__import__", "open", "breakpoint", "input", "apply")
} | {f"__builtin__.{name}" for name in ("exec", "eval", "compile", "__import__", "open", "apply")}


def _refusal(path: Path, kind: str) -> str:
    """Why a pickle was refused, naming what it would import."""
    found = _unsafe_globals(path, kind)
    code = [g for g in found if g in _CODE_BUILTINS or g.startswith(_CODE_MODULES) or g.endswith(".system")]
    if code:
        return (
            f"{path}: unpickling it would call {', '.join(code[:3])}{', ...' if len(code) > 3 else ''}, which runs "
            f"commands or code, not a model; do not load it unless you made it yourself (then --trust-pickle), "
            f"or {_SAFE_ROUTE}"
        )
    classes = [g for g in found if not g.startswith(("collections.", "builtins."))]
    classes = [g for g in classes if not g.startswith("torch.")] or classes  # the user's own classes first
    what = (
        f"a pickled object ({', '.join(classes[:3])}{', ...' if len(classes) > 3 else ''})"
        if classes
        else "unknown pickled code"
    )
    return (
        f"{path}: holds {what}, and loading it runs code from the file; re-run with --trust-pickle if you "
        f"trust its source, or {_SAFE_ROUTE}"
    )


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(isinstance(v, Tensor) for v in obj.values())


def _unwrap_checkpoint(obj: Any) -> Any:
    """Training checkpoints often nest the weights: ``{"state_dict": {...}, "epoch": 3}``."""
    if isinstance(obj, Mapping) and not _is_state_dict(obj):
        for key in ("state_dict", "model_state_dict", "model", "net", "weights"):
            if _is_state_dict(obj.get(key)):
                return obj[key]
    return obj


# -- loading -----------------------------------------------------------------


def _check_file(path: Path, what: str) -> None:
    if not path.exists():
        raise ModelLoadError(f"{path}: no such file; check the path of the {what}")
    if path.is_dir():
        raise ModelLoadError(f"{path}: is a directory, not a {what} file; pass the file itself")


def _load_pickle_file(path: Path, kind: str, trust_pickle: bool) -> nn.Module:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as refused:
        if not trust_pickle:
            raise ModelLoadError(_refusal(path, kind)) from refused
        try:
            obj = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e:  # noqa: BLE001 - arbitrary unpickling code may raise anything
            raise ModelLoadError(
                f"{path}: unpickling failed ({type(e).__name__}: {e}); the classes it needs must be importable "
                f"here, or {_SAFE_ROUTE}"
            ) from e
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as e:
        raise ModelLoadError(f"{path}: is truncated or corrupt ({type(e).__name__}: {str(e)[:120]}); re-save it") from e
    obj = _unwrap_checkpoint(obj)
    if _is_state_dict(obj):
        spec, kwargs = architecture_of(obj) or ("package.module:build_model", "")
        raise ModelLoadError(
            f"{path}: holds a state_dict ({len(obj)} tensors) but no architecture; pass an import spec that builds "
            f"the model and this file as weights, e.g. sepify convert {spec}{kwargs} --weights {path}"
        )
    if isinstance(obj, torch.jit.ScriptModule):
        raise ModelLoadError(_torchscript_message(path))
    if not isinstance(obj, nn.Module):
        raise ModelLoadError(
            f"{path}: holds a {type(obj).__name__}, not an nn.Module; pass a saved model or {_SAFE_ROUTE}"
        )
    return obj


def architecture_of(state: Mapping[str, Any]) -> tuple[str, str] | None:
    """The torchvision classifier whose state_dict has exactly these names and shapes (the last layer's class count
    aside), as ``("torchvision.models:name", " --kwargs '{...}'")``; None when none has or torchvision is missing.

    Candidates are built on the meta device (shapes, no memory, no download): one per torchvision module first,
    then every model of the modules whose top-level names match (a second or two in all).
    """
    try:
        import torchvision
    except ImportError:
        return None
    shapes = {k: tuple(v.shape) for k, v in state.items() if isinstance(v, Tensor)}
    tops = {k.split(".")[0] for k in shapes}
    families: dict[str, list[str]] = {}
    for name in torchvision.models.list_models(module=torchvision.models):
        families.setdefault(torchvision.models.get_model_builder(name).__module__, []).append(name)
    for names in families.values():
        first = _meta_state(torchvision, names[0])
        if first is None or {k.split(".")[0] for k in first} != tops:
            continue
        for name in names:
            candidate = first if name == names[0] else _meta_state(torchvision, name)
            found = _matching(name, shapes, candidate) if candidate is not None else None
            if found is not None:
                return found
    return None


def _meta_state(torchvision: Any, name: str) -> dict[str, tuple[int, ...]] | None:
    try:
        with warnings.catch_warnings(), torch.device("meta"):
            warnings.simplefilter("ignore")
            return {k: tuple(v.shape) for k, v in torchvision.models.get_model(name).state_dict().items()}
    except Exception:  # noqa: BLE001 - a model that cannot be built on the meta device is not the one
        return None


def _matching(
    name: str, shapes: Mapping[str, tuple[int, ...]], candidate: Mapping[str, tuple[int, ...]]
) -> tuple[str, str] | None:
    if candidate.keys() != shapes.keys():
        return None
    differ = [k for k in shapes if shapes[k] != candidate[k]]
    if not differ:
        return f"torchvision.models:{name}", ""
    classes = {shapes[k][0] for k in differ}
    if len(classes) == 1 and all(shapes[k][1:] == candidate[k][1:] for k in differ):  # the classifier only
        return f"torchvision.models:{name}", f" --kwargs '{{\"num_classes\": {classes.pop()}}}'"
    return None


def _torchscript_message(path: Path) -> str:
    return (
        f"{path}: is a TorchScript archive; torch.fx cannot trace TorchScript graphs (and torch silently ignores "
        f"submodules swapped into a ScriptModule), so convert the Python model instead: {_SAFE_ROUTE}"
    )


def _load_pt2(path: Path, trust_pickle: bool) -> nn.Module:
    if not trust_pickle:
        raise ModelLoadError(
            f"{path}: is a torch.export archive, and torch.export.load unpickles it fully, which can run code from "
            f"the file (pytorch#153410); re-run with --trust-pickle if you trust its source, or {_SAFE_ROUTE}"
        )
    try:
        program = torch.export.load(path)
    except Exception as e:  # noqa: BLE001 - a damaged archive fails in many ways
        raise ModelLoadError(
            f"{path}: torch.export.load failed ({type(e).__name__}: {str(e)[:120]}); re-export it"
        ) from e
    return program.module()


def load_state_dict_file(path: str | os.PathLike[str]) -> dict[str, Tensor]:
    """Read weights from ``.safetensors`` or a ``torch.save`` file (``weights_only=True``)."""
    path = Path(path)
    _check_file(path, "weights")
    kind = detect_kind(path)
    if kind == "safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError as e:
            raise ModelLoadError(
                f"{path}: reading .safetensors needs the safetensors package; pip install safetensors"
            ) from e
        try:
            return dict(load_file(str(path)))
        except Exception as e:  # noqa: BLE001 - the parser's own errors
            raise ModelLoadError(f"{path}: is not a readable safetensors file ({e}); re-save it") from e
    if kind == "truncated-safetensors":
        raise ModelLoadError(f"{path}: is a truncated safetensors file (its header runs past the end); re-save it")
    if kind not in ("torch-save", "legacy-pickle"):
        raise ModelLoadError(
            f"{path}: is not a weights file (found: {kind}); pass a .safetensors or a torch.save'd state_dict"
        )
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ModelLoadError(
            f"{path}: holds pickled objects besides tensors, so it is not a plain state_dict; save "
            "model.state_dict() instead"
        ) from e
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as e:
        raise ModelLoadError(f"{path}: is truncated or corrupt ({type(e).__name__}); re-save it") from e
    obj = _unwrap_checkpoint(obj)
    if not _is_state_dict(obj):
        raise ModelLoadError(f"{path}: holds a {type(obj).__name__}, not a state_dict of tensors")
    return dict(obj)


_FROM_FILE = "__sepify_from_file__"  # marks modules import_callable loaded from a path/to/file.py spec


def import_callable(spec: str) -> Any:
    module_part, _, attr = spec.rpartition(":")
    if not module_part or not attr:
        raise ModelLoadError(f"{spec!r}: an import spec looks like package.module:callable or path/to/file.py:callable")
    try:
        if module_part.endswith(".py"):
            file = Path(module_part)
            if not file.is_file():
                raise ModelLoadError(f"{spec!r}: {file} does not exist; check the path")
            mod_spec = importlib.util.spec_from_file_location(file.stem, file)
            assert mod_spec is not None and mod_spec.loader is not None
            module = importlib.util.module_from_spec(mod_spec)
            # registered under its name, so that pickling what it defines (a converted model keeps the original's
            # class) finds it; a module of that name imported otherwise is never replaced
            if getattr(sys.modules.get(file.stem), _FROM_FILE, True):
                setattr(module, _FROM_FILE, True)
                sys.modules[file.stem] = module
            mod_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_part)
    except ModelLoadError:
        raise
    except ImportError as e:
        raise ModelLoadError(f"{spec!r}: cannot import {module_part} ({e}); install it or fix the name") from e
    except Exception as e:  # noqa: BLE001 - importing runs the module's code, which may raise anything
        raise ModelLoadError(f"{spec!r}: importing {module_part} raised {_one_line(e)}; fix that module") from e
    fn = module
    for part in attr.split("."):
        if not hasattr(fn, part):
            raise ModelLoadError(f"{spec!r}: {module_part} has no attribute {part!r}; check the name after the colon")
        fn = getattr(fn, part)
    if not callable(fn):
        raise ModelLoadError(f"{spec!r}: {attr} is a {type(fn).__name__}, not a callable that builds a model")
    return fn


def _one_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__} ({text.splitlines()[0][:160]})" if text else type(e).__name__


WRAPPER_ATTRIBUTES = ("model", "module", "net", "network", "pipe")


def wrapped_hint(obj: object, flag: str = "--attr") -> str:
    """``"; it holds one at .model: pass --attr model"`` when ``obj`` wraps an nn.Module, else ``""``."""
    for name in WRAPPER_ATTRIBUTES:
        try:
            inner = getattr(obj, name, None)
        except Exception:  # noqa: BLE001 - a property of someone else's wrapper may raise anything
            continue
        if isinstance(inner, nn.Module):
            return f"; it holds one at .{name}: pass {flag} {name}" if flag else f"; it holds one at .{name}"
    return ""


# nn.Modules whose forward is not the network's but a whole application around it (ultralytics' YOLO runs
# pre-processing, prediction and post-processing), by class, with the attribute that holds the network.
_APPLICATION_WRAPPERS = {"ultralytics.engine.model.Model": "model"}


def application_wrapper(obj: object) -> str | None:
    """The attribute holding the network when ``obj`` is a known application wrapper (ultralytics' ``YOLO``).

    Converting such an object would run its application (ultralytics predicts) instead of a network.
    """
    for cls in type(obj).__mro__:
        attribute = _APPLICATION_WRAPPERS.get(f"{cls.__module__}.{cls.__qualname__}")
        if attribute is not None:
            return attribute
    return None


def _attribute(obj: object, dotted: str, source: str) -> Any:
    for part in dotted.split("."):
        if not hasattr(obj, part):
            raise ModelLoadError(
                f"{source!r}: the {type(obj).__name__} it returned has no attribute {part!r} (from --attr {dotted})"
                f"{wrapped_hint(obj)}"
            )
        obj = getattr(obj, part)
    return obj


def load_model(
    source: str,
    *,
    trust_pickle: bool = False,
    kwargs: Mapping[str, Any] | None = None,
    weights: str | os.PathLike[str] | None = None,
    attr: str | None = None,
) -> LoadedModel:
    """Load a model from a file or an import spec; see the module docstring.

    ``attr`` (dotted) picks the nn.Module out of what an import spec returns,
    for wrappers such as ultralytics' ``YOLO`` (``attr="model"``).
    """
    if is_import_spec(source):
        fn = import_callable(source)
        try:
            # Seeded, so that random-weight architectures are the same model in every run
            # (an audit's plan must fit the model a later convert builds); the caller's RNG is left alone.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                model = fn(**dict(kwargs or {}))
        except TypeError as e:
            raise ModelLoadError(f"{source!r}: calling it failed ({e}); check --kwargs") from e
        except Exception as e:  # noqa: BLE001 - a model factory may raise anything (a download offline, ...)
            raise ModelLoadError(
                f"{source!r}: building the model raised {_one_line(e)}; pass --kwargs that avoid it (e.g. no "
                "pretrained-weight download offline) or fix the code it runs"
            ) from e
        if attr is not None:
            model = _attribute(model, attr, source)
        elif (inner := application_wrapper(model)) is not None:
            raise ModelLoadError(
                f"{source!r}: returned a {type(model).__name__}, which wraps its network at .{inner} (its own "
                f"forward runs a whole prediction); pass --attr {inner}"
            )
        if not isinstance(model, nn.Module):
            raise ModelLoadError(
                f"{source!r}: returned a {type(model).__name__}, not an nn.Module{wrapped_hint(model)}"
            )
        if weights is not None:
            load_weights_into(model, Path(weights))
        return LoadedModel(model, "import-spec", source)
    if kwargs:
        raise ModelLoadError(f"{source}: --kwargs applies only to an import spec (package.module:callable)")
    if attr is not None:
        raise ModelLoadError(f"{source}: --attr applies only to an import spec (package.module:callable)")
    path = Path(source)
    _check_file(path, "model")
    kind = detect_kind(path)
    if kind in ("torch-save", "legacy-pickle"):
        model = _load_pickle_file(path, kind, trust_pickle)
        loaded_kind = "pickle"
    elif kind == "pt2":
        model = _load_pt2(path, trust_pickle)
        loaded_kind = "pt2"
    else:
        raise ModelLoadError(_describe_unusable(path, kind))
    if weights is not None:
        load_weights_into(model, Path(weights))
    return LoadedModel(model, loaded_kind, str(path))


def _describe_unusable(path: Path, kind: str) -> str:
    if kind == "empty":
        return f"{path}: the file is empty; re-save the model"
    if kind == "corrupt-zip":
        return f"{path}: is truncated or corrupt (an incomplete zip archive); re-save or re-download it"
    if kind == "truncated-safetensors":
        return (
            f"{path}: is a truncated safetensors file (its header runs past the end); re-save it, and pass it as "
            "--weights beside an import spec (safetensors hold no architecture)"
        )
    if kind == "torchscript":
        return _torchscript_message(path)
    if kind == "safetensors":
        return (
            f"{path}: holds weights only (safetensors) and no architecture; pass an import spec that builds the "
            f"model and this file as --weights"
        )
    if kind == "onnx":
        return f"{path}: is an ONNX model; sepify converts PyTorch models, so pass the model it was exported from"
    return (
        f"{path}: is not a PyTorch model file (no torch.save, torch.export or TorchScript archive inside); "
        f"pass a model saved with torch.save(model), or {_SAFE_ROUTE}"
    )


def safetensors_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """The string metadata of a ``.safetensors`` file (empty if it has none or is another kind of file)."""
    path = Path(path)
    if not path.is_file() or detect_kind(path) != "safetensors":
        return {}
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception:  # noqa: BLE001 - unreadable metadata is reported when the weights are read
        return {}


def load_weights_into(model: nn.Module, path: Path) -> None:
    """Load a state_dict file into ``model``; keys or shapes that do not match are one sentence naming one.

    Nothing is loaded unless everything fits: the model is untouched on error.
    """
    state = load_state_dict_file(path)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    reshaped = [k for k in state if k in expected and tuple(state[k].shape) != tuple(expected[k].shape)]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing (e.g. {missing[0]})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
    if reshaped:
        k = reshaped[0]
        problems.append(
            f"{len(reshaped)} of another shape (e.g. {k}: {tuple(state[k].shape)} in the file, "
            f"{tuple(expected[k].shape)} in the model)"
        )
    if problems:
        raise ModelLoadError(
            f"{path}: its tensors do not fit the model ({'; '.join(problems)}); pass weights saved from this "
            "architecture, or the --kwargs it was built with"
        )
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:  # e.g. a dtype torch cannot copy across
        raise ModelLoadError(f"{path}: loading into the model failed ({str(e).splitlines()[0][:160]})") from e
