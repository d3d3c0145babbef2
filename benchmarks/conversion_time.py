"""Conversion time and memory: sepify.convert on torchvision models, and scaling with layer count.

Run:  python benchmarks/conversion_time.py [--threads 1]

Prints, per model: the whole convert() call (trace + two probes + factorise +
rewrite + verification) and the closed-form part alone (per-channel SVD and
building every SeparableConv2d, i.e. what conversion costs beyond tracing and
running the model), at rank 1 and rank "full"; then a synthetic stack of N
convs for N = 125, 250, 500 to show time grows linearly; then peak RSS of a
fresh process converting each model, next to the model's size.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch
from torch import nn

import sepify

MODELS = ["resnet50", "vgg16", "densenet121", "efficientnet_b0", "convnext_tiny"]


def build(name: str) -> nn.Module:
    import torchvision

    torch.manual_seed(0)
    return torchvision.models.get_model(name, weights=None).eval()


def closed_form_seconds(model: nn.Module, names: list[str], rank: int | str) -> float:
    convs = [model.get_submodule(n) for n in names]
    t0 = time.perf_counter()
    for conv in convs:
        sepify.SeparableConv2d.from_conv(conv, rank, "dw-pw")
    return time.perf_counter() - t0


def median_time(fn, reps: int = 3) -> float:  # type: ignore[no-untyped-def]
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def peak_rss_mb(build_model: str, input_shape: tuple[int, ...], warm: bool) -> tuple[float, float, float]:
    """(model MB, RSS before convert, peak RSS during convert) in a fresh process.

    ru_maxrss is useless here (importing the CUDA build of torch peaks far
    above any model), so a thread samples /proc/self/statm every millisecond.
    ``warm``: before measuring, convert a tiny model once and run the model's
    forward once, as any process that has used the model has; "cold" counts
    that one-off growth (oneDNN and allocator caches, lazy imports) too.
    """
    code = f"""
import os, threading, time, json, torch, torchvision, sepify
from torch import nn
torch.set_num_threads(1)
page = os.sysconf("SC_PAGE_SIZE")
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * page / 2**20
m = {build_model}
x = torch.randn{input_shape!r}
size_mb = sum(p.numel() * p.element_size() for p in m.parameters()) / 2**20
if {warm!r}:
    sepify.convert(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU()).eval(), torch.randn(1, 3, 8, 8))
    with torch.no_grad():
        m(x)
base = rss()
peak = [base]
done = threading.Event()
def sample():
    while not done.is_set():
        peak[0] = max(peak[0], rss())
        time.sleep(0.001)
t = threading.Thread(target=sample, daemon=True); t.start()
sepify.convert(m, x, rank=1)
done.set(); t.join()
print(json.dumps([size_mb, base, peak[0]]))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return tuple(json.loads(out.strip().splitlines()[-1]))  # type: ignore[return-value]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--size", type=int, default=224, help="input height/width")
    parser.add_argument("--memory-only", action="store_true", help="skip the timings")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    x = torch.randn(1, 3, args.size, args.size)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), input 1x3x{args.size}x{args.size}\n")

    if not args.memory_only:
        timings(x)
    memory(args.size)


def timings(x: torch.Tensor) -> None:
    print(
        f"{'model':<16} {'convs':>5} {'convert r=1':>12} {'closed-form r=1':>16} {'convert full':>13} {'closed-form full':>17}"
    )
    for name in MODELS:
        model = build(name)
        result = sepify.convert(model, x, rank=1)
        names = [r.name for r in result.report.converted]
        t_conv1 = median_time(lambda m=model: sepify.convert(m, x, rank=1))
        t_cf1 = median_time(lambda m=model: closed_form_seconds(m, names, 1))  # noqa: B023 (called at once)
        t_convf = median_time(lambda m=model: sepify.convert(m, x, rank="full"))
        t_cff = median_time(lambda m=model: closed_form_seconds(m, names, "full"))  # noqa: B023 (called at once)
        print(f"{name:<16} {len(names):>5} {t_conv1:>11.3f}s {t_cf1:>15.3f}s {t_convf:>12.3f}s {t_cff:>16.3f}s")

    print("\nscaling: a stack of N Conv2d(32, 32, 3) on 1x32x8x8, rank 1")
    print(f"{'N':>5} {'convert':>9} {'per conv':>10} {'closed-form':>12}")
    for n in (125, 250, 500):
        stack = nn.Sequential(*[nn.Conv2d(32, 32, 3, padding=1) for _ in range(n)]).eval()
        xs = torch.randn(1, 32, 8, 8)
        t = median_time(lambda s=stack, xs=xs: sepify.convert(s, xs, rank=1))
        cf = median_time(lambda s=stack, n=n: closed_form_seconds(s, [str(i) for i in range(n)], 1))
        print(f"{n:>5} {t:>8.3f}s {1e3 * t / n:>8.2f}ms {cf:>11.3f}s")


def memory(size: int) -> None:
    print(
        "\npeak memory of one convert(rank=1) in a fresh process, above the RSS before it (MB, and x the model's size)"
    )
    print(f"{'model':<20} {'params MB':>10} {'cold':>8} {'x model':>8} {'warm':>8} {'x model':>8}")
    models = [
        (name, f"torchvision.models.get_model({name!r}, weights=None).eval()", (1, 3, size, size)) for name in MODELS
    ]
    models += [
        (f"stack of {n} 128ch", f"nn.Sequential(*[nn.Conv2d(128, 128, 3, padding=1) for _ in range({n})]).eval()",
         (1, 128, 16, 16))
        for n in (125, 250, 500)
    ]  # fmt: skip
    for name, build_model, shape in models:
        size_mb, cold_base, cold_peak = peak_rss_mb(build_model, shape, warm=False)
        _, warm_base, warm_peak = peak_rss_mb(build_model, shape, warm=True)
        cold, warm = cold_peak - cold_base, warm_peak - warm_base
        print(f"{name:<20} {size_mb:>10.1f} {cold:>8.1f} {cold / size_mb:>7.2f}x {warm:>8.1f} {warm / size_mb:>7.2f}x")


if __name__ == "__main__":
    main()
