"""iBOT/SMKD optimisation details the trainer provides (spec smkd.md §1.7): per-tensor gradient clipping
and the weight-decay cosine schedule, with hand-computed values."""
import math

import pytest
import torch

from kdforge.engine.schedules import cosine_value
from kdforge.engine.trainer import clip_gradients


def _params(*grads):
    ps = []
    for g in grads:
        p = torch.nn.Parameter(torch.zeros(len(g)))
        p.grad = torch.tensor(g, dtype=torch.float32)
        ps.append(p)
    return ps


def test_per_tensor_clip_golden():
    # norms 5 and 0.5 with clip 1: the first is scaled by 1/(5+1e-6), the second is left alone
    a, b = _params([3.0, 4.0], [0.3, 0.4])
    clip_gradients([a, b], 1.0, "per_tensor")
    s = 1.0 / (5.0 + 1e-6)
    assert torch.allclose(a.grad, torch.tensor([3.0 * s, 4.0 * s]), atol=1e-7, rtol=0)
    assert torch.equal(b.grad, torch.tensor([0.3, 0.4]))


def test_global_norm_clip_differs_from_per_tensor():
    # global norm sqrt(25 + 0.25) = 5.0249: both tensors scaled by the same factor
    a, b = _params([3.0, 4.0], [0.3, 0.4])
    clip_gradients([a, b], 1.0, "norm")
    s = 1.0 / (math.sqrt(25.25) + 1e-6)
    assert torch.allclose(a.grad, torch.tensor([3.0 * s, 4.0 * s]), atol=1e-6)
    assert torch.allclose(b.grad, torch.tensor([0.3 * s, 0.4 * s]), atol=1e-6)


def test_per_tensor_clip_skips_missing_grads():
    p = torch.nn.Parameter(torch.ones(3))
    (q,) = _params([0.0, 0.0])                               # zero gradient stays zero (no 0/0)
    clip_gradients([p, q], 3.0, "per_tensor")
    assert p.grad is None and torch.equal(q.grad, torch.zeros(2))


def test_weight_decay_cosine_schedule_golden():
    # 0.04 -> 0.4 over T steps: start, quarter, middle, end and beyond
    T = 100
    assert cosine_value(0.04, 0.4, 0, T) == pytest.approx(0.04)
    assert cosine_value(0.04, 0.4, 25, T) == pytest.approx(0.4 + (0.04 - 0.4) * 0.5 * (1 + math.sqrt(0.5)))
    assert cosine_value(0.04, 0.4, 50, T) == pytest.approx(0.22)
    assert cosine_value(0.04, 0.4, 100, T) == pytest.approx(0.4)
    assert cosine_value(0.04, 0.4, 150, T) == pytest.approx(0.4)
    vals = [cosine_value(0.04, 0.4, s, T) for s in range(T + 1)]
    assert all(x <= y for x, y in zip(vals, vals[1:]))       # monotone rise
