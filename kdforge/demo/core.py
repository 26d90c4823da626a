"""The demo driver: write digits, train the shared teacher CNN once, run each method's row, and
print/write one report (``RUN/report.md`` + ``RUN/report.json``).

A row module ``kdforge/demo/rows/<name>.py`` exposes ``TITLE`` and ``run(ctx) -> list[DemoRow]``.
It trains through :meth:`DemoContext.train` (the ordinary trainer on a preset plus overrides), so
the demo exercises exactly what users run.
"""
from __future__ import annotations

import importlib
import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

ROWS = ["kd", "vkd", "kdep", "dense", "moco", "smkd", "attnprobe"]
CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@dataclass
class DemoRow:
    section: str
    variant: str
    metrics: dict[str, Any]           # name -> value (float or preformatted string)
    params: Optional[int] = None
    seconds: Optional[float] = None
    note: str = ""


@dataclass
class DemoContext:
    out: Path
    data_root: Path
    teacher_run: Optional[Path] = None
    teacher_acc: Optional[float] = None
    seeds: tuple[int, ...] = (0, 1, 2)
    quick: bool = False
    extra: dict = field(default_factory=dict)

    def preset(self, rel: str) -> str:
        """Path of a bundled preset, e.g. ``ctx.preset('kd/digits_cpu.yaml')``."""
        p = CONFIGS / rel
        if not p.is_file():
            raise FileNotFoundError(f"demo preset {p} missing")
        return str(p)

    def train(self, preset: str, overrides: list[str], name: str, evaluate: bool = True):
        """Train ``preset`` + overrides into ``OUT/name``; returns (RunResult, test metrics)."""
        from kdforge.config import load_config
        from kdforge.engine.trainer import evaluate_run, train
        run_dir = self.out / name
        base = [f"data.root={self.data_root}", f"out={run_dir}", "train.progress=false", "resume=true"]
        if self.teacher_run is not None:
            base.append(f"teacher.checkpoint={self.teacher_run}")
        cfg = load_config(preset, base + list(overrides))
        if not cfg.teacher:
            cfg.teacher = None
        if (run_dir / "last.pt").exists():  # a finished run from an earlier demo: reuse it
            import torch
            ck = torch.load(run_dir / "last.pt", map_location="cpu", weights_only=False)
            if ck.get("epoch") == cfg.train.epochs:
                from kdforge.engine.trainer import RunResult
                res = RunResult(run_dir=run_dir, step=ck["step"], epoch=ck["epoch"], best=ck.get("best"),
                                params=sum(v.numel() for k, v in ck["model"].items() if k.startswith("student.")
                                           and "running_" not in k and "num_batches" not in k),
                                seconds=float(json.loads((run_dir / "demo_time.json").read_text())["seconds"])
                                if (run_dir / "demo_time.json").exists() else 0.0)
                return res, (evaluate_run(run_dir, "test") if evaluate else {})
        res = train(cfg)
        (run_dir / "demo_time.json").write_text(json.dumps({"seconds": res.seconds}))
        return res, (evaluate_run(run_dir, "test") if evaluate else {})

    def train_seeds(self, preset: str, overrides: list[str], name: str) -> tuple[list[dict], float, Optional[int]]:
        """:meth:`train` once per demo seed (``train.seed=S`` into ``OUT/name_sS``).

        Returns (test metrics of each seed, mean training seconds, parameter count).
        """
        tests, secs, params = [], 0.0, None
        for seed in self.seeds:
            res, test = self.train(preset, list(overrides) + [f"train.seed={seed}"], f"{name}_s{seed}")
            tests.append(test)
            secs += res.seconds
            params = res.params
        return tests, secs / len(self.seeds), params


def mean_std(values: list[float], digits: int = 1) -> str:
    """``"m ± s"`` (population std) with ``digits`` decimals; a single value alone."""
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.pstdev(values):.{digits}f}"


def render(rows: list[DemoRow]) -> str:
    """Markdown: one table per section (sections have different metrics)."""
    out = []
    sections: dict[str, list[DemoRow]] = {}
    for r in rows:
        sections.setdefault(r.section, []).append(r)
    for sec, rs in sections.items():
        keys = []
        for r in rs:
            keys += [k for k in r.metrics if k not in keys]
        out.append(f"### {sec}\n")
        out.append("| variant | " + " | ".join(keys) + " | params | train time |")
        out.append("|---|" + "---|" * len(keys) + "---|---|")
        for r in rs:
            vals = []
            for k in keys:
                v = r.metrics.get(k, "")
                vals.append(f"{v:.2f}" if isinstance(v, float) else str(v))
            params = f"{r.params / 1e6:.2f} M" if r.params else ""
            secs = f"{r.seconds:.0f} s" if r.seconds is not None else ""
            out.append(f"| {r.variant}{' — ' + r.note if r.note else ''} | " + " | ".join(vals)
                       + f" | {params} | {secs} |")
        out.append("")
    return "\n".join(out)


def prepare_teacher(ctx: DemoContext, epochs: int) -> None:
    res, test = ctx.train(ctx.preset("supervised/digits_cpu.yaml"),
                          ["model.name=kdf_resnet_wide", f"train.epochs={epochs}"], "teacher_cnn")
    ctx.teacher_run = res.run_dir
    ctx.teacher_acc = test["test/acc1"]
    ctx.extra["teacher_row"] = DemoRow("Teacher", "ResNet-18 wide (kdf_resnet_wide), supervised",
                                       {"test acc (%)": test["test/acc1"]}, res.params, res.seconds)


def run_demo(out: str | Path = "runs/demo", rows: Optional[list[str]] = None, quick: bool = False,
             seeds: Optional[list[int]] = None) -> tuple[list[DemoRow], Path]:
    from kdforge.data.digits import write_digits
    out = Path(out).resolve()  # rows pass paths inside OUT as overrides; relative ones would resolve against data.root
    out.mkdir(parents=True, exist_ok=True)
    data_root = write_digits(out / "digits")
    ctx = DemoContext(out=out, data_root=data_root, quick=quick,
                      seeds=tuple(seeds) if seeds else ((0,) if quick else (0, 1, 2)))
    t0 = time.time()
    prepare_teacher(ctx, 6 if quick else 20)
    results: list[DemoRow] = [ctx.extra["teacher_row"]]
    failures = []
    for name in rows or ROWS:
        try:
            mod = importlib.import_module(f"kdforge.demo.rows.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"kdforge.demo.rows.{name}":
                continue  # row not in this build
            raise
        t = time.time()
        print(f"[demo] {name}: {mod.TITLE} ...", flush=True)
        try:
            got = mod.run(ctx)
        except Exception as e:  # one broken row must not hide the others
            failures.append(f"{name}: {type(e).__name__}: {e}")
            print(f"[demo] {name} FAILED: {type(e).__name__}: {e}", flush=True)
            continue
        results += got
        print(f"[demo] {name} done in {time.time() - t:.0f} s", flush=True)
    total = time.time() - t0
    text = (f"# kdforge demo report\n\nBundled scikit-learn digits (1,797 real 8×8 images, upscaled to 32 px), "
            f"CPU. Seeds: {list(ctx.seeds)}. Total time {total:.0f} s.\n\n" + render(results))
    if failures:
        text += "\n## Failed rows\n\n" + "\n".join(f"- {f}" for f in failures) + "\n"
    (out / "report.md").write_text(text)
    (out / "report.json").write_text(json.dumps([r.__dict__ for r in results], indent=2, default=str))
    if failures:
        raise RuntimeError("demo rows failed: " + "; ".join(failures))
    return results, out / "report.md"
