"""Tensor parallelism: which rank of how many this process is, and the two collectives a
Megatron-sharded model needs (sum the row-parallel products, gather the vocabulary's
logits). At size 1 there is no process group and every collective returns its input.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class TensorParallel:
    rank: int = 0
    size: int = 1
    group: dist.ProcessGroup | None = None

    @classmethod
    def of_world(cls, size: int) -> TensorParallel:
        """This process's place in a group of `size` ranks: the default process group,
        which whoever started the ranks has initialised (see init_process_group)."""
        if size == 1:
            return cls()
        if not dist.is_initialized() or dist.get_world_size() != size:
            found = dist.get_world_size() if dist.is_initialized() else "none"
            raise ValueError(f"tensor_parallel_size {size} needs torch.distributed initialised "
                             f"with {size} ranks (found {found})")
        return cls(dist.get_rank(), size, dist.group.WORLD)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum x over the ranks, in place."""
        if self.size > 1:
            dist.all_reduce(x, group=self.group)
        return x

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """Every rank's x side by side along the last dimension (rank order)."""
        if self.size == 1:
            return x
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x, group=self.group)
        return torch.cat(parts, dim=-1)


# One process, no group: the default of every model class (frozen, so safe to share).
SINGLE = TensorParallel()


def init_process_group(rank: int, size: int, init_method: str, device: torch.device,
                       timeout: float = 60.0) -> None:
    """Join the default process group: gloo on CPU, NCCL on CUDA. The timeout bounds every
    collective, so a rank that dies cannot leave the others waiting forever."""
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=init_method,
                            rank=rank, world_size=size, timeout=timedelta(seconds=timeout))
