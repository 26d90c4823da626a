"""KDEP core: PTS golden values, the SVD+PTS target, the loss, SVD statistics (in-memory, streaming,
save/load, reference .npy files)."""
import json
import math

import numpy as np
import pytest
import torch

from kdforge.align.svd import StreamingPCA, SVDAligner, canonical_signs, subspace_distance
from kdforge.losses.kdep import kdep_feature_loss, kdep_project, kdep_target, pts


# ---------------------------------------------------------------------------------------------
# PTS
# ---------------------------------------------------------------------------------------------

def test_pts_golden_values():
    z = torch.tensor([0.1, 1.0, 10.0, 0.001, 0.0, -1.0])
    # PTS(z) = sign(z)·|z/0.1|^(1/3):
    #   0.1   -> 1^(1/3)      = 1
    #   1     -> 10^(1/3)     = 2.15443469
    #   10    -> 100^(1/3)    = 4.64158883
    #   0.001 -> 0.01^(1/3)   = 0.21544347
    #   0     -> 0 ; -1 -> -2.15443469 (odd)
    expected = torch.tensor([1.0, 2.15443469, 4.64158883, 0.21544347, 0.0, -2.15443469])
    torch.testing.assert_close(pts(z), expected, rtol=1e-6, atol=1e-7)


def test_pts_odd_monotone_and_other_constants():
    z = torch.linspace(-50, 50, 2001, dtype=torch.float64)
    y = pts(z)
    torch.testing.assert_close(pts(-z), -y)
    assert torch.all(y[1:] > y[:-1])
    # |PTS(z)| > |z| exactly when |z| < sqrt(10) = 3.1623 (T = 0.1, n = 3)
    small, large = z.abs() < math.sqrt(10) - 1e-6, z.abs() > math.sqrt(10) + 1e-6
    assert torch.all(y[small].abs() >= z[small].abs()) and torch.all(y[large].abs() < z[large].abs())
    # (T = 0.2, n = 2): PTS(0.8) = sqrt(4) = 2
    assert pts(torch.tensor(0.8), temperature=0.2, power=2.0).item() == pytest.approx(2.0)
    with pytest.raises(ValueError):
        pts(z, temperature=0.0)


# ---------------------------------------------------------------------------------------------
# target and loss
# ---------------------------------------------------------------------------------------------

def test_kdep_target_matches_elementwise_reference_loop():
    g = torch.Generator().manual_seed(0)
    f_t, mean = torch.randn(3, 6, generator=g), torch.randn(6, generator=g)
    v = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=torch.float64))[0].float()
    k = 4
    t = kdep_target(f_t, mean, v, k)
    assert t.shape == (3, k) and not t.requires_grad
    for b in range(3):
        for j in range(k):
            z = sum((f_t[b, d] - mean[d]).item() * v[d, j].item() for d in range(6))
            ref = math.copysign(abs(z / 0.1) ** (1 / 3), z)
            assert t[b, j].item() == pytest.approx(ref, rel=1e-5, abs=1e-6)
    torch.testing.assert_close(kdep_target(f_t, mean, v, k, use_pts=False), kdep_project(f_t, mean, v, k))
    with pytest.raises(ValueError, match="k=7"):
        kdep_project(f_t, mean, v, 7)


def test_kdep_feature_loss_is_weighted_mean_mse():
    # reference C1: x then y ~ N(0,1) [8,512] from Generator(0): plain mean MSE = 2.011436
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 512, generator=g), torch.randn(8, 512, generator=g)
    assert kdep_feature_loss(x, y).item() == pytest.approx(2.011436, abs=1e-5)
    # hand example: diffs (1, -2 | 0, 3) -> mean of squares (1+4+0+9)/4 = 3.5, times w=3 -> 10.5
    s = torch.tensor([[1.0, 0.0], [2.0, 3.0]], requires_grad=True)
    t = torch.tensor([[0.0, 2.0], [2.0, 0.0]])
    loss = kdep_feature_loss(s, t, weight=3.0)
    assert loss.item() == pytest.approx(10.5)
    loss.backward()
    # d/ds  w·mean((s-t)^2) = w·2(s-t)/4
    torch.testing.assert_close(s.grad, 3.0 * 2 * (s.detach() - t) / 4)
    with pytest.raises(ValueError, match="feature width"):
        kdep_feature_loss(torch.zeros(2, 3), torch.zeros(2, 4))


# ---------------------------------------------------------------------------------------------
# SVD statistics
# ---------------------------------------------------------------------------------------------

def _features(n=300, d=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    scales = torch.logspace(1, -1, d, dtype=torch.float64)   # distinct variances -> unique directions
    basis = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))[0]
    return (torch.randn(n, d, generator=g, dtype=torch.float64) * scales) @ basis.T + 3.0


def test_fit_matches_linalg_svd_of_centred_matrix_up_to_sign():
    f = _features()
    al = SVDAligner.fit(f, k=5)
    x = f - f.mean(0)
    _, s, vh = torch.linalg.svd(x, full_matrices=False)
    v_ref = vh[:5].T
    signs = torch.sign((al.V * v_ref).sum(0))
    assert torch.all(signs.abs() == 1)
    torch.testing.assert_close(al.V, v_ref * signs)
    torch.testing.assert_close(al.singular_values, s)
    torch.testing.assert_close(al.mean, f.mean(0))
    # PCA identity: var((F-mu)V_k) = S_k^2/(N-1)
    z = al.transform(f)
    torch.testing.assert_close(z.var(0), s[:5] ** 2 / (f.shape[0] - 1))
    torch.testing.assert_close(al.explained_variance()[:5], s[:5] ** 2 / (f.shape[0] - 1))


def test_canonical_sign_convention():
    v = torch.tensor([[0.1, -0.9], [-0.8, 0.2], [0.3, 0.1]])
    c = canonical_signs(v)
    torch.testing.assert_close(c, torch.tensor([[-0.1, 0.9], [0.8, -0.2], [-0.3, -0.1]]))
    al = SVDAligner.fit(_features(seed=3), k=4)
    idx = al.V.abs().argmax(0)
    assert torch.all(al.V[idx, torch.arange(4)] > 0)
    # fitting on the sign-flipped-direction data gives the same canonical V
    al2 = SVDAligner.fit(-_features(seed=3), k=4)
    torch.testing.assert_close(al2.V, al.V)


def test_streaming_equals_in_memory_and_torch_svd():
    f = _features(n=257, d=16, seed=1)
    stream = StreamingPCA()
    for chunk in torch.split(f.float(), 40):    # uneven last batch; float32 input, float64 accumulation
        stream.update(chunk)
    al_s = stream.finalize(k=6, teacher="toy")
    al_m = SVDAligner.fit(f.float(), k=6)
    assert al_s.n_samples == 257 and al_s.meta["teacher"] == "toy"
    torch.testing.assert_close(al_s.mean, f.float().double().mean(0), rtol=0, atol=1e-10)
    torch.testing.assert_close(al_s.V, al_m.V, rtol=0, atol=1e-8)
    torch.testing.assert_close(al_s.singular_values[:6], al_m.singular_values[:6], rtol=1e-9, atol=0)
    # against torch.linalg.svd of the centred matrix, up to column sign
    x = f.float().double()
    _, s, vh = torch.linalg.svd(x - x.mean(0), full_matrices=False)
    assert subspace_distance(al_s.V[:, :1], vh[:1].T) < 1e-8
    torch.testing.assert_close(al_s.V.abs(), vh[:6].T.abs(), rtol=0, atol=1e-8)
    torch.testing.assert_close(stream.covariance(), torch.cov(x.T))


def test_streaming_merge_equals_single_pass():
    f = _features(n=100, d=8, seed=2)
    a, b, whole = StreamingPCA(), StreamingPCA(), StreamingPCA()
    a.update(f[:30]).update(f[30:55])
    b.update(f[55:])
    whole.update(f)
    a.merge(b)
    assert a.n == 100
    torch.testing.assert_close(a.mean, whole.mean)
    torch.testing.assert_close(a.m2, whole.m2)
    with pytest.raises(ValueError, match="width"):
        a.update(torch.zeros(2, 9))


def test_save_load_round_trip(tmp_path):
    al = StreamingPCA().update(_features(n=50, d=10)).finalize(k=7, teacher="resnet50", transform="eval")
    path = al.save(tmp_path / "svd")
    assert path.name == "svd.safetensors"
    meta = json.loads(path.with_suffix(".json").read_text())
    assert meta["n_samples"] == 50 and meta["teacher"] == "resnet50" and meta["transform"] == "eval"
    assert meta["sign_convention"] == "largest_abs_positive" and meta["k"] == 7 and meta["dim"] == 10
    back = SVDAligner.load(tmp_path)        # a folder holding svd.safetensors
    assert back.n_samples == 50 and back.meta["teacher"] == "resnet50" and back.k == 7
    torch.testing.assert_close(back.V, al.V.float())
    torch.testing.assert_close(back.mean, al.mean.float())
    torch.testing.assert_close(back.singular_values, al.singular_values.float())
    small = SVDAligner.load(path, k=3)
    assert small.V.shape == (10, 3) and small.k == 3
    with pytest.raises(ValueError, match="k=8"):
        SVDAligner.load(path, k=8)
    with pytest.raises(FileNotFoundError, match="kdep-svd"):
        SVDAligner.load(tmp_path / "missing.safetensors")
    # buffers: saved in state_dict, moved by .to()
    assert set(back.state_dict()) == {"mean", "V", "singular_values", "channel_var"}
    assert back.double().V.dtype == torch.float64
    # a placeholder adopts the checkpoint's shapes (rebuilding a run without the statistics file)
    ph = SVDAligner.empty()
    ph.load_state_dict(small.state_dict())
    assert ph.V.shape == (10, 3) and ph.k == 3
    torch.testing.assert_close(ph.transform(torch.ones(2, 10)), small.transform(torch.ones(2, 10)))


def test_channel_variance_and_top_channels():
    g = torch.Generator().manual_seed(0)
    f = torch.randn(400, 5, generator=g, dtype=torch.float64) * torch.tensor([1.0, 5.0, 0.1, 3.0, 2.0],
                                                                             dtype=torch.float64)
    al_m = SVDAligner.fit(f, k=3)
    al_s = StreamingPCA().update(f[:150]).update(f[150:]).finalize(k=3)
    torch.testing.assert_close(al_m.channel_var, f.var(0))
    torch.testing.assert_close(al_s.channel_var, f.var(0))
    # stds 1, 5, 0.1, 3, 2 -> by variance: channels 1, 3, 4
    assert al_s.top_variance_channels().tolist() == [1, 3, 4]


def test_reference_npy_reader(tmp_path):
    rng = np.random.default_rng(0)
    d = 8
    v = np.linalg.qr(rng.standard_normal((d, d)))[0].astype(np.float32)   # columns = directions
    mu = rng.standard_normal(d).astype(np.float32)
    s = np.sort(rng.random(d).astype(np.float32))[::-1].copy()
    np.save(tmp_path / "model_v.npy", v)
    np.save(tmp_path / "model_feat_mean.npy", mu)
    np.save(tmp_path / "model_eigen_values.npy", s)
    al = SVDAligner.from_reference_npy(tmp_path, k=5)
    f = rng.standard_normal((4, d)).astype(np.float32)
    expected = (f - mu) @ v[:, :5]                     # V used as saved: columns, no transpose
    np.testing.assert_allclose(al.transform(torch.from_numpy(f)).numpy(), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(al.singular_values.numpy(), s)
    assert al.meta["sign_convention"] == "as_saved"
    al2 = SVDAligner.from_reference_npy(tmp_path / "model_v.npy", tmp_path / "model_feat_mean.npy",
                                        sign_convention=True)
    assert torch.all(al2.V[al2.V.abs().argmax(0), torch.arange(d)] > 0)
    np.save(tmp_path / "bad_mean.npy", mu[:5])
    with pytest.raises(ValueError, match="do not fit"):
        SVDAligner.from_reference_npy(tmp_path / "model_v.npy", tmp_path / "bad_mean.npy")
