"""Backbone weights with torchvision key names (KDEP spec §5.4.1).

KDEP students are distilled *without* their final ReLU / ReLU6 (pre-activation features, see
:mod:`kdforge.models.preact`); the weights are those of the standard architecture, so the exported
state dict loads with ``strict=True`` into ``torchvision.models.resnet18/50(...)`` or
``mobilenet_v2(...)`` whose classifier is removed (``model.fc = nn.Identity()`` /
``model.classifier = nn.Identity()``), and the standard model applies the final activation again.

Key maps:

* timm ``resnet*`` and torchvision ``resnet*`` share key names: only the classifier (``fc.*``) goes;
* torchvision ``mobilenet_v2``: the classifier (``classifier.*``) goes;
* timm ``mobilenetv2_*`` -> torchvision ``mobilenet_v2`` (``conv_stem``/``bn1`` -> ``features.0.{0,1}``,
  ``blocks.i.j.*`` -> ``features.<n>.conv.*`` in block order, ``conv_head``/``bn2`` -> ``features.<last>.{0,1}``).
"""
from __future__ import annotations

import re
from typing import Optional

from torch import Tensor, nn

_CLASSIFIERS = ("fc.", "classifier.", "head.", "heads.")

# timm InvertedResidual / DepthwiseSeparable sub-module -> torchvision InvertedResidual sub-module
_TIMM_MNV2_FIRST = {"conv_dw": "conv.0.0", "bn1": "conv.0.1", "conv_pw": "conv.1", "bn2": "conv.2"}
_TIMM_MNV2_IR = {"conv_pw": "conv.0.0", "bn1": "conv.0.1", "conv_dw": "conv.1.0", "bn2": "conv.1.1",
                 "conv_pwl": "conv.2", "bn3": "conv.3"}
_BLOCK = re.compile(r"^blocks\.(\d+)\.(\d+)\.([a-z_0-9]+)\.(.+)$")


def detect_layout(state: dict[str, Tensor]) -> str:
    """``"resnet"``, ``"tv_mobilenet_v2"`` or ``"timm_mobilenetv2"`` from the key names."""
    keys = set(state)
    if "conv1.weight" in keys and any(k.startswith("layer4.") for k in keys):
        return "resnet"
    if any(k.startswith("features.") for k in keys) and any(".conv." in k for k in keys):
        return "tv_mobilenet_v2"
    if "conv_stem.weight" in keys and "conv_head.weight" in keys:
        return "timm_mobilenetv2"
    raise ValueError("torchvision export: unknown key layout (expected a ResNet or a MobileNetV2 state dict; "
                     f"first keys: {', '.join(list(state)[:4])})")


def _timm_mnv2_to_torchvision(state: dict[str, Tensor]) -> dict[str, Tensor]:
    blocks = sorted({(int(m.group(1)), int(m.group(2))) for k in state if (m := _BLOCK.match(k))})
    index = {b: i + 1 for i, b in enumerate(blocks)}
    last = len(blocks) + 1
    out = {}
    for k, v in state.items():
        if k.startswith(_CLASSIFIERS):
            continue
        m = _BLOCK.match(k)
        if m:
            i, j, sub, rest = int(m.group(1)), int(m.group(2)), m.group(3), m.group(4)
            table = _TIMM_MNV2_FIRST if (i, j) == blocks[0] else _TIMM_MNV2_IR
            if sub not in table:
                raise ValueError(f"timm mobilenetv2 export: unexpected key {k!r} (SE / other blocks are not "
                                 "part of torchvision's mobilenet_v2)")
            out[f"features.{index[(i, j)]}.{table[sub]}.{rest}"] = v
            continue
        head, _, rest = k.partition(".")
        table = {"conv_stem": "features.0.0", "bn1": "features.0.1", "conv_head": f"features.{last}.0",
                 "bn2": f"features.{last}.1"}
        if head not in table:
            raise ValueError(f"timm mobilenetv2 export: unexpected key {k!r}")
        out[f"{table[head]}.{rest}"] = v
    return out


def to_torchvision_state_dict(model_or_state: nn.Module | dict[str, Tensor],
                              layout: Optional[str] = None) -> dict[str, Tensor]:
    """Backbone-only state dict (no classifier) with torchvision key names.

    Accepts a timm / torchvision ResNet or MobileNetV2 module, or its state dict. ``layout`` overrides
    :func:`detect_layout`. Tensors are detached CPU clones, contiguous (safetensors-ready).
    """
    state = model_or_state.state_dict() if isinstance(model_or_state, nn.Module) else dict(model_or_state)
    layout = layout or detect_layout(state)
    if layout == "timm_mobilenetv2":
        state = _timm_mnv2_to_torchvision(state)
    elif layout not in ("resnet", "tv_mobilenet_v2"):
        raise ValueError(f"torchvision export: unknown layout {layout!r}")
    return {k: v.detach().to("cpu").clone().contiguous() for k, v in state.items() if not k.startswith(_CLASSIFIERS)}


def torchvision_backbone(arch: str) -> nn.Module:
    """A randomly initialised torchvision ``arch`` with its classifier replaced by ``nn.Identity``
    (the module an exported state dict loads into with ``strict=True``)."""
    import torchvision
    model = torchvision.models.get_model(arch, weights=None)
    for attr in ("fc", "classifier"):
        if hasattr(model, attr):
            setattr(model, attr, nn.Identity())
            break
    return model
