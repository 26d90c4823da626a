"""Demo row: KDEP data efficiency on digits.

A narrow ResNet-18 (128-d) is pre-trained four ways, then every one is fine-tuned the same way
(full network, supervised, on the labelled 10 % subset) and tested on the digits test split:

* KDEP (SVD + PTS) on 10 % of the training images, labels unused, from the demo's teacher CNN
  (kdf_resnet_wide, 256-d; statistics from ``kdep-svd`` over the same 10 %: 108 images < 256
  dimensions, so 3 passes with the teacher's training augmentation);
* the parametric baseline: a linear (≡ 1×1 conv) regressor to the raw 256-d teacher feature, 10 %;
* supervised pre-training on the same 10 % (labelled) and on 100 % of the training split;
* no pre-training (the fine-tuning recipe alone), for reference.
"""
from __future__ import annotations

from pathlib import Path

from kdforge.demo.core import DemoContext, DemoRow, mean_std

TITLE = "KDEP: feature-KD pre-training on 10% of the images vs supervised pre-training (10% / 100%)"

STUDENT = "kdf_resnet_narrow"


def _budget(quick: bool) -> dict:
    if quick:
        return {"kdep": 12, "sup10": 12, "sup100": 2, "ft": 8}
    return {"kdep": 15, "sup10": 15, "sup100": 2, "ft": 6}   # ~90 s for 3 seeds on 2 cores


def prepare(ctx: DemoContext) -> tuple[Path, Path]:
    """The 10 % subset (seed 0, per class) and the teacher's SVD statistics over it (cached)."""
    from kdforge.align.svd import SVDAligner
    from kdforge.commands.kdep_svd import compute_kdep_svd
    from kdforge.data.converters.subset import make_subset
    base = ctx.out / "kdep_row"
    sub = base / "digits_10pct"
    if not (sub / "subset.json").is_file():
        make_subset(ctx.data_root, sub, per_class=None, fraction=0.1, seed=0)
    svd = base / "svd.safetensors"
    teacher_id = str(Path(ctx.teacher_run).resolve())
    if svd.is_file():
        try:
            if teacher_id in str(SVDAligner.load(svd).meta.get("teacher")):
                return sub, svd
        except (ValueError, OSError):
            pass
    # 108 images < 256 feature dimensions: 3 passes of the teacher's training augmentation
    compute_kdep_svd(str(ctx.teacher_run), sub, svd, device="cpu", batch_size=128, transform="train", passes=3)
    return sub, svd


def run(ctx: DemoContext) -> list[DemoRow]:
    ep = _budget(ctx.quick)
    sub, svd = prepare(ctx)
    common = [f"model.name={STUDENT}", "data.batch_size=32", "train.val_every=0"]
    sup = ctx.preset("supervised/digits_cpu.yaml")
    kdep = ctx.preset("kdep/digits_cpu.yaml")
    pretrain = {
        "kdep": (kdep, [f"data.root={sub}", f"method.svd={svd}", f"train.epochs={ep['kdep']}"]),
        "regressor": (kdep, [f"data.root={sub}", f"method.svd={svd}", "method.alignment=regressor",
                             "method.pts=false", f"train.epochs={ep['kdep']}"]),
        "sup10": (sup, [f"data.root={sub}", "teacher=null", f"train.epochs={ep['sup10']}"]),
        "sup100": (sup, ["data.batch_size=64", "teacher=null", f"train.epochs={ep['sup100']}"]),
    }
    variants = [
        ("KDEP (SVD+PTS), 10% images, no labels", "kdep"),
        ("linear-regressor feature KD, 10% images, no labels", "regressor"),
        ("supervised pre-training, 10%", "sup10"),
        ("supervised pre-training, 100%", "sup100"),
        ("no pre-training", None),
    ]
    rows = []
    for label, key in variants:
        accs, secs, params = [], 0.0, None
        for seed in ctx.seeds:
            init = []
            if key is not None:
                preset, extra = pretrain[key]
                res, _ = ctx.train(preset, common + extra + [f"train.seed={seed}"], f"kdep_row/pre_{key}_s{seed}",
                                   evaluate=False)
                secs += res.seconds
                init = [f"init_from={res.run_dir}"]
            res, test = ctx.train(sup, common + init + [f"data.root={sub}", "teacher=null",
                                                        f"train.epochs={ep['ft']}", f"train.seed={seed}"],
                                  f"kdep_row/ft_{key or 'scratch'}_s{seed}")
            secs += res.seconds
            params = res.params
            accs.append(test["test/acc1"])
        rows.append(DemoRow("KDEP data efficiency (fine-tuned on the labelled 10%, digits test)", label,
                            {"test acc (%)": mean_std(accs)}, params, secs / len(ctx.seeds)))
    return rows
