"""Attention Probe distillation losses (ICASSP 2022) and DFND's noise adaptation (CVPR 2021).

* :func:`probe_loss` — MSE between teacher and student CLS→patch similarity rows of block features.
* :func:`robust_kd_kl` / :func:`class_weights_from_mass` — the optional class-weighted ("robust") KD.
* :func:`noise_adaptation_matrix` / :class:`NoiseAdaptation` — the learned label-noise transition
  matrix of DFND ("Learning Student Networks in the Wild"), trained on the teacher's hard labels.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdforge.losses.kd import kd_kl_rows

NORMALIZE = ("channel", "token")


def _stack(feats: Tensor | Sequence[Tensor]) -> Tensor:
    if isinstance(feats, (list, tuple)):
        return torch.stack(list(feats))
    return feats


def probe_rows(feats: Tensor | Sequence[Tensor], normalize: str = "channel", eps: float = 1e-12) -> Tensor:
    """CLS-row similarities ``r = (F̂ F̂ᵀ)[:, :, 0, 1:]`` of block features.

    Args:
        feats: (L, B, N, C) block outputs (token 0 = CLS), or a list of L (B, N, C).
        normalize: ``"channel"`` — each token's C-vector is L2-normalised, so ``r`` is the cosine
            between the CLS token and every patch token (in [−1, 1]); ``"token"`` — each channel's
            N-vector is L2-normalised (``F.normalize(dim=2)``, the reference code), so ``r`` scales
            with C.
    Returns:
        (L, B, N−1) float32.
    """
    f = _stack(feats).float()
    if f.ndim != 4:
        raise ValueError(f"probe_rows: expected features (L, B, N, C), got shape {tuple(f.shape)}")
    if normalize == "channel":
        f = F.normalize(f, dim=-1, eps=eps)
    elif normalize == "token":
        f = F.normalize(f, dim=2, eps=eps)
    else:
        raise ValueError(f"probe_loss: normalize must be one of {NORMALIZE}, got {normalize!r}")
    return (f[:, :, :1] @ f[:, :, 1:].transpose(-2, -1)).squeeze(2)


def probe_loss(teacher_feats: Tensor | Sequence[Tensor], student_feats: Tensor | Sequence[Tensor],
               normalize: str = "channel") -> Tensor:
    """Attention Probe's probe-distillation loss (``patch_attention_probe_loss``).

    ``L = Σ_{l,b,j} (r_T[l,b,j] − r_S[l,b,j])² / (L · B · (N−1))`` with ``r`` from
    :func:`probe_rows`: the similarity of the CLS token to each patch token at each tapped block.
    Teacher and student widths may differ (C_T ≠ C_S); token counts N must match.

    Args:
        teacher_feats, student_feats: (L, B, N, C_T) / (L, B, N, C_S) or lists of (B, N, C).
        normalize: ``"channel"`` (default; cosine, width-independent) or ``"token"`` (the
            reference code's ``F.normalize(dim=2)``, which makes ``r`` grow with C).
    Returns:
        0-d float32 tensor. Golden value (L = B = 1, N = C = 2): T = [[1,0],[0,1]],
        S = [[1,0],[1,0]] give 1.0 with ``channel`` and 0.25 with ``token``.
    """
    t = _stack(teacher_feats)
    s = _stack(student_feats)
    if t.ndim != 4 or s.ndim != 4 or t.shape[:3] != s.shape[:3]:
        raise ValueError(f"probe_loss: teacher {tuple(t.shape)} and student {tuple(s.shape)} features must be "
                         "(L, B, N, C) with the same L, B and N (same number of taps and tokens)")
    r_t = probe_rows(t.detach(), normalize)
    r_s = probe_rows(s, normalize)
    return F.mse_loss(r_s, r_t)


def noise_adaptation_matrix(theta: Tensor, teacher_acc: float | Tensor) -> Tensor:
    """DFND's row-stochastic K×K noise-transition matrix ``Q``.

    ``Q[i, i] = a`` (the teacher's accuracy) and the off-diagonal entries of row i, in increasing
    column order skipping i, are ``(1 − a) · softmax(θ[i])``. At θ = 0 every off-diagonal entry is
    ``(1 − a)/(K − 1)``; as ``a → 1`` ``Q → I``. Vectorised (the reference loops over rows).

    Args:
        theta: (K, K−1) logits.
        teacher_acc: a in (0, 1].
    Returns:
        (K, K) with rows summing to 1, differentiable in θ.
    """
    K = theta.shape[0]
    if theta.ndim != 2 or theta.shape[1] != K - 1:
        raise ValueError(f"noise_adaptation_matrix: theta must be (K, K-1), got {tuple(theta.shape)}")
    a = torch.as_tensor(teacher_acc, dtype=theta.dtype, device=theta.device)
    off = (1 - a) * torch.softmax(theta, dim=-1)                                   # (K, K-1)
    j = torch.arange(K - 1, device=theta.device)
    cols = j[None, :] + (j[None, :] >= torch.arange(K, device=theta.device)[:, None]).long()  # skip i
    q = torch.zeros(K, K, dtype=theta.dtype, device=theta.device).scatter(1, cols, off)
    return q + a * torch.eye(K, dtype=theta.dtype, device=theta.device)


class NoiseAdaptation(nn.Module):
    """DFND noise adaptation: ``L_NA = −(1/B) Σ_b log[(softmax(z_s[b]) · Q)[ŷ_b]]``.

    The student's clean-label distribution ``softmax(z_s)`` (B, K) is mapped through the learned
    noise matrix ``Q`` (:func:`noise_adaptation_matrix`) to the distribution of the teacher's
    noisy hard labels ``ŷ = argmax z_t`` (B,). ``theta`` (K, K−1) starts at zero and, in the
    reference, is trained by its own Adam (lr 1e-3, no weight decay) on the same backward pass.

    Args:
        num_classes: K ≥ 2.
        teacher_acc: the teacher's accuracy a ∈ (0, 1] (reference: 0.9665 CIFAR-10, 0.7630 CIFAR-100).
    """

    def __init__(self, num_classes: int, teacher_acc: float):
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"NoiseAdaptation: num_classes must be >= 2, got {num_classes}")
        if not 0 < teacher_acc <= 1:
            raise ValueError(f"NoiseAdaptation: teacher_acc must be in (0, 1], got {teacher_acc}")
        self.num_classes = num_classes
        self.teacher_acc = float(teacher_acc)
        self.theta = nn.Parameter(torch.zeros(num_classes, num_classes - 1))

    def matrix(self) -> Tensor:
        """The current (K, K) noise matrix."""
        return noise_adaptation_matrix(self.theta, self.teacher_acc)

    def forward(self, student_logits: Tensor, teacher_labels: Tensor, eps: float = 1e-12) -> Tensor:
        """student_logits (B, K), teacher_labels (B,) int -> 0-d loss (float32)."""
        q = self.matrix().float()
        p_noisy = torch.softmax(student_logits.float(), dim=-1) @ q                # (B, K)
        picked = p_noisy.gather(1, teacher_labels.long()[:, None]).squeeze(1)
        return -torch.log(picked.clamp_min(eps)).mean()

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, teacher_acc={self.teacher_acc}"


def class_weights_from_mass(mass: Tensor, eps: float = 1e-12) -> Tensor:
    """Attention Probe's robust-KD class weights ``w_c = (1/S_c) / Σ_j (1/S_j) · K``.

    ``S_c`` is the teacher's soft class mass (Σ over images of ``softmax(z_t)_c``), so rarely
    predicted classes get large weights; the weights sum to K. (K,) -> (K,) float32.
    Golden: S = [2, 1, 1] -> [0.6, 1.2, 1.2].
    """
    inv = 1.0 / mass.float().clamp_min(eps)
    return inv / inv.sum() * mass.shape[0]


def robust_kd_kl(student_logits: Tensor, teacher_logits: Tensor, class_weights: Tensor,
                 temperature: float = 4.0) -> Tensor:
    """Class-weighted KD (``robust_kdloss``): ``T² · (1/B) Σ_b w[ŷ_b] · KL(softmax(t_b/T) ‖ softmax(s_b/T))``.

    ``ŷ_b = argmax t_b`` is the teacher's prediction; ``class_weights`` (K,). With all weights 1
    this equals :func:`kdforge.losses.kd_kl`. Logits (B, K) -> 0-d float32. (The reference keeps
    an unseeded randomly perturbed copy of the weights; the weights are used as given here.)
    """
    kl = kd_kl_rows(student_logits, teacher_logits, temperature, "robust_kd_kl")    # (B,), T² included
    w = class_weights.to(kl.device, kl.dtype)[teacher_logits.argmax(-1)]
    return (w * kl).mean()
