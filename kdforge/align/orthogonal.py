"""Orthogonal projector for feature distillation (VkD, Miles, Elezi & Deng, CVPR 2024).

VkD maps a student feature ``s`` (…, d_in) to the teacher width d_out with a *semi-orthogonal*
matrix ``W`` (d_out, d_in)::

    P(s) = s · Wᵀ,      Wᵀ W = I_{d_in}  if d_out >= d_in  (isometric embedding, ‖P s‖ = ‖s‖)
                        W Wᵀ = I_{d_out} if d_out <  d_in  (orthonormal rows, a co-isometry)

Optionally followed by a learnable per-channel scale and shift (the ViDT detection variant):
``y = γ ⊙ (s Wᵀ) + β`` with γ (d_out,) initialised to 1 and β (d_out,) to 0.

Parametrisation (why it cannot collapse)
----------------------------------------
The reference wraps ``nn.Linear`` in ``torch.nn.utils.parametrizations.orthogonal``; for a non-square
matrix that is a Householder map whose column signs come from ``int(diag(original))``. AdamW's
decoupled weight decay shrinks that diagonal from -1 to -0.99997, ``int()`` truncates it to 0 and
``W`` becomes exactly 0 after the first step (``shared/methods/vkd.md`` §1.4).

Here the free parameter is a tall matrix ``V`` (n, k), n = max(d_in, d_out), k = min(d_in, d_out),
and the weight is the Q factor of its thin QR decomposition with R's diagonal made positive::

    V = Q R,   Q ← Q · diag(sign(diag R)),   W = Q (d_out >= d_in)  or  Qᵀ (d_out < d_in)

* ``Q`` has orthonormal columns *to rounding error for every full-rank V*: orthogonality is a
  property of the map, not of the parameter values, so no optimizer state can break it.
* ``Q`` is invariant to ``V → V·T`` for every upper-triangular ``T`` with a positive diagonal, in
  particular to ``V → c·V`` (c > 0). Weight decay only rescales ``V``, so it cannot change ``W``
  at all; the parameter is nevertheless marked ``_no_weight_decay = True`` so that the optimizer
  groups of :func:`kdforge.methods.base.param_groups_weight_decay` leave it alone (a shrinking ``V``
  would make the effective learning rate grow).
* ``V`` is initialised orthonormal (QR of a Gaussian matrix), so at init ``W = V`` exactly and R = I.
* No (n, n) buffer: the reference stores a 3024×3024 ``base`` (36.6 MB) in every checkpoint.
  A thin QR of (3024, 192) costs O(n k²) ≈ 1e8 flops, versus ≈ 1.8e9 for the reference's base·Q.

Precision and caching
---------------------
``W`` is computed in float32 with autocast disabled (under fp16 autocast the reference's weight is
orthogonal only to ~4e-3), and the projection ``s · Wᵀ`` (+ scale/shift) also runs in float32: the
output is float32 whatever the input dtype.

``W`` is computed once per optimizer step, not once per use. The cache is keyed on the parameter's
identity, storage, device and in-place version counter (``Tensor._version``, bumped by every
in-place update: ``optimizer.step()``, ``load_state_dict``, ``copy_``), and on whether autograd is
recording. A weight computed with autograd keeps its graph, so every use within one forward pass
shares one QR and its gradients accumulate into one backward through the QR. A gradient hook on the
cached weight drops it when a backward pass consumes its graph, so gradient accumulation over
several micro-batches (several backward passes, one optimizer step) recomputes it instead of
back-propagating through a freed graph. Under ``torch.no_grad()`` a detached weight is cached and
reused until the parameter changes. :attr:`OrthogonalProjector.n_weight_computations` counts QRs.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

PROJECTORS = ("orthogonal", "linear", "identity")


def _semi_orthogonal_q(v: Tensor) -> Tensor:
    """Q factor of the thin QR of ``v`` (n, k), n >= k, with R's diagonal made non-negative.

    Differentiable (``torch.linalg.qr`` backward, mode "reduced"). Returns (n, k) with QᵀQ = I_k.
    """
    q, r = torch.linalg.qr(v, mode="reduced")
    d = torch.diagonal(r, 0, -2, -1)
    signs = torch.where(d < 0, -torch.ones_like(d), torch.ones_like(d))
    return q * signs.unsqueeze(-2)


class OrthogonalProjector(nn.Module):
    """Semi-orthogonal linear map ``(…, d_in) -> (…, d_out)`` for VkD feature distillation.

    ``y = s · Wᵀ`` (then ``γ ⊙ y + β`` with ``scale_shift=True``) where ``W`` (d_out, d_in) has
    orthonormal columns when d_out >= d_in and orthonormal rows otherwise; see the module docstring
    for the QR parametrisation, fp32 computation and per-step caching. No bias (the reference has
    none; ``scale_shift`` adds the ViDT per-channel affine).

    Args:
        d_in: student width.
        d_out: teacher width.
        scale_shift: learnable per-channel scale γ (init 1) and shift β (init 0) after the map.

    Attributes:
        raw: the free parameter ``V`` (max(d_in,d_out), min(d_in,d_out)), marked ``_no_weight_decay``.
        weight: the semi-orthogonal matrix ``W`` (d_out, d_in), float32 (property, cached per step).
    """

    def __init__(self, d_in: int, d_out: int, scale_shift: bool = False):
        super().__init__()
        if int(d_in) <= 0 or int(d_out) <= 0:
            raise ValueError(f"OrthogonalProjector: widths must be positive, got d_in={d_in}, d_out={d_out}")
        self.d_in, self.d_out = int(d_in), int(d_out)
        self.tall = self.d_out >= self.d_in
        n, k = max(self.d_in, self.d_out), min(self.d_in, self.d_out)
        self.raw = nn.Parameter(torch.empty(n, k))
        if scale_shift:
            self.scale = nn.Parameter(torch.ones(self.d_out))
            self.shift = nn.Parameter(torch.zeros(self.d_out))
        else:
            self.register_parameter("scale", None)
            self.register_parameter("shift", None)
        self._mark_no_decay()
        self.n_weight_computations = 0
        self._cache: Optional[tuple[tuple, Tensor]] = None
        self.reset_parameters()

    @property
    def scale_shift(self) -> bool:
        return self.scale is not None

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """``V`` ← Q of a standard Gaussian matrix (so ``W = V`` at init); γ ← 1, β ← 0."""
        g = torch.randn(self.raw.shape, dtype=torch.float32, device=self.raw.device)
        self.raw.copy_(_semi_orthogonal_q(g).to(self.raw.dtype))
        if self.scale is not None:
            self.scale.fill_(1.0)
            self.shift.zero_()
        self._cache = None

    def _mark_no_decay(self) -> None:
        # parameter attributes are lost by deepcopy/pickle and by tensor-swapping conversions
        for p in (self.raw, self.scale, self.shift):
            if p is not None:
                p._no_weight_decay = True

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)
        self._cache = None
        self._mark_no_decay()
        return out

    def __setstate__(self, state):
        super().__setstate__(state)
        self._cache = None
        self._mark_no_decay()

    def __getstate__(self):
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__
        state = dict(state)
        state["_cache"] = None  # a cached weight carries an autograd graph: never copy/pickle it
        return state

    # -- the weight --------------------------------------------------------------------------
    def _key(self) -> tuple:
        p = self.raw
        return (id(p), p.data_ptr(), p.device, p.dtype, p._version, torch.is_grad_enabled())

    def _drop_cache(self, grad: Tensor) -> None:
        self._cache = None

    def compute_weight(self) -> Tensor:
        """``W`` (d_out, d_in) in float32, computed now (no cache), autocast disabled."""
        with torch.autocast(device_type=self.raw.device.type, enabled=False):
            q = _semi_orthogonal_q(self.raw.float())
        self.n_weight_computations += 1
        return q if self.tall else q.transpose(0, 1)

    @property
    def weight(self) -> Tensor:
        """Semi-orthogonal ``W`` (d_out, d_in), float32; computed once per parameter update."""
        key = self._key()
        if self._cache is not None and self._cache[0] == key:
            return self._cache[1]
        w = self.compute_weight()
        if w.requires_grad:
            w.register_hook(self._drop_cache)
        self._cache = (key, w)
        return w

    # -- forward -----------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        """``x`` (…, d_in) -> (…, d_out), float32."""
        if x.shape[-1] != self.d_in:
            raise ValueError(f"OrthogonalProjector: expected input width {self.d_in}, got {tuple(x.shape)}")
        w = self.weight
        with torch.autocast(device_type=x.device.type, enabled=False):
            y = F.linear(x.float(), w)
            if self.scale is not None:
                y = y * self.scale.float() + self.shift.float()
        return y

    @torch.no_grad()
    def orthogonality_error(self) -> float:
        """``max |WᵀW - I|`` (tall) or ``max |WWᵀ - I|`` (wide), recomputed in float32."""
        w = self.compute_weight()
        g = w.T @ w if self.tall else w @ w.T
        return (g - torch.eye(g.shape[0], device=g.device)).abs().max().item()

    def extra_repr(self) -> str:
        kind = "orthonormal columns" if self.tall else "orthonormal rows"
        return f"d_in={self.d_in}, d_out={self.d_out}, {kind}, scale_shift={self.scale_shift}"


def make_projector(kind: str, d_in: int, d_out: int, scale_shift: bool = False, bias: bool = True) -> nn.Module:
    """Build the feature projector of a VkD-family method.

    * ``"orthogonal"`` — :class:`OrthogonalProjector` (VkD);
    * ``"linear"`` — unconstrained ``nn.Linear(d_in, d_out, bias)``, the FitNet-style hint regressor
      (Romero et al., 2015) used as the ablation baseline; it decays normally;
    * ``"identity"`` — no projection (requires d_in == d_out).
    """
    if kind == "orthogonal":
        return OrthogonalProjector(d_in, d_out, scale_shift=scale_shift)
    if kind == "linear":
        return nn.Linear(d_in, d_out, bias=bias)
    if kind == "identity":
        if d_in != d_out:
            raise ValueError(f"projector 'identity' needs equal widths, got student {d_in} vs teacher {d_out}")
        return nn.Identity()
    raise ValueError(f"projector: expected one of {', '.join(PROJECTORS)}, got {kind!r}")
