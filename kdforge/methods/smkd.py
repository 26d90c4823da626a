"""``smkd``: Supervised Masked Knowledge Distillation, phase 2 (Lin et al., CVPR 2023).

Spec ``shared/methods/smkd.md`` §2. Everything of :mod:`kdforge.methods.ibot` (multi-crop, masked
student globals, EMA teacher, centring, temperature warm-up, frozen last layer, few-shot validation)
plus the labels:

* [CLS]: :func:`~kdforge.losses.smkd.smkd_cls_loss` — distillation across *different images of the
  same class* for both global views, plus the same-image teacher-global / student-local DINO terms;
  with ``gather_labels`` the teacher targets and labels of every rank are all-gathered so pairs also
  form across GPUs;
* patch: :func:`~kdforge.losses.smkd.smkd_patch_loss` — each teacher patch of image b (view t) is
  matched to the most cosine-similar student patch of another same-class image a (masked view s ≠ t);
  ``compat: reference`` reproduces the reference repository's buggy matching exactly instead;
* total ``λ1·L_cls + λ2·L_patch + λ3·L_mim`` (phase 2 defaults 1 / 1 / 0); a batch without any
  same-class pair gives a zero patch loss and increments the logged ``patch_empty_batches`` counter;
* batches come from the class-balanced :class:`~kdforge.data.pk_sampler.PKBatchSampler` (P classes ×
  ``pk_per_class`` images, P = data.batch_size / pk_per_class), so every batch has same-class pairs;
  ``pk_per_class: 0`` draws uniform batches as the reference did.

Start it from a phase-1 run with ``init_from=RUN`` (the trainer loads student, mask token, heads,
EMA teacher and centres; the optimizer and all schedules start fresh, unlike the reference, which
silently inherited the phase-1 AdamW moments).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import nn

from kdforge.config import require
from kdforge.losses.smkd import SMKDLoss
from kdforge.methods.ibot import IBOT, IBOTConfig


@dataclass
class SMKDConfig(IBOTConfig):
    lambda2: float = 1.0                              # cross-image patch term
    lambda3: float = 0.0                              # iBOT MIM (off in phase 2, as in the paper)
    compat: Literal["none", "reference"] = "none"     # "reference": the repository's patch loss, bugs included
    gather_labels: bool = True                        # [CLS] pairs across ranks
    pk_per_class: int = 4                             # K images per class per batch; 0: uniform batches

    def validate(self, prefix: str = "method") -> None:
        super().validate(prefix)
        require(self.lambda2 >= 0, f"{prefix}.lambda2", "a number >= 0", self.lambda2)
        require(self.pk_per_class == 0 or self.pk_per_class >= 2, f"{prefix}.pk_per_class",
                "0 (uniform batches) or an integer >= 2", self.pk_per_class)


class SMKD(IBOT):
    """SMKD phase 2 (see the module docstring)."""

    Config = SMKDConfig
    unlabeled_ok = False
    loss_cls = SMKDLoss

    def build_loss(self) -> nn.Module:
        a = self.args
        return SMKDLoss(a.out_dim, a.patch_out_dim if not a.shared_head else a.out_dim, 2,
                        a.warmup_teacher_temp, a.teacher_temp, a.warmup_teacher_patch_temp, a.teacher_patch_temp,
                        a.warmup_teacher_temp_epochs, a.student_temp, a.center_momentum, a.center_momentum2,
                        lambda1=a.lambda1, lambda3=a.lambda3, mim_start_epoch=a.mask_start_epoch,
                        mim_average=a.mim_average, lambda2=a.lambda2, compat=a.compat, gather=a.gather_labels)

    def training_step(self, batch, step):
        v = self.forward_views(batch)
        out = self.loss(v["s_cls"], v["s_patch"], v["t_cls"], v["t_patch"], v["masks"], self.epoch,
                        labels=v["labels"], student_tokens=v["s_patch_tok"], teacher_tokens=v["t_patch_tok"])
        out["mask_ratio"] = v["masks"].float().mean().detach()
        out["patch_empty_batches"] = self.loss.empty_patch_batches.detach().float()
        return out

    @classmethod
    def build_batch_sampler(cls, cfg, dataset, seed: int, rank: int, world: int):
        from kdforge.config import ConfigError
        from kdforge.data.pk_sampler import PKBatchSampler
        k = cfg.method_args().pk_per_class
        if k == 0:
            return None
        B = cfg.data.batch_size
        if B % k:
            raise ConfigError(f"method.pk_per_class: data.batch_size {B} is not a multiple of {k} images per class")
        targets = getattr(dataset, "targets", None)
        if targets is None:
            raise ConfigError("method.pk_per_class: the training set has no labels (ROOT/train/<class>/<image>)")
        try:
            return PKBatchSampler(targets, B // k, k, seed=seed, rank=rank, world=world)
        except ValueError as e:
            raise ConfigError(f"method.pk_per_class: {e}") from None


__all__ = ["SMKD", "SMKDConfig"]
