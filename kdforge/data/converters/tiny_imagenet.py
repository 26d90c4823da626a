"""``kdforge data tiny-imagenet SRC OUT``: Tiny-ImageNet (CS231n; 200 classes, 64×64) as an ImageFolder.

``SRC`` is the extracted ``tiny-imagenet-200`` folder (or a folder holding it), from
http://cs231n.stanford.edu/tiny-imagenet-200.zip::

    wnids.txt                              the 200 class ids, one a line
    words.txt                              <wnid> TAB <names> (optional here; the names go to dataset.json)
    train/<wnid>/images/<wnid>_<k>.JPEG    500 per class
    val/images/val_<k>.JPEG                10,000, labelled by
    val/val_annotations.txt                <file> TAB <wnid> TAB <box x0 y0 x1 y1>
    test/images/test_<k>.JPEG              unlabelled: not written

Output: ``OUT/train/<wnid>/<wnid>_<k>.JPEG`` and ``OUT/val/<wnid>/val_<k>.JPEG`` (the official val set as
the labelled val split) plus ``OUT/dataset.json`` (counts, classes, the words of each wnid). Files are
symlinked to SRC by default (100k images); ``--copy`` copies them. Re-running skips files already in
OUT, so an interrupted run resumes (a file already there, link or copy, is left as it is).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from kdforge.data.converters.mini_imagenet import write_items

URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
WHERE = (f"expected the extracted tiny-imagenet-200 folder (wnids.txt, train/<wnid>/images/*.JPEG, val/images/, "
         f"val/val_annotations.txt) from {URL}")


class TinyImageNetError(ValueError):
    """A malformed Tiny-ImageNet source; the CLI prints it as ``kdforge: error: ...``."""


def find_root(src: str | Path) -> Path:
    """The folder holding ``wnids.txt``: ``src`` or ``src/tiny-imagenet-200``."""
    src = Path(src)
    if not src.exists():
        raise FileNotFoundError(f"tiny-imagenet: {str(src)!r} does not exist; {WHERE}")
    if src.is_file():
        hint = " (unzip it first: the images are linked, not extracted)" if src.suffix.lower() == ".zip" else ""
        raise FileNotFoundError(f"tiny-imagenet: {str(src)!r} is a file{hint}; {WHERE}")
    for d in (src, src / "tiny-imagenet-200"):
        if (d / "wnids.txt").is_file():
            return d
    raise FileNotFoundError(f"tiny-imagenet: {str(src)!r} has no wnids.txt; {WHERE}")


def read_wnids(root: Path) -> list[str]:
    wnids = [ln.strip() for ln in (root / "wnids.txt").read_text().splitlines() if ln.strip()]
    if not wnids:
        raise TinyImageNetError(f"tiny-imagenet: {root / 'wnids.txt'} lists no classes")
    dup = sorted({w for w in wnids if wnids.count(w) > 1})
    if dup:
        raise TinyImageNetError(f"tiny-imagenet: {root / 'wnids.txt'} repeats {dup}")
    return wnids


def read_words(root: Path, wnids: list[str]) -> dict[str, str]:
    """wnid -> names from ``words.txt`` (only the listed wnids; empty when the file is absent)."""
    path = root / "words.txt"
    if not path.is_file():
        return {}
    want, out = set(wnids), {}
    for ln in path.read_text(encoding="utf-8", errors="replace").splitlines():
        wnid, _, words = ln.partition("\t")
        if wnid.strip() in want:
            out[wnid.strip()] = words.strip()
    return out


def tiny_imagenet_items(root: Path, wnids: list[str]) -> list[tuple[Path, str, str, str]]:
    """[(source path, split, wnid, file name)] for train and the labelled val set."""
    from kdforge.data.datasets import is_image
    items = []
    for wnid in wnids:
        d = root / "train" / wnid / "images"
        if not d.is_dir():
            raise FileNotFoundError(f"tiny-imagenet: train folder {str(d)!r} of class {wnid} is missing; {WHERE}")
        files = sorted(p for p in d.iterdir() if p.is_file() and is_image(p))
        if not files:
            raise TinyImageNetError(f"tiny-imagenet: {d} holds no images")
        items += [(p, "train", wnid, p.name) for p in files]
    ann = root / "val" / "val_annotations.txt"
    if not ann.is_file():
        raise FileNotFoundError(f"tiny-imagenet: {str(ann)!r} is missing; {WHERE}")
    known = set(wnids)
    seen: set[str] = set()
    for n, ln in enumerate(ann.read_text().splitlines(), 1):
        if not ln.strip():
            continue
        cols = ln.split("\t") if "\t" in ln else ln.split()
        if len(cols) < 2:
            raise TinyImageNetError(f"tiny-imagenet: {ann}:{n}: expected '<file> TAB <wnid> ...', got {ln!r}")
        fname, wnid = cols[0].strip(), cols[1].strip()
        if wnid not in known:
            raise TinyImageNetError(f"tiny-imagenet: {ann}:{n}: class {wnid!r} is not in wnids.txt")
        if fname in seen or "/" in fname:
            raise TinyImageNetError(f"tiny-imagenet: {ann}:{n}: bad or repeated file name {fname!r}")
        seen.add(fname)
        items.append((root / "val" / "images" / fname, "val", wnid, fname))
    if not seen:
        raise TinyImageNetError(f"tiny-imagenet: {ann} lists no images")
    return items


def convert_tiny_imagenet(src: str | Path, out: str | Path, copy: bool = False, workers: int = 8) -> dict:
    root = find_root(src)
    wnids = read_wnids(root)
    items = tiny_imagenet_items(root, wnids)
    meta = write_items(items, out, "tiny-imagenet", size=None, link=not copy, workers=workers,
                       source=f"{root.resolve()} ({'copied' if copy else 'symlinked'})")
    meta["mode"] = "copy" if copy else "symlink"
    meta["wnids"] = wnids
    meta["words"] = read_words(root, wnids)
    (Path(out) / "dataset.json").write_text(json.dumps(meta, indent=2))
    return meta


def add_parser(sub):
    p = sub.add_parser("tiny-imagenet", help="Tiny-ImageNet (200 classes, 64 px) as OUT/{train,val}/<wnid>/",
                       description="Write the extracted tiny-imagenet-200 folder as OUT/train/<wnid>/*.JPEG and "
                                   "OUT/val/<wnid>/*.JPEG (the official val set, labelled by "
                                   f"val_annotations.txt), symlinked by default. Download: {URL}")
    p.add_argument("src", help="the extracted tiny-imagenet-200 folder")
    p.add_argument("out", help="output folder")
    p.add_argument("--copy", action="store_true", help="copy the images instead of symlinking them")
    p.add_argument("--workers", type=int, default=8, help="writer threads (default 8)")
    return p


def run(args) -> int:
    try:
        convert_tiny_imagenet(args.src, args.out, copy=args.copy, workers=args.workers)
    except TinyImageNetError as e:
        print(f"kdforge: error: {e}", file=sys.stderr)
        return 2
    return 0
