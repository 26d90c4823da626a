"""Per-image scores of a frozen teacher on an unlabeled wild pool (Attention Probe, ICASSP 2022).

All scores are "smaller = more wanted": :func:`kdforge.selection.select` keeps the ``n`` smallest.

* :func:`confidence_scores` — the DFND / Attention Probe "outlier" score
  ``s_out = CE(z, argmax z) = logsumexp(z) − max_k z_k = −log max_k softmax(z)_k`` (≥ 0; 0 = certain).
* :func:`attention_probe_scores` — cosine similarity between the CLS→patch attention row ``p`` and
  the uniform vector ``u``: ``s_blk = Σ_j p_j / (√P · ‖p‖₂)`` over the P patch tokens. It lies in
  ``[1/√P, 1]``: 1 for perfectly diffuse (uniform) attention, ``1/√P`` for one-hot attention. With
  N tokens counting the CLS token (and no other prefix token), P = N − 1, so one-hot gives
  ``1/√(N−1)`` (0.125 for the 65-token CIFAR ViT, 1/14 ≈ 0.0714 for a 197-token ViT-B/16).
* :func:`combined_scores` — ``α · Σ_blocks s_blk + β · s_out`` (α = 0.05, β = 0.9 as in the
  reference, which sums blocks 3 and 7).
"""
from __future__ import annotations

import math
from typing import Sequence, Union

import torch
from torch import Tensor

HeadMode = Union[str, int]
HEAD_MODES = ("mean", "mean_score", "max_score")


def confidence_scores(teacher_logits: Tensor) -> Tensor:
    """Teacher "outlier" score: cross-entropy of the logits against their own argmax.

    ``s_out[b] = logsumexp_k z[b, k] − max_k z[b, k] = −log max_k softmax(z[b])_k``.

    Args:
        teacher_logits: (B, K) teacher logits (any float dtype; computed in float32).
    Returns:
        (B,) float32 scores ≥ 0; small = confident teacher. The prediction is ``argmax(z, -1)``.
    """
    if teacher_logits.ndim != 2:
        raise ValueError(f"confidence_scores: expected logits (B, K), got shape {tuple(teacher_logits.shape)}")
    z = teacher_logits.float()
    return torch.logsumexp(z, dim=-1) - z.max(dim=-1).values


def _cosine_to_uniform(p: Tensor, eps: float = 1e-12) -> Tensor:
    """cos(p, 1) along the last axis: ``Σ p / (√P · ‖p‖₂)``. p (..., P) -> (...)."""
    P = p.shape[-1]
    return p.sum(-1) / (math.sqrt(P) * p.norm(dim=-1).clamp_min(eps))


def attention_probe_scores(cls_attention: Tensor | Sequence[Tensor], head: HeadMode = "mean") -> Tensor:
    """Attention-probe score: cosine between the CLS→patch attention row and the uniform vector.

    ``s = Σ_j p_j / (√P · ‖p‖₂)`` where ``p`` (P,) is the CLS query's softmax attention over the P
    patch tokens (CLS→CLS and other prefix tokens dropped, not renormalised: the cosine is scale
    invariant). Range ``[1/√P, 1]``: uniform attention → 1, one-hot → ``1/√P`` = ``1/√(N−1)`` for
    N tokens including one CLS token. Small = peaked, object-focused attention.

    Args:
        cls_attention: (B, H, P) attention of one block (H heads), or (B, P) for an already
            reduced row, or a sequence of per-block (B, H, P) tensors (as returned by
            :func:`kdforge.models.taps.cls_attention`).
        head: how the H heads are combined:
            ``"mean"`` (default) — average the attention rows over heads, then take the cosine
            (the CLS row of the head-averaged attention map);
            ``"mean_score"`` / ``"max_score"`` — cosine per head, then mean / max over heads;
            an int ``h`` — head ``h`` only (``0`` reproduces the reference code, which probes head 0).
    Returns:
        (B,) float32 for one block, (n_blocks, B) for a sequence of blocks.
    """
    if isinstance(cls_attention, (list, tuple)):
        if not cls_attention:
            raise ValueError("attention_probe_scores: empty list of blocks")
        return torch.stack([attention_probe_scores(a, head) for a in cls_attention])
    a = cls_attention.float()
    if a.ndim == 2:
        return _cosine_to_uniform(a)
    if a.ndim != 3:
        raise ValueError(f"attention_probe_scores: expected (B, H, P) or (B, P), got shape {tuple(a.shape)}")
    if isinstance(head, bool) or not isinstance(head, (int, str)):
        raise ValueError(f"attention_probe_scores: head must be one of {HEAD_MODES} or a head index, got {head!r}")
    if isinstance(head, int):
        H = a.shape[1]
        if not -H <= head < H:
            raise ValueError(f"attention_probe_scores: head {head} out of range for {H} heads")
        return _cosine_to_uniform(a[:, head])
    if head == "mean":
        return _cosine_to_uniform(a.mean(dim=1))
    if head == "mean_score":
        return _cosine_to_uniform(a).mean(dim=1)
    if head == "max_score":
        return _cosine_to_uniform(a).amax(dim=1)
    raise ValueError(f"attention_probe_scores: head must be one of {HEAD_MODES} or a head index, got {head!r}")


def combined_scores(attention: Tensor, confidence: Tensor, alpha: float = 0.05, beta: float = 0.9) -> Tensor:
    """Attention Probe's selection value ``α · Σ_blocks s_blk + β · s_out``.

    Args:
        attention: (n_blocks, M) attention-probe scores (or (M,) for one block). The reference
            uses blocks 3 and 7, i.e. ``α · (s_3 + s_7)``.
        confidence: (M,) :func:`confidence_scores`.
        alpha, beta: weights (reference: ``--attnlier 0.05``, ``--outlier 0.9``).
    Returns:
        (M,) float32; the selection keeps the smallest values.
    """
    att = attention.float()
    if att.ndim == 1:
        att = att[None]
    if att.ndim != 2 or att.shape[1] != confidence.shape[0]:
        raise ValueError(f"combined_scores: attention {tuple(attention.shape)} does not match confidence "
                         f"{tuple(confidence.shape)}; expected (n_blocks, M) and (M,)")
    return alpha * att.sum(0) + beta * confidence.float()
