"""Demo row: SMKD on digits split by class — few-shot accuracy on novel digits after phase 1 (iBOT) and
after phase 2 (supervised masked knowledge distillation on the base digits).

Data: ``kdforge data digits-fewshot`` (base 0–4 for training, novel 7–9 for the test episodes). Both
phases train the 4-block ViT of ``configs/{ibot,smkd}/digits_cpu.yaml``; phase 2 starts from the
phase-1 run (``init_from``). Each phase is scored on seeded test episodes (3-way, 1- and 5-shot,
15 queries, prototype classifier on the EMA teacher's CLS ⊕ attention-weighted patch feature), as
the mean over the episodes; the table shows the mean ± std of that over the demo's training seeds (the
episodes are the same for every seed and phase; their own 95 % interval is about ± 0.7 points).
"""
from __future__ import annotations

from kdforge.demo.core import DemoContext, DemoRow, mean_std

TITLE = "SMKD: iBOT phase 1 -> supervised masked KD phase 2, few-shot on novel digits"
EPISODES = 1000


def run(ctx: DemoContext) -> list[DemoRow]:
    from kdforge.data.converters.digits_fewshot import write_digits_fewshot
    from kdforge.methods.ibot import evaluate_fewshot_run
    root = write_digits_fewshot(ctx.out / "digits_fewshot")
    e1, e2 = (2, 1) if ctx.quick else (4, 2)
    phases = (("phase1", "phase 1: iBOT self-distillation (no labels)", "ibot/digits_cpu.yaml", e1),
              ("phase2", "phase 2: SMKD, base-class labels (from phase 1)", "smkd/digits_cpu.yaml", e2))
    accs: dict[str, dict[str, list[float]]] = {tag: {} for tag, *_ in phases}
    secs: dict[str, float] = {tag: 0.0 for tag, *_ in phases}
    params = {}
    for seed in ctx.seeds:
        # no val split during these short runs (episodes are scored on the novel test digits afterwards);
        # the demo's teacher CNN is not used by this method
        common = [f"data.root={root}", "data.val_split=null", f"train.seed={seed}", "teacher=null"]
        prev = None
        for tag, _, preset, epochs in phases:
            over = common + [f"train.epochs={epochs}"] + ([f"init_from={prev}"] if prev is not None else [])
            res, _ = ctx.train(ctx.preset(preset), over, f"smkd_row/{tag}_s{seed}", evaluate=False)
            m = evaluate_fewshot_run(res.run_dir, "test", which="last", fewshot_episodes=EPISODES,
                                     fewshot_shots=[1, 5], fewshot_queries=15, fewshot_seed=0)
            ways = next(k for k in m if k.endswith("way_1shot")).split("/")[1].split("way")[0]
            for shot in (1, 5):
                accs[tag].setdefault(f"{ways}-way {shot}-shot (%)", []).append(m[f"test/{ways}way_{shot}shot"])
            secs[tag] += res.seconds
            params[tag] = res.params
            prev = res.run_dir
    return [DemoRow("SMKD (few-shot ViT, novel digits 7-9)", label,
                    {k: mean_std(v) for k, v in accs[tag].items()}, params[tag], secs[tag] / len(ctx.seeds),
                    note=f"{epochs} epochs, {EPISODES} episodes, seeds {list(ctx.seeds)}")
            for tag, label, _, epochs in phases]
