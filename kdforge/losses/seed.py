"""SEED: self-supervised distillation by matching similarity distributions over a queue.

Fang et al., "SEED: Self-supervised Distillation For Visual Representation" (ICLR 2021) — the
"distillation signal" that the SSL-small paper (Shi et al., AAAI 2022) warm-starts from.

For a batch of one view of each image, with s_i the L2-normalised student embedding (N, D), t_i the
L2-normalised teacher embedding (N, D) and a queue of K teacher embeddings d_1…d_K (K, D), the
teacher itself is prepended as an extra anchor, D⁺ = [t_i; d_1; …; d_K]:

    p_T(i) = softmax_j(⟨t_i, D⁺_j⟩ / τ_T)      (teacher, sharp: τ_T = 1e-4 in the reference code)
    p_S(i) = softmax_j(⟨s_i, D⁺_j⟩ / τ_S)      (student, τ_S = 0.2)
    L = mean_i Σ_j −p_T(i)_j · log p_S(i)_j    (soft cross-entropy)

The queue then receives the teacher embeddings t (all ranks).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def seed_logits(emb: Tensor, anchor: Tensor, queue: Tensor) -> Tensor:
    """Similarities ``[⟨emb_i, anchor_i⟩, ⟨emb_i, queue_1⟩, …, ⟨emb_i, queue_K⟩]`` — (N, 1 + K),
    float32, not divided by a temperature. emb, anchor (N, D); queue (K, D)."""
    e = emb.float()
    pos = (e * anchor.float()).sum(dim=1, keepdim=True)
    return torch.cat([pos, e @ queue.detach().float().t()], dim=1)


def seed_loss(student: Tensor, teacher: Tensor, queue: Tensor, student_temperature: float = 0.2,
              teacher_temperature: float = 1e-4) -> tuple[Tensor, Tensor, Tensor]:
    """SEED soft cross-entropy between teacher and student similarity distributions.

    Args:
        student: (N, D) L2-normalised student embeddings (gradient flows).
        teacher: (N, D) L2-normalised teacher embeddings (detached).
        queue: (K, D) L2-normalised teacher embeddings of earlier batches (detached).
        student_temperature: τ_S (0.2).
        teacher_temperature: τ_T (1e-4 in the reference code: nearly one-hot on the teacher itself).

    Returns:
        ``(loss, student_logits, teacher_probs)``: the scalar mean over the batch of
        ``Σ_j −p_T,j · log p_S,j``; the student logits (N, 1 + K) already divided by τ_S and the
        teacher probabilities (N, 1 + K), both float32. The anchor column 0 is ⟨s_i, t_i⟩ for the
        student and ⟨t_i, t_i⟩ = 1 for the teacher.
    """
    if student.ndim != 2 or student.shape != teacher.shape:
        raise ValueError(f"seed_loss: student and teacher must both be (N, D); got {tuple(student.shape)} "
                         f"and {tuple(teacher.shape)} (set the student head's output dim to the teacher's)")
    if queue.ndim != 2 or queue.shape[1] != student.shape[1]:
        raise ValueError(f"seed_loss: queue must be (K, {student.shape[1]}); got {tuple(queue.shape)}")
    if student_temperature <= 0 or teacher_temperature <= 0:
        raise ValueError("seed_loss: temperatures must be > 0, got "
                         f"τ_S={student_temperature}, τ_T={teacher_temperature}")
    t = teacher.detach()
    s_logits = seed_logits(student, t, queue) / student_temperature
    with torch.no_grad():
        t_probs = F.softmax(seed_logits(t, t, queue) / teacher_temperature, dim=1)
    loss = -(t_probs * F.log_softmax(s_logits, dim=1)).sum(dim=1).mean()
    return loss, s_logits, t_probs
