"""DINO/iBOT multi-crop augmentation: 2 global + L local crops, with iBOT block masks for the globals.

Caron et al., DINO (ICCV 2021) §3 and appendix; SMKD spec ``shared/methods/smkd.md`` §1.3. Every crop
is ``RandomResizedCrop(size, scale, ratio 3/4–4/3, bicubic)`` → flip (p ½) → ColorJitter(0.4, 0.4, 0.2,
0.1) with p 0.8 → grayscale p 0.2, then:

* global crop 1: Gaussian blur (PIL, radius ~ U(0.1, 2)) with p 1.0;
* global crop 2: blur p 0.1, then solarisation (PIL, threshold 128) p 0.2;
* each of the L local crops (smaller size and scale): blur p 0.5;

then ToTensor + Normalize(mean, std). Output: ``[global1, global2, local_1 … local_L]`` of (C, S, S)
tensors. :class:`MaskedMultiCrop` adds one (h, w) block mask per global crop, h = w = size / patch.
Randomness: the torch RNG (crops, jitter, flips) and Python ``random`` (blur radius, masks), both
seeded per sample by kdforge's datasets.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

from PIL import Image, ImageOps
from torchvision import transforms as T

from kdforge.data.ssl_transforms import PILGaussianBlur

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: CIFAR-FS / FC100 statistics used by SMKD (§1.3): (129.377, 124.106, 112.478)/255 and (68.209, 65.431, 70.459)/255
CIFAR_FS_MEAN = (129.37731888 / 255, 124.10583864 / 255, 112.47758569 / 255)
CIFAR_FS_STD = (68.20947949 / 255, 65.43124043 / 255, 70.45866994 / 255)


class Solarize:
    """PIL ``ImageOps.solarize(img, threshold)``: invert every channel value ≥ threshold."""

    def __init__(self, threshold: int = 128):
        self.threshold = int(threshold)

    def __call__(self, img: Image.Image) -> Image.Image:
        return ImageOps.solarize(img, threshold=self.threshold)

    def __repr__(self) -> str:
        return f"Solarize(threshold={self.threshold})"


def dino_crop(size: int, scale: Sequence[float], blur_p: float, solarize_p: float = 0.0,
              mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
              jitter: Sequence[float] = (0.4, 0.4, 0.2, 0.1), jitter_p: float = 0.8, grey_p: float = 0.2,
              flip_p: float = 0.5, blur_sigma: Sequence[float] = (0.1, 2.0)) -> Callable:
    """One DINO crop (see the module doc): PIL image -> normalised tensor (C, size, size). ``jitter`` =
    ColorJitter (brightness, contrast, saturation, hue), zeros skip a factor; ``blur_sigma`` = the PIL blur
    radius range in pixels."""
    if not (len(scale) == 2 and 0 < scale[0] <= scale[1] <= 1):
        raise ValueError(f"crop scale: expected (lo, hi) with 0 < lo <= hi <= 1, got {tuple(scale)}")
    ops: list = [T.RandomResizedCrop(size, scale=(float(scale[0]), float(scale[1])),
                                     interpolation=T.InterpolationMode.BICUBIC),
                 T.RandomHorizontalFlip(p=flip_p)]
    if any(float(j) > 0 for j in jitter) and jitter_p > 0:
        ops.append(T.RandomApply([T.ColorJitter(*[float(j) for j in jitter])], p=jitter_p))
    if grey_p > 0:
        ops.append(T.RandomGrayscale(p=grey_p))
    if blur_p >= 1.0:
        ops.append(PILGaussianBlur(blur_sigma))
    elif blur_p > 0:
        ops.append(T.RandomApply([PILGaussianBlur(blur_sigma)], p=blur_p))
    if solarize_p > 0:
        ops.append(T.RandomApply([Solarize(128)], p=solarize_p))
    ops += [T.ToTensor(), T.Normalize(mean=list(mean), std=list(std))]
    return T.Compose(ops)


class MultiCrop:
    """``img -> [global1, global2, local_1, …, local_L]`` (DINO recipe; sizes/scales from config)."""

    def __init__(self, global_size: int = 224, local_size: int = 96, n_local: int = 10,
                 global_scale: Sequence[float] = (0.25, 1.0), local_scale: Sequence[float] = (0.05, 0.25),
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                 jitter: Sequence[float] = (0.4, 0.4, 0.2, 0.1), blur_sigma: Sequence[float] = (0.1, 2.0)):
        if n_local < 0:
            raise ValueError(f"n_local must be >= 0, got {n_local}")
        self.global_size, self.local_size, self.n_local = int(global_size), int(local_size), int(n_local)
        self.n_global = 2
        kw = dict(mean=mean, std=std, jitter=jitter, blur_sigma=blur_sigma)
        self.global1 = dino_crop(global_size, global_scale, blur_p=1.0, **kw)
        self.global2 = dino_crop(global_size, global_scale, blur_p=0.1, solarize_p=0.2, **kw)
        self.local = dino_crop(local_size, local_scale, blur_p=0.5, **kw)

    def __call__(self, img):
        return [self.global1(img), self.global2(img)] + [self.local(img) for _ in range(self.n_local)]

    def __repr__(self) -> str:
        return (f"MultiCrop(global 2×{self.global_size}, local {self.n_local}×{self.local_size})")


class MaskedMultiCrop:
    """``img -> (crops, masks)``: :class:`MultiCrop` output plus one (h, w) bool block mask per global
    crop (h = w = global_size // patch_size), from ``mask_generator`` (a
    :class:`kdforge.data.masking.BlockMaskGenerator`). Collated: a list of (B, C, S, S) crop tensors and
    a list of G (B, h, w) mask tensors."""

    def __init__(self, multicrop: MultiCrop, mask_generator: Optional[Callable], patch_size: int):
        if multicrop.global_size % patch_size:
            raise ValueError(f"global crop size {multicrop.global_size} is not a multiple of patch size {patch_size}")
        self.multicrop, self.mask_generator, self.patch_size = multicrop, mask_generator, int(patch_size)

    def __call__(self, img):
        import torch
        crops = self.multicrop(img)
        g = self.multicrop.global_size // self.patch_size
        if self.mask_generator is None:
            masks = [torch.zeros(g, g, dtype=torch.bool) for _ in range(self.multicrop.n_global)]
        else:
            masks = [self.mask_generator(g, g) for _ in range(self.multicrop.n_global)]
        return crops, masks

    def __repr__(self) -> str:
        return f"MaskedMultiCrop({self.multicrop!r}, {self.mask_generator!r}, patch={self.patch_size})"
