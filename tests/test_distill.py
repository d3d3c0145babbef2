"""sepify.distill: streaming data, exact resume, torchrun equivalence, one engine with convert's."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset, IterableDataset

import sepify
from sepify import Distill


def teacher() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3)).eval()


DATA = torch.randn(96, 3, 12, 12, generator=torch.Generator().manual_seed(1))


def student_of(model: nn.Module) -> nn.Module:
    return sepify.convert(model, DATA[:1], rank=1).model


class Labelled(Dataset[tuple[torch.Tensor, int]]):
    """A map-style dataset of (input, label): the label is ignored."""

    def __len__(self) -> int:
        return len(DATA)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return DATA[i], i % 3


class Stream(IterableDataset[torch.Tensor]):
    """An iterable that never materialises: samples made on the fly."""

    def __iter__(self):  # type: ignore[no-untyped-def]
        gen = torch.Generator().manual_seed(2)
        while True:
            yield torch.randn(3, 12, 12, generator=gen)


@pytest.mark.parametrize("data", [DATA, Labelled(), Stream()], ids=["tensor", "dataset", "iterable"])
def test_distillation_lowers_the_loss_on_any_kind_of_data(data: object, tmp_path: Path) -> None:
    t = teacher()
    before = {k: v.clone() for k, v in t.state_dict().items()}
    log = tmp_path / "log.jsonl"
    options = Distill(steps=40, batch_size=16, lr=1e-2, eval_every=10)
    result = sepify.distill(student_of(t), t, data, options, log=log)
    assert result.history[-1].loss < 0.75 * result.history[0].loss
    assert all(torch.equal(v, before[k]) for k, v in t.state_dict().items())  # the teacher never changes
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert [entry["step"] for entry in lines] == [1, 10, 20, 30, 40]
    assert set(lines[0]) == {"step", "loss", "lr", "samples_per_s", "eval_loss"}


def test_the_relative_loss_is_the_outputs_squared_error_over_their_mean_square() -> None:
    t = teacher()
    student = student_of(t)
    x = DATA[:16]
    with torch.no_grad():
        want = float(((student(x) - t(x)) ** 2).mean() / (t(x) ** 2).mean())
    result = sepify.distill(student, t, x, Distill(steps=1, batch_size=16, lr=1e-12, warmup=1))
    assert result.history[0].loss == pytest.approx(want, rel=1e-5)  # global batch 0 is all 16 samples


def test_an_interrupted_run_resumes_to_the_same_weights(tmp_path: Path) -> None:
    t = teacher()
    options = Distill(steps=24, batch_size=16, lr=1e-2, checkpoint_every=5, checkpoint_dir=tmp_path, patience=None)
    whole = sepify.distill(student_of(t), t, DATA, options, eval_data=DATA[:32]).model.state_dict()

    def interrupt(step: str, done: int, total: int) -> None:
        if done == 13:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        sepify.distill(student_of(t), t, DATA, options, eval_data=DATA[:32], progress=interrupt)
    resumed = sepify.distill(student_of(t), t, DATA, options, eval_data=DATA[:32], resume=True)
    assert resumed.resumed_from == 13
    for k, v in resumed.model.state_dict().items():
        torch.testing.assert_close(v, whole[k], rtol=1e-6, atol=1e-7)
    other = Distill(steps=24, batch_size=16, lr=0.1, checkpoint_every=5, checkpoint_dir=tmp_path)
    with pytest.raises(sepify.ConfigError, match=r"the checkpoint is from another run"):
        sepify.distill(student_of(t), t, DATA, other, resume=True)


def test_the_best_held_out_weights_are_kept_and_never_worse_than_the_start() -> None:
    t = teacher()
    student = student_of(t)
    start = {k: v.clone() for k, v in student.state_dict().items()}
    # a learning rate that only makes things worse: the starting weights are the best, and they are kept
    result = sepify.distill(student, t, DATA, Distill(steps=10, batch_size=16, lr=5.0, eval_every=2), eval_data=DATA)
    assert result.best_step == 0 and result.eval_after == result.eval_before
    assert all(torch.equal(v, start[k]) for k, v in result.model.state_dict().items())


def test_bad_input_is_a_sentence() -> None:
    t = teacher()
    other = nn.Sequential(nn.Conv2d(3, 5, 3)).eval()
    with pytest.raises(sepify.ModelError, match=r"^the student's outputs do not match the teacher's"):
        sepify.distill(student_of(t), other, DATA, Distill(steps=2, batch_size=8))
    with pytest.raises(sepify.CalibrationError, match=r"^the distillation data yields str samples \(sample \d\)"):
        sepify.distill(student_of(t), t, ["a", "b"], Distill(steps=2, batch_size=2))
    with pytest.raises(sepify.ConfigError, match=r"^batch_size 200 is larger than the 96 samples given$"):
        sepify.distill(student_of(t), t, DATA, Distill(steps=2, batch_size=200))
    with pytest.raises(sepify.ConfigError, match=r"^nothing to distill: the student has no converted layers"):
        sepify.distill(teacher(), t, DATA, Distill(steps=2, batch_size=8))
    with pytest.raises(sepify.ConfigError, match=r"^the student and the teacher are the same model"):
        sepify.distill(t, t, DATA, Distill(steps=2, batch_size=8))


TORCHRUN_SCRIPT = """
import sys, torch, sepify
import torch.distributed as dist
torch.set_num_threads(1)
torch.manual_seed(0)
teacher = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 3)).eval()
student = sepify.convert(teacher, torch.randn(1, 3, 12, 12), rank=1).model
data = torch.randn(128, 3, 12, 12, generator=torch.Generator().manual_seed(1))
options = sepify.Distill(steps=30, batch_size=16, lr=1e-2)
result = sepify.distill(student, teacher, data, options, log=sys.argv[2])
if not dist.is_initialized() or dist.get_rank() == 0:
    torch.save(result.model.state_dict(), sys.argv[1])
"""


@pytest.mark.slow
def test_two_processes_step_like_one_with_the_whole_batch(tmp_path: Path) -> None:
    script = tmp_path / "run.py"
    script.write_text(TORCHRUN_SCRIPT)
    one = subprocess.run([sys.executable, str(script), "one.pt", "one.jsonl"], cwd=tmp_path, capture_output=True)
    assert one.returncode == 0, one.stderr.decode()[-2000:]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    two = subprocess.run([*torchrun, str(script), "two.pt", "two.jsonl"], cwd=tmp_path, capture_output=True)
    assert two.returncode == 0, two.stderr.decode()[-2000:]
    a, b = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    for k in a:
        if a[k].is_floating_point():
            torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6)
    one_log = [json.loads(line)["loss"] for line in (tmp_path / "one.jsonl").read_text().splitlines()]
    two_log = [json.loads(line)["loss"] for line in (tmp_path / "two.jsonl").read_text().splitlines()]
    assert two_log == pytest.approx(one_log, rel=1e-4)  # rank 0 logs the global batch's loss, alone


def test_the_command_distills_checkpoints_and_resumes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from sepify.cli import app

    monkeypatch.chdir(tmp_path)
    (tmp_path / "nets.py").write_text(
        "import torch\n"
        "def teacher():\n"
        "    torch.manual_seed(0)\n"
        "    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 3)).eval()\n"
    )
    torch.save(DATA, tmp_path / "data.pt")
    runner = CliRunner()
    shape = ["--input-shape", "1,3,12,12"]
    assert (
        runner.invoke(app, ["convert", "nets.py:teacher", *shape, "--rank", "1", "-o", "slim.pt", "-q"]).exit_code == 0
    )
    argv = ["distill", "slim.pt", "--trust-pickle", "--teacher", "nets.py:teacher", "--data", "data.pt", *shape,
            "--steps", "12", "--batch-size", "16", "--lr", "0.01", "--checkpoint-dir", "ckpt", "--checkpoint-every", "4"]  # fmt: skip
    result = runner.invoke(app, [*argv, "-o", "whole.pt", "--log", "log.jsonl"])
    assert result.exit_code == 0, result.output
    assert "distilled 12 steps, global batch 16 on 1 process(es); final loss " in result.output
    assert (tmp_path / "ckpt" / "checkpoint.pt").is_file()  # the step-8 checkpoint
    resumed = runner.invoke(app, [*argv, "-o", "resumed.pt", "--resume"])  # from step 8 to 12
    assert resumed.exit_code == 0, resumed.output
    assert "resumed from step 8" in resumed.output
    a = torch.load(tmp_path / "whole.pt", weights_only=False).state_dict()
    b = torch.load(tmp_path / "resumed.pt", weights_only=False).state_dict()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-6, atol=1e-7)
    again = runner.invoke(app, [*argv, "-o", "whole.pt"])
    assert again.exit_code == 1 and "whole.pt: already exists; pass --force" in again.output
    bad = runner.invoke(app, [*argv[:5], "--data", "nowhere.npy", *argv[7:], "-o", "x.pt"])
    assert bad.exit_code == 1 and bad.output.strip().endswith(
        "nowhere.npy: no such file or folder; pass an image folder, a .pt/.npy file or 'random'"
    )


def test_feature_matching_augmentation_and_csv_log(tmp_path: Path) -> None:
    t = teacher()
    seen: list[torch.Tensor] = []

    def augment(x: torch.Tensor) -> torch.Tensor:
        seen.append(x)
        return x + 0.01 * torch.randn_like(x)

    log = tmp_path / "log.csv"
    base = {"steps": 30, "batch_size": 16, "lr": 1e-2, "eval_every": 10, "patience": None}
    result = sepify.distill(student_of(t), t, DATA, Distill(loss="feature", augment=augment, **base), log=log,
                            eval_data=DATA[:32])  # fmt: skip
    assert len(seen) == 30 and seen[0].shape == (16, 3, 12, 12)
    assert result.history[-1].loss < result.history[0].loss  # the feature loss falls
    lines = log.read_text().splitlines()
    assert lines[0] == "step,loss,lr,samples_per_s,eval_loss" and len(lines) == 1 + 4
    both = sepify.distill(student_of(t), t, DATA, Distill(loss="both", **base))
    out_only = sepify.distill(student_of(t), t, DATA, Distill(loss="mse", **base))
    assert both.history[0].loss > out_only.history[0].loss  # both adds the feature term to the same output loss
    with pytest.raises(
        sepify.ConfigError, match=r"^the distillation loss must be one of \('mse', 'kl', 'feature', 'both'\), got 'l1'$"
    ):
        Distill(loss="l1")


def test_convert_distills_with_the_same_engine() -> None:
    t = teacher()
    options = Distill(steps=20, batch_size=16, lr=1e-2, loss="both", patience=None)
    result = sepify.convert(t, DATA[:1], rank=1, calibration=DATA, distill=options)
    stages = {s.stage: s.output_error for s in result.report.fidelity}
    assert stages["distilled"] <= stages["refined"]  # kept only where it helped on held-out data
