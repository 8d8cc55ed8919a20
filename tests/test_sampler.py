"""The batch order is a function of (seed, epoch) only, resumable, and splits cleanly over ranks."""

from training.data.sampler import EpochBatchSampler


def _flat(sampler):
    return [i for b in sampler for i in b]


def test_same_seed_same_order_and_epochs_differ():
    a, b = EpochBatchSampler(50, 8, seed=3), EpochBatchSampler(50, 8, seed=3)
    assert list(a) == list(b)
    first = list(a)
    a.set_epoch(1)
    assert list(a) != first


def test_resume_skips_exactly_the_seen_batches():
    s = EpochBatchSampler(50, 8, seed=1)
    s.set_epoch(2)
    full = list(s)
    s.set_epoch(2, start_batch=3)
    assert list(s) == full[3:]
    assert len(s) == len(full) - 3


def test_training_ranks_are_disjoint_and_equal_length():
    ranks = [EpochBatchSampler(53, 4, seed=0, rank=r, world_size=2) for r in range(2)]
    batches = [list(r) for r in ranks]
    assert len(batches[0]) == len(batches[1]) == 6
    seen = [set(_flat(r)) for r in ranks]
    assert not seen[0] & seen[1]


def test_evaluation_covers_every_sample_once():
    ranks = [EpochBatchSampler(53, 4, shuffle=False, drop_last=False, rank=r, world_size=2) for r in range(2)]
    flat = sorted(_flat(ranks[0]) + _flat(ranks[1]))
    assert flat == list(range(53))
