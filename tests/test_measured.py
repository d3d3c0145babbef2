"""Errors that see what the task sees: a confident classifier's probabilities saturate, its logits do not."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import sepify
from sepify.graph.measured import output_view
from sepify.graph.tracing import trace_model
from sepify.zoo import digits_cnn, digits_data


class Scale(nn.Module):
    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.factor


def confident() -> nn.Module:
    """The trained digits CNN made certain: logits x100, then a softmax (a median peak probability of 1.0)."""
    return nn.Sequential(digits_cnn(), Scale(100.0), nn.Softmax(dim=1)).eval()


def test_a_saturated_classifier_is_measured_on_its_logits() -> None:
    model = confident()
    _, _, x_test, _ = digits_data()
    example = x_test[:4]  # what a user passes: a few real samples, all classified with certainty
    result = sepify.convert(model, example, rank=5, select=sepify.Selection(include=["0.3"]))
    with torch.no_grad():
        changed = float((result.model(x_test).argmax(1) != model(x_test).argmax(1)).float().mean())
        on_probabilities = float((result.model(example) - model(example)).norm() / model(example).norm())
    assert changed > 0.05  # the conversion changes the decision on more than 5% of the test set ...
    assert on_probabilities == 0.0  # ... where the probabilities of the example inputs do not move at all
    report = result.report
    assert report.measured_on == "the inputs of the final softmax (logits)"
    assert report.output_error is not None and report.output_error > 0.1  # the logits do
    assert "output error (on the inputs of the final softmax (logits)): " in report.to_text()
    audit = sepify.audit(model, example)
    assert all(layer.model_error_rank1 is not None and layer.model_error_rank1 > 0.05 for layer in audit.candidates)
    assert (
        "whole-model errors measured on the inputs of the final softmax (logits): the outputs saturate" in audit.notes
    )


def test_which_outputs_are_seen_before_their_activation() -> None:
    class Heads(nn.Module):
        def __init__(self, scale: float) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.scale = scale

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
            y = self.conv(x).mean((2, 3)) * self.scale
            return torch.sigmoid(y), y.log_softmax(1), y * 2

    x = torch.randn(8, 3, 10, 10)
    gm = trace_model(Heads(1e6)).graph_module  # logits in the millions: every probability is 0 or 1
    assert gm is not None
    view = output_view(gm, (x,))
    assert view is not None and len(view.replaced) == 2  # the sigmoid and the log-softmax; the plain output stays
    assert view.description == "the inputs of the final log_softmax and sigmoid (logits)"
    calm = trace_model(Heads(1.0)).graph_module  # probabilities in between: measured as they are
    assert calm is not None and output_view(calm, (x,)) is None
    plain = trace_model(nn.Sequential(nn.Conv2d(3, 4, 3))).graph_module
    assert plain is not None and output_view(plain, (x,)) is None


class TwoHeads(nn.Module):
    """Two outputs of different scale: a small one from a conv that rank 1 ruins, a large one it barely touches."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.fine = nn.Conv2d(8, 8, 3, padding=1)
        self.logits = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = torch.relu(self.stem(x))
        probabilities = torch.softmax(self.logits(features.mean((2, 3))) * 1000, dim=1)
        return self.fine(features) * 0.01, probabilities


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).double().norm() / b.double().norm())


def test_measure_on_an_output_index_a_node_or_the_raw_outputs() -> None:
    model, x = TwoHeads().eval(), torch.randn(16, 3, 12, 12)
    with torch.no_grad():
        original = model(x)
    for index in (0, 1, -1):
        result = sepify.convert(model, x, rank=1, measure_on=index)
        with torch.no_grad():
            want = _relative(result.model(x)[index], original[index])
        assert result.report.output_error == pytest.approx(want, rel=1e-6)
        assert result.report.measured_on == f"output {index % 2}"
    # a module's name: its output alone (the classifier's logits, before the x1000 and the softmax)
    result = sepify.convert(model, x, rank=1, measure_on="logits")
    with torch.no_grad():
        want = _relative(result.model.logits(torch.relu(result.model.stem(x)).mean((2, 3))),
                         model.logits(torch.relu(model.stem(x)).mean((2, 3))))  # fmt: skip
    assert result.report.output_error == pytest.approx(want, rel=1e-6)
    assert "output error (on logits): " in result.report.to_text()
    # "outputs": as returned, the saturated probabilities included (the automatic view would use their logits)
    raw = sepify.convert(model, x, rank=1, measure_on="outputs").report
    auto = sepify.convert(model, x, rank=1).report
    assert raw.measured_on is None and auto.measured_on is not None and auto.measured_on.startswith("the inputs")


def test_the_audit_measures_where_it_is_told() -> None:
    model, x = TwoHeads().eval(), torch.randn(16, 3, 12, 12)
    on_fine = sepify.audit(model, x, measure_on=0)
    on_probabilities = sepify.audit(model, x, measure_on=1)
    fine = {layer.name: layer.model_error_rank1 for layer in on_fine.candidates}
    probs = {layer.name: layer.model_error_rank1 for layer in on_probabilities.candidates}
    # `fine` feeds output 0 only: invisible from the probabilities, plain on its own output
    assert probs["fine"] == 0.0 and fine["fine"] is not None and fine["fine"] > 0.05
    assert "whole-model errors measured on output 0" in on_fine.notes
    # a budget plans on the same view: `fine` cannot move output 1, so even a tight error budget slims it
    result = sepify.convert(model, x, plan=sepify.Budget(max_error=0.01), measure_on=1)
    assert result.report.measured_on == "output 1"
    assert "fine" in {row.name for row in result.report.converted}


def test_what_cannot_be_measured_is_refused_with_a_sentence() -> None:
    model, x = TwoHeads().eval(), torch.randn(2, 3, 12, 12)
    with pytest.raises(sepify.ConfigError, match=r"measure_on=2 is not an output: .* 2 floating-point .* 0 to 1"):
        sepify.convert(model, x, rank=1, measure_on=2)
    with pytest.raises(sepify.ConfigError, match=r"measure_on='head' is neither a node nor a module .* fine"):
        sepify.convert(model, x, rank=1, measure_on="head")
    with pytest.raises(sepify.ConfigError, match=r"measure_on must be an output index"):
        sepify.audit(model, x, measure_on=1.5)  # type: ignore[arg-type]

    class WithClasses(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            y = self.conv(x)
            return y, y.argmax(1)

    with pytest.raises(sepify.ConfigError, match=r"measure_on='argmax' is node argmax, whose value is Tensor, not a "):
        sepify.convert(WithClasses(), x, rank=1, measure_on="argmax")
