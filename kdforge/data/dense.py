"""Detection and segmentation data: COCO JSON, Pascal VOC XML, image + mask folders.

Every dataset returns ``(image, target)``: ``image`` a float tensor (C, H, W) in [0, 1] (the
detector / segmenter normalises it), ``target`` a dict

* detection: ``boxes`` (N, 4) float ``x1, y1, x2, y2`` in pixels of the *transformed* image,
  ``labels`` (N,) int64 in 1..K (0 is background), ``image_id`` (int, the COCO id),
  ``scale`` (2,) float ``(sx, sy)`` = transformed / original size (boxes ÷ scale = original pixels);
* segmentation: ``mask`` (H, W) int64 class indices (0 = background), ``ignore_index`` (255) for
  "don't care" pixels (VOC's object borders, padding).

Layouts (``data.root`` = ROOT, ``split`` = ``data.train_split`` / ``data.val_split`` / test):

* COCO: ``ROOT/annotations/instances_{split}.json`` + images in ``ROOT/{split}/images/`` or
  ``ROOT/{split}/`` (the COCO 2017 layout: ``annotations/instances_train2017.json`` + ``train2017/``);
* VOC detection: ``ROOT/Annotations/<id>.xml`` + ``ROOT/JPEGImages/<id>.jpg`` listed in
  ``ROOT/ImageSets/Main/{split}.txt``; ``difficult`` objects are kept as ``iscrowd`` in the
  COCO view so that they neither count as misses nor as false positives (the VOC convention);
* segmentation: ``ROOT/{split}/images/*`` + ``ROOT/{split}/masks/<stem>.png``, or VOC
  ``JPEGImages/`` + ``SegmentationClass/<id>.png`` (``SegmentationClassAug/`` when present there, for
  the SBD-augmented ``trainaug`` list) listed in ``ImageSets/Segmentation/{split}.txt``.
  Mask PNGs hold class indices (palette or grey); 255 = ignore.

Transforms act on ``(PIL image, target, rng)`` with an explicit ``random.Random`` so that boxes,
masks and pixels always move together; augmentation is seeded per (seed, epoch, index) like the
classification datasets (``set_seed``).
"""
from __future__ import annotations

import json
import multiprocessing as mp
import random
import warnings
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from kdforge.data.datasets import _sample_seed, is_image

IGNORE_INDEX = 255


# ------------------------------------------------------------------------------------------------
# transforms (image, target, rng) -> (image, target)
# ------------------------------------------------------------------------------------------------

class DenseCompose:
    def __init__(self, transforms: Sequence[Callable]):
        self.transforms = list(transforms)

    def __call__(self, img, target: dict, rng: random.Random):
        for t in self.transforms:
            img, target = t(img, target, rng)
        return img, target

    def __repr__(self) -> str:
        return f"DenseCompose({self.transforms})"


def _resize_target(target: dict, sx: float, sy: float, size: tuple[int, int]) -> dict:
    from PIL import Image
    out = dict(target)
    if "boxes" in out:
        out["boxes"] = out["boxes"] * torch.tensor([sx, sy, sx, sy], dtype=torch.float32)
    if "scale" in out:
        out["scale"] = out["scale"] * torch.tensor([sx, sy], dtype=torch.float32)
    if "mask" in out:
        out["mask"] = out["mask"].resize(size, Image.NEAREST)
    return out


class DenseResize:
    """Resize so that the shorter side is ``size`` and the longer at most ``max_size``
    (aspect ratio kept). Boxes scale by (new_w / w, new_h / h); masks use nearest neighbour."""

    def __init__(self, size: int, max_size: Optional[int] = None):
        self.size, self.max_size = int(size), max_size

    def output_size(self, w: int, h: int) -> tuple[int, int]:
        s = self.size / min(w, h)
        if self.max_size is not None and max(w, h) * s > self.max_size:
            s = self.max_size / max(w, h)
        return max(1, int(round(w * s))), max(1, int(round(h * s)))

    def __call__(self, img, target, rng):
        from PIL import Image
        w, h = img.size
        nw, nh = self.output_size(w, h)
        if (nw, nh) == (w, h):
            return img, target
        return img.resize((nw, nh), Image.BILINEAR), _resize_target(target, nw / w, nh / h, (nw, nh))


class DenseRandomScale:
    """Resize by a factor drawn uniformly from ``[lo, hi]`` (the DeepLab / PSPNet scale augmentation)."""

    def __init__(self, lo: float, hi: float):
        self.lo, self.hi = float(lo), float(hi)

    def __call__(self, img, target, rng):
        from PIL import Image
        f = rng.uniform(self.lo, self.hi)
        w, h = img.size
        nw, nh = max(1, int(round(w * f))), max(1, int(round(h * f)))
        return img.resize((nw, nh), Image.BILINEAR), _resize_target(target, nw / w, nh / h, (nw, nh))


class DenseRandomCrop:
    """Random ``size``×``size`` crop; smaller images are padded (image 0, mask ``IGNORE_INDEX``) first.
    Boxes are shifted and clipped; boxes left with no area are dropped."""

    def __init__(self, size: int):
        self.size = int(size)

    def __call__(self, img, target, rng):
        from PIL import Image
        w, h = img.size
        pw, ph = max(w, self.size), max(h, self.size)
        out = dict(target)
        if (pw, ph) != (w, h):
            canvas = Image.new(img.mode, (pw, ph))
            canvas.paste(img, (0, 0))
            img = canvas
            if "mask" in out:
                m = Image.new(out["mask"].mode, (pw, ph), IGNORE_INDEX)
                m.paste(out["mask"], (0, 0))
                out["mask"] = m
        x0, y0 = rng.randint(0, pw - self.size), rng.randint(0, ph - self.size)
        box = (x0, y0, x0 + self.size, y0 + self.size)
        img = img.crop(box)
        if "mask" in out:
            out["mask"] = out["mask"].crop(box)
        if "boxes" in out:
            b = out["boxes"] - torch.tensor([x0, y0, x0, y0], dtype=torch.float32)
            b = b.clamp(min=0, max=self.size)
            keep = (b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])
            out["boxes"], out["labels"] = b[keep], out["labels"][keep]
        return img, out


class DenseHorizontalFlip:
    """Flip with probability ``p``: ``x1' = W - x2``, ``x2' = W - x1``; the mask flips with the image."""

    def __init__(self, p: float = 0.5):
        self.p = float(p)

    def __call__(self, img, target, rng):
        from PIL import Image
        if rng.random() >= self.p:
            return img, target
        w = img.size[0]
        out = dict(target)
        if "boxes" in out:
            b = out["boxes"]
            out["boxes"] = torch.stack([w - b[:, 2], b[:, 1], w - b[:, 0], b[:, 3]], dim=1)
        if "mask" in out:
            out["mask"] = out["mask"].transpose(Image.FLIP_LEFT_RIGHT)
        return img.transpose(Image.FLIP_LEFT_RIGHT), out


class DenseToTensor:
    """PIL image -> float (C, H, W) in [0, 1]; PIL mask -> int64 (H, W)."""

    def __call__(self, img, target, rng):
        arr = np.asarray(img, dtype=np.float32) / 255.0
        if arr.ndim == 2:
            arr = arr[:, :, None]
        out = dict(target)
        if "mask" in out and not torch.is_tensor(out["mask"]):
            out["mask"] = torch.from_numpy(np.array(out["mask"], dtype=np.int64))
        return torch.from_numpy(arr.transpose(2, 0, 1).copy()), out


def build_dense_transform(img_size: int, train: bool, task: str = "detect", max_size: Optional[int] = None,
                          flip: bool = True, scale_range: Optional[Sequence[float]] = None) -> DenseCompose:
    """Detection: resize (shorter side ``img_size``, longer ≤ ``max_size``) [+ flip when training].
    Segmentation, training: random scale in ``scale_range`` (if given) else resize, flip, random
    ``img_size`` crop; evaluation: resize only (scored at that resolution)."""
    ts: list = []
    if train and task == "segment" and scale_range:
        ts.append(DenseRandomScale(*scale_range))
    else:
        ts.append(DenseResize(img_size, max_size))
    if train and flip:
        ts.append(DenseHorizontalFlip(0.5))
    if train and task == "segment":
        ts.append(DenseRandomCrop(img_size))
    ts.append(DenseToTensor())
    return DenseCompose(ts)


# ------------------------------------------------------------------------------------------------
# datasets
# ------------------------------------------------------------------------------------------------

class _DenseBase(Dataset):
    """Shared: image loading with corrupt-file skip + count, per-sample seeded transforms."""

    def __init__(self, transform: Optional[Callable], on_corrupt: str = "skip", mode: str = "RGB"):
        if on_corrupt not in ("skip", "fail"):
            raise ValueError(f"on_corrupt: expected 'skip' or 'fail', got {on_corrupt!r}")
        self.transform = transform
        self.on_corrupt, self.mode = on_corrupt, mode
        self._corrupt = mp.Value("i", 0)
        self.seed: Optional[int] = None
        self.epoch = 0

    @property
    def corrupt_count(self) -> int:
        return int(self._corrupt.value)

    def set_seed(self, seed: Optional[int], epoch: int = 0) -> None:
        self.seed, self.epoch = seed, epoch

    def _open(self, path: Path, mode: Optional[str] = None):
        from PIL import Image
        with open(path, "rb") as f:
            img = Image.open(f)
            img.load()
        return img.convert(mode) if mode else img

    def _rng(self, index: int) -> random.Random:
        return random.Random(_sample_seed(self.seed, self.epoch, index) if self.seed is not None else None)

    def _raw(self, i: int):  # pragma: no cover - subclasses
        raise NotImplementedError

    def __getitem__(self, index: int):
        n = len(self)
        for attempt in range(min(n, 50)):
            i = (index + attempt) % n
            try:
                img, target = self._raw(i)
            except (OSError, SyntaxError, ValueError) as e:  # PIL's errors for broken files
                if self.on_corrupt == "fail":
                    raise RuntimeError(f"cannot read sample {i} of {type(self).__name__} ({type(e).__name__}: "
                                       f"{e}); remove it or set data.on_corrupt=skip") from None
                with self._corrupt.get_lock():
                    self._corrupt.value += 1
                warnings.warn(f"skipping unreadable sample {i} ({type(e).__name__}: {e})")
                continue
            if self.transform is not None:
                img, target = self.transform(img, target, self._rng(index))
            return img, target
        raise RuntimeError(f"50 consecutive unreadable samples from index {index}; is the dataset intact?")


class CocoDetection(_DenseBase):
    """COCO ``instances`` JSON + an image folder -> ``(image, {boxes, labels, image_id, scale})``.

    Category ids (any integers) map to contiguous labels 1..K in sorted id order
    (``label_to_cat``); ``iscrowd`` annotations and boxes without area are left out of the
    training targets but stay in :meth:`coco_gt` (so COCOeval ignores detections on them).
    """

    def __init__(self, ann_file: str | Path, image_dir: str | Path, transform: Optional[Callable] = None,
                 on_corrupt: str = "skip", mode: str = "RGB", gt: Optional[dict] = None):
        super().__init__(transform, on_corrupt, mode)
        self.ann_file, self.image_dir = Path(ann_file) if ann_file else None, Path(image_dir)
        if gt is None:
            if not self.ann_file.is_file():
                raise FileNotFoundError(f"COCO annotations {str(self.ann_file)!r} not found")
            gt = json.loads(self.ann_file.read_text())
        for key in ("images", "annotations", "categories"):
            if key not in gt:
                raise ValueError(f"{self.ann_file}: not a COCO instances file (no {key!r})")
        self.gt = gt
        cats = sorted(gt["categories"], key=lambda c: c["id"])
        self.label_to_cat = [0] + [int(c["id"]) for c in cats]
        self.cat_to_label = {c: i for i, c in enumerate(self.label_to_cat) if i > 0}
        self.classes = [str(c["name"]) for c in cats]
        self.images = sorted(gt["images"], key=lambda im: im["id"])
        self._anns: dict[int, list] = {im["id"]: [] for im in self.images}
        for a in gt["annotations"]:
            self._anns.setdefault(a["image_id"], []).append(a)

    def __len__(self) -> int:
        return len(self.images)

    def coco_gt(self) -> dict:
        """The ground truth as a COCO dict (for :func:`kdforge.eval.dense.coco_map`)."""
        return self.gt

    def _raw(self, i: int):
        info = self.images[i]
        img = self._open(self.image_dir / info["file_name"], self.mode)
        boxes, labels = [], []
        for a in self._anns.get(info["id"], []):
            x, y, w, h = a["bbox"]
            if a.get("iscrowd", 0) or w <= 0 or h <= 0:
                continue
            boxes.append([x, y, x + w, y + h])
            labels.append(self.cat_to_label[int(a["category_id"])])
        return img, {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                     "labels": torch.tensor(labels, dtype=torch.int64), "image_id": int(info["id"]),
                     "scale": torch.ones(2)}


def voc_to_coco(root: str | Path, split: str, classes: Optional[Sequence[str]] = None) -> dict:
    """Pascal VOC XML annotations (``ROOT/Annotations``, ``ImageSets/Main/{split}.txt``) -> a COCO dict.

    Boxes: VOC pixel corners are 1-based and inclusive, so ``x = xmin - 1``, ``w = xmax - xmin + 1``.
    ``difficult`` objects become ``iscrowd=1`` (ignored by COCOeval, like VOC's evaluation).
    Classes: given, or the sorted names found in the split.
    """
    root = Path(root)
    lst = root / "ImageSets" / "Main" / f"{split}.txt"
    if not lst.is_file():
        raise FileNotFoundError(f"VOC split list {str(lst)!r} not found")
    ids = [ln.split()[0] for ln in lst.read_text().splitlines() if ln.strip()]
    parsed = []
    for k, sid in enumerate(ids):
        tree = ET.parse(root / "Annotations" / f"{sid}.xml").getroot()
        size = tree.find("size")
        fname = tree.findtext("filename") or f"{sid}.jpg"
        objs = []
        for o in tree.findall("object"):
            bb = o.find("bndbox")
            x1, y1, x2, y2 = (float(bb.findtext(t)) for t in ("xmin", "ymin", "xmax", "ymax"))
            objs.append((o.findtext("name").strip(), x1 - 1, y1 - 1, x2 - x1 + 1, y2 - y1 + 1,
                         int(o.findtext("difficult") or 0)))
        parsed.append((k + 1, fname, int(size.findtext("width")), int(size.findtext("height")), objs))
    names = list(classes) if classes else sorted({o[0] for *_, objs in parsed for o in objs})
    cat = {n: i + 1 for i, n in enumerate(names)}
    images, anns = [], []
    for img_id, fname, w, h, objs in parsed:
        images.append({"id": img_id, "file_name": fname, "width": w, "height": h})
        for name, x, y, bw, bh, diff in objs:
            if name not in cat:
                raise ValueError(f"VOC object class {name!r} not in the class list {names}")
            anns.append({"id": len(anns) + 1, "image_id": img_id, "category_id": cat[name],
                         "bbox": [x, y, bw, bh], "area": bw * bh, "iscrowd": diff})
    return {"images": images, "annotations": anns,
            "categories": [{"id": i + 1, "name": n} for i, n in enumerate(names)]}


class VOCDetection(CocoDetection):
    """Pascal VOC detection split read from XML (see :func:`voc_to_coco`); same output as COCO."""

    def __init__(self, root: str | Path, split: str, transform: Optional[Callable] = None,
                 on_corrupt: str = "skip", mode: str = "RGB", classes: Optional[Sequence[str]] = None):
        super().__init__(None, Path(root) / "JPEGImages", transform, on_corrupt, mode,
                         gt=voc_to_coco(root, split, classes))


class SegmentationFolder(_DenseBase):
    """Images + class-index mask PNGs -> ``(image, {mask, ignore_index, image_id})``.

    ``pairs`` are ``(image path, mask path)``; ``num_classes`` counts background (class 0).
    """

    def __init__(self, pairs: Sequence[tuple[Path, Path]], num_classes: int, classes: Optional[list[str]] = None,
                 transform: Optional[Callable] = None, on_corrupt: str = "skip", mode: str = "RGB"):
        super().__init__(transform, on_corrupt, mode)
        self.pairs = [(Path(a), Path(b)) for a, b in pairs]
        self.num_classes = int(num_classes)
        self.classes = list(classes) if classes else [str(i) for i in range(1, self.num_classes)]

    def __len__(self) -> int:
        return len(self.pairs)

    def _raw(self, i: int):
        ip, mp_ = self.pairs[i]
        img = self._open(ip, self.mode)
        mask = self._open(mp_)  # palette ("P") or grey ("L") PNG: pixel values are class indices
        if mask.mode not in ("P", "L"):
            raise ValueError(f"mask {mp_} has mode {mask.mode}; expected a palette or grey PNG of class indices")
        if mask.size != img.size:
            raise ValueError(f"mask {mp_} size {mask.size} differs from image {ip} size {img.size}")
        return img, {"mask": mask, "ignore_index": IGNORE_INDEX, "image_id": i}

    @classmethod
    def from_folders(cls, image_dir: str | Path, mask_dir: str | Path, num_classes: int, **kw):
        image_dir, mask_dir = Path(image_dir), Path(mask_dir)
        if not image_dir.is_dir() or not mask_dir.is_dir():
            raise FileNotFoundError(f"segmentation data needs {image_dir} and {mask_dir}")
        pairs = []
        for p in sorted(q for q in image_dir.iterdir() if is_image(q)):
            m = mask_dir / f"{p.stem}.png"
            if not m.is_file():
                raise FileNotFoundError(f"no mask {m} for image {p}")
            pairs.append((p, m))
        return cls(pairs, num_classes, **kw)

    @classmethod
    def from_voc(cls, root: str | Path, split: str, num_classes: int = 21, **kw):
        root = Path(root)
        lst = root / "ImageSets" / "Segmentation" / f"{split}.txt"
        if not lst.is_file():
            raise FileNotFoundError(f"VOC segmentation list {str(lst)!r} not found")
        ids = [ln.split()[0] for ln in lst.read_text().splitlines() if ln.strip()]
        def mask(i: str) -> Path:  # SBD-augmented masks (trainaug) live in SegmentationClassAug
            aug = root / "SegmentationClassAug" / f"{i}.png"
            return aug if aug.is_file() else root / "SegmentationClass" / f"{i}.png"
        pairs = [(root / "JPEGImages" / f"{i}.jpg", mask(i)) for i in ids]
        return cls(pairs, num_classes, **kw)


# ------------------------------------------------------------------------------------------------
# layout resolution + collate
# ------------------------------------------------------------------------------------------------

def detection_dataset(root: str | Path, split: str, transform=None, on_corrupt: str = "skip", mode: str = "RGB",
                      fmt: str = "auto"):
    """The detection split ``split`` of ``root`` in COCO or VOC layout (``fmt`` auto|coco|voc); see the
    module docstring. Raises FileNotFoundError when the split does not exist."""
    root = Path(root)
    ann = root / "annotations" / f"instances_{split}.json"
    if fmt in ("auto", "coco") and ann.is_file():
        img_dir = root / split / "images" if (root / split / "images").is_dir() else root / split
        return CocoDetection(ann, img_dir, transform, on_corrupt, mode)
    if fmt in ("auto", "voc") and (root / "ImageSets" / "Main" / f"{split}.txt").is_file():
        return VOCDetection(root, split, transform, on_corrupt, mode)
    raise FileNotFoundError(f"no detection split {split!r} in {root}: expected {ann} (COCO) or "
                            f"{root / 'ImageSets/Main' / (split + '.txt')} (VOC)")


def segmentation_dataset(root: str | Path, split: str, num_classes: Optional[int] = None, transform=None,
                         on_corrupt: str = "skip", mode: str = "RGB"):
    """The segmentation split ``split`` of ``root`` (folders or VOC; see the module docstring).
    ``num_classes`` (with background) defaults to ``ROOT/dataset.json``'s ``seg_classes`` or 21 (VOC)."""
    root = Path(root)
    names = None
    meta = root / "dataset.json"
    if meta.is_file():
        m = json.loads(meta.read_text())
        names = m.get("seg_classes")
    n = num_classes or (len(names) if names else None)
    kw = dict(transform=transform, on_corrupt=on_corrupt, mode=mode)
    if (root / split / "images").is_dir():
        if n is None:
            raise ValueError(f"{root}: set method.num_classes (with background) or list seg_classes in dataset.json")
        return SegmentationFolder.from_folders(root / split / "images", root / split / "masks", n,
                                               classes=names[1:] if names else None, **kw)
    if (root / "ImageSets" / "Segmentation" / f"{split}.txt").is_file():
        return SegmentationFolder.from_voc(root, split, n or 21, **kw)
    raise FileNotFoundError(f"no segmentation split {split!r} in {root}: expected {root / split / 'images'} + "
                            f"masks/ or {root / 'ImageSets/Segmentation' / (split + '.txt')} (VOC)")


def detection_collate(batch):
    """List collate: ``[(img, target), ...]`` -> ``(list of images, list of targets)`` (sizes may differ)."""
    return [b[0] for b in batch], [b[1] for b in batch]


def segmentation_collate(batch):
    """Pad to the largest image of the batch (image 0, mask ``IGNORE_INDEX``) and stack:
    -> ``(images (B, C, H, W), masks (B, H, W) int64)``."""
    h = max(b[0].shape[1] for b in batch)
    w = max(b[0].shape[2] for b in batch)
    imgs = torch.zeros(len(batch), batch[0][0].shape[0], h, w)
    masks = torch.full((len(batch), h, w), IGNORE_INDEX, dtype=torch.int64)
    for i, (img, t) in enumerate(batch):
        imgs[i, :, :img.shape[1], :img.shape[2]] = img
        m: Tensor = t["mask"]
        masks[i, :m.shape[0], :m.shape[1]] = m
    return imgs, masks
