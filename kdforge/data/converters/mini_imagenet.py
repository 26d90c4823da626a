"""``kdforge data mini-imagenet CSV_DIR OUT``: miniImageNet (Vinyals et al. 2016; Ravi & Larochelle 2017 split).

64 / 16 / 20 classes (train / val / test), 600 images each, listed by ``CSV_DIR/{train,val,test}.csv``
(header ``filename,label``; ``filename`` = wnid + an 8-digit image number, e.g. ``n0153282900000005.jpg``).
The images come from one of:

* ``--images DIR``: a flat folder holding the CSV file names (the distributed ``images/`` folder);
* ``--imagenet DIR``: the ILSVRC-2012 train folder (``DIR/<wnid>/<wnid>_<id>.JPEG``). Image number k
  of class w is the k-th (1-based) file of ``DIR/w`` sorted by its numeric ``<id>`` — the rule of the
  common mini-imagenet-tools conversion.

Output: ``OUT/{train,val,test}/<wnid>/<csv file name>`` plus ``OUT/dataset.json``. ``--size S`` resizes
to S×S (bicubic; SMKD used 480, the classic benchmark 84); without it the files are copied (or
symlinked with ``--link``). The helpers here are shared with the tieredImageNet converter.
"""
from __future__ import annotations

import csv
import json
import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable, Optional

SPLITS = ("train", "val", "test")
_WNID = re.compile(r"^n\d{8}$")


def read_split_csv(path: str | Path) -> list[tuple[str, str]]:
    """``filename,label`` rows (header skipped) -> [(filename, label)]."""
    rows = []
    with open(path, newline="") as f:
        for row in csv.reader(f):
            if not row or row[0].strip().lower() == "filename":
                continue
            if len(row) < 2:
                raise ValueError(f"{path}: expected 'filename,label' rows, got {row!r}")
            rows.append((row[0].strip(), row[1].strip()))
    if not rows:
        raise ValueError(f"{path}: no rows")
    return rows


def imagenet_class_files(class_dir: Path) -> list[Path]:
    """Files of an ImageNet class folder sorted by the number after the last '_' (``n01_123.JPEG`` -> 123)."""
    def key(p: Path):
        m = re.search(r"_(\d+)$", p.stem)
        return (int(m.group(1)) if m else -1, p.name)
    files = [p for p in class_dir.iterdir() if p.is_file()]
    return sorted(files, key=key)


def mini_source_path(filename: str, images: Optional[Path], imagenet: Optional[Path], cache: dict) -> Path:
    """Where the image named ``filename`` in a miniImageNet CSV lives (see the module doc)."""
    if images is not None:
        return images / filename
    wnid, number = filename[:9], Path(filename).stem[9:]
    if not _WNID.match(wnid) or not number.isdigit():
        raise ValueError(f"miniImageNet file name {filename!r} is not <wnid><number>.jpg")
    if wnid not in cache:
        d = imagenet / wnid
        if not d.is_dir():
            raise FileNotFoundError(f"ImageNet class folder {str(d)!r} is missing")
        cache[wnid] = imagenet_class_files(d)
    files = cache[wnid]
    k = int(number)
    if not 1 <= k <= len(files):
        raise ValueError(f"{filename}: image number {k} but {imagenet / wnid} holds {len(files)} images")
    return files[k - 1]


def _write_one(item: tuple[Path, Path], size: Optional[int], link: bool) -> None:
    src, dst = item
    if dst.exists():
        return
    dst.parent.mkdir(parents=True, exist_ok=True)
    if size:
        from PIL import Image
        with Image.open(src) as im:
            im = im.convert("RGB").resize((size, size), Image.BICUBIC)
            if dst.suffix.lower() in (".jpg", ".jpeg"):
                im.save(dst, quality=95)
            else:
                im.save(dst)
    elif link:
        dst.symlink_to(src.resolve())
    else:
        shutil.copyfile(src, dst)


def write_items(items: Iterable[tuple[Path, str, str, str]], out: str | Path, name: str, size: Optional[int] = None,
                link: bool = False, workers: int = 8, source: str = "") -> dict:
    """Write ``(source path, split, class, file name)`` items as ``OUT/<split>/<class>/<file name>``
    (resized / copied / linked, in ``workers`` threads); save and return ``OUT/dataset.json``."""
    out = Path(out)
    items = list(items)
    missing = [str(src) for src, *_ in items if not src.is_file()]
    if missing:
        raise FileNotFoundError(f"{name}: {len(missing)} source images are missing, e.g. {missing[0]!r}")
    jobs = [(src, out / split / cls / fname) for src, split, cls, fname in items]
    with ThreadPoolExecutor(max(1, workers)) as pool:
        list(pool.map(lambda j: _write_one(j, size, link), jobs))
    counts: dict[str, int] = {}
    classes: dict[str, set] = {}
    for _, split, cls, _ in items:
        counts[split] = counts.get(split, 0) + 1
        classes.setdefault(split, set()).add(cls)
    meta = {"name": name, "classes": {k: sorted(v) for k, v in classes.items()}, "counts": counts,
            "image_size": [size, size] if size else None, "source": source}
    (out / "dataset.json").write_text(json.dumps(meta, indent=2))
    print(f"wrote {name} to {out}: " + ", ".join(f"{k} {counts[k]} images / {len(classes[k])} classes"
                                                 for k in SPLITS if k in counts))
    return meta


def mini_imagenet_items(csv_dir: str | Path, images: Optional[str] = None, imagenet: Optional[str] = None):
    """[(source path, split, wnid, file name)] for the three miniImageNet CSVs."""
    if (images is None) == (imagenet is None):
        raise ValueError("mini-imagenet: give exactly one of --images (flat folder) or --imagenet (ILSVRC train)")
    csv_dir = Path(csv_dir)
    img_dir, inet = (Path(images) if images else None), (Path(imagenet) if imagenet else None)
    for d in (img_dir, inet):
        if d is not None and not d.is_dir():
            raise FileNotFoundError(f"mini-imagenet: image folder {str(d)!r} does not exist")
    cache: dict = {}
    items = []
    for split in SPLITS:
        path = csv_dir / f"{split}.csv"
        if not path.is_file():
            raise FileNotFoundError(f"mini-imagenet: {str(path)!r} is missing (expected train/val/test.csv)")
        for fname, label in read_split_csv(path):
            items.append((mini_source_path(fname, img_dir, inet, cache), split, label, fname))
    return items


def add_parser(sub):
    p = sub.add_parser("mini-imagenet", help="miniImageNet (64/16/20 classes) from the split CSVs + images",
                       description="Write miniImageNet as OUT/{train,val,test}/<wnid>/<image> from the Ravi & "
                                   "Larochelle CSVs and either the flat images folder or the ImageNet train set.")
    p.add_argument("csv_dir", help="folder with train.csv, val.csv, test.csv")
    p.add_argument("out", help="output folder")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", help="flat folder with the CSV file names")
    src.add_argument("--imagenet", help="ILSVRC-2012 train folder (<wnid>/<wnid>_<id>.JPEG)")
    p.add_argument("--size", type=int, default=None, help="resize to SIZE×SIZE (bicubic; SMKD: 480, classic: 84)")
    p.add_argument("--link", action="store_true", help="symlink instead of copying (no --size)")
    p.add_argument("--workers", type=int, default=8, help="writer threads (default 8)")
    return p


def run(args) -> int:
    items = mini_imagenet_items(args.csv_dir, args.images, args.imagenet)
    write_items(items, args.out, "mini-imagenet", args.size, args.link, args.workers,
                source=f"csv {args.csv_dir}; images {args.images or args.imagenet}")
    return 0
