"""Demo row: SSL-small — the MoCo-v2 baseline recipe vs the improved recipe on the same small CNN.

Both runs use ``kdf_resnet_narrow`` (0.7 M parameters), the same epochs, queue, key momentum and
per-image learning rate; they differ only in the recipe knobs of the paper (temperature 0.2 → 0.1,
simple → wide head, MoCo-v2 → stronger colour jitter / greyscale). Each trained run is measured with
the paper's metric set (:func:`kdforge.methods.moco_report.ssl_report`) on the test split: Best-NN
(k chosen on val), linear probe (weight decay chosen on val), instance retrieval top-1 (d-sd),
alignment (D-SD) and uniformity (D). Lower alignment / uniformity is better.
"""
from __future__ import annotations

from kdforge.demo.core import DemoContext, DemoRow, mean_std

TITLE = "SSL-small: MoCo-v2 baseline vs improved recipe on a small CNN (digits)"

RECIPES = (("MoCo-v2 baseline (T 0.2, simple head, MoCo-v2 aug)", "moco/digits_baseline_cpu.yaml", "baseline"),
           ("improved recipe (T 0.1, wide head, cj 1.0, grey 0.5)", "moco/digits_improved_cpu.yaml", "improved"))


def run(ctx: DemoContext) -> list[DemoRow]:
    from kdforge.methods.moco_report import ssl_report
    epochs = 1 if ctx.quick else 4   # 2 recipes x 3 seeds: ~55 s on the 2-core AMD EPYC of 2026-12-01
    seeds = ctx.seeds
    rows = []
    for variant, preset, tag in RECIPES:
        vals: dict[str, list[float]] = {}
        secs, params = 0.0, None
        for seed in seeds:
            res, _ = ctx.train(ctx.preset(preset), [f"train.epochs={epochs}", f"train.seed={seed}",
                                                    "train.val_every=0", "data.num_workers=1"],
                               f"moco_row/{tag}_s{seed}", evaluate=False)
            rep = ssl_report(res.run_dir, ctx.data_root, k_max=51, probe_wd_grid=(1e-5, 1e-3), probe_max_iter=100,
                             seed=seed)
            for k, v in (("Best-NN (%)", rep["best_nn"]), ("linear probe (%)", rep["linear_probe"]),
                         ("retrieval top-1 (%)", rep["instdisc_d_sd"][0]), ("align D-SD ↓", rep["align_d_sd"]),
                         ("uniformity D ↓", rep["uniform_d"])):
                vals.setdefault(k, []).append(v)
            secs += res.seconds
            params = res.params
        metrics = {k: (mean_std(v) if "%" in k else (f"{sum(v) / len(v):.3f}")) for k, v in vals.items()}
        rows.append(DemoRow("SSL-small (MoCo, kdf_resnet_narrow)", variant, metrics, params,
                            secs / len(seeds), note=f"{epochs} epochs, seed {list(seeds)}"))
    return rows
