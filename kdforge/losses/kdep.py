"""KDEP feature distillation: power temperature scaling and the SVD+PTS teacher target.

He et al., "Knowledge Distillation as Efficient Pre-training: Faster Convergence, Higher
Data-efficiency, and Better Transferability", CVPR 2022.

The teacher's pooled pre-activation feature ``f_T`` (B, D_T) is centred, projected on its top-k
principal directions ``V[:, :k]`` (k = the student's feature width) and squashed elementwise by PTS;
the student's pooled pre-activation feature ``f_S`` (B, k) regresses the result with a mean MSE::

    t    = PTS((f_T - mu) @ V[:, :k])          computed without gradient
    loss = w * mean_{b,j} (f_S[b, j] - t[b, j])^2
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

#: The reference's hard-coded PTS constants (T = 0.1, n = 3).
PTS_TEMPERATURE = 0.1
PTS_POWER = 3.0


def pts(z: Tensor, temperature: float = PTS_TEMPERATURE, power: float = PTS_POWER) -> Tensor:
    """Power temperature scaling (KDEP §3.3): ``sign(z) · |z / T|^(1/power)``, elementwise.

    Odd and monotone, zero at zero. With the defaults (T = 0.1, n = 3) it equals
    ``10^(1/3) · cbrt(z) ≈ 2.1544 · cbrt(z)``: PTS(0.1) = 1, PTS(1) = 2.1544, PTS(10) = 4.6416.
    It compresses large values and expands small ones (|PTS(z)| > |z| iff |z| < sqrt(10)), narrowing
    the scale gap between leading and trailing principal components.

    Shapes: any -> same. Computed in float32 (or float64 for float64 input). The derivative is
    infinite at 0: use it on targets (no gradient), as KDEP does.
    """
    if temperature <= 0:
        raise ValueError(f"pts: temperature must be > 0, got {temperature}")
    if power <= 0:
        raise ValueError(f"pts: power must be > 0, got {power}")
    zf = z if z.dtype == torch.float64 else z.float()
    return torch.sign(zf) * (zf.abs() / float(temperature)).pow(1.0 / float(power))


def kdep_project(f_t: Tensor, mean: Tensor, v: Tensor, k: Optional[int] = None) -> Tensor:
    """SVD (PCA) alignment ``(f_T - mu) @ V[:, :k]``.

    Shapes: ``f_t`` (B, D), ``mean`` (D,), ``v`` (D, K) with principal directions as *columns* in
    descending order of singular value, ``k <= K`` (default K) -> (B, k). No whitening, no re-centring.
    """
    if f_t.ndim != 2 or mean.shape != (f_t.shape[1],) or v.ndim != 2 or v.shape[0] != f_t.shape[1]:
        raise ValueError(f"kdep_project: expected f_T (B, D), mean (D,), V (D, K); got {tuple(f_t.shape)}, "
                         f"{tuple(mean.shape)}, {tuple(v.shape)}")
    k = v.shape[1] if k is None else int(k)
    if not 0 < k <= v.shape[1]:
        raise ValueError(f"kdep_project: k={k} but V holds {v.shape[1]} principal directions "
                         f"(teacher width {v.shape[0]})")
    dtype = torch.float64 if f_t.dtype == torch.float64 else torch.float32
    return (f_t.to(dtype) - mean.to(dtype)) @ v[:, :k].to(dtype)


def kdep_target(f_t: Tensor, mean: Tensor, v: Tensor, k: Optional[int] = None,
                temperature: float = PTS_TEMPERATURE, power: float = PTS_POWER, use_pts: bool = True) -> Tensor:
    """The KDEP teacher target ``PTS((f_T - mu) @ V[:, :k])`` (B, k), without gradient.

    ``use_pts=False`` gives the "SVD only" ablation. Shapes as in :func:`kdep_project`.
    """
    with torch.no_grad():
        z = kdep_project(f_t.detach(), mean, v, k)
        return pts(z, temperature, power) if use_pts else z


def kdep_feature_loss(student_feat: Tensor, target: Tensor, weight: float = 1.0) -> Tensor:
    """``w · mean_{b,j} (f_S[b,j] - t[b,j])^2`` (``F.mse_loss``, reduction mean), computed in float32.

    Shapes: ``student_feat`` (B, k), ``target`` (B, k) -> scalar. KDEP uses w = 3 for the
    multi-task (Microsoft Vision) R50 teacher and w = 20 for a supervised one.
    """
    if student_feat.shape != target.shape:
        raise ValueError(f"kdep_feature_loss: student feature {tuple(student_feat.shape)} vs target "
                         f"{tuple(target.shape)}; k must equal the student's feature width")
    return float(weight) * F.mse_loss(student_feat.float(), target.float().detach(), reduction="mean")
