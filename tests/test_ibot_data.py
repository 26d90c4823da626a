"""iBOT block masks (statistics, shapes, per-image probability) and DINO multi-crop."""
import random

import numpy as np
import pytest
import torch
from PIL import Image

from kdforge.data.masking import BlockMaskGenerator
from kdforge.data.multicrop import MaskedMultiCrop, MultiCrop, Solarize


def _ratios(gen, n, h=14, w=14, seed=0):
    rng = random.Random(seed)
    return torch.stack([gen(h, w, rng).float().mean() for _ in range(n)])


def test_block_masks_default_statistics():
    # spec §1.4 (2000 samples of the reference generator): 48 % empty, non-empty mean ratio 0.29, range 0.07–0.50.
    # With p(empty) = ½, 1500 draws give a standard error of 0.013, so ±0.05 is > 3.5 σ.
    r = _ratios(BlockMaskGenerator(), 1500)
    empty = (r == 0).float().mean().item()
    assert abs(empty - 0.5) < 0.05
    nz = r[r > 0]
    assert 0.26 < nz.mean().item() < 0.32
    assert nz.min().item() >= 16 / 196 * 0.5   # at least one block of area >= low/2 (rounding)
    # a block is only kept if it adds at most high - count cells, so the masked fraction never exceeds r ≤ 0.5
    assert nz.max().item() <= 0.5 + 1e-6


def test_block_masks_per_image_probability_and_ratio_ranges():
    always = _ratios(BlockMaskGenerator(ratio=(0.3,), ratio_var=(0.2,)), 300, seed=1)
    assert (always > 0).all()
    never = _ratios(BlockMaskGenerator(ratio=(0.0,), ratio_var=(0.0,)), 50, seed=2)
    assert (never == 0).all()
    # three candidate ratios, two of them 0: masked with probability 1/3 (se 0.015 at n = 1000)
    third = _ratios(BlockMaskGenerator(ratio=(0.0, 0.0, 0.3), ratio_var=(0.0, 0.0, 0.1)), 1000, seed=3)
    assert abs((third > 0).float().mean().item() - 1 / 3) < 0.06
    # the drawn ratio stays inside mean ± var
    gen, rng = BlockMaskGenerator(ratio=(0.3,), ratio_var=(0.2,)), random.Random(4)
    draws = [gen.draw_ratio(rng) for _ in range(500)]
    assert min(draws) >= 0.1 and max(draws) <= 0.5 and max(draws) - min(draws) > 0.3


def test_block_mask_count_close_to_target():
    gen, rng = BlockMaskGenerator(), random.Random(5)
    for r in (0.1, 0.25, 0.4, 0.5):
        for _ in range(40):
            m = gen.mask_with_ratio(14, 14, r, rng)
            # a kept block adds at most high - count cells, so count <= high = r·h·w
            assert int(m.sum()) <= r * 196 + 1e-9
            assert int(m.sum()) >= 0.5 * r * 196   # placement failures are rare on a 14×14 grid


def test_rand_shape_exact_count_and_grid_shapes():
    gen, rng = BlockMaskGenerator(ratio=(0.3,), ratio_var=(0.0,), shape="rand"), random.Random(6)
    m = gen(14, 14, rng)
    assert m.shape == (14, 14) and m.dtype == torch.bool and int(m.sum()) == int(0.3 * 196)
    assert BlockMaskGenerator()(6, 6, random.Random(0)).shape == (6, 6)
    assert BlockMaskGenerator()(4, 8, random.Random(0)).shape == (4, 8)


def test_block_masks_are_seeded_and_clustered():
    gen = BlockMaskGenerator(ratio=(0.3,), ratio_var=(0.0,))
    a = [gen(14, 14, random.Random(7)) for _ in range(2)]
    assert torch.equal(a[0], a[1])
    random.seed(8)
    b = gen(14, 14)
    random.seed(8)
    assert torch.equal(b, gen(14, 14))  # module-level random, as seeded per sample by the datasets
    # blocks: masked cells have many masked 4-neighbours, unlike a random pattern of the same size
    def neighbour_frac(m):
        p = torch.nn.functional.pad(m.float()[None, None], (1, 1, 1, 1))[0, 0]
        nb = p[:-2, 1:-1] + p[2:, 1:-1] + p[1:-1, :-2] + p[1:-1, 2:]
        return (nb[m] / 4).mean().item()
    rand = BlockMaskGenerator(ratio=(0.3,), ratio_var=(0.0,), shape="rand")
    rng = random.Random(9)
    blk = sum(neighbour_frac(gen(14, 14, rng)) for _ in range(20)) / 20
    rnd = sum(neighbour_frac(rand(14, 14, rng)) for _ in range(20)) / 20
    assert blk > rnd + 0.3


def test_mask_generator_rejects_bad_config():
    with pytest.raises(ValueError):
        BlockMaskGenerator(ratio=(0.3,), ratio_var=(0.0, 0.1))
    with pytest.raises(ValueError):
        BlockMaskGenerator(ratio=(0.1,), ratio_var=(0.2,))
    with pytest.raises(ValueError):
        BlockMaskGenerator(shape="grid")


def test_multicrop_shapes_and_masks():
    img = Image.fromarray((torch.rand(40, 40, 3) * 255).byte().numpy())
    mc = MultiCrop(global_size=32, local_size=16, n_local=3)
    torch.manual_seed(0)
    crops = mc(img)
    assert [tuple(c.shape) for c in crops] == [(3, 32, 32)] * 2 + [(3, 16, 16)] * 3
    t = MaskedMultiCrop(mc, BlockMaskGenerator(ratio=(0.4,), ratio_var=(0.0,)), patch_size=4)
    random.seed(1)
    torch.manual_seed(1)
    crops, masks = t(img)
    assert len(crops) == 5 and len(masks) == 2
    assert all(m.shape == (8, 8) and m.dtype == torch.bool and m.any() for m in masks)
    # seeded twice -> identical output (torch RNG for crops, Python random for blur and masks)
    random.seed(1)
    torch.manual_seed(1)
    crops2, masks2 = t(img)
    assert all(torch.equal(a, b) for a, b in zip(crops, crops2)) and all(torch.equal(a, b) for a, b in zip(masks, masks2))
    no_mask = MaskedMultiCrop(mc, None, patch_size=4)(img)[1]
    assert all(not m.any() for m in no_mask)
    with pytest.raises(ValueError):
        MaskedMultiCrop(MultiCrop(global_size=30), None, patch_size=4)


def test_solarize_threshold():
    img = Image.fromarray(torch.tensor([[[10, 127, 128], [200, 255, 0]]], dtype=torch.uint8).numpy())
    out = np.asarray(Solarize(128)(img)).flatten().tolist()
    assert out == [10, 127, 255 - 128, 255 - 200, 0, 0]
