"""Supervised training: cross-entropy with optional label smoothing."""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F

from kdforge.config import require
from kdforge.methods.base import Method


@dataclass
class SupervisedConfig:
    label_smoothing: float = 0.0

    def validate(self, prefix: str = "method") -> None:
        require(0 <= self.label_smoothing < 1, f"{prefix}.label_smoothing", "a number in [0, 1)",
                self.label_smoothing)


class Supervised(Method):
    """``loss = CE(student(x), y)``."""

    Config = SupervisedConfig

    def training_step(self, batch, step):
        images, labels = batch
        logits = self.student(images)
        loss = F.cross_entropy(logits.float(), labels, label_smoothing=self.args.label_smoothing)
        return {"loss": loss, "ce": loss.detach()}
