"""VkD orthogonal projector: orthogonality under AdamW weight decay, no Householder collapse,
fp32 weight under autocast, one weight computation per step, gradient flow."""
import copy
import pickle

import pytest
import torch
import torch.nn.functional as F

from kdforge.align.orthogonal import OrthogonalProjector, make_projector
from kdforge.methods.base import param_groups_weight_decay

SHAPES = [(8, 24), (24, 8), (12, 12)]


def _gram_error(w: torch.Tensor) -> float:
    d_out, d_in = w.shape
    g = w.T @ w if d_out >= d_in else w @ w.T
    return (g - torch.eye(g.shape[0])).abs().max().item()


@pytest.mark.parametrize("d_in,d_out", SHAPES)
def test_init_is_semi_orthogonal_and_isometric(d_in, d_out):
    torch.manual_seed(0)
    p = OrthogonalProjector(d_in, d_out)
    w = p.weight
    assert w.shape == (d_out, d_in) and w.dtype == torch.float32
    assert _gram_error(w) < 1e-6
    x = torch.randn(5, d_in)
    y = p(x)
    assert y.shape == (5, d_out)
    if d_out >= d_in:  # isometric embedding: ‖P x‖ = ‖x‖
        assert torch.allclose(y.norm(dim=1), x.norm(dim=1), rtol=1e-5)
    else:              # co-isometry: ‖P x‖ <= ‖x‖ and P Pᵀ = I
        assert (y.norm(dim=1) <= x.norm(dim=1) + 1e-5).all()
    # the free parameter is flagged for the no-weight-decay group
    assert p.raw._no_weight_decay is True


@pytest.mark.parametrize("d_in,d_out,respect_groups",
                         [(8, 24, False), (24, 8, False), (12, 12, False), (8, 24, True)])
def test_orthogonal_after_1000_adamw_steps_with_weight_decay(d_in, d_out, respect_groups):
    # Regress a random linear target for 1,000 AdamW steps, wd 0.05. With respect_groups=False the
    # weight decay is forced onto the free parameter too: the QR map is scale invariant, so W must
    # still be orthogonal to 1e-5 (fp32) and keep all singular values at 1.
    torch.manual_seed(1)
    p = OrthogonalProjector(d_in, d_out)
    target = torch.randn(d_out, d_in) / d_in ** 0.5
    if respect_groups:
        groups = param_groups_weight_decay(p.named_parameters(), 0.05)
        assert all(g["weight_decay"] == 0.0 for g in groups if p.raw in g["params"])
    else:
        groups = [{"params": list(p.parameters()), "weight_decay": 0.05}]
    opt = torch.optim.AdamW(groups, lr=1e-2, weight_decay=0.05)
    x_eval = torch.randn(256, d_in)
    loss0 = F.mse_loss(p(x_eval), x_eval @ target.T).item()
    for _ in range(1000):
        x = torch.randn(32, d_in)
        loss = F.mse_loss(p(x), x @ target.T)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    loss1 = F.mse_loss(p(x_eval), x_eval @ target.T).item()
    w = p.compute_weight().detach()
    assert _gram_error(w) < 1e-5
    assert p.orthogonality_error() < 1e-5
    sv = torch.linalg.svdvals(w.double())
    assert torch.allclose(sv, torch.ones_like(sv), atol=1e-5)
    assert loss1 < 0.9 * loss0  # it did learn (the map is not frozen)


def test_no_householder_collapse_under_extreme_weight_decay():
    # Regression test for the reference's collapse (vkd.md §1.4): there, one AdamW step with weight
    # decay truncates int(diag(original)) to 0 and W becomes 0. Here we decay the free parameter by
    # a factor 0.5 per step (lr 1, wd 0.5, zero gradient) for 30 steps, i.e. by 2^-30: W must be
    # unchanged, with every singular value exactly 1.
    torch.manual_seed(2)
    p = OrthogonalProjector(16, 48)
    w0 = p.compute_weight().detach().clone()
    opt = torch.optim.AdamW([{"params": [p.raw], "weight_decay": 0.5}], lr=1.0)
    for _ in range(30):
        p.raw.grad = torch.zeros_like(p.raw)
        opt.step()
    assert p.raw.abs().max().item() < 1e-8  # the raw parameter did shrink ...
    w = p.compute_weight().detach()
    assert torch.allclose(w, w0, atol=1e-6)  # ... but W did not move
    sv = torch.linalg.svdvals(w.double())
    assert torch.allclose(sv, torch.ones_like(sv), atol=1e-6)
    x = torch.randn(4, 16)
    assert torch.allclose(p(x).norm(dim=1), x.norm(dim=1), rtol=1e-5)


def test_weight_is_fp32_under_autocast():
    torch.manual_seed(3)
    p = OrthogonalProjector(8, 32)
    x = torch.randn(4, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        w = p.weight
        y = p(x.to(torch.bfloat16))
    assert w.dtype == torch.float32 and y.dtype == torch.float32
    assert _gram_error(w.detach()) < 1e-6
    assert torch.allclose(y, x.to(torch.bfloat16).float() @ w.detach().T, atol=1e-6)


def test_weight_computed_once_per_step():
    torch.manual_seed(4)
    p = OrthogonalProjector(6, 10)
    opt = torch.optim.AdamW(p.parameters(), lr=1e-2)
    x = torch.randn(3, 6)
    n0 = p.n_weight_computations
    # two uses in one forward pass: one QR, and gradients of both uses flow
    loss = p(x).square().sum() + p(2 * x).abs().sum()
    assert p.n_weight_computations == n0 + 1
    loss.backward()
    assert p.raw.grad is not None and p.raw.grad.abs().sum() > 0
    opt.step()
    # the optimizer changed the parameter in place: recomputed on next use, then cached again
    p(x).sum().backward()
    p.zero_grad()
    assert p.n_weight_computations == n0 + 2
    # gradient accumulation: two backward passes before one step must not touch a freed graph
    p(x).sum().backward()
    p(x).sum().backward()
    assert p.n_weight_computations == n0 + 4  # the graph was consumed: recomputed, not reused
    # no-grad uses are cached until the parameter changes
    with torch.no_grad():
        p(x)
        p(x)
        p(x)
    assert p.n_weight_computations == n0 + 5
    opt.step()
    with torch.no_grad():
        p(x)
    assert p.n_weight_computations == n0 + 6


def test_cache_invalidated_by_load_state_dict_and_copies_are_clean():
    torch.manual_seed(5)
    a, b = OrthogonalProjector(4, 9), OrthogonalProjector(4, 9)
    with torch.no_grad():
        wa = a.weight.clone()
        b.weight  # populate b's cache
    b.load_state_dict(a.state_dict())
    with torch.no_grad():
        assert torch.equal(b.weight, wa)
    assert set(a.state_dict()) == {"raw"}  # no (n, n) base buffer
    a(torch.randn(2, 4)).sum()  # a cached weight with a graph must not break copies
    c = copy.deepcopy(a)
    d = pickle.loads(pickle.dumps(a))
    for m in (c, d):
        assert m._cache is None and m.raw._no_weight_decay
        assert torch.allclose(m.weight.detach(), wa)
    e = a.to(torch.float64)
    assert e.raw._no_weight_decay and e(torch.randn(2, 4, dtype=torch.float64)).dtype == torch.float32


def test_gradient_reaches_projector_and_input_with_scale_shift():
    torch.manual_seed(6)
    p = OrthogonalProjector(5, 7, scale_shift=True)
    assert torch.equal(p.scale, torch.ones(7)) and torch.equal(p.shift, torch.zeros(7))
    x = torch.randn(3, 5, requires_grad=True)
    y = p(x)
    assert torch.allclose(y, x.detach() @ p.weight.detach().T)  # γ = 1, β = 0 at init
    y.square().mean().backward()
    for t in (x, p.raw, p.scale, p.shift):
        assert t.grad is not None and t.grad.abs().sum() > 0
    with torch.no_grad():
        p.scale.fill_(2.0)
        p.shift.fill_(0.5)
    assert torch.allclose(p(x.detach()), 2.0 * (x.detach() @ p.weight.T) + 0.5)


def test_make_projector_kinds_and_errors():
    assert isinstance(make_projector("orthogonal", 3, 5), OrthogonalProjector)
    lin = make_projector("linear", 3, 5)
    assert isinstance(lin, torch.nn.Linear) and lin.weight.shape == (5, 3)
    assert isinstance(make_projector("identity", 4, 4), torch.nn.Identity)
    with pytest.raises(ValueError, match="equal widths"):
        make_projector("identity", 3, 4)
    with pytest.raises(ValueError, match="expected one of"):
        make_projector("mlp", 3, 4)
    with pytest.raises(ValueError, match="positive"):
        OrthogonalProjector(0, 3)
    with pytest.raises(ValueError, match="input width"):
        OrthogonalProjector(3, 4)(torch.randn(2, 5))
