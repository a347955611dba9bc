"""Official DINO weights in, timm-loadable weights out, atomic saves, safe loads."""

import argparse
import copy

import pytest
import timm
import torch

from dinofuse.engine.checkpoint import (
    CheckpointError,
    backbone_state,
    export_backbone,
    load_backbone,
    load_file,
    save_atomic,
)
from dinofuse.engine.cli import main
from dinofuse.engine.models import ARCHS, vit_small, vit_tiny

# the checkpoints are what these tests check: the training steps some of them take use the
# plain-PyTorch loss and EMA (the kernels, interpreted, are tested on their own)
pytestmark = pytest.mark.usefixtures("reference_path")


def official_checkpoint(model):
    """The layout of the official training checkpoints (main_dino.py's save_dict): student
    under DDP (module.) and the multi-crop wrapper (backbone.), head weights beside them, and
    the optimizer, epoch, command line (an argparse.Namespace), loss center and fp16 scaler."""
    sd = model.state_dict()
    head = {"head.mlp.0.weight": torch.randn(8, 192), "head.last_layer.weight_g": torch.ones(5, 1)}
    student = {**{f"module.backbone.{k}": v + 1 for k, v in sd.items()},
               **{f"module.{k}": v for k, v in head.items()}}
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(3))])
    optimizer.step()
    arch = next(name for name, sizes in ARCHS.items() if sizes["embed_dim"] == model.embed_dim)
    return {"student": student,
            "teacher": {**{f"backbone.{k}": v for k, v in sd.items()}, **head},
            "optimizer": optimizer.state_dict(), "epoch": 7,
            "args": argparse.Namespace(arch=arch, patch_size=16, out_dim=5, use_fp16=True,
                                       global_crops_scale=(0.4, 1.0), data_path="/data/train",
                                       lr=0.0005, saveckp_freq=20, seed=0, dist_url="env://"),
            "dino_loss": {"center": torch.zeros(1, 5)},
            "fp16_scaler": torch.amp.GradScaler("cpu").state_dict()}


def test_loads_official_teacher_and_student(tmp_path):
    source = vit_tiny(depth=2)
    path = tmp_path / "checkpoint.pth"
    torch.save(official_checkpoint(source), path)
    for which, offset in (("teacher", 0), ("student", 1)):
        model = vit_tiny(depth=2)
        load_backbone(model, path, which)
        for k, v in model.state_dict().items():
            torch.testing.assert_close(v, source.state_dict()[k] + offset)


def test_loads_a_bare_released_backbone(tmp_path):
    source = vit_tiny(depth=2)
    path = tmp_path / "dino_deittiny16_pretrain.pth"
    torch.save(source.state_dict(), path)
    model = vit_tiny(depth=2)
    load_backbone(model, path)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), source.state_dict().values()))


def test_wrong_architecture_and_bad_files_are_named(tmp_path):
    path = tmp_path / "w.pth"
    torch.save(vit_tiny(depth=2).state_dict(), path)
    with pytest.raises(CheckpointError, match="do not fit this model"):
        load_backbone(vit_tiny(depth=3), path)
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        load_file(tmp_path / "missing.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read checkpoint .*junk.pth: not a PyTorch "
                                              "checkpoint, or a truncated one"):
        load_file(tmp_path / "junk.pth")
    (tmp_path / "cut.pth").write_bytes(path.read_bytes()[:500])  # a copy that stopped early
    with pytest.raises(CheckpointError, match=r"cut.pth: not a PyTorch checkpoint, or a "
                                              r"truncated one \(RuntimeError: [^\n]*\)$"):
        load_file(tmp_path / "cut.pth")
    whole = export_backbone(vit_tiny(depth=2).state_dict(), tmp_path / "w.safetensors")
    (tmp_path / "cut.safetensors").write_bytes(whole.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=r"cannot read checkpoint .*cut.safetensors: "):
        load_file(tmp_path / "cut.safetensors")


def test_code_in_a_pickle_is_refused(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("this must never run",))

    path = tmp_path / "evil.pth"
    torch.save({"teacher": Payload()}, path)
    with pytest.raises(CheckpointError, match="cannot read checkpoint .*evil.pth: Unsupported "
                                              "global: .*print.*weights_only=True"):
        load_file(path)
    # nor inside the one class allowed by name (the official checkpoints' argparse.Namespace)
    torch.save({"args": argparse.Namespace(hook=Payload())}, path)
    with pytest.raises(CheckpointError, match="Unsupported global: .*print"):
        load_file(path)


def test_atomic_save_replaces_whole_files(tmp_path):
    path = tmp_path / "ckpt.pth"
    save_atomic({"a": torch.ones(3)}, path)
    save_atomic({"a": torch.zeros(3)}, path)
    assert torch.equal(load_file(path)["a"], torch.zeros(3))
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pth"]  # no temporary left


def test_a_full_disk_names_the_checkpoint_and_keeps_the_previous_one(tmp_path, monkeypatch):
    import errno

    path = tmp_path / "ckpt.pth"
    save_atomic({"a": torch.ones(3)}, path)
    before = path.read_bytes()

    def disk_full(obj, f):
        f.write(b"half a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(CheckpointError, match=f"cannot write checkpoint {path}: No space left "
                                              r"on device \(the previous one is kept\)"):
        save_atomic({"a": torch.zeros(3)}, path)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["ckpt.pth"]
    with pytest.raises(CheckpointError, match=r"none was written before"):
        save_atomic({}, tmp_path / "new.pth")
    assert not (tmp_path / "new.pth").exists()


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_export_loads_in_timm(tmp_path, suffix, capsys):
    ours = vit_small().eval()
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_(0, 0.05)
    out = export_backbone(backbone_state({"teacher": ours.state_dict()}), tmp_path / f"teacher{suffix}")
    # the command, from an official training checkpoint (prefixed keys, args, optimizer, ...)
    torch.save(official_checkpoint(ours), tmp_path / "official.pth")
    out_cli = tmp_path / f"teacher-cli{suffix}"
    assert main(["export", "--checkpoint", str(tmp_path / "official.pth"), "--out", str(out_cli)]) == 0
    assert capsys.readouterr().out.endswith(  # timm's own ViT-S/16, nothing to change
        f'in timm: timm.create_model("vit_small_patch16_224", pretrained=True, num_classes=0, '
        f'pretrained_cfg_overlay=dict(file="{out_cli}"))\n')
    exported, from_cli = load_file(out), load_file(out_cli)
    assert from_cli.keys() == exported.keys()
    for key, value in exported.items():
        assert torch.equal(from_cli[key], value), key
    model = timm.create_model("vit_small_patch16_224", pretrained=True, num_classes=0,
                              pretrained_cfg_overlay=dict(file=str(out))).eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(x)[:, 0], ours(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model,expected", [
    (dict(arch="vit_small", patch_size=8), 'create_model("vit_small_patch8_224", {})'),
    (dict(arch="vit_base", patch_size=8, img_size=480),
     'create_model("vit_base_patch8_224", {}, img_size=480)'),
    (dict(arch="vit_tiny", patch_size=8), 'create_model("vit_tiny_patch16_224", {}, patch_size=8)'),
    (dict(arch="vit_small", patch_size=16, in_chans=1, depth=6),
     'create_model("vit_small_patch16_224", {}, depth=6, in_chans=1)'),
])
def test_the_timm_call_names_timms_model_and_what_differs(model, expected):
    from dinofuse.engine.checkpoint import timm_call
    from dinofuse.engine.config import ModelConfig

    options = 'pretrained=True, num_classes=0, pretrained_cfg_overlay=dict(file="t.pth")'
    assert timm_call(ModelConfig(**model), "t.pth") == "timm." + expected.format(options)


def _sharded_run(tmp_path, steps=3):
    from dinofuse.engine.config import load_config
    from dinofuse.engine.train import Trainer
    from test_train import TINY

    cfg = load_config("default", TINY + ['data.path="synthetic"', f'run.output_dir="{tmp_path}"',
                                         'run.checkpoint_format="sharded"', "run.keep_checkpoints=1"])
    trainer = Trainer(cfg)
    trainer.fit(max_steps=steps, progress=False)
    return cfg, trainer


def test_a_save_cut_short_is_never_resumed_from(tmp_path):
    from dinofuse.engine.checkpoint import read_sharded, sharded_checkpoints, step_dir
    from dinofuse.engine.train import Trainer

    cfg, trainer = _sharded_run(tmp_path)
    # a later save that died mid-way: shards written, no COMPLETE marker
    cut = step_dir(tmp_path / "checkpoints", 5)
    cut.mkdir()
    (cut / "__0_0.distcp").write_bytes(b"half a shard")
    (cut / "extra.pt").write_bytes(b"")
    assert Trainer(cfg, resume=True).step == 3
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        read_sharded(cut, {})
    # the next complete save drops it, and keeps only the newest complete one (keep 1)
    resumed = Trainer(cfg, resume=True)
    resumed.fit(max_steps=3, progress=False)
    assert [(s, done) for s, _, done in sharded_checkpoints(tmp_path / "checkpoints")] == [(6, True)]


def test_pruning_keeps_the_newest_complete_ones_and_any_save_after_them(tmp_path):
    """Unfinished folders older than the newest complete one are dead saves; a newer one may
    still be being written."""
    from dinofuse.engine.checkpoint import (mark_complete, prune_checkpoints, sharded_checkpoints,
                                            step_dir)

    for step, complete in ((1, True), (2, False), (3, True), (4, True), (5, False)):
        step_dir(tmp_path, step).mkdir()
        if complete:
            mark_complete(step_dir(tmp_path, step), {"step": step})
    prune_checkpoints(tmp_path, keep=2)
    assert [(s, done) for s, _, done in sharded_checkpoints(tmp_path)] == [(3, True), (4, True), (5, False)]


def test_a_corrupt_shard_is_named_on_resume_and_export(tmp_path):
    """A complete checkpoint whose shard was damaged afterwards (truncated in a copy, say):
    resuming or exporting it says which folder and why in one line (DCP raises a
    BaseException that `except Exception` does not catch)."""
    from dinofuse.engine.checkpoint import read_sharded
    from dinofuse.engine.train import Trainer

    cfg, trainer = _sharded_run(tmp_path)
    (shard,) = (tmp_path / "checkpoints").glob("step_*/*.distcp")
    shard.write_bytes(shard.read_bytes()[:64])
    folder = shard.parent
    with pytest.raises(CheckpointError, match=rf"^cannot read sharded checkpoint {folder} \(rank 0: "):
        Trainer(cfg, resume=True)
    with pytest.raises(CheckpointError, match=rf"^cannot read sharded checkpoint {folder} \(rank 0: "):
        read_sharded(folder, {"teacher": trainer.teacher.state_dict()})


class _RunsCode:
    """Unpickling this creates a folder: the stand-in for code in a file from elsewhere."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.mkdir, (str(self.marker),)


def test_a_sharded_checkpoint_from_elsewhere_runs_no_code(tmp_path, capsys):
    """torch's DCP reader unpickles `.metadata` and its planner the small objects with
    weights_only=False; ours refuse anything but what such files hold, on resume, export and
    reads, and say so in one line."""
    import pickle

    import torch.distributed.checkpoint as dcp

    from dinofuse.engine.checkpoint import mark_complete, read_sharded, step_dir
    from dinofuse.engine.train import Trainer

    cfg, trainer = _sharded_run(tmp_path / "run")
    folder = step_dir(tmp_path / "run" / "checkpoints", 3)
    marker = tmp_path / "code-ran"
    (folder / ".metadata").write_bytes(pickle.dumps(_RunsCode(marker)))
    with pytest.raises(CheckpointError, match=rf"{folder}: .*mkdir is not allowed in checkpoint"):
        Trainer(cfg, resume=True)
    with pytest.raises(CheckpointError, match=rf"cannot read sharded checkpoint {folder}"):
        read_sharded(folder, {"teacher": trainer.teacher.state_dict()})
    assert main(["export", "--checkpoint", str(folder), "--out", str(tmp_path / "t.pth")]) == 2
    assert "mkdir is not allowed" in capsys.readouterr().err
    assert not marker.exists()
    with pytest.raises(AttributeError):  # torch's own reader runs it (then finds no metadata)
        dcp.FileSystemReader(str(folder)).read_metadata()
    assert marker.is_dir()

    # an object among the tensors (DCP stores it pickled)
    marker = tmp_path / "code-ran-too"
    other = tmp_path / "other"
    dcp.save({"w": torch.ones(2), "obj": _RunsCode(marker)}, checkpoint_id=str(other))
    mark_complete(other, {})
    with pytest.raises(CheckpointError, match=rf"cannot read sharded checkpoint {other} \(rank 0: "):
        read_sharded(other, {"w": torch.zeros(2), "obj": None})
    assert not marker.exists()
    dcp.load({"w": torch.zeros(2), "obj": None}, checkpoint_id=str(other))  # torch's planner
    assert marker.is_dir()


def test_checkpoint_metadata_admits_torch_types_and_no_torch_function(tmp_path):
    """The metadata unpickler lets `torch.<dtype>` through, not any name in torch: a
    hand-written pickle that calls torch.save would write a file of its choosing."""
    import io
    import pickle

    from dinofuse.engine.checkpoint import _MetadataUnpickler

    marker = tmp_path / "written-by-a-pickle"
    calls_torch = f"ctorch\nsave\n(I1\nS'{marker}'\ntR.".encode()
    with pytest.raises(pickle.UnpicklingError, match="torch.save is not allowed"):
        _MetadataUnpickler(io.BytesIO(calls_torch)).load()
    assert not marker.exists()
    assert _MetadataUnpickler(io.BytesIO(b"ctorch\nbfloat16\n.")).load() is torch.bfloat16
    assert pickle.loads(calls_torch) is None and marker.is_file()  # plain pickle runs it


def test_export_consolidates_a_sharded_checkpoint_on_cpu(tmp_path, capsys):
    from safetensors.torch import load_file as load_safetensors

    _, trainer = _sharded_run(tmp_path / "run")
    expected = backbone_state({"teacher": trainer.teacher.state_dict()})
    step_folder = tmp_path / "run" / "checkpoints" / "step_00000003"
    for source in (step_folder, tmp_path / "run"):  # a step folder, or the run's newest
        out = tmp_path / f"teacher-{source.name}.safetensors"
        assert main(["export", "--checkpoint", str(source), "--out", str(out)]) == 0
        exported = load_safetensors(str(out))
        assert exported.keys() == expected.keys()
        for key, value in expected.items():
            assert torch.equal(exported[key], value), key


def test_resume_takes_the_newest_of_a_file_and_a_sharded_checkpoint(tmp_path):
    from dinofuse.engine.config import with_overrides
    from dinofuse.engine.train import Trainer

    cfg, _ = _sharded_run(tmp_path)  # sharded step 3
    as_file = with_overrides(copy.deepcopy(cfg), ['run.checkpoint_format="file"'])
    on_file = Trainer(as_file, resume=True)
    assert on_file.step == 3  # only the sharded one exists
    on_file.fit(max_steps=2, progress=False)  # checkpoint.pth at step 5
    newer_file = Trainer(as_file, resume=True)
    assert newer_file.step == 5
    newer_file.cfg = cfg  # the same run, saving sharded again
    newer_file.fit(max_steps=2, progress=False)  # sharded step 7
    assert Trainer(as_file, resume=True).step == 7


def test_the_model_config_comes_from_the_weights_and_the_official_args():
    from dinofuse.engine.checkpoint import model_config_for

    weights = vit_small(patch_size=8, depth=3, img_size=96).state_dict()
    m = model_config_for(weights, {})
    assert (m.arch, m.patch_size, m.img_size, m.depth, m.in_chans) == ("vit_small", 8, 96, 3, 3)
    assert model_config_for(weights, {"args": argparse.Namespace(arch="vit_small")}).arch == "vit_small"
    with pytest.raises(CheckpointError, match="384 wide, vit_base is 768"):
        model_config_for(weights, {"args": argparse.Namespace(arch="vit_base")})
    odd = vit_small(embed_dim=320, num_heads=5, depth=1).state_dict()
    with pytest.raises(CheckpointError, match="cannot tell the architecture of these 320-wide"):
        model_config_for(odd, {})
    with pytest.raises(CheckpointError, match="no ViT backbone"):
        model_config_for({"fc.weight": torch.zeros(2, 2)}, {})


def test_a_run_starts_from_other_weights_and_a_resume_ignores_them(tmp_path, capsys):
    """run.init_from: an official training checkpoint gives both networks its teacher's
    backbone, and its head when this config's head has that shape; a bare backbone leaves
    the head as a fresh run has it; one stored at another grid gets its position embedding
    resampled; other widths are one line naming the field; a resume takes its own weights."""
    from timm.layers import resample_abs_pos_embed

    from dinofuse.engine.config import load_config
    from dinofuse.engine.models.vit import resize_pos_embed
    from dinofuse.engine.train import Trainer
    from test_train import TINY

    def trainer(name, *extra, resume=False):
        return Trainer(load_config("default", TINY + ['data.path="synthetic"', *extra,
                                                      f'run.output_dir="{tmp_path / name}"']),
                       resume=resume)

    fresh = trainer("fresh")
    backbone = {k: v + 0.5 for k, v in fresh.teacher.backbone.state_dict().items()}
    head = {k: v + 0.25 for k, v in fresh.teacher.head.state_dict().items()}
    official = {"student": {f"module.backbone.{k}": v + 1 for k, v in backbone.items()},
                "teacher": {**{f"backbone.{k}": v for k, v in backbone.items()},
                            **{f"head.{k}": v for k, v in head.items()}},
                "args": argparse.Namespace(arch="vit_tiny")}
    torch.save(official, tmp_path / "official.pth")
    capsys.readouterr()
    started = trainer("a", f'run.init_from="{tmp_path / "official.pth"}"')
    assert capsys.readouterr().out == f"run.init_from: backbone and head from {tmp_path / 'official.pth'}\n"
    for net in (started.student, started.teacher):
        for got, want in ((net.backbone, backbone), (net.head, head)):
            assert all(torch.equal(v, want[k]) for k, v in got.state_dict().items())
    export_backbone(backbone, tmp_path / "backbone.safetensors")
    wider = dict(official["teacher"], **{"head.last_layer.weight_v": torch.zeros(65, 16),
                                         "head.last_layer.weight_g": torch.ones(65, 1)})
    torch.save(dict(official, teacher=wider), tmp_path / "wider_head.pth")
    for name, said in (("backbone.safetensors", "none there"), ("wider_head.pth", "another shape there")):
        bare = trainer(name, f'run.init_from="{tmp_path / name}"')
        assert f"backbone; the head starts new ({said})" in capsys.readouterr().out
        assert all(torch.equal(v, backbone[k]) for k, v in bare.teacher.backbone.state_dict().items())
        assert all(torch.equal(a, b) for a, b in zip(bare.student.head.state_dict().values(),
                                                      fresh.student.head.state_dict().values()))
    grid = int((backbone["pos_embed"].shape[1] - 1) ** 0.5)
    finer = dict(backbone, pos_embed=resample_abs_pos_embed(backbone["pos_embed"], [2 * grid] * 2,
                                                            num_prefix_tokens=1))
    torch.save(finer, tmp_path / "finer.pth")
    resampled = trainer("c", f'run.init_from="{tmp_path / "finer.pth"}"')
    # as the official forward resizes it at that grid (F.interpolate's bicubic, by hand below)
    assert torch.equal(resampled.student.backbone.pos_embed,
                       resize_pos_embed(finer["pos_embed"], grid, grid))
    patches = finer["pos_embed"][:, 1:].reshape(1, 2 * grid, 2 * grid, -1).permute(0, 3, 1, 2)
    by_hand = torch.nn.functional.interpolate(patches, scale_factor=(grid + 0.1) / (2 * grid),
                                              mode="bicubic")
    torch.testing.assert_close(resampled.student.backbone.pos_embed[0, 1:],
                               by_hand.permute(0, 2, 3, 1).reshape(grid * grid, -1), rtol=0, atol=1e-6)
    torch.save({k: torch.zeros(v.shape[0] + 1, *v.shape[1:]) if k == "cls_token" else v
                for k, v in backbone.items()}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match=r"^run.init_from: .*other.pth: weights do not fit "
                                              r"this model; size mismatch for cls_token"):
        trainer("d", f'run.init_from="{tmp_path / "other.pth"}"')
    # a run folder whose checkpoints are sharded (DCP), consolidated here on the CPU
    _, sharded = _sharded_run(tmp_path / "sharded", steps=2)
    from_run = trainer("e", f'run.init_from="{tmp_path / "sharded"}"')
    assert "backbone and head from" in capsys.readouterr().out
    for net in (from_run.student, from_run.teacher):
        assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(),
                                                      sharded.teacher.state_dict().values()))
    started.fit(max_steps=1, progress=False)
    resumed = trainer("a", f'run.init_from="{tmp_path / "gone.pth"}"', resume=True)
    assert resumed.step == 1
    assert all(torch.equal(a, b) for a, b in zip(resumed.student.state_dict().values(),
                                                  started.student.state_dict().values()))
