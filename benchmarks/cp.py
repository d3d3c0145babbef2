"""pw-dw-pw initialisation: sepify's CP (per-channel/HOSVD starts + float64 ALS) vs tensorly's parafac, per layer.

Run:  python benchmarks/cp.py [--threads 1] [--tasks digits crepe-tiny]

For each eligible conv of the trained models and a few bottleneck widths R:
relative weight error ||W - W_hat|| / ||W|| and seconds, for sepify's
CPFactorization and for tensorly.decomposition.parafac (float64,
n_iter_max=100): init="svd" at tensorly's default tolerance (1e-8) and at
1e-6, and init="random" with two seeds at the default. Numpy's BLAS is held
to one thread like torch (set before numpy loads), so both use one core.
Needs the ``bench`` extra (tensorly).
"""

from __future__ import annotations

import argparse
import math
import os
import time
import warnings

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # tensorly runs on numpy: one BLAS thread, like torch's one
os.environ.setdefault("OMP_NUM_THREADS", "1")

import tensorly as tl
import torch
from tasks import crepe_task, digits_task
from tensorly.decomposition import parafac

from sepify.core.cost import exact_rank
from sepify.core.cp import CPFactorization


def tensorly_error(w: torch.Tensor, rank: int, init: str, seed: int, tol: float = 1e-8) -> tuple[float, float]:
    tensor = w.detach().double().reshape(w.shape[0], w.shape[1], -1).numpy()
    start = time.perf_counter()
    cp = parafac(tensor, rank, init=init, n_iter_max=100, random_state=seed, tol=tol)
    elapsed = time.perf_counter() - start
    error = float(tl.norm(tensor - tl.cp_to_tensor(cp)) / tl.norm(tensor))
    return error, elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--tasks", nargs="+", default=["digits", "crepe-tiny"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tl.set_backend("numpy")
    warnings.filterwarnings("ignore", message="Trying to compute SVD")  # tensorly caps its SVD init; expected
    builders = {
        "digits": digits_task,
        "crepe-tiny": lambda: crepe_task("tiny"),
        "crepe-full": lambda: crepe_task("full"),
    }
    print(
        f"{'layer':<18} {'shape':<18} {'R':>4} {'sepify err':>10} {'s':>6} {'tl svd':>8} {'s':>6} "
        f"{'tol 1e-6':>8} {'s':>6} {'tl rand0':>8} {'tl rand1':>8} {'s':>6}"
    )
    warm = torch.randn(8, 4, 3, 3)  # first calls load linear-algebra kernels: not either method's time
    CPFactorization.of(warm, 1, 4), tensorly_error(warm, 4, "svd", 0)
    for name in args.tasks:
        model = builders[name]().build()
        for qualname, conv in model.named_modules():
            if not isinstance(conv, torch.nn.Conv2d) or math.prod(conv.kernel_size) == 1 or conv.groups != 1:
                continue
            w = conv.weight
            limit = exact_rank(conv.in_channels, conv.out_channels, tuple(conv.kernel_size), 1, "pw-dw-pw")
            dense = w.numel()
            break_even = dense // (conv.in_channels + math.prod(conv.kernel_size) + conv.out_channels)
            for rank in sorted({max(1, min(limit, break_even) // d) for d in (8, 4, 2)}):
                start = time.perf_counter()
                ours = CPFactorization.of(w, 1, rank)
                t_ours = time.perf_counter() - start
                svd_err, t_svd = tensorly_error(w, rank, "svd", 0)
                loose_err, t_loose = tensorly_error(w, rank, "svd", 0, tol=1e-6)
                rand0, t_rand = tensorly_error(w, rank, "random", 0)
                rand1, _ = tensorly_error(w, rank, "random", 1)
                label, shape = f"{name}:{qualname}", "x".join(map(str, w.shape))
                print(f"{label:<18} {shape:<18} {rank:>4} {ours.relative_error:>10.4f} {t_ours:>6.2f} "
                      f"{svd_err:>8.4f} {t_svd:>6.2f} {loose_err:>8.4f} {t_loose:>6.2f} "
                      f"{rand0:>8.4f} {rand1:>8.4f} {t_rand:>6.2f}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
