"""DINO/iBOT projection head with a weight-normalised prototype layer.

Caron et al., DINO (ICCV 2021); Zhou et al., iBOT (ICLR 2022); SMKD spec ``shared/methods/smkd.md`` §1.2::

    h = Linear(D→H) → GELU → Linear(H→H) → GELU → Linear(H→bottleneck)   (nlayers = 3, no norm layers)
    z = norm(h)                                                          (L2 on the bottleneck, 256-d)
    logits = WeightNorm(Linear(bottleneck→K, bias=False))(z)             (weight = g · v / ‖v‖ per row)

The MLP Linears are trunc-normal(0.02) with zero bias; the prototype layer keeps PyTorch's default
direction init and ``g = 1``; with ``norm_last_layer=True`` g is frozen. Weight norm uses
``torch.nn.utils.parametrizations.weight_norm`` (keys ``last_layer.parametrizations.weight.original0``
= g (K, 1) and ``.original1`` = v (K, bottleneck)); state dicts with the deprecated ``weight_g`` /
``weight_v`` keys load too (they are renamed on load).

On a (B, T, D) token input (``forward``) token 0 goes through ``last_layer`` ([CLS] logits (B, K)) and
tokens 1.. through ``last_layer2`` (patch logits (B, T−1, K2)); with ``shared_head=True`` (SMKD's
default) ``last_layer2`` *is* ``last_layer`` and K2 = K. On a (B, D) input it is a DINO head -> (B, K).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import weight_norm

_LEGACY = {"weight_g": "parametrizations.weight.original0", "weight_v": "parametrizations.weight.original1"}


def convert_legacy_weight_norm(state_dict: dict, prefix: str = "") -> dict:
    """Rename ``<prefix>...weight_g/weight_v`` (``nn.utils.weight_norm``) to the parametrization keys
    ``...parametrizations.weight.original0/original1``. Returns a new dict; other keys are untouched."""
    out = {}
    for k, v in state_dict.items():
        if k.startswith(prefix):
            head, _, leaf = k.rpartition(".")
            if leaf in _LEGACY:
                k = f"{head}.{_LEGACY[leaf]}" if head else _LEGACY[leaf]
        out[k] = v
    return out


def _prototype_layer(in_dim: int, out_dim: int, freeze_norm: bool) -> nn.Module:
    layer = weight_norm(nn.Linear(in_dim, out_dim, bias=False))
    g = layer.parametrizations.weight.original0
    with torch.no_grad():
        g.fill_(1.0)
    g._no_weight_decay = True  # a per-prototype scale, like a norm weight (reference decayed it; §7.10)
    if freeze_norm:
        g.requires_grad_(False)
    return layer


class IBOTHead(nn.Module):
    """iBOT head (see the module doc). ``in_dim`` D, ``out_dim`` K, ``patch_out_dim`` K2 (ignored when
    shared), ``hidden_dim`` 2048, ``bottleneck_dim`` 256, ``nlayers`` ≥ 1."""

    def __init__(self, in_dim: int, out_dim: int = 8192, patch_out_dim: Optional[int] = None, nlayers: int = 3,
                 hidden_dim: int = 2048, bottleneck_dim: int = 256, norm_last_layer: bool = True,
                 shared_head: bool = True):
        super().__init__()
        if nlayers < 1:
            raise ValueError(f"IBOTHead: nlayers must be >= 1, got {nlayers}")
        if nlayers == 1:
            layers: list[nn.Module] = [nn.Linear(in_dim, bottleneck_dim)]
        else:
            layers = [nn.Linear(in_dim, hidden_dim), nn.GELU()]
            for _ in range(nlayers - 2):
                layers += [nn.Linear(hidden_dim, hidden_dim), nn.GELU()]
            layers.append(nn.Linear(hidden_dim, bottleneck_dim))
        self.mlp = nn.Sequential(*layers)
        for m in self.mlp.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.out_dim = int(out_dim)
        self.shared_head = bool(shared_head)
        self.patch_out_dim = self.out_dim if shared_head else int(patch_out_dim or out_dim)
        self.last_layer = _prototype_layer(bottleneck_dim, self.out_dim, norm_last_layer)
        self.last_layer2 = None if shared_head else _prototype_layer(bottleneck_dim, self.patch_out_dim,
                                                                     norm_last_layer)
        self._register_load_state_dict_pre_hook(self._rename_legacy_keys)

    @staticmethod
    def _rename_legacy_keys(state_dict, prefix, *args):
        for k in [k for k in state_dict if k.startswith(prefix)]:
            head, _, leaf = k.rpartition(".")
            if leaf in _LEGACY:
                state_dict[f"{head}.{_LEGACY[leaf]}"] = state_dict.pop(k)

    @property
    def patch_layer(self) -> nn.Module:
        return self.last_layer if self.last_layer2 is None else self.last_layer2

    def bottleneck(self, x: Tensor) -> Tensor:
        """``norm(mlp(x))``: (..., D) -> (..., bottleneck)."""
        return F.normalize(self.mlp(x), dim=-1, p=2)

    def forward(self, x: Tensor):
        """(B, D) -> (B, K); (B, T, D) -> ((B, K) [CLS] logits, (B, T−1, K2) patch logits)."""
        z = self.bottleneck(x)
        if z.ndim == 2:
            return self.last_layer(z)
        return self.last_layer(z[:, 0]), self.patch_layer(z[:, 1:])
