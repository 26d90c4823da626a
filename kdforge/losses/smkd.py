"""SMKD losses: supervised [CLS] distillation across same-class images and cross-image patch matching.

Paper: Lin et al., "Supervised Masked Knowledge Distillation for Few-Shot Transformers" (CVPR 2023).
Spec: ``shared/methods/smkd.md`` §2.3–§2.5. Notation as in :mod:`kdforge.losses.dino`: G global and L
local crops, crop-major rows, ``H(p, s) = −Σ_k p_k log_softmax(s)_k``, teacher targets
``T = softmax((t − c)/τ_t)`` and ``P = softmax((t_patch − c2)/τ_p)``, student logits divided by τ_s.

* :func:`smkd_cls_loss` — §2.3, exact.
* :func:`smkd_patch_loss` — §2.4 *intended* version: each teacher patch q of image b (view t) is matched
  to the student patch of another same-class image a (view s ≠ t) with the highest **cosine**
  similarity of backbone features, and the student's logits there are trained towards ``P_t[b, q]``.
* :func:`smkd_patch_loss_reference` — the reference repository's loss, bugs included (channel sums
  instead of cosine, student rows always from the first image of the class group, target from view s
  and image j). Only for ``compat: reference``.

Every loss returns a finite value: a batch without any same-class pair gives a patch loss of exactly 0
(still connected to the graph) and reports 0 pairs, where the reference code produced NaN.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from kdforge.losses.dino import IBOTLoss, cross_entropy_soft, dino_cls_loss


def _zero_like_graph(x: Tensor) -> Tensor:
    """A float32 scalar 0 that still depends on ``x`` (keeps DDP's gradient hooks firing)."""
    return x.float().sum() * 0.0


def same_class_pairs(labels_t: Tensor, labels_s: Tensor, offset: int = 0) -> Tensor:
    """``M`` (Bt, Bs) bool: ``M[i, j] = (y_t[i] == y_s[j]) and i ≠ j + offset`` (same class, other image).

    ``offset`` is the global index of the first student row when the teacher side holds the batches
    of all ranks (rank · B).
    """
    m = labels_t.view(-1, 1) == labels_s.view(1, -1)
    j = torch.arange(labels_s.numel(), device=m.device) + offset
    i = torch.arange(labels_t.numel(), device=m.device)
    return m & (i.view(-1, 1) != j.view(1, -1))


def smkd_cls_loss(student_logits: Tensor, teacher_targets: Tensor, labels: Tensor, n_global: int,
                  student_temp: float = 0.1, teacher_labels: Optional[Tensor] = None,
                  student_offset: int = 0) -> tuple[Tensor, int]:
    """Supervised [CLS] distillation (SMKD §2.3).

    With ``M_ij = 1[y_i = y_j] − δ_ij`` (teacher image i, student image j) and ``P = Σ_ij M_ij``::

        L = [ Σ_{q<G} Σ_{v<G} Σ_ij M_ij·H(T_q[i], S_v[j]/τ_s)  +  Σ_{q<G} Σ_{G≤v<V} Σ_b H(T_q[b], S_v[b]/τ_s) ]
            / (G·G·P + G·L·B)

    Global–global terms pair *different* images of one class (both view indices); the same image's
    views meet only through teacher-global / student-local terms. If P = 0 the first sum vanishes.

    Shapes: ``student_logits`` (V·B, K) crop-major; ``teacher_targets`` (G·Bt, K) crop-major
    probabilities; ``labels`` (B,) of the student images. ``teacher_labels`` (Bt,) defaults to
    ``labels``; when the teacher side is gathered over ranks (Bt = W·B, rows ordered crop, then rank,
    then image) give ``student_offset = rank·B``. Returns ``(loss, P)``.
    """
    G = int(n_global)
    B = labels.numel()
    V = student_logits.shape[0] // B
    if V * B != student_logits.shape[0]:
        raise ValueError(f"smkd_cls_loss: {student_logits.shape[0]} student rows are not crops of B = {B}")
    t_labels = labels if teacher_labels is None else teacher_labels
    Bt = t_labels.numel()
    if teacher_targets.shape[0] != G * Bt:
        raise ValueError(f"smkd_cls_loss: teacher rows {teacher_targets.shape[0]} != G·Bt = {G * Bt}")
    L = V - G
    log_s = F.log_softmax(student_logits.float() / student_temp, dim=-1).view(V, B, -1)
    t = teacher_targets.float().view(G, Bt, -1)
    M = same_class_pairs(t_labels.to(labels.device), labels, student_offset).float()  # (Bt, B)
    n_pairs = int(M.sum().item())
    # global-global: Σ_q Σ_v Σ_ij M_ij · (−T_q[i] · log S_v[j]) = −Σ_ij M_ij (Σ_q T_q)[i] · (Σ_v log S_v)[j]
    gg = -(M * (t.sum(0) @ log_s[:G].sum(0).T)).sum()
    total = gg
    if L > 0:
        own = t[:, student_offset:student_offset + B]               # (G, B, K) teacher rows of our images
        total = total - torch.einsum("qbk,vbk->", own, log_s[G:])
    denom = G * G * n_pairs + G * L * B
    if denom == 0:
        return _zero_like_graph(student_logits), 0
    return total / denom, n_pairs


def _chunks(n: int, size: int):
    for i in range(0, n, size):
        yield slice(i, min(i + size, n))


def smkd_patch_loss(student_feats: Tensor, student_patch_logits: Tensor, teacher_feats: Tensor,
                    teacher_patch_targets: Tensor, labels: Tensor, n_global: int, student_temp: float = 0.1,
                    chunk: int = 64) -> tuple[Tensor, int]:
    """Cross-image masked patch distillation, intended version (SMKD §2.4).

    For a student global view s of image a (masked input) and a teacher view t ≠ s of another image
    b ≠ a of the same class, every teacher patch q is matched to its most cosine-similar student patch::

        π(a, b, q) = argmax_p ⟨norm(fS_s[a, p]), norm(fT_t[b, q])⟩      (first index on ties)
        L = mean over (s, t ≠ s), ordered pairs (a, b) and q of  H(P_t[b, q], Z_s[a, π(a,b,q)] / τ_s)

    The matching uses detached backbone patch tokens and is not differentiated; the gradient reaches
    the student patch logits Z only. Implemented without materialising (pairs, N, K) tensors: the
    targets are scatter-added onto the matched student positions, ``W_s[a, p] = Σ_{t,b,q: π=p} P_t[b, q]``,
    and ``L = −Σ_s Σ_{a,p} W_s[a,p] · log_softmax(Z_s[a,p]/τ_s) / (#terms)`` — the same sum, reordered.

    Shapes: ``student_feats`` (G·B, N, D) patch tokens (no [CLS]) of the masked student crops;
    ``student_patch_logits`` (G·B, N, K); ``teacher_feats`` (G·B, N, D); ``teacher_patch_targets``
    (G·B, N, K) probabilities; ``labels`` (B,). Returns ``(loss, number of ordered image pairs)``;
    with no pair the loss is an exact 0.
    """
    G = int(n_global)
    B = labels.numel()
    GB, N, K = student_patch_logits.shape
    if GB != G * B or student_feats.shape[:2] != (GB, N) or teacher_feats.shape[:2] != (GB, N) \
            or teacher_patch_targets.shape != student_patch_logits.shape:
        raise ValueError("smkd_patch_loss: expected (G·B, N, ·) student/teacher tensors with matching N, got "
                         f"{tuple(student_feats.shape)}, {tuple(student_patch_logits.shape)}, "
                         f"{tuple(teacher_feats.shape)}, {tuple(teacher_patch_targets.shape)}")
    M = same_class_pairs(labels, labels)                   # (B, B): [a, b] student a, teacher b
    a_idx, b_idx = M.nonzero(as_tuple=True)
    n_pairs = int(a_idx.numel())
    if n_pairs == 0 or G < 2:
        return _zero_like_graph(student_patch_logits), n_pairs
    with torch.no_grad():
        fS = F.normalize(student_feats.detach().float(), dim=-1).view(G, B, N, -1)
        fT = F.normalize(teacher_feats.detach().float(), dim=-1).view(G, B, N, -1)
        P = teacher_patch_targets.detach().float().view(G, B, N, K)
        W = torch.zeros(G, B * N, K, device=P.device, dtype=torch.float32)
        for s in range(G):
            for t in range(G):
                if s == t:
                    continue
                for c in _chunks(n_pairs, chunk):
                    sim = torch.einsum("npd,nqd->nqp", fS[s, a_idx[c]], fT[t, b_idx[c]])  # (c, N_t, N_s)
                    pi = sim.argmax(-1)                                                   # (c, N)
                    rows = (a_idx[c].view(-1, 1) * N + pi).reshape(-1)
                    W[s].index_add_(0, rows, P[t, b_idx[c]].reshape(-1, K))
    log_z = F.log_softmax(student_patch_logits.float() / student_temp, dim=-1).view(G, B * N, K)
    n_terms = G * (G - 1) * n_pairs * N
    return -(W * log_z).sum() / n_terms, n_pairs


def smkd_patch_loss_reference(student_feats: Tensor, student_patch_logits: Tensor, teacher_feats: Tensor,
                              teacher_patch_targets: Tensor, labels: Tensor, n_global: int,
                              student_temp: float = 0.1) -> tuple[Tensor, int]:
    """The reference repository's patch loss, bugs included (``compat: reference``; SMKD §2.4).

    For every ordered crop pair (s, t ≠ s) and every class group ``g_0 < … < g_{n−1}`` (labels
    ascending), with f̂ the L2-normalised patch tokens:

    1. channel sums ``σ(j, p) = Σ_d f̂S_s[g_j, p, d]`` and ``ρ(i, q) = Σ_d f̂T_t[g_i, q, d]``;
    2. ``π(i, j, q) = argmax_p σ(j, p)·ρ(i, q)`` (first index on ties) — no cosine similarity;
    3. student logits from image ``g_0`` always: ``Ẑ = Z_s[g_0, π]/τ_s``; target ``P_s[g_j, q]`` (view s,
       image j); ``ℓ(i, j, q) = H(P_s[g_j, q], Ẑ(i, j, q))``;
    4. for n ≥ 2 and each i: ``A_i = Σ_{j≠i} Σ_q ℓ(i, j, q) / ((n−1)·N)``, one term each;
    5. ``L = Σ A_i / #terms``.

    Same shapes as :func:`smkd_patch_loss` (``weighted_pool=False``, the reference default). With no
    term the reference returned NaN; this returns an exact 0. Returns ``(loss, number of terms)``.
    """
    G = int(n_global)
    B = labels.numel()
    GB, N, K = student_patch_logits.shape
    fS = F.normalize(student_feats.detach().float(), dim=-1).view(G, B, N, -1)
    fT = F.normalize(teacher_feats.detach().float(), dim=-1).view(G, B, N, -1)
    Z = (student_patch_logits.float() / student_temp).view(G, B, N, K)
    P = teacher_patch_targets.detach().float().view(G, B, N, K)
    total = _zero_like_graph(student_patch_logits)
    n_terms = 0
    groups = [(labels == y).nonzero(as_tuple=True)[0] for y in torch.unique(labels)]  # ascending labels
    for s in range(G):
        for t in range(G):
            if s == t:
                continue
            for g in groups:
                n = g.numel()
                if n < 2:
                    continue
                sigma = fS[s, g].sum(-1)                              # (n, N)  [j, p]
                rho = fT[t, g].sum(-1)                                # (n, N)  [i, q]
                prod = rho[:, None, :, None] * sigma[None, :, None, :]  # (i, j, q, p)
                pi = prod.argmax(-1)                                  # (n, n, N)
                z_hat = Z[s, g[0]][pi]                                # (n, n, N, K): rows of image g_0
                target = P[s, g].unsqueeze(0).expand(n, n, N, K)      # [i, j, q] -> P_s[g_j, q]
                ell = cross_entropy_soft(target, z_hat)               # (n, n, N)
                off = ~torch.eye(n, dtype=torch.bool, device=ell.device)
                A = (ell * off[:, :, None]).sum((1, 2)) / ((n - 1) * N)  # (n,)
                total = total + A.sum()
                n_terms += n
    if n_terms == 0:
        return total, 0
    return total / n_terms, n_terms


class SMKDLoss(IBOTLoss):
    """``λ1·L_cls + λ2·L_patch + λ3·L_mim`` (SMKD §2.5) with the iBOT centres and temperatures.

    Without labels it is the iBOT loss (the patch term needs labels and is 0). With labels (B,), the
    [CLS] term is :func:`smkd_cls_loss` — with ``gather=True`` the teacher targets and labels of all
    ranks are all-gathered so same-class pairs also form across GPUs — and the patch term is
    :func:`smkd_patch_loss` (``compat="none"``) or :func:`smkd_patch_loss_reference`
    (``compat="reference"``, which also pairs only within the local batch, as the reference did).
    Patch matching always stays within the local batch (gathering (B, N, K) patch targets is too big).

    Buffer ``empty_patch_batches`` counts the calls whose batch had no same-class pair (patch loss 0).

    ``forward(..., labels=None, student_tokens=None, teacher_tokens=None)``: the tokens are the
    backbone patch tokens (G·B, N, D) (no [CLS]) of the masked student and clean teacher global crops.
    Returns ``{"loss", "cls", "patch", "mim", "patch_pairs", "cls_pairs"}``.
    """

    def __init__(self, *args, lambda2: float = 1.0, compat: str = "none", gather: bool = True, **kw):
        super().__init__(*args, **kw)
        if compat not in ("none", "reference"):
            raise ValueError(f"SMKDLoss: compat must be 'none' or 'reference', got {compat!r}")
        self.lambda2, self.compat, self.gather = float(lambda2), compat, bool(gather)
        self.register_buffer("empty_patch_batches", torch.zeros((), dtype=torch.long))

    def supervised_cls(self, student_cls: Tensor, t: Tensor, labels: Tensor) -> tuple[Tensor, int]:
        from kdforge.engine.distributed import all_gather_cat, get_rank, get_world_size
        G, B = self.n_global, labels.numel()
        if self.gather and self.compat == "none" and get_world_size() > 1:
            t_all = all_gather_cat(t.view(G, B, -1).transpose(0, 1).contiguous())  # (W·B, G, K)
            t_all = t_all.transpose(0, 1).reshape(-1, t.shape[-1])                 # crop, rank, image
            y_all = all_gather_cat(labels.contiguous())
            return smkd_cls_loss(student_cls, t_all, labels, G, self.student_temp, y_all, get_rank() * B)
        return smkd_cls_loss(student_cls, t, labels, G, self.student_temp)

    def forward(self, student_cls: Tensor, student_patch: Tensor, teacher_cls: Tensor, teacher_patch: Tensor,
                masks: Tensor, epoch: int, labels: Optional[Tensor] = None, student_tokens: Optional[Tensor] = None,
                teacher_tokens: Optional[Tensor] = None) -> dict[str, Tensor]:
        t, p = self.targets(teacher_cls, teacher_patch, epoch)
        dev = student_cls.device
        cls_pairs = patch_pairs = 0
        if labels is None:
            cls = self.lambda1 * dino_cls_loss(student_cls, t, self.n_global, self.student_temp)
        else:
            c, cls_pairs = self.supervised_cls(student_cls, t, labels)
            cls = self.lambda1 * c
        patch = _zero_like_graph(student_patch)
        if self.lambda2 > 0 and labels is not None:
            if student_tokens is None or teacher_tokens is None:
                raise ValueError("SMKDLoss: the patch term (lambda2 > 0) needs student_tokens and teacher_tokens")
            fn = smkd_patch_loss_reference if self.compat == "reference" else smkd_patch_loss
            pl, patch_pairs = fn(student_tokens, student_patch, teacher_tokens, p, labels, self.n_global,
                                 self.student_temp)
            patch = self.lambda2 * pl
            if patch_pairs == 0 and self.training:
                self.empty_patch_batches += 1
        mim = self.mim_term(student_patch, p, masks)
        if self.training:
            self.update_centers(teacher_cls, teacher_patch)
        return {"loss": cls + patch + mim, "cls": cls.detach(), "patch": patch.detach(), "mim": mim.detach(),
                "patch_pairs": torch.tensor(float(patch_pairs), device=dev),
                "cls_pairs": torch.tensor(float(cls_pairs), device=dev)}
