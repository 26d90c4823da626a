"""``kdforge data static-augs SRC OUT``: the static augmented set of SSL-small §2(a), reproducible.

For each class folder of SRC (sorted) it takes ``--images-per-class`` images (a seeded sample, in
sorted order; all when there are fewer) and writes, per image, ``OUT/<class>/<stem>-0.png`` (the
original, unchanged) and two MoCo-v2 views ``<stem>-1.png``, ``<stem>-2.png`` (RandomResizedCrop to
``--img-size`` with scale 0.2–1, ColorJitter(0.4, 0.4, 0.4, 0.1) p 0.8, grayscale p 0.2, Gaussian
blur σ∈[0.1, 2] p 0.5, horizontal flip). Each image's views are seeded by (seed, class, file name),
so the set is identical whatever the number of worker processes; PNG by default (lossless; the
reference re-encoded everything as JPEG quality 75). ``OUT/manifest.csv`` lists class, source, stem
and the per-image seed. :func:`static_view_files` reads the set back for ``kdforge eval instdisc``.
"""
from __future__ import annotations

import csv
import hashlib
import random
from pathlib import Path


def _image_seed(seed: int, cls: str, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}/{cls}/{name}".encode()).digest()[:8], "little") >> 1


def _view_transform(img_size: int):
    from torchvision import transforms as T

    from kdforge.data.ssl_transforms import PILGaussianBlur
    return T.Compose([
        T.RandomResizedCrop(img_size, scale=(0.2, 1.0), interpolation=T.InterpolationMode.BICUBIC),
        T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
        T.RandomGrayscale(p=0.2),
        T.RandomApply([PILGaussianBlur((0.1, 2.0))], p=0.5),
        T.RandomHorizontalFlip(),
    ])


def _work(job) -> tuple[str, str, str, int, int]:
    """Write the three files of one image; returns (class, source, stem, seed, written 0/1)."""
    import numpy as np
    import torch
    from PIL import Image
    src, out_dir, cls, img_size, seed, fmt, mode = job
    src, out_dir = Path(src), Path(out_dir)
    stem = src.stem
    s = _image_seed(seed, cls, src.name)
    try:
        with open(src, "rb") as f:
            img = Image.open(f)
            img.load()
        img = img.convert(mode)
    except Exception:                                                     # unreadable: skipped, counted
        return cls, str(src), stem, s, 0
    ext = "png" if fmt == "png" else "jpeg"
    tf = _view_transform(img_size)
    img.save(out_dir / f"{stem}-0.{ext}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(s)
        py, npst = random.getstate(), np.random.get_state()
        random.seed(s)
        np.random.seed(s % 2**32)
        try:
            for v in (1, 2):
                tf(img).save(out_dir / f"{stem}-{v}.{ext}")
        finally:
            random.setstate(py)
            np.random.set_state(npst)
    return cls, str(src), stem, s, 1


def write_static_augs(src: str | Path, out: str | Path, images_per_class: int = 50, img_size: int = 224,
                      seed: int = 0, workers: int = 0, fmt: str = "png", mode: str = "RGB") -> dict:
    """Write the static set (see the module doc). Returns counts {classes, images, skipped}."""
    from kdforge.data.datasets import is_image
    src, out = Path(src), Path(out)
    classes = sorted(p.name for p in src.iterdir() if p.is_dir()) if src.is_dir() else []
    if not classes:
        raise FileNotFoundError(f"{src}: expected class folders SRC/<class>/<image>")
    jobs = []
    for cls in classes:
        files = sorted(p for p in (src / cls).iterdir() if p.is_file() and is_image(p))
        if len(files) > images_per_class:
            rng = random.Random(_image_seed(seed, cls, "__subset__"))
            files = sorted(rng.sample(files, images_per_class))
        (out / cls).mkdir(parents=True, exist_ok=True)
        jobs += [(str(f), str(out / cls), cls, img_size, seed, fmt, mode) for f in files]
    if workers > 0:
        import multiprocessing as mp
        with mp.get_context("spawn").Pool(workers) as pool:
            rows = pool.map(_work, jobs, chunksize=8)
    else:
        rows = [_work(j) for j in jobs]
    with open(out / "manifest.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["class", "source", "stem", "seed", "written"])
        w.writerows(rows)
    written = sum(r[4] for r in rows)
    return {"classes": len(classes), "images": written, "skipped": len(rows) - written}


def static_view_files(root: str | Path, view: int) -> tuple[list[tuple[str, int]], list[str]]:
    """``([(path, class index), ...], classes)`` of view ``view`` (0 original, 1, 2) of a static set,
    sorted by class then stem, so the three views line up row by row."""
    root = Path(root)
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise FileNotFoundError(f"{root}: no class folders; write the set with 'kdforge data static-augs SRC {root}'")
    out = []
    for i, cls in enumerate(classes):
        for f in sorted((root / cls).iterdir()):
            stem, _, rest = f.name.rpartition("-")
            if stem and rest.split(".")[0] == str(view):
                out.append((str(f), i))
    return out, classes


def add_parser(sub):
    p = sub.add_parser("static-augs", help="write the static augmented set (original + two MoCo-v2 views per image)",
                       description=__doc__.split("\n\n")[0] + " See the module documentation for details.")
    p.add_argument("src", help="ImageFolder split to sample (e.g. DATA/val)")
    p.add_argument("out", help="output folder (OUT/<class>/<stem>-{0,1,2}.png)")
    p.add_argument("--images-per-class", type=int, default=50, help="images per class (default 50)")
    p.add_argument("--img-size", type=int, default=224, help="size of the two augmented views (default 224)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=0, help="worker processes (0: in this process)")
    p.add_argument("--format", choices=["png", "jpeg"], default="png")
    p.add_argument("--grayscale", action="store_true", help="keep images single-channel (mode L)")
    return p


def run(args) -> int:
    rep = write_static_augs(args.src, args.out, args.images_per_class, args.img_size, args.seed, args.workers,
                            args.format, "L" if args.grayscale else "RGB")
    print(f"wrote static augmented set to {args.out}: {rep['classes']} classes, {rep['images']} images x 3 views"
          + (f", {rep['skipped']} unreadable skipped" if rep["skipped"] else ""))
    return 0
