"""Choosing ``n`` images of a scored wild pool (Attention Probe / DFND selection).

The reference (``get_positive``) keeps the ``num_select`` smallest values of either ``s_out`` (when
its inverted ``--attnprobe_sel`` flag is given, as in every published command) or
``α·(s_3 + s_7) + β·s_out``. Here the mode is explicit:

============  ===========================================================
mode          value ranked (smallest kept)
============  ===========================================================
confidence    ``s_out`` (DFND; what the published recipe actually runs)
attention     ``Σ_blocks s_blk`` (attention probe alone)
combined      ``α · Σ_blocks s_blk + β · s_out`` (α = 0.05, β = 0.9)
random        seeded uniform random keys (the reference's ``--random``)
============  ===========================================================

``class_balanced=True`` spreads the ``n`` picks evenly over the teacher's predicted classes
(not in the reference; useful when the teacher is confident on a few classes only).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Optional, Union

import torch
from torch import Tensor

from kdforge.selection.scores import combined_scores

MODES = ("confidence", "attention", "combined", "random")
ScoresLike = Union[Mapping, Tensor]


def selection_value(scores: ScoresLike, mode: str, alpha: float = 0.05, beta: float = 0.9,
                    seed: int = 0) -> Tensor:
    """The (M,) float value that ``mode`` ranks (smallest = selected first).

    Args:
        scores: a mapping with ``"confidence"`` (M,) and/or ``"attention"`` (n_blocks, M) (such as
            a :class:`kdforge.selection.ScoreTable`), or a plain (M,) tensor taken as the value itself.
        mode: one of ``confidence | attention | combined | random``.
    """
    if mode not in MODES:
        raise ValueError(f"selection mode must be one of {', '.join(MODES)}; got {mode!r}")
    if isinstance(scores, Tensor):
        if scores.ndim != 1:
            raise ValueError(f"select: a plain score tensor must be (M,), got shape {tuple(scores.shape)}")
        m = scores.shape[0]
        value = scores.float()
    else:
        if "confidence" in scores:
            m = scores["confidence"].shape[0]
        elif "attention" in scores:
            m = scores["attention"].shape[-1]
        else:
            raise ValueError("select: scores hold neither 'confidence' nor 'attention'")
        if mode == "confidence":
            value = _need(scores, "confidence", mode).float()
        elif mode == "attention":
            att = _need(scores, "attention", mode).float()
            value = att.sum(0) if att.ndim == 2 else att
        elif mode == "combined":
            value = combined_scores(_need(scores, "attention", mode), _need(scores, "confidence", mode), alpha, beta)
        else:
            value = None
    if mode == "random":
        g = torch.Generator().manual_seed(int(seed))
        return torch.rand(m, generator=g, dtype=torch.float64).float()
    if torch.isnan(value).any():
        raise ValueError(f"select: {int(torch.isnan(value).sum())} scores are NaN; the scoring pass is incomplete "
                         "or broken")
    return value


def _need(scores: Mapping, key: str, mode: str) -> Tensor:
    if key not in scores:
        hint = " (the scoring pass ran without attention blocks: a CNN teacher or blocks=())" if key == "attention" else ""
        raise ValueError(f"select: mode {mode!r} needs '{key}' scores{hint}")
    return scores[key]


def balanced_quotas(class_sizes: Tensor, n: int) -> Tensor:
    """Split ``n`` picks over classes as evenly as their sizes allow (water filling).

    Classes are visited from smallest to largest; each gets ``min(size, remaining // classes_left)``,
    so a class too small for an equal share gives its surplus to the larger ones and the quotas
    sum to exactly ``n`` (requires ``n ≤ Σ sizes``). (K,) long -> (K,) long.
    """
    sizes = class_sizes.long()
    total = int(sizes.sum())
    if n > total:
        raise ValueError(f"select: cannot pick {n} images from {total}")
    quotas = torch.zeros_like(sizes)
    remaining = n
    order = torch.sort(sizes, stable=True).indices
    k = len(order)
    for i, c in enumerate(order.tolist()):
        q = min(int(sizes[c]), remaining // (k - i))
        quotas[c] = q
        remaining -= q
    return quotas


def select(scores: ScoresLike, n: int, mode: str = "combined", predictions: Optional[Tensor] = None,
           class_balanced: bool = False, seed: int = 0, alpha: float = 0.05, beta: float = 0.9) -> Tensor:
    """Indices of the ``n`` images with the smallest selection value.

    Args:
        scores: mapping with ``"confidence"`` (M,), ``"attention"`` (n_blocks, M) and optionally
            ``"predictions"`` (M,), or a plain (M,) value tensor (see :func:`selection_value`).
        n: number of images to keep (0 ≤ n ≤ M).
        mode: ``confidence | attention | combined | random`` (see the module docstring).
        predictions: (M,) teacher argmax, needed for ``class_balanced`` (default:
            ``scores["predictions"]``).
        class_balanced: pick ``n/K`` per predicted class (:func:`balanced_quotas`), the smallest
            values within each class.
        seed: seed of the ``random`` mode (the only random part).
        alpha, beta: weights of the ``combined`` mode.
    Returns:
        (n,) int64 pool indices ordered by increasing value (ties: smaller index first).
    """
    value = selection_value(scores, mode, alpha, beta, seed)
    m = value.shape[0]
    n = int(n)
    if not 0 <= n <= m:
        raise ValueError(f"select: n must be in [0, {m}] (the pool size), got {n}")
    if isinstance(scores, Mapping) and "valid" in scores:  # unreadable images are never selected
        valid = scores["valid"].bool().cpu()
        if n > int(valid.sum()):
            raise ValueError(f"select: n={n} but only {int(valid.sum())} of {m} pool images are readable")
        value = torch.where(valid, value, torch.full_like(value, float("inf")))
    order = torch.sort(value, stable=True).indices
    if not class_balanced:
        return order[:n].clone()
    if predictions is None:
        if isinstance(scores, Mapping) and "predictions" in scores:
            predictions = scores["predictions"]
        else:
            raise ValueError("select: class_balanced=True needs the teacher's predictions")
    pred = predictions.long().cpu()
    if pred.shape != (m,):
        raise ValueError(f"select: predictions {tuple(pred.shape)} do not match {m} scores")
    eligible = value != float("inf")  # +inf marks unreadable images
    classes, sizes = torch.unique(pred[eligible], return_counts=True)
    quotas = balanced_quotas(sizes, n)
    ranked_pred = torch.where(eligible, pred, torch.full_like(pred, -2))[order]
    keep = torch.zeros(m, dtype=torch.bool)
    for c, q in zip(classes.tolist(), quotas.tolist()):
        if q:
            keep[order[ranked_pred == c][:q]] = True
    return order[keep[order]].clone()
