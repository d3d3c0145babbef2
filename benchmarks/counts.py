"""Counting: sepify's per-layer conv MACs and params vs fvcore and ptflops.

Run:  python benchmarks/counts.py

For each model, sums over the convs: sepify's MACs, fvcore's (by module),
ptflops' (its per-module `__flops__`, which include the conv bias), and the
number of convs where each tool disagrees with sepify. fvcore must agree on
every conv; ptflops differs exactly by the bias additions
(Cout x H' x W' per biased conv), which the last column checks.
"""

from __future__ import annotations

import torch
import torchvision
from fvcore.nn import FlopCountAnalysis
from torch import nn

import sepify

MODELS = [
    "resnet18",
    "resnet50",
    "vgg16",
    "densenet121",
    "googlenet",
    "regnet_x_400mf",
    "mobilenet_v2",
    "efficientnet_b0",
]


def ptflops_per_conv(model: nn.Module, x: torch.Tensor) -> dict[str, int]:
    """ptflops' own per-module counts (its module hooks, as get_model_complexity_info uses them)."""
    from ptflops.pytorch_engine import add_flops_counting_methods

    counted = add_flops_counting_methods(model)
    counted.eval()
    counted.start_flops_count(ost=None, verbose=False, ignore_list=[])
    with torch.no_grad():
        counted(x)
    result = {name: int(m.__flops__) for name, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    counted.stop_flops_count()
    return result


def main() -> None:
    torch.set_num_threads(1)
    size = 224
    print(f"input 1x3x{size}x{size}; conv MACs summed over every Conv2d\n")
    print(
        f"{'model':<16} {'convs':>5} {'sepify':>15} {'fvcore':>15} {'fv diff':>7} {'ptflops':>15} {'pt - bias':>15} {'pt diff':>7}"
    )
    for name in MODELS:
        kwargs = {"aux_logits": False, "init_weights": False} if name == "googlenet" else {}
        model = torchvision.models.get_model(name, weights=None, **kwargs).eval()
        x = torch.randn(1, 3, size, size)
        report = sepify.convert(model, x, rank=1).report
        ours = {r.name: r.macs_before for r in report.layers}
        fv = FlopCountAnalysis(model, x).unsupported_ops_warnings(False).uncalled_modules_warnings(False).by_module()
        pt = ptflops_per_conv(model, x)
        bias = {r.name: (r.out_channels * r.output_size[0] * r.output_size[1] if r.bias and r.output_size else 0)
                for r in report.layers}  # fmt: skip
        fv_diff = sum(1 for n in ours if fv.get(n, -1) != ours[n])
        pt_diff = sum(1 for n in ours if pt.get(n, -1) - bias[n] != ours[n])
        print(f"{name:<16} {len(ours):>5} {sum(ours.values()):>15,} {sum(fv[n] for n in ours):>15,} {fv_diff:>7} "
              f"{sum(pt[n] for n in ours):>15,} {sum(pt[n] - bias[n] for n in ours):>15,} {pt_diff:>7}")  # fmt: skip


if __name__ == "__main__":
    main()
