"""Dense tasks end to end on a tiny digits-detect copy: the converter CLI, ``kdforge transfer detect``
(+ backbone from a run / a safetensors file), ``vkd_dense`` through the trainer with a detector
teacher from a run, ``kdforge transfer segment``, the Method data hooks and the poly schedule."""
from __future__ import annotations

import json
import math

import pytest
import torch

from kdforge import cli
from kdforge.demo.core import CONFIGS

DET = str(CONFIGS / "dense" / "digits_detect_cpu.yaml")
SEG = str(CONFIGS / "dense" / "digits_segment_cpu.yaml")
VKD = str(CONFIGS / "dense" / "vkd_dense_digits_cpu.yaml")
TINY = ["train.epochs=1", "data.batch_size=8", "train.progress=false", "train.log_every=1"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("dense") / "dd"
    assert cli.main(["data", "digits-detect", str(root), "--counts", "16", "8", "8", "--seed", "3"]) == 0
    meta = json.loads((root / "dataset.json").read_text())
    assert meta["counts"] == {"train": 16, "val": 8, "test": 8} and meta["objects"]["train"] >= 16
    return root


@pytest.fixture(scope="module")
def teacher_run(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("dense") / "teacher"
    rc = cli.main(["transfer", "detect", DET, *TINY, "model.name=kdf_resnet_wide", "--data", str(data),
                   "--out", str(out)])
    assert rc == 0
    return out


def _finite_pct(v):
    return math.isnan(v) or 0.0 <= v <= 100.0


def test_transfer_detect_cli(teacher_run):
    rep = json.loads((teacher_run / "transfer.json").read_text())
    assert rep["task"] == "detect" and rep["method"] == "detect"
    test = rep["test_at_val_best"]
    assert set(test) == {f"test/{k}" for k in ("AP", "AP50", "AP75", "APs", "APm", "APl")}
    assert all(_finite_pct(v) for v in test.values())
    assert not math.isnan(test["test/AP"]) and math.isnan(test["test/APl"])  # digits are all small
    log = [json.loads(x) for x in (teacher_run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in log if "loss" in r]
    assert steps and {"classification", "bbox_regression", "bbox_ctrness"} <= set(steps[0])  # FCOS's terms
    assert any("val/AP" in r for r in log)


def test_vkd_dense_trains_with_a_detector_teacher(data, teacher_run, tmp_path):
    from kdforge.config import load_config
    from kdforge.engine.trainer import train
    cfg = load_config(VKD, [*TINY, f"data.root={data}", f"out={tmp_path / 'vkd'}",
                            f"teacher.checkpoint={teacher_run}"])
    res = train(cfg)
    log = [json.loads(x) for x in (tmp_path / "vkd" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in log if "distil" in r]
    assert steps
    for r in steps:  # total = detector losses + 4 * distillation
        assert r["distil"] > 0 and r["loss"] == pytest.approx(r["det"] + 4.0 * r["distil"], rel=1e-4)
        terms = {k: v for k, v in r.items() if k not in ("step", "time", "loss", "det", "distil", "epoch", "lr",
                                                           "img_per_s")}
        assert set(terms) == {"classification", "bbox_regression", "bbox_ctrness"}  # FCOS's own terms
        assert r["det"] == pytest.approx(sum(terms.values()), rel=1e-4)
    ck = torch.load(tmp_path / "vkd" / "last.pt", map_location="cpu", weights_only=False)
    keys = list(ck["model"])
    assert sum(k.endswith(".raw") and k.startswith("projectors.") for k in keys) == 5  # P3-P7
    assert not any(k.startswith("teacher") or k.startswith("_teacher") for k in keys)
    assert "val/AP" in res.metrics


def test_vkd_dense_distill_loss_matches_the_pure_loss(data, teacher_run):
    """The method's distillation term equals the pure loss on the features it captured."""
    from kdforge.config import load_config
    from kdforge.data.dense import detection_collate
    from kdforge.engine.trainer import build_method
    from kdforge.losses.vkd_dense import padding_masks, vkd_dense_loss
    from kdforge.methods.detect import Detect
    cfg = load_config(VKD, [f"data.root={data}", f"teacher.checkpoint={teacher_run}"])
    torch.manual_seed(0)
    m = build_method(cfg, 10)
    ds = Detect.build_dataset(cfg, "val", False)
    batch = detection_collate([ds[0], ds[1]])
    out = m.training_step(batch, 0)
    # recompute by hand from the student's transform + both backbones
    il, _ = m.student.transform(list(batch[0]))
    fs = list(m.student.backbone(il.tensors).values())
    ft = list(m.teacher.backbone(il.tensors).values())
    masks = padding_masks(il.image_sizes, tuple(il.tensors.shape[-2:]), [f.shape[-2:] for f in fs])
    ref = vkd_dense_loss(fs, ft, list(m.projectors), masks)
    assert float(out["distil"]) == pytest.approx(float(ref.detach()), rel=1e-4)
    assert m.teacher is not None and not m.teacher.training
    assert all(not p.requires_grad for p in m.teacher.parameters())


def test_vkd_dense_rejects_a_non_square_teacher(data, teacher_run):
    from kdforge.config import ConfigError, load_config
    from kdforge.engine.trainer import build_method
    cfg = load_config(VKD, [f"data.root={data}", f"teacher.checkpoint={teacher_run}", "method.fpn_channels=32"])
    with pytest.raises(ConfigError, match="fpn_channels"):
        build_method(cfg, 10)


def test_backbone_from_safetensors_and_from_run(data, tmp_path):
    """method.backbone loads a KDEP-style backbone strictly, from a weights file or a kdforge run."""
    from safetensors.torch import save_file

    from kdforge.config import load_config, to_dict
    from kdforge.engine.trainer import build_method
    from kdforge.models import backbone_state_dict, create_model
    from kdforge.models.dense import dense_backbone_state_dict
    torch.manual_seed(123)
    src = create_model("kdf_resnet_narrow", num_classes=10)
    state = backbone_state_dict(src)
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "bb.safetensors"))
    # a minimal kdforge run checkpoint holding the same student
    run = tmp_path / "run"
    run.mkdir()
    cfg_src = load_config(None, [f"data.root={data}", "model.name=kdf_resnet_narrow", "data.require_root=false"])
    torch.save({"model": {f"student.{k}": v for k, v in src.state_dict().items()}, "config": to_dict(cfg_src),
                "num_classes": 10, "student_head": True, "epoch": 1, "step": 1}, run / "last.pt")
    for source in (tmp_path / "bb.safetensors", run):
        cfg = load_config(DET, [f"data.root={data}", f"method.backbone={source}"])
        m = build_method(cfg, 10)
        got = dense_backbone_state_dict(m.student)
        assert set(got) == set(state)
        assert all(torch.equal(got[k], state[k]) for k in state)
        assert set(m.export_backbone()) == set(state)


def test_transfer_segment_cli(data, tmp_path):
    out = tmp_path / "seg"
    rc = cli.main(["transfer", "segment", SEG, *TINY, "train.epochs=2", "--data", str(data), "--out", str(out)])
    assert rc == 0
    rep = json.loads((out / "transfer.json").read_text())
    t = rep["test_at_val_best"]
    assert set(t) == {"test/mIoU", "test/pixel_acc"} and 0 <= t["test/mIoU"] <= 100
    log = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("val/mIoU" in r for r in log) and any("aux" in r for r in log)


def test_transfer_rejects_the_wrong_task(data, tmp_path):
    rc = cli.main(["transfer", "segment", DET, "--data", str(data), "--out", str(tmp_path / "x")])
    assert rc == 2


def test_method_hooks_defaults_and_dense():
    from kdforge.data.dense import detection_collate, segmentation_collate
    from kdforge.methods import get_method
    from kdforge.methods.base import Method
    assert Method.collate_fn(None) is None and Method.build_dataset(None, "train", True) is None
    assert get_method("detect").collate_fn(None) is detection_collate
    assert get_method("vkd_dense").collate_fn(None) is detection_collate
    assert get_method("segment").collate_fn(None) is segmentation_collate


def test_poly_schedule():
    from kdforge.engine.schedules import lr_factor
    assert lr_factor(0, 10, "poly") == pytest.approx(1.0)
    assert lr_factor(5, 10, "poly", power=0.9) == pytest.approx(0.5 ** 0.9)
    assert lr_factor(10, 10, "poly") == pytest.approx(0.0)
    # warm-up first, then poly over the rest: step 6 of 10 with 2 warm-up steps -> t = 4/8
    assert lr_factor(6, 10, "poly", warmup_steps=2, power=2.0, min_ratio=0.1) == pytest.approx(0.1 + 0.9 * 0.25)


def test_export_of_a_detector_run_loads_into_the_plain_backbone(teacher_run, tmp_path):
    from safetensors.torch import load_file

    from kdforge.models import create_model
    from kdforge.engine.checkpoint import load_checkpoint
    out = tmp_path / "bb.safetensors"
    assert cli.main(["export", str(teacher_run), "--format", "safetensors", "-o", str(out)]) == 0
    state = load_file(str(out))
    bb = create_model("kdf_resnet_wide", num_classes=0)
    bb.load_state_dict(state, strict=True)   # every key of the plain backbone, nothing else
    ck = load_checkpoint(teacher_run, "best")
    key = next(k for k in state if k.startswith("layer4.") and k.endswith("conv2.weight"))
    src = [v for k, v in ck["model"].items() if k.startswith("student.") and k.endswith("." + key)]
    assert len(src) == 1 and torch.equal(src[0], state[key])   # the trained detector's backbone weights
