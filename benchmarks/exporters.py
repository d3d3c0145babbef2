"""The baseline a latency is compared with: the original as fast as torch.onnx can export it, in onnxruntime.

Run:  python benchmarks/exporters.py [--threads 1] [--batch 8] [--models crepe-tiny digits resnet18]

For each model, the original and a slim plan (``Budget(max_mac_ratio=0.5)``, no calibration: latency only) are
exported by both of torch.onnx's exporters (dynamo, the default since PyTorch 2.9, and TorchScript) and run in
onnxruntime with its default graph optimisations; all four are timed interleaved (median of 30 calls). The last
columns give the slim model's time over the original's as sepify measured it before (dynamo against dynamo) and as
it measures it now (:func:`sepify.runtime.runners.fastest_onnx`: the faster export of each).
"""

from __future__ import annotations

import argparse
import warnings

import torch
from torch import nn

import sepify
from sepify.runtime.export import ONNX_EXPORTERS, onnx_bytes
from sepify.runtime.runners import _onnxruntime, fastest_onnx
from sepify.runtime.timing import interleaved_medians


def models(batch: int) -> dict[str, tuple[nn.Module, torch.Tensor]]:
    from tasks import crepe_task

    import sepify.zoo as zoo

    found: dict[str, tuple[nn.Module, torch.Tensor]] = {}
    found["crepe-tiny"] = (crepe_task("tiny", test_frames=2, calibration_frames=2).build(), torch.randn(batch, 1024))
    found["digits"] = (zoo.digits_cnn(), torch.randn(batch, 1, 16, 16))
    try:
        import torchvision

        found["resnet18"] = (torchvision.models.resnet18().eval(), torch.randn(batch, 3, 112, 112))
    except ImportError:
        pass
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--models", nargs="+", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, onnxruntime, {args.threads} thread(s), batch {args.batch}")
    print(f"{'model':<11} {'orig dynamo':>11} {'orig TS':>9} {'slim dynamo':>11} {'slim TS':>9} "
          f"{'chosen':>19} {'ratio before':>12} {'ratio now':>9}")  # fmt: skip
    for name, (model, x) in models(args.batch).items():
        if args.models and name not in args.models:
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            slim = sepify.convert(model, x[:2], plan=sepify.Budget(max_mac_ratio=0.5)).model
            graphs = [
                onnx_bytes(m, (x,), exporter=e, dynamic_batch=False) for m in (model, slim) for e in ONNX_EXPORTERS
            ]
            chosen = [fastest_onnx(m, (x,), args.threads, dynamic_batch=False)[0] for m in (model, slim)]
        runs = [_onnxruntime(g, [x], args.threads) for g in graphs]
        ms = [1000 * t for t in interleaved_medians(runs, 30, warmup=3)]
        best = {e: ms[i] for i, e in enumerate(ONNX_EXPORTERS)}, {e: ms[2 + i] for i, e in enumerate(ONNX_EXPORTERS)}
        print(f"{name:<11} {ms[0]:>9.2f}ms {ms[1]:>7.2f}ms {ms[2]:>9.2f}ms {ms[3]:>7.2f}ms "
              f"{chosen[0][:6] + '/' + chosen[1][:6]:>19} {ms[2] / ms[0]:>12.3f} "
              f"{best[1][chosen[1]] / best[0][chosen[0]]:>9.3f}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
