"""Image datasets read from folders.

* :class:`ImageFolderDataset` — ``ROOT/<class>/<image>`` -> ``(image, class_index)``.
* :class:`UnlabeledFolder` — any folder tree of images -> ``(image, -1)``.
* :class:`ImageListDataset` — an explicit list of ``(path, label)`` (e.g. a selection file).

Unreadable or corrupt files are skipped (the next readable sample is returned in their place) and
counted in ``corrupt_count`` (shared with DataLoader workers); with ``on_corrupt="fail"`` they raise
an error naming the file. Augmentations are seeded per sample: call ``set_seed(seed, epoch)`` and
every sample's random transform depends only on (seed, epoch, index) — independent of the number
of workers, of ranks and of where a resumed run restarts.
"""
from __future__ import annotations

import multiprocessing as mp
import random
import warnings
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

IMG_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp", ".gif")


class CorruptImageError(RuntimeError):
    pass


def is_image(path: Path) -> bool:
    return path.suffix.lower() in IMG_EXTENSIONS


def scan_image_folder(root: str | Path) -> tuple[list[str], list[tuple[str, int]]]:
    """``ROOT/<class>/**/<image>`` -> (sorted class names, [(path, class_index)]) in sorted order."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {str(root)!r} does not exist")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise FileNotFoundError(f"image folder {str(root)!r} has no class sub-folders; expected ROOT/<class>/<image>")
    samples = []
    for ci, c in enumerate(classes):
        files = sorted(p for p in (root / c).rglob("*") if p.is_file() and is_image(p))
        samples.extend((str(p), ci) for p in files)
    if not samples:
        raise FileNotFoundError(f"image folder {str(root)!r} holds no images ({', '.join(IMG_EXTENSIONS)})")
    return classes, samples


def _sample_seed(seed: int, epoch: int, index: int) -> int:
    # a cheap, well-mixed 63-bit hash of (seed, epoch, index)
    x = (seed * 0x9E3779B97F4A7C15 + epoch * 0xBF58476D1CE4E5B9 + index * 0x94D049BB133111EB) & ((1 << 64) - 1)
    x ^= x >> 31
    x = (x * 0xD6E8FEB86659FD93) & ((1 << 64) - 1)
    x ^= x >> 32
    return x & ((1 << 63) - 1)


class ImageListDataset(Dataset):
    """Images from an explicit list of ``(path, label)`` pairs."""

    def __init__(self, samples: Sequence[tuple[str, int]], classes: Optional[list[str]] = None,
                 transform: Optional[Callable] = None, on_corrupt: str = "skip", mode: str = "RGB"):
        if on_corrupt not in ("skip", "fail"):
            raise ValueError(f"on_corrupt: expected 'skip' or 'fail', got {on_corrupt!r}")
        self.samples = list(samples)
        self.targets = [int(t) for _, t in self.samples]
        self.classes = classes or []
        self.transform = transform
        self.on_corrupt = on_corrupt
        self.mode = mode
        self._corrupt = mp.Value("i", 0)
        self.seed: Optional[int] = None
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def corrupt_count(self) -> int:
        return int(self._corrupt.value)

    def set_seed(self, seed: Optional[int], epoch: int = 0) -> None:
        """Make augmentation a function of (seed, epoch, index); ``None`` uses the global RNG."""
        self.seed, self.epoch = seed, epoch

    def load(self, index: int):
        from PIL import Image
        path = self.samples[index][0]
        with open(path, "rb") as f:
            img = Image.open(f)
            img.load()
        return img.convert(self.mode)

    def _apply(self, img, index: int):
        if self.transform is None:
            return img
        if self.seed is None:
            return self.transform(img)
        s = _sample_seed(self.seed, self.epoch, index)
        py_state, np_state = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(s)  # CPU only: torch.manual_seed also queues CUDA seeding (slow)
            random.seed(s)
            np.random.seed(s % (2 ** 32))
            try:
                return self.transform(img)
            finally:
                random.setstate(py_state)
                np.random.set_state(np_state)

    def __getitem__(self, index: int):
        n = len(self.samples)
        for attempt in range(min(n, 50)):
            i = (index + attempt) % n
            try:
                img = self.load(i)
            except Exception as e:  # PIL raises many types for broken files
                if self.on_corrupt == "fail":
                    raise CorruptImageError(f"cannot read image {self.samples[i][0]!r} ({type(e).__name__}: {e}); "
                                            "remove it or set data.on_corrupt=skip") from None
                with self._corrupt.get_lock():
                    self._corrupt.value += 1
                warnings.warn(f"skipping unreadable image {self.samples[i][0]!r} ({type(e).__name__})")
                continue
            return self._apply(img, index), self.targets[i]
        raise CorruptImageError(f"50 consecutive unreadable images from index {index}; is the dataset intact?")


class ImageFolderDataset(ImageListDataset):
    """``ROOT/<class>/<image>`` (ImageFolder layout) -> ``(image, class_index)``."""

    def __init__(self, root: str | Path, transform: Optional[Callable] = None, on_corrupt: str = "skip",
                 mode: str = "RGB", classes: Optional[list[str]] = None):
        found, samples = scan_image_folder(root)
        if classes is not None:  # keep class indices consistent with another split
            missing = sorted(set(found) - set(classes))
            if missing:
                raise ValueError(f"{root}: classes {missing} are not in the training classes")
            index = {c: i for i, c in enumerate(classes)}
            samples = [(p, index[found[t]]) for p, t in samples]
            found = list(classes)
        super().__init__(samples, found, transform, on_corrupt, mode)
        self.root = str(root)


class UnlabeledFolder(ImageListDataset):
    """Any folder tree of images -> ``(image, -1)`` (sorted, recursive)."""

    def __init__(self, root: str | Path, transform: Optional[Callable] = None, on_corrupt: str = "skip",
                 mode: str = "RGB"):
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"image folder {str(root)!r} does not exist")
        files = sorted(str(p) for p in root.rglob("*") if p.is_file() and is_image(p))
        if not files:
            raise FileNotFoundError(f"image folder {str(root)!r} holds no images")
        super().__init__([(f, -1) for f in files], [], transform, on_corrupt, mode)
        self.root = str(root)


class SyntheticDataset(Dataset):
    """``n`` random images ``(C, S, S)`` ~ N(0, 1) (already "normalised") with labels ``i mod K``.

    For benchmarks and hardware checks: no disk, no decoding. Item ``i`` is the bank image
    ``i mod bank`` (a bank of ``bank`` images is drawn once from ``seed``), so fetching costs one
    index and the collate copy, like a warm page-cached image pipeline without its decode.
    Interface of :class:`ImageListDataset` (``classes``, ``corrupt_count``, ``set_seed``).
    """

    def __init__(self, n: int, num_classes: int, img_size: int, in_chans: int = 3, seed: int = 0,
                 bank: int = 64):
        g = torch.Generator().manual_seed(seed)
        self.n = int(n)
        self.images = torch.randn(min(bank, self.n), in_chans, img_size, img_size, generator=g)
        self.classes = [f"class_{c}" for c in range(num_classes)]
        self.corrupt_count = 0

    def __len__(self) -> int:
        return self.n

    def set_seed(self, seed, epoch: int = 0) -> None:  # the images do not depend on the epoch
        pass

    def __getitem__(self, index: int):
        return self.images[index % len(self.images)], index % len(self.classes)
