"""Report rendering: table, JSON, CSV and Markdown carry the same numbers."""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

import pytest
import torch
from torch import nn

import sepify
from sepify import ConversionReport, format_count


@pytest.fixture
def report(plain_net: nn.Module, example_input: torch.Tensor) -> ConversionReport:
    return sepify.convert(plain_net, example_input, rank=2).report


@pytest.mark.parametrize(
    ("n", "text"),
    [(0, "0"), (999, "999"), (1000, "1.00K"), (11_689_512, "11.69M"), (1_813_561_344, "1.81G"), (None, "-")],
)
def test_format_count(n: int | None, text: str) -> None:
    assert format_count(n) == text


def test_table_has_a_row_per_conv_and_totals(report: ConversionReport) -> None:
    assert max(len(line) for line in str(report).splitlines()) <= 100  # print(report): the compact view
    text = report.to_text()  # every column
    lines = text.splitlines()
    assert lines[0].split()[:5] == ["layer", "kind", "status", "Cin", "Cout"]
    body = lines[2 : 2 + len(report.layers)]
    assert [line.split()[0] for line in body] == [r.name for r in report.layers]
    assert "body.3    skip: pointwise" in text or "skip: pointwise" in body[3]
    assert f"converted 3 of {len(report.layers)} convs (mode: fx; inputs: (2, 3, 16, 16) float32)" in text
    assert f"params: {format_count(report.params_before)} -> {format_count(report.params_after)}" in text
    assert "top-1 agreement:" in text


def test_json_round_trips_raw_integers(report: ConversionReport, tmp_path: Path) -> None:
    path = tmp_path / "r.json"
    text = report.to_json(path)
    assert path.read_text() == text
    data = json.loads(text)
    assert data["totals"]["macs_before"] == report.macs_before
    assert data["totals"]["conv_macs_after"] == report.conv_macs_after
    first = data["layers"][0]
    assert first["name"] == "stem" and first["kernel_size"] == [3, 3] and first["rank"] == 2
    assert data["layers"][3]["skip_reason"] == "pointwise"
    assert oct(os.stat(path).st_mode & 0o777) != oct(0o600)  # not mkstemp's owner-only mode


def test_csv_has_one_row_per_conv(report: ConversionReport) -> None:
    rows = list(csv.DictReader(io.StringIO(report.to_csv())))
    assert [r["name"] for r in rows] == [r.name for r in report.layers]
    assert rows[1]["kernel_size"] == "3x5" and int(rows[1]["macs_before"]) == report.layers[1].macs_before
    assert rows[3]["skip_reason"] == "pointwise" and rows[3]["rank"] == ""


def test_markdown_table(report: ConversionReport) -> None:
    md = report.to_markdown()
    lines = md.splitlines()
    assert lines[0].startswith("| layer | kind | status |")
    assert lines[1].startswith("|---|")
    assert len([line for line in lines if line.startswith("| ")]) == 1 + len(report.layers)
    assert "- converted 3 of" in md


def test_layer_lookup_names_missing_conv(report: ConversionReport) -> None:
    with pytest.raises(KeyError, match="no conv named 'nope' in this report"):
        report.layer("nope")


def test_output_error_is_the_worst_output_and_undefined_errors_say_why() -> None:
    class TwoScales(torch.nn.Module):
        """A large output beside a small one: one pooled ratio would be the large one's alone."""

        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.c = torch.nn.Conv2d(3, 8, 3)
            self.d = torch.nn.Conv2d(8, 4, 3)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            y = self.d(self.c(x))
            return 1000 * y.mean((2, 3)), y - y.mean((2, 3), keepdim=True)

    x = torch.randn(1, 3, 12, 12)
    report = sepify.convert(TwoScales().eval(), x, rank=1).report
    first, second = report.output_errors
    assert first is not None and second is not None and report.output_error == max(first, second)
    assert report.to_dict()["verification"]["output_errors"] == [first, second]
    assert f"(the worst of 2 outputs: {first:.2e}, {second:.2e})" in str(report)
    zeros = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, bias=False), torch.nn.Conv2d(8, 4, 3, bias=False)).eval()
    silent = sepify.convert(zeros, torch.zeros(1, 3, 12, 12), rank=1).report
    assert silent.output_error is None
    assert "output error: - (the original model's outputs on the example inputs are all zeros)" in str(silent)
