"""Timing-driven choices: pair layouts in plans, per-layer latency in convert, skipping slower pairs.

Timings are noise, so tests that need a particular outcome replace
:func:`sepify.runtime.timing.time_pair` where convert and audit call it with a
stub that reports chosen numbers; the real timer is exercised where any
outcome is a valid answer.
"""

from __future__ import annotations

import copy
import importlib
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import sepify
from sepify import SkipReason
from sepify.core.modules import SeparableConv2d
from sepify.runtime.timing import PairTiming, time_pair


@pytest.fixture
def net() -> nn.Module:
    torch.manual_seed(0)
    body = [nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1, stride=2), nn.ReLU()]
    head = [nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10)]
    return nn.Sequential(*body, *head).eval()


@pytest.fixture
def x() -> torch.Tensor:
    return torch.randn(2, 3, 16, 16)


def _stub_timing(monkeypatch: pytest.MonkeyPatch, pair_s: dict[str, float], layout: str = "grouped") -> list[tuple]:
    """Make every ``time_pair`` report ``pair_s[order]`` seconds for the pair and 1.0 for the conv."""
    calls: list[tuple] = []

    def fake(
        pair: SeparableConv2d, input_shape: tuple[int, ...], reps: int = 7, against: nn.Module | None = None, **_: Any
    ) -> PairTiming:
        calls.append((pair.order, pair.rank, tuple(input_shape)))
        chosen = layout if len(pair.layouts) > 1 else None  # the real contract: None where there is no choice
        return PairTiming(chosen, pair_s[pair.order], 1.0 if against is not None else None)

    for module in ("sepify.pipeline.layers", "sepify.pipeline.audit"):
        monkeypatch.setattr(importlib.import_module(module), "time_pair", fake)
    return calls


# -- the pair's layout ----------------------------------------------------------------


def test_layouts_exist_only_where_they_differ() -> None:
    conv = nn.Conv2d(6, 8, 3)
    for order in ("pw-dw", "dw-pw"):
        sep = SeparableConv2d.from_conv(conv, 2, order)
        assert sep.layouts == ("grouped", "rank-major") and sep.layout == sep.default_layout == "rank-major"
        assert SeparableConv2d.from_conv(conv, 1, order).layouts == ("grouped",)
        assert SeparableConv2d.from_conv(nn.Conv2d(6, 8, 3, groups=2), 2, order).layouts == ("grouped",)
    one_d = sepify.SeparableConv.from_conv(nn.Conv1d(6, 8, 9), 2, "pw-dw")  # 1-D: the two are close; grouped
    assert one_d.layouts == ("grouped", "rank-major") and one_d.layout == "grouped"
    sep = SeparableConv2d.from_conv(nn.Conv2d(6, 8, 3, groups=2), 2, "dw-pw")
    with pytest.raises(
        sepify.ConfigError, match=r"layout 'rank-major' is not available for a dw-pw pair at rank 2 with groups 2"
    ):
        sep.layout = "rank-major"


@pytest.mark.parametrize("order", ["dw-pw", "pw-dw"])
@pytest.mark.parametrize("rank", [3, "full"])
def test_every_layout_computes_the_same_function(order: str, rank: int | str) -> None:
    conv = nn.Conv2d(5, 7, (3, 2), stride=(2, 1), padding=1, dtype=torch.float64)
    sep = SeparableConv2d.from_conv(conv, rank, order)
    x = torch.randn(2, 5, 9, 8, dtype=torch.float64)
    with torch.no_grad():
        outputs = {}
        for layout in sep.layouts:
            sep.layout = layout
            outputs[layout] = sep(x)
        torch.testing.assert_close(outputs["grouped"], outputs["rank-major"], rtol=1e-12, atol=1e-12)
        if rank == "full":
            torch.testing.assert_close(outputs["grouped"], conv(x), rtol=1e-10, atol=1e-10)


def test_real_timer_finds_the_fastest_layout_and_never_changes_the_pair() -> None:
    conv = nn.Conv2d(8, 8, 3, padding=1)
    sep = SeparableConv2d.from_conv(conv, 3, "pw-dw")
    timing = time_pair(sep, (1, 8, 12, 12), reps=3, against=conv)
    assert timing.layout in sep.layouts and sep.layout == "rank-major"  # unchanged: the caller applies the choice
    assert timing.pair > 0 and timing.conv is not None and timing.conv > 0
    assert time_pair(sep, (1, 8, 12, 12), reps=3).conv is None


def test_a_layout_view_shares_the_parameters() -> None:
    sep = SeparableConv2d.from_conv(nn.Conv2d(6, 8, 3), 2, "pw-dw")
    view = sep.in_layout("grouped")
    assert view.layout == "grouped" and sep.layout == "rank-major"
    assert view.conv_dw.weight is sep.conv_dw.weight and view.conv_pw is sep.conv_pw


# -- plans carry the layout -----------------------------------------------------------------


def test_plan_json_keeps_a_layout_and_omits_none() -> None:
    plan = sepify.Plan({"a": sepify.LayerPlan(2, "pw-dw", "rank-major"), "b": sepify.LayerPlan(1, "dw-pw")})
    text = plan.to_json()
    assert '"layout": "rank-major"' in text and text.count('"layout"') == 1
    again = sepify.Plan.from_json(text)
    assert again == plan and again["a"].layout == "rank-major" and again["b"].layout is None
    assert plan != sepify.Plan({"a": sepify.LayerPlan(2, "pw-dw"), "b": sepify.LayerPlan(1, "dw-pw")})


@pytest.mark.parametrize(
    ("layout", "rank", "order", "message"),
    [
        ("sideways", 2, "pw-dw", "a plan's layout must be one of ('grouped', 'rank-major'), got 'sideways'"),
        ("rank-major", 1, "pw-dw", "a plan's layout applies only at rank > 1, got layout 'rank-major' at rank 1"),
        ("grouped", 1, "dw-pw", "a plan's layout applies only at rank > 1, got layout 'grouped' at rank 1"),
    ],
)
def test_impossible_layouts_are_refused(layout: str, rank: int, order: str, message: str) -> None:
    with pytest.raises(sepify.PlanError) as info:
        sepify.LayerPlan(rank, order, layout)
    assert str(info.value) == message


def test_convert_applies_the_planned_layout(net: nn.Module, x: torch.Tensor) -> None:
    plan = sepify.Plan(
        {
            "2": sepify.LayerPlan(3, "pw-dw", "rank-major"),
            "4": sepify.LayerPlan(2, "dw-pw", "grouped"),
            "0": sepify.LayerPlan(2, "dw-pw"),
        }
    )
    result = sepify.convert(net, x, plan=plan)
    assert result.model.get_submodule("2").layout == "rank-major"
    assert result.model.get_submodule("4").layout == "grouped"
    assert result.model.get_submodule("0").layout == "rank-major"  # dw-pw's default
    assert [result.report.layer(n).layout for n in ("2", "4", "0")] == ["rank-major", "grouped", "rank-major"]
    again = result.report.to_plan()  # what --plan-out writes: the layouts that ran, explicitly
    assert again["2"] == plan["2"] and again["4"] == plan["4"] and again["0"].layout == "rank-major"
    defaults = sepify.Plan({k: sepify.LayerPlan(v.rank, v.order) for k, v in plan.layers.items()})
    torch.testing.assert_close(result.model(x), sepify.convert(net, x, plan=defaults).model(x), rtol=1e-5, atol=1e-6)


def test_a_planned_layout_that_does_not_fit_the_conv_is_a_sentence(x: torch.Tensor) -> None:
    grouped = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=2)).eval()  # no choice there
    plan = sepify.Plan({"2": sepify.LayerPlan(2, "pw-dw", "rank-major")})
    with pytest.raises(sepify.PlanError, match=r"the plan's layout for '2' does not fit its pair: layout 'rank-major'"):
        sepify.convert(grouped, x, plan=plan)


def test_audit_plans_the_layout_it_timed(net: nn.Module, x: torch.Tensor, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _stub_timing(monkeypatch, {"dw-pw": 2.0, "pw-dw": 0.25}, layout="rank-major")
    report = sepify.audit(net, x, timing=sepify.Timing(reps=1), orders=("pw-dw",))
    assert ("pw-dw", 2, (2, 32, 8, 8)) in calls  # each option timed at its layer's real input shape
    option = report.layer("4").option(2, "pw-dw")
    assert option.layout == "rank-major" and option.latency_ratio == 0.25
    assert report.layer("4").option(1, "pw-dw").layout is None  # rank 1 has one layout: nothing to plan
    plan = report.plan(max_mac_ratio=0.9)
    assert any(lp.layout == "rank-major" for lp in plan.layers.values())
    assert all(lp.layout == ("rank-major" if lp.rank > 1 else None) for lp in plan.layers.values())


def test_load_rebuilds_the_planned_layout(net: nn.Module, x: torch.Tensor, tmp_path: Path) -> None:
    pytest.importorskip("safetensors")
    from sepify.io.save import save_model

    plan = sepify.Plan({"2": sepify.LayerPlan(3, "pw-dw", "rank-major")})
    converted = sepify.convert(net, x, plan=plan)
    out = tmp_path / "m.safetensors"
    save_model(converted.model, out, "safetensors", example_args=(x,), plan_json=converted.report.to_plan().to_json())
    loaded = sepify.load_converted(_fresh_like(net), out)
    assert loaded.get_submodule("2").layout == "rank-major"
    torch.testing.assert_close(loaded(x), converted.model(x), rtol=1e-5, atol=1e-6)


def _fresh_like(net: nn.Module) -> nn.Module:
    """The same architecture with other weights: what ``sepify.load_converted`` is given in practice."""
    fresh = copy.deepcopy(net)
    for p in fresh.parameters():
        nn.init.normal_(p)
    return fresh


# -- convert: per-layer latency and skipping slower pairs -----------------------------


def test_convert_reports_per_layer_time_and_realisation(net: nn.Module, x: torch.Tensor) -> None:
    report = sepify.convert(net, x, rank=1, timing=sepify.Timing(reps=3)).report
    for row in report.converted:
        assert row.latency_before is not None and row.latency_before > 0
        assert row.latency_after is not None and row.latency_after > 0
        mac_ratio = row.macs_after / row.macs_before
        assert row.realisation == pytest.approx(row.latency_after / row.latency_before / mac_ratio)
    text = str(report)
    assert "realisation" in text and "timed convs:" in text
    assert report.to_dict()["layers"][0]["realisation"] == report.layers[0].realisation
    assert report.latency_before is not None and report.latency_before > 0
    assert report.latency_after is not None and report.latency_after > 0
    assert report.latency_ratio == report.latency_after / report.latency_before
    assert report.to_dict()["latency"]["ratio"] == report.latency_ratio
    assert f"whole model: {1e3 * report.latency_before:.2f} ms -> " in text


def test_whole_model_time_needs_an_original(net: nn.Module, x: torch.Tensor) -> None:
    report = sepify.convert(copy.deepcopy(net), x, inplace=True, timing=sepify.Timing(reps=2), rank=1).report
    assert report.latency_before is None and report.latency_ratio is None
    assert "whole-model latency not measured: inplace=True left no original model to time against" in report.notes
    calibrated = sepify.convert(
        copy.deepcopy(net),
        x,
        inplace=True,
        timing=sepify.Timing(reps=2),
        calibration=torch.randn(10, 3, 16, 16),
        rank=1,
    ).report
    assert calibrated.latency_ratio is not None  # the calibration teacher is the original then
    assert sepify.convert(net, x, rank=1).report.latency_before is None  # not timed unless asked


def test_skip_slower_keeps_the_conv_where_the_pair_lost(
    net: nn.Module, x: torch.Tensor, monkeypatch: pytest.MonkeyPatch
) -> None:
    _stub_timing(monkeypatch, {"dw-pw": 1.5, "pw-dw": 0.5})
    with pytest.warns(sepify.SepifyWarning, match=r"^no conv was converted \(3 slower\); the model is unchanged$"):
        slow = sepify.convert(net, x, rank=1, order="dw-pw", timing=sepify.Timing(skip_slower=True))
    assert slow.report.converted == ()
    assert {r.skip_reason for r in slow.report.layers} == {SkipReason.SLOWER}
    assert slow.report.layer("2").latency_ratio == 1.5 and slow.report.layer("2").realisation is None
    torch.testing.assert_close(slow.model(x), net(x))  # nothing was replaced
    fast = sepify.convert(net, x, rank=1, order="pw-dw", timing=sepify.Timing(skip_slower=True)).report
    assert [r.name for r in fast.converted] == ["0", "2", "4"]
    assert "timed convs: 3000.00 ms -> 1500.00 ms (50.0%" in str(fast)


@pytest.mark.filterwarnings("ignore:no conv was converted:sepify.SepifyWarning")  # every pair may lose here
def test_skip_slower_with_the_real_timer_converts_only_faster_pairs(net: nn.Module, x: torch.Tensor) -> None:
    report = sepify.convert(net, x, rank=1, timing=sepify.Timing(skip_slower=True, reps=3)).report
    for row in report.layers:
        assert row.latency_before is not None and row.latency_after is not None
        assert (row.latency_after < row.latency_before) == row.converted
        assert row.converted or row.skip_reason is SkipReason.SLOWER


def test_the_audit_times_each_shape_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Time depends on shapes, not weights: repeated blocks share their timings; a different context does not."""
    calls = _stub_timing(monkeypatch, {"dw-pw": 0.5})
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),  # the same as the first: timed once
        nn.Conv2d(8, 8, 3, padding=1), nn.Sigmoid(),  # same shapes, another activation fused: timed again
        nn.Conv2d(8, 16, 3, padding=1),
    ).eval()  # fmt: skip
    audit = sepify.audit(net, torch.randn(1, 8, 8, 8), timing=sepify.Timing(reps=1), orders=("dw-pw",), ranks=(1, 2))
    assert len(calls) == 3 * 2  # three distinct layers, two ranks each
    assert [o.latency_after for o in audit.layer("0").options] == [o.latency_after for o in audit.layer("2").options]


def test_timing_reps_are_checked() -> None:
    with pytest.raises(sepify.ConfigError, match="timing reps must be an integer >= 1, got 0"):
        sepify.Timing(reps=0)


# -- onnxruntime as the latency backend ---------------------------------------------------


@st.composite
def timed_layers(draw: st.DrawFn) -> tuple[nn.Module, torch.Tensor]:
    """A conv of any kind the ONNX layer graph must reproduce: padding modes, "same", TF-SAME, transposed."""
    from sepify.core.functional import SameConv2d

    dims = draw(st.sampled_from([1, 2, 3]))
    groups = draw(st.sampled_from([1, 2]))
    cin, cout = groups * draw(st.integers(1, 3)), groups * draw(st.integers(1, 3))
    kernel = draw(st.integers(1, 3))
    stride = draw(st.integers(1, 2))
    kind = draw(st.sampled_from(["conv", "conv", "transposed", "same", "tf-same"]))
    if kind == "transposed":
        classes = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
        conv = classes[dims](cin, cout, kernel, stride, padding=kernel // 2, output_padding=stride - 1, groups=groups)
    elif kind == "tf-same":
        dims = 2
        conv = SameConv2d(cin, cout, kernel, stride, groups=groups)
    else:
        classes = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
        mode = draw(st.sampled_from(["zeros", "reflect", "replicate", "circular"]))
        padding: Any = "same" if kind == "same" else draw(st.integers(0, 1))
        conv = classes[dims](
            cin, cout, kernel, 1 if kind == "same" else stride, padding=padding, groups=groups, padding_mode=mode
        )
    x = torch.randn(2, cin, *[draw(st.integers(4, 7)) for _ in range(dims)])
    return conv.eval(), x


# each activation as PyTorch computes it, written out independently of sepify.runtime.context
_REFERENCE: dict[str, Any] = {
    "relu": torch.relu,
    "clip": lambda t, _: t.clamp(-0.5, 2.0),
    "leaky_relu": lambda t, _: nn.functional.leaky_relu(t, 0.2),
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
    "silu": nn.functional.silu,
    "hardswish": nn.functional.hardswish,
    "hardsigmoid": nn.functional.hardsigmoid,
    "prelu": lambda t, slopes: nn.functional.prelu(t, slopes),
}


@settings(max_examples=60, deadline=None)
@given(timed_layers(), st.sampled_from(["dw-pw", "pw-dw", "pw-dw-pw"]), st.data())
def test_onnx_layer_graphs_compute_what_the_modules_compute(
    layer: tuple[nn.Module, torch.Tensor], order: str, data: st.DataObject
) -> None:
    """Every layout of every pair, and the conv, inside a random context (zero padding before, activation after)."""
    ort = pytest.importorskip("onnxruntime")
    from sepify.runtime.context import ACTIVATIONS, Activation, InContext, LayerContext
    from sepify.runtime.layers import layer_graph

    conv, x = layer
    dims = x.dim() - 2
    pad = tuple(data.draw(st.lists(st.integers(0, 2), min_size=2 * dims, max_size=2 * dims)))
    kind = data.draw(st.sampled_from([None, *ACTIVATIONS]))
    slopes = torch.rand(conv.out_channels)
    args = {"clip": (-0.5, 2.0), "leaky_relu": (0.2,)}.get(kind or "", ())
    context = LayerContext(pad, Activation(kind, args, slopes if kind == "prelu" else None) if kind else None)
    pair = sepify.SeparableConv.from_conv(conv, 2, order).eval()
    padded = nn.functional.pad(x, pad)
    for module in (conv, *(pair.in_layout(k) for k in pair.layouts)):
        graph = layer_graph(module, tuple(padded.shape), context)
        (got,) = ort.InferenceSession(graph.SerializeToString()).run(None, {"x": x.numpy()})
        with torch.no_grad():
            want = module(padded)
            if kind is not None:
                want = (
                    _REFERENCE[kind](want, slopes)
                    if kind in ("clip", "leaky_relu", "prelu")
                    else _REFERENCE[kind](want)
                )
            torch.testing.assert_close(InContext(module, context)(x), want, rtol=0, atol=0)
        torch.testing.assert_close(torch.from_numpy(got), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("fuse_pads", [True, False])
def test_layer_timing_keeps_a_pad_its_own_node_as_the_faster_export_does(
    fuse_pads: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """onnxruntime folds a constant Pad into the next Conv unless told not to; the layers are timed with their Pad
    kept, as the whole model runs from torch.onnx's TorchScript export (a 64-tap conv folded: 4x slower)."""
    ort = pytest.importorskip("onnxruntime")
    from sepify.runtime.context import LayerContext
    from sepify.runtime.layers import layer_graph
    from sepify.runtime.sessions import onnxruntime_session

    seen = tmp_path / "optimized.onnx"

    class Saving(ort.SessionOptions):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            self.optimized_model_filepath = str(seen)

    monkeypatch.setattr(ort, "SessionOptions", Saving)
    conv, context = nn.Conv2d(8, 16, (9, 1)), LayerContext(pad=(0, 0, 4, 4))
    onnxruntime_session(layer_graph(conv, (2, 8, 40, 1), context).SerializeToString(), 1, fuse_pads=fuse_pads)
    ops = [node.op_type for node in pytest.importorskip("onnx").load(seen).graph.node]
    assert ("Pad" in ops) is not fuse_pads, ops

    from sepify.runtime.runners import layer_runner

    seen.unlink()
    layer_runner(conv, torch.randn(2, 8, 32, 1), "onnxruntime", 1, context)()
    assert "Pad" in [node.op_type for node in pytest.importorskip("onnx").load(seen).graph.node]


@pytest.mark.parametrize("backend", ["onnxruntime", pytest.param("openvino", marks=pytest.mark.slow)])
def test_deployment_backends_time_layers_and_models(net: nn.Module, x: torch.Tensor, backend: str) -> None:
    pytest.importorskip(backend)
    timing = sepify.Timing(backend=backend, threads=1, reps=3)
    result = sepify.convert(net, x, rank=2, timing=timing)
    report = result.report
    assert all(r.latency_before and r.latency_after for r in report.converted)
    # layouts are chosen in the backend too, and the model keeps what its rows say
    for row in report.converted:
        pair = result.model.get_submodule(row.name)
        assert row.layout == (pair.layout if len(pair.layouts) > 1 else None)
    assert {r.layout for r in report.converted} - {None}
    assert report.latency_before and report.latency_after
    where = f"latency measured in {backend}, 1 thread at the example inputs' batch size"
    if backend == "onnxruntime":  # compared with the original as fast as it exports
        where += "; whole models (the original too) in the faster of torch.onnx's two exports"
    assert where in report.notes
    audit = sepify.audit(net, x, timing=timing)
    assert audit.model_latency is not None
    assert all(o.latency_ratio is not None for layer in audit.candidates for o in layer.options)
    assert where in audit.notes
    plan = audit.plan(max_mac_ratio=0.9)
    assert plan.meta["timed_in"] == f"{backend}, 1 thread"  # a plan knows which runtime it was timed for
    assert sepify.Plan.from_json(plan.to_json()).meta["timed_in"] == f"{backend}, 1 thread"


def test_latency_backends_are_checked() -> None:
    with pytest.raises(
        sepify.ConfigError, match=r"latency backend must be one of \('eager', 'compile', 'onnxruntime', 'openvino'\)"
    ):
        sepify.Timing(backend="tensorrt")
    with pytest.raises(sepify.ConfigError, match="timing threads must be an integer >= 1"):
        sepify.Timing(backend="onnxruntime", threads=0)


def test_the_compile_backend_says_when_there_is_no_cxx_compiler(monkeypatch: pytest.MonkeyPatch) -> None:
    from sepify.runtime.sessions import check_backend

    monkeypatch.setattr("shutil.which", lambda name: None)
    with pytest.raises(sepify.ConfigError, match=r"needs a C\+\+ compiler .*; install one \(apt install g\+\+\)"):
        check_backend("compile")


@pytest.mark.slow
def test_torch_compile_times_layers_in_context_and_models(net: nn.Module, x: torch.Tensor) -> None:
    """Each layer compiled inside its padding and activation; both layouts; the whole model compiled."""
    timing = sepify.Timing(backend="compile", reps=2)
    result = sepify.convert(net, x, rank=2, timing=timing)
    report = result.report
    assert len(report.converted) == 3 and all(r.latency_before and r.latency_after for r in report.converted)
    assert all(r.layout == result.model.get_submodule(r.name).layout for r in report.converted)
    assert report.latency_before and report.latency_after
    assert report.notes[-1].startswith("latency measured in torch.compile, ")


def test_a_model_onnxruntime_cannot_take_still_converts_with_a_note() -> None:
    pytest.importorskip("onnxruntime")

    class Listy(nn.Module):  # a list input: the layers are timed, the whole model cannot be exported as is
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(8, 16, 3, padding=1)

        def forward(self, xs: list[torch.Tensor]) -> torch.Tensor:
            return self.conv(xs[0])

    timing = sepify.Timing(backend="onnxruntime", threads=1, reps=2)
    report = sepify.convert(Listy().eval(), ([torch.randn(1, 8, 8, 8)],), rank=1, timing=timing).report
    assert report.layer("conv").latency_before is not None and report.latency_before is None
    assert report.notes[-1] == (
        "whole-model latency not measured: timing a model in onnxruntime needs tensor inputs only; time it with the "
        "eager backend"
    )
