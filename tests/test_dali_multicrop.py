"""The DALI multi-crop graph on the CPU (device_id=None): shapes, values, crop counts, shards."""

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("nvidia.dali")

from dinofuse.dataloading.dali_multicrop import (  # noqa: E402
    DALIMultiCropLoader,
    MultiCropSpec,
    build_pipeline,
    decode_images,
)
from dinofuse.dataloading.torchvision_multicrop import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402


@pytest.fixture(scope="module")
def jpegs(tmp_path_factory):
    root = tmp_path_factory.mktemp("jpegs")
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:60, 0:80] / 60.0
    files = []
    for i in range(12):
        rgb = np.stack([xx, yy, np.sin(3 * xx + i) * 0.5 + 0.5], -1) * 255 * rng.uniform(0.5, 1)
        path = root / f"{i}.jpg"
        Image.fromarray(rgb.astype(np.uint8)).save(path, quality=90)
        files.append(str(path))
    return files


@pytest.mark.parametrize("local_crops", [0, 6, 10])
def test_shapes_dtypes_and_value_ranges(jpegs, local_crops):
    spec = MultiCropSpec(global_crop_size=32, local_crop_size=16, local_crops_number=local_crops)
    pipe = build_pipeline(jpegs, list(range(len(jpegs))), spec, batch_size=4, seed=3)
    loader = DALIMultiCropLoader(pipe, 2 + local_crops)
    batches = list(loader)
    assert len(batches) == 3  # 12 files / batch 4
    lo = (0 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    hi = (1 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    seen = []
    for crops, labels in batches:
        assert len(crops) == 2 + local_crops
        for i, crop in enumerate(crops):
            size = 32 if i < 2 else 16
            assert crop.shape == (4, 3, size, size) and crop.dtype == torch.float32
            assert torch.isfinite(crop).all()
            assert (crop >= lo.view(1, 3, 1, 1) - 1e-4).all() and (crop <= hi.view(1, 3, 1, 1) + 1e-4).all()
        seen += labels.tolist()
    assert sorted(seen) == list(range(12))  # one epoch: every file once


def test_two_shards_cover_every_file_once(jpegs):
    spec = MultiCropSpec(global_crop_size=16, local_crop_size=8, local_crops_number=0)
    seen = []
    for shard in range(2):
        pipe = build_pipeline(jpegs, list(range(len(jpegs))), spec, batch_size=3, seed=5,
                              shard_id=shard, num_shards=2)
        seen += [label for _, labels in DALIMultiCropLoader(pipe, 2) for label in labels.tolist()]
    assert sorted(seen) == list(range(12))


def dali_decoded(data: bytes) -> np.ndarray:
    """`data` through the graph's decoder, on the CPU."""
    from nvidia.dali import fn, pipeline_def

    @pipeline_def(batch_size=1, num_threads=1, device_id=None)
    def decode():
        encoded = fn.external_source(source=[[np.frombuffer(data, np.uint8)]], cycle=True)
        return decode_images(encoded, gpu=False)

    (images,) = decode().run()
    return np.asarray(images[0])


def test_dali_decodes_what_pil_decodes_in_the_formats_the_screen_lets_through():
    """The screen's DALI_FORMATS against DALI itself: each gives the pixels of our PIL
    reader (the official loader's, but for 16-bit grayscale), each other format PIL opens
    fails."""
    from dinofuse.dataloading.readers import decode_rgb
    from test_check import FOR_DALI, NOT_FOR_DALI
    from test_readers import sixteen_bit_gray_png

    for fmt, data in {**FOR_DALI, "16-bit PNG": sixteen_bit_gray_png()[0]}.items():
        expected = np.asarray(decode_rgb(io.BytesIO(data), fmt))
        assert np.array_equal(dali_decoded(data), expected), fmt
    for fmt, data in NOT_FOR_DALI.items():
        with pytest.raises(RuntimeError, match="decoders.image"):
            dali_decoded(data)


def test_the_exif_orientation_is_left_as_pil_leaves_it():
    """The official loader (PIL's convert) does not turn a photo by its EXIF orientation;
    DALI's decoder would by default, giving another image than the torchvision path."""
    pixels = (np.random.default_rng(2).random((24, 40, 3)) * 255).astype(np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=95, exif=exif.tobytes())
    expected = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
    assert expected.shape == (24, 40, 3)
    assert np.array_equal(dali_decoded(buf.getvalue()), expected)


def test_empty_file_list_is_rejected():
    with pytest.raises(ValueError, match="no files"):
        build_pipeline([], [], MultiCropSpec(), batch_size=2)


def test_solarize_inverts_bright_values_of_the_second_crop_only(jpegs):
    spec = MultiCropSpec(global_crop_size=32, local_crops_number=0, flip_p=0.0, color_jitter_p=0.0,
                         grayscale_p=0.0, blur_p=(0.0, 0.0, 0.0), solarize_p=1.0)
    (crops, _), *_ = list(DALIMultiCropLoader(build_pipeline(jpegs, [0] * 12, spec, batch_size=12), 2))
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255
    first, second = (c * std + mean for c in crops)
    assert first.max() > 200  # bright images
    assert second.max() <= 127.5  # every value >= 128 became 255 - value


def test_webdataset_shards(tmp_path):
    import io
    import tarfile

    rng = np.random.default_rng(2)
    tars = []
    for shard in range(2):
        path = tmp_path / f"shard-{shard:04d}.tar"
        with tarfile.open(path, "w") as tar:
            for i in range(5):
                buf = io.BytesIO()
                Image.fromarray((rng.random((40, 50, 3)) * 255).astype(np.uint8)).save(buf, "JPEG")
                for ext, data in (("jpg", buf.getvalue()), ("cls", b"3")):
                    info = tarfile.TarInfo(f"{shard}{i:04d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        tars.append(str(path))
    spec = MultiCropSpec(global_crop_size=32, local_crop_size=16, local_crops_number=2)
    batches = list(DALIMultiCropLoader(build_pipeline([], [], spec, batch_size=5, tars=tars), 4))
    assert len(batches) == 2  # 10 samples, batch 5
    for crops, labels in batches:
        assert [c.shape for c in crops] == [(5, 3, 32, 32)] * 2 + [(5, 3, 16, 16)] * 2
        assert labels.tolist() == [0] * 5


def test_dali_reads_shards_through_their_indexes(tmp_path):
    """With NAME.idx beside every shard, DALI takes the indexes (it would trust one that
    lists only some samples: that is how this test sees it); with one missing, none."""
    from dinofuse.dataloading.dali_multicrop import shard_indexes
    from test_readers import encoded, write_shard

    tars = [write_shard(tmp_path / f"{k}.tar", [(f"{k}{i}.jpg", encoded(i)) for i in range(4)])
            for k in range(2)]
    assert shard_indexes(tars) == {}
    for tar in tars:  # each index lists the first 2 of the shard's 4 samples
        Path(tar).with_suffix(".idx").write_text("v1.2 2\n" + "".join(
            f"jpg {m.offset_data} {m.size} {m.name}\n"
            for m in list(tarfile.open(tar))[:2]))
    assert shard_indexes(tars) == {"index_paths": [str(Path(t).with_suffix(".idx")) for t in tars]}
    spec = MultiCropSpec(global_crop_size=32, local_crop_size=16, local_crops_number=0)
    assert len(DALIMultiCropLoader(build_pipeline([], [], spec, batch_size=2, tars=tars), 2)) == 2
    Path(tars[1]).with_suffix(".idx").unlink()
    assert len(DALIMultiCropLoader(build_pipeline([], [], spec, batch_size=2, tars=tars), 2)) == 4


def test_bf16_crops_are_the_float32_crops_rounded(jpegs):
    spec = MultiCropSpec(global_crop_size=32, local_crop_size=16, local_crops_number=2)
    fp32 = list(DALIMultiCropLoader(build_pipeline(jpegs, [0] * 12, spec, batch_size=4, seed=5), 4))
    bf16 = list(DALIMultiCropLoader(build_pipeline(jpegs, [0] * 12, spec, batch_size=4, seed=5), 4,
                                    dtype=torch.bfloat16))
    for (a, _), (b, _) in zip(fp32, bf16, strict=True):
        for x, y in zip(a, b, strict=True):
            assert y.dtype == torch.bfloat16 and y.shape == x.shape
            assert torch.equal(y, x.to(torch.bfloat16))


def test_jitter_order_draws_like_a_random_permutation():
    """Where saturation and contrast fall around the hue, as in a uniformly random order of
    the four: each before it half the time, both before it a third of the time (independent
    coins would give a quarter)."""
    from nvidia.dali import pipeline_def

    from dinofuse.dataloading.dali_multicrop import _before_hue

    n = 4000

    @pipeline_def(batch_size=n, num_threads=1, device_id=None, seed=5)
    def draws():
        return _before_hue()

    pipe = draws()
    pipe.build()
    saturation, contrast = (np.array(out.as_array(), dtype=bool).reshape(-1) for out in pipe.run())
    tol = 4.5 * np.sqrt(0.25 / n)
    assert abs(saturation.mean() - 0.5) < tol and abs(contrast.mean() - 0.5) < tol
    assert abs((saturation & contrast).mean() - 1 / 3) < tol


def test_without_contrast_no_batch_split_is_left_around_it(jpegs):
    """data.contrast=0: the jitter's contrast is a no-op, so the graph must not split and merge
    the batch around it before and after the hue (two conditionals per crop; DALI's graph,
    read through its private operator list)."""
    import collections

    def merges(**strengths):
        spec = MultiCropSpec(global_crop_size=32, local_crop_size=16, local_crops_number=1,
                             **strengths)
        pipe = build_pipeline(jpegs, [0] * 12, spec, batch_size=2)
        pipe.build()
        return collections.Counter(type(op._op).__name__ for op in pipe._ops)["Merge"]

    ncrops = 3
    assert merges(contrast=0.0) == merges() - 2 * ncrops


def epochs_of(pipe, ncrops: int, epochs: int) -> list[list[list]]:
    """Per epoch, per batch: the labels (DALI's loader restarts itself at each epoch's end)."""
    loader = DALIMultiCropLoader(pipe, ncrops)
    return [[labels.tolist() for _, labels in loader] for _ in range(epochs)]


def test_each_epoch_is_a_new_permutation_split_among_the_ranks(jpegs):
    """The official DistributedSampler's order: each epoch a new permutation of every file,
    cut among the ranks. (DALI's random_shuffle alone moved each rank to the next rank's part
    of one fixed order: rank 0's second epoch was rank 1's first.)"""
    spec = MultiCropSpec(global_crop_size=16, local_crop_size=8, local_crops_number=0)
    parts = [[sorted(sum(batches, [])) for batches in epochs_of(build_pipeline(
        jpegs, list(range(12)), spec, batch_size=3, seed=5, shard_id=rank, num_shards=2), 2, 3)]
        for rank in range(2)]
    for epoch in range(3):
        assert sorted(parts[0][epoch] + parts[1][epoch]) == list(range(12))
    assert len({tuple(part) for rank in parts for part in rank}) == 6  # no part seen twice
    orders = [sum(batches, []) for batches in epochs_of(build_pipeline(
        jpegs, list(range(12)), spec, batch_size=4, seed=5), 2, 2)]
    assert orders[0] != orders[1] and orders[0] != sorted(orders[0])
    again = epochs_of(build_pipeline(jpegs, list(range(12)), spec, batch_size=4, seed=5), 2, 2)
    other = epochs_of(build_pipeline(jpegs, list(range(12)), spec, batch_size=4, seed=6), 2, 2)
    assert [sum(b, []) for b in again] == orders and [sum(b, []) for b in other] != orders


def test_each_shard_draws_its_own_crops(tmp_path):
    """Ranks build their graphs from one seed: the i-th sample of every rank got the same
    crop, flip and jitter (a world-th of a global batch's draws were distinct). One image
    everywhere shows it: the two shards' crops must all differ."""
    yy, xx = np.mgrid[0:60, 0:80] / 60.0
    path = tmp_path / "one.jpg"
    Image.fromarray((np.stack([xx, yy, 1 - xx], -1) * 255).astype(np.uint8)).save(path)
    spec = MultiCropSpec(global_crop_size=16, local_crop_size=8, local_crops_number=2)
    ranks = [[c for crops, _ in DALIMultiCropLoader(build_pipeline(
        [str(path)] * 12, [0] * 12, spec, batch_size=3, seed=7, shard_id=rank, num_shards=2),
        4) for c in crops] for rank in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 8
    assert not any(torch.equal(a[i], b[i]) for a, b in zip(*ranks) for i in range(3))
    again = [c for crops, _ in DALIMultiCropLoader(build_pipeline(
        [str(path)] * 12, [0] * 12, spec, batch_size=3, seed=7, shard_id=1, num_shards=2), 4)
        for c in crops]
    assert all(torch.equal(a, b) for a, b in zip(again, ranks[1]))


def test_without_the_epochs_shuffle_a_list_is_read_in_its_order_in_contiguous_shards(jpegs):
    """shuffle_each_epoch=False (the trainer's graph per epoch): the files in the order
    given, shard k the k-th contiguous part, the same each pass."""
    spec = MultiCropSpec(global_crop_size=16, local_crop_size=8, local_crops_number=0)
    order = [7, 2, 11, 0, 5, 9, 1, 3, 10, 4, 8, 6]
    for rank in range(2):
        pipe = build_pipeline([jpegs[i] for i in order], order, spec, batch_size=3, seed=5,
                              shard_id=rank, num_shards=2, shuffle_each_epoch=False)
        for batches in epochs_of(pipe, 2, 2):
            assert sum(batches, []) == order[6 * rank:6 * rank + 6]


def gray_shards(tmp_path, shards: int, per_shard: int) -> list[str]:
    """Shards whose images are one flat gray each, 30 levels apart shard to shard: a crop's
    value names its shard (as a class, a shard written class by class)."""
    tars = []
    for k in range(shards):
        members = []
        for i in range(per_shard):
            buf = io.BytesIO()
            Image.fromarray(np.full((20, 20, 3), 30 + 30 * k, np.uint8)).save(buf, "PNG")
            members.append((f"{k}{i:03d}.png", buf.getvalue()))
        path = tmp_path / f"train-{k:06d}.tar"
        with tarfile.open(path, "w") as tar:
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        tars.append(str(path))
    return tars


def shards_of_batches(pipe, epochs: int) -> list[list[list[int]]]:
    """Per epoch, per batch: the shard of each sample, read off its crop's gray."""
    loader = DALIMultiCropLoader(pipe, 2)
    mean, std = IMAGENET_MEAN[0] * 255, IMAGENET_STD[0] * 255
    return [[[round(((c[0, 0, 0].item() * std + mean) - 30) / 30) for c in crops[0]]
             for crops, _ in loader] for _ in range(epochs)]


def test_shards_are_read_in_a_new_order_each_epoch(tmp_path):
    """Shards written class by class (here: one gray each) were read in their order each
    epoch, mixed only within DALI's 1024-sample window: batches of one class. The shards'
    order is now drawn each epoch, and data.shuffle_buffer sets the window."""
    tars = gray_shards(tmp_path, 4, 4)
    spec = MultiCropSpec(global_crop_size=8, local_crop_size=8, local_crops_number=0,
                         color_jitter_p=0.0, grayscale_p=0.0, blur_p=(0.0, 0.0, 0.0),
                         solarize_p=0.0)
    read = shards_of_batches(build_pipeline([], [], spec, batch_size=4, tars=tars, seed=1,
                                            shuffle_buffer=1), 4)
    orders = [[batch[0] for batch in epoch] for epoch in read]
    for epoch, order in zip(read, orders):  # a window of one: a shard after another
        assert [batch == [k] * 4 for batch, k in zip(epoch, order)] == [True] * 4
        assert sorted(order) == [0, 1, 2, 3]
    assert len({tuple(o) for o in orders}) > 1 and orders[0] != [0, 1, 2, 3], orders
    mixed = shards_of_batches(build_pipeline([], [], spec, batch_size=4, tars=tars, seed=1,
                                             shuffle_buffer=16), 1)[0]
    assert sorted(sum(mixed, [])) == sorted(list(range(4)) * 4)
    assert any(len(set(batch)) > 1 for batch in mixed)
