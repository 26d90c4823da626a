"""Demo row: Hinton KD from the teacher CNN into a 4-block ViT (8 px patches) vs the same ViT from scratch.

Both students share the architecture, recipe and seeds; only the loss differs (CE vs
``0.1 · CE + 0.9 · KL(τ = 1)``). The CPU-sized recipe:

* 8 px patches on the 32 px digits (16 tokens, 4x cheaper steps than the preset's patch 4);
* global average pooling of the patch tokens instead of a class token (``global_pool: avg,
  class_token: false``): on 3 seeds, 8 epochs, scratch 86.2 ± 1.7 % with it vs 67.2 ± 11.6 % with
  the class token;
* no augmentation (``data.train_transform=none``): with the presets' pad-and-crop the same 8 epochs
  give scratch 43.6 ± 4.0 %, KD 45.8 ± 3.7 %;
* batch 32 (33 steps per epoch), 8 epochs, no per-epoch validation (the last epoch is scored on
  the test split), channels-last tensors (the teacher CNN's forward is ~25 % cheaper on CPU).

Measured 2026-12-01 with ``OMP_NUM_THREADS=1 kdforge demo --rows kd`` (1 thread of the 2-core
machine, seeds 0, 1, 2): scratch 86.2 ± 1.7 %, KD (T=1, α=0.9) 86.9 ± 1.2 %, i.e. KD matches
scratch (within the seed spread); row 52 s. Same recipe with T=4: 84.4 ± 1.6 %, T=2: 80.7 ± 7.0 %,
T=1 α=0.5: 86.7 ± 1.3 %. The previous recipe (class token, pad-and-crop, batch 64, 15 epochs)
gave scratch 54.5 ± 7.3 %, KD 45.0 ± 2.8 % in 100 s.
"""
from __future__ import annotations

from kdforge.demo.core import DemoContext, DemoRow, mean_std

TITLE = "logit KD: teacher CNN -> tiny ViT (scratch vs KD)"
#: the CPU-sized student and recipe shared by both variants (see the module docstring)
COMMON = ["model.kwargs={patch_size: 8, global_pool: avg, class_token: false}", "data.batch_size=32",
          "data.train_transform=none", "train.val_every=0", "train.channels_last=true"]

VARIANTS = (
    ("scratch", "tiny ViT from scratch (CE)", "supervised/digits_cpu.yaml",
     ["model.name=kdf_vit_micro", "optim.name=adamw", "optim.lr=2e-3", "optim.weight_decay=0.05"]),
    ("kd_t1", "tiny ViT + logit KD (T=1, α=0.9)", "kd/digits_cpu.yaml", ["method.temperature=1"]),
)


def run(ctx: DemoContext) -> list[DemoRow]:
    epochs = 2 if ctx.quick else 8
    rows = []
    for tag, variant, preset, extra in VARIANTS:
        tests, secs, params = ctx.train_seeds(ctx.preset(preset), COMMON + extra + [f"train.epochs={epochs}"],
                                              f"kd_row/{tag}")
        rows.append(DemoRow("Logit KD (Hinton)", variant, {"test acc (%)": mean_std([t["test/acc1"] for t in tests])},
                            params, secs))
    return rows
