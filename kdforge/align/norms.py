"""Task-specific feature normalisations of VkD (Miles, Elezi & Deng, CVPR 2024).

VkD normalises the distillation *target* so that the projected student only has to match its shape,
not its scale (``shared/methods/vkd.md`` §1.5, §1.7). All functions take features with the channel
axis last, ``x`` (…, C), compute in float32 and return float32 of the same shape.

* ``"layernorm"`` — classification: per sample (per row) over channels, no affine::

      x̂ = (x - mean_c x) / sqrt(var_c x + eps),   var biased, eps = 1e-5 (``F.layer_norm``)

* ``"channel"`` — dense/detection: per channel over rows (every leading axis is a row axis),
  i.e. BatchNorm-style statistics without affine::

      x̂ = (x - mean_r x) / sqrt(var_r x + eps)

  ``eps`` keeps constant channels finite (the reference divides by the unbiased std with no eps and
  returns NaN there); ``unbiased=True, eps=0`` reproduces the reference exactly. An optional boolean
  ``mask`` (…) marks the valid rows (e.g. non-padded pixels): statistics use valid rows only; invalid
  rows are still transformed with those statistics (mask them out of the loss).
* ``"none"`` — identity (in float32).
"""
from __future__ import annotations

from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor

NORMS = ("layernorm", "channel", "none")


def layer_norm_features(x: Tensor, eps: float = 1e-5) -> Tensor:
    """Per-row LayerNorm over the last axis without affine: ``(x - mean) / sqrt(var + eps)``.

    ``x`` (…, C) -> (…, C) float32; biased variance.
    """
    return F.layer_norm(x.float(), x.shape[-1:], eps=eps)


def channel_standardize(x: Tensor, eps: float = 1e-5, mask: Optional[Tensor] = None,
                        unbiased: bool = False) -> Tensor:
    """Per-channel standardisation over rows: ``(x - mean_r x) / sqrt(var_r x + eps)``.

    Args:
        x: (…, C); all leading axes are rows.
        eps: added to the variance.
        mask: optional bool (…) — rows that enter the statistics (True = valid).
        unbiased: divide the sum of squares by (n - 1) instead of n (n = number of valid rows;
            the divisor is clamped to >= 1).

    Returns: (…, C) float32.
    """
    xf = x.float()
    C = xf.shape[-1]
    rows = xf.reshape(-1, C)
    if mask is None:
        w = torch.ones(rows.shape[0], 1, device=xf.device, dtype=xf.dtype)
    else:
        if mask.shape != xf.shape[:-1]:
            raise ValueError(f"channel_standardize: mask {tuple(mask.shape)} must match the row axes "
                             f"{tuple(xf.shape[:-1])} of x {tuple(xf.shape)}")
        w = mask.reshape(-1, 1).to(xf.dtype)
    n = w.sum()
    mean = (rows * w).sum(0) / n.clamp(min=1.0)
    var = (((rows - mean) ** 2) * w).sum(0) / (n - float(unbiased)).clamp(min=1.0)
    return ((rows - mean) / torch.sqrt(var + eps)).reshape(xf.shape)


def identity_norm(x: Tensor) -> Tensor:
    """No normalisation: ``x`` (…, C) as float32."""
    return x.float()


def normalize_features(x: Tensor, kind: Union[str, Callable, None] = "layernorm", eps: float = 1e-5,
                       mask: Optional[Tensor] = None) -> Tensor:
    """Apply normalisation ``kind`` ∈ {"layernorm", "channel", "none"} (or a callable ``f(x)``).

    ``mask`` is only used by ``"channel"`` (LayerNorm is per row; identity ignores it).
    """
    if callable(kind):
        return kind(x)
    if kind is None or kind == "none":
        return identity_norm(x)
    if kind == "layernorm":
        return layer_norm_features(x, eps=eps)
    if kind == "channel":
        return channel_standardize(x, eps=eps, mask=mask)
    raise ValueError(f"feature norm: expected one of {', '.join(NORMS)}, got {kind!r}")
