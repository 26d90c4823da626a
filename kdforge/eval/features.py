"""Feature extraction with a checked on-disk cache.

* :func:`load_backbone` — a model from a kdforge run folder / checkpoint file (its ``student`` or
  another module, e.g. ``teacher`` for SMKD's EMA teacher) or from an exported ``.safetensors``
  (``kdforge export``), plus the data settings (image size, normalisation) it was trained with.
* :func:`extract_features` — batched, ``no_grad``, eval mode, optional AMP on GPU, progress bar, with
  one of the taps below (all built on :mod:`kdforge.models.taps`, never on forked model code):

  - ``pooled``: the classifier's input (timm ``forward_head(pre_logits=True)``);
  - ``cls``: the final-normed [CLS] token (ViTs);
  - ``cls+wpatch``: SMKD's evaluation feature, concat(norm(f_cls), norm(f_wp)) with
    f_wp = Σ_p w_p · token_p, w = the last block's CLS→patch attention averaged over heads and
    renormalised, tokens after the final norm (2·C dims);
  - ``multiblock``: ViTs: the final-normed [CLS] of the last ``n_blocks`` blocks concatenated (DINO's
    linear-eval feature); CNNs: the global-average-pooled outputs of the last ``n_blocks`` stages.

* :func:`cached_features` — the same, stored as safetensors under a key made of the checkpoint
  file's SHA-256, the module, the tap (and blocks), the transform, the split name and a fingerprint
  of the split's files (relative path, size, mtime), plus the autocast dtype when one is used. Any
  change gives a new key, so a stale cache is never reused; the key parts are stored in the file and
  checked again on load.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

TAPS = ("pooled", "cls", "cls+wpatch", "multiblock")


# --------------------------------------------------------------------------------------------
# models
# --------------------------------------------------------------------------------------------
def file_sha256(path: str | Path, chunk: int = 1 << 22) -> str:
    """SHA-256 of a file's bytes (streamed)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def load_backbone(ckpt: str | Path, which: str = "best", module: str = "student") -> tuple[nn.Module, dict, Path]:
    """Model + data settings + the file that holds the weights.

    Args:
        ckpt: a kdforge run folder (``best.pt``, else ``last.pt``), a checkpoint file, or an exported
            ``.safetensors`` whose metadata names the model (``kdforge export``).
        which: ``best`` or ``last`` for run folders.
        module: the method sub-module holding the weights (``student``; ``teacher`` for EMA teachers).

    Returns:
        (model in eval mode, data settings dict {img_size, in_chans, mean, std, eval_crop_pct}, weights file).
    """
    p = Path(ckpt)
    if p.suffix == ".safetensors":
        from safetensors import safe_open

        from kdforge.models import create_model, load_weights_file
        with safe_open(str(p), framework="pt") as f:
            meta = f.metadata() or {}
        if "kdforge_name" not in meta:
            raise ValueError(f"{p}: no 'kdforge_name' in the safetensors metadata; pass a kdforge run folder or a "
                             "file written by 'kdforge export'")
        kw = json.loads(meta.get("kwargs", "{}"))
        model = create_model(meta["kdforge_name"], num_classes=0, **kw)
        load_weights_file(model, p, strict=meta.get("with_head", "False") != "True")
        data = {"img_size": kw.get("img_size", 224), "in_chans": 3, "mean": (0.485, 0.456, 0.406),
                "std": (0.229, 0.224, 0.225), "eval_crop_pct": 0.875}
        return model.eval(), data, p
    from kdforge.engine.checkpoint import available, find_checkpoint
    from kdforge.models import load_model_from_run
    which = available(p, which)
    f = find_checkpoint(p, which)
    model, meta = load_model_from_run(p, which=which, module=module)
    d = meta["config"]["data"]
    data = {k: d[k] for k in ("img_size", "in_chans", "mean", "std", "eval_crop_pct") if k in d}
    return model.eval(), data, f


def eval_transform(data: dict, crop_pct: Optional[float] = None) -> Callable:
    """The evaluation transform of :mod:`kdforge.data.transforms` for a data-settings dict."""
    from types import SimpleNamespace

    from kdforge.data.transforms import build_eval_transform
    cfg = SimpleNamespace(img_size=int(data.get("img_size", 224)), mean=tuple(data.get("mean", (0.485, 0.456, 0.406))),
                          std=tuple(data.get("std", (0.229, 0.224, 0.225))),
                          eval_crop_pct=float(data.get("eval_crop_pct", 0.875)))
    return build_eval_transform(cfg, crop_pct)


# --------------------------------------------------------------------------------------------
# taps
# --------------------------------------------------------------------------------------------
def _is_vit(model: nn.Module) -> bool:
    return isinstance(getattr(model, "blocks", None), (nn.Sequential, nn.ModuleList))


def tap_features(model: nn.Module, x: Tensor, tap: str = "pooled", n_blocks: int = 4) -> Tensor:
    """(B, D) features of a batch with one of :data:`TAPS` (see the module doc)."""
    from kdforge.models.taps import FeatureTaps, block_outputs, pooled_features
    if tap == "pooled":
        return pooled_features(model, x)
    if tap in ("cls", "cls+wpatch") and not _is_vit(model):
        raise ValueError(f"tap {tap!r} needs a ViT with a [CLS] token; {type(model).__name__} has none "
                         "(use tap='pooled' or 'multiblock')")
    if tap == "cls":
        return model.forward_features(x)[:, 0]
    if tap == "cls+wpatch":
        npre = int(getattr(model, "num_prefix_tokens", 1))
        with FeatureTaps(model, attention=[-1]) as taps:
            tokens = model.forward_features(x)                            # (B, N, C) after the final norm
        w = taps.attention[-1].float().mean(1)                            # (B, N_patches), heads averaged
        w = w / w.sum(-1, keepdim=True)
        f_wp = torch.einsum("bp,bpc->bc", w.to(tokens.dtype), tokens[:, npre:])
        return torch.cat([F.normalize(tokens[:, 0], dim=-1), F.normalize(f_wp, dim=-1)], dim=-1)
    if tap == "multiblock":
        if _is_vit(model):
            n = len(model.blocks)
            outs = block_outputs(model, x, list(range(n - n_blocks, n)))
            norm = getattr(model, "norm", None) or nn.Identity()
            return torch.cat([norm(o)[:, 0] for o in outs], dim=-1)
        if hasattr(model, "forward_intermediates"):
            maps = model.forward_intermediates(x, intermediates_only=True)
            return torch.cat([m.float().mean((2, 3)) for m in maps[-n_blocks:]], dim=-1)
        raise ValueError(f"tap 'multiblock' needs a ViT or a timm model with forward_intermediates "
                         f"({type(model).__name__})")
    raise ValueError(f"unknown tap {tap!r}; choose one of {TAPS}")


def resolve_amp(amp: Optional[str], device) -> Optional[str]:
    """``"auto"`` -> ``"bf16"`` on CUDA, ``None`` elsewhere; ``"none"``/``None`` -> ``None``; else unchanged."""
    if amp in (None, "none"):
        return None
    if amp == "auto":
        dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                           ("cpu" if device == "auto" else device))
        return "bf16" if dev.type == "cuda" else None
    if amp not in ("bf16", "fp16"):
        raise ValueError(f"amp must be 'auto', 'none', 'bf16' or 'fp16', got {amp!r}")
    return amp


@torch.no_grad()
def extract_features(model: nn.Module, dataset, tap: str = "pooled", batch_size: int = 256, device="auto",
                     amp: Optional[str] = None, n_blocks: int = 4, num_workers: int = 0,
                     progress: bool = True) -> tuple[Tensor, Tensor]:
    """Embed every item of ``dataset`` (yielding ``(image, label)``) in order.

    Args:
        model: backbone (put in eval mode here; restored afterwards).
        dataset: a map-style dataset of (image tensor (C, H, W), int label).
        tap: one of :data:`TAPS`. ``n_blocks``: blocks/stages of ``multiblock``.
        batch_size, num_workers: loader settings (no shuffling, nothing dropped).
        device: ``"auto"`` (CUDA when available), a name or a ``torch.device``.
        amp: ``None``/``"none"``, ``"auto"`` (bf16 on CUDA, none on CPU), ``"bf16"`` or ``"fp16"``
            (autocast). Features are returned in float32.
        progress: show a tqdm bar.

    Returns:
        (features (N, D) float32 on CPU, labels (N,) int64).
    """
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
    amp = resolve_amp(amp, dev)
    was_training = model.training
    model.eval().to(dev)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        pin_memory=dev.type == "cuda")
    feats, labels = [], []
    ctx = (torch.autocast(dev.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)
           if amp is not None else None)
    for images, y in tqdm(loader, desc=f"features ({tap})", disable=not progress, leave=False):
        images = images.to(dev, non_blocking=True)
        if ctx is not None:
            with ctx:
                f = tap_features(model, images, tap, n_blocks)
        else:
            f = tap_features(model, images, tap, n_blocks)
        feats.append(f.float().cpu())
        labels.append(torch.as_tensor(y).long())
    model.train(was_training)
    if not feats:
        raise ValueError("the dataset is empty")
    return torch.cat(feats), torch.cat(labels)


# --------------------------------------------------------------------------------------------
# cache
# --------------------------------------------------------------------------------------------
def split_fingerprint(folder: str | Path) -> str:
    """SHA-256 of the sorted (relative path, size, mtime_ns) of every file under ``folder``."""
    root = Path(folder)
    h = hashlib.sha256()
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        st = f.stat()
        h.update(f"{f.relative_to(root).as_posix()}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def cache_key(parts: dict) -> str:
    """Stable hex key of a dict of key parts."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def cached_features(ckpt: str | Path, data_root: str | Path, split: str, tap: str = "pooled", *,
                    which: str = "best", module: str = "student", n_blocks: int = 4,
                    img_size: Optional[int] = None, crop_pct: Optional[float] = None, batch_size: int = 256,
                    device="auto", amp: Optional[str] = None, cache_dir: Optional[str | Path] = None,
                    use_cache: bool = True, num_workers: int = 0, progress: bool = True,
                    files: Optional[list] = None, classes: Optional[list] = None) -> dict:
    """Features of ``data_root/split`` from checkpoint ``ckpt``, computed once and cached.

    Args:
        ckpt, which, module: see :func:`load_backbone`.
        data_root, split: the ImageFolder ``data_root/split/<class>/<image>``.
        tap, n_blocks: see :func:`tap_features`.
        img_size, crop_pct: override the run's evaluation transform.
        amp: see :func:`extract_features`; the resolved autocast dtype is part of the cache key.
        cache_dir: where caches live (default ``<run or file folder>/features``).
        use_cache: False recomputes and overwrites.
        files: optional explicit ``[(path, label), ...]`` instead of the folder scan (static views).
        classes: class names (defaults to the split's folders).

    Returns:
        dict with ``features`` (N, D) float32, ``labels`` (N,), ``classes``, ``paths``, ``path``
        (cache file or None), ``cached`` (bool: loaded from disk), ``key`` and ``meta``.
    """
    from kdforge.data.datasets import ImageFolderDataset, ImageListDataset
    model, data, wfile = load_backbone(ckpt, which, module)
    if img_size is not None:
        data = {**data, "img_size": int(img_size)}
    tf = eval_transform(data, crop_pct)
    mode = "RGB" if int(data.get("in_chans", 3)) == 3 else "L"
    folder = Path(data_root) / split
    if files is None:
        if not folder.is_dir():
            raise FileNotFoundError(f"split folder {str(folder)!r} does not exist")
        ds = ImageFolderDataset(folder, tf, "skip", mode, classes=classes)
        fingerprint = split_fingerprint(folder)
    else:
        ds = ImageListDataset(files, classes, tf, "skip", mode)
        h = hashlib.sha256()
        for p, y in files:
            st = Path(p).stat()
            h.update(f"{Path(p).resolve()}\t{y}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
        fingerprint = h.hexdigest()
    parts = {"weights_sha256": file_sha256(wfile), "module": module, "tap": tap,
             "n_blocks": n_blocks if tap == "multiblock" else None, "transform": repr(tf), "split": split,
             "data_fingerprint": fingerprint, "format": 1}
    amp = resolve_amp(amp, device)
    if amp is not None:                       # reduced-precision features never stand in for fp32 ones
        parts["amp"] = amp
    key = cache_key(parts)
    base = Path(ckpt) if Path(ckpt).is_dir() else Path(ckpt).parent
    cdir = Path(cache_dir) if cache_dir is not None else base / "features"
    path = cdir / f"{split.replace('/', '_')}_{tap.replace('+', '-')}_{key[:16]}.safetensors"
    paths = [p for p, _ in ds.samples]
    if use_cache and path.is_file():
        from safetensors import safe_open
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("kdforge", "{}"))
            if meta.get("parts") == parts:                                 # belt and braces: the key matched
                return {"features": f.get_tensor("features"), "labels": f.get_tensor("labels"),
                        "classes": meta.get("classes", []), "paths": meta.get("paths", paths), "path": path,
                        "cached": True, "key": key, "meta": meta}
    feats, labels = extract_features(model, ds, tap, batch_size, device, amp, n_blocks, num_workers, progress)
    meta = {"parts": parts, "classes": list(ds.classes), "paths": paths, "ckpt": str(ckpt),
            "weights_file": str(wfile), "data_root": str(data_root), "n": int(feats.shape[0]),
            "dim": int(feats.shape[1])}
    if ds.corrupt_count:
        meta["skipped_unreadable"] = ds.corrupt_count
    out = {"features": feats, "labels": labels, "classes": list(ds.classes), "paths": paths, "path": None,
           "cached": False, "key": key, "meta": meta}
    if use_cache or cache_dir is not None:
        from safetensors.torch import save_file
        cdir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file({"features": feats.contiguous(), "labels": labels.contiguous()}, str(tmp),
                  metadata={"kdforge": json.dumps(meta)})
        tmp.replace(path)
        out["path"] = path
    return out
