"""Dense tasks: box/mask transform consistency, COCO/VOC readers, mAP and mIoU on hand-built
predictions, the digits-detect converter, padding-aware standardisation and the VkD dense loss."""
from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
import torch
from PIL import Image

from kdforge.data.dense import (DenseHorizontalFlip, DenseRandomCrop, DenseResize, DenseToTensor, detection_collate,
                                segmentation_collate, voc_to_coco)
from kdforge.eval.dense import coco_map, confusion_matrix, miou


def _img_with_box(w=40, h=20, box=(5, 4, 15, 10)):
    """An image and a class mask whose only foreground is exactly ``box`` (x1, y1, x2, y2)."""
    a = np.zeros((h, w), np.uint8)
    x1, y1, x2, y2 = box
    a[y1:y2, x1:x2] = 200
    m = np.zeros((h, w), np.uint8)
    m[y1:y2, x1:x2] = 3
    tgt = {"boxes": torch.tensor([box], dtype=torch.float32), "labels": torch.tensor([3]),
           "mask": Image.fromarray(m, mode="L"), "scale": torch.ones(2)}
    return Image.fromarray(a, mode="L"), tgt


def _mask_bbox(mask: torch.Tensor):
    ys, xs = torch.nonzero(mask > 0, as_tuple=True)
    return [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]


def test_flip_moves_boxes_masks_and_pixels_together():
    img, tgt = _img_with_box()
    out_img, out = DenseHorizontalFlip(p=1.0)(img, tgt, random.Random(0))
    # by hand: W=40, box x 5..15 -> 25..35
    assert out["boxes"].tolist() == [[25.0, 4.0, 35.0, 10.0]]
    _, t = DenseToTensor()(out_img, out, None)
    assert _mask_bbox(t["mask"]) == [25, 4, 35, 10]
    ink = torch.from_numpy(np.asarray(out_img) > 0)
    assert _mask_bbox(ink) == [25, 4, 35, 10]
    # p = 0: unchanged
    _, same = DenseHorizontalFlip(p=0.0)(img, tgt, random.Random(0))
    assert same["boxes"].tolist() == [[5.0, 4.0, 15.0, 10.0]]


def test_resize_scales_boxes_and_masks_consistently():
    img, tgt = _img_with_box()
    out_img, out = DenseResize(40)(img, tgt, random.Random(0))  # shorter side 20 -> 40: x2 both axes
    assert out_img.size == (80, 40)
    assert out["boxes"].tolist() == [[10.0, 8.0, 30.0, 20.0]]
    assert out["scale"].tolist() == [2.0, 2.0]
    _, t = DenseToTensor()(out_img, out, None)
    assert _mask_bbox(t["mask"]) == [10, 8, 30, 20]
    # longer-side cap: 40x20 with size 40, max 60 -> scale 1.5
    out_img, out = DenseResize(40, max_size=60)(img, tgt, random.Random(0))
    assert out_img.size == (60, 30) and out["boxes"].tolist() == [[7.5, 6.0, 22.5, 15.0]]


def test_random_crop_pads_with_ignore_and_clips_boxes():
    img, tgt = _img_with_box(w=20, h=10, box=(2, 2, 8, 6))
    out_img, out = DenseRandomCrop(16)(img, tgt, random.Random(3))
    assert out_img.size == (16, 16)
    _, t = DenseToTensor()(out_img, out, None)
    m = t["mask"]
    assert (m == 255).any()  # padded rows are "ignore"
    if len(out["boxes"]):
        assert _mask_bbox((m == 3).long()) == [int(v) for v in out["boxes"][0].tolist()]


def test_collates():
    a = (torch.zeros(3, 4, 5), {"mask": torch.ones(4, 5, dtype=torch.int64)})
    b = (torch.ones(3, 6, 3), {"mask": torch.full((6, 3), 2, dtype=torch.int64)})
    imgs, masks = segmentation_collate([a, b])
    assert imgs.shape == (2, 3, 6, 5) and masks.shape == (2, 6, 5)
    assert int(masks[0, 5, 0]) == 255 and int(masks[0, 0, 0]) == 1 and int(masks[1, 0, 4]) == 255
    assert float(imgs[1, :, 0, 3:].abs().sum()) == 0.0
    ims, tg = detection_collate([a, b])
    assert isinstance(ims, list) and len(ims) == 2 and ims[1].shape == (3, 6, 3)


def _gt():
    # boxes: small (10x10=100), medium (40x40=1600), large (100x100=10000) on 2 images
    return {"images": [{"id": 1, "width": 200, "height": 200}, {"id": 2, "width": 200, "height": 200}],
            "annotations": [
                {"id": 1, "image_id": 1, "category_id": 7, "bbox": [0, 0, 10, 10]},
                {"id": 2, "image_id": 1, "category_id": 9, "bbox": [50, 50, 40, 40]},
                {"id": 3, "image_id": 2, "category_id": 7, "bbox": [20, 20, 100, 100]}],
            "categories": [{"id": 7, "name": "a"}, {"id": 9, "name": "b"}]}


def test_map_perfect_none_and_half():
    gt = _gt()
    perfect = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 0.9}
               for a in gt["annotations"]]
    m = coco_map(gt, perfect)
    assert set(m) == {"AP", "AP50", "AP75", "APs", "APm", "APl"}
    assert all(v == pytest.approx(100.0) for v in m.values())
    none = coco_map(gt, [])
    assert all(v == 0.0 for v in none.values())
    # wrong class everywhere -> 0
    wrong = [{**p, "category_id": 16 - p["category_id"]} for p in perfect]
    assert coco_map(gt, wrong)["AP"] == pytest.approx(0.0)
    # only the large box found: class 7 has 2 GT, 1 found at precision 1 -> AP 50 (COCO 101-point
    # interpolation: recall 0..0.5 at precision 1 -> 51/101); class 9 -> 0; mean over classes
    m = coco_map(gt, [perfect[2]])
    assert m["AP50"] == pytest.approx(100 * (51 / 101) / 2, abs=1e-6)
    assert m["APl"] == pytest.approx(100.0) and m["APs"] == pytest.approx(0.0) and m["APm"] == pytest.approx(0.0)
    # IoU 0.6 box (shifted): counts at AP50, not at AP75
    x, y, w, h = perfect[2]["bbox"]
    shifted = dict(perfect[2], bbox=[x + 25, y, w, h])  # IoU = 75*100 / (125*100) = 0.6
    m = coco_map(gt, [shifted], image_ids=[2])
    assert m["AP50"] == pytest.approx(100.0) and m["AP75"] == pytest.approx(0.0)
    assert math.isnan(m["APs"])  # image 2 has no small object


def test_voc_xml_reader(tmp_path):
    (tmp_path / "Annotations").mkdir()
    (tmp_path / "ImageSets" / "Main").mkdir(parents=True)
    (tmp_path / "ImageSets" / "Main" / "val.txt").write_text("a\n")
    (tmp_path / "Annotations" / "a.xml").write_text(
        "<annotation><filename>a.jpg</filename><size><width>50</width><height>40</height></size>"
        "<object><name>dog</name><difficult>0</difficult><bndbox><xmin>11</xmin><ymin>6</ymin><xmax>30</xmax>"
        "<ymax>25</ymax></bndbox></object><object><name>cat</name><difficult>1</difficult><bndbox><xmin>1</xmin>"
        "<ymin>1</ymin><xmax>5</xmax><ymax>5</ymax></bndbox></object></annotation>")
    c = voc_to_coco(tmp_path, "val")
    assert [x["name"] for x in c["categories"]] == ["cat", "dog"]
    dog = [a for a in c["annotations"] if a["category_id"] == 2][0]
    assert dog["bbox"] == [10.0, 5.0, 20.0, 20.0] and dog["iscrowd"] == 0
    assert [a for a in c["annotations"] if a["category_id"] == 1][0]["iscrowd"] == 1


def test_miou_by_hand():
    target = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 255]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 2, 0]])
    conf = confusion_matrix(pred, target, 3)
    # class 0: TP 1, FP 1 (2->0), FN 1 (0->1): IoU 1/3; class 1: TP 2, FP 1: 2/3; class 2: TP 1, FN 1: 1/2
    assert conf.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    m = miou(conf)
    assert m["mIoU"] == pytest.approx(100 * (1 / 3 + 2 / 3 + 1 / 2) / 3)
    assert m["pixel_acc"] == pytest.approx(100 * 4 / 6)
    assert miou(confusion_matrix(target.clamp(max=2), target, 3))["mIoU"] == pytest.approx(100.0)


def test_digits_detect_converter(tmp_path):
    from kdforge.data.converters.digits_detect import write_digits_detect
    from kdforge.data.dense import detection_dataset, segmentation_dataset
    counts = {"train": 6, "val": 3, "test": 3}
    out = write_digits_detect(tmp_path / "dd", counts=counts, seed=1)
    again = write_digits_detect(tmp_path / "dd2", counts=counts, seed=1)
    a = json.loads((out / "annotations" / "instances_train.json").read_text())
    b = json.loads((again / "annotations" / "instances_train.json").read_text())
    assert a["annotations"] == b["annotations"] and len(a["images"]) == 6  # deterministic
    ds = detection_dataset(out, "train")
    seg = segmentation_dataset(out, "train", transform=None)
    assert seg.num_classes == 11 and ds.classes == [str(i) for i in range(10)]
    for i in range(len(ds)):
        img, t = ds[i]
        _, s = seg[i]
        m = np.asarray(s["mask"])
        for box, lab in zip(t["boxes"].tolist(), t["labels"].tolist()):
            x1, y1, x2, y2 = (int(v) for v in box)
            inside = m[y1:y2, x1:x2]
            assert (inside == lab).any()  # label l = digit + 1 = mask value
            # the box is the tight box of this digit's mask pixels
            ys, xs = np.nonzero(inside == lab)
            assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (0, 0, x2 - x1, y2 - y1)
        assert (m > 0).sum() > 0 and np.asarray(img).max() > 0


def test_channel_standardize_ignores_padding():
    from kdforge.align.norms import channel_standardize
    x = torch.tensor([[0.0], [1.0], [2.0], [1000.0]])  # last row is padding
    mask = torch.tensor([True, True, True, False])
    y = channel_standardize(x, eps=0.0, mask=mask)
    s = math.sqrt(1.5)  # mean 1, biased var 2/3 -> (x - 1) / sqrt(2/3)
    assert y[:3, 0].tolist() == pytest.approx([-s, 0.0, s])
    assert channel_standardize(x, eps=0.0)[:3, 0].tolist() != pytest.approx([-s, 0.0, s])


def _proj1():
    from kdforge.align.orthogonal import OrthogonalProjector
    p = OrthogonalProjector(1, 1, scale_shift=True)
    with torch.no_grad():
        p.raw.fill_(0.5)  # W = Q of [[0.5]] with R's diagonal made positive = [[1]]
    assert float(p.weight.detach()) == pytest.approx(1.0)
    return p


def test_vkd_dense_loss_golden_values():
    from kdforge.losses.vkd_dense import padding_masks, vkd_dense_loss
    # one level, C=1, three pixels: s = [0, 1, 2], t = [0, 0, 3]
    s = torch.tensor([0.0, 1.0, 2.0]).view(1, 1, 1, 3)
    t = torch.tensor([0.0, 0.0, 3.0]).view(1, 1, 1, 3)
    # s^ = [-sqrt(1.5), 0, sqrt(1.5)], t^ = [-1/sqrt2, -1/sqrt2, sqrt2]; all |d| < 1:
    # mean 0.5 d^2 = 0.5 * ((2 - sqrt3) + 0.5 + (3.5 - 2 sqrt3)) / 3 = (6 - 3 sqrt3) / 6
    golden = (6 - 3 * math.sqrt(3)) / 6
    got = vkd_dense_loss([s], [t], [_proj1()], eps=0.0)
    assert float(got.detach()) == pytest.approx(golden, abs=1e-6) and float(got.detach()) == pytest.approx(0.1339746, abs=1e-6)
    # scale/shift are cancelled by the standardisation; two levels sum
    p = _proj1()
    with torch.no_grad():
        p.scale.fill_(3.0)
        p.shift.fill_(-2.0)
    two = vkd_dense_loss([s, s], [t, t], [p, _proj1()], eps=0.0)
    assert float(two.detach()) == pytest.approx(2 * golden, abs=1e-5)
    # a padded 4th pixel with a huge value changes nothing when masked out
    s4 = torch.tensor([0.0, 1.0, 2.0, 50.0]).view(1, 1, 1, 4)
    t4 = torch.tensor([0.0, 0.0, 3.0, -70.0]).view(1, 1, 1, 4)
    mask = [torch.tensor([[[True, True, True, False]]])]
    assert float(vkd_dense_loss([s4], [t4], [_proj1()], mask, eps=0.0).detach()) == pytest.approx(golden, abs=1e-6)
    assert abs(float(vkd_dense_loss([s4], [t4], [_proj1()], None, eps=0.0).detach()) - golden) > 1e-2
    # large difference: linear branch of smooth-L1 (beta = 1): rows s = [-1, 1], t = [1, -1] -> |d| = 2 -> 1.5
    s2 = torch.tensor([-1.0, 1.0]).view(1, 1, 1, 2)
    assert float(vkd_dense_loss([s2], [-s2], [_proj1()], eps=0.0).detach()) == pytest.approx(1.5)
    # padding masks by hand: padded 8x8 batch, image 0 is 8x5, image 1 is 3x8; level 4x4 (stride 2)
    m = padding_masks([(8, 5), (3, 8)], (8, 8), [(4, 4)])[0]
    assert m[0].sum() == 4 * 3 and bool(m[0, :, 2].all()) and not bool(m[0, :, 3].any())
    assert m[1].sum() == 2 * 4 and not bool(m[1, 2].any())


def test_voc_segmentation_reader(tmp_path):
    from kdforge.data.dense import segmentation_dataset
    (tmp_path / "JPEGImages").mkdir()
    (tmp_path / "SegmentationClass").mkdir()
    (tmp_path / "SegmentationClassAug").mkdir()
    (tmp_path / "ImageSets" / "Segmentation").mkdir(parents=True)
    (tmp_path / "ImageSets" / "Segmentation" / "trainaug.txt").write_text("a\nb\n")
    for i, name in enumerate("ab"):
        Image.fromarray(np.full((6, 8, 3), 40 * i, np.uint8)).save(tmp_path / "JPEGImages" / f"{name}.jpg")
    m = np.zeros((6, 8), np.uint8)
    m[:2] = 15
    m[5] = 255  # VOC's "void" border
    pal = Image.fromarray(m, mode="P")
    pal.putpalette([0, 0, 0, 128, 0, 0] * 128)
    pal.save(tmp_path / "SegmentationClass" / "a.png")
    Image.fromarray(np.full((6, 8), 7, np.uint8), mode="L").save(tmp_path / "SegmentationClassAug" / "b.png")
    ds = segmentation_dataset(tmp_path, "trainaug")
    assert ds.num_classes == 21 and len(ds.classes) == 20 and len(ds) == 2
    _, ta = ds[0]
    ma = np.asarray(ta["mask"])  # palette indices are class ids, not colours
    assert ma[0, 0] == 15 and ma[3, 0] == 0 and ma[5, 0] == 255
    _, tb = ds[1]
    assert (np.asarray(tb["mask"]) == 7).all()  # from SegmentationClassAug
