"""Few-shot episodes: sampling properties, golden values, batched evaluator vs per-episode loops."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kdforge.eval import evaluate_episodes, fit_cosine_classifier, fit_logistic_batched, sample_episodes
from kdforge.eval._common import block_generator


def _blobs(C=8, n=40, D=32, sep=0.7, seed=0):
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(C, D, generator=g) * sep
    x = (means[:, None, :] + torch.randn(C, n, D, generator=g)).reshape(-1, D)
    y = torch.arange(C).repeat_interleave(n) * 3 + 7          # non-contiguous labels
    perm = torch.randperm(C * n, generator=g)
    return x[perm], y[perm]


# ---------------------------------------------------------------------------------- sampling
def test_sample_episodes_properties():
    _, y = _blobs()
    ep = sample_episodes(y, n_way=5, n_shot=2, n_query=6, n_episodes=300, seed=3)
    assert ep.shape == (300, 5, 8) and ep.dtype == torch.long
    lab = y[ep]
    assert bool((lab == lab[..., :1]).all())                               # one class per way
    cls = lab[..., 0].sort(1).values
    assert bool((cls[:, 1:] != cls[:, :-1]).all())                          # distinct classes per episode
    flat = ep.flatten(1).sort(1).values
    assert bool((flat[:, 1:] != flat[:, :-1]).all())                        # no row used twice
    assert torch.equal(ep, sample_episodes(y, 5, 2, 6, 300, seed=3))        # seeded
    assert torch.equal(ep[:100], sample_episodes(y, 5, 2, 6, 100, seed=3))  # prefix-stable
    assert not torch.equal(ep, sample_episodes(y, 5, 2, 6, 300, seed=4))
    # every class is used and supports vary (uniform sampling, loose check)
    assert set(lab[..., 0].flatten().tolist()) == set(y.unique().tolist())


def test_sample_episodes_all_remaining():
    _, y = _blobs(C=6, n=20)
    ep = sample_episodes(y, 5, 1, "all", 50, seed=0)
    assert ep.shape == (50, 5, 20)                                           # 1 shot + 19 queries = whole class
    for e in ep[:5]:
        for w in e:
            assert set(w.tolist()) == set((y == y[w[0]]).nonzero().flatten().tolist())
    assert torch.equal(ep, sample_episodes(y, 5, 1, None, 50, seed=0))


def test_sample_episodes_unequal_all_and_errors():
    y = torch.tensor([0] * 5 + [1] * 7 + [2] * 6)
    with pytest.warns(UserWarning, match="unequal size"):
        ep = sample_episodes(y, 2, 1, "all", 10, seed=0)
    assert ep.shape == (10, 2, 5)                                            # min size 5 → 4 queries
    with pytest.raises(ValueError, match="too small"):
        sample_episodes(y, 2, 1, 5, 10)                                      # class 0 has 5 < 6 rows
    with pytest.raises(ValueError, match="classes"):
        sample_episodes(y, 4, 1, 1, 10)


# ---------------------------------------------------------------------------------- golden values
def test_prototype_golden():
    # rows: A0=(1,0) A1=(0.9,0.1) A2=(0.8,0.6) | B0=(0,1) B1=(0.2,0.9) B2=(0.6,0.8)
    x = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.8, 0.6], [0.0, 1.0], [0.2, 0.9], [0.6, 0.8]])
    y = torch.tensor([0, 0, 0, 1, 1, 1])
    # episode 1: supports A0, B0 -> prototypes (1,0), (0,1); queries A1 A2 | B1 B2
    #   A1 -> A, A2 (0.8 > 0.6) -> A, B1 -> B, B2 (0.8 > 0.6) -> B : 100%
    # episode 2: supports A1, B1: p_A=(0.9,0.1)/0.9055, p_B=(0.2,0.9)/0.9220
    #   A0: cos_A=0.9939 > cos_B=0.2169 -> A; A2: cos_A=(0.72+0.06)/0.9055=0.8614, cos_B=(0.16+0.54)/0.9220=0.7592 -> A
    #   B0: cos_B=0.9762 -> B; B2: cos_A=(0.54+0.08)/0.9055=0.6847, cos_B=(0.12+0.72)/0.9220=0.9111 -> B : 100%
    # episode 3: supports A2, B2: p_A=(0.8,0.6), p_B=(0.6,0.8) (unit)
    #   A0: 0.8 vs 0.6 -> A; A1: (0.72+0.06)/0.9055=0.8614 vs (0.54+0.08)/0.9055=0.6847 -> A
    #   B0: 0.6 vs 0.8 -> B; B1: (0.16+0.54)/0.922=0.7592 vs (0.12+0.72)/0.922=0.9111 -> B : 100%
    # episode 4 = episode 1 with the ways' roles swapped in the query of way B: use queries B1, A2 for B
    # (a row of class A in way B is rejected), so instead build a harder episode with class B query A2:
    ep = torch.tensor([[[0, 1, 2], [3, 4, 5]], [[1, 0, 2], [4, 3, 5]], [[2, 0, 1], [5, 3, 4]]])
    r = evaluate_episodes(x, y, ep, n_shot=1)
    assert r.accuracies.tolist() == [100.0, 100.0, 100.0]
    # Move B2=(0.6,0.8) to (0.8,0.5) (still labelled B): in episode 1 it is now closer to A: 75%
    x2 = x.clone()
    x2[5] = torch.tensor([0.8, 0.5])
    r2 = evaluate_episodes(x2, y, ep[:1], n_shot=1)
    assert r2.accuracies.tolist() == [75.0]
    # mean/ci95 of [100, 75]: mean 87.5, population std 12.5, ci = 1.96*12.5/sqrt(2) = 17.3241
    r3 = evaluate_episodes(x2, y, torch.cat([ep[:1], ep[:1]]), n_shot=1)
    assert r3.accuracies.tolist() == [75.0, 75.0]
    both = evaluate_episodes(torch.cat([x, x2]), torch.cat([y, y + 2]),
                             torch.cat([ep[:1], ep[:1] + 6]), n_shot=1)
    assert both.accuracies.tolist() == [100.0, 75.0]
    assert both.mean == pytest.approx(87.5)
    assert both.ci95 == pytest.approx(1.96 * 12.5 / math.sqrt(2))


def test_evaluate_rejects_mismatched_episodes():
    x, y = _blobs()
    ep = sample_episodes(y, 5, 1, 3, 4)
    bad = ep.clone()
    bad[0, 0, 1] = bad[0, 1, 1]
    with pytest.raises(ValueError, match="mixes classes"):
        evaluate_episodes(x, y, bad, 1)
    with pytest.raises(ValueError, match="unknown classifier"):
        evaluate_episodes(x, y, ep, 1, classifier="svm")


# ---------------------------------------------------------------------------------- vs loops
def _reference_prototype_loop(x, y, ep, S):
    """Shaped like SMKD's fseval: class -> list of vectors, stack, prototype means, cosine, argmax."""
    accs = []
    for e in ep:
        z = torch.stack([torch.stack([x[i] for i in way]) for way in e])     # (W, S+Q, D)
        proto = z[:, :S].mean(1)
        q = z[:, S:].reshape(-1, z.shape[-1])
        cos = (q @ proto.T) / (q.norm(dim=1)[:, None] * proto.norm(dim=1)[None])
        tgt = torch.arange(z.shape[0]).repeat_interleave(z.shape[1] - S)
        accs.append((cos.argmax(1) == tgt).double().mean().item() * 100)
    return torch.tensor(accs, dtype=torch.float64)


@pytest.mark.parametrize("S,nq", [(1, 5), (5, 7), (1, "all"), (5, "all")])
def test_prototype_matches_loop_both_strategies(S, nq):
    x, y = _blobs()
    ep = sample_episodes(y, 5, S, nq, 120, seed=1)
    ref = _reference_prototype_loop(x, y, ep, S)
    for strategy in ("gather", "classblock"):
        r = evaluate_episodes(x, y, ep, S, strategy=strategy, chunk=37)
        torch.testing.assert_close(r.accuracies, ref, atol=1e-9, rtol=0)    # same correct counts
    assert r.mean == pytest.approx(ref.mean().item())
    assert r.ci95 == pytest.approx(1.96 * ref.std(correction=0).item() / math.sqrt(120))


def test_logistic_solver_matches_sklearn_objective():
    sklearn = pytest.importorskip("sklearn.linear_model")
    g = torch.Generator().manual_seed(0)
    B, n, D, K = 3, 10, 40, 5
    x = F.normalize(torch.randn(B, n, D, generator=g, dtype=torch.float64) + 0.5, dim=-1)
    y = torch.arange(K).repeat(n // K).expand(B, n)
    W, b = fit_logistic_batched(x, y, K, C=1.0, tol=1e-10)
    for i in range(B):
        m = sklearn.LogisticRegression(C=1.0, tol=1e-12, max_iter=10000).fit(x[i].numpy(), y[i].numpy())
        np.testing.assert_allclose(W[i].numpy(), m.coef_, atol=1e-5)
        np.testing.assert_allclose(b[i].numpy(), m.intercept_ - m.intercept_.mean(), atol=1e-5)


@pytest.mark.parametrize("S", [1, 5])
def test_logistic_episodes_vs_sklearn_loop(S):
    sklearn = pytest.importorskip("sklearn.linear_model")
    x, y = _blobs()
    ep = sample_episodes(y, 5, S, 10, 30, seed=2)
    r = evaluate_episodes(x, y, ep, S, classifier="logistic")
    xn = F.normalize(x, dim=1).numpy()
    accs = []
    for e in ep.numpy():
        m = sklearn.LogisticRegression().fit(xn[e[:, :S].reshape(-1)], np.arange(5).repeat(S))
        accs.append((m.predict(xn[e[:, S:].reshape(-1)]) == np.arange(5).repeat(10)).mean() * 100)
    assert abs(r.mean - float(np.mean(accs))) < 0.5


def _reference_cosine_classifier(x, y, n_way, v0, perms, epochs=301, bs=4):
    """Per-episode torch loop shaped like SMKD's distLinear training (weight norm, SGD, batches of 4)."""
    D = x.shape[1]
    lin = torch.nn.Linear(D, n_way, bias=False)
    lin = torch.nn.utils.parametrizations.weight_norm(lin, dim=0)
    with torch.no_grad():
        lin.parametrizations.weight.original1.copy_(v0)
        lin.parametrizations.weight.original0.copy_(v0.norm(dim=1, keepdim=True))
    opt = torch.optim.SGD(lin.parameters(), lr=0.01, momentum=0.9, dampening=0.9, weight_decay=1e-3)
    xh = x / (x.norm(dim=1, keepdim=True) + 1e-5)
    for ep in range(epochs):
        perm = perms[ep]
        for s in range(0, x.shape[0], bs):
            idx = perm[s:s + bs]
            loss = F.cross_entropy(2.0 * lin(xh[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return lin


def test_cosine_classifier_matches_per_episode_loop():
    x, y = _blobs(D=24)
    S, W, epochs = 2, 5, 40
    ep = sample_episodes(y, W, S, 8, 4, seed=5)
    B, n, D = 4, W * S, x.shape[1]
    sup = x[ep[..., :S].reshape(B, n)]
    ys = torch.arange(W).repeat_interleave(S).expand(B, n)
    w = fit_cosine_classifier(sup, ys, W, [block_generator(11, 0)], epochs=epochs)
    # replay the same random draws for the loop: init (B, W, D), then one (B, n) permutation per epoch
    gen = block_generator(11, 0)
    v0 = (torch.rand(B, W, D, generator=gen) * 2 - 1) / math.sqrt(D)
    perms = [torch.rand(B, n, generator=gen).argsort(dim=1) for _ in range(epochs)]
    q = x[ep[..., S:].reshape(B, -1)]
    agree, total = 0, 0
    for i in range(B):
        lin = _reference_cosine_classifier(sup[i], ys[i], W, v0[i], [p[i] for p in perms], epochs)
        with torch.no_grad():
            w_ref = 2.0 * lin.weight                                          # scale·g·v̂
        torch.testing.assert_close(w[i], w_ref, atol=2e-4, rtol=2e-3)
        p_ref = (F.normalize(q[i], dim=1) @ w_ref.T).argmax(1)
        p_bat = (F.normalize(q[i], dim=1) @ w[i].T).argmax(1)
        agree += int((p_ref == p_bat).sum())
        total += p_ref.numel()
    assert agree == total


def test_cosine_classifier_episodes_within_half_point_of_loop():
    x, y = _blobs(D=16, sep=0.5)
    S, W = 1, 5
    B, n, D, epochs = 8, W * S, x.shape[1], 100
    ep = sample_episodes(y, W, S, 10, B, seed=9)
    r = evaluate_episodes(x, y, ep, S, classifier="cosine_classifier", seed=4, epochs=epochs)
    gen = block_generator(4, 0)
    v0 = (torch.rand(B, W, D, generator=gen) * 2 - 1) / math.sqrt(D)
    perms = [torch.rand(B, n, generator=gen).argsort(dim=1) for _ in range(epochs)]
    accs = []
    for i in range(B):
        sup = x[ep[i, :, :S].reshape(-1)]
        lin = _reference_cosine_classifier(sup, torch.arange(W).repeat_interleave(S), W, v0[i],
                                           [p[i] for p in perms], epochs)
        with torch.no_grad():
            pred = lin(F.normalize(x[ep[i, :, S:].reshape(-1)], dim=1)).argmax(1)
        accs.append((pred == torch.arange(W).repeat_interleave(10)).double().mean().item() * 100)
    assert abs(r.mean - float(np.mean(accs))) < 0.5
    # and the result is reproducible
    again = evaluate_episodes(x, y, ep, S, "cosine_classifier", seed=4, epochs=epochs)
    assert torch.equal(r.accuracies, again.accuracies)


def test_scoring_strategies_break_exact_ties_like_argmax():
    """Integer rows and scorers make every score exact, with many exact ties between ways: both
    strategies must count a query correct only when torch.argmax (first index) picks its way."""
    from kdforge.eval.fewshot import _class_table, _correct_classblock, _correct_gather, _scorer_recheck
    g = torch.Generator().manual_seed(0)
    C, n, D, W, E = 6, 5, 3, 4, 50
    x = torch.randint(0, 2, (C * n, D), generator=g).float()
    y = torch.arange(C).repeat_interleave(n)
    ep = sample_episodes(y, W, 1, "all", E, seed=3)
    queries = ep[..., 1:]
    w = torch.randint(0, 2, (E, W, D), generator=g).float()
    w[:, 1] = w[:, 0]                                       # ways 0 and 1 always tie exactly
    b = torch.zeros(E, W)
    _, inv, counts, table, pos = _class_table(y)
    ep_cls = inv[ep[..., 0]]
    one = torch.ones(x.shape[0])                            # raw rows (argmax is scale-free with b = 0)
    recheck = _scorer_recheck(x, w, b)
    got_c = _correct_classblock(x, one, queries, w, b, ep_cls, table, counts.tolist(), pos, recheck)
    got_g = _correct_gather(x, one, queries, w, b, recheck)
    scores = torch.einsum("ewqd,evd->ewqv", x[queries], w)  # (E, W, Q, W)
    ref = (scores.argmax(-1) == torch.arange(W)[None, :, None]).sum((1, 2))
    assert int((scores[..., 0] == scores[..., 1]).sum()) > 0   # the ties do occur
    assert torch.equal(got_c, ref)
    assert torch.equal(got_g, ref)


@pytest.mark.parametrize("repeat", [1, 2])
@pytest.mark.parametrize("strategy", ["gather", "classblock"])
def test_prototype_near_ties_are_decided_in_exact_arithmetic(strategy, repeat):
    """Queries placed within ~1e-8 of the bisector of two prototypes: float32 scoring gets some of them
    wrong (checked), kdforge must return the decisions of float64 (exact) arithmetic on the same rows."""
    g = torch.Generator().manual_seed(0)
    D, Q = 64, 200
    u, v = torch.randn(2, D, generator=g, dtype=torch.float64)
    u, v = u.float().double(), v.float().double()                     # exactly representable supports
    d = F.normalize(u, dim=0) - F.normalize(v, dim=0)
    r = torch.randn(2 * Q, D, generator=g, dtype=torch.float64) + 2 * (u + v)
    r = r - (r @ d)[:, None] * d / (d @ d) + 1e-9 * torch.randn(2 * Q, 1, generator=g, dtype=torch.float64) * d
    x = torch.cat([u[None], r[:Q], v[None], r[Q:]]).float()             # class 0: u + Q rows, class 1: v + Q rows
    y = torch.arange(2).repeat_interleave(Q + 1)
    ep = torch.stack([torch.arange(Q + 1), torch.arange(Q + 1, 2 * Q + 2)])[None]      # (1, 2, 1 + Q)
    if repeat > 1:          # every query listed twice: each near-tie's correction must count twice
        ep = torch.cat([ep[..., :1]] + [ep[..., 1:]] * repeat, -1)

    def decide(feats):
        p = F.normalize(feats[ep[0, :, 0]], dim=-1)
        q = F.normalize(feats[ep[0, :, 1:].reshape(-1)], dim=-1)
        return (q @ p.T).argmax(1) == torch.arange(2).repeat_interleave(Q * repeat)

    exact, fp32 = decide(x.double()), decide(x)
    assert bool((exact != fp32).any())                                   # float32 alone does flip some
    r_ = evaluate_episodes(x, y, ep, 1, strategy=strategy)
    assert r_.accuracies[0].item() == pytest.approx(100.0 * exact.double().mean().item(), abs=1e-12)


def test_single_thread_only_when_cores_are_busy(monkeypatch):
    import kdforge.eval._common as common
    n0 = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        t = torch.zeros(1)
        monkeypatch.setattr(common, "_cores_busy", lambda: True)
        with common.single_thread(t):
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
        monkeypatch.setattr(common, "_cores_busy", lambda: False)
        with common.single_thread(t):
            assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(n0)


def test_strategies_agree_when_every_score_ties_exactly():
    """Identical rows: the logistic scorers are all zero (so is the near-tie margin) and every score
    ties; argmax picks way 0, and both strategies must count exactly that (classblock once said 0 %)."""
    labels = torch.tensor([0] * 4 + [1] * 4)
    feats = torch.ones(8, 3)
    ep = torch.tensor([[[0, 1, 2, 3], [4, 5, 6, 7]]])                # 1 shot, 3 queries per way
    got = {st: evaluate_episodes(feats, labels, ep, 1, "logistic", strategy=st).accuracies.tolist()
           for st in ("gather", "classblock")}
    assert got["gather"] == got["classblock"] == [50.0]
