"""Exact k-nearest-neighbour classification ("Best-NN", SSL-small §2(d); DINO/solo-learn weighted kNN).

* :func:`knn_search` — exact Euclidean k nearest gallery rows for every query, chunked over queries
  and gallery so that at most ``chunk × gallery_chunk`` distances exist at once (a 1.28M × 384
  gallery never needs the full N_test × N_train matrix). Distances are ranked as
  ``‖g‖² − 2 q·g`` (``‖q‖²`` is constant per query) with one GEMM per block (oneDNN on CPU, see
  :mod:`kdforge.eval._gemm`; ``addmm`` elsewhere). An optional faiss
  ``IndexFlatL2`` backend is used only when asked for (``backend="faiss"``) and installed.
* :func:`best_nn` — votes for every odd k from 1 to ``k_max`` (or the given ``ks``) from one sorted
  neighbour list: unweighted majority with ties to the smallest class index (the reference's
  ``unique(return_counts).argmax``), or DINO's weighted cosine vote (weights exp(cos/T)). k is chosen
  on a validation split when one is given (``chosen_on="val"``), else on the test split itself
  (``chosen_on="test"``, the reference's optimistic protocol, and the result says so).

Representation spaces (``rep_space``): ``"original"`` x; ``"norm"`` x/‖x‖; ``"shift-norm"``
(x − μ)/‖x − μ‖ with μ the gallery (train) mean, applied to gallery and queries alike.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
from torch import Tensor

from kdforge.eval._common import as_float, l2_normalize, single_thread
from kdforge.eval._gemm import matmul_nt, onednn_available, prepack

REP_SPACES = ("original", "norm", "shift-norm")


@dataclass
class KNNResult:
    """Result of :func:`best_nn`.

    ``best_acc`` (percent) is the test accuracy at ``best_k``; ``acc_by_k`` maps every k to the test
    accuracy; ``chosen_on`` says which split chose k (``"val"`` or ``"test"``); ``val_acc_by_k`` is
    filled when a validation split was given.
    """

    best_acc: float
    best_k: int
    acc_by_k: dict
    chosen_on: str
    val_acc_by_k: Optional[dict] = None
    rep_space: str = "original"
    weighted: bool = False
    T: float = 0.07
    n_train: int = 0
    n_test: int = 0
    backend: str = "torch"
    options: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        """JSON-ready dict (k keys as strings)."""
        return {"best_acc": self.best_acc, "best_k": self.best_k, "chosen_on": self.chosen_on,
                "acc_by_k": {str(k): v for k, v in self.acc_by_k.items()},
                "val_acc_by_k": None if self.val_acc_by_k is None else {str(k): v for k, v in self.val_acc_by_k.items()},
                "rep_space": self.rep_space, "weighted": self.weighted, "T": self.T, "n_train": self.n_train,
                "n_test": self.n_test, "backend": self.backend, **self.options}

    def __str__(self) -> str:
        kind = f"weighted (T={self.T})" if self.weighted else "majority"
        return (f"best-NN={self.best_acc:.2f}%, k={self.best_k} (k chosen on {self.chosen_on}; {kind}; "
                f"{self.rep_space}; {self.n_train} train / {self.n_test} test)")


def rep_transform(train_x: Tensor, rep_space: str):
    """The map f of a representation space, fitted on the gallery (see the module doc)."""
    if rep_space not in REP_SPACES:
        raise ValueError(f"unknown rep_space {rep_space!r}; choose one of {REP_SPACES}")
    if rep_space == "original":
        return lambda x: x
    if rep_space == "norm":
        return l2_normalize
    mu = train_x.mean(0, keepdim=True)
    return lambda x: l2_normalize(x - mu.to(x.dtype))


def _faiss_search(gallery: Tensor, queries: Tensor, k: int) -> tuple[Tensor, Tensor]:
    import faiss  # optional dependency: pip install 'kdforge[faiss]'
    import numpy as np
    g = np.ascontiguousarray(gallery.detach().cpu().float().numpy())
    index = faiss.IndexFlatL2(g.shape[1])
    index.add(g)
    d, i = index.search(np.ascontiguousarray(queries.detach().cpu().float().numpy()), k)
    return torch.from_numpy(d).to(queries.device), torch.from_numpy(i).long().to(queries.device)


def block_shape(gallery: Tensor, k: int, chunk: Optional[int] = None,
                gallery_chunk: Optional[int] = None) -> tuple[int, int]:
    """(queries, gallery rows) per distance block that :func:`knn_search` uses for these arguments."""
    N = gallery.shape[0]
    small_blocks = gallery.device.type == "cpu" and gallery.dtype == torch.float32 and onednn_available()
    block = 2**22 if small_blocks else 2**26
    chunk = int(chunk) if chunk is not None else (256 if small_blocks else 1024)
    if gallery_chunk is None:
        gallery_chunk = N if chunk * N <= block else max(k, block // chunk)
    gallery_chunk = max(int(gallery_chunk), k)
    if gallery_chunk >= _GROUP * k:                 # blocks of whole groups for the two-stage selection
        gallery_chunk = (gallery_chunk // _GROUP) * _GROUP
    return chunk, gallery_chunk


def knn_search(gallery: Tensor, queries: Tensor, k: int, *, chunk: Optional[int] = None,
               gallery_chunk: Optional[int] = None, backend: str = "torch") -> tuple[Tensor, Tensor]:
    """Exact k nearest gallery rows (squared Euclidean) of every query, nearest first.

    Args:
        gallery: (N, D); queries: (M, D) (same device; float32/float64).
        k: neighbours (k ≤ N).
        chunk: queries per block; ``gallery_chunk``: gallery rows per block. Defaults: blocks of at
            most B distances, B = 2^22 (16 MiB) on a CPU with the oneDNN GEMM of
            :mod:`kdforge.eval._gemm` (256 queries; its output is a fresh tensor per block, and blocks
            under glibc's 32 MiB mmap threshold are recycled instead of page-faulted in again:
            1.45 vs 1.8 s at 1,024 × 50,000 for the knn_speed benchmark), else B = 2^26 (1,024
            queries, one reused buffer); the whole gallery per block when ``chunk × N ≤ B``, else
            B // chunk rows. Gallery blocks are the outer loop: each is laid out for the GEMM once
            (:func:`kdforge.eval._gemm.prepack`, a copy of the block) and meets every query block
            while it is in cache; its k best per query are kept, and merged whenever ~2^22 such
            candidates pile up; queries go through this in super-blocks of ≤ 2^22 / k. Peak extra
            memory besides the (M, k) result: one distance block, one packed gallery block, a
            −2·queries copy of one super-block and ~4 × 2^22 candidate (value, row) pairs (~200 MB).
        backend: ``"torch"`` (default, any device) or ``"faiss"`` (CPU ``IndexFlatL2``; optional
            dependency, same neighbours up to float rounding of near-equal distances).

    Returns:
        (dist2 (M, k) squared distances ascending, index (M, k) gallery rows). Equal distances are
        ordered by ``torch.topk`` (arbitrary but deterministic).
    """
    N = gallery.shape[0]
    if not 1 <= k <= N:
        raise ValueError(f"k={k} must be in [1, {N}] (gallery size)")
    if backend == "faiss":
        return _faiss_search(gallery, queries, k)
    if backend != "torch":
        raise ValueError(f"unknown backend {backend!r}; choose 'torch' or 'faiss'")
    if queries.dtype != gallery.dtype or queries.device != gallery.device or queries.shape[1:] != gallery.shape[1:]:
        raise ValueError(f"queries {tuple(queries.shape)} {queries.dtype} on {queries.device} and gallery "
                         f"{tuple(gallery.shape)} {gallery.dtype} on {gallery.device} must share dtype, device "
                         "and feature size")
    M = queries.shape[0]
    chunk, gallery_chunk = block_shape(gallery, k, chunk, gallery_chunk)
    # blocks: full-group blocks over [0, N_main), then the < _GROUP tail rows (if any) on their own
    n_main = (N // _GROUP) * _GROUP if N >= _GROUP * k else N
    blocks = [(t, min(gallery_chunk, n_main - t)) for t in range(0, n_main, gallery_chunk)]
    if n_main < N:
        blocks.append((n_main, N - n_main))
    g2 = torch.linalg.vector_norm(gallery, dim=1).pow_(2)               # no (N, D) temporary
    dev, dt = gallery.device, gallery.dtype
    out_d = torch.empty(M, k, dtype=dt, device=dev)
    out_i = torch.empty(M, k, dtype=torch.long, device=dev)
    buf = torch.empty(min(chunk, M) * max(w for _, w in blocks), dtype=dt, device=dev)
    # query super-blocks of ≤ _PENDING / k queries bound the candidates held across gallery blocks
    sup = max(chunk, (_PENDING // k) // chunk * chunk)
    for s0 in range(0, M, sup):
        q = queries[s0:s0 + sup]
        best_d, best_i = _search_gallery(gallery, g2, q, blocks, k, chunk, buf)
        out_d[s0:s0 + sup] = (best_d + torch.linalg.vector_norm(q, dim=1, keepdim=True).pow_(2)).clamp_min_(0)
        out_i[s0:s0 + sup] = best_i
    return out_d, out_i


def _search_gallery(gallery: Tensor, g2: Tensor, queries: Tensor, blocks: list, k: int, chunk: int,
                    buf: Tensor) -> tuple[Tensor, Tensor]:
    """(‖g‖² − 2 q·g of the k nearest, ascending; their rows) for queries (m, D) over the gallery blocks.

    Gallery blocks outside, query blocks inside: each gallery block is laid out for the GEMM once
    (:func:`~kdforge.eval._gemm.prepack`) and stays in cache while every query block meets it; its k
    best per query are kept and merged with the others whenever ~_PENDING candidates pile up.
    """
    M = queries.shape[0]
    q2 = queries * -2.0                                                 # exact scaling by a power of 2
    pend_d, pend_i = [], []
    limit = max(2 * k, _PENDING // max(M, 1))
    for t, w in blocks:
        gw = prepack(gallery[t:t + w], chunk)
        kb = min(k, w)
        bd = torch.empty(M, kb, dtype=gallery.dtype, device=gallery.device)
        bi = torch.empty(M, kb, dtype=torch.long, device=gallery.device)
        for s in range(0, M, chunk):
            m = min(chunk, M - s)
            # ‖g‖² − 2 q·g : the query's own ‖q‖² does not change its ranking (buf: reused if possible)
            d = matmul_nt(q2[s:s + m], gw, g2[t:t + w], out=buf[:m * w].view(m, w))
            dv, di = _smallest(d, kb)
            bd[s:s + m] = dv
            torch.add(di, t, out=bi[s:s + m])
        pend_d.append(bd)
        pend_i.append(bi)
        if sum(p.shape[1] for p in pend_d) >= limit:
            run_d, run_i = _merge(pend_d, pend_i, k, sort=False)
            pend_d, pend_i = [run_d], [run_i]
    return _merge(pend_d, pend_i, k, sort=True)


def _merge(cand_d: list, cand_i: list, k: int, sort: bool) -> tuple[Tensor, Tensor]:
    """The k smallest of the concatenated candidates (M, Σ widths) → (values, gallery rows), ascending
    when ``sort``."""
    if len(cand_d) == 1 and cand_d[0].shape[1] <= k:
        d, i = cand_d[0], cand_i[0]
        if not sort:
            return d, i
        d, order = d.sort(dim=1)
        return d, i.gather(1, order)
    cat_d, cat_i = torch.cat(cand_d, 1), torch.cat(cand_i, 1)
    d, sel = cat_d.topk(k, dim=1, largest=False, sorted=sort)
    return d, cat_i.gather(1, sel)


_GROUP = 16
_PENDING = 2**22     # candidate (value, row) pairs held across gallery blocks before a merge


def _smallest(d: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The k smallest entries of each row of d (m, w), unsorted: (values, columns).

    Two-stage exact selection when w is a multiple of ``_GROUP`` (G) with w ≥ G·k: view the row as G
    strided slabs of length L = w/G; group j = columns {j, j+L, …, j+(G−1)L}. With τ the k-th smallest
    group minimum, at least k entries are ≤ τ, so every entry of the true k smallest is ≤ τ and lies
    in a group whose minimum is ≤ τ, i.e. in one of the k selected groups. The final top-k then runs
    over G·k candidates instead of w (the minimum over slabs is a cheap vectorised pass).
    """
    m, w = d.shape
    if w % _GROUP or w < _GROUP * k:
        return d.topk(k, dim=1, largest=False, sorted=False)
    L = w // _GROUP
    dv = d.view(m, _GROUP, L)
    _, gi = dv.amin(1).topk(k, dim=1, largest=False, sorted=False)          # (m, k) selected groups
    cand = dv.gather(2, gi[:, None, :].expand(-1, _GROUP, -1)).view(m, _GROUP * k)
    v, ci = cand.topk(k, dim=1, largest=False, sorted=False)
    cols = torch.div(ci, k, rounding_mode="floor") * L + gi.gather(1, ci % k)
    return v, cols


def vote_accuracies(neighbor_labels: Tensor, test_labels: Tensor, n_classes: int, ks: Sequence[int],
                    weights: Optional[Tensor] = None) -> dict:
    """Accuracy (%) of the kNN vote for every k in ``ks`` (see :func:`vote_correct`)."""
    M = neighbor_labels.shape[0]
    return {k: 100.0 * c / M for k, c in vote_correct(neighbor_labels, test_labels, n_classes, ks, weights).items()}


def vote_correct(neighbor_labels: Tensor, test_labels: Tensor, n_classes: int, ks: Sequence[int],
                 weights: Optional[Tensor] = None) -> dict:
    """Number of correct kNN votes for every k in ``ks`` from sorted neighbour labels.

    Args:
        neighbor_labels: (M, K) class indices of the neighbours, nearest first (K ≥ max(ks)).
        test_labels: (M,) class indices (-1 for a class absent from the gallery: always wrong).
        n_classes: C. ``weights``: (M, K) positive vote weights (None = 1 each).

    Majority ties go to the smallest class index. The vote is updated incrementally: adding the j-th
    neighbour only changes its own class's count, so the running winner changes only to that class
    (when its count exceeds the winner's, or equals it with a smaller index).
    """
    with single_thread(neighbor_labels):
        return _vote_correct(neighbor_labels, test_labels, n_classes, ks, weights)


def _vote_correct(neighbor_labels, test_labels, n_classes, ks, weights) -> dict:
    M, K = neighbor_labels.shape
    dev = neighbor_labels.device
    ks = sorted(set(int(k) for k in ks))
    if ks[0] < 1 or ks[-1] > K:
        raise ValueError(f"ks must lie in [1, {K}]")
    wanted = set(ks)
    counts = torch.zeros(M, n_classes, dtype=torch.float64 if weights is not None else torch.long, device=dev)
    rows = torch.arange(M, device=dev)
    best_c = torch.zeros(M, dtype=torch.long, device=dev)
    best_n = torch.zeros(M, dtype=counts.dtype, device=dev)
    out = {}
    for j in range(ks[-1]):
        lab = neighbor_labels[:, j]
        inc = weights[:, j].to(counts.dtype) if weights is not None else 1
        counts[rows, lab] += inc
        n = counts[rows, lab]
        take = (n > best_n) | ((n == best_n) & (lab < best_c))
        best_c = torch.where(take, lab, best_c)
        best_n = torch.where(take, n, best_n)
        if j + 1 in wanted:
            out[j + 1] = int((best_c == test_labels).sum())
    return out


def _labels_index(train_y: Tensor, *others: Tensor):
    classes, tr = torch.unique(train_y, sorted=True, return_inverse=True)
    mapped = []
    for y in others:
        pos = torch.searchsorted(classes, y)
        pos_c = pos.clamp(max=classes.numel() - 1)
        mapped.append(torch.where(classes[pos_c] == y, pos_c, torch.full_like(pos_c, -1)))
    return classes.numel(), tr, mapped


def best_nn(train_x: Tensor, train_y, test_x: Tensor, test_y, k_max: int = 101, rep_space: str = "original",
            val: Optional[tuple] = None, weighted: bool = False, T: float = 0.07, ks: Optional[Sequence[int]] = None,
            chunk: Optional[int] = None, gallery_chunk: Optional[int] = None, backend: str = "torch") -> KNNResult:
    """Best-NN kNN accuracy: exact neighbours, votes for every k, k chosen on val (or test).

    Args:
        train_x: (N, D) gallery features; train_y: (N,) labels (any integers).
        test_x: (M, D) query features; test_y: (M,) labels.
        k_max: largest k; the default ks are the odd values 1, 3, …, k_max (51 values for 101).
        rep_space: ``"original"``, ``"norm"`` or ``"shift-norm"`` (gallery mean; module doc).
        val: optional ``(val_x, val_y)``; when given, k is chosen on it and the test accuracy at that
            k is reported.
        weighted: DINO/solo-learn weighted vote: neighbours by cosine similarity (features
            L2-normalised after the rep-space map), votes weighted by exp(cos/T).
        T: temperature of the weighted vote.
        ks: explicit list of k (overrides the odd 1..k_max).
        chunk, gallery_chunk, backend: see :func:`knn_search`.

    Returns:
        :class:`KNNResult`. The smallest k wins ties of accuracy.
    """
    train_x, test_x = as_float(train_x), as_float(test_x)
    dev = train_x.device
    train_y = torch.as_tensor(train_y).long().flatten().to(dev)
    test_y = torch.as_tensor(test_y).long().flatten().to(dev)
    if train_x.shape[0] != train_y.numel() or test_x.shape[0] != test_y.numel():
        raise ValueError("features and labels differ in length")
    if ks is None:
        ks = list(range(1, k_max + 1, 2))
    ks = sorted(set(int(k) for k in ks))
    kmax = min(ks[-1], train_x.shape[0])
    ks = [k for k in ks if k <= kmax]
    f = rep_transform(train_x, rep_space)
    gal = f(train_x)
    if weighted:
        gal = l2_normalize(gal)
    n_classes, tr_idx, _ = _labels_index(train_y)

    def accs(x: Tensor, y: Tensor) -> dict:
        q = f(x.to(dev)).to(gal.dtype)                                      # float32 vs float64 inputs: the gallery's
        if weighted:
            q = l2_normalize(q)
        _, (y_idx,) = _labels_index(train_y, y.to(dev))[1:]
        d2, idx = knn_search(gal, q, kmax, chunk=chunk, gallery_chunk=gallery_chunk, backend=backend)
        w = torch.exp((1.0 - d2 / 2.0) / T) if weighted else None         # cos = 1 − ‖a − b‖²/2 on the sphere
        correct = {k: 0 for k in ks}
        step = max(1, 2**24 // max(n_classes, kmax))                      # vote counts stay ≤ 16M entries
        for s in range(0, q.shape[0], step):
            part = vote_correct(tr_idx[idx[s:s + step]], y_idx[s:s + step], n_classes, ks,
                                None if w is None else w[s:s + step])
            for k in ks:
                correct[k] += part[k]
        return {k: 100.0 * c / max(1, q.shape[0]) for k, c in correct.items()}

    test_acc = accs(test_x, test_y)
    val_acc = None
    if val is not None:
        vx, vy = val
        val_acc = accs(as_float(vx), torch.as_tensor(vy).long().flatten())
        best_k = max(ks, key=lambda k: (val_acc[k], -k))
        chosen = "val"
    else:
        best_k = max(ks, key=lambda k: (test_acc[k], -k))
        chosen = "test"
    return KNNResult(test_acc[best_k], best_k, test_acc, chosen, val_acc, rep_space, weighted, T,
                     train_x.shape[0], test_x.shape[0], backend, {"ks": ks})
