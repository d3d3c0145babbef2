"""Quick start: convert torchvision's resnet18 (random weights) and print the report.

Run:  python examples/quickstart.py
"""

from __future__ import annotations

import torch
from torchvision.models import resnet18

import sepify


def main() -> None:
    torch.manual_seed(0)
    model = resnet18().eval()  # weights=None: random weights, no download
    x = torch.randn(1, 3, 224, 224)

    # 1. Exact: at full rank every pair reproduces its conv.
    exact = sepify.convert(model, x, rank="full", order="auto")
    print(f"rank='full': output error {exact.report.output_error:.2e} (float32 round-off)")

    # 2. Cheap: rank 1 everywhere (MobileNet-style), with the per-layer report.
    result = sepify.convert(model, x, rank=1)
    print(result.report)
    result.report.to_json("resnet18.sep.json")
    print("wrote resnet18.sep.json")


if __name__ == "__main__":
    main()
