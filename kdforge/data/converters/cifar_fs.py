"""``kdforge data cifar-fs SRC OUT``: CIFAR-FS (Bertinetto et al., ICLR 2019) from the CIFAR-100 pickle.

CIFAR-FS splits the 100 CIFAR-100 fine classes 64 / 16 / 20 (train / val / test); each class keeps all
600 images (the 500 train and 100 test images of CIFAR-100). ``SRC`` is the ``cifar-100-python``
folder or the ``cifar-100-python.tar.gz`` archive (files ``train``, ``test``, ``meta``). Output:
``OUT/{train,val,test}/<class name>/<split>_<index>.png`` (32×32, or ``--size`` px, bicubic) plus
``OUT/dataset.json``. The CIFAR-100 helpers here are shared with the FC100 converter.
"""
from __future__ import annotations

import io
import json
import pickle
import tarfile
from pathlib import Path
from typing import Callable, Optional

import numpy as np

#: CIFAR-FS split (Bertinetto et al. 2019): 64 train and 20 test fine classes; val = the other 16.
CIFAR_FS_TRAIN = (
    "dolphin", "seal", "aquarium_fish", "ray", "trout", "orchid", "sunflower", "tulip", "bottle", "bowl", "can",
    "cup", "plate", "apple", "mushroom", "orange", "pear", "clock", "keyboard", "chair", "couch", "bee",
    "caterpillar", "cockroach", "bear", "lion", "tiger", "wolf", "bridge", "castle", "house", "road", "skyscraper",
    "cloud", "forest", "mountain", "elephant", "kangaroo", "porcupine", "possum", "raccoon", "skunk", "lobster",
    "spider", "boy", "girl", "dinosaur", "lizard", "snake", "turtle", "hamster", "mouse", "rabbit", "shrew",
    "squirrel", "oak_tree", "palm_tree", "pine_tree", "willow_tree", "bus", "train", "lawn_mower", "streetcar",
    "tank")
CIFAR_FS_VAL = (
    "otter", "motorcycle", "television", "lamp", "crocodile", "shark", "butterfly", "beaver", "beetle", "tractor",
    "flatfish", "maple_tree", "camel", "crab", "sea", "cattle")
CIFAR_FS_TEST = (
    "whale", "poppy", "rose", "sweet_pepper", "telephone", "bed", "table", "wardrobe", "leopard", "plain",
    "chimpanzee", "fox", "snail", "worm", "baby", "man", "woman", "bicycle", "pickup_truck", "rocket")


def _plain(obj):
    """Pickles written by Python 3 (or read with ``encoding="bytes"``) have bytes keys and bytes class
    names; the distributed Python 2 pickles read with ``encoding="latin1"`` have str. Answer str."""
    if isinstance(obj, dict):
        return {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in obj.items()}
    return obj


def label_names(names) -> list[str]:
    """A CIFAR meta name list as str (bytes entries decoded)."""
    return [n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in names]


def read_cifar_pickles(src: str | Path, names: list[str], folder: str = "cifar-100-python",
                       expected: str = "train, test, meta", archive: str = "cifar-100-python.tar.gz") -> dict:
    """Read the CIFAR python pickles ``names`` from the extracted folder (``src`` itself, or ``src/<folder>``)
    or from the ``.tar.gz`` (opened once). Returns ``{name: dict with str keys}``."""
    src = Path(src)
    if not src.exists():
        raise FileNotFoundError(f"CIFAR source {str(src)!r} does not exist; expected the {folder} folder "
                                f"({expected}) or {archive}")
    out = {}
    if src.is_dir():
        base = src if any((src / n).is_file() for n in names) or not (src / folder).is_dir() else src / folder
        for name in names:
            path = base / name
            if not path.is_file():
                raise FileNotFoundError(f"{base}: no CIFAR file {name!r}; expected the {folder} folder "
                                        f"({expected}) or {archive}")
            out[name] = _plain(pickle.loads(path.read_bytes(), encoding="latin1"))
        return out
    if not tarfile.is_tarfile(src):
        raise FileNotFoundError(f"{src} is neither a folder nor a tar archive; expected the {folder} folder "
                                f"({expected}) or {archive}")
    with tarfile.open(src, "r:*") as tar:
        members = {}
        for m in tar.getmembers():
            base = m.name.rsplit("/", 1)[-1]
            if base in names and m.isfile() and base not in members:
                members[base] = m
        for name in names:
            if name not in members:
                raise FileNotFoundError(f"{src}: archive has no CIFAR member {name!r}; expected {archive} "
                                        f"({folder}/: {expected})")
            out[name] = _plain(pickle.load(io.BytesIO(tar.extractfile(members[name]).read()), encoding="latin1"))
    return out


def load_cifar100(src: str | Path) -> dict:
    """Read the CIFAR-100 python pickles from a folder or the .tar.gz.

    Returns ``{"images": uint8 (60000, 32, 32, 3), "fine": (60000,), "coarse": (60000,), "origin":
    ["train_<i>" | "test_<i>"], "fine_names": [...], "coarse_names": [...]}`` (train rows first)."""
    files = read_cifar_pickles(src, ["meta", "train", "test"])
    meta = files["meta"]
    parts = [files["train"], files["test"]]
    images = np.concatenate([cifar_rows_to_images(p["data"]) for p in parts])
    origin = [f"{tag}_{i:05d}" for tag, p in zip(("train", "test"), parts) for i in range(len(p["fine_labels"]))]
    return {"images": images, "fine": np.concatenate([np.asarray(p["fine_labels"]) for p in parts]),
            "coarse": np.concatenate([np.asarray(p["coarse_labels"]) for p in parts]), "origin": origin,
            "fine_names": label_names(meta["fine_label_names"]),
            "coarse_names": label_names(meta["coarse_label_names"])}


def cifar_rows_to_images(data) -> np.ndarray:
    """CIFAR rows (N, 3072) = R plane, G plane, B plane of 32×32, row-major -> uint8 (N, 32, 32, 3)."""
    return np.asarray(data, dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)


def write_cifar_split(data: dict, split_of_fine: dict[str, str], out: str | Path, name: str,
                      size: Optional[int] = None, progress: Optional[Callable[[str], None]] = print) -> dict:
    """Write every image whose fine class is in ``split_of_fine`` (fine name -> split) as
    ``OUT/<split>/<fine name>/<origin>.png``; returns and saves the ``dataset.json`` metadata."""
    from PIL import Image
    out = Path(out)
    names = data["fine_names"]
    unknown = sorted(set(split_of_fine) - set(names))
    if unknown:
        raise ValueError(f"{name}: classes {unknown} are not CIFAR-100 fine classes")
    counts: dict[str, int] = {}
    classes: dict[str, list[str]] = {}
    for split in sorted(set(split_of_fine.values())):
        classes[split] = sorted(c for c, s in split_of_fine.items() if s == split)
    for i, (img, f) in enumerate(zip(data["images"], data["fine"])):
        cname = names[int(f)]
        split = split_of_fine.get(cname)
        if split is None:
            continue
        d = out / split / cname
        d.mkdir(parents=True, exist_ok=True)
        im = Image.fromarray(img, mode="RGB")
        if size:
            im = im.resize((size, size), Image.BICUBIC)
        im.save(d / f"{data['origin'][i]}.png")
        counts[split] = counts.get(split, 0) + 1
    meta = {"name": name, "classes": classes, "counts": counts, "image_size": [size or 32] * 2,
            "source": "CIFAR-100 python pickle"}
    (out / "dataset.json").write_text(json.dumps(meta, indent=2))
    if progress:
        progress(f"wrote {name} to {out}: " + ", ".join(f"{k} {v} images / {len(classes[k])} classes"
                                                       for k, v in counts.items()))
    return meta


def cifar_fs_split() -> dict[str, str]:
    """Fine class name -> 'train' | 'val' | 'test' (64 / 16 / 20)."""
    out = {c: "train" for c in CIFAR_FS_TRAIN}
    out.update({c: "val" for c in CIFAR_FS_VAL})
    out.update({c: "test" for c in CIFAR_FS_TEST})
    return out


def add_parser(sub):
    return add_fewshot_split_parser(sub, "cifar-fs", "CIFAR-FS few-shot split (64/16/20 classes)",
                                    "CIFAR-FS (Bertinetto et al. 2019)")


def add_fewshot_split_parser(sub, name: str, help_: str, title: str):
    """The shared CLI of the CIFAR-100-derived few-shot splits (SRC OUT [--size])."""
    p = sub.add_parser(name, help=f"{help_} from the CIFAR-100 pickle",
                       description=f"Write {title} as OUT/{{train,val,test}}/<class>/*.png "
                                   "from cifar-100-python (folder or .tar.gz).")
    p.add_argument("src", help="cifar-100-python folder or cifar-100-python.tar.gz")
    p.add_argument("out", help="output folder")
    p.add_argument("--size", type=int, default=None, help="resize to SIZE×SIZE (bicubic), e.g. 84; default 32")
    return p


def run(args) -> int:
    write_cifar_split(load_cifar100(args.src), cifar_fs_split(), args.out, "cifar-fs", args.size)
    return 0
