"""Whole-model and per-layer latency of converted models in each latency backend, side by side.

Run:  python benchmarks/backends.py [--models resnet18 resnet50] [--batch 8] [--threads 1]

For each model (random weights) converted at rank 1 (dw-pw), sepify times the
original and the converted model in eager PyTorch, torch.compile, onnxruntime and OpenVINO
(``Timing(backend=...)``), interleaved medians; "+skip" converts only the
layers whose pair that backend timed faster (``skip_slower``). Realisation =
latency ratio / MAC ratio: 1.0 when the MAC savings became time savings one
for one.
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torchvision

import sepify


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["resnet18", "resnet50"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--backends", nargs="+", default=None, help="only these backends")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"batch {args.batch}, {args.size}px, {args.threads} thread(s), {args.reps} reps, rank 1 dw-pw")
    print(
        f"{'model':<10} {'backend':<18} {'original':>9} {'converted':>9} {'latency':>8} {'MACs':>6} {'realis.':>7} "
        f"{'layer realis. (median, max)':>28}"
    )
    for name in args.models:
        torch.manual_seed(0)
        model = torchvision.models.get_model(name, weights=None).eval()
        x = torch.randn(args.batch, 3, args.size, args.size)
        backends = ("eager", "compile", "onnxruntime", "openvino")
        for backend, skip in [(b, s) for b in backends for s in (False, True)]:
            if args.backends and backend not in args.backends:
                continue
            timing = sepify.Timing(backend=backend, threads=args.threads, reps=args.reps, skip_slower=skip)
            report = sepify.convert(model, x, rank=1, timing=timing).report
            before, after = report.latency_before, report.latency_after
            assert before and after and report.mac_ratio
            ratio = after / before
            layers = [r.realisation for r in report.converted if r.realisation is not None]
            print(
                f"{name:<10} {backend + (' +skip' if skip else ''):<18} {1e3 * before:>7.1f}ms {1e3 * after:>7.1f}ms {ratio:>8.3f} "
                f"{report.mac_ratio:>6.3f} {ratio / report.mac_ratio:>7.2f} "
                f"{statistics.median(layers):>19.2f}, {max(layers):.2f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
