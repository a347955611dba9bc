"""`DINOLoss` against the official module over several steps: loss, gradient, center, schedule."""

import numpy as np
import pytest
import torch

from dinofuse.kernels import DINOLoss, teacher_temp_schedule
from official_dino import OfficialDINOLoss

ARGS = dict(out_dim=300, ncrops=6, warmup_teacher_temp=0.04, teacher_temp=0.07,
            warmup_teacher_temp_epochs=3, nepochs=5)


@pytest.mark.parametrize("warmup,nepochs", [(0, 4), (1, 4), (3, 5), (30, 100), (7, 7)])
def test_teacher_temp_schedule_is_bit_identical(warmup, nepochs):
    official = np.concatenate((np.linspace(0.04, 0.07, warmup), np.ones(nepochs - warmup) * 0.07))
    assert teacher_temp_schedule(0.04, 0.07, warmup, nepochs) == official.tolist()


@pytest.mark.parametrize("reference", [False, True], ids=["triton-interpreter", "reference"])
def test_matches_official_module_over_steps(reference, request):
    if reference:
        request.getfixturevalue("reference_path")
    ours, official = DINOLoss(**ARGS), OfficialDINOLoss(**ARGS)
    B = 3
    for step, epoch in enumerate([0, 0, 1, 2, 3, 4]):
        student = torch.randn(ARGS["ncrops"] * B, ARGS["out_dim"]) * 3
        teacher = torch.randn(2 * B, ARGS["out_dim"]) * 0.2 + 0.1 * step  # a drifting mean
        s_ours, s_off = student.clone().requires_grad_(), student.clone().requires_grad_()
        loss = ours(s_ours, teacher, epoch)
        loss_off = official(s_off, teacher, epoch)
        loss.backward()
        loss_off.backward()
        torch.testing.assert_close(loss, loss_off, rtol=2e-5, atol=1e-6)
        torch.testing.assert_close(s_ours.grad, s_off.grad, rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(ours.center, official.center, rtol=1e-5, atol=1e-7)
        assert ours.center.shape == (1, ARGS["out_dim"])
        assert ours.teacher_temp_at(epoch) == official.teacher_temp_schedule[epoch]


def test_center_moves_and_is_saved():
    loss_fn = DINOLoss(**ARGS)
    teacher = torch.randn(4, ARGS["out_dim"]) + 1.0
    loss_fn(torch.randn(12, ARGS["out_dim"]), teacher, 0)
    expected = 0.1 * teacher.mean(0, keepdim=True)
    torch.testing.assert_close(loss_fn.center, expected, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(loss_fn.state_dict()["center"], expected, rtol=1e-5, atol=1e-7)


def test_wrong_crop_count_and_epoch_are_rejected():
    loss_fn = DINOLoss(**ARGS)
    with pytest.raises(ValueError, match="ncrops=6"):
        loss_fn(torch.randn(10, ARGS["out_dim"]), torch.randn(4, ARGS["out_dim"]), 0)
    with pytest.raises(IndexError, match="epoch 5 is outside"):
        loss_fn(torch.randn(12, ARGS["out_dim"]), torch.randn(4, ARGS["out_dim"]), 5)


def test_center_ema_reuses_one_launch_plan(monkeypatch):
    """Each step's batch center is a new tensor; copied into one buffer first, the EMA's cached
    plan (whose device table is built once: building it copies to the device) serves every
    step, and the math stays the official EMA."""
    import importlib

    ema_module = importlib.import_module("dinofuse.kernels.ema")
    built = []
    real_plan = ema_module.EMAPlan
    monkeypatch.setattr(ema_module, "EMAPlan", lambda t, s: built.append(1) or real_plan(t, s))
    ours, official = DINOLoss(**ARGS), OfficialDINOLoss(**ARGS)
    keep = []  # hold every step's tensors, so no address is reused by chance
    for epoch in range(4):
        student = torch.randn(ARGS["ncrops"] * 2, ARGS["out_dim"])
        teacher = torch.randn(4, ARGS["out_dim"]) + epoch
        keep += [student, teacher, ours(student, teacher, epoch)]
        official(student, teacher, epoch)
    assert len(built) == 1
    torch.testing.assert_close(ours.center, official.center, rtol=1e-5, atol=1e-7)
