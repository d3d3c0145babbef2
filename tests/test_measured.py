"""Errors that see what the task sees: a confident classifier's probabilities saturate, its logits do not."""

from __future__ import annotations

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
