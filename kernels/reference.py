"""The official DINO math in plain PyTorch.

This file is the spec: the tests' oracle, and the path CPU tensors take when the Triton
interpreter is off. It follows the official `DINOLoss` and EMA update line for line in
meaning; only the packaging (functions instead of a module) differs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def pair_count(ncrops: int, num_global_crops: int) -> int:
    """Number of (teacher view, student view) pairs with a view not paired to itself."""
    return num_global_crops * ncrops - num_global_crops


def dino_loss_reference(
    student_out: torch.Tensor,
    teacher_out: torch.Tensor,
    center: torch.Tensor,
    *,
    num_global_crops: int = 2,
    student_temp: float = 0.1,
    teacher_temp: float = 0.04,
    compute_dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Official DINOLoss forward (a loop over crop pairs) plus the batch mean of the teacher.

    Returns (loss, teacher_mean). `compute_dtype` is float32 as under the official fp16
    autocast (softmax runs in fp32); the tests pass float64 to get an oracle.
    """
    batch = teacher_out.shape[0] // num_global_crops
    ncrops = student_out.shape[0] // batch
    s = student_out.to(compute_dtype) / student_temp
    student_chunks = s.chunk(ncrops)
    t = teacher_out.to(compute_dtype)
    q = F.softmax((t - center.to(compute_dtype).reshape(1, -1)) / teacher_temp, dim=-1)
    teacher_chunks = q.detach().chunk(num_global_crops)

    total = s.new_zeros(())
    n_terms = 0
    for iq, q_i in enumerate(teacher_chunks):
        for v, s_v in enumerate(student_chunks):
            if v == iq:
                continue  # a view is never its own target
            total = total + torch.sum(-q_i * F.log_softmax(s_v, dim=-1), dim=-1).mean()
            n_terms += 1
    loss = total / n_terms
    teacher_mean = t.sum(dim=0) / t.shape[0]
    return loss, teacher_mean


def dino_loss_student_grad(
    student_out: torch.Tensor,
    teacher_out: torch.Tensor,
    center: torch.Tensor,
    *,
    num_global_crops: int = 2,
    student_temp: float = 0.1,
    teacher_temp: float = 0.04,
) -> torch.Tensor:
    """d loss / d student_out of the official loss, in closed form, computed in float32.

    For student view v the targets are the teacher views i != v, so with Q_v = sum_{i != v} q_i
    and n_v = #{i != v}: grad_v = (n_v * softmax(s_v / tau_s) - Q_v) / (tau_s * n_terms * B).
    Used where autograd is unavailable (inside the custom op's CPU kernel); the tests check
    it against autograd through `dino_loss_reference`.
    """
    batch = teacher_out.shape[0] // num_global_crops
    ncrops = student_out.shape[0] // batch
    q = F.softmax((teacher_out.float() - center.float().reshape(1, -1)) / teacher_temp, dim=-1)
    q = q.reshape(num_global_crops, batch, -1)
    p = F.softmax(student_out.float() / student_temp, dim=-1).reshape(ncrops, batch, -1)
    grad = p * num_global_crops - q.sum(0, keepdim=True)
    grad[:num_global_crops] += q - p[:num_global_crops]  # a global view is not its own target
    grad /= student_temp * pair_count(ncrops, num_global_crops) * batch
    return grad.reshape(student_out.shape).to(student_out.dtype)


def teacher_temp_schedule(
    warmup_teacher_temp: float, teacher_temp: float, warmup_epochs: int, nepochs: int
) -> list[float]:
    """`np.concatenate((np.linspace(w, t, warmup), np.ones(n - warmup) * t))`, in pure Python.

    numpy's linspace: step = (stop - start) / (num - 1); y_i = i * step + start; y_last = stop.
    The same float64 arithmetic gives bit-identical values without importing numpy.
    """
    warm: list[float] = []
    if warmup_epochs == 1:
        warm = [float(warmup_teacher_temp)]
    elif warmup_epochs > 1:
        step = (teacher_temp - warmup_teacher_temp) / (warmup_epochs - 1)
        warm = [i * step + warmup_teacher_temp for i in range(warmup_epochs)]
        warm[-1] = float(teacher_temp)
    return warm + [float(teacher_temp)] * (nepochs - warmup_epochs)


@torch.no_grad()
def ema_reference_(
    teacher: Sequence[torch.Tensor], student: Sequence[torch.Tensor], momentum: float
) -> None:
    """The official per-parameter loop: `t.mul_(m).add_((1 - m) * s)`."""
    for t, s in zip(teacher, student, strict=True):
        t.mul_(momentum).add_((1 - momentum) * s.detach().to(t.dtype))


class OfficialDINOLoss(nn.Module):
    """The official `DINOLoss` as the official code runs it: the loop over crop pairs above,
    then a blocking all-reduce of the teacher's batch sum and the center EMA. Same
    constructor, forward and `center` buffer as `dinofuse.kernels.DINOLoss`; the trainer's
    `impl.loss="official"` and the benchmark's baseline use it."""

    def __init__(self, out_dim: int, ncrops: int, warmup_teacher_temp: float,
                 teacher_temp: float, warmup_teacher_temp_epochs: int, nepochs: int,
                 student_temp: float = 0.1, center_momentum: float = 0.9,
                 num_global_crops: int = 2):
        super().__init__()
        self.ncrops, self.num_global_crops = ncrops, num_global_crops
        self.student_temp, self.center_momentum = student_temp, center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.teacher_temp_schedule = teacher_temp_schedule(
            warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs, nepochs)

    def teacher_temp_at(self, epoch: int) -> float:
        return self.teacher_temp_schedule[epoch]

    def forward(self, student_output: torch.Tensor, teacher_output: torch.Tensor,
                epoch: int) -> torch.Tensor:
        loss, _ = dino_loss_reference(
            student_output, teacher_output, self.center, num_global_crops=self.num_global_crops,
            student_temp=self.student_temp, teacher_temp=self.teacher_temp_at(epoch))
        self.update_center(teacher_output)
        return loss

    @torch.no_grad()
    def update_center(self, teacher_output: torch.Tensor) -> None:
        batch_center = torch.sum(teacher_output, dim=0, keepdim=True)
        world = 1
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(batch_center)
            world = dist.get_world_size()
        batch_center = batch_center / (len(teacher_output) * world)
        self.center = self.center * self.center_momentum + batch_center * (1 - self.center_momentum)
