"""MoCo functional core: InfoNCE golden values, the key queue, momentum update, projection heads."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kdforge.engine.ema import ema_update_
from kdforge.losses.moco import KeyQueue, moco_infonce, positive_rank_accuracy
from kdforge.models.projectors import MOCO_HEADS, MoCoHead, build_moco_head


# ------------------------------------------------------------------------------------------ InfoNCE
def test_infonce_golden_values():
    # sample 1: q=(1,0), k=(1,0)     -> l_pos = 1;   queue rows (0,1), (-1,0) -> l_neg = (0, -1)
    #           T = 0.5 -> logits (2, 0, -2); loss = log(1 + e^-2 + e^-4) = 0.1429316285
    # sample 2: q=(0,1), k=(0.6,0.8) -> l_pos = 0.8; l_neg = (1, 0)
    #           logits (1.6, 2, 0);  loss = log(1 + e^0.4 + e^-1.6) = 0.9909235892
    # mean = 0.5669276089
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    k = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    queue = torch.tensor([[0.0, 1.0], [-1.0, 0.0]])
    loss, logits = moco_infonce(q, k, queue, temperature=0.5)
    assert logits.shape == (2, 3)
    assert torch.allclose(logits, torch.tensor([[2.0, 0.0, -2.0], [1.6, 2.0, 0.0]]), atol=1e-6)
    assert loss.item() == pytest.approx(0.5669276089, abs=1e-6)


def test_infonce_matches_reference_loop_and_gradients():
    torch.manual_seed(0)
    n, d, kq, t = 5, 8, 12, 0.1
    q = F.normalize(torch.randn(n, d), dim=1).requires_grad_(True)
    k = F.normalize(torch.randn(n, d), dim=1)
    queue = F.normalize(torch.randn(kq, d), dim=1)
    loss, logits = moco_infonce(q, k, queue, temperature=t)
    ref, qd = 0.0, q.detach()
    for i in range(n):
        pos = math.exp(float(qd[i] @ k[i]) / t)
        neg = sum(math.exp(float(qd[i] @ queue[j]) / t) for j in range(kq))
        ref += -math.log(pos / (pos + neg))
    assert loss.item() == pytest.approx(ref / n, rel=1e-5)
    loss.backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()
    # keys and queue are constants: the same loss with requires_grad keys leaves them without grad
    k2 = k.clone().requires_grad_(True)
    moco_infonce(q, k2, queue, t)[0].backward()
    assert k2.grad is None


def test_infonce_shape_errors():
    with pytest.raises(ValueError, match="queue must be"):
        moco_infonce(torch.zeros(2, 4), torch.zeros(2, 4), torch.zeros(3, 5))
    with pytest.raises(ValueError, match="temperature"):
        moco_infonce(torch.zeros(2, 4), torch.zeros(2, 4), torch.zeros(3, 4), temperature=0.0)


def test_positive_rank_accuracy():
    logits = torch.tensor([[5.0, 1.0, 2.0],     # positive first -> top1 hit
                           [1.0, 3.0, 0.0],     # positive second -> top2 hit only
                           [0.0, 1.0, 2.0]])    # positive last -> top3 only
    a1, a2, a3 = positive_rank_accuracy(logits, topk=(1, 2, 3))
    assert a1.item() == pytest.approx(100 / 3)
    assert a2.item() == pytest.approx(200 / 3)
    assert a3.item() == pytest.approx(100.0)


# ------------------------------------------------------------------------------------------- queue
def test_queue_init_normalised_and_enqueue_wraps():
    torch.manual_seed(0)
    q = KeyQueue(dim=3, size=6)
    assert q.keys.shape == (6, 3) and int(q.ptr) == 0
    assert torch.allclose(q.keys.norm(dim=1), torch.ones(6), atol=1e-6)
    old = q.keys.clone()
    b1 = torch.full((2, 3), 1.0)
    q.enqueue(b1)                           # rows 0,1; ptr -> 2
    assert int(q.ptr) == 2
    assert torch.equal(q.keys[:2], b1) and torch.equal(q.keys[2:], old[2:])
    q.enqueue(torch.full((2, 3), 2.0))      # rows 2,3; ptr -> 4
    q.enqueue(torch.full((2, 3), 3.0))      # rows 4,5; ptr -> 6 mod 6 = 0 (wrap-around)
    assert int(q.ptr) == 0
    q.enqueue(torch.full((2, 3), 4.0))      # overwrites the oldest block (rows 0,1)
    assert int(q.ptr) == 2
    expected = torch.tensor([4.0, 4, 2, 2, 3, 3]).unsqueeze(1).expand(6, 3)
    assert torch.equal(q.keys, expected)
    assert torch.equal(q(), expected)


def test_queue_requires_multiple_of_batch():
    q = KeyQueue(dim=2, size=10)
    with pytest.raises(ValueError, match=r"K=10 must be a multiple of the global batch B=4"):
        q.enqueue(torch.zeros(4, 2))
    with pytest.raises(ValueError, match="multiple"):
        q.check_batch(3)
    q.check_batch(5)  # fine
    with pytest.raises(ValueError, match="shape"):
        q.enqueue(torch.zeros(5, 3))


def test_queue_casts_half_keys_and_resets():
    q = KeyQueue(dim=2, size=4)
    q.enqueue(torch.ones(2, 2, dtype=torch.float16))
    assert q.keys.dtype == torch.float32 and torch.equal(q.keys[:2], torch.ones(2, 2))
    q.reset_()
    assert int(q.ptr) == 0 and not torch.equal(q.keys[:2], torch.ones(2, 2))
    assert torch.allclose(q.keys.norm(dim=1), torch.ones(4), atol=1e-6)
    sd = q.state_dict()
    assert set(sd) == {"keys", "ptr"}


# ---------------------------------------------------------------------------- momentum (EMA) update
def test_momentum_update_math_parameters_only():
    torch.manual_seed(0)
    query = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    key = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    key.load_state_dict(query.state_dict())
    with torch.no_grad():
        for p in query.parameters():
            p.add_(1.0)                         # the query moved by +1 after an optimizer step
        query[1].running_mean.fill_(7.0)        # query BN statistics differ from the key's
    before = [p.clone() for p in key.parameters()]
    m = 0.999
    ema_update_(key, query, m, buffers=False)   # MoCo: θ_k ← m θ_k + (1-m) θ_q, parameters only
    for b, pk, pq in zip(before, key.parameters(), query.parameters()):
        # θ_q = θ_k(before) + 1  ->  θ_k(after) = θ_k + (1 - m) · 1 = θ_k + 0.001
        assert torch.allclose(pk, b + 0.001, atol=1e-6)
        assert torch.allclose(pk, m * b + (1 - m) * pq, atol=1e-7)
    assert torch.equal(key[1].running_mean, torch.zeros(4))  # key BN statistics are its own


# ---------------------------------------------------------------------------------------- heads
@pytest.mark.parametrize("kind,hidden,n_linear", [("wide", 2 * 12, 2), ("simple", 12, 2), ("deep", 12, 3),
                                                  ("dropout", 12, 2), ("none", None, 1)])
def test_head_shapes(kind, hidden, n_linear):
    head = build_moco_head(kind, in_dim=12, out_dim=5)
    linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == n_linear
    assert linears[0].in_features == 12 and linears[-1].out_features == 5
    if hidden is not None:
        assert linears[0].out_features == hidden
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in head.modules())
    assert head(torch.randn(3, 12)).shape == (3, 5) and head.out_dim == 5


def test_head_wide_paper_sizes_and_identity():
    # mobilenetv3_large: d = 1280 -> 2560 -> 128; parameters 1280·2560 + 2560 + 2560·128 + 128
    head = MoCoHead(1280, 128, "wide")
    assert sum(p.numel() for p in head.parameters()) == 1280 * 2560 + 2560 + 2560 * 128 + 128
    ident = MoCoHead(7, 128, "identity")
    x = torch.randn(2, 7)
    assert ident.out_dim == 7 and torch.equal(ident(x), x)
    assert set(MOCO_HEADS) == {"wide", "simple", "deep", "dropout", "none", "identity"}
    with pytest.raises(ValueError, match="expected one of"):
        MoCoHead(4, 2, "huge")
    with pytest.raises(ValueError, match="dim 1280"):
        head(torch.randn(2, 3))
