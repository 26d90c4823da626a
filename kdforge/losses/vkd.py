"""VkD feature distillation loss (Miles, Elezi & Deng, "Improving Knowledge Distillation using
Orthogonal Projections", CVPR 2024).

Classification (``shared/methods/vkd.md`` §1.3–1.6): the student's final patch tokens are
mean-pooled, ``s = mean_n tokens[:, n]`` (B, d_s); the teacher's last map is globally average-pooled,
``t = mean_hw f_T`` (B, d_t); then::

    L_feat = mean_{b,c} SmoothL1_β( P(s)_{bc},  LN(t)_{bc} )         β = 1

with ``P`` the orthogonal projector (:class:`kdforge.align.OrthogonalProjector`) and ``LN`` a
per-sample LayerNorm without affine. The dense/ViDT variant (§1.7) matches row-aligned tokens
(R, C) and standardises *both* sides per channel over rows.
"""
from __future__ import annotations

from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdforge.align.norms import normalize_features

Projector = Union[nn.Module, Tensor, None]
Norm = Union[str, Callable, None]


def project(features: Tensor, projector: Projector) -> Tensor:
    """Apply ``projector`` to ``features`` (…, d_s) -> (…, d_t).

    ``projector`` is an ``nn.Module``, a weight matrix ``W`` (d_t, d_s) applied as ``x · Wᵀ``
    (in float32), or None (identity).
    """
    if projector is None:
        return features
    if isinstance(projector, Tensor):
        if projector.ndim != 2 or projector.shape[1] != features.shape[-1]:
            raise ValueError(f"project: weight {tuple(projector.shape)} does not map width {features.shape[-1]}")
        return features.float() @ projector.float().T
    return projector(features)


def pool_tokens(tokens: Tensor) -> Tensor:
    """Mean over the token axis: (B, N, D) -> (B, D)."""
    if tokens.ndim != 3:
        raise ValueError(f"pool_tokens: expected tokens (B, N, D), got {tuple(tokens.shape)}")
    return tokens.mean(dim=1)


def pool_map(fmap: Tensor) -> Tensor:
    """Global average pool of a feature map: (B, C, H, W) -> (B, C); (B, C) passes through;
    (B, N, C) token maps are averaged over N."""
    if fmap.ndim == 4:
        return fmap.mean(dim=(2, 3))
    if fmap.ndim == 3:
        return fmap.mean(dim=1)
    if fmap.ndim == 2:
        return fmap
    raise ValueError(f"pool_map: expected (B, C, H, W), (B, N, C) or (B, C), got {tuple(fmap.shape)}")


def vkd_feature_loss(student_feat: Tensor, teacher_feat: Tensor, projector: Projector,
                     norm: Norm = "layernorm", *, student_norm: Norm = "none", beta: float = 1.0,
                     eps: float = 1e-5, mask: Optional[Tensor] = None) -> Tensor:
    """``mean SmoothL1_β( n_s(P(s)), n_t(t) )`` — the VkD feature term (without its weight α).

    Args:
        student_feat: (…, d_s) student features (rows; e.g. pooled tokens (B, d_s)).
        teacher_feat: (…, d_t) teacher features with the same leading axes; used as a detached
            target.
        projector: ``nn.Module`` (e.g. OrthogonalProjector or a FitNet ``nn.Linear``), a weight
            ``W`` (d_t, d_s) applied as ``s · Wᵀ``, or None when d_s == d_t.
        norm: target normalisation n_t: ``"layernorm"`` (classification), ``"channel"`` (dense),
            ``"none"`` or a callable.
        student_norm: normalisation n_s of the projected student (``"none"`` for classification,
            ``"channel"`` in the ViDT variant).
        beta: SmoothL1 transition point (1 in the paper): ``½d²/β`` if ``|d| < β`` else ``|d| - β/2``.
        eps: normalisation epsilon.
        mask: optional bool (…) of valid rows: they alone enter the channel statistics and the mean.

    Returns: scalar float32; the mean runs over all elements (valid rows × d_t).
    """
    if student_feat.shape[:-1] != teacher_feat.shape[:-1]:
        raise ValueError(f"vkd_feature_loss: student {tuple(student_feat.shape)} and teacher "
                         f"{tuple(teacher_feat.shape)} must have the same leading (row) axes")
    p = project(student_feat, projector)
    if p.shape != teacher_feat.shape:
        raise ValueError(f"vkd_feature_loss: projected student {tuple(p.shape)} vs teacher "
                         f"{tuple(teacher_feat.shape)}; set the projector's output width to the teacher's")
    with torch.autocast(device_type=p.device.type, enabled=False):
        target = normalize_features(teacher_feat.detach(), norm, eps=eps, mask=mask)
        pred = normalize_features(p, student_norm, eps=eps, mask=mask)
        err = F.smooth_l1_loss(pred, target, reduction="none", beta=beta)
        if mask is None:
            return err.mean()
        m = mask.to(err.dtype).unsqueeze(-1)
        return (err * m).sum() / (m.sum() * err.shape[-1]).clamp(min=1.0)
