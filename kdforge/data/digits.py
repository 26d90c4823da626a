"""The bundled real data: scikit-learn's 1,797 handwritten digits (8×8, 10 classes) as an ImageFolder.

``write_digits(out)`` writes ``OUT/{train,val,test}/<digit>/<index>.png`` (8-bit grayscale PNGs,
pixel = round(value · 255 / 16)) with a fixed stratified split (60 / 15 / 25 %, seed 0), plus
``OUT/dataset.json`` describing it. Writing is idempotent: an existing complete copy is kept.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

SPLITS = {"train": 0.60, "val": 0.15, "test": 0.25}


def digits_split(seed: int = 0) -> dict[str, np.ndarray]:
    """Indices of each split, stratified by class, deterministic given the seed."""
    from sklearn.datasets import load_digits
    y = load_digits().target
    rng = np.random.default_rng(seed)
    out = {k: [] for k in SPLITS}
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(y == c))
        n_tr = int(round(len(idx) * SPLITS["train"]))
        n_va = int(round(len(idx) * SPLITS["val"]))
        out["train"].append(idx[:n_tr])
        out["val"].append(idx[n_tr:n_tr + n_va])
        out["test"].append(idx[n_tr + n_va:])
    return {k: np.sort(np.concatenate(v)) for k, v in out.items()}


def write_digits(out: str | Path, seed: int = 0, force: bool = False) -> Path:
    from PIL import Image
    from sklearn.datasets import load_digits
    out = Path(out)
    meta_path = out / "dataset.json"
    if meta_path.is_file() and not force:
        meta = json.loads(meta_path.read_text())
        if meta.get("name") == "sklearn-digits" and meta.get("seed") == seed:
            return out
    d = load_digits()
    split = digits_split(seed)
    counts = {}
    for name, idx in split.items():
        for c in range(10):
            (out / name / str(c)).mkdir(parents=True, exist_ok=True)
        for i in idx:
            img = np.round(d.images[i] * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
            Image.fromarray(img, mode="L").save(out / name / str(int(d.target[i])) / f"{int(i):04d}.png")
        counts[name] = int(len(idx))
    meta = {"name": "sklearn-digits", "seed": seed, "classes": [str(c) for c in range(10)],
            "counts": counts, "image_size": [8, 8], "source": "sklearn.datasets.load_digits"}
    meta_path.write_text(json.dumps(meta, indent=2))
    return out
