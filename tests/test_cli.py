"""The `dinofuse` command end to end on tiny data, and its one-line errors."""

import json
import re
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from dinofuse.dataloading.readers import open_images
from dinofuse.engine.cli import main
from dinofuse.engine.eval.knn import extract_features
from test_train import TINY


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(1)
    for c in range(2):
        (root / f"c{c}").mkdir()
        for i in range(8):
            Image.fromarray((rng.random((20, 20, 3)) * 255).astype(np.uint8)).save(root / f"c{c}" / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def trained(folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    overrides = [o for o in TINY if not o.startswith("run.knn_after_training")]
    assert main(["train", "--data", str(folder), "--output-dir", str(out), "--quiet",
                 f'run.knn_val="{folder}"', "run.knn_k=3", "run.knn_temperature=0.5",
                 *overrides]) == 0
    return out


def test_the_report_after_training_shows_its_progress(folder, tmp_path, capsys):
    """Its six extractions (ImageNet's: minutes on a GPU after the last step) are shown,
    as lines in a log (capsys: stderr is no terminal); --quiet shows none."""
    overrides = [o for o in TINY if not o.startswith("run.knn_after_training")]
    args = ["train", "--data", str(folder), f'run.knn_val="{folder}"', "run.knn_k=3", *overrides]
    assert main([*args, "--output-dir", str(tmp_path / "a")]) == 0
    n = len(open_images(str(folder)))
    shown = [line.split(": done in ")[0] for line in capsys.readouterr().err.splitlines()
             if line.startswith("k-NN of")]
    assert shown == [f"k-NN of the {row}, {which}, image {n}/{n}"
                     for row in ("trained teacher", "random init", "raw pixels")
                     for which in ("memory", "queries")]
    assert main([*args, "--output-dir", str(tmp_path / "b"), "--quiet"]) == 0
    assert capsys.readouterr().err == ""


def test_train_writes_checkpoint_config_log_and_knn(trained):
    assert (trained / "checkpoint.pth").is_file() and (trained / "config.toml").is_file()
    assert any((trained / "tensorboard").glob("events.out.tfevents.*"))
    lines = (trained / "log.jsonl").read_text().splitlines()
    assert {"step", "loss", "lr", "images_per_s"} <= set(json.loads(lines[-1]))
    report = json.loads((trained / "knn.json").read_text())
    assert set(report) == {"trained teacher", "random init", "raw pixels"}
    assert all(0 <= v["top1"] <= 100 for v in report.values())


def test_knn_attention_maps_and_export(trained, folder, tmp_path, capsys):
    def knn(val):
        return ["knn", "--checkpoint", str(trained / "checkpoint.pth"), "--train", str(folder),
                "--val", str(val), "--k", "3", "5", "--resize-ratio", "1.0"]

    assert main([*knn(folder), "--workers", "0"]) == 0
    in_process, progress = capsys.readouterr()
    assert "3-NN: top-1" in in_process
    n = len(open_images(str(folder)))  # each set's progress: its last line at least
    assert [line.split(": done in ")[0] for line in progress.splitlines()] == [
        f"features of --train, image {n}/{n}", f"features of --val, image {n}/{n}"]
    assert main([*knn(folder), "--workers", "2"]) == 0  # decoded in worker processes: the same
    assert capsys.readouterr().out == in_process
    # The queries are the memory, so any model scores well. Under swapped class names each
    # query gets the same vote, so with two classes every right answer turns wrong: the
    # figures must come from the queries' own labels.
    swapped = tmp_path / "swapped"
    for c in range(2):
        shutil.copytree(folder / f"c{c}", swapped / f"c{1 - c}")
    assert main([*knn(swapped), "--workers", "0"]) == 0
    top1 = [float(v) for v in re.findall(r"top-1 ([0-9.]+)%", in_process)]
    swapped_top1 = [float(v) for v in re.findall(r"top-1 ([0-9.]+)%", capsys.readouterr().out)]
    assert len(top1) == 2 and swapped_top1 == pytest.approx([100 - v for v in top1], abs=0.01)
    assert main(["attention-maps", "--checkpoint", str(trained / "checkpoint.pth"),
                 "--image", str(folder / "c0" / "0.png"), "--out", str(tmp_path / "maps"),
                 "--threshold", "0.6", "--size", "32"]) == 0
    names = sorted(p.name for p in (tmp_path / "maps").iterdir())
    assert names == ["attn-head0.png", "attn-head1.png", "mask-head0.png", "mask-head1.png", "overlay.png"]
    mask = np.asarray(Image.open(tmp_path / "maps" / "mask-head0.png")) > 0
    assert 0 < mask.mean() < 1  # some patches hold 60% of the mass, not all
    assert main(["export", "--checkpoint", str(trained / "checkpoint.pth"),
                 "--out", str(tmp_path / "teacher.safetensors")]) == 0


def test_cuda_means_this_processs_gpu_with_its_index(monkeypatch):
    """Under torchrun each process sets its GPU (LOCAL_RANK); "auto" and "cuda" name that
    one by index, so DALI (device_id), NVML and the memory statistics use it, not GPU 0."""
    from dinofuse.engine.train import pick_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert pick_device("auto") == pick_device("cuda") == torch.device("cuda", 3)
    assert pick_device("cuda:1") == torch.device("cuda", 1)
    assert pick_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize("make_args,message", [
    (lambda d, t: ["train", "--data", str(t / "empty"), "--output-dir", str(t / "o")], "no images"),
    (lambda d, t: ["train", "--data", str(t / "broken"), "--output-dir", str(t / "o"), *TINY],
     "cannot decode image .*fake.png"),
    (lambda d, t: ["train", "--data", str(d), "--output-dir", str(t / "o"), *TINY,
                   "model.arch=\"vit_huge\""],
     "unknown architecture 'vit_huge'"),
    (lambda d, t: ["train", "--data", str(d), "--output-dir", str(t / "o"), *TINY,
                   "data.global_crop_size=18"], "crop size 18x18 is not divisible by the patch size 4"),
    (lambda d, t: ["knn", "--checkpoint", str(t / "missing.pth"), "--train", str(d), "--val", str(d)],
     "checkpoint not found"),
    (lambda d, t: ["train", "--data", str(d), "--output-dir", str(t / "o"), "optim.nope=1"],
     "unknown config field optim.nope"),
    (lambda d, t: ["train", "--config", "nosuchpreset"], "config 'nosuchpreset' not found"),
    (lambda d, t: ["train", "--data", str(d / "c0" / "0.png"), "--output-dir", str(t / "o")],
     "0.png is a file, not a folder of images"),
    (lambda d, t: ["data", "check", str(d / "c0" / "0.png")], "0.png is a file, not a folder"),
    (lambda d, t: ["train", "--data", str(d), "--output-dir", str(t / "o"),
                   "optim.batch_size_per_device=0"], "optim.batch_size_per_device must be >= 1"),
    (lambda d, t: ["knn", "--checkpoint", str(d / "c0" / "0.png"), "--train", str(d), "--val",
                   str(d)], "cannot read checkpoint .*0.png: not a PyTorch checkpoint"),
    (lambda d, t: ["train", "--data", str(d), "--output-dir", str(t / "o"), *TINY,
                   'optim.precision="bf17"'],
     "optim.precision must be one of auto, bf16, fp16, fp32; got 'bf17'"),
    (lambda d, t: ["train", "--data", str(d), "--output-dir", str(t / "o"), *TINY,
                   'optim.clip_mode="norm"'], "optim.clip_mode must be one of per_param, global"),
    (lambda d, t: ["train", "--data", str(d), "--output-dir", str(t / "o"), *TINY,
                   'run.knn_features="avgpool"'], "run.knn_features must be one of cls, cls"),
    (lambda d, t: ["knn", "--checkpoint", "c.pth", "--train", str(d), "--val", str(t / "empty")],
     "no images .* in .*empty"),
    (lambda d, t: ["knn", "--checkpoint", "c.pth", "--train", str(d / "c0"), "--val", str(d)],
     "--train .*c0 and --val .*: the two image sets have different classes \\(1: \\['c0'\\]"),
    (lambda d, t: ["knn", "--checkpoint", "c.pth", "--train", str(d / "c0"), "--val",
                   str(d / "c0")], "labelled images are needed: at least two classes"),
    (lambda d, t: ["train", "--data", str(d), "--output-dir", str(t / "o"), *TINY,
                   'run.checkpoint_format="dcp"'],
     "run.checkpoint_format must be one of auto, sharded, file; got 'dcp'"),
    (lambda d, t: ["train", "--data", str(d), "--output-dir", str(t / "o"), *TINY,
                   'run.device="gpu"'], "run.device must be auto, cpu, cuda or cuda:N; got 'gpu'"),
    (lambda d, t: ["train", "--data", str(d), "--output-dir", str(t / "broken" / "fake.png" / "run"),
                   "--fit-minutes", "5", *TINY], "run.output_dir .*fake.png/run: cannot write there \\(Not a directory\\)"),
    (lambda d, t: ["linear", "--checkpoint", "c.pth", "--train", str(d), "--val", str(d),
                   "--output-dir", str(t / "broken" / "fake.png" / "lin")],
     "--output-dir .*fake.png/lin: cannot write there"),
    (lambda d, t: ["knn", "--checkpoint", "c.pth", "--train", str(d), "--val", str(d),
                   "--dump-features", str(t / "broken" / "fake.png" / "f")],
     "--dump-features .*fake.png/f: cannot write there"),
    (lambda d, t: ["attention-maps", "--checkpoint", "c.pth", "--image", str(t / "broken" / "0.png"),
                   "--output-dir", str(t / "broken" / "fake.png" / "maps")],
     "--output-dir .*fake.png/maps: cannot write there"),
    (lambda d, t: ["knn", "--checkpoint", "c.pth", "--train", str(d), "--val", str(d),
                   "--device", "cuda:64"], "--device='cuda:64', but torch sees [0-9]+ CUDA device"),
    pytest.param(lambda d, t: ["train", "--data", str(d), "--output-dir", str(t / "o"), *TINY,
                               'run.device="cuda"'], "run.device='cuda', but torch sees 0 CUDA",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a CPU's error")),
    pytest.param(lambda d, t: ["train", "--data", str(d), "--output-dir", str(t / "o"), *TINY,
                               'model.attention="xformers"'],
                 "attention='xformers' cannot run: no CUDA device",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a CPU's error")),
])
def test_bad_input_gets_one_line(make_args, message, folder, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "broken").mkdir()
    for i in range(6):
        Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(tmp_path / "broken" / f"{i}.png")
    (tmp_path / "broken" / "fake.png").write_text("this is not an image")
    args = make_args(folder, tmp_path)
    assert main(args[:1] + (["--quiet"] if args[0] == "train" else []) + args[1:]) == 2
    out, err = capsys.readouterr()
    err = err.strip()
    assert len(err.splitlines()) == 1
    assert out == ""  # refused before any work (a --fit-minutes trial says what it fitted)
    import re
    assert re.search(message, err), err


def test_data_check_lists_every_unreadable_file(tmp_path, capsys):
    root = tmp_path / "data"
    (root / "a").mkdir(parents=True)
    Image.fromarray(np.full((20, 30, 3), 120, np.uint8)).save(root / "a" / "good.jpg")
    Image.fromarray(np.full((20, 30, 4), 200, np.uint8), "RGBA").save(root / "a" / "alpha.png")
    Image.fromarray(np.full((20, 30), 40000, np.uint16)).save(root / "a" / "gray16.png")
    good = (root / "a" / "good.jpg").read_bytes()
    (root / "a" / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (root / "a" / "empty.jpg").write_bytes(b"")
    (root / "a" / "text.jpg").write_text("not a jpeg")
    (root / "a" / "CAMERA.JPG").write_text("upper-case suffixes are images too (readers: same)")
    (root / "a" / "notes.txt").write_text("ignored: not an image suffix")
    assert main(["data", "check", str(root)]) == 1
    out = capsys.readouterr().out
    assert "3 images readable, 4 unreadable" in out
    for name in ("truncated.jpg", "empty.jpg: empty file", "text.jpg", "CAMERA.JPG"):
        assert name in out
    assert main(["data", "check", str(root / "a" / "..")]) == 1
    for name in ("truncated.jpg", "empty.jpg", "text.jpg", "CAMERA.JPG"):
        (root / "a" / name).unlink()
    assert main(["data", "check", str(root)]) == 0
    assert main(["data", "check", str(tmp_path / "nothing")]) == 2


def test_data_check_reads_webdataset_shards(tmp_path, capsys):
    """Shards are checked member by member, each bad image named shard.tar:member."""
    from test_readers import encoded, write_shard

    good = encoded(1)
    write_shard(tmp_path / "a.tar", [("0.jpg", good), ("0.cls", b"0"), ("1.jpg", good[:40]),
                                     ("2.png", b""), ("3.jpg", encoded(2))])
    write_shard(tmp_path / "b.tar", [("4.jpg", b"not a jpeg")])
    assert main(["data", "check", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "2 images readable, 3 unreadable" in out
    for name in ("a.tar:1.jpg: ", "a.tar:2.png: empty file", "b.tar:4.jpg: "):
        assert name in out
    assert main(["data", "check", str(tmp_path / "a.tar")]) == 1
    assert "2 images readable, 2 unreadable" in capsys.readouterr().out


def test_data_check_notes_shards_written_class_by_class(tmp_path, capsys, monkeypatch):
    """DALI draws a batch from a window over the shards (data.shuffle_buffer samples): shards
    written from a sorted listing give batches of few classes. Said (not an error); shards
    written shuffled, or unlabelled, get no note. (A window of 8 here, 1024 in a run.)"""
    import functools
    import random

    from dinofuse.dataloading import check
    from test_readers import encoded, write_shard

    monkeypatch.setattr(check, "class_order_note", functools.partial(check.class_order_note,
                                                                     window=8))
    image = encoded(1)
    samples = [(i, i // 4) for i in range(64)]  # 16 classes of 4, in class order

    def shards(folder, order, labelled=True):
        folder.mkdir()
        for k in range(2):
            write_shard(folder / f"{k}.tar", [m for i, c in order[32 * k:32 * (k + 1)] for m in (
                (f"{i:03d}.jpg", image), *([(f"{i:03d}.cls", str(c).encode())] if labelled else []))])
        return folder

    from dinofuse.dataloading import readers

    walks, walk = [], readers.WebDatasetShards._walk
    monkeypatch.setattr(readers.WebDatasetShards, "_walk",
                        staticmethod(lambda tar: walks.append(tar) or walk(tar)))
    assert main(["data", "check", str(shards(tmp_path / "sorted", samples))]) == 0
    assert len(walks) == 2  # each shard's headers walked once, for the check and the note
    out = capsys.readouterr().out
    assert out.splitlines()[0] == f"64 images readable, 0 unreadable in {tmp_path / 'sorted'}"
    assert out.splitlines()[1].startswith(
        "note: the shards hold their samples class by class: 8 samples in a row span 2.0 "
        "classes on average (")
    assert "raise data.shuffle_buffer" in out
    random.Random(2).shuffle(samples)
    for folder, labelled in (("shuffled", True), ("unlabelled", False)):
        order = samples if labelled else sorted(samples)
        assert main(["data", "check", str(shards(tmp_path / folder, order, labelled))]) == 0
        assert capsys.readouterr().out == f"64 images readable, 0 unreadable in {tmp_path / folder}\n"


def test_bad_images_can_be_skipped_with_the_file_named(tmp_path, capsys):
    root = tmp_path / "imgs"
    root.mkdir()
    for i in range(12):
        Image.fromarray(np.full((20, 20, 3), 20 * i, np.uint8)).save(root / f"{i}.png")
    (root / "fake.png").write_text("this is not an image")
    args = ["train", "--quiet", "--data", str(root), "--output-dir", str(tmp_path / "o"), *TINY]
    assert main(args) == 2
    assert "cannot decode image" in capsys.readouterr().err
    with pytest.warns(UserWarning, match="skipping: cannot decode image .*fake.png"):
        assert main(args + ["data.skip_bad_images=true"]) == 0


def test_training_on_a_cpu_leaves_each_data_worker_a_core(folder, tmp_path, monkeypatch):
    import os

    import torch

    from dinofuse.engine.parallel import cpu_threads

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(4)))
    assert (cpu_threads(0, 1), cpu_threads(0, 0), cpu_threads(0, 9), cpu_threads(6, 1)) == (3, 4, 1, 6)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # two ranks on this machine share its cores
    assert cpu_threads(0, 1) == 1
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    chosen = []
    monkeypatch.setattr(torch, "set_num_threads", chosen.append)
    overrides = [o for o in TINY if not o.startswith("data.num_workers")]
    assert main(["train", "--data", str(folder), "--output-dir", str(tmp_path), "--quiet",
                 "--max-steps", "1", "data.num_workers=1", *overrides]) == 0
    assert chosen == [3]
    # Fashion-MNIST's crops are cut in the training process: no worker to leave a core to
    from fashion_mnist_files import write_fashion_mnist

    write_fashion_mnist(tmp_path / "fmnist", train=16, test=4, size=16)
    auto = [o for o in overrides if not o.startswith("data.backend")]
    assert main(["train", "--data", str(tmp_path / "fmnist"), "--output-dir", str(tmp_path / "f"),
                 "--quiet", "--max-steps", "1", "data.num_workers=1", *auto]) == 0
    assert chosen == [3, 4]


def test_a_data_worker_death_announced_mid_step_gets_one_line(folder, tmp_path, monkeypatch, capsys):
    """torch reports a killed worker from a signal handler, wherever the main process is; in
    the middle of a step nothing is saved (the step is half done), the message says so."""
    from dinofuse.engine.train import Trainer

    def killed(self, **kwargs):
        raise RuntimeError("DataLoader worker (pid 4242) is killed by signal: Killed. ")

    monkeypatch.setattr(Trainer, "fit", killed)
    assert main(["train", "--data", str(folder), "--output-dir", str(tmp_path), *TINY]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "a data worker died (DataLoader worker (pid 4242)" in err
    assert f"--resume from the last checkpoint in {tmp_path}" in err


def test_official_weights_evaluate_without_a_dinofuse_config(folder, tmp_path, capsys):
    """An official training checkpoint (its command line in `args`), the bare backbone it
    holds, and the same weights exported: each builds the ViT its weights describe, with
    those weights (the teacher's, or with --which the student's), and the commands run."""
    import torch

    from dinofuse.engine.cli import _load_backbone
    from dinofuse.engine.models import vit_tiny
    from test_checkpoint import official_checkpoint

    source = vit_tiny(depth=2)
    official = official_checkpoint(source)
    torch.save(official, tmp_path / "checkpoint.pth")
    torch.save({k.removeprefix("backbone."): v for k, v in official["teacher"].items()
                if k.startswith("backbone.")}, tmp_path / "dino_tiny_pretrain.pth")
    assert main(["export", "--checkpoint", str(tmp_path / "checkpoint.pth"),
                 "--out", str(tmp_path / "teacher.safetensors")]) == 0
    cases = [("checkpoint.pth", "teacher", 0), ("checkpoint.pth", "student", 1),  # student: +1
             ("dino_tiny_pretrain.pth", "teacher", 0), ("teacher.safetensors", "teacher", 0)]
    for name, which, offset in cases:
        backbone, cfg = _load_backbone(str(tmp_path / name), torch.device("cpu"), which=which)
        assert (cfg.model.arch, cfg.model.patch_size, cfg.model.depth) == ("vit_tiny", 16, 2)
        assert backbone.state_dict().keys() == source.state_dict().keys()
        for k, v in backbone.state_dict().items():
            torch.testing.assert_close(v, source.state_dict()[k] + offset)
    knn = ["--train", str(folder), "--val", str(folder), "--k", "3", "--crop", "32",
           "--workers", "0"]
    capsys.readouterr()
    for name, which, _ in cases:
        assert main(["knn", "--checkpoint", str(tmp_path / name), "--which", which, *knn]) == 0
        assert "3-NN: top-1" in capsys.readouterr().out
    # one bare set of weights has no student: refused (it was evaluated as if it were)
    for name in ("dino_tiny_pretrain.pth", "teacher.safetensors"):
        assert main(["knn", "--checkpoint", str(tmp_path / name), "--which", "student", *knn]) == 2
        assert (f"{tmp_path / name} holds no student weights (one bare set of weights, taken "
                "as the teacher's): drop --which student") in capsys.readouterr().err
    assert main(["attention-maps", "--checkpoint", str(tmp_path / "checkpoint.pth"), "--image",
                 str(folder / "c0" / "0.png"), "--output-dir", str(tmp_path / "maps"),  # as train's
                 "--size", "32"]) == 0
    assert len(list((tmp_path / "maps").glob("attn-head*.png"))) == 3  # vit_tiny: 3 heads
    capsys.readouterr()
    assert main(["knn", "--checkpoint", str(tmp_path / "dino_tiny_pretrain.pth"), *knn,
                 "--arch", "vit_small"]) == 2
    assert "the weights are 192 wide, vit_small is 384" in capsys.readouterr().err


@pytest.mark.parametrize("args,message", [
    (["knn", "--checkpoint", "c.pth", "--train", "d", "--val", "d", "--k", "20", "0"],
     "argument --k: must be >= 1; got 0"),
    (["knn", "--checkpoint", "c.pth", "--train", "d", "--val", "d", "--batch-size", "0"],
     "argument --batch-size: must be >= 1; got 0"),
    (["knn", "--checkpoint", "c.pth", "--train", "d", "--val", "d", "--temperature", "-0.07"],
     "argument --temperature: must be > 0; got -0.07"),
    (["knn", "--checkpoint", "c.pth", "--train", "d", "--val", "d", "--workers", "two"],
     "argument --workers: must be int; got 'two'"),
    (["attention-maps", "--checkpoint", "c.pth", "--image", "i.png", "--threshold", "1.5"],
     r"argument --threshold: must be in \(0, 1\]; got 1.5"),
    (["train", "--max-steps", "-3"], "argument --max-steps: must be >= 0; got -3"),
])
def test_command_line_numbers_out_of_range_are_named(args, message, capsys):
    """Before, --max-steps -3 trained no step and said nothing."""
    import re

    with pytest.raises(SystemExit) as exit_:
        main(args)
    assert exit_.value.code == 2
    assert re.search(message, capsys.readouterr().err)


def test_the_random_row_is_the_same_network_every_run():
    """The k-NN report's random baseline does not depend on what ran before it (training
    draws from the same global generator)."""
    import torch

    from dinofuse.engine.cli import random_backbone
    from dinofuse.engine.config import load_config

    cfg = load_config("default", TINY)
    first = random_backbone(cfg, "cpu").state_dict()
    torch.rand(1000)  # what a training would have drawn
    again = random_backbone(cfg, "cpu").state_dict()
    assert all(torch.equal(first[k], again[k]) for k in first)
    other = random_backbone(load_config("default", [*TINY, "run.seed=1"]), "cpu").state_dict()
    assert not torch.equal(first["pos_embed"], other["pos_embed"])


def test_linear_trains_resumes_and_evaluates(trained, folder, tmp_path, capsys):
    out = tmp_path / "linear"
    args = ["linear", "--checkpoint", str(trained / "checkpoint.pth"), "--train", str(folder),
            "--val", str(folder), "--epochs", "2", "--workers", "0", "--resize-ratio", "1.0",
            "--output-dir", str(out)]
    assert main(args) == 0
    printed, progress = capsys.readouterr()
    assert "CLS of the last 2 block(s), 2 epochs, augmented crops" in printed  # depth 2
    n = len(open_images(str(folder)))  # the features kept whole are shown (an epoch's, briefer)
    assert [line.split(": done in ")[0] for line in progress.splitlines()] == [
        f"linear: features of --val, image {n}/{n}"]
    last = re.findall(r"epoch 2/2: .* top-1 ([0-9.]+)%", printed)
    assert last and f"linear: top-1 {last[0]}% after 2 epochs" in printed
    saved = torch.load(out / "linear.pth", weights_only=True)
    assert set(saved["state_dict"]) == {"module.linear.weight", "module.linear.bias"}
    assert saved["state_dict"]["module.linear.weight"].shape == (2, 2 * 32)
    assert json.loads((out / "linear.json").read_text())["epochs"] == 2
    assert main(args) == 2  # would overwrite the saved run
    assert "linear.pth exists: pass --resume" in capsys.readouterr().err
    assert main([*args, "--resume"]) == 0
    assert "resumed at epoch 2" in capsys.readouterr().out
    assert main([*args, "--evaluate", str(out / "linear.pth")]) == 0
    assert f"top-1 {last[0]}%" in capsys.readouterr().out  # the same weights, the same features
    assert main([*args[:-2], "--resume"]) == 2
    assert "--resume needs the --output-dir" in capsys.readouterr().err


def test_linear_random_init_is_the_knn_reports_random_row(trained, folder, monkeypatch, capsys):
    from dinofuse.engine import cli
    from dinofuse.engine.config import config_from_toml
    from dinofuse.engine.eval import linear

    seen = []

    def capture(backbone, *args, **kwargs):
        seen.append(backbone.state_dict())
        raise ValueError("captured")

    monkeypatch.setattr(linear, "LinearEval", capture)
    base = ["linear", "--checkpoint", str(trained / "checkpoint.pth"), "--train", str(folder),
            "--val", str(folder)]
    assert main(base) == 2 and main([*base, "--random-init"]) == 2
    cfg = config_from_toml((trained / "config.toml").read_text())
    random = cli.random_backbone(cfg, "cpu").state_dict()
    assert all(torch.equal(random[k], seen[1][k]) for k in random)
    assert not torch.equal(seen[0]["pos_embed"], seen[1]["pos_embed"])  # the trained teacher


def test_precision_reaches_the_feature_forward(trained, folder, monkeypatch):
    """--precision (default fp32, the official evaluation's) gets to the k-NN's feature
    extraction and to the linear evaluation's settings."""
    from dinofuse.engine.eval import knn, linear

    seen = []

    def capture(*args, **kwargs):
        seen.append(kwargs.get("precision") or args[3].precision)
        raise ValueError("captured")

    monkeypatch.setattr(knn, "extract_features", capture)
    monkeypatch.setattr(linear, "LinearEval", capture)
    sets = ["--checkpoint", str(trained / "checkpoint.pth"), "--train", str(folder),
            "--val", str(folder)]
    for command in ("knn", "linear"):
        assert main([command, *sets]) == 2
        assert main([command, *sets, "--precision", "bf16"]) == 2
    assert seen == ["fp32", "bf16"] * 2


def test_knn_features_dump_and_load_as_the_official_files(trained, folder, tmp_path, capsys):
    """--dump-features writes the official eval_knn's four files (bare tensors); --load-features
    votes on them, or on an official dump (features not yet unit length, say), as on the
    extraction itself; a broken dump is named in one line."""
    rng = np.random.default_rng(2)
    queries = tmp_path / "queries"
    for c in range(2):
        (queries / f"c{c}").mkdir(parents=True)
        for i in range(3):
            Image.fromarray((rng.random((20, 20, 3)) * 255).astype(np.uint8)).save(
                queries / f"c{c}" / f"{i}.png")
    dump = tmp_path / "features"
    assert main(["knn", "--checkpoint", str(trained / "checkpoint.pth"), "--train", str(folder),
                 "--val", str(queries), "--k", "1", "5", "--workers", "0",
                 "--dump-features", str(dump)]) == 0
    votes = [line for line in capsys.readouterr().out.splitlines() if "-NN: " in line]
    assert len(votes) == 2 and votes[0] != votes[1].replace("5-NN", "1-NN")
    assert {p.name for p in dump.iterdir()} == {"trainfeat.pth", "testfeat.pth",
                                                "trainlabels.pth", "testlabels.pth"}
    saved = {p.stem: torch.load(p, weights_only=True) for p in dump.iterdir()}
    # the run's run.knn_features, cls+avgpool: twice the width
    assert saved["trainfeat"].shape == (16, 64) and saved["testfeat"].shape == (6, 64)
    torch.testing.assert_close(saved["trainfeat"].norm(dim=1), torch.ones(16))
    assert torch.equal(saved["trainlabels"], torch.arange(2).repeat_interleave(8))
    assert torch.equal(saved["testlabels"], torch.arange(2).repeat_interleave(3))
    from dinofuse.engine.eval.knn import knn_classify

    for k, line in zip((1, 5), votes):  # the queries against the memory
        acc = knn_classify(saved["trainfeat"], saved["trainlabels"], saved["testfeat"],
                           saved["testlabels"], k=k, temperature=0.5)  # the run's
        assert line == f"{k}-NN: top-1 {acc['top1']:.2f}%, top-5 {acc['top5']:.2f}%"

    def load(folder):
        assert main(["knn", "--load-features", str(folder), "--k", "1", "5"]) == 0
        return [line for line in capsys.readouterr().out.splitlines() if "-NN: " in line]

    assert load(dump) == votes
    official = tmp_path / "official"
    official.mkdir()
    scale = torch.exp(torch.randn(22, 1, generator=torch.Generator().manual_seed(0)))
    for name, value in saved.items():  # another code's dump: rows not of unit length
        rows = scale[:16] if name == "trainfeat" else scale[16:]
        torch.save(value * rows if name.endswith("feat") else value, official / f"{name}.pth")
    assert load(official) == votes

    def refused(*args):
        assert main(["knn", *args]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1
        return err

    (official / "testlabels.pth").unlink()
    assert "testlabels.pth: not found" in refused("--load-features", str(official))
    torch.save({"labels": saved["testlabels"]}, official / "testlabels.pth")
    assert "testlabels.pth holds a dict, not a tensor" in refused("--load-features", str(official))
    torch.save(saved["testlabels"][:5], official / "testlabels.pth")
    assert "testfeat.pth has shape (6, 64) and testlabels.pth (5,)" in refused(
        "--load-features", str(official))
    torch.save(saved["testlabels"].float(), official / "testlabels.pth")
    assert "testlabels.pth must hold class indices" in refused("--load-features", str(official))
    torch.save(saved["testlabels"], official / "testlabels.pth")
    torch.save(saved["testfeat"][:, :63], official / "testfeat.pth")
    assert "the memory's features are 64 wide and the queries' 63" in refused(
        "--load-features", str(official))
    assert "--load-features replaces --checkpoint" in refused(
        "--load-features", str(dump), "--checkpoint", str(trained / "checkpoint.pth"))
    assert "--val required (or --load-features DIR)" in refused(
        "--checkpoint", str(trained / "checkpoint.pth"), "--train", str(folder))


def test_knn_repeats_the_report_after_training(trained, folder, tmp_path, capsys):
    """Without --features, --resize-ratio and --temperature, `dinofuse knn` takes them from
    the checkpoint's config (the default run's cls+avgpool and no resize; here T=0.5), so it
    prints the figures of the report after training; each flag still overrides."""
    from dinofuse.dataloading.readers import open_images
    from dinofuse.engine.cli import _load_backbone
    from dinofuse.engine.eval.report import eval_transform

    checkpoint = str(trained / "checkpoint.pth")

    def knn(dump, *flags):
        assert main(["knn", "--checkpoint", checkpoint, "--train", str(folder), "--val",
                     str(folder), "--k", "3", "--workers", "0", "--dump-features", str(dump),
                     *flags]) == 0
        return capsys.readouterr().out, torch.load(dump / "trainfeat.pth", weights_only=True)

    printed, features = knn(tmp_path / "run")
    assert "cls+avgpool features of 16-px center crops (short side resized to 16), T=0.5" in printed
    report = json.loads((trained / "knn.json").read_text())["trained teacher"]
    assert f"3-NN: top-1 {report['top1']:.2f}%, top-5 {report['top5']:.2f}%" in printed
    teacher, _ = _load_backbone(checkpoint, "cpu")
    expected, _ = extract_features(teacher, open_images(folder, "train"), eval_transform(16, 1.0),
                                   "cpu", mode="cls+avgpool")
    torch.testing.assert_close(features, expected, rtol=0, atol=1e-6)
    printed, official = knn(tmp_path / "official", "--features", "cls", "--resize-ratio",
                            str(256 / 224), "--temperature", "0.07")
    assert "cls features of 16-px center crops (short side resized to 18), T=0.07" in printed
    expected, _ = extract_features(teacher, open_images(folder, "train"),
                                   eval_transform(16, 256 / 224), "cpu", mode="cls")
    torch.testing.assert_close(official, expected, rtol=0, atol=1e-6)


def shards_of(folder, out):
    """The labelled image folder as WebDataset shards (two; .cls = the class index)."""
    from test_readers import write_shard

    images = open_images(str(folder))
    out.mkdir()
    for shard in range(2):
        members = []
        for i in range(shard, len(images), 2):
            path, label = images.samples[i]
            key = f"{images.classes[label]}_{path.stem}"
            members += [(f"{key}{path.suffix}", path.read_bytes()), (f"{key}.cls", b"%d" % label)]
        write_shard(out / f"{shard}.tar", members)
    return out


def test_knn_and_the_report_read_webdataset_shards(trained, folder, tmp_path, capsys):
    """The same images as shards give the k-NN the folder gives (figures do not depend on the
    order); shards and an ImageFolder are not compared (index against name); the report
    after training on shards evaluates instead of being skipped."""
    shards = shards_of(folder, tmp_path / "shards")

    def knn(memory, queries):
        return main(["knn", "--checkpoint", str(trained / "checkpoint.pth"), "--train",
                     str(memory), "--val", str(queries), "--k", "3", "5", "--workers", "0"])

    assert knn(folder, folder) == 0
    from_folder = capsys.readouterr().out
    assert knn(shards, shards) == 0
    assert capsys.readouterr().out == from_folder
    # class indices against names: by the names' sorted order (ImageNet's shards against its
    # val folder), said first
    assert knn(shards, folder) == 0
    note = "labels: the shards' class index i is taken as the other set's i-th class, of 2 "\
           "(c0, c1, ...; a folder's in sorted order)\n"
    assert capsys.readouterr().out == note + from_folder
    three = tmp_path / "three"
    shutil.copytree(folder, three)
    shutil.copytree(folder / "c1", three / "c2")
    assert knn(shards, three) == 2
    assert ("one set labels by class index (.cls), the other by class name, and they count 2 "
            "and 3 classes") in capsys.readouterr().err
    pytest.importorskip("nvidia.dali")  # training reads shards through DALI
    overrides = [o for o in TINY if not o.startswith(("run.knn_after_training", "data.backend"))]
    out = tmp_path / "run"
    assert main(["train", "--data", str(shards), "--output-dir", str(out), "--quiet",
                 "--max-steps", "2", f'run.knn_val="{shards}"', "run.knn_k=3", *overrides]) == 0
    assert "k-NN (k=3" in capsys.readouterr().out
    assert set(json.loads((out / "knn.json").read_text())) == {"trained teacher", "random init",
                                                               "raw pixels"}


def test_the_report_reuses_the_datasets_opened_for_knn_every_epochs(folder, tmp_path, capsys,
                                                                    monkeypatch):
    """With run.knn_every_epochs the memory and queries are opened (an ImageNet folder
    scanned) once per run, not again for the report after training."""
    from dinofuse.engine.eval import report

    opened, real = [], report.knn_datasets
    monkeypatch.setattr(report, "knn_datasets", lambda cfg: opened.append(1) or real(cfg))
    overrides = [o for o in TINY if not o.startswith("run.knn_after_training")]
    assert main(["train", "--data", str(folder), "--output-dir", str(tmp_path / "run"), "--quiet",
                 f'run.knn_val="{folder}"', "run.knn_k=3", "run.knn_every_epochs=1",
                 *overrides]) == 0
    assert "k-NN (k=3" in capsys.readouterr().out and len(opened) == 1


def test_export_prints_the_timm_call_that_loads_it(trained, tmp_path, capsys):
    """A run's own small ViT (width 32, depth 2, patch 4, 16 px) is no timm model by name:
    the printed call names the nearest one and passes the sizes that differ; run as
    printed, it loads the file and computes what our teacher computes."""
    import timm

    from dinofuse.engine.checkpoint import load_file
    from dinofuse.engine.cli import _load_backbone
    from dinofuse.engine.config import config_from_toml

    out = tmp_path / "teacher.safetensors"
    assert main(["export", "--checkpoint", str(trained), "--out", str(out)]) == 0
    call = capsys.readouterr().out.split("in timm: ")[1].strip()
    assert call == (f'timm.create_model("vit_tiny_patch16_224", pretrained=True, num_classes=0, '
                    f'pretrained_cfg_overlay=dict(file="{out}"), embed_dim=32, depth=2, '
                    f'num_heads=2, patch_size=4, img_size=16)')
    model = eval(call, {"timm": timm}).eval()  # the printed line itself
    teacher, _ = _load_backbone(str(trained), "cpu")
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(x)[:, 0], teacher(x), rtol=1e-5,
                                   atol=1e-5)
    # the file keeps the run's model and evaluation settings (no paths): our commands rebuild
    # this ViT from it (2 heads: no weight's shape tells), with the run's k-NN protocol
    exported, cfg = _load_backbone(str(out), "cpu")
    assert cfg.model == config_from_toml((trained / "config.toml").read_text()).model
    assert (cfg.run.knn_k, cfg.run.knn_temperature, cfg.data.global_crop_size) == (3, 0.5, 16)
    assert str(trained) not in load_file(out)["config"]
    with torch.no_grad():
        torch.testing.assert_close(exported(x), teacher(x), rtol=0, atol=0)
    assert main(["export", "--checkpoint", str(trained), "--out", str(tmp_path / "t.pth")]) == 0
    assert set(map(type, torch.load(tmp_path / "t.pth", weights_only=True).values())) == \
        {torch.Tensor}  # a .pth export stays a plain state dict: timm loads it strictly


def test_the_official_evaluation_scripts_load_our_checkpoints(trained, tmp_path):
    """`eval_knn.py --pretrained_weights runs/x/checkpoint.pth --checkpoint_key teacher` (and
    eval_linear, visualize_attention): their loader finds every backbone weight of our
    checkpoint and of a .pth export under the official names, and the official forward on
    them computes what our teacher computes (a name it missed would load nothing: strict=False)."""
    from dinofuse.engine.cli import _load_backbone
    from official_vit import official_pretrained_weights, official_vit_forward

    teacher, _ = _load_backbone(str(trained), "cpu")
    x = torch.randn(2, 3, 16, 16)
    assert main(["export", "--checkpoint", str(trained), "--out", str(tmp_path / "t.pth")]) == 0
    for path, key in ((trained / "checkpoint.pth", "teacher"), (tmp_path / "t.pth", "teacher"),
                      (trained / "checkpoint.pth", "student")):
        state = official_pretrained_weights(path, key)
        assert set(teacher.state_dict()) <= set(state), path
        if key == "teacher":
            with torch.no_grad():
                torch.testing.assert_close(official_vit_forward(state, x, patch=4, heads=2),
                                           teacher(x), rtol=1e-5, atol=1e-5)


def test_ctrl_c_stops_with_a_checkpoint_and_the_data_workers_wait(folder, tmp_path):
    """Ctrl-C in a terminal sends SIGINT to every process of the job, data workers too: the
    run stops at an agreed step with a checkpoint (the workers ignore it and serve until
    then), says so, and exits 2; before, the workers and the training process died at once
    and the epoch's steps were lost."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from dinofuse.engine.checkpoint import load_file

    out = tmp_path / "run"
    overrides = [o for o in TINY if not o.startswith("data.num_workers")]
    job = subprocess.Popen([sys.executable, "-m", "dinofuse.engine.cli", "train", "--data",
                            str(folder), "--output-dir", str(out), "--quiet", *overrides,
                            "optim.epochs=50", "data.num_workers=2"],
                           start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True)
    started = time.time()
    while not ((out / "log.jsonl").exists() and len((out / "log.jsonl").read_text().splitlines()) >= 2):
        assert time.time() - started < 120 and job.poll() is None, job.communicate()
        time.sleep(0.1)
    os.killpg(job.pid, signal.SIGINT)  # the terminal's Ctrl-C: the whole process group
    _, err = job.communicate(timeout=120)
    assert job.returncode == 2, err
    assert "Ctrl-C: stopping in a step or two, with a checkpoint" in err
    stopped = re.search(r"stopped at step (\d+) by SIGINT; checkpoint saved in .*run: relaunch "
                        r"with --resume", err)
    assert stopped, err
    assert load_file(out / "checkpoint.pth")["step"] == int(stopped.group(1)) >= 3


def test_ctrl_c_outside_training_is_one_line(monkeypatch, capsys):
    """Ctrl-C in `knn`, `linear` (or a second one in training): one line and the shell's
    code for SIGINT, not a traceback."""
    from dinofuse.engine import cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_knn", interrupted)
    assert main(["knn", "--load-features", "x"]) == 130
    assert capsys.readouterr().err.strip() == \
        "dinofuse knn: interrupted (Ctrl-C); what was saved before is kept"


def test_fsdp_always_trains_on_one_process_from_the_command_line(folder, tmp_path, capsys):
    """impl.fsdp="always" without torchrun: the command makes its one-process group (the
    trainer alone asks for one), trains sharded, saves a sharded checkpoint and ends with
    the k-NN report of the whole teacher."""
    overrides = [o for o in TINY if not o.startswith("run.knn_after_training")]
    out = tmp_path / "run"
    assert main(["train", "--data", str(folder), "--output-dir", str(out), "--quiet",
                 "--max-steps", "2", 'impl.fsdp="always"', f'run.knn_val="{folder}"',
                 "run.knn_k=3", *overrides]) == 0
    printed = capsys.readouterr().out
    assert f"checkpoint {out / 'checkpoints' / 'step_00000002'}" in printed
    assert "k-NN (k=3" in printed and (out / "knn.json").is_file()
    import torch.distributed as dist

    assert not dist.is_initialized()  # the command's group is gone with the command


def test_a_fresh_start_over_a_run_is_refused_before_any_trial(trained, folder, monkeypatch,
                                                              capsys):
    """`dinofuse train` into a folder that holds a checkpoint, without --resume: one line,
    before --fit-minutes spends its trial (its first save would overwrite the checkpoint)."""
    from dinofuse.engine import cli

    def no_trial(*args):
        raise AssertionError("the trial ran")

    monkeypatch.setattr(cli, "fit_to_minutes", no_trial)
    digest = (trained / "checkpoint.pth").read_bytes()
    assert main(["train", "--data", str(folder), "--output-dir", str(trained), "--quiet",
                 "--fit-minutes", "1", *TINY]) == 2
    err = capsys.readouterr().err
    assert "holds a checkpoint of an earlier run: pass --resume (or --auto-resume)" in err
    assert (trained / "checkpoint.pth").read_bytes() == digest


def test_the_report_after_training_is_skipped_with_the_reason_when_labels_differ(folder, tmp_path,
                                                                                 capsys):
    """Trained on a flat (unlabelled) folder with labelled queries: the report's memory holds
    one class, so its figures would mean nothing; the run ends normally and says why."""
    overrides = [o for o in TINY if not o.startswith("run.knn_after_training")]
    assert main(["train", "--data", str(folder / "c0"), "--output-dir", str(tmp_path / "run"),
                 "--quiet", "--max-steps", "1", f'run.knn_val="{folder}"', *overrides]) == 0
    printed = capsys.readouterr().out
    assert ("k-NN skipped: k-NN of data.path against run.knn_val: the two image sets have "
            "different classes") in printed
    assert not (tmp_path / "run" / "knn.json").exists()


def test_train_overrides_may_come_after_its_options(capsys):
    """`dinofuse train --max-steps 2 run.seed=3`: a second run of overrides is collected
    too (argparse alone calls it unrecognized); an unknown option still is."""
    from dinofuse.engine.cli import build_parser, parse_args

    args = parse_args(build_parser(), ["train", "optim.epochs=2", "--max-steps", "2",
                                       "run.seed=3", "--quiet", "data.path=\"x\""])
    assert args.overrides == ["optim.epochs=2", "run.seed=3", 'data.path="x"']
    assert args.max_steps == 2 and args.quiet
    for argv in (["train", "--max-steps", "2", "--colour", "run.seed=3"],
                 ["knn", "--checkpoint", "c.pth", "run.seed=3"]):
        with pytest.raises(SystemExit) as e:
            parse_args(build_parser(), argv)
        assert e.value.code == 2
        assert f"unrecognized arguments: {argv[-2] if argv[0] == 'train' else argv[-1]}" in \
            capsys.readouterr().err


def test_an_unquoted_shard_pattern_is_explained(tmp_path, capsys):
    """`--data shards/*.tar` unquoted: the shell passes every shard, the second lands among
    the overrides; the error says --data takes one path and how to quote a pattern. Paths
    with quotes, backslashes or braces reach the config as they are."""
    for name in ("a.tar", "b.tar"):
        (tmp_path / name).write_bytes(b"")
    argv = ["train", "--data", str(tmp_path / "a.tar"), str(tmp_path / "b.tar"), "--max-steps", "1"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'b.tar'} is a path, not a section.field=value override" in err
    assert "'shards/*.tar'" in err
    from dinofuse.engine.config import load_config, toml_value

    odd = 'my "data"\\{0..1}'
    assert load_config("default", [f"data.path={toml_value(odd)}"]).data.path == odd


def test_resuming_a_finished_run_says_there_is_nothing_to_train(trained, folder, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    before = (run / "checkpoint.pth").read_bytes()
    capsys.readouterr()
    assert main(["train", "--data", str(folder), "--output-dir", str(run), "--quiet",
                 "--auto-resume", *TINY]) == 0
    epochs = next(o for o in TINY if o.startswith("optim.epochs=")).split("=")[1]
    # (its first line names the k-NN settings this command leaves out)
    assert capsys.readouterr().out.splitlines()[-1] == (
        f"nothing to train: {run / 'checkpoint.pth'} is at step "
        f"{torch.load(run / 'checkpoint.pth')['step']}, the end of its {epochs} epochs (raise "
        f"optim.epochs to train on)")
    assert (run / "checkpoint.pth").read_bytes() == before


def test_under_torchrun_a_user_error_is_the_cause_torchrun_names(tmp_path, monkeypatch, capsys):
    """torchrun's closing summary said "error_file: <N/A>" and a link for each rank that
    stopped on a user error (its line far above, once per rank): the line now goes to the
    error file torchrun reads, as the failure's message."""
    from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

    error_file = tmp_path / "error.json"
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(error_file))
    assert main(["data", "check", str(tmp_path / "nowhere")]) == 2
    line = capsys.readouterr().err.strip()
    assert line.startswith("dinofuse data: error: image folder not found: ") and "nowhere" in line
    failure = ProcessFailure(local_rank=1, pid=4242, exitcode=2, error_file=str(error_file))
    assert failure.message == line
    monkeypatch.delenv("TORCHELASTIC_ERROR_FILE")
    error_file.unlink()
    assert main(["data", "check", str(tmp_path / "nowhere")]) == 2
    assert not error_file.exists()  # outside torchrun: no file
