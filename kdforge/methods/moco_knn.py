"""Online monitoring for self-supervised pretraining: weighted-cosine kNN accuracy.

Wu et al., "Unsupervised Feature Learning via Non-Parametric Instance Discrimination" (CVPR 2018):
for an L2-normalised query feature q and a labelled gallery G (M, d) of L2-normalised features,
take the k most cosine-similar gallery rows N_k(q) and predict

    ŷ(q) = argmax_c Σ_{j ∈ N_k(q)} exp(⟨q, g_j⟩ / τ) · [y_j = c]      (ties -> smallest class index)

Used by the ``moco`` and ``seed`` methods every ``train.val_every`` epochs on the pre-projection
feature of the student. With a training-split gallery the vote is the evaluation suite's
:func:`kdforge.eval.best_nn` (``weighted=True``, one fixed k); the leave-one-out variant is
:func:`weighted_knn_predict` below. The gallery is either a seeded subset of the training split (eval
transform) or, with ``gallery="val"``, the validation split itself in leave-one-out mode (each
query ignores its own row), which needs only the labelled val split.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Subset

from kdforge.engine import distributed as D

log = logging.getLogger("kdforge")


@torch.no_grad()
def weighted_knn_predict(queries: Tensor, gallery: Tensor, gallery_labels: Tensor, k: int = 20,
                         temperature: float = 0.07, num_classes: Optional[int] = None,
                         leave_one_out: bool = False, chunk: int = 1024) -> Tensor:
    """Weighted-cosine kNN predictions (see the module docstring).

    queries (Q, d) and gallery (M, d) are L2-normalised here; gallery_labels (M,) long. With
    ``leave_one_out`` the queries *are* the gallery (Q = M) and row i never votes for itself.
    Returns (Q,) long predictions. Chunked over queries (``chunk`` rows at a time).
    """
    if gallery.shape[0] != gallery_labels.shape[0]:
        raise ValueError(f"kNN: {gallery.shape[0]} gallery rows but {gallery_labels.shape[0]} labels")
    if leave_one_out and queries.shape[0] != gallery.shape[0]:
        raise ValueError("kNN leave-one-out: queries and gallery must be the same rows")
    q = F.normalize(queries.float(), dim=1)
    g = F.normalize(gallery.float(), dim=1)
    y = gallery_labels.long().to(g.device)
    c = int(num_classes if num_classes is not None else int(y.max()) + 1)
    kk = min(k, g.shape[0] - (1 if leave_one_out else 0))
    if kk < 1:
        raise ValueError("kNN: the gallery is empty")
    out = []
    for s in range(0, q.shape[0], chunk):
        sim = q[s:s + chunk] @ g.t()                                   # (c, M)
        if leave_one_out:
            rows = torch.arange(sim.shape[0], device=sim.device)
            sim[rows, rows + s] = float("-inf")
        top, idx = sim.topk(kk, dim=1)                                 # (c, kk)
        w = (top / temperature).exp()
        votes = torch.zeros(sim.shape[0], c, device=sim.device, dtype=w.dtype)
        votes.scatter_add_(1, y[idx], w)
        out.append(votes.argmax(dim=1))                                # first max = smallest class index
    return torch.cat(out)


@torch.no_grad()
def gather_rows(t: Tensor) -> Tensor:
    """Concatenate tensors of possibly different lengths (dim 0) from all ranks (rank order)."""
    if not D.is_dist() or D.get_world_size() == 1:
        return t
    n = torch.tensor([t.shape[0]], device=t.device)
    sizes = D.all_gather_cat(n).tolist()
    m = max(sizes)
    pad = torch.zeros((m - t.shape[0],) + tuple(t.shape[1:]), dtype=t.dtype, device=t.device)
    full = D.all_gather_cat(torch.cat([t, pad]))
    return torch.cat([full[i * m:i * m + s] for i, s in enumerate(sizes)])


@torch.no_grad()
def extract_features(encoder: Callable[[Tensor], Tensor], loader, device: torch.device,
                     amp_ctx: Optional[Callable] = None) -> tuple[Tensor, Tensor]:
    """(features (M, d) float32, labels (M,)) of ``loader`` — gathered over ranks when distributed."""
    feats, labels = [], []
    for images, y in loader:
        images = images.to(device, non_blocking=True)
        if amp_ctx is not None:
            with amp_ctx():
                f = encoder(images)
        else:
            f = encoder(images)
        feats.append(f.float())
        labels.append(torch.as_tensor(y).to(device))
    if not feats:
        f = torch.zeros(0, 1, device=device)
        return gather_rows(f), gather_rows(torch.zeros(0, dtype=torch.long, device=device))
    return gather_rows(torch.cat(feats)), gather_rows(torch.cat(labels).long())


def build_gallery_loader(cfg, max_images: int, seed: int = 0, classes: Optional[list] = None):
    """A loader over a seeded subset (at most ``max_images``) of the labelled training split with the
    eval transform, sharded over ranks. Returns None when the training split has no class folders."""
    from kdforge.data.datasets import ImageFolderDataset
    from kdforge.data.sampling import shard_indices
    from kdforge.data.transforms import build_eval_transform
    train_dir = Path(cfg.data.root) / cfg.data.train_split
    if not train_dir.is_dir() or not any(p.is_dir() for p in train_dir.iterdir()):
        return None
    mode = "RGB" if cfg.data.in_chans == 3 else "L"
    ds = ImageFolderDataset(train_dir, build_eval_transform(cfg.data), cfg.data.on_corrupt, mode, classes=classes)
    idx = list(range(len(ds)))
    if max_images and len(ds) > max_images:
        g = torch.Generator().manual_seed(seed)
        idx = sorted(torch.randperm(len(ds), generator=g)[:max_images].tolist())
    idx = [idx[i] for i in shard_indices(len(idx), D.get_rank(), D.get_world_size())]
    return DataLoader(Subset(ds, idx), batch_size=cfg.data.batch_size, shuffle=False,
                      num_workers=cfg.data.num_workers)


class KNNMonitor:
    """Online weighted-kNN accuracy of an encoder; ``__call__`` returns ``{"val/knn_acc1": %}``.

    ``gallery="train"`` embeds a seeded subset of at most ``max_gallery`` training images (falls back
    to ``"val"`` when the training split is unlabeled); ``gallery="val"`` is leave-one-out on the
    validation loader."""

    def __init__(self, cfg, k: int = 20, temperature: float = 0.07, gallery: str = "train",
                 max_gallery: int = 50000):
        if gallery not in ("train", "val"):
            raise ValueError(f"kNN gallery: expected 'train' or 'val', got {gallery!r}")
        self.cfg, self.k, self.temperature, self.gallery, self.max_gallery = cfg, k, temperature, gallery, max_gallery
        self._gallery_loader = None
        self._warned = False

    def _classes(self, loader) -> Optional[list]:
        ds = loader.dataset
        while isinstance(ds, Subset):
            ds = ds.dataset
        return getattr(ds, "classes", None) or None

    @torch.no_grad()
    def __call__(self, encoder: Callable[[Tensor], Tensor], loader, device: torch.device,
                 amp_ctx: Optional[Callable] = None) -> dict[str, float]:
        qx, qy = extract_features(encoder, loader, device, amp_ctx)
        if qx.shape[0] == 0:
            return {}
        gallery = self.gallery
        if gallery == "train" and self.cfg is not None:
            if self._gallery_loader is None:
                self._gallery_loader = build_gallery_loader(self.cfg, self.max_gallery, self.cfg.train.seed,
                                                            self._classes(loader))
            if self._gallery_loader is None:
                if not self._warned:
                    log.info("kNN monitor: the training split is unlabeled; using leave-one-out kNN on val")
                    self._warned = True
                gallery = "val"
        elif self.cfg is None:
            gallery = "val"
        if gallery == "train":
            from kdforge.eval import best_nn  # the evaluation suite's exact kNN (weighted cosine vote)
            gx, gy = extract_features(encoder, self._gallery_loader, device, amp_ctx)
            res = best_nn(gx, gy, qx, qy, ks=[min(self.k, gx.shape[0])], weighted=True, T=self.temperature)
            return {"val/knn_acc1": float(res.best_acc)}
        else:
            if qx.shape[0] < 2:
                return {}
            pred = weighted_knn_predict(qx, qx, qy, self.k, self.temperature, leave_one_out=True)
        return {"val/knn_acc1": 100.0 * float((pred == qy).float().mean())}
