"""Feature taps without forking model code (forward hooks / timm ``forward_intermediates``).

* ``pooled_features(model, x)``  -> (B, D): the classifier's input (timm ``pre_logits``).
* ``token_features(model, x)``   -> (B, N, C): all tokens of a ViT after the final norm
  (prefix tokens first), or the final feature map flattened to (B, H·W, C) for CNNs.
* ``block_outputs(model, x, indices)`` -> list of (B, N, C) block outputs for ViTs (prefix tokens
  included), (B, C, H, W) stage outputs for CNNs.
* ``cls_attention(model, x, indices)`` -> list of (B, heads, N_patches): softmax attention of the
  CLS query over the patch tokens, recomputed from each block's ``attn`` input (timm ``Attention``).

:class:`FeatureTaps` collects several of these during one ordinary forward pass::

    with FeatureTaps(model, blocks=[3, 7], attention=[11]) as taps:
        logits = model(x)
    taps.blocks[3], taps.attention[11]
"""
from __future__ import annotations

from typing import Iterable

from torch import Tensor, nn


def _vit_blocks(model: nn.Module):
    blocks = getattr(model, "blocks", None)
    if blocks is None or not isinstance(blocks, (nn.Sequential, nn.ModuleList)):
        return None
    return blocks


def _norm_index(i: int, n: int) -> int:
    j = i + n if i < 0 else i
    if not 0 <= j < n:
        raise IndexError(f"block index {i} out of range for {n} blocks")
    return j


def cls_attention_from_input(attn: nn.Module, x: Tensor, num_prefix: int) -> Tensor:
    """Attention probabilities of the CLS query (token 0) over the patch tokens.

    ``x`` (B, N, C) is the input of a timm ``Attention`` module (after the block's norm1).
    Returns (B, heads, N - num_prefix).
    """
    B, N, C = x.shape
    H = attn.num_heads
    qkv = attn.qkv(x).reshape(B, N, 3, H, C // H).permute(2, 0, 3, 1, 4)
    q, k = qkv[0], qkv[1]
    q, k = attn.q_norm(q), attn.k_norm(k)
    scores = (q[:, :, :1] * attn.scale) @ k.transpose(-2, -1)  # (B, H, 1, N)
    probs = scores.float().softmax(-1)[:, :, 0]
    return probs[..., num_prefix:]


class FeatureTaps:
    """Context manager that records block outputs / CLS attention during a forward pass."""

    def __init__(self, model: nn.Module, blocks: Iterable[int] = (), attention: Iterable[int] = (),
                 detach: bool = False):
        self.model = model
        self.block_idx = list(blocks)
        self.attn_idx = list(attention)
        self.detach = detach
        self.blocks: dict[int, Tensor] = {}
        self.attention: dict[int, Tensor] = {}
        self._handles = []

    def __enter__(self):
        vit_blocks = _vit_blocks(self.model)
        if vit_blocks is None and (self.block_idx or self.attn_idx):
            raise ValueError(f"{type(self.model).__name__} has no transformer 'blocks'; use block_outputs() "
                             "for CNN stages")
        n = len(vit_blocks) if vit_blocks is not None else 0
        num_prefix = getattr(self.model, "num_prefix_tokens", 1)
        for i in self.block_idx:
            j = _norm_index(i, n)

            def hook(mod, inp, out, i=i):
                self.blocks[i] = out.detach() if self.detach else out
            self._handles.append(vit_blocks[j].register_forward_hook(hook))
        for i in self.attn_idx:
            j = _norm_index(i, n)

            def pre(mod, args, kwargs, i=i):
                x = args[0] if args else kwargs["x"]
                a = cls_attention_from_input(mod, x, num_prefix)
                self.attention[i] = a.detach() if self.detach else a
            self._handles.append(vit_blocks[j].attn.register_forward_pre_hook(pre, with_kwargs=True))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()
        return False


def pooled_features(model: nn.Module, x: Tensor) -> Tensor:
    """(B, D) pooled feature: timm ``forward_head(pre_logits=True)``; torchvision: classifier input."""
    if hasattr(model, "forward_head") and hasattr(model, "forward_features"):
        return model.forward_head(model.forward_features(x), pre_logits=True)
    from kdforge.models.factory import _torchvision_classifier
    attr, head = _torchvision_classifier(model)
    if isinstance(head, nn.Identity):
        return model(x)
    box = {}
    first = head[0] if isinstance(head, nn.Sequential) else head
    h = first.register_forward_pre_hook(lambda m, a: box.__setitem__("f", a[0]))
    try:
        model(x)
    finally:
        h.remove()
    return box["f"]


def token_features(model: nn.Module, x: Tensor) -> Tensor:
    feats = model.forward_features(x) if hasattr(model, "forward_features") else None
    if feats is None:
        raise ValueError(f"{type(model).__name__} has no forward_features")
    if feats.ndim == 4:  # CNN map -> tokens
        return feats.flatten(2).transpose(1, 2)
    return feats


def block_outputs(model: nn.Module, x: Tensor, indices: Iterable[int]) -> list[Tensor]:
    indices = list(indices)
    if _vit_blocks(model) is not None:
        with FeatureTaps(model, blocks=indices) as taps:
            model.forward_features(x)
        return [taps.blocks[i] for i in indices]
    if hasattr(model, "forward_intermediates"):
        return model.forward_intermediates(x, indices=indices, intermediates_only=True)
    raise ValueError(f"{type(model).__name__}: no transformer blocks and no forward_intermediates")


def cls_attention(model: nn.Module, x: Tensor, indices: Iterable[int]) -> list[Tensor]:
    indices = list(indices)
    with FeatureTaps(model, attention=indices) as taps:
        model.forward_features(x)
    return [taps.attention[i] for i in indices]
