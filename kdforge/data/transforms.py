"""Transform presets (PIL image -> normalised float tensor (C, H, W)).

Train presets (``data.train_transform``):

* ``standard`` — RandomResizedCrop(img_size, scale 0.08–1) + horizontal flip (ImageNet recipe)
* ``cifar``    — resize to img_size, random crop with padding img_size/8, horizontal flip
* ``pad_crop`` — like ``cifar`` without the flip (digits, text)
* ``none``     — the eval transform

Eval: resize the short side to ``img_size / eval_crop_pct`` then centre-crop ``img_size``
(``eval_crop_pct = 1`` resizes straight to the target size). Grayscale inputs become RGB when
``in_chans == 3`` (done by the dataset's ``mode``).
"""
from __future__ import annotations

from typing import Callable, Sequence

from torchvision import transforms as T

TRAIN_PRESETS = ("standard", "cifar", "pad_crop", "none")


def normalize(data_cfg) -> Callable:
    return T.Normalize(mean=list(data_cfg.mean), std=list(data_cfg.std))


def build_eval_transform(data_cfg, crop_pct: float | None = None) -> Callable:
    size = data_cfg.img_size
    pct = getattr(data_cfg, "eval_crop_pct", 1.0) if crop_pct is None else crop_pct
    if pct >= 1.0:
        resize = [T.Resize((size, size), interpolation=T.InterpolationMode.BICUBIC)]
    else:
        resize = [T.Resize(int(round(size / pct)), interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(size)]
    return T.Compose(resize + [T.ToTensor(), normalize(data_cfg)])


def build_train_transform(data_cfg, preset: str | None = None) -> Callable:
    name = preset or data_cfg.train_transform
    size = data_cfg.img_size
    if name == "standard":
        ops = [T.RandomResizedCrop(size, scale=(0.08, 1.0), interpolation=T.InterpolationMode.BICUBIC),
               T.RandomHorizontalFlip()]
    elif name in ("cifar", "pad_crop"):
        ops = [T.Resize((size, size), interpolation=T.InterpolationMode.BICUBIC),
               T.RandomCrop(size, padding=max(size // 8, 1))]
        if name == "cifar":
            ops.append(T.RandomHorizontalFlip())
    elif name == "none":
        return build_eval_transform(data_cfg)
    else:
        raise ValueError(f"data.train_transform: expected one of {TRAIN_PRESETS}, got {name!r}")
    return T.Compose(ops + [T.ToTensor(), normalize(data_cfg)])


class MultiView:
    """Apply several transforms to one image: ``img -> [t(img) for t in transforms]``."""

    def __init__(self, transforms: Sequence[Callable]):
        self.transforms = list(transforms)

    def __call__(self, img):
        return [t(img) for t in self.transforms]

    def __repr__(self) -> str:
        return f"MultiView({self.transforms!r})"
