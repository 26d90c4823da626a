"""``kdforge data cifar10 / cifar100 / cifar / tiny-imagenet`` on tiny fake sources in the real on-disk formats.

CIFAR: python pickles of dicts with ``data`` uint8 (N, 3072) (R plane, G plane, B plane of 32×32, row-major),
``labels`` (CIFAR-10) or ``fine_labels`` / ``coarse_labels`` (CIFAR-100), and a meta pickle with
``label_names`` / ``fine_label_names`` / ``coarse_label_names``. Python-3-made pickles (and the originals read
with ``encoding="bytes"``) have bytes keys; the originals read with ``encoding="latin1"`` have str keys: both.
"""
import json
import os
import pickle
import tarfile

import numpy as np
import pytest
from PIL import Image

from kdforge.cli import main
from kdforge.data.datasets import scan_image_folder

C10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
C100_FINE = ["apple", "aquarium_fish", "baby", "bear", "beaver", "bed"]
C100_COARSE = ["fruit_and_vegetables", "fish", "people"]
FINE_TO_COARSE = [0, 1, 2, 0, 1, 2]


def to_rows(imgs: np.ndarray) -> np.ndarray:
    """(N, 32, 32, 3) HWC -> CIFAR rows, written out plane by plane (independently of the converter)."""
    rows = np.empty((len(imgs), 3072), dtype=np.uint8)
    for n, img in enumerate(imgs):
        rows[n, 0:1024] = img[:, :, 0].reshape(-1)       # red plane, row-major
        rows[n, 1024:2048] = img[:, :, 1].reshape(-1)    # green
        rows[n, 2048:3072] = img[:, :, 2].reshape(-1)    # blue
    return rows


def _k(key: str, as_bytes: bool):
    return key.encode() if as_bytes else key


def _dump(path, d: dict, as_bytes: bool):
    with open(path, "wb") as f:
        pickle.dump({_k(k, as_bytes): v for k, v in d.items()}, f, protocol=2)


def make_cifar10(parent, per_class_per_batch=(1, 0, 1, 0, 1), test_per_class=1, as_bytes=True, seed=0):
    """A fake cifar-10-batches-py: 5 train batches + test_batch + batches.meta; returns (root, train, test)
    with train/test = (HWC images, labels) in row order."""
    rng = np.random.default_rng(seed)
    root = parent / "cifar-10-batches-py"
    root.mkdir(parents=True)
    enc = (lambda s: s.encode()) if as_bytes else (lambda s: s)
    all_x, all_y = [], []
    for b, k in enumerate(per_class_per_batch, 1):
        y = [c for c in range(10) for _ in range(k)]
        rng.shuffle(y)
        x = rng.integers(0, 256, size=(len(y), 32, 32, 3), dtype=np.uint8)
        _dump(root / f"data_batch_{b}", {"batch_label": enc(f"training batch {b} of 5"), "labels": list(y),
                                         "data": to_rows(x), "filenames": [enc(f"f{b}_{i}.png") for i in range(len(y))]},
              as_bytes)
        all_x.append(x)
        all_y += list(y)
    ty = [c for c in range(10) for _ in range(test_per_class)][::-1]
    tx = rng.integers(0, 256, size=(len(ty), 32, 32, 3), dtype=np.uint8)
    _dump(root / "test_batch", {"batch_label": enc("testing batch 1 of 1"), "labels": ty, "data": to_rows(tx),
                                "filenames": [enc(f"t_{i}.png") for i in range(len(ty))]}, as_bytes)
    _dump(root / "batches.meta", {"label_names": [enc(n) for n in C10_NAMES], "num_cases_per_batch": 6,
                                  "num_vis": 3072}, as_bytes)
    return root, (np.concatenate(all_x), np.array(all_y)), (tx, np.array(ty))


def make_cifar100(parent, train_per_class=3, test_per_class=1, as_bytes=True, seed=1):
    rng = np.random.default_rng(seed)
    root = parent / "cifar-100-python"
    root.mkdir(parents=True)
    enc = (lambda s: s.encode()) if as_bytes else (lambda s: s)
    out = {}
    for name, k in (("train", train_per_class), ("test", test_per_class)):
        fine = [c for _ in range(k) for c in range(len(C100_FINE))]
        x = rng.integers(0, 256, size=(len(fine), 32, 32, 3), dtype=np.uint8)
        _dump(root / name, {"filenames": [enc(f"{name}_{i}.png") for i in range(len(fine))], "batch_label":
                            enc(name), "fine_labels": fine, "coarse_labels": [FINE_TO_COARSE[f] for f in fine],
                            "data": to_rows(x)}, as_bytes)
        out[name] = (x, np.array(fine))
    _dump(root / "meta", {"fine_label_names": [enc(n) for n in C100_FINE],
                          "coarse_label_names": [enc(n) for n in C100_COARSE]}, as_bytes)
    return root, out["train"], out["test"]


def png(path) -> np.ndarray:
    with Image.open(path) as im:
        assert im.mode == "RGB" and im.size == (32, 32)
        return np.asarray(im)


def listing(root) -> dict:
    """{split: {class: sorted file names}}."""
    return {s.name: {c.name: sorted(f.name for f in c.iterdir()) for c in sorted(s.iterdir())}
            for s in sorted(root.iterdir()) if s.is_dir()}


def cli(capsys, *argv):
    rc = main(["data", *map(str, argv)])
    cap = capsys.readouterr()
    return rc, cap.out + cap.err


# ----------------------------------------------------------------------------------------------- CIFAR-10

@pytest.mark.parametrize("as_bytes", [True, False], ids=["bytes-keys", "str-keys"])
def test_cifar10_pixels_labels_and_layout(tmp_path, capsys, as_bytes):
    src, (x, y), (tx, ty) = make_cifar10(tmp_path / "src", as_bytes=as_bytes)
    out = tmp_path / "out"
    rc, msg = cli(capsys, "cifar10", src, out)
    assert rc == 0, msg
    tree = listing(out)
    assert set(tree) == {"train", "test"}                      # no val without --val
    assert sorted(tree["train"]) == sorted(C10_NAMES) and sorted(tree["test"]) == sorted(C10_NAMES)
    assert sum(map(len, tree["train"].values())) == 30 and all(len(v) == 3 for v in tree["train"].values())
    assert all(len(v) == 1 for v in tree["test"].values())
    # every image is exactly its row, in its class folder, named by its row index (train rows concatenated
    # over data_batch_1..5 in order)
    for i in range(len(y)):
        assert np.array_equal(png(out / "train" / C10_NAMES[y[i]] / f"{i:05d}.png"), x[i])
    for i in range(len(ty)):
        assert np.array_equal(png(out / "test" / C10_NAMES[ty[i]] / f"{i:05d}.png"), tx[i])
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["classes"] == C10_NAMES and meta["counts"] == {"train": 30, "test": 10}
    # the files are readable through kdforge's own ImageFolder scan
    classes, samples = scan_image_folder(out / "train")
    assert sorted(classes) == sorted(C10_NAMES) and len(samples) == 30


def test_cifar_channel_order_is_r_g_b_planes(tmp_path, capsys):
    """A row whose first 1024 bytes are 255 is pure red; bytes 1024 + 32·r + c are green at (r, c)."""
    src, _, _ = make_cifar10(tmp_path / "src", per_class_per_batch=(1, 0, 0, 0, 0))
    d = pickle.loads((src / "data_batch_1").read_bytes())
    data = np.zeros((10, 3072), dtype=np.uint8)
    data[0, :1024] = 255                      # row 0: red everywhere
    data[1, 1024 + 32 * 2 + 5] = 200          # row 1: green at (row 2, col 5) only
    data[2, 2048 + 32 * 31 + 0] = 77          # row 2: blue at (row 31, col 0) only
    d[b"data"] = data
    (src / "data_batch_1").write_bytes(pickle.dumps(d))
    out = tmp_path / "out"
    assert cli(capsys, "cifar10", src, out)[0] == 0
    labels = d[b"labels"]
    a = png(out / "train" / C10_NAMES[labels[0]] / "00000.png")
    assert (a[..., 0] == 255).all() and (a[..., 1:] == 0).all()
    b = png(out / "train" / C10_NAMES[labels[1]] / "00001.png")
    assert b[2, 5].tolist() == [0, 200, 0] and b.sum() == 200
    c = png(out / "train" / C10_NAMES[labels[2]] / "00002.png")
    assert c[31, 0].tolist() == [0, 0, 77] and c.sum() == 77


def test_cifar10_from_tar_gz_matches_folder(tmp_path, capsys):
    src, (x, y), _ = make_cifar10(tmp_path / "src")
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(src, arcname="cifar-10-batches-py")
    a, b = tmp_path / "from_dir", tmp_path / "from_tar"
    assert cli(capsys, "cifar10", src, a)[0] == 0
    assert cli(capsys, "cifar10", archive, b)[0] == 0
    assert listing(a) == listing(b)
    for split, classes in listing(a).items():
        for c, files in classes.items():
            for f in files:
                assert np.array_equal(png(a / split / c / f), png(b / split / c / f))
    # the parent folder of cifar-10-batches-py works too
    assert cli(capsys, "cifar10", tmp_path / "src", tmp_path / "from_parent")[0] == 0
    assert listing(tmp_path / "from_parent") == listing(a)


# ---------------------------------------------------------------------------------------------- CIFAR-100

@pytest.mark.parametrize("as_bytes", [True, False], ids=["bytes-keys", "str-keys"])
def test_cifar100_fine_and_coarse(tmp_path, capsys, as_bytes):
    src, (x, fine), (tx, tfine) = make_cifar100(tmp_path / "src", as_bytes=as_bytes)
    rc, msg = cli(capsys, "cifar100", src, tmp_path / "fine")
    assert rc == 0, msg
    tree = listing(tmp_path / "fine")
    assert sorted(tree["train"]) == sorted(C100_FINE) and all(len(v) == 3 for v in tree["train"].values())
    for i in range(len(fine)):
        assert np.array_equal(png(tmp_path / "fine" / "train" / C100_FINE[fine[i]] / f"{i:05d}.png"), x[i])
    for i in range(len(tfine)):
        assert np.array_equal(png(tmp_path / "fine" / "test" / C100_FINE[tfine[i]] / f"{i:05d}.png"), tx[i])

    rc, msg = cli(capsys, "cifar100", src, tmp_path / "coarse", "--labels", "coarse")
    assert rc == 0, msg
    tree = listing(tmp_path / "coarse")
    assert sorted(tree["train"]) == sorted(C100_COARSE)
    assert all(len(v) == 6 for v in tree["train"].values())    # two fine classes per super-class × 3
    for i in range(len(fine)):
        coarse = C100_COARSE[FINE_TO_COARSE[fine[i]]]
        assert np.array_equal(png(tmp_path / "coarse" / "train" / coarse / f"{i:05d}.png"), x[i])
    meta = json.loads((tmp_path / "coarse" / "dataset.json").read_text())
    assert meta["labels"] == "coarse" and meta["classes"] == C100_COARSE


def test_cifar_autodetect(tmp_path, capsys):
    c100, _, _ = make_cifar100(tmp_path / "a")
    c10, _, _ = make_cifar10(tmp_path / "b")
    assert cli(capsys, "cifar", c100, tmp_path / "o100")[0] == 0
    assert cli(capsys, "cifar", c10, tmp_path / "o10")[0] == 0
    assert json.loads((tmp_path / "o100" / "dataset.json").read_text())["name"] == "cifar100"
    assert sorted(listing(tmp_path / "o10")["train"]) == sorted(C10_NAMES)
    (tmp_path / "empty").mkdir()
    rc, msg = cli(capsys, "cifar", tmp_path / "empty", tmp_path / "o")
    assert rc == 2 and "cifar-10-batches-py" in msg and "cifar-100-python" in msg


# --------------------------------------------------------------------------------------------- val split

def _val_rows(out):
    return {c: sorted(int(f[:-4]) for f in files) for c, files in listing(out).get("val", {}).items()}


def test_val_split_is_seeded_disjoint_and_exact(tmp_path, capsys):
    src, (x, y), _ = make_cifar10(tmp_path / "src", per_class_per_batch=(2, 1, 1, 0, 1))   # 5 per class
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    assert cli(capsys, "cifar10", src, a, "--val", "2")[0] == 0
    assert cli(capsys, "cifar10", src, b, "--val", "2")[0] == 0
    assert cli(capsys, "cifar10", src, c, "--val", "2", "--seed", "1")[0] == 0
    ta = listing(a)
    assert set(ta) == {"train", "val", "test"}
    assert all(len(v) == 2 for v in ta["val"].values()) and all(len(v) == 3 for v in ta["train"].values())
    assert ta == listing(b)                                    # same seed -> same split
    assert _val_rows(c) != _val_rows(a)  # other seed -> another split
    # val and train partition the original train rows; each val file is its own train row
    for cls in C10_NAMES:
        val = {int(f[:-4]) for f in ta["val"][cls]}
        train = {int(f[:-4]) for f in ta["train"][cls]}
        assert not val & train
        assert val | train == {i for i in range(len(y)) if C10_NAMES[y[i]] == cls}
        for i in val:
            assert np.array_equal(png(a / "val" / cls / f"{i:05d}.png"), x[i])
    meta = json.loads((a / "dataset.json").read_text())
    assert meta["counts"] == {"train": 30, "val": 20, "test": 10} and meta["val"] == 2 and meta["seed"] == 0


def test_val_per_class_does_not_depend_on_other_classes(tmp_path, capsys):
    """The held-out images of a class depend on (seed, class name, that class's rows in order) only:
    adding images of another class in front (which shifts every row index) changes nothing for the rest."""
    src, (x, y), _ = make_cifar100(tmp_path / "src", train_per_class=4)
    assert cli(capsys, "cifar100", src, tmp_path / "a", "--val", "1")[0] == 0
    d = pickle.loads((src / "train").read_bytes())
    extra = np.random.default_rng(9).integers(0, 256, size=(3, 3072), dtype=np.uint8)
    d[b"data"] = np.concatenate([extra, d[b"data"]])
    d[b"fine_labels"] = [0, 0, 0] + list(d[b"fine_labels"])          # three more 'apple' images first
    d[b"coarse_labels"] = [FINE_TO_COARSE[0]] * 3 + list(d[b"coarse_labels"])
    (src / "train").write_bytes(pickle.dumps(d))
    assert cli(capsys, "cifar100", src, tmp_path / "b", "--val", "1", "--force")[0] == 0
    va, vb = listing(tmp_path / "a")["val"], listing(tmp_path / "b")["val"]
    assert set(va) == set(vb) == set(C100_FINE)
    for c in C100_FINE[1:]:
        (fa,), (fb,) = va[c], vb[c]
        assert int(fb[:-4]) == int(fa[:-4]) + 3                         # same image, shifted row
        assert np.array_equal(png(tmp_path / "b" / "val" / c / fb), x[int(fa[:-4])])
    assert len(listing(tmp_path / "b")["train"]["apple"]) == 6


def test_val_too_large_and_bad_labels_fail_cleanly(tmp_path, capsys):
    src, _, _ = make_cifar10(tmp_path / "src")                # 3 train images per class
    rc, msg = cli(capsys, "cifar10", src, tmp_path / "o", "--val", "3")
    assert rc == 2 and "--val 3" in msg and "airplane" in msg and "Traceback" not in msg
    assert not (tmp_path / "o" / "train").exists()
    rc, msg = cli(capsys, "cifar10", src, tmp_path / "o", "--val", "-1")
    assert rc == 2 and "--val" in msg
    with pytest.raises(SystemExit):
        main(["data", "cifar100", str(src), str(tmp_path / "o"), "--labels", "medium"])
    capsys.readouterr()


# ------------------------------------------------------------------------------------ errors, idempotence

def test_source_errors_name_what_is_expected(tmp_path, capsys):
    rc, msg = cli(capsys, "cifar10", tmp_path / "nope", tmp_path / "o")
    assert rc == 2 and "does not exist" in msg and "cifar-10-batches-py" in msg and "cs.toronto.edu" in msg
    c100, _, _ = make_cifar100(tmp_path / "c100")
    rc, msg = cli(capsys, "cifar10", c100, tmp_path / "o")
    assert rc == 2 and "kdforge data cifar100" in msg
    c10, _, _ = make_cifar10(tmp_path / "c10")
    rc, msg = cli(capsys, "cifar100", c10, tmp_path / "o")
    assert rc == 2 and "kdforge data cifar10" in msg and "cifar-100-python" in msg
    (tmp_path / "empty").mkdir()
    rc, msg = cli(capsys, "cifar100", tmp_path / "empty", tmp_path / "o")
    assert rc == 2 and "'meta'" in msg and "cifar-100-python.tar.gz" in msg
    (tmp_path / "x.tar.gz").write_bytes(b"not an archive")
    rc, msg = cli(capsys, "cifar10", tmp_path / "x.tar.gz", tmp_path / "o")
    assert rc == 2 and "neither a folder nor a tar archive" in msg
    (c10 / "data_batch_4").unlink()
    rc, msg = cli(capsys, "cifar10", c10, tmp_path / "o")
    assert rc == 2 and "data_batch_4" in msg
    assert not (tmp_path / "o").exists()
    assert "Traceback" not in msg


def test_rerun_is_a_noop_and_other_settings_need_force(tmp_path, capsys):
    src, _, _ = make_cifar10(tmp_path / "src")
    out = tmp_path / "out"
    assert cli(capsys, "cifar10", src, out)[0] == 0
    f = out / "train" / "cat"
    first = next(f.iterdir())
    os.utime(first, (1, 1))
    rc, msg = cli(capsys, "cifar10", src, out)
    assert rc == 0 and "nothing to do" in msg and first.stat().st_mtime == 1    # untouched
    rc, msg = cli(capsys, "cifar10", src, out, "--val", "1")
    assert rc == 2 and "--force" in msg and not (out / "val").exists()
    rc, msg = cli(capsys, "cifar10", src, out, "--val", "1", "--force")
    assert rc == 0, msg
    tree = listing(out)
    assert sum(map(len, tree["val"].values())) == 10 and sum(map(len, tree["train"].values())) == 20
    # an interrupted run (no dataset.json) is not mistaken for a finished one
    (out / "dataset.json").unlink()
    rc, msg = cli(capsys, "cifar10", src, out, "--val", "1")
    assert rc == 2 and "interrupted" in msg


# ------------------------------------------------------------------------------------------ Tiny-ImageNet

WNIDS = ["n01443537", "n01629819", "n02124075"]


def make_tiny(parent, train_per_class=3, val_per_class=2):
    """A fake tiny-imagenet-200 tree with real (64×64) JPEGs; returns (root, {val file: wnid})."""
    rng = np.random.default_rng(2)
    root = parent / "tiny-imagenet-200"
    root.mkdir(parents=True)
    (root / "wnids.txt").write_text("\n".join(WNIDS[::-1]) + "\n")
    (root / "words.txt").write_text("n00001740\tentity\n" + "n01443537\tgoldfish, Carassius auratus\n"
                                    "n01629819\tEuropean fire salamander, Salamandra salamandra\n"
                                    "n02124075\tEgyptian cat\nn09999999\tunused\n")

    def jpeg(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path, quality=90)

    for w in WNIDS:
        for k in range(train_per_class):
            jpeg(root / "train" / w / "images" / f"{w}_{k}.JPEG")
        (root / "train" / w / f"{w}_boxes.txt").write_text("".join(f"{w}_{k}.JPEG\t0\t0\t63\t63\n"
                                                                   for k in range(train_per_class)))
    ann, labels = [], {}
    for k in range(val_per_class * len(WNIDS)):
        w = WNIDS[(k * 2) % len(WNIDS)]
        jpeg(root / "val" / "images" / f"val_{k}.JPEG")
        ann.append(f"val_{k}.JPEG\t{w}\t{k}\t1\t50\t60")
        labels[f"val_{k}.JPEG"] = w
    (root / "val" / "val_annotations.txt").write_text("\n".join(ann) + "\n")
    jpeg(root / "test" / "images" / "test_0.JPEG")
    return root, labels


def test_tiny_imagenet_symlinks_by_default(tmp_path, capsys):
    root, labels = make_tiny(tmp_path / "src")
    out = tmp_path / "out"
    rc, msg = cli(capsys, "tiny-imagenet", root, out)
    assert rc == 0, msg
    tree = listing(out)
    assert set(tree) == {"train", "val"}                       # the unlabelled test set is not written
    assert sorted(tree["train"]) == sorted(WNIDS) and sorted(tree["val"]) == sorted(WNIDS)
    assert tree["train"]["n02124075"] == [f"n02124075_{k}.JPEG" for k in range(3)]
    assert {f: w for w, fs in tree["val"].items() for f in fs} == labels
    for w, fs in tree["val"].items():
        for f in fs:
            p = out / "val" / w / f
            assert p.is_symlink() and p.resolve() == (root / "val" / "images" / f).resolve()
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["counts"] == {"train": 9, "val": 6} and meta["mode"] == "symlink"
    assert meta["words"] == {"n01443537": "goldfish, Carassius auratus",
                             "n01629819": "European fire salamander, Salamandra salamandra",
                             "n02124075": "Egyptian cat"}
    classes, samples = scan_image_folder(out / "val")
    assert sorted(classes) == sorted(WNIDS) and len(samples) == 6
    # re-running resumes / does nothing, without error
    (out / "train" / WNIDS[0] / f"{WNIDS[0]}_1.JPEG").unlink()
    assert cli(capsys, "tiny-imagenet", root, out)[0] == 0
    assert listing(out) == tree


def test_tiny_imagenet_copy(tmp_path, capsys):
    root, _ = make_tiny(tmp_path / "src", train_per_class=2, val_per_class=1)
    out = tmp_path / "out"
    assert cli(capsys, "tiny-imagenet", tmp_path / "src", out, "--copy")[0] == 0   # parent folder accepted
    p = out / "train" / WNIDS[1] / f"{WNIDS[1]}_1.JPEG"
    assert p.is_file() and not p.is_symlink()
    assert p.read_bytes() == (root / "train" / WNIDS[1] / "images" / p.name).read_bytes()
    assert json.loads((out / "dataset.json").read_text())["counts"] == {"train": 6, "val": 3}


def test_tiny_imagenet_errors(tmp_path, capsys):
    rc, msg = cli(capsys, "tiny-imagenet", tmp_path / "nope", tmp_path / "o")
    assert rc == 2 and "does not exist" in msg and "tiny-imagenet-200" in msg and "cs231n" in msg
    (tmp_path / "tiny-imagenet-200.zip").write_bytes(b"PK")
    rc, msg = cli(capsys, "tiny-imagenet", tmp_path / "tiny-imagenet-200.zip", tmp_path / "o")
    assert rc == 2 and "unzip" in msg
    root, _ = make_tiny(tmp_path / "src", train_per_class=1, val_per_class=1)
    ann = root / "val" / "val_annotations.txt"
    good = ann.read_text()
    ann.write_text(good + "val_99.JPEG\tn07777777\t0\t0\t1\t1\n")
    rc, msg = cli(capsys, "tiny-imagenet", root, tmp_path / "o")
    assert rc == 2 and "n07777777" in msg and "wnids.txt" in msg and "val_annotations.txt:4" in msg
    ann.write_text(good + "val_99.JPEG\tn01443537\t0\t0\t1\t1\n")       # listed but no such image
    rc, msg = cli(capsys, "tiny-imagenet", root, tmp_path / "o")
    assert rc == 2 and "missing" in msg and "val_99.JPEG" in msg
    ann.write_text(good)
    for p in (root / "train" / WNIDS[2] / "images").iterdir():
        p.unlink()
    (root / "train" / WNIDS[2] / "images").rmdir()
    rc, msg = cli(capsys, "tiny-imagenet", root, tmp_path / "o")
    assert rc == 2 and WNIDS[2] in msg and "train" in msg
    assert not (tmp_path / "o").exists()                       # nothing written on a bad source
    assert "Traceback" not in msg
