"""The sepify command line: every MODEL form, output format, error sentence and safety rule."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import sepify
from sepify.cli import app
from sepify.io.load import load_model
from sepify.runtime import timing as runtime_timing

runner = CliRunner()
SMALL = ["--input-shape", "1,3,32,32"]
SPEC = "torchvision.models:resnet18"  # one real architecture, end to end
TINY = "tiny.py:build"  # a four-conv model for everything else: the CLI is under test, not the model
TINY_INPUT = ["--input-shape", "1,3,16,16"]
TINY_SOURCE = """
import torch
from torch import nn


def build(num_classes=5):
    torch.manual_seed(0)
    convs = [nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2, padding=1)]
    convs += [nn.ReLU(), nn.Conv2d(16, 16, 1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU()]
    return nn.Sequential(*convs, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, num_classes)).eval()
"""
SAFE_ROUTE = "use an import spec such as torchvision.models:resnet18 with --weights FILE (no pickle)"

torchvision = pytest.importorskip("torchvision")


PROGRESS = re.compile(r"^(convert|audit|plan|distill): ")


def run(*args: str | Path) -> object:
    return runner.invoke(app, [str(a) for a in args])


def flat(result: object) -> str:
    """The output as one line: usage errors come in a box, wrapped."""
    return " ".join(line.strip(" │") for line in result.output.splitlines())  # type: ignore[attr-defined]


def said(result: object) -> str:
    """What a command said, without its progress lines (under CliRunner stderr is not a terminal, so progress is
    a plain line per phase)."""
    lines = [line for line in result.output.splitlines() if not PROGRESS.match(line)]  # type: ignore[attr-defined]
    return "\n".join(lines)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class MakesMarker:
    """Unpickling this creates a file: the stand-in for malicious code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (str(self.marker), "w"))


@pytest.fixture
def resnet() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18().eval()


@pytest.fixture
def pickled(tmp_path: Path, resnet: nn.Module) -> Path:
    path = tmp_path / "resnet.pt"
    torch.save(resnet, path)
    return path


@pytest.fixture
def weights(tmp_path: Path, resnet: nn.Module) -> Path:
    path = tmp_path / "resnet_weights.pt"
    torch.save(resnet.state_dict(), path)
    return path


@pytest.fixture(autouse=True)
def _cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny.py").write_text(TINY_SOURCE)


@pytest.fixture
def tiny_weights(tmp_path: Path) -> Path:
    """Other weights than ``build()`` makes, so that loading them is visible."""
    model = load_model(TINY).model
    torch.manual_seed(1)
    for p in model.parameters():
        nn.init.normal_(p, std=0.2)
    path = tmp_path / "tiny_weights.pt"
    torch.save(model.state_dict(), path)
    return path


# -- happy paths ---------------------------------------------------------------


def test_import_spec_with_weights_writes_default_output(tmp_path: Path, weights: Path, resnet: nn.Module) -> None:
    result = run("convert", SPEC, "--weights", weights, *SMALL, "--rank", "full")
    assert result.exit_code == 0, result.output
    out = tmp_path / "resnet18.sep.pt"
    assert f"wrote {out}" in result.output
    assert "converted 17 of 20 convs (mode: fx; inputs: (1, 3, 32, 32) float32)" in result.output
    converted = torch.load(out, weights_only=False)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(converted(x), resnet(x), rtol=1e-4, atol=1e-4)
    assert oct(out.stat().st_mode & 0o777) != oct(0o600)


def test_pickled_model_with_trust(pickled: Path) -> None:
    before = digest(pickled)
    result = run("convert", pickled, "--trust-pickle", *SMALL, "-q", "--max-mac-ratio", "0.9")
    assert result.exit_code == 0, result.output
    out, plan = pickled.parent / "resnet.sep.pt", pickled.parent / "resnet.sep.plan.json"
    # --quiet: what was written (the plan made for the budget, then the model) and one summary line
    assert result.output.splitlines()[:2] == [f"wrote {plan}", f"wrote {out}"]
    assert re.match(r"converted \d+ of 20 convs; MACs 0\.[0-8]\d*x", result.output.splitlines()[2])
    assert len(result.output.splitlines()) == 3 and out.is_file()
    assert sepify.Plan.from_json(plan).meta["mac_ratio"] <= 0.9
    assert digest(pickled) == before  # the input is never modified


def test_report_files_by_extension(tmp_path: Path) -> None:
    result = run("convert", TINY, *TINY_INPUT, "-q", "--report", "r.json")
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["format"] == "sepify.conversion-report" and len(data["layers"]) == 4
    assert run("convert", TINY, *TINY_INPUT, "-q", "--force", "--report", "r.csv").exit_code == 0
    assert (tmp_path / "r.csv").read_text().startswith("name,converted,skip_reason,")
    assert run("convert", TINY, *TINY_INPUT, "-q", "--force", "--report", "r.md").exit_code == 0
    assert (tmp_path / "r.md").read_text().startswith("| layer | kind | status |")


def test_kwargs_and_several_outputs(tmp_path: Path) -> None:
    result = run("convert", TINY, "--kwargs", '{"num_classes": 10}', *TINY_INPUT, "-o", "small.pt", "-q")
    assert result.exit_code == 0, result.output
    assert torch.load(tmp_path / "small.pt", weights_only=False)(torch.randn(1, 3, 16, 16)).shape == (1, 10)


def test_python_file_import_spec(tmp_path: Path) -> None:
    (tmp_path / "mymodel.py").write_text(
        "import torch\n"
        "def build(width=8):\n"
        "    return torch.nn.Sequential(torch.nn.Conv2d(3, width, 3), torch.nn.ReLU(), torch.nn.Conv2d(width, 4, 3))\n"
    )
    result = run("convert", "mymodel.py:build", "--kwargs", '{"width": 16}', *SMALL, "--rank", "full")
    assert result.exit_code == 0, result.output
    assert "converted 2 of 2 convs" in result.output
    assert (tmp_path / "build.sep.pt").is_file()


def test_integer_and_several_inputs(tmp_path: Path) -> None:
    (tmp_path / "two.py").write_text(
        "import torch\n"
        "class Two(torch.nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.emb = torch.nn.Embedding(10, 4)\n"
        "        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)\n"
        "    def forward(self, x, ids):\n"
        "        return self.conv(x).mean((2, 3)) + self.emb(ids).sum(1)\n"
    )
    result = run("convert", "two.py:Two", "--input-shape", "2,3,8,8", "--input-shape", "2,5:int64", "-q")
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("fmt", ["pt", "pt2", "onnx", "openvino", "safetensors"])
def test_every_output_format_round_trips(
    tmp_path: Path, tiny_weights: Path, fmt: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip({"onnx": "onnxruntime", "openvino": "openvino", "safetensors": "safetensors"}.get(fmt, "torch"))
    # ONNX: both exporters tie on this tiny model, so the default (dynamo) export is written, whatever the noise
    monkeypatch.setattr(runtime_timing, "interleaved_medians", lambda fns, reps, **k: [1.0] * len(fns))
    out = tmp_path / f"model.{'xml' if fmt == 'openvino' else fmt}"
    argv = ("--weights", tiny_weights, *TINY_INPUT, "--rank", "2", "--format", fmt, "-o", out)
    result = run("convert", TINY, *argv)
    assert result.exit_code == 0, result.output
    if fmt in ("pt2", "onnx", "openvino"):  # the written file was run in its runtime, at two batch sizes
        runtime = {"pt2": "torch.export", "onnx": "onnxruntime", "openvino": "OpenVINO"}[fmt]
        assert re.search(rf"checked {re.escape(str(out))}: {runtime} reproduces PyTorch's outputs to \S+ \(batches 1, 2\)",
                         " ".join(result.output.split())), result.output  # fmt: skip
    original = load_model(TINY, weights=tiny_weights).model
    reference = sepify.convert(original, torch.randn(1, 3, 16, 16), rank=2).model
    x = torch.randn(1, 3, 16, 16)
    three = torch.randn(3, 3, 16, 16)  # the batch axis is dynamic although the example had batch 1
    expected = reference(x).detach()
    if fmt == "pt":
        got = torch.load(out, weights_only=False)(x)
    elif fmt == "pt2":
        program = torch.export.load(out).module()
        got = program(x)
        torch.testing.assert_close(program(three), reference(three).detach(), rtol=1e-4, atol=1e-4)
    elif fmt == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(out))
        got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
        batch = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: three.numpy()})[0])
        torch.testing.assert_close(batch, reference(three).detach(), rtol=1e-4, atol=1e-4)
        import onnx

        # torch.onnx folds each BatchNorm into the conv before it (a pair's last conv): nothing left to fold
        assert "BatchNormalization" not in {node.op_type for node in onnx.load(out).graph.node}
    elif fmt == "openvino":
        import openvino as ov

        assert out.with_suffix(".bin").is_file()
        compiled = ov.Core().compile_model(str(out), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
        got = torch.from_numpy(compiled([x.numpy()])[compiled.outputs[0]])
        batch = torch.from_numpy(compiled([three.numpy()])[compiled.outputs[0]])
        torch.testing.assert_close(batch, reference(three).detach(), rtol=1e-4, atol=1e-4)
    else:
        assert (tmp_path / "model.plan.json").is_file()
        got = sepify.load_converted(load_model(TINY).model, out)(x)
    torch.testing.assert_close(got.detach(), expected, rtol=1e-4, atol=1e-4)


def test_a_written_file_that_cannot_be_run_back_is_a_warning(
    tmp_path: Path, tiny_weights: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*_: object) -> None:
        raise RuntimeError("no kernel for op Foo")

    monkeypatch.setattr("sepify.runtime.check.check_export", broken)
    out = tmp_path / "model.pt2"
    result = run("convert", TINY, "--weights", tiny_weights, *TINY_INPUT, "--format", "pt2", "-o", out)
    assert result.exit_code == 0 and out.is_file()
    assert "was written but could not be run back to check it (RuntimeError: no kernel for op Foo)" in " ".join(
        result.output.split()
    )


def test_openvino_output_paths_are_checked_before_any_work(tmp_path: Path, tiny_weights: Path) -> None:
    pytest.importorskip("openvino")
    argv = ("--weights", tiny_weights, *TINY_INPUT, "--format", "openvino")
    result = run("convert", TINY, *argv, "-o", tmp_path / "model.onnx")
    assert result.exit_code == 1
    assert "OpenVINO IR is an .xml file with a .bin beside it; name the output <name>.xml" in result.output
    (tmp_path / "model.bin").write_bytes(b"old weights")
    result = run("convert", TINY, *argv, "-o", tmp_path / "model.xml")
    assert result.exit_code == 1 and "exists" in result.output and "--force" in result.output, result.output
    assert (tmp_path / "model.bin").read_bytes() == b"old weights" and not (tmp_path / "model.xml").exists()


def test_version_and_help() -> None:
    result = run("--version")
    assert result.exit_code == 0 and result.output.startswith(f"sepify {sepify.__version__} (torch ")
    result = run("convert", "--help")
    assert result.exit_code == 0
    assert "--trust-pickle" in result.output and "--input-shape" in result.output


def test_entry_point_and_module_run_in_a_subprocess(tmp_path: Path) -> None:
    for argv in (["sepify", "--version"], [sys.executable, "-m", "sepify", "--version"]):
        proc = subprocess.run(argv, capture_output=True, text=True, cwd=tmp_path, check=False)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.startswith("sepify ")
    proc = subprocess.run(
        ["sepify", "convert", "missing.pt"], capture_output=True, text=True, cwd=tmp_path, check=False
    )
    assert proc.returncode == 1
    assert proc.stderr.strip() == "error: missing.pt: no such file; check the path of the model"
    assert "Traceback" not in proc.stderr


# -- refusals ------------------------------------------------------------------


def test_existing_output_needs_force(tmp_path: Path) -> None:
    (tmp_path / "build.sep.pt").write_bytes(b"keep me")
    result = run("convert", TINY, *TINY_INPUT, "-q")
    assert result.exit_code == 1
    assert f"{tmp_path / 'build.sep.pt'}: already exists; pass --force to overwrite it" in result.output
    assert (tmp_path / "build.sep.pt").read_bytes() == b"keep me"
    assert run("convert", TINY, *TINY_INPUT, "-q", "--force").exit_code == 0
    assert (tmp_path / "build.sep.pt").read_bytes() != b"keep me"


def test_input_is_never_the_output(pickled: Path) -> None:
    before = digest(pickled)
    result = run("convert", pickled, "--trust-pickle", *SMALL, "-o", pickled, "--force", "-q")
    assert result.exit_code == 1
    assert (
        result.output
        == f"error: {pickled}: is also the model input; sepify never overwrites what it reads, so choose another -o path\n"
    )
    assert digest(pickled) == before


def test_pickle_without_trust_is_refused(pickled: Path) -> None:
    result = run("convert", pickled, *SMALL)
    assert result.exit_code == 1
    assert said(result) == (
        f"error: {pickled}: holds a pickled object (torchvision.models.resnet.BasicBlock, "
        "torchvision.models.resnet.ResNet), and loading it runs code from the file; re-run with --trust-pickle "
        f"if you trust its source, or {SAFE_ROUTE}"
    )


def test_malicious_pickle_never_runs_without_trust(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save(MakesMarker(marker), evil)
    assert not marker.exists()
    for argv in (
        ["convert", evil, *SMALL],
        ["audit", evil, *SMALL],
        ["convert", SPEC, "--weights", evil, *SMALL],
    ):
        result = run(*argv)
        assert result.exit_code == 1, result.output
        assert not marker.exists(), f"{argv[0]} ran code from the pickle"


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda p: None, "{p}: no such file; check the path of the model"),
        (lambda p: p.write_bytes(b""), "{p}: the file is empty; re-save the model"),
        (
            lambda p: p.write_text("hello"),
            "{p}: is not a PyTorch model file (no torch.save, torch.export or "
            "TorchScript archive inside); pass a model saved with torch.save(model), or " + SAFE_ROUTE,
        ),
        (lambda p: p.mkdir(), "{p}: is a directory, not a model file; pass the file itself"),
    ],
    ids=["missing", "empty", "not-torch", "directory"],
)
def test_bad_model_files(tmp_path: Path, setup: object, message: str) -> None:
    path = tmp_path / "model.pt"
    setup(path)  # type: ignore[operator]
    result = run("convert", path, *SMALL)
    assert result.exit_code == 1
    assert said(result) == "error: " + message.format(p=path)
    assert "Traceback" not in result.output


def test_truncated_file(tmp_path: Path, pickled: Path) -> None:
    cut = tmp_path / "cut.pt"
    cut.write_bytes(pickled.read_bytes()[:10_000])
    result = run("convert", cut, "--trust-pickle", *SMALL)
    assert result.exit_code == 1
    assert (
        said(result) == f"error: {cut}: is truncated or corrupt (an incomplete zip archive); re-save or re-download it"
    )


@pytest.mark.slow  # builds torchvision's classifiers on the meta device to find the architecture: seconds
def test_state_dict_without_architecture(weights: Path, tmp_path: Path) -> None:
    result = run("convert", weights, *SMALL)
    assert result.exit_code == 1
    assert said(result) == (
        f"error: {weights}: holds a state_dict (122 tensors) but no architecture; pass an import spec that builds "
        f"the model and this file as weights, e.g. sepify convert torchvision.models:resnet18 --weights {weights}"
    )
    # the hint is built from what the file holds: another architecture, another class count
    other = tmp_path / "mobile.pt"
    torch.save(torchvision.models.mobilenet_v2(num_classes=7).state_dict(), other)
    assert said(run("convert", other, *SMALL)).endswith(
        f"e.g. sepify convert torchvision.models:mobilenet_v2 --kwargs '{{\"num_classes\": 7}}' --weights {other}"
    )
    torch.save({"a.weight": torch.zeros(3, 3)}, tmp_path / "mine.pt")
    assert "e.g. sepify convert package.module:build_model --weights" in said(run("convert", tmp_path / "mine.pt"))


def test_torchscript_is_explained(tmp_path: Path) -> None:
    path = tmp_path / "scripted.pt"
    with pytest.warns(FutureWarning):
        torch.jit.save(torch.jit.script(nn.Sequential(nn.Conv2d(3, 4, 3))), path)
    result = run("convert", path, *SMALL)
    assert result.exit_code == 1
    assert "is a TorchScript archive; torch.fx cannot trace TorchScript graphs" in result.output
    assert SAFE_ROUTE in result.output


def test_pt2_needs_trust(tmp_path: Path) -> None:
    path = tmp_path / "m.pt2"
    net = nn.Sequential(nn.Conv2d(3, 4, 3)).eval()
    torch.export.save(torch.export.export(net, (torch.randn(1, 3, 8, 8),)), path)
    result = run("convert", path, "--input-shape", "1,3,8,8")
    assert result.exit_code == 1
    assert "is a torch.export archive, and torch.export.load unpickles it fully" in result.output
    assert "--trust-pickle" in result.output


def test_wrong_input_shape(tmp_path: Path) -> None:
    result = run("convert", TINY, "--input-shape", "1,5,16,16")
    assert result.exit_code == 1
    assert said(result).startswith("error: the model (Sequential) failed on example inputs (1, 5, 16, 16) float32: ")
    assert not (tmp_path / "build.sep.pt").exists()


def test_weights_that_do_not_fit(tmp_path: Path, weights: Path) -> None:
    result = run("convert", "torchvision.models:resnet34", "--weights", weights, *SMALL)
    assert result.exit_code == 1
    assert f"{weights}: its tensors do not fit the model (" in result.output


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["--rank", "zero"], "error: rank must be a positive integer, 'full' or 'auto', got 'zero'"),
        (["--input-shape", "1,3,a"], "'1,3,a' is not a shape; write it like 1,3,224,224"),
        (["--input-shape", "1,3:complex"], "unknown dtype 'complex'"),
        (["--order", "sideways"], "'sideways' is not one of 'dw-pw', 'pw-dw', 'pw-dw-pw', 'auto'"),
        (["--kwargs", "{oops"], "not valid JSON"),
    ],
)
def test_usage_errors_exit_2(argv: list[str], fragment: str) -> None:
    result = run("convert", TINY, *argv)
    assert result.exit_code == 2
    flat = " ".join(result.output.replace("│", " ").split())  # typer draws usage errors in a box
    assert fragment in flat


def test_import_spec_errors() -> None:
    result = run("convert", "no_such_package_xyz:build", *SMALL)
    assert result.exit_code == 1
    assert "'no_such_package_xyz:build': cannot import no_such_package_xyz" in result.output
    result = run("convert", "torchvision.models:no_such_model", *SMALL)
    assert result.exit_code == 1
    assert "torchvision.models has no attribute 'no_such_model'; check the name after the colon" in result.output


def test_debug_shows_the_traceback() -> None:
    result = runner.invoke(app, ["convert", "missing.pt", "--debug"])
    assert result.exit_code == 1
    assert isinstance(result.exception, sepify.SepifyError)


def test_environment_debug_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SEPIFY_DEBUG", "1")
    result = runner.invoke(app, ["convert", "missing.pt"])
    assert isinstance(result.exception, sepify.ModelLoadError)
    assert result.exit_code == 1 and "error:" not in result.output  # re-raised, not turned into a sentence


# -- audit ---------------------------------------------------------------------


def test_audit_plan_out_then_convert_with_plan(tmp_path: Path) -> None:
    result = run("audit", TINY, *TINY_INPUT, "--max-mac-ratio", "0.7", "--plan-out", "plan.json", "-q")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()  # -q: the plan's one line and what was written
    assert len(lines) == 2 and lines[0].startswith("plan: ") and lines[1] == "wrote plan.json"
    plan = sepify.Plan.from_json(tmp_path / "plan.json")
    assert plan.meta["mac_ratio"] <= 0.7
    result = run("convert", TINY, *TINY_INPUT, "--plan", "plan.json", "--report", "r.json", "-q")
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["totals"]["macs_after"] <= 0.7 * data["totals"]["macs_before"]
    assert {row["name"] for row in data["layers"] if row["converted"]} == set(plan.layers)


def test_audit_json_format_parses() -> None:
    result = run("audit", TINY, *TINY_INPUT, "--format", "json", "--max-error", "0.2")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)  # stdout holds the JSON alone (progress goes to stderr)
    assert data["format"] == "sepify.audit-report" and data["plan"]["format"] == "sepify.plan"
    assert len(data["layers"]) == 4


def test_an_unreachable_budget_is_refused_before_anything_is_measured() -> None:
    result = run("audit", TINY, *TINY_INPUT, "--max-mac-ratio", "0.05")
    assert result.exit_code == 1
    assert "measuring" not in result.output and "candidates" not in result.output  # nothing was measured
    assert said(result) == (
        "error: no plan reaches MACs <= 0.05x the original: converting every candidate at its cheapest option "
        "reaches 0.095x at best; relax the budget to at least 0.095"
    )
    converting = run("convert", TINY, *TINY_INPUT, "--max-mac-ratio", "0.05", "-o", "x.pt")
    assert converting.exit_code == 1 and said(converting) == said(result) and not Path("x.pt").exists()


def test_audit_budgets_are_exclusive() -> None:
    result = run("audit", TINY, *TINY_INPUT, "--max-mac-ratio", "0.5", "--max-error", "0.1")
    assert result.exit_code == 2
    assert "--max-mac-ratio and --max-error were both given; pass one budget" in flat(result)


def test_convert_rank_auto_needs_tolerance() -> None:
    result = run("convert", TINY, *TINY_INPUT, "--rank", "auto")
    assert result.exit_code == 2
    assert "--rank auto needs it: the largest weight error per layer" in flat(result)
    assert "loading" not in result.output  # refused before any work
    result = run("convert", TINY, *TINY_INPUT, "--rank", "auto", "--tolerance", "0.5", "-q")
    assert result.exit_code == 0, result.output


def test_pt2_with_trust_converts_and_reexports(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3)).eval()
    path = tmp_path / "m.pt2"
    x = torch.randn(1, 3, 8, 8)
    torch.export.save(torch.export.export(net, (x,)), path)
    before = digest(path)
    result = run("convert", path, "--trust-pickle", "--input-shape", "1,3,8,8", "--rank", "full", "-q")
    assert result.exit_code == 0, result.output
    assert digest(path) == before
    reloaded = torch.export.load(tmp_path / "m.sep.pt2").module()
    torch.testing.assert_close(reloaded(x), net(x), rtol=1e-4, atol=1e-5)


# -- calibration -----------------------------------------------------------------


def test_convert_with_calibration_file_reports_fidelity(tmp_path: Path) -> None:
    np = pytest.importorskip("numpy")
    np.save(tmp_path / "cal.npy", np.random.default_rng(0).standard_normal((12, 3, 16, 16)).astype("float32"))
    argv = ("--calibration", "cal.npy", "--distill-steps", "3", "--report", "r.json")
    result = run("convert", TINY, *TINY_INPUT, *argv)
    assert result.exit_code == 0, result.output
    assert "held-out calibration (2 samples), init: output error" in result.output
    assert "held-out calibration (2 samples), refined: output error" in result.output
    stages = [s["stage"] for s in json.loads((tmp_path / "r.json").read_text())["fidelity"]]
    assert stages[0] == "init" and stages[1] == "refined" and stages[-1] == "distilled"


def test_random_calibration_warns() -> None:
    result = run("convert", TINY, *TINY_INPUT, "--calibration", "random", "--calibration-samples", "6", "-o", "r.pt")
    assert result.exit_code == 0, result.output
    assert "warning: calibrating on random noise; fidelity on real inputs will be worse" in result.output


def test_bad_calibration_is_one_sentence_and_writes_nothing(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    result = run("convert", TINY, *TINY_INPUT, "--calibration", "empty")
    assert result.exit_code == 1
    assert result.output.strip() == "error: empty: contains no images (.jpg, .jpeg, .png, .bmp, ...); add some"
    assert not (tmp_path / "build.sep.pt").exists()
    result = run("convert", TINY, *TINY_INPUT, "--distill-steps", "5")
    assert result.exit_code == 2


def test_builtin_digits_example_converts_with_refinement(tmp_path: Path) -> None:
    pytest.importorskip("sklearn")
    calibration = ("--calibration", "random", "--calibration-samples", "64")
    result = run("convert", "sepify.zoo:digits_cnn", "--input-shape", "1,1,16,16", *calibration, "-q")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "digits_cnn.sep.pt").is_file()


def test_synthetic_calibration_from_the_command_line(tmp_path: Path) -> None:
    pytest.importorskip("sklearn")
    args = ("sepify.zoo:digits_cnn", "--input-shape", "1,1,16,16", "--calibration", "synthetic")
    result = run("convert", *args, "--calibration-samples", "16", "--report", "r.json", "-q")
    assert result.exit_code == 0, result.output
    notes = json.loads((tmp_path / "r.json").read_text())["notes"]
    assert notes[0].startswith("planned for predicted output error <= 0.1: ")  # the default budget
    assert notes[1].startswith("calibrated on 16 synthetic inputs matched to the model's 3 BatchNorm layers'")
    assert not (tmp_path / "synthetic").exists()


def test_audit_with_calibration_plans_for_the_refinement(tmp_path: Path) -> None:
    pytest.importorskip("sklearn")
    from sepify.zoo import digits_data

    x_train, _, _, _ = digits_data()
    torch.save(x_train[:128].clone(), tmp_path / "digits.pt")
    args = ("sepify.zoo:digits_cnn", "--input-shape", "1,1,16,16")
    result = run("audit", *args, "--calibration", "digits.pt", "--max-mac-ratio", "0.2", "--plan-out", "p.json", "-q")
    assert result.exit_code == 0, result.output
    plan = sepify.Plan.from_json(tmp_path / "p.json")
    assert plan.meta["mac_ratio"] <= 0.2
    result = run("convert", *args, "--plan", "p.json", "--calibration", "digits.pt", "--report", "r.json", "-q")
    assert result.exit_code == 0, result.output
    stages = {s["stage"]: s["output_error"] for s in json.loads((tmp_path / "r.json").read_text())["fidelity"]}
    assert stages["refined"] < stages["init"]


def test_tune_layout_flag(tmp_path: Path) -> None:
    result = run("convert", TINY, *TINY_INPUT, "--rank", "2", "--order", "pw-dw", "--tune-layout", "-q")
    assert result.exit_code == 0, result.output
    model = torch.load(tmp_path / "build.sep.pt", weights_only=False)
    layouts = {m.layout for m in model.modules() if isinstance(m, sepify.SeparableConv2d)}
    assert layouts <= {"grouped", "rank-major"} and layouts


def test_skip_slower_flag_reports_times_and_converts_only_faster_pairs(tmp_path: Path) -> None:
    argv = ("--rank", "2", "--skip-slower", "--report", "r.json", "--allow-unchanged")  # every pair may lose
    result = run("convert", TINY, *TINY_INPUT, *argv)
    assert result.exit_code == 0, result.output
    assert "realisation" in result.output and "timed convs:" in result.output
    rows = json.loads((tmp_path / "r.json").read_text())["layers"]
    timed = [r for r in rows if r["latency_before"] is not None]
    assert len(timed) == 3  # the three 3x3 convs (the 1x1 conv has nothing to split)
    for row in timed:
        assert (row["latency_after"] < row["latency_before"]) == row["converted"]
        assert row["converted"] or row["skip_reason"] == "slower"


FAR = """
import torch
from torch import nn


def build():
    torch.manual_seed(0)  # its output is the feature map itself: rank 1 of random 3x3 kernels is far from it
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1)).eval()
"""


def test_a_far_model_is_flagged_and_strict_writes_nothing(tmp_path: Path) -> None:
    (tmp_path / "far.py").write_text(FAR)
    argv = ("convert", "far.py:build", *TINY_INPUT, "--rank", "1", "--report", "r.json")
    result = run(*argv)
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "r.json").read_text())["verification"]
    assert report["output_error"] > 0.3  # rank 1 on random weights: far
    assert f"warning: the converted model is far from the original on the example inputs (output error " \
           f"{report['output_error']:.3g}" in flat(result)  # fmt: skip
    for extra in (("--strict",), ("--max-output-error", "0.2")):
        (tmp_path / "build.sep.pt").unlink()
        refused = run(*argv, "--force", *extra)
        assert refused.exit_code == 1, refused.output
        assert "so nothing was written" in flat(refused)
        assert not (tmp_path / "build.sep.pt").exists()
        assert run(*argv, "--force", "-q").exit_code == 0
    assert run(*argv, "--force", "--max-output-error", "0.99").exit_code == 0


def test_a_calibrated_model_is_judged_on_held_out_samples_not_on_random_examples(tmp_path: Path) -> None:
    """--input-shape makes random example inputs; with --calibration the real held-out samples say how far it is."""
    np.save(tmp_path / "data.npy", np.random.default_rng(0).standard_normal((64, 3, 16, 16)).astype("float32"))
    (tmp_path / "far.py").write_text(FAR)
    result = run("convert", "far.py:build", *TINY_INPUT, "--rank", "1", "--no-refine", "--calibration", "data.npy",
                 "--report", "r.json")  # fmt: skip
    assert result.exit_code == 0, result.output
    stages = json.loads((tmp_path / "r.json").read_text())["fidelity"]
    last = stages[-1]
    assert last["output_error"] > 0.3
    assert f"far from the original on {last['samples']} held-out calibration samples (output error " \
           f"{last['output_error']:.3g}" in flat(result)  # fmt: skip
    refused = run("convert", "far.py:build", *TINY_INPUT, "--rank", "1", "--no-refine", "--calibration", "data.npy",
                  "--force", "--max-output-error", "0.2")  # fmt: skip
    assert refused.exit_code == 1
    assert f"output error on {last['samples']} held-out calibration samples, {last['output_error']:.3g}, is above " \
           "--max-output-error 0.2, so nothing was written" in flat(refused)  # fmt: skip


@pytest.mark.slow  # every option timed in onnxruntime, twice
def test_naming_a_latency_backend_times_there(tmp_path: Path) -> None:
    """`--latency-backend onnxruntime` alone is a request to time in onnxruntime, not a setting for later."""
    argv = ("--rank", "2", "--report", "r.json", "--force", "-q")
    for backend, timed in (("eager", False), ("onnxruntime", True)):
        result = run("convert", TINY, *TINY_INPUT, *argv, "--latency-backend", backend)
        assert result.exit_code == 0, result.output
        report = json.loads((tmp_path / "r.json").read_text())
        assert (report["latency"]["ratio"] is not None) == timed
        assert any(r["latency_before"] is not None for r in report["layers"]) == timed
    result = run("audit", TINY, *TINY_INPUT, "--latency-backend", "onnxruntime", "--json")
    assert result.exit_code == 0, result.output
    assert "onnxruntime" in result.output


def test_memory_format_channels_last(tmp_path: Path) -> None:
    argv = ("--rank", "2", "--order", "pw-dw", "--memory-format", "channels_last", "-q")
    result = run("convert", TINY, *TINY_INPUT, *argv)
    assert result.exit_code == 0, result.output
    model = torch.load(tmp_path / "build.sep.pt", weights_only=False)
    weight = model.get_submodule("7.conv_dw").weight  # (16, 2, 3, 3): the layout is visible
    assert weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()
    assert run("convert", TINY, *TINY_INPUT, "--memory-format", "nhwc", "--force").exit_code == 2


def test_unknown_report_format_fails_before_any_work(tmp_path: Path) -> None:
    result = run("convert", TINY, *TINY_INPUT, "--report", "r.txt")
    assert result.exit_code == 1
    assert result.output.strip() == "error: r.txt: unknown report format '.txt'; use .json, .csv or .md"
    assert not (tmp_path / "build.sep.pt").exists()


def test_help_does_not_import_torch() -> None:
    """`sepify --help` and `sepify convert --help` stay fast: torch (seconds to import) loads only for real work."""
    code = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from sepify.cli import app\n"
        "for argv in (['--help'], ['convert', '--help'], ['audit', '--help']):\n"
        "    assert CliRunner().invoke(app, argv).exit_code == 0\n"
        "print(sorted(m for m in ('torch', 'numpy', 'sepify.pipeline.convert') if m in sys.modules))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == "[]", proc.stderr


def test_terminal_views_fit_100_columns_and_json_is_alone_on_stdout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "100")
    (tmp_path / "long.py").write_text(
        "import torch\n"
        "def build():\n"
        "    torch.manual_seed(0)\n"
        "    inner = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.Conv2d(8, 8, 1))\n"
        "    outer = torch.nn.Sequential()\n"
        "    outer.add_module('a_very_long_module_name_that_goes_on_and_on_' * 3, inner)\n"
        "    return outer.eval()\n"
    )
    result = run("convert", "long.py:build", "--input-shape", "1,3,8,8", "--rank", "2", "-o", "a.pt")
    assert result.exit_code == 0, result.output
    assert max(len(line) for line in result.stdout.splitlines()) <= 100  # stderr: one unwrapped sentence a line
    assert "skipped 1 conv: 1 pointwise (a_very_long…on_and_on_.1) (--all lists them)" in result.output
    row = next(line for line in result.output.splitlines() if "3->8 3x3" in line)
    assert row.startswith("a_very_long_module_n…at_goes_on_and_on_.0  3->8 3x3     2 dw-pw  13.82K -> 6.53K")
    wide = run("convert", "long.py:build", "--input-shape", "1,3,8,8", "--rank", "2", "-o", "a.pt", "--force", "--wide")
    assert "a_very_long_module_name_that_goes_on_and_on_" * 3 + ".1" in wide.output  # --wide: names whole
    result = run("convert", "long.py:build", "--input-shape", "1,3,8,8", "-o", "b.pt", "--json", "--rank", "2")
    assert result.exit_code == 0
    data = json.loads(result.stdout)
    assert data["format"] == "sepify.conversion-report" and len(data["layers"]) == 2
    result = run("audit", "long.py:build", "--input-shape", "1,3,8,8", "--json", "--max-mac-ratio", "0.9")
    assert json.loads(result.stdout)["plan"]["format"] == "sepify.plan"


@pytest.mark.parametrize("command", ["convert", "audit", "plan", "distill"])
def test_the_first_help_screen_fits_80_by_24(command: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Usage, the options most users need and an example, on one screen; every option behind --help-all."""
    monkeypatch.setenv("COLUMNS", "80")
    result = run(command, "-h")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert max(len(line) for line in lines) <= 80
    first = "\n".join(lines[:24])
    assert f"Usage: sepify {command}" in first and "--help-all" in first
    assert ("e.g. sepify" in first) or ("Examples" in first and f"sepify {command}" in first.split("Examples")[-1])
    every = run(command, "--help-all")
    assert "Advanced" in every.output and len(every.output.splitlines()) > len(lines)


def test_the_top_level_help_takes_h_too() -> None:
    result = run("-h")
    assert result.exit_code == 0 and "Commands" in result.output and "plan" in result.output


def test_tables_fit_the_terminal_and_a_redirected_run_says_what_it_does(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "80")
    result = run("convert", TINY, *TINY_INPUT, "--max-mac-ratio", "0.7", "-o", "slim.pt")
    assert result.exit_code == 0, result.output
    assert max(len(line) for line in result.stdout.splitlines()) <= 80
    assert "layer" in result.stdout and "MACs" in result.stdout  # the table, with its columns that matter
    # stderr is not a terminal under CliRunner: a plain line per phase (at most every 10 s within one)
    progress = [line for line in result.stderr.splitlines() if line.startswith("convert: ")]
    assert progress[:2] == [f"convert: loading {TINY}", "convert: analysing the model"]
    assert any(line.startswith("convert: measuring layer output errors ") for line in progress)
    assert sepify.Plan.from_json(tmp_path / "slim.plan.json").meta["mac_ratio"] <= 0.7
    quiet = run("convert", TINY, *TINY_INPUT, "--max-mac-ratio", "0.7", "-o", "slim.pt", "--force", "-q")
    assert not [line for line in quiet.stderr.splitlines() if line.startswith("convert: ")]  # -q silences it
