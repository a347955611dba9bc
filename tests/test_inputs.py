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


def test_a_dali_resume_at_a_later_epoch_does_not_replay_the_first(image_folder):
    """DALI draws each epoch's order and crops from its seed, one epoch after another: a run
    resumed at epoch 2 started them afresh and trained on epoch 0's images and crops again
    (every resumed part of a preemptible run alike). Resumed within epoch 0, the rest of the
    epoch is the uninterrupted one's."""
    pytest.importorskip("nvidia.dali")

    def crops(epoch, start, source=None):
        source = source or training_input(image_folder, 'data.backend="dali"')
        return [c[0] for c, _ in source.batches(epoch, start)]

    first = crops(0, 0)
    assert len(first) == 5 and all(torch.equal(a, b) for a, b in zip(crops(0, 0), first))
    rest = crops(0, 2)
    assert len(rest) == 3 and all(torch.equal(a, b) for a, b in zip(rest, first[2:]))
    later = crops(2, 0)
    assert len(later) == 5 and not any(torch.equal(a, b) for a, b in zip(later, first))
    going_on = training_input(image_folder, 'data.backend="dali"')  # epochs in a row: one graph
    crops(0, 0, going_on)
    graph = going_on.dali
    second = crops(1, 0, going_on)
    assert going_on.dali is graph and not any(torch.equal(a, b) for a, b in zip(second, first))
