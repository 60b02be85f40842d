"""Data-parallel "world" for ``train_drafter(world=...)``: rank, size and a summing all-reduce.

``TorchWorld`` wraps a ``torch.distributed`` process group (gloo on CPU, nccl on GPU). Any object with
``rank``, ``size`` and ``all_reduce_sum(tensor) -> tensor`` will do (e.g. a fake for tests).
"""
from __future__ import annotations

from datetime import timedelta

import torch
import torch.distributed as dist


class TorchWorld:
    def __init__(self, rank: int, size: int, device: str = "cpu"):
        self.rank, self.size, self.device = rank, size, torch.device(device)

    @staticmethod
    def init(rank: int, size: int, init_method: str, *, backend: str | None = None, device: str = "cpu",
             timeout_s: float = 120.0) -> "TorchWorld":
        """Join (or start) the process group at ``init_method`` (e.g. ``tcp://host:port``)."""
        if backend is None:
            backend = "nccl" if torch.device(device).type == "cuda" else "gloo"
        if dist.is_initialized():
            dist.destroy_process_group()
        dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=size,
                                timeout=timedelta(seconds=timeout_s))
        return TorchWorld(rank, size, device)

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        buf = t.detach().to(self.device).contiguous().clone()
        dist.all_reduce(buf, op=dist.ReduceOp.SUM)
        return buf.to(t.device)

    def barrier(self) -> None:
        dist.barrier()

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()
