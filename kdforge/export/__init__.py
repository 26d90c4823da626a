"""Weight exports for downstream code: torchvision key names, Detectron2 ``.pkl``."""
from kdforge.export.detectron2 import (detectron2_resnet_key, load_detectron2_pkl, save_detectron2_pkl,
                                       to_detectron2)
from kdforge.export.torchvision import detect_layout, to_torchvision_state_dict, torchvision_backbone

__all__ = ["to_torchvision_state_dict", "torchvision_backbone", "detect_layout", "detectron2_resnet_key",
           "to_detectron2", "save_detectron2_pkl", "load_detectron2_pkl"]


def export_downstream(model, fmt: str, out):
    """Write ``model``'s backbone for downstream code and return the path.

    * ``fmt="torchvision"``: :func:`to_torchvision_state_dict` (no classifier; loads with ``strict=True``
      into :func:`torchvision_backbone`, whose standard architecture applies the final ReLU / ReLU6
      again) as ``.safetensors`` (metadata: layout), or as a plain ``torch.save`` state dict when
      ``out`` ends with ``.pth``/``.pt``;
    * ``fmt="detectron2"``: the Detectron2 model-zoo ``.pkl`` (:func:`save_detectron2_pkl`; ResNets renamed
      to ``stem``/``res2..5``, MobileNetV2 keys unchanged).
    """
    from pathlib import Path

    import torch
    out = Path(out)
    state = to_torchvision_state_dict(model)
    layout = detect_layout(state)
    out.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "torchvision":
        if out.suffix in (".pth", ".pt"):
            torch.save(state, out)
        else:
            from safetensors.torch import save_file
            save_file(state, str(out), metadata={"format": "torchvision", "layout": layout})
        return out
    if fmt == "detectron2":
        return save_detectron2_pkl(state, out, arch="resnet" if layout == "resnet" else "mobilenet_v2")
    raise ValueError(f"export: format must be 'torchvision' or 'detectron2', got {fmt!r}")


__all__ += ["export_downstream"]
