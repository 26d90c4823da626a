"""``kdforge data wild-pool OUT``: a small unlabeled "wild" pool for the Attention Probe CPU twin.

The pool mixes **real held-out digit images** (scikit-learn's handwritten digits, by default the
``val`` split of :func:`kdforge.data.digits.digits_split`, which a teacher trained on ``train``
never saw) with **out-of-distribution images** of three kinds:

* ``noise``   — i.i.d. uniform noise, smoothed noise blobs, salt-and-pepper;
* ``texture`` — sinusoidal gratings (random frequency, orientation, phase), checkerboards, stripes;
* ``crop``    — random crops of the two photographs bundled with scikit-learn
  (``sklearn.datasets.load_sample_images``: china.jpg, flower.jpg), greyscale, sometimes inverted.

Every image is an 8×8 greyscale PNG like the digits. Layout::

    OUT/pool/000000.png ...     the unlabeled pool (shuffled: file order does not reveal the kind)
    OUT/manifest.csv            file,kind,label,source  (kind: digit|noise|texture|crop; label: digit or -1)
    OUT/pool.json               counts, seed, split, sources

The manifest is the ground truth used to measure selection precision; training never reads it.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Sequence

import numpy as np

KINDS = ("noise", "texture", "crop")
SIZE = 8


def _noise(rng: np.random.Generator) -> np.ndarray:
    k = rng.integers(3)
    if k == 0:
        return rng.uniform(0, 1, (SIZE, SIZE))
    if k == 1:  # smooth blobs: box-filtered noise
        z = rng.uniform(0, 1, (SIZE + 4, SIZE + 4))
        z = sum(z[i:i + SIZE, j:j + SIZE] for i in range(5) for j in range(5)) / 25.0
        return (z - z.min()) / max(z.max() - z.min(), 1e-6)
    return (rng.uniform(0, 1, (SIZE, SIZE)) < rng.uniform(0.1, 0.5)).astype(float)  # salt and pepper


def _texture(rng: np.random.Generator) -> np.ndarray:
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(float)
    k = rng.integers(3)
    if k == 0:  # grating
        f, th, ph = rng.uniform(0.15, 0.6), rng.uniform(0, np.pi), rng.uniform(0, 2 * np.pi)
        return 0.5 + 0.5 * np.sin(2 * np.pi * f * (xx * np.cos(th) + yy * np.sin(th)) + ph)
    if k == 1:  # checkerboard
        c = int(rng.integers(1, 4))
        return (((xx // c) + (yy // c)) % 2).astype(float)
    c = int(rng.integers(1, 3))  # stripes
    return ((((yy if rng.integers(2) else xx) + rng.integers(c * 2)) // c) % 2).astype(float)


def _crop(rng: np.random.Generator, photos: Sequence[np.ndarray]) -> np.ndarray:
    from PIL import Image
    img = photos[int(rng.integers(len(photos)))]
    h, w = img.shape
    s = int(rng.integers(12, min(h, w) // 2))
    y, x = int(rng.integers(0, h - s)), int(rng.integers(0, w - s))
    patch = Image.fromarray(img[y:y + s, x:x + s]).resize((SIZE, SIZE), Image.BILINEAR)
    a = np.asarray(patch, dtype=float) / 255.0
    a = (a - a.min()) / max(a.max() - a.min(), 1e-6)  # stretch contrast like the digits (0..16 range)
    return 1.0 - a if rng.integers(2) else a


def _photos() -> list[np.ndarray]:
    from sklearn.datasets import load_sample_images
    imgs = load_sample_images().images  # two (427, 640, 3) uint8 photographs bundled with scikit-learn
    return [np.round(im @ np.array([0.299, 0.587, 0.114])).clip(0, 255).astype(np.uint8) for im in imgs]


def write_wild_pool(out: str | Path, splits: Sequence[str] = ("val",), ood_ratio: float = 2.0,
                    kinds: Sequence[str] = KINDS, seed: int = 0, split_seed: int = 0, force: bool = False) -> Path:
    """Write the digits wild pool (see the module docstring). Idempotent unless ``force``.

    Args:
        out: output folder (``OUT/pool``, ``OUT/manifest.csv``, ``OUT/pool.json``).
        splits: digits splits whose images enter the pool (``train``/``val``/``test`` of
            :func:`kdforge.data.digits.digits_split` with ``split_seed``).
        ood_ratio: number of out-of-distribution images per digit image.
        kinds: OOD kinds, cycled in equal shares.
        seed: seed of the OOD images and of the shuffled file order.
    Returns:
        ``out`` as a Path.
    """
    from PIL import Image
    from sklearn.datasets import load_digits
    from kdforge.data.digits import digits_split
    out = Path(out)
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds:
        raise ValueError(f"wild-pool: kinds must be among {KINDS}, got {list(kinds)}")
    if ood_ratio < 0:
        raise ValueError(f"wild-pool: ood_ratio must be >= 0, got {ood_ratio}")
    split_idx = digits_split(split_seed)
    unknown = [s for s in splits if s not in split_idx]
    if unknown:
        raise ValueError(f"wild-pool: unknown digits split(s) {unknown}; choose from {sorted(split_idx)}")
    config = {"name": "digits-wild-pool", "splits": list(splits), "ood_ratio": float(ood_ratio),
              "kinds": list(kinds), "seed": seed, "split_seed": split_seed}
    meta_path = out / "pool.json"
    if meta_path.is_file() and not force:
        old = json.loads(meta_path.read_text())
        if {k: old.get(k) for k in config} == config:
            return out
    rng = np.random.default_rng(seed)
    d = load_digits()
    items: list[tuple[np.ndarray, str, int, str]] = []
    for s in splits:
        for i in split_idx[s]:
            items.append((d.images[i] / 16.0, "digit", int(d.target[i]), f"sklearn-digits#{int(i)}"))
    n_ood = int(round(len(items) * ood_ratio))
    photos = _photos() if "crop" in kinds else []
    for j in range(n_ood):
        kind = kinds[j % len(kinds)]
        a = _noise(rng) if kind == "noise" else _texture(rng) if kind == "texture" else _crop(rng, photos)
        src = "sklearn.datasets.load_sample_images" if kind == "crop" else "generated"
        items.append((a, kind, -1, src))
    order = rng.permutation(len(items))
    pool = out / "pool"
    if pool.is_dir():
        for old in pool.glob("*.png"):
            old.unlink()
    pool.mkdir(parents=True, exist_ok=True)
    rows = []
    for new_id, k in enumerate(order):
        a, kind, label, src = items[k]
        name = f"{new_id:06d}.png"
        Image.fromarray(np.round(np.clip(a, 0, 1) * 255).astype(np.uint8), mode="L").save(pool / name)
        rows.append({"file": f"pool/{name}", "kind": kind, "label": label, "source": src})
    with open(out / "manifest.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["file", "kind", "label", "source"])
        w.writeheader()
        w.writerows(rows)
    counts = {k: sum(r["kind"] == k for r in rows) for k in ("digit", *kinds)}
    meta_path.write_text(json.dumps({**config, "counts": counts, "total": len(rows)}, indent=2))
    return out


def read_manifest(out: str | Path) -> dict[str, dict]:
    """``OUT/manifest.csv`` -> {absolute image path: {"kind", "label", "source"}}."""
    out = Path(out)
    p = out / "manifest.csv"
    if not p.is_file():
        raise FileNotFoundError(f"{str(p)!r} not found; write the pool with 'kdforge data wild-pool {out}'")
    with open(p, newline="") as f:
        return {str((out / r["file"]).resolve()): {"kind": r["kind"], "label": int(r["label"]), "source": r["source"]}
                for r in csv.DictReader(f)}


def selection_precision(paths: Sequence[str], manifest: dict[str, dict]) -> float:
    """Fraction of ``paths`` that are real digit images according to ``manifest`` (0 for none)."""
    if not paths:
        return 0.0
    kinds = [manifest[str(Path(p).resolve())]["kind"] for p in paths]
    return sum(k == "digit" for k in kinds) / len(kinds)


def add_parser(sub):
    p = sub.add_parser("wild-pool", help="write an unlabeled pool of held-out digits mixed with OOD images "
                                         "(noise, textures, photo crops) for Attention Probe",
                       description="Unlabeled wild pool for the Attention Probe CPU twin: real held-out digits "
                                   "(sklearn) + out-of-distribution 8x8 images. Writes OUT/pool/*.png, "
                                   "OUT/manifest.csv (ground truth) and OUT/pool.json.")
    p.add_argument("out", help="output folder")
    p.add_argument("--splits", default="val", help="comma-separated digits splits to include (default: val)")
    p.add_argument("--ood-ratio", type=float, default=2.0, help="OOD images per digit image (default 2)")
    p.add_argument("--kinds", default=",".join(KINDS), help=f"OOD kinds (default: {','.join(KINDS)})")
    p.add_argument("--seed", type=int, default=0, help="seed of the OOD images and file order (default 0)")
    p.add_argument("--split-seed", type=int, default=0, help="seed of the digits split (default 0, as "
                                                             "'kdforge data digits')")
    p.add_argument("--force", action="store_true", help="rewrite even if OUT holds the same pool")
    return p


def run(args) -> int:
    out = write_wild_pool(args.out, [s for s in args.splits.split(",") if s], args.ood_ratio,
                          [k for k in args.kinds.split(",") if k], args.seed, args.split_seed, args.force)
    meta = json.loads((out / "pool.json").read_text())
    print(f"wrote wild pool to {out / 'pool'}: {meta['total']} images (" +
          ", ".join(f"{k} {v}" for k, v in meta["counts"].items()) + f"); ground truth in {out / 'manifest.csv'}")
    return 0
