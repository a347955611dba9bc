"""The teacher EMA, fused: teacher <- m * teacher + (1 - m) * student over a list of tensors.

One launch per student dtype covers every tensor: a small device table lists each tensor's
teacher address, student address and length, and every program takes one fixed-size chunk of
one tensor. The table is built once per set of tensors (`EMAPlan`) and cached, so a training
step pays no host-to-device copy and little Python, and a captured CUDA graph can replay the
launch. The momentum is a
Python float or a 0-d tensor on the device (read inside the kernel, so a graph replays it).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
import triton
import triton.language as tl


from dinofuse.kernels._runtime import check_float, local_shard, runs_triton
from dinofuse.kernels.reference import ema_reference_

# Launch shape: elements per program (a multiple of `block`), elements per loop step, warps.
# A module-level dict so the benchmark can sweep it.
# chunk=4096 measured best of the swept shapes at ViT-B/16+head on an H200 (bench/results/).
LAUNCH = dict(chunk=4096, block=1024, num_warps=4)
_PLAN_CACHE_SIZE = 16
_TL_DTYPE = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@triton.jit
def _ema_kernel(
    table_ptr, n_tensors, momentum_ptr, momentum,
    S_DTYPE: tl.constexpr, MOMENTUM_ON_DEVICE: tl.constexpr,
    CHUNK: tl.constexpr, BLOCK: tl.constexpr,
):
    # table: [teacher addr] * n, [student addr] * n, [numel] * n, then per chunk (tensor, start)
    pid = tl.program_id(0)
    chunk = table_ptr + 3 * n_tensors + 2 * pid
    idx = tl.load(chunk)
    start = tl.load(chunk + 1)
    teacher = tl.load(table_ptr + idx).to(tl.pointer_type(tl.float32))
    student = tl.load(table_ptr + n_tensors + idx).to(tl.pointer_type(S_DTYPE))
    numel = tl.load(table_ptr + 2 * n_tensors + idx)
    if MOMENTUM_ON_DEVICE:
        m = tl.load(momentum_ptr).to(tl.float32)
    else:
        m = momentum
    for off in range(0, CHUNK, BLOCK):
        offs = start + off + tl.arange(0, BLOCK)
        ok = offs < numel
        t = tl.load(teacher + offs, mask=ok)
        s = tl.load(student + offs, mask=ok).to(tl.float32)
        tl.store(teacher + offs, t * m + s * (1.0 - m), mask=ok)


def _local_tensors(params, role: str) -> list[torch.Tensor]:
    """The local tensors of `params`: tensors (DTensors: their shards), or a module's
    parameters, in `parameters()` order as the official EMA loop zips them."""
    if isinstance(params, torch.nn.Module):
        params = params.parameters()
    elif isinstance(params, torch.Tensor):  # iterating it would give its rows
        raise TypeError(f"ema_update_: {role} must be a sequence of tensors (or a module); "
                        f"got one tensor of shape {tuple(params.shape)}: wrap it in a list")
    return [local_shard(p) for p in params]


class EMAPlan:
    """A validated EMA over fixed tensors: the launch tables are built once, and each call
    only launches (one kernel per student dtype). `ema_update_` caches these by address;
    a trainer may hold one directly to skip even the per-call lookup."""

    def __init__(self, teacher_params: Sequence[torch.Tensor] | torch.nn.Module,
                 student_params: Sequence[torch.Tensor] | torch.nn.Module):
        teacher = _local_tensors(teacher_params, "teacher_params")
        student = _local_tensors(student_params, "student_params")
        _validate(teacher, student)
        self.device = teacher[0].device if teacher else None
        self.fused = bool(teacher) and runs_triton(teacher[0])
        self.launches = []  # (student dtype, table, tensor count, chunk count)
        self.loop = ([], [])  # pairs for the reference loop (no Triton, or non-contiguous)
        groups: dict[torch.dtype, tuple[list, list]] = {}
        for t, s in zip(teacher, student):
            if t.numel() == 0:
                continue
            group = groups.setdefault(s.dtype, ([], [])) \
                if self.fused and t.is_contiguous() and s.is_contiguous() else self.loop
            group[0].append(t)
            group[1].append(s)
        chunk = LAUNCH["chunk"]
        for s_dtype, (ts, ss) in groups.items():
            numels = [t.numel() for t in ts]
            chunks = [v for i, n in enumerate(numels) for k in range(0, n, chunk) for v in (i, k)]
            rows = [t.data_ptr() for t in ts] + [s.data_ptr() for s in ss] + numels + chunks
            table = torch.tensor(rows, dtype=torch.int64)
            if self.device.type == "cuda":  # from pinned memory: no wait for the GPU
                table = table.pin_memory().to(self.device, non_blocking=True)
            self.launches.append((s_dtype, table, len(ts), len(chunks) // 2))
        self._keep = (teacher, student)  # the table holds their addresses: keep them alive

    def __call__(self, momentum: float | torch.Tensor) -> None:
        _check_momentum(momentum, self.device)
        on_device = isinstance(momentum, torch.Tensor)
        with torch.no_grad():
            if self.loop[0]:
                ema_reference_(*self.loop, momentum)
            for s_dtype, table, n_tensors, n_chunks in self.launches:
                _ema_kernel[(n_chunks,)](
                    table, n_tensors, momentum if on_device else table,
                    0.0 if on_device else float(momentum),
                    S_DTYPE=_TL_DTYPE[s_dtype], MOMENTUM_ON_DEVICE=on_device,
                    CHUNK=LAUNCH["chunk"], BLOCK=LAUNCH["block"], num_warps=LAUNCH["num_warps"],
                )


_plans: OrderedDict[tuple, EMAPlan] = OrderedDict()


def _validate(teacher: list[torch.Tensor], student: list[torch.Tensor]) -> None:
    if len(teacher) != len(student):
        raise ValueError(f"ema_update_ got {len(teacher)} teacher tensors and "
                         f"{len(student)} student tensors")
    device = teacher[0].device if teacher else None
    for i, (t, s) in enumerate(zip(teacher, student)):
        check_float(f"teacher tensor {i}", t, (torch.float32,))
        check_float(f"student tensor {i}", s)
        if t.shape != s.shape:
            raise ValueError(f"tensor {i}: teacher shape {tuple(t.shape)} != student shape "
                             f"{tuple(s.shape)}")
        if t.device != device or s.device != device:
            raise ValueError(f"tensor {i} is on {t.device}/{s.device}; expected {device}")


def _check_momentum(momentum, device) -> None:
    if isinstance(momentum, torch.Tensor):
        if momentum.numel() != 1 or momentum.device != device or not momentum.is_floating_point():
            raise ValueError(f"momentum tensor must be a 1-element float tensor on {device}; got "
                             f"{momentum.dtype} of shape {tuple(momentum.shape)} on {momentum.device}")
    elif not 0.0 <= float(momentum) <= 1.0:
        raise ValueError(f"momentum must be in [0, 1]; got {momentum}")


def ema_update_(
    teacher_params: Sequence[torch.Tensor] | torch.nn.Module,
    student_params: Sequence[torch.Tensor] | torch.nn.Module,
    momentum: float | torch.Tensor,
) -> None:
    """In place: teacher <- momentum * teacher + (1 - momentum) * student, for each pair.

    Teachers are float32; students float32, bfloat16 or float16, same shapes. DTensor
    parameters (FSDP2) are updated shard by shard on each rank's local data. A module stands
    for its parameters (buffers are left alone, as in the official EMA).
    `momentum` is a float or a 0-d float tensor on the tensors' device.
    The validated launch plan is cached by the tensors' addresses, lengths and dtypes.
    """
    teacher = _local_tensors(teacher_params, "teacher_params")
    student = _local_tensors(student_params, "student_params")
    if not teacher and not student:
        return
    key = (LAUNCH["chunk"], runs_triton(teacher[0]) if teacher else False,
           tuple((t.data_ptr(), s.data_ptr(), t.numel(), s.dtype) for t, s in zip(teacher, student)),
           len(teacher), len(student))
    plan = _plans.get(key)
    if plan is None:
        plan = EMAPlan(teacher, student)
        _plans[key] = plan
        if len(_plans) > _PLAN_CACHE_SIZE:
            _plans.popitem(last=False)
    else:
        _plans.move_to_end(key)
    plan(momentum)
