"""Representation geometry: alignment, uniformity, intra-class alignment.

Wang & Isola, "Understanding Contrastive Representation Learning through Alignment and Uniformity
on the Hypersphere" (ICML 2020), as SSL-small §2(c) uses them. Pass L2-normalised features (the
protocols do) or set ``normalize=True``. All three are exact; uniformity runs over every pair in
row blocks, so memory stays at ``chunk × N``.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from kdforge.eval._common import as_float, l2_normalize, labels_to_index


def alignment(x: Tensor, y: Tensor, alpha: float = 2.0, normalize: bool = False) -> float:
    """Instance alignment  A(X, Y) = (1/N) Σ_i ‖x_i − y_i‖₂^α.

    Args:
        x, y: (N, D) paired features (x_i and y_i are two views of one image).
        alpha: exponent (2 in the paper and SSL-small; then A = 2 − (2/N)Σ⟨x_i, y_i⟩ on the sphere).
        normalize: L2-normalise the rows first.

    Returns: a float (lower = better aligned).
    """
    x, y = as_float(x), as_float(y)
    if x.shape != y.shape or x.ndim != 2:
        raise ValueError(f"x and y must both be (N, D); got {tuple(x.shape)} and {tuple(y.shape)}")
    if normalize:
        x, y = l2_normalize(x), l2_normalize(y)
    return (x - y).double().norm(dim=1).pow(alpha).mean().item()


def uniformity(x: Tensor, t: float = 2.0, normalize: bool = False, chunk: int = 4096,
               sample: Optional[int] = None, seed: int = 0) -> float:
    """Uniformity  U(X) = log( mean over pairs i<j of exp(−t ‖x_i − x_j‖²) ).

    Exact over all N(N−1)/2 pairs (the mean over i≠j is the same by symmetry), accumulated as a
    float64 log-sum-exp over row blocks of ``chunk`` rows, so no N × N matrix is held.

    Args:
        x: (N, D) features (N ≥ 2).
        t: temperature (2 in the paper; the reference ignores its argument and always uses 2).
        normalize: L2-normalise the rows first.
        chunk: rows per block.
        sample: if given, use ``sample`` rows drawn without replacement with ``seed`` (the reference
            used 3 × 128 unseeded rows; kdforge defaults to all rows).

    Returns: a float (lower = more uniform).
    """
    x = as_float(x)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"uniformity needs (N, D) with N >= 2; got {tuple(x.shape)}")
    if normalize:
        x = l2_normalize(x)
    if sample is not None and sample < x.shape[0]:
        g = torch.Generator().manual_seed(seed)
        x = x[torch.randperm(x.shape[0], generator=g)[:sample].to(x.device)]
    x = x.double()
    n = x.shape[0]
    sq = x.pow(2).sum(1)
    lse = []
    for s in range(0, n, chunk):
        xb = x[s:s + chunk]
        d2 = (sq[s:s + chunk, None] + sq[None, :] - 2.0 * xb @ x.T).clamp_min_(0)
        col = torch.arange(n, device=x.device)[None, :]
        row = torch.arange(s, s + xb.shape[0], device=x.device)[:, None]
        e = (-t * d2).masked_fill_(col <= row, float("-inf"))              # pairs i < j only
        lse.append(torch.logsumexp(e.flatten(), 0))
    total = torch.logsumexp(torch.stack(lse), 0).item()
    return total - math.log(n * (n - 1) / 2)


def class_alignment(x: Tensor, labels, normalize: bool = False) -> float:
    """Intra-class alignment  C(X) = mean over classes c of mean over pairs i<j in c of ‖x_i − x_j‖².

    Uses the exact identity Σ_{i<j} ‖x_i − x_j‖² = n Σ_i ‖x_i‖² − ‖Σ_i x_i‖² (float64), so the cost is
    O(N·D). Classes with fewer than two rows are skipped.

    Args:
        x: (N, D) features; labels: (N,) class labels. normalize: L2-normalise rows first.

    Returns: a float (lower = tighter classes).
    """
    x = as_float(x)
    if normalize:
        x = l2_normalize(x)
    x = x.double()
    _, idx = labels_to_index(torch.as_tensor(labels).cpu())
    idx = idx.to(x.device)
    C = int(idx.max()) + 1
    n = torch.bincount(idx, minlength=C).double()
    s = torch.zeros(C, x.shape[1], dtype=x.dtype, device=x.device).index_add_(0, idx, x)
    q = torch.zeros(C, dtype=x.dtype, device=x.device).index_add_(0, idx, x.pow(2).sum(1))
    ok = n >= 2
    if not bool(ok.any()):
        raise ValueError("class_alignment needs a class with at least two rows")
    pair_sum = n * q - s.pow(2).sum(1)
    per_class = pair_sum[ok] / (n[ok] * (n[ok] - 1) / 2)
    return per_class.mean().item()
