"""Atomic checkpoints: written to a temporary file in the same folder, fsynced, then renamed, so a
crash or a kill mid-write never leaves a truncated ``last.pt`` behind."""
from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def available(path: str | os.PathLike, which: str = "best") -> str:
    """``which`` if ``path`` is a checkpoint file or a run folder holding ``<which>.pt``, else ``"last"``
    (a run that never validated, or stopped before its first validation, has only ``last.pt``)."""
    p = Path(path)
    return which if not p.is_dir() or (p / f"{which}.pt").is_file() else "last"


def find_checkpoint(path: str | os.PathLike, which: str = "last") -> Path:
    """A run folder (-> ``RUN/<which>.pt``) or a checkpoint file -> the checkpoint file."""
    p = Path(path)
    if p.is_dir():
        cand = p / f"{which}.pt"
        if not cand.is_file():
            other = [f.name for f in p.glob("*.pt")]
            raise FileNotFoundError(f"no {which}.pt in run folder {str(p)!r} (found: {other or 'nothing'}); "
                                    "was the run started and did it save a checkpoint?")
        return cand
    if not p.is_file():
        raise FileNotFoundError(f"checkpoint {str(p)!r} not found")
    return p


def load_checkpoint(path: str | os.PathLike, which: str = "last", map_location="cpu") -> dict:
    f = find_checkpoint(path, which)
    try:
        return torch.load(f, map_location=map_location, weights_only=False)
    except Exception as e:  # truncated or not a torch file
        raise RuntimeError(f"checkpoint {str(f)!r} cannot be read ({type(e).__name__}: {e}); "
                           "it may be truncated — use the other checkpoint (last.pt / best.pt)") from None
