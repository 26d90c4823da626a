import math

import pytest
import torch

from kdforge.losses import kd_kl, soft_cross_entropy


def test_kd_kl_golden_value():
    # s = [0, 0], t = [ln 3, 0], T = 1: p_t = [3/4, 1/4], p_s = [1/2, 1/2]
    # KL = 3/4 ln(3/2) + 1/4 ln(1/2) = 0.130812...
    s = torch.tensor([[0.0, 0.0]])
    t = torch.tensor([[math.log(3.0), 0.0]])
    expected = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    assert kd_kl(s, t, temperature=1.0).item() == pytest.approx(expected, rel=1e-6)


def test_kd_kl_temperature_squared_and_batch_mean():
    # T = 2 on logits scaled by 2 gives the same distributions as T = 1: loss = 4 * KL above.
    # A second identical-distribution row contributes 0 and halves the batch mean.
    s = torch.tensor([[0.0, 0.0], [1.0, 2.0]])
    t = torch.tensor([[2 * math.log(3.0), 0.0], [1.0, 2.0]])
    kl = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    assert kd_kl(s, t, temperature=2.0).item() == pytest.approx(4 * kl / 2, rel=1e-6)


def test_kd_kl_zero_for_identical_and_shape_check():
    x = torch.randn(5, 7)
    assert kd_kl(x, x.clone()).item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="same classes"):
        kd_kl(torch.randn(2, 3), torch.randn(2, 4))


def test_soft_cross_entropy_equals_ce_for_one_hot():
    logits = torch.randn(4, 5)
    y = torch.tensor([0, 3, 1, 4])
    one_hot = torch.nn.functional.one_hot(y, 5).float()
    assert soft_cross_entropy(logits, one_hot).item() == pytest.approx(
        torch.nn.functional.cross_entropy(logits, y).item(), rel=1e-6)
