"""Few-shot dataset converters on tiny fake sources (CIFAR-100 pickles, ImageNet folders)."""
import argparse
import json
import pickle

import numpy as np
import pytest
from PIL import Image

from kdforge.data.converters import cifar_fs, fc100, mini_imagenet, tiered_imagenet

FINE = ("apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus butterfly camel can "
        "castle caterpillar cattle chair chimpanzee clock cloud cockroach couch crab crocodile cup dinosaur dolphin "
        "elephant flatfish forest fox girl hamster house kangaroo keyboard lamp lawn_mower leopard lion lizard lobster "
        "man maple_tree motorcycle mountain mouse mushroom oak_tree orange orchid otter palm_tree pear pickup_truck "
        "pine_tree plain plate poppy porcupine possum rabbit raccoon ray road rocket rose sea seal shark shrew skunk "
        "skyscraper snail snake spider squirrel streetcar sunflower sweet_pepper table tank telephone television tiger "
        "tractor train trout tulip turtle wardrobe whale willow_tree wolf woman worm").split()
COARSE = ("aquatic_mammals fish flowers food_containers fruit_and_vegetables household_electrical_devices "
          "household_furniture insects large_carnivores large_man-made_outdoor_things large_natural_outdoor_scenes "
          "large_omnivores_and_herbivores medium_mammals non-insect_invertebrates people reptiles small_mammals trees "
          "vehicles_1 vehicles_2").split()


def test_cifar_fs_split_lists_are_a_partition():
    split = cifar_fs.cifar_fs_split()
    assert sorted(split) == sorted(FINE)
    counts = {s: sum(v == s for v in split.values()) for s in ("train", "val", "test")}
    assert counts == {"train": 64, "val": 16, "test": 20}


@pytest.fixture(scope="module")
def cifar_src(tmp_path_factory):
    """A fake cifar-100-python folder: 1 train + 1 test image per fine class; fine i -> coarse i // 5
    (a synthetic super-class map, enough to check that FC100 follows the pickle's own mapping)."""
    root = tmp_path_factory.mktemp("cifar") / "cifar-100-python"
    root.mkdir()
    rng = np.random.default_rng(0)
    for name in ("train", "test"):
        data = rng.integers(0, 256, size=(100, 3072), dtype=np.uint8)
        fine = list(range(100))
        with open(root / name, "wb") as f:
            pickle.dump({"data": data, "fine_labels": fine, "coarse_labels": [i // 5 for i in fine]}, f)
    with open(root / "meta", "wb") as f:
        pickle.dump({"fine_label_names": FINE, "coarse_label_names": COARSE}, f)
    return root


def _count(root, split):
    return {d.name: len(list(d.iterdir())) for d in (root / split).iterdir()}


def test_cifar_fs_converter(cifar_src, tmp_path):
    out = tmp_path / "cifar-fs"
    cifar_fs.run(argparse.Namespace(src=str(cifar_src), out=str(out), size=12))
    assert len(_count(out, "train")) == 64 and len(_count(out, "val")) == 16 and len(_count(out, "test")) == 20
    assert set(_count(out, "test")) == set(cifar_fs.CIFAR_FS_TEST)
    assert all(n == 2 for n in _count(out, "train").values())    # train + test images of CIFAR-100 are merged
    img = Image.open(next((out / "test" / "whale").iterdir()))
    assert img.size == (12, 12) and img.mode == "RGB"
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["counts"] == {"test": 40, "train": 128, "val": 32}


def test_cifar_pixels_are_written_unchanged(cifar_src, tmp_path):
    data = cifar_fs.load_cifar100(cifar_src)
    assert data["images"].shape == (200, 32, 32, 3)
    out = tmp_path / "raw"
    cifar_fs.write_cifar_split(data, {"apple": "train"}, out, "x", size=None, progress=None)
    got = np.asarray(Image.open(out / "train" / "apple" / "train_00000.png"))
    assert np.array_equal(got, data["images"][0])   # row 0 of the train pickle is class 0 = apple


def test_fc100_converter_uses_super_classes(cifar_src, tmp_path):
    out = tmp_path / "fc100"
    fc100.run(argparse.Namespace(src=str(cifar_src), out=str(out), size=None))
    tr, va, te = (set(_count(out, s)) for s in ("train", "val", "test"))
    assert (len(tr), len(va), len(te)) == (60, 20, 20)
    # synthetic map fine i -> coarse i // 5: test super-classes 0 (aquatic_mammals), 7, 12, 14
    assert te == {FINE[i] for c in (0, 7, 12, 14) for i in range(5 * c, 5 * c + 5)}
    assert not (tr & te) and not (tr & va) and not (va & te)


def _jpeg(path, color):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (20, 16), color).save(path)


def test_mini_imagenet_from_imagenet_folder(tmp_path):
    inet = tmp_path / "ilsvrc"
    # class n00000001 has ids 2, 10, 33 -> sorted numerically (not as text): image 2 of the CSV is _10
    for i, num in enumerate((10, 2, 33)):
        _jpeg(inet / "n00000001" / f"n00000001_{num}.JPEG", (i * 80, 0, 0))
    for num in (5, 7):
        _jpeg(inet / "n00000002" / f"n00000002_{num}.JPEG", (0, num * 20, 0))
    _jpeg(inet / "n00000003" / "n00000003_1.JPEG", (0, 0, 200))
    csvs = tmp_path / "csv"
    csvs.mkdir()
    (csvs / "train.csv").write_text("filename,label\nn0000000100000002.jpg,n00000001\nn0000000100000003.jpg,n00000001\n")
    (csvs / "val.csv").write_text("filename,label\nn0000000200000001.jpg,n00000002\n")
    (csvs / "test.csv").write_text("filename,label\nn0000000300000001.jpg,n00000003\n")
    items = mini_imagenet.mini_imagenet_items(csvs, imagenet=str(inet))
    src = {fname: p.name for p, _, _, fname in items}
    assert src["n0000000100000002.jpg"] == "n00000001_10.JPEG" and src["n0000000100000003.jpg"] == "n00000001_33.JPEG"
    assert src["n0000000200000001.jpg"] == "n00000002_5.JPEG"
    out = tmp_path / "mini"
    mini_imagenet.run(argparse.Namespace(csv_dir=str(csvs), out=str(out), images=None, imagenet=str(inet), size=8,
                                         link=False, workers=2))
    img = Image.open(out / "train" / "n00000001" / "n0000000100000002.jpg")
    assert img.size == (8, 8)
    assert json.loads((out / "dataset.json").read_text())["counts"] == {"train": 2, "val": 1, "test": 1}
    # an image number beyond the class folder is an error naming the file
    (csvs / "test.csv").write_text("filename,label\nn0000000300000009.jpg,n00000003\n")
    with pytest.raises(ValueError, match="n0000000300000009"):
        mini_imagenet.mini_imagenet_items(csvs, imagenet=str(inet))


def test_mini_imagenet_from_flat_images_copies(tmp_path):
    flat = tmp_path / "images"
    for name in ("n0000000100000001.jpg", "n0000000200000001.jpg", "n0000000300000001.jpg"):
        _jpeg(flat / name, (1, 2, 3))
    csvs = tmp_path / "csv"
    csvs.mkdir()
    for split, c in (("train", 1), ("val", 2), ("test", 3)):
        (csvs / f"{split}.csv").write_text(f"filename,label\nn000000{c:02d}00000001.jpg,n000000{c:02d}\n")
    out = tmp_path / "mini"
    mini_imagenet.run(argparse.Namespace(csv_dir=str(csvs), out=str(out), images=str(flat), imagenet=None, size=None,
                                         link=False, workers=1))
    copied = out / "val" / "n00000002" / "n0000000200000001.jpg"
    assert copied.read_bytes() == (flat / "n0000000200000001.jpg").read_bytes()
    with pytest.raises(ValueError):
        mini_imagenet.mini_imagenet_items(csvs)


def test_tiered_imagenet_takes_all_class_images(tmp_path):
    inet = tmp_path / "ilsvrc"
    for c, n in ((1, 3), (2, 2), (3, 1)):
        for k in range(n):
            _jpeg(inet / f"n0000000{c}" / f"n0000000{c}_{k}.JPEG", (k, 0, 0))
    sp = tmp_path / "splits"
    sp.mkdir()
    (sp / "train.csv").write_text("synset,category\nn00000001,n09000001\nn00000002,n09000001\n")
    (sp / "val.csv").write_text("n00000003,n09000002\n")
    (sp / "test.csv").write_text("n00000003,n09000002\n")
    with pytest.raises(ValueError, match="both"):
        tiered_imagenet.tiered_items(sp, inet)
    (sp / "test.csv").write_text("# no classes\n")
    with pytest.raises(ValueError, match="no class rows"):
        tiered_imagenet.tiered_items(sp, inet)
    _jpeg(inet / "n00000004" / "n00000004_0.JPEG", (9, 9, 9))
    (sp / "test.csv").write_text("n00000004\n")
    out = tmp_path / "tiered"
    tiered_imagenet.run(argparse.Namespace(split_dir=str(sp), imagenet=str(inet), out=str(out), size=None, link=True,
                                           workers=2))
    assert _count(out, "train") == {"n00000001": 3, "n00000002": 2}
    assert (out / "test" / "n00000004" / "n00000004_0.JPEG").is_symlink()
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["super_categories"]["train"] == {"n00000001": "n09000001", "n00000002": "n09000001"}
