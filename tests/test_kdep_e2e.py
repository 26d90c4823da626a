"""KDEP end to end through the real CLI on the bundled digits: teacher -> 10% subset -> kdep-svd ->
KDEP pre-training (no labels) -> supervised fine-tuning from it -> exports."""
import json
import pickle

import torch
from safetensors.torch import load_file

from kdforge.align.svd import SVDAligner
from kdforge.cli import main


def test_kdep_pipeline(digits_root, tmp_path, tiny):
    teacher = tmp_path / "teacher"
    assert main(["train", "configs/supervised/digits_cpu.yaml"] + tiny(digits_root, teacher)) == 0

    sub = tmp_path / "digits_10pct"
    assert main(["data", "subset", str(digits_root), str(sub), "--fraction", "0.1", "--seed", "0"]) == 0
    manifest = json.loads((sub / "subset.json").read_text())
    assert manifest["classes"] == 10 and 100 <= manifest["images"] <= 115
    assert (sub / "test").is_dir()

    # 10% of digits is ~108 images < 256 teacher dimensions: 3 augmented passes
    svd_args = ["kdep-svd", str(teacher), str(sub), "--transform", "train", "--passes", "3",
                "--num-workers", "0", "--device", "cpu"]
    assert main(svd_args[:3] + [str(tmp_path / "svd")] + svd_args[3:]) == 0
    assert main(svd_args[:3] + [str(tmp_path / "svd2.safetensors")] + svd_args[3:]) == 0
    meta = json.loads((tmp_path / "svd" / "svd.json").read_text())
    assert meta["samples"] == 3 * meta["images"] == 3 * manifest["images"]
    assert meta["img_size"] == 16 and meta["dim"] == 256 and str(teacher.resolve()) in meta["teacher"]
    a, b = SVDAligner.load(tmp_path / "svd"), SVDAligner.load(tmp_path / "svd2.safetensors")
    assert torch.equal(a.V, b.V) and torch.equal(a.mean, b.mean)      # seeded: identical statistics

    run = tmp_path / "kdep"
    rc = main(["train", "configs/kdep/digits_cpu.yaml"] +
              tiny(sub, run, **{"teacher.checkpoint": teacher, "method.svd": tmp_path / "svd" / "svd.safetensors",
                                "train.epochs": 2, "data.batch_size": 16, "train.val_every": 1}))
    assert rc == 0
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert any({"loss", "feat_mse", "cos"} <= set(r) for r in recs)
    assert any("val/cos" in r and -1 <= r["val/cos"] <= 1 for r in recs)
    ck = torch.load(run / "last.pt", map_location="cpu", weights_only=False)
    assert ck["model"]["aligner.V"].shape == (256, 128)           # k = kdf_resnet_narrow's width
    assert not any(k.startswith("student.fc.") for k in ck["model"])

    ft = tmp_path / "ft"
    assert main(["train", "configs/supervised/digits_cpu.yaml"] +
                tiny(sub, ft, **{"model.name": "kdf_resnet_narrow", "init_from": run})) == 0
    log = (ft / "log.txt").read_text()
    assert "warm start from" in log and "student.fc.weight" in log and "student.layer1" not in log

    # the transfer protocol through the evaluation suite (val selects, test once), 1 epoch here
    from kdforge.methods.kdep import TRANSFER_PROTOCOL, kdep_transfer
    rep = kdep_transfer(run, sub, tmp_path / "transfer", epochs=1, device="cpu", progress=False)
    p = rep["protocol"]
    assert rep["mode"] == "finetune" and rep["epochs"] == 1
    assert (p["lr"], p["batch_size"], p["weight_decay"], p["milestones"], p["gamma"]) == \
        (1e-3, 64, 5e-4, [50, 100], 0.1) and p["selection"].startswith("val")
    assert TRANSFER_PROTOCOL["epochs"] == 150
    assert 0 <= rep["val_best"] <= 100 and 0 <= rep["test_at_val_best"] <= 100
    assert json.loads((tmp_path / "transfer" / "transfer.json").read_text())["run"] == str(tmp_path / "transfer")
    init = load_file(str(tmp_path / "transfer" / "init_backbone.safetensors"))   # the KDEP student, no head
    student = {k[len("student."):]: v for k, v in ck["model"].items() if k.startswith("student.")}
    assert set(init) == set(student) and all(torch.equal(init[k], student[k]) for k in init)

    # exports: backbone (timm keys == torchvision names for ResNets) and a Detectron2 pickle
    assert main(["export", str(run)]) == 0
    sd = load_file(str(run / "export" / "backbone.safetensors"))
    from kdforge.export import save_detectron2_pkl, to_torchvision_state_dict
    from kdforge.models import create_model
    m = create_model("kdf_resnet_narrow", num_classes=0)
    m.load_state_dict(sd, strict=True)
    tv = to_torchvision_state_dict(m)
    assert set(tv) == set(sd)
    path = save_detectron2_pkl(tv, tmp_path / "det.pkl")
    with open(path, "rb") as fh:
        d2 = pickle.load(fh)["model"]
    assert "res5.1.conv2.norm.weight" in d2 and "stem.conv1.weight" in d2 and len(d2) == len(sd)
    # the same through the CLI: torchvision-named safetensors and the Detectron2 pickle
    assert main(["export", str(run), "--format", "torchvision"]) == 0
    assert main(["export", str(run), "--format", "detectron2", "-o", str(tmp_path / "cli_det.pkl")]) == 0
    tv_cli = load_file(str(run / "export" / "backbone_torchvision.safetensors"))
    assert set(tv_cli) == set(tv) and all(torch.equal(tv_cli[k], tv[k]) for k in tv)
    with open(tmp_path / "cli_det.pkl", "rb") as fh:
        d2_cli = pickle.load(fh)
    assert set(d2_cli["model"]) == set(d2) and d2_cli["matching_heuristics"] is True
