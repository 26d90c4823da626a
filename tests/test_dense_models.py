"""torchvision detectors / segmenters on kdforge backbones: levels, strides, shapes, losses, keys."""
from __future__ import annotations

import pytest
import torch

from kdforge.models import backbone_state_dict, create_model
from kdforge.models.dense import (MultiScaleFeatures, build_detector, build_segmenter, dense_backbone_state_dict)


@pytest.mark.parametrize("name", ["kdf_resnet_narrow", "torchvision/resnet18", "torchvision/mobilenet_v2"])
def test_multiscale_features_strides(name):
    m = create_model(name, num_classes=0)
    f = MultiScaleFeatures(m, (8, 16, 32))
    out = f(torch.zeros(2, 3, 96, 64))
    assert [tuple(o.shape[-2:]) for o in out] == [(12, 8), (6, 4), (3, 2)]
    assert [o.shape[1] for o in out] == f.channels
    with pytest.raises(ValueError, match="stride"):
        MultiScaleFeatures(create_model(name, num_classes=0), (64,))


@pytest.mark.parametrize("kind,levels", [("faster_rcnn", 5), ("retinanet", 5), ("fcos", 5)])
def test_detectors_train_and_predict(kind, levels):
    torch.manual_seed(0)
    bb = create_model("kdf_resnet_narrow", num_classes=0)
    ref = backbone_state_dict(bb)
    if kind != "faster_rcnn":
        with pytest.raises(ValueError, match="multiple of 32"):
            build_detector(kind, bb, 4, fpn_channels=16)
    det = build_detector(kind, bb, 4, fpn_channels=32, min_size=64, max_size=64, anchor_mult=2.0,
                         representation_size=32, box_batch_size_per_image=16)
    assert len(det.kdforge_dense["strides"]) == levels
    imgs = [torch.rand(3, 64, 64), torch.rand(3, 48, 64)]
    tg = [{"boxes": torch.tensor([[4.0, 4.0, 20.0, 24.0]]), "labels": torch.tensor([1])},
          {"boxes": torch.tensor([[30.0, 10.0, 50.0, 40.0], [2.0, 2.0, 12.0, 12.0]]), "labels": torch.tensor([3, 2])}]
    det.train()
    losses = det(imgs, tg)
    total = sum(losses.values())
    assert torch.isfinite(total) and total > 0
    total.backward()
    assert bb.conv1.weight.grad is not None  # the kdforge backbone is trained through the detector
    det.eval()
    with torch.no_grad():
        out = det(imgs)
        feats = det.backbone(torch.zeros(1, 3, 256, 256))
    assert len(out) == 2 and {"boxes", "scores", "labels"} <= set(out[0])
    assert len(feats) == levels and all(f.shape[1] == 32 for f in feats.values())
    # strides recorded on the model match the feature sizes (256 px input)
    assert [256 // f.shape[-1] for f in feats.values()] == det.kdforge_dense["strides"]
    # the backbone keeps its own keys inside the detector
    assert set(dense_backbone_state_dict(det)) == set(ref)


@pytest.mark.parametrize("kind", ["deeplabv3", "fcn"])
def test_segmenters_output_size(kind):
    bb = create_model("kdf_resnet_narrow", num_classes=0, output_stride=8)
    seg = build_segmenter(kind, bb, 11, aux=True, atrous_rates=(2, 4, 6))
    seg.eval()
    with torch.no_grad():
        out = seg(torch.rand(2, 3, 40, 56))
    assert out["out"].shape == (2, 11, 40, 56) and out["aux"].shape == (2, 11, 40, 56)
    tv = build_segmenter(kind, create_model("torchvision/resnet18", num_classes=0), 5)
    tv.eval()
    with torch.no_grad():
        assert tv(torch.rand(1, 3, 64, 64))["out"].shape == (1, 5, 64, 64)
