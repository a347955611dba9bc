"""The training input's epoch order: seeded, reshuffled every epoch, shared out over ranks."""

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
