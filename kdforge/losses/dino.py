"""DINO [CLS] self-distillation and iBOT masked-patch (MIM) distillation, with centring.

Papers: Caron et al., "Emerging Properties in Self-Supervised Vision Transformers" (DINO, ICCV 2021);
Zhou et al., "iBOT: Image BERT Pre-Training with Online Tokenizer" (ICLR 2022). Conventions follow
``shared/methods/smkd.md`` §1.6:

* ``H(p, s) = −Σ_k p_k · log_softmax(s)_k`` — cross-entropy of target distribution p against logits s;
* crop-major layout: rows ``[c·B, (c+1)·B)`` of a (V·B, ...) tensor belong to crop c, with the same
  image order in every crop; the G global crops come first, then the L local crops;
* teacher targets ``T = softmax((t − c) / τ_t)`` use the centre *before* this step's update and carry
  no gradient; student logits are divided by ``τ_s`` (0.1).

All losses are computed in float32, whatever the autocast dtype of the inputs.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def teacher_temperature(epoch: int, warmup_temp: float, temp: float, warmup_epochs: int,
                        start_epoch: int = 0) -> float:
    """Teacher temperature at ``epoch`` (DINO's warm-up, indexed by epoch).

    Held at ``warmup_temp`` for ``start_epoch`` epochs, then ``linspace(warmup_temp, temp,
    warmup_epochs)[e]`` for ``e = epoch − start_epoch < warmup_epochs`` (inclusive, so e = 0 gives
    ``warmup_temp`` and e = warmup_epochs − 1 gives ``temp``), then ``temp``. With 0.04 → 0.07 over 30
    epochs: epoch 3 gives 0.04 + 0.03·3/29.
    """
    e = int(epoch) - int(start_epoch)
    if e < 0:
        return float(warmup_temp)
    if e >= warmup_epochs:
        return float(temp)
    if warmup_epochs == 1:
        return float(warmup_temp)
    return float(warmup_temp) + (float(temp) - float(warmup_temp)) * e / (warmup_epochs - 1)


def teacher_probs(teacher_logits: Tensor, center: Tensor, temperature: float) -> Tensor:
    """``softmax((t − c) / τ)`` over the last axis, detached, float32.

    ``teacher_logits`` (..., K), ``center`` broadcastable to it ((1, K) or (1, 1, K)).
    """
    return F.softmax((teacher_logits.detach().float() - center.float()) / temperature, dim=-1)


def cross_entropy_soft(targets: Tensor, logits: Tensor) -> Tensor:
    """Elementwise ``H(p, s) = −Σ_k p_k · log_softmax(s)_k`` over the last axis: (..., K) -> (...)."""
    return -(targets * F.log_softmax(logits.float(), dim=-1)).sum(-1)


def dino_cls_loss(student_logits: Tensor, teacher_targets: Tensor, n_global: int,
                  student_temp: float = 0.1) -> Tensor:
    """DINO [CLS] loss over every (teacher global q, student crop v ≠ q) pair.

    ``L = Σ_{q<G} Σ_{v≠q, v<V} Σ_b H(T_q[b], S_v[b]/τ_s) / (G·(V−1)·B)``, i.e. the mean over the
    G·(V−1) pairs and the batch (22 pairs for 2 global + 10 local crops).

    Shapes: ``student_logits`` (V·B, K) crop-major (G globals, then locals); ``teacher_targets``
    (G·B, K) probabilities (see :func:`teacher_probs`). Returns a scalar.
    """
    G = int(n_global)
    if teacher_targets.shape[0] % G:
        raise ValueError(f"dino_cls_loss: {teacher_targets.shape[0]} teacher rows are not {G} crops of one batch")
    B = teacher_targets.shape[0] // G
    if student_logits.shape[0] % B:
        raise ValueError(f"dino_cls_loss: {student_logits.shape[0]} student rows are not a multiple of B = {B}")
    V = student_logits.shape[0] // B
    if V < 2:
        raise ValueError("dino_cls_loss: needs at least two crops")
    log_s = F.log_softmax(student_logits.float() / student_temp, dim=-1).view(V, B, -1)
    t = teacher_targets.float().view(G, B, -1)
    # Σ_b H(T_q[b], S_v[b]) for every (q, v): (G, V)
    ce = -torch.einsum("qbk,vbk->qv", t, log_s)
    keep = torch.ones(G, V, dtype=torch.bool, device=ce.device)
    keep[torch.arange(G), torch.arange(G)] = False
    return ce[keep].sum() / (G * (V - 1) * B)


def ibot_mim_loss(student_patch_logits: Tensor, teacher_patch_targets: Tensor, masks: Tensor,
                  student_temp: float = 0.1, average: str = "all_images") -> Tensor:
    """iBOT masked-image-modelling loss on masked patch positions.

    For crop i and image b with mask m (N,): ``ℓ_ib = Σ_p m_p · H(P_i[b,p], Z_i[b,p]/τ_s) / max(1, Σ_p m_p)``.
    ``average="all_images"`` (iBOT's definition): ``L = (1/G) Σ_i (1/B) Σ_b ℓ_ib`` — unmasked images
    add 0 and still count. ``average="masked_images"``: the mean of ``ℓ_ib`` over images with at least
    one masked patch (0 when there is none).

    Shapes: ``student_patch_logits`` (G·B, N, K); ``teacher_patch_targets`` (G·B, N, K) probabilities
    of the same crop (the teacher sees it unmasked); ``masks`` (G·B, N) or (G·B, h, w) bool with
    h·w = N. Returns a scalar. Note the G crops need no separate argument: rows are averaged equally.
    """
    rows, N = student_patch_logits.shape[:2]
    m = masks.reshape(rows, -1).to(student_patch_logits.device)
    if m.shape[1] != N:
        raise ValueError(f"ibot_mim_loss: masks have {m.shape[1]} cells per image, patch logits {N} tokens")
    m = m.float()
    ce = cross_entropy_soft(teacher_patch_targets.float(), student_patch_logits.float() / student_temp)  # (rows, N)
    count = m.sum(-1)
    per_image = (ce * m).sum(-1) / count.clamp(min=1.0)
    if average == "all_images":
        return per_image.mean()
    if average == "masked_images":
        has = count > 0
        return per_image[has].sum() / has.sum().clamp(min=1)
    raise ValueError(f"ibot_mim_loss: average must be 'all_images' or 'masked_images', got {average!r}")


@torch.no_grad()
def center_update_(center: Tensor, teacher_logits: Tensor, momentum: float) -> Tensor:
    """In place: ``c ← m·c + (1 − m)·mean(teacher_logits)`` over every axis but the last.

    The mean is over all rows (and tokens) of all ranks: ``Σ / count`` with both all-reduced, so W
    ranks with B rows each give the same centre as one process with W·B rows. ``center`` (1, K) for
    [CLS] logits (R, K), or (1, 1, K) for patch logits (R, N, K). Returns ``center``.
    """
    from kdforge.engine.distributed import all_reduce_sum
    x = teacher_logits.detach().float().reshape(-1, teacher_logits.shape[-1])
    total = all_reduce_sum(x.sum(0))
    count = all_reduce_sum(torch.tensor(float(x.shape[0]), device=x.device))
    mean = (total / count).to(center.dtype).view_as(center)
    center.mul_(momentum).add_(mean, alpha=1.0 - momentum)
    return center


class IBOTLoss(nn.Module):
    """The iBOT objective ``λ1·L_cls + λ3·L_mim`` with its two centres and temperature warm-ups.

    Buffers (checkpointed with the method): ``center`` (1, K) for [CLS] logits and ``center2``
    (1, 1, K) for patch logits, both starting at zero and updated after each call in training mode
    with momenta ``center_momentum`` / ``center_momentum2``.

    ``forward(student_cls, student_patch, teacher_cls, teacher_patch, masks, epoch)``:
    ``student_cls`` (V·B, K) global crops then local crops, ``student_patch`` (G·B, N, K) of the
    masked global crops, ``teacher_cls`` (G·B, K), ``teacher_patch`` (G·B, N, K), ``masks`` (G·B, N)
    bool. Returns ``{"loss", "cls", "mim"}`` (scalars; ``cls``/``mim`` already weighted by λ).
    """

    def __init__(self, out_dim: int, patch_out_dim: Optional[int] = None, n_global: int = 2,
                 warmup_teacher_temp: float = 0.04, teacher_temp: float = 0.07,
                 warmup_teacher_patch_temp: float = 0.04, teacher_patch_temp: float = 0.07,
                 warmup_teacher_temp_epochs: int = 30, student_temp: float = 0.1,
                 center_momentum: float = 0.9, center_momentum2: float = 0.9,
                 lambda1: float = 1.0, lambda3: float = 1.0, mim_start_epoch: int = 0,
                 mim_average: str = "all_images"):
        super().__init__()
        self.n_global = int(n_global)
        self.warmup_teacher_temp, self.teacher_temp = warmup_teacher_temp, teacher_temp
        self.warmup_teacher_patch_temp, self.teacher_patch_temp = warmup_teacher_patch_temp, teacher_patch_temp
        self.warmup_teacher_temp_epochs = int(warmup_teacher_temp_epochs)
        self.student_temp = float(student_temp)
        self.center_momentum, self.center_momentum2 = float(center_momentum), float(center_momentum2)
        self.lambda1, self.lambda3 = float(lambda1), float(lambda3)
        self.mim_start_epoch = int(mim_start_epoch)
        self.mim_average = mim_average
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.register_buffer("center2", torch.zeros(1, 1, patch_out_dim or out_dim))

    def temperatures(self, epoch: int) -> tuple[float, float]:
        """(τ_t for [CLS], τ_p for patches) at ``epoch``; τ_p waits ``mim_start_epoch`` epochs."""
        return (teacher_temperature(epoch, self.warmup_teacher_temp, self.teacher_temp,
                                    self.warmup_teacher_temp_epochs),
                teacher_temperature(epoch, self.warmup_teacher_patch_temp, self.teacher_patch_temp,
                                    self.warmup_teacher_temp_epochs, start_epoch=self.mim_start_epoch))

    def targets(self, teacher_cls: Tensor, teacher_patch: Optional[Tensor], epoch: int):
        """Centred, sharpened teacher targets (T (G·B, K), P (G·B, N, K) or None) at ``epoch``."""
        tau, tau_p = self.temperatures(epoch)
        t = teacher_probs(teacher_cls, self.center, tau)
        p = teacher_probs(teacher_patch, self.center2, tau_p) if teacher_patch is not None else None
        return t, p

    def cls_term(self, student_cls: Tensor, t: Tensor, labels: Optional[Tensor] = None) -> Tensor:
        return self.lambda1 * dino_cls_loss(student_cls, t, self.n_global, self.student_temp)

    def mim_term(self, student_patch: Tensor, p: Tensor, masks: Tensor) -> Tensor:
        if self.lambda3 == 0:
            return student_patch.new_zeros(()).float()
        return self.lambda3 * ibot_mim_loss(student_patch, p, masks, self.student_temp, self.mim_average)

    @torch.no_grad()
    def update_centers(self, teacher_cls: Tensor, teacher_patch: Optional[Tensor]) -> None:
        center_update_(self.center, teacher_cls, self.center_momentum)
        if teacher_patch is not None:
            # c2 ← m·c2 + (1−m)·mean over rows of (mean over tokens) == mean over all (row, token)
            center_update_(self.center2, teacher_patch, self.center_momentum2)

    def forward(self, student_cls: Tensor, student_patch: Tensor, teacher_cls: Tensor, teacher_patch: Tensor,
                masks: Tensor, epoch: int) -> dict[str, Tensor]:
        t, p = self.targets(teacher_cls, teacher_patch, epoch)
        cls = self.cls_term(student_cls, t)
        mim = self.mim_term(student_patch, p, masks)
        if self.training:
            self.update_centers(teacher_cls, teacher_patch)
        return {"loss": cls + mim, "cls": cls.detach(), "mim": mim.detach()}
