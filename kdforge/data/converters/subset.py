"""``kdforge data subset SRC OUT --per-class 128 --seed 0``: a deterministic per-class subset.

KDEP pre-trains on "10 % ImageNet": 128 training images per class × 1000 classes = 128,000 images.
The reference made it with an unseeded shuffle and a ``cp`` per file; here the choice is a pure
function of (seed, class name, sorted file list)::

    for each class c of SRC/<split>:  files = sorted(images of c)
        pick = files[permutation_{rng(seed, crc32(c))}(len(files))[:per_class]]   (then sorted)

so the subset of one class does not depend on the other classes, and two runs agree. The other
splits (``val``, ``test``) are linked whole. Files are symlinked by default (``--copy`` copies,
``--hardlink`` hard-links). ``OUT/subset.json`` records the source, seed, per-class count and every
chosen file (relative to SRC).
"""
from __future__ import annotations

import json
import os
import shutil
import zlib
from pathlib import Path
from typing import Optional

import numpy as np


def class_rng(seed: int, class_name: str) -> np.random.Generator:
    """The class's own generator: seeded by (seed, crc32(class name))."""
    return np.random.default_rng([int(seed), zlib.crc32(class_name.encode("utf-8"))])


def choose_subset(files: list[str], per_class: Optional[int], seed: int, class_name: str,
                  fraction: Optional[float] = None) -> list[str]:
    """Deterministic choice of ``per_class`` (or ``round(fraction · n)``, at least 1) of ``files``.

    ``files`` are sorted first; the result is sorted. Classes with fewer files keep them all.
    """
    files = sorted(files)
    n = len(files)
    if (per_class is None) == (fraction is None):
        raise ValueError("subset: give exactly one of per_class and fraction")
    if per_class is not None and per_class <= 0:
        raise ValueError(f"subset: per_class must be positive, got {per_class}")
    if fraction is not None and not 0 < fraction <= 1:
        raise ValueError(f"subset: fraction must be in (0, 1], got {fraction}")
    k = per_class if per_class is not None else max(1, int(round(fraction * n)))
    if k >= n:
        return files
    order = class_rng(seed, class_name).permutation(n)[:k]
    return sorted(files[i] for i in order)


def _place(src: Path, dst: Path, mode: str) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists() or dst.is_symlink():
        dst.unlink()
    if mode == "symlink":
        os.symlink(os.path.abspath(src), dst)
    elif mode == "hardlink":
        os.link(src, dst)
    else:
        shutil.copy2(src, dst)


def make_subset(src: str | Path, out: str | Path, per_class: Optional[int] = 128, seed: int = 0,
                split: str = "train", fraction: Optional[float] = None, mode: str = "symlink",
                other_splits: tuple[str, ...] = ("val", "test")) -> dict:
    """Write ``OUT/<split>/<class>/...`` (the subset) and link ``OUT/<other split>`` to the source.

    ``src`` is an ImageFolder root holding ``<split>/`` (or the class folders directly, when it has
    no ``<split>/``). Returns the manifest also written to ``OUT/subset.json``.
    """
    from kdforge.data.datasets import is_image
    if mode not in ("symlink", "hardlink", "copy"):
        raise ValueError(f"subset: mode must be symlink, hardlink or copy, got {mode!r}")
    src, out = Path(src), Path(out)
    split_dir = src / split if (src / split).is_dir() else src
    if not split_dir.is_dir():
        raise FileNotFoundError(f"subset: {str(split_dir)!r} is not a folder")
    classes = sorted(d.name for d in split_dir.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise FileNotFoundError(f"subset: {str(split_dir)!r} has no class folders (expected <split>/<class>/<image>)")
    if (out / split).exists() and any((out / split).iterdir()):
        raise FileExistsError(f"subset: {str(out / split)!r} already exists and is not empty; choose another OUT")
    chosen: dict[str, list[str]] = {}
    short = []
    for c in classes:
        files = [str(p.relative_to(split_dir)) for p in (split_dir / c).rglob("*") if p.is_file() and is_image(p)]
        pick = choose_subset(files, per_class if fraction is None else None, seed, c, fraction)
        if per_class is not None and fraction is None and len(files) < per_class:
            short.append(c)
        chosen[c] = pick
        for rel in pick:
            _place(split_dir / rel, out / split / rel, mode)
    linked = []
    if split_dir != src:
        for s in other_splits:
            if (src / s).is_dir() and not (out / s).exists():
                out.mkdir(parents=True, exist_ok=True)
                os.symlink(os.path.abspath(src / s), out / s, target_is_directory=True)
                linked.append(s)
    manifest = {"source": str(src.resolve()), "split": split, "seed": seed, "per_class": per_class,
                "fraction": fraction, "mode": mode, "classes": len(classes),
                "images": sum(len(v) for v in chosen.values()), "classes_with_fewer": short,
                "linked_splits": linked, "files": {c: v for c, v in chosen.items()}}
    (out / "subset.json").write_text(json.dumps(manifest, indent=1))
    return manifest


def add_parser(sub):
    p = sub.add_parser("subset", help="deterministic per-class subset of an ImageFolder (e.g. KDEP's 10%% ImageNet)",
                       description="Pick PER_CLASS images of every class of SRC/SPLIT (seeded per class), "
                                   "write OUT/SPLIT/<class>/... as links (or copies) and link the other "
                                   "splits whole. 128 per class of ImageNet-1k = the 10%% subset of KDEP.")
    p.add_argument("src", help="ImageFolder root (holding train/ and val/)")
    p.add_argument("out", help="output folder")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--per-class", type=int, default=None, help="images per class (default 128)")
    g.add_argument("--fraction", type=float, default=None, help="fraction of each class instead (rounded, >= 1)")
    p.add_argument("--seed", type=int, default=0, help="selection seed (default 0)")
    p.add_argument("--split", default="train", help="split to subsample (default train)")
    m = p.add_mutually_exclusive_group()
    m.add_argument("--copy", action="store_true", help="copy files instead of symlinking")
    m.add_argument("--hardlink", action="store_true", help="hard-link files instead of symlinking")
    return p


def run(args) -> int:
    per_class = args.per_class if args.per_class is not None else (None if args.fraction is not None else 128)
    mode = "copy" if args.copy else "hardlink" if args.hardlink else "symlink"
    man = make_subset(args.src, args.out, per_class=per_class, seed=args.seed, split=args.split,
                      fraction=args.fraction, mode=mode)
    msg = f"wrote {man['images']} images of {man['classes']} classes to {args.out}/{args.split} ({mode})"
    if man["classes_with_fewer"]:
        msg += f"; {len(man['classes_with_fewer'])} class(es) had fewer than {per_class} images (kept all)"
    print(msg)
    return 0
