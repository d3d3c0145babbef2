"""``sepify distill`` and ``sepify.distill`` as a hostile user runs them: nothing lost, never a NaN model, one sentence.

Every case ends in exit 1 (2 for a bad option value) or one :class:`sepify.SepifyError` sentence, no traceback;
every input is byte-identical afterwards; nothing non-finite is written or returned; no temp file is left.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.data import Dataset, IterableDataset
from typer.testing import CliRunner

import sepify
from sepify import Distill
from sepify.cli import app
from sepify.io.atomic import TEMP_MARK

runner = CliRunner()
PROGRESS = re.compile(r"^(convert|audit|plan|distill): ")
NETS = """
import torch

def teacher():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 3)).eval()

class Raises(torch.utils.data.Dataset):
    def __len__(self):
        return 32
    def __getitem__(self, i):
        if i == 7:
            raise ValueError("sample 7 is corrupt on disk")
        return torch.randn(3, 12, 12)

def raising():
    return Raises()

def factory_fails():
    raise FileNotFoundError("/data/train not mounted")

def meta():
    with torch.device("meta"):
        return teacher()
"""
BASE = ["distill", "student.pt", "--trust-pickle", "--teacher", "nets.py:teacher", "--steps", "3", "--batch-size", "8"]


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(autouse=True)
def _files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "nets.py").write_text(NETS)
    rng = np.random.default_rng(0)
    np.save(tmp_path / "data.npy", rng.standard_normal((64, 3, 12, 12)).astype("float32"))
    np.save(tmp_path / "ev.npy", rng.standard_normal((16, 3, 12, 12)).astype("float32"))
    np.save(tmp_path / "empty.npy", np.zeros((0, 3, 12, 12), dtype="float32"))
    np.save(tmp_path / "ints.npy", rng.integers(0, 9, (64, 3, 12, 12)))
    np.save(tmp_path / "half.npy", rng.standard_normal((64, 3, 12, 12)).astype("float16"))
    torch.save(torch.randn(64, 3, 12, 12).to_sparse(), tmp_path / "sparse.pt")
    result = runner.invoke(app, ["convert", "nets.py:teacher", "--input-shape", "1,3,12,12", "--rank", "1", "-o",
                                 "student.pt", "-q"])  # fmt: skip
    assert result.exit_code == 0, result.output


def run_hostile(tmp_path: Path, argv: list[str]) -> tuple[int, str]:
    """Run a command; check no traceback, no input changed, no file left but what it wrote; its error lines."""
    before = {p: digest(p) for p in tmp_path.rglob("*") if p.is_file()}
    result = runner.invoke(app, argv)
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    assert all(digest(p) == h for p, h in before.items() if p.exists()), "an input changed"
    assert not [p for p in tmp_path.rglob("*") if TEMP_MARK in p.name], "temp files were left behind"
    said = [line for line in result.output.splitlines() if not PROGRESS.match(line)]
    return result.exit_code, " ".join(line.strip(" │") for line in said).strip()


CASES = [
    (["--data", "data.npy", "--eval-data", "ev.npy", "-o", "ev.npy", "--force"], 1,
     "error: ev.npy: is also the --eval-data input; sepify never overwrites what it reads, so choose another -o path"),
    (["--data", "data.npy", "--eval-data", "ev.npy", "-o", "out.pt", "--log", "ev.npy"], 1,
     "error: ev.npy: is also the --eval-data input; sepify never overwrites what it reads, so choose another --log path"),
    (["--data", "data.npy", "-o", "out.pt", "--log", "data.npy", "--force"], 1, "is also the --data input"),
    (["--data", "data.npy", "-o", "out.pt", "--log", "student.pt", "--checkpoint-dir", "ck", "--resume"], 1,
     "error: student.pt: is also the STUDENT input"),
    (["--data", "data.npy", "-o", "out.pt", "--checkpoint-dir", "out.pt"], 1,
     "error: out.pt: is both the -o and the checkpoint output of this run; choose different paths"),
    (["--data", "data.npy", "-o", "out.pt", "--checkpoint-dir", "nets.py"], 1,
     "error: nets.py: the checkpoint folder is a file; pass a folder as --checkpoint-dir"),
    (["--data", "data.npy", "-o", "out.pt", "--checkpoint-dir", "ck", "--resume"], 1,
     "error: ck/checkpoint.pt: no checkpoint to resume from; run without --resume first"),
    (["--data", "data.npy", "-o", "out.pt", "--resume"], 2, "needs --checkpoint-dir"),
    (["--data", "data.npy", "-o", "x.safetensors", "--format", "pt"], 1,
     "error: x.safetensors: the name says safetensors but the format is pt; pass --format safetensors, or name the "
     "output <name>.pt"),
    (["--data", "data.npy", "-o", "out.pt", "--log", "missing/log.jsonl"], 1,
     "error: missing/log.jsonl: its folder missing does not exist; create it or choose another --log path"),
    (["--data", "data.npy", "-o", "out.pt", "--lr", "1e30"], 1, "pass a lower learning rate (--lr, now 1e+30)"),
    (["--data", "empty.npy", "-o", "out.pt"], 1, "error: empty.npy: holds no samples; pass at least one"),
    (["--data", "sparse.pt", "-o", "out.pt"], 1, "error: sparse.pt: holds a sparse tensor (torch.sparse_coo)"),
    (["--data", "nowhere.npy", "-o", "out.pt"], 1,
     "error: nowhere.npy: no such file or folder; pass an image folder, a .pt/.npy file or 'random'"),
    (["--data", "nets.py:raising", "-o", "out.pt", "--input-shape", "1,3,12,12", "--steps", "8"], 1,
     "error: the distillation data: reading sample 7 raised ValueError: sample 7 is corrupt on disk; fix the dataset "
     "or leave that sample out"),
    (["--data", "nets.py:factory_fails", "-o", "out.pt"], 1,
     "error: 'nets.py:factory_fails': building the data raised FileNotFoundError: /data/train not mounted; fix the "
     "factory"),
    (["--data", "data.npy", "-o", "out.pt", "--batch-size", "100"], 2,
     "error: --batch-size 100 is larger than the 64 samples given"),
    (["--data", "data.npy", "-o", "out.pt", "--loss", "l1"], 2, "Invalid value for '--loss'"),
]  # fmt: skip


@pytest.mark.parametrize(("extra", "code", "message"), CASES, ids=[" ".join(c[0][2:5])[:40] for c in CASES])
def test_bad_runs_are_one_sentence_and_lose_nothing(tmp_path: Path, extra: list[str], code: int, message: str) -> None:
    got, said = run_hostile(tmp_path, [*BASE, *extra])
    assert got == code, said
    assert message in said, said
    assert not Path("out.pt").exists() and not Path("x.safetensors").exists()


def test_a_teacher_on_the_meta_device_is_a_sentence(tmp_path: Path) -> None:
    argv = [*BASE[:3], "--teacher", "nets.py:meta", *BASE[5:], "--data", "data.npy", "-o", "out.pt"]
    code, said = run_hostile(tmp_path, argv)
    assert code == 1 and said == (
        "error: nets.py:meta: the model holds parameters on the meta device (shapes without values); build it with "
        "its weights (or pass --weights)"
    )


def test_a_student_where_the_checkpoint_goes_is_never_overwritten(tmp_path: Path) -> None:
    Path("ck").mkdir()
    Path("ck/checkpoint.pt").write_bytes(Path("student.pt").read_bytes())
    argv = ["distill", "ck/checkpoint.pt", *BASE[2:], "--data", "data.npy", "-o", "out.pt", "--checkpoint-dir", "ck"]
    code, said = run_hostile(tmp_path, [*argv, "--force"])
    assert code == 1 and said == (
        "error: ck/checkpoint.pt: is also the STUDENT input; sepify never overwrites what it reads, so choose another "
        "checkpoint path"
    )


def test_an_old_checkpoint_needs_force_or_resume(tmp_path: Path) -> None:
    argv = [*BASE, "--data", "data.npy", "--checkpoint-dir", "ck", "--checkpoint-every", "1"]
    assert runner.invoke(app, [*argv, "-o", "a.pt"]).exit_code == 0
    code, said = run_hostile(tmp_path, [*argv, "-o", "b.pt"])
    assert code == 1 and said.startswith("error: ck/checkpoint.pt: already exists; pass --force")
    assert runner.invoke(app, [*argv, "-o", "b.pt", "--force"]).exit_code == 0


@pytest.mark.parametrize("data", ["ints.npy", "half.npy"])
def test_data_of_other_dtypes(tmp_path: Path, data: str) -> None:
    """float16 samples are cast to the model's float32; integer samples of a .npy are read as numbers too."""
    result = runner.invoke(app, [*BASE, "--data", data, "-o", "out.pt", "-q"])
    assert result.exit_code == 0, result.output
    model = torch.load("out.pt", weights_only=False)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_a_model_is_written_in_the_format_its_name_says(tmp_path: Path) -> None:
    pytest.importorskip("safetensors")
    result = runner.invoke(app, [*BASE, "--data", "data.npy", "-o", "out.safetensors", "-q"])
    assert result.exit_code == 0, result.output
    assert Path("out.plan.json").is_file()
    rebuilt = sepify.load_converted(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3)), "out.safetensors")
    assert isinstance(rebuilt[0], sepify.SeparableConv2d)


@pytest.mark.slow  # a subprocess that imports torch
def test_an_unencodable_output_name_never_fails_after_writing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With PYTHONIOENCODING=ascii the name is printed escaped; the file is written and the exit code is 0."""
    import subprocess
    import sys

    argv = [sys.executable, "-m", "sepify", *BASE, "--data", "data.npy", "-o", "ü.pt"]
    proc = subprocess.run(argv, capture_output=True, env={**__import__("os").environ, "PYTHONIOENCODING": "ascii"},
                          check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")[-800:]
    assert Path("ü.pt").is_file() and b"wrote \\xfc.pt" in proc.stdout


# -- the API -----------------------------------------------------------------------------------------------------


def _student_and_teacher() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3)).eval()
    return sepify.convert(teacher, torch.randn(1, 3, 12, 12), rank=1).model, teacher


class RaisesAt(Dataset[torch.Tensor]):
    def __init__(self, bad: int) -> None:
        self.bad = bad

    def __len__(self) -> int:
        return 48

    def __getitem__(self, i: int) -> torch.Tensor:
        if i == self.bad:
            raise OSError(f"read error at {i}")
        return torch.randn(3, 12, 12, generator=torch.Generator().manual_seed(i))


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.integers(0, 47))
def test_a_dataset_raising_at_any_index_is_named(bad: int) -> None:
    student, teacher = _student_and_teacher()
    options = Distill(steps=6, batch_size=8)  # 48 samples: every index is read in the first epoch
    with pytest.raises(sepify.CalibrationError, match=rf"^the distillation data: reading sample {bad} raised OSError"):
        sepify.distill(student, teacher, RaisesAt(bad), options)


class Once(IterableDataset[torch.Tensor]):
    def __init__(self, count: int) -> None:
        self.count = count

    def __iter__(self):  # type: ignore[no-untyped-def]
        return (torch.randn(3, 12, 12) for _ in range(self.count))


def test_iterables_that_run_dry() -> None:
    student, teacher = _student_and_teacher()
    with pytest.raises(
        sepify.CalibrationError, match=r"^the distillation data is empty: its iterator yielded no sample"
    ):
        sepify.distill(student, teacher, Once(0), Distill(steps=2, batch_size=4))
    generator = (torch.randn(3, 12, 12) for _ in range(6))
    with pytest.raises(sepify.CalibrationError, match=r"ran out after 6 samples and cannot be read again"):
        sepify.distill(student, teacher, generator, Distill(steps=3, batch_size=4))
    result = sepify.distill(student, teacher, Once(6), Distill(steps=3, batch_size=4))  # re-iterable: epochs
    assert len(result.history) >= 1


def test_samples_of_mixed_shapes_and_nan_samples_are_named() -> None:
    student, teacher = _student_and_teacher()
    mixed = [torch.randn(3, 12, 12)] * 5 + [torch.randn(3, 10, 12)] * 5
    with pytest.raises(sepify.CalibrationError, match=r"sample \d is \(3, 1[02], 12\) float32 but sample \d is"):
        sepify.distill(student, teacher, mixed, Distill(steps=2, batch_size=10))
    data = torch.randn(16, 3, 12, 12)
    data[5, 0, 0, 0] = float("nan")
    with pytest.raises(sepify.CalibrationError, match=r"^the distillation data: sample 5 holds NaN or infinite values"):
        sepify.distill(student, teacher, data, Distill(steps=2, batch_size=16))
    with pytest.raises(sepify.CalibrationError, match=r"^the evaluation data is empty or ragged"):
        sepify.distill(student, teacher, torch.randn(16, 3, 12, 12), Distill(steps=2, batch_size=8),
                       eval_data=torch.zeros(0, 3, 12, 12))  # fmt: skip


def test_a_step_that_blows_up_is_undone_and_nothing_non_finite_is_returned() -> None:
    student, teacher = _student_and_teacher()
    with pytest.raises(sepify.TrainingError, match=r"pass a lower learning rate \(--lr, now 1e\+30\)"):
        sepify.distill(student, teacher, torch.randn(32, 3, 12, 12), Distill(steps=5, batch_size=8, lr=1e30))
    assert all(bool(torch.isfinite(p).all()) for p in student.parameters())


def test_a_student_sharing_the_teachers_parameters_is_refused() -> None:
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3)).eval()
    student = sepify.convert(teacher, torch.randn(1, 3, 12, 12), rank=1, inplace=True).model
    with pytest.raises(sepify.ConfigError, match=r"^the student and the teacher are the same model"):
        sepify.distill(student, teacher, torch.randn(16, 3, 12, 12), Distill(steps=2, batch_size=8))


# -- checkpoints -----------------------------------------------------------------------------------------------------


def _checkpoint(tmp_path: Path) -> tuple[Path, Distill]:
    student, teacher = _student_and_teacher()
    options = Distill(steps=6, batch_size=8, checkpoint_dir=tmp_path / "ck", checkpoint_every=2)
    sepify.distill(student, teacher, torch.randn(32, 3, 12, 12), options)
    return tmp_path / "ck" / "checkpoint.pt", options


DAMAGE = {
    "not a dict": lambda s: [1, 2, 3],
    "no format": lambda s: {k: v for k, v in s.items() if k != "format"},
    "a missing field": lambda s: {k: v for k, v in s.items() if k != "run"},
    "another version": lambda s: {**s, "version": 99},
    "a step out of range": lambda s: {**s, "step": 10**6},
    "a tensor of another shape": lambda s: {**s, "student": {k: v[..., :1] for k, v in s["student"].items()}},
    "a missing tensor": lambda s: {**s, "student": dict(list(s["student"].items())[1:])},
    "NaN weights": lambda s: {**s, "student": {k: v * float("nan") for k, v in s["student"].items()}},
    "a damaged log": lambda s: {**s, "history": "oops"},
    "a damaged RNG state": lambda s: {**s, "rng": {"python": 3}},
    "NaN optimiser state": lambda s: {**s, "optimizer": {**s["optimizer"], "state": {0: {"exp_avg": torch.tensor([float("nan")])}}}},
}  # fmt: skip


@pytest.mark.parametrize("damage", DAMAGE, ids=list(DAMAGE))
def test_a_damaged_checkpoint_is_refused_before_anything_is_loaded(tmp_path: Path, damage: str) -> None:
    path, options = _checkpoint(tmp_path)
    state = torch.load(path, weights_only=True)
    torch.save(DAMAGE[damage](state), path)
    student, teacher = _student_and_teacher()
    before = {k: v.clone() for k, v in student.state_dict().items()}
    with pytest.raises(sepify.CheckpointError, match=rf"^{re.escape(str(path))}: "):
        sepify.distill(student, teacher, torch.randn(32, 3, 12, 12), options, resume=True)
    assert all(torch.equal(v, before[k]) for k, v in student.state_dict().items())  # nothing was loaded


def test_a_truncated_checkpoint_is_a_sentence(tmp_path: Path) -> None:
    path, options = _checkpoint(tmp_path)
    path.write_bytes(path.read_bytes()[:100])
    student, teacher = _student_and_teacher()
    with pytest.raises(sepify.CheckpointError, match=r"the checkpoint cannot be read .*; delete it and start over$"):
        sepify.distill(student, teacher, torch.randn(32, 3, 12, 12), options, resume=True)


# -- paths: every output against every input and every other output --------------------------------------------------

ROLES = ["student.pt", "data.npy", "ev.npy", "out.pt", "log.jsonl", "ck"]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.sampled_from(["-o", "--log", "--checkpoint-dir"]), st.sampled_from(ROLES), st.booleans())
def test_no_output_can_be_an_input_or_another_output(tmp_path: Path, flag: str, target: str, force: bool) -> None:
    paths = {"-o": "out.pt", "--log": "log.jsonl", "--checkpoint-dir": "ck"}
    paths[flag] = target
    argv = [*BASE, "--data", "data.npy", "--eval-data", "ev.npy", *[a for f, p in paths.items() for a in (f, p)]]
    names = list(paths.values())
    clash = target in ("student.pt", "data.npy", "ev.npy") or len(set(names)) < len(names)
    for leftover in ("out.pt", "log.jsonl"):
        Path(leftover).unlink(missing_ok=True)
    code, said = run_hostile(tmp_path, [*argv, *(["--force"] if force else [])])
    if clash:
        refusals = ("sepify never overwrites what it reads", "is both the", "is a folder, and sepify replaces only",
                    "the checkpoint folder is a file")  # fmt: skip
        assert code == 1 and any(r in said for r in refusals), said
    else:
        assert code == 0, said


def test_a_full_disk_while_writing_is_a_sentence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """torch.save reports a full disk from its C++ writer as a RuntimeError; sepify says what happened."""
    real = torch.save

    def full(obj: object, f: object, *args: object, **kwargs: object) -> None:
        real(obj, f, *args, **kwargs)
        raise RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file data/0")

    monkeypatch.setattr(torch, "save", full)
    code, said = run_hostile(tmp_path, [*BASE, "--data", "data.npy", "-o", "out.pt"])
    assert code == 1 and said.endswith(
        "error: out.pt: writing failed (the file could not be written: is the disk full?); nothing was replaced, so "
        "free some space or write elsewhere"
    )
    assert not Path("out.pt").exists()


def test_a_missing_required_option_is_a_usage_error(tmp_path: Path) -> None:
    code, said = run_hostile(tmp_path, [*BASE, "--data", "data.npy"])
    assert code == 2 and "Missing option '-o' / '--output'" in said
