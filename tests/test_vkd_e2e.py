"""VkD end to end through the real CLI on the bundled digits: teacher CNN -> distilled tiny ViT,
logged terms, projector norm constant (no collapse), evaluation without the teacher, export."""
import json
import math

from kdforge.cli import main
from kdforge.engine.trainer import evaluate_run


def test_vkd_digits_cpu_end_to_end(digits_root, tmp_path, tiny):
    teacher = tmp_path / "teacher"
    assert main(["train", "configs/supervised/digits_cpu.yaml"] +
                tiny(digits_root, teacher, **{"model.name": "kdf_resnet_narrow", "train.max_steps": 3})) == 0

    student = tmp_path / "vkd"
    rc = main(["train", "configs/vkd/digits_cpu.yaml"] +
              tiny(digits_root, student, **{"teacher.checkpoint": teacher, "teacher.name": "kdf_resnet_narrow",
                                            "train.max_steps": 6, "method.mixup_alpha": 0.8,
                                            "method.cutmix_alpha": 1.0}))
    assert rc == 0
    recs = [json.loads(x) for x in (student / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in recs if "loss" in r]
    assert len(steps) == 6 and all({"ce", "kd", "feat", "proj_fro"} <= set(r) for r in steps)
    # ‖W‖_F = sqrt(d_in = 96) at every step: the projector never collapses under AdamW wd 0.05
    assert all(abs(r["proj_fro"] - math.sqrt(96)) < 1e-3 for r in steps)
    assert len({round(r["feat"], 6) for r in steps}) > 1  # the feature term moves

    test = evaluate_run(student, "test")  # rebuilt without the teacher; projector from the checkpoint
    assert 0.0 <= test["test/acc1"] <= 100.0

    assert main(["export", str(student), "--format", "safetensors"]) == 0
    from safetensors.torch import load_file

    from kdforge.models import create_model
    sd = load_file(str(student / "export" / "backbone.safetensors"))
    m = create_model("kdf_deit_micro_distilled", num_classes=0, img_size=16)
    m.load_state_dict(sd, strict=True)  # timm keys, no heads, no projector
