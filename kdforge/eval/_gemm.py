"""``a @ b.T (+ bias)`` for the evaluation hot loops, on oneDNN when that is faster (not public API).

The exact searches of :mod:`kdforge.eval.knn` and :mod:`kdforge.eval.fewshot` spend most of their
time in one float32 GEMM of the form ``a (m, k) @ b (n, k)ᵀ``. On CPU, torch runs ``mm``/``addmm``
on MKL, but it also ships oneDNN, whose fp32 matmul (the op behind torch's own compiled CPU linear
layers, ``mkldnn._linear_pointwise``) was measured 1.6-1.7x faster on an AMD EPYC (AVX-512):
1,024 × 50,000 × 384 in 149 ms vs 251 ms for ``addmm`` on 2 threads, 268 vs 470 ms on one.

:func:`matmul_nt` uses that op for CPU float32 inputs outside autograd, and ``torch.addmm``/``mm``
everywhere else (GPU, float64, gradients, a torch build without oneDNN, or ``KDFORGE_ONEDNN=0``).
Both compute the same float32 dot products; only their summation order, hence the last bits of
the results, can differ. The oneDNN op is private to torch, so it is checked once per process on a
small product against ``mm`` and dropped (for good) if it is missing, fails or disagrees.
"""
from __future__ import annotations

import functools
import os
from typing import Optional

import torch
from torch import Tensor


@functools.lru_cache(maxsize=None)
def onednn_available() -> bool:
    """Whether the oneDNN fp32 linear op exists, runs and matches ``mm`` here (checked once).

    ``KDFORGE_ONEDNN=0`` in the environment turns it off (e.g. to compare with MKL).
    """
    if os.environ.get("KDFORGE_ONEDNN", "1") == "0" or not torch.backends.mkldnn.is_available():
        return False
    op = getattr(getattr(torch.ops, "mkldnn", None), "_linear_pointwise", None)
    if op is None:
        return False
    try:
        g = torch.Generator().manual_seed(0)
        a, b, c = (torch.randn(s, generator=g) for s in ((7, 33), (5, 33), (5,)))
        with torch.no_grad():
            got = op(a, b, c, "none", [], "")
        return bool(torch.allclose(got, torch.addmm(c, a, b.T), rtol=1e-5, atol=1e-5))
    except Exception:        # noqa: BLE001 - any failure of a private op means: do not use it
        return False


def matmul_nt(a: Tensor, b: Tensor, bias: Optional[Tensor] = None, *, out: Optional[Tensor] = None) -> Tensor:
    """``a @ b.T + bias``: a (m, k), b (n, k), bias (n,) added to every row or None → (m, n).

    oneDNN for CPU float32 tensors without gradient (see the module docstring), else torch's
    ``addmm``/``mm``, which write into ``out`` (m, n) when given; the oneDNN op has no out= form and
    returns a new tensor (callers keep its size under glibc's 32 MiB mmap threshold, so freed blocks
    are reused instead of page-faulted in again). ``a`` and ``b`` are made contiguous for oneDNN.
    """
    if (a.device.type == "cpu" and a.dtype == b.dtype == torch.float32 and a.dim() == b.dim() == 2
            and (bias is None or bias.dtype == torch.float32)
            and not (torch.is_grad_enabled() and (a.requires_grad or b.requires_grad))
            and onednn_available()):
        return torch.ops.mkldnn._linear_pointwise(a.contiguous(), b.contiguous(),
                                                  None if bias is None else bias.contiguous(), "none", [], "")
    if bias is None:
        return torch.mm(a, b.T, out=out) if out is not None else a @ b.T
    return torch.addmm(bias, a, b.T, out=out) if out is not None else torch.addmm(bias, a, b.T)
