"""SEED loss: golden values, reference loop, temperatures."""
import math

import pytest
import torch
import torch.nn.functional as F

from kdforge.losses.seed import seed_logits, seed_loss


def test_seed_loss_golden_value():
    # queue d1 = (1,0), d2 = (0,1); teacher t = (1,0); student s = (0,1); τ_S = τ_T = 1
    # student similarities [s·t, s·d1, s·d2] = [0, 0, 1] -> log p_S = [0,0,1] - log(2 + e)
    # teacher similarities [t·t, t·d1, t·d2] = [1, 1, 0] -> p_T = [e, e, 1] / (2e + 1)
    # L = -Σ p_T log p_S = log(2 + e) - p_T[2]·1 = 1.5514447140 - 0.1553624517 = 1.3960823105
    s = torch.tensor([[0.0, 1.0]])
    t = torch.tensor([[1.0, 0.0]])
    queue = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    loss, s_logits, t_probs = seed_loss(s, t, queue, student_temperature=1.0, teacher_temperature=1.0)
    assert loss.item() == pytest.approx(1.3960823105, abs=1e-6)
    assert torch.allclose(s_logits, torch.tensor([[0.0, 0.0, 1.0]]))
    e = math.e
    assert torch.allclose(t_probs, torch.tensor([[e, e, 1.0]]) / (2 * e + 1), atol=1e-6)


def test_seed_loss_temperatures_and_sharp_teacher():
    # τ_T = 1e-4 and a teacher equal to no queue row: p_T = one-hot on the anchor (column 0),
    # so L = -log p_S[0]
    s = torch.tensor([[0.0, 1.0]])
    t = torch.tensor([[0.6, 0.8]])
    queue = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    # student logits: [s·t, s·d1, s·d2] = [0.8, 0, 1] / 0.5 = [1.6, 0, 2]
    # L = -1.6 + log(e^1.6 + 1 + e^2) = log(1 + e^-1.6 + e^0.4) = 0.9909235892
    loss, s_logits, t_probs = seed_loss(s, t, queue, student_temperature=0.5, teacher_temperature=1e-4)
    assert torch.allclose(t_probs, torch.tensor([[1.0, 0.0, 0.0]]), atol=1e-6)
    assert torch.allclose(s_logits, torch.tensor([[1.6, 0.0, 2.0]]), atol=1e-6)
    assert loss.item() == pytest.approx(0.9909235892, abs=1e-6)


def test_seed_loss_matches_reference_loop_and_grad_only_to_student():
    torch.manual_seed(0)
    n, d, k, ts, tt = 4, 6, 10, 0.2, 0.05
    s = F.normalize(torch.randn(n, d), dim=1).requires_grad_(True)
    t = F.normalize(torch.randn(n, d), dim=1).requires_grad_(True)
    queue = F.normalize(torch.randn(k, d), dim=1)
    loss, _, _ = seed_loss(s, t, queue, ts, tt)
    ref, sd, td = 0.0, s.detach(), t.detach()
    for i in range(n):
        anchors = [td[i]] + [queue[j] for j in range(k)]
        ls = [float(sd[i] @ a) / ts for a in anchors]
        lt = [float(td[i] @ a) / tt for a in anchors]
        zs = math.log(sum(math.exp(v) for v in ls))
        mt = max(lt)
        zt = sum(math.exp(v - mt) for v in lt)
        ref += -sum(math.exp(lt[j] - mt) / zt * (ls[j] - zs) for j in range(k + 1))
    assert loss.item() == pytest.approx(ref / n, rel=1e-5)
    loss.backward()
    assert s.grad is not None and t.grad is None


def test_seed_logits_shape_and_errors():
    x = F.normalize(torch.randn(3, 4), dim=1)
    assert seed_logits(x, x, torch.randn(7, 4)).shape == (3, 8)
    with pytest.raises(ValueError, match="teacher's"):
        seed_loss(torch.randn(3, 4), torch.randn(3, 5), torch.randn(7, 4))
    with pytest.raises(ValueError, match="temperatures"):
        seed_loss(x, x, torch.randn(7, 4), teacher_temperature=0.0)
