"""Gradient clipping: the official per-parameter rule or a global norm, on the device.

Works on FSDP2's sharded gradients (DTensors): the norms of all local shards are summed by
one all-reduce. `clip_gradients_official` is the official code's way, one host read per
parameter: the benchmark's baseline.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.distributed as dist
from torch import nn

from dinofuse.kernels._runtime import local_shard


def clip_gradients(model: nn.Module, clip: float, mode: str) -> torch.Tensor | float:
    """Official per-parameter clipping (each parameter's norm to `clip`) or global norm.
    Returns the global gradient norm before clipping (for the log), on the device: no sync."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return 0.0
    local = [local_shard(g) for g in grads]
    norms = gradient_norms(grads, local)
    if clip > 0 and mode == "global":
        coef = (clip / (norms.norm(2) + 1e-6)).clamp(max=1.0)  # clip_grad_norm_'s formula
        torch._foreach_mul_(local, coef)
    elif clip > 0:
        coefs = (clip / (norms + 1e-6)).clamp(max=1.0)  # on the device: no host sync
        torch._foreach_mul_(local, list(coefs.unbind()))
    return norms.norm(2)


def gradient_norms(grads: list[torch.Tensor], local: list[torch.Tensor]) -> torch.Tensor:
    """Each gradient's L2 norm (float32, on the device). FSDP2 gradients are DTensors sharded
    over the ranks (one mesh dimension): the local squared norms of all of them are summed
    by one all-reduce, not one collective per parameter. A replicated or plain gradient's
    local norm is already its norm."""
    squares = torch.stack([n.float() for n in torch._foreach_norm(local)]) ** 2
    sharded = [any(p.is_shard() for p in getattr(g, "placements", ())) for g in grads]
    if any(sharded):
        mesh = next(g.device_mesh for g, s in zip(grads, sharded) if s)
        mask = _device_mask(tuple(sharded), squares.device)
        summed = torch.where(mask, squares, 0.0)
        dist.all_reduce(summed, group=mesh.get_group())
        squares = torch.where(mask, summed, squares)
    return squares.sqrt()


@functools.lru_cache(maxsize=8)
def _device_mask(flags: tuple[bool, ...], device: torch.device) -> torch.Tensor:
    """A bool tensor on the device, made once (a copy from the host would sync every step)."""
    return torch.tensor(flags, device=device)


def clip_gradients_official(model: nn.Module, clip: float) -> float:
    """The official `clip_gradients`: each parameter's norm read on the host, one sync per
    parameter (the baseline that `clip_gradients` replaces). Returns the global norm."""
    norms = []
    for p in model.parameters():
        if p.grad is None:
            continue
        norm = float(_full(p.grad.detach().norm(2)))
        norms.append(norm)
        coef = clip / (norm + 1e-6)
        if clip > 0 and coef < 1:
            p.grad.mul_(coef)
    return math.sqrt(sum(n * n for n in norms))


def _full(t: torch.Tensor) -> torch.Tensor:
    """A DTensor reduction's value (FSDP2 gradients are sharded), else the tensor."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t
