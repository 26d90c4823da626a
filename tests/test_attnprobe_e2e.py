"""Attention Probe end to end on the bundled digits, through the real CLI: wild pool -> ViT teacher ->
``kdforge select`` (interrupted, then resumed) -> ``kdforge train`` attnprobe on the selection folder
-> evaluation on test; then the demo row on a shrunken setting."""
import csv
import json
import math
import os
from pathlib import Path

import pytest
import torch
import yaml

from kdforge.cli import main
from kdforge.engine.trainer import evaluate_run

ALPHA, BETA = 0.05, 0.9


def _kinds(wild: Path) -> dict[str, str]:
    """pool file name -> kind, read straight from the manifest CSV."""
    with open(wild / "manifest.csv", newline="") as f:
        return {Path(r["file"]).name: r["kind"] for r in csv.DictReader(f)}


def _smallest(values: torch.Tensor, n: int) -> set[int]:
    return set(torch.argsort(values, stable=True)[:n].tolist())


def test_selection_precision_golden(tmp_path):
    from kdforge.data.converters.wild_pool import selection_precision
    man = {str((tmp_path / f).resolve()): {"kind": k} for f, k in
           (("a.png", "digit"), ("b.png", "noise"), ("c.png", "digit"), ("d.png", "crop"), ("e.png", "texture"))}
    # 2 digits among 4 picks -> 0.5; 2 of 2 -> 1; none -> 0
    assert selection_precision([str(tmp_path / f) for f in ("a.png", "b.png", "c.png", "d.png")], man) == 0.5
    assert selection_precision([str(tmp_path / "c.png"), str(tmp_path / "a.png")], man) == 1.0
    assert selection_precision([str(tmp_path / "e.png")], man) == 0.0 and selection_precision([], man) == 0.0


def test_wild_pool_teacher_select_resume_train_evaluate(digits_root, tmp_path, tiny, capsys):
    from kdforge.commands.select import run_select
    from kdforge.selection import load_scores, read_meta

    # 1. the wild pool: digits/val (269) + round(0.5 x 269) = 134 OOD images
    wild = tmp_path / "wild"
    assert main(["data", "wild-pool", str(wild), "--ood-ratio", "0.5"]) == 0
    kinds = _kinds(wild)
    assert len(kinds) == 403 and sum(k == "digit" for k in kinds.values()) == 269

    # 2. a tiny ViT teacher (1 epoch, 16 px: 16 patches + CLS)
    teacher = tmp_path / "teacher"
    assert main(["train", "configs/attnprobe/digits_teacher_cpu.yaml"] +
                tiny(digits_root, teacher, **{"data.batch_size": 64, "train.val_every": 0})) == 0
    assert (teacher / "last.pt").is_file()

    # 3. scoring interrupted after 2 batches of 64, then resumed and finished by the CLI
    sel = tmp_path / "sel"
    part = run_select(str(teacher), str(wild / "pool"), str(sel), None, blocks=(1, 2), batch_size=64,
                      device="cpu", progress=False, max_batches=2)
    assert not part["table"].complete and read_meta(sel)["count"] == 128 and part["selections"] == {}
    args = ["select", str(teacher), str(wild / "pool"), str(sel), "--n", "60", "--mode", "confidence",
            "combined", "random", "--blocks", "1", "2", "--batch-size", "64", "--workers", "0",
            "--device", "cpu", "--no-progress"]
    assert main(args) == 0
    assert "403 images" in capsys.readouterr().out
    table = load_scores(sel)
    assert table.complete and table.count == 403 and table["attention"].shape == (2, 403)
    once = run_select(str(teacher), str(wild / "pool"), str(tmp_path / "once"), None, blocks=(1, 2),
                      batch_size=64, device="cpu", progress=False)["table"]
    for k in ("confidence", "attention", "predictions"):
        assert torch.allclose(table[k].float(), once[k].float(), atol=1e-5), k

    # the selections are the n smallest of each mode's score (recomputed here from the stored scores)
    conf, att = table["confidence"], table["attention"]
    expect = {"confidence": _smallest(conf, 60), "combined": _smallest(ALPHA * (att[0] + att[1]) + BETA * conf, 60)}
    for mode in ("confidence", "combined", "random"):
        txt = sel / f"{mode}_60.txt"
        files = txt.read_text().splitlines()
        meta = json.loads(txt.with_suffix(".json").read_text())
        assert len(files) == 60 == len(set(meta["indices"])) and all(os.path.isfile(f) for f in files)
        assert meta["mode"] == mode and meta["teacher_hash"] == read_meta(sel)["teacher_hash"]
        if mode in expect:
            assert set(meta["indices"]) == expect[mode]
        assert len(list((sel / f"{mode}_60").iterdir())) == 60

    # 4. the attnprobe student from scratch on the combined selection folder (labels never read)
    folder = sel / "combined_60"
    student = tmp_path / "student"
    assert main(["train", "configs/attnprobe/digits_cpu.yaml"] +
                tiny(digits_root, student, **{"data.train_split": folder, "teacher.checkpoint": teacher,
                                              "method.teacher_acc": 0.5, "train.epochs": 2,
                                              "data.batch_size": 16})) == 0
    assert "60 images" in (student / "log.txt").read_text()
    cfg = yaml.safe_load((student / "config.yaml").read_text())
    assert cfg["data"]["train_split"] == str(folder) and cfg["method"]["teacher_acc"] == 0.5
    lines = [json.loads(x) for x in (student / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in lines if "kd" in r]
    assert len(steps) == 8  # 60 images / 16 -> 4 steps (the last one partial) x 2 epochs, logged every step
    for r in steps:
        assert all(math.isfinite(r[k]) for k in ("loss", "kd", "noise", "probe"))
        assert r["kd"] >= 0 and r["noise"] > 0 and 0 <= r["probe"] <= 4.0
        # the preset's weights: loss = kd + 1.0 · noise + 0.8 · probe
        assert r["loss"] == pytest.approx(r["kd"] + r["noise"] + 0.8 * r["probe"], rel=1e-4)

    # 5. evaluation on digits/test: evaluate_run equals accuracy recomputed by hand from the weights
    test = evaluate_run(student, "test")
    from kdforge.config import from_dict, DataConfig
    from kdforge.data.datasets import ImageFolderDataset
    from kdforge.data.transforms import build_eval_transform
    from kdforge.models import load_model_from_run
    model, _ = load_model_from_run(student)
    ds = ImageFolderDataset(digits_root / "test", build_eval_transform(from_dict(DataConfig, {
        **cfg["data"], "require_root": False})))
    with torch.no_grad():
        x = torch.stack([ds[i][0] for i in range(len(ds))])
        y = torch.tensor(ds.targets)
        acc = (model.eval()(x).argmax(-1) == y).float().mean().item() * 100
    assert test["test/acc1"] == pytest.approx(acc, abs=1e-4)


def test_demo_row_on_a_shrunken_setting(digits_root, tmp_path, monkeypatch):
    import kdforge.demo.rows.attnprobe as row
    from kdforge.demo.core import DemoContext
    monkeypatch.setattr(row, "EPOCHS", {"full": (1, 1), "quick": (1, 1)})
    monkeypatch.setattr(row, "N_SELECT", 40)
    ctx = DemoContext(out=tmp_path, data_root=digits_root, quick=True, seeds=(0,))
    rows = row.run(ctx)
    assert [r.variant for r in rows[1:]] == [label for _, label in row.MODES] and len(rows) == 5
    work = tmp_path / "attnprobe_row_quick"
    teacher_acc = evaluate_run(work / "teacher", "test")["test/acc1"]
    assert rows[0].metrics["test acc (%)"] == f"{teacher_acc:.1f}"
    kinds = _kinds(work / "wild")
    assert len(kinds) == 807   # 269 digits + 2 x OOD
    for (mode, _), r in zip(row.MODES, rows[1:]):
        files = (work / "select" / f"{mode}_40.txt").read_text().splitlines()
        digits = sum(kinds[Path(f).name] == "digit" for f in files)
        assert len(files) == 40 and r.metrics["selection precision (%)"] == f"{100 * digits / 40:.1f}"
        run = work / f"{mode}_s0"
        cfg = yaml.safe_load((run / "config.yaml").read_text())
        assert cfg["method"]["name"] == "attnprobe" and cfg["data"]["train_split"] == str(work / "select" / f"{mode}_40")
        assert cfg["teacher"]["checkpoint"] == str(work / "teacher")
        assert cfg["method"]["teacher_acc"] == pytest.approx(teacher_acc / 100)
        assert r.metrics["test acc (%)"] == f"{evaluate_run(run, 'test')['test/acc1']:.1f}"
