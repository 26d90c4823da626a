"""End to end through the real CLI on the bundled digits: teacher, KD student, evaluation, export."""
import json

import torch

from kdforge.cli import main
from kdforge.engine.trainer import evaluate_run


def test_train_teacher_then_kd_student_then_export(digits_root, tmp_path, tiny):
    teacher = tmp_path / "teacher"
    assert main(["train", "configs/supervised/digits_cpu.yaml"] +
                tiny(digits_root, teacher, **{"train.epochs": 2, "model.name": "kdf_resnet_narrow"})) == 0
    assert (teacher / "last.pt").is_file() and (teacher / "config.yaml").is_file()
    lines = [json.loads(x) for x in (teacher / "metrics.jsonl").read_text().splitlines()]
    assert any("loss" in r and "img_per_s" in r for r in lines)
    assert any("val/acc1" in r for r in lines)

    student = tmp_path / "kd"
    rc = main(["train", "configs/kd/digits_cpu.yaml"] +
              tiny(digits_root, student, **{"teacher.checkpoint": teacher, "train.epochs": 2,
                                            "teacher.name": "kdf_resnet_narrow"}))
    assert rc == 0
    terms = [json.loads(x) for x in (student / "metrics.jsonl").read_text().splitlines()]
    assert any({"loss", "ce", "kd"} <= set(r) for r in terms)
    test = evaluate_run(student, "test")
    assert 0.0 <= test["test/acc1"] <= 100.0

    assert main(["export", str(student), "--format", "safetensors"]) == 0
    from safetensors.torch import load_file

    from kdforge.models import create_model
    sd = load_file(str(student / "export" / "backbone.safetensors"))
    m = create_model("kdf_vit_micro", num_classes=0, img_size=16)
    m.load_state_dict(sd, strict=True)  # backbone-only, timm keys
    assert not any(k.startswith("head.") for k in sd)


def test_kd_without_teacher_fails_clearly(digits_root, tmp_path, tiny, capsys):
    rc = main(["train", "configs/kd/digits_cpu.yaml"] + tiny(digits_root, tmp_path / "r", **{"teacher": "null"}))
    assert rc == 2
    assert "needs a teacher" in capsys.readouterr().err


def test_existing_run_is_not_overwritten(digits_root, tmp_path, tiny, capsys):
    out = tmp_path / "r"
    args = ["train", "configs/supervised/digits_cpu.yaml"] + tiny(digits_root, out, **{"model.name": "kdf_vit_micro"})
    assert main(args) == 0
    before = (out / "last.pt").stat().st_mtime_ns
    assert main(args) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert (out / "last.pt").stat().st_mtime_ns == before
    ck = torch.load(out / "last.pt", weights_only=False)
    assert ck["epoch"] == 1 and ck["step"] > 0
