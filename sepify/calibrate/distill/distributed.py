"""The torchrun process group: which process this is, and sums over all of them."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from sepify.errors import ConfigError, first_line

__all__ = ["process_group", "sum_over_processes"]


def process_group() -> tuple[int, int]:
    """``(rank, world)``; starts the process group from torchrun's environment when it is not started yet."""
    if not dist.is_available():
        return 0, 1
    if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        try:
            dist.init_process_group(backend)
        except Exception as e:  # noqa: BLE001 - rendezvous failures are many
            raise ConfigError(
                f"torchrun set WORLD_SIZE={os.environ.get('WORLD_SIZE')} but the process group did not start "
                f"({first_line(e)}); check MASTER_ADDR/MASTER_PORT or --rdzv-endpoint"
            ) from e
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def sum_over_processes(*values: float) -> list[float]:
    """``values`` summed over every process (themselves in a single process)."""
    if not dist.is_initialized():
        return list(values)
    total = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(total)
    return [float(v) for v in total]
