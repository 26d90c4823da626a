"""Linear probe protocol and t-SNE plot."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kdforge.eval import LINEAR_PROTOCOL, linear_probe, tsne_plot


def _data(seed=0, n=60, C=3, D=8):
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(C, D, generator=g) * 2
    y = torch.arange(C).repeat(n // C)
    return means[y] + torch.randn(len(y), D, generator=g), y * 10


def test_linear_probe_golden_separable():
    # two classes on opposite sides: x=(+1, 0) label 0 and (−1, 0) label 1 -> every split 100%
    x = torch.tensor([[1.0, 0.1], [1.0, -0.1], [-1.0, 0.1], [-1.0, -0.1]])
    y = torch.tensor([0, 0, 1, 1])
    r = linear_probe(x, y, x, y, wd=1e-2)
    assert r.acc == 100.0 and r.val_acc is None and r.wd == 1e-2
    assert r.protocol["optimiser"] == LINEAR_PROTOCOL["optimiser"]


def test_linear_probe_is_the_regularised_optimum():
    x, y = _data()
    r = linear_probe(x, y, x, y, wd=1e-2)
    xn = F.normalize(x, dim=1)
    yi = torch.unique(y, return_inverse=True)[1]
    W, b = r.weight.clone().requires_grad_(True), r.bias.clone().requires_grad_(True)
    loss = F.cross_entropy(xn @ W.T + b, yi) + 0.5 * 1e-2 * W.pow(2).sum()
    loss.backward()
    assert W.grad.abs().max() < 1e-4 and b.grad.abs().max() < 1e-4               # stationary point
    pred = (xn @ r.weight.T + r.bias).argmax(1)
    assert r.acc == pytest.approx((pred == yi).double().mean().item() * 100)


def test_linear_probe_val_selection_never_uses_test():
    x, y = _data(1)
    xv, yv = _data(2)
    xt, yt = _data(3)
    r = linear_probe(x, y, xt, yt, val=(xv, yv), wd_grid=(1e-3, 1e-1, 10.0))
    assert set(r.val_by_wd) == {1e-3, 1e-1, 10.0}
    assert r.val_acc == max(r.val_by_wd.values())
    assert r.wd == max(k for k, v in r.val_by_wd.items() if v == r.val_acc)   # ties -> larger wd
    # changing the test labels must not change the choice
    r2 = linear_probe(x, y, xt, (yt + 10) % 30, val=(xv, yv), wd_grid=(1e-3, 1e-1, 10.0))
    assert r2.wd == r.wd


def test_tsne_plot_writes_png(tmp_path):
    x, y = _data(n=45)
    out = tmp_path / "sub" / "tsne.png"
    emb = tsne_plot(x, y, out, seed=0, perplexity=5, max_iter=250)
    assert out.exists() and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert emb.shape == (45, 2) and np.isfinite(emb).all()
    emb2 = tsne_plot(x, y, tmp_path / "again.png", seed=0, perplexity=5, max_iter=250)
    np.testing.assert_allclose(emb, emb2)                                      # seeded
