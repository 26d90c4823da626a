"""Demo row: Hinton KD from the teacher CNN into a 4-block ViT (8 px patches) vs the same ViT from scratch."""
from __future__ import annotations

from kdforge.demo.core import DemoContext, DemoRow, mean_std

TITLE = "logit KD: teacher CNN -> tiny ViT (scratch vs KD)"
#: 8 px patches on the 32 px digits (16 tokens): 4x cheaper steps than patch 4, so more epochs fit the budget
PATCH8 = "model.kwargs={patch_size: 8}"


def run(ctx: DemoContext) -> list[DemoRow]:
    epochs = 4 if ctx.quick else 15   # 6 runs of ~20 s on 2 cores: the foundation demo stays under 5 min
    rows = []
    for variant, preset, extra in (
            ("tiny ViT from scratch (CE)", "supervised/digits_cpu.yaml",
             ["model.name=kdf_vit_micro", "optim.name=adamw", "optim.lr=2e-3", "optim.weight_decay=0.05"]),
            # T=1 rather than the preset's T=4 for this 15-epoch run: measured on 3 seeds (2026-12-01),
            # T=4 31.9 ± 4.5 %, T=1 47.8 ± 10.0 %, scratch 54.5 ± 6.4 %: in this budget KD does not yet
            # beat the scratch ViT (an open tuning question, see the README)
            ("tiny ViT + logit KD (T=1, α=0.9)", "kd/digits_cpu.yaml", ["method.temperature=1"])):
        accs, secs, params = [], 0.0, None
        for seed in ctx.seeds:
            tag = "scratch" if "scratch" in variant else "kd_t1"
            over = extra + [PATCH8, f"train.epochs={epochs}", f"train.seed={seed}", "train.val_every=0"]
            res, test = ctx.train(ctx.preset(preset), over, f"kd_row/{tag}_s{seed}")
            accs.append(test["test/acc1"])
            secs += res.seconds
            params = res.params
        rows.append(DemoRow("Logit KD (Hinton)", variant, {"test acc (%)": mean_std(accs)}, params,
                            secs / len(ctx.seeds)))
    return rows
