"""SMKD losses: golden values (intended and compat reference), reference loops, empty-pair guard."""
import math

import pytest
import torch
import torch.nn.functional as F

from kdforge.losses.smkd import (SMKDLoss, same_class_pairs, smkd_cls_loss, smkd_patch_loss,
                                 smkd_patch_loss_reference)

LN2, LN3 = math.log(2), math.log(3)


def test_same_class_pairs():
    m = same_class_pairs(torch.tensor([0, 0, 1, 0]), torch.tensor([0, 0, 1, 0]))
    assert m.tolist() == [[False, True, False, True], [True, False, False, True],
                          [False, False, False, False], [True, True, False, False]]
    # teacher side gathered from 2 ranks of 2; student = rank 1 -> offset 2
    m = same_class_pairs(torch.tensor([0, 1, 0, 1]), torch.tensor([0, 1]), offset=2)
    assert m.tolist() == [[True, False], [False, True], [False, False], [False, False]]


def test_smkd_cls_loss_golden():
    # B = 3, labels [0, 0, 1]; G = 2, L = 1 (V = 3); K = 2; τ_s = 1. Same-class pairs (i, j): (0,1), (1,0) -> P = 2.
    # T_0 = [[1,0],[0,1],[½,½]], T_1 = [[0,1],[1,0],[½,½]]
    # student log-probs: uniform (-ln2 each) except S_0[1] = [ln¾, ln¼], S_1[0] = [ln¼, ln¾]; local S_2 uniform
    # global-global:
    #   (0,1): q0 T=[1,0]: S_0[1] -ln¾ = 0.2876821, S_1[1] ln2;  q1 T=[0,1]: S_0[1] -ln¼ = 1.3862944, S_1[1] ln2
    #   (1,0): q0 T=[0,1]: S_0[0] ln2, S_1[0] -ln¾ = 0.2876821;  q1 T=[1,0]: S_0[0] ln2, S_1[0] -ln¼ = 1.3862944
    #   sum = 2·0.2876821 + 2·1.3862944 + 4·ln2 = 6.1205416
    # local: G·B = 6 terms of ln2 = 4.1588831
    # denominator G·G·P + G·L·B = 8 + 6 = 14 -> (6.1205416 + 4.1588831) / 14 = 0.7342446
    labels = torch.tensor([0, 0, 1])
    t = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5], [0.0, 1.0], [1.0, 0.0], [0.5, 0.5]])
    s = torch.zeros(9, 2)
    s[1] = torch.tensor([LN3, 0.0])      # crop 0, image 1
    s[3 + 0] = torch.tensor([0.0, LN3])  # crop 1, image 0
    loss, pairs = smkd_cls_loss(s, t, labels, n_global=2, student_temp=1.0)
    assert pairs == 2
    assert loss.item() == pytest.approx(0.7342446, abs=1e-6)


def _cls_loop(s, t, labels, G, tau):
    B = labels.numel()
    V = s.shape[0] // B
    total, n = 0.0, 0
    for q in range(G):
        for v in range(G):
            for i in range(B):
                for j in range(B):
                    if i != j and labels[i] == labels[j]:
                        total += -(t[q * B + i] * F.log_softmax(s[v * B + j] / tau, -1)).sum()
                        n += 1
        for v in range(G, V):
            for b in range(B):
                total += -(t[q * B + b] * F.log_softmax(s[v * B + b] / tau, -1)).sum()
                n += 1
    return total / n


def test_smkd_cls_loss_matches_loop_and_no_pair_case():
    torch.manual_seed(0)
    G, L, B, K = 2, 3, 6, 5
    labels = torch.tensor([2, 0, 2, 1, 0, 2])
    s, t = torch.randn((G + L) * B, K), torch.randn(G * B, K).softmax(-1)
    loss, pairs = smkd_cls_loss(s, t, labels, G, 0.1)
    assert pairs == 8  # class 2: 3·2, class 0: 2·1
    assert loss.item() == pytest.approx(_cls_loop(s, t, labels, G, 0.1).item(), rel=1e-5)
    # no same-class pair: only the local terms remain, no NaN
    distinct = torch.arange(B)
    loss, pairs = smkd_cls_loss(s, t, distinct, G, 0.1)
    assert pairs == 0 and math.isfinite(loss.item())
    assert loss.item() == pytest.approx(_cls_loop(s, t, distinct, G, 0.1).item(), rel=1e-5)
    # no pair and no local crop: an exact, finite 0 that still backpropagates
    s2 = torch.randn(G * B, K, requires_grad=True)
    loss, pairs = smkd_cls_loss(s2, t, distinct, G, 0.1)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(s2.grad, torch.zeros_like(s2))


def test_smkd_cls_loss_gathered_teacher_equals_single_process():
    # 2 ranks × B = 3: rank 1's loss with the gathered teacher side equals a loop over the global batch
    # restricted to rank 1's students.
    torch.manual_seed(3)
    G, L, B, K = 2, 1, 3, 4
    y_all = torch.tensor([0, 1, 0, 1, 0, 2])
    t_all = torch.randn(2, G, B, K).softmax(-1)             # (rank, crop, image)
    s1 = torch.randn((G + L) * B, K)                        # rank 1's student rows
    t_gathered = t_all.transpose(0, 1).reshape(G * 2 * B, K)  # crop, rank, image
    loss, pairs = smkd_cls_loss(s1, t_gathered, y_all[3:], G, 0.1, teacher_labels=y_all, student_offset=3)
    total, n = 0.0, 0
    tq = t_all.transpose(0, 1).reshape(G, 2 * B, K)
    ls = F.log_softmax(s1 / 0.1, -1).view(G + L, B, K)
    for q in range(G):
        for v in range(G):
            for i in range(2 * B):
                for j in range(B):
                    if i != j + 3 and y_all[i] == y_all[3 + j]:
                        total += -(tq[q, i] * ls[v, j]).sum()
                        n += 1
        for v in range(G, G + L):
            for b in range(B):
                total += -(tq[q, 3 + b] * ls[v, b]).sum()
                n += 1
    # students are global images 3 (label 1), 4 (label 0), 5 (label 2): pairs (1,3), (0,4), (2,4) -> 3
    assert pairs == 3
    assert loss.item() == pytest.approx((total / n).item(), rel=1e-5)


def test_smkd_patch_loss_golden_intended():
    # G = 2, B = 2 (one class), N = 2, D = 2, K = 2, τ_s = 1.
    # student patches p0 = (1,0), p1 = (0,1) everywhere; teacher q0 = (0,1) -> cosine match p1; q1 = (1,.1) -> p0.
    # (channel sums tie at 1 for both student patches, so the reference rule would pick p0 for every q.)
    # targets P[t,b,q] = [1,0] except P[1,1,0] = [0,1]; student logits uniform except Z[0,0,1] = [ln3, 0].
    # terms H(P_t[b,q], Z_s[a, π(q)]):
    #   (s=0,t=1,a=0,b=1): q0 -> P[1,1,0] = [0,1] vs Z[0,0,1] -> -ln¼ = 1.3862944; q1 -> ln2
    #   (s=0,t=1,a=1,b=0): 2 × ln2;  (s=1,t=0,·,·): 4 × ln2
    # sum = 1.3862944 + 7·ln2 = 6.2383247; / (G(G-1)·pairs·N = 2·2·2 = 8) = 0.7797906
    G, B, N, K = 2, 2, 2, 2
    fS = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).expand(G * B, N, 2).clone()
    fT = torch.tensor([[0.0, 1.0], [1.0, 0.1]]).expand(G * B, N, 2).clone()
    P = torch.tensor([1.0, 0.0]).expand(G, B, N, K).clone()
    P[1, 1, 0] = torch.tensor([0.0, 1.0])
    Z = torch.zeros(G, B, N, K)
    Z[0, 0, 1] = torch.tensor([LN3, 0.0])
    labels = torch.tensor([5, 5])
    loss, pairs = smkd_patch_loss(fS, Z.view(G * B, N, K), fT, P.view(G * B, N, K), labels, G, 1.0)
    assert pairs == 2
    assert loss.item() == pytest.approx(0.7797906, abs=1e-6)


def _patch_loop(fS, Z, fT, P, labels, G, tau):
    """Straight transcription of the intended formula."""
    B = labels.numel()
    N = Z.shape[1]
    fS = F.normalize(fS, dim=-1).view(G, B, N, -1)
    fT = F.normalize(fT, dim=-1).view(G, B, N, -1)
    Z, P = Z.view(G, B, N, -1), P.view(G, B, N, -1)
    total, n = 0.0, 0
    for s in range(G):
        for t in range(G):
            if s == t:
                continue
            for a in range(B):
                for b in range(B):
                    if a == b or labels[a] != labels[b]:
                        continue
                    for q in range(N):
                        sims = torch.stack([torch.dot(fS[s, a, p], fT[t, b, q]) for p in range(N)])
                        p_star = int(sims.argmax())
                        total += -(P[t, b, q] * F.log_softmax(Z[s, a, p_star] / tau, -1)).sum()
                        n += 1
    return total / n


def test_smkd_patch_loss_matches_loop_and_grad_only_to_logits():
    torch.manual_seed(4)
    G, B, N, D, K = 2, 5, 6, 4, 7
    labels = torch.tensor([1, 0, 1, 1, 0])
    fS, fT = torch.randn(G * B, N, D, requires_grad=True), torch.randn(G * B, N, D)
    Z = torch.randn(G * B, N, K, requires_grad=True)
    P = torch.randn(G * B, N, K).softmax(-1)
    loss, pairs = smkd_patch_loss(fS, Z, fT, P, labels, G, 0.1, chunk=3)  # small chunks exercise the loop
    assert pairs == 8
    assert loss.item() == pytest.approx(_patch_loop(fS.detach(), Z.detach(), fT, P, labels, G, 0.1).item(), rel=1e-5)
    loss.backward()
    assert Z.grad.abs().sum() > 0
    assert fS.grad is None  # matching is not differentiated


def test_smkd_patch_loss_no_pair_is_zero_not_nan():
    torch.manual_seed(5)
    G, B, N, D, K = 2, 4, 3, 2, 5
    Z = torch.randn(G * B, N, K, requires_grad=True)
    args = (torch.randn(G * B, N, D), Z, torch.randn(G * B, N, D), torch.randn(G * B, N, K).softmax(-1),
            torch.arange(B), G)
    for fn in (smkd_patch_loss, smkd_patch_loss_reference):
        loss, pairs = fn(*args)
        assert pairs == 0 and loss.item() == 0.0 and not torch.isnan(loss)
        loss.backward()
        assert torch.equal(Z.grad, torch.zeros_like(Z))
        Z.grad = None


def _reference_loop(fS, Z, fT, P, labels, G, tau):
    """Transcription of the reference's behaviour (spec §2.4 steps 1-5, weighted_pool off)."""
    B = labels.numel()
    N = Z.shape[1]
    fS = F.normalize(fS, dim=-1).view(G, B, N, -1)
    fT = F.normalize(fT, dim=-1).view(G, B, N, -1)
    Z, P = Z.view(G, B, N, -1) / tau, P.view(G, B, N, -1)
    total, terms = 0.0, 0
    for s in range(G):
        for t in range(G):
            if s == t:
                continue
            for y in sorted(set(labels.tolist())):
                g = [i for i in range(B) if labels[i] == y]
                n = len(g)
                if n < 2:
                    continue
                for i in range(n):
                    acc = 0.0
                    for j in range(n):
                        if j == i:
                            continue
                        for q in range(N):
                            rho = fT[t, g[i], q].sum()
                            scores = [fS[s, g[j], p].sum() * rho for p in range(N)]
                            pi = max(range(N), key=lambda p: (scores[p], -p))  # first index on ties
                            acc += -(P[s, g[j], q] * F.log_softmax(Z[s, g[0], pi], -1)).sum()
                    total += acc / ((n - 1) * N)
                    terms += 1
    return total / terms


def test_smkd_patch_loss_reference_matches_transcription_and_differs_from_intended():
    torch.manual_seed(6)
    G, B, N, D, K = 2, 5, 4, 3, 6
    labels = torch.tensor([3, 1, 3, 1, 3])
    fS, fT = torch.randn(G * B, N, D), torch.randn(G * B, N, D)
    Z, P = torch.randn(G * B, N, K), torch.randn(G * B, N, K).softmax(-1)
    ref, terms = smkd_patch_loss_reference(fS, Z, fT, P, labels, G, 0.1)
    assert terms == 2 * (3 + 2)
    assert ref.item() == pytest.approx(_reference_loop(fS, Z, fT, P, labels, G, 0.1).item(), rel=1e-5)
    intended, _ = smkd_patch_loss(fS, Z, fT, P, labels, G, 0.1)
    assert abs(intended.item() - ref.item()) > 1e-3


def _anchor_inputs():
    """The seeded inputs of spec §5.3 (generation order matters)."""
    torch.manual_seed(0)
    s_tok, s_cls, s_patch = torch.randn(16, 10, 6), torch.randn(16, 16), torch.randn(16, 9, 16)
    torch.rand(16, 2, 10, 10)  # student attention (unused without weighted_pool)
    t_tok, t_cls, t_patch = torch.randn(16, 10, 6), torch.randn(16, 16), torch.randn(16, 9, 16)
    torch.rand(16, 2, 10, 10)  # teacher attention
    s_local = torch.randn(24, 16)
    masks = [torch.rand(8, 3, 3) > 0.5 for _ in range(5)]
    center, center2 = 0.1 * torch.randn(1, 16), 0.1 * torch.randn(1, 1, 16)
    return s_tok, s_cls, s_patch, t_tok, t_cls, t_patch, s_local, masks, center, center2


@pytest.mark.parametrize("compat", ["reference", "none"])
def test_smkd_loss_spec_anchor_values(compat):
    # spec §5.3: B = 8, G = 2, L = 3, K = 16, N = 9, labels [0,1,0,2,1,0,3,2], temperatures 0.04 -> 0.07 over
    # 30 epochs, epoch 3, λ = (1,1,1): the reference gives cls 15.731649, patch 18.084949, mim 19.781895.
    s_tok, s_cls, s_patch, t_tok, t_cls, t_patch, s_local, masks, center, center2 = _anchor_inputs()
    labels = torch.tensor([0, 1, 0, 2, 1, 0, 3, 2])
    loss = SMKDLoss(16, 16, 2, warmup_teacher_temp=0.04, teacher_temp=0.07, warmup_teacher_patch_temp=0.04,
                    teacher_patch_temp=0.07, warmup_teacher_temp_epochs=30, lambda1=1.0, lambda2=1.0,
                    lambda3=1.0, compat=compat)
    loss.center.copy_(center)
    loss.center2.copy_(center2)
    out = loss(torch.cat([s_cls, s_local]), s_patch, t_cls, t_patch, torch.cat(masks[:2]).flatten(1), 3,
               labels=labels, student_tokens=s_tok[:, 1:], teacher_tokens=t_tok[:, 1:])
    assert out["cls"].item() == pytest.approx(15.731649, abs=2e-5)
    assert out["mim"].item() == pytest.approx(19.781895, abs=2e-5)
    if compat == "reference":
        assert out["patch"].item() == pytest.approx(18.084949, abs=2e-5)
    else:  # the intended loss is a different number (cosine matching, right view and image)
        assert abs(out["patch"].item() - 18.084949) > 1e-2
    assert out["loss"].item() == pytest.approx((out["cls"] + out["patch"] + out["mim"]).item(), rel=1e-6)


def test_smkd_loss_counts_batches_without_pairs():
    torch.manual_seed(7)
    G, L, B, N, D, K = 2, 1, 4, 3, 2, 5
    loss = SMKDLoss(K, n_global=G, lambda2=1.0, lambda3=0.0, warmup_teacher_temp_epochs=2)
    s_cls = torch.randn((G + L) * B, K, requires_grad=True)
    s_patch = torch.randn(G * B, N, K, requires_grad=True)
    kw = dict(student_tokens=torch.randn(G * B, N, D), teacher_tokens=torch.randn(G * B, N, D))
    masks = torch.zeros(G * B, N, dtype=torch.bool)
    out = loss(s_cls, s_patch, torch.randn(G * B, K), torch.randn(G * B, N, K), masks, 0,
               labels=torch.arange(B), **kw)
    assert out["patch"].item() == 0.0 and out["patch_pairs"].item() == 0
    assert int(loss.empty_patch_batches) == 1 and torch.isfinite(out["loss"])
    out["loss"].backward()
    out = loss(s_cls, s_patch, torch.randn(G * B, K), torch.randn(G * B, N, K), masks, 0,
               labels=torch.tensor([0, 0, 1, 1]), **kw)
    assert out["patch_pairs"].item() == 4 and out["patch"].item() > 0
    assert int(loss.empty_patch_batches) == 1
    # without labels the patch term is 0 (phase 1 through the same module), not NaN
    out = loss(s_cls, s_patch, torch.randn(G * B, K), torch.randn(G * B, N, K), masks, 0)
    assert out["patch"].item() == 0.0 and torch.isfinite(out["loss"])


def test_smkd_loss_gathers_teacher_targets_across_ranks(monkeypatch):
    # emulate rank 1 of 2: the fake all_gather puts rank 0's (fixed) tensors before ours
    import kdforge.engine.distributed as D
    torch.manual_seed(8)
    G, L, B, K = 2, 1, 3, 5
    other_t = torch.randn(B, G, K)                  # rank 0's teacher targets, (image, crop, K) as gathered
    other_y = torch.tensor([1, 0, 2])

    def fake_gather(t):
        return torch.cat([other_y if t.dtype == torch.long else other_t, t])
    monkeypatch.setattr(D, "all_gather_cat", fake_gather)
    monkeypatch.setattr(D, "get_world_size", lambda: 2)
    monkeypatch.setattr(D, "get_rank", lambda: 1)
    loss = SMKDLoss(K, n_global=G, lambda2=0.0, lambda3=0.0, teacher_temp=0.07, warmup_teacher_temp_epochs=0)
    s_cls = torch.randn((G + L) * B, K)
    t_cls = torch.randn(G * B, K)
    y = torch.tensor([0, 1, 1])
    out = loss(s_cls, torch.randn(G * B, 2, K), t_cls, torch.randn(G * B, 2, K), torch.zeros(G * B, 2, dtype=torch.bool),
               0, labels=y)
    t_local = F.softmax(t_cls / 0.07, -1).view(G, B, K)
    t_all = torch.cat([other_t.transpose(0, 1), t_local], dim=1).reshape(G * 2 * B, K)   # crop, rank, image
    ref, pairs = smkd_cls_loss(s_cls, t_all, y, G, 0.1, teacher_labels=torch.cat([other_y, y]), student_offset=B)
    # pairs: student 0 (label 0) with rank-0 image 1; students 1, 2 (label 1) with rank-0 image 0 and each other
    assert pairs == 1 + 2 + 2 and out["cls_pairs"].item() == pairs
    assert out["cls"].item() == pytest.approx(ref.item(), rel=1e-6)
    # compat reference never gathers
    loss_ref = SMKDLoss(K, n_global=G, lambda2=0.0, lambda3=0.0, teacher_temp=0.07, warmup_teacher_temp_epochs=0,
                        compat="reference")
    out = loss_ref(s_cls, torch.randn(G * B, 2, K), t_cls, torch.randn(G * B, 2, K),
                   torch.zeros(G * B, 2, dtype=torch.bool), 0, labels=y)
    assert out["cls_pairs"].item() == 2
