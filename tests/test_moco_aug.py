"""MoCo augmentation preset: the paper's knobs end up in the transform, views are tensors."""
import random

import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from kdforge.data.ssl_transforms import (MOCO_AUG_PRESETS, PILGaussianBlur, jitter_strengths,
                                         moco_preset_transform, moco_view_transform, two_views)


def _find(tf, cls):
    out = []
    for op in tf.transforms:
        if isinstance(op, T.RandomApply):
            out += [(op.p, t) for t in op.transforms if isinstance(t, cls)]
        elif isinstance(op, cls):
            out.append((getattr(op, "p", 1.0), op))
    return out


def test_jitter_strengths():
    assert jitter_strengths(1.0) == pytest.approx((0.8, 0.8, 0.8, 0.4))   # the paper
    assert jitter_strengths(1.5) == pytest.approx((1.2, 1.2, 1.2, 0.5))   # reference default, hue capped
    with pytest.raises(ValueError):
        jitter_strengths(-1)


def test_improved_preset_knobs():
    tf = moco_preset_transform("improved", img_size=32)
    (p, cj), = _find(tf, T.ColorJitter)
    assert p == 0.8
    assert cj.brightness == pytest.approx((0.2, 1.8)) and cj.hue == pytest.approx((-0.4, 0.4))
    (pg, _), = _find(tf, T.RandomGrayscale)
    assert pg == 0.5
    (pb, blur), = _find(tf, PILGaussianBlur)
    assert pb == 0.5 and blur.sigma == (0.1, 2.0)
    (_, rrc), = _find(tf, T.RandomResizedCrop)
    assert rrc.scale == (0.2, 1.0) and rrc.size == (32, 32)
    (pf, _), = _find(tf, T.RandomHorizontalFlip)
    assert pf == 0.5


def test_mocov2_preset_knobs():
    tf = moco_preset_transform("mocov2", img_size=16)
    (p, cj), = _find(tf, T.ColorJitter)
    assert cj.brightness == pytest.approx((0.6, 1.4)) and cj.hue == pytest.approx((-0.1, 0.1))
    (pg, _), = _find(tf, T.RandomGrayscale)
    assert pg == 0.2
    assert set(MOCO_AUG_PRESETS) == {"improved", "mocov2"}
    with pytest.raises(ValueError, match="preset"):
        moco_preset_transform("strong")


def test_knobs_off_and_validation():
    tf = moco_view_transform(16, cj=None, grey_p=0.0, blur_p=0.0, flip_p=0.0)
    assert not _find(tf, T.ColorJitter) and not _find(tf, T.RandomGrayscale) and not _find(tf, PILGaussianBlur)
    with pytest.raises(ValueError, match="grey_p"):
        moco_view_transform(16, grey_p=1.5)
    with pytest.raises(ValueError, match="scale"):
        moco_view_transform(16, scale=(0.0, 1.0))


def test_two_views_are_tensors_and_reproducible():
    img = Image.fromarray((torch.rand(20, 24, 3) * 255).to(torch.uint8).numpy())
    tf = two_views(moco_preset_transform("improved", img_size=16))

    def draw(seed):
        torch.manual_seed(seed)
        random.seed(seed)
        return tf(img)

    v1, v2 = draw(0)
    assert v1.shape == v2.shape == (3, 16, 16) and v1.dtype == torch.float32
    assert not torch.equal(v1, v2)                       # two independent draws
    w1, w2 = draw(0)
    assert torch.equal(v1, w1) and torch.equal(v2, w2)   # seeded -> identical


def test_blur_draws_sigma_from_python_random():
    img = Image.new("RGB", (8, 8))
    blur = PILGaussianBlur((0.5, 0.5))
    assert blur(img).size == (8, 8)
    with pytest.raises(ValueError):
        PILGaussianBlur((2.0, 1.0))


def test_fused_to_normalized_tensor_matches_torchvision():
    from kdforge.data.ssl_transforms import ToNormalizedTensor
    arr = (torch.rand(5, 7, 3) * 255).to(torch.uint8).numpy()
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    ref = T.Normalize(mean, std)(T.ToTensor()(Image.fromarray(arr)))
    assert torch.allclose(ToNormalizedTensor(mean, std)(Image.fromarray(arr)), ref, atol=1e-6)
    grey = Image.fromarray(arr[..., 0])
    assert torch.allclose(ToNormalizedTensor((0.5,), (0.5,))(grey), T.Normalize((0.5,), (0.5,))(T.ToTensor()(grey)),
                          atol=1e-6)
    with pytest.raises(ValueError, match="channels"):
        ToNormalizedTensor((0.5,), (0.5,))(Image.fromarray(arr))
