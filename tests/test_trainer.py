"""Trainer guarantees: exact resume, non-finite loss guard, signals, atomic checkpoints, DDP."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from kdforge.config import load_config
from kdforge.engine.checkpoint import atomic_save
from kdforge.engine.trainer import NonFiniteLossError, train

PRESET = "configs/supervised/digits_cpu.yaml"


def _cfg(root, out, tiny, **kw):
    base = {"model.name": "kdf_vit_micro", "optim.name": "adamw", "optim.lr": 1e-3, "train.epochs": 2,
            "data.train_transform": "pad_crop", "sched.warmup_epochs": 0.5}
    base.update(kw)
    return load_config(PRESET, tiny(root, out, **base))


def _student(run):
    ck = torch.load(Path(run) / "last.pt", weights_only=False)
    return {k: v for k, v in ck["model"].items()}, ck


def test_interrupted_and_resumed_run_matches_uninterrupted(digits_root, tmp_path, tiny):
    full = train(_cfg(digits_root, tmp_path / "full", tiny))
    # stop mid-epoch 1 (step 5 of 33 per epoch), then resume to the end
    part = train(_cfg(digits_root, tmp_path / "part", tiny, **{"train.max_steps": 5}))
    assert part.stopped_early and part.step == 5
    _, ck = _student(tmp_path / "part")
    assert ck["epoch"] == 0 and ck["batch_in_epoch"] == 5
    resumed = train(_cfg(digits_root, tmp_path / "part", tiny, resume=True))
    assert resumed.step == full.step
    a, _ = _student(tmp_path / "full")
    b, _ = _student(tmp_path / "part")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)


def test_resume_at_epoch_boundary_matches(digits_root, tmp_path, tiny):
    full = train(_cfg(digits_root, tmp_path / "full", tiny, **{"train.epochs": 2}))
    train(_cfg(digits_root, tmp_path / "part", tiny, **{"train.epochs": 2, "train.max_steps": full.step // 2}))
    train(_cfg(digits_root, tmp_path / "part", tiny, **{"train.epochs": 2, "resume": True}))
    a, _ = _student(tmp_path / "full")
    b, _ = _student(tmp_path / "part")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)


def test_nan_loss_stops_with_step_terms_and_checkpoint(digits_root, tmp_path, tiny):
    out = tmp_path / "nan"
    train(_cfg(digits_root, out, tiny, **{"train.epochs": 1}))
    before = (out / "last.pt").read_bytes()
    # an absurd learning rate blows the loss up in the second epoch
    with pytest.raises(NonFiniteLossError) as e:
        train(_cfg(digits_root, out, tiny, **{"train.epochs": 3, "resume": True, "optim.lr": 1e30,
                                              "optim.name": "sgd", "sched.name": "constant",
                                              "sched.warmup_epochs": 0}))
    msg = str(e.value)
    assert "non-finite loss at step" in msg and "ce=" in msg and str(out / "last.pt") in msg
    assert (out / "last.pt").read_bytes() == before  # the good checkpoint is intact


def test_atomic_save_never_leaves_partial_file(tmp_path):
    target = tmp_path / "last.pt"
    atomic_save({"a": torch.ones(3)}, target)

    class Boom:
        def __reduce__(self):
            raise RuntimeError("disk full")
    with pytest.raises(RuntimeError):
        atomic_save({"a": Boom()}, target)
    assert torch.load(target)["a"].sum() == 3
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_sigterm_writes_checkpoint_and_resume_finishes(digits_root, tmp_path, tiny):
    out = tmp_path / "sig"
    args = tiny(digits_root, out, **{"model.name": "kdf_vit_micro", "train.epochs": 50, "optim.name": "adamw",
                                     "optim.lr": 1e-3})
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "kdforge.cli", "train", PRESET] + args,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and metrics.stat().st_size > 0):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, output
    assert "interrupted at step" in output
    ck = torch.load(out / "last.pt", weights_only=False)
    assert 0 < ck["step"] < 50 * 33
    res = train(load_config(PRESET, args + ["resume=true", "train.epochs=1"]) if ck["epoch"] < 1 else
                load_config(PRESET, args + ["resume=true", f"train.epochs={ck['epoch'] + 1}"]))
    assert res.step > ck["step"]


DDP_SCRIPT = r"""
import sys, torch
from kdforge.config import load_config
from kdforge.engine.trainer import train
args = sys.argv[1:]
train(load_config("configs/supervised/digits_cpu.yaml", args))
"""


@pytest.mark.parametrize("cpu_linear", ["torch", "onednn"])
def test_two_process_gloo_ddp_equals_single_process(digits_root, tmp_path, tiny, cpu_linear):
    common = {"model.name": "kdf_vit_micro", "optim.name": "sgd", "optim.lr": 0.05, "optim.momentum": 0.0,
              "train.epochs": 1, "train.max_steps": 6, "sched.name": "constant", "sched.warmup_epochs": 0,
              "data.val_split": "null", "train.cpu_linear": cpu_linear}
    single = train(load_config(PRESET, tiny(digits_root, tmp_path / "one", **{**common, "data.batch_size": 32})))
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT)
    args = tiny(digits_root, tmp_path / "two", **{**common, "data.batch_size": 16})
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    port = 29517 if cpu_linear == "torch" else 29518
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
                        str(script)] + args, capture_output=True, text=True, env=env, timeout=300,
                       cwd=Path(__file__).resolve().parents[1])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    a = torch.load(tmp_path / "one" / "last.pt", weights_only=False)
    b = torch.load(tmp_path / "two" / "last.pt", weights_only=False)
    assert a["step"] == b["step"] == single.step == 6
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=1e-4, atol=1e-5, msg=k)


def test_resume_takes_hyperparameters_from_the_config_and_state_from_the_checkpoint(digits_root, tmp_path, tiny):
    import json
    out = tmp_path / "hp"
    kw = {"train.epochs": 2, "train.max_steps": 3, "sched.name": "constant", "sched.warmup_epochs": 0,
          "data.val_split": "null", "model.name": "kdf_resnet_narrow"}
    train(_cfg(digits_root, out, tiny, **kw))
    moments = torch.load(out / "last.pt", weights_only=False)["optimizer"]["state"]
    assert moments  # AdamW moments were saved
    kw.pop("train.max_steps")
    train(_cfg(digits_root, out, tiny, resume=True, **{**kw, "optim.lr": 5e-4, "train.max_steps": 4}))
    lrs = [json.loads(line)["lr"] for line in (out / "metrics.jsonl").read_text().splitlines()
           if '"lr"' in line]
    assert lrs[:3] == [pytest.approx(1e-3)] * 3 and lrs[3] == pytest.approx(5e-4)   # the new lr after resume
    ck = torch.load(out / "last.pt", weights_only=False)
    assert ck["optimizer"]["state"][0]["step"] == 4   # moments continued, not restarted
