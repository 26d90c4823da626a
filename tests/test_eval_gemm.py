"""matmul_nt: the oneDNN CPU GEMM and its torch fallback give a @ b.T + bias; the searches built on it
return the same neighbours / accuracies whichever path runs."""
import pytest
import torch

from kdforge.eval import _gemm
from kdforge.eval._gemm import matmul_nt, onednn_available
from kdforge.eval.fewshot import evaluate_episodes, sample_episodes
from kdforge.eval.knn import knn_search


@pytest.fixture
def no_onednn(monkeypatch):
    """Force the torch (addmm/mm) path, as on a build without oneDNN or with KDFORGE_ONEDNN=0."""
    monkeypatch.setattr(_gemm, "onednn_available", lambda: False)


def _ab(m=37, n=53, k=29, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(m, k, generator=g, dtype=dtype), torch.randn(n, k, generator=g, dtype=dtype),
            torch.randn(n, generator=g, dtype=dtype))


@pytest.mark.parametrize("with_bias", [True, False])
def test_matmul_nt_matches_float64(with_bias):
    a, b, c = _ab()
    want = a.double() @ b.double().T + (c.double() if with_bias else 0)
    got = matmul_nt(a, b, c if with_bias else None)
    assert got.shape == (37, 53) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_matmul_nt_views_and_float64():
    a, b, c = _ab(k=40)
    got = matmul_nt(a[:, ::2], b[:, 1::2], c)                    # non-contiguous views
    torch.testing.assert_close(got, a[:, ::2] @ b[:, 1::2].T + c, rtol=1e-5, atol=1e-5)
    a64, b64, c64 = _ab(dtype=torch.float64)
    assert torch.equal(matmul_nt(a64, b64, c64), torch.addmm(c64, a64, b64.T))   # float64: torch path


def test_matmul_nt_fallback_writes_out(no_onednn):
    a, b, c = _ab()
    out = torch.full((37, 53), float("nan"))
    got = matmul_nt(a, b, c, out=out)
    assert got.data_ptr() == out.data_ptr()
    assert torch.equal(out, torch.addmm(c, a, b.T))


def test_matmul_nt_keeps_autograd():
    a, b, _ = _ab()
    a.requires_grad_(True)
    matmul_nt(a, b).sum().backward()                             # the torch path when a gradient is needed
    torch.testing.assert_close(a.grad, b.sum(0).expand_as(a))


def test_env_switch_turns_onednn_off(monkeypatch):
    _gemm._onednn_works.cache_clear()
    monkeypatch.setenv("KDFORGE_ONEDNN", "0")
    try:
        assert onednn_available() is False
    finally:
        _gemm._onednn_works.cache_clear()


def test_onednn_default_only_on_x86(monkeypatch):
    import platform
    _gemm._onednn_works.cache_clear()
    monkeypatch.delenv("KDFORGE_ONEDNN", raising=False)
    monkeypatch.setattr(platform, "machine", lambda: "arm64")
    try:
        assert onednn_available() is False                       # not measured there: torch's mm stays
        _gemm._onednn_works.cache_clear()
        monkeypatch.setenv("KDFORGE_ONEDNN", "1")                 # forced on: only the correctness check decides
        assert onednn_available() is torch.backends.mkldnn.is_available()
    finally:
        _gemm._onednn_works.cache_clear()


def test_onednn_present_on_this_torch_build():
    # the pinned CPU torch ships oneDNN; if this fails, the fast path silently fell back to MKL
    import platform
    if not torch.backends.mkldnn.is_available() or platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip("torch built without oneDNN, or not an x86-64 CPU")
    assert onednn_available()


def _knn_data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(700, 24, generator=g), torch.randn(90, 24, generator=g)


def test_knn_same_neighbours_either_gemm(monkeypatch):
    gal, q = _knn_data()
    d_fast, i_fast = knn_search(gal, q, 15, chunk=32, gallery_chunk=256)
    monkeypatch.setattr(_gemm, "onednn_available", lambda: False)
    d_ref, i_ref = knn_search(gal, q, 15, chunk=32, gallery_chunk=256)
    assert torch.equal(i_fast, i_ref)
    torch.testing.assert_close(d_fast, d_ref, rtol=1e-5, atol=1e-4)
    exact = torch.cdist(q.double(), gal.double()).pow(2).topk(15, largest=False).indices
    assert torch.equal(i_fast, exact)


def test_fewshot_same_accuracies_either_gemm(monkeypatch):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(8, 1, 32, generator=g) + torch.randn(8, 40, 32, generator=g) * 2.0
    y = torch.arange(8).repeat_interleave(40)
    ep = sample_episodes(y, 5, 1, "all", 50, seed=0)
    fast = evaluate_episodes(x.reshape(-1, 32), y, ep, 1, "prototype", strategy="classblock")
    monkeypatch.setattr(_gemm, "onednn_available", lambda: False)
    ref = evaluate_episodes(x.reshape(-1, 32), y, ep, 1, "prototype", strategy="classblock")
    assert torch.equal(fast.accuracies, ref.accuracies)
    assert 20.0 < fast.mean < 100.0


def test_knn_block_shape_defaults(monkeypatch):
    from kdforge.eval import knn
    g32 = torch.empty(50000, 8)
    monkeypatch.setattr(knn, "onednn_available", lambda: True)
    assert knn.block_shape(g32, 101) == (256, 16384)            # 2^22 distances: recycled by the allocator
    assert knn.block_shape(g32[:1000], 101) == (256, 1000)      # whole gallery fits in one block
    assert knn.block_shape(g32.double(), 101) == (1024, 50000)  # float64: torch path, 2^26 distances
    monkeypatch.setattr(knn, "onednn_available", lambda: False)
    assert knn.block_shape(g32, 101) == (1024, 50000)
    assert knn.block_shape(g32, 101, chunk=64, gallery_chunk=5000) == (64, 4992)   # whole groups of 16


def test_prepack_same_product_and_fallback(monkeypatch):
    from kdforge.eval._gemm import prepack
    a, b, c = _ab()
    packed = prepack(b, rows=a.shape[0])
    if onednn_available():
        assert packed.is_mkldnn                                   # oneDNN's blocked layout, not b
    torch.testing.assert_close(matmul_nt(a, packed, c), a @ b.T + c, rtol=1e-5, atol=1e-5)
    assert prepack(b.double(), 8) is not None and not prepack(b.double(), 8).is_mkldnn
    monkeypatch.setattr(_gemm, "onednn_available", lambda: False)
    assert prepack(b, 8) is b                                     # torch path: nothing to lay out


@pytest.mark.parametrize("m,n,k", [(0, 5, 8), (3, 0, 8), (3, 5, 0)])
def test_matmul_nt_empty_operands(m, n, k):
    from kdforge.eval._gemm import prepack
    a, b, c = torch.randn(m, k), torch.randn(n, k), torch.randn(n)
    got = matmul_nt(a, prepack(b, max(m, 1)), c)
    assert torch.equal(got, torch.addmm(c, a, b.T))             # zero products: bias rows (or nothing)


@pytest.mark.filterwarnings("ignore:TF32 acceleration")
def test_torch_mkldnn_flag_is_honoured():
    from kdforge.eval._gemm import prepack
    _, b, _ = _ab()
    with torch.backends.mkldnn.flags(enabled=False):
        assert onednn_available() is False
        assert not prepack(b, 8).is_mkldnn


def test_packed_operand_on_the_torch_path():
    from kdforge.eval._gemm import prepack
    a, b, c = _ab()
    packed = prepack(b, 8)
    if not packed.is_mkldnn:
        pytest.skip("oneDNN not used here: nothing is packed")
    got = matmul_nt(a.clone().requires_grad_(True), packed, c)   # autograd: torch path on a densified b
    torch.testing.assert_close(got, torch.addmm(c, a, b.T), rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="dtype"):             # torch's own message, not an MkldnnCPU one
        matmul_nt(a.double(), packed, c.double())
