"""``segment``: fine-tune a torchvision segmenter (DeepLabV3 / FCN) on a kdforge backbone — the KDEP
transfer-to-segmentation protocol (``shared/methods/kdep.md`` §5.2: poly(0.9) schedule, random scale,
flip, crop; mIoU) through the one trainer.

* Student: ``model.name`` without classifier (initialised from ``method.backbone`` — a kdforge run or
  a weights file — or ``model.weights``) + a new DeepLabV3 (ASPP) or FCN head; ``method.aux`` adds
  the FCN auxiliary head on the previous stage, weighted ``aux_weight`` (0.4 in PSPNet/DeepLab recipes).
* Data: image + class-index mask folders or VOC (:mod:`kdforge.data.dense`), K foreground classes +
  background; pixels equal to 255 are ignored. Training: random scale in ``method.scale_range``
  (or resize to ``data.img_size``), flip, random ``img_size`` crop (padding ignored);
  evaluation: resize so that the shorter side is ``img_size``.
* Loss: per-pixel cross-entropy (ignore 255) on the logits upsampled to the input size.
* Validation: ``val/mIoU`` (%, classes with a non-empty union, background included) and
  ``val/pixel_acc`` from one confusion matrix summed over the split (and ranks).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Literal, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdforge.config import require
from kdforge.methods.base import Method
from kdforge.methods.detect import strip_classifier


@dataclass
class SegmentConfig:
    segmenter: Literal["deeplabv3", "fcn"] = "deeplabv3"
    aux: bool = False
    aux_weight: float = 0.4
    atrous_rates: list[int] = field(default_factory=lambda: [12, 24, 36])  # ASPP (6, 12, 18 at stride 16)
    scale_range: Optional[list[float]] = None  # training random scale, e.g. [0.5, 2.0]
    flip: bool = True
    ignore_index: int = 255
    backbone: Optional[str] = None

    def validate(self, prefix: str = "method") -> None:
        require(self.aux_weight >= 0, f"{prefix}.aux_weight", "a number >= 0", self.aux_weight)
        if self.scale_range is not None:
            require(len(self.scale_range) == 2 and 0 < self.scale_range[0] <= self.scale_range[1],
                    f"{prefix}.scale_range", "[lo, hi] with 0 < lo <= hi", self.scale_range)
        if self.backbone is not None:
            import os
            require(os.path.exists(self.backbone), f"{prefix}.backbone", "an existing run folder or weights file",
                    self.backbone)


class Segment(Method):
    """Semantic segmentation fine-tuning; see the module docstring."""

    Config = SegmentConfig
    student_head = True  # the class count arrives through the classifier; stripped in __init__
    best_metric = "val/mIoU"
    export_via_method = True

    def __init__(self, cfg, student: nn.Module, teacher: Optional[nn.Module] = None):
        super().__init__(cfg, student, teacher)
        from kdforge.models.dense import build_segmenter, load_backbone_weights
        a = self.args
        self.num_classes = strip_classifier(student) + 1  # + background
        if a.backbone:
            load_backbone_weights(student, a.backbone, strict=True)
        self.student = build_segmenter(a.segmenter, student, self.num_classes, in_chans=cfg.data.in_chans,
                                       aux=a.aux, atrous_rates=tuple(a.atrous_rates))
        self.register_buffer("_mean", torch.tensor(cfg.data.mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("_std", torch.tensor(cfg.data.std).view(1, -1, 1, 1), persistent=False)

    def logits(self, images: Tensor) -> dict[str, Tensor]:
        """Images in [0, 1] (B, C, H, W) -> ``{"out": (B, K+1, H, W)[, "aux": ...]}``."""
        return self.student((images - self._mean) / self._std)

    def training_step(self, batch, step: int) -> dict[str, Tensor]:
        images, masks = batch
        out = self.logits(images)
        ce = F.cross_entropy(out["out"].float(), masks, ignore_index=self.args.ignore_index)
        terms = {"ce": ce.detach()}
        loss = ce
        if "aux" in out:
            aux = F.cross_entropy(out["aux"].float(), masks, ignore_index=self.args.ignore_index)
            loss = loss + self.args.aux_weight * aux
            terms["aux"] = aux.detach()
        return {"loss": loss, **terms}

    def export_backbone(self) -> dict[str, Tensor]:
        from kdforge.models.checkpoint import backbone_state_dict
        return backbone_state_dict(self.student.backbone.body.model)

    @torch.no_grad()
    def evaluate(self, loader, device: torch.device, amp_ctx: Callable = None) -> dict[str, float]:
        from kdforge.engine.distributed import all_reduce_sum
        from kdforge.eval.dense import confusion_matrix, miou
        was = self.training
        self.eval()
        conf = torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64, device=device)
        for images, masks in loader:
            images, masks = images.to(device), masks.to(device)
            if amp_ctx is not None:
                with amp_ctx():
                    out = self.logits(images)["out"]
            else:
                out = self.logits(images)["out"]
            conf += confusion_matrix(out.argmax(1), masks, self.num_classes, self.args.ignore_index)
        self.train(was)
        conf = all_reduce_sum(conf)
        m = miou(conf)
        return {"val/mIoU": m["mIoU"], "val/pixel_acc": m["pixel_acc"]}

    @classmethod
    def build_dataset(cls, cfg, split: str, train: bool):
        from kdforge.data.dense import build_dense_transform, segmentation_dataset
        a = cfg.method_args()
        d = cfg.data
        tf = build_dense_transform(d.img_size, train, "segment", flip=a.flip, scale_range=a.scale_range)
        mode = "RGB" if d.in_chans == 3 else "L"
        n = cfg.model.num_classes + 1 if cfg.model.num_classes else None
        try:
            return segmentation_dataset(d.root, split, n, tf, d.on_corrupt, mode)
        except FileNotFoundError:
            if train:
                raise
            return None

    @classmethod
    def collate_fn(cls, cfg):
        from kdforge.data.dense import segmentation_collate
        return segmentation_collate
