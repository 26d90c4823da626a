"""``kdforge data tiered-imagenet SPLIT_DIR IMAGENET OUT``: tieredImageNet (Ren et al., ICLR 2018).

608 ImageNet classes grouped in 34 super-categories, split 351 / 97 / 160 classes (20 / 6 / 8
super-categories) for train / val / test, with *all* ImageNet-train images of each class (≈ 779 k).
``SPLIT_DIR/{train,val,test}.csv`` list the classes: every row whose first field is a wnid
(``n\\d{8}``) names one class (a second field, the super-category, is kept in the metadata); other
rows (headers) are skipped. Images come from the ILSVRC-2012 train folder ``IMAGENET/<wnid>/*``.

Output: ``OUT/{train,val,test}/<wnid>/<file>`` plus ``OUT/dataset.json``; ``--size S`` resizes to S×S
(bicubic; SMKD used 480, the classic benchmark 84), else files are copied or symlinked (``--link``).
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

from kdforge.data.converters.mini_imagenet import SPLITS, _WNID, imagenet_class_files, write_items


def read_class_list(path: str | Path) -> list[tuple[str, str]]:
    """[(wnid, super-category or '')] from a tieredImageNet split CSV (see the module doc)."""
    out = []
    with open(path, newline="") as f:
        for row in csv.reader(f):
            if row and _WNID.match(row[0].strip()):
                out.append((row[0].strip(), row[1].strip() if len(row) > 1 else ""))
    if not out:
        raise ValueError(f"{path}: no class rows (expected lines starting with a wnid such as n01530575)")
    return out


def tiered_items(split_dir: str | Path, imagenet: str | Path):
    """[(source path, split, wnid, file name)] and {split: {wnid: super-category}}."""
    split_dir, imagenet = Path(split_dir), Path(imagenet)
    if not imagenet.is_dir():
        raise FileNotFoundError(f"tiered-imagenet: ImageNet train folder {str(imagenet)!r} does not exist")
    items, supers = [], {}
    seen: dict[str, str] = {}
    for split in SPLITS:
        path = split_dir / f"{split}.csv"
        if not path.is_file():
            raise FileNotFoundError(f"tiered-imagenet: {str(path)!r} is missing (expected train/val/test.csv)")
        supers[split] = {}
        for wnid, sup in read_class_list(path):
            if wnid in seen and seen[wnid] != split:
                raise ValueError(f"tiered-imagenet: class {wnid} is listed in both {seen[wnid]} and {split}")
            seen[wnid] = split
            supers[split][wnid] = sup
            d = imagenet / wnid
            if not d.is_dir():
                raise FileNotFoundError(f"tiered-imagenet: ImageNet class folder {str(d)!r} is missing")
            items.extend((p, split, wnid, p.name) for p in imagenet_class_files(d))
    return items, supers


def add_parser(sub):
    p = sub.add_parser("tiered-imagenet", help="tieredImageNet (351/97/160 classes) from split CSVs + ImageNet train",
                       description="Write tieredImageNet as OUT/{train,val,test}/<wnid>/<image> from the class "
                                   "split CSVs and the ILSVRC-2012 train folder.")
    p.add_argument("split_dir", help="folder with train.csv, val.csv, test.csv (class wnids)")
    p.add_argument("imagenet", help="ILSVRC-2012 train folder (<wnid>/*.JPEG)")
    p.add_argument("out", help="output folder")
    p.add_argument("--size", type=int, default=None, help="resize to SIZE×SIZE (bicubic; SMKD: 480, classic: 84)")
    p.add_argument("--link", action="store_true", help="symlink instead of copying (no --size)")
    p.add_argument("--workers", type=int, default=8, help="writer threads (default 8)")
    return p


def run(args) -> int:
    items, supers = tiered_items(args.split_dir, args.imagenet)
    meta = write_items(items, args.out, "tiered-imagenet", args.size, args.link, args.workers,
                       source=f"splits {args.split_dir}; ImageNet {args.imagenet}")
    meta["super_categories"] = supers
    (Path(args.out) / "dataset.json").write_text(json.dumps(meta, indent=2))
    return 0
