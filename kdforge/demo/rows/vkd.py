"""Demo row: VkD on digits — teacher CNN -> tiny distilled ViT (class + distillation tokens).

Four students with the same architecture, recipe and seeds, all trained by the ``vkd`` method so
that only the switched terms differ:

* from scratch: CE on both heads (α = 0, γ = 0);
* logit KD: CE on the class head + soft KL (τ = 1) on the distillation head (α = 0);
* linear-projector feature KD (FitNet-style hint): + α · SmoothL1(W s, LN(t)), W unconstrained;
* VkD: the same with W semi-orthogonal (OrthogonalProjector).

Test accuracy (%) is the mean ± population std over ``ctx.seeds``; evaluation averages both heads.
To fit the demo budget (≤ 90 s on 2 CPU cores for all 12 runs) the student is a 2-block, 64-wide
DeiT with 8×8 patches on the 32-px digits (16 tokens), trained for a few epochs without
augmentation and without per-epoch validation (the last epoch is scored on the test split).
"""
from __future__ import annotations

from kdforge.demo.core import DemoContext, DemoRow, mean_std

TITLE = "VkD: teacher CNN -> tiny distilled ViT (scratch, logit KD, linear-projector KD, VkD)"

SECTION = "VkD (orthogonal-projection feature KD)"

#: the CPU-sized student and recipe shared by the four variants
COMMON = ["model.kwargs={patch_size: 8, embed_dim: 64, num_heads: 2, depth: 2}", "data.batch_size=32",
          "data.train_transform=none", "train.val_every=0", "optim.lr=3e-3", "sched.warmup_epochs=0.5"]

VARIANTS = (
    ("scratch", "tiny DeiT from scratch (CE, α=0, γ=0)", ["method.alpha=0", "method.gamma=0"]),
    ("logit", "logit KD on the dist head (γ=1, τ=1, α=0)", ["method.alpha=0"]),
    ("linear", "+ feature KD, linear projector (FitNet hint)", ["method.projector=linear"]),
    ("vkd", "+ feature KD, orthogonal projector (VkD)", ["method.projector=orthogonal"]),
)


def run(ctx: DemoContext) -> list[DemoRow]:
    epochs = 2 if ctx.quick else 4
    rows = []
    for tag, variant, extra in VARIANTS:
        accs, secs, params = [], 0.0, None
        for seed in ctx.seeds:
            res, test = ctx.train(ctx.preset("vkd/digits_cpu.yaml"),
                                  COMMON + extra + [f"train.epochs={epochs}", f"train.seed={seed}"],
                                  f"vkd_row/{tag}_s{seed}")
            accs.append(test["test/acc1"])
            secs += res.seconds
            params = res.params
        rows.append(DemoRow(SECTION, variant, {"test acc (%)": mean_std(accs)}, params, secs / len(ctx.seeds),
                            note="" if tag != "vkd" else "projector stays orthogonal (wd 0.05)"))
    return rows
