"""The training input's epoch order: seeded, reshuffled every epoch, shared out over ranks;
the reference augmentation's draws: seeded per epoch and image."""

import numpy as np
import torch
from PIL import Image

from dinofuse.dataloading.spec import MultiCropSpec
from dinofuse.dataloading.torchvision_multicrop import MultiCropAugmentation, SeededMultiCrop
from dinofuse.engine.inputs import EpochSampler


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
