"""``kdforge data cifar10|cifar100|cifar SRC OUT``: CIFAR-10 / CIFAR-100 python pickles -> PNG ImageFolder.

``SRC`` is the extracted ``cifar-10-batches-py`` folder (``data_batch_1..5``, ``test_batch``,
``batches.meta``) or ``cifar-100-python`` folder (``train``, ``test``, ``meta``), a folder holding one
of them, or the downloaded ``cifar-10-python.tar.gz`` / ``cifar-100-python.tar.gz`` itself (read in
place, nothing is extracted). Download: https://www.cs.toronto.edu/~kriz/cifar.html ("python version").

Layout written::

    OUT/train/<class name>/<index>.png   index = row of the concatenated train batches (00000..49999)
    OUT/test/<class name>/<index>.png    index = row of the test batch (00000..09999)
    OUT/val/<class name>/<index>.png     only with --val N: N train images per class, moved out of train
    OUT/dataset.json                     name, labels, val, seed, classes, counts

Images are the original 32×32 RGB pixels, written losslessly. Class names come from the pickle's own
meta file (``label_names``; CIFAR-100: ``fine_label_names`` or, with ``--labels coarse``,
``coarse_label_names``).

The ``--val`` choice is seeded per class exactly as ``kdforge data subset`` chooses
(:func:`kdforge.data.converters.subset.class_rng` of (seed, class name) over the class's train rows in
order), so it depends only on (seed, N, class) and two runs agree.

Re-running with the same settings on a complete ``OUT`` does nothing; an ``OUT`` holding something else
(another setting, or an interrupted run) is refused unless ``--force``, which deletes
``OUT/{train,val,test}`` first. ``kdforge data cifar`` tells CIFAR-10 from CIFAR-100 by the files.
"""
from __future__ import annotations

import json
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from kdforge.data.converters.cifar_fs import cifar_rows_to_images, label_names, read_cifar_pickles
from kdforge.data.converters.subset import class_rng

URL = "https://www.cs.toronto.edu/~kriz/cifar.html"
SPLITS = ("train", "val", "test")


class CifarError(ValueError):
    """A bad CIFAR source or option; the CLI prints it as ``kdforge: error: ...``."""


@dataclass(frozen=True)
class CifarSpec:
    name: str
    folder: str
    archive: str
    train: tuple[str, ...]
    test: tuple[str, ...]
    meta: str
    label_keys: dict  # labels kind -> (label key in batches, name key in meta)

    @property
    def files(self) -> list[str]:
        return [self.meta, *self.train, *self.test]

    @property
    def expected(self) -> str:
        return ", ".join(self.files)


CIFAR10 = CifarSpec("cifar10", "cifar-10-batches-py", "cifar-10-python.tar.gz",
                    tuple(f"data_batch_{i}" for i in range(1, 6)), ("test_batch",), "batches.meta",
                    {"fine": ("labels", "label_names")})
CIFAR100 = CifarSpec("cifar100", "cifar-100-python", "cifar-100-python.tar.gz", ("train",), ("test",), "meta",
                     {"fine": ("fine_labels", "fine_label_names"), "coarse": ("coarse_labels", "coarse_label_names")})
SPECS = {"cifar10": CIFAR10, "cifar100": CIFAR100}


def _dir_of(src: Path, spec: CifarSpec) -> Optional[Path]:
    """The folder holding ``spec``'s files: ``src`` or ``src/<spec.folder>``; None if neither."""
    for d in (src, src / spec.folder):
        if (d / spec.meta).is_file():
            return d
    return None


def _archive_kind(src: Path) -> Optional[str]:
    import tarfile
    with tarfile.open(src, "r:*") as tar:
        names = {n.rsplit("/", 1)[-1] for n in tar.getnames()}
    for spec in SPECS.values():
        if spec.meta in names:
            return spec.name
    return None


def detect(src: str | Path) -> str:
    """'cifar10' or 'cifar100' from what ``src`` (folder or archive) holds."""
    import tarfile
    src = Path(src)
    if src.is_dir():
        for spec in SPECS.values():
            if _dir_of(src, spec) is not None:
                return spec.name
    elif src.is_file() and tarfile.is_tarfile(src):
        kind = _archive_kind(src)
        if kind:
            return kind
    raise FileNotFoundError(
        f"{str(src)!r} is not a CIFAR source: expected the extracted cifar-10-batches-py folder "
        f"({CIFAR10.expected}) or cifar-100-python folder ({CIFAR100.expected}), or the .tar.gz "
        f"('python version' from {URL})")


def check_source(src: str | Path, spec: CifarSpec) -> None:
    """Fail early, naming what was expected and where to get it (and the other converter when ``src``
    is the other CIFAR)."""
    import tarfile
    src = Path(src)
    where = (f"expected the extracted {spec.folder} folder ({spec.expected}) or {spec.archive} "
             f"('CIFAR-{spec.name[5:]} python version' from {URL})")
    if not src.exists():
        raise FileNotFoundError(f"{spec.name}: {str(src)!r} does not exist; {where}")
    other = CIFAR100 if spec is CIFAR10 else CIFAR10
    if src.is_dir():
        if _dir_of(src, spec) is not None:
            return
        if _dir_of(src, other) is not None:
            raise FileNotFoundError(f"{spec.name}: {str(src)!r} holds {other.folder} ({other.expected}), not "
                                    f"{spec.folder}; use 'kdforge data {other.name}' for it, or {where}")
        raise FileNotFoundError(f"{spec.name}: {str(src)!r} has no {spec.meta!r}; {where}")
    if not tarfile.is_tarfile(src):
        raise FileNotFoundError(f"{spec.name}: {str(src)!r} is neither a folder nor a tar archive; {where}")
    kind = _archive_kind(src)
    if kind == other.name:
        raise FileNotFoundError(f"{spec.name}: {str(src)!r} is {other.archive}; use 'kdforge data {other.name}' "
                                f"for it, or {where}")
    if kind is None:
        raise FileNotFoundError(f"{spec.name}: archive {str(src)!r} has no {spec.meta!r}; {where}")


def load_cifar(src: str | Path, spec: CifarSpec, labels: str = "fine") -> dict:
    """``{"train": (images uint8 (N, 32, 32, 3), labels (N,)), "test": (...), "classes": [names]}``."""
    if labels not in spec.label_keys:
        raise CifarError(f"{spec.name}: --labels must be one of {sorted(spec.label_keys)}, got {labels!r}")
    check_source(src, spec)
    files = read_cifar_pickles(src, spec.files, spec.folder, spec.expected, spec.archive)
    label_key, names_key = spec.label_keys[labels]
    meta = files[spec.meta]
    if names_key not in meta:
        raise CifarError(f"{spec.name}: {spec.meta!r} has no {names_key!r} (keys: {sorted(meta)}); is this "
                         f"{spec.folder}?")
    classes = label_names(meta[names_key])
    out: dict = {"classes": classes}
    for split, parts in (("train", spec.train), ("test", spec.test)):
        imgs, ys = [], []
        for part in parts:
            batch = files[part]
            if "data" not in batch or label_key not in batch:
                raise CifarError(f"{spec.name}: {part!r} has no 'data' / {label_key!r} (keys: {sorted(batch)})")
            data = np.asarray(batch["data"])
            if data.ndim != 2 or data.shape[1] != 3072:
                raise CifarError(f"{spec.name}: {part!r} data has shape {data.shape}, expected (N, 3072)")
            y = np.asarray(batch[label_key], dtype=np.int64)
            if len(y) != len(data):
                raise CifarError(f"{spec.name}: {part!r} has {len(data)} images but {len(y)} labels")
            imgs.append(cifar_rows_to_images(data))
            ys.append(y)
        y = np.concatenate(ys)
        if len(y) and (y.min() < 0 or y.max() >= len(classes)):
            raise CifarError(f"{spec.name}: {split} labels outside 0..{len(classes) - 1}")
        out[split] = (np.concatenate(imgs), y)
    return out


def val_rows(train_labels: np.ndarray, classes: list[str], per_class: int, seed: int) -> np.ndarray:
    """Sorted train rows held out as val: ``per_class`` rows of every class, chosen by the class's own
    generator (seed, class name) among that class's rows in order."""
    if per_class < 0:
        raise CifarError(f"--val must be >= 0, got {per_class}")
    if per_class == 0:
        return np.zeros(0, dtype=np.int64)
    picked = []
    for c, name in enumerate(classes):
        rows = np.flatnonzero(train_labels == c)
        if per_class >= len(rows):
            raise CifarError(f"--val {per_class} would leave no training images of class {name!r} "
                             f"({len(rows)} train images)")
        picked.append(rows[class_rng(seed, name).permutation(len(rows))[:per_class]])
    return np.sort(np.concatenate(picked))


def _save_png(job) -> None:
    from PIL import Image
    img, path = job
    Image.fromarray(img).save(path)


def convert_cifar(src: str | Path, out: str | Path, spec: CifarSpec, labels: str = "fine", val: int = 0,
                  seed: int = 0, force: bool = False, workers: int = 4, progress: bool = True) -> dict:
    """Write ``spec`` from ``src`` to ``out`` (layout in the module doc); returns the dataset.json dict."""
    out = Path(out)
    settings = {"name": spec.name, "labels": labels, "val": int(val), "seed": int(seed)}
    meta_path = out / "dataset.json"
    if meta_path.is_file():
        try:
            old = json.loads(meta_path.read_text())
        except ValueError:
            old = {}
        if all(old.get(k) == v for k, v in settings.items()) and not force:
            if progress:
                print(f"{spec.name}: {out} already holds this conversion ({old.get('counts')}); nothing to do")
            return old
    data = load_cifar(src, spec, labels)   # errors on a bad source before touching OUT
    present = [s for s in SPLITS if (out / s).exists()]
    if present or meta_path.exists():
        if not force:
            raise FileExistsError(
                f"{spec.name}: {out} already holds {', '.join(present) or 'dataset.json'} from another conversion "
                f"(other settings or an interrupted run); choose another OUT or pass --force to replace "
                f"{out}/{{train,val,test}}")
        for s in present:
            shutil.rmtree(out / s)
        meta_path.unlink(missing_ok=True)
    classes = data["classes"]
    if len(set(classes)) != len(classes) or any(not c or "/" in c or c in (".", "..") for c in classes):
        raise CifarError(f"{spec.name}: class names {classes} cannot all be folder names")
    train_x, train_y = data["train"]
    test_x, test_y = data["test"]
    held = np.zeros(len(train_y), dtype=bool)
    held[val_rows(train_y, classes, int(val), int(seed))] = True
    width = max(5, len(str(max(len(train_y), len(test_y)) - 1)))
    jobs = []
    counts = {s: 0 for s in SPLITS}
    for split, xs, ys, is_val in (("train", train_x, train_y, held), ("test", test_x, test_y, None)):
        for i, (img, y) in enumerate(zip(xs, ys)):
            s = "val" if is_val is not None and is_val[i] else split
            jobs.append((img, out / s / classes[int(y)] / f"{i:0{width}d}.png"))
            counts[s] += 1
    for s in SPLITS:
        if counts[s]:
            for c in classes:
                (out / s / c).mkdir(parents=True, exist_ok=True)
    from tqdm.auto import tqdm
    with ThreadPoolExecutor(max(1, workers)) as pool, \
            tqdm(total=len(jobs), unit="img", desc=spec.name, disable=None if progress else True,
                 file=sys.stderr) as bar:
        for _ in pool.map(_save_png, jobs):
            bar.update()
    counts = {s: n for s, n in counts.items() if n}
    meta = {**settings, "classes": classes, "counts": counts, "image_size": [32, 32],
            "source": f"{spec.folder} python pickles ({Path(src).name})",
            "val_from": "train" if val else None}
    meta_path.write_text(json.dumps(meta, indent=2))
    if progress:
        print(f"wrote {spec.name} to {out}: " + ", ".join(f"{s} {n} images" for s, n in counts.items())
              + f" / {len(classes)} classes")
    return meta


def add_common(p, spec_name: str) -> None:
    p.add_argument("src", help="the extracted cifar folder or the downloaded .tar.gz" if spec_name == "cifar" else
                   f"the extracted {SPECS[spec_name].folder} folder or {SPECS[spec_name].archive}")
    p.add_argument("out", help="output folder")
    p.add_argument("--val", type=int, default=0, metavar="N",
                   help="hold out N train images per class as OUT/val (seeded; default 0: no val)")
    p.add_argument("--seed", type=int, default=0, help="seed of the --val choice (default 0)")
    p.add_argument("--force", action="store_true", help="replace OUT/{train,val,test} if OUT holds other data")
    p.add_argument("--workers", type=int, default=4, help="PNG writer threads (default 4)")


def add_parser(sub):
    p = sub.add_parser("cifar", help="CIFAR-10 or CIFAR-100 (told apart by the files) as a PNG ImageFolder",
                       description="Write CIFAR-10 or CIFAR-100 (python pickles, folder or .tar.gz) as "
                                   "OUT/{train,[val,]test}/<class>/<index>.png. Same as 'kdforge data cifar10' "
                                   "/ 'kdforge data cifar100', choosing by what SRC holds.")
    add_common(p, "cifar")
    p.add_argument("--labels", choices=("fine", "coarse"), default="fine",
                   help="CIFAR-100 only: 100 fine classes (default) or 20 coarse super-classes")
    return p


def run_spec(args, name: str) -> int:
    """Shared ``run`` of the cifar, cifar10 and cifar100 commands."""
    try:
        spec = SPECS[name]
        labels = getattr(args, "labels", "fine")
        if spec is CIFAR10 and labels != "fine":
            raise CifarError("cifar10: --labels coarse exists only for CIFAR-100")
        convert_cifar(args.src, args.out, spec, labels=labels, val=args.val, seed=args.seed,
                      force=args.force, workers=args.workers)
    except (CifarError, FileExistsError) as e:
        print(f"kdforge: error: {e}", file=sys.stderr)
        return 2
    return 0


def run(args) -> int:
    try:
        name = detect(args.src)
    except FileNotFoundError as e:
        print(f"kdforge: error: {e}", file=sys.stderr)
        return 2
    return run_spec(args, name)
