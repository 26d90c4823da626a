"""End to end on a small digits subset through the real CLI: MoCo (online kNN, export, SSL report),
SEED from a supervised teacher, and the init_from warm start (key encoder copy, queue reset/keep)."""
import json
import shutil

import pytest
import torch

from kdforge.cli import main
from kdforge.config import ConfigError, load_config
from kdforge.engine.checkpoint import load_checkpoint
from kdforge.engine.trainer import build_method, evaluate_run
from kdforge.models.checkpoint import load_state_dict_checked


@pytest.fixture(scope="module")
def small_digits(digits_root, tmp_path_factory):
    """20 train / 5 val / 5 test images per class copied from the bundled digits."""
    root = tmp_path_factory.mktemp("small") / "digits"
    for split, n in (("train", 20), ("val", 5), ("test", 5)):
        for cdir in sorted((digits_root / split).iterdir()):
            dst = root / split / cdir.name
            dst.mkdir(parents=True)
            for f in sorted(cdir.iterdir())[:n]:
                shutil.copy(f, dst / f.name)
    return root


def _args(root, out, method: str = "moco", **extra):
    base = {"data.root": root, "out": out, "data.img_size": 16, "data.batch_size": 32, "train.epochs": 2,
            "train.progress": False, "train.log_every": 1, "train.val_every": 1}
    if method in ("moco", "seed"):
        base["method.queue_size"] = 64
    if method == "moco":
        base["method.bn_splits"] = 2
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


@pytest.fixture(scope="module")
def moco_run(small_digits, tmp_path_factory):
    out = tmp_path_factory.mktemp("moco") / "run"
    assert main(["train", "configs/moco/digits_improved_cpu.yaml"] + _args(small_digits, out)) == 0
    return out


def test_moco_trains_logs_knn_and_exports(moco_run, small_digits):
    rec = [json.loads(x) for x in (moco_run / "metrics.jsonl").read_text().splitlines()]
    assert any({"loss", "inst_acc1", "inst_acc5"} <= set(r) for r in rec)
    knn = [r["val/knn_acc1"] for r in rec if "val/knn_acc1" in r]
    assert len(knn) == 2 and all(0 <= v <= 100 for v in knn)          # every epoch (val_every=1)
    ck = load_checkpoint(moco_run, "last")
    assert ck["student_head"] is False
    assert {"queue.keys", "queue.ptr"} <= set(ck["model"]) and any(k.startswith("key_backbone.") for k in ck["model"])
    assert int(ck["model"]["queue.ptr"]) == (2 * 6 * 32) % 64                 # 2 epochs x 6 steps x 32 keys
    test = evaluate_run(moco_run, "test")
    assert 0 <= test["test/knn_acc1"] <= 100
    assert main(["export", str(moco_run), "--format", "safetensors"]) == 0
    from safetensors.torch import load_file

    from kdforge.models import create_model
    sd = load_file(str(moco_run / "export" / "backbone.safetensors"))
    create_model("kdf_resnet_narrow", num_classes=0).load_state_dict(sd, strict=True)


def test_ssl_report_on_moco_run(moco_run, small_digits):
    from kdforge.methods.moco_report import format_report, main as report_main, ssl_report
    rep = ssl_report(moco_run, small_digits, probe_wd_grid=(1e-4, 1e-2), probe_max_iter=30, k_max=11)
    assert rep["n_static"] == 50 and rep["n_train"] == 200 and rep["feature_dim"] == 128
    assert len(rep["instdisc_d_sd"]) == 5 and rep["instdisc_d_sd"] == sorted(rep["instdisc_d_sd"])
    for key in ("align_d_sd", "align_sd_sd", "class_align_d", "class_align_sd"):
        assert 0.0 <= rep[key] <= 4.0                   # squared distances on the unit sphere
    assert -4.0 <= rep["uniform_d"] <= 0.0 and -4.0 <= rep["uniform_sd"] <= 0.0
    assert rep["best_nn_k_chosen_on"] == "val" and rep["best_nn_k"] % 2 == 1
    assert 0 <= rep["best_nn"] <= 100 and 0 <= rep["linear_probe"] <= 100
    assert json.loads((moco_run / "ssl_report.json").read_text())["best_nn"] == rep["best_nn"]
    table = format_report(rep)
    assert "| D-SD align | SD-SD align | D cls-align | SD cls-align | D uniform | SD uniform |" in table
    # same seed -> same static set -> same numbers
    again = ssl_report(moco_run, small_digits, probe_wd_grid=(1e-4, 1e-2), probe_max_iter=30, k_max=11, write=False)
    assert again["instdisc_d_sd"] == rep["instdisc_d_sd"] and again["align_d_sd"] == pytest.approx(rep["align_d_sd"])
    assert report_main([str(moco_run), "--data-root", str(small_digits), "--k-max", "5"]) == 0


def test_kdforge_eval_ssl_one_command(moco_run, small_digits, tmp_path, capsys):
    from kdforge.methods.moco_report import ssl_report
    out = tmp_path / "ssl.json"
    assert main(["eval", "ssl", str(moco_run), str(small_digits), "--k-max", "11", "--probe-max-iter", "30",
                 "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "Instance discrimination, mode d-sd, Top1-5:" in printed and "| D-SD align |" in printed
    assert "SSL metrics (test, 50 images)" in printed and "linear probe" in printed
    rep = json.loads(out.read_text())
    ref = ssl_report(moco_run, small_digits, k_max=11, probe_max_iter=30, write=False)   # same numbers as the API
    for key in ("instdisc_d_sd", "instdisc_sd_sd", "best_nn", "best_nn_k"):
        assert rep[key] == ref[key]
    for key in ("align_d_sd", "align_sd_sd", "class_align_d", "class_align_sd", "uniform_d", "uniform_sd",
                "linear_probe"):
        assert rep[key] == pytest.approx(ref[key], abs=1e-6)
    assert main(["eval", "ssl", str(moco_run), str(tmp_path / "nowhere")]) == 2          # one-line error
    assert "neither" in capsys.readouterr().err


def _warm_started(root, out, source, *extra):
    """What the trainer does for init_from (load matching keys), then the method's own semantics."""
    cfg = load_config("configs/moco/digits_improved_cpu.yaml",
                      _args(root, out, init_from=source) + list(extra))
    m = build_method(cfg, 10)
    src = load_checkpoint(source, "best")
    load_state_dict_checked(m, src["model"], strict=False)
    m.on_train_start(1, 1)
    return m, src["model"]


def test_init_from_copies_query_into_key_encoder_and_resets_queue(moco_run, small_digits, tmp_path):
    m, src = _warm_started(small_digits, tmp_path / "w1", moco_run)
    for k, v in m.student.state_dict().items():
        assert torch.equal(v, src["student." + k])                                  # query backbone loaded
        assert torch.equal(m.key_backbone.state_dict()[k], v)                       # key encoder = query
    assert torch.equal(m.key_head.state_dict()["0.weight"], src["head.0.weight"])
    assert int(m.queue.ptr) == 0 and not torch.allclose(m.queue.keys, src["queue.keys"])
    rep = json.loads((tmp_path / "w1" / "init_from.json").read_text())
    assert rep["key_encoder"] == "copied from the query encoder" and rep["queue"].startswith("reset")
    assert rep["query_backbone_tensors_loaded"] == rep["query_backbone_tensors"] > 0
    m2, src = _warm_started(small_digits, tmp_path / "w2", moco_run, "method.keep_queue=true")
    assert torch.equal(m2.queue.keys, src["queue.keys"])


def test_seed_from_supervised_teacher_then_moco_warm_start(small_digits, tmp_path):
    teacher = tmp_path / "teacher"
    assert main(["train", "configs/supervised/digits_cpu.yaml"] +
                _args(small_digits, teacher, "supervised", **{"train.epochs": 1})) == 0
    seed = tmp_path / "seed"
    assert main(["train", "configs/seed/digits_cpu.yaml"] +
                _args(small_digits, seed, "seed", **{"teacher.checkpoint": teacher, "train.epochs": 1})) == 0
    rec = [json.loads(x) for x in (seed / "metrics.jsonl").read_text().splitlines()]
    assert any({"loss", "top1_agree"} <= set(r) for r in rec) and any("val/knn_acc1" in r for r in rec)
    ck = load_checkpoint(seed, "last")
    assert ck["model"]["queue.keys"].shape == (64, 256)          # teacher feature width (kdf_resnet_wide)
    assert not any(k.startswith("teacher") for k in ck["model"])  # the teacher is never saved
    assert 0 <= evaluate_run(seed, "test")["test/knn_acc1"] <= 100  # rebuilt without teacher
    m, src = _warm_started(small_digits, tmp_path / "w", seed)
    for k, v in m.student.state_dict().items():
        assert torch.equal(v, src["student." + k]) and torch.equal(m.key_backbone.state_dict()[k], v)
    rep = json.loads((tmp_path / "w" / "init_from.json").read_text())
    assert rep["source_method"] == "seed" and "discarded" in rep["queue"]


def test_seed_with_moco_teacher_uses_its_projection_head(moco_run, small_digits, tmp_path):
    cfg = load_config("configs/seed/digits_cpu.yaml",
                      _args(small_digits, tmp_path / "s", "seed", **{"teacher.checkpoint": moco_run}))
    m = build_method(cfg, 10)
    src = load_checkpoint(moco_run, "best")["model"]
    assert m.queue.keys.shape == (64, 128) and m.head.out_dim == 128          # teacher's 128-d MoCo embedding
    assert torch.equal(m.teacher.head[0].weight, src["head.0.weight"])         # wide head of the teacher run
    assert not any(k.startswith("teacher") for k in m.state_dict())
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        ref = torch.nn.functional.linear(torch.relu(torch.nn.functional.linear(
            m.teacher.backbone(x), src["head.0.weight"], src["head.0.bias"])), src["head.2.weight"], src["head.2.bias"])
        assert torch.allclose(m.teacher(x), ref, atol=1e-5)
    m.train()
    out = m.training_step((x, torch.zeros(4)), 0)
    assert torch.isfinite(out["loss"]) and m.teacher.training is False
    bad = load_config("configs/seed/digits_cpu.yaml", _args(small_digits, tmp_path / "b", "seed", **{
        "method.teacher_embedding": "head", "teacher.checkpoint": "null", "teacher.name": "kdf_resnet_narrow"}))
    with pytest.raises(ConfigError, match="teacher_embedding: 'head' needs teacher.checkpoint"):
        build_method(bad, 10)
