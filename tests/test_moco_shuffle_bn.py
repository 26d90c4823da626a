"""Shuffle-BN: single-process path and a 2-process gloo run showing that the order is restored."""
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from kdforge.models.shuffle_bn import (batch_shuffle_ddp, batch_unshuffle_ddp, chunked_forward,
                                       shuffled_forward)


def test_single_process_shuffle_roundtrip():
    torch.manual_seed(0)
    x = torch.arange(8.0).unsqueeze(1)
    xs, idx = batch_shuffle_ddp(x)
    assert sorted(xs.squeeze(1).tolist()) == list(range(8))
    assert not torch.equal(xs, x)  # seed 0 permutes 8 rows
    assert torch.equal(batch_unshuffle_ddp(xs, idx), x)


class Recorder(nn.Module):
    """Per-sample map y = 2x + 1 that records every batch it receives."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, x):
        self.seen.append(x.clone())
        return 2 * x + 1


def test_single_process_shuffled_forward_splits():
    torch.manual_seed(1)
    x = torch.arange(12.0).unsqueeze(1)
    enc = Recorder()
    y = shuffled_forward(enc, x, splits=3)
    assert torch.equal(y, 2 * x + 1)                       # original order restored
    assert len(enc.seen) == 3 and all(s.shape == (4, 1) for s in enc.seen)
    seen = torch.cat(enc.seen).squeeze(1)
    assert sorted(seen.tolist()) == list(range(12)) and not torch.equal(seen, x.squeeze(1))
    enc2 = Recorder()
    assert torch.equal(chunked_forward(enc2, x, splits=2), 2 * x + 1)
    assert [s.squeeze(1).tolist() for s in enc2.seen] == [list(range(6)), list(range(6, 12))]
    with pytest.raises(ValueError, match="divisible by bn_splits"):
        shuffled_forward(enc, x, splits=5)


def test_single_process_bn_groups_see_different_statistics():
    # with splits=2, the BN of the key pass normalises each half with that half's statistics
    torch.manual_seed(0)
    bn = nn.BatchNorm1d(1, affine=False)
    x = torch.randn(8, 1)
    y_full = bn(x)
    y_split = shuffled_forward(bn, x, splits=2)
    assert not torch.allclose(y_full, y_split)
    assert torch.allclose(shuffled_forward(bn, x, splits=1), y_full, atol=1e-6)  # BN is permutation-invariant


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(100 + rank)  # different local RNGs: the permutation must come from rank 0
        n = 4
        x = (torch.arange(n, dtype=torch.float32) + 10 * rank).unsqueeze(1)  # rank 0: 0..3, rank 1: 10..13
        enc = Recorder()
        y = shuffled_forward(enc, x)
        xs, idx = batch_shuffle_ddp(x)
        back = batch_unshuffle_ddp(xs, idx)
        torch.save({"x": x, "y": y, "seen": enc.seen[0], "xs": xs, "idx": idx, "back": back},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_process_gloo_shuffle_restores_order():
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "init")
        mp.spawn(_worker, args=(2, init_file, tmp), nprocs=2, join=True)
        r = [torch.load(os.path.join(tmp, f"rank{i}.pt")) for i in range(2)]
    for i in range(2):
        assert torch.equal(r[i]["y"], 2 * r[i]["x"] + 1), "shuffled_forward did not restore the order"
        assert torch.equal(r[i]["back"], r[i]["x"]), "unshuffle did not restore the order"
    # one permutation, broadcast from rank 0: both ranks hold the same unshuffle index
    assert torch.equal(r[0]["idx"], r[1]["idx"])
    # each rank encoded a contiguous slice of the *global* permuted batch: together all 8 samples, once
    seen = torch.cat([r[0]["seen"], r[1]["seen"]]).squeeze(1)
    assert sorted(seen.tolist()) == [0.0, 1, 2, 3, 10, 11, 12, 13]
    # the permuted slices mix the ranks' samples unless the permutation kept the halves apart
    global_x = torch.cat([r[0]["x"], r[1]["x"]]).squeeze(1)
    perm = torch.argsort(r[0]["idx"])
    assert torch.equal(torch.cat([r[0]["xs"], r[1]["xs"]]).squeeze(1), global_x[perm])
