"""``kdforge data digits-detect OUT``: the bundled toy detection + segmentation dataset.

scikit-learn's real handwritten digits (8×8) pasted at random positions and scales onto blank
grey canvases. Each split draws its digits only from the same split of the classification data
(:func:`kdforge.data.digits.digits_split`), so no test digit is seen in training. Written::

    OUT/annotations/instances_{train,val,test}.json   COCO instances (bbox = tight box of ink pixels)
    OUT/{split}/images/<id>.png                        8-bit grey canvases
    OUT/{split}/masks/<id>.png                         class-index masks: 0 background, digit d -> d + 1
    OUT/dataset.json                                   counts, sizes, seed, seg_classes

A pixel is "ink" when the pasted digit's value is at least ``INK`` (64 of 255); boxes and masks use
the same ink pixels, so they agree exactly. Digits never overlap (rejection sampling with a 1-pixel
gap). Category ids are ``digit + 1`` (names "0".."9"); box area = w·h. Deterministic given the seed.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

INK = 64
DEFAULT_COUNTS = {"train": 400, "val": 60, "test": 100}


def _paste_plan(rng: np.random.Generator, canvas: int, n: int, lo: int, hi: int) -> list[tuple[int, int, int]]:
    """Up to ``n`` non-overlapping squares (x, y, size), sizes in [lo, hi]."""
    placed: list[tuple[int, int, int]] = []
    for _ in range(n):
        for _try in range(50):
            s = int(rng.integers(lo, hi + 1))
            x, y = int(rng.integers(0, canvas - s + 1)), int(rng.integers(0, canvas - s + 1))
            if all(x + s + 1 <= px or px + ps + 1 <= x or y + s + 1 <= py or py + ps + 1 <= y
                   for px, py, ps in placed):
                placed.append((x, y, s))
                break
    return placed


def write_digits_detect(out: str | Path, seed: int = 0, canvas: int = 64, scale: tuple[int, int] = (12, 28),
                        max_digits: int = 3, counts: dict | None = None, force: bool = False) -> Path:
    """Write the dataset (see the module docstring); an existing identical copy is kept."""
    from PIL import Image
    from sklearn.datasets import load_digits

    from kdforge.data.digits import digits_split
    out = Path(out)
    counts = dict(counts or DEFAULT_COUNTS)
    spec = {"name": "digits-detect", "seed": seed, "canvas": canvas, "scale": list(scale),
            "max_digits": max_digits, "counts": counts}
    meta_path = out / "dataset.json"
    if meta_path.is_file() and not force:
        old = json.loads(meta_path.read_text())
        if all(old.get(k) == v for k, v in spec.items()):
            return out
    d = load_digits()
    split = digits_split(seed)
    (out / "annotations").mkdir(parents=True, exist_ok=True)
    categories = [{"id": c + 1, "name": str(c)} for c in range(10)]
    n_objects = {}
    for s_i, (name, n_img) in enumerate(counts.items()):
        rng = np.random.default_rng([seed, s_i])
        pool = split[name]
        (out / name / "images").mkdir(parents=True, exist_ok=True)
        (out / name / "masks").mkdir(parents=True, exist_ok=True)
        images, anns = [], []
        for k in range(n_img):
            img = np.zeros((canvas, canvas), np.uint8)
            mask = np.zeros((canvas, canvas), np.uint8)
            n = int(rng.integers(1, max_digits + 1))
            for x, y, s in _paste_plan(rng, canvas, n, scale[0], scale[1]):
                idx = int(rng.choice(pool))
                src = np.round(d.images[idx] * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
                digit = np.asarray(Image.fromarray(src, mode="L").resize((s, s), Image.BILINEAR))
                ink = digit >= INK
                if not ink.any():
                    continue
                region = img[y:y + s, x:x + s]
                np.maximum(region, digit, out=region)
                mask[y:y + s, x:x + s][ink] = int(d.target[idx]) + 1
                ys, xs = np.nonzero(ink)
                x1, y1, x2, y2 = x + xs.min(), y + ys.min(), x + xs.max() + 1, y + ys.max() + 1
                w, h = int(x2 - x1), int(y2 - y1)
                anns.append({"id": len(anns) + 1, "image_id": k + 1, "category_id": int(d.target[idx]) + 1,
                             "bbox": [int(x1), int(y1), w, h], "area": w * h, "iscrowd": 0})
            fname = f"{k:05d}.png"
            Image.fromarray(img, mode="L").save(out / name / "images" / fname)
            Image.fromarray(mask, mode="L").save(out / name / "masks" / fname)
            images.append({"id": k + 1, "file_name": fname, "width": canvas, "height": canvas})
        coco = {"info": {"description": f"digits-detect {name} (kdforge)"}, "images": images,
                "annotations": anns, "categories": categories}
        (out / "annotations" / f"instances_{name}.json").write_text(json.dumps(coco))
        n_objects[name] = len(anns)
    meta = {**spec, "objects": n_objects, "seg_classes": ["background"] + [str(c) for c in range(10)],
            "source": "sklearn.datasets.load_digits", "ink_threshold": INK}
    meta_path.write_text(json.dumps(meta, indent=2))
    return out


def add_parser(sub):
    p = sub.add_parser("digits-detect", help="write the toy detection/segmentation set (digits pasted on canvases)",
                       description="Paste scikit-learn digits at random positions and scales onto grey canvases; "
                                   "write COCO boxes (annotations/instances_SPLIT.json), images and per-pixel "
                                   "class masks (SPLIT/images, SPLIT/masks).")
    p.add_argument("out", help="output folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--canvas", type=int, default=64, help="canvas side in pixels (default 64)")
    p.add_argument("--min-scale", type=int, default=12, help="smallest pasted digit side (default 12)")
    p.add_argument("--max-scale", type=int, default=28, help="largest pasted digit side (default 28)")
    p.add_argument("--max-digits", type=int, default=3, help="digits per canvas: 1..N (default 3)")
    p.add_argument("--counts", type=int, nargs=3, metavar=("TRAIN", "VAL", "TEST"),
                   default=[DEFAULT_COUNTS[k] for k in ("train", "val", "test")], help="canvases per split")
    p.add_argument("--force", action="store_true")
    return p


def run(args) -> int:
    if not (0 < args.min_scale <= args.max_scale <= args.canvas):
        print("kdforge: error: expected 0 < --min-scale <= --max-scale <= --canvas")
        return 2
    out = write_digits_detect(args.out, seed=args.seed, canvas=args.canvas, scale=(args.min_scale, args.max_scale),
                              max_digits=args.max_digits, counts=dict(zip(("train", "val", "test"), args.counts)),
                              force=args.force)
    meta = json.loads((out / "dataset.json").read_text())
    print(f"wrote digits-detect to {out}: " + ", ".join(f"{k} {v} images / {meta['objects'][k]} digits"
                                                         for k, v in meta["counts"].items()))
    return 0
