"""Alignment, uniformity, intra-class alignment and instance-retrieval top-k: golden values and
agreement with straightforward all-pairs formulas."""
import math

import pytest
import torch
import torch.nn.functional as F

from kdforge.eval import alignment, class_alignment, instdisc_topk, uniformity


def test_alignment_golden():
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    y = torch.tensor([[0.0, 1.0], [0.0, 1.0]])
    # ‖x0 − y0‖² = 2, ‖x1 − y1‖² = 0 -> mean 1.0;  alpha = 1: (√2 + 0)/2 = 0.70711
    assert alignment(x, y) == pytest.approx(1.0)
    assert alignment(x, y, alpha=1) == pytest.approx(math.sqrt(2) / 2)
    # on the sphere A = 2 − (2/N) Σ⟨x_i, y_i⟩
    g = torch.Generator().manual_seed(0)
    a = F.normalize(torch.randn(64, 16, generator=g), dim=1)
    b = F.normalize(a + 0.1 * torch.randn(64, 16, generator=g), dim=1)
    assert alignment(a, b) == pytest.approx(2 - 2 * (a * b).sum(1).mean().item(), abs=1e-6)
    assert alignment(3 * a, b, normalize=True) == pytest.approx(alignment(a, b), abs=1e-6)


def test_uniformity_golden():
    # (1,0), (0,1), (−1,0): squared distances 2 (0–1), 4 (0–2), 2 (1–2)
    # U = log((e^{−4} + e^{−8} + e^{−4}) / 3) with t = 2  (= −4.39632...)
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    assert uniformity(x) == pytest.approx(math.log((2 * math.exp(-4) + math.exp(-8)) / 3), abs=1e-9)
    # t = 1: log((2e^{−2} + e^{−4}) / 3)
    assert uniformity(x, t=1.0) == pytest.approx(math.log((2 * math.exp(-2) + math.exp(-4)) / 3), abs=1e-9)


@pytest.mark.parametrize("chunk", [1, 7, 4096])
def test_uniformity_matches_pdist_formula(chunk):
    g = torch.Generator().manual_seed(1)
    x = F.normalize(torch.randn(101, 10, generator=g, dtype=torch.float64), dim=1)
    ref = torch.log(torch.exp(-2 * torch.pdist(x).pow(2)).mean()).item()       # the reference's formula
    assert uniformity(x, chunk=chunk) == pytest.approx(ref, abs=1e-10)
    # seeded subsample is reproducible and equals the formula on those rows
    sub = uniformity(x, sample=40, seed=3)
    keep = torch.randperm(101, generator=torch.Generator().manual_seed(3))[:40]
    assert sub == pytest.approx(torch.log(torch.exp(-2 * torch.pdist(x[keep]).pow(2)).mean()).item(), abs=1e-10)


def test_class_alignment_golden_and_pairs():
    # class a: (0,0), (2,0): one pair, d² = 4 -> 4
    # class b: (0,0), (0,1), (0,3): pairs d² = 1, 9, 4 -> 14/3
    # C = (4 + 14/3) / 2 = 13/3
    x = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 0.0], [0.0, 1.0], [0.0, 3.0], [5.0, 5.0]])
    lab = torch.tensor([4, 4, 9, 9, 9, 1])                                     # class 1 has one row: skipped
    assert class_alignment(x, lab) == pytest.approx(13 / 3)
    g = torch.Generator().manual_seed(2)
    z = torch.randn(90, 6, generator=g)
    y = torch.randint(0, 4, (90,), generator=g)
    ref = torch.stack([torch.pdist(z[y == c].double()).pow(2).mean() for c in range(4)]).mean().item()
    assert class_alignment(z, y) == pytest.approx(ref, rel=1e-9)


def test_instdisc_golden():
    # a0=(1,0) b0=(0.6,0.8): cos 0.6; distractors a1 (cos 0.8 > 0.6), a2 (cos 0) -> rank 1
    # a1=(0.8,0.6) b1=(0.8,0.6): cos 1 -> rank 0
    # a2=(0,−1) b2=(0,1): cos −1; distractors a0 (0), a1 (−0.6) both higher -> rank 2
    # top-1: 1/3, top-2: 2/3, top-3: 3/3
    a = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, -1.0]])
    b = torch.tensor([[0.6, 0.8], [0.8, 0.6], [0.0, 1.0]])
    got = instdisc_topk(a, b, topk=3)
    assert got == pytest.approx([100 / 3, 200 / 3, 100.0])
    assert instdisc_topk(2 * a, 5 * b, topk=3, chunk=2) == pytest.approx(got)      # cosine, chunk-invariant


def test_instdisc_matches_reference_shift_by_one():
    """The reference keeps a_i's self-match among the candidates and counts index 0 in the top-(k+1)."""
    g = torch.Generator().manual_seed(4)
    a = F.normalize(torch.randn(60, 8, generator=g), dim=1)
    b = F.normalize(a + 0.7 * torch.randn(60, 8, generator=g), dim=1)
    scores = torch.cat([(a * b).sum(1, keepdim=True), a @ a.T], dim=1)         # (N, 1+N)
    ref = []
    for k in range(1, 6):
        top = scores.topk(k + 1, dim=1).indices
        ref.append((top == 0).any(1).double().mean().item() * 100)
    assert instdisc_topk(a, b, topk=5, chunk=16) == pytest.approx(ref)
