"""Two CPU processes over gloo: the center all-reduce and the EMA on FSDP2 shards."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(rank, port, fn):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        fn(rank)
    finally:
        dist.barrier()  # gloo teardown without it was seen to abort intermittently
        dist.destroy_process_group()


def _spawn(fn):
    mp.spawn(_run, args=(_free_port(), fn), nprocs=WORLD, join=True)


def _center_all_reduce(rank):
    from dinofuse.kernels import DINOLoss
    from official_dino import OfficialDINOLoss

    args = dict(out_dim=50, ncrops=4, warmup_teacher_temp=0.04, teacher_temp=0.07,
                warmup_teacher_temp_epochs=2, nepochs=3)
    ours, official = DINOLoss(**args), OfficialDINOLoss(**args)
    gen = torch.Generator().manual_seed(100 + rank)  # each rank its own batch
    for epoch in (0, 1, 2):
        student = torch.randn(8, 50, generator=gen) * 3
        teacher = torch.randn(4, 50, generator=gen) + rank
        loss = ours(student, teacher, epoch)  # center update in flight ...
        loss_off = official(student, teacher, epoch)
        torch.testing.assert_close(loss, loss_off, rtol=2e-5, atol=1e-6)
    ours.apply_center_update()  # ... lands before the next use
    torch.testing.assert_close(ours.center, official.center, rtol=1e-5, atol=1e-7)
    # every rank holds the same center
    gathered = [torch.empty_like(ours.center) for _ in range(WORLD)]
    dist.all_gather(gathered, ours.center)
    assert torch.equal(gathered[0], gathered[1])


def _ema_on_fsdp2_shards(rank):
    from torch.distributed.fsdp import fully_shard

    from dinofuse.kernels import ema_update_

    def model():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(13, 33), torch.nn.GELU(), torch.nn.Linear(33, 7))

    student, teacher = model(), model()
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    expected = [t.detach().clone() * 0.99 + 0.01 * s.detach() for t, s in
                zip(teacher.parameters(), student.parameters())]
    fully_shard(student)
    fully_shard(teacher)
    assert all(hasattr(p, "to_local") for p in teacher.parameters())
    ema_update_(list(teacher.parameters()), list(student.parameters()), 0.99)
    for p, e in zip(teacher.parameters(), expected):
        torch.testing.assert_close(p.full_tensor(), e, rtol=0, atol=4e-7)


@pytest.mark.parametrize("fn", [_center_all_reduce, _ema_on_fsdp2_shards],
                         ids=["center_all_reduce", "ema_fsdp2_shards"])
def test_two_processes(fn):
    _spawn(fn)


def _fsdp_training(rank, folder, out, result, clip_mode):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from dinofuse.engine.config import load_config
    from dinofuse.engine.train import Trainer
    from test_train import TINY

    cfg = load_config("default", TINY + [f'data.path="{folder}"', f'run.output_dir="{out}"',
                                         "optim.batch_size_per_device=2", "optim.clip_grad=0.05",
                                         f'optim.clip_mode="{clip_mode}"'])
    trainer = Trainer(cfg)
    assert trainer.world == 2 and hasattr(next(trainer.student.parameters()), "to_local")
    losses = [log.loss for log in trainer.fit(max_steps=4, progress=False)]
    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    student = get_model_state_dict(trainer.student, options=full)
    teacher = get_model_state_dict(trainer.teacher, options=full)
    if rank == 0:
        torch.save({"losses": losses, "student": student, "teacher": teacher,
                    "center": trainer.loss_fn.center.clone()}, result)


@pytest.mark.parametrize("clip_mode", ["per_param", "global"])
def test_fsdp2_two_processes_train_like_one(tmp_path, clip_mode):
    """Two ranks with FSDP2 and batch 2 each equal one process with batch 4: losses,
    student, teacher (EMA) and center, over 4 steps with clipping (norms of sharded
    gradients summed over the ranks)."""
    import functools

    import numpy as np
    from PIL import Image

    from dinofuse.engine.config import load_config
    from dinofuse.engine.train import Trainer
    from test_train import TINY

    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(16):
        Image.fromarray((rng.random((20, 20, 3)) * 255).astype(np.uint8)).save(folder / f"{i}.png")
    result = tmp_path / "fsdp.pt"
    _spawn(functools.partial(_fsdp_training, folder=folder, out=tmp_path / "fsdp", result=result,
                             clip_mode=clip_mode))
    fsdp = torch.load(result, weights_only=True)

    cfg = load_config("default", TINY + [f'data.path="{folder}"', f'run.output_dir="{tmp_path / "one"}"',
                                         "optim.batch_size_per_device=4", "optim.clip_grad=0.05",
                                         f'optim.clip_mode="{clip_mode}"'])
    one = Trainer(cfg)
    losses = [log.loss for log in one.fit(max_steps=4, progress=False)]
    assert fsdp["losses"] == pytest.approx(losses, rel=1e-5)
    for name, ref in (("student", one.student), ("teacher", one.teacher)):
        for key, value in ref.state_dict().items():
            torch.testing.assert_close(fsdp[name][key], value, rtol=1e-4, atol=1e-6, msg=f"{name}.{key}")
    torch.testing.assert_close(fsdp["center"], one.loss_fn.center, rtol=1e-5, atol=1e-7)
