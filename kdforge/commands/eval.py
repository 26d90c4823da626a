"""``kdforge eval MODE ...``: evaluation protocols on a checkpoint, each writing a JSON result and a
one-line summary.

Modes: ``accuracy`` (default when the first argument is a run: ``kdforge eval RUN --split test``),
``features``, ``fewshot``, ``knn``, ``linear``, ``instdisc``, ``geometry``, ``transfer``, ``tsne``, and
``ssl`` (SSL-small's whole metric set on a moco/seed run in one command: instance discrimination
d-sd/sd-sd top-1..5, alignment / class alignment / uniformity on D and SD, Best-NN, linear probe).
CKPT is a kdforge run folder, a checkpoint file or an exported ``.safetensors``; DATA an ImageFolder
root (``DATA/<split>/<class>/<image>``); STATIC a set written by ``kdforge data static-augs``.
Features are cached per checkpoint hash + tap + transform + split (``--no-cache`` recomputes).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

MODES = ("accuracy", "features", "fewshot", "knn", "linear", "instdisc", "geometry", "transfer", "tsne", "ssl")


def add_parser(sub):
    p = sub.add_parser("eval", help="evaluate a checkpoint: accuracy, features, fewshot, knn, linear, instdisc, "
                                    "geometry, transfer, tsne, ssl",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, add_help=False)
    p.add_argument("-h", "--help", action="store_true", dest="eval_help", help="show the modes and exit")
    p.add_argument("argv", nargs=argparse.REMAINDER, help="MODE and its arguments ('kdforge eval MODE --help')")
    return p


# --------------------------------------------------------------------------------------------
def _common(p, data: bool = True, static: bool = False):
    p.add_argument("ckpt", help="run folder, checkpoint file or exported .safetensors")
    if static:
        p.add_argument("static", help="static augmented set (kdforge data static-augs SRC STATIC)")
    elif data:
        p.add_argument("data", help="ImageFolder root (DATA/<split>/<class>/<image>)")
    p.add_argument("--which", choices=["best", "last"], default="best", help="checkpoint of a run folder")
    p.add_argument("--module", default="student", help="method sub-module with the weights (student; teacher)")
    p.add_argument("--tap", default="pooled", choices=["pooled", "cls", "cls+wpatch", "multiblock"],
                   help="feature tap (default pooled)")
    p.add_argument("--n-blocks", type=int, default=4, help="blocks/stages of the multiblock tap")
    p.add_argument("--img-size", type=int, help="override the run's image size")
    p.add_argument("--crop-pct", type=float, help="override the run's eval crop fraction")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default="auto")
    p.add_argument("--amp", choices=["auto", "none", "bf16", "fp16"], default="auto",
                   help="autocast for feature extraction (auto: bf16 on CUDA, none on CPU); part of the cache key")
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--cache-dir", help="feature cache folder (default CKPT/features)")
    p.add_argument("--no-cache", action="store_true", help="recompute features (and overwrite the cache)")
    p.add_argument("--json", help="result file (default CKPT/eval/<mode>_....json)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="kdforge eval", description=__doc__,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
    modes = top.add_subparsers(dest="mode", metavar="MODE")

    p = modes.add_parser("accuracy", help="top-1 of a run's own classifier on a split")
    p.add_argument("ckpt", help="run folder or checkpoint file")
    p.add_argument("--split", default="test")
    p.add_argument("--which", choices=["best", "last"], default="best")
    p.add_argument("--data-root", help="dataset root (default: the run's data.root)")
    p.add_argument("--device", default="auto")
    p.add_argument("--json")

    p = modes.add_parser("features", help="extract and cache features of a split")
    _common(p)
    p.add_argument("--split", default="test")

    p = modes.add_parser("fewshot", help="N-way K-shot episodes on a split's features (SMKD protocol)")
    _common(p)
    p.add_argument("--split", default="test")
    p.add_argument("--ways", type=int, default=5)
    p.add_argument("--shots", type=int, nargs="+", default=[1, 5])
    p.add_argument("--queries", default="15", help="queries per class, or 'all' (every remaining image, SMKD)")
    p.add_argument("--episodes", type=int, default=10000)
    p.add_argument("--classifier", nargs="+", default=["prototype"],
                   choices=["prototype", "logistic", "cosine_classifier"])

    p = modes.add_parser("knn", help="Best-NN kNN: gallery = train split, k chosen on val when present")
    _common(p)
    p.add_argument("--train-split", default="train")
    p.add_argument("--test-split", default="test")
    p.add_argument("--val-split", default="val", help="chooses k ('none': choose on test and say so)")
    p.add_argument("--k-max", type=int, default=101)
    p.add_argument("--rep-space", choices=["original", "norm", "shift-norm"], default="original")
    p.add_argument("--weighted", action="store_true", help="DINO weighted cosine vote (exp(cos/T))")
    p.add_argument("--T", type=float, default=0.07)
    p.add_argument("--backend", choices=["torch", "faiss"], default="torch")

    p = modes.add_parser("linear", help="linear probe on cached features (L-BFGS; wd chosen on val)")
    _common(p)
    p.add_argument("--train-split", default="train")
    p.add_argument("--test-split", default="test")
    p.add_argument("--val-split", default="val", help="chooses the weight decay ('none': fixed --wd)")
    p.add_argument("--wd", type=float, default=1e-4)
    p.add_argument("--max-iter", type=int, default=500)

    p = modes.add_parser("instdisc", help="instance retrieval top-k on a static augmented set")
    _common(p, static=True)
    p.add_argument("--mode", dest="pair", choices=["d-sd", "sd-sd"], default="d-sd",
                   help="d-sd: originals vs view 1; sd-sd: view 1 vs view 2")
    p.add_argument("--topk", type=int, default=5)

    p = modes.add_parser("geometry", help="alignment, intra-class alignment, uniformity on a static set")
    _common(p, static=True)

    p = modes.add_parser("transfer", help="fine-tune / linear-transfer through the trainer (val selects, test once)")
    p.add_argument("ckpt")
    p.add_argument("data", help="ImageFolder root with train, val and test")
    p.add_argument("out", help="the transfer run's folder")
    p.add_argument("--mode", dest="tmode", choices=["linear", "finetune"], default="linear")
    p.add_argument("--epochs", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--milestones", type=int, nargs="*")
    p.add_argument("--gamma", type=float)
    p.add_argument("--no-l2", action="store_true", help="linear mode without feature L2-normalisation (MoCo lincls)")
    p.add_argument("--protocol", choices=["default", "moco_lincls"], default="default",
                   help="moco_lincls: MoCo's linear evaluation (no L2, lr 30, 100 epochs, x0.1 at 60/80, "
                        "RandomResizedCrop 0.08-1); explicit --epochs/--lr/--milestones/--gamma win")
    p.add_argument("--which", choices=["best", "last"], default="best")
    p.add_argument("--module", default="student")
    p.add_argument("--img-size", type=int)
    p.add_argument("--train-transform", choices=["standard", "cifar", "pad_crop", "none"])
    p.add_argument("--device", default="auto")
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json")
    p.add_argument("--quiet", action="store_true")

    p = modes.add_parser("tsne", help="t-SNE PNG of a split's features coloured by class")
    _common(p)
    p.add_argument("--split", default="test")
    p.add_argument("--out", help="PNG path (default CKPT/eval/tsne_<split>_<tap>.png)")
    p.add_argument("--max-points", type=int, default=5000)
    p.add_argument("--perplexity", type=float, default=30.0)

    p = modes.add_parser("ssl", help="SSL-small metric set on a moco/seed run (retrieval, geometry, Best-NN, "
                                     "linear probe): one JSON + the paper-style table")
    p.add_argument("ckpt", help="a moco or seed run folder (or its checkpoint file)")
    p.add_argument("data", nargs="?", help="ImageFolder root with train (gallery, probe), optional val (chooses k "
                                           "and the probe's weight decay) and --split (default: the run's data.root)")
    p.add_argument("--split", default="test", help="static set + reported accuracies (default test)")
    p.add_argument("--which", choices=["best", "last"], default="best")
    p.add_argument("--k-max", type=int, default=101)
    p.add_argument("--rep-space", choices=["original", "norm", "shift-norm"], default="original")
    p.add_argument("--probe-max-iter", type=int, default=500, help="L-BFGS iterations per linear-probe fit")
    p.add_argument("--seed", type=int, default=0, help="seed of the static set's augmented views")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--json", help="result file (default CKPT/eval/ssl_<split>.json)")
    return top


# --------------------------------------------------------------------------------------------
def _feats(a, split: str, files=None, classes=None) -> dict:
    from kdforge.eval.features import cached_features
    return cached_features(a.ckpt, getattr(a, "data", None) or a.static, split, a.tap, which=a.which,
                           module=a.module, n_blocks=a.n_blocks, img_size=a.img_size, crop_pct=a.crop_pct,
                           batch_size=a.batch_size, device=a.device, amp=a.amp, cache_dir=a.cache_dir,
                           use_cache=not a.no_cache, num_workers=a.workers, progress=not a.quiet,
                           files=files, classes=classes)


def _out_base(ckpt: str) -> Path:
    p = Path(ckpt)
    return (p if p.is_dir() else p.parent) / "eval"


def _write(a, name: str, result: dict, summary: str) -> int:
    path = Path(a.json) if getattr(a, "json", None) else _out_base(a.ckpt) / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, default=str))
    print(f"{summary}  [{path}]")
    return 0


def _static_feats(a, view: int, crop_pct: float | None) -> dict:
    from kdforge.data.converters.static_augs import static_view_files
    files, classes = static_view_files(a.static, view)
    saved = a.crop_pct
    a.crop_pct = crop_pct if a.crop_pct is None else a.crop_pct
    try:
        return _feats(a, f"view{view}", files=files, classes=classes)
    finally:
        a.crop_pct = saved


def _static_views(a, views) -> tuple[list, "object"]:
    """Features of static views (view 0: the eval transform; views 1, 2: already crops, resize only)."""
    out = []
    labels = None
    for v in views:
        r = _static_feats(a, v, None if v == 0 else 1.0)
        if labels is not None and (r["labels"].shape != labels.shape or not bool((r["labels"] == labels).all())):
            raise ValueError(f"{a.static}: views do not line up (missing '-{v}' files?)")
        labels = r["labels"]
        out.append(r["features"])
    return out, labels


def _run_accuracy(a) -> int:
    from kdforge.engine.trainer import evaluate_run
    res = evaluate_run(a.ckpt, a.split, which=a.which, data_root=a.data_root, device=a.device)
    summary = ", ".join(f"{k} {v:.2f}" for k, v in res.items())
    return _write(a, f"accuracy_{a.split}", {"run": a.ckpt, "split": a.split, "which": a.which, **res},
                  f"{a.ckpt}: {summary}")


def _run_features(a) -> int:
    r = _feats(a, a.split)
    f = r["features"]
    print(f"features {a.split} ({a.tap}): {tuple(f.shape)}, {len(r['classes'])} classes, "
          f"{'from cache' if r['cached'] else 'computed'}  [{r['path']}]")
    return 0


def _run_fewshot(a) -> int:
    from kdforge.eval import evaluate_episodes, sample_episodes
    r = _feats(a, a.split)
    x, y = r["features"], r["labels"]
    q = "all" if str(a.queries).lower() in ("all", "none") else int(a.queries)
    results, lines = [], []
    for shot in a.shots:
        ep = sample_episodes(y, a.ways, shot, q, a.episodes, seed=a.seed)
        for clf in a.classifier:
            res = evaluate_episodes(x, y, ep, shot, clf, seed=a.seed)
            results.append({**res.to_dict(), "seed": a.seed})
            lines.append(f"{a.ways}w{shot}s q{res.n_query} {clf} {res.mean:.2f}±{res.ci95:.2f}")
    out = {"ckpt": a.ckpt, "split": a.split, "tap": a.tap, "features_key": r["key"], "n_images": int(x.shape[0]),
           "n_classes": len(r["classes"]), "results": results}
    return _write(a, f"fewshot_{a.split}_{a.tap.replace('+', '-')}", out,
                  f"few-shot ({a.split}, {a.tap}, {a.episodes} episodes, seed {a.seed}): " + "; ".join(lines))


def _maybe_split(a, name):
    return None if name in (None, "none", "") or not (Path(a.data) / name).is_dir() else name


def _train_test_val(a):
    """Features of the train and test splits, and of the val split when it exists: (tr, te, val split
    name or None, (val features, val labels) or None); test/val labels indexed by train's classes."""
    tr = _feats(a, a.train_split)
    te = _feats(a, a.test_split, classes=tr["classes"])
    vs = _maybe_split(a, a.val_split)
    val = None
    if vs is not None:
        v = _feats(a, vs, classes=tr["classes"])
        val = (v["features"], v["labels"])
    return tr, te, vs, val


def _run_knn(a) -> int:
    from kdforge.eval import best_nn
    tr, te, vs, val = _train_test_val(a)
    res = best_nn(tr["features"], tr["labels"], te["features"], te["labels"], k_max=a.k_max,
                  rep_space=a.rep_space, val=val, weighted=a.weighted, T=a.T, backend=a.backend)
    out = {"ckpt": a.ckpt, "tap": a.tap, "train_split": a.train_split, "test_split": a.test_split,
           "val_split": vs, **res.to_dict()}
    return _write(a, f"knn_{a.test_split}_{a.rep_space}{'_weighted' if a.weighted else ''}", out, str(res))


def _run_linear(a) -> int:
    from kdforge.eval import linear_probe
    tr, te, vs, val = _train_test_val(a)
    res = linear_probe(tr["features"], tr["labels"], te["features"], te["labels"], val=val, wd=a.wd,
                       max_iter=a.max_iter)
    out = {"ckpt": a.ckpt, "tap": a.tap, "train_split": a.train_split, "test_split": a.test_split,
           "val_split": vs, **res.to_dict()}
    return _write(a, f"linear_{a.test_split}_{a.tap.replace('+', '-')}", out, str(res))


def _run_instdisc(a) -> int:
    from kdforge.eval import instdisc_topk
    views = (0, 1) if a.pair == "d-sd" else (1, 2)
    (qa, qb), _ = _static_views(a, views)
    acc = instdisc_topk(qa, qb, topk=a.topk)
    out = {"ckpt": a.ckpt, "static": a.static, "mode": a.pair, "tap": a.tap, "n": int(qa.shape[0]),
           "topk": acc}
    return _write(a, f"instdisc_{a.pair}", out,
                  f"instance retrieval {a.pair} ({qa.shape[0]} images): top1-{a.topk} "
                  + ", ".join(f"{v:.2f}" for v in acc))


def _run_geometry(a) -> int:
    import torch.nn.functional as F

    from kdforge.eval import alignment, class_alignment, uniformity
    (x0, x1, x2), y = _static_views(a, (0, 1, 2))
    n0, n1, n2 = (F.normalize(t, dim=1) for t in (x0, x1, x2))
    out = {"ckpt": a.ckpt, "static": a.static, "tap": a.tap, "n": int(x0.shape[0]),
           "align_d_sd": alignment(n0, n1), "align_sd_sd": alignment(n1, n2),
           "class_align_d": class_alignment(n0, y), "class_align_sd": class_alignment(n1, y),
           "uniform_d": uniformity(n0), "uniform_sd": uniformity(n1),
           "protocol": "L2-normalised features; alignment alpha=2; uniformity t=2 exact over all pairs"}
    return _write(a, "geometry", out,
                  "D-SD align {align_d_sd:.4f}  SD-SD align {align_sd_sd:.4f}  D cls-align {class_align_d:.4f}  "
                  "SD cls-align {class_align_sd:.4f}  D uniform {uniform_d:.4f}  SD uniform {uniform_sd:.4f}".format(**out))


def _run_transfer(a) -> int:
    from kdforge.eval.transfer import transfer
    rep = transfer(a.ckpt, a.data, a.out, a.tmode, epochs=a.epochs, lr=a.lr, batch_size=a.batch_size,
                   weight_decay=a.weight_decay, milestones=a.milestones or None, gamma=a.gamma,
                   l2_normalize=not a.no_l2, which=a.which, module=a.module, img_size=a.img_size,
                   train_transform=a.train_transform, device=a.device, seed=a.seed, num_workers=a.workers,
                   progress=not a.quiet, protocol=None if a.protocol == "default" else a.protocol)
    if not a.json:
        a.json = str(Path(a.out) / "transfer.json")
    return _write(a, "transfer", rep,
                  f"transfer ({a.tmode}, {rep['epochs']} epochs): val-selected {rep['val_best']:.2f}%, "
                  f"test at val-best {rep['test_at_val_best']:.2f}%, test last {rep['test_last']:.2f}%")


def _run_tsne(a) -> int:
    from kdforge.eval import tsne_plot
    r = _feats(a, a.split)
    out = Path(a.out) if a.out else _out_base(a.ckpt) / f"tsne_{a.split}_{a.tap.replace('+', '-')}.png"
    tsne_plot(r["features"], r["labels"], out, seed=a.seed, perplexity=a.perplexity, max_points=a.max_points,
              class_names=r["classes"])
    res = {"ckpt": a.ckpt, "split": a.split, "tap": a.tap, "png": str(out), "seed": a.seed,
           "n": min(int(r["features"].shape[0]), a.max_points or 10**12)}
    return _write(a, f"tsne_{a.split}", res, f"t-SNE of {res['n']} {a.split} features -> {out}")


def _run_ssl(a) -> int:
    from kdforge.methods.moco_report import format_report, ssl_report
    rep = ssl_report(a.ckpt, a.data, a.split, a.which, a.k_max, a.rep_space, a.seed, a.device, a.batch_size,
                     a.workers, probe_max_iter=a.probe_max_iter)
    print(format_report(rep))
    return _write(a, f"ssl_{rep['static_split']}", rep,
                  f"SSL metrics ({rep['static_split']}, {rep['n_static']} images): instdisc d-sd top1 "
                  f"{rep['instdisc_d_sd'][0]:.2f}, align D-SD {rep['align_d_sd']:.4f}, uniform D "
                  f"{rep['uniform_d']:.4f}, Best-NN {rep['best_nn']:.2f} (k={rep['best_nn_k']}, "
                  f"{rep['best_nn_k_chosen_on']}), linear probe {rep['linear_probe']:.2f}")


RUNNERS = {"accuracy": _run_accuracy, "features": _run_features, "fewshot": _run_fewshot, "knn": _run_knn,
           "linear": _run_linear, "instdisc": _run_instdisc, "geometry": _run_geometry,
           "transfer": _run_transfer, "tsne": _run_tsne, "ssl": _run_ssl}


def run(args) -> int:
    argv = list(args.argv)
    top = _parser()
    if getattr(args, "eval_help", False) or not argv or argv[0] in ("-h", "--help"):
        top.print_help()
        return 0 if argv or getattr(args, "eval_help", False) else 2
    if argv[0] not in MODES:
        argv = ["accuracy"] + argv                                       # kdforge eval RUN --split test
    a = top.parse_args(argv)
    import kdforge.eval.transfer  # noqa: F401  (registers the linear_transfer method for evaluate_run)
    try:
        return RUNNERS[a.mode](a)
    except (ValueError, FileNotFoundError) as e:
        print(f"kdforge eval {a.mode}: error: {e}", file=sys.stderr)
        return 2
