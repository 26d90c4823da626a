"""A timm ViT with iBOT's learnable mask token, returning all tokens and last-block CLS attention.

Zhou et al., iBOT (ICLR 2022); SMKD spec ``shared/methods/smkd.md`` §1.1. No model code is forked: the
wrapper runs timm's own ``patch_embed``, ``_pos_embed``, ``patch_drop``, ``norm_pre``, ``blocks`` and
``norm`` and only inserts one step — after the patch embedding (B, h, w, D) and *before* the position
embedding and the [CLS] token, every masked grid cell is replaced by the learnable ``mask_token``
(1, D), initialised to zeros::

    e = patch_embed(x);  e[b, i, j] ← mask_token  where mask[b, i, j];  tokens = norm(blocks(pos_embed([cls; e])))

``forward(x, mask=None, return_attention=False) -> (tokens (B, P + N, D), attn)`` where P is the
number of prefix tokens (1: [CLS]) and ``attn`` is the last block's softmax attention of the [CLS]
query over the N patch tokens, (B, heads, N), or None. Inputs of any size divisible by the patch
size work (the position embedding is resampled bicubically by timm's ``dynamic_img_size`` path), so
224 px global and 96 px local crops share one model.

``masked_vit_forward(vit, x, mask_token, mask, return_attention)`` is the same forward as a function,
for methods that keep the plain timm model as their ``student`` (so its state-dict keys stay timm's).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdforge.models.taps import cls_attention_from_input


def enable_dynamic_img_size(vit: nn.Module) -> None:
    """Switch a timm ``VisionTransformer`` to its ``dynamic_img_size`` path in place (patch embedding
    in NHWC, position embedding resampled to the input grid). Weights and keys are unchanged."""
    if getattr(vit, "dynamic_img_size", False):
        return
    from timm.layers import Format
    pe = vit.patch_embed
    pe.strict_img_size = False
    pe.flatten = False
    pe.output_fmt = Format.NHWC
    vit.dynamic_img_size = True


def _check_vit(vit: nn.Module) -> None:
    for attr in ("patch_embed", "_pos_embed", "blocks", "norm"):
        if not hasattr(vit, attr):
            raise TypeError(f"masked ViT forward needs a timm VisionTransformer; {type(vit).__name__} has no {attr!r}")


def masked_embed(vit: nn.Module, x: Tensor, mask_token: Optional[Tensor] = None,
                 mask: Optional[Tensor] = None) -> Tensor:
    """timm patch embedding with masked cells replaced by ``mask_token`` (1, D), then timm's position
    embedding (+ [CLS]), patch dropout and pre-norm: (B, C, H, W) -> (B, P + N, D).
    ``mask`` (B, h, w) or (B, N) bool, True = masked."""
    e = vit.patch_embed(x)                        # (B, h, w, D) (dynamic) or (B, N, D)
    if mask is not None:
        if mask_token is None:
            raise ValueError("masked_embed: a mask was given but no mask token")
        m = mask.to(device=e.device, dtype=torch.bool)
        if m.numel() != e[..., 0].numel():
            raise ValueError(f"masked ViT: mask of shape {tuple(mask.shape)} does not match the patch grid "
                             f"{tuple(e.shape[:-1])}")
        m = m.reshape(e.shape[:-1]).unsqueeze(-1)
        e = torch.where(m, mask_token.to(e.dtype).view(*([1] * (e.ndim - 1)), -1), e)
    x = vit._pos_embed(e)
    x = vit.patch_drop(x)
    return vit.norm_pre(x)


def masked_vit_forward(vit: nn.Module, x: Tensor, mask_token: Optional[Tensor] = None, mask: Optional[Tensor] = None,
                       return_attention: bool = False) -> tuple[Tensor, Optional[Tensor]]:
    """The wrapper's forward as a function of a timm ViT and a mask token (see the module doc):
    -> (tokens (B, P + N, D) after the final norm, last-block [CLS] attention (B, heads, N) or None)."""
    x = masked_embed(vit, x, mask_token, mask)
    blocks = vit.blocks
    attn = None
    if return_attention:
        for blk in blocks[:-1]:
            x = blk(x)
        last = blocks[-1]
        attn = cls_attention_from_input(last.attn, last.norm1(x), int(getattr(vit, "num_prefix_tokens", 1)))
        x = last(x)
    else:
        x = blocks(x)
    return vit.norm(x), attn


class MaskedViT(nn.Module):
    """Wrap a timm ViT (``vit``, kept as a submodule with timm keys) with a learnable mask token.
    See the module docstring for the forward contract and shapes."""

    def __init__(self, vit: nn.Module, dynamic_size: bool = True):
        super().__init__()
        _check_vit(vit)
        if dynamic_size:
            enable_dynamic_img_size(vit)
        self.vit = vit
        self.embed_dim = int(vit.embed_dim)
        self.num_prefix_tokens = int(getattr(vit, "num_prefix_tokens", 1))
        self.patch_size = int(vit.patch_embed.patch_size[0])
        self.num_heads = int(vit.blocks[-1].attn.num_heads)
        self.mask_token = nn.Parameter(torch.zeros(1, self.embed_dim))

    def embed(self, x: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        """Patch embedding with masked cells replaced, then timm's position embedding: (B, P + N, D)."""
        return masked_embed(self.vit, x, self.mask_token, mask)

    def forward(self, x: Tensor, mask: Optional[Tensor] = None,
                return_attention: bool = False) -> tuple[Tensor, Optional[Tensor]]:
        return masked_vit_forward(self.vit, x, self.mask_token, mask, return_attention)

    def patch_tokens(self, tokens: Tensor) -> Tensor:
        """(B, P + N, D) -> (B, N, D) patch tokens."""
        return tokens[:, self.num_prefix_tokens:]


def cls_weighted_patch_feature(tokens: Tensor, attn: Tensor, num_prefix_tokens: int = 1) -> Tensor:
    """SMKD's few-shot feature (spec §3.1): ``concat(norm(f_cls), norm(Σ_p w_p · token_p))`` with
    ``w = mean_heads(attn)`` renormalised to sum 1 over the N patches.

    ``tokens`` (B, P + N, D) after the final norm; ``attn`` (B, heads, N) last-block [CLS] attention.
    Returns (B, 2·D).
    """
    w = attn.float().mean(1)
    w = w / w.sum(-1, keepdim=True)
    patches = tokens[:, num_prefix_tokens:].float()
    pooled = torch.einsum("bn,bnd->bd", w, patches)
    return torch.cat([F.normalize(tokens[:, 0].float(), dim=-1), F.normalize(pooled, dim=-1)], dim=-1)
