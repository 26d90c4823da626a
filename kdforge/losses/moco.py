"""MoCo contrastive loss and key queue.

He et al., "Momentum Contrast for Unsupervised Visual Representation Learning" (CVPR 2020),
Chen et al., "Improved Baselines with Momentum Contrastive Learning" (MoCo-v2, 2020), as used by
Shi et al., "On the Efficacy of Small Self-Supervised Contrastive Models without Distillation
Signals" (AAAI 2022). See ``shared/methods/sslsmall.md`` §1.3.

Shapes: N = per-process batch, B = global batch (all ranks), D = embedding dim, K = queue length.
Unlike the reference code (queue stored as (D, K)), the queue here is stored row-wise as (K, D).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def moco_infonce(q: Tensor, k: Tensor, queue: Tensor, temperature: float = 0.1) -> tuple[Tensor, Tensor]:
    """InfoNCE over one positive key and a queue of negatives (MoCo).

    ``logits_i = [⟨q_i, k_i⟩, ⟨q_i, queue_1⟩, …, ⟨q_i, queue_K⟩] / T`` — shape (N, 1 + K), the
    positive at index 0 — and ``loss = mean_i −log softmax(logits_i)_0`` (cross-entropy with label 0).

    Args:
        q: (N, D) L2-normalised queries (gradient flows through them).
        k: (N, D) L2-normalised positive keys (treated as constants: detached).
        queue: (K, D) L2-normalised negative keys (detached).
        temperature: T > 0 (0.2 in MoCo-v2, 0.1 in the SSL-small recipe).

    Returns:
        ``(loss, logits)``: a scalar and the (N, 1 + K) logits, both float32 (computed in float32
        even under autocast, so T = 0.1 cannot overflow half precision).
    """
    if q.ndim != 2 or k.shape != q.shape:
        raise ValueError(f"moco_infonce: q and k must both be (N, D); got {tuple(q.shape)} and {tuple(k.shape)}")
    if queue.ndim != 2 or queue.shape[1] != q.shape[1]:
        raise ValueError(f"moco_infonce: queue must be (K, {q.shape[1]}); got {tuple(queue.shape)}")
    if temperature <= 0:
        raise ValueError(f"moco_infonce: temperature must be > 0, got {temperature}")
    qf = q.float()
    l_pos = (qf * k.detach().float()).sum(dim=1, keepdim=True)      # (N, 1)
    l_neg = qf @ queue.detach().float().t()                          # (N, K)
    logits = torch.cat([l_pos, l_neg], dim=1) / temperature          # (N, 1 + K)
    labels = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
    return F.cross_entropy(logits, labels), logits


@torch.no_grad()
def positive_rank_accuracy(logits: Tensor, topk: Sequence[int] = (1, 5)) -> list[Tensor]:
    """(K+1)-way instance-discrimination accuracy (%) of the positive at index 0.

    For each ``k`` in ``topk``: ``100 · mean_i [ 0 ∈ top-k(logits_i) ]`` — the "Acc@1/5" that MoCo
    logs. ``logits`` (N, 1 + K); returns a list of 0-d tensors.
    """
    maxk = min(max(topk), logits.shape[1])
    top = logits.topk(maxk, dim=1).indices                            # (N, maxk)
    hit = top == 0
    return [100.0 * hit[:, :min(k, maxk)].any(dim=1).float().mean() for k in topk]


class KeyQueue(nn.Module):
    """A FIFO queue of K L2-normalised keys of dimension D (MoCo's dictionary).

    Buffers (saved in checkpoints): ``keys`` (K, D) float, initialised as row-normalised
    ``randn`` from the global torch RNG, and ``ptr`` (a 0-d long tensor), the next row to write.

    :meth:`enqueue` writes a global batch of B keys at rows ``ptr … ptr+B−1`` and moves
    ``ptr ← (ptr + B) mod K`` (wrap-around). As in MoCo, K must be a multiple of B so that every
    write is one contiguous block; anything else raises :class:`ValueError` naming both numbers.
    """

    def __init__(self, dim: int, size: int):
        super().__init__()
        if dim <= 0 or size <= 0:
            raise ValueError(f"KeyQueue: dim and size must be positive, got dim={dim}, size={size}")
        self.dim, self.size = int(dim), int(size)
        self.register_buffer("keys", F.normalize(torch.randn(self.size, self.dim), dim=1))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    def check_batch(self, global_batch: int) -> None:
        """Raise ``ValueError`` unless K is a multiple of the global batch B."""
        if global_batch <= 0 or self.size % global_batch != 0:
            raise ValueError(f"queue size K={self.size} must be a multiple of the global batch B={global_batch} "
                             f"(B = per-rank batch × world size); choose K = {max(global_batch, 1)}·n "
                             "or change the batch size (and keep drop_last on)")

    @torch.no_grad()
    def reset_(self) -> None:
        """Refill with fresh row-normalised Gaussian noise and rewind the pointer."""
        self.keys.copy_(F.normalize(torch.randn_like(self.keys), dim=1))
        self.ptr.zero_()

    @torch.no_grad()
    def enqueue(self, keys: Tensor) -> None:
        """Replace the oldest B rows with ``keys`` (B, D) — the keys of *all* ranks (gathered by
        the caller) — and advance the pointer modulo K."""
        if keys.ndim != 2 or keys.shape[1] != self.dim:
            raise ValueError(f"KeyQueue.enqueue: expected keys of shape (B, {self.dim}), got {tuple(keys.shape)}")
        b = keys.shape[0]
        self.check_batch(b)
        p = int(self.ptr)
        self.keys[p:p + b] = keys.detach().to(self.keys.dtype)
        self.ptr.fill_((p + b) % self.size)

    def forward(self) -> Tensor:
        """The current keys (K, D), detached."""
        return self.keys.detach()

    def extra_repr(self) -> str:
        return f"size={self.size}, dim={self.dim}"
