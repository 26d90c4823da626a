"""``kdforge eval ...`` and ``kdforge data static-augs`` end to end on the bundled digits."""
import json

import pytest
import torch

from kdforge.cli import main


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, digits_root):
    out = tmp_path_factory.mktemp("evalcli") / "cnn"
    args = ["train", "configs/supervised/digits_cpu.yaml", f"data.root={digits_root}", f"out={out}",
            "data.img_size=16", "data.batch_size=64", "train.epochs=1", "train.max_steps=3", "train.progress=false",
            "train.device=cpu", "model.name=kdf_resnet_narrow"]
    assert main(args) == 0
    return out


def _json(path):
    return json.loads(path.read_text())


def test_feature_protocols(run_dir, digits_root, capsys):
    d = str(digits_root)
    assert main(["eval", "features", str(run_dir), d, "--split", "val", "--quiet"]) == 0
    assert "computed" in capsys.readouterr().out
    assert main(["eval", "features", str(run_dir), d, "--split", "val", "--quiet"]) == 0
    assert "from cache" in capsys.readouterr().out

    assert main(["eval", "fewshot", str(run_dir), d, "--episodes", "50", "--shots", "1", "5", "--queries", "all",
                 "--classifier", "prototype", "logistic", "--quiet"]) == 0
    line = capsys.readouterr().out
    assert "5w1s" in line and "logistic" in line
    fs = _json(run_dir / "eval" / "fewshot_test_pooled.json")
    assert len(fs["results"]) == 4 and all(0 <= r["mean"] <= 100 for r in fs["results"])
    assert fs["results"][0]["n_episodes"] == 50

    assert main(["eval", "knn", str(run_dir), d, "--k-max", "9", "--quiet"]) == 0
    knn = _json(run_dir / "eval" / "knn_test_original.json")
    assert knn["chosen_on"] == "val" and knn["best_k"] in (1, 3, 5, 7, 9) and knn["val_split"] == "val"
    assert main(["eval", "knn", str(run_dir), d, "--k-max", "5", "--val-split", "none", "--weighted",
                 "--rep-space", "norm", "--quiet", "--json", str(run_dir / "k2.json")]) == 0
    assert _json(run_dir / "k2.json")["chosen_on"] == "test"
    assert "k chosen on test" in capsys.readouterr().out

    assert main(["eval", "linear", str(run_dir), d, "--max-iter", "50", "--quiet"]) == 0
    lin = _json(run_dir / "eval" / "linear_test_pooled.json")
    assert 0 <= lin["acc"] <= 100 and lin["protocol"]["features"] == "L2-normalised rows"

    assert main(["eval", "tsne", str(run_dir), d, "--split", "val", "--max-points", "60", "--perplexity", "5",
                 "--quiet"]) == 0
    assert (run_dir / "eval" / "tsne_val_pooled.png").is_file()

    assert main(["eval", str(run_dir), "--split", "test"]) == 0                # accuracy shorthand
    acc = _json(run_dir / "eval" / "accuracy_test.json")
    assert 0 <= acc["test/acc1"] <= 100


def test_static_augs_deterministic_and_retrieval(run_dir, digits_root, tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(["data", "static-augs", str(digits_root / "test"), str(a), "--images-per-class", "4",
                 "--img-size", "16", "--seed", "3"]) == 0
    assert main(["data", "static-augs", str(digits_root / "test"), str(b), "--images-per-class", "4",
                 "--img-size", "16", "--seed", "3", "--workers", "2"]) == 0
    files = sorted(p.relative_to(a) for p in a.rglob("*.png"))
    assert len(files) == 10 * 4 * 3
    assert files == sorted(p.relative_to(b) for p in b.rglob("*.png"))
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)   # same whatever the workers
    assert (a / "manifest.csv").read_text().count("\n") == 41

    assert main(["eval", "instdisc", str(run_dir), str(a), "--quiet", "--cache-dir", str(tmp_path / "c")]) == 0
    inst = _json(run_dir / "eval" / "instdisc_d-sd.json")
    assert inst["n"] == 40 and len(inst["topk"]) == 5
    assert inst["topk"] == sorted(inst["topk"]) and all(0 <= v <= 100 for v in inst["topk"])
    assert main(["eval", "geometry", str(run_dir), str(a), "--quiet", "--cache-dir", str(tmp_path / "c")]) == 0
    geo = _json(run_dir / "eval" / "geometry.json")
    assert 0 <= geo["align_d_sd"] <= 4 and geo["uniform_d"] <= 0
    assert "D-SD align" in capsys.readouterr().out


@pytest.mark.parametrize("mode", ["linear", "finetune"])
def test_transfer_through_trainer(run_dir, digits_root, tmp_path, mode):
    out = tmp_path / f"tr_{mode}"
    assert main(["eval", "transfer", str(run_dir), str(digits_root), str(out), "--mode", mode, "--epochs", "1",
                 "--batch-size", "128", "--device", "cpu", "--quiet"]) == 0
    rep = _json(out / "transfer.json")
    assert rep["mode"] == mode and 0 <= rep["test_at_val_best"] <= 100 and 0 <= rep["val_best"] <= 100
    assert (out / "config.yaml").is_file() and (out / "last.pt").is_file()
    init = torch.load(run_dir / "last.pt", weights_only=False)["model"]
    after = torch.load(out / "last.pt", weights_only=False)["model"]
    k = "student.conv1.weight"
    if mode == "linear":                                                      # frozen backbone, trained fc
        assert torch.equal(init[k], after[k])
        assert "student.layer1.0.bn1.running_mean" in after
        assert torch.equal(init["student.layer1.0.bn1.running_mean"], after["student.layer1.0.bn1.running_mean"])
    else:
        assert not torch.equal(init[k], after[k])


def test_transfer_moco_lincls_protocol(run_dir, digits_root, tmp_path, capsys):
    out = tmp_path / "lincls"
    assert main(["eval", "transfer", str(run_dir), str(digits_root), str(out), "--protocol", "moco_lincls",
                 "--epochs", "5", "--batch-size", "256", "--device", "cpu", "--quiet"]) == 0
    rep = _json(out / "transfer.json")
    pr = rep["protocol"]
    assert rep["protocol_name"] == "moco_lincls" and rep["epochs"] == 5
    # MoCo lincls: lr 30, x0.1 at 60% / 80% of training, no L2 on the features, frozen backbone in eval mode
    assert (pr["lr"], pr["milestones"], pr["gamma"], pr["l2_normalize"]) == (30.0, [3, 4], 0.1, False)
    assert pr["frozen_backbone_eval_mode"] is True and pr["train_transform"] == "standard"
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    lr_by_epoch = {r["epoch"]: r["lr"] for r in recs if "lr" in r}
    assert lr_by_epoch == pytest.approx({0: 30.0, 1: 30.0, 2: 30.0, 3: 3.0, 4: 0.3})   # x0.1 at epochs 3 and 4
    init = torch.load(run_dir / "last.pt", weights_only=False)["model"]
    after = torch.load(out / "last.pt", weights_only=False)["model"]
    assert torch.equal(init["student.conv1.weight"], after["student.conv1.weight"])
    capsys.readouterr()
    assert main(["eval", "transfer", str(run_dir), str(digits_root), str(tmp_path / "bad"), "--protocol",
                 "moco_lincls", "--mode", "finetune", "--device", "cpu", "--quiet"]) == 2
    assert "use mode='linear'" in capsys.readouterr().err
