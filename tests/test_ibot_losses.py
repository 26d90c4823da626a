"""DINO [CLS] / iBOT MIM losses, centring and teacher temperature: golden values and reference loops."""
import math

import pytest
import torch
import torch.nn.functional as F

from kdforge.losses.dino import (IBOTLoss, center_update_, dino_cls_loss, ibot_mim_loss, teacher_probs,
                                 teacher_temperature)

LN2, LN3, LN4 = math.log(2), math.log(3), math.log(4)


def test_teacher_temperature_schedule():
    # linspace(0.04, 0.07, 30)[e] = 0.04 + 0.03·e/29
    assert teacher_temperature(0, 0.04, 0.07, 30) == pytest.approx(0.04)
    assert teacher_temperature(3, 0.04, 0.07, 30) == pytest.approx(0.04 + 0.03 * 3 / 29)  # 0.0431034
    assert teacher_temperature(29, 0.04, 0.07, 30) == pytest.approx(0.07)
    assert teacher_temperature(30, 0.04, 0.07, 30) == pytest.approx(0.07)
    assert teacher_temperature(500, 0.04, 0.07, 30) == pytest.approx(0.07)
    # start_epoch holds the warm-up value first: epochs 0, 1 -> 0.04; epoch 3 is warm-up epoch 1
    assert teacher_temperature(1, 0.04, 0.07, 30, start_epoch=2) == pytest.approx(0.04)
    assert teacher_temperature(3, 0.04, 0.07, 30, start_epoch=2) == pytest.approx(0.04 + 0.03 / 29)
    # no warm-up
    assert teacher_temperature(0, 0.04, 0.07, 0) == pytest.approx(0.07)
    # monotone between the ends
    vals = [teacher_temperature(e, 0.04, 0.07, 30) for e in range(40)]
    assert all(a <= b for a, b in zip(vals, vals[1:]))


def test_teacher_probs_centre_and_temperature():
    # t = [2, 1], c = [1, 1] -> [1, 0]; τ = 0.5 -> softmax([2, 0]) = [e²/(e²+1), 1/(e²+1)] = [0.8807971, 0.1192029]
    p = teacher_probs(torch.tensor([[2.0, 1.0]]), torch.tensor([[1.0, 1.0]]), 0.5)
    assert torch.allclose(p, torch.tensor([[0.8807971, 0.1192029]]), atol=1e-6)
    assert not p.requires_grad


def test_dino_cls_loss_golden():
    # B = 1, G = 2, V = 3, K = 2, τ_s = 1. T0 = [1, 0], T1 = [½, ½].
    # log_softmax: S0 = [0,0] -> [-ln2, -ln2]; S1 = [ln3, 0] -> [ln¾, ln¼]; S2 = [0, ln3] -> [ln¼, ln¾]
    # pairs (q, v≠q): H(T0,S1) = -ln¾ = 0.2876821, H(T0,S2) = ln4 = 1.3862944,
    #                 H(T1,S0) = ln2 = 0.6931472, H(T1,S2) = ½(ln4 - ln¾) = 0.8369882
    # sum = 3.2041119, / (G·(V-1)·B = 4) = 0.8010280
    s = torch.tensor([[0.0, 0.0], [LN3, 0.0], [0.0, LN3]])
    t = torch.tensor([[1.0, 0.0], [0.5, 0.5]])
    assert dino_cls_loss(s, t, n_global=2, student_temp=1.0).item() == pytest.approx(0.8010280, abs=1e-6)


def test_dino_cls_loss_matches_loop():
    torch.manual_seed(0)
    G, L, B, K = 2, 4, 3, 7
    s = torch.randn((G + L) * B, K)
    t = torch.randn(G * B, K).softmax(-1)
    ref, n = 0.0, 0
    for q in range(G):
        for v in range(G + L):
            if v == q:
                continue
            for b in range(B):
                ref += -(t[q * B + b] * F.log_softmax(s[v * B + b] / 0.1, -1)).sum()
                n += 1
    assert dino_cls_loss(s, t, G, 0.1).item() == pytest.approx((ref / n).item(), rel=1e-5)


def test_ibot_mim_loss_golden():
    # G·B = 2 images, N = 2, K = 2, τ_s = 1. Image 0 fully masked, image 1 unmasked.
    # image 0: H([1,0], [0,0]) = ln2 = 0.6931472; H([0,1], [ln3,0]) = -ln¼ = 1.3862944 -> mean 1.0397208
    # image 1: no masked patch -> 0 (count clamped to 1)
    # all_images: (1.0397208 + 0) / 2 = 0.5198604; masked_images: 1.0397208
    z = torch.tensor([[[0.0, 0.0], [LN3, 0.0]], [[0.0, 0.0], [0.0, 0.0]]])
    p = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[0.5, 0.5], [0.5, 0.5]]])
    m = torch.tensor([[True, True], [False, False]])
    assert ibot_mim_loss(z, p, m, 1.0).item() == pytest.approx(0.5198604, abs=1e-6)
    assert ibot_mim_loss(z, p, m, 1.0, average="masked_images").item() == pytest.approx(1.0397208, abs=1e-6)
    # nothing masked anywhere: exactly 0, never NaN
    zero = ibot_mim_loss(z, p, torch.zeros(2, 2, dtype=torch.bool), 1.0, average="masked_images")
    assert zero.item() == 0.0


def test_ibot_mim_loss_matches_loop_and_grid_masks():
    torch.manual_seed(1)
    R, h, w, K = 4, 3, 3, 5
    z, p = torch.randn(R, h * w, K), torch.randn(R, h * w, K).softmax(-1)
    m = torch.rand(R, h, w) > 0.5
    m[2] = False
    ref = 0.0
    for r in range(R):
        mm = m[r].flatten()
        ce = -(p[r] * F.log_softmax(z[r] / 0.1, -1)).sum(-1)
        ref += (ce * mm).sum() / max(1, int(mm.sum()))
    assert ibot_mim_loss(z, p, m, 0.1).item() == pytest.approx((ref / R).item(), rel=1e-5)


def test_center_update_golden():
    # c = 0, rows [[1,2],[3,4]] -> mean [2,3]; c ← 0.9·0 + 0.1·[2,3] = [0.2, 0.3]; again: 0.9·[.2,.3] + [.2,.3] = [.38,.57]
    c = torch.zeros(1, 2)
    rows = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    center_update_(c, rows, 0.9)
    assert torch.allclose(c, torch.tensor([[0.2, 0.3]]))
    center_update_(c, rows, 0.9)
    assert torch.allclose(c, torch.tensor([[0.38, 0.57]]))
    # patch centre (1,1,K): mean over rows and tokens
    c2 = torch.zeros(1, 1, 2)
    center_update_(c2, torch.tensor([[[1.0, 1.0], [3.0, 5.0]]]), 0.5)   # mean [2, 3] -> 0.5·[2,3]
    assert torch.allclose(c2, torch.tensor([[[1.0, 1.5]]]))


def test_ibot_loss_module_uses_old_centre_then_updates():
    torch.manual_seed(2)
    G, L, B, N, K = 2, 2, 3, 4, 6
    loss = IBOTLoss(K, n_global=2, warmup_teacher_temp_epochs=5)
    loss.center.fill_(0.3)
    s_cls, s_patch = torch.randn((G + L) * B, K, requires_grad=True), torch.randn(G * B, N, K, requires_grad=True)
    t_cls, t_patch = torch.randn(G * B, K), torch.randn(G * B, N, K)
    masks = torch.rand(G * B, N) > 0.3
    out = loss(s_cls, s_patch, t_cls, t_patch, masks, epoch=2)
    tau = 0.04 + 0.03 * 2 / 4
    t = F.softmax((t_cls - 0.3) / tau, -1)
    p = F.softmax(t_patch / tau, -1)
    assert out["cls"].item() == pytest.approx(dino_cls_loss(s_cls, t, 2, 0.1).item(), rel=1e-5)
    assert out["mim"].item() == pytest.approx(ibot_mim_loss(s_patch, p, masks, 0.1).item(), rel=1e-5)
    assert torch.allclose(loss.center, 0.9 * 0.3 + 0.1 * t_cls.mean(0, keepdim=True), atol=1e-6)
    assert torch.allclose(loss.center2, 0.1 * t_patch.mean((0, 1)).view(1, 1, K), atol=1e-6)
    out["loss"].backward()
    assert s_cls.grad.abs().sum() > 0 and s_patch.grad.abs().sum() > 0
    # eval mode leaves the centres alone
    loss.eval()
    before = loss.center.clone()
    loss(s_cls, s_patch, t_cls, t_patch, masks, epoch=2)
    assert torch.equal(before, loss.center)
