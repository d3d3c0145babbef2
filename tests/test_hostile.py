"""A hostile user against the CLI and the API: every bad input is one sentence, nothing is lost or overwritten.

Each CLI case asserts the exit code, the whole error line (no traceback), that
every input file is byte-identical afterwards and that no output appeared.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from typer.testing import CliRunner

import sepify
from sepify.calibrate.data import calibration_batches
from sepify.cli import app
from sepify.errors import CalibrationError, OutputError, PlanError
from sepify.io.atomic import TEMP_MARK, atomic_path, temp_files_of
from sepify.io.datasets import load_calibration
from sepify.io.outputs import check_outputs

runner = CliRunner()
PROGRESS = re.compile(r"^(convert|audit|plan|distill): ")  # the plain progress lines of a command not in a terminal
B = ["convert", "tiny.py:build", "--input-shape", "2,3,16,16"]
TINY_SOURCE = """
import torch
from torch import nn


def build(num_classes=5):
    torch.manual_seed(0)
    convs = [nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2, padding=1)]
    convs += [nn.ReLU(), nn.Conv2d(16, 16, 1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU()]
    return nn.Sequential(*convs, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, num_classes)).eval()


def offline():
    raise RuntimeError("no network: could not download encoder weights")
"""


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(autouse=True)
def _folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A folder full of the files a hostile user would pass."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny.py").write_text(TINY_SOURCE)
    gen = np.random.default_rng(0)
    good = gen.standard_normal((8, 3, 16, 16)).astype("float32")
    np.save(tmp_path / "good.npy", good)
    nan = good.copy()
    nan[3, 0, 0, 0] = np.nan
    np.save(tmp_path / "nan.npy", nan)
    inf = good.copy()
    inf[1, 2, 3, 4] = -np.inf
    inf[5, 0, 0, 0] = np.inf
    np.save(tmp_path / "inf.npy", inf)
    np.save(tmp_path / "str.npy", np.array(["a", "b"]))
    np.save(tmp_path / "struct.npy", np.zeros(3, dtype=[("a", "f4"), ("b", "i4")]))
    np.save(tmp_path / "empty.npy", np.zeros((0, 3, 16, 16), "float32"))
    raw = (tmp_path / "good.npy").read_bytes()
    (tmp_path / "forged.npy").write_bytes(raw.replace(b"(8, 3, 16, 16)", b"(1000000000, 3, 16, 16)"))
    (tmp_path / "imgs").mkdir()
    from PIL import Image

    Image.fromarray((gen.random((20, 20, 3)) * 255).astype("uint8")).save(tmp_path / "imgs" / "a.png")
    import importlib.util

    spec = importlib.util.spec_from_file_location("tiny_hostile", tmp_path / "tiny.py")
    assert spec is not None and spec.loader is not None
    tiny = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tiny)
    torch.save(tiny.build().state_dict(), tmp_path / "w.pt")
    state = tiny.build().state_dict()
    state["0.weight"][0, 0, 0, 0] = float("nan")
    torch.save(state, tmp_path / "nan_w.pt")
    state = tiny.build().state_dict()
    state["1.running_var"][2] = float("inf")
    torch.save(state, tmp_path / "inf_buffer.pt")
    plan = {"format": "sepify.plan", "version": 1, "layers": {"0": {"rank": 1, "order": "dw-pw"}}}
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    (tmp_path / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    (tmp_path / "latin1.json").write_bytes(b'{"format": "sepify.plan\xe9"}')
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "cut.safetensors").write_bytes(b'\x10\x00\x00\x00\x00\x00\x00\x00{"a":')
    torch.save(torch.randn(4, 3, 16, 16).to(torch.complex64), tmp_path / "complex.pt")


class RunsCode:
    def __init__(self, fn: object, arg: str) -> None:
        self.fn, self.arg = fn, arg

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (self.fn, (self.arg,))


def _no_tracebacks_nothing_lost(tmp_path: Path, argv: list[str]) -> tuple[int, str]:
    before = {p: digest(p) for p in tmp_path.rglob("*") if p.is_file()}
    result = runner.invoke(app, argv)
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    after = {p for p in tmp_path.rglob("*") if p.is_file()}
    assert after == set(before), f"files appeared or vanished: {after ^ set(before)}"
    assert all(digest(p) == h for p, h in before.items())
    said = [line for line in result.output.splitlines() if not PROGRESS.match(line)]  # stderr is not a terminal here
    return result.exit_code, "\n".join(said).strip()


SENTENCES = [
    (
        [*B, "--calibration", "nan.npy"],
        "error: nan.npy: 1 value(s) are NaN or infinite, in 1 of 8 samples (first: sample 3); drop or clean those "
        "samples (with images: check that --std has no zeros)",
    ),
    (
        [*B, "--calibration", "inf.npy"],
        "error: inf.npy: 2 value(s) are NaN or infinite, in 2 of 8 samples (first: sample 1); drop or clean those "
        "samples (with images: check that --std has no zeros)",
    ),
    (
        [*B, "--calibration", "imgs", "--std", "0,0,0"],
        "error: --std must be positive and finite for every channel, got [0.0, 0.0, 0.0]",
    ),
    (
        [*B, "--weights", "nan_w.pt"],
        "error: parameter 0.weight holds 1 NaN or infinite value(s) of 216: the model is broken before any "
        "conversion; load intact weights (check the checkpoint, or how it was trained)",
    ),
    (
        [*B, "--weights", "inf_buffer.pt"],
        "error: buffer 1.running_var holds 1 NaN or infinite value(s) of 8: the model is broken before any "
        "conversion; load intact weights (check the checkpoint, or how it was trained)",
    ),
    (
        [*B, "-o", "w.pt", "--weights", "w.pt", "--force"],
        "error: w.pt: is also the --weights input; sepify never overwrites what it reads, so choose another -o path",
    ),
    (
        [*B, "-o", "good.npy", "--calibration", "good.npy", "--force"],
        "error: good.npy: is also the --calibration input; sepify never overwrites what it reads, so choose another "
        "-o path",
    ),
    (
        [*B, "-o", "plan.json", "--plan", "plan.json", "--force"],
        "error: plan.json: is also the --plan input; sepify never overwrites what it reads, so choose another -o path",
    ),
    (
        [*B, "-o", "x.pt", "--report", "./plan.json", "--plan", "plan.json"],
        "error: plan.json: is also the --plan input; sepify never overwrites what it reads, so choose another "
        "--report path",
    ),
    (
        [*B, "-o", "out.safetensors", "--format", "safetensors", "--report", "out.plan.json"],
        "error: out.plan.json: is both the plan (beside -o) and the --report output of this run; choose different "
        "paths",
    ),
    (
        [*B, "-o", "fifo", "--force"],
        "error: fifo: is not a regular file (a FIFO, device or socket), and sepify replaces only regular files; "
        "choose a file path",
    ),
    ([*B, "-o", ".", "--force"], "error: .: is a folder, and sepify replaces only regular files; choose a file path"),
    (
        [*B, "-o", "imgs", "--force"],
        "error: imgs: is a folder, and sepify replaces only regular files; choose a file path",
    ),
    (
        [*B, "-o", "nowhere/out.pt"],
        "error: nowhere/out.pt: its folder nowhere does not exist; create it or choose another -o path",
    ),
    (
        [*B, "-o", "good.npy/out.pt"],
        "error: good.npy/out.pt: good.npy is not a folder; choose another -o path",
    ),
    (
        [*B, "-o", "a" * 300 + ".pt"],
        f"error: {'a' * 300}.pt: the name is 303 bytes, longer than this filesystem allows (255); choose a shorter "
        "-o name",
    ),
    (
        [*B, "--kwargs", '{"num_classes": 10}', "--weights", "w.pt"],
        "error: w.pt: its tensors do not fit the model (2 of another shape (e.g. 11.weight: (5, 16) in the file, "
        "(10, 16) in the model)); pass weights saved from this architecture, or the --kwargs it was built with",
    ),
    (
        [*B, "--calibration", "str.npy"],
        "error: str.npy: holds <U1 values, not numbers; save a numeric array (e.g. float32) of samples",
    ),
    (
        [*B, "--calibration", "struct.npy"],
        "error: struct.npy: holds [('a', '<f4'), ('b', '<i4')] values, not numbers; save a numeric array (e.g. "
        "float32) of samples",
    ),
    (
        [*B, "--calibration", "forged.npy"],
        "error: forged.npy: is not a readable .npy array (mmap length is greater than file size); re-save it with "
        "numpy.save",
    ),
    ([*B, "--calibration", "empty.npy"], "error: empty.npy: holds no samples; pass at least one"),
    (
        [*B, "--calibration", "imgs", "--image-size", "0,0"],
        "error: images cannot be resized to 0x0; pass a positive --image-size H,W",
    ),
    (
        [*B, "--calibration", "imgs", "--image-size", "8,8,8"],
        "error: --image-size takes two numbers, H,W; got [8, 8, 8]",
    ),
    (
        [*B, "--calibration", "imgs", "--mean", "nan,0,0"],
        "error: --mean must be finite for every channel, got [nan, 0.0, 0.0]",
    ),
    (
        [*B, "--weights", "cut.safetensors"],
        "error: cut.safetensors: is a truncated safetensors file (its header runs past the end); re-save it",
    ),
    (
        [*B, "--calibration", "complex.pt"],
        "error: complex.pt: holds torch.complex64 values, not real numbers; save float samples",
    ),
    (
        [*B, "--plan", "deep.json"],
        "error: deep.json is nested too deeply to be a plan; regenerate it",
    ),
    (
        [*B, "--plan", "latin1.json"],
        "error: latin1.json: is not UTF-8 text, so not a plan; regenerate it with sepify audit",
    ),
    (
        ["convert", "tiny.py:offline", "--input-shape", "1,3,16,16"],
        "error: 'tiny.py:offline': building the model raised RuntimeError (no network: could not download encoder "
        "weights); pass --kwargs that avoid it (e.g. no pretrained-weight download offline) or fix the code it runs",
    ),
    (
        [*B, "--include", "nomatch*"],
        "warning: include pattern 'nomatch*' matches no conv of the model (its convs are named like '0', '3', '5')\n"
        "warning: no conv was converted (3 excluded, 1 pointwise); the model is unchanged\n"
        "error: no conv of tiny.py:build was converted (3 excluded, 1 pointwise), so nothing was written; change the "
        "selection, or pass --allow-unchanged to write the unchanged copy",
    ),
]


@pytest.mark.parametrize(("argv", "message"), SENTENCES, ids=[" ".join(a[4:])[:40] for a, _ in SENTENCES])
def test_bad_input_is_one_sentence_and_nothing_is_lost(tmp_path: Path, argv: list[str], message: str) -> None:
    code, output = _no_tracebacks_nothing_lost(tmp_path, argv)
    assert code == 1
    assert output.endswith(message), output


USAGE = [
    ([*B, "--calibration", "good.npy", "--calibration-samples", "-1"], "Invalid value for '--calibration-samples'"),
    (["convert", "tiny.py:build", "--input-shape", "1,3,100000,100000"], "the example inputs alone would take"),
    (["convert", "tiny.py:build", "--input-shape", "1,3,99999999999999999999,2"], "has a size of 2^31 or more"),
    (["convert", "tiny.py:build", "--input-shape", "0,3,16,16"], "is not a shape of positive sizes"),
    ([*B, "--device", "meta"], "'meta' holds no data to compute with; use one of cpu, cuda, mps, xpu"),
]


@pytest.mark.parametrize(("argv", "fragment"), USAGE, ids=[" ".join(a[2:])[:40] for a, _ in USAGE])
def test_bad_option_values_are_usage_errors(tmp_path: Path, argv: list[str], fragment: str) -> None:
    code, output = _no_tracebacks_nothing_lost(tmp_path, argv)
    assert code == 2
    assert fragment in " ".join(line.strip(" │") for line in output.splitlines()), output


@pytest.mark.parametrize(
    ("fn", "named"),
    [(exec, "builtins.exec"), (os.system, f"{os.system.__module__}.system"), (eval, "builtins.eval")],
)
def test_pickled_code_is_named_not_called_a_model(tmp_path: Path, fn: object, named: str) -> None:
    marker = tmp_path / "ran"
    torch.save(RunsCode(fn, f"open({str(marker)!r}, 'w')" if fn is not os.system else f"touch {marker}"), "evil.pt")
    code, output = _no_tracebacks_nothing_lost(tmp_path, ["convert", "evil.pt", "--input-shape", "1,3,16,16"])
    assert code == 1 and not marker.exists()
    assert output == (
        f"error: evil.pt: unpickling it would call {named}, which runs commands or code, not a model; do not load "
        "it unless you made it yourself (then --trust-pickle), or use an import spec such as "
        "torchvision.models:resnet18 with --weights FILE (no pickle)"
    )


def test_report_is_written_when_the_model_cannot_be(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fails(*args: object, **kwargs: object) -> None:
        raise RuntimeError("\x1b[1mexporter exploded\x1b[0m\nwith pages of context")

    monkeypatch.setattr(torch.onnx, "export", fails)
    pytest.importorskip("onnxscript")
    result = runner.invoke(app, [*B, "--format", "onnx", "-o", "m.onnx", "--report", "r.json", "-q"])
    assert result.exit_code == 1
    assert result.output.strip() == (
        "error: m.onnx: ONNX export failed (RuntimeError: exporter exploded); save as --format pt or safetensors "
        "instead (both keep every module as it is) (the conversion report was written to r.json)"
    )
    assert json.loads((tmp_path / "r.json").read_text())["format"] == "sepify.conversion-report"
    assert not (tmp_path / "m.onnx").exists() and not temp_files_of(tmp_path / "m.onnx")


# -- the library ------------------------------------------------------------------------------------------------


def net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1)).eval()


X = torch.randn(1, 3, 16, 16)


def test_non_finite_calibration_tensor_is_refused() -> None:
    data = torch.randn(16, 3, 16, 16)
    data[9, 1, 2, 3] = float("nan")
    with pytest.raises(
        CalibrationError,
        match=r"^calibration sample 9 holds NaN or infinite values \(1 in its batch\); they would poison",
    ):
        sepify.convert(net(), X, calibration=data, rank=1)
    batches = [torch.randn(4, 3, 16, 16), torch.full((4, 3, 16, 16), float("inf"))]
    with pytest.raises(
        CalibrationError, match=r"^calibration sample 4 holds NaN or infinite values \(3072 in its batch\)"
    ):
        calibration_batches(batches, n_args=1, limit=None, heldout_fraction=0.25)


def test_non_finite_weights_are_refused_before_any_work() -> None:
    model = net()
    with torch.no_grad():
        model[2].weight[0, 0, 0, 0] = float("inf")
    with pytest.raises(sepify.ModelError, match=r"^parameter 2.weight holds 1 NaN or infinite value\(s\) of 576"):
        sepify.convert(model, X, rank=1)
    with pytest.raises(sepify.ModelError, match=r"^parameter 2.weight holds"):
        sepify.audit(model, X)


def test_non_finite_original_outputs_are_refused() -> None:
    with pytest.raises(sepify.ModelError, match="the original model's outputs on the example inputs hold NaN"):
        sepify.convert(net(), torch.full((1, 3, 16, 16), float("nan")), rank=1)


def test_a_nan_stage_is_never_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    from sepify.calibrate import stages

    a = stages.FidelityStage("bn-refreshed", float("nan"), None, 8)
    b = stages.FidelityStage("refined", 0.1, None, 8)
    assert stages._worse(a, b) and not stages._worse(b, a)


def test_hooked_convs_are_skipped_not_silently_changed() -> None:
    model = net()
    model[0].register_forward_hook(lambda module, inputs, output: output * 2)
    model[2].register_forward_pre_hook(lambda module, inputs: (inputs[0] + 1,))
    with pytest.warns(sepify.SepifyWarning, match=r"^no conv was converted \(2 hooked\); the model is unchanged$"):
        result = sepify.convert(model, X, rank="full")
    assert [row.skip_reason for row in result.report.layers] == [sepify.SkipReason.HOOKED] * 2
    torch.testing.assert_close(result.model(X), model(X))


def test_a_model_that_cannot_be_copied_says_inplace() -> None:
    model = net()
    model.lock = threading.Lock()  # type: ignore[assignment]
    with pytest.raises(sepify.ModelError, match=r"cannot be deep-copied .*; pass inplace=True to convert the model"):
        sepify.convert(model, X, rank=1)
    result = sepify.convert(model, X, rank="full", inplace=True)
    assert len(result.report.converted) == 2 and result.report.output_error < 1e-5


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
def test_script_modules_are_refused() -> None:
    with pytest.raises(sepify.ModelError, match="^the model is a TorchScript RecursiveScriptModule: torch.fx"):
        sepify.convert(torch.jit.script(net()), X, rank=1)


class ReadsItsWeight(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv2d(3, 8, 3, padding=1)
        self.d = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.d(self.c(x) + F.conv2d(x, self.c.weight, padding=1))


def test_a_conv_whose_weight_is_read_directly_is_skipped() -> None:
    model = ReadsItsWeight().eval()
    result = sepify.convert(model, X, rank="full")
    assert [(r.name, r.skip_reason) for r in result.report.layers] == [
        ("c", sepify.SkipReason.PARAMS_READ),
        ("d", None),
    ]
    torch.testing.assert_close(result.model(X), model(X), rtol=1e-4, atol=1e-4)


class PatchEmbedding(nn.Module):
    """A hand-written ViT patch embedding: casts its input to the projection's dtype and reads its shape."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, 16, 4, stride=4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.proj.weight.dtype).to(self.proj.weight.device)
        channels = self.proj.weight.shape[0] + self.proj.weight.size(0) - self.proj.bias.size()[0]
        return self.proj(x).flatten(2).transpose(1, 2).reshape(x.shape[0], -1, channels)


def test_reading_a_convs_dtype_device_or_shape_does_not_block_it() -> None:
    model = PatchEmbedding().eval()
    x = torch.randn(2, 3, 16, 16)
    result = sepify.convert(model, x, rank="full")
    assert result.report.mode == "fx" and [r.name for r in result.report.converted] == ["proj"]
    torch.testing.assert_close(result.model(x.double().float()), model(x), rtol=1e-4, atol=1e-5)


def test_a_converted_model_failing_is_not_blamed_on_the_inputs() -> None:
    class ReadsAnAttribute(ReadsItsWeight):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if float(x.sum()) > -1e9:  # data-dependent: fx gives up, modules are swapped
                return self.d(self.c(x)) + len(self.c._reversed_padding_repeated_twice)  # pairs do not have it
            return x

    with pytest.raises(sepify.ModelError) as info:
        sepify.convert(ReadsAnAttribute().eval(), X, rank=1)
    assert str(info.value) == (
        "the converted model failed where the original ran on the same inputs (AttributeError: 'SeparableConv2d' "
        "object has no attribute '_reversed_padding_repeated_twice'); the forward probably uses a conv's attributes directly (e.g. "
        "its .weight): leave that conv out with exclude=[...]"
    )


def test_a_pair_answers_what_code_reads_from_its_conv() -> None:
    class Untraceable(ReadsItsWeight):  # reads self.c.weight in F.conv2d, in swap mode
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = x.to(self.c.weight.dtype)  # as Hugging Face's patch embeddings do
            return super().forward(x) if float(x.sum()) > -1e9 else x

    model = Untraceable().eval()
    result = sepify.convert(model, X, rank="full")
    assert result.report.mode == "swap" and len(result.report.converted) == 2
    torch.testing.assert_close(result.model(X), model(X), rtol=1e-4, atol=1e-4)
    pair, conv = result.model.c, model.c
    assert (pair.in_channels, pair.out_channels, pair.kernel_size) == (3, 8, (3, 3))
    assert (pair.stride, pair.padding, pair.dilation, pair.padding_mode) == ((1, 1), (1, 1), (1, 1), "zeros")
    torch.testing.assert_close(pair.weight, conv.weight, rtol=1e-5, atol=1e-6)  # the dense kernel it computes
    assert pair.bias is pair.last.bias and "weight" not in dict(pair.named_parameters())


def test_numpy_integer_ranks_are_ranks() -> None:
    report = sepify.convert(net(), X, rank=np.int64(2)).report
    assert [r.rank for r in report.layers] == [2, 2]


def test_converting_nothing_warns_and_names_why() -> None:
    with pytest.warns(sepify.SepifyWarning) as caught:
        sepify.convert(net(), X, select=sepify.Selection(include=["nomatch*"]), rank=1)
    assert [str(w.message) for w in caught] == [
        "include pattern 'nomatch*' matches no conv of the model (its convs are named like '0', '2')",
        "no conv was converted (2 excluded); the model is unchanged",
    ]


def test_load_converted_errors_name_the_right_file_and_leave_the_model(tmp_path: Path) -> None:
    pytest.importorskip("safetensors")
    with pytest.raises(sepify.ModelLoadError, match=r"nope.safetensors: no such weights file"):
        sepify.load_converted(net(), tmp_path / "nope.safetensors")
    converted = sepify.convert(net(), X, rank=2).model
    out = tmp_path / "m.safetensors"
    from sepify.io.save import save_model

    written = save_model(converted, out, "safetensors", example_args=(X,), plan_json=_plan_json({"0": 2, "2": 2}))
    assert written == [tmp_path / "m.plan.json", out]
    (tmp_path / "m.plan.json").unlink()  # the plan travels inside the weights file
    rebuilt = sepify.load_converted(net(), out)
    torch.testing.assert_close(rebuilt(X), converted(X))
    fresh = net()
    state = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(sepify.ModelLoadError, match=r"its tensors do not fit the model \(.* of another shape"):
        sepify.load_converted(fresh, out, plan=sepify.Plan.from_json(_plan_json({"0": 1, "2": 2})))
    assert all(type(m) is not sepify.SeparableConv2d for m in fresh.modules())  # left as it was
    assert all(torch.equal(v, state[k]) for k, v in fresh.state_dict().items())
    with pytest.raises(PlanError, match=r"the plan gives '0' rank 1000000000000, above its exact rank 8 for dw-pw"):
        sepify.load_converted(net(), out, plan=sepify.Plan.from_json(_plan_json({"0": 10**12})))


def _plan_json(ranks: dict[str, int]) -> str:
    layers = {name: {"rank": r, "order": "dw-pw"} for name, r in ranks.items()}
    return json.dumps({"format": "sepify.plan", "version": 1, "layers": layers})


def test_plan_from_a_path_string_reads_the_file(tmp_path: Path) -> None:
    with pytest.raises(
        PlanError, match=r"^x.json: cannot read the plan \(No such file or directory\); check the path$"
    ):
        sepify.Plan.from_json("x.json")


# -- property-based: any plan JSON, any .npy header, any shape text, any output name ------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)
layer_specs = st.dictionaries(
    st.sampled_from(["rank", "order", "layout", "x"]),
    st.one_of(st.integers(-3, 10**20), st.sampled_from(["dw-pw", "pw-dw", "pw-dw-pw", "grouped", "rank-major"])),
    max_size=4,
)
plans = st.fixed_dictionaries(
    {"format": st.sampled_from(["sepify.plan", "other"]), "version": st.sampled_from([1, 2, "1"])},
    optional={
        "layers": st.dictionaries(st.text(max_size=6), layer_specs | json_values, max_size=3),
        "meta": json_values,
    },
)


@given(data=plans | json_values)
@settings(max_examples=200, deadline=None)
def test_any_json_is_a_plan_or_a_plan_error(data: object) -> None:
    try:
        plan = sepify.Plan.from_json_text(json.dumps(data))
    except PlanError as e:
        assert str(e) and "\n" not in str(e)
    else:
        assert sepify.Plan.from_json(plan.to_json()) == plan  # whatever is accepted round-trips


@given(
    shape=st.lists(st.integers(0, 5), min_size=0, max_size=5),
    dtype=st.sampled_from(["float32", "float16", "int8", "uint8", "bool", "complex64", "U2", "O"]),
    truncate=st.integers(0, 64),
)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_any_npy_file_is_samples_or_a_calibration_error(
    tmp_path: Path, shape: list[int], dtype: str, truncate: int
) -> None:
    path = tmp_path / "c.npy"
    array = np.zeros(shape, dtype=dtype) if dtype != "O" else np.empty(shape, dtype=object)
    try:
        np.save(path, array, allow_pickle=True)
    except ValueError:
        return
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) - truncate] if truncate else raw)
    try:
        data = load_calibration(path, (3, 2, 2) if len(shape) != 2 else (shape[1] if shape[1:] else 1,))
    except CalibrationError as e:
        assert str(e).startswith(f"{path}: ") and "\n" not in str(e)
    else:
        assert data.is_floating_point() and bool(torch.isfinite(data).all()) and data.shape[0] >= 1


@given(text=st.text(alphabet="0123456789,x:-. abfloat", max_size=24))
@settings(max_examples=200, deadline=None)
def test_any_input_shape_text_is_a_shape_or_a_usage_error(text: str) -> None:
    import typer

    from sepify.cli.inputs import parse_input_shape

    try:
        shape, dtype = parse_input_shape(text)
    except typer.BadParameter as e:
        assert str(e) and "\n" not in str(e)
    else:
        assert shape and all(1 <= d < 2**31 for d in shape) and isinstance(dtype, torch.dtype)


@given(name=st.text(st.characters(blacklist_categories=["Cs"], blacklist_characters="/\x00"), min_size=1, max_size=300))
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_any_output_name_is_checked_before_the_work(tmp_path: Path, name: str) -> None:
    target = tmp_path / "out" / name
    target.parent.mkdir(exist_ok=True)
    try:
        check_outputs({"-o": target}, {"model": tmp_path / "tiny.py"}, force=False)
    except OutputError as e:
        assert "\n" not in str(e)
        return
    with atomic_path(target, overwrite=False) as tmp:  # what passed the check can be written
        tmp.write_bytes(b"ok")
    assert target.read_bytes() == b"ok" and not temp_files_of(target)
    target.unlink()


def test_a_name_too_long_for_the_filesystem_is_a_sentence_even_beside_existing_inputs(tmp_path: Path) -> None:
    # Found by the test above: comparing the output with an existing input stat()ed the name first, and stat()
    # on a name past NAME_MAX raises instead of answering "no such file".
    model = tmp_path / "tiny.py"
    model.write_text("")
    target = tmp_path / ("\u0130" * 200 + ".pt")  # 200 two-byte characters: 403 bytes
    with pytest.raises(OutputError, match=r"the name is 403 bytes, longer than this filesystem allows \(255\)"):
        check_outputs({"-o": target}, {"model": model}, force=False)


# -- atomic writes: exclusive commits, temp files, sweeping ---------------------------------------------------------


def test_a_second_writer_without_force_loses_cleanly(tmp_path: Path) -> None:
    target = tmp_path / "m.pt"
    second = atomic_path(target, overwrite=False)
    tmp = second.__enter__()  # the second writer starts first and is still working ...
    tmp.write_bytes(b"second")
    assert tmp.name.startswith(".m.pt.") and tmp.name.endswith(f"{TEMP_MARK}.pt")
    with atomic_path(target, overwrite=False) as first:  # ... when the first one finishes
        first.write_bytes(b"first")
    with pytest.raises(OutputError, match=r"m.pt: was created by someone else while sepify worked \(another run\?\)"):
        second.__exit__(None, None, None)
    assert target.read_bytes() == b"first"
    assert not temp_files_of(target)
    with atomic_path(target) as forced:  # overwrite=True (--force) replaces it
        forced.write_bytes(b"forced")
    assert target.read_bytes() == b"forced"


def test_stale_temp_files_of_dead_writers_are_swept(tmp_path: Path) -> None:
    target = tmp_path / ("x" * 250 + ".pt")  # names near NAME_MAX still get a temp name that fits
    dead = tmp_path / f".{target.name[:100]}.999999999-abcd1234{TEMP_MARK}.pt"
    alive = tmp_path / f".{target.name[:100]}.{os.getpid()}-abcd1234{TEMP_MARK}.pt"
    other = tmp_path / f".other.pt.999999999-abcd1234{TEMP_MARK}.pt"
    longer = tmp_path / f".{target.name[:100]}.x.999999999-abcd1234{TEMP_MARK}.pt"  # not ours: another target's
    for p in (dead, alive, other, longer):
        p.write_bytes(b"partial")
    with atomic_path(target) as tmp:
        tmp.write_bytes(b"done")
        assert len(tmp.name) < 160
    assert not dead.exists() and alive.exists() and other.exists() and longer.exists()
    assert target.read_bytes() == b"done"


def test_io_faults_become_one_sentence(tmp_path: Path) -> None:
    with pytest.raises(OutputError) as info, atomic_path(tmp_path / "m.pt") as tmp:
        raise OSError(28, "No space left on device", str(tmp))
    assert str(info.value) == (
        f"{tmp_path / 'm.pt'}: writing failed (No space left on device); nothing was replaced, so free some space "
        "or write elsewhere"
    )
    assert not (tmp_path / "m.pt").exists() and not temp_files_of(tmp_path / "m.pt")


def test_a_decompression_bomb_is_a_sentence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from PIL import Image

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # the 20x20 photo is then "4x over the limit"
    with pytest.raises(CalibrationError) as info:
        load_calibration(tmp_path / "imgs", (3, 16, 16))
    message = str(info.value)
    assert message.startswith(f"{tmp_path / 'imgs' / 'a.png'}: cannot be read as an image (Image size (400 pixels)")
    assert message.endswith("; remove or replace it")


class Wrapper:
    """Like ultralytics' YOLO: not an nn.Module, holds one, and its own train() would start a training run."""

    def __init__(self) -> None:
        self.model = net()

    def train(self, *args: object) -> None:
        raise AssertionError("the wrapper's train() must never be called")


def test_a_wrapper_gets_a_sentence_naming_its_module(tmp_path: Path) -> None:
    with pytest.raises(sepify.ConfigError, match=r"^model must be a torch.nn.Module, got Wrapper; it holds one at "
                       r"\.model: pass that module$"):  # fmt: skip
        sepify.convert(Wrapper(), X, rank=1)  # type: ignore[arg-type]
    (tmp_path / "wrapped.py").write_text(
        "import torch\n"
        "class Wrapper:\n"
        "    def __init__(self):\n"
        "        torch.manual_seed(0)\n"
        "        self.model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Conv2d(8, 8, 3)).eval()\n"
        "    def train(self, *args):\n"
        "        raise AssertionError('never')\n"
    )
    argv = ["convert", "wrapped.py:Wrapper", "--input-shape", "1,3,16,16", "--rank", "1", "-q"]
    code, output = _no_tracebacks_nothing_lost(tmp_path, argv)
    assert code == 1 and output == (
        "error: 'wrapped.py:Wrapper': returned a Wrapper, not an nn.Module; it holds one at .model: pass --attr model"
    )
    result = runner.invoke(app, [*argv, "--attr", "model"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "Wrapper.sep.pt").is_file()
