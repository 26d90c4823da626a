"""Instance-discrimination retrieval accuracy (SSL-small §2(b), ``eval.instdisc``).

For query a_i the candidates are its positive b_i and every other query a_j (j ≠ i); similarity is
cosine. The query scores a hit at k when b_i ranks within the top k of those N candidates, i.e. when
fewer than k distractors a_j score strictly higher than b_i (a tie goes to the positive). This is
what the reference computes by leaving a_i's own self-match in the list and shifting k by one;
here the self-match is simply excluded, and the accuracy is the mean over all queries (the
reference averaged per-chunk percentages, which weights a short last chunk wrongly).

Modes of the reference: ``d-sd`` = originals (view 0) vs augmented view 1; ``sd-sd`` = view 1 vs
view 2 — pick the two feature sets accordingly.
"""
from __future__ import annotations

import torch
from torch import Tensor

from kdforge.eval._common import as_float, l2_normalize


def instdisc_topk(queries: Tensor, positives: Tensor, topk: int = 5, chunk: int = 1024) -> list[float]:
    """Top-1..top-k instance retrieval accuracies (%).

    Args:
        queries: (N, D) features a_i (L2-normalised inside: cosine similarity).
        positives: (N, D) features b_i, the positive of a_i.
        topk: largest k.
        chunk: queries per block (memory ``chunk × N``).

    Returns:
        ``[acc@1, …, acc@topk]`` in percent.
    """
    a, b = l2_normalize(as_float(queries)), l2_normalize(as_float(positives))
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"queries and positives must both be (N, D); got {tuple(a.shape)}, {tuple(b.shape)}")
    n = a.shape[0]
    if n < 2:
        raise ValueError("instdisc_topk needs at least 2 queries")
    rank = torch.empty(n, dtype=torch.long, device=a.device)
    for s in range(0, n, chunk):
        ab = a[s:s + chunk]
        pos = (ab * b[s:s + chunk]).sum(1, keepdim=True)                   # (c, 1)
        sim = ab @ a.T                                                     # (c, N) distractors
        rows = torch.arange(ab.shape[0], device=a.device)
        sim[rows, rows + s] = float("-inf")                                # drop the self-match
        rank[s:s + chunk] = (sim > pos).sum(1)                             # distractors above the positive
    return [(rank < k).double().mean().item() * 100.0 for k in range(1, topk + 1)]
