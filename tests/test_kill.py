"""Killed and racing runs of the real command: the output is absent or complete, inputs unchanged, no temp left.

Each test starts ``python -m sepify convert`` in a subprocess on a model with a
64 MB linear layer (so that writing takes long enough to be hit) and signals it
while its temp file exists, or at a random moment.
"""

from __future__ import annotations

import hashlib
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sepify.io.atomic import temp_files_of

BIG = """
import torch
from torch import nn


def build():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 8 * 8, 16384)
    ).eval()
"""
ARGV = ["convert", "big.py:build", "--input-shape", "1,3,8,8", "--weights", "w.pt", "--rank", "1", "-o", "out.pt", "-q"]


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    (tmp_path / "big.py").write_text(BIG)
    namespace: dict[str, object] = {}
    exec(BIG, namespace)  # noqa: S102 - our own source above
    torch.save(namespace["build"]().state_dict(), tmp_path / "w.pt")  # type: ignore[operator]
    return tmp_path


def start(folder: Path, *extra: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "sepify", *ARGV, *extra], cwd=folder, stderr=subprocess.PIPE, env=env
    )


def wait_for_temp_file(proc: subprocess.Popen[bytes], target: Path, timeout: float = 120) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if temp_files_of(target):
            return True
        time.sleep(0.002)
    return False


def assert_absent_or_complete(out: Path) -> None:
    if out.exists():
        model = torch.load(out, weights_only=False)
        assert model(torch.randn(1, 3, 8, 8)).shape == (1, 16384)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow  # a subprocess killed while it writes
def test_sigterm_while_writing_leaves_no_temp_and_no_partial_output(folder: Path) -> None:
    weights = digest(folder / "w.pt")
    proc = start(folder)
    assert wait_for_temp_file(proc, folder / "out.pt"), proc.communicate()[1].decode()
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode in (143, 0, -signal.SIGTERM), stderr.decode()  # 0 / -15: the commit won the race
    assert "Traceback" not in stderr.decode()
    assert_absent_or_complete(folder / "out.pt")
    assert not temp_files_of(folder / "out.pt")
    assert digest(folder / "w.pt") == weights


@pytest.mark.slow
def test_sigkill_while_writing_then_the_next_run_sweeps(folder: Path) -> None:
    proc = start(folder)
    assert wait_for_temp_file(proc, folder / "out.pt"), proc.communicate()[1].decode()
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=120)
    assert_absent_or_complete(folder / "out.pt")
    assert temp_files_of(folder / "out.pt")  # nothing can clean up after SIGKILL ...
    again = start(folder, "--force")
    _, stderr = again.communicate(timeout=300)
    assert again.returncode == 0, stderr.decode()
    assert not temp_files_of(folder / "out.pt")  # ... but the next run for that path does
    assert_absent_or_complete(folder / "out.pt")


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL, signal.SIGINT])
def test_signals_at_random_moments(folder: Path, sig: signal.Signals) -> None:
    weights = digest(folder / "w.pt")
    rng = random.Random(int(sig))
    for _ in range(3):
        proc = start(folder, "--force")
        time.sleep(rng.uniform(0.0, 6.0))
        proc.send_signal(sig)
        proc.wait(timeout=300)
        assert_absent_or_complete(folder / "out.pt")
        assert digest(folder / "w.pt") == weights
        if sig != signal.SIGKILL:
            assert not temp_files_of(folder / "out.pt")


@pytest.mark.slow
def test_two_concurrent_runs_without_force_one_wins_cleanly(folder: Path) -> None:
    procs = [start(folder), start(folder)]
    results = [(p.wait(timeout=300), p.communicate()[1].decode()) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 1], results
    loser = next(err for code, err in results if code == 1).strip()
    assert loser.startswith("error: out.pt: already exists; pass --force") or (
        "was created by someone else while sepify worked (another run?); it was left as it is" in loser
    ), loser
    assert_absent_or_complete(folder / "out.pt")
    assert (folder / "out.pt").exists() and not temp_files_of(folder / "out.pt")
