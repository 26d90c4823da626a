"""Demo row: SMKD on digits split by class — few-shot accuracy on novel digits after phase 1 (iBOT) and
after phase 2 (supervised masked knowledge distillation on the base digits).

Data: ``kdforge data digits-fewshot`` (base 0–4 for training, novel 7–9 for the test episodes). Both
phases train the 4-block ViT of ``configs/{ibot,smkd}/digits_cpu.yaml``; phase 2 starts from the
phase-1 run (``init_from``). Each phase is scored on seeded test episodes (3-way, 1- and 5-shot,
15 queries, prototype classifier on the EMA teacher's CLS ⊕ attention-weighted patch feature), as
mean ± 95% interval over the episodes. One training seed (the first of the demo's) keeps the row
within its time budget.
"""
from __future__ import annotations

from kdforge.demo.core import DemoContext, DemoRow

TITLE = "SMKD: iBOT phase 1 -> supervised masked KD phase 2, few-shot on novel digits"
EPISODES = 1000


def _fmt(metrics: dict, key: str) -> str:
    return f"{metrics[key]:.1f} ± {metrics[key + '_ci95']:.1f}"


def run(ctx: DemoContext) -> list[DemoRow]:
    from kdforge.data.converters.digits_fewshot import write_digits_fewshot
    from kdforge.methods.ibot import evaluate_fewshot_run
    root = write_digits_fewshot(ctx.out / "digits_fewshot")
    e1, e2 = (2, 1) if ctx.quick else (4, 2)
    seed = ctx.seeds[0]
    # no val split during these short runs (episodes are scored on the novel test digits afterwards);
    # the demo's teacher CNN is not used by this method
    common = [f"data.root={root}", "data.val_split=null", f"train.seed={seed}", "teacher=null"]
    rows = []
    prev = None
    for tag, phase, preset, epochs in (
            ("phase1", "phase 1: iBOT self-distillation (no labels)", "ibot/digits_cpu.yaml", e1),
            ("phase2", "phase 2: SMKD, base-class labels (from phase 1)", "smkd/digits_cpu.yaml", e2)):
        over = common + [f"train.epochs={epochs}"] + ([f"init_from={prev}"] if prev is not None else [])
        res, _ = ctx.train(ctx.preset(preset), over, f"smkd_row/{tag}_s{seed}", evaluate=False)
        m = evaluate_fewshot_run(res.run_dir, "test", which="last", fewshot_episodes=EPISODES,
                                 fewshot_shots=[1, 5], fewshot_queries=15)
        ways = next(k for k in m if k.endswith("way_1shot")).split("/")[1].split("way")[0]
        rows.append(DemoRow("SMKD (few-shot ViT, novel digits 7-9)", phase,
                            {f"{ways}-way 1-shot (%)": _fmt(m, f"test/{ways}way_1shot"),
                             f"{ways}-way 5-shot (%)": _fmt(m, f"test/{ways}way_5shot")},
                            res.params, res.seconds,
                            note=f"{epochs} epochs, {EPISODES} episodes, seed {seed}"))
        prev = res.run_dir
    return rows
