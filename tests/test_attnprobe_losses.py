"""Golden values of the probe loss (both normalisations) and DFND's noise adaptation."""
import math

import pytest
import torch

from kdforge.losses.probe import NoiseAdaptation, noise_adaptation_matrix, probe_loss, probe_rows


# -- probe loss ------------------------------------------------------------------------------------

def test_probe_loss_golden_both_normalisations():
    # spec C4: L = B = 1, N = C = 2, T = [[1,0],[0,1]], S = [[1,0],[1,0]]
    # channel: rows are unit; r_T = <[1,0],[0,1]> = 0, r_S = <[1,0],[1,0]> = 1 -> (0 - 1)² = 1.0
    # token: columns normalised; T unchanged (r_T = 0); S col0 [1,1] -> [1/√2, 1/√2], col1 [0,0] stays 0
    #        -> S^ = [[1/√2, 0], [1/√2, 0]], r_S = 1/2 -> (0 - 1/2)² = 0.25
    t = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]]])
    s = torch.tensor([[[[1.0, 0.0], [1.0, 0.0]]]])
    assert probe_loss(t, s, normalize="channel").item() == pytest.approx(1.0)
    assert probe_loss(t, s, normalize="token").item() == pytest.approx(0.25)
    assert probe_loss(t, s).item() == pytest.approx(1.0)  # channel is the default
    assert probe_loss(t, t, normalize="token").item() == 0.0


def test_probe_loss_second_golden_mean_over_layers_tokens():
    # L = 2, B = 1, N = 3 (CLS + 2 patches), C = 2, channel normalisation.
    # layer 0: T cls [1,0], patches [1,0],[0,1] -> r_T = [1, 0];  S cls [0,1], patches [0,1],[0,1] -> r_S = [1, 1]
    # layer 1: identical teacher and student -> 0.  L = ((1-1)² + (0-1)² + 0 + 0) / (2·1·2) = 0.25
    t0 = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    s0 = torch.tensor([[0.0, 1.0], [0.0, 1.0], [0.0, 1.0]])
    t = [t0[None], t0[None]]
    s = [s0[None], t0[None]]
    assert probe_loss(t, s).item() == pytest.approx(0.25)


def test_probe_rows_reference_loop_and_width_mismatch():
    g = torch.Generator().manual_seed(0)
    ft = torch.randn(3, 2, 5, 8, generator=g)
    fs = torch.randn(3, 2, 5, 4, generator=g)    # C_T = 8 ≠ C_S = 4 is fine
    for norm in ("channel", "token"):
        r = probe_rows(ft, norm)
        assert r.shape == (3, 2, 4)
        for l in range(3):
            for b in range(2):
                f = ft[l, b]
                fh = f / f.norm(dim=1, keepdim=True) if norm == "channel" else f / f.norm(dim=0, keepdim=True)
                ref = torch.stack([fh[0] @ fh[j] for j in range(1, 5)])
                assert torch.allclose(r[l, b], ref, atol=1e-5)
        rs = probe_rows(fs, norm)
        assert torch.allclose(probe_loss(ft, fs, norm), ((r - rs) ** 2).mean())
    # channel rows are cosines in [-1, 1]
    assert probe_rows(ft * 100, "channel").abs().max() <= 1 + 1e-5


def test_probe_loss_grad_only_to_student_and_shape_errors():
    t = torch.randn(2, 2, 5, 8, requires_grad=True)
    s = torch.randn(2, 2, 5, 4, requires_grad=True)
    probe_loss(t, s).backward()
    assert t.grad is None and s.grad is not None and s.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="same L, B and N"):
        probe_loss(torch.randn(2, 2, 5, 8), torch.randn(2, 2, 6, 8))
    with pytest.raises(ValueError, match="normalize"):
        probe_loss(torch.randn(1, 1, 3, 2), torch.randn(1, 1, 3, 2), normalize="batch")


# -- noise adaptation ------------------------------------------------------------------------------

def test_noise_matrix_at_zero_theta():
    # spec C7: K = 3, a = 0.9 -> diagonal 0.9, off-diagonal (1 - 0.9)/2 = 0.05
    q = noise_adaptation_matrix(torch.zeros(3, 2), 0.9)
    ref = torch.tensor([[0.9, 0.05, 0.05], [0.05, 0.9, 0.05], [0.05, 0.05, 0.9]])
    assert torch.allclose(q, ref)
    # a = 1: identity
    assert torch.allclose(noise_adaptation_matrix(torch.zeros(4, 3), 1.0), torch.eye(4))
    # K = 10, a = 0.9665 (CIFAR-10 teacher): off = 0.0335 / 9
    q10 = noise_adaptation_matrix(torch.zeros(10, 9), 0.9665)
    assert torch.allclose(q10.diagonal(), torch.full((10,), 0.9665))
    assert torch.allclose(q10[0, 1:], torch.full((9,), 0.0335 / 9))


def test_noise_matrix_matches_reference_loop():
    g = torch.Generator().manual_seed(0)
    theta = torch.randn(5, 4, generator=g)
    a = 0.7
    q = noise_adaptation_matrix(theta, a)
    ref = torch.zeros(5, 5)
    for i in range(5):  # columns in increasing order, skipping i
        sm = torch.softmax(theta[i], 0) * (1 - a)
        cols = [j for j in range(5) if j != i]
        for k, j in enumerate(cols):
            ref[i, j] = sm[k]
        ref[i, i] = a
    assert torch.allclose(q, ref, atol=1e-7)
    assert torch.allclose(q.sum(1), torch.ones(5))


def test_noise_adaptation_loss_golden_and_grad():
    na = NoiseAdaptation(3, teacher_acc=0.9)
    # softmax([1,0,0]) = [e, 1, 1]/(e+2) = [0.576117, 0.211942, 0.211942]
    # (p·Q)_0 = 0.9·0.576117 + 0.05·(0.211942·2) = 0.518505 + 0.021194 = 0.539699 -> -ln = 0.6167431
    loss = na(torch.tensor([[1.0, 0.0, 0.0]]), torch.tensor([0]))
    assert loss.item() == pytest.approx(0.6167431, abs=1e-6)
    loss.backward()
    assert na.theta.grad is not None and na.theta.grad.abs().sum() > 0
    # mean over the batch
    two = na(torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]]), torch.tensor([0, 2]))
    assert two.item() == pytest.approx((0.6167431 + -math.log(1 / 3)) / 2, abs=1e-6)  # uniform p: (pQ)_2 = 1/3
    with pytest.raises(ValueError):
        NoiseAdaptation(3, teacher_acc=0.0)
