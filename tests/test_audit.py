"""sepify.audit: options per rank, measured errors, sensitivity, latency, and plans that keep their promises."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import sepify
from sepify import SkipReason
from sepify.core.cost import separable_macs


@pytest.fixture
def net() -> nn.Module:
    torch.manual_seed(0)
    body = [nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1, stride=2), nn.ReLU()]
    body += [nn.Conv2d(32, 32, 3, padding=1, groups=2), nn.ReLU(), nn.Conv2d(32, 32, 1)]
    return nn.Sequential(*body, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10)).eval()


@pytest.fixture
def x() -> torch.Tensor:
    return torch.randn(2, 3, 16, 16)


def test_audit_never_mutates_the_model(net: nn.Module, x: torch.Tensor) -> None:
    before = {k: v.clone() for k, v in net.state_dict().items()}
    types = [type(m) for m in net.modules()]
    sepify.audit(net, x, timing=sepify.Timing(reps=1))
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert [type(m) for m in net.modules()] == types


def test_options_cover_useful_ranks_with_exact_counts(net: nn.Module, x: torch.Tensor) -> None:
    report = sepify.audit(net, x)
    layer = report.layer("2")  # 16 -> 32, 3x3, stride 2: 16x16 -> 8x8, batch 2
    assert layer.macs == 2 * 64 * 32 * 16 * 9
    opt = layer.option(1, "pw-dw")
    assert opt.macs_after == separable_macs(16, 32, (3, 3), 1, 1, "pw-dw", (16, 16), (8, 8), batch=2)
    # every listed option pays (fewer params and MACs than the conv): pw-dw at rank 2 has fewer params, but its
    # 1x1 conv runs at the input's 16x16 before the stride, so more MACs
    for o in layer.options:
        assert o.params_after < layer.params and o.macs_after < layer.macs
    assert [o.rank for o in layer.options if o.order == "pw-dw"] == [1]
    assert report.layer("6").skip_reason == SkipReason.POINTWISE and report.layer("6").options == ()
    assert math.isclose(sum(la.mac_share for la in report.layers), (report.macs - 2 * 32 * 10) / report.macs)


def test_weight_and_output_errors_match_a_real_conversion(net: nn.Module, x: torch.Tensor) -> None:
    report = sepify.audit(net, x)
    for name in ("0", "2", "4"):
        layer = report.layer(name)
        for o in layer.options[::2]:
            pair = sepify.SeparableConv2d.from_conv(net.get_submodule(name), o.rank, o.order)
            conv = net.get_submodule(name)
            assert math.isclose(
                o.weight_error,
                float(
                    (pair.effective_weight() - conv.weight).detach().double().norm()
                    / conv.weight.detach().double().norm()
                ),
                rel_tol=1e-4,
                abs_tol=1e-6,
            )
    # the output error of the first layer is measured on the example input itself
    conv0 = net[0]
    o = report.layer("0").option(1, "dw-pw")
    pair = sepify.SeparableConv2d.from_conv(conv0, 1, "dw-pw")
    with torch.no_grad():
        expected = float((pair(x) - conv0(x)).norm() / conv0(x).norm())
    assert o.output_error is not None and math.isclose(o.output_error, expected, rel_tol=1e-4)


def test_model_error_rank1_is_measured(net: nn.Module, x: torch.Tensor) -> None:
    report = sepify.audit(net, x)
    layer = report.layer("2")
    plan = sepify.Plan({"2": sepify.LayerPlan(1, layer.sensitivity_order or "dw-pw")})
    converted = sepify.convert(net, x, plan=plan).report.output_error
    assert layer.model_error_rank1 is not None and converted is not None
    assert math.isclose(layer.model_error_rank1, converted, rel_tol=1e-4)


@pytest.mark.parametrize("ratio", [0.9, 0.7, 0.5])
def test_plan_meets_mac_budget_and_convert_applies_it(net: nn.Module, x: torch.Tensor, ratio: float) -> None:
    report = sepify.audit(net, x)
    plan = report.plan(max_mac_ratio=ratio)
    result = sepify.convert(net, x, plan=plan)
    assert result.report.macs_after <= ratio * result.report.macs_before
    assert math.isclose(plan.meta["mac_ratio"], result.report.mac_ratio)
    done = {r.name: (r.rank, r.order) for r in result.report.converted}
    assert done == {name: (lp.rank, lp.order) for name, lp in plan.layers.items()}
    assert all(r.skip_reason in (SkipReason.NOT_PLANNED, SkipReason.POINTWISE) for r in result.report.skipped)


def test_plan_under_param_budget_and_error_bound(net: nn.Module, x: torch.Tensor) -> None:
    report = sepify.audit(net, x)
    plan = report.plan(max_param_ratio=0.6)
    assert sepify.convert(net, x, plan=plan).report.param_ratio <= 0.6
    loose = report.plan(max_error=0.5)
    tight = report.plan(max_error=0.05)
    assert report.predicted_error(loose) <= 0.5 and report.predicted_error(tight) <= 0.05
    assert loose.meta["mac_ratio"] <= tight.meta["mac_ratio"]
    assert len(report.plan(max_error=0.0)) == 0


def test_unreachable_budget_names_the_smallest_ratio(net: nn.Module, x: torch.Tensor) -> None:
    report = sepify.audit(net, x)
    with pytest.raises(sepify.BudgetError) as info:
        report.plan(max_mac_ratio=0.01)
    message = str(info.value)
    assert message.startswith("no plan reaches MACs <= 0.01x the original: converting every candidate at its")
    smallest = float(message.rsplit("at least ", 1)[1])
    assert report.plan(max_mac_ratio=smallest + 1e-3).meta["mac_ratio"] <= smallest + 1e-3


def test_plan_arguments_are_checked(net: nn.Module, x: torch.Tensor) -> None:
    report = sepify.audit(net, x)
    with pytest.raises(sepify.ConfigError, match="exactly one bound"):
        report.plan()
    with pytest.raises(sepify.ConfigError, match=r"max_mac_ratio must be in \(0, 1\], got 1.5"):
        report.plan(max_mac_ratio=1.5)
    with pytest.raises(sepify.ConfigError, match="needs measured latencies"):
        report.plan(max_latency_ratio=0.9)


def test_latency_fields_and_latency_plan(net: nn.Module, x: torch.Tensor) -> None:
    report = sepify.audit(net, x, timing=sepify.Timing(reps=3))
    assert report.model_latency is not None and report.model_latency > 0
    for layer in report.candidates:
        for o in layer.options:
            assert o.latency_before is not None and o.latency_before > 0
            assert o.latency_after is not None and o.latency_after > 0
            assert o.latency_ratio == o.latency_after / o.latency_before
    # Timings are noise, so which budget is reachable varies; either answer is checked.
    faster = [
        max((o.latency_before - o.latency_after for o in layer.options if o.latency_ratio < 1.0), default=0.0)
        for layer in report.candidates
    ]
    try:
        plan = report.plan(max_latency_ratio=0.999)
    except sepify.BudgetError:
        assert sum(faster) < 0.001 * report.model_latency  # no combination of faster pairs saves 0.1%
    else:
        assert plan.layers  # saving time takes at least one pair
        for name, lp in plan.layers.items():
            ratio = report.layer(name).option(lp.rank, lp.order).latency_ratio
            assert ratio is not None and ratio < 1.0  # slower pairs are never planned


def test_ranks_restrict_options(net: nn.Module, x: torch.Tensor) -> None:
    report = sepify.audit(net, x, ranks=[1, 3], orders=("dw-pw",))
    assert {(o.rank, o.order) for o in report.layer("2").options} == {(1, "dw-pw"), (3, "dw-pw")}


def test_plan_json_round_trip(net: nn.Module, x: torch.Tensor, tmp_path) -> None:  # type: ignore[no-untyped-def]
    plan = sepify.audit(net, x).plan(max_mac_ratio=0.6)
    path = tmp_path / "plan.json"
    plan.to_json(path)
    again = sepify.Plan.from_json(path)
    assert again == plan and again.meta["budget"] == {"max_mac_ratio": 0.6}
    assert sepify.Plan.from_json(plan.to_json()) == plan


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{}", 'plan is not a sepify plan (no "format": "sepify.plan" field)'),
        (
            '{"format": "sepify.plan", "version": 9, "layers": {}}',
            "plan is a version 9 plan; this sepify reads version 1",
        ),
        (
            '{"format": "sepify.plan", "version": 1, "layers": {"a": {"rank": 0, "order": "dw-pw"}}}',
            "plan: layer 'a': a plan's rank must be a positive integer, got 0",
        ),
        (
            "{oops",
            "plan is not valid JSON (Expecting property name enclosed in double quotes at line 1); fix or "
            "regenerate it",
        ),
    ],
)
def test_bad_plans_are_sentences(text: str, message: str) -> None:
    with pytest.raises(sepify.PlanError) as info:
        sepify.Plan.from_json(text)
    assert str(info.value) == message


def test_plan_naming_a_missing_or_ineligible_conv(net: nn.Module, x: torch.Tensor) -> None:
    with pytest.raises(sepify.PlanError, match="the plan names 'nope', but the model has no convolution there"):
        sepify.convert(net, x, plan=sepify.Plan({"nope": sepify.LayerPlan(1, "dw-pw")}))
    with pytest.raises(sepify.PlanError, match=r"the plan names '6', which cannot be converted \(pointwise\)"):
        sepify.convert(net, x, plan=sepify.Plan({"6": sepify.LayerPlan(1, "dw-pw")}))


def test_rank_auto_meets_tolerance(net: nn.Module, x: torch.Tensor) -> None:
    report = sepify.convert(net, x, rank="auto", tolerance=0.5, order="auto").report
    for row in report.converted:
        assert row.weight_error is not None and row.weight_error <= 0.5
        # the smallest such rank: one less would miss the tolerance (depth-multiplier orders, exact SVD errors)
        if row.rank and row.rank > 1 and row.order != "pw-dw-pw":
            f = sepify.core.decompose.Factorization.of(net.get_submodule(row.name).weight, row.groups, str(row.order))
            assert f.relative_error(row.rank - 1) > 0.5
    assert all(r.skip_reason in (SkipReason.POINTWISE, SkipReason.NO_SAVING) for r in report.skipped)


def test_rank_auto_needs_tolerance(net: nn.Module, x: torch.Tensor) -> None:
    with pytest.raises(sepify.ConfigError, match="rank='auto' needs a tolerance in"):
        sepify.convert(net, x, rank="auto")


def test_audit_report_renders(net: nn.Module, x: torch.Tensor, tmp_path) -> None:  # type: ignore[no-untyped-def]
    report = sepify.audit(net, x)
    text = report.to_text()  # the full table
    assert "3 of 4 convs are candidates" in text and "skip: pointwise" in text
    assert max(len(line) for line in str(report).splitlines()) <= 100  # print(report): the compact view
    assert report.to_markdown().startswith("| layer | kind | status |")
    rows = report.to_csv().splitlines()
    assert len(rows) == 1 + sum(max(1, len(la.options)) for la in report.layers)
    assert report.to_dict()["layers"][0]["options"][0]["rank"] == 1
    pytest.importorskip("matplotlib")
    from sepify.report.plot import plot_audit

    png = tmp_path / "audit.png"
    plan = report.plan(max_mac_ratio=0.7)
    plot_audit(report, png, plan)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from sepify.report.plot import audit_figure

    left, right = audit_figure(report, plan).axes
    names = [t.get_text() for t in left.get_yticklabels()]
    by_macs = [la.name for la in sorted(report.candidates, key=lambda la: -la.macs)]
    assert names == by_macs  # one row per candidate, largest first
    bars = [b for b in left.patches if b.get_facecolor()[:3] != (0.8156862745098039,) * 3]
    assert len(bars) == len(plan) and all(b.get_width() >= 0 for b in left.patches)  # picks coloured, none negative
    assert {t.get_text() for t in left.texts} == {f"{p.rank} {p.order}" for p in plan.layers.values()}


def test_audit_predicts_the_worst_output_of_a_model_with_several() -> None:
    class TwoHeads(nn.Module):  # a large-scale head beside a small one, as a detector's boxes beside its scores
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Conv2d(3, 16, 3, padding=1)
            self.head_a = nn.Conv2d(16, 4, 1)
            self.head_b = nn.Conv2d(16, 4, 1)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            h = torch.relu(self.body(x))
            return self.head_a(h), 1000 * self.head_b(h)  # b's scale hides a in a pooled error

    torch.manual_seed(0)
    model = TwoHeads().eval()
    x = torch.randn(2, 3, 8, 8)
    layer = sepify.audit(model, x).layers[0]
    assert layer.name == "body" and layer.model_error_rank1 is not None
    result = sepify.convert(model, x, rank=1, order=layer.sensitivity_order)
    assert result.report.output_error is not None
    # the audit's prediction for the layer alone at rank 1 is what the conversion then reports: the worst output,
    # here the small one (0.60 vs 0.46), which an error pooled over both outputs would hide (0.46)
    small, big = result.report.output_errors
    assert small is not None and big is not None and small > big + 0.1
    assert math.isclose(layer.model_error_rank1, small, rel_tol=1e-6)
    assert result.report.output_error == small
