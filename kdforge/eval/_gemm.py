"""``a @ b.T (+ bias)`` for the evaluation hot loops, on oneDNN when that is faster (not public API).

The exact searches of :mod:`kdforge.eval.knn` and :mod:`kdforge.eval.fewshot` spend most of their
time in one float32 GEMM of the form ``a (m, k) @ b (n, k)ᵀ``. On CPU, torch runs ``mm``/``addmm``
on MKL, but it also ships oneDNN, whose fp32 matmul (the op behind torch's own compiled CPU linear
layers, ``mkldnn._linear_pointwise``) was measured 1.6-1.7x faster on an AMD EPYC (AVX-512):
1,024 × 50,000 × 384 in 149 ms vs 251 ms for ``addmm`` on 2 threads, 268 vs 470 ms on one.

(MKL gives non-Intel CPUs no AVX-512 kernels; on Intel CPUs the two are expected to be close.)

:func:`matmul_nt` uses that op for float32 inputs outside autograd on x86-64 CPUs, and
``torch.addmm``/``mm`` everywhere else (GPU, float64, gradients, other CPUs, a torch build without
oneDNN, or ``KDFORGE_ONEDNN=0``). :func:`prepack` lays a reused operand out once for oneDNN.
Both compute the same float32 dot products; only their summation order, hence the last bits of
the results, can differ. The oneDNN op is private to torch, so it is checked once per process on a
small product against ``mm`` and dropped (for good) if it is missing, fails or disagrees.
"""
from __future__ import annotations

import functools
import os
import platform
from typing import Optional

import torch
from torch import Tensor


def onednn_linear(a: Tensor, b: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """``a @ b.T + bias`` on oneDNN, unchecked: a (m, k), b (n, k) or from :func:`prepack`, bias (n,) or
    None, float32 CPU tensors → (m, n). The one call of torch's private op; callers check
    :func:`onednn_available` and their operands first."""
    return torch.ops.mkldnn._linear_pointwise(a, b, bias, "none", [], "")


def onednn_available() -> bool:
    """Whether to use the oneDNN fp32 linear op: torch's oneDNN is enabled
    (``torch.backends.mkldnn.flags(enabled=False)`` turns it off) and the op exists, runs and matches
    ``mm`` here, on a plain and on a prepacked weight (checked once per process).

    By default only on x86-64, where it was measured; elsewhere (e.g. Apple silicon, whose BLAS is
    torch's fast path) ``mm`` stays. ``KDFORGE_ONEDNN=0`` turns it off (e.g. to compare with MKL),
    ``KDFORGE_ONEDNN=1`` turns it on on any CPU where the check passes.
    """
    return bool(torch.backends.mkldnn.enabled) and _onednn_works()


@functools.lru_cache(maxsize=None)
def _onednn_works() -> bool:
    """The once-per-process part of :func:`onednn_available` (environment, CPU, op check)."""
    env = os.environ.get("KDFORGE_ONEDNN", "")
    if env == "0" or not torch.backends.mkldnn.is_available():
        return False
    if env != "1" and platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    ops = getattr(torch.ops, "mkldnn", None)
    if not all(hasattr(ops, name) for name in ("_linear_pointwise", "_reorder_linear_weight")):
        return False
    try:
        g = torch.Generator().manual_seed(0)
        a, b, c = (torch.randn(s, generator=g) for s in ((7, 33), (5, 33), (5,)))
        want = torch.addmm(c, a, b.T)
        with torch.no_grad():
            plain = onednn_linear(a, b, c)
            packed = onednn_linear(a, ops._reorder_linear_weight(b, 7), c)
        return all(bool(torch.allclose(got, want, rtol=1e-5, atol=1e-5)) for got in (plain, packed))
    except Exception:        # noqa: BLE001 - any failure of a private op means: do not use it
        return False


def _onednn_for(a: Tensor, b: Tensor, bias: Optional[Tensor]) -> bool:
    return (a.device.type == "cpu" and a.dtype == torch.float32 and a.dim() == b.dim() == 2
            and (b.dtype == torch.float32 or b.is_mkldnn) and a.shape[1] > 0 and b.shape[0] > 0
            and (bias is None or bias.dtype == torch.float32)
            and not (torch.is_grad_enabled() and (a.requires_grad or b.requires_grad))
            and onednn_available())


def prepack(b: Tensor, rows: int) -> Tensor:
    """``b`` (n, k) laid out once for many :func:`matmul_nt` calls with about ``rows`` rows of ``a``.

    oneDNN otherwise re-lays out its weight operand on every call; packing once saves ~10 % when the
    same gallery block meets many query blocks (a copy of ``b``'s size). Returns ``b`` itself where
    oneDNN is not used (GPU, float64, gradients, ``KDFORGE_ONEDNN=0``).
    """
    if b.device.type == "cpu" and b.dtype == torch.float32 and b.dim() == 2 and b.numel() > 0 \
            and not b.requires_grad and onednn_available():          # (oneDNN rejects empty operands)
        return torch.ops.mkldnn._reorder_linear_weight(b.contiguous(), max(1, int(rows)))
    return b


def matmul_nt(a: Tensor, b: Tensor, bias: Optional[Tensor] = None, *, out: Optional[Tensor] = None) -> Tensor:
    """``a @ b.T + bias``: a (m, k), b (n, k) (plain or from :func:`prepack`), bias (n,) added to every
    row or None → (m, n).

    oneDNN for CPU float32 tensors without gradient (see the module docstring), else torch's
    ``addmm``/``mm``, which write into ``out`` (m, n) when given; the oneDNN op has no out= form and
    returns a new tensor (callers keep its size under glibc's 32 MiB mmap threshold, so freed blocks
    are reused instead of page-faulted in again). ``a`` and ``b`` are made contiguous for oneDNN.
    """
    if _onednn_for(a, b, bias):
        return onednn_linear(a.contiguous(), b if b.is_mkldnn else b.contiguous(),
                             None if bias is None else bias.contiguous())
    if b.is_mkldnn:                              # packed for oneDNN, but this call cannot use it
        b = b.to_dense()
    if bias is None:
        return torch.mm(a, b.T, out=out) if out is not None else a @ b.T
    return torch.addmm(bias, a, b.T, out=out) if out is not None else torch.addmm(bias, a, b.T)
