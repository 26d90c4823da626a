import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from kdforge.config import DataConfig
from kdforge.data import ImageFolderDataset, UnlabeledFolder, build_eval_transform, build_train_transform
from kdforge.data.datasets import CorruptImageError
from kdforge.data.digits import digits_split
from kdforge.data.sampling import EpochBatchSampler


def test_digits_split_is_fixed_stratified_and_complete(digits_root):
    s1, s2 = digits_split(0), digits_split(0)
    for k in s1:
        np.testing.assert_array_equal(s1[k], s2[k])
    allidx = np.concatenate(list(s1.values()))
    assert len(allidx) == 1797 and len(np.unique(allidx)) == 1797
    ds = ImageFolderDataset(digits_root / "train")
    assert ds.classes == [str(c) for c in range(10)]
    counts = np.bincount(ds.targets, minlength=10)
    assert len(ds) == len(s1["train"]) and counts.min() >= 100  # every class ~60 % of ~180
    img, y = ds[0]
    assert img.size == (8, 8) and img.mode == "RGB" and y == 0


def _write_folder(root, n_per_class=3):
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(n_per_class):
            Image.fromarray(np.full((10, 10), 40 * i, np.uint8)).save(root / c / f"{i}.png")


def test_corrupt_images_are_skipped_and_counted_or_fail(tmp_path):
    _write_folder(tmp_path)
    (tmp_path / "a" / "1.png").write_bytes(b"not a png")
    ds = ImageFolderDataset(tmp_path)
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        items = [ds[i] for i in range(len(ds))]
    assert len(items) == 6 and ds.corrupt_count == 1
    strict = ImageFolderDataset(tmp_path, on_corrupt="fail")
    with pytest.raises(CorruptImageError, match="1.png.*on_corrupt=skip"):
        strict[1]


def test_unlabeled_folder_reads_any_tree(tmp_path):
    _write_folder(tmp_path / "pool" / "deep")
    ds = UnlabeledFolder(tmp_path / "pool")
    assert len(ds) == 6 and ds[0][1] == -1
    with pytest.raises(FileNotFoundError, match="does not exist"):
        UnlabeledFolder(tmp_path / "missing")


def test_transforms_shapes_grayscale_to_rgb(digits_root):
    cfg = DataConfig(root=str(digits_root), img_size=24, mean=(0.5,) * 3, std=(0.5,) * 3)
    ds = ImageFolderDataset(digits_root / "val", build_eval_transform(cfg))
    x, _ = ds[0]
    assert x.shape == (3, 24, 24) and torch.equal(x[0], x[1])
    for preset in ("standard", "cifar", "pad_crop", "none"):
        t = build_train_transform(cfg, preset)
        assert t(ds.load(0)).shape == (3, 24, 24)
    with pytest.raises(ValueError, match="train_transform"):
        build_train_transform(cfg, "bogus")


def test_per_sample_seeding_is_reproducible_and_varies_by_epoch(digits_root):
    cfg = DataConfig(root=str(digits_root), img_size=16, mean=(0.5,) * 3, std=(0.5,) * 3)
    ds = ImageFolderDataset(digits_root / "train", build_train_transform(cfg, "standard"))
    ds.set_seed(3, epoch=0)
    torch.manual_seed(123)
    a = ds[5][0]
    torch.manual_seed(999)  # the global RNG does not matter ...
    b = ds[5][0]
    assert torch.equal(a, b)
    state = torch.get_rng_state()
    ds[6]
    assert torch.equal(state, torch.get_rng_state())  # ... and is left untouched
    ds.set_seed(3, epoch=1)
    assert not torch.equal(a, ds[5][0])


def test_rank_shards_union_to_the_single_process_batches():
    one = EpochBatchSampler(100, 8, seed=1, rank=0, world=1)
    r0 = EpochBatchSampler(100, 4, seed=1, rank=0, world=2)
    r1 = EpochBatchSampler(100, 4, seed=1, rank=1, world=2)
    for s in (one, r0, r1):
        s.set_epoch(2)
    b1, b0, bb = list(one), list(r0), list(r1)
    assert len(b1) == len(b0) == len(bb) == 12
    for g, x, y in zip(b1, b0, bb):
        assert sorted(g) == sorted(x + y) and not set(x) & set(y)
    one.set_epoch(2)
    one.skip(5)
    assert list(one) == b1[5:]
    one.set_epoch(3)
    assert list(one) != b1
    with pytest.raises(ValueError, match="fewer than one global batch"):
        EpochBatchSampler(5, 8)


def test_synthetic_data_needs_no_root_and_trains(tmp_path):
    from kdforge.config import ConfigError, load_config
    from kdforge.data.datasets import SyntheticDataset
    from kdforge.engine.trainer import train
    ds = SyntheticDataset(10, 3, 8, in_chans=1, bank=4)
    x0, y0 = ds[0]
    assert x0.shape == (1, 8, 8) and [ds[i][1] for i in range(5)] == [0, 1, 2, 0, 1]
    assert torch.equal(ds[4][0], x0) and not torch.equal(ds[1][0], x0)   # bank of 4, cycled
    assert torch.equal(SyntheticDataset(10, 3, 8, in_chans=1, bank=4)[2][0], ds[2][0])  # seeded
    with pytest.raises(ConfigError, match="data.synthetic"):
        load_config(data={"method": {"name": "supervised"}, "data": {"synthetic": -1}})
    cfg = load_config(data={"method": {"name": "supervised"}, "model": {"name": "kdf_resnet_narrow"},
                            "data": {"synthetic": 64, "synthetic_classes": 4, "img_size": 16, "batch_size": 16},
                            "train": {"epochs": 1, "device": "cpu", "progress": False}, "out": str(tmp_path / "r")})
    res = train(cfg)
    assert res.step == 4 and "val/acc1" in res.metrics   # 64 / 16 steps; a synthetic val split of 16 images
