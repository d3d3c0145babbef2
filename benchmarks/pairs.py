"""Is every pair faster than the conv it replaces? Per-layer and whole-model times on the real trained models.

Run:  python benchmarks/pairs.py [--models digits crepe-tiny crepe-full pnet rnet onet] [--threads 1] [--reps 9]

For each model, rank 1-4 and order, ``sepify.convert(..., timing=True)``
times every pair against its conv at the layer's real input shape (pairs in
their fastest layout). "faster" counts the pairs that beat their conv. Then
three models are timed side by side, interleaved: the original, every
candidate converted ("all"), and only the pairs that were faster ("faster
only", what ``convert(..., timing=Timing(skip_slower=True))`` keeps). Needs the ``bench``
extra and ``pip install --no-deps facenet-pytorch`` for the MTCNN nets.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

import sepify
from sepify.runtime.timing import interleaved_medians

BATCH = 8


def models(names: list[str]) -> dict[str, tuple[nn.Module, torch.Tensor]]:
    """name -> (trained model in eval mode, input batch it is timed on)."""
    out: dict[str, tuple[nn.Module, torch.Tensor]] = {}
    for name in names:
        if name == "digits":
            import sepify.zoo as zoo

            out[name] = (zoo.digits_cnn(), torch.randn(BATCH, 1, 16, 16))
        elif name.startswith("crepe-"):
            from tasks import crepe_task

            task = crepe_task(name.split("-")[1], test_frames=BATCH, calibration_frames=2)
            out[name] = (task.build(), torch.randn(BATCH, 1024))
        else:  # MTCNN's three nets at the input sizes the detector feeds them
            from facenet_pytorch import MTCNN

            net = getattr(MTCNN(device="cpu"), name).eval()
            shape = {"pnet": (1, 3, 240, 320), "rnet": (32, 3, 24, 24), "onet": (BATCH, 3, 48, 48)}[name]
            out[name] = (net, torch.randn(shape))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["digits", "crepe-tiny", "crepe-full", "pnet", "rnet", "onet"])
    parser.add_argument("--ranks", nargs="+", type=int, default=[1, 2, 3, 4])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--reps", type=int, default=9)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}; {args.threads} thread(s); interleaved medians of {args.reps} after warm-up")
    print(f"{'model':<11} {'input':<16} {'rank':>4} {'order':<6} {'faster':>7} {'pairs/convs':>11} "
          f"{'all: time':>9} {'MACs':>6} {'faster only: time':>17} {'MACs':>6}")  # fmt: skip
    for name, (model, x) in models(args.models).items():
        for rank in args.ranks:
            for order in ("dw-pw", "pw-dw"):
                every = sepify.convert(model, x, rank=rank, order=order, timing=sepify.Timing(reps=args.reps))
                rows = every.report.converted
                faster = [r for r in rows if (r.latency_ratio or 1.0) < 1.0]
                plan = sepify.Plan(
                    {k: v for k, v in every.report.to_plan().layers.items() if k in {r.name for r in faster}}
                )
                kept = sepify.convert(model, x, plan=plan) if faster else None
                pair_time = sum(r.latency_after or 0.0 for r in rows)
                conv_time = sum(r.latency_before or 0.0 for r in rows)
                fns = [lambda m=m, x=x: m(x) for m in (model, every.model, *([kept.model] if kept else []))]
                with torch.no_grad():
                    times = interleaved_medians(fns, args.reps, warmup=2)
                kept_cell = (
                    f"{times[2] / times[0]:>17.3f} {kept.report.mac_ratio or 1.0:>6.3f}"
                    if kept
                    else f"{'(none)':>17} {'':>6}"
                )
                print(f"{name:<11} {'x'.join(map(str, x.shape)):<16} {rank:>4} {order:<6} "
                      f"{len(faster):>3}/{len(rows):<3} {pair_time / conv_time:>11.3f} "
                      f"{times[1] / times[0]:>9.3f} {every.report.mac_ratio or 1.0:>6.3f} {kept_cell}",
                      flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
