"""Few-shot episodic evaluation on fixed features (SMKD §3; "A Closer Look at Few-shot Classification").

* :func:`sample_episodes` draws N-way K-shot episodes (Q queries per class, or every remaining image)
  as row indices, seeded and reproducible: episode ``i`` depends only on ``(seed, i)``.
* :func:`evaluate_episodes` classifies every episode's queries with one of

  - ``"prototype"``: SMKD's "Prototype" (``fseval`` ``cosine``): prototypes = means of the raw support
    features, prediction = argmax_w cos(query, prototype_w);
  - ``"logistic"``: multinomial logistic regression (scikit-learn objective, ``C=1``) on L2-normalised
    features, solved for all episodes at once (:mod:`kdforge.eval.logreg`);
  - ``"cosine_classifier"``: SMKD's ``distLinear`` — a bias-free weight-normalised linear layer on
    x/(‖x‖+1e-5) with scores 2·g_w·v̂_wᵀx̂, trained from torch's default Linear init (g = ‖v‖) with SGD
    (lr 0.01, momentum 0.9, dampening 0.9, weight decay 1e-3) on cross-entropy over mini-batches of 4
    support rows reshuffled every epoch, for 301 epochs; the scores after the last epoch are used.

Every classifier reduces to per-episode linear scorers (E, W, D) + bias (E, W) applied to the
L2-normalised queries (the argmax is invariant to the query's positive scale). Two scoring strategies
with identical results: ``gather`` (gather the queries of each episode, batched matmul) and
``classblock`` (for "all remaining" queries: score every row of a class against the W − 1 margin
vectors w_own − w_v of all episodes that use the class in one dense matmul, then pick the episode's
queries), chosen automatically by cost. Both score in float32 and re-decide in float64 the rare queries
whose margin is within 2e-6 of a tie (exact ties included; first way wins, as ``torch.argmax``), so
the prototype classifier's decisions are those of exact arithmetic on the given features.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from kdforge.eval._common import (as_float, block_generator, l2_normalize, labels_to_index, mean_ci95,
                                  single_thread)
from kdforge.eval._gemm import matmul_nt, prepack
from kdforge.eval.logreg import fit_logistic_gram

CLASSIFIERS = ("prototype", "logistic", "cosine_classifier")
_EPISODE_BLOCK = 1024      # episodes drawn per RNG block (sample_episodes)
_FIT_BLOCK = 256           # episodes per RNG block of the cosine classifier's init and shuffles


@dataclass
class EpisodeResult:
    """Result of :func:`evaluate_episodes`.

    Attributes: ``mean`` and ``ci95`` (percent; ci95 = 1.96·std/√E, population std), ``accuracies``
    (E,) float64 percent per episode, and the protocol (classifier, ways, shots, queries, episodes,
    classifier options).
    """

    mean: float
    ci95: float
    accuracies: Tensor
    classifier: str
    n_way: int
    n_shot: int
    n_query: int
    n_episodes: int
    options: dict = field(default_factory=dict)

    def to_dict(self, with_accuracies: bool = False) -> dict:
        """JSON-ready dict (per-episode accuracies only when asked)."""
        d = {"mean": self.mean, "ci95": self.ci95, "classifier": self.classifier, "n_way": self.n_way,
             "n_shot": self.n_shot, "n_query": self.n_query, "n_episodes": self.n_episodes,
             "options": dict(self.options)}
        if with_accuracies:
            d["accuracies"] = [float(a) for a in self.accuracies]
        return d

    def __str__(self) -> str:
        return (f"{self.mean:.2f}% +- {self.ci95:.2f}% ({self.classifier}, {self.n_way}-way {self.n_shot}-shot, "
                f"{self.n_query} queries/class, {self.n_episodes} episodes)")


# --------------------------------------------------------------------------------------------
# Episodes
# --------------------------------------------------------------------------------------------
def _class_table(labels: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(classes, class index per row, counts, table (C, n_max) of member rows or -1, position in class)."""
    classes, inv = labels_to_index(labels)
    C = classes.numel()
    counts = torch.bincount(inv, minlength=C)
    order = torch.argsort(inv, stable=True)
    starts = torch.cumsum(counts, 0) - counts
    pos = torch.empty_like(inv)
    pos[order] = torch.arange(inv.numel()) - starts[inv[order]]
    table = torch.full((C, int(counts.max())), -1, dtype=torch.long)
    table[inv, pos] = torch.arange(inv.numel())
    return classes, inv, counts, table, pos


def sample_episodes(labels, n_way: int = 5, n_shot: int = 1, n_query: Union[int, str, None] = 15,
                    n_episodes: int = 10000, seed: int = 0) -> Tensor:
    """Sample few-shot episodes as row indices into a labelled feature set.

    Each episode picks ``n_way`` distinct classes uniformly, then ``n_shot + n_query`` distinct rows
    of each class uniformly without replacement (a random permutation prefix, as SMKD's ``fseval``).

    Args:
        labels: (N,) integer labels of the rows (any values; not necessarily contiguous).
        n_way, n_shot: ways and shots.
        n_query: queries per class; ``None`` or ``"all"`` means every remaining image of each chosen
            class (SMKD's protocol: n_query = 600 − n_shot on 600-image classes). With classes of
            unequal size, ``"all"`` uses ``min(class size) − n_shot`` queries per class, so larger
            classes are subsampled (as SMKD does on tieredImageNet), and a warning says so.
        n_episodes: E.
        seed: episodes are a pure function of (labels, n_way, n_shot, n_query, seed); episode ``i``
            is the same whatever ``n_episodes`` (prefixes agree).

    Returns:
        LongTensor (E, n_way, n_shot + n_query) of row indices (CPU); ``[..., :n_shot]`` are the
        support rows of each way and ``[..., n_shot:]`` its queries. The way index is the episode's
        class target.
    """
    labels = torch.as_tensor(labels).flatten().cpu()
    classes, _, counts, table, _ = _class_table(labels)
    C = classes.numel()
    if n_way < 1 or n_shot < 1 or n_episodes < 1:
        raise ValueError(f"n_way, n_shot and n_episodes must be >= 1 (got {n_way}, {n_shot}, {n_episodes})")
    if n_way > C:
        raise ValueError(f"{n_way}-way episodes need at least {n_way} classes; the labels have {C}")
    if n_query is None or n_query == "all":
        q = int(counts.min()) - n_shot
        if q < 1:
            raise ValueError(f"n_query='all' leaves no query: the smallest class has {int(counts.min())} rows "
                             f"for {n_shot} shots")
        if bool((counts != counts[0]).any()):
            warnings.warn(f"n_query='all' with classes of unequal size ({int(counts.min())}..{int(counts.max())} "
                          f"rows): using {q} queries per class, larger classes are subsampled", stacklevel=2)
    else:
        q = int(n_query)
        if q < 1:
            raise ValueError(f"n_query must be >= 1, 'all' or None (got {n_query!r})")
    need = n_shot + q
    small = (counts < need).nonzero().flatten()
    if small.numel():
        names = ", ".join(f"{int(classes[i])} ({int(counts[i])} rows)" for i in small[:5])
        raise ValueError(f"{n_shot}-shot episodes with {q} queries need {need} rows per class; too small: {names}"
                         + (" ..." if small.numel() > 5 else ""))
    n_max = table.shape[1]
    full = need == n_max                       # every image of every class: plain permutations
    out = torch.empty(n_episodes, n_way, need, dtype=torch.long)
    for blk, s in enumerate(range(0, n_episodes, _EPISODE_BLOCK)):
        rng = np.random.Generator(np.random.PCG64([int(seed) & (2**63 - 1), blk]))
        e = min(_EPISODE_BLOCK, n_episodes - s)
        cls = torch.from_numpy(rng.random((_EPISODE_BLOCK, C))).argsort(dim=1, stable=True)[:e, :n_way]
        if full:
            base = np.broadcast_to(np.arange(n_max, dtype=np.int32), (_EPISODE_BLOCK, n_way, n_max))
            perm = torch.from_numpy(rng.permuted(base, axis=-1)[:e]).long()
        else:
            keys = torch.from_numpy(rng.random((_EPISODE_BLOCK, n_way, n_max)))[:e]
            keys.masked_fill_(torch.arange(n_max) >= counts[cls][..., None], 2.0)   # padding never chosen
            perm = keys.topk(need, dim=-1, largest=False, sorted=True).indices
        out[s:s + e] = table[cls[..., None], perm]
    return out


# --------------------------------------------------------------------------------------------
# Scorers: each returns (weights (e, W, D), bias (e, W) or None) for the L2-normalised queries.
# --------------------------------------------------------------------------------------------
_BUF_FLOATS = 4 * 2**20    # gathered rows per sub-chunk: temporaries stay small and are reused


class _RowGather:
    """Gathers rows of a (N, D) matrix into one reused buffer (large fresh CPU allocations are
    page-faulted on every call, which costs more than the copy itself)."""

    def __init__(self, src: Tensor):
        self.src, self.buf = src, None

    def __call__(self, idx: Tensor) -> Tensor:
        flat = idx.reshape(-1)
        need = flat.numel() * self.src.shape[1]
        if self.buf is None or self.buf.numel() < need:
            self.buf = torch.empty(need, dtype=self.src.dtype, device=self.src.device)
        out = self.buf[:need].view(flat.numel(), self.src.shape[1])
        torch.index_select(self.src, 0, flat, out=out)
        return out.view(*idx.shape, self.src.shape[1])


def _sub(n_rows_per_item: int, D: int) -> int:
    return max(1, _BUF_FLOATS // max(1, n_rows_per_item * D))


def _prototype_scorers(feats: Tensor, support: Tensor) -> tuple[Tensor, None]:
    """cos(q, p_w) ranking: p̂_w = normalise(mean_s f_s) = normalise(Σ_s f_s); support (e, W, S) row indices."""
    e, W, S = support.shape
    # the sum (same direction as the mean) without gathering the (e, W, S, D) rows: 1.7x faster
    proto = F.embedding_bag(support.reshape(e * W, S), feats, mode="sum").view(e, W, feats.shape[1])
    return proto.div_(proto.norm(dim=-1, keepdim=True).clamp_min_(1e-12)), None   # in place: no second big buffer


def _logistic_scorers(feats: Tensor, rinv: Tensor, support: Tensor, C: float, max_iter: int,
                      tol: float) -> tuple[Tensor, Tensor]:
    """sklearn-objective logistic regression per episode on L2-normalised support rows.

    The rows are never normalised in memory: with r = 1/‖x‖, Ĝ = (X Xᵀ) ⊙ r rᵀ and W = (α ⊙ r)ᵀ X.
    """
    e, W, S = support.shape
    n = W * S
    dev, dt = feats.device, feats.dtype
    flat = support.reshape(e, n)
    r = rinv[flat]                                                          # (e, n)
    y = torch.arange(W, device=dev).repeat_interleave(S).expand(e, n)
    G = torch.empty(e, n, n, dtype=dt, device=dev)
    gather = _RowGather(feats)
    step = _sub(n, feats.shape[1])
    for s in range(0, e, step):
        xs = gather(flat[s:s + step])
        torch.matmul(xs, xs.transpose(1, 2), out=G[s:s + step])
    G.mul_(r[:, :, None] * r[:, None, :])
    alpha, b = fit_logistic_gram(G, y, W, C=C, max_iter=max_iter, tol=tol)
    alpha = (alpha.to(dt) * r[:, :, None]).transpose(1, 2).contiguous()     # (e, W, n) on the raw rows
    w = torch.empty(e, W, feats.shape[1], dtype=dt, device=dev)
    for s in range(0, e, step):
        torch.matmul(alpha[s:s + step], gather(flat[s:s + step]), out=w[s:s + step])
    return w, b.to(dt)


def _sgd_update(p: Tensor, grad: Tensor, buf: Optional[Tensor], lr: float, momentum: float, dampening: float,
                weight_decay: float) -> Tensor:
    """torch.optim.SGD's update (first step: buf = d_p; later buf = m·buf + (1−dampening)·d_p)."""
    d_p = grad + weight_decay * p
    buf = d_p.clone() if buf is None else buf.mul_(momentum).add_(d_p, alpha=1.0 - dampening)
    p.sub_(lr * buf)
    return buf


def fit_cosine_classifier(x: Tensor, y: Tensor, n_way: int, generators: list, epochs: int = 301,
                          batch_size: int = 4, lr: float = 0.01, momentum: float = 0.9, dampening: float = 0.9,
                          weight_decay: float = 1e-3, scale: float = 2.0) -> Tensor:
    """SMKD's per-episode cosine classifier (``distLinear``), trained for many episodes at once.

    Model per episode: scores_w(x) = scale · g_w · v_wᵀx̂ / ‖v_w‖ with x̂ = x/(‖x‖+1e-5) (weight norm
    on dim 0, no bias), v initialised as torch's ``nn.Linear`` default U(−1/√D, 1/√D), g = ‖v‖. SGD
    with momentum/dampening/weight decay exactly as ``torch.optim.SGD`` (on g and v), mean
    cross-entropy over mini-batches of ``batch_size`` rows, a fresh permutation every epoch.

    Exact reduction: every update of v_w is a combination of v_w and the x̂_i, so v stays in
    span{v(0), x̂_1..x̂_n} (dimension m ≤ W + n). Training runs on coordinates in an orthonormal
    basis of that span (obtained from the (m, m) Gram matrix), which is the same SGD trajectory in
    exact arithmetic at a fraction of the cost.

    Args:
        x: (B, n, D) raw support features; y: (B, n) targets in [0, n_way).
        generators: one ``torch.Generator`` per consecutive block of episodes (sizes from
            ``_FIT_BLOCK``); each draws its block's init and then, per epoch, its permutations.

    Returns:
        (B, W, D) scorer weights ``scale · g_w · v̂_w`` (apply to normalised queries; no bias).
    """
    with single_thread(x):
        return _fit_cosine_classifier(x, y, n_way, generators, epochs, batch_size, lr, momentum, dampening,
                                      weight_decay, scale)


def _fit_cosine_classifier(x, y, n_way, generators, epochs, batch_size, lr, momentum, dampening, weight_decay,
                           scale) -> Tensor:
    B, n, D = x.shape
    dev, dt = x.device, x.dtype
    sizes = [min(_FIT_BLOCK, B - s) for s in range(0, B, _FIT_BLOCK)]
    if len(generators) != len(sizes):
        raise ValueError(f"need {len(sizes)} generators for {B} episodes, got {len(generators)}")
    bound = 1.0 / math.sqrt(D)
    v0 = torch.cat([(torch.rand(sz, n_way, D, generator=g) * 2 - 1) * bound
                    for g, sz in zip(generators, sizes)]).to(device=dev, dtype=dt)
    xh = x / (x.norm(dim=-1, keepdim=True) + 1e-5)
    V = torch.cat([v0, xh], dim=1).double()                                 # (B, m, D), m = W + n
    M = V @ V.transpose(1, 2)
    evals, evecs = torch.linalg.eigh(M)
    keep = evals > evals[:, -1:].clamp_min(0) * 1e-12
    sq = torch.where(keep, evals.clamp_min(0).sqrt(), torch.zeros_like(evals))
    coords = evecs * sq[:, None, :]                                         # (B, m, m): V = coords @ Qᵀ
    inv_sq = torch.where(keep, 1.0 / sq.clamp_min(1e-300), torch.zeros_like(sq))
    c = coords[:, :n_way].clone()                                          # (B, W, m) v in the basis
    z = coords[:, n_way:]                                                  # (B, n, m) x̂ in the basis
    g = c.norm(dim=-1)                                                     # (B, W)
    c_buf = g_buf = None
    y = y.to(dev).long()
    for _ in range(epochs):
        perm = torch.cat([torch.rand(sz, n, generator=gen).argsort(dim=1) for gen, sz in zip(generators, sizes)])
        perm = perm.to(dev)
        for s in range(0, n, batch_size):
            idx = perm[:, s:s + batch_size]                                # (B, b)
            zb = z.gather(1, idx[..., None].expand(-1, -1, z.shape[-1]))    # (B, b, m)
            yb = y.gather(1, idx)
            nb = idx.shape[1]
            cn = c.norm(dim=-1, keepdim=True)                               # (B, W, 1)
            u = c / cn
            a = zb @ u.transpose(1, 2)                                      # (B, b, W) cosines
            logits = scale * g[:, None, :] * a
            dl = (torch.softmax(logits, -1) - F.one_hot(yb, n_way).to(logits.dtype)) / nb
            grad_g = scale * (dl * a).sum(1)                                # (B, W)
            grad_u = scale * g[..., None] * (dl.transpose(1, 2) @ zb)      # (B, W, m)
            grad_c = (grad_u - u * (u * grad_u).sum(-1, keepdim=True)) / cn
            c_buf = _sgd_update(c, grad_c, c_buf, lr, momentum, dampening, weight_decay)
            g_buf = _sgd_update(g, grad_g, g_buf, lr, momentum, dampening, weight_decay)
    w_coords = scale * g[..., None] * c / c.norm(dim=-1, keepdim=True)     # (B, W, m)
    # back to D dims: Q = Vᵀ U Λ^{-1/2}, so w = w_coords Qᵀ = (w_coords Λ^{-1/2} Uᵀ) V
    mix = (w_coords * inv_sq[:, None, :]) @ evecs.transpose(1, 2)          # (B, W, m)
    return (mix @ V).to(dt)


# --------------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------------
_NEAR = 1e-6   # relative margin below which a float32 decision is re-scored in float64


def _near(w: Tensor, b: Optional[Tensor]) -> Tensor:
    """(e,) margin under which an episode's float32 decisions are not trusted: 2·_NEAR·(max‖w‖ + max|b|).

    Measured on SMKD-sized episodes (D = 768, unit prototypes, 600k decisions): the float32 margins
    differ from float64 ones by at most 1.4e-7, 15x below this threshold. Near-ties are rare, so
    re-deciding them in float64 costs little and makes the decisions those of exact arithmetic."""
    t = w.norm(dim=-1).amax(1)
    if b is not None:
        t = t + b.abs().amax(1)
    return 2 * _NEAR * t


def _exact_correct(x: Tensor, w: Tensor, b: Optional[Tensor], target: Tensor) -> Tensor:
    """argmax_v (w_v·x + b_v) == target in float64, first index on ties; x (U, D), w (U, W, D), b (U, W)."""
    sc = (w.double() @ x.double()[:, :, None]).squeeze(-1)
    if b is not None:
        sc += b.double()
    return sc.argmax(1) == target


def _scorer_recheck(feats: Tensor, w: Tensor, b: Optional[Tensor]):
    """``recheck(rows, episodes, targets)``: the given scorers' decisions in float64 on the normalised rows."""
    def recheck(rows: Tensor, eps: Tensor, target: Tensor) -> Tensor:
        return _exact_correct(l2_normalize(feats[rows].double()), w[eps], None if b is None else b[eps], target)
    return recheck


def _correct_gather(feats: Tensor, rinv: Tensor, queries: Tensor, w: Tensor, b: Optional[Tensor],
                    recheck) -> Tensor:
    """Correct counts (e,) by gathering each episode's queries; queries (e, W, Q); rinv (N,) = 1/‖x‖
    normalises the scores of the raw rows. Queries whose two best scores are within :func:`_near` are
    decided again by ``recheck(rows, episodes, targets)`` in float64 (:func:`_scorer_recheck` or
    :func:`_prototype_recheck`)."""
    e, W, Q = queries.shape
    dev = feats.device
    gather = _RowGather(feats)
    target = torch.arange(W, device=dev).repeat_interleave(Q)
    correct = torch.empty(e, dtype=torch.long, device=dev)
    near = _near(w, b)
    pending: list = []                                                      # near-ties, re-decided at the end
    step = _sub(W * Q, feats.shape[1])
    for s in range(0, e, step):
        rows = queries[s:s + step].reshape(-1, W * Q)
        xq = gather(rows)                                                   # (e', W·Q, D) raw rows
        scores = (xq @ w[s:s + step].transpose(1, 2)).mul_(rinv[rows][..., None])
        if b is not None:
            scores += b[s:s + step, None, :]
        ok = scores.argmax(-1) == target                                    # (e', W·Q)
        if W > 1:
            top = scores.topk(2, dim=-1).values
            i, q = ((top[..., 0] - top[..., 1]) < near[s:s + step, None]).nonzero(as_tuple=True)
            if i.numel():       # counted with their float32 verdict for now, corrected at the end
                pending.append((rows[i, q], s + i, target[q], ok[i, q], torch.ones_like(i)))
        correct[s:s + step] = ok.sum(1)
    _apply_rechecks(correct, pending, recheck)
    return correct


def _correct_classblock(feats: Tensor, rinv: Tensor, queries: Tensor, w: Tensor, b: Optional[Tensor],
                        ep_cls: Tensor, table: Tensor, counts: list, pos: Tensor, recheck,
                        class_rows: Optional[dict] = None) -> Tensor:
    """Correct counts (e,) scoring whole classes at once; ep_cls (e, W) class index of each way.

    For class c and the K episodes that use it (as way wk), a row x of c is correct when the argmax
    over ways (first index on ties, as torch.argmax) is wk, i.e. when the W − 1 margins
    m_v = x·(w_wk − w_v) + (b_wk − b_v) are all > 0, a margin of exactly 0 being allowed only for the
    ways v after wk. One matmul scores every row of c against the W − 1 difference vectors of each
    episode (a fifth fewer products than scoring the W ways, and no cancellation of two large scores),
    laid out (W − 1, K, n_c) so that the minimum over ways is an elementwise minimum of W − 1
    contiguous slabs and each episode's verdicts are a contiguous row. Rows whose smallest
    margin is within :func:`_near` of 0 (exact ties included) are decided again by ``recheck``.
    ``class_rows`` (class → its normalised rows, prepacked for the GEMM) is filled on first use and may
    be passed again for the next chunk of episodes, so each class is gathered, normalised and laid
    out once per evaluation.
    """
    e, W, Q = queries.shape
    D = w.shape[-1]
    dev = feats.device
    if W == 1:                                                              # one way: every query is right
        return torch.full((e,), Q, dtype=torch.long, device=dev)
    class_rows = {} if class_rows is None else class_rows
    correct = torch.zeros(e, dtype=torch.long, device=dev)
    pending: list = []                                                      # near-ties, re-decided at the end
    w_flat = w.reshape(e * W, D)
    near = _near(w, b)
    j = torch.arange(W - 1, device=dev)
    buf = torch.empty(0, dtype=w.dtype, device=dev)
    for c in torch.unique(ep_cls).tolist():
        ek_all, wk_all = (ep_cls == c).nonzero(as_tuple=True)               # each episode holds c once
        n_c = counts[c]
        rows_c = table[c, :n_c]
        step = max(1, _BUF_FLOATS // max(1, n_c * (W - 1)))                # score block ≤ _BUF_FLOATS floats
        xc = class_rows.get(c)
        if xc is None:              # the class's rows, normalised, laid out once for the GEMMs below
            xc = class_rows[c] = prepack(feats[rows_c] * rinv[rows_c, None], (W - 1) * min(step, ek_all.numel()))
        for s in range(0, ek_all.numel(), step):
            ek, wk = ek_all[s:s + step], wk_all[s:s + step]
            K = ek.numel()
            v = j[:, None] + (j[:, None] >= wk[None, :]).long()            # (W−1, K) the other ways
            n = (W - 1) * K * D
            if buf.numel() < n:
                buf = torch.empty(n, dtype=w.dtype, device=dev)
            diff = buf[:n].view(W - 1, K, D)
            torch.index_select(w_flat, 0, (ek[None, :] * W + v).reshape(-1), out=diff.view(-1, D))
            torch.sub(torch.index_select(w_flat, 0, ek * W + wk)[None], diff, out=diff)
            m = matmul_nt(diff.view(-1, D), xc).view(W - 1, K, n_c)
            if b is not None:
                bk = b[ek]                                                  # (K, W)
                m += (bk.gather(1, wk[:, None]).T - bk.gather(1, v.T).T)[..., None]
            low = m.amin(0)                                                 # (K, n_c) smallest margin
            ok = low > 0
            pr = _pos_rows(queries, pos, ek, wk)                            # (K, Q) query positions in c
            correct.index_add_(0, ek, ok.gather(1, pr).sum(1))
            k, r = (low.abs() <= near[ek][:, None]).nonzero(as_tuple=True)  # near-ties and exact ties
            if r.numel():       # counted with their float32 verdict for now, corrected at the end
                pending.append((rows_c[r], ek[k], wk[k], ok[k, r], (pr[k] == r[:, None]).sum(1)))
    _apply_rechecks(correct, pending, recheck)
    return correct


_RECHECK_BLOCK = 512   # near-ties re-decided per recheck call: (512, W, D) float64 prototypes, 16 MB at W=5, D=768


def _apply_rechecks(correct: Tensor, pending: list, recheck) -> None:
    """Replace the provisional float32 verdicts of near-ties by ``recheck``'s float64 ones, in place.

    ``pending``: tuples (rows, episodes, targets, provisional verdicts, multiplicity of the row among
    the episode way's queries), as collected while scoring. The re-decisions run in a few batched calls
    at the end: each call costs ~0.5 ms of small tensor ops, so one call per scoring block cost ~60 ms
    per 10,000 SMKD episodes (100 blocks, ~1,400 near-ties).
    """
    if not pending:
        return
    rows, eps, target, prov, mult = (torch.cat(t) for t in zip(*pending))
    for s in range(0, rows.numel(), _RECHECK_BLOCK):
        sl = slice(s, s + _RECHECK_BLOCK)
        exact = recheck(rows[sl], eps[sl], target[sl])
        correct.index_add_(0, eps[sl], (exact.long() - prov[sl].long()) * mult[sl])


def _pos_rows(queries: Tensor, pos: Tensor, ek: Tensor, wk: Tensor) -> Tensor:
    """(K, Q) positions within their class of the queries of way wk of episodes ek."""
    e, W, Q = queries.shape
    q = torch.index_select(queries.reshape(e * W, Q), 0, ek * W + wk)
    return torch.index_select(pos, 0, q.reshape(-1)).view(q.shape)   # index_select: far faster than pos[q]


def _way_classes(inv: Tensor, episodes: Tensor, block: int = 256) -> Tensor:
    """(E, W) class index of each way; raises if a way mixes classes. Checked in blocks of episodes
    so the (E, W, M) label lookups never materialise at once (30M entries for SMKD's protocol)."""
    inv32 = inv.to(torch.int32)
    out = torch.empty(episodes.shape[:2], dtype=torch.long)
    for s in range(0, episodes.shape[0], block):
        lab = torch.index_select(inv32, 0, episodes[s:s + block].reshape(-1)).view(-1, *episodes.shape[1:])
        if bool((lab != lab[..., :1]).any()):
            raise ValueError("an episode way mixes classes: episodes do not match these labels")
        out[s:s + block] = lab[..., 0]
    return out


def _prototype_recheck(feats: Tensor, support: Tensor):
    """Near-tie decisions of the prototype classifier in float64 from the raw features (query and support
    rows normalised / averaged in float64): the decisions of exact arithmetic on the given features."""
    def recheck(rows: Tensor, eps: Tensor, target: Tensor) -> Tensor:
        x = l2_normalize(feats[rows].double())
        sup = support[eps]                                                  # (U, W, S)
        U, W, S = sup.shape
        p = torch.zeros(U * W, feats.shape[1], dtype=torch.float64, device=feats.device)
        for s in range(S):                      # summed shot by shot: no (U, W, S, D) float64 gather
            p += torch.index_select(feats, 0, sup[..., s].reshape(-1))
        return _exact_correct(x, l2_normalize(p.view(U, W, -1)), None, target)
    return recheck


def evaluate_episodes(features: Tensor, labels, episodes: Tensor, n_shot: int, classifier: str = "prototype", *,
                      strategy: str = "auto", chunk: Optional[int] = None, seed: int = 0, C: float = 1.0,
                      max_iter: int = 30, tol: float = 1e-4, epochs: int = 301, lr: float = 0.01,
                      batch_size: int = 4, fit_chunk: int = 2048) -> EpisodeResult:
    """Accuracy of each few-shot episode with a chosen classifier (see the module doc).

    Args:
        features: (N, D) features (any float dtype; computed in float32/float64), on any device.
        labels: (N,) labels; used to check that every way of every episode holds one class and to
            index the classes for the ``classblock`` strategy.
        episodes: (E, W, n_shot + Q) row indices from :func:`sample_episodes`.
        n_shot: support rows per way (the first ``n_shot`` columns).
        classifier: ``"prototype"``, ``"logistic"`` or ``"cosine_classifier"``.
        strategy: ``"auto"``, ``"gather"`` or ``"classblock"`` (identical results).
        chunk: episodes scored at once (default: about 8M floats of scorers, i.e. 2,184 5-way episodes at D=768).
        seed: seeds the cosine classifier's init and shuffles (episode i depends on (seed, i)).
        C, max_iter, tol: logistic regression (sklearn's C; Newton iterations; gradient tolerance). The
            default tol = 1e-4 is scikit-learn's: a problem stops when ‖∇(f/(C·n))‖₂ ≤ tol, the gradient of
            the objective in scikit-learn's own scaling (mean loss + ‖W‖²/(2Cn)), in the Euclidean norm,
            which is at least as strict as lbfgs's max-norm test with the same tol.
        epochs, lr, batch_size: cosine classifier (SMKD: 301, 0.01, 4).
        fit_chunk: episodes fitted at once by the cosine classifier.

    Returns:
        :class:`EpisodeResult` with accuracies (E,) in percent = 100 · correct queries / (W · Q).
    """
    if classifier not in CLASSIFIERS:
        raise ValueError(f"unknown classifier {classifier!r}; choose one of {CLASSIFIERS}")
    if strategy not in ("auto", "gather", "classblock"):
        raise ValueError(f"unknown strategy {strategy!r}")
    feats = as_float(features)
    if feats.ndim != 2:
        raise ValueError(f"features must be (N, D), got {tuple(feats.shape)}")
    dev = feats.device
    labels = torch.as_tensor(labels).flatten().cpu()
    if labels.numel() != feats.shape[0]:
        raise ValueError(f"{labels.numel()} labels for {feats.shape[0]} feature rows")
    episodes = torch.as_tensor(episodes).long()
    if episodes.ndim != 3 or episodes.shape[-1] <= n_shot:
        raise ValueError(f"episodes must be (E, W, n_shot + Q) with Q >= 1; got {tuple(episodes.shape)} "
                         f"for n_shot={n_shot}")
    E, W, M = episodes.shape
    Q = M - n_shot
    _, inv, counts, table, pos = _class_table(labels)
    ep_cls = _way_classes(inv, episodes.cpu())
    srt = ep_cls.sort(dim=1).values
    if W > 1 and bool((srt[:, 1:] == srt[:, :-1]).any()):
        raise ValueError("an episode uses the same class for two ways")
    if strategy == "auto":
        # classblock reads each class once per chunk but scores all its rows; gather copies the queries.
        mean_n = float(counts[ep_cls].double().mean())
        strategy = "classblock" if Q * 4 >= mean_n else "gather"
    D = feats.shape[1]
    if chunk is None:
        chunk = max(1, min(E, (8 * 2**20) // (W * D)))
    if classifier == "cosine_classifier":   # chunks hold whole RNG blocks
        chunk = max(_FIT_BLOCK, (chunk // _FIT_BLOCK) * _FIT_BLOCK)
    rinv = 1.0 / torch.linalg.vector_norm(feats, dim=1).clamp_min(1e-12)     # rows are normalised on use
    episodes_d = episodes.to(dev)
    if strategy == "classblock":
        table_d, counts_l, pos_d, ep_cls_d = table.to(dev), counts.tolist(), pos.to(dev), ep_cls.to(dev)
        class_rows: dict = {}                     # normalised rows per class, shared by the chunks (N × D)
    correct = torch.empty(E, dtype=torch.long)
    for s in range(0, E, chunk):
        ep = episodes_d[s:s + chunk]
        support, queries = ep[..., :n_shot], ep[..., n_shot:]
        if classifier == "prototype":
            w, b = _prototype_scorers(feats, support)
        elif classifier == "logistic":
            w, b = _logistic_scorers(feats, rinv, support, C, max_iter, tol)
        else:
            e = ep.shape[0]
            w = torch.empty(e, W, D, dtype=feats.dtype, device=dev)
            y = torch.arange(W, device=dev).repeat_interleave(n_shot)
            # fit in groups of whole RNG blocks so that episode i's randomness depends on (seed, i)
            step = max(_FIT_BLOCK, (fit_chunk // _FIT_BLOCK) * _FIT_BLOCK)
            for f0 in range(0, e, step):
                sup = support[f0:f0 + step]
                nb = sup.shape[0]
                gens = [block_generator(seed, (s + f0 + j) // _FIT_BLOCK) for j in range(0, nb, _FIT_BLOCK)]
                x = feats[sup.reshape(nb, W * n_shot)]
                w[f0:f0 + nb] = fit_cosine_classifier(x, y.expand(nb, -1), W, gens, epochs=epochs, lr=lr,
                                                      batch_size=batch_size)
            b = None
        recheck = (_prototype_recheck(feats, support) if classifier == "prototype"
                   else _scorer_recheck(feats, w, b))
        if strategy == "gather":
            correct[s:s + chunk] = _correct_gather(feats, rinv, queries, w, b, recheck).cpu()
        else:
            correct[s:s + chunk] = _correct_classblock(feats, rinv, queries, w, b, ep_cls_d[s:s + chunk], table_d,
                                                       counts_l, pos_d, recheck, class_rows).cpu()
    acc = correct.double() * (100.0 / (W * Q))
    mean, ci = mean_ci95(acc)
    opts = {"strategy": strategy}
    if classifier == "logistic":
        opts.update(C=C, normalize="l2", solver="newton-cg (exact sklearn objective)", tol=tol)
    elif classifier == "cosine_classifier":
        opts.update(epochs=epochs, lr=lr, batch_size=batch_size, momentum=0.9, dampening=0.9, weight_decay=1e-3,
                    scale=2.0, seed=seed)
    return EpisodeResult(mean, ci, acc, classifier, W, n_shot, Q, E, opts)
