"""``kdforge kdep-svd TEACHER DATA OUT``: KDEP's SVD (PCA) statistics in one streaming pass.

The frozen teacher (eval mode, no gradient) runs once over the images of DATA; its pooled
pre-activation features (B, D) feed a float64 :class:`kdforge.align.svd.StreamingPCA` (mean and
scatter matrix, never the N×D matrix); the principal directions, with the canonical sign
convention, are written to ``OUT`` (safetensors + JSON, see :meth:`SVDAligner.save`).

* TEACHER: a kdforge run folder / checkpoint (``teacher.checkpoint`` of a training config), or a
  timm / torchvision model name with ``--weights FILE`` (random init without it: for tests only).
* DATA: an ImageFolder root (``DATA/<split>/`` is used when it exists), or any folder of images.
* The transform is deterministic by default (resize + centre crop, ``--transform eval``);
  ``--transform reference`` applies KDEP's pre-training augmentation (what the reference code used),
  ``--transform train`` the teacher run's own training augmentation; random transforms are seeded
  per (seed, pass, image), and ``--passes P`` makes P passes with fresh augmentations (more samples
  than feature dimensions when the image set is small).
* ``--reference-npy PATH`` converts the KDEP reference code's statistics instead of computing them
  (``model_v.npy`` + ``model_feat_mean.npy`` [+ ``model_eigen_values.npy``], or the renamed
  ``Microsoft-ResNet50_*.npy``; PATH is the V file or its folder): no teacher pass, the same output
  format, with TEACHER and DATA recorded as the statistics' provenance. (Training can also read the
  ``.npy`` files directly: ``method.svd: PATH``.)
"""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def load_teacher(spec: str, weights: Optional[str] = None, num_classes: int = 1000, in_chans: int = 3,
                 img_size: Optional[int] = None) -> tuple[nn.Module, str, dict]:
    """-> (teacher model, teacher id, data config of the teacher's run or {}).

    ``spec``: a kdforge run / checkpoint path, or a timm / torchvision model name (+ ``weights``).
    """
    from kdforge.models import create_model, load_model_from_run
    p = Path(spec)
    if p.exists():
        model, meta = load_model_from_run(p)
        return model, f"run:{p.resolve()} ({getattr(model, 'kdforge_name', '?')})", \
            dict((meta.get("config") or {}).get("data") or {})
    model = create_model(spec, num_classes=num_classes, in_chans=in_chans, img_size=img_size or 224,
                         weights=weights)
    if weights:
        return model, f"{spec}:{Path(weights).resolve()}", {}
    return model, f"{spec}:random-init", {}


def _file_digest(path: Path, limit: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        h.update(fh.read(limit))
    return h.hexdigest()[:16]


def build_dataset(data: str | Path, split: str, transform, in_chans: int = 3):
    """ImageFolder ``DATA/<split>`` (or ``DATA``) with labels, else an unlabeled image folder."""
    from kdforge.data.datasets import ImageFolderDataset, UnlabeledFolder
    root = Path(data)
    folder = root / split if (root / split).is_dir() else root
    mode = "RGB" if in_chans == 3 else "L"
    if not folder.is_dir():
        raise FileNotFoundError(f"kdep-svd: data folder {str(folder)!r} does not exist")
    if any(p.is_dir() for p in folder.iterdir()):
        try:
            return ImageFolderDataset(folder, transform, "skip", mode)
        except FileNotFoundError:
            pass
    return UnlabeledFolder(folder, transform, "skip", mode)


@torch.no_grad()
def collect_svd(teacher: nn.Module, loader, device: torch.device, amp_dtype: Optional[torch.dtype] = None,
                max_images: Optional[int] = None, progress: bool = False, acc=None):
    """Stream the teacher's pooled pre-activation features of ``loader`` into a :class:`StreamingPCA`
    (a new one, or ``acc`` to continue)."""
    from kdforge.align.svd import StreamingPCA
    from kdforge.models.preact import PreActTap
    teacher.eval().to(device)
    acc = StreamingPCA() if acc is None else acc
    seen = 0
    from tqdm.auto import tqdm
    with PreActTap(teacher) as tap:
        for batch in tqdm(loader, disable=not progress, desc="kdep-svd", leave=False):
            images = (batch[0] if isinstance(batch, (list, tuple)) else batch).to(device, non_blocking=True)
            if max_images is not None:
                images = images[: max(0, max_images - seen)]
                if images.shape[0] == 0:
                    break
            if amp_dtype is not None:
                with torch.autocast(device.type, dtype=amp_dtype):
                    f = tap(images)
            else:
                f = tap(images)
            acc.update(f.float())
            seen += images.shape[0]
    return acc


def compute_kdep_svd(teacher: str, data: str | Path, out: str | Path, weights: Optional[str] = None,
                     split: str = "train", img_size: Optional[int] = None, batch_size: int = 64,
                     transform: str = "eval", seed: int = 0, device: str = "auto", num_workers: int = 0,
                     keep: Optional[int] = None, mean: Optional[Sequence[float]] = None,
                     std: Optional[Sequence[float]] = None, in_chans: Optional[int] = None,
                     eval_crop_pct: Optional[float] = None, num_classes: int = 1000,
                     max_images: Optional[int] = None, amp: str = "none", progress: bool = False,
                     passes: int = 1):
    """Compute and save the statistics; returns the :class:`SVDAligner` (also written to ``out``).

    Preprocessing options left as ``None`` come from the teacher's run config when TEACHER is a
    kdforge run, else the ImageNet defaults (224 px, crop 0.875, ImageNet mean/std, RGB).
    """
    from types import SimpleNamespace

    from torch.utils.data import DataLoader

    from kdforge.data.transforms import build_eval_transform
    from kdforge.engine.trainer import resolve_device
    if transform not in ("eval", "train", "reference"):
        raise ValueError(f"kdep-svd: --transform must be eval, train or reference, got {transform!r}")
    if passes < 1 or (passes > 1 and transform == "eval"):
        raise ValueError(f"kdep-svd: --passes {passes}: use 1 pass, or several with a random transform "
                         "(--transform train/reference)")
    dev = resolve_device(device)
    torch.manual_seed(seed)
    model, teacher_id, run_data = load_teacher(teacher, weights, num_classes=num_classes, in_chans=in_chans or 3,
                                               img_size=img_size)

    def pick(value, key, default):
        return value if value is not None else run_data.get(key, default)
    img_size = int(pick(img_size, "img_size", 224))
    mean, std = tuple(pick(mean, "mean", IMAGENET_MEAN)), tuple(pick(std, "std", IMAGENET_STD))
    eval_crop_pct = float(pick(eval_crop_pct, "eval_crop_pct", 0.875))
    in_chans = int(pick(in_chans, "in_chans", 3))
    dcfg = SimpleNamespace(img_size=img_size, mean=tuple(mean), std=tuple(std), eval_crop_pct=eval_crop_pct,
                           train_transform=run_data.get("train_transform", "standard"))
    if transform == "eval":
        tf = build_eval_transform(dcfg)
    elif transform == "train":
        from kdforge.data.transforms import build_train_transform
        tf = build_train_transform(dcfg)
    else:
        from kdforge.methods.kdep import kdep_reference_transform
        tf = kdep_reference_transform(img_size, mean, std)
    ds = build_dataset(data, split, tf, in_chans)
    loader = DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        pin_memory=dev.type == "cuda")
    amp_dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    t0 = time.time()
    acc = None
    for p in range(passes):
        ds.set_seed(seed, p)   # per-image augmentation seeds: a function of (seed, pass, index)
        acc = collect_svd(model, loader, dev, amp_dtype, max_images, progress, acc)
    seconds = time.time() - t0
    meta = {"teacher": teacher_id, "teacher_arch": getattr(model, "kdforge_name", type(model).__name__),
            "data": str(Path(data).resolve()), "split": split, "transform": transform,
            "transform_detail": repr(tf), "img_size": img_size, "mean": list(mean), "std": list(std),
            "seed": seed, "passes": passes, "images": len(ds), "samples": acc.n,
            "corrupt_images": ds.corrupt_count, "seconds": round(seconds, 2),
            "feature": "pooled pre-activation output of the last block", "amp": amp}
    if weights:
        meta["teacher_weights_sha256_1mb"] = _file_digest(Path(weights))
    aligner = acc.finalize(k=keep, **meta)
    aligner.save(_out_path(out))
    return aligner


def convert_reference_npy(reference: str | Path, out: str | Path, teacher: str, data: str | Path,
                          keep: Optional[int] = None):
    """Reference ``.npy`` statistics -> ``OUT`` (safetensors + JSON); returns the :class:`SVDAligner`."""
    from kdforge.align.svd import SVDAligner
    src = Path(reference)
    spec = SVDAligner._reference_npy_source(src)
    if spec is None:
        raise FileNotFoundError(f"kdep-svd --reference-npy: {str(src)!r} is neither a *_v.npy file nor a folder "
                                "holding model_v.npy (or Microsoft-ResNet50_v.npy)")
    al = SVDAligner.from_reference_npy(*spec)
    if keep is not None:
        al = al.truncated(int(keep))
    al.meta.update({"teacher": teacher, "data": str(data), "transform": "unknown (reference statistics)",
                    "source": str(src.resolve()),
                    "feature": "pooled pre-activation output of the last block"})
    al.save(_out_path(out))
    return al


def _out_path(out: str | Path) -> Path:
    p = Path(out)
    if p.suffix == ".safetensors":
        return p
    if p.is_dir() or not p.suffix:
        return p / "svd.safetensors"
    return p.with_suffix(".safetensors")


def add_parser(sub):
    p = sub.add_parser("kdep-svd", help="KDEP: PCA statistics of a frozen teacher's pre-activation features",
                       description="One streaming pass of the frozen teacher over DATA; writes OUT "
                                   "(svd.safetensors + svd.json: mean, principal directions V, singular values, "
                                   "N, teacher id, transform, sign convention).")
    p.add_argument("teacher", help="kdforge run folder / checkpoint, or a timm/torchvision model name (+ --weights)")
    p.add_argument("data", help="ImageFolder root (DATA/SPLIT is used when present) or a folder of images")
    p.add_argument("out", help="output .safetensors file or folder (-> OUT/svd.safetensors)")
    p.add_argument("--weights", help="teacher weights file (.safetensors/.pth) when TEACHER is a model name")
    p.add_argument("--num-classes", type=int, default=1000, help="teacher classifier size for --weights (default 1000)")
    p.add_argument("--split", default="train")
    p.add_argument("--img-size", type=int, default=None,
                   help="input size (default: the teacher run's data.img_size, else 224)")
    p.add_argument("--eval-crop-pct", type=float, default=None,
                   help="resize to size/pct, centre-crop (default: the teacher run's, else 0.875)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--transform", choices=["eval", "train", "reference"], default="eval",
                   help="eval: deterministic resize + centre crop (default); reference: KDEP's pre-training "
                        "augmentation; train: the teacher run's training augmentation (seeded per image)")
    p.add_argument("--passes", type=int, default=1, help="passes over the data (several need a random transform)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--num-workers", type=int, default=4)
    p.add_argument("--keep", type=int, default=None, help="principal directions to keep (default all non-trivial)")
    p.add_argument("--mean", type=float, nargs="+", default=None,
                   help="normalisation mean (default: the teacher run's, else ImageNet)")
    p.add_argument("--std", type=float, nargs="+", default=None)
    p.add_argument("--in-chans", type=int, default=None)
    p.add_argument("--max-images", type=int, default=None, help="stop after this many images")
    p.add_argument("--amp", choices=["none", "bf16", "fp16"], default="none")
    p.add_argument("--reference-npy", metavar="PATH", default=None,
                   help="convert the KDEP reference code's model_v.npy + model_feat_mean.npy (file or folder) "
                        "instead of running the teacher; TEACHER and DATA are recorded as provenance")
    return p


def run(args) -> int:
    if args.reference_npy:
        al = convert_reference_npy(args.reference_npy, args.out, args.teacher, args.data, keep=args.keep)
        print(json.dumps({"out": str(_out_path(args.out)), "dim": al.dim, "components": al.num_components,
                          "source": al.meta["source"]}))
        return 0
    al = compute_kdep_svd(args.teacher, args.data, args.out, weights=args.weights, split=args.split,
                          img_size=args.img_size, batch_size=args.batch_size, transform=args.transform,
                          seed=args.seed, device=args.device, num_workers=args.num_workers, keep=args.keep,
                          mean=args.mean, std=args.std, in_chans=args.in_chans, eval_crop_pct=args.eval_crop_pct,
                          num_classes=args.num_classes, max_images=args.max_images, amp=args.amp, progress=True,
                          passes=args.passes)
    s = al.singular_values.double()
    var = s ** 2
    top = float(var[: min(al.num_components, 64)].sum() / var.sum()) if float(var.sum()) > 0 else float("nan")
    print(json.dumps({"out": str(_out_path(args.out)), "samples": al.n_samples, "dim": al.dim,
                      "components": al.num_components, "variance_top64": round(top, 4),
                      "seconds": al.meta.get("seconds")}))
    return 0
