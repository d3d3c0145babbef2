"""No command outlives its work after a warning: a model that warns in every forward, every command, every format.

A warning replayed while warnings were still being recorded once made every command spin forever after writing
its files. Each test here runs in-process under a 60 s alarm, which interrupts such a loop.
"""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from sepify.cli import app

WARNS = """
import warnings
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, padding=1)
        self.c2 = nn.Conv2d(16, 8, 3, padding=1)

    def forward(self, x):
        warnings.warn("this model warns in its forward")
        return self.c2(torch.relu(self.c1(x))).mean((2, 3))


def build():
    warnings.warn("this model warns when it is built", DeprecationWarning)
    torch.manual_seed(0)
    return Net().eval()
"""
INPUT = ["--input-shape", "2,3,8,8"]
LIMIT_S = 60
runner = CliRunner()


class Hung(Exception):
    """Raised by the alarm when a command outlives its work."""


@pytest.fixture(autouse=True)
def _alarm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "warns.py").write_text(WARNS)
    np.save(tmp_path / "data.npy", np.random.default_rng(0).standard_normal((32, 3, 8, 8)).astype("float32"))

    def hung(signum: int, frame: object) -> None:
        raise Hung(f"the command did not end within {LIMIT_S} s")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(LIMIT_S)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def run(*args: str) -> object:
    result = runner.invoke(app, list(args))
    assert not isinstance(result.exception, Hung), result.exception
    return result


@pytest.mark.parametrize("fmt", ["pt", "pt2", "onnx", "openvino", "safetensors"])
def test_convert_ends_and_shows_the_warning_once(fmt: str) -> None:
    result = run("convert", "warns.py:build", *INPUT, "--rank", "full", "--format", fmt, "-q")
    assert result.exit_code == 0, result.output
    assert result.output.count("warning: UserWarning: this model warns in its forward") == 1


def test_audit_ends() -> None:
    result = run("audit", "warns.py:build", *INPUT, "-q")
    assert result.exit_code == 0, result.output
    assert result.output.count("this model warns in its forward") == 1


def test_a_failing_command_ends_with_the_error_last() -> None:
    result = run("convert", "warns.py:build", "--input-shape", "2,5,8,8")
    assert result.exit_code == 1
    assert result.output.strip().splitlines()[-1].startswith("error: ")


def test_distill_ends() -> None:
    assert run("convert", "warns.py:build", *INPUT, "-o", "student.pt", "-q").exit_code == 0
    result = run(
        "distill", "student.pt", "--trust-pickle", "--teacher", "warns.py:build", "--data", "data.npy",
        *INPUT, "--steps", "3", "--batch-size", "8", "-o", "out.pt", "-q",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert Path("out.pt").is_file()
    assert result.output.count("this model warns in its forward") == 1


@pytest.mark.parametrize("int8", [False, pytest.param(True, marks=pytest.mark.slow)])  # four models compared: 6 s
def test_distill_checks_what_it_wrote(int8: bool) -> None:
    assert run("convert", "warns.py:build", *INPUT, "--rank", "2", "-o", "student.pt", "-q").exit_code == 0
    result = run(
        "distill", "student.pt", "--trust-pickle", "--teacher", "warns.py:build", "--data", "data.npy", *INPUT,
        "--steps", "3", "--batch-size", "8", "-o", "out.onnx", *(["--int8"] if int8 else []),
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert result.output.count("this model warns in its forward") == 1
    text = " ".join(result.output.split())
    if int8:  # ranges from --data, compared with the teacher (the original) in float32 and int8
        assert "checked out.onnx against the other ways to ship this model, in onnxruntime (" in text
        assert "errors against the original on 32 samples" in text
    else:
        assert "checked out.onnx: onnxruntime reproduces PyTorch's outputs to " in text


def test_convert_and_audit_measure_where_they_are_told() -> None:
    def measured(*flags: str) -> dict[str, object]:
        result = run("convert", "warns.py:build", *INPUT, "--rank", "1", "--include", "c2", *flags,
                     "--report", "r.json", "--force", "-q")  # fmt: skip
        assert result.exit_code == 0, result.output
        verification: dict[str, object] = json.loads(Path("r.json").read_text())["verification"]
        return verification

    # only c2 is converted: c1's output is untouched, the model's is not
    on_c1 = measured("--measure-on", "c1")
    assert on_c1["measured_on"] == "c1" and on_c1["output_error"] == 0.0
    outputs = measured()
    assert outputs["measured_on"] == "the outputs" and float(outputs["output_error"]) > 0.05  # type: ignore[arg-type]
    assert measured("--measure-on", "0")["output_error"] == outputs["output_error"]
    refused = run("audit", "warns.py:build", *INPUT, "--measure-on", "1")
    assert refused.exit_code == 2  # a usage error, as for every refused option value
    assert "error: --measure-on 1 is not an output: the model returns 1 floating-point tensor(s); pass an index " in (
        " ".join(refused.output.split())
    )


@pytest.mark.slow  # four models exported, quantized and timed: 4-8 s each
@pytest.mark.parametrize("fmt", ["onnx", "openvino"])
def test_int8_convert_ends_and_compares_the_ways_to_ship(fmt: str) -> None:
    result = run("convert", "warns.py:build", *INPUT, "--rank", "2", "--format", fmt, "--int8",
                 "--calibration", "data.npy")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert result.output.count("this model warns in its forward") == 1
    runtime = "onnxruntime" if fmt == "onnx" else "openvino"
    text = " ".join(result.output.split())
    assert f"against the other ways to ship this model, in {runtime} (" in text
    assert "errors against the original on 32 samples" in text and "slim int8 (written)" in text


def test_calibration_fits_rescaled_copies_where_told_or_where_samples_are_few_sources() -> None:
    def notes(*flags: str) -> list[str]:
        result = run("convert", "warns.py:build", *INPUT, "--rank", "2", "--calibration", "data.npy", *flags,
                     "--report", "r.json", "--force", "-q")  # fmt: skip
        assert result.exit_code == 0, result.output
        assert result.output.count("this model warns in its forward") == 1
        found: list[str] = json.loads(Path("r.json").read_text())["notes"]
        return found

    copies = "calibration: 32 samples and a copy of each rescaled by up to half an octave, fit and judged together"
    distinct = "calibration: 32 samples from 32 sources (near-duplicate groups), enough variety to fit as given"
    assert notes()[0].startswith(distinct)  # 32 independent noise samples: no copies by default
    assert notes("--augment")[0].startswith(copies)
    assert not any(note.startswith("calibration: 32 samples") for note in notes("--no-augment"))
    audited = run("audit", "warns.py:build", *INPUT, "--calibration", "data.npy", "--no-augment", "-q")
    assert audited.exit_code == 0, audited.output
