"""Demo row: Attention Probe on digits — pick training images from an unlabeled wild pool with a
ViT teacher, then distil a ViT student from scratch on each selection.

1. ``kdforge data wild-pool``: the 269 held-out digits of ``digits/val`` mixed with 538
   out-of-distribution images (noise, textures, crops of photographs); its manifest is the ground
   truth, read only to score the selections.
2. A ViT teacher (``configs/attnprobe/digits_teacher_cpu.yaml``) trained on ``digits/train``.
3. One scoring pass (:func:`kdforge.commands.select.run_select`), then ``n`` images per mode:
   ``confidence`` (DFND; what the reference's published commands run), ``attention`` (the
   attention-probe score alone), ``combined`` (α·(s_1 + s_2) + β·s_out, α = 0.05, β = 0.9) and
   ``random``. **Selection precision** = the fraction of the selected images that are real digits.
4. One ``attnprobe`` student per mode and seed (``configs/attnprobe/digits_cpu.yaml`` with
   ``data.train_split`` = the selection folder and ``method.teacher_acc`` = the teacher's measured
   test accuracy): KD (T = 4) + noise adaptation + probe loss at blocks 1, 2, 3. The students never
   see a label; they are scored on ``digits/test`` with their final weights.

To fit the demo budget (≤ 90 s on 2 CPU cores for the whole row) the images stay at the digits'
native 8×8 (no upscaling) with 4×4 patches, so the ViTs see 4 patch tokens + CLS; the teacher
(``kdf_vit_micro``, 4 blocks, width 96) trains 10 epochs and each student (4 blocks, width 48)
20 epochs on its 200 images, both without augmentation and without per-epoch validation, and the
students run every seed of ``ctx.seeds`` per mode.
"""
from __future__ import annotations

import json
from pathlib import Path

from kdforge.demo.core import DemoContext, DemoRow, mean_std

TITLE = "Attention Probe: select digits from a wild pool with a ViT teacher, distil on each selection"

SECTION = "Attention Probe (wild-pool selection + probe distillation)"

#: selection modes, in report order, with their table labels
MODES = (("confidence", "confidence (DFND; the published recipe)"),
         ("attention", "attention probe only"),
         ("combined", "combined α·(s_1+s_2) + β·s_out (the method)"),
         ("random", "random"))

N_SELECT = 200           # of 807 pool images, 269 of them digits: a perfect selector scores 100 %
EPOCHS = {"full": (10, 20), "quick": (4, 8)}   # (teacher, student) epochs
PROBE_BLOCKS = (1, 2)    # teacher blocks (of 4) whose CLS attention is scored, like the reference's 3 and 7 of 12

#: the CPU-sized geometry shared by teacher and students: native 8 px digits, 4×4 patches
COMMON = ["data.img_size=8", "data.train_transform=none", "data.batch_size=32", "data.num_workers=0",
          "train.val_every=0", "train.save_every=1000", "train.log_every=1000"]
TEACHER = COMMON + ["teacher=null", "model.kwargs={patch_size: 4}", "optim.lr=3e-3"]
STUDENT = COMMON + ["model.kwargs={patch_size: 4, embed_dim: 48}", "optim.lr=4e-3"]


def run(ctx: DemoContext) -> list[DemoRow]:
    from kdforge.commands.select import run_select
    from kdforge.data.converters.wild_pool import read_manifest, selection_precision, write_wild_pool
    from kdforge.selection import read_selection
    teacher_epochs, student_epochs = EPOCHS["quick" if ctx.quick else "full"]
    seeds = ctx.seeds
    tag = "attnprobe_row_quick" if ctx.quick else "attnprobe_row"   # quick and full runs never mix
    work = Path(ctx.out) / tag
    wild = write_wild_pool(work / "wild")          # digits/val of the demo's split (seed 0) + 2× OOD
    counts = json.loads((wild / "pool.json").read_text())
    pool_size, n_digits = counts["total"], counts["counts"]["digit"]

    tres, ttest = ctx.train(ctx.preset("attnprobe/digits_teacher_cpu.yaml"),
                            TEACHER + [f"train.epochs={teacher_epochs}", "train.seed=0"], f"{tag}/teacher")
    teacher_acc = ttest["test/acc1"]
    # overwrite: a retrained teacher replaces stale scores (the same teacher's complete scores are reused)
    sel = run_select(str(tres.run_dir), str(wild / "pool"), str(work / "select"), N_SELECT,
                     [m for m, _ in MODES], blocks=PROBE_BLOCKS, workers=0, device="cpu", progress=False,
                     overwrite=True)
    manifest = read_manifest(wild)

    rows = [DemoRow(SECTION, "ViT teacher (kdf_vit_micro, labels of digits/train)",
                    {"selection precision (%)": "", "test acc (%)": f"{teacher_acc:.1f}"}, tres.params,
                    tres.seconds, note=f"{teacher_epochs} epochs, 8 px digits, 4×4 patches (demo budget); "
                                       f"scores the {pool_size}-image pool once for all modes")]
    acc_frac = min(max(teacher_acc / 100.0, 0.01), 1.0)
    for mode, label in MODES:
        files, _ = read_selection(sel["selections"][mode])
        precision = 100.0 * selection_precision(files, manifest)
        accs, secs, params = [], 0.0, None
        for seed in seeds:
            res, test = ctx.train(ctx.preset("attnprobe/digits_cpu.yaml"),
                                  STUDENT + [f"data.train_split={sel['folders'][mode]}",
                                             f"teacher.checkpoint={tres.run_dir}", f"method.teacher_acc={acc_frac}",
                                             f"train.epochs={student_epochs}", f"train.seed={seed}"],
                                  f"{tag}/{mode}_s{seed}")
            accs.append(test["test/acc1"])
            secs += res.seconds
            params = res.params
        rows.append(DemoRow(SECTION, label, {"selection precision (%)": f"{precision:.1f}",
                                             "test acc (%)": mean_std(accs)}, params, secs / len(seeds),
                            note=(f"n = {N_SELECT} of {pool_size} ({n_digits} digits); students: {student_epochs} epochs, no labels, "
                                  f"no augmentation, seeds {list(seeds)}") if mode == "random" else ""))
    return rows
