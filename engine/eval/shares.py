"""Evaluation under torchrun: rows dealt round-robin to the ranks, gathered back in order."""

from __future__ import annotations

import torch
import torch.distributed as dist


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def dealt_rows(n: int, rank: int, world: int) -> range:
    """This rank's rows of n: those with i % world == rank."""
    return range(rank, n, world)


def gather_dealt(local: torch.Tensor, n: int, world: int) -> torch.Tensor:
    """Rows dealt round-robin (row i on rank i % world), gathered back in order on every rank."""
    if world == 1:
        return local
    rows = -(-n // world)
    padded = local.new_zeros((rows, *local.shape[1:]))
    padded[:len(local)] = local
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.stack(parts, dim=1).flatten(0, 1)[:n]
