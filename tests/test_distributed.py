"""Two CPU processes over gloo: the center all-reduce and the EMA on FSDP2 shards, training
under FSDP2, sharded checkpoints, and the ways a run stops.

The ranks run the Triton kernels under the interpreter only where the kernels are what a
test checks (the center all-reduce, the EMA on shards, one FSDP2 training run); the others
check coordination and checkpoints, and take the plain-PyTorch loss and EMA, as any CPU run
does (interpreted, the kernels made this file take twice as long)."""

import datetime
import gc
import os
import socket
import time

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
    # LOCAL_WORLD_SIZE as torchrun sets it: each rank trains with its share of the cores
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), LOCAL_WORLD_SIZE=str(WORLD))
    # a bounded wait: a rank left alone in a collective fails the test instead of hanging it
    dist.init_process_group("gloo", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=120))
    try:
        fn(rank)
    finally:
        gc.collect()  # what fn left in reference cycles goes while the group is alive
        dist.barrier()  # gloo teardown without it was seen to abort intermittently
        dist.destroy_process_group()


def _spawn(fn, interpret=False):
    """Runs fn(rank) on WORLD ranks; their kernels interpreted only if `interpret`."""
    before = os.environ["TRITON_INTERPRET"]
    os.environ["TRITON_INTERPRET"] = "1" if interpret else "0"  # read by each rank at import
    try:
        mp.spawn(_run, args=(_free_port(), fn), nprocs=WORLD, join=True)
    finally:
        os.environ["TRITON_INTERPRET"] = before


def _center_all_reduce(rank):
    from dinofuse.kernels import DINOLoss
    from dinofuse.kernels.reference import OfficialDINOLoss as PackagedOfficialLoss
    from official_dino import OfficialDINOLoss

    args = dict(out_dim=50, ncrops=4, warmup_teacher_temp=0.04, teacher_temp=0.07,
                warmup_teacher_temp_epochs=2, nepochs=3)
    ours, official = DINOLoss(**args), OfficialDINOLoss(**args)
    packaged = PackagedOfficialLoss(**args)  # impl.loss="official" and the baseline's
    gen = torch.Generator().manual_seed(100 + rank)  # each rank its own batch
    for epoch in (0, 1, 2):
        student = torch.randn(8, 50, generator=gen) * 3
        teacher = torch.randn(4, 50, generator=gen) + rank
        loss = ours(student, teacher, epoch)  # center update in flight ...
        loss_off = official(student, teacher, epoch)
        torch.testing.assert_close(loss, loss_off, rtol=2e-5, atol=1e-6)
        torch.testing.assert_close(packaged(student, teacher, epoch), loss_off, rtol=2e-5, atol=1e-6)
    ours.apply_center_update()  # ... lands before the next use
    torch.testing.assert_close(ours.center, official.center, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(packaged.center, official.center, rtol=1e-5, atol=1e-7)
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


def _head_batch_norm_across_ranks(rank):
    """Each rank holds half of a batch: outputs, input gradients, the parameter gradients
    summed over the ranks and the running statistics are one process's with the whole batch
    (the official code's SyncBatchNorm). Then under FSDP2 with bf16 parameters."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from dinofuse.engine.models.head import BatchNorm1dAcrossRanks

    def pair():
        torch.manual_seed(0)
        ours, whole = BatchNorm1dAcrossRanks(5).double(), torch.nn.BatchNorm1d(5).double()
        with torch.no_grad():
            ours.weight.uniform_(0.5, 2), ours.bias.uniform_(-1, 1)
        whole.load_state_dict(ours.state_dict())
        return ours, whole

    ours, whole = pair()
    mine = slice(4 * rank, 4 * rank + 4)
    for step in range(2):
        gen = torch.Generator().manual_seed(step)
        x = torch.randn(8, 5, generator=gen, dtype=torch.float64) * 3 + torch.arange(5)
        g = torch.randn(8, 5, generator=gen, dtype=torch.float64)
        x_all, x_mine = x.clone().requires_grad_(), x[mine].clone().requires_grad_()
        y_all, y = whole(x_all), ours(x_mine)
        (y_all * g).sum().backward()
        (y * g[mine]).sum().backward()
        torch.testing.assert_close(y, y_all[mine])
        torch.testing.assert_close(x_mine.grad, x_all.grad[mine])
    with torch.no_grad():
        whole.eval(), ours.eval()
        probe = torch.randn(3, 5, dtype=torch.float64)
        torch.testing.assert_close(ours(probe), whole(probe))  # the running statistics
    for name in ("weight", "bias"):
        grad = getattr(ours, name).grad.clone()
        dist.all_reduce(grad)
        torch.testing.assert_close(grad, getattr(whole, name).grad)
    torch.testing.assert_close(ours.state_dict(), whole.state_dict())

    ours, whole = pair()
    head = torch.nn.Sequential(torch.nn.Linear(5, 5).double(), ours).float()
    reference = torch.nn.Sequential(torch.nn.Linear(5, 5), whole.float())
    reference[0].load_state_dict(head[0].state_dict())
    fully_shard(head, mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16))
    x = torch.randn(8, 5, generator=torch.Generator().manual_seed(9))
    y = head(x[mine])
    y.float().square().sum().backward()
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), reference(x)[mine], rtol=3e-2, atol=3e-2)


def _work_of_rank_zero(rank):
    """What rank 0 alone does (a checkpoint file, the screen's patched shards) reaches every
    rank, and so does its failure, as the same error: the others do not wait in a
    collective for a result that never comes."""
    from dinofuse.dataloading.readers import DataError
    from dinofuse.engine.parallel import from_rank_zero

    calls = []
    assert from_rank_zero(lambda: calls.append(rank) or [f"by {rank}"], (DataError,)) == ["by 0"]
    assert calls == ([0] if rank == 0 else [])

    def full_disk():
        raise DataError("cannot make x.tar: [Errno 28] No space left on device")

    with pytest.raises(DataError, match=r"^cannot make x\.tar: \[Errno 28\] No space left"):
        from_rank_zero(full_disk, (DataError,))


@pytest.mark.parametrize("fn", [_center_all_reduce, _ema_on_fsdp2_shards,
                                _head_batch_norm_across_ranks, _work_of_rank_zero],
                         ids=["center_all_reduce", "ema_fsdp2_shards", "head_batch_norm",
                              "work_of_rank_zero"])
def test_two_processes(fn):
    _spawn(fn, interpret=True)


def _fsdp_training(rank, folder, out, result, clip_mode, interpret, overrides=()):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from dinofuse.engine.config import load_config
    from dinofuse.engine.train import Trainer
    from dinofuse.kernels import _runtime
    from test_train import TINY

    assert _runtime.INTERPRET == interpret  # the kernels where asked for, else the reference

    cfg = load_config("default", TINY + [f'data.path="{folder}"', f'run.output_dir="{out}"',
                                         "optim.batch_size_per_device=2", "optim.clip_grad=0.05",
                                         f'optim.clip_mode="{clip_mode}"', *overrides])
    trainer = Trainer(cfg)
    assert trainer.world == 2 and hasattr(next(trainer.student.parameters()), "to_local")
    blocks = trainer.student.backbone.blocks
    assert all(b._compiled_call_impl is not None for b in blocks) == cfg.impl.compile_blocks
    losses = [log.loss for log in trainer.fit(max_steps=4, progress=False)]
    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    student = get_model_state_dict(trainer.student, options=full)
    teacher = get_model_state_dict(trainer.teacher, options=full)
    if rank == 0:
        torch.save({"losses": losses, "student": student, "teacher": teacher,
                    "center": trainer.loss_fn.center.clone()}, result)


@pytest.mark.parametrize("clip_mode,overrides,data,interpret", [
    ("per_param", (), "images", True),  # the fused kernels on the local shards
    ("global", ("impl.reshard_after_forward=false", "impl.reshard_root_after_forward=true"), "images",
     False),
    ("per_param", ('data.backend="tensor"',), "idx", False),
    # torchtitan's order per block: activation checkpointing, torch.compile, then FSDP2
    ("per_param", ("impl.checkpoint_blocks=1", "impl.compile_blocks=true"), "images", False),
    # BatchNorm in the head: its statistics over both ranks' samples, as one process's
    ("global", ("model.use_bn_in_head=true",), "images", False),
    # both blocks in one FSDP2 unit, and none apart from the root's
    ("per_param", ("impl.fsdp_unit_blocks=2",), "images", False),
    ("global", ("impl.fsdp_unit_blocks=0",), "images", False),
])
def test_fsdp2_two_processes_train_like_one(tmp_path, monkeypatch, clip_mode, overrides, data,
                                            interpret):
    """Two ranks with FSDP2 and batch 2 each equal one process with batch 4: losses,
    student, teacher (EMA) and center, over 4 steps with clipping (norms of sharded
    gradients summed over the ranks), with either choice of resharding after forward, with
    Fashion-MNIST-shaped data cut into crops by batched tensor operations, and with blocks
    checkpointed and compiled under FSDP2 (the single process compiles nothing), and with
    BatchNorm in the head."""
    import functools

    from dinofuse.engine.config import load_config
    from dinofuse.engine.train import Trainer
    from dinofuse.kernels import _runtime
    from fashion_mnist_files import write_fashion_mnist
    from test_train import TINY

    monkeypatch.setattr(_runtime, "INTERPRET", interpret)  # the one process takes the ranks' path

    if data == "idx":
        folder = tmp_path / "fmnist"
        write_fashion_mnist(folder, train=16, test=4, size=20)
    else:
        folder = _image_folder(tmp_path / "imgs")
    result = tmp_path / "fsdp.pt"
    _spawn(functools.partial(_fsdp_training, folder=folder, out=tmp_path / "fsdp", result=result,
                             clip_mode=clip_mode, interpret=interpret, overrides=overrides),
           interpret)
    fsdp = torch.load(result, weights_only=True)

    cfg = load_config("default", TINY + [f'data.path="{folder}"', f'run.output_dir="{tmp_path / "one"}"',
                                         "optim.batch_size_per_device=4", "optim.clip_grad=0.05",
                                         f'optim.clip_mode="{clip_mode}"',
                                         *(o for o in overrides
                                           if o.startswith(("data.", "model.")))])
    one = Trainer(cfg)
    losses = [log.loss for log in one.fit(max_steps=4, progress=False)]
    assert fsdp["losses"] == pytest.approx(losses, rel=1e-5)
    # a bias that shifts every sample alike before a BatchNorm has an exact gradient of 0;
    # Adam turns its rounding noise into steps of the LR's size, different in each run
    no_gradient = ({"backbone.norm.bias", "head.mlp.0.bias", "head.mlp.3.bias"}
                   if "model.use_bn_in_head=true" in overrides else set())
    for name, ref in (("student", one.student), ("teacher", one.teacher)):
        for key, value in ref.state_dict().items():
            if key not in no_gradient:
                torch.testing.assert_close(fsdp[name][key], value, rtol=1e-4, atol=1e-6,
                                           msg=f"{name}.{key}")
    torch.testing.assert_close(fsdp["center"], one.loss_fn.center, rtol=1e-5, atol=1e-7)


def _image_folder(root, n=16):
    import numpy as np
    from PIL import Image

    root.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray((rng.random((20, 20, 3)) * 255).astype(np.uint8)).save(root / f"{i}.png")
    return root


def _cfg(folder, out, batch, *extra):
    from dinofuse.engine.config import load_config
    from test_train import TINY

    return load_config("default", TINY + [f'data.path="{folder}"', f'run.output_dir="{out}"',
                                          f"optim.batch_size_per_device={batch}",
                                          "optim.clip_grad=0.05", *extra])


def _train_and_report(rank, folder, out, result, steps, resume, extra=()):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from dinofuse.engine.train import Trainer

    trainer = Trainer(_cfg(folder, out, 2, *extra), resume=resume)
    start = trainer.step
    losses = [log.loss for log in trainer.fit(max_steps=steps, progress=False)]
    teacher = get_model_state_dict(trainer.teacher,
                                   options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        torch.save({"start": start, "losses": losses, "teacher": teacher}, result)
    # what the k-NN report after training evaluates, on each rank
    torch.save(trainer.eval_backbone().state_dict(), f"{result}.backbone{rank}")


def test_sharded_checkpoint_saved_by_two_resumes_under_one_and_two(tmp_path, reference_path):
    """Two ranks save a sharded checkpoint (DCP, in the background) after 3 steps; resuming it
    under two processes and under one continues exactly like an uninterrupted run."""
    import functools
    import shutil

    from dinofuse.engine.checkpoint import COMPLETE, sharded_checkpoints
    from dinofuse.engine.train import Trainer

    folder = _image_folder(tmp_path / "imgs")
    reference = Trainer(_cfg(folder, tmp_path / "ref", 4))  # one process, the same global batch
    ref_losses = [log.loss for log in reference.fit(max_steps=6, progress=False)]

    run = tmp_path / "run"
    first = tmp_path / "first.pt"
    _spawn(functools.partial(_train_and_report, folder=folder, out=run, result=first, steps=3,
                             resume=False))
    saved = sharded_checkpoints(run / "checkpoints")
    assert [(s, done) for s, _, done in saved] == [(3, True)]
    assert len(list(saved[0][1].glob("*.distcp"))) == 2 and (saved[0][1] / COMPLETE).is_file()
    assert not (run / "checkpoint.pth").exists()
    shutil.copytree(run, tmp_path / "run_one")

    two = tmp_path / "two.pt"
    _spawn(functools.partial(_train_and_report, folder=folder, out=run, result=two, steps=3,
                             resume=True))
    resumed_two = torch.load(two, weights_only=True)

    one = Trainer(_cfg(folder, tmp_path / "run_one", 4), resume=True)
    assert one.step == 3
    one_losses = [log.loss for log in one.fit(max_steps=3, progress=False)]

    assert torch.load(first, weights_only=True)["losses"] == pytest.approx(ref_losses[:3], rel=1e-5)
    assert resumed_two["start"] == 3
    assert resumed_two["losses"] == pytest.approx(ref_losses[3:], rel=1e-5)
    assert one_losses == pytest.approx(ref_losses[3:], rel=1e-5)
    for key, value in reference.teacher.state_dict().items():
        torch.testing.assert_close(resumed_two["teacher"][key], value, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(one.teacher.state_dict()[key], value, rtol=1e-4, atol=1e-6)
    for rank in range(WORLD):  # whole plain tensors on every rank: the trained teacher's
        backbone = torch.load(f"{two}.backbone{rank}", weights_only=True)
        expected = reference.teacher.backbone.state_dict()
        assert backbone.keys() == expected.keys()
        for key, value in expected.items():
            assert type(backbone[key]) is torch.Tensor, key
            torch.testing.assert_close(backbone[key], value, rtol=1e-4, atol=1e-6)


def _python_path() -> str:
    """The tests' folder ahead of the caller's path (tests/plant_bugs.py puts the planted
    copy of dinofuse there: the launched processes must import that one too)."""
    return os.pathsep.join(filter(None, [os.path.dirname(__file__), os.environ.get("PYTHONPATH")]))


def _launch_rank(rank, port, args):
    import subprocess
    import sys

    env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD),
               LOCAL_WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
               TRITON_INTERPRET="0", PYTHONPATH=_python_path())
    return subprocess.Popen([sys.executable, "-m", "dinofuse.engine.train", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _logged_losses(lines):
    import json

    return {e["step"]: e["loss"] for e in map(json.loads, lines)}


def test_a_killed_rank_ends_the_job_and_a_relaunch_resumes_from_the_last_complete_save(tmp_path):
    import signal
    import time

    from dinofuse.engine.checkpoint import latest_complete
    from test_train import TINY

    folder = _image_folder(tmp_path / "imgs")
    run = tmp_path / "run"
    args = ["--data", str(folder), "--output-dir", str(run), "--quiet",
            *[o for o in TINY if not o.startswith("optim.epochs")], "optim.epochs=50",
            "optim.batch_size_per_device=2", "run.save_every_steps=4",
            "run.collective_timeout_s=20"]
    port = _free_port()
    ranks = [_launch_rank(r, port, args) for r in range(WORLD)]
    try:
        deadline = time.time() + 240
        log = run / "log.jsonl"
        while time.time() < deadline:  # kill rank 1 two steps after the save at step 4
            done = latest_complete(run / "checkpoints")
            if done is not None and log.is_file() and len(log.read_text().splitlines()) >= 6:
                break
            assert all(p.poll() is None for p in ranks), ranks[0].communicate()[1][-2000:]
            time.sleep(0.05)
        ranks[1].send_signal(signal.SIGKILL)
        killed_at = time.time()
        _, err = ranks[0].communicate(timeout=90)
        assert ranks[0].returncode != 0
        assert time.time() - killed_at < 20 + 30  # the collective timeout, and then some
        assert "another rank died or hung" in err and "--resume" in err, err[-2000:]
    finally:
        for p in ranks:
            p.kill()
    saved = latest_complete(run / "checkpoints")
    step = int(saved.name[5:])
    first = _logged_losses(log.read_text().splitlines())
    lines_before = len(log.read_text().splitlines())

    port = _free_port()
    ranks = [_launch_rank(r, port, [*args, "--resume", "--max-steps", "3"]) for r in range(WORLD)]
    for p in ranks:
        _, err = p.communicate(timeout=240)
        assert p.returncode == 0, err[-3000:]
    resumed = _logged_losses(log.read_text().splitlines()[lines_before:])
    assert sorted(resumed) == [step, step + 1, step + 2]  # from the last complete save
    overlap = [s for s in resumed if s in first]  # steps the killed run did after that save
    assert overlap, (step, sorted(first))
    assert [resumed[s] for s in overlap] == pytest.approx([first[s] for s in overlap], rel=1e-5)


def test_one_process_checkpoint_resumes_under_two(tmp_path, reference_path):
    """checkpoint.pth of one process (optimizer keyed by parameter name) continues under two
    FSDP2 processes like an uninterrupted run, through the end of the last-layer freeze."""
    import functools

    from dinofuse.engine.train import Trainer

    folder = _image_folder(tmp_path / "imgs")
    reference = Trainer(_cfg(folder, tmp_path / "ref", 4))
    ref_losses = [log.loss for log in reference.fit(max_steps=6, progress=False)]
    first = Trainer(_cfg(folder, tmp_path / "run", 4))
    first.fit(max_steps=2, progress=False)  # epoch 0 of 4 steps: the last layer still frozen
    assert (tmp_path / "run" / "checkpoint.pth").is_file()

    result = tmp_path / "two.pt"
    _spawn(functools.partial(_train_and_report, folder=folder, out=tmp_path / "run",
                             result=result, steps=4, resume=True))
    two = torch.load(result, weights_only=True)
    assert two["start"] == 2
    assert two["losses"] == pytest.approx(ref_losses[2:], rel=1e-5)
    for key, value in reference.teacher.state_dict().items():
        torch.testing.assert_close(two["teacher"][key], value, rtol=1e-4, atol=1e-6)


def _nan_on_one_rank(rank, folder, out, result):
    from dinofuse.engine.train import Trainer, TrainingError

    trainer = Trainer(_cfg(folder, out, 2))
    trainer.fit(max_steps=1, progress=False)
    if rank == 1:  # only this rank's batches are broken (the weights are shared)
        step = trainer.train_step
        trainer.train_step = lambda crops: step([c * float("nan") for c in crops])
    try:
        trainer.fit(max_steps=3, progress=False)
        outcome = "trained on"
    except TrainingError as e:
        outcome = str(e)
    # the stop waited for the all-reduces in flight (loss, center): none outlives the error
    in_flight = [trainer.loss_fn._pending_center is not None,
                 trainer._unchecked is not None and trainer._unchecked._loss._work is not None]
    outcome = (outcome, in_flight)
    outcomes = [None] * WORLD
    dist.all_gather_object(outcomes, outcome)
    if rank == 0:
        torch.save(outcomes, result)


def test_a_non_finite_loss_on_one_rank_stops_every_rank_at_the_same_step(tmp_path):
    """The loss read (a step later, with no host sync) is the mean over ranks: one rank's
    NaN reaches all of them, and all stop naming the same step instead of one rank leaving
    the others waiting in a collective."""
    import functools

    result = tmp_path / "outcomes.pt"
    _spawn(functools.partial(_nan_on_one_rank, folder=_image_folder(tmp_path / "imgs"),
                             out=tmp_path / "run", result=result))
    outcomes = torch.load(result, weights_only=True)
    assert outcomes[0] == outcomes[1] and outcomes[0][0].startswith("loss is nan at step 1 ")
    assert outcomes[0][1] == [False, False]


def _open_training_images(rank, folder, out, result, own_caches=False):
    from dinofuse.dataloading import readers
    from dinofuse.engine.inputs import TrainingInput

    if own_caches:  # each node its own home: no cache folder in common
        os.environ["DINOFUSE_CACHE"] = str(out / f"cache{rank}")

    walks, real = [], os.walk

    def walk(*args, **kwargs):  # rank 0's walk slow, as on a network file system: a rank
        walks.append(args[0])  # that does not wait for it walks too
        time.sleep(1.5 if rank == 0 else 0)
        return real(*args, **kwargs)

    readers.os.walk = walk
    outcome, files = "opened", None
    try:
        source = TrainingInput(_cfg(folder, out, 2), torch.device("cpu"), rank, WORLD, None,
                               lambda: None)
        files = [(str(p), label) for p, label in source.dataset.images.samples]
    except ValueError as e:
        outcome = str(e)
    gathered = [None] * WORLD
    dist.all_gather_object(gathered, (len(walks), outcome, files))
    if rank == 0:
        torch.save(gathered, result)


@pytest.mark.parametrize("own_caches", [False, True])
def test_the_training_images_are_listed_once_for_every_rank(tmp_path, own_caches):
    """Rank 0 lists the folder, keeps the listing and sends it to the other ranks, which walk
    nothing (with 96 ranks on a network file system, 96 walks of ImageNet at each start were
    the cost), also where the nodes share no cache folder: every rank has rank 0's files. A
    folder rank 0 cannot open is the same one-line error on every rank, not a hang."""
    import functools

    folder = tmp_path / "imgs"
    folder.mkdir()
    for c in ("c0", "c1"):
        _image_folder(folder / c, 8)
    hour_ago = time.time_ns() - 3600 * 10**9  # a dataset at rest: its listing is kept
    for where in (folder, folder / "c0", folder / "c1"):
        os.utime(where, ns=(hour_ago, hour_ago))
    result = tmp_path / "walks.pt"
    _spawn(functools.partial(_open_training_images, folder=folder, out=tmp_path / "run",
                             result=result, own_caches=own_caches))
    (rank_0, opened_0, files_0), (rank_1, opened_1, files_1) = torch.load(result, weights_only=True)
    assert (rank_0, rank_1, opened_0, opened_1) == (2, 0, "opened", "opened")
    assert len(files_0) == 16 and files_1 == files_0
    (tmp_path / "empty").mkdir()
    _spawn(functools.partial(_open_training_images, folder=tmp_path / "empty", out=tmp_path / "run",
                             result=result, own_caches=own_caches))
    (_, first, _), (_, second, _) = torch.load(result, weights_only=True)
    assert first == second and first.startswith("no images ("), first


def _train_in_each_nodes_own_folder(rank, folder, out, result):
    import socket

    from dinofuse.engine.errors import TrainingError
    from dinofuse.engine.train import Trainer

    trainer = Trainer(_cfg(folder, out / f"node{rank}", 2))  # one path, each node its own disk
    try:
        trainer.fit(max_steps=1, progress=False)
        outcome = "trained"
    except TrainingError as e:
        outcome = str(e)
    outcomes = [None] * WORLD
    dist.all_gather_object(outcomes, (outcome, socket.gethostname()))
    if rank == 0:
        torch.save(outcomes, result)


def test_an_output_folder_that_is_not_shared_is_refused_on_every_rank(tmp_path):
    """Multi-node with run.output_dir on each node's own disk: rank 0 would write the
    checkpoint where the others cannot read it back. Every rank stops at the start, naming
    a rank that does not see rank 0's files; nothing is trained or saved."""
    import functools

    result = tmp_path / "outcomes.pt"
    (tmp_path / "run" / "node1").mkdir(parents=True)  # rank 1's disk: a lock file of its own
    (tmp_path / "run" / "node1" / ".dinofuse.lock").write_text("pid 7 on node1, since 2026-11-01")
    _spawn(functools.partial(_train_in_each_nodes_own_folder, folder=_image_folder(tmp_path / "imgs"),
                             out=tmp_path / "run", result=result))
    outcomes = torch.load(result, weights_only=True)
    for outcome, host in outcomes:
        assert f"is not one folder for every process: rank 1 on {host} does not see rank 0's " \
            "files there" in outcome, outcome
    assert not list((tmp_path / "run").rglob("checkpoint*"))


def _file_save_failing_on_rank_0(rank, folder, out, result):
    import time

    import dinofuse.engine.trainer_checkpoints as saves
    from dinofuse.engine.checkpoint import CheckpointError
    from dinofuse.engine.train import Trainer

    trainer = Trainer(_cfg(folder, out, 2, 'run.checkpoint_format="file"'))
    if rank == 0:  # only rank 0 writes the file: its disk is full
        def disk_full(obj, path):
            raise CheckpointError(f"cannot write checkpoint {path}: No space left on device")

        saves.save_atomic = disk_full
    started = time.perf_counter()
    try:
        trainer.save()
        outcome = "saved"
    except CheckpointError as e:
        outcome = str(e)
    outcomes = [None] * WORLD
    dist.all_gather_object(outcomes, (outcome, time.perf_counter() - started))
    if rank == 0:
        torch.save(outcomes, result)


def test_a_checkpoint_file_that_cannot_be_written_stops_every_rank_at_once(tmp_path):
    """One file, written by rank 0: its failure reaches the other ranks in the save itself
    (they do not wait for it at a barrier until the collective timeout)."""
    import functools

    result = tmp_path / "outcomes.pt"
    _spawn(functools.partial(_file_save_failing_on_rank_0, folder=_image_folder(tmp_path / "imgs"),
                             out=tmp_path / "run", result=result))
    (first, first_s), (second, second_s) = torch.load(result, weights_only=True)
    assert first == second and first.startswith("cannot write checkpoint ") and "No space" in first
    assert max(first_s, second_s) < 30  # the group's timeout is 120 s
    assert not (tmp_path / "run" / "checkpoint.pth").exists()


def _sharded_save_failing_on_rank_1(rank, folder, out, result):
    from torch.distributed.checkpoint import FileSystemWriter

    from dinofuse.engine.checkpoint import CheckpointError
    from dinofuse.engine.train import Trainer

    trainer = Trainer(_cfg(folder, out, 2))  # sharded, written in the background
    trainer.fit(max_steps=1, progress=False)  # step 1: saved, complete
    if rank == 1:
        def disk_full(self, plan, planner):
            raise OSError(28, "No space left on device")

        FileSystemWriter.write_data = disk_full
    try:
        trainer.fit(max_steps=1, progress=False)  # step 2: its save fails on rank 1
        outcome = "saved"
    except CheckpointError as e:
        outcome = str(e)
    outcomes = [None] * WORLD
    dist.all_gather_object(outcomes, outcome)
    if rank == 0:
        torch.save(outcomes, result)


def test_a_sharded_checkpoint_that_cannot_be_written_is_named_on_every_rank(tmp_path):
    """A write failing on one rank reaches every rank as one line naming the folder and the
    rank; the folder is not marked complete, and the previous complete one stays newest."""
    import functools

    from dinofuse.engine.checkpoint import latest_complete, step_dir

    run, result = tmp_path / "run", tmp_path / "outcomes.pt"
    _spawn(functools.partial(_sharded_save_failing_on_rank_1,
                             folder=_image_folder(tmp_path / "imgs"), out=run, result=result))
    first, second = torch.load(result, weights_only=True)
    failed, kept = step_dir(run / "checkpoints", 2), step_dir(run / "checkpoints", 1)
    assert first == second, (first, second)
    assert first.startswith(f"cannot write sharded checkpoint {failed} (rank 1: OSError: ")
    assert first.endswith(f"No space left on device); the newest complete one, {kept}, is kept")
    assert latest_complete(run / "checkpoints") == kept


def _stop_asked_on_one_rank(rank, folder, out, result):
    import signal

    from dinofuse.engine.train import Trainer, TrainingError
    from test_train import signal_after_step

    outcomes = []
    trainer = Trainer(_cfg(folder, out, 2))
    if rank == 1:  # a signal to this rank only, after its 2nd step
        signal_after_step(trainer, 2, signal.SIGUSR1)
    try:
        trainer.fit(progress=False)
        outcomes.append("trained on")
    except TrainingError as e:
        outcomes.append(str(e).split(";")[0])
    # the time limit passed on this rank only: before, it stopped alone and the other rank
    # went on into the next step's collectives
    limit = "run.max_minutes=1e-6" if rank == 1 else "run.max_minutes=0.0"
    trainer = Trainer(_cfg(folder, out, 2, limit), resume=True)
    start = trainer.step
    trainer.fit(progress=False)
    outcomes.append((start, trainer.step, trainer.stopping))
    gathered = [None] * WORLD
    dist.all_gather_object(gathered, outcomes)
    if rank == 0:
        torch.save(gathered, result)


def test_a_stop_asked_of_one_rank_stops_every_rank_at_the_same_step(tmp_path):
    """A signal (SLURM's SIGUSR1, torchrun's SIGTERM) or the time limit on one rank: its vote
    travels in the step's loss all-reduce, so every rank stops after the same step and saves
    the same complete checkpoint, and the relaunch resumes from it."""
    import functools

    from dinofuse.engine.checkpoint import latest_complete

    result = tmp_path / "outcomes.pt"
    _spawn(functools.partial(_stop_asked_on_one_rank, folder=_image_folder(tmp_path / "imgs"),
                             out=tmp_path / "run", result=result))
    (signal_0, time_0), (signal_1, time_1) = torch.load(result, weights_only=True)
    assert (signal_0, signal_1) == ("stopped at step 4 by a signal to another rank",
                                    "stopped at step 4 by SIGUSR1")
    assert time_0 == time_1 == (4, 7, "time")
    assert latest_complete(tmp_path / "run" / "checkpoints").name == "step_00000007"


def _fit_with_rank_1_slower(rank, folder, out, result):
    import time

    from dinofuse.engine import cli, time_budget

    steps = time_budget._steps

    def slower(trainer, batches, count):  # rank 1 takes 0.1 s longer per timed step
        steps(trainer, batches, count)
        if rank == 1 and count == time_budget.TIMED_STEPS:
            time.sleep(0.1 * count)

    time_budget._steps = slower
    fitted = cli._fit_to_minutes(_cfg(folder, out, 2, "optim.epochs=50"), 0.2, False, rank)
    outcomes = [None] * WORLD
    dist.all_gather_object(outcomes, (fitted.optim.epochs, fitted.optim.warmup_epochs,
                                      (out / "fit-trial").exists()))
    if rank == 0:
        torch.save(outcomes, result)


def test_fit_minutes_under_two_processes_fits_every_rank_to_the_slowest(tmp_path):
    """Each rank times the trial (a sharded save in a folder both see, removed after) and
    takes the slowest rank's times: the ranks fit the same epochs and schedules, which a
    rank fitting by its own clock would not (rank 1 is made 0.1 s per step slower)."""
    import functools

    result = tmp_path / "outcomes.pt"
    _spawn(functools.partial(_fit_with_rank_1_slower, folder=_image_folder(tmp_path / "imgs"),
                             out=tmp_path / "run", result=result))
    (epochs, warmup, trial_left), other = torch.load(result, weights_only=True)
    assert other == (epochs, warmup, trial_left) and not trial_left
    # 12 s of 4 steps of at least 0.1 s and a save: the time, not optim.epochs, sets the count
    assert 1 <= epochs < 30 and warmup == pytest.approx(0.5 * epochs / 50)


def _linear_eval(rank, result, cached):
    from test_linear import colored, settings, tiny_backbone

    from dinofuse.engine.eval.linear import LinearEval

    cfg = settings(epochs=2, batch_size=4, lrs=(0.5, 5.0), cached_features=cached)
    run = LinearEval(tiny_backbone(), colored(22, 20), colored(15, 21), cfg, "cpu")
    run.run(log=lambda line: None)
    if rank == 0:
        torch.save({"weights": [c.linear.weight.detach() for c in run.classifiers],
                    "history": run.history}, result)


@pytest.mark.parametrize("cached", [True, False], ids=["cached", "augmented"])
def test_linear_evaluation_under_two_processes_is_one_with_the_global_batch(tmp_path, cached):
    """Each rank a share of every step, gradients added up, validation counts added up: the
    same classifiers and figures as one process with twice the batch. 22 images at a global
    batch of 8: the last step's 6 split 3 and 3."""
    from functools import partial

    from test_linear import colored, settings, tiny_backbone

    from dinofuse.engine.eval.linear import LinearEval

    _spawn(partial(_linear_eval, result=tmp_path / "two.pth", cached=cached))
    two = torch.load(tmp_path / "two.pth", weights_only=True)
    one = LinearEval(tiny_backbone(), colored(22, 20), colored(15, 21),
                     settings(epochs=2, batch_size=8, lrs=(0.5, 5.0), cached_features=cached), "cpu")
    one.run(log=lambda line: None)
    if cached:  # the augmented crops draw per rank: only the cached run can match exactly
        for a, b in zip(two["weights"], one.classifiers, strict=True):
            assert torch.allclose(a, b.linear.weight, atol=1e-6)
        for a, b in zip(two["history"], one.history, strict=True):
            assert [v["top1"] for v in a["val"]] == [v["top1"] for v in b["val"]]
            assert [v["loss"] for v in a["val"]] == pytest.approx([v["loss"] for v in b["val"]])
        assert two["history"][-1]["train_loss"] == pytest.approx(one.history[-1]["train_loss"])
    assert sum((h["lr"] for h in two["history"]), []) == pytest.approx(
        sum((h["lr"] for h in one.history), []))  # LR scaled by the global batch
    assert all(h["val"][0]["top1"] * 15 / 100 == pytest.approx(round(h["val"][0]["top1"] * 15 / 100))
               for h in two["history"])  # whole images: the counts of all 15, not of one share


def _knn_features(rank, result):
    from test_linear import colored, tiny_backbone

    from dinofuse.engine.eval.knn import extract_features
    from dinofuse.engine.eval.report import eval_transform

    args = (tiny_backbone(), colored(11, 22), eval_transform(16, 1.0), "cpu")
    got = {"shared": extract_features(*args, batch_size=4, distributed=True)}
    if rank == 0:  # without `distributed`: no collective, so one rank may call it alone
        got["alone"] = extract_features(*args, batch_size=4)
    torch.save(got, f"{result}.{rank}")


def test_knn_features_extracted_in_shares_come_back_whole_and_in_order(tmp_path):
    """11 images over 2 ranks (6 and 5): every rank gets all 11 rows, as one process does."""
    from functools import partial

    from test_linear import colored, tiny_backbone

    from dinofuse.engine.eval.knn import extract_features
    from dinofuse.engine.eval.report import eval_transform

    _spawn(partial(_knn_features, result=tmp_path / "features"))
    one = extract_features(tiny_backbone(), colored(11, 22), eval_transform(16, 1.0), "cpu")
    for rank in range(2):
        got = torch.load(f"{tmp_path / 'features'}.{rank}", weights_only=True)
        assert set(got) == ({"shared", "alone"} if rank == 0 else {"shared"})
        for pair in got.values():
            assert torch.allclose(pair[0], one[0], atol=1e-6) and torch.equal(pair[1], one[1])


def _torchrun(args, nproc=WORLD, check=True):
    """`torchrun --nproc_per_node=N -m dinofuse.engine.cli ARGS`: the command as users run it.
    Its output, or with check=False the finished process."""
    import subprocess
    import sys

    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=_python_path())
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           f"--nproc_per_node={nproc}", "-m", "dinofuse.engine.cli", *args],
                          env=env, capture_output=True, text=True, timeout=300)
    if not check:
        return done
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_every_rank_skips_the_bad_headers_found_by_any_rank(tmp_path):
    """DALI's reader moves each rank to the next shard every epoch, so every rank reads
    every file: the header screen is split between the ranks and its finds gathered, so no
    rank's DALI ever reads the bad file (DALI 2.4 can crash on it). Two epochs under
    torchrun; the skip is reported once."""
    pytest.importorskip("nvidia.dali")
    import numpy as np
    from PIL import Image

    from test_train import TINY

    rng = np.random.default_rng(5)
    root = tmp_path / "imgs"
    root.mkdir()
    for i in range(15):
        Image.fromarray((rng.random((20, 20, 3)) * 255).astype(np.uint8)).save(root / f"{i:02d}.jpg")
    (root / "07b.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"not a JPEG after its first marker" * 3)
    overrides = [o for o in TINY if not o.startswith("data.backend")]
    done = _torchrun(["train", "--data", str(root), "--output-dir", str(tmp_path / "run"),
                      "--quiet", *overrides, 'data.backend="dali"', "data.num_workers=1",
                      "data.skip_bad_images=true"], check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr.count("skipping undecodable image") == 1, done.stderr[-3000:]
    assert "07b.jpg" in done.stderr


def test_the_screens_patched_shards_are_written_once_for_all_ranks(tmp_path):
    """Every rank's screen finds the same bad image: rank 0 alone writes the patched copy
    (each rank wrote its own before), the others read it. Two shards of one file name in two
    folders get copies of their own (they were both written to one path, and one shard's
    samples were read twice, the other's never)."""
    pytest.importorskip("nvidia.dali")
    from dinofuse.dataloading.readers import WebDatasetShards
    from test_readers import write_shard
    from test_train import TINY, images_with_a_bad_one

    images = images_with_a_bad_one(tmp_path, "header")  # 7 readable, the last one not
    for folder, members in (("a", images[:3] + images[-1:]), ("b", images[3:])):
        (tmp_path / folder).mkdir()
        write_shard(tmp_path / folder / "train.tar", members)
    overrides = [o for o in TINY if not o.startswith("data.backend")]
    done = _torchrun(["train", "--data", str(tmp_path / "{a,b}" / "train.tar"), "--output-dir",
                      str(tmp_path / "run"), "--quiet", *overrides, 'data.backend="dali"',
                      "data.num_workers=1", "data.skip_bad_images=true",
                      "optim.batch_size_per_device=2", "--max-steps", "2"], check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    patched = tmp_path / "run" / "patched_shards"
    assert sorted(str(p.relative_to(patched)) for p in patched.rglob("*.tar")) == [
        "screened/000000-train.tar", "screened/000001-train.tar"]
    for k, folder in enumerate("ab"):
        copy = WebDatasetShards([str(patched / "screened" / f"{k:06d}-train.tar")])
        original = WebDatasetShards([str(tmp_path / folder / "train.tar")])
        assert [copy.name(i).split(":")[1] for i in range(len(copy))] == [
            original.name(i).split(":")[1] for i in range(len(original))]


def test_knn_and_linear_commands_under_torchrun_give_one_process_figures(tmp_path, capsys):
    """`dinofuse knn` and `dinofuse linear` launched by torchrun: rank 0 alone prints, with
    the figures of one process (the linear one with the same global batch), and the linear
    run's files are written once."""
    import json
    import re

    import numpy as np
    from PIL import Image

    from dinofuse.engine.cli import main
    from dinofuse.engine.models import vit_tiny

    rng = np.random.default_rng(4)
    for folder, count in (("train", 7), ("val", 6)):  # 14 and 12 images: 7 and 6 per rank
        for c in range(2):  # noise: accuracies away from 100%, so that a wrong count shows
            (tmp_path / folder / f"c{c}").mkdir(parents=True)
            for i in range(count):
                Image.fromarray((rng.random((20, 20, 3)) * 255).astype(np.uint8)).save(
                    tmp_path / folder / f"c{c}" / f"{i}.png")
    torch.manual_seed(0)
    torch.save(vit_tiny(depth=2).state_dict(), tmp_path / "backbone.pth")
    sets = ["--checkpoint", str(tmp_path / "backbone.pth"), "--train", str(tmp_path / "train"),
            "--val", str(tmp_path / "val"), "--crop", "32", "--workers", "0"]
    knn = ["knn", *sets, "--k", "3", "5"]
    linear = ["linear", *sets, "--epochs", "2", "--cached-features", "--lr", "0.05", "1"]

    two_knn = _torchrun([*knn, "--dump-features", str(tmp_path / "two_features")])
    two_linear = _torchrun([*linear, "--batch-size", "3", "--output-dir", str(tmp_path / "two")])
    assert main([*knn, "--dump-features", str(tmp_path / "one_features")]) == 0
    one_knn = capsys.readouterr().out
    assert main([*linear, "--batch-size", "6", "--output-dir", str(tmp_path / "one")]) == 0
    one_linear = capsys.readouterr().out

    assert two_knn.replace("two_features", "one_features") == one_knn  # printed once
    assert one_knn.count("-NN: top-1") == 2
    for name in ("trainfeat", "testfeat", "trainlabels", "testlabels"):  # written once, whole
        one, two = (torch.load(tmp_path / f"{n}_features" / f"{name}.pth", weights_only=True)
                    for n in ("one", "two"))
        torch.testing.assert_close(one, two, atol=1e-6, rtol=0)
    figures = [re.findall(r"top-1 ([0-9.]+)%", out) for out in (one_linear, two_linear)]
    assert figures[0] == figures[1] and len(figures[0]) == 3  # 2 epochs, the summary
    assert two_linear.count("linear: top-1") == 1
    runs = [json.loads((tmp_path / d / "linear.json").read_text()) for d in ("one", "two")]
    for a, b in zip(runs[0]["last"]["val"], runs[1]["last"]["val"], strict=True):
        assert a["top1"] == b["top1"] and a["loss"] == pytest.approx(b["loss"])
    logs = [(tmp_path / d / "linear_log.jsonl").read_text().splitlines() for d in ("one", "two")]
    assert len(logs[1]) == 2  # one line per epoch: rank 0 alone writes
    weights = [torch.load(tmp_path / d / "linear.pth", weights_only=True) for d in ("one", "two")]
    assert weights[1]["world"] == 2
    for a, b in zip(weights[0]["classifiers"], weights[1]["classifiers"], strict=True):
        for name in a:
            torch.testing.assert_close(a[name], b[name], atol=1e-5, rtol=1e-4)


def test_training_under_torchrun_ends_with_the_knn_report_of_its_teacher(tmp_path):
    """The k-NN report after FSDP2 training: every rank extracts a share with an unsharded
    copy of the teacher (the sharded one's forward on rank 0 alone failed), rank 0 prints
    and writes it once, and its figures are those of the saved teacher evaluated in one
    process. So does run.knn_every_epochs between epochs."""
    import json

    import numpy as np
    from PIL import Image

    from dinofuse.engine.cli import _load_backbone, random_backbone
    from dinofuse.engine.eval.report import knn_report
    from dinofuse.engine.run_lock import RunLock
    from test_train import TINY

    rng = np.random.default_rng(5)
    for folder, count in (("train", 8), ("val", 5)):
        for c in range(2):
            (tmp_path / folder / f"c{c}").mkdir(parents=True)
            for i in range(count):
                Image.fromarray((rng.random((20, 20, 3)) * 255).astype(np.uint8)).save(
                    tmp_path / folder / f"c{c}" / f"{i}.png")
    run = tmp_path / "run"
    train = ["train", "--data", str(tmp_path / "train"), "--output-dir", str(run), "--quiet",
             *[o for o in TINY if not o.startswith("run.knn_after")],
             "run.knn_after_training=true", f'run.knn_val="{tmp_path / "val"}"', "run.knn_k=3",
             "optim.epochs=2", "run.knn_every_epochs=1"]
    held = RunLock(run)  # another run training there: both ranks stop at once, in one line
    assert held.acquire() is None
    refused = _torchrun([*train, "run.collective_timeout_s=30"], check=False)
    held.release()
    assert refused.returncode != 0
    said = [line for line in refused.stderr.splitlines() if "is in use by another training run" in line]
    # each rank's line, then torchrun's summary naming it as each failure's cause
    assert [line.startswith("dinofuse train: error: ") for line in said] == [True, True, False, False]
    assert all(line.strip().startswith("traceback : dinofuse train: error: ")
               for line in said[2:]), refused.stderr[-2000:]
    printed = _torchrun(train)
    assert printed.count("k-NN (k=3") == 1 and printed.count(" steps to step ") == 1
    # the checkpoint named is the sharded one the run wrote
    assert f"checkpoint {run / 'checkpoints' / 'step_00000004'}\n" in printed
    assert (run / "checkpoints" / "step_00000004" / ".metadata").is_file()
    # after epoch 1 (epoch 2's is the report's): every rank took part, rank 0 wrote it
    between = [json.loads(line) for line in (run / "knn_log.jsonl").read_text().splitlines()]
    assert [(r["step"], r["epoch"]) for r in between] == [(2, 1)]
    written = json.loads((run / "knn.json").read_text())
    backbone, cfg = _load_backbone(str(run), torch.device("cpu"))  # the sharded save, whole
    alone = knn_report(cfg, backbone, random_backbone(cfg, "cpu"), "cpu")
    assert set(written) == set(alone) == {"trained teacher", "random init", "raw pixels"}
    for row in alone:
        assert written[row] == pytest.approx(alone[row]), row
