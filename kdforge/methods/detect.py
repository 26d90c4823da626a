"""``detect``: fine-tune a torchvision detector (Faster R-CNN / RetinaNet / FCOS + FPN) on a kdforge
backbone — the KDEP transfer-to-detection protocol (``shared/methods/kdep.md`` §5.3) through the
one trainer.

* The student is ``model.name`` built without classifier, optionally initialised from
  ``method.backbone`` (a kdforge run — e.g. a KDEP/VkD pre-training — or a ``.safetensors`` /
  ``.pth`` file; checked key by key) or ``model.weights``; the detector heads are new.
* Data: COCO or VOC layout under ``data.root`` (:mod:`kdforge.data.dense`); images are resized so
  that the shorter side is ``data.img_size`` (longer ≤ ``method.max_size``) and flipped in training;
  the detector normalises with ``data.mean`` / ``data.std``.
* Loss: the detector's own loss terms (summed, each logged).
* Validation: COCO box mAP (``val/AP``, ``val/AP50``, ``val/AP75``, ``val/APs|m|l``) with pycocotools,
  boxes mapped back to the original image pixels; ``best.pt`` is kept by ``val/AP``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal, Optional

import torch
from torch import Tensor, nn

from kdforge.config import require
from kdforge.methods.base import Method


def strip_classifier(model: nn.Module) -> int:
    """Remove the classifier of a timm/torchvision model in place; returns its number of outputs."""
    from kdforge.eval.transfer import classifier_module
    n = int(classifier_module(model).out_features)
    if hasattr(model, "reset_classifier"):
        model.reset_classifier(0)
    else:
        from kdforge.models.factory import _torchvision_classifier
        attr, _ = _torchvision_classifier(model)
        setattr(model, attr, nn.Identity())
    return n


@dataclass
class DetectConfig:
    detector: Literal["faster_rcnn", "retinanet", "fcos"] = "faster_rcnn"
    fpn_channels: int = 256
    strides: Optional[list[int]] = None           # backbone stages into the FPN (default per detector)
    anchor_mult: Optional[float] = None           # anchor size = mult × stride (default per detector)
    max_size: Optional[int] = None                # longer-side cap (default img_size · 1333 / 800)
    representation_size: int = 1024               # Faster R-CNN box head width
    box_batch_size_per_image: int = 512           # Faster R-CNN RoIs sampled per image
    rpn_batch_size_per_image: int = 256
    detections_per_img: int = 100
    score_thresh: float = 0.05
    flip: bool = True
    backbone: Optional[str] = None                # run folder / checkpoint / weights file for the backbone
    format: Literal["auto", "coco", "voc"] = "auto"

    def validate(self, prefix: str = "method") -> None:
        require(self.fpn_channels > 0, f"{prefix}.fpn_channels", "a positive integer", self.fpn_channels)
        require(self.detections_per_img > 0, f"{prefix}.detections_per_img", "a positive integer",
                self.detections_per_img)
        if self.strides is not None:
            require(len(self.strides) > 0 and list(self.strides) == sorted(self.strides), f"{prefix}.strides",
                    "increasing strides, e.g. [8, 16, 32]", self.strides)
        if self.backbone is not None:
            import os
            require(os.path.exists(self.backbone), f"{prefix}.backbone", "an existing run folder or weights file",
                    self.backbone)


def detector_from_config(args, cfg, backbone: nn.Module, num_classes: int) -> nn.Module:
    """Build the detector of a ``detect``-family config on ``backbone`` (K object classes + background)."""
    from kdforge.models.dense import build_detector
    d = cfg.data
    return build_detector(
        args.detector, backbone, num_classes + 1, fpn_channels=args.fpn_channels, strides=args.strides,
        min_size=d.img_size, max_size=args.max_size or int(round(d.img_size * 1333 / 800)),
        image_mean=d.mean, image_std=d.std, anchor_mult=args.anchor_mult, in_chans=d.in_chans,
        representation_size=args.representation_size, box_batch_size_per_image=args.box_batch_size_per_image,
        rpn_batch_size_per_image=args.rpn_batch_size_per_image, detections_per_img=args.detections_per_img,
        score_thresh=args.score_thresh)


class Detect(Method):
    """Supervised detector fine-tuning; see the module docstring."""

    Config = DetectConfig
    student_head = True            # built with K outputs so the class count reaches __init__; stripped there
    best_metric = "val/AP"
    export_via_method = True

    def __init__(self, cfg, student: nn.Module, teacher: Optional[nn.Module] = None):
        super().__init__(cfg, student, teacher)
        a = self.args
        backbone = student
        self.num_classes = strip_classifier(backbone)
        if a.backbone:
            from kdforge.models.dense import load_backbone_weights
            import logging
            rep = load_backbone_weights(backbone, a.backbone, strict=True)
            logging.getLogger("kdforge").info(f"detector backbone from {a.backbone}: {rep.summary()}")
        self.student = detector_from_config(a, cfg, backbone, self.num_classes)

    # -- training ------------------------------------------------------------------------------
    def detector_losses(self, batch) -> dict[str, Tensor]:
        images, targets = batch
        targets = [{"boxes": t["boxes"], "labels": t["labels"]} for t in targets]
        return self.student(list(images), targets)

    def training_step(self, batch, step: int) -> dict[str, Tensor]:
        losses = self.detector_losses(batch)
        total = sum(losses.values())
        return {"loss": total, **losses}

    def export_backbone(self) -> dict[str, Tensor]:
        from kdforge.models.dense import dense_backbone_state_dict
        return dense_backbone_state_dict(self.student)

    # -- evaluation ----------------------------------------------------------------------------
    @torch.no_grad()
    def predict_coco(self, loader, device: torch.device, amp_ctx: Optional[Callable] = None) -> tuple[list, list]:
        """Detections of the student over ``loader`` as COCO results (original image pixels), and the
        image ids seen."""
        from kdforge.eval.dense import boxes_to_coco_results
        ds = loader.dataset
        base = getattr(ds, "dataset", ds)  # a DDP shard is a Subset
        results, ids = [], []
        for images, targets in loader:
            images = [im.to(device, non_blocking=True) for im in images]
            if amp_ctx is not None:
                with amp_ctx():
                    out = self.student(images)
            else:
                out = self.student(images)
            for o, t in zip(out, targets):
                sx, sy = (float(v) for v in t["scale"])
                boxes = o["boxes"].float() / torch.tensor([sx, sy, sx, sy], device=o["boxes"].device)
                results += boxes_to_coco_results(t["image_id"], boxes, o["scores"], o["labels"], base.label_to_cat)
                ids.append(int(t["image_id"]))
        return results, ids

    @torch.no_grad()
    def evaluate(self, loader, device: torch.device, amp_ctx: Callable = None) -> dict[str, float]:
        from kdforge.engine import distributed as D
        from kdforge.eval.dense import coco_map
        was = self.training
        self.eval()
        results, ids = self.predict_coco(loader, device, amp_ctx)
        self.train(was)
        if D.is_dist():
            import torch.distributed as dist
            parts = [None] * D.get_world_size()
            dist.all_gather_object(parts, (results, ids))
            results = [r for p in parts for r in p[0]]
            ids = [i for p in parts for i in p[1]]
        base = getattr(loader.dataset, "dataset", loader.dataset)
        m = coco_map(base.coco_gt(), results, image_ids=ids)
        return {f"val/{k}": v for k, v in m.items()}

    # -- data hooks ----------------------------------------------------------------------------
    @classmethod
    def build_dataset(cls, cfg, split: str, train: bool):
        from pathlib import Path

        from kdforge.data.dense import build_dense_transform, detection_dataset
        a = cfg.method_args()
        d = cfg.data
        tf = build_dense_transform(d.img_size, train, "detect", a.max_size or int(round(d.img_size * 1333 / 800)),
                                   flip=a.flip)
        mode = "RGB" if d.in_chans == 3 else "L"
        try:
            return detection_dataset(Path(d.root), split, tf, d.on_corrupt, mode, a.format)
        except FileNotFoundError:
            if train:
                raise
            return None

    @classmethod
    def collate_fn(cls, cfg):
        from kdforge.data.dense import detection_collate
        return detection_collate


__all__ = ["Detect", "DetectConfig", "detector_from_config", "strip_classifier"]
