"""A selection as a file list usable as a dataset.

``write_selection(path, table, indices, ...)`` writes

* ``path`` (``.txt``): one image path per line, absolute, in rank order (most wanted first);
* ``path`` with suffix ``.json``: provenance (score folder, teacher hash, mode, n, weights, seed,
  class balance), the pool indices and the teacher's predictions of the selected images.

:func:`materialize_selection` makes a flat folder view of it (``<rank>_<name>`` symbolic links, or
copies) that any folder-reading code, such as the trainer's ``data.train_split``, reads as an
unlabeled image folder.

:class:`SelectionDataset` reads either file back as an image dataset (items ``(image, -1)``, or
``(image, teacher prediction)`` with ``labels="teacher"``).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import Tensor

from kdforge.data.datasets import ImageListDataset
from kdforge.selection.store import ScoreTable


def write_selection(path: str | Path, table: ScoreTable, indices: Tensor, **info) -> Path:
    """Write the selected pool images ``indices`` (n,) of ``table`` as ``path`` (.txt) + ``.json``.

    ``info`` (mode, n, alpha, beta, seed, class_balanced, head, scores, ...) is stored verbatim.
    Returns the ``.txt`` path."""
    path = Path(path)
    if path.suffix != ".txt":
        path = path.with_suffix(".txt")
    path.parent.mkdir(parents=True, exist_ok=True)
    idx = indices.long().cpu().tolist()
    all_paths = table.paths(absolute=True)
    chosen = [all_paths[i] for i in idx]
    preds = table["predictions"][idx].tolist() if "predictions" in table else []
    per_class: dict[str, int] = {}
    for p in preds:
        per_class[str(p)] = per_class.get(str(p), 0) + 1
    path.write_text("".join(c + "\n" for c in chosen))
    meta = {"format": "kdforge-selection/1", "files": path.name, "count": len(idx),
            "pool_root": table.meta.get("pool_root", ""), "pool_size": table.meta.get("num_items"),
            "teacher": table.meta.get("teacher"), "teacher_hash": table.meta.get("teacher_hash"),
            "transform": table.meta.get("transform"), "blocks": table.meta.get("blocks"),
            **info, "per_predicted_class": dict(sorted(per_class.items(), key=lambda kv: int(kv[0]))),
            "indices": idx, "predictions": preds}
    path.with_suffix(".json").write_text(json.dumps(meta, indent=1, default=str))
    return path


def materialize_selection(path: str | Path, dest: Optional[str | Path] = None, how: str = "symlink") -> Path:
    """Folder view of a selection: ``dest/<rank:07d>_<file name>`` for every selected image.

    ``how``: ``symlink`` (default, cheap even for 650k images) or ``copy``. ``dest`` defaults to
    the selection path without suffix (``OUT/combined_650000/``). An existing view is replaced.
    Returns ``dest``."""
    import os
    import shutil
    if how not in ("symlink", "copy"):
        raise ValueError(f"materialize_selection: how must be 'symlink' or 'copy', got {how!r}")
    files, _ = read_selection(path)
    dest = Path(dest) if dest is not None else Path(path).with_suffix("")
    if dest.is_dir():
        for old in dest.iterdir():
            if old.is_symlink() or old.is_file():
                old.unlink()
    dest.mkdir(parents=True, exist_ok=True)
    for rank, f in enumerate(files):
        link = dest / f"{rank:07d}_{Path(f).name}"
        if how == "symlink":
            os.symlink(os.path.abspath(f), link)
        else:
            shutil.copyfile(f, link)
    return dest


def read_selection(path: str | Path) -> tuple[list[str], dict]:
    """-> (image paths, provenance dict or {}) of a selection ``.txt`` (or its ``.json``)."""
    path = Path(path)
    txt = path.with_suffix(".txt")
    if not txt.is_file():
        raise FileNotFoundError(f"selection file {str(txt)!r} not found; make one with 'kdforge select'")
    files = [line.rstrip("\n") for line in txt.read_text().splitlines() if line.strip()]
    js = path.with_suffix(".json")
    meta = json.loads(js.read_text()) if js.is_file() else {}
    if meta and meta.get("count") != len(files):
        raise ValueError(f"{txt}: {len(files)} files but {js.name} records {meta.get('count')}")
    return files, meta


class SelectionDataset(ImageListDataset):
    """The images of a selection file: items ``(image, -1)`` (``labels="none"``) or
    ``(image, teacher argmax at scoring time)`` (``labels="teacher"``)."""

    def __init__(self, path: str | Path, transform: Optional[Callable] = None, on_corrupt: str = "skip",
                 mode: str = "RGB", labels: str = "none"):
        files, meta = read_selection(path)
        if not files:
            raise ValueError(f"selection {path} is empty")
        if labels == "teacher":
            preds = meta.get("predictions") or []
            if len(preds) != len(files):
                raise ValueError(f"selection {path}: no teacher predictions recorded in its .json")
            targets = [int(p) for p in preds]
        elif labels == "none":
            targets = [-1] * len(files)
        else:
            raise ValueError(f"labels: expected 'none' or 'teacher', got {labels!r}")
        super().__init__(list(zip(files, targets)), [], transform, on_corrupt, mode)
        self.meta = meta
        self.root = meta.get("pool_root", "")


def selection_indices(path: str | Path) -> torch.Tensor:
    """Pool indices recorded in a selection's ``.json`` (n,) int64."""
    _, meta = read_selection(path)
    if "indices" not in meta:
        raise ValueError(f"selection {path} has no .json with indices")
    return torch.tensor(meta["indices"], dtype=torch.long)
