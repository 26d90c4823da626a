"""VkD feature loss and normalisations: golden values, reference loops, masks, gradient flow."""
import functools
import math

import pytest
import torch
import torch.nn.functional as F

from kdforge.align.norms import channel_standardize, layer_norm_features, normalize_features
from kdforge.align.orthogonal import OrthogonalProjector
from kdforge.losses.kd import kd_kl
from kdforge.losses.vkd import pool_map, pool_tokens, vkd_feature_loss


def test_vkd_feature_loss_hand_golden():
    # W = eye(3, 2) pads the 2-d student with a zero; teacher rows are LayerNorm'd (eps 1e-5).
    # row 0: t = (1,2,3): mean 2, biased var 2/3, 1/sqrt(2/3 + 1e-5) = 1.2247357 -> t̂ = (-1.2247357, 0, 1.2247357)
    #        P s = (1, 0, 0); d = (2.2247357, 0, -1.2247357); |d| >= 1 -> |d| - 0.5:
    #        1.7247357 + 0 + 0.7247357 = 2.4494714
    # row 1: t = (3,1,2) -> t̂ = (1.2247357, -1.2247357, 0); P s = (0.5, -0.5, 0)
    #        d = (-0.7247357, 0.7247357, 0); |d| < 1 -> d²/2 = 0.2626209 each -> 0.5252418
    # mean over 6 elements: (2.4494714 + 0.5252418) / 6 = 0.4957855
    s = torch.tensor([[1.0, 0.0], [0.5, -0.5]])
    t = torch.tensor([[1.0, 2.0, 3.0], [3.0, 1.0, 2.0]])
    W = torch.eye(3, 2)
    assert vkd_feature_loss(s, t, W).item() == pytest.approx(0.4957855, abs=1e-6)
    # the same with a module projector whose weight is eye(3, 2)
    lin = torch.nn.Linear(2, 3, bias=False)
    with torch.no_grad():
        lin.weight.copy_(W)
    assert vkd_feature_loss(s, t, lin).item() == pytest.approx(0.4957855, abs=1e-6)
    # norm="none": d = (0,-2,-3), (-2.5,-1.5,-2): 0 + 1.5 + 2.5 + 2 + 1 + 1.5 = 8.5 -> 8.5/6
    assert vkd_feature_loss(s, t, W, norm="none").item() == pytest.approx(8.5 / 6, abs=1e-6)


def test_vkd_reference_conformance_c2_pooled_classification():
    # vkd.md §6 C2 [verified against the reference]: patches[b,n,c] = (12b+4n+c)/10,
    # f_T = sin(arange(48)).reshape(2,6,2,2), W = eye(6,4) -> 0.7871564
    b = torch.arange(2)[:, None, None]
    n = torch.arange(3)[None, :, None]
    c = torch.arange(4)[None, None, :]
    patches = (12 * b + 4 * n + c).float() / 10
    f_t = torch.sin(torch.arange(48.0)).reshape(2, 6, 2, 2)
    loss = vkd_feature_loss(pool_tokens(patches), pool_map(f_t), torch.eye(6, 4))
    assert loss.item() == pytest.approx(0.7871564, abs=1e-6)


def test_vkd_reference_conformance_c11_dense_both_sides():
    # vkd.md §6 C11: both sides standardised per channel with the unbiased std and no eps -> 0.6184040
    s = torch.cos(torch.arange(20.0)).reshape(5, 4)
    t = torch.sin(0.7 * torch.arange(20.0)).reshape(5, 4)
    ref = functools.partial(channel_standardize, eps=0.0, unbiased=True)
    assert vkd_feature_loss(s, t, None, norm=ref, student_norm=ref).item() == pytest.approx(0.6184040, abs=1e-6)
    # our default adds eps=1e-5 to the biased variance: finite on a constant column
    t_const = t.clone()
    t_const[:, 2] = 3.0
    out = vkd_feature_loss(s, t_const, None, norm="channel", student_norm="channel")
    assert torch.isfinite(out)
    assert torch.isnan(vkd_feature_loss(s, t_const, None, norm=ref, student_norm=ref))


def test_logit_kd_conformance_c3():
    # vkd.md §6 C3: KLDiv(batchmean) at T = 1 -> 0.4777622
    ys = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 1.0]])
    yt = torch.tensor([[0.5, 1.5, 0.0], [2.0, 0.0, -1.0]])
    assert kd_kl(ys, yt, temperature=1.0).item() == pytest.approx(0.4777622, abs=1e-6)


def test_norms_against_reference_loops():
    torch.manual_seed(0)
    x = torch.randn(3, 4, 5) * 3 + 1
    ln = layer_norm_features(x)
    cs = channel_standardize(x, eps=1e-5)
    for i in range(3):
        for j in range(4):
            row = x[i, j]
            mu = sum(row.tolist()) / 5
            var = sum((v - mu) ** 2 for v in row.tolist()) / 5
            ref = [(v - mu) / math.sqrt(var + 1e-5) for v in row.tolist()]
            assert torch.allclose(ln[i, j], torch.tensor(ref), atol=1e-5)
    rows = x.reshape(12, 5)
    for c in range(5):
        col = rows[:, c].tolist()
        mu = sum(col) / 12
        var = sum((v - mu) ** 2 for v in col) / 12
        ref = [(v - mu) / math.sqrt(var + 1e-5) for v in col]
        assert torch.allclose(cs.reshape(12, 5)[:, c], torch.tensor(ref), atol=1e-5)
    assert torch.equal(normalize_features(x, "none"), x)
    assert torch.equal(normalize_features(x, "layernorm"), ln)
    with pytest.raises(ValueError, match="expected one of"):
        normalize_features(x, "batch")


def test_channel_standardize_mask_uses_valid_rows_only():
    # column values 1, 3 valid, 100 padded: mean 2, biased var 1 -> valid rows -> -1/sqrt(1+eps), +1/sqrt(1+eps)
    x = torch.tensor([[1.0], [3.0], [100.0]])
    mask = torch.tensor([True, True, False])
    out = channel_standardize(x, eps=1e-5, mask=mask)
    k = 1 / math.sqrt(1 + 1e-5)
    assert out[0, 0].item() == pytest.approx(-k, abs=1e-6) and out[1, 0].item() == pytest.approx(k, abs=1e-6)
    with pytest.raises(ValueError, match="mask"):
        channel_standardize(x, mask=torch.ones(2, dtype=torch.bool))
    # masked loss == loss on the valid rows alone
    torch.manual_seed(1)
    s, t = torch.randn(6, 3), torch.randn(6, 3)
    m = torch.tensor([True, False, True, True, False, True])
    full = vkd_feature_loss(s, t, None, norm="channel", student_norm="channel", mask=m)
    sub = vkd_feature_loss(s[m], t[m], None, norm="channel", student_norm="channel")
    assert full.item() == pytest.approx(sub.item(), abs=1e-6)


def test_gradient_reaches_projector_and_student_not_teacher():
    torch.manual_seed(2)
    proj = OrthogonalProjector(8, 20)
    tokens = torch.randn(4, 5, 8, requires_grad=True)
    fmap = torch.randn(4, 20, 3, 3, requires_grad=True)
    loss = vkd_feature_loss(pool_tokens(tokens), pool_map(fmap), proj)
    loss.backward()
    assert tokens.grad is not None and tokens.grad.abs().sum() > 0
    assert proj.raw.grad is not None and proj.raw.grad.abs().sum() > 0
    assert fmap.grad is None  # the teacher is a detached target
    # matches a straightforward reference: smooth_l1(s Wᵀ, layer_norm(t))
    with torch.no_grad():
        s, t = pool_tokens(tokens), pool_map(fmap)
        ref = F.smooth_l1_loss(s @ proj.weight.T, F.layer_norm(t, (20,)), beta=1.0)
    assert loss.item() == pytest.approx(ref.item(), abs=1e-6)


def test_shape_errors_are_clear():
    with pytest.raises(ValueError, match="leading"):
        vkd_feature_loss(torch.randn(3, 4), torch.randn(2, 6), torch.eye(6, 4))
    with pytest.raises(ValueError, match="output width"):
        vkd_feature_loss(torch.randn(3, 4), torch.randn(3, 7), torch.nn.Linear(4, 6))
    with pytest.raises(ValueError, match="tokens"):
        pool_tokens(torch.randn(3, 4))
