"""Drop-in replacements for the DINO losses of lightly and solo-learn, on the fused op.

    from dinofuse.kernels.compat import LightlyDINOLoss as DINOLoss      # lightly
    from dinofuse.kernels.compat import SoloLearnDINOLoss as DINOLoss    # solo-learn

Same constructors, forward signatures, attributes and center buffer shapes as those
libraries; the official module's drop-in is `dinofuse.kernels.DINOLoss`.
"""

from __future__ import annotations

import torch

from dinofuse.kernels.dino_loss import CenteredDINOLoss
from dinofuse.kernels.reference import teacher_temp_schedule


class LightlyDINOLoss(CenteredDINOLoss):
    """lightly's `DINOLoss(output_dim, ...)`; forward(teacher_out: list, student_out: list,
    teacher_temp=None, epoch=None). Views are lists of (B, K) tensors, teacher views first
    among the student's; the center buffer has lightly's shape (1, 1, K)."""

    def __init__(self, output_dim: int = 65536, warmup_teacher_temp: float = 0.04,
                 teacher_temp: float = 0.04, warmup_teacher_temp_epochs: int = 30,
                 student_temp: float = 0.1, center_momentum: float = 0.9,
                 center_mode: str = "mean"):
        if center_mode != "mean":
            raise ValueError(f"Unknown mode '{center_mode}'. Valid modes are ['mean'].")
        super().__init__((1, 1, output_dim), center_momentum)
        self.teacher_temp = teacher_temp
        self.student_temp = student_temp
        self.warmup_teacher_temp_epochs = warmup_teacher_temp_epochs
        self.teacher_temp_schedule = teacher_temp_schedule(
            warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs, warmup_teacher_temp_epochs)

    def forward(self, teacher_out: list[torch.Tensor], student_out: list[torch.Tensor],
                teacher_temp: float | None = None, epoch: int | None = None) -> torch.Tensor:
        if teacher_temp is None:
            teacher_temp = self.teacher_temp
            if epoch is not None and epoch < self.warmup_teacher_temp_epochs:
                teacher_temp = self.teacher_temp_schedule[epoch]
        return self.centered_loss(torch.cat(list(student_out)), torch.cat(list(teacher_out)),
                                  num_global_crops=len(teacher_out),
                                  student_temp=self.student_temp, teacher_temp=float(teacher_temp))


class SoloLearnDINOLoss(CenteredDINOLoss):
    """solo-learn's `DINOLoss(num_prototypes, ...)`; forward(student_output, teacher_output)
    with the temperature taken at `self.epoch`; the student holds `num_large_crops` views."""

    def __init__(self, num_prototypes: int, warmup_teacher_temp: float, teacher_temp: float,
                 warmup_teacher_temp_epochs: int, num_epochs: int, student_temp: float = 0.1,
                 num_large_crops: int = 2, center_momentum: float = 0.9):
        super().__init__((1, num_prototypes), center_momentum)
        self.epoch = 0
        self.student_temp = student_temp
        self.num_large_crops = num_large_crops
        self.teacher_temp_schedule = teacher_temp_schedule(
            warmup_teacher_temp, teacher_temp, int(warmup_teacher_temp_epochs), num_epochs)

    def forward(self, student_output: torch.Tensor, teacher_output: torch.Tensor) -> torch.Tensor:
        batch = teacher_output.shape[0] // 2
        if student_output.shape[0] != self.num_large_crops * batch:
            raise ValueError(f"student_output has {student_output.shape[0]} rows; "
                             f"num_large_crops={self.num_large_crops} needs {self.num_large_crops * batch}")
        return self.centered_loss(student_output, teacher_output, num_global_crops=2,
                                  student_temp=self.student_temp,
                                  teacher_temp=self.teacher_temp_schedule[self.epoch])
