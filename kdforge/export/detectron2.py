"""Detectron2 ``.pkl`` checkpoints from torchvision-named ResNet weights (KDEP spec §5.3).

Detectron2's ResNet names its modules ``stem.conv1`` and ``res2..res5``, with each conv's norm as a
child (``conv1.norm``) and the projection shortcut as ``shortcut`` (+ ``shortcut.norm``). The renaming,
applied in this order to every key of a torchvision ResNet state dict:

1. no ``layer`` in the name -> prefix ``stem.``      (``conv1.weight`` -> ``stem.conv1.weight``)
2. ``layer{t}`` -> ``res{t+1}``                       (t = 1..4)
3. ``bn{i}`` -> ``conv{i}.norm``                      (i = 1..3; ``stem.bn1`` -> ``stem.conv1.norm``)
4. ``downsample.0`` -> ``shortcut``; ``downsample.1`` -> ``shortcut.norm``

The file is a pickle of ``{"model": {name: numpy array}, "__author__": ..., "matching_heuristics": True}``,
the model-zoo format Detectron2's ``DetectionCheckpointer`` reads. Classifier keys (``fc.*``) are
dropped (the reference kept them as an unused ``stem.fc.*``). MobileNetV2 keys pass unchanged, as in
the reference (its detectron2 MobileNetV2 backbone uses the tonylins layout).
"""
from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

from torch import Tensor


def detectron2_resnet_key(key: str) -> str:
    """Rename one torchvision ResNet key to Detectron2's (see the module docstring)."""
    k = key
    if "layer" not in k:
        k = "stem." + k
    for t in (1, 2, 3, 4):
        k = k.replace(f"layer{t}", f"res{t + 1}")
    for i in (1, 2, 3):
        k = k.replace(f"bn{i}", f"conv{i}.norm")
    k = k.replace("downsample.0", "shortcut")
    k = k.replace("downsample.1", "shortcut.norm")
    return k


def to_detectron2(state: dict[str, Tensor], arch: str = "resnet", keep_classifier: bool = False,
                  as_numpy: bool = True) -> dict[str, Any]:
    """``{detectron2 name: array}`` from a torchvision-named backbone state dict.

    ``arch`` is ``"resnet"`` (renamed) or ``"mobilenet_v2"`` (keys unchanged). ``fc.*`` /
    ``classifier.*`` are dropped unless ``keep_classifier``. Values become numpy arrays
    (``as_numpy``) or stay CPU tensors.
    """
    if arch not in ("resnet", "mobilenet_v2"):
        raise ValueError(f"detectron2 export: arch must be 'resnet' or 'mobilenet_v2', got {arch!r}")
    out: dict[str, Any] = {}
    for k, v in state.items():
        if k.startswith("module."):
            raise ValueError(f"detectron2 export: strip wrapper prefixes first (key {k!r})")
        if not keep_classifier and k.startswith(("fc.", "classifier.")):
            continue
        name = detectron2_resnet_key(k) if arch == "resnet" else k
        if name in out:
            raise ValueError(f"detectron2 export: two keys map to {name!r}")
        t = v.detach().to("cpu")
        out[name] = t.numpy().copy() if as_numpy else t.clone()
    return out


def save_detectron2_pkl(state: dict[str, Tensor], path: str | Path, arch: str = "resnet",
                        author: str = "kdforge", as_numpy: bool = True) -> Path:
    """Write ``{"model": to_detectron2(state), "__author__": author, "matching_heuristics": True}``."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    obj = {"model": to_detectron2(state, arch=arch, as_numpy=as_numpy), "__author__": author,
           "matching_heuristics": True}
    with open(p, "wb") as fh:
        pickle.dump(obj, fh)
    return p


def load_detectron2_pkl(path: str | Path) -> dict[str, Any]:
    """Read a ``.pkl`` written by :func:`save_detectron2_pkl` (trusted files only: it is a pickle)."""
    with open(path, "rb") as fh:
        obj = pickle.load(fh)
    if not isinstance(obj, dict) or "model" not in obj:
        raise ValueError(f"{str(path)!r} is not a Detectron2 model-zoo pickle (no 'model' key)")
    return obj
