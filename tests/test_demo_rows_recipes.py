"""The recipes of the KD and VkD demo rows: every run of a row resolves to the intended config (the
variants differ only in their loss terms), and the CPU-sized students build and run a forward pass.

The rows' overrides are YAML strings, so the resolved model kwargs are checked here (``{patch_size:8}``
without a space used to parse as a key ``"patch_size:8"`` and keep the preset's patch 4; the config
now rejects such keys, see tests/test_config.py).
"""
from pathlib import Path

import torch

from kdforge.config import load_config
from kdforge.demo import core
from kdforge.demo.rows import kd as kd_row
from kdforge.demo.rows import vkd as vkd_row
from kdforge.engine.trainer import RunResult, build_method

NO_DATA = ["data.require_root=false", "teacher.checkpoint=null"]


def _record_runs(row, tmp_path, quick=False):
    """Run ``row.run`` with a stub trainer; -> {run name: resolved Config}."""
    calls = {}

    def fake_train(self, preset, overrides, name, evaluate=True):
        calls[name] = load_config(preset, list(overrides) + NO_DATA)
        return RunResult(run_dir=tmp_path / name, step=1, epoch=1, best=None, params=1000, seconds=1.0), \
            {"test/acc1": 50.0}

    ctx = core.DemoContext(out=tmp_path, data_root=tmp_path / "digits", quick=quick,
                           seeds=(0,) if quick else (0, 1, 2))
    orig = core.DemoContext.train
    core.DemoContext.train = fake_train
    try:
        rows = row.run(ctx)
    finally:
        core.DemoContext.train = orig
    return calls, rows


def _shared(cfg):
    """The parts of a config that every variant of a row must share."""
    return (cfg.model.name, tuple(sorted(cfg.model.kwargs.items())), cfg.data.batch_size, cfg.data.train_transform,
            cfg.optim.name, cfg.optim.lr, cfg.optim.weight_decay, cfg.sched.warmup_epochs, cfg.train.epochs,
            cfg.train.val_every, cfg.train.channels_last)


def _one_recipe(row, tmp_path, n_runs: int, n_rows: int) -> dict:
    """The row's runs (checked: their number, the table's rows, and one shared recipe)."""
    calls, rows = _record_runs(row, tmp_path)
    assert len(calls) == n_runs and len(rows) == n_rows
    shared = {_shared(c) for c in calls.values()}
    assert len(shared) == 1, shared
    return calls


def test_vkd_row_runs_five_variants_on_one_recipe(tmp_path):
    calls = _one_recipe(vkd_row, tmp_path, n_runs=15, n_rows=5)
    cfg = calls["vkd_row/vkd_s0"]
    assert dict(cfg.model.kwargs) == {"patch_size": 8, "embed_dim": 128, "num_heads": 2, "depth": 2}
    assert (cfg.data.batch_size, cfg.data.train_transform, cfg.train.epochs) == (16, "pad_crop", 3)
    assert {c.train.seed for c in calls.values()} == {0, 1, 2}
    terms = {}
    for name, c in calls.items():
        a = c.method_args()
        assert (a.stem, a.stem_width, a.norm, a.temperature, a.ce_weight) == ("conv", 16, "layernorm", 1.0, 1.0)
        terms.setdefault(name.split("/")[1].rsplit("_s", 1)[0], set()).add(
            (a.alpha, a.gamma, a.projector, a.scale_shift))
    assert terms == {"scratch": {(0.0, 0.0, "orthogonal", False)}, "logit": {(0.0, 1.0, "orthogonal", False)},
                     "linear": {(float(vkd_row.ALPHA), 1.0, "linear", False)},
                     "vkd": {(float(vkd_row.ALPHA), 1.0, "orthogonal", False)},
                     "vkd_ss": {(float(vkd_row.ALPHA), 1.0, "orthogonal", True)}}
    assert vkd_row.ALPHA > 1


def test_kd_row_compares_kd_with_scratch_on_one_recipe(tmp_path):
    calls = _one_recipe(kd_row, tmp_path, n_runs=6, n_rows=2)
    cfg = calls["kd_row/kd_t1_s0"]
    assert cfg.model.name == "kdf_vit_micro"
    assert dict(cfg.model.kwargs) == {"patch_size": 8, "global_pool": "avg", "class_token": False}
    assert (cfg.data.batch_size, cfg.data.train_transform, cfg.train.epochs) == (32, "none", 8)
    assert (cfg.optim.name, cfg.optim.lr, cfg.optim.weight_decay) == ("adamw", 2e-3, 0.05)
    assert {c.method_name for c in calls.values()} == {"supervised", "kd"}
    a = cfg.method_args()
    assert (a.temperature, a.alpha) == (1.0, 0.9)


def test_quick_rows_use_one_seed(tmp_path):
    for row, n in ((vkd_row, len(vkd_row.VARIANTS)), (kd_row, 2)):
        calls, _ = _record_runs(row, tmp_path / row.__name__.rsplit(".", 1)[1], quick=True)
        assert len(calls) == n


def test_row_students_build_and_forward(tmp_path):
    calls, _ = _record_runs(vkd_row, tmp_path / "v")
    cfg = calls["vkd_row/vkd_s0"]
    cfg.method["teacher_dim"] = 256   # no teacher here: the projector width of kdf_resnet_wide
    m = build_method(cfg, 10, with_teacher=False)
    z_cls, z_dist, feat = m.student_outputs(torch.randn(2, 3, 32, 32))
    assert z_cls.shape == z_dist.shape == (2, 10) and feat.shape == (2, 128)
    assert type(m.student.patch_embed).__name__ == "ConvStem" and m.student.patch_embed.num_patches == 16
    assert m.projector(feat).shape == (2, 256)

    calls, _ = _record_runs(kd_row, tmp_path / "k")
    m = build_method(calls["kd_row/scratch_s0"], 10, with_teacher=False)
    assert m.student.num_prefix_tokens == 0 and m.student.patch_embed.num_patches == 16
    assert m.student(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert Path(tmp_path).is_dir()
