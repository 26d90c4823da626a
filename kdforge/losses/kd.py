"""Logit distillation (Hinton et al., 2015) and soft-target cross-entropy."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def kd_kl(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 4.0) -> Tensor:
    """``T² · mean_b KL(softmax(t/T) ‖ softmax(s/T))``.

    Shapes: logits (B, K) -> scalar. The KL is summed over classes and averaged over the batch
    (``reduction="batchmean"``); the T² factor keeps gradient magnitudes comparable across T.
    Computed in float32 even under autocast.
    """
    return kd_kl_rows(student_logits, teacher_logits, temperature, "kd_kl").mean()


def kd_kl_rows(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 4.0,
               name: str = "kd_kl_rows") -> Tensor:
    """Per-sample ``T² · KL(softmax(t_b/T) ‖ softmax(s_b/T))``: logits (B, K) -> (B,) float32."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"{name}: student logits {tuple(student_logits.shape)} vs teacher "
                         f"{tuple(teacher_logits.shape)}; the two models must predict the same classes")
    T = float(temperature)
    log_p_s = F.log_softmax(student_logits.float() / T, dim=-1)
    log_p_t = F.log_softmax(teacher_logits.float() / T, dim=-1)
    return F.kl_div(log_p_s, log_p_t, reduction="none", log_target=True).sum(-1) * (T * T)


def soft_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """``mean_b  -Σ_k y_bk · log softmax(z_b)_k`` for soft targets ``targets`` (B, K)."""
    return torch.sum(-targets * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()
