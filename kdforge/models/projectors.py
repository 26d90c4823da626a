"""MoCo projection heads (placed on top of the pooled backbone feature).

Shi et al., "On the Efficacy of Small Self-Supervised Contrastive Models without Distillation
Signals" (AAAI 2022) widen MoCo-v2's MLP: for a backbone feature of dimension d and an embedding of
dimension D (128), the kinds are (``shared/methods/sslsmall.md`` §1.4; no head has BatchNorm):

=============  =======================================================  =====================
kind           layers                                                   example d=1280, D=128
=============  =======================================================  =====================
``wide``       Linear(d, 2d) → ReLU → Linear(2d, D)   (the paper's)     1280→2560→128
``simple``     Linear(d, d) → ReLU → Linear(d, D)     (MoCo-v2)         1280→1280→128
``deep``       Linear(d, d) → ReLU → Linear(d, d) → ReLU → Linear(d, D)
``dropout``    Linear(d, d) → ReLU → Dropout(0.5) → Linear(d, D)
``none``       Linear(d, D)                           (MoCo-v1: no MLP)
``identity``   nothing: the embedding is the d-dim feature itself
=============  =======================================================  =====================

Linear layers keep PyTorch's default initialisation, as in the reference.
"""
from __future__ import annotations

from torch import Tensor, nn

MOCO_HEADS = ("wide", "simple", "deep", "dropout", "none", "identity")


class MoCoHead(nn.Sequential):
    """Projection head ``(N, d) -> (N, D)`` of kind ``wide | simple | deep | dropout | none | identity``
    (see the module docstring). ``out_dim`` is D (d for ``identity``)."""

    def __init__(self, in_dim: int, out_dim: int = 128, kind: str = "wide"):
        if kind not in MOCO_HEADS:
            raise ValueError(f"MoCo head: expected one of {', '.join(MOCO_HEADS)}, got {kind!r}")
        if in_dim <= 0 or out_dim <= 0:
            raise ValueError(f"MoCo head: dimensions must be positive, got in_dim={in_dim}, out_dim={out_dim}")
        d, D = int(in_dim), int(out_dim)
        if kind == "wide":
            layers = [nn.Linear(d, 2 * d), nn.ReLU(inplace=True), nn.Linear(2 * d, D)]
        elif kind == "simple":
            layers = [nn.Linear(d, d), nn.ReLU(inplace=True), nn.Linear(d, D)]
        elif kind == "deep":
            layers = [nn.Linear(d, d), nn.ReLU(inplace=True), nn.Linear(d, d), nn.ReLU(inplace=True),
                      nn.Linear(d, D)]
        elif kind == "dropout":
            layers = [nn.Linear(d, d), nn.ReLU(inplace=True), nn.Dropout(0.5), nn.Linear(d, D)]
        elif kind == "none":
            layers = [nn.Linear(d, D)]
        else:  # identity
            layers = [nn.Identity()]
            D = d
        super().__init__(*layers)
        self.kind, self.in_dim, self.out_dim = kind, d, D

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.in_dim:
            raise ValueError(f"MoCo head ({self.kind}): expected features of dim {self.in_dim}, got {tuple(x.shape)}")
        return super().forward(x)

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, in_dim={self.in_dim}, out_dim={self.out_dim}"


def build_moco_head(kind: str, in_dim: int, out_dim: int = 128) -> MoCoHead:
    """``MoCoHead(in_dim, out_dim, kind)``; see :class:`MoCoHead`."""
    return MoCoHead(in_dim, out_dim, kind)
