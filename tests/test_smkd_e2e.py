"""A tiny two-phase SMKD run through the real CLI on the class-disjoint digits split."""
import json

import pytest
import torch

from kdforge.cli import main


@pytest.fixture(scope="module")
def fewshot_root(tmp_path_factory):
    from kdforge.data.converters.digits_fewshot import write_digits_fewshot
    return write_digits_fewshot(tmp_path_factory.mktemp("data") / "digits_fewshot")


def _args(root, out, **extra):
    # data.val_split=null keeps these runs short; few-shot validation on the novel val classes is
    # covered by test_fewshot_validation_on_novel_val_classes_picks_best
    base = {"data.root": root, "out": out, "data.batch_size": 16, "data.val_split": "null", "train.max_steps": 2,
            "train.progress": "false", "train.log_every": 1, "method.fewshot_episodes": 20}
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def _terms(run):
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_digits_fewshot_converter_splits_classes(fewshot_root):
    meta = json.loads((fewshot_root / "dataset.json").read_text())
    assert meta["split"] == {"train": [0, 1, 2, 3, 4], "val": [5, 6], "test": [7, 8, 9]}
    assert sorted(p.name for p in (fewshot_root / "test").iterdir()) == ["7", "8", "9"]
    assert sum(meta["counts"].values()) == 1797


def test_two_phase_run_eval_and_export(fewshot_root, tmp_path):
    p1, p2 = tmp_path / "ibot", tmp_path / "smkd"
    assert main(["train", "configs/ibot/digits_cpu.yaml"] + _args(fewshot_root, p1)) == 0
    t1 = _terms(p1)
    assert any({"loss", "cls", "mim", "mask_ratio"} <= set(r) for r in t1)
    assert all(r.get("loss", 0) == r.get("loss", 0) for r in t1)            # no NaN logged

    assert main(["train", "configs/smkd/digits_cpu.yaml"] +
                _args(fewshot_root, p2, init_from=p1, **{"method.pk_per_class": 4})) == 0
    t2 = [r for r in _terms(p2) if "loss" in r]
    assert t2 and all({"cls", "patch", "patch_pairs", "patch_empty_batches"} <= set(r) for r in t2)
    assert all(r["patch_pairs"] > 0 and r["patch_empty_batches"] == 0 for r in t2)  # P×K batches always pair
    # phase 2 starts from phase 1: centres and teacher were loaded, not re-initialised
    c1 = torch.load(p1 / "last.pt", weights_only=False)["model"]
    assert torch.count_nonzero(c1["loss.center"]) > 0

    from kdforge.methods.ibot import evaluate_fewshot_run
    res = evaluate_fewshot_run(p2, "test", fewshot_episodes=20)
    assert set(res) >= {"test/3way_1shot", "test/3way_5shot", "test/3way_1shot_ci95", "test/fewshot"}
    assert all(0 <= v <= 100 for v in res.values())

    # the EMA teacher and the student load into plain timm models
    from kdforge.models import create_model, load_model_from_run
    teacher, _ = load_model_from_run(p2, module="teacher_backbone")
    student, _ = load_model_from_run(p2, module="student")
    assert teacher.num_features == student.num_features == 96
    assert main(["export", str(p2), "--format", "safetensors"]) == 0
    from safetensors.torch import load_file
    sd = load_file(str(p2 / "export" / "backbone.safetensors"))
    create_model("kdf_vit_micro", num_classes=0, img_size=16).load_state_dict(sd, strict=True)


def test_fewshot_validation_on_novel_val_classes_picks_best(fewshot_root, tmp_path):
    # the val split holds novel classes (5, 6) that the training split (0-4) does not have
    # (IBOT.build_dataset reads it with its own classes; the default reader would refuse it)
    import shutil

    from kdforge.engine.checkpoint import load_checkpoint
    root = tmp_path / "small"
    for split, n in (("train", 24), ("val", 40)):                          # a small copy keeps this cheap
        for cdir in sorted((fewshot_root / split).iterdir()):
            (root / split / cdir.name).mkdir(parents=True)
            for f in sorted(cdir.iterdir())[:n]:
                shutil.copy(f, root / split / cdir.name / f.name)
    out = tmp_path / "ibot_val"
    assert main(["train", "configs/ibot/digits_cpu.yaml"] +
                _args(root, out, **{"data.val_split": "val", "train.epochs": 2, "train.max_steps": "null",
                                    "data.batch_size": 40, "train.val_every": 1, "data.num_workers": 0,
                                    "method.n_local": 1})) == 0
    vals = [r for r in _terms(out) if "val/fewshot" in r]
    assert len(vals) == 2                                                   # every epoch
    for r in vals:                                                          # 2 val classes -> 2-way episodes
        assert {"val/2way_1shot", "val/2way_5shot", "val/2way_1shot_ci95"} <= set(r)
        assert r["val/fewshot"] == pytest.approx((r["val/2way_1shot"] + r["val/2way_5shot"]) / 2)
    best = load_checkpoint(out, "best")
    assert best["best"] == pytest.approx(max(r["val/fewshot"] for r in vals))


def test_kdforge_eval_fewshot_on_the_teacher_feature(fewshot_root, tmp_path, capsys):
    # `kdforge eval fewshot` on the EMA teacher with SMKD's feature equals the run's own few-shot evaluation
    from kdforge.methods.ibot import evaluate_fewshot_run
    run = tmp_path / "ibot"
    assert main(["train", "configs/ibot/digits_cpu.yaml"] + _args(fewshot_root, run)) == 0
    capsys.readouterr()
    js = tmp_path / "fs.json"
    assert main(["eval", "fewshot", str(run), str(fewshot_root), "--module", "teacher_backbone", "--tap",
                 "cls+wpatch", "--ways", "3", "--shots", "1", "5", "--queries", "15", "--episodes", "40",
                 "--which", "last", "--quiet", "--json", str(js)]) == 0
    assert "3w1s q15 prototype" in capsys.readouterr().out
    res = json.loads(js.read_text())["results"]
    ref = evaluate_fewshot_run(run, "test", which="last", fewshot_episodes=40, fewshot_queries=15,
                               fewshot_shots=[1, 5], fewshot_seed=0)
    assert [r["n_shot"] for r in res] == [1, 5] and all(r["n_episodes"] == 40 for r in res)
    assert res[0]["mean"] == pytest.approx(ref["test/3way_1shot"], abs=1e-6)
    assert res[1]["mean"] == pytest.approx(ref["test/3way_5shot"], abs=1e-6)
