"""Data-parallel audits on torch.distributed (torchrun): shard sequences, merge on rank 0.

``torchrun --nproc-per-node N -m attn_audit MODEL ...`` sets RANK / WORLD_SIZE; each rank audits
a contiguous block of the sequences of every length, then rank 0 gathers the accumulator states
(plain numpy arrays) and merges them with :meth:`Accumulator.merge_state`, which gives the same
figures as one process (counts and k exactly, sums up to float order, the same reservoir). Only
rank 0 assembles, verifies and writes; the other ranks write nothing. The backend is gloo on
CPU and nccl on GPUs.
"""

from __future__ import annotations

import os
from typing import Any


def world() -> tuple[int, int]:
    """(world size, rank); (1, 0) outside torchrun."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def init_from_env(device: str) -> tuple[int, int]:
    """Initialise the process group when launched by torchrun; return (world size, rank)."""
    import torch.distributed as dist

    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1 or not dist.is_available():
        return 1, 0
    if not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        dist.init_process_group(backend=backend)
        if device.startswith("cuda"):
            import torch

            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return world()


def shard(n: int, size: int, rank: int) -> tuple[int, int]:
    """The contiguous block [start, stop) of n items that ``rank`` of ``size`` handles."""
    per = -(-n // size)
    start = min(n, rank * per)
    return start, min(n, start + per)


def gather_states(state: dict[str, Any]) -> list[dict[str, Any]] | None:
    """Gather every rank's state on rank 0 (None on the other ranks)."""
    import torch.distributed as dist

    size, rank = world()
    if size == 1:
        return [state]
    out: list[Any] | None = [None] * size if rank == 0 else None
    dist.gather_object(state, out, dst=0)
    return out


def barrier() -> None:
    import torch.distributed as dist

    if world()[0] > 1:
        dist.barrier()


def shutdown() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
