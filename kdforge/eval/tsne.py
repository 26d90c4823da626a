"""t-SNE picture of a feature set (SSL-small §2(g), done with scikit-learn and matplotlib).

The reference ran a hand-written CUDA t-SNE on a fixed 3-batch subset with unsorted "PCA"
eigenvectors; here: optional seeded subsample, PCA to ``pca_dim`` (scikit-learn, when D is larger),
scikit-learn ``TSNE`` (PCA init, seeded), one scatter coloured by class, saved as PNG (Agg).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch


def tsne_embed(features, seed: int = 0, perplexity: float = 30.0, pca_dim: int = 50, max_iter: int = 1000) -> np.ndarray:
    """2-D t-SNE embedding of (N, D) features → (N, 2) float array (seeded, deterministic).

    PCA to ``pca_dim`` first when D is larger; scikit-learn TSNE with PCA init, ``max_iter``
    optimisation steps (≥ 250) and perplexity capped at (N − 1)/3.
    """
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE
    x = torch.as_tensor(features).detach().float().cpu().numpy()
    n = x.shape[0]
    if n < 3:
        raise ValueError("t-SNE needs at least 3 points")
    if x.shape[1] > pca_dim and n > pca_dim:
        x = PCA(n_components=pca_dim, random_state=seed).fit_transform(x)
    perp = min(perplexity, max(1.0, (n - 1) / 3.0))
    return TSNE(n_components=2, perplexity=perp, init="pca", random_state=seed,
                max_iter=max(250, int(max_iter))).fit_transform(x)


def tsne_plot(features, labels, path, seed: int = 0, perplexity: float = 30.0, max_points: Optional[int] = 5000,
              class_names: Optional[Sequence[str]] = None, title: Optional[str] = None,
              max_iter: int = 1000) -> np.ndarray:
    """Write a PNG scatter of the t-SNE embedding coloured by class; returns the (n, 2) embedding.

    Args:
        features: (N, D); labels: (N,) integer labels.
        path: output PNG path (parent folders are created).
        seed: seeds the subsample, PCA and t-SNE.
        perplexity: t-SNE perplexity (capped at (n − 1)/3).
        max_points: seeded subsample size (None: all points).
        class_names: optional legend names indexed by the sorted distinct labels.
        title: optional plot title.
        max_iter: t-SNE optimisation steps.
    """
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    x = torch.as_tensor(features).detach().float().cpu()
    y = torch.as_tensor(labels).detach().long().cpu().flatten()
    if x.shape[0] != y.numel():
        raise ValueError(f"{x.shape[0]} feature rows for {y.numel()} labels")
    if max_points is not None and x.shape[0] > max_points:
        keep = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))[:max_points]
        x, y = x[keep], y[keep]
    emb = tsne_embed(x, seed=seed, perplexity=perplexity, max_iter=max_iter)
    classes = torch.unique(y).tolist()
    fig, ax = plt.subplots(figsize=(7, 7), dpi=120)
    cmap = plt.get_cmap("tab20" if len(classes) > 10 else "tab10")
    yn = y.numpy()
    for i, c in enumerate(classes):
        m = yn == c
        name = class_names[i] if class_names is not None and i < len(class_names) else str(c)
        ax.scatter(emb[m, 0], emb[m, 1], s=6, color=cmap(i % cmap.N), label=name, alpha=0.8, linewidths=0)
    if len(classes) <= 20:
        ax.legend(markerscale=3, fontsize=7, loc="best", frameon=False)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title or f"t-SNE ({len(yn)} points, {len(classes)} classes, seed {seed})")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return emb
