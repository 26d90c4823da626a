"""Best-NN kNN: golden values, ties, brute force agreement, chunking, val selection, weighted vote."""
import collections
import math

import pytest
import torch

from kdforge.eval import best_nn, knn_search, vote_accuracies


def test_golden_1d_votes_and_ties():
    # gallery on a line: x = 0, 1, 2, 10, 11 with labels 0, 0, 1, 1, 1; one query at 1.4 (label 0)
    # distances: 1.4, 0.4, 0.6, 8.6, 9.6 -> neighbour order: x=1 (0), x=2 (1), x=0 (0), x=10 (1), x=11 (1)
    # k=1: {0} -> 0 correct; k=2: {0,1} tie -> smallest class 0 correct; k=3: 0,1,0 -> 0 correct;
    # k=4: 0,1,0,1 tie -> 0 correct; k=5: two 0s, three 1s -> 1 wrong
    gx = torch.tensor([[0.0], [1.0], [2.0], [10.0], [11.0]])
    gy = torch.tensor([0, 0, 1, 1, 1])
    r = best_nn(gx, gy, torch.tensor([[1.4]]), torch.tensor([0]), ks=[1, 2, 3, 4, 5])
    assert r.acc_by_k == {1: 100.0, 2: 100.0, 3: 100.0, 4: 100.0, 5: 0.0}
    assert (r.best_k, r.best_acc, r.chosen_on) == (1, 100.0, "test")       # smallest k among the best
    # same query labelled 1: only k=5 is right
    r1 = best_nn(gx, gy, torch.tensor([[1.4]]), torch.tensor([1]), ks=[1, 2, 3, 4, 5])
    assert r1.acc_by_k == {1: 0.0, 2: 0.0, 3: 0.0, 4: 0.0, 5: 100.0} and r1.best_k == 5
    # ties go to the smallest *class index*, i.e. the smallest label value, whatever the label values
    r2 = best_nn(gx, gy * 5 + 3, torch.tensor([[1.4]]), torch.tensor([3]), ks=[2])
    assert r2.acc_by_k == {2: 100.0}


def test_vote_incremental_matches_counter():
    g = torch.Generator().manual_seed(0)
    nl = torch.randint(0, 4, (300, 15), generator=g)
    ty = torch.randint(0, 4, (300,), generator=g)
    got = vote_accuracies(nl, ty, 4, range(1, 16))
    for k in range(1, 16):
        correct = 0
        for i in range(300):
            cnt = collections.Counter(nl[i, :k].tolist())
            top = max(cnt.values())
            correct += min(c for c, v in cnt.items() if v == top) == ty[i].item()
        assert got[k] == pytest.approx(100.0 * correct / 300)


def _brute(tr, ty, te, tey, ks, f):
    d = torch.cdist(f(te).double(), f(tr).double())
    order = d.argsort(1)
    out = {}
    for k in ks:
        correct = 0
        for i in range(te.shape[0]):
            cnt = collections.Counter(ty[order[i, :k]].tolist())
            top = max(cnt.values())
            correct += min(c for c, v in cnt.items() if v == top) == tey[i].item()
        out[k] = 100.0 * correct / te.shape[0]
    return out


@pytest.mark.parametrize("rep,gchunk", [("original", 100), ("norm", None), ("shift-norm", 300)])
def test_best_nn_matches_brute_force(rep, gchunk):
    g = torch.Generator().manual_seed(1)
    tr, te = torch.randn(800, 12, generator=g) + 0.3, torch.randn(150, 12, generator=g) + 0.3
    ty, tey = torch.randint(0, 5, (800,), generator=g), torch.randint(0, 5, (150,), generator=g)
    tr[:, 0] += ty * 0.6
    te[:, 0] += tey * 0.6
    mu = tr.mean(0)
    f = {"original": lambda x: x, "norm": lambda x: x / x.norm(dim=1, keepdim=True),
         "shift-norm": lambda x: (x - mu) / (x - mu).norm(dim=1, keepdim=True)}[rep]
    r = best_nn(tr, ty, te, tey, k_max=15, rep_space=rep, chunk=32, gallery_chunk=gchunk)   # one or many blocks
    ref = _brute(tr, ty, te, tey, range(1, 16, 2), f)
    assert r.acc_by_k == pytest.approx(ref)
    assert list(r.acc_by_k) == list(range(1, 16, 2))
    best = max(ref.values())
    assert r.best_acc == best and r.best_k == min(k for k, v in ref.items() if v == best)


def test_knn_search_chunking_invariant_and_exact():
    g = torch.Generator().manual_seed(2)
    gal, q = torch.randn(500, 8, generator=g), torch.randn(70, 8, generator=g)
    d_ref = torch.cdist(q.double(), gal.double()).pow(2)
    ref_d, ref_i = d_ref.topk(9, dim=1, largest=False)
    for chunk, gchunk in [(1024, None), (16, 50), (7, 130), (33, 320)]:   # two-stage and plain selection
        d, i = knn_search(gal, q, 9, chunk=chunk, gallery_chunk=gchunk)
        assert torch.equal(i, ref_i)
        torch.testing.assert_close(d.double(), ref_d, atol=1e-4, rtol=1e-5)


def test_knn_search_merges_candidates_across_many_gallery_blocks(monkeypatch):
    from kdforge.eval import knn
    monkeypatch.setattr(knn, "_PENDING", 1)          # merge the per-block candidates after every block
    g = torch.Generator().manual_seed(4)
    gal, q = torch.randn(900, 8, generator=g), torch.randn(40, 8, generator=g)
    ref_i = torch.cdist(q.double(), gal.double()).pow(2).topk(12, dim=1, largest=False).indices
    for gchunk in (13, 200):                          # 70 blocks (plain topk) / 5 blocks (two-stage)
        d, i = knn_search(gal, q, 12, chunk=16, gallery_chunk=gchunk)
        assert torch.equal(i, ref_i)
        assert bool((d[:, 1:] >= d[:, :-1]).all())    # ascending


def test_val_selection_and_weighted_vote():
    g = torch.Generator().manual_seed(3)
    tr = torch.randn(400, 6, generator=g)
    ty = (tr[:, 0] > 0).long()
    va, te = torch.randn(100, 6, generator=g), torch.randn(100, 6, generator=g)
    vy, tey = (va[:, 0] > 0).long(), (te[:, 0] > 0).long()
    r = best_nn(tr, ty, te, tey, k_max=21, val=(va, vy))
    assert r.chosen_on == "val" and r.val_acc_by_k is not None
    assert r.best_k == max(r.val_acc_by_k, key=lambda k: (r.val_acc_by_k[k], -k))
    assert r.best_acc == r.acc_by_k[r.best_k]
    # weighted: neighbours by cosine, votes exp(cos/T); check against a direct computation
    T = 0.1
    rw = best_nn(tr, ty, te, tey, ks=[5], weighted=True, T=T)
    a, b = torch.nn.functional.normalize(te, dim=1), torch.nn.functional.normalize(tr, dim=1)
    sim = a @ b.T
    s5, i5 = sim.topk(5, dim=1)
    votes = torch.zeros(100, 2).scatter_add_(1, ty[i5], torch.exp(s5 / T))
    ref = (votes.argmax(1) == tey).double().mean().item() * 100
    assert rw.acc_by_k[5] == pytest.approx(ref)
    assert "weighted" in str(rw)


def test_unknown_rep_space_and_labels_absent_from_gallery():
    tr, ty = torch.randn(10, 3), torch.zeros(10, dtype=torch.long)
    with pytest.raises(ValueError, match="rep_space"):
        best_nn(tr, ty, tr, ty, rep_space="shifted-norm")
    r = best_nn(tr, ty, tr[:4], torch.tensor([0, 0, 9, 9]), ks=[1])            # class 9 never in the gallery
    assert r.acc_by_k[1] == 50.0
    assert math.isfinite(r.best_acc)


def test_knn_search_mismatched_inputs_and_mixed_precision_best_nn():
    g = torch.Generator().manual_seed(5)
    gal, q = torch.randn(60, 4, generator=g), torch.randn(9, 4, generator=g)
    with pytest.raises(ValueError, match="must share dtype, device and feature size"):
        knn_search(gal, q.double(), 3)
    with pytest.raises(ValueError, match="must share dtype, device and feature size"):
        knn_search(gal, q[:, :3], 3)
    y, yq = torch.arange(60) % 3, torch.arange(9) % 3
    mixed = best_nn(gal.double(), y, q, yq, ks=[1, 3])          # float64 gallery, float32 queries
    assert mixed.acc_by_k == best_nn(gal.double(), y, q.double(), yq, ks=[1, 3]).acc_by_k
