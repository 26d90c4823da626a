"""Pre-activation pooled features (KDEP, He et al., CVPR 2022, §3.1) through forward hooks.

KDEP distils the global-average-pooled output of the network's last block *before* its final
activation: ``f = GAP(bn(conv(...)) + shortcut)`` for the last ResNet block (no final ReLU) and
``f = GAP(bn(conv_1x1(...)))`` for MobileNetV2's last 1×1 conv (no final ReLU6). Such features can be
negative. The models are the ordinary timm / torchvision ones — no forked code: a forward pre-hook on
every activation module inside the last block pools each activation's input, and the last call of
the forward pass (the block's final activation) wins. Pooling happens inside the hook, before the
in-place activation overwrites its input; the pooled tensor keeps its autograd graph.

Supported (see :func:`preact_block`): timm ``resnet*`` / torchvision ``resnet*`` (last block of
``layer4``), torchvision ``mobilenet_v2`` (``features[-1]``), timm EfficientNet-family models such as
``mobilenetv2_100`` (``bn2``, a BatchNormAct2d).

Usage::

    tap = PreActTap(model)          # hooks stay attached until tap.remove()
    f = tap(x)                      # (B, D) pooled pre-activation feature
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

#: activation module types whose input is the pre-activation map.
ACTIVATIONS: tuple[type, ...] = (nn.ReLU, nn.ReLU6, nn.SiLU, nn.GELU, nn.Hardswish, nn.LeakyReLU, nn.ELU)


def preact_block(model: nn.Module) -> tuple[nn.Module, str]:
    """The module whose last activation call produces the final feature map, and its name.

    Raises ``ValueError`` for architectures it does not know.
    """
    layer4 = getattr(model, "layer4", None)
    if isinstance(layer4, nn.Sequential) and len(layer4) > 0:
        return layer4[-1], f"layer4.{len(layer4) - 1}"
    bn2 = getattr(model, "bn2", None)   # timm EfficientNet family: conv_head -> bn2 (norm + act)
    if bn2 is not None and hasattr(model, "conv_head") and isinstance(getattr(bn2, "act", None), ACTIVATIONS):
        return bn2, "bn2"
    features = getattr(model, "features", None)   # torchvision MobileNetV2/V3, EfficientNet
    if isinstance(features, nn.Sequential) and len(features) > 0:
        return features[-1], f"features.{len(features) - 1}"
    raise ValueError(f"pre-activation taps: unsupported model {type(model).__name__}; supported: timm/torchvision "
                     "ResNets (layer4), torchvision mobilenet_v2 (features), timm mobilenetv2/efficientnet (bn2)")


class PreActTap:
    """Forward hooks that record the pooled pre-activation output of ``model``'s last block.

    After any forward pass of ``model``, :attr:`pooled` holds ``GAP(pre-activation map)`` (B, D),
    with gradient. ``tap(x)`` runs the model's feature path (``forward_features`` for timm models,
    the full forward for torchvision ones) and returns it.
    """

    def __init__(self, model: nn.Module, pool: str = "avg"):
        if pool not in ("avg", "max"):
            raise ValueError(f"PreActTap: pool must be 'avg' or 'max', got {pool!r}")
        self.model = model
        self.pool = pool
        self.block, self.block_name = preact_block(model)
        acts = [m for m in self.block.modules() if isinstance(m, ACTIVATIONS)]
        if not acts:
            raise ValueError(f"pre-activation taps: {type(model).__name__}.{self.block_name} holds no "
                             f"activation module (types {', '.join(t.__name__ for t in ACTIVATIONS)})")
        self.pooled: Optional[Tensor] = None
        self._handles = [self.block.register_forward_pre_hook(self._reset)]
        self._handles += [a.register_forward_pre_hook(self._record) for a in acts]

    def _reset(self, module, args):
        self.pooled = None

    def _record(self, module, args):
        x = args[0]
        if x.ndim == 4:
            self.pooled = x.mean(dim=(2, 3)) if self.pool == "avg" else x.amax(dim=(2, 3))
        elif x.ndim == 3:   # channels-last token maps (B, N, C)
            self.pooled = x.mean(dim=1) if self.pool == "avg" else x.amax(dim=1)
        else:
            self.pooled = x

    def __call__(self, x: Tensor) -> Tensor:
        """(B, C, H, W) images -> (B, D) pooled pre-activation features."""
        fwd = getattr(self.model, "forward_features", None)
        if callable(fwd):
            fwd(x)
        else:
            self.model(x)
        if self.pooled is None:
            raise RuntimeError(f"pre-activation tap on {self.block_name} did not fire during the forward pass")
        out, self.pooled = self.pooled, None
        return out

    def remove(self) -> None:
        """Detach the hooks."""
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def __enter__(self) -> "PreActTap":
        return self

    def __exit__(self, *exc) -> bool:
        self.remove()
        return False


def preact_pooled_features(model: nn.Module, x: Tensor, pool: str = "avg") -> Tensor:
    """One-shot :class:`PreActTap`: (B, C, H, W) -> (B, D) pooled pre-activation feature."""
    with PreActTap(model, pool=pool) as tap:
        return tap(x)


def preact_dim(model: nn.Module) -> int:
    """Width D of the pooled pre-activation feature (= the model's pooled feature width)."""
    n = getattr(model, "num_features", None)
    if n is not None:
        return int(n)
    block, _ = preact_block(model)
    convs = [m for m in block.modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise ValueError(f"cannot tell the feature width of {type(model).__name__}")
    return int(convs[-1].out_channels)

