"""Hinton logit distillation: ``loss = (1 − α) · CE(s, y) + α · kd_kl(s, t, T)``."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kdforge.config import require
from kdforge.losses.kd import kd_kl
from kdforge.methods.base import Method


@dataclass
class KDConfig:
    temperature: float = 4.0
    alpha: float = 0.9            # weight of the distillation term; 1 - alpha on the label CE
    label_smoothing: float = 0.0

    def validate(self, prefix: str = "method") -> None:
        require(self.temperature > 0, f"{prefix}.temperature", "a positive number", self.temperature)
        require(0 <= self.alpha <= 1, f"{prefix}.alpha", "a number in [0, 1]", self.alpha)
        require(0 <= self.label_smoothing < 1, f"{prefix}.label_smoothing", "a number in [0, 1)",
                self.label_smoothing)


class KD(Method):
    """Student trained on labels and on the frozen teacher's softened predictions."""

    Config = KDConfig
    needs_teacher = True

    def training_step(self, batch, step):
        images, labels = batch
        with torch.no_grad():
            t_logits = self.teacher(images)
        s_logits = self.student(images)
        a = self.args.alpha
        ce = F.cross_entropy(s_logits.float(), labels, label_smoothing=self.args.label_smoothing)
        kd = kd_kl(s_logits, t_logits, self.args.temperature)
        loss = (1 - a) * ce + a * kd
        return {"loss": loss, "ce": ce.detach(), "kd": kd.detach()}
