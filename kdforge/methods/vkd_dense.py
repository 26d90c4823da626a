"""``vkd_dense``: VkD feature distillation for detectors (``shared/methods/vkd.md`` §1.7, the ViDT variant).

Student and teacher detectors see the **same input**: the student's detector transform resizes,
normalises and pads the batch, and that padded tensor goes through the frozen teacher's backbone +
FPN as well. Every FPN level l is distilled through its own square projector::

    loss = Σ detector losses (student)  +  weight · Σ_l mean smoothL1(std(P_l(S_l)), std(T_l))

``P_l`` = :class:`~kdforge.align.OrthogonalProjector` (square, with per-channel scale and shift),
``std`` = per-channel standardisation over the valid (non-padded) pixels of the batch, smooth-L1 with
β = 1, ``weight`` = 4.0 (:mod:`kdforge.losses.vkd_dense` has the formula and the differences from
the reference). ``method.projector: linear`` swaps in an unconstrained ``nn.Linear`` (ablation).

Teacher: ``teacher.checkpoint`` = a ``detect`` / ``vkd_dense`` run (its detector is rebuilt from the
run's config and loaded strictly); or ``teacher.name`` (+ ``teacher.weights`` for the backbone) to build
a detector of the student's design on another backbone. Its FPN must have the student's levels and
width (``method.fpn_channels``), so the projectors are square.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import torch
from torch import Tensor, nn

from kdforge.config import ConfigError, require, to_dict
from kdforge.methods.detect import Detect, DetectConfig


@dataclass
class VkDDenseConfig(DetectConfig):
    weight: float = 4.0                 # distillation loss weight (reference --distil_loss_coef)
    beta: float = 1.0                   # smooth-L1 β
    eps: float = 1e-5                   # standardisation epsilon
    unbiased: bool = False              # unbiased variance (the reference; with eps=0 it is exact)
    mask_padding: bool = True           # exclude padded pixels from statistics and loss (reference: False)
    projector: Literal["orthogonal", "linear"] = "orthogonal"
    scale_shift: bool = True            # per-channel γ, β after the orthogonal map (ViDT)

    def validate(self, prefix: str = "method") -> None:
        super().validate(prefix)
        require(self.weight >= 0, f"{prefix}.weight", "a number >= 0", self.weight)
        require(self.beta > 0, f"{prefix}.beta", "a positive number", self.beta)
        require(self.eps >= 0, f"{prefix}.eps", "a number >= 0", self.eps)


def load_detector_from_run(path: str | Path, which: str = "best") -> tuple[nn.Module, dict]:
    """Rebuild the detector (the student) of a ``detect``-family run and load its weights strictly."""
    from kdforge.engine.trainer import rebuild_method
    method, cfg, ck = rebuild_method(path, which)
    if not isinstance(method, Detect):
        raise ConfigError(f"teacher.checkpoint: {path} is a {cfg.method_name!r} run, not a detector run "
                          "(detect / vkd_dense)")
    from kdforge.models.checkpoint import load_state_dict_checked
    state = {k[len("student."):]: v for k, v in ck["model"].items() if k.startswith("student.")}
    load_state_dict_checked(method.student, state, strict=True, source=f"teacher run {path}")
    return method.student, {"config": to_dict(cfg), "num_classes": ck["num_classes"]}


class VkDDense(Detect):
    """Detector fine-tuning + VkD dense feature distillation; see the module docstring."""

    Config = VkDDenseConfig
    needs_teacher = True

    def __init__(self, cfg, student: nn.Module, teacher: Optional[nn.Module] = None):
        super().__init__(cfg, student, teacher)
        a = self.args
        from kdforge.align.orthogonal import make_projector
        levels = self.student.kdforge_dense["strides"]
        c = a.fpn_channels
        if teacher is not None:
            info = getattr(teacher, "kdforge_dense", None)
            if info is None:
                raise ConfigError("teacher: vkd_dense needs a detector teacher (teacher.checkpoint = a detect run)")
            if info["strides"] != levels:
                raise ConfigError(f"teacher: FPN levels (strides {info['strides']}) differ from the student's "
                                  f"{levels}; use the same detector design")
            if info["fpn_channels"] != c:
                raise ConfigError(f"method.fpn_channels: the student's FPN width {c} must equal the teacher's "
                                  f"({info['fpn_channels']}) for square projectors; set method.fpn_channels="
                                  f"{info['fpn_channels']}")
        self.projectors = nn.ModuleList(
            make_projector(a.projector, c, c, scale_shift=a.scale_shift) for _ in levels)
        self._cap: dict = {}
        self.student.backbone.register_forward_hook(self._hook_features)
        self.student.transform.register_forward_hook(self._hook_images)

    def _hook_features(self, module, inputs, output) -> None:
        self._cap["feats"] = output

    def _hook_images(self, module, inputs, output) -> None:
        self._cap["images"] = output[0]

    @classmethod
    def build_teacher(cls, cfg, num_classes: int) -> Optional[nn.Module]:
        t = cfg.teacher
        if t is None:
            return None
        if t.checkpoint:
            model, _ = load_detector_from_run(t.checkpoint)
            return model
        from kdforge.methods.detect import detector_from_config
        from kdforge.models import create_model
        backbone = create_model(t.name, num_classes=0, in_chans=cfg.data.in_chans, img_size=cfg.data.img_size,
                                weights=t.weights, strict=t.strict, **t.kwargs)
        return detector_from_config(cfg.method_args(), cfg, backbone, num_classes)

    def distill_loss(self) -> Tensor:
        """The unweighted dense loss for the batch the student has just processed."""
        from kdforge.losses.vkd_dense import padding_masks, vkd_dense_loss
        feats_s = list(self._cap["feats"].values())
        il = self._cap["images"]
        with torch.no_grad():
            feats_t = list(self.teacher.backbone(il.tensors).values())
        masks = None
        if self.args.mask_padding:
            masks = padding_masks(il.image_sizes, tuple(il.tensors.shape[-2:]), [f.shape[-2:] for f in feats_s])
        a = self.args
        return vkd_dense_loss(feats_s, feats_t, list(self.projectors), masks, eps=a.eps, beta=a.beta,
                              unbiased=a.unbiased)

    def training_step(self, batch, step: int) -> dict[str, Tensor]:
        if self.teacher is None:
            raise ConfigError("vkd_dense: no teacher (set teacher.checkpoint to a detect run)")
        self._cap = {}
        losses = self.detector_losses(batch)
        det = sum(losses.values())
        kd = self.distill_loss()
        self._cap = {}
        return {"loss": det + self.args.weight * kd, "det": det.detach(), "distil": kd.detach(), **losses}
