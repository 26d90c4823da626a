"""One streaming, resumable scoring pass of a frozen teacher over an unlabeled wild pool.

``score_pool(teacher, dataset, blocks, out=OUT)`` runs the teacher once per image (the reference
runs two full passes, one for attention and one for logits) and records, per image, in pool order:
the confidence score, the prediction, and the attention-probe score of every requested block (the
CLS query's attention is recomputed from each block's ``attn`` input by
:class:`kdforge.models.taps.FeatureTaps` during that same forward pass).

Progress is written to ``OUT/scores.safetensors`` every ``save_every`` batches (atomically) and
when the pass stops for any reason (error, Ctrl-C, ``max_batches``); calling ``score_pool`` again
with the same teacher, transform and pool resumes from the first unscored image. A complete file
made by the same teacher/transform/pool is returned as is; a file made by anything else is refused
(``overwrite=True`` starts afresh).

Unreadable images are not replaced by a neighbour: they get ``valid = False``, confidence and
attention ``+inf`` and prediction ``-1``, so no selection keeps them, and are counted in
``meta["corrupt"]``.
"""
from __future__ import annotations

import logging
import time
import warnings
from contextlib import nullcontext
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from kdforge.selection.scores import _cosine_to_uniform, confidence_scores
from kdforge.selection.store import (IDENTITY_KEYS, ScoreTable, listing_sha256, load_scores, read_meta,
                                     teacher_fingerprint, write_scores)

log = logging.getLogger("kdforge")


class _ScoringItems(Dataset):
    """``index -> (image tensor, readable)`` over ``dataset[start:]``; an unreadable file yields
    a zero image and ``False`` instead of the next image (which would duplicate its score)."""

    def __init__(self, dataset, start: int, shape_hint: Optional[tuple] = None):
        self.dataset, self.start = dataset, start
        self.direct = hasattr(dataset, "load") and hasattr(dataset, "transform")
        self.shape_hint = shape_hint

    def __len__(self) -> int:
        return len(self.dataset) - self.start

    def __getitem__(self, i: int):
        j = self.start + i
        if not self.direct:
            item = self.dataset[j]
            return (item[0] if isinstance(item, (tuple, list)) else item), True
        try:
            img = self.dataset.load(j)
        except Exception as e:  # PIL raises many types for broken files
            if getattr(self.dataset, "on_corrupt", "skip") == "fail":
                raise
            warnings.warn(f"scoring: unreadable image #{j} {self.dataset.samples[j][0]!r} ({type(e).__name__}); "
                          "it gets score +inf and is never selected")
            return torch.zeros(self.shape_hint), False
        t = self.dataset.transform
        return (t(img) if t is not None else img), True


def _listing(dataset, pool_root: Optional[str]) -> tuple[list[str], str]:
    root = pool_root if pool_root is not None else getattr(dataset, "root", "") or ""
    samples = getattr(dataset, "samples", None)
    if samples is None:
        return [str(i) for i in range(len(dataset))], ""
    files = []
    root_p = Path(root).resolve() if root else None
    for s in samples:
        p = s[0] if isinstance(s, (tuple, list)) else s
        if root_p is not None:
            try:
                p = str(Path(p).resolve().relative_to(root_p))
            except ValueError:
                p = str(Path(p).resolve())
        files.append(str(p))
    return files, str(root_p) if root_p is not None else ""


def _first_shape(dataset) -> tuple:
    for i in range(min(len(dataset), 64)):
        try:
            item = dataset[i]
        except Exception:
            continue
        x = item[0] if isinstance(item, (tuple, list)) else item
        return tuple(x.shape)
    raise RuntimeError("scoring: the first 64 images of the pool are all unreadable")


@torch.no_grad()
def score_batch(teacher: nn.Module, images: Tensor, blocks: Sequence[int] = (3, 7)) -> dict[str, Tensor]:
    """Scores of one batch from a single forward pass.

    Args:
        teacher: frozen classifier; a timm ViT with ``blocks[i].attn`` when ``blocks`` is non-empty.
        images: (B, C, S, S) on the teacher's device.
        blocks: 0-based block indices whose CLS attention is probed.
    Returns:
        ``confidence`` (B,), ``predictions`` (B,) int64 and, with blocks, ``attention``
        (n_blocks, B) (head-averaged row) and ``attention_heads`` (n_blocks, H, B) (per head).
    """
    blocks = list(blocks)
    if blocks:
        from kdforge.models.taps import FeatureTaps
        with FeatureTaps(teacher, attention=blocks, detach=True) as taps:
            logits = teacher(images)
        rows = [taps.attention[b].float() for b in blocks]  # each (B, H, P)
    else:
        logits, rows = teacher(images), []
    if isinstance(logits, (tuple, list)):  # e.g. a distilled DeiT in train mode
        logits = logits[0]
    out = {"confidence": confidence_scores(logits), "predictions": logits.argmax(-1).long()}
    if rows:
        out["attention"] = torch.stack([_cosine_to_uniform(r.mean(1)) for r in rows])
        out["attention_heads"] = torch.stack([_cosine_to_uniform(r).transpose(0, 1) for r in rows])
    return out


def score_pool(teacher: nn.Module, dataset, blocks: Sequence[int] = (3, 7), *, out: str | Path,
               batch_size: int = 256, num_workers: int = 0, save_every: int = 100, overwrite: bool = False,
               amp: str = "none", max_batches: Optional[int] = None, progress: bool = False,
               teacher_name: Optional[str] = None, pool_root: Optional[str] = None,
               transform_desc: Optional[str] = None) -> ScoreTable:
    """Score every image of ``dataset`` with ``teacher`` into ``OUT/scores.{safetensors,json}``.

    Args:
        teacher: frozen classifier (put in eval mode here); its device decides where scoring runs.
        dataset: the pool in a fixed order, e.g. :class:`kdforge.data.UnlabeledFolder` with the
            teacher's eval transform (items ``(image, _)``; ``dataset.samples`` gives the listing).
        blocks: 0-based blocks probed for CLS attention (reference: 3 and 7); ``()`` for CNN teachers.
        out: output folder.
        batch_size, num_workers: the loader (no shuffling).
        save_every: write progress every this many batches (and always when stopping).
        overwrite: discard an existing score file made by another teacher/transform/pool.
        amp: ``none | bf16 | fp16`` autocast on CUDA.
        max_batches: stop after this many batches in this call (resumable partial file).
        teacher_name, pool_root, transform_desc: provenance (defaults: the model's
            ``kdforge_name``, ``dataset.root``, ``repr(dataset.transform)``).
    Returns:
        the :class:`ScoreTable` (complete unless ``max_batches`` stopped it early).
    """
    out = Path(out)
    blocks = [int(b) for b in blocks]
    teacher.eval()
    device = next(teacher.parameters()).device
    files, root = _listing(dataset, pool_root)
    if not files:
        raise ValueError("score_pool: the pool is empty")
    ident = {
        "teacher_hash": teacher_fingerprint(teacher),
        "transform": transform_desc if transform_desc is not None else repr(getattr(dataset, "transform", None)),
        "listing_sha256": listing_sha256(files),
        "blocks": blocks,
        "num_items": len(files),
    }
    meta = {**ident, "teacher": teacher_name or getattr(teacher, "kdforge_name", type(teacher).__name__),
            "pool_root": root, "count": 0, "complete": False, "corrupt": 0, "seconds": 0.0}
    m = len(files)
    state: dict[str, Tensor] = {}
    old = read_meta(out)
    if old is not None:
        diff = [k for k in IDENTITY_KEYS if old.get(k) != ident[k]]
        if diff and not overwrite:
            raise ValueError(f"{out}: existing scores were made by a different {', '.join(diff)}; pass "
                             f"overwrite=True (--overwrite) to replace them or choose another folder")
        if not diff:
            prev = load_scores(out)
            if prev.complete:
                log.info(f"reusing complete scores in {out} ({prev.count} images)")
                return prev
            meta.update({k: prev.meta[k] for k in ("count", "corrupt", "seconds") if k in prev.meta})
            state = dict(prev.tensors)
    start = int(meta["count"])
    write_scores(out, state, meta, files)  # listing first: a crash now still leaves a consistent folder

    shape = _first_shape(dataset)
    items = _ScoringItems(dataset, start, shape)
    loader = DataLoader(items, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        pin_memory=device.type == "cuda")
    bufs: dict[str, Tensor] = {}

    def alloc(name: str, like: Tensor) -> Tensor:
        if name not in bufs:
            shp = like.shape[:-1] + (m,)
            fill = False if like.dtype == torch.bool else -1 if like.dtype == torch.int64 else float("nan")
            bufs[name] = torch.full(shp, fill, dtype=like.dtype)
            if name in state:
                bufs[name][..., :start] = state[name]
        return bufs[name]

    def save(complete: bool) -> None:
        n = int(meta["count"])
        tensors = {k: v[..., :n].clone() for k, v in bufs.items()} if bufs else state
        valid = tensors.get("valid")
        if valid is not None:
            meta["corrupt"] = int((~valid).sum())
        meta["complete"] = complete
        write_scores(out, tensors, meta, files if complete else None)

    if amp != "none" and device.type == "cuda":
        dtype = torch.bfloat16 if amp == "bf16" else torch.float16
        autocast = lambda: torch.autocast("cuda", dtype=dtype)  # noqa: E731
    else:
        autocast = nullcontext
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=m, initial=start, unit="img", desc="scoring")
    t0, seconds0, done_batches = time.time(), float(meta["seconds"]), 0
    try:
        for images, readable in loader:
            images = images.to(device, non_blocking=True)
            with autocast():
                got = score_batch(teacher, images, blocks)
            readable = readable.bool().cpu()
            got = {k: v.cpu() for k, v in got.items()}
            bad = ~readable
            if bad.any():
                for k in ("confidence", "attention", "attention_heads"):
                    if k in got:
                        got[k][..., bad] = float("inf")
                got["predictions"][bad] = -1
            got["valid"] = readable
            i0 = int(meta["count"])
            b = images.shape[0]
            for k, v in got.items():
                alloc(k, v)[..., i0:i0 + b] = v
            meta["count"] = i0 + b
            meta["seconds"] = seconds0 + time.time() - t0
            done_batches += 1
            if bar is not None:
                bar.update(b)
            if save_every and done_batches % save_every == 0:
                save(False)
            if max_batches is not None and done_batches >= max_batches:
                break
    except BaseException:
        meta["seconds"] = seconds0 + time.time() - t0
        save(False)
        raise
    finally:
        if bar is not None:
            bar.close()
    complete = int(meta["count"]) == m
    save(complete)
    return load_scores(out)
