"""Model factory over timm and torchvision names.

``create_model(name, num_classes, in_chans=3, img_size=None, **kwargs)``:

* timm names (``vit_small_patch16_224``, ``deit_tiny_distilled_patch16_224``, ``resnet18``,
  ``regnety_160``, ``mobilenetv3_small_100``, ``efficientnet_b0``...) -> ``timm.create_model``;
* ``torchvision/<name>`` or a torchvision-only name (``mobilenet_v2``) -> ``torchvision.models``;
* ``kdf_*`` CPU-sized variants for tests and the demo (see :data:`TINY_MODELS`): real timm
  architectures with small widths/depths, so their weights use timm keys.

``num_classes=0`` builds a backbone without classifier (pooled features out). Weights are never
downloaded: ``weights=/path.safetensors|.pth`` loads a local file.
"""
from __future__ import annotations

from typing import Any, Optional

from torch import nn

# name -> (timm architecture, constructor overrides)
TINY_MODELS: dict[str, tuple[str, dict[str, Any]]] = {
    # 4-block ViT, patch 4, for 16-32 px images (~0.45 M parameters at width 96)
    "kdf_vit_micro": ("vit_tiny_patch16_224", dict(img_size=32, patch_size=4, depth=4, embed_dim=96, num_heads=3)),
    # the same with a distillation token (DeiT), for VkD
    "kdf_deit_micro_distilled": ("deit_tiny_distilled_patch16_224",
                                 dict(img_size=32, patch_size=4, depth=4, embed_dim=96, num_heads=3)),
    # narrow ResNet-18 (16-32-64-128 channels, ~0.7 M parameters)
    "kdf_resnet_narrow": ("resnet18", dict(channels=(16, 32, 64, 128))),
    # wider ResNet-18 (32-64-128-256), the demo's teacher CNN
    "kdf_resnet_wide": ("resnet18", dict(channels=(32, 64, 128, 256))),
}

_TORCHVISION_PREFIX = "torchvision/"


def model_spec(name: str, kwargs: Optional[dict] = None) -> tuple[str, str, dict]:
    """-> (library, architecture, constructor kwargs) for a kdforge model name."""
    kwargs = dict(kwargs or {})
    if name in TINY_MODELS:
        arch, kw = TINY_MODELS[name]
        return "timm", arch, {**kw, **kwargs}
    if name.startswith(_TORCHVISION_PREFIX):
        return "torchvision", name[len(_TORCHVISION_PREFIX):], kwargs
    import timm
    if timm.is_model(name):
        return "timm", name, kwargs
    import torchvision
    if name in torchvision.models.list_models():
        return "torchvision", name, kwargs
    close = timm.list_models(f"*{name.split('_')[0]}*")[:8]
    raise ValueError(f"model.name: unknown model {name!r}; use a timm name, 'torchvision/<name>' or one of "
                     f"{sorted(TINY_MODELS)}" + (f" (similar timm names: {', '.join(close)})" if close else ""))


def _torchvision_classifier(model: nn.Module) -> tuple[str, nn.Module]:
    for attr in ("fc", "classifier", "heads", "head"):
        if hasattr(model, attr):
            return attr, getattr(model, attr)
    raise ValueError(f"cannot find the classifier of torchvision model {type(model).__name__}")


def _last_linear(mod: nn.Module) -> nn.Linear:
    if isinstance(mod, nn.Linear):
        return mod
    linears = [m for m in mod.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError("classifier has no Linear layer")
    return linears[-1]


def create_model(name: str, num_classes: int = 1000, in_chans: int = 3, img_size: Optional[int] = None,
                 weights: Optional[str] = None, strict: bool = True, **kwargs) -> nn.Module:
    """Build a model by name (random init unless ``weights`` names a local file).

    The returned module has ``num_features`` (pooled feature width), ``kdforge_name`` and
    ``kdforge_spec`` (library, architecture, kwargs) attributes.
    """
    lib, arch, kw = model_spec(name, kwargs)
    if lib == "timm":
        import timm
        if img_size is not None and "img_size" in kw:  # a tiny ViT: the data size wins
            kw["img_size"] = img_size
        if img_size is not None and "img_size" not in kw:
            kw_try = {**kw, "img_size": img_size}
            try:
                model = timm.create_model(arch, pretrained=False, num_classes=num_classes, in_chans=in_chans, **kw_try)
                kw = kw_try
            except TypeError:  # CNNs do not take img_size
                model = timm.create_model(arch, pretrained=False, num_classes=num_classes, in_chans=in_chans, **kw)
        else:
            model = timm.create_model(arch, pretrained=False, num_classes=num_classes, in_chans=in_chans, **kw)
    else:
        import torchvision
        if in_chans != 3:
            raise ValueError(f"torchvision model {arch!r} only takes 3 input channels (data.in_chans={in_chans})")
        model = torchvision.models.get_model(arch, weights=None, **kw)
        attr, head = _torchvision_classifier(model)
        lin = _last_linear(head)
        model.num_features = lin.in_features
        if num_classes == 0:
            setattr(model, attr, nn.Identity())
        elif num_classes != lin.out_features:
            if isinstance(head, nn.Linear):
                setattr(model, attr, nn.Linear(lin.in_features, num_classes))
            else:  # Sequential(..., Linear): replace the last Linear
                for n, m in reversed(list(head.named_modules())):
                    if m is lin:
                        parent = head
                        *path, leaf = n.split(".")
                        for p in path:
                            parent = getattr(parent, p)
                        setattr(parent, leaf, nn.Linear(lin.in_features, num_classes))
                        break
    model.kdforge_name = name
    model.kdforge_spec = (lib, arch, kw)
    if weights:
        from kdforge.models.checkpoint import load_weights_file
        load_weights_file(model, weights, strict=strict)
    return model


def feature_dim(model: nn.Module) -> int:
    """Width of the pooled feature (the classifier's input)."""
    n = getattr(model, "num_features", None)
    if n is None:
        raise ValueError(f"cannot tell the feature width of {type(model).__name__}")
    return int(n)


def classifier_prefixes(model: nn.Module) -> tuple[str, ...]:
    """State-dict key prefixes of the classifier head(s)."""
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)
    if cfg and cfg.get("classifier"):
        c = cfg["classifier"]
        return tuple(c) if isinstance(c, (list, tuple)) else (c,)
    for attr in ("fc", "classifier", "heads", "head"):
        if hasattr(model, attr):
            return (attr,)
    return ()
