"""VkD: knowledge distillation with orthogonal projections (Miles, Elezi & Deng, CVPR 2024).

A DeiT student with class and distillation tokens learns from a frozen teacher (RegNetY-160 in the
paper, any timm model here)::

    L = ce · CE(head(cls), ỹ)                                       labels (mixup/cutmix + smoothing)
      + γ  · τ² · KL(softmax(z_T/τ) ‖ softmax(head_dist(dist)/τ))    soft KD on the distillation head
      + α  · mean SmoothL1_β( P · mean_n patches_n,  LN(GAP(f_T)) )  feature term (kdforge.losses.vkd)

``P`` is the semi-orthogonal :class:`~kdforge.align.orthogonal.OrthogonalProjector` (or, for the
FitNet-style ablation, an unconstrained ``nn.Linear``); ``LN`` is a per-sample LayerNorm without
affine over the teacher channels. The student and the teacher see the same (mixed) batch.

Every term switches off on its own (weight 0) and every combination runs — the reference crashes
unless α > 0 and γ > 0 (``shared/methods/vkd.md`` §2). When a head's own term is off it borrows the
other head's target, so both heads always train (no unused parameters under DDP) and evaluation can
average them as DeiT does:

=========  ================================  ==============================================
ce  γ      class head                        distillation head
=========  ================================  ==============================================
>0  >0     CE on labels                      KL to the teacher            (the paper)
>0  0      CE on labels                      CE on labels                 (no logit KD)
0   >0     KL to the teacher                 KL to the teacher
0   0      untrained (feature-only KD; under DDP set ``train.find_unused_parameters=true``)
=========  ================================  ==============================================

Ablations in the same method: ``projector: linear`` (FitNet hint regressor), ``alpha: 0`` (logit-only
KD), ``alpha: 0, gamma: 0`` (from scratch). A student without a distillation token gets both CE and
KL on its single head.

Also here, because they belong to this recipe (DeiT III / co-advise): batch-level mixup/cutmix with
label smoothing on the device (:func:`mix_batch`, global torch RNG, so it is checkpointed and
resumes exactly), the 3-Augment train transform (:class:`ThreeAugment`), and the reference's
convolutional stem (:class:`ConvStem`, ``stem: conv``).

Deliberate differences from the reference code: the projector cannot collapse under weight decay
and its weight is computed in fp32 once per step; the student is stock timm DeiT (learned
distillation token, patch stem) unless ``stem: conv`` is chosen; the reference's non-learned
"dist = mean of stem tokens" token is not reproduced.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Literal, Optional

import torch
from torch import Tensor, nn

from kdforge.align.orthogonal import OrthogonalProjector, make_projector
from kdforge.config import ConfigError, require
from kdforge.losses.kd import kd_kl, soft_cross_entropy
from kdforge.losses.vkd import pool_map, vkd_feature_loss
from kdforge.methods.base import Method


# ------------------------------------------------------------------------------------------------
# mixup / cutmix with label smoothing (timm ``Mixup`` semantics, mode "batch")
# ------------------------------------------------------------------------------------------------

def smooth_one_hot(labels: Tensor, num_classes: int, smoothing: float = 0.0) -> Tensor:
    """(B,) int -> (B, K) float32: ``1 - ε + ε/K`` on the label, ``ε/K`` elsewhere."""
    off = smoothing / num_classes
    y = torch.full((labels.shape[0], num_classes), off, device=labels.device, dtype=torch.float32)
    return y.scatter_(1, labels.view(-1, 1), 1.0 - smoothing + off)


def cutmix_box(lam: float, height: int, width: int) -> tuple[int, int, int, int, float]:
    """Random box of area ≈ (1 - lam)·H·W, clipped to the image (timm ``rand_bbox``).

    Returns (y0, y1, x0, x1, lam_corrected) with ``lam = 1 - box area / (H·W)`` after clipping.
    Uses the global torch RNG.
    """
    ratio = math.sqrt(1.0 - lam)
    ch, cw = int(height * ratio), int(width * ratio)
    cy = int(torch.randint(0, height, ()).item())
    cx = int(torch.randint(0, width, ()).item())
    y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2, height)
    x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2, width)
    lam = 1.0 - (y1 - y0) * (x1 - x0) / float(height * width)
    return y0, y1, x0, x1, lam


def mix_batch(images: Tensor, labels: Tensor, num_classes: int, mixup_alpha: float = 0.0,
              cutmix_alpha: float = 0.0, prob: float = 1.0, switch_prob: float = 0.5,
              smoothing: float = 0.0) -> tuple[Tensor, Tensor, dict]:
    """Batch-level mixup / cutmix (Zhang et al. 2018; Yun et al. 2019) with label smoothing.

    One λ per batch. The partner of sample i is sample B-1-i (the batch flipped). With probability
    ``prob`` a mix is applied: cutmix with probability ``switch_prob`` when both are enabled
    (λ ~ Beta(cutmix_alpha, cutmix_alpha), box pasted from the partner, λ corrected to the box
    area), else mixup (λ ~ Beta(mixup_alpha, mixup_alpha), ``x = λ·x + (1-λ)·x_flip``)::

        ỹ = λ · smooth(y) + (1 - λ) · smooth(y_flip)

    Args: images (B, C, H, W), labels (B,) int. Returns (mixed images (B, C, H, W), soft targets
    (B, K) float32, info ``{"lam": λ, "kind": "mixup"|"cutmix"|"none"}``). Global torch RNG only.
    """
    use_mix = (mixup_alpha > 0 or cutmix_alpha > 0) and float(torch.rand(())) < prob
    kind, lam = "none", 1.0
    if use_mix:
        if mixup_alpha > 0 and cutmix_alpha > 0:
            kind = "cutmix" if float(torch.rand(())) < switch_prob else "mixup"
        else:
            kind = "cutmix" if cutmix_alpha > 0 else "mixup"
        a = cutmix_alpha if kind == "cutmix" else mixup_alpha
        lam = float(torch.distributions.Beta(torch.tensor(float(a)), torch.tensor(float(a))).sample())
    y = smooth_one_hot(labels, num_classes, smoothing)
    if kind == "none":
        return images, y, {"lam": 1.0, "kind": kind}
    flipped = images.flip(0)
    if kind == "mixup":
        out = images * lam + flipped * (1.0 - lam)
    else:
        y0, y1, x0, x1, lam = cutmix_box(lam, images.shape[-2], images.shape[-1])
        out = images.clone()
        out[..., y0:y1, x0:x1] = flipped[..., y0:y1, x0:x1]
    return out, y * lam + y.flip(0) * (1.0 - lam), {"lam": lam, "kind": kind}


# ------------------------------------------------------------------------------------------------
# 3-Augment (DeiT III, Touvron et al. 2022) as used by the reference
# ------------------------------------------------------------------------------------------------

class _PILGaussianBlur:
    """PIL Gaussian blur with radius σ ~ U(σ_min, σ_max) (python ``random``, seeded per sample)."""

    def __init__(self, sigma_min: float = 0.1, sigma_max: float = 2.0):
        self.sigma_min, self.sigma_max = sigma_min, sigma_max

    def __call__(self, img):
        from PIL import ImageFilter
        return img.filter(ImageFilter.GaussianBlur(radius=random.uniform(self.sigma_min, self.sigma_max)))

    def __repr__(self) -> str:
        return f"GaussianBlur(sigma~U({self.sigma_min}, {self.sigma_max}))"


class ThreeAugment:
    """DeiT III 3-Augment: ``RandomResizedCrop(size, scale=(0.08, 1), bicubic) → HFlip(0.5) →
    one of {Grayscale, Solarize(128), GaussianBlur(σ ~ U(0.1, 2))} → ColorJitter(cj, cj, cj) →
    ToTensor → Normalize``. PIL image -> (C, size, size) float tensor."""

    def __init__(self, data_cfg, color_jitter: float = 0.3):
        from torchvision import transforms as T

        from kdforge.data.transforms import normalize
        size = data_cfg.img_size
        ops = [T.RandomResizedCrop(size, scale=(0.08, 1.0), interpolation=T.InterpolationMode.BICUBIC),
               T.RandomHorizontalFlip(),
               T.RandomChoice([T.Grayscale(num_output_channels=data_cfg.in_chans),
                               T.RandomSolarize(threshold=128, p=1.0),
                               _PILGaussianBlur(0.1, 2.0)])]
        if color_jitter > 0:
            ops.append(T.ColorJitter(color_jitter, color_jitter, color_jitter))
        self.transform = T.Compose(ops + [T.ToTensor(), normalize(data_cfg)])

    def __call__(self, img):
        return self.transform(img)

    def __repr__(self) -> str:
        return f"ThreeAugment({self.transform!r})"


# ------------------------------------------------------------------------------------------------
# the reference's convolutional stem (co-advise / CiT), optional
# ------------------------------------------------------------------------------------------------

class ConvStem(nn.Module):
    """Convolutional patch embedding of the VkD/co-advise DeiT (``shared/methods/vkd.md`` §1.1).

    ``conv7×7/2 (in→w) → BN → ReLU → 2 × [conv3×3 (w→w) → BN → ReLU] → conv (p/2)×(p/2) stride p/2
    (w→D, bias)``; total stride = patch size p. (B, C, H, W) -> (B, (H/p)·(W/p), D). Convolutions use
    Kaiming-normal init (fan_in, leaky-ReLU gain), as in the reference. It replaces a timm ViT's
    ``patch_embed`` and exposes the attributes timm reads from it.
    """

    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int, width: int = 64):
        super().__init__()
        if patch_size % 2 or patch_size < 2:
            raise ValueError(f"ConvStem: patch size must be even (stride 2 stem + (p/2) projection), got {patch_size}")
        if img_size % patch_size:
            raise ValueError(f"ConvStem: image size {img_size} is not a multiple of the patch size {patch_size}")

        def block(cin, cout, k, s):
            return [nn.Conv2d(cin, cout, k, s, k // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
        self.stem = nn.Sequential(*block(in_chans, width, 7, 2), *block(width, width, 3, 1), *block(width, width, 3, 1))
        self.proj = nn.Conv2d(width, embed_dim, patch_size // 2, patch_size // 2)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
        self.img_size = (img_size, img_size)
        self.patch_size = (patch_size, patch_size)
        self.grid_size = (img_size // patch_size, img_size // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.flatten = True
        self.dynamic_img_pad = False
        self.strict_img_size = True

    def feat_ratio(self, as_scalar: bool = True):
        return self.patch_size[0] if as_scalar else self.patch_size

    def dynamic_feat_size(self, img_size):
        return img_size[0] // self.patch_size[0], img_size[1] // self.patch_size[1]

    def forward(self, x: Tensor) -> Tensor:
        if tuple(x.shape[-2:]) != self.img_size:
            raise ValueError(f"ConvStem: expected {self.img_size} images, got {tuple(x.shape[-2:])}")
        return self.proj(self.stem(x)).flatten(2).transpose(1, 2)


# ------------------------------------------------------------------------------------------------
# the method
# ------------------------------------------------------------------------------------------------

@dataclass
class VkDConfig:
    """Hyper-parameters of :class:`VkD` (the YAML ``method:`` section). Paper: ce 1, γ 1, τ 1, α 1,
    orthogonal projector, LayerNorm target, SmoothL1 β 1, mixup 0.8, cutmix 1.0, smoothing 0.1,
    3-Augment."""
    ce_weight: float = 1.0                 # class-head cross-entropy (0: off)
    gamma: float = 1.0                     # soft KL on the distillation head (0: off)
    temperature: float = 1.0               # τ of the KL term
    alpha: float = 1.0                     # feature term (0: off, logit-only KD)
    projector: Literal["orthogonal", "linear"] = "orthogonal"
    scale_shift: bool = False              # learnable per-channel γ/β after the projector (ViDT variant)
    norm: Literal["layernorm", "channel", "none"] = "layernorm"   # teacher-target normalisation
    smooth_l1_beta: float = 1.0
    teacher_dim: Optional[int] = None      # teacher feature width; None: the teacher's pooled width
    label_smoothing: float = 0.0
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    mix_prob: float = 1.0
    mix_switch_prob: float = 0.5
    three_augment: bool = False            # replaces data.train_transform by DeiT III 3-Augment
    color_jitter: float = 0.3              # of 3-Augment
    stem: Literal["patch", "conv"] = "patch"   # conv: the reference's convolutional stem
    stem_width: int = 64

    def validate(self, prefix: str = "method") -> None:
        for key in ("ce_weight", "gamma", "alpha", "mixup_alpha", "cutmix_alpha", "color_jitter"):
            v = getattr(self, key)
            require(v >= 0, f"{prefix}.{key}", "a number >= 0", v)
        require(self.temperature > 0, f"{prefix}.temperature", "a positive number", self.temperature)
        require(self.smooth_l1_beta > 0, f"{prefix}.smooth_l1_beta", "a positive number", self.smooth_l1_beta)
        require(0 <= self.label_smoothing < 1, f"{prefix}.label_smoothing", "a number in [0, 1)", self.label_smoothing)
        require(0 <= self.mix_prob <= 1, f"{prefix}.mix_prob", "a number in [0, 1]", self.mix_prob)
        require(0 <= self.mix_switch_prob <= 1, f"{prefix}.mix_switch_prob", "a number in [0, 1]",
                self.mix_switch_prob)
        require(self.stem_width > 0, f"{prefix}.stem_width", "a positive integer", self.stem_width)
        if self.teacher_dim is not None:
            require(self.teacher_dim > 0, f"{prefix}.teacher_dim", "a positive integer", self.teacher_dim)
        require(self.ce_weight > 0 or self.gamma > 0 or self.alpha > 0, f"{prefix}.ce_weight",
                "at least one of ce_weight, gamma, alpha > 0 (all terms are off)", 0)


def _teacher_width(teacher: nn.Module) -> int:
    for attr in ("head_hidden_size", "num_features"):
        v = getattr(teacher, attr, None)
        if isinstance(v, int) and v > 0:
            return v
    raise ConfigError("method.teacher_dim: cannot tell the teacher's feature width; set method.teacher_dim")


class VkD(Method):
    """VkD / FitNet / logit-KD family for DeiT students (see the module docstring)."""

    Config = VkDConfig
    needs_teacher = True

    def __init__(self, cfg, student: nn.Module, teacher: Optional[nn.Module] = None):
        super().__init__(cfg, student, teacher)
        a = self.args
        if a.stem == "conv":
            self._install_conv_stem(cfg)
        self.distilled = hasattr(student, "head_dist") and hasattr(student, "set_distilled_training")
        if self.distilled:
            student.set_distilled_training(True)   # training-mode forward_head -> (cls, dist) logits
        self.num_classes = int(getattr(student, "num_classes", 0) or 0)
        if self.num_classes <= 0 and (a.ce_weight > 0 or a.gamma > 0):
            raise ConfigError("model.num_classes: VkD's CE/KL terms need a student with a classifier")
        self.student_dim = int(getattr(student, "num_features"))
        self.projector: Optional[nn.Module] = None
        if a.alpha > 0:
            d_out = a.teacher_dim or (_teacher_width(teacher) if teacher is not None else None)
            if d_out is not None:
                self.projector = make_projector(a.projector, self.student_dim, d_out, scale_shift=a.scale_shift)
            # else: rebuilt without a teacher (evaluation): built from the checkpoint in load_state_dict

    # -- construction helpers ---------------------------------------------------------------------
    def _install_conv_stem(self, cfg) -> None:
        pe = getattr(self.student, "patch_embed", None)
        if pe is None or not hasattr(self.student, "embed_dim"):
            raise ConfigError("method.stem: 'conv' needs a timm ViT/DeiT student (with patch_embed)")
        img = pe.img_size[0]
        in_chans = cfg.data.in_chans if cfg is not None else pe.proj.in_channels
        self.student.patch_embed = ConvStem(img, pe.patch_size[0], in_chans, self.student.embed_dim,
                                            self.args.stem_width)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Rebuild a deferred projector (method built without a teacher) from the checkpoint's shapes."""
        if self.projector is None and self.args.alpha > 0:
            if "projector.raw" in state_dict:
                n, k = state_dict["projector.raw"].shape   # (max(d_in, d_out), min(d_in, d_out))
                d_out = k if n == self.student_dim else n
                self.projector = OrthogonalProjector(self.student_dim, d_out, scale_shift="projector.scale" in state_dict)
            elif "projector.weight" in state_dict:
                d_out = state_dict["projector.weight"].shape[0]
                self.projector = nn.Linear(self.student_dim, d_out, bias="projector.bias" in state_dict)
            if self.projector is not None:
                p = next(iter(self.student.parameters()))
                self.projector.to(p.device)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    # -- pieces -------------------------------------------------------------------------------------
    def student_outputs(self, images: Tensor) -> tuple[Tensor, Optional[Tensor], Tensor]:
        """-> (class logits (B, K), distillation logits (B, K) or None, pooled patch feature (B, d_s)).

        The feature is the mean of the final (post-norm) patch tokens for ViTs, prefix tokens
        excluded; global average pooling for CNN students.
        """
        tokens = self.student.forward_features(images)
        if tokens.ndim == 3:
            feat = tokens[:, int(getattr(self.student, "num_prefix_tokens", 1)):].mean(dim=1)
        else:
            feat = pool_map(tokens)
        if self.num_classes <= 0:
            return None, None, feat
        out = self.student.forward_head(tokens)
        if isinstance(out, (tuple, list)):
            return out[0], out[1], feat
        return out, None, feat

    @torch.no_grad()
    def teacher_outputs(self, images: Tensor, logits: bool, feature: bool) -> tuple[Optional[Tensor], Optional[Tensor]]:
        """-> (teacher logits (B, K) or None, pooled teacher feature (B, d_t) or None), no grad.

        The feature is timm's ``pre_logits`` (global average pool of the last map for CNNs such as
        RegNetY-160: (B, 3024, 7, 7) -> (B, 3024)).
        """
        t = self.teacher
        if hasattr(t, "forward_features") and hasattr(t, "forward_head"):
            fm = t.forward_features(images)
            z = t.forward_head(fm) if logits else None
            f = t.forward_head(fm, pre_logits=True) if feature else None
            return z, f
        from kdforge.models.taps import pooled_features
        return (t(images) if logits else None), (pooled_features(t, images) if feature else None)

    # -- contract -----------------------------------------------------------------------------------
    def training_step(self, batch, step):
        a = self.args
        images, labels = batch
        use_ce, use_kd, use_feat = a.ce_weight > 0, a.gamma > 0, a.alpha > 0
        if self.num_classes > 0:  # student and teacher see the same mixed batch
            images, targets, _ = mix_batch(images, labels, self.num_classes, a.mixup_alpha, a.cutmix_alpha,
                                           a.mix_prob, a.mix_switch_prob, a.label_smoothing)
        z_t = f_t = None
        if use_kd or use_feat:
            z_t, f_t = self.teacher_outputs(images, logits=use_kd, feature=use_feat)
        z_cls, z_dist, f_s = self.student_outputs(images)
        out: dict[str, Tensor] = {}
        loss = torch.zeros((), device=images.device)
        heads = [z for z in (z_cls, z_dist) if z is not None]
        # class head: CE (or KL when CE is off); dist head: KL (or CE when KL is off)
        ce_heads = [z_cls] if z_dist is not None and use_kd else heads
        kd_heads = [z_dist] if z_dist is not None and use_ce else heads
        if use_ce and heads:
            ce = sum(soft_cross_entropy(z, targets) for z in ce_heads) / len(ce_heads)
            loss = loss + a.ce_weight * ce
            out["ce"] = ce.detach()
        if use_kd and heads:
            kd = sum(kd_kl(z, z_t, a.temperature) for z in kd_heads) / len(kd_heads)
            loss = loss + a.gamma * kd
            out["kd"] = kd.detach()
        if use_feat:
            if self.projector is None:
                raise RuntimeError("VkD: the feature term needs a teacher (or method.teacher_dim) to build the projector")
            feat = vkd_feature_loss(f_s, f_t, self.projector, norm=a.norm, beta=a.smooth_l1_beta)
            loss = loss + a.alpha * feat
            out["feat"] = feat.detach()
            w = self.projector.weight
            out["proj_fro"] = w.detach().float().norm()
        return {"loss": loss, **out}

    @classmethod
    def train_transform(cls, cfg):
        args = cfg.method_args()
        if args.three_augment:
            return ThreeAugment(cfg.data, args.color_jitter)
        return super().train_transform(cfg)
