"""The training input's epoch order: seeded, reshuffled every epoch, shared out over ranks;
the reference augmentation's draws: seeded per epoch and image; per-rank synthetic crops,
the cores each backend keeps busy, DALI's resume, what counts as WebDataset shards."""

import numpy as np
import pytest
import torch
from PIL import Image

from dinofuse.dataloading.dali_multicrop import available as dali_available
from dinofuse.dataloading.spec import MultiCropSpec
from dinofuse.dataloading.torchvision_multicrop import MultiCropAugmentation, SeededMultiCrop
from dinofuse.engine.config import load_config
from dinofuse.dataloading.readers import webdataset_shards
from dinofuse.engine.inputs import EpochSampler, TrainingInput


def epoch_order(seed, epoch, rank=0, world=1, batch=3, n=23, start_batch=0):
    sampler = EpochSampler(n, batch, seed, rank, world)
    sampler.epoch, sampler.start_batch = epoch, start_batch
    order = list(sampler)
    assert len(order) == len(sampler)
    return order


def test_ranks_share_each_epoch_as_one_process_with_the_global_batch():
    for epoch in range(3):
        ranks = [epoch_order(0, epoch, rank, world=2) for rank in range(2)]
        one = epoch_order(0, epoch, batch=6)  # the global batch on one process
        assert len(ranks[0]) == len(ranks[1]) == 9  # 23 // 6 whole global batches of 3 + 3
        assert not set(ranks[0]) & set(ranks[1]) and len(set(one)) == 18
        # global batch k = rank 0's batch k, then rank 1's
        assert one == [i for k in range(3) for r in ranks for i in r[3 * k:3 * k + 3]]


def test_each_epoch_is_reshuffled_from_the_seed():
    orders = [epoch_order(0, epoch) for epoch in range(3)]
    assert len({tuple(o) for o in orders}) == 3
    assert len({frozenset(o) for o in orders}) > 1  # the remainder left out changes too
    assert epoch_order(0, 1) == orders[1]  # the same seed, the same order
    assert epoch_order(1, 1) != orders[1]


def test_a_resume_starts_at_its_batch():
    assert epoch_order(0, 2, start_batch=4) == epoch_order(0, 2)[12:]
    assert epoch_order(0, 2, rank=1, world=2, start_batch=2) == epoch_order(0, 2, rank=1, world=2)[6:]


def test_reference_crops_are_drawn_from_seed_epoch_and_index():
    """The torchvision reference's crops of an image: the same for the same (seed, epoch,
    index), whatever was drawn before; others in the next epoch (and for another seed)."""
    pixels = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    images = [(Image.fromarray(pixels), 0)] * 3
    spec = MultiCropSpec(global_crop_size=16, local_crop_size=8, local_crops_number=2)

    def crops(seed, epoch, index):
        dataset = SeededMultiCrop(images, MultiCropAugmentation(spec), seed=seed)
        dataset.epoch = epoch
        dataset[0]  # draws before must not matter
        return torch.cat([c.flatten() for c in dataset[index][0]])

    assert torch.equal(crops(0, 0, 1), crops(0, 0, 1))
    for other in (crops(0, 1, 1), crops(0, 0, 2), crops(1, 0, 1)):
        assert not torch.equal(crops(0, 0, 1), other)


def training_input(path, *overrides, rank=0, world=1):
    cfg = load_config("default", [f'data.path="{path}"', "data.global_crop_size=16",
                                  "data.local_crop_size=8", "data.local_crops_number=2",
                                  "optim.batch_size_per_device=8", "data.num_workers=1", *overrides])
    return TrainingInput(cfg, torch.device("cpu"), rank, world, None, lambda: None)


def test_synthetic_crops_differ_between_ranks():
    """Each rank times its own crops, as it would read its own images."""
    ranks = [training_input("synthetic", rank=r, world=2) for r in (0, 1, 0)]
    assert all(torch.equal(a, b) for a, b in zip(ranks[0].synthetic, ranks[2].synthetic))
    assert not any(torch.equal(a, b) for a, b in zip(ranks[0].synthetic, ranks[1].synthetic))


def test_data_workers_are_the_backends_that_keep_cores_busy(image_folder):
    """DALI's threads and torchvision's worker processes each take a core beside the training
    step; synthetic crops (made once on the device) take none."""
    assert training_input(image_folder, 'data.backend="torchvision"').data_workers == 1
    assert training_input("synthetic").data_workers == 0
    if dali_available():
        assert training_input(image_folder, 'data.backend="dali"').data_workers == 1


def test_dali_resume_skips_the_batches_already_trained(image_folder):
    """40 images, batch 8: 5 steps an epoch; resumed at batch 2, the epoch gives the 3 left
    (which ones: the test below)."""
    pytest.importorskip("nvidia.dali")
    source = training_input(image_folder, 'data.backend="dali"')
    assert source.iters_per_epoch == 5
    assert len(list(source.batches(0, 2))) == 3
    assert len(list(source.batches(1, 0))) == 5


def test_a_folder_of_tar_shards_and_class_folders_is_an_image_folder(tmp_path):
    (tmp_path / "a.tar").write_bytes(b"")
    (tmp_path / "b.tar").write_bytes(b"")
    assert webdataset_shards(str(tmp_path)) == [str(tmp_path / "a.tar"), str(tmp_path / "b.tar")]
    assert webdataset_shards(str(tmp_path / "a.tar")) == [str(tmp_path / "a.tar")]
    (tmp_path / "class0").mkdir()
    assert webdataset_shards(str(tmp_path)) == []


@pytest.mark.parametrize("fancy,buffer", [(True, 7), (False, 1024)])
def test_dalis_chroma_upsampling_and_shuffle_buffer_come_from_the_config(image_folder,
                                                                         monkeypatch, fancy,
                                                                         buffer):
    pytest.importorskip("nvidia.dali")
    from dinofuse.dataloading import dali_multicrop

    asked, build = [], dali_multicrop.build_pipeline
    monkeypatch.setattr(dali_multicrop, "build_pipeline", lambda *a, **k: (
        asked.append((k["fancy_upsampling"], k["shuffle_buffer"])) or build(*a, **k)))
    training_input(image_folder, 'data.backend="dali"', f"data.shuffle_buffer={buffer}",
                   f"data.jpeg_fancy_upsampling={str(fancy).lower()}")
    assert asked == [(fancy, buffer)]


def test_shards_without_dalis_indexes_say_how_to_make_them(tmp_path, capsys):
    pytest.importorskip("nvidia.dali")
    from dinofuse.dataloading.readers import write_dali_indexes
    from test_readers import encoded, write_shard

    tars = [write_shard(tmp_path / f"{n}.tar", [(f"{n}{i}.jpg", encoded(i)) for i in range(8)])
            for n in "ab"]
    training_input(tmp_path, 'data.backend="dali"')
    assert f"`dinofuse data index {tmp_path}` writes them once" in capsys.readouterr().err
    write_dali_indexes(tars)
    training_input(tmp_path, 'data.backend="dali"')
    assert "DALI index" not in capsys.readouterr().err


def test_data_workers_leave_ctrl_c_to_the_training_process(image_folder, monkeypatch):
    """Ctrl-C reaches the data workers too (one process group): each worker starts by
    ignoring SIGINT, so the batches until the agreed stop still come (the worker in the
    middle of a batch would otherwise die with it)."""
    import signal

    seen = {}
    real = torch.utils.data.DataLoader

    def recording(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.utils.data, "DataLoader", recording)
    source = training_input(image_folder, 'data.backend="torchvision"')
    assert len(next(iter(source.batches(0, 0)))[0]) == 4
    before = signal.getsignal(signal.SIGINT)
    try:
        seen["worker_init_fn"](0)  # what each worker runs first
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, before)


def test_a_dali_resume_anywhere_continues_as_the_uninterrupted_run(image_folder):
    """Each epoch has its own DALI graph, seeded from (seed, epoch): a run resumed at any
    batch of any epoch reads the images and cuts the crops the uninterrupted one would. (One
    graph for the whole run drew epoch after epoch: resumed at epoch 2, a run saw epoch 0's
    order and crops again; seeded from the epoch it resumed at, another order than the
    uninterrupted run's for the rest of that epoch, some images twice, some never.)"""
    pytest.importorskip("nvidia.dali")

    def crops(epoch, start, source=None):
        source = source or training_input(image_folder, 'data.backend="dali"')
        return [c[0] for c, _ in source.batches(epoch, start)]

    going_on = training_input(image_folder, 'data.backend="dali"')
    epochs = [crops(epoch, 0, going_on) for epoch in range(3)]
    assert [len(e) for e in epochs] == [5, 5, 5]
    for epoch, start in [(0, 2), (2, 3), (1, 0), (2, 0)]:
        rest = crops(epoch, start)
        assert len(rest) == 5 - start
        assert all(torch.equal(a, b) for a, b in zip(rest, epochs[epoch][start:])), (epoch, start)
    assert not any(torch.equal(a, b) for a, b in zip(epochs[2], epochs[0]))


def test_a_dali_resume_of_shards_continues_as_the_uninterrupted_run(tmp_path, monkeypatch):
    """The same for WebDataset shards: each epoch reads them in an order of its own, drawn
    from (seed, epoch) alike on every rank, with the window's draws seeded alike."""
    pytest.importorskip("nvidia.dali")
    from dinofuse.dataloading import dali_multicrop
    from test_readers import encoded, write_shard

    tars = [write_shard(tmp_path / f"{n}.tar", [(f"{n}{i}.jpg", encoded(i)) for i in range(8)])
            for n in "abcdef"]
    orders, build = [], dali_multicrop.build_pipeline
    monkeypatch.setattr(dali_multicrop, "build_pipeline", lambda *a, **k: (
        orders.append(list(k["tars"])) or build(*a, **k)))
    for rank in range(2):
        source = training_input(tmp_path, 'data.backend="dali"', rank=rank, world=2)
        for epoch in range(1, 4):
            list(source.batches(epoch, 0))
    per_epoch = orders[1:4]  # (the graph each start builds for epoch 0 comes first)
    assert all(sorted(order) == tars for order in per_epoch)
    assert len({tuple(order) for order in per_epoch}) == 3 and orders[5:8] == per_epoch

    def crops(epoch, start, source=None):
        source = source or training_input(tmp_path, 'data.backend="dali"',
                                          "optim.batch_size_per_device=4")
        return [c[0] for c, _ in source.batches(epoch, start)]

    going_on = training_input(tmp_path, 'data.backend="dali"', "optim.batch_size_per_device=4")
    epochs = [crops(epoch, 0, going_on) for epoch in range(3)]
    assert [len(e) for e in epochs] == [12, 12, 12]
    for epoch, start in [(0, 4), (2, 9), (1, 0)]:
        rest = crops(epoch, start)
        assert len(rest) == 12 - start
        assert all(torch.equal(a, b) for a, b in zip(rest, epochs[epoch][start:])), (epoch, start)


def test_each_dali_epoch_and_rank_draws_crops_of_its_own(tmp_path):
    """One image in every file: an epoch's crops differ from another's at every place (a
    graph per epoch seeded alike would repeat the draws of each place, only the images
    moving between them), and a rank's from another's."""
    pytest.importorskip("nvidia.dali")
    yy, xx = np.mgrid[0:24, 0:24] / 23.0
    image = Image.fromarray((np.stack([xx, yy, 1 - xx], -1) * 255).astype(np.uint8))
    for i in range(16):
        image.save(tmp_path / f"{i}.png")
    source = training_input(tmp_path, 'data.backend="dali"')
    epochs = [[c for crops, _ in source.batches(epoch, 0) for c in crops] for epoch in range(2)]
    assert len(epochs[0]) == len(epochs[1]) == 2 * 4
    assert not any(torch.equal(a[i], b[i]) for a, b in zip(*epochs) for i in range(8))
    # and each rank its own (one seed on every rank gave the i-th sample of each the same)
    ranks = [[c for crops, _ in training_input(tmp_path, 'data.backend="dali"', rank=r,
                                               world=2).batches(0, 0) for c in crops]
             for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 4
    assert not any(torch.equal(a[i], b[i]) for a, b in zip(*ranks) for i in range(8))


def test_dali_reads_a_folder_in_the_torchvision_backends_order(image_folder, monkeypatch):
    """The files each rank's graph reads in an epoch are the EpochSampler's for that rank
    (the torchvision backend's), and only those (ImageNet's 1.28 M names on every rank, each
    epoch, cost DALI a second or two to take in)."""
    pytest.importorskip("nvidia.dali")
    from dinofuse.dataloading import dali_multicrop

    built, build = [], dali_multicrop.build_pipeline
    monkeypatch.setattr(dali_multicrop, "build_pipeline", lambda files, *a, **k: (
        built.append((files, k["shard_id"], k["num_shards"])) or build(files, *a, **k)))
    for rank in range(2):
        source = training_input(image_folder, 'data.backend="dali"',
                                "optim.batch_size_per_device=4", rank=rank, world=2)
        for epoch in (0, 3):
            list(source.batches(epoch, 0))
            files, shard, shards = built[-1]
            assert (shard, shards) == (0, 1)  # its own files alone: a world-th of the names
            source.sampler.epoch, source.sampler.start_batch = epoch, 0
            expected = [str(source.dataset.images.samples[i][0]) for i in source.sampler]
            assert files == expected and len(files) == 20
        assert built[-2][0] != built[-1][0]  # another order in another epoch
