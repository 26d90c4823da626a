"""Dense-task metrics: COCO box mAP (pycocotools) and segmentation mIoU.

* :func:`coco_map` — the standard COCO metric set from ``pycocotools.cocoeval.COCOeval`` ("bbox"):
  AP (IoU .50:.05:.95), AP50, AP75, APs / APm / APl (area < 32², 32²–96², > 96²), all at 100
  detections per image, as percentages in [0, 100]. An area range without ground truth has no AP
  (COCOeval's -1) and is reported as NaN. No detections at all gives 0 (COCOeval cannot load an
  empty result list, so this case is answered directly).
* :func:`confusion_matrix` / :func:`miou` — mean intersection-over-union (%) over the classes that
  occur in the ground truth or the prediction, from a (K, K) confusion matrix accumulated over
  every valid pixel (pixels equal to ``ignore_index`` are skipped): IoU_c = TP / (TP + FP + FN).
"""
from __future__ import annotations

import contextlib
import copy
import io
import math
from typing import Iterable, Optional

import torch
from torch import Tensor

COCO_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def boxes_to_coco_results(image_id: int, boxes: Tensor, scores: Tensor, labels: Tensor,
                          label_to_cat: Optional[list[int]] = None) -> list[dict]:
    """Detections of one image (boxes (N, 4) ``x1 y1 x2 y2``) -> COCO result dicts
    ``{image_id, category_id, bbox: [x, y, w, h], score}``; labels map through ``label_to_cat``."""
    out = []
    b = boxes.detach().float().cpu().tolist()
    s = scores.detach().float().cpu().tolist()
    lab = labels.detach().cpu().tolist()
    for (x1, y1, x2, y2), sc, lb in zip(b, s, lab):
        cat = label_to_cat[int(lb)] if label_to_cat is not None else int(lb)
        out.append({"image_id": int(image_id), "category_id": int(cat),
                    "bbox": [x1, y1, x2 - x1, y2 - y1], "score": float(sc)})
    return out


def coco_map(gt: dict, results: Iterable[dict], image_ids: Optional[Iterable[int]] = None) -> dict[str, float]:
    """COCO box metrics (%) of ``results`` against the COCO dict ``gt``; see the module docstring.

    Args:
        gt: a COCO instances dict (``images``, ``annotations``, ``categories``); ``area`` and
            ``iscrowd`` default to w·h and 0 when absent.
        results: COCO result dicts (:func:`boxes_to_coco_results`).
        image_ids: evaluate these images only (default: every image of ``gt``).

    Returns:
        ``{"AP", "AP50", "AP75", "APs", "APm", "APl"}`` in [0, 100] (NaN: no ground truth in that range).
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval
    results = list(results)
    gt = copy.deepcopy(gt)
    for a in gt["annotations"]:
        a.setdefault("iscrowd", 0)
        a.setdefault("area", float(a["bbox"][2] * a["bbox"][3]))
    gt.setdefault("info", {})
    coco_gt = COCO()
    coco_gt.dataset = gt
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt.createIndex()
    ids = sorted(int(i) for i in (image_ids if image_ids is not None else coco_gt.getImgIds()))
    if not results:
        ranges = _ranges_with_gt(gt, ids)
        return {k: (0.0 if ok else math.nan) for k, ok in zip(COCO_KEYS, ranges)}
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt = coco_gt.loadRes(results)
        ev = COCOeval(coco_gt, coco_dt, "bbox")
        ev.params.imgIds = ids
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {k: (100.0 * float(v) if v >= 0 else math.nan) for k, v in zip(COCO_KEYS, ev.stats[:6])}


def _ranges_with_gt(gt: dict, ids: list[int]) -> list[bool]:
    """Whether each of (all, all, all, small, medium, large) has non-crowd ground truth."""
    idset = set(ids)
    areas = [a["area"] for a in gt["annotations"] if a["image_id"] in idset and not a.get("iscrowd", 0)]
    anyg = bool(areas)
    return [anyg, anyg, anyg, any(a < 32 ** 2 for a in areas), any(32 ** 2 <= a < 96 ** 2 for a in areas),
            any(a >= 96 ** 2 for a in areas)]


def confusion_matrix(pred: Tensor, target: Tensor, num_classes: int, ignore_index: int = 255) -> Tensor:
    """(K, K) int64 counts, rows = ground-truth class, columns = predicted class, over pixels whose
    target is not ``ignore_index``. ``pred``, ``target``: int tensors of the same shape."""
    if pred.shape != target.shape:
        raise ValueError(f"confusion_matrix: pred {tuple(pred.shape)} vs target {tuple(target.shape)}")
    valid = target != ignore_index
    t, p = target[valid].long(), pred[valid].long()
    if t.numel() and (int(t.max()) >= num_classes or int(t.min()) < 0):
        raise ValueError(f"confusion_matrix: target classes must be in [0, {num_classes}) or {ignore_index}")
    idx = t * num_classes + p.clamp(0, num_classes - 1)
    return torch.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def miou(conf: Tensor) -> dict[str, float]:
    """From a confusion matrix: ``mIoU`` (%) over classes with a non-empty union, pixel accuracy
    ``pixel_acc`` (%) and the per-class IoUs ``iou`` (NaN for absent classes)."""
    conf = conf.double()
    tp = conf.diag()
    union = conf.sum(0) + conf.sum(1) - tp
    iou = torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, math.nan))
    present = union > 0
    m = 100.0 * float(iou[present].mean()) if bool(present.any()) else math.nan
    acc = 100.0 * float(tp.sum() / conf.sum().clamp(min=1))
    return {"mIoU": m, "pixel_acc": acc, "iou": [100.0 * float(v) for v in iou]}
