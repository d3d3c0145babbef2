"""sepify.convert end to end on small models: exactness, totals, safety, arguments."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from torch import nn

import sepify
from sepify.core.cost import conv_macs, separable_macs


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("order", ["dw-pw", "pw-dw", "auto"])
def test_full_rank_model_reproduces_original(plain_net: nn.Module, example_input: torch.Tensor, order: str) -> None:
    result = sepify.convert(plain_net, example_input, rank="full", order=order)
    assert [r.name for r in result.report.converted] == ["stem", "body.0", "body.4"]
    torch.testing.assert_close(result.model(example_input), plain_net(example_input), rtol=1e-4, atol=1e-5)
    assert result.report.output_error is not None and result.report.output_error < 1e-5
    assert result.report.top1_agreement == 1.0


def test_state_dict_keys_name_the_pair(plain_net: nn.Module, example_input: torch.Tensor) -> None:
    keys = list(sepify.convert(plain_net, example_input, rank=1).model.state_dict())
    assert "body.0.conv_dw.weight" in keys and "body.0.conv_pw.weight" in keys
    assert "body.0.weight" not in keys and "stem.conv_pw.bias" in keys


def test_the_converted_model_keeps_the_original_class(plain_net: nn.Module, example_input: torch.Tensor) -> None:
    result = sepify.convert(plain_net, example_input, rank=2)
    assert result.report.mode == "fx"  # found by the graph pass; swapped in a copy of the original
    assert type(result.model) is type(plain_net) and result.model is not plain_net
    assert isinstance(result.model.body[0], sepify.SeparableConv2d) and result.model.body[0].rank == 2
    assert type(result.model.body) is nn.Sequential and isinstance(result.model.head, nn.Linear)


def test_caller_model_is_untouched(plain_net: nn.Module, example_input: torch.Tensor) -> None:
    plain_net.train()  # train mode: BN stats and dropout would change on a forward
    before = _state(plain_net)
    modules_before = [type(m) for m in plain_net.modules()]
    sepify.convert(plain_net, example_input, rank=1)
    after = _state(plain_net)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert [type(m) for m in plain_net.modules()] == modules_before
    assert plain_net.training


def test_train_mode_is_kept_and_running_stats_untouched(plain_net: nn.Module, example_input: torch.Tensor) -> None:
    plain_net.train()
    result = sepify.convert(plain_net, example_input, rank="full")
    assert result.model.training and result.model.get_submodule("stem").training
    torch.testing.assert_close(result.model.get_submodule("bn").running_mean, plain_net.bn.running_mean)
    assert int(result.model.get_submodule("bn").num_batches_tracked) == 0
    # same dropout mask in both probes, so even train-mode outputs agree
    assert result.report.output_error is not None and result.report.output_error < 1e-5


def test_eval_mode_is_kept(plain_net: nn.Module, example_input: torch.Tensor) -> None:
    model = sepify.convert(plain_net, example_input, rank=1).model
    assert not model.training
    assert not any(m.training for m in model.modules())


def test_inplace_converts_the_callers_modules(plain_net: nn.Module, example_input: torch.Tensor) -> None:
    result = sepify.convert(plain_net, example_input, inplace=True, rank=1)
    assert isinstance(plain_net.body[0], sepify.SeparableConv2d)
    assert result.model.get_submodule("body.0") is plain_net.body[0]


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_dtype_is_kept(plain_net: nn.Module, example_input: torch.Tensor, dtype: torch.dtype) -> None:
    model = copy.deepcopy(plain_net).to(dtype)
    result = sepify.convert(model, example_input.to(dtype), rank="full")
    assert {p.dtype for p in result.model.parameters()} == {dtype}
    bound = 1e-10 if dtype == torch.float64 else 5e-2
    assert result.report.output_error is not None and result.report.output_error < bound


def test_totals_equal_rows_and_measured_counts(plain_net: nn.Module, example_input: torch.Tensor) -> None:
    report = sepify.convert(plain_net, example_input, rank=1).report
    rows = report.layers
    assert report.conv_macs_before == sum(r.macs_before for r in rows)
    # whole-model MACs = conv MACs + the linear head (batch 2 x 12 x 5), measured independently
    assert report.macs_before == report.conv_macs_before + 2 * 12 * 5
    assert report.macs_after == report.conv_macs_after + 2 * 12 * 5
    assert report.params_before == sum(p.numel() for p in plain_net.parameters())
    saved = sum(r.params_before - r.params_after for r in rows)
    assert report.params_after == report.params_before - saved


def test_row_counts_match_hand_formulas(plain_net: nn.Module, example_input: torch.Tensor) -> None:
    report = sepify.convert(plain_net, example_input, rank=2, order="pw-dw").report
    row = report.layer("body.0")  # 8 -> 16, 3x5, stride 2 on a 16x16 input: 8x8 output
    assert (row.input_size, row.output_size) == ((16, 16), (8, 8))
    assert row.macs_before == conv_macs(8, 16, (3, 5), 1, (8, 8), batch=2) == 2 * 64 * 16 * 8 * 15
    # pw: 8 -> 32 on 16x16 input; dw: 16 outputs x 2 channels x 15 taps on 8x8 output
    assert row.macs_after == 2 * (256 * 32 * 8 + 64 * 16 * 2 * 15)
    assert row.macs_after == separable_macs(8, 16, (3, 5), 1, 2, "pw-dw", (16, 16), (8, 8), batch=2)
    assert row.params_before == 16 * 8 * 15 and row.params_after == 32 * 8 + 16 * 2 * 15


def test_rank_is_capped_and_flagged() -> None:
    net = nn.Sequential(nn.Conv2d(16, 4, 3)).eval()  # dw-pw exact rank min(4, 9) = 4
    larger = sepify.Selection(allow_larger=True)  # the exact pair is larger than this conv
    row = sepify.convert(net, torch.randn(1, 16, 8, 8), rank=6, select=larger).report.layer("0")
    assert (row.rank, row.requested_rank, row.rank_capped) == (4, 6, True)
    assert row.weight_error is not None and row.weight_error < 1e-6


def test_larger_pair_is_skipped_unless_forced() -> None:
    net = nn.Sequential(nn.Conv2d(4, 4, 3)).eval()  # rank 4: 4*4*9 + 4*16 > 4*4*9
    x = torch.randn(1, 4, 8, 8)
    with pytest.warns(sepify.SepifyWarning, match=r"no conv was converted \(1 no-saving\)"):
        skipped = sepify.convert(net, x, rank=4).report.layer("0")
    assert not skipped.converted and skipped.skip_reason is sepify.SkipReason.NO_SAVING
    report = sepify.convert(net, x, rank=4, select=sepify.Selection(allow_larger=True)).report
    row = report.layer("0")
    assert row.converted and row.rank == 4 and row.larger_than_original
    assert "(larger)" in str(report)
    assert sepify.convert(net, x, rank="full").report.layer("0").converted  # "full" asks for exactness: built


def test_auto_picks_lower_error_then_fewer_macs() -> None:
    # Cin=3 (pw-dw exact at rank 3) vs Cout=64 (dw-pw needs rank 9): at rank 3 pw-dw wins on error.
    net = nn.Sequential(nn.Conv2d(3, 64, 3), nn.Conv2d(64, 64, 3)).eval()
    larger = sepify.Selection(allow_larger=True)  # rank 3 on a 3-channel input is larger than the conv
    report = sepify.convert(net, torch.randn(1, 3, 12, 12), rank=3, order="auto", select=larger).report
    first = report.layer("0")
    assert first.order == "pw-dw" and first.weight_error is not None and first.weight_error < 1e-6
    # at full rank both orders are exact: the tie goes to fewer MACs
    full = sepify.convert(net, torch.randn(1, 3, 12, 12), rank="full", order="auto").report.layer("1")
    dw_pw = separable_macs(64, 64, (3, 3), 1, 9, "dw-pw", (10, 10), (8, 8))
    pw_dw = separable_macs(64, 64, (3, 3), 1, 9, "pw-dw", (10, 10), (8, 8))
    assert full.order == ("dw-pw" if dw_pw <= pw_dw else "pw-dw")


def test_detection_style_list_input(plain_net: nn.Module) -> None:
    class Wrapper(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = plain_net

        def forward(self, images: list[torch.Tensor]) -> dict[str, torch.Tensor]:
            return {"logits": torch.cat([self.inner(i[None]) for i in images])}

    images = [torch.randn(3, 16, 16), torch.randn(3, 12, 20)]
    report = sepify.convert(Wrapper().eval(), (images,), rank="full").report
    assert report.mode == "swap"
    assert report.output_error is not None and report.output_error < 1e-5
    assert report.inputs == "[(3, 16, 16) float32, (3, 12, 20) float32]"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rank": 0}, "rank must be a positive integer, 'full' or 'auto', got 0"),
        ({"rank": "max"}, "rank must be a positive integer, 'full' or 'auto', got 'max'"),
        ({"order": "dw"}, "order must be 'dw-pw', 'pw-dw', 'pw-dw-pw' or 'auto', got 'dw'"),
        ({"rank": True}, "rank must be a positive integer, 'full' or 'auto', got True"),
        ({"distill": -1}, "distill must be an integer >= 0, got -1"),
        ({"timing": "yes"}, "timing must be a sepify.Timing or a bool, got str"),
    ],
)
def test_bad_arguments_raise_config_error(plain_net: nn.Module, kwargs: dict, message: str) -> None:
    with pytest.raises(sepify.ConfigError) as info:
        sepify.convert(plain_net, torch.randn(1, 3, 8, 8), **kwargs)
    assert str(info.value) == message


def test_numpy_integer_ranks_are_ranks(plain_net: nn.Module, example_input: torch.Tensor) -> None:
    import numpy as np

    report = sepify.convert(plain_net, example_input, rank=np.int64(2)).report
    assert {r.rank for r in report.converted} == {2}


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: sepify.Selection(include=[3]), "include must be a list of glob strings, got [3]"),
        (lambda: sepify.Calibration(torch.zeros(4), samples=0), "calibration samples must be an integer >= 1, got 0"),
        (lambda: sepify.Calibration(None), "Calibration needs data: a tensor, a DataLoader or a list of batches"),
        (lambda: sepify.Distill(steps=0), "the distillation steps must be an integer >= 1, got 0"),
        (
            lambda: sepify.Distill(loss="l1"),
            "the distillation loss must be one of ('mse', 'kl', 'feature', 'both'), got 'l1'",
        ),
        (lambda: sepify.Distill(lr=0), "the distillation learning rate must be a positive number, got 0"),
        (
            lambda: sepify.Distill(optimizer="lbfgs"),
            "the distillation optimizer must be one of ('adamw', 'sgd'), got 'lbfgs'",
        ),
    ],
)
def test_option_objects_check_themselves(build: Callable[[], object], message: str) -> None:
    with pytest.raises(sepify.ConfigError) as info:
        build()
    assert str(info.value) == message


def test_wrong_input_shape_is_one_sentence(plain_net: nn.Module) -> None:
    with pytest.raises(sepify.InputShapeError) as info:
        sepify.convert(plain_net, torch.randn(1, 5, 8, 8), rank=1)
    message = str(info.value)
    assert message.startswith("the model (PlainNet) failed on example inputs (1, 5, 8, 8) float32: RuntimeError: ")
    assert message.endswith("; pass inputs of the shape and dtype its forward expects")
    assert isinstance(info.value, sepify.SepifyError)


def test_not_a_module_is_rejected() -> None:
    with pytest.raises(sepify.ConfigError, match="model must be a torch.nn.Module, got dict"):
        sepify.convert({}, torch.randn(1), rank=1)  # type: ignore[arg-type]


def test_conversion_is_deterministic(plain_net: nn.Module, example_input: torch.Tensor) -> None:
    a = sepify.convert(plain_net, example_input, rank=2).model.state_dict()
    b = sepify.convert(plain_net, example_input, rank=2).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_pw_dw_pw_converts_plans_and_reloads(plain_net: nn.Module, example_input: torch.Tensor, tmp_path) -> None:  # type: ignore[no-untyped-def]
    pytest.importorskip("safetensors")
    from sepify.io.save import save_model

    result = sepify.convert(plain_net, example_input, rank=4, order="pw-dw-pw")
    assert {r.order for r in result.report.converted} == {"pw-dw-pw"}
    for row in result.report.converted:
        pair = result.model.get_submodule(row.name)
        assert row.params_after == sum(p.numel() for p in pair.parameters())
    plan = result.report.to_plan()
    assert {lp.order for lp in plan.layers.values()} == {"pw-dw-pw"}
    replanned = sepify.convert(plain_net, example_input, plan=sepify.Plan.from_json(plan.to_json()))
    torch.testing.assert_close(replanned.model(example_input), result.model(example_input), rtol=0, atol=0)
    out = tmp_path / "m.safetensors"
    save_model(result.model, out, "safetensors", example_args=(example_input,), plan_json=plan.to_json())
    fresh = copy.deepcopy(plain_net)
    reloaded = sepify.load_converted(fresh, out)
    torch.testing.assert_close(reloaded(example_input), result.model(example_input), rtol=1e-6, atol=1e-6)


def test_rank_auto_picks_the_bottleneck_where_it_is_cheapest() -> None:
    # a weight that is exactly two rank-one terms across (out, in, taps): width 2 is exact
    a, b, k = torch.randn(32, 2), torch.randn(24, 2), torch.randn(9, 2)
    conv = nn.Conv2d(24, 32, 3, padding=1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.einsum("or,ir,kr->oik", a, b, k).reshape(32, 24, 3, 3))
    report = sepify.convert(
        nn.Sequential(conv), torch.randn(1, 24, 8, 8), rank="auto", tolerance=1e-3, order="auto"
    ).report
    (row,) = report.converted
    assert (row.order, row.rank) == ("pw-dw-pw", 2) and row.weight_error is not None and row.weight_error < 1e-3
    assert report.output_error is not None and report.output_error < 1e-3
