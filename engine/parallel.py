"""The one place where distribution is applied: process group setup, and per module
(`parallelize`) activation checkpointing, torch.compile and FSDP2 sharding.

Under `torchrun` (WORLD_SIZE > 1) `init_distributed` joins the process group (NCCL on GPUs,
gloo on CPU, with a timeout so that a dead rank ends the job instead of hanging it), and
`shard_model` wraps each transformer block, the head and the whole model with FSDP2's
`fully_shard`. Student and teacher are sharded identically, so the teacher's EMA runs on
matching local shards with no communication.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import nn

T = TypeVar("T")


def init_distributed(timeout_s: float = 600.0, force: bool = False) -> tuple[int, int]:
    """(rank, world size); joins the process group when launched by torchrun with >1 process.
    force=True makes a one-process group where there is none (FSDP2 on one device)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if (world > 1 or force) and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        timeout = datetime.timedelta(seconds=timeout_s)
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        if world > 1:
            dist.init_process_group(backend, timeout=timeout)
        else:  # no torchrun rendezvous: an in-process store
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1,
                                    timeout=timeout)
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def cpu_threads(requested: int, data_workers: int) -> int:
    """Intra-op threads for training on a CPU: `requested`, or (0) the cores this process may
    use, shared with the other ranks on this machine, less one for each data worker (each
    worker keeps a core busy; oversubscribed, the default run on 2 cores went at 154 img/s
    with 2 threads beside its worker, 196 with 1)."""
    if requested > 0:
        return requested
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, cores // local_ranks - data_workers)


def use_training_threads(trainer) -> None:
    """On a CPU, the trainer's intra-op threads (`cpu_threads`) for this process."""
    if trainer.device.type == "cpu":
        torch.set_num_threads(cpu_threads(trainer.cfg.run.cpu_threads, trainer.input.data_workers))


def world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def from_rank_zero(work: Callable[[], T], failures: tuple[type[Exception], ...]) -> T:
    """work()'s result on every rank of the process group, done by rank 0 alone (one write
    to the shared output folder). A failure of the `failures` types there is raised on
    every rank, as the same type with the same words: the others must not wait in their
    next collective, until its timeout, for a rank that has stopped."""
    if not dist.is_initialized():
        return work()
    box: list = [None, None]
    if dist.get_rank() == 0:
        try:
            box[1] = work()
        except failures as e:
            box[0] = (type(e), str(e))
    dist.broadcast_object_list(box, src=0)
    if box[0] is not None:
        kind, words = box[0]
        raise kind(words)
    return box[1]


def shard_model(model: nn.Module, param_dtype: torch.dtype | None = None,
                reshard_after_forward: bool = True,
                reduce_dtype: torch.dtype = torch.float32,
                reshard_root_after_forward: bool = False, unit_blocks: int = 1) -> nn.Module:
    """FSDP2 per transformer block (or per `unit_blocks` consecutive blocks; 0: none apart
    from the root), per head, then the whole model (fp32 master weights; computation in
    param_dtype when given, gradients reduced in reduce_dtype). Each parameter is sharded
    on its own whatever the units, so the student's and the teacher's shards match.
    reshard_after_forward applies to the blocks and the head; the root's own parameters
    (patch embedding, tokens, final norm) stay gathered by default, as backward starts
    with them (torchtitan's choice)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype) \
        if param_dtype is not None else MixedPrecisionPolicy()
    kwargs = dict(mp_policy=policy, reshard_after_forward=reshard_after_forward)
    blocks = list(model.backbone.blocks)
    for start in range(0, len(blocks) if unit_blocks > 0 else 0, max(unit_blocks, 1)):
        unit = blocks[start:start + unit_blocks]
        fully_shard(unit[0] if len(unit) == 1 else unit, **kwargs)  # a list: one unit
    fully_shard(model.head, **kwargs)
    fully_shard(model, **{**kwargs, "reshard_after_forward": reshard_root_after_forward})
    return model


def parallelize(model: nn.Module, impl, *, shard: bool, param_dtype: torch.dtype | None,
                is_teacher: bool) -> nn.Module:
    """Activation checkpointing and torch.compile per block, then FSDP2 (in that order, as
    torchtitan does), from the config's `impl` section. Student and teacher go through the
    same calls, so their shards match; the teacher only runs forward, and gathered weights
    kept after it would miss the EMA (which updates the shards), so it always reshards."""
    model.backbone.checkpoint_blocks = impl.checkpoint_blocks
    if impl.compile_blocks:  # one static graph per crop size (2 sizes, train and eval)
        for block in model.backbone.blocks:
            block.compile(dynamic=False)
    if shard:
        shard_model(model, param_dtype=param_dtype,
                    reshard_after_forward=impl.reshard_after_forward or is_teacher,
                    reshard_root_after_forward=impl.reshard_root_after_forward or is_teacher,
                    reduce_dtype={"fp32": torch.float32, "bf16": torch.bfloat16}[impl.reduce_dtype],
                    unit_blocks=impl.fsdp_unit_blocks)
    return model


class DeviceValue:
    """A number still on the device, read without stalling the GPU's queue.

    A 0-d tensor (with `mean_over_ranks`, averaged by an all-reduce started at once). On a
    GPU it is copied to pinned host memory behind the work that produces it, and an event
    marks the copy: reading it (`float()`) waits for that event only, not for everything
    queued since, as `.item()` would. Read once, then cached.

    `flags`: this rank's votes, carried in the same all-reduce (no collective of their own);
    `votes` says, for each, whether any rank voted for it. Every rank reads the same answer,
    so ranks that act on it act at the same step.
    """

    def __init__(self, tensor: torch.Tensor, mean_over_ranks: bool = True,
                 flags: tuple[bool, ...] = ()):
        t = tensor.detach().float().reshape(1).clone()
        if flags:  # filled on the device: a copy of host values would make the host wait
            t = torch.cat([t, torch.zeros(len(flags), device=t.device)])
            for i, flag in enumerate(flags, start=1):
                if flag:
                    t[i].fill_(1.0)
        self._values: list[float] | None = None
        self._work = self._event = None
        self._world = 1
        if mean_over_ranks and dist.is_initialized() and dist.get_world_size() > 1:
            self._world = dist.get_world_size()
            self._work = dist.all_reduce(t, async_op=True)
        if t.is_cuda:
            if self._work is not None:
                self._work.wait()  # NCCL: the stream waits for the all-reduce, not the host
                self._work = None
            host = torch.empty(t.shape, dtype=torch.float32, pin_memory=True)
            host.copy_(t, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
            t = host
        self._tensor = t

    def __repr__(self) -> str:
        return f"DeviceValue({self._values[0] if self._values is not None else 'pending'})"

    def _read(self) -> list[float]:
        if self._values is None:
            if self._work is not None:
                self._work.wait()
            if self._event is not None:
                self._event.synchronize()
            self._values = self._tensor.tolist()
            self._values[0] /= self._world
            self._tensor = self._work = self._event = None
        return self._values

    def __float__(self) -> float:
        return self._read()[0]

    @property
    def votes(self) -> tuple[bool, ...]:
        return tuple(v > 0 for v in self._read()[1:])
