"""VkD dense (detection) feature distillation (Miles, Elezi & Deng, CVPR 2024; ViDT variant,
``shared/methods/vkd.md`` §1.7).

For every feature level l (an FPN output, or any (B, C, H, W) map), with student map ``S_l``, teacher
map ``T_l`` and a square projector ``P_l`` (orthogonal, then per-channel scale γ and shift β)::

    s_l = rows(S_l) · W_lᵀ ⊙ γ_l + β_l        rows: (B, C, H, W) -> (B·H·W, C)
    t_l = rows(T_l)
    ŝ_l = std_r(s_l),  t̂_l = std_r(t_l)          per channel over the valid rows r (mask M_l):
                                                 std_r(x) = (x - mean_r x) / sqrt(var_r x + eps)
    L   = Σ_l  mean_{r ∈ M_l, c} smoothL1_β(ŝ_l[r, c] - t̂_l[r, c])

with ``smoothL1_β(d) = 0.5 d² / β`` if ``|d| < β`` else ``|d| - 0.5 β`` (β = 1). The methods multiply L
by the distillation weight (4.0 in the reference).

Differences from the reference (``SetCriterion.forward``): padded pixels (``M_l`` false) are excluded
from the statistics *and* from the mean (the reference includes them, so the padding of the largest
image in the batch shifts everyone's statistics); ``eps`` (1e-5) keeps constant channels finite
(the reference divides by the unbiased std without eps: ``unbiased=True, eps=0`` reproduces it).
Note that the per-channel standardisation after the projector cancels γ and β up to sign
(and eps): as in the reference, they are effectively inert.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdforge.align.norms import channel_standardize


def feature_rows(x: Tensor) -> Tensor:
    """(B, C, H, W) -> (B, H, W, C): channel-last rows (every leading axis is a row axis)."""
    if x.ndim != 4:
        raise ValueError(f"expected a (B, C, H, W) feature map, got {tuple(x.shape)}")
    return x.permute(0, 2, 3, 1)


def padding_masks(image_sizes: Sequence[tuple[int, int]], padded_hw: tuple[int, int],
                  feature_hw: Sequence[tuple[int, int]]) -> list[Tensor]:
    """Valid-pixel masks per level for a padded batch.

    Image b occupies the top-left ``image_sizes[b] = (h_b, w_b)`` of the padded ``padded_hw = (H, W)``
    batch; on a level of size (H_l, W_l) its valid cells are ``i < ceil(h_b · H_l / H)`` and
    ``j < ceil(w_b · W_l / W)`` (a cell that touches the image is valid).

    Returns: one bool tensor (B, H_l, W_l) per level.
    """
    H, W = int(padded_hw[0]), int(padded_hw[1])
    out = []
    for hl, wl in feature_hw:
        hl, wl = int(hl), int(wl)
        m = torch.zeros(len(image_sizes), hl, wl, dtype=torch.bool)
        for b, (h, w) in enumerate(image_sizes):
            vh = min(hl, -(-int(h) * hl // H))
            vw = min(wl, -(-int(w) * wl // W))
            m[b, :vh, :vw] = True
        out.append(m)
    return out


def vkd_dense_level_loss(student: Tensor, teacher: Tensor, projector: Optional[nn.Module] = None,
                         mask: Optional[Tensor] = None, eps: float = 1e-5, beta: float = 1.0,
                         unbiased: bool = False) -> Tensor:
    """One level of :func:`vkd_dense_loss`.

    Args:
        student: (B, C_s, H, W); teacher: (B, C_t, H, W) (detached here).
        projector: maps C_s -> C_t on the last axis (e.g. ``OrthogonalProjector(C, C, scale_shift=True)``);
            None = identity.
        mask: bool (B, H, W), True = valid pixel (statistics and loss use valid pixels only).

    Returns: scalar float32.
    """
    if student.shape[0] != teacher.shape[0] or student.shape[-2:] != teacher.shape[-2:]:
        raise ValueError(f"vkd_dense: student {tuple(student.shape)} and teacher {tuple(teacher.shape)} maps "
                         "must share batch and spatial size (same input, same strides)")
    s = feature_rows(student)
    t = feature_rows(teacher.detach())
    if projector is not None:
        s = projector(s)
    if s.shape[-1] != t.shape[-1]:
        raise ValueError(f"vkd_dense: projected student width {s.shape[-1]} != teacher width {t.shape[-1]}")
    if mask is not None:
        mask = mask.to(device=s.device, dtype=torch.bool)
    s_hat = channel_standardize(s, eps=eps, mask=mask, unbiased=unbiased)
    t_hat = channel_standardize(t, eps=eps, mask=mask, unbiased=unbiased)
    per = F.smooth_l1_loss(s_hat, t_hat, reduction="none", beta=beta)  # (B, H, W, C)
    if mask is None:
        return per.mean()
    w = mask.unsqueeze(-1).to(per.dtype)
    return (per * w).sum() / (w.sum() * per.shape[-1]).clamp(min=1.0)


def vkd_dense_loss(student_feats: Sequence[Tensor], teacher_feats: Sequence[Tensor],
                   projectors: Optional[Sequence[nn.Module]] = None, masks: Optional[Sequence[Tensor]] = None,
                   eps: float = 1e-5, beta: float = 1.0, unbiased: bool = False) -> Tensor:
    """Sum over levels of :func:`vkd_dense_level_loss` (formula in the module docstring).

    Args:
        student_feats, teacher_feats: L maps each, (B, C, H_l, W_l), level by level.
        projectors: L modules (or None: identity everywhere).
        masks: L bool (B, H_l, W_l) valid-pixel masks (:func:`padding_masks`), or None.

    Returns: scalar float32 (unweighted sum).
    """
    if len(student_feats) != len(teacher_feats):
        raise ValueError(f"vkd_dense: {len(student_feats)} student levels vs {len(teacher_feats)} teacher levels")
    if projectors is not None and len(projectors) != len(student_feats):
        raise ValueError(f"vkd_dense: {len(projectors)} projectors for {len(student_feats)} levels")
    total = student_feats[0].new_zeros((), dtype=torch.float32)
    for i, (s, t) in enumerate(zip(student_feats, teacher_feats)):
        total = total + vkd_dense_level_loss(s, t, projectors[i] if projectors is not None else None,
                                             masks[i] if masks is not None else None, eps, beta, unbiased)
    return total
