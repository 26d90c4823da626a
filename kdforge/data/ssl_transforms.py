"""MoCo-style augmentations for contrastive pretraining (PIL image -> normalised tensor (C, H, W)).

Chen et al., MoCo-v2 (2020), and the strengthened recipe of Shi et al., "On the Efficacy of Small
Self-Supervised Contrastive Models without Distillation Signals" (AAAI 2022),
``shared/methods/sslsmall.md`` §1.5. One view is::

    RandomResizedCrop(size, scale=(0.2, 1))
    → RandomApply(ColorJitter(0.8·cj, 0.8·cj, 0.8·cj, min(0.5, 0.4·cj)), p=0.8)
    → RandomGrayscale(p=grey) → RandomApply(GaussianBlur(σ ~ U[0.1, 2]), p=blur)
    → RandomHorizontalFlip(p=flip) → ToTensor + Normalize(mean, std) (fused: ToNormalizedTensor)

Presets: ``improved`` (cj 1.0 → jitter (0.8, 0.8, 0.8, 0.4), grey 0.5, blur 0.5, the paper) and
``mocov2`` (jitter (0.4, 0.4, 0.4, 0.1), grey 0.2, blur 0.5). Each view draws its randomness from
Python ``random`` (blur σ) and the torch RNG (all the rest), both seeded per sample by kdforge's
datasets, so views are reproducible.
"""
from __future__ import annotations

import random
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from PIL import Image, ImageFilter
from torchvision import transforms as T

from kdforge.data.transforms import MultiView

#: the knob values of the two recipes (keyword arguments of :func:`moco_view_transform`)
MOCO_AUG_PRESETS = {
    "improved": dict(cj=1.0, jitter=None, grey_p=0.5, blur_p=0.5),
    "mocov2": dict(cj=None, jitter=(0.4, 0.4, 0.4, 0.1), grey_p=0.2, blur_p=0.5),
}


def jitter_strengths(cj: float) -> tuple[float, float, float, float]:
    """Colour-jitter (brightness, contrast, saturation, hue) for strength ``cj``:
    ``(0.8·cj, 0.8·cj, 0.8·cj, min(0.5, 0.4·cj))`` — cj = 1 gives (0.8, 0.8, 0.8, 0.4)."""
    if cj < 0:
        raise ValueError(f"colour-jitter strength cj must be >= 0, got {cj}")
    return (0.8 * cj, 0.8 * cj, 0.8 * cj, min(0.5, 0.4 * cj))


class PILGaussianBlur:
    """PIL ``ImageFilter.GaussianBlur(radius=σ)`` with σ ~ U[sigma[0], sigma[1]] drawn from Python
    ``random`` (MoCo-v2's blur; the radius is in pixels of the image it receives)."""

    def __init__(self, sigma: Sequence[float] = (0.1, 2.0)):
        lo, hi = float(sigma[0]), float(sigma[1])
        if not 0 <= lo <= hi:
            raise ValueError(f"blur sigma range must satisfy 0 <= lo <= hi, got {tuple(sigma)}")
        self.sigma = (lo, hi)

    def __call__(self, img: Image.Image) -> Image.Image:
        return img.filter(ImageFilter.GaussianBlur(radius=random.uniform(*self.sigma)))

    def __repr__(self) -> str:
        return f"PILGaussianBlur(sigma={self.sigma})"


class ToNormalizedTensor:
    """PIL image -> float tensor (C, H, W): ``(pixel / 255 − mean) / std`` — ``ToTensor`` followed by
    ``Normalize`` in one cheap step (the pair costs ~0.6 ms per small image in torchvision's checks)."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        self.mean = torch.tensor([float(m) for m in mean]).view(-1, 1, 1)
        self.std = torch.tensor([float(v) for v in std]).view(-1, 1, 1)

    def __call__(self, img: Image.Image) -> torch.Tensor:
        a = np.asarray(img, dtype=np.uint8)
        t = torch.from_numpy(a.copy())
        t = t.unsqueeze(0) if t.ndim == 2 else t.permute(2, 0, 1)
        if t.shape[0] != self.mean.shape[0]:
            raise ValueError(f"image has {t.shape[0]} channels but mean/std have {self.mean.shape[0]}")
        return (t.float().div_(255.0) - self.mean) / self.std

    def __repr__(self) -> str:
        return f"ToNormalizedTensor(mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()})"


def moco_view_transform(img_size: int = 224, cj: Optional[float] = 1.0,
                        jitter: Optional[Sequence[float]] = None, jitter_p: float = 0.8, grey_p: float = 0.5,
                        blur_p: float = 0.5, blur_sigma: Sequence[float] = (0.1, 2.0),
                        scale: Sequence[float] = (0.2, 1.0), flip_p: float = 0.5,
                        mean: Sequence[float] = (0.485, 0.456, 0.406),
                        std: Sequence[float] = (0.229, 0.224, 0.225)) -> Callable:
    """One random MoCo view (see the module docstring). ``jitter`` = explicit (b, c, s, h) overrides
    ``cj``; ``cj=None`` and ``jitter=None`` disables colour jitter. Returns a ``T.Compose``."""
    for name, p in (("jitter_p", jitter_p), ("grey_p", grey_p), ("blur_p", blur_p), ("flip_p", flip_p)):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"{name}: expected a probability in [0, 1], got {p}")
    if not (len(scale) == 2 and 0 < scale[0] <= scale[1] <= 1):
        raise ValueError(f"scale: expected (lo, hi) with 0 < lo <= hi <= 1, got {tuple(scale)}")
    if jitter is None and cj is not None:
        jitter = jitter_strengths(cj)
    ops: list = [T.RandomResizedCrop(img_size, scale=(float(scale[0]), float(scale[1])),
                                     interpolation=T.InterpolationMode.BICUBIC)]
    if jitter is not None and any(v > 0 for v in jitter) and jitter_p > 0:
        b, c, s, h = (float(v) for v in jitter)
        ops.append(T.RandomApply([T.ColorJitter(b, c, s, h)], p=jitter_p))
    if grey_p > 0:
        ops.append(T.RandomGrayscale(p=grey_p))
    if blur_p > 0:
        ops.append(T.RandomApply([PILGaussianBlur(blur_sigma)], p=blur_p))
    if flip_p > 0:
        ops.append(T.RandomHorizontalFlip(p=flip_p))
    ops.append(ToNormalizedTensor(mean, std))
    return T.Compose(ops)


def moco_preset_transform(preset: str = "improved", **overrides) -> Callable:
    """:func:`moco_view_transform` with the knobs of ``preset`` (``improved`` | ``mocov2``), then
    ``overrides`` (e.g. ``img_size``, ``mean``, ``std`` or any knob)."""
    if preset not in MOCO_AUG_PRESETS:
        raise ValueError(f"MoCo augmentation preset: expected one of {', '.join(MOCO_AUG_PRESETS)}, got {preset!r}")
    kw = dict(MOCO_AUG_PRESETS[preset])
    kw.update(overrides)
    return moco_view_transform(**kw)


def two_views(view: Callable) -> MultiView:
    """MoCo's ``TwoCropsTransform``: ``img -> [view(img), view(img)]`` (two independent draws)."""
    return MultiView([view, view])
