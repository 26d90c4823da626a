"""The SSL-small metric set on a trained MoCo / SEED run, in one call.

Shi et al., "On the Efficacy of Small Self-Supervised Contrastive Models without Distillation
Signals" (AAAI 2022), ``shared/methods/sslsmall.md`` §2. Everything is computed on the
**pre-projection** representation of the run's query backbone (``student``):

* a *static augmented set* on ``static_split`` (test by default): for every image, view 0 = the
  eval transform ("domain" D) and views 1, 2 = two seeded draws of the standard MoCo-v2 augmentation
  ("shifted domain" SD; §2(a) — seeded per sample, so the set is reproducible);
* instance discrimination (:func:`kdforge.eval.instdisc_topk`): top-1..5 retrieval of view 1 among
  the other originals (mode ``d-sd``, the paper's) and of view 2 from view 1 (``sd-sd``);
* alignment D-SD = A(X0, X1), SD-SD = A(X1, X2); intra-class alignment C(X0), C(X1); uniformity
  U(X0), U(X1), exact over all pairs (:mod:`kdforge.eval.geometry`), features L2-normalised;
* Best-NN (:func:`kdforge.eval.best_nn`): train split as gallery, odd k up to ``k_max``, k chosen on
  the val split (when present), accuracy on ``static_split``; ``rep_space`` as in the paper;
* linear probe (:func:`kdforge.eval.linear_probe`): L-BFGS logistic regression on train features,
  weight decay chosen on val, accuracy on ``static_split``.

``ssl_report(run_dir, data_root)`` returns a dict (also written to ``RUN/ssl_report.json``);
:func:`format_report` prints the paper-style table. Command line:
``python -m kdforge.methods.moco_report RUN --data-root ROOT``.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Optional

import torch
from torch.utils.data import DataLoader

from kdforge.eval import alignment, best_nn, class_alignment, instdisc_topk, linear_probe, uniformity


def _features(model, loader, device: torch.device, n_views: int = 1):
    """Features of every view: list of (N, d) float32 CPU tensors, and labels (N,)."""
    outs = [[] for _ in range(n_views)]
    labels = []
    with torch.no_grad():
        for x, y in loader:
            views = x if n_views > 1 else [x]
            for i, v in enumerate(views):
                outs[i].append(model(v.to(device)).float().cpu())
            labels.append(torch.as_tensor(y))
    return [torch.cat(o) for o in outs], torch.cat(labels).long()


def ssl_report(run_dir: str | Path, data_root: Optional[str | Path] = None, static_split: str = "test",
               which: str = "best", k_max: int = 101, rep_space: str = "original", seed: int = 0,
               device: str = "auto", batch_size: int = 256, num_workers: int = 0, write: bool = True,
               probe_wd_grid: tuple = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2), probe_max_iter: int = 500) -> dict:
    """Run the paper's metric set on a ``moco``/``seed`` run (see the module docstring).

    Args:
        run_dir: a kdforge run folder (or checkpoint file) of a self-supervised method.
        data_root: ImageFolder root with ``train/`` (gallery + probe training), optionally ``val/``
            (selects k and the probe's weight decay) and ``static_split`` (default: the run's data.root).
        static_split: the split used for retrieval, geometry and the reported accuracies.
        which: ``best`` (falls back to ``last``) or ``last``.
        k_max: largest k of Best-NN. rep_space: ``original`` (paper) | ``norm`` | ``shift-norm``.
        seed: seed of the static set's augmentations.
        device: ``auto`` | ``cpu`` | ``cuda``.
        probe_wd_grid, probe_max_iter: the linear probe's weight-decay grid (chosen on val) and
            L-BFGS iterations per fit.

    Returns:
        A JSON-ready dict: ``instdisc_d_sd`` / ``instdisc_sd_sd`` (top-1..5 %), ``align_d_sd``,
        ``align_sd_sd``, ``class_align_d``, ``class_align_sd``, ``uniform_d``, ``uniform_sd``,
        ``best_nn`` (%, with ``best_nn_k`` and ``best_nn_k_chosen_on``), ``linear_probe`` (%), plus
        the sizes, the run and the seconds taken.
    """
    from kdforge.data.datasets import ImageFolderDataset
    from kdforge.data.ssl_transforms import moco_preset_transform
    from kdforge.data.transforms import MultiView, build_eval_transform
    from kdforge.engine.trainer import resolve_device
    from kdforge.models import load_model_from_run
    from kdforge.config import ConfigError, DataConfig, from_dict

    t0 = time.time()
    run = Path(run_dir)
    model, meta = load_model_from_run(run, which=which, module="student")
    if meta.get("student_head", True):
        raise ConfigError(f"ssl_report: {run} is a {meta.get('method')!r} run with a classifier; the SSL metric "
                          "set expects a self-supervised run (moco, seed)")
    cfg = meta["config"]
    dcfg = from_dict(DataConfig, {**cfg["data"], "require_root": False}, prefix="data")
    root = Path(data_root or dcfg.root)
    dev = resolve_device(device)
    model.to(dev).eval()
    mode = "RGB" if dcfg.in_chans == 3 else "L"
    classes = meta.get("classes") or None
    split = static_split if (root / static_split).is_dir() else "val"
    if not (root / split).is_dir():
        raise FileNotFoundError(f"ssl_report: neither {root / static_split} nor {root / 'val'} exists")
    has_val = split != "val" and (root / "val").is_dir()

    ev = build_eval_transform(dcfg)
    aug = moco_preset_transform("mocov2", img_size=dcfg.img_size, mean=dcfg.mean, std=dcfg.std)

    def loader(name: str, tf) -> DataLoader:
        ds = ImageFolderDataset(root / name, tf, "skip", mode, classes=classes)
        ds.set_seed(seed, 0)
        return DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=num_workers)

    (x0, x1, x2), y = _features(model, loader(split, MultiView([ev, aug, aug])), dev, n_views=3)
    (xtr,), ytr = _features(model, loader("train", ev), dev)
    val = None
    if has_val:
        (xv,), yv = _features(model, loader("val", ev), dev)
        val = (xv, yv)

    n0, n1, n2 = (torch.nn.functional.normalize(t, dim=1) for t in (x0, x1, x2))
    knn = best_nn(xtr, ytr, x0, y, k_max=k_max, rep_space=rep_space, val=val)
    probe = linear_probe(xtr, ytr, x0, y, val=val, wd_grid=probe_wd_grid, max_iter=probe_max_iter)
    rep = {
        "run": str(run), "method": meta.get("method"), "model": meta.get("model_name"), "static_split": split,
        "n_static": int(x0.shape[0]), "n_train": int(xtr.shape[0]), "feature_dim": int(x0.shape[1]), "seed": seed,
        "instdisc_d_sd": instdisc_topk(x0, x1, topk=5),
        "instdisc_sd_sd": instdisc_topk(x1, x2, topk=5),
        "align_d_sd": alignment(n0, n1), "align_sd_sd": alignment(n1, n2),
        "class_align_d": class_alignment(n0, y), "class_align_sd": class_alignment(n1, y),
        "uniform_d": uniformity(n0), "uniform_sd": uniformity(n1),
        "best_nn": knn.best_acc, "best_nn_k": knn.best_k, "best_nn_k_chosen_on": knn.chosen_on,
        "best_nn_rep_space": rep_space,
        "linear_probe": probe.acc, "linear_probe_wd": probe.wd,
    }
    rep["seconds"] = round(time.time() - t0, 2)
    if write and run.is_dir():
        (run / "ssl_report.json").write_text(json.dumps(rep, indent=2))
    return rep


def format_report(rep: dict) -> str:
    """The paper-style table (README of the reference: instdisc line + 6-column stats-dist table)."""
    top = ", ".join(f"{v:.2f}" for v in rep["instdisc_d_sd"])
    lines = [
        f"run {rep['run']} ({rep.get('method')}, {rep.get('model')}), static set: {rep['static_split']} "
        f"({rep['n_static']} images, seed {rep['seed']}), gallery: train ({rep['n_train']})",
        f"Instance discrimination, mode d-sd, Top1-5: [{top}]",
        f"Instance discrimination, mode sd-sd, Top1: {rep['instdisc_sd_sd'][0]:.2f}",
        "",
        "| D-SD align | SD-SD align | D cls-align | SD cls-align | D uniform | SD uniform |",
        "|---|---|---|---|---|---|",
        f"| {rep['align_d_sd']:.4f} | {rep['align_sd_sd']:.4f} | {rep['class_align_d']:.4f} | "
        f"{rep['class_align_sd']:.4f} | {rep['uniform_d']:.4f} | {rep['uniform_sd']:.4f} |",
        "",
        f"Best-NN {rep['best_nn']:.2f}% (k={rep['best_nn_k']}, chosen on {rep['best_nn_k_chosen_on']}, "
        f"{rep['best_nn_rep_space']}); linear probe {rep['linear_probe']:.2f}% (wd {rep['linear_probe_wd']:g})",
    ]
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kdforge.methods.moco_report",
                                description="SSL-small metric set (instdisc, alignment, uniformity, Best-NN, "
                                            "linear probe) on a moco/seed run; writes RUN/ssl_report.json")
    p.add_argument("run")
    p.add_argument("--data-root", default=None)
    p.add_argument("--split", default="test")
    p.add_argument("--which", default="best", choices=["best", "last"])
    p.add_argument("--k-max", type=int, default=101)
    p.add_argument("--rep-space", default="original", choices=["original", "norm", "shift-norm"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--num-workers", type=int, default=0)
    a = p.parse_args(argv)
    rep = ssl_report(a.run, a.data_root, a.split, a.which, a.k_max, a.rep_space, a.seed, a.device, a.batch_size,
                     a.num_workers)
    print(format_report(rep))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
