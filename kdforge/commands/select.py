"""``kdforge select TEACHER POOL OUT --n N --mode MODE``: score an unlabeled pool once, select from it.

TEACHER is a kdforge run folder / checkpoint (its config gives the image size, channels and
normalisation), a training preset ``.yaml`` (its ``teacher:`` section builds the teacher, its
``data:`` section gives size and normalisation), or a weights file with ``--model NAME
--num-classes K``. POOL is any folder tree of
images. OUT receives ``scores.safetensors`` + ``scores.json`` (resumable: re-run the same command
after an interruption) and one selection per mode, ``OUT/<mode>_<n>[_balanced].txt`` + ``.json``.
"""
from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace
from typing import Optional, Sequence

log = logging.getLogger("kdforge")


def load_teacher(teacher: str, model: Optional[str] = None, num_classes: Optional[int] = None,
                 img_size: Optional[int] = None, in_chans: Optional[int] = None):
    """-> (teacher module, data settings namespace with img_size, in_chans, mean, std, name)."""
    from kdforge.models import create_model, load_model_from_run
    p = Path(teacher)
    if not p.exists():
        raise FileNotFoundError(f"teacher {teacher!r} not found (a kdforge run folder, checkpoint, preset .yaml "
                                "or weights file)")
    if p.suffix in (".yaml", ".yml"):
        from kdforge.config import ConfigError, load_yaml
        raw = load_yaml(p)
        t, d = raw.get("teacher") or {}, raw.get("data") or {}
        if t.get("checkpoint"):
            return load_teacher(t["checkpoint"])
        if not t.get("name") or not t.get("weights") or not t.get("num_classes"):
            raise ConfigError(f"{p}: the teacher section needs name, weights and num_classes (or checkpoint)")
        chans = d.get("in_chans", 3)
        size = d.get("img_size", 224)
        m = create_model(t["name"], num_classes=t["num_classes"], in_chans=chans, img_size=size,
                         weights=t["weights"], strict=t.get("strict", True), **(t.get("kwargs") or {}))
        return m, SimpleNamespace(img_size=size, in_chans=chans, mean=tuple(d.get("mean", (0.485, 0.456, 0.406))),
                                  std=tuple(d.get("std", (0.229, 0.224, 0.225))), name=t["name"])
    if p.is_dir() or p.suffix == ".pt":
        m, meta = load_model_from_run(p)
        d = meta["config"]["data"]
        info = SimpleNamespace(img_size=d["img_size"], in_chans=d["in_chans"], mean=tuple(d["mean"]),
                               std=tuple(d["std"]), name=meta["config"]["model"]["name"])
        return m, info
    if not model or not num_classes:
        raise ValueError(f"teacher {teacher!r} is a weights file: also pass --model NAME and --num-classes K")
    size = img_size or 224
    chans = in_chans or 3
    m = create_model(model, num_classes=num_classes, in_chans=chans, img_size=size, weights=str(p))
    from timm.data import resolve_data_config
    try:
        dc = resolve_data_config({}, model=m)
        mean, std = tuple(dc["mean"]), tuple(dc["std"])
    except Exception:  # not a timm model
        mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    return m, SimpleNamespace(img_size=size, in_chans=chans, mean=mean[:chans], std=std[:chans], name=model)


def selection_name(mode: str, n: int, class_balanced: bool, head="mean") -> str:
    head_tag = "" if head == "mean" or mode in ("confidence", "random") else f"_head-{head}"
    return f"{mode}_{n}{head_tag}{'_balanced' if class_balanced else ''}.txt"


def run_select(teacher: str, pool: str, out: str, n: Optional[int], modes: Sequence[str] = ("combined",),
               blocks: Sequence[int] = (3, 7), head="mean", alpha: float = 0.05, beta: float = 0.9,
               class_balanced: bool = False, seed: int = 0, batch_size: int = 256, workers: int = 0,
               device: str = "auto", amp: str = "none", overwrite: bool = False, save_every: int = 100,
               model: Optional[str] = None, num_classes: Optional[int] = None, img_size: Optional[int] = None,
               in_chans: Optional[int] = None, mean: Optional[Sequence[float]] = None,
               std: Optional[Sequence[float]] = None, crop_pct: float = 1.0, progress: bool = True,
               max_batches: Optional[int] = None, materialize: str = "symlink") -> dict:
    """Score ``pool`` with ``teacher`` into ``out`` (or reuse/resume) and write one selection per mode.

    ``materialize`` (``symlink | copy | none``) also writes each selection as a folder
    ``OUT/<mode>_<n>/`` usable as ``data.train_split``.
    Returns ``{"table": ScoreTable, "selections": {mode: path}, "folders": {mode: path},
    "images_per_s": float}``.
    """
    from kdforge.data.datasets import UnlabeledFolder
    from kdforge.data.transforms import build_eval_transform
    from kdforge.engine.trainer import resolve_device
    from kdforge.selection import materialize_selection, score_pool, select, write_selection
    net, info = load_teacher(teacher, model, num_classes, img_size, in_chans)
    if img_size:
        info.img_size = img_size
    if mean is not None:
        info.mean = tuple(mean)
    if std is not None:
        info.std = tuple(std)
    info.eval_crop_pct = crop_pct  # 1.0: squash to (S, S) like the reference; < 1: resize + centre crop
    transform = build_eval_transform(info)
    dev = resolve_device(device)
    net.to(dev)
    dataset = UnlabeledFolder(pool, transform, mode="RGB" if info.in_chans == 3 else "L")
    table = score_pool(net, dataset, blocks, out=out, batch_size=batch_size, num_workers=workers,
                       save_every=save_every, overwrite=overwrite, amp=amp, max_batches=max_batches,
                       progress=progress, teacher_name=f"{info.name} ({teacher})")
    result = {"table": table, "selections": {}, "folders": {}, "images_per_s": None}
    if not table.complete:
        return result
    if table.meta.get("seconds"):
        result["images_per_s"] = table.count / max(float(table.meta["seconds"]), 1e-9)
    if n is None:
        return result
    view = table.with_head(head)
    for mode in modes:
        idx = select(view, n, mode, class_balanced=class_balanced, seed=seed, alpha=alpha, beta=beta)
        info_sel = {"mode": mode, "n": n, "class_balanced": class_balanced, "seed": seed, "scores": str(Path(out))}
        if mode in ("attention", "combined"):
            info_sel["head"] = head
        if mode == "combined":
            info_sel.update(alpha=alpha, beta=beta)
        path = write_selection(Path(out) / selection_name(mode, n, class_balanced, head), table, idx, **info_sel)
        result["selections"][mode] = path
        if materialize != "none":
            result["folders"][mode] = materialize_selection(path, how=materialize)
    return result


def _head(text: str):
    try:
        return int(text)
    except ValueError:
        from kdforge.selection import HEAD_MODES
        if text not in HEAD_MODES:
            raise SystemExit(f"kdforge select: --head must be one of {', '.join(HEAD_MODES)} or a head index")
        return text


def add_parser(sub):
    from kdforge.selection import MODES
    p = sub.add_parser("select", help="score an unlabeled image pool with a teacher and select training images "
                                      "(Attention Probe / DFND)",
                       description=__doc__, formatter_class=__import__("argparse").RawDescriptionHelpFormatter)
    p.add_argument("teacher", help="kdforge run folder / checkpoint, a training preset .yaml (its teacher: and data: "
                                   "sections), or a weights file (then --model, --num-classes)")
    p.add_argument("pool", help="folder tree of unlabeled images")
    p.add_argument("out", help="output folder (scores + selections)")
    p.add_argument("--n", type=int, default=None, help="number of images to select (omit to only score)")
    p.add_argument("--mode", nargs="+", default=["combined"], choices=MODES,
                   help="selection mode(s): confidence (DFND, the published recipe), attention, combined "
                        "(α·Σ s_blk + β·s_out), random; several modes reuse one scoring pass (default combined)")
    p.add_argument("--blocks", type=int, nargs="+", default=[3, 7],
                   help="0-based ViT blocks whose CLS attention is probed (default 3 7, the reference's)")
    p.add_argument("--no-attention", action="store_true", help="score confidence only (CNN teachers)")
    p.add_argument("--head", type=_head, default="mean",
                   help="heads: mean (average the CLS rows, default), mean_score, max_score, or an index (0 = reference)")
    p.add_argument("--alpha", type=float, default=0.05, help="weight of the attention scores (default 0.05)")
    p.add_argument("--beta", type=float, default=0.9, help="weight of the confidence score (default 0.9)")
    p.add_argument("--class-balanced", action="store_true", help="spread the n picks evenly over predicted classes")
    p.add_argument("--seed", type=int, default=0, help="seed of --mode random (default 0)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=4, help="data-loading workers (default 4)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--amp", default="none", choices=["none", "bf16", "fp16"], help="autocast on CUDA")
    p.add_argument("--save-every", type=int, default=100, help="write progress every this many batches")
    p.add_argument("--overwrite", action="store_true", help="replace scores made by another teacher/transform/pool")
    p.add_argument("--model", help="model name (teacher given as a weights file)")
    p.add_argument("--num-classes", type=int, help="classes of the teacher (weights file)")
    p.add_argument("--img-size", type=int, help="input size (default: the run's, or 224)")
    p.add_argument("--in-chans", type=int, help="input channels (weights file; default 3)")
    p.add_argument("--mean", type=float, nargs="+", help="normalisation mean (default: the teacher's)")
    p.add_argument("--std", type=float, nargs="+", help="normalisation std (default: the teacher's)")
    p.add_argument("--crop-pct", type=float, default=1.0,
                   help="1.0 (default): resize to (S, S) like the reference; < 1: resize S/crop_pct then centre crop")
    p.add_argument("--materialize", default="symlink", choices=["symlink", "copy", "none"],
                   help="also write each selection as a folder OUT/<mode>_<n>/ of links (default) or copies, "
                        "usable as data.train_split")
    p.add_argument("--no-progress", action="store_true")
    return p


def run(args) -> int:
    blocks = [] if args.no_attention else args.blocks
    if not blocks and any(m in ("attention", "combined") for m in args.mode) and args.n is not None:
        raise SystemExit("kdforge select: modes attention/combined need attention blocks (drop --no-attention)")
    res = run_select(args.teacher, args.pool, args.out, args.n, args.mode, blocks, args.head, args.alpha,
                     args.beta, args.class_balanced, args.seed, args.batch_size, args.workers, args.device,
                     args.amp, args.overwrite, args.save_every, args.model, args.num_classes, args.img_size,
                     args.in_chans, args.mean, args.std, args.crop_pct, not args.no_progress,
                     materialize=args.materialize)
    table = res["table"]
    speed = f", {res['images_per_s']:.1f} images/s" if res["images_per_s"] else ""
    print(f"scores: {Path(args.out) / 'scores.safetensors'} ({table.count} images, {table.meta.get('corrupt', 0)} "
          f"unreadable{speed})")
    for mode, path in res["selections"].items():
        folder = res["folders"].get(mode)
        print(f"selection {mode}: {path} ({args.n} images)" + (f"; folder {folder}" if folder else ""))
    return 0
