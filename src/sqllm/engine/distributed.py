"""Data-parallel calibration with ``torch.distributed`` (launched by ``torchrun --nproc-per-node N``).

Each rank runs its share of the calibration windows through the same blocks; the sums the methods
need (Hessian ``X^T X`` and its token count, the Fisher's squared gradients) are all-reduced, so every
rank holds what a single process would have summed over all windows, up to the order of the fp32
additions. Rank 0 solves and writes; the other ranks receive the solved weights by broadcast where the
next block's inputs depend on them. Without an initialized process group every function here is the
single-process identity.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as tdist
from torch import Tensor

from ..errors import InvalidConfig


def active() -> bool:
    return tdist.is_available() and tdist.is_initialized() and tdist.get_world_size() > 1


def rank() -> int:
    return tdist.get_rank() if active() else 0


def world_size() -> int:
    return tdist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def launched_by_torchrun() -> bool:
    """Whether the environment describes a multi-process launch (``WORLD_SIZE`` > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_env(device: torch.device) -> None:
    """Join the process group ``torchrun`` describes (gloo on CPU, nccl on CUDA); a no-op when not
    launched by torchrun or already joined. On CUDA each rank takes the GPU of its local rank."""
    if not launched_by_torchrun() or (tdist.is_available() and tdist.is_initialized()):
        return
    if not tdist.is_available():
        raise InvalidConfig("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    tdist.init_process_group(backend=backend)


def shard_windows(windows: Tensor) -> Tensor:
    """This rank's contiguous share of ``windows [n, L]``; InvalidConfig when some rank would get none."""
    n, size = windows.shape[0], world_size()
    if n < size:
        raise InvalidConfig(f"{n} calibration windows cannot be split over {size} ranks; pass --nsamples >= {size}")
    return windows.tensor_split(size)[rank()]


def all_reduce_(t: Tensor) -> Tensor:
    """Sum ``t`` over the ranks, in place."""
    if active():
        tdist.all_reduce(t, op=tdist.ReduceOp.SUM)
    return t


def broadcast_(t: Tensor) -> Tensor:
    """Rank 0's ``t`` on every rank, in place."""
    if active():
        tdist.broadcast(t, src=0)
    return t


def reduce_accumulator(acc: Any) -> None:
    """Sum an accumulator's state over the ranks (it must define ``all_reduce(fn)``); one that cannot be
    summed (a sample of rows) is refused under data parallelism."""
    if not active():
        return
    reduce = getattr(acc, "all_reduce", None)
    if reduce is None:
        raise InvalidConfig(f"{type(acc).__name__} statistics cannot be split across ranks; run this method "
                            "in one process")
    reduce(all_reduce_)


def finish() -> None:
    """Wait for every rank, then leave the process group (a no-op in one process)."""
    if active():
        tdist.barrier()
        tdist.destroy_process_group()
