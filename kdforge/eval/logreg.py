"""Batched multinomial logistic regression: many small independent problems solved at once.

Objective of each problem (scikit-learn's ``LogisticRegression(C=C)`` with its default L2 penalty,
multinomial loss and unpenalised intercept)::

    min_{W, b}   C · Σ_i CE(softmax(W x_i + b), y_i)  +  ½ ‖W‖²_F          W: (K, D), b: (K,)

Few-shot episodes have n = n_way·n_shot rows in dimension D ≫ n. The gradient of the loss term is
Σ_i (p_i − y_i) x_iᵀ and the penalty's is W, so every Newton iterate started from 0 stays in the row
span of X: ``W = αᵀ X`` with α (n, K). The solver works only with these coordinates and the Gram
matrix ``G = X Xᵀ`` (n, n): logits ``Z = G α + 1 bᵀ``, W-space inner products
``⟨α₁ᵀX, α₂ᵀX⟩ = tr(α₁ᵀ G α₂)``. Each Newton step is solved by conjugate gradients on Hessian-vector
products (a batched (n, n)·(n, K) product each), so no factorisation or LAPACK call is needed and
thousands of problems run in lockstep; a per-problem Armijo backtracking line search keeps every
step a descent step. It converges to a gradient norm far below scikit-learn's default ``tol``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kdforge.eval._common import single_thread


def _sum2(a: Tensor) -> Tensor:
    return a.flatten(1).sum(1)


def fit_logistic_batched(x: Tensor, y: Tensor, n_classes: int, C: float = 1.0, max_iter: int = 30,
                         tol: float = 1e-7, cg_iter: int = 60) -> tuple[Tensor, Tensor]:
    """Fit B independent multinomial logistic regressions (sklearn's objective, see the module doc).

    Args:
        x: (B, n, D) inputs of each problem (L2-normalise them first if that is the protocol).
        y: (B, n) integer targets in [0, n_classes).
        n_classes: K.
        C: inverse regularisation strength (scikit-learn's ``C``; default 1.0 as in sklearn).
        max_iter: Newton iterations at most (few-shot problems converge in about 5–10).
        tol: stop when every problem's gradient norm ‖∇f‖ is below ``tol · max(1, C·n)``.
        cg_iter: conjugate-gradient iterations at most per Newton step.

    Returns:
        (W, b): (B, K, D) weights and (B, K) intercepts in x's dtype and device. Intercepts are
        centred (Σ_k b_k = 0), the gauge in which the unpenalised softmax intercept is unique.
    """
    if x.ndim != 3 or y.shape != x.shape[:2]:
        raise ValueError(f"x must be (B, n, D) and y (B, n); got {tuple(x.shape)} and {tuple(y.shape)}")
    xd = x.double()
    alpha, b = fit_logistic_gram(xd @ xd.transpose(1, 2), y, n_classes, C=C, max_iter=max_iter, tol=tol,
                                 cg_iter=cg_iter)
    return (alpha.transpose(1, 2) @ xd).to(x.dtype), b.to(x.dtype)


def fit_logistic_gram(G: Tensor, y: Tensor, n_classes: int, C: float = 1.0, max_iter: int = 30,
                      tol: float = 1e-7, cg_iter: int = 60) -> tuple[Tensor, Tensor]:
    """The solver of :func:`fit_logistic_batched` on Gram matrices: returns the coordinates α.

    Args:
        G: (B, n, n) Gram matrices ``X Xᵀ`` of the B problems (computed in float64 here).
        y: (B, n) integer targets; ``n_classes``, ``C``, ``max_iter``, ``tol``, ``cg_iter`` as there.

    Returns:
        (alpha, b): (B, n, K) float64 coordinates, so that ``W = alphaᵀ X`` (B, K, D), and (B, K)
        centred float64 intercepts. Runs its many small ops on one CPU thread (see
        :func:`kdforge.eval._common.single_thread`).
    """
    with single_thread(G):
        return _fit_logistic_gram(G, y, n_classes, C, max_iter, tol, cg_iter)


def _objective(G: Tensor, Y: Tensor, C: float, al: Tensor, bb: Tensor) -> Tensor:
    """(B,) f(α, b) = C · Σ_i CE(G α + b, y_i) + ½ tr(αᵀ G α) for the coordinates α (B, n, K), b (B, K)."""
    ga = G @ al
    z = ga + bb[:, None, :]
    ce = torch.logsumexp(z, -1) - (z * Y).sum(-1)
    return C * ce.sum(-1) + 0.5 * _sum2(al * ga)


def _newton_step(G, Y, alpha, b, f, p, g_al, g_b, Gg, gnorm2, C, eps, cg_iter):
    """One truncated-Newton step (CG on the Hessian, Armijo backtracking) for a batch of problems.

    Returns the new (alpha, b, f) and a mask of the problems whose line search found a decrease.
    """
    B = G.shape[0]
    tiny = torch.finfo(G.dtype).tiny
    # Conjugate gradients for H d = g, in (α-coordinates, intercept) with the G inner product.
    d_al, d_b = torch.zeros_like(alpha), torch.zeros_like(b)
    r_al, r_b, Gr = g_al.clone(), g_b.clone(), Gg.clone()
    q_al, q_b, Gq = r_al.clone(), r_b.clone(), Gr.clone()
    rr = gnorm2.clone()
    stop = rr.sqrt() * torch.clamp(gnorm2.sqrt().sqrt(), max=0.1).clamp_min(1e-10)  # forcing term
    for _cg in range(cg_iter):
        dz = Gq + q_b[:, None, :]
        u = p * dz - p * (p * dz).sum(-1, keepdim=True)                     # A_i Δz_i
        h_al = C * u + q_al
        h_b = C * u.sum(1) + eps * q_b
        qhq = _sum2(Gq * h_al) + _sum2(q_b * h_b)
        live = (rr.sqrt() > stop) & (qhq > tiny)
        a = torch.where(live, rr / qhq.clamp_min(tiny), torch.zeros_like(rr))
        d_al = d_al + a[:, None, None] * q_al
        d_b = d_b + a[:, None] * q_b
        r_al = r_al - a[:, None, None] * h_al
        r_b = r_b - a[:, None] * h_b
        Gr = Gr - a[:, None, None] * (G @ h_al)
        rr_new = _sum2(r_al * Gr) + _sum2(r_b * r_b)
        if not bool(live.any()):
            break
        beta = torch.where(live, rr_new / rr.clamp_min(tiny), torch.zeros_like(rr))
        q_al = r_al + beta[:, None, None] * q_al
        q_b = r_b + beta[:, None] * q_b
        Gq = Gr + beta[:, None, None] * Gq
        rr = rr_new
    slope = _sum2(Gg * d_al) + _sum2(g_b * d_b)                            # ⟨∇f, d⟩ > 0
    bad = ~(slope > 0)                                                      # CG failed: use the gradient
    if bool(bad.any()):
        d_al = torch.where(bad[:, None, None], g_al, d_al)
        d_b = torch.where(bad[:, None], g_b, d_b)
        slope = torch.where(bad, gnorm2, slope)
    t = G.new_ones(B)
    accepted = torch.zeros(B, dtype=torch.bool, device=G.device)
    new_al, new_b, new_f = alpha.clone(), b.clone(), f.clone()
    for _ls in range(40):
        c_al = alpha - t[:, None, None] * d_al
        c_b = b - t[:, None] * d_b
        fc = _objective(G, Y, C, c_al, c_b)
        ok = (~accepted) & (fc <= f - 1e-4 * t * slope)
        new_al[ok], new_b[ok], new_f[ok] = c_al[ok], c_b[ok], fc[ok]
        accepted = accepted | ok
        if bool(accepted.all()):
            break
        t = torch.where(accepted, t, 0.5 * t)
    return new_al, new_b, new_f, accepted


def _fit_logistic_gram(G: Tensor, y: Tensor, n_classes: int, C: float, max_iter: int, tol: float,
                       cg_iter: int) -> tuple[Tensor, Tensor]:
    if G.ndim != 3 or G.shape[1] != G.shape[2] or y.shape != G.shape[:2]:
        raise ValueError(f"G must be (B, n, n) and y (B, n); got {tuple(G.shape)} and {tuple(y.shape)}")
    G = G.double()
    B, n, _ = G.shape
    K = int(n_classes)
    Y = F.one_hot(y.long(), K).to(G.dtype)                                  # (B, n, K)
    alpha = G.new_zeros(B, n, K)
    b = G.new_zeros(B, K)
    eps = 1e-9 * max(1.0, C * n)                                           # ridge on the intercept's null direction
    gtol = tol * max(1.0, C * n)
    f = _objective(G, Y, C, alpha, b)
    stalled = torch.zeros(B, dtype=torch.bool, device=G.device)   # line search found no decrease: at precision
    for _ in range(max_iter):
        z = G @ alpha + b[:, None, :]
        p = torch.softmax(z, -1)                                           # (B, n, K)
        g_al = C * (p - Y) + alpha                                          # W-gradient coordinates
        g_b = C * (p - Y).sum(1)                                           # (B, K)
        Gg = G @ g_al
        gnorm2 = _sum2(g_al * Gg) + _sum2(g_b * g_b)
        active = (gnorm2.sqrt() > gtol) & ~stalled
        if not bool(active.any()):
            break
        # Newton step on the problems still active only (stragglers must not cost the whole batch)
        idx = active.nonzero().flatten()
        sub = (lambda t: t.index_select(0, idx)) if idx.numel() < B else (lambda t: t)
        a_new, b_new, f_new, ok = _newton_step(sub(G), sub(Y), sub(alpha), sub(b), sub(f), sub(p), sub(g_al),
                                               sub(g_b), sub(Gg), sub(gnorm2), C, eps, cg_iter)
        if idx.numel() < B:
            alpha, b, f = alpha.index_copy(0, idx, a_new), b.index_copy(0, idx, b_new), f.index_copy(0, idx, f_new)
            stalled = stalled.index_copy(0, idx, stalled.index_select(0, idx) | ~ok)
        else:
            alpha, b, f, stalled = a_new, b_new, f_new, stalled | ~ok
    return alpha, b - b.mean(-1, keepdim=True)
