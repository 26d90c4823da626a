"""Class-balanced P×K sampler: same-class pairs in every batch, seeding, rank sharding."""
import pytest

from kdforge.data.pk_sampler import PKBatchSampler

# class sizes 2, 3, 7, 10, 1 (class 4 has one image and can never be paired)
LABELS = [0] * 2 + [1] * 3 + [2] * 7 + [3] * 10 + [4]


def _chunks(batch, K):
    return [batch[i:i + K] for i in range(0, len(batch), K)]


def test_every_batch_has_same_class_pairs():
    s = PKBatchSampler(LABELS, n_classes_per_batch=2, n_per_class=4, seed=0)
    # chunks: ceil(2/4) + ceil(3/4) + ceil(7/4) + ceil(10/4) = 1 + 1 + 2 + 3 = 7 -> 3 batches of 2 chunks
    assert s.n_chunks == 7 and len(s) == 3 and s.batch_size == 8
    for epoch in range(5):
        s.set_epoch(epoch)
        batches = list(s)
        assert len(batches) == 3
        for b in batches:
            assert len(b) == 8
            for ch in _chunks(b, 4):
                ys = {LABELS[i] for i in ch}
                assert len(ys) == 1 and 4 not in ys      # one class per chunk, never the singleton
                assert len(set(ch)) >= 2                 # at least two distinct images -> a real pair


def test_full_chunks_do_not_repeat_images_and_cover_classes():
    labels = [c for c in range(6) for _ in range(8)]      # 6 classes × 8 images: chunks never need filling
    s = PKBatchSampler(labels, 3, 4, seed=1)
    idx = [i for b in s for i in b]
    assert sorted(idx) == list(range(48))


def test_seeded_and_epoch_dependent():
    a = PKBatchSampler(LABELS, 2, 4, seed=3)
    b = PKBatchSampler(LABELS, 2, 4, seed=3)
    assert list(a) == list(b)
    b.set_epoch(1)
    assert list(a) != list(b)
    c = PKBatchSampler(LABELS, 2, 4, seed=4)
    assert list(a) != list(c)


def test_rank_sharding_matches_single_process_and_skip():
    labels = [c for c in range(10) for _ in range(6)]
    one = PKBatchSampler(labels, 4, 3, seed=5, rank=0, world=1)
    r0 = PKBatchSampler(labels, 2, 3, seed=5, rank=0, world=2)
    r1 = PKBatchSampler(labels, 2, 3, seed=5, rank=1, world=2)
    assert len(one) == len(r0) == len(r1) == 5
    for g, a, b in zip(one, r0, r1):
        # rank r takes chunks r, r+W, ... of each global batch of P·W chunks
        ch = _chunks(g, 3)
        assert a == ch[0] + ch[2] and b == ch[1] + ch[3]
        assert not set(a) & set(b)
    r0.skip(3)
    assert list(r0) == list(PKBatchSampler(labels, 2, 3, seed=5, rank=0, world=2))[3:]


def test_small_class_cycles_and_bad_arguments():
    s = PKBatchSampler([0, 0, 1, 1, 1], 1, 4, seed=0)
    for b in s:
        assert len(b) == 4 and len(set(b)) >= 2
    with pytest.raises(ValueError):
        PKBatchSampler(LABELS, 2, 1)
    with pytest.raises(ValueError):
        PKBatchSampler([0, 0, 1, 1], 4, 2)   # 2 chunks < one batch of 4
