"""Inference latency of converted vs original models, side by side, against the MAC ratio.

Run:  python benchmarks/latency.py [--models resnet50 digits crepe-tiny] [--reps 9] [--compile]

For each model and configuration (batch size x threads x memory format) the
original and its conversions (rank 1, rank 2, and the audit plan at a MAC
budget) are timed interleaved: one call of each in turn, repeated, median of
``--reps`` after warm-up. "realisation" = latency ratio / MAC ratio: 1.0 means
the MAC savings became time savings one for one, above 1 that they did not.
With ``--compile`` each configuration is also timed after ``torch.compile``
(inductor, with freezing), as format "compiled" (compilation is in the warm-up).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
from torch import nn

import sepify
from sepify.runtime.timing import interleaved_medians


def models(names: list[str]) -> dict[str, tuple[nn.Module, tuple[int, ...], float]]:
    """name -> (model, one-sample input shape, plan MAC budget)."""
    out = {}
    for name in names:
        if name == "digits":
            import sepify.zoo as zoo

            out[name] = (zoo.digits_cnn(), (1, 16, 16), 0.5)
        elif name.startswith("crepe-"):
            from tasks import crepe_task

            out[name] = (crepe_task(name.split("-")[1], test_frames=2, calibration_frames=2).build(), (1024,), 0.6)
        else:
            import torchvision

            torch.manual_seed(0)
            out[name] = (torchvision.models.get_model(name, weights=None).eval(), (3, 224, 224), 0.6)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet50", "digits", "crepe-tiny"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--reps", type=int, default=9)
    parser.add_argument(
        "--compile",
        action="store_true",
        help="also time torch.compile(model) with inductor freezing (NCHW), format 'compiled'",
    )
    args = parser.parse_args()
    if args.compile:
        import torch._inductor.config as inductor_config

        # freezing folds BatchNorm into convs and prepacks weights: what one deploys
        inductor_config.freezing = True
    print(f"torch {torch.__version__}; interleaved medians of {args.reps} after warm-up")
    for name, (model, shape, budget) in models(args.models).items():
        example = torch.randn(1, *shape)
        torch.set_num_threads(max(args.threads))
        audit = sepify.audit(model, example)
        try:
            plan = audit.plan(max_mac_ratio=budget)
        except sepify.BudgetError:
            plan = None
        variants = {"rank 1": sepify.convert(model, example, rank=1), "rank 2": sepify.convert(model, example, rank=2)}
        if plan is not None:
            variants[f"plan {budget}"] = sepify.convert(model, example, plan=plan)
        print(f"\n## {name}")
        print(
            f"{'variant':<10} {'batch':>5} {'thr':>3} {'format':<13} {'orig ms':>8} {'conv ms':>8} {'lat ratio':>9} {'MAC ratio':>9} {'realisation':>11}"
        )
        for batch in args.batches:
            for threads in args.threads:
                torch.set_num_threads(threads)
                formats = ["nchw", "channels_last"] if len(shape) == 3 else ["nchw"]
                for fmt in formats + (["compiled"] if args.compile else []):
                    x = torch.randn(batch, *shape)
                    ms = torch.channels_last if fmt == "channels_last" else torch.contiguous_format
                    original = model.to(memory_format=ms)
                    x_in = x.to(memory_format=ms) if x.dim() == 4 else x
                    converted = {k: v.model.to(memory_format=ms) for k, v in variants.items()}
                    if fmt == "compiled":
                        torch._dynamo.reset()
                        original = torch.compile(original)
                        converted = {k: torch.compile(m) for k, m in converted.items()}
                    fns: list[Callable[[], object]] = [lambda o=original, x=x_in: o(x)]
                    fns += [lambda m=m, x=x_in: m(x) for m in converted.values()]
                    with torch.no_grad():
                        times = interleaved_medians(fns, args.reps, warmup=2)
                    for (label, result), t in zip(variants.items(), times[1:]):
                        lat = t / times[0]
                        mac = result.report.mac_ratio or 1.0
                        print(f"{label:<10} {batch:>5} {threads:>3} {fmt:<13} {1e3 * times[0]:>8.2f} {1e3 * t:>8.2f} "
                              f"{lat:>9.3f} {mac:>9.3f} {lat / mac:>11.2f}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
