"""``kdforge data digits-fewshot OUT``: the bundled digits as a few-shot benchmark (disjoint classes).

The 1,797 scikit-learn digits (8×8, 10 classes) split *by class*, like miniImageNet: base classes
for training (``OUT/train``), validation classes for model selection (``OUT/val``) and novel classes
for the test episodes (``OUT/test``); every image of a class goes to its class's split. Default:
base 0–4, val 5–6, novel 7–9 (so test episodes are 3-way). Pixels as in ``kdforge data digits``
(8-bit grayscale PNG, value · 255 / 16). Writes ``OUT/dataset.json``; an existing identical copy is kept.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np

DEFAULT_SPLIT = {"train": (0, 1, 2, 3, 4), "val": (5, 6), "test": (7, 8, 9)}


def write_digits_fewshot(out: str | Path, base: Sequence[int] = DEFAULT_SPLIT["train"],
                         val: Sequence[int] = DEFAULT_SPLIT["val"], novel: Sequence[int] = DEFAULT_SPLIT["test"],
                         force: bool = False) -> Path:
    """Write the class-disjoint digits split; returns ``out``."""
    from PIL import Image
    from sklearn.datasets import load_digits
    split = {"train": [int(c) for c in base], "val": [int(c) for c in val], "test": [int(c) for c in novel]}
    used = [c for cs in split.values() for c in cs]
    if len(set(used)) != len(used) or not set(used) <= set(range(10)):
        raise ValueError(f"digits-fewshot: base/val/novel must be disjoint digits 0-9, got {split}")
    if not split["train"] or len(split["test"]) < 2:
        raise ValueError("digits-fewshot: need at least one base class and two novel classes")
    out = Path(out)
    meta_path = out / "dataset.json"
    if meta_path.is_file() and not force:
        meta = json.loads(meta_path.read_text())
        if meta.get("name") == "sklearn-digits-fewshot" and meta.get("split") == split:
            return out
    d = load_digits()
    counts = {}
    for name, classes in split.items():
        n = 0
        for c in classes:
            (out / name / str(c)).mkdir(parents=True, exist_ok=True)
            for i in np.flatnonzero(d.target == c):
                img = np.round(d.images[i] * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
                Image.fromarray(img, mode="L").save(out / name / str(c) / f"{int(i):04d}.png")
                n += 1
        counts[name] = n
    meta = {"name": "sklearn-digits-fewshot", "split": split, "counts": counts, "image_size": [8, 8],
            "source": "sklearn.datasets.load_digits"}
    meta_path.write_text(json.dumps(meta, indent=2))
    return out


def _digits(text: str) -> list[int]:
    return [int(t) for t in text.split(",") if t.strip()]


def add_parser(sub):
    p = sub.add_parser("digits-fewshot", help="the bundled digits split by class: base (train) / val / novel (test)",
                       description="Write scikit-learn's digits as a class-disjoint few-shot benchmark: "
                                   "OUT/train = base classes, OUT/val = validation classes, OUT/test = novel classes.")
    p.add_argument("out", help="output folder")
    p.add_argument("--base", type=_digits, default=list(DEFAULT_SPLIT["train"]), help="base digits (default 0,1,2,3,4)")
    p.add_argument("--val", type=_digits, default=list(DEFAULT_SPLIT["val"]), help="validation digits (default 5,6)")
    p.add_argument("--novel", type=_digits, default=list(DEFAULT_SPLIT["test"]), help="novel digits (default 7,8,9)")
    p.add_argument("--force", action="store_true", help="rewrite even if OUT already holds the data")
    return p


def run(args) -> int:
    out = write_digits_fewshot(args.out, args.base, args.val, args.novel, force=args.force)
    meta = json.loads((out / "dataset.json").read_text())
    print(f"wrote digits-fewshot to {out}: " + ", ".join(f"{k} {v} images ({meta['split'][k]})"
                                                         for k, v in meta["counts"].items()))
    return 0
