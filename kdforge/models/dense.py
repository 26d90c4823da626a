"""torchvision detectors and segmenters on any kdforge backbone.

A kdforge backbone (``create_model(name, num_classes=0)``: timm, torchvision or ``kdf_*``) becomes a
multi-scale feature extractor (:class:`MultiScaleFeatures`), then

* :func:`build_detector` — ``torchvision.models.detection`` Faster R-CNN / RetinaNet / FCOS on a
  torchvision ``FeaturePyramidNetwork`` (:class:`BackboneFPN`);
* :func:`build_segmenter` — ``torchvision.models.segmentation`` DeepLabV3 / FCN heads on the last
  stage (+ the optional FCN auxiliary head on the stage before).

The backbone stays a sub-module under its own keys (``…body.model.<timm/torchvision key>``), so a
KDEP/VkD-trained backbone loads strictly (:func:`load_backbone_weights`) and
:func:`dense_backbone_state_dict` exports it back with its original keys.

Output stride: the detectors use strides 4-32 (Faster R-CNN, + max-pool P6) or 8-32 (RetinaNet, FCOS,
+ P6/P7 convs). Dilated segmentation backbones come from the model's own options, e.g.
``model.kwargs={output_stride: 8}`` (timm) or ``{replace_stride_with_dilation: [false, true, true]}``
(torchvision ResNets).
"""
from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

DETECTORS = ("faster_rcnn", "retinanet", "fcos")
SEGMENTERS = ("deeplabv3", "fcn")

#: default anchor size = multiplier × level stride (torchvision's COCO settings: Faster R-CNN 32-512 on
#: strides 4-64, RetinaNet 32-512 on 8-128, FCOS 8-128 on 8-128)
ANCHOR_MULT = {"faster_rcnn": 8.0, "retinanet": 4.0, "fcos": 1.0}


class MultiScaleFeatures(nn.Module):
    """Stage outputs of a kdforge backbone at the requested strides: ``x -> [f_s for s in strides]``.

    timm models use ``forward_intermediates`` (their ``feature_info`` names the strides);
    torchvision ResNets run ``conv1 … layer4``; other torchvision models with a ``features``
    Sequential (MobileNet, EfficientNet) return the last block output at each stride.
    ``channels`` lists the widths (measured with one dummy forward at construction).
    """

    def __init__(self, model: nn.Module, strides: Sequence[int] = (4, 8, 16, 32), in_chans: int = 3):
        super().__init__()
        self.model = model
        self.strides = tuple(int(s) for s in strides)
        self._mode = self._detect_mode(model)
        if self._mode == "timm":
            red = [int(f["reduction"]) for f in model.feature_info]
            # the last stage at each stride (several timm stages may share one)
            last = {r: i for i, r in enumerate(red)}
            missing = [s for s in self.strides if s not in last]
            if missing:
                raise ValueError(f"backbone {type(model).__name__} has no stage at stride(s) {missing}; "
                                 f"available: {sorted(set(red))}")
            self._indices = [last[s] for s in self.strides]
        was = model.training
        model.eval()
        with torch.no_grad():
            feats = self._forward_all(torch.zeros(1, in_chans, 64, 64))
        model.train(was)
        got = {s: f for s, f in feats.items()}
        if self._mode != "timm":
            missing = [s for s in self.strides if s not in got]
            if missing:
                raise ValueError(f"backbone {type(model).__name__} has no stage at stride(s) {missing}; "
                                 f"available: {sorted(got)}")
        self.channels = [int(got[s].shape[1]) for s in self.strides]

    @staticmethod
    def _detect_mode(model: nn.Module) -> str:
        if hasattr(model, "forward_intermediates") and hasattr(model, "feature_info"):
            return "timm"
        if all(hasattr(model, a) for a in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer4")):
            return "tv_resnet"
        if isinstance(getattr(model, "features", None), nn.Sequential):
            return "tv_features"
        raise ValueError(f"cannot take multi-scale features from {type(model).__name__}: use a timm model, a "
                         "torchvision ResNet or a torchvision model with a `features` Sequential")

    def _forward_all(self, x: Tensor) -> dict[int, Tensor]:
        """-> {stride: last feature map at that stride}."""
        h = x.shape[-2]
        if self._mode == "timm":
            outs = self.model.forward_intermediates(x, indices=self._indices, intermediates_only=True)
            return {s: o for s, o in zip(self.strides, outs)}
        out: dict[int, Tensor] = {}
        if self._mode == "tv_resnet":
            m = self.model
            y = m.maxpool(m.relu(m.bn1(m.conv1(x))))
            for name in ("layer1", "layer2", "layer3", "layer4"):
                y = getattr(m, name)(y)
                out[max(1, round(h / y.shape[-2]))] = y
            return out
        y = x
        for block in self.model.features:
            y = block(y)
            out[max(1, round(h / y.shape[-2]))] = y
        return out

    def forward(self, x: Tensor) -> list[Tensor]:
        if self._mode == "timm":
            return self.model.forward_intermediates(x, indices=self._indices, intermediates_only=True)
        got = self._forward_all(x)
        # strides are measured on a 64-px probe; on other sizes map by rank order of resolution
        keys = sorted(got)
        by_stride = {s: got[s] for s in keys}
        out = []
        for s in self.strides:
            if s in by_stride:
                out.append(by_stride[s])
            else:  # rounding on odd sizes: the closest measured stride
                out.append(by_stride[min(keys, key=lambda k: abs(k - s))])
        return out


class BackboneFPN(nn.Module):
    """:class:`MultiScaleFeatures` + torchvision ``FeaturePyramidNetwork`` -> ``OrderedDict`` of
    ``out_channels``-wide maps (names "0", "1", … then "pool" or "p6", "p7"), as torchvision's
    detectors expect (attribute ``out_channels``)."""

    def __init__(self, model: nn.Module, strides: Sequence[int], out_channels: int, extra: str = "pool",
                 in_chans: int = 3):
        super().__init__()
        from torchvision.ops.feature_pyramid_network import (FeaturePyramidNetwork, LastLevelMaxPool,
                                                             LastLevelP6P7)
        self.body = MultiScaleFeatures(model, strides, in_chans)
        if extra == "pool":
            blocks = LastLevelMaxPool()
        elif extra == "p6p7":
            blocks = LastLevelP6P7(out_channels, out_channels)
        elif extra == "none":
            blocks = None
        else:
            raise ValueError(f"fpn extra levels: expected pool | p6p7 | none, got {extra!r}")
        self.fpn = FeaturePyramidNetwork(self.body.channels, out_channels, extra_blocks=blocks)
        self.out_channels = int(out_channels)
        self.n_extra = {"pool": 1, "p6p7": 2, "none": 0}[extra]

    def forward(self, x: Tensor) -> "OrderedDict[str, Tensor]":
        feats = self.body(x)
        return self.fpn(OrderedDict((str(i), f) for i, f in enumerate(feats)))


def build_detector(kind: str, backbone: nn.Module, num_classes: int, *, fpn_channels: int = 256,
                   strides: Optional[Sequence[int]] = None, min_size: int = 800, max_size: int = 1333,
                   image_mean: Sequence[float] = (0.485, 0.456, 0.406),
                   image_std: Sequence[float] = (0.229, 0.224, 0.225), anchor_mult: Optional[float] = None,
                   in_chans: int = 3, representation_size: int = 1024, box_batch_size_per_image: int = 512,
                   rpn_batch_size_per_image: int = 256, detections_per_img: int = 100,
                   score_thresh: float = 0.05) -> nn.Module:
    """A torchvision detector on ``backbone`` (a kdforge model without classifier).

    Args:
        kind: ``faster_rcnn`` | ``retinanet`` | ``fcos``.
        num_classes: object classes **including background** (labels 1..num_classes-1).
        fpn_channels: FPN width (the distilled feature width in ``vkd_dense``).
        strides: backbone stages fed to the FPN (default 4-32 for Faster R-CNN, 8-32 otherwise).
        min_size, max_size: the detector's internal resize (shorter side, longer-side cap).
        image_mean, image_std: normalisation applied inside the detector (inputs are in [0, 1]).
        anchor_mult: anchor size = anchor_mult × level stride (default per kind, :data:`ANCHOR_MULT`).
        representation_size, box_batch_size_per_image: Faster R-CNN box head width / RoIs per image.
    """
    from torchvision.models.detection import FCOS, FasterRCNN, RetinaNet
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    if kind not in DETECTORS:
        raise ValueError(f"detector: expected one of {', '.join(DETECTORS)}, got {kind!r}")
    if kind != "faster_rcnn" and fpn_channels % 32:
        raise ValueError(f"fpn_channels: {kind} heads use GroupNorm(32, C); expected a multiple of 32, "
                         f"got {fpn_channels}")
    if strides is None:
        strides = (4, 8, 16, 32) if kind == "faster_rcnn" else (8, 16, 32)
    strides = tuple(int(s) for s in strides)
    extra = "pool" if kind == "faster_rcnn" else "p6p7"
    body = BackboneFPN(backbone, strides, fpn_channels, extra, in_chans)
    level_strides = list(strides) + [strides[-1] * 2 ** (i + 1) for i in range(body.n_extra)]
    mult = ANCHOR_MULT[kind] if anchor_mult is None else float(anchor_mult)
    base = [mult * s for s in level_strides]
    common = dict(min_size=min_size, max_size=max_size, image_mean=list(image_mean), image_std=list(image_std))
    if kind == "faster_rcnn":
        from torchvision.models.detection.faster_rcnn import TwoMLPHead
        from torchvision.ops import MultiScaleRoIAlign
        anchors = AnchorGenerator(tuple((b,) for b in base), ((0.5, 1.0, 2.0),) * len(base))
        names = [str(i) for i in range(len(strides))]
        roi = MultiScaleRoIAlign(featmap_names=names, output_size=7, sampling_ratio=2)
        head = TwoMLPHead(fpn_channels * 7 * 7, representation_size)
        from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
        model = FasterRCNN(body, None, rpn_anchor_generator=anchors, box_roi_pool=roi, box_head=head,
                           box_predictor=FastRCNNPredictor(representation_size, num_classes),
                           box_batch_size_per_image=box_batch_size_per_image,
                           rpn_batch_size_per_image=rpn_batch_size_per_image,
                           box_detections_per_img=detections_per_img, box_score_thresh=score_thresh, **common)
    elif kind == "retinanet":
        sizes = tuple((b, b * 2 ** (1 / 3), b * 2 ** (2 / 3)) for b in base)
        anchors = AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * len(base))
        model = RetinaNet(body, num_classes, anchor_generator=anchors, detections_per_img=detections_per_img,
                          score_thresh=score_thresh, **common)
    else:
        anchors = AnchorGenerator(tuple((b,) for b in base), ((1.0,),) * len(base))
        model = FCOS(body, num_classes, anchor_generator=anchors, detections_per_img=detections_per_img,
                     score_thresh=score_thresh, **common)
    model.kdforge_dense = {"kind": kind, "strides": level_strides, "fpn_channels": fpn_channels}
    return model


class SegBackbone(nn.Module):
    """``x -> {"out": last stage, "aux": the stage before}`` (what torchvision's segmenters expect)."""

    def __init__(self, model: nn.Module, in_chans: int = 3, aux: bool = True):
        super().__init__()
        self.aux = aux
        self.body = _LastStages(model, in_chans)
        self.channels = self.body.channels

    def forward(self, x: Tensor) -> "OrderedDict[str, Tensor]":
        aux, out = self.body(x)
        d = OrderedDict(out=out)
        if self.aux:
            d["aux"] = aux
        return d


class _LastStages(nn.Module):
    """The last two stage outputs of a backbone, whatever their stride (dilated backbones included)."""

    def __init__(self, model: nn.Module, in_chans: int):
        super().__init__()
        self.model = model
        mode = MultiScaleFeatures._detect_mode(model)
        self._mode = mode
        if mode == "timm":
            n = len(model.feature_info)
            self._indices = [n - 2, n - 1]
        was = model.training
        model.eval()
        with torch.no_grad():
            a, b = self.forward(torch.zeros(1, in_chans, 64, 64))
        model.train(was)
        self.channels = [int(a.shape[1]), int(b.shape[1])]

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        m = self.model
        if self._mode == "timm":
            a, b = m.forward_intermediates(x, indices=self._indices, intermediates_only=True)
            return a, b
        if self._mode == "tv_resnet":
            y = m.maxpool(m.relu(m.bn1(m.conv1(x))))
            y = m.layer3(m.layer2(m.layer1(y)))
            return y, m.layer4(y)
        prev, y = x, x
        for block in m.features:
            prev, y = y, block(y)
        return prev, y


def build_segmenter(kind: str, backbone: nn.Module, num_classes: int, *, in_chans: int = 3, aux: bool = False,
                    atrous_rates: Sequence[int] = (12, 24, 36)) -> nn.Module:
    """torchvision DeepLabV3 (ASPP head) or FCN on ``backbone``; ``num_classes`` counts background.
    ``forward(x)["out"]`` is (B, num_classes, H, W) at the input size (``"aux"`` too with ``aux``)."""
    from torchvision.models.segmentation.deeplabv3 import DeepLabHead, DeepLabV3
    from torchvision.models.segmentation.fcn import FCN, FCNHead
    if kind not in SEGMENTERS:
        raise ValueError(f"segmenter: expected one of {', '.join(SEGMENTERS)}, got {kind!r}")
    body = SegBackbone(backbone, in_chans, aux)
    c_aux, c_out = body.channels
    aux_head = FCNHead(c_aux, num_classes) if aux else None
    if kind == "deeplabv3":
        model = DeepLabV3(body, DeepLabHead(c_out, num_classes, atrous_rates), aux_head)
    else:
        model = FCN(body, FCNHead(c_out, num_classes), aux_head)
    model.kdforge_dense = {"kind": kind}
    return model


# ------------------------------------------------------------------------------------------------
# backbone weights in and out
# ------------------------------------------------------------------------------------------------

def dense_backbone_module(model: nn.Module) -> nn.Module:
    """The kdforge backbone inside a detector / segmenter built here."""
    return model.backbone.body.model


def dense_backbone_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The backbone's weights with its own timm/torchvision keys (loads into ``create_model(name, 0)``)."""
    from kdforge.models.checkpoint import backbone_state_dict
    return backbone_state_dict(dense_backbone_module(model))


def load_backbone_weights(backbone: nn.Module, source: str | Path, strict: bool = True):
    """Load backbone weights from a kdforge run (folder or ``.pt`` checkpoint: the student's weights,
    classifier dropped) or a weights file (``.safetensors`` / ``.pth``, e.g. ``kdforge export``).
    Checked key by key; returns the :class:`~kdforge.models.checkpoint.LoadReport`."""
    from kdforge.models.checkpoint import backbone_state_dict, load_state_dict_checked, read_weights_file
    from kdforge.models.factory import classifier_prefixes
    p = Path(source)
    if p.is_dir() or (p.suffix == ".pt" and _is_run_checkpoint(p)):
        from kdforge.models.checkpoint import load_model_from_run
        src, _ = load_model_from_run(p)
        state = backbone_state_dict(src)
    else:
        state = read_weights_file(p)
    heads = classifier_prefixes(backbone)
    state = {k: v for k, v in state.items() if not any(k == h or k.startswith(h + ".") for h in heads)}
    return load_state_dict_checked(backbone, state, strict=strict, source=f"backbone {source}",
                                   ignore_prefixes=heads)


def _is_run_checkpoint(p: Path) -> bool:
    try:
        obj = torch.load(p, map_location="cpu", weights_only=False)
    except Exception:  # noqa: BLE001 - not a torch checkpoint: let read_weights_file explain
        return False
    return isinstance(obj, dict) and "config" in obj and "model" in obj
