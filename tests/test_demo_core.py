"""The demo driver: rows run in order, a failing row is reported without hiding the others, and the
report table lists every row's metrics (the rows themselves are exercised by their method's tests)."""
import json
import sys
import types

import pytest

from kdforge.demo import core


def _row_module(name, fn):
    mod = types.ModuleType(f"kdforge.demo.rows.{name}")
    mod.TITLE = name
    mod.run = fn
    sys.modules[mod.__name__] = mod
    return mod


def test_run_demo_reports_rows_and_failures(tmp_path, monkeypatch):
    def fake_teacher(ctx, epochs):
        ctx.teacher_run, ctx.teacher_acc = tmp_path / "t", 99.0
        ctx.extra["teacher_row"] = core.DemoRow("Teacher", "cnn", {"test acc (%)": 99.0}, 1000, 1.0)

    monkeypatch.setattr(core, "prepare_teacher", fake_teacher)
    import kdforge.data.digits as digits
    monkeypatch.setattr(digits, "write_digits", lambda out: out)
    _row_module("zz_good", lambda ctx: [core.DemoRow("Good", "v1", {"acc (%)": 12.5, "note": "x"}, 2_000_000, 3.0)])

    def boom(ctx):
        raise ValueError("broken row")
    _row_module("zz_bad", boom)
    try:
        with pytest.raises(RuntimeError, match="zz_bad: ValueError: broken row"):
            core.run_demo(tmp_path / "demo", rows=["zz_good", "zz_bad"], quick=True)
    finally:
        sys.modules.pop("kdforge.demo.rows.zz_good")
        sys.modules.pop("kdforge.demo.rows.zz_bad")
    text = (tmp_path / "demo" / "report.md").read_text()
    assert "| v1 | 12.50 | x | 2.00 M | 3 s |" in text and "### Good" in text and "### Teacher" in text
    assert "## Failed rows" in text and "broken row" in text
    rows = json.loads((tmp_path / "demo" / "report.json").read_text())
    assert [r["variant"] for r in rows] == ["cnn", "v1"]


def test_demo_output_path_is_absolute(tmp_path, monkeypatch):
    seen = {}

    def fake_teacher(ctx, epochs):
        seen["out"] = ctx.out
        ctx.extra["teacher_row"] = core.DemoRow("Teacher", "cnn", {}, None, None)
    monkeypatch.setattr(core, "prepare_teacher", fake_teacher)
    import kdforge.data.digits as digits
    monkeypatch.setattr(digits, "write_digits", lambda out: out)
    monkeypatch.chdir(tmp_path)
    core.run_demo("rel/demo", rows=["zz_missing_row"], quick=True)   # an absent row module is skipped
    assert seen["out"].is_absolute() and seen["out"] == (tmp_path / "rel" / "demo")
