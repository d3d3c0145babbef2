"""int8 deployment files: the runtime's own quantizer, ranges from the user's samples, measured against float32."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn
from typer.testing import CliRunner

import sepify
from sepify.cli import app


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 24, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(24, 10),
    ).eval()  # fmt: skip


@pytest.fixture(scope="module")
def slim() -> tuple[nn.Module, nn.Module, torch.Tensor]:
    net = _net()
    x = torch.randn(64, 3, 12, 12, generator=torch.Generator().manual_seed(1))
    return net, sepify.convert(net, x[:2], rank=3).model, x


def test_onnx_int8_has_per_channel_int8_weights_and_stays_near_float32(slim, tmp_path: Path) -> None:
    net, model, x = slim
    files = sepify.save(model, tmp_path / "slim.onnx", x[:2], int8=x)
    graph = onnx.load(str(files[-1])).graph
    kinds = {n.op_type for n in graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= kinds
    weights = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    int8_kernels = [w for w in weights.values() if w.dtype == np.int8 and w.ndim == 4]
    assert int8_kernels, "no conv kernel was stored as int8"
    scales = [n for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] in weights
              and weights[n.input[0]].ndim == 4]  # fmt: skip
    assert all(weights[n.input[1]].size == weights[n.input[0]].shape[0] for n in scales)  # one scale per channel
    error = _error_against(model, files[-1], "onnx", x)
    assert 1e-5 < error < 0.05  # quantized, and close


def _error_against(model: nn.Module, path: Path, fmt: str, x: torch.Tensor) -> float:
    """The relative output error of the file at ``path`` against ``model`` on ``x``."""
    from sepify.runtime.check import runtime_runner

    run = runtime_runner(path, fmt, exact=False)[0]
    with torch.no_grad():
        want = model(x)
    return float((run([x])[0] - want).norm() / want.norm())


def test_activation_ranges_come_from_the_samples_given(slim, tmp_path: Path) -> None:
    """Ranges fitted to inputs 30x larger than the ones the file then sees waste most of the int8 steps."""
    from sepify.runtime.export import onnx_bytes
    from sepify.runtime.quantize import int8_onnx

    _, model, x = slim
    graph = onnx_bytes(model, (x[:2],))
    (tmp_path / "matched.onnx").write_bytes(int8_onnx(graph, [(x,)]))
    (tmp_path / "wide.onnx").write_bytes(int8_onnx(graph, [(30 * x,)]))
    good, bad = (_error_against(model, tmp_path / name, "onnx", x) for name in ("matched.onnx", "wide.onnx"))
    assert bad > 3 * good


@pytest.mark.slow  # NNCF's statistics collection: a few seconds
def test_openvino_int8_runs_near_float32(slim, tmp_path: Path) -> None:
    net, model, x = slim
    files = sepify.save(model, tmp_path / "slim.xml", x[:2], int8=x)
    assert [f.suffix for f in files] == [".bin", ".xml"]
    assert "FakeQuantize" in files[-1].read_text() or "fake_quantize" in files[-1].read_text().lower()
    assert _error_against(model, files[-1], "openvino", x) < 0.05


@pytest.mark.parametrize("runtime", ["onnxruntime", pytest.param("openvino", marks=pytest.mark.slow)])  # NNCF: 7 s
def test_the_four_ways_to_ship_are_measured_against_the_original(slim, runtime: str) -> None:
    net, model, x = slim
    found = sepify.compare_deployments(net, model, x, int8=x, runtime=runtime, timed_inputs=x[:4], reps=3)
    assert [o.name for o in found.options] == ["original float32", "original int8", "slim float32", "slim int8"]
    assert (found.runtime, found.batch, found.samples) == (runtime, 4, 64)
    by_name = {o.name: o for o in found.options}
    assert by_name["original float32"].time_ratio == 1.0 and all(o.time_ratio > 0 for o in found.options)
    # OpenVINO runs "float32" files in its default precision, bf16 on CPUs that have it: a deployment's numbers
    rounding = 1e-4 if runtime == "onnxruntime" else 1e-2
    assert by_name["original float32"].error is not None and by_name["original float32"].error < rounding
    with torch.no_grad():  # the slim float32 row is the slim model's own error: the runtime adds (almost) nothing
        want = float((model(x) - net(x)).norm() / net(x).norm())
    assert by_name["slim float32"].error == pytest.approx(want, abs=rounding)
    for precision in ("original", "slim"):  # int8 adds a little to each
        added = by_name[f"{precision} int8"].error - by_name[f"{precision} float32"].error  # type: ignore[operator]
        assert abs(added) < 0.05
    assert by_name["original int8"].error > 2 * by_name["original float32"].error  # and is really int8
    text = found.to_text("slim int8")
    assert "slim int8 (written)" in text and f"in {runtime} (" in text


def test_synthetic_ranges_need_batchnorm(tmp_path: Path) -> None:
    plain = nn.Sequential(nn.Conv2d(3, 8, 3)).eval()
    with pytest.raises(sepify.ConfigError, match="no.*BatchNorm|has none"):
        sepify.save(plain, tmp_path / "m.onnx", torch.randn(1, 3, 8, 8), int8="synthetic")
    assert not (tmp_path / "m.onnx").exists()
    files = sepify.save(_net(), tmp_path / "bn.onnx", torch.randn(1, 3, 8, 8), int8="synthetic")
    assert b"QuantizeLinear" in files[-1].read_bytes()


@pytest.mark.parametrize("fmt", ["pt", "pt2", "safetensors"])
def test_int8_in_a_format_without_a_quantizer_is_refused_before_any_work(fmt: str, tmp_path: Path) -> None:
    torch.save(_net(), tmp_path / "m.pt")
    out = tmp_path / f"slim.{'sep.pt' if fmt == 'pt' else fmt}"
    result = CliRunner().invoke(app, ["convert", str(tmp_path / "m.pt"), "--trust-pickle", "--input-shape",
                                      "1,3,8,8", "--int8", "--format", fmt, "-o", str(out)])  # fmt: skip
    assert result.exit_code == 2  # a usage error, as for every option the library refuses
    message = " ".join(result.output.split())
    assert f"int8 is written as ONNX or OpenVINO IR only, not {fmt}; choose --format onnx or --format openvino" in (
        message
    )
    assert "Traceback" not in result.output and "analysing" not in result.output
    assert not out.exists()


def test_a_missing_quantizer_is_named_with_its_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    from sepify.runtime import quantize, sessions

    monkeypatch.setattr(sessions, "installed", lambda module: module != "nncf")
    quantize.check_int8("onnx")
    with pytest.raises(sepify.ConfigError, match=r"int8 openvino needs nncf's quantizer.*pip install nncf"):
        quantize.check_int8("openvino")


def test_better_than_means_clearly_faster_and_no_farther_from_the_original() -> None:
    from sepify.pipeline.deploy import Deployment, Deployments

    options = (
        Deployment("original", "float32", 1.0, 0.0, 1.0),
        Deployment("original", "int8", 0.44, 0.010, 1.0),  # faster and closer than the slim int8
        Deployment("slim", "float32", 0.69, 0.181, 1.0),  # faster but within timing noise (0.69 > 0.95 x 0.70)
        Deployment("slim", "int8", 0.70, 0.182, 0.97),
    )
    found = Deployments("onnxruntime", 2, 1, 32, options)
    assert [o.name for o in found.better_than("slim int8")] == ["original int8"]
    assert found.better_than("original int8") == []  # nothing faster
    # everything is faster than the original in float32, and farther from it
    assert found.better_than("original float32") == []
    lines = found.to_text("slim int8").splitlines()
    assert lines[0] == "in onnxruntime (2 threads, batch 1; errors against the original on 32 samples):"
    assert lines[-1].split() == ["slim", "int8", "(written)", "0.700x", "0.182", "97%"]


def test_a_quantizer_failure_is_one_sentence_and_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import onnxruntime.quantization as q

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("Unsupported op Foo in node /x\nmore detail")

    monkeypatch.setattr(q, "quantize_static", broken)
    torch.save(_net(), tmp_path / "m.pt")
    out = tmp_path / "slim.onnx"
    result = CliRunner().invoke(app, ["convert", str(tmp_path / "m.pt"), "--trust-pickle", "--input-shape", "1,3,8,8",
                                      "--rank", "2", "--int8", "-o", str(out)])  # fmt: skip
    assert result.exit_code == 1, result.output
    message = " ".join(result.output.split())
    assert f"error: {out}: onnxruntime could not quantize the model to int8 (RuntimeError: Unsupported op Foo in node /x); " \
           "write it without --int8" in message  # fmt: skip
    assert "Traceback" not in result.output and "more detail" not in result.output
    assert not out.exists() and list(tmp_path.iterdir()) == [tmp_path / "m.pt"]  # no temp file left either


@pytest.mark.slow  # every option timed in onnxruntime: about 10 s
def test_a_timed_calibrated_audit_measures_the_bar_int8_sets(slim) -> None:
    net, _, x = slim
    timing = sepify.Timing(backend="onnxruntime", threads=1)
    report = sepify.audit(net, x[:2], calibration=x, timing=timing)
    assert report.int8_latency_ratio is not None and report.int8_latency_ratio > 0
    note = next(n for n in report.notes if n.startswith("the original as int8 runs at "))
    assert f"{report.int8_latency_ratio:.3f}x its float32 time in onnxruntime" in note
    again = sepify.AuditReport.from_dict(report.to_dict())
    assert again.int8_latency_ratio == report.int8_latency_ratio  # `sepify plan` reads it back
    # no calibration data, no ranges to quantize with: no bar, and no note
    bare = sepify.audit(net, x[:2], timing=timing)
    assert bare.int8_latency_ratio is None and not any("as int8" in n for n in bare.notes)
