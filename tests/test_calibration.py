"""Calibration: data handling, the closed-form refit's exactness, BatchNorm refresh, distillation, real accuracy."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import sepify
from sepify.calibrate import refine
from sepify.calibrate.capture import StudentInputs, TeacherOutputs, capture
from sepify.calibrate.data import calibration_batches, near_duplicate_groups
from sepify.calibrate.distill import Samples, train
from sepify.calibrate.refine import refine_pairs, refined_errors
from sepify.calibrate.regression import (
    BlendPath,
    NormalEquations,
    add_to_normals,
    current_weights,
    data_free_normals,
    gram_bytes,
    regression_count,
    solve_ridge,
)
from sepify.core.modules import SeparableConv
from sepify.graph.rewrite import swap_modules
from sepify.graph.tracing import trace_model
from sepify.io.datasets import load_calibration

# -- data --------------------------------------------------------------------------


def test_tensor_is_cut_into_batches_with_a_heldout_share() -> None:
    data = calibration_batches(torch.randn(100, 3, 4, 4), heldout_fraction=0.2)
    assert [b[0].shape[0] for b in data.fit] == [32, 32, 16]
    assert [b[0].shape[0] for b in data.heldout] == [20]
    assert data.samples == 100


def test_batches_do_not_depend_on_sample_order() -> None:
    # Recording order: 10 "recordings" of 8 similar samples each. A held-out tail would be the last recording.
    x = torch.randn(10, 1, 1, 16).repeat(1, 8, 1, 1).reshape(80, 1, 16) + 0.01 * torch.randn(80, 1, 16)
    shuffled = x[torch.randperm(80)]
    a, b = calibration_batches(x, limit=60), calibration_batches(shuffled, limit=60)
    for one, other in ((a.fit, b.fit), (a.heldout, b.heldout)):
        assert all(torch.equal(p[0], q[0]) for p, q in zip(one, other, strict=True))
    held = torch.cat([h[0] for h in a.heldout])
    sources = {int(((x - s).abs().sum((1, 2))).argmin()) // 8 for s in held}
    assert len(held) == 12 and len(sources) >= 5  # spread over the recordings, not the tail


def test_labelled_loader_keeps_only_model_arguments_and_respects_limit() -> None:
    loader = [(torch.randn(8, 3), torch.arange(8)) for _ in range(5)]
    data = calibration_batches(loader, n_args=1, limit=20, heldout_fraction=0.25)
    assert all(len(b) == 1 for b in data.fit + data.heldout)
    assert data.samples == 20 and sum(b[0].shape[0] for b in data.heldout) == 5


def test_callable_and_bad_inputs() -> None:
    data = calibration_batches(lambda: [torch.randn(4, 2)])
    assert data.samples == 4
    with pytest.raises(sepify.CalibrationError, match="calibration data is empty"):
        calibration_batches([])
    with pytest.raises(
        sepify.CalibrationError, match="calibration batches must be tensors or tuples of tensors, got str"
    ):
        calibration_batches(["x"])


def test_load_calibration_files(tmp_path) -> None:  # type: ignore[no-untyped-def]
    np.save(tmp_path / "c.npy", np.ones((5, 3, 8, 8), dtype=np.float32))
    assert load_calibration(tmp_path / "c.npy", (3, 8, 8), samples=3).shape == (3, 3, 8, 8)
    torch.save(torch.zeros(4, 1, 6, 6), tmp_path / "c.pt")
    assert load_calibration(tmp_path / "c.pt", (1, 6, 6)).shape == (4, 1, 6, 6)
    with pytest.raises(sepify.CalibrationError) as info:
        load_calibration(tmp_path / "c.pt", (3, 6, 6))
    assert str(info.value) == (
        f"{tmp_path / 'c.pt'}: samples are 1x6x6 but the model's input is 3x6x6 (from --input-shape); "
        "pass samples with that layout and channel count"
    )
    with pytest.warns(sepify.SepifyWarning, match="calibrating on random noise; fidelity on real inputs will be worse"):
        random = load_calibration("random", (3, 4, 4))
        assert random.shape == (256, 3, 4, 4) and torch.equal(random, load_calibration("random", (3, 4, 4)))


def test_image_folder_is_normalised(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from PIL import Image

    Image.new("RGB", (10, 7), (255, 0, 128)).save(tmp_path / "a.png")
    Image.new("RGB", (5, 5), (0, 0, 0)).save(tmp_path / "b.jpg")
    batch = load_calibration(tmp_path, (3, 4, 6), mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    assert batch.shape == (2, 3, 4, 6)
    torch.testing.assert_close(batch[0, :, 0, 0], torch.tensor([1.0, 0.0, 128 / 255]))
    (tmp_path / "broken.png").write_text("not an image")
    with pytest.raises(sepify.CalibrationError, match="broken.png: cannot be read as an image"):
        load_calibration(tmp_path, (3, 4, 6))


# -- the refit ---------------------------------------------------------------------


@pytest.mark.parametrize("order", ["dw-pw", "pw-dw", "pw-dw-pw"])
@pytest.mark.parametrize("groups", [1, 2])
def test_refit_recovers_a_reachable_target_exactly(order: str, groups: int) -> None:
    # The teacher is itself a rank-2 pair, so the refit factor has an exact solution;
    # the student starts from the right first factor but a scrambled last one.
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 12, 3, padding=1, stride=2 if order == "pw-dw" else 1, groups=groups, padding_mode="reflect")
    exact_pair = sepify.SeparableConv2d.from_conv(conv, 2, order).double()
    teacher_conv = nn.Conv2d(8, 12, 3, padding=1, stride=conv.stride, groups=groups, padding_mode="reflect").double()
    with torch.no_grad():
        teacher_conv.weight.copy_(exact_pair.effective_weight())
        teacher_conv.bias.copy_(conv.bias.double())
    teacher = nn.Sequential(teacher_conv)
    student = nn.Sequential(copy.deepcopy(exact_pair))
    last = student[0].last
    with torch.no_grad():
        last.weight.normal_()
        last.bias.normal_()
    x = torch.randn(12, 8, 9, 9, dtype=torch.float64)
    batches = [(x[:4],), (x[4:8],)]
    result = refine_pairs(teacher, student, [("0", student[0])], batches, [(x[8:],)])
    before, after = result.layers["0"]
    assert before > 0.5 and after < 1e-7
    torch.testing.assert_close(student(x), teacher(x), rtol=1e-6, atol=1e-6)


def test_refit_is_never_worse_on_heldout_data() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(4, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1)).eval()
    x = torch.randn(40, 4, 8, 8)
    report = sepify.convert(net, x[:2], rank=1, calibration=x).report
    stages = {s.stage: s.output_error for s in report.fidelity}
    assert list(stages) == ["init", "refined"]
    assert stages["refined"] is not None and stages["init"] is not None
    assert stages["refined"] <= stages["init"]


def _deep_net() -> nn.Sequential:
    torch.manual_seed(0)
    widths = [(3, 8, 1), (8, 8, 1), (8, 16, 2), (16, 16, 1)]
    layers = [m for cin, cout, s in widths for m in (nn.Conv2d(cin, cout, 3, stride=s, padding=1), nn.ReLU())]
    return nn.Sequential(*layers[:-1]).eval()


@pytest.mark.parametrize(("budget", "passes"), [(1, 4), (1 << 40, 1)])
def test_teacher_outputs_match_one_capture_per_layer(budget: int, passes: int) -> None:
    net = _deep_net()
    batches = [(torch.randn(3, 3, 8, 8),), (torch.randn(2, 3, 8, 8),)]
    names = ["0", "2", "4", "6"]
    outputs = TeacherOutputs(net, names, batches, budget)
    for name in names:
        got = outputs.take(name)
        expected = [capture(net, net.get_submodule(name), b, output=True) for b in batches]
        assert len(got) == len(expected) == 2
        for g, e in zip(got, expected):
            torch.testing.assert_close(g, e, rtol=0, atol=0)
    assert outputs.passes == passes  # a budget of one byte still takes one layer per pass
    assert outputs.cache == {}  # each layer's outputs are handed over once


def test_refit_does_not_depend_on_how_targets_are_batched(monkeypatch: pytest.MonkeyPatch) -> None:
    x = torch.randn(40, 3, 8, 8)
    reports = []
    for budget in (1, 1 << 40):
        monkeypatch.setattr(refine, "TARGET_BYTES", budget)
        reports.append(sepify.convert(_deep_net(), x[:2], rank=1, calibration=x).report)
    assert [s.output_error for s in reports[0].fidelity] == [s.output_error for s in reports[1].fidelity]


class _Residual(nn.Module):
    """A skip connection that stays alive across two pairs: what resuming a forward must keep."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.a = nn.Conv2d(8, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.c = nn.Conv2d(8, 8, 3, padding=1, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        y = self.b(torch.relu(self.a(x))) + x
        return self.c(torch.relu(y)).mean((2, 3))


def _traced_student() -> torch.fx.GraphModule:
    """What calibration runs: the graph traced from the original, each conv swapped for its rank-1 pair."""
    student = trace_model(_Residual().eval()).graph_module
    assert student is not None
    names = ["stem", "a", "b", "c"]
    swap_modules(student, {n: SeparableConv.from_conv(student.get_submodule(n), 1) for n in names}, {})
    return student


@pytest.mark.parametrize("budget", [1, 1 << 40])
def test_resumed_student_inputs_equal_a_fresh_pass(budget: int) -> None:
    batches = [(torch.randn(3, 3, 8, 8),), (torch.randn(2, 3, 8, 8),)]
    student = _traced_student()
    names = ["stem", "a", "b", "c"]
    inputs = StudentInputs.for_model(student, names, batches, budget)
    assert inputs is not None
    for name in names:
        for k, batch in enumerate(batches):
            expected = capture(student, student.get_submodule(name), batch, output=False)
            torch.testing.assert_close(inputs.get(name, k), expected, rtol=0, atol=0)
        with torch.no_grad():  # a refit changes the pair; the next pair's inputs must see it
            student.get_submodule(name).conv_pw.weight.mul_(1.5)
    kept = [state is not None for state in inputs.states]
    assert kept == ([True, True] if budget > 1 else [False, False])  # a 1-byte budget restarts every batch


def test_students_that_cannot_resume_use_fresh_passes() -> None:
    batches = [(torch.randn(2, 3, 8, 8),)]
    assert StudentInputs.for_model(_Residual(), ["a"], batches, 1 << 40) is None  # not a GraphModule
    student = _traced_student()
    assert StudentInputs.for_model(student, ["a"], batches, 1 << 40) is not None
    assert StudentInputs.for_model(student, ["a"], batches, 0) is None  # resuming switched off
    assert StudentInputs.for_model(student, ["a", "nope"], batches, 1 << 40) is None  # a pair that is no node


def test_refit_does_not_depend_on_resuming(monkeypatch: pytest.MonkeyPatch) -> None:
    x = torch.randn(30, 3, 8, 8)
    errors = []
    for budget in (0, 1 << 40):
        monkeypatch.setattr(refine, "RESUME_BYTES", budget)
        report = sepify.convert(_Residual().eval(), x[:2], rank=1, calibration=x).report
        errors.append([s.output_error for s in report.fidelity])
    assert errors[0] == errors[1] and errors[0][1] < errors[0][0]


@pytest.mark.parametrize(
    ("conv", "order", "resume"),
    [
        (nn.Conv2d(4, 12, 3, padding=1, groups=2), "dw-pw", True),
        (nn.Conv2d(4, 12, 3, padding=1, groups=2), "pw-dw-pw", False),
        (nn.Conv2d(4, 12, 3, padding=1), "pw-dw", True),
        (nn.Conv1d(4, 12, 20, padding=9, bias=False), "pw-dw", False),  # 20 taps: normal equations from correlations
    ],
)
def test_a_refit_solved_in_parts_equals_the_whole(
    conv: nn.Module, order: str, resume: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A layer too large for one set of Gram matrices is solved a few regressions at a time, and every choice is
    still made for the whole layer: the same weights and held-out errors as in one part."""
    torch.manual_seed(0)
    teacher = nn.Sequential(conv, nn.ReLU()).eval()
    x = torch.randn(24, 4, *([10, 10] if isinstance(conv, nn.Conv2d) else [40]))
    x = x.cumsum(-1) * torch.tensor([3.0, 1.0, 0.3, 0.1]).view(1, 4, *[1] * (x.dim() - 2))  # far from white input
    monkeypatch.setattr(refine, "RESUME_BYTES", None if resume else 0)
    found = []
    for part_bytes in (1 << 40, 1):  # one part; one regression per part
        monkeypatch.setattr(refine, "PART_BYTES", part_bytes)
        student = trace_model(copy.deepcopy(teacher)).graph_module
        assert student is not None
        pair = SeparableConv.from_conv(conv, 2, order)
        swap_modules(student, {"0": pair}, {})
        result = refine_pairs(teacher, student, [("0", pair)], [(x[:16],)], [(x[16:],)])
        found.append((result, pair))
    (whole, whole_pair), (parts, parts_pair) = found
    assert len(refine._parts(parts_pair)) == regression_count(parts_pair) > 1
    before, after = whole.layers["0"]
    assert after < before  # the refit changed the layer, so the two ways had a choice to agree on
    assert parts.layers["0"] == pytest.approx(whole.layers["0"], rel=1e-6)  # float32 features, summed apart
    assert parts.coverage["0"] == pytest.approx(whole.coverage["0"], rel=1e-6)
    for a, b in zip(whole_pair.parameters(), parts_pair.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    predicted = []  # and the audit's prediction of each rank's refit, summed over parts
    for part_bytes in (1 << 40, 1):
        monkeypatch.setattr(refine, "PART_BYTES", part_bytes)
        predicted.append(refined_errors(conv, x, order, [1, 2, 3]))
    assert predicted[0].keys() == {1, 2, 3} and predicted[1] == pytest.approx(predicted[0], rel=1e-6)


@settings(max_examples=25, deadline=None)
@given(
    regressions=st.integers(1, 4),
    features=st.integers(1, 12),
    samples=st.integers(1, 30),  # fewer samples than features too: the data's Gram matrix is singular
    outputs=st.integers(1, 3),
    share=st.sampled_from(refine.DATA_FREE_SHARES),
    seed=st.integers(0, 2**16),
)
def test_one_factorisation_solves_every_blend(
    regressions: int, features: int, samples: int, outputs: int, share: float, seed: int
) -> None:
    """The share search's solutions from one generalised eigendecomposition equal a direct solve of each blend."""
    g = torch.Generator().manual_seed(seed)
    data, free = NormalEquations(), NormalEquations()
    x = torch.randn(regressions, samples, features, generator=g) * torch.logspace(0, 2, features)
    data.add(x, x @ torch.randn(regressions, features, outputs, generator=g))
    z = torch.randn(regressions, 2 * features + 1, features, generator=g)
    free.add(z, z @ torch.randn(regressions, features, outputs, generator=g))
    blend = data.blended(free, share)
    direct = solve_ridge(blend, 0.0, free_last=False)
    assert direct is not None and blend.yy is not None
    path = BlendPath.of(data, free)
    assert path is not None
    solved = path.solve(share)
    # the blend's least-squares objective agrees to round-off; the weights as far as the features' 100x scale
    # (a Gram condition up to 1e8) and the two solves' different 1e-12 / 1e-10 diagonal jitters let them
    # (1.2e-5 at worst over a grid of 1920 cases)
    assert blend.error(solved) == pytest.approx(blend.error(direct), abs=1e-10 * float(blend.yy.sum()))
    torch.testing.assert_close(solved, direct, rtol=1e-4, atol=1e-8)


@settings(max_examples=20, deadline=None)
@given(
    cin=st.integers(1, 5),
    cout=st.integers(1, 4),
    rank=st.integers(1, 3),
    kernel=st.sampled_from([(3,), (5,), (3, 3), (1, 4)]),
    bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_the_data_free_kronecker_factor_gives_the_dense_path(
    cin: int, cout: int, rank: int, kernel: tuple[int, ...], bias: bool, seed: int
) -> None:
    """pw-dw's data-free Gram matrix is kron(P P^T, I) (+ the bias's 1): its factor, never formed densely, gives the
    same blend path (every share's solution, and the coverage read from its spectrum) as a dense Cholesky."""
    torch.manual_seed(seed)
    conv = (nn.Conv1d if len(kernel) == 1 else nn.Conv2d)(cin, cout, kernel, bias=bias)
    pair = SeparableConv.from_conv(conv, rank, "pw-dw")
    x = torch.randn(6, cin, *(7 for _ in kernel))
    data = NormalEquations()
    with torch.no_grad():
        add_to_normals(data, pair, x, conv(x))
    free = data_free_normals(pair, conv.weight, conv.bias)
    assert free.kronecker is not None and free.kronecker.bias == bias
    structured = BlendPath.of(data, free)
    assert free.kronecker is not None and free._gram is None  # the path never formed the matrix
    closed = solve_ridge(free, 0.0, free_last=bias)  # reading it forms it: white input's solution is the pair
    assert closed is not None  # (whose weights are float32: equal to their round-off, amplified by P P^T's condition)
    torch.testing.assert_close(closed, current_weights(pair), rtol=1e-4, atol=1e-6)
    free.gram = free.gram.clone()  # a new matrix: its structure is no longer known
    assert free.kronecker is None
    dense = BlendPath.of(data, free)
    assert structured is not None and dense is not None
    for share in refine.DATA_FREE_SHARES:
        torch.testing.assert_close(structured.solve(share), dense.solve(share), rtol=1e-6, atol=1e-8)
    assert structured.coverage() == pytest.approx(dense.coverage(), rel=1e-6)


def test_data_free_equations_that_are_not_positive_definite_leave_no_path() -> None:
    """Without a positive definite data-free Gram matrix there is no blend to search: the closed form is kept."""
    data, free = NormalEquations(), NormalEquations()
    x = torch.randn(1, 20, 3)
    data.add(x, x.sum(-1, keepdim=True))
    free.add_normals(-torch.eye(3, dtype=torch.float64)[None], torch.ones(1, 3, 1), torch.ones(1))
    assert BlendPath.of(data, free) is None


def test_calibration_measures_long_kernel_pairs_as_dense_kernels_and_returns_the_pairs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A pw-dw pair with a 39-tap kernel at rank 4 (dense kernel 1.7x its MACs, its depthwise conv1d slow on CPU)
    runs as its dense kernel while calibration measures and refits; the model returned runs the pair itself."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv1d(8, 8, 39, padding=19), nn.ReLU(), nn.Conv1d(8, 4, 39, padding=19)).eval()
    x = torch.randn(40, 8, 120)
    dense_calls = []
    original = SeparableConv.effective_weight

    def counted(self: SeparableConv) -> torch.Tensor:
        dense_calls.append(self._run_dense)
        return original(self)

    monkeypatch.setattr(SeparableConv, "effective_weight", counted)
    result = sepify.convert(net, x[:2], rank=4, order="pw-dw", calibration=sepify.Calibration(x, refresh_bn=False))
    assert any(dense_calls)  # the dense path ran
    pairs = [m for m in result.model.modules() if isinstance(m, SeparableConv)]
    assert len(pairs) == 2 and all("_run_dense" not in vars(p) for p in pairs)
    dense_calls.clear()
    with torch.no_grad():
        result.model(x[:2])
    assert dense_calls == []  # the returned model computes through its factors


def test_a_layer_without_a_blend_path_keeps_its_closed_form_and_claims_no_coverage(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """When no part has a path (data-free equations not positive definite) the pair is left as it was, and no
    coverage is reported for it (a 0.0 would read as "calibration covers nothing")."""
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, padding=1)
    teacher = nn.Sequential(conv).eval()
    x = torch.randn(24, 4, 8, 8)
    student = trace_model(copy.deepcopy(teacher)).graph_module
    assert student is not None
    pair = SeparableConv.from_conv(conv, 2, "pw-dw")
    swap_modules(student, {"0": pair}, {})
    before = copy.deepcopy(pair.state_dict())
    monkeypatch.setattr(BlendPath, "of", classmethod(lambda cls, data, free: None))
    result = refine_pairs(teacher, student, [("0", pair)], [(x[:16],)], [(x[16:],)])
    assert result.layers["0"][0] == result.layers["0"][1] and "0" not in result.coverage
    for key, value in pair.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_only_a_regression_too_large_for_any_part_is_left_unrefined(monkeypatch: pytest.MonkeyPatch) -> None:
    """A part holds at least one regression: a dense dw-pw pair is one regression of Cin * rank (+1) features
    (tens of GB for a 1024-channel conv at rank 60), which is skipped with a sentence instead of exhausting memory;
    a pw-dw pair of many small regressions over the same total is refit in parts."""
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 16, 3, padding=1)
    teacher = nn.Sequential(conv).eval()
    x = torch.randn(24, 16, 8, 8).cumsum(-1)
    found = {}
    for order in ("dw-pw", "pw-dw"):
        pair = SeparableConv.from_conv(conv, 2, order)
        per_regression = gram_bytes(pair) // regression_count(pair)
        monkeypatch.setattr(
            refine, "GRAM_BYTES", 5000
        )  # dw-pw: one regression of 33 features (8712 B); pw-dw: 16 of 19
        monkeypatch.setattr(refine, "PART_BYTES", 4 * per_regression)
        student = trace_model(copy.deepcopy(teacher)).graph_module
        assert student is not None
        swap_modules(student, {"0": pair}, {})
        found[order] = refine_pairs(teacher, student, [("0", pair)], [(x[:16],)], [(x[16:],)]), gram_bytes(pair)
    dw_pw, total = found["dw-pw"]
    assert dw_pw.skipped == {"0": f"one of its regressions would need more than {5000 / 2**20:g} MB of Gram matrix"}
    assert "0" not in dw_pw.layers and total > 5000
    pw_dw, total = found["pw-dw"]
    assert pw_dw.skipped == {} and "0" in pw_dw.layers and total > 5000  # refit although its matrices exceed the cap


# -- a real trained model ------------------------------------------------------------

zoo = pytest.importorskip("sepify.zoo")
pytest.importorskip("sklearn")


@pytest.fixture(scope="module")
def digits() -> tuple[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor, float]:
    x_train, _, x_test, y_test = zoo.digits_data()
    model = zoo.digits_cnn()
    return model, x_train, x_test, y_test, zoo.accuracy(model, x_test, y_test)


def test_trained_digits_cnn_survives_rank_1_with_refinement(digits) -> None:  # type: ignore[no-untyped-def]
    model, x_train, x_test, y_test, original = digits
    assert original > 0.97
    # every conv but the first, a bank of 32 filters on the one gray channel that rank 1 cuts to a single filter
    body = sepify.Selection(exclude=["0"])
    init = sepify.convert(model, x_test[:4], rank=1, select=body)
    refined = sepify.convert(model, x_test[:4], rank=1, select=body, calibration=x_train[:256])
    assert refined.report.mac_ratio is not None and refined.report.mac_ratio < 0.15
    assert zoo.accuracy(init.model, x_test, y_test) < 0.5  # the closed form alone collapses
    assert zoo.accuracy(refined.model, x_test, y_test) >= original - 0.02
    stages = [s.stage for s in refined.report.fidelity]
    assert stages[:2] == ["init", "refined"]


@pytest.mark.slow  # synthesising samples and refining on them: about 15 s
def test_a_default_conversion_that_saves_little_without_data_says_what_would_help(digits) -> None:  # type: ignore[no-untyped-def]
    model, x_train, x_test, y_test, original = digits
    bare = sepify.convert(model, x_test[:1])  # the default budget: predicted output error <= 0.1
    assert bare.report.mac_ratio is not None and bare.report.mac_ratio > 0.9
    hint = [n for n in bare.report.notes if n.startswith("little fits this error budget without data")]
    assert hint and "synthetic calibration (the model has BatchNorm)" in hint[0]
    # and what it promises: the same budget with synthetic samples slims far more and keeps the accuracy
    synthetic = sepify.convert(model, x_test[:1], calibration="synthetic")
    assert synthetic.report.mac_ratio is not None and synthetic.report.mac_ratio < 0.8
    assert zoo.accuracy(synthetic.model, x_test, y_test) >= original - 0.01
    assert not any(n.startswith("little fits") for n in synthetic.report.notes)


def test_distillation_improves_heldout_loss_and_is_deterministic(digits) -> None:  # type: ignore[no-untyped-def]
    model, x_train, x_test, y_test, original = digits
    runs = [
        sepify.convert(model, x_test[:4], rank=1, order="pw-dw", calibration=x_train[:256], distill=60)
        for _ in range(2)
    ]
    a, b = (r.model.state_dict() for r in runs)
    assert all(torch.equal(a[k], b[k]) for k in a)
    fidelity = {s.stage: s.output_error for s in runs[0].report.fidelity}
    assert fidelity["distilled"] <= min(v for k, v in fidelity.items() if k != "distilled")
    assert zoo.accuracy(runs[0].model, x_test, y_test) >= original - 0.03


def test_distill_trains_only_the_given_parameters() -> None:
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)).eval()
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        student[2].weight.add_(0.5)
    frozen = student[0].weight.clone()
    x = torch.randn(64, 4)
    options = sepify.Distill(steps=50, batch_size=16, lr=1e-2)
    trainable = list(student[2].parameters())
    result = train(student, teacher, Samples(x[:48], 16), options, trainable=trainable, evals=[(x[48:],)])
    assert torch.equal(student[0].weight, frozen)
    assert result.eval_after is not None and result.eval_before is not None
    assert result.eval_after < result.eval_before
    assert student[0].weight.requires_grad  # flags restored


def test_distillation_needs_calibration(plain_net: nn.Module) -> None:
    with pytest.raises(sepify.ConfigError, match="distillation needs calibration data"):
        sepify.convert(plain_net, torch.randn(1, 3, 8, 8), distill=10, rank=1)


@pytest.mark.parametrize("order", ["dw-pw", "pw-dw", "pw-dw-pw"])
def test_refined_errors_predict_what_refinement_reaches(order: str) -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 12, 3, padding=1, groups=2).double()
    x = torch.randn(16, 8, 10, 10, dtype=torch.float64)
    predicted = refined_errors(conv, x, order, [1, 2, 3])
    for rank in (1, 2, 3):
        pair = sepify.SeparableConv2d.from_conv(conv, rank, order).double()
        result = refine_pairs(nn.Sequential(conv), nn.Sequential(pair), [("0", pair)], [(x,)], [(x,)])
        assert predicted[rank] == pytest.approx(result.layers["0"][1], rel=1e-3)
    assert predicted[1] > predicted[2] > predicted[3]


def test_the_audit_never_predicts_a_refit_worse_than_keeping_the_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    """Refinement keeps the current weights where its refit is worse (a degenerate bottleneck's ill-conditioned
    regression can be), so the audit's refined prediction is never above the as-built error."""
    import sepify.pipeline.audit as audit_module

    monkeypatch.setattr(audit_module, "refined_errors", lambda conv, x, order, ranks, **_: dict.fromkeys(ranks, 10.0))
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3)).eval()
    audit = sepify.audit(net, torch.randn(2, 3, 12, 12), calibration=torch.randn(16, 3, 12, 12))
    options = [o for layer in audit.candidates for o in layer.options]
    assert options and all(o.refined_error == o.output_error for o in options)


def test_audit_with_calibration_plans_for_the_refinement(digits) -> None:  # type: ignore[no-untyped-def]
    model, x_train, x_test, y_test, original = digits
    audit = sepify.audit(model, x_test[:4], calibration=x_train[:128])
    assert all(o.refined_error is not None for layer in audit.candidates for o in layer.options)
    assert all(o.refined_error <= o.output_error + 1e-9 for layer in audit.candidates for o in layer.options)  # type: ignore[operator]
    plan = audit.plan(max_mac_ratio=0.15)
    result = sepify.convert(model, x_test[:4], plan=plan, calibration=x_train[:256])
    assert result.report.mac_ratio is not None and result.report.mac_ratio <= 0.15
    assert zoo.accuracy(result.model, x_test, y_test) >= original - 0.01


def test_calibration_that_does_not_fit_the_model_is_one_sentence(plain_net: nn.Module) -> None:
    with pytest.raises(sepify.CalibrationError) as info:
        sepify.convert(plain_net, torch.randn(1, 3, 8, 8), calibration=torch.randn(10, 5, 8, 8), rank=1)
    message = str(info.value)
    assert message.startswith("the model failed on calibration batch (10, 5, 8, 8) float32: RuntimeError: ")
    assert message.endswith("; pass calibration samples shaped like the example inputs")


def test_refine_can_be_switched_off(plain_net: nn.Module) -> None:
    x = torch.randn(16, 3, 8, 8)
    stages = sepify.convert(plain_net, x[:1], calibration=sepify.Calibration(x, refine=False), rank=1).report.fidelity
    assert [s.stage for s in stages] == ["init"]


def test_shared_convs_are_not_refit_and_the_report_says_so(skip_net: nn.Module) -> None:
    x = torch.randn(12, 1, 8, 8)
    report = sepify.convert(skip_net, x[:1], calibration=x, rank=1).report
    assert "did not refine shared: it runs at 2 call sites, and the refit fits one" in report.notes


def test_conversion_does_not_depend_on_calibration_order() -> None:
    x = torch.randn(60, 3, 8, 8)
    runs = [
        sepify.convert(_deep_net(), x[:2], rank=1, calibration=data, distill=5)
        for data in (x, x[torch.randperm(60)], x.flip(0))
    ]
    first = runs[0].model.state_dict()
    for run in runs[1:]:
        assert all(torch.equal(first[k], v) for k, v in run.model.state_dict().items())
        assert run.report.fidelity == runs[0].report.fidelity
    audits = [sepify.audit(_deep_net(), x[:2], calibration=data) for data in (x, x.flip(0))]
    assert audits[0].to_dict() == audits[1].to_dict()


def test_near_duplicates_are_held_out_together() -> None:
    # 12 "recordings" of 5 near-identical samples: the held-out share is whole recordings
    base = torch.randn(12, 1, 6)
    x = base.repeat_interleave(5, dim=0) + 1e-4 * torch.randn(60, 1, 6)
    recording = torch.arange(60) // 5
    groups = near_duplicate_groups(x.flatten(1))
    assert len(set(groups)) == 12 and all(groups[i] == groups[5 * (i // 5)] for i in range(60))
    data = calibration_batches(x, heldout_fraction=0.2, group_by=lambda s: near_duplicate_groups(s[0].flatten(1)))
    held = torch.cat([b[0] for b in data.heldout])
    fit = torch.cat([b[0] for b in data.fit])
    held_recordings = {int(recording[(x - h).abs().sum((1, 2)).argmin()]) for h in held}
    fit_recordings = {int(recording[(x - f).abs().sum((1, 2)).argmin()]) for f in fit}
    assert len(held) == 15 and held_recordings.isdisjoint(fit_recordings)


@pytest.mark.parametrize(("big", "small"), [(255, 1), (200, 56), (150, 106), (60, 196)])
def test_a_group_of_most_samples_is_not_held_out(big: int, small: int) -> None:
    """Samples that all answer alike are one near-duplicate "group"; holding it out whole left one sample to fit on.
    The held-out share stays about 20%, or one whole group, and the fit keeps at least a third of the samples."""
    x = torch.randn(big + small, 1, 8)
    x[:big, 0, 0] = 1000.0  # marks the big group's samples

    def groups(samples: tuple[torch.Tensor, ...]) -> list[int]:  # one dominant group, the rest alone
        return [0 if float(v) == 1000.0 else i + 1 for i, v in enumerate(samples[0][:, 0, 0])]

    data = calibration_batches(x, heldout_fraction=0.2, group_by=groups)
    held_rows = torch.cat([b[0] for b in data.heldout])
    held, held_big = len(held_rows), int((held_rows[:, 0, 0] == 1000.0).sum())
    most = (big + small) * 2 // 3
    assert held + sum(b[0].shape[0] for b in data.fit) == big + small and 51 <= held <= most
    if small >= 51:  # whole groups can make up the held-out share
        assert held_big in (0, big)
        if big > most:  # too big to hold out: it is fit on, and singles are held out
            assert (held, held_big) == (51, 0)


def test_samples_a_model_answers_alike_for_are_mostly_fit_on() -> None:
    """The workflow behind the previous test: a random-weight net whose pooled outputs coincide for every input
    (cosine > 0.999) but one holds out about a fifth of its calibration, not all but that one sample."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv1d(4, 8, 5, padding=2), nn.ReLU(), nn.AdaptiveAvgPool1d(1), nn.Flatten()).eval()
    with torch.no_grad():
        net[0].bias.fill_(3.0)  # every output is about the same positive vector
    x = torch.randn(100, 4, 64)
    x[0] *= 100  # but this one answers otherwise (its conv outputs reach below zero)
    result = sepify.convert(net, x[:1], rank=1, calibration=sepify.Calibration(x, refresh_bn=False))
    assert [stage.samples for stage in result.report.fidelity] == [20, 20]


def test_a_few_recordings_do_not_pull_a_layer_off_its_weights() -> None:
    # Calibration cut from 4 "recordings" (16 near-identical samples each): refinement must not make the
    # layer worse on inputs unlike them. Whole recordings are held out, so the data-free share is chosen
    # by how the refit does on recordings it did not see.
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 8, 3, padding=1)).eval()
    recordings = torch.randn(4, 16, 6, 6).repeat_interleave(16, dim=0) + 0.01 * torch.randn(64, 16, 6, 6)
    broad = torch.randn(32, 16, 6, 6)
    plain = sepify.convert(net, broad[:1], rank=1).model
    refined = sepify.convert(net, broad[:1], rank=1, calibration=recordings).model
    with torch.no_grad():
        before = float((plain(broad) - net(broad)).norm() / net(broad).norm())
        after = float((refined(broad) - net(broad)).norm() / net(broad).norm())
    assert after < before  # and it still helps: what the held-out recordings confirm carries over


def test_narrow_calibration_is_reported() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(16, 16, 3)).eval()  # no padding: every patch of a flat image is the same
    channels = torch.randn(64, 2) @ torch.randn(2, 16)  # flat images whose channels lie in one 2-D subspace
    narrow = channels[:, :, None, None].expand(64, 16, 6, 6).contiguous()
    notes = sepify.convert(net, narrow[:1], rank=2, calibration=narrow).report.notes
    assert any(n.startswith("calibration covers little of 0's input space (coverage 0.0") for n in notes), notes
    broad = sepify.convert(net, narrow[:1], rank=2, calibration=torch.randn(64, 16, 6, 6)).report.notes
    assert not any("covers little" in n for n in broad)


def test_outputs_that_are_not_batched_per_sample_skip_the_grouping() -> None:
    from sepify.calibrate.stages import grouped_by_outputs

    class Detections(nn.Module):
        """Returns a variable number of 'boxes' for the whole batch, as detectors do."""

        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3)

        def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
            y = self.conv(x)
            return [y.flatten()[:7], torch.arange(3)]

    x = torch.randn(10, 3, 8, 8)
    assert grouped_by_outputs(Detections())((x,)) == list(range(10))
    duplicates = x[:2].repeat(5, 1, 1, 1)
    conv = nn.Conv2d(3, 4, 3)
    assert len(set(grouped_by_outputs(conv)((duplicates,)))) == 2


def test_batches_of_different_sizes_stay_whole_in_any_order() -> None:
    # an image pyramid: a fully convolutional net takes every size, so every batch is kept as it is
    pyramid = [torch.randn(4, 3, s, s) for s in (12, 10, 8, 6, 5)]
    a, b = calibration_batches(pyramid), calibration_batches(pyramid[::-1])
    assert [x[0].shape for x in a.fit + a.heldout] == [x[0].shape for x in b.fit + b.heldout]
    assert len(a.heldout) == 1 and len(a.fit) == 4 and a.samples == 20
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3)).eval()
    report = sepify.convert(net, pyramid[0][:1], rank=1, calibration=pyramid).report
    assert [s.stage for s in report.fidelity][:2] == ["init", "refined"]


# -- synthetic calibration (no data) -----------------------------------------------------


@pytest.mark.slow  # synthesis on a trained model: seconds
def test_synthetic_calibration_keeps_the_task_where_no_data_cannot(digits) -> None:  # type: ignore[no-untyped-def]
    model, _, x_test, y_test, original = digits
    example = x_test[:4]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    synthetic = sepify.synthesize_calibration(model, example, samples=64)
    assert synthetic.shape == (64, *example.shape[1:]) and bool(torch.isfinite(synthetic).all())
    assert torch.equal(synthetic, sepify.synthesize_calibration(model, example, samples=64))  # deterministic
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # the model is untouched
    assert not model.training and all(p.grad is None for p in model.parameters())
    accuracies = {}
    for label, data in {"none": None, "synthetic": synthetic}.items():
        plan = sepify.audit(model, example, calibration=data).plan(max_mac_ratio=0.3)
        result = sepify.convert(
            model, example, plan=plan, calibration=None if data is None else sepify.Calibration(data, refresh_bn=False)
        )
        assert result.report.mac_ratio is not None and result.report.mac_ratio <= 0.3
        accuracies[label] = zoo.accuracy(result.model, x_test, y_test)
    # measured: 0.3955 without data, 0.9924 with 64 synthetic samples (the original: 0.9924)
    assert accuracies["none"] < 0.6
    assert accuracies["synthetic"] >= original - 0.01


@pytest.mark.slow  # synthesis on a trained model: seconds
def test_calibration_synthetic_is_sugar_with_a_note_and_no_batchnorm_refresh(digits) -> None:  # type: ignore[no-untyped-def]
    model, _, x_test, _, _ = digits
    result = sepify.convert(model, x_test[:4], rank=2, calibration=sepify.Calibration("synthetic", samples=32))
    report = result.report
    assert report.notes[0].startswith("calibrated on 32 synthetic inputs matched to the model's 3 BatchNorm layers'")
    assert [s.stage for s in report.fidelity] == ["init", "refined"]  # no bn-refreshed stage: that would be circular
    assert report.fidelity[1].samples == 6  # 20% of 32 held out
    audit = sepify.audit(model, x_test[:4], calibration="synthetic")
    assert any(n.startswith("calibrated on 64 synthetic inputs") for n in audit.notes)


def test_synthetic_calibration_refuses_models_it_cannot_serve() -> None:
    no_norm = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3)).eval()
    with pytest.raises(sepify.CalibrationError) as info:
        sepify.convert(no_norm, torch.randn(1, 3, 8, 8), calibration="synthetic", rank=1)
    assert str(info.value) == (
        "the model (Sequential) has no BatchNorm layer with running statistics, which synthetic calibration matches; "
        "pass real samples (a few recordings or photos cut into pieces are enough)"
    )
    normed = nn.Sequential(nn.Embedding(10, 4), nn.BatchNorm1d(3)).eval()
    with pytest.raises(sepify.ConfigError, match="synthetic calibration needs a model that takes one floating tensor"):
        sepify.synthesize_calibration(normed, torch.zeros(1, 3, dtype=torch.long))
    with pytest.raises(sepify.ConfigError, match="calibration data must be a tensor, a DataLoader, a list of batches"):
        sepify.Calibration("photos/")


@pytest.mark.parametrize("order", ["dw-pw", "pw-dw"])
@pytest.mark.parametrize("bias", [True, False])
def test_refit_errors_of_every_rank_from_one_factorisation_match_rank_by_rank(order: str, bias: bool) -> None:
    from sepify.calibrate.refine import _prefix_residuals, _residuals_one_by_one

    torch.manual_seed(0)
    conv = nn.Conv2d(6, 5, 3, padding=1, bias=bias)
    pair = sepify.SeparableConv.from_conv(conv, "full", order)
    normal = NormalEquations()
    x = torch.randn(8, 6, 7, 7)
    with torch.no_grad():
        add_to_normals(normal, pair, x, conv(x) + 0.1 * torch.randn(8, 5, 7, 7))
    ranks = list(range(1, pair.rank + 1))
    fast = _prefix_residuals(normal, order, pair.rank, ranks, 1e-6, bias)
    slow = _residuals_one_by_one(normal, order, pair.rank, ranks, 1e-6, bias)
    assert fast is not None and fast.keys() == slow.keys() == set(ranks)
    for r in ranks:
        assert math.isclose(fast[r], slow[r], rel_tol=1e-4, abs_tol=1e-7), (r, fast[r], slow[r])
    assert all(fast[r] >= fast[r + 1] - 1e-12 for r in ranks[:-1])  # more components never fit worse


def test_a_refinement_that_hurts_the_whole_model_is_undone(
    plain_net: nn.Module, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each refit is kept only where it helps its own layer; if together they hurt the model, none is kept."""
    from sepify.calibrate import stages

    real = stages.refine_pairs

    def harmful(teacher, student, order, *args, **kwargs):  # type: ignore[no-untyped-def]
        result = real(teacher, student, order, *args, **kwargs)
        with torch.no_grad():
            for _, pair in order:
                pair.last.weight.mul_(-3.0)
        return result

    x = torch.randn(40, 3, 8, 8)
    closed_form = sepify.convert(plain_net, x[:1], rank=1).model
    monkeypatch.setattr(stages, "refine_pairs", harmful)
    result = sepify.convert(plain_net, x[:1], rank=1, calibration=sepify.Calibration(x, refresh_bn=False))
    assert [s.stage for s in result.report.fidelity] == ["init"]
    assert any(note.startswith("refinement raised the held-out output error (") for note in result.report.notes)
    for name, pair in result.model.named_modules():
        if isinstance(pair, sepify.SeparableConv):  # every pair is back to its closed-form initialisation
            for key, value in pair.state_dict().items():
                torch.testing.assert_close(value, closed_form.get_submodule(name).state_dict()[key])
