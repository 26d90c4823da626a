"""``kdforge data wild-pool`` and ``kdforge select`` through the real CLI."""
import csv
import json
import os

import torch

from kdforge.cli import main


def test_wild_pool_cli_and_weights_file_mismatch_refused(tmp_path, capsys):
    wild = tmp_path / "wild"
    assert main(["data", "wild-pool", str(wild), "--ood-ratio", "0.5", "--seed", "1"]) == 0
    rows = list(csv.DictReader(open(wild / "manifest.csv")))
    kinds = {r["kind"] for r in rows}
    n_digit = sum(r["kind"] == "digit" for r in rows)
    assert kinds == {"digit", "noise", "texture", "crop"} and n_digit == 269   # digits/val
    assert len(rows) == n_digit + round(0.5 * n_digit) == len(list((wild / "pool").glob("*.png")))
    meta = json.loads((wild / "pool.json").read_text())
    assert meta["counts"]["digit"] == n_digit and meta["splits"] == ["val"]

    from safetensors.torch import save_file

    from kdforge.models import create_model
    torch.manual_seed(0)
    teacher = create_model("vit_tiny_patch16_224", num_classes=10, img_size=16, patch_size=4, depth=2,
                           embed_dim=48, num_heads=3)
    wpath = tmp_path / "teacher.safetensors"
    save_file(teacher.state_dict(), str(wpath))
    out = tmp_path / "sel"
    args = ["select", str(wpath), str(wild / "pool"), str(out), "--model", "vit_tiny_patch16_224",
            "--num-classes", "10", "--img-size", "16", "--n", "50", "--mode", "confidence", "combined", "random",
            "--blocks", "0", "1", "--workers", "0", "--no-progress", "--device", "cpu", "--batch-size", "64"]
    # the weights file needs the architecture kwargs: a mismatch is refused, not loaded partially
    assert main(args) == 2
    assert "does not match" in capsys.readouterr().err


def test_select_from_preset_teacher_and_reuse(tmp_path, capsys):
    wild = tmp_path / "wild"
    from kdforge.data.converters.wild_pool import write_wild_pool
    write_wild_pool(wild, ood_ratio=0.25)
    from safetensors.torch import save_file

    from kdforge.models import create_model
    torch.manual_seed(0)
    kw = dict(patch_size=4, depth=2, embed_dim=48, num_heads=3)
    teacher = create_model("vit_tiny_patch16_224", num_classes=10, img_size=16, **kw)
    wpath = tmp_path / "teacher.safetensors"
    save_file(teacher.state_dict(), str(wpath))
    preset = tmp_path / "preset.yaml"
    preset.write_text(f"teacher: {{name: vit_tiny_patch16_224, num_classes: 10, weights: {wpath}, "
                      f"kwargs: {{patch_size: 4, depth: 2, embed_dim: 48, num_heads: 3}}}}\n"
                      "data: {img_size: 16, mean: [0.5, 0.5, 0.5], std: [0.5, 0.5, 0.5]}\n")
    out = tmp_path / "sel"
    args = ["select", str(preset), str(wild / "pool"), str(out), "--n", "40", "--mode", "confidence", "combined",
            "random", "--blocks", "0", "1", "--workers", "0", "--no-progress", "--device", "cpu",
            "--class-balanced"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "selection combined" in text and "336 images" in text   # 269 digits + 67 OOD
    for mode in ("confidence", "combined", "random"):
        txt = out / f"{mode}_40_balanced.txt"
        files = txt.read_text().splitlines()
        assert len(files) == 40 and all(os.path.isfile(f) for f in files)
        meta = json.loads(txt.with_suffix(".json").read_text())
        assert meta["mode"] == mode and meta["class_balanced"] and len(meta["indices"]) == 40
        folder = out / f"{mode}_40_balanced"
        links = sorted(folder.iterdir())
        assert len(links) == 40 and links[0].is_symlink() and os.path.realpath(links[0]) == os.path.realpath(files[0])
    sc = json.loads((out / "scores.json").read_text())
    assert sc["complete"] and sc["blocks"] == [0, 1] and sc["num_items"] == 336
    # a second selection reuses the scores (no rescoring: the score file is untouched)
    before = (out / "scores.safetensors").stat().st_mtime_ns
    assert main(args[:4] + ["--n", "10", "--mode", "attention", "--blocks", "0", "1", "--workers", "0",
                            "--no-progress", "--device", "cpu", "--head", "0"]) == 0
    assert (out / "scores.safetensors").stat().st_mtime_ns == before
    assert (out / "attention_10_head-0.txt").is_file()
