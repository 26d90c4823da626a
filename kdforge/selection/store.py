"""The score file of a wild pool: ``OUT/scores.safetensors`` + ``OUT/scores.json``.

``scores.safetensors`` holds, in pool-listing order (M images, ``count`` of them scored so far):

=====================  ====================  ==================================================
tensor                 shape / dtype          meaning
=====================  ====================  ==================================================
``confidence``         (M,) float32           ``s_out = logsumexp(z) − max z`` (small = confident)
``predictions``        (M,) int64             teacher argmax
``attention``          (n_blocks, M) f32      probe score of the head-averaged CLS row per block
``attention_heads``    (n_blocks, H, M) f32   probe score of every head (head 0 = reference)
=====================  ====================  ==================================================

Its header metadata (``kdforge_scores``) and ``scores.json`` both carry what produced the scores
(teacher hash and name, transform, blocks, pool root, listing hash, count, complete); the JSON also
holds the pool listing itself (``files``, relative to ``pool_root``). A later pass, or a selection,
refuses a file made by another teacher, transform or pool instead of silently reusing it.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import torch
from torch import Tensor, nn

SCORES_FILE = "scores.safetensors"
META_FILE = "scores.json"
FORMAT = "kdforge-wild-scores/1"
#: metadata keys that must agree for a score file to be reused / resumed
IDENTITY_KEYS = ("teacher_hash", "transform", "listing_sha256", "blocks", "num_items")


def teacher_fingerprint(model: nn.Module) -> str:
    """SHA-256 over the teacher's state dict (sorted names, dtypes, shapes and raw bytes).

    Identifies the exact weights that produced a score file (hashing ~86 M parameters takes
    about a second on CPU)."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def listing_sha256(files: list[str]) -> str:
    """SHA-256 of the newline-joined pool listing (order matters: scores are stored in this order)."""
    h = hashlib.sha256()
    for f in files:
        h.update(f.encode("utf-8", "surrogateescape"))
        h.update(b"\n")
    return h.hexdigest()


@dataclass
class ScoreTable(Mapping):
    """Scores of a pool (a read-only mapping ``name -> tensor``) + what produced them.

    ``table["confidence"]``, ``table["predictions"]``, ``table["attention"]`` and
    ``table["attention_heads"]`` are the stored tensors (truncated to the ``count`` scored images
    when the pass is incomplete); ``meta`` the provenance; ``files`` the pool listing.
    """
    tensors: dict[str, Tensor]
    meta: dict
    files: list[str] = field(default_factory=list)

    def __getitem__(self, key: str) -> Tensor:
        return self.tensors[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)

    @property
    def count(self) -> int:
        return int(self.meta.get("count", 0))

    @property
    def complete(self) -> bool:
        return bool(self.meta.get("complete", False))

    def paths(self, absolute: bool = True) -> list[str]:
        """The pool listing (absolute paths under ``meta['pool_root']`` unless ``absolute=False``)."""
        root = self.meta.get("pool_root") or ""
        if not absolute or not root:
            return list(self.files)
        return [f if os.path.isabs(f) else os.path.join(root, f) for f in self.files]

    def with_head(self, head="mean") -> dict[str, Tensor]:
        """The tensors with ``"attention"`` recomputed for another head choice, without re-scoring.

        ``"mean"``: the stored head-averaged row; an int ``h``: head ``h`` (0 = reference);
        ``"mean_score"`` / ``"max_score"``: mean / max of the per-head scores."""
        out = dict(self.tensors)
        if "attention" not in out or head == "mean":
            return out
        heads = out["attention_heads"]  # (n_blk, H, M)
        if isinstance(head, int) and not isinstance(head, bool):
            if not -heads.shape[1] <= head < heads.shape[1]:
                raise ValueError(f"head {head} out of range: the teacher has {heads.shape[1]} heads")
            out["attention"] = heads[:, head]
        elif head == "mean_score":
            out["attention"] = heads.mean(1)
        elif head == "max_score":
            out["attention"] = heads.amax(1)
        else:
            raise ValueError(f"head must be 'mean', 'mean_score', 'max_score' or a head index, got {head!r}")
        return out


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_scores(out: str | Path, tensors: dict[str, Tensor], meta: dict, files: Optional[list[str]] = None) -> None:
    """Write ``scores.safetensors`` (tensors + meta in the header) atomically; when ``files`` is
    given, also (re)write ``scores.json`` (meta + listing)."""
    from safetensors.torch import save
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {**meta, "format": FORMAT}
    blob = save({k: v.detach().cpu().contiguous() for k, v in tensors.items()},
                metadata={"kdforge_scores": json.dumps(meta, sort_keys=True)})
    _atomic_write_bytes(out / SCORES_FILE, blob)
    if files is not None:
        _atomic_write_bytes(out / META_FILE, json.dumps({**meta, "files": files}, indent=1).encode())


def read_meta(out: str | Path) -> Optional[dict]:
    """Metadata of ``OUT/scores.safetensors`` (header only), or None when there is no score file."""
    p = Path(out) / SCORES_FILE
    if not p.is_file():
        return None
    from safetensors import safe_open
    with safe_open(str(p), framework="pt") as f:
        md = f.metadata() or {}
    if "kdforge_scores" not in md:
        raise ValueError(f"{p} is not a kdforge score file (no 'kdforge_scores' metadata)")
    return json.loads(md["kdforge_scores"])


def load_scores(out: str | Path, with_files: bool = True) -> ScoreTable:
    """Read a score folder written by :func:`kdforge.selection.score_pool`.

    Checks that ``scores.json`` describes the same pass as the safetensors header (listing hash,
    teacher hash) and that the listing matches its hash."""
    from safetensors.torch import load_file
    out = Path(out)
    p = out / SCORES_FILE
    if not p.is_file():
        raise FileNotFoundError(f"no score file {str(p)!r}; run 'kdforge select' (or score_pool) first")
    meta = read_meta(out)
    tensors = load_file(str(p))
    files: list[str] = []
    if with_files:
        jp = out / META_FILE
        if not jp.is_file():
            raise FileNotFoundError(f"{str(jp)!r} (the pool listing of {p}) is missing")
        side = json.loads(jp.read_text())
        files = side.pop("files")
        for k in ("teacher_hash", "listing_sha256"):
            if side.get(k) != meta.get(k):
                raise ValueError(f"{jp} and {p} disagree on {k}; the folder mixes two scoring passes")
        if listing_sha256(files) != meta["listing_sha256"]:
            raise ValueError(f"{jp}: the pool listing does not match its recorded hash (file edited?)")
    return ScoreTable(tensors, meta, files)
