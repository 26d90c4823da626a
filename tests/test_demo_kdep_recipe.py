"""The KDEP demo row's recipe: the dense row reuses exactly the row's seed-0 KDEP pre-training run, and the
comparisons are budget-matched (same fine-tuning for every variant; supervised 100 % pre-training with the
same number of steps and about the same number of images seen as KDEP). No training happens here."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from kdforge.demo.core import DemoContext
from kdforge.demo.rows import dense as dense_row
from kdforge.demo.rows import kdep as kdep_row


class _RecordingCtx(DemoContext):
    def train(self, preset, overrides, name, evaluate=True):
        self.calls.append((preset, list(overrides), name))
        return SimpleNamespace(run_dir=self.out / name, seconds=0.0, params=1), {"test/acc1": 50.0}


@pytest.fixture
def ctx(tmp_path, monkeypatch):
    monkeypatch.setattr(kdep_row, "prepare", lambda c: (tmp_path / "sub", tmp_path / "svd.safetensors"))
    c = _RecordingCtx(out=tmp_path, data_root=tmp_path / "digits", teacher_run=tmp_path / "teacher")
    c.calls = []
    return c


@pytest.mark.parametrize("quick", [False, True])
def test_dense_row_reuses_the_kdep_rows_seed0_pretraining(ctx, quick):
    ctx.quick = quick
    kdep_row.run(ctx)
    row_call = next(c for c in ctx.calls if c[2] == "kdep_row/pre_kdep_s0")
    ctx.calls.clear()
    dense_row._kdep_backbone(ctx)
    assert ctx.calls == [row_call]


def _override(over, key):
    vals = [o.split("=", 1)[1] for o in over if o.startswith(key + "=")]
    return vals[-1]


def test_budgets_are_matched(ctx):
    kdep_row.run(ctx)
    calls = {name: over for _, over, name in ctx.calls}
    ft = {k: [o for o in v if not o.startswith("init_from=")] for k, v in calls.items() if "/ft_" in k}
    assert len({tuple(v) for k, v in ft.items() if k.endswith("_s0")}) == 1      # one fine-tuning recipe
    ep = kdep_row._budget(False)
    n_sub, n_full = 109, 1078                                                      # digits 10 % / 100 % train
    kd, reg, sup = calls["kdep_row/pre_kdep_s0"], calls["kdep_row/pre_regressor_s0"], calls["kdep_row/pre_sup100_s0"]
    for over in (kd, reg):
        assert _override(over, "train.epochs") == str(ep["kdep"])
        assert _override(over, "data.batch_size") == str(ep["kdep_bs"])
    assert "method.alignment=regressor" in reg and "method.alignment=regressor" not in kd
    steps = lambda n, bs, e: -(-n // bs) * e                                       # noqa: E731
    s_kd = steps(n_sub, ep["kdep_bs"], ep["kdep"])
    s_sup = steps(n_full, ep["sup100_bs"], ep["sup100"])
    assert abs(s_kd - s_sup) / s_kd < 0.05
    assert abs(n_sub * ep["kdep"] - n_full * ep["sup100"]) / (n_sub * ep["kdep"]) < 0.05
    assert "teacher=null" in sup
    assert not any(k.startswith("kdep_row/pre_sup10_") for k in calls)            # no re-use of the ft labels
