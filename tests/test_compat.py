"""The lightly and solo-learn adapters against those libraries' math, over several steps."""

import numpy as np
import torch
import torch.nn.functional as F

from dinofuse.kernels.compat import LightlyDINOLoss, SoloLearnDINOLoss


def lightly_reference(teacher_out, student_out, center, teacher_temp, student_temp=0.1):
    """lightly's forward: stacked views, a (teacher view x student view) matrix without its
    diagonal, averaged over terms and batch; the center is the mean over views and batch."""
    t = F.softmax((torch.stack(teacher_out) - center) / teacher_temp, dim=-1)
    s = F.log_softmax(torch.stack(student_out) / student_temp, dim=-1)
    loss = -torch.einsum("tbd,sbd->ts", t, s)
    loss.fill_diagonal_(0)
    n_terms = loss.numel() - loss.diagonal().numel()
    loss = loss.sum() / (n_terms * t.shape[1])
    new_center = 0.9 * center + 0.1 * torch.stack(teacher_out).mean(dim=(0, 1), keepdim=True)[0]
    return loss, new_center


def test_lightly_adapter_over_steps():
    K, B = 40, 3
    ours = LightlyDINOLoss(output_dim=K, warmup_teacher_temp=0.04, teacher_temp=0.07,
                           warmup_teacher_temp_epochs=3)
    center = torch.zeros(1, 1, K)
    for epoch in range(5):
        views = 2 if epoch % 2 == 0 else 1  # lightly takes any number of teacher views
        teacher = [torch.randn(B, K) * 0.5 + epoch * 0.1 for _ in range(views)]
        student = [torch.randn(B, K) * 2 for _ in range(5)]
        temp = float(np.linspace(0.04, 0.07, 3)[epoch]) if epoch < 3 else 0.07
        loss = ours(teacher, [s.clone().requires_grad_() for s in student], epoch=epoch)
        ref, center = lightly_reference(teacher, student, center, temp)
        torch.testing.assert_close(loss, ref, rtol=2e-5, atol=1e-6)
        assert ours.center.shape == (1, 1, K)
        torch.testing.assert_close(ours.center, center, rtol=1e-5, atol=1e-7)
    explicit = ours([t for t in teacher], student, teacher_temp=0.05)
    assert torch.isfinite(explicit)


def test_solo_learn_adapter_over_steps():
    K, B = 30, 4
    ours = SoloLearnDINOLoss(num_prototypes=K, warmup_teacher_temp=0.04, teacher_temp=0.07,
                             warmup_teacher_temp_epochs=2, num_epochs=4)
    center = torch.zeros(1, K)
    schedule = np.concatenate((np.linspace(0.04, 0.07, 2), np.ones(2) * 0.07))
    for epoch in range(4):
        ours.epoch = epoch
        student, teacher = torch.randn(2 * B, K) * 2, torch.randn(2 * B, K) * 0.5
        s = student.clone().requires_grad_()
        loss = ours(s, teacher)
        loss.backward()
        # solo-learn's forward: the official loop with the student in num_large_crops chunks
        s_ref = student.clone().requires_grad_()
        q = F.softmax((teacher - center) / schedule[epoch], dim=-1).chunk(2)
        terms = [torch.sum(-q[i] * F.log_softmax(v, dim=-1), dim=-1).mean()
                 for i in range(2) for v_i, v in enumerate((s_ref / 0.1).chunk(2)) if v_i != i]
        ref = sum(terms) / len(terms)
        ref.backward()
        center = 0.9 * center + 0.1 * teacher.mean(0, keepdim=True)
        torch.testing.assert_close(loss, ref, rtol=2e-5, atol=1e-6)
        torch.testing.assert_close(s.grad, s_ref.grad, rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(ours.center, center, rtol=1e-5, atol=1e-7)
