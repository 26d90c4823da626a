"""SSL-small presets (issue: configs/moco/in1k_<arch>_{improved,baseline}.yaml + CPU twins): the paper's
values, checked against the spec (shared/methods/sslsmall.md §1.2-1.4), not against the files themselves."""
from pathlib import Path

import pytest

from kdforge.config import load_config

ARCHS = {"resnet18": "resnet18", "mobilenetv3_small": "mobilenetv3_small_100",
         "mobilenetv3_large": "mobilenetv3_large_100", "efficientnet_b0": "efficientnet_b0",
         "deit_tiny": "deit_tiny_patch16_224"}
GPUS = 8          # the presets' comment: data.batch_size is per process on 8 GPUs


def _load(path, *extra):
    return load_config(path, ["data.require_root=false", *extra])


def test_every_arch_has_both_presets():
    names = {p.name for p in Path("configs/moco").glob("in1k_*.yaml")}
    assert names == {f"in1k_{a}_{v}.yaml" for a in ARCHS for v in ("improved", "baseline")}


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_improved_preset_is_the_paper_recipe(arch):
    cfg = _load(f"configs/moco/in1k_{arch}_improved.yaml")
    m = cfg.method_args()
    assert cfg.method_name == "moco" and cfg.model.name == ARCHS[arch]
    assert (m.temperature, m.queue_size, m.head, m.dim, m.momentum) == (0.1, 65536, "wide", 128, 0.999)
    assert (m.aug, m.cj, m.grey_p, m.blur_p, tuple(m.crop_scale)) == ("improved", 1.0, 0.5, 0.5, (0.2, 1.0))
    global_batch = cfg.data.batch_size * GPUS
    assert global_batch == 512 and m.queue_size % global_batch == 0
    assert (cfg.optim.name, cfg.optim.lr, cfg.optim.ref_batch) == ("sgd", 0.06, 512)
    assert (cfg.optim.momentum, cfg.optim.weight_decay) == (0.9, 1e-4)
    assert cfg.sched.name == "cosine" and cfg.sched.warmup_epochs == 0 and cfg.train.epochs == 800
    assert m.freeze_patch_embed is (arch == "deit_tiny")          # the reference's vit_tiny trick


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_baseline_preset_is_mocov2(arch):
    cfg = _load(f"configs/moco/in1k_{arch}_baseline.yaml")
    m = cfg.method_args()
    assert cfg.model.name == ARCHS[arch]
    assert (m.temperature, m.queue_size, m.head, m.aug) == (0.2, 65536, "simple", "mocov2")
    assert m.cj is None and m.grey_p is None and m.blur_p is None          # the mocov2 preset's own knobs
    assert cfg.data.batch_size * GPUS == 256 and m.queue_size % 256 == 0
    assert (cfg.optim.lr, cfg.optim.ref_batch, cfg.sched.name, cfg.train.epochs) == (0.03, 256, "cosine", 200)


def test_aug_preset_values():
    from kdforge.data.ssl_transforms import MOCO_AUG_PRESETS, jitter_strengths
    assert MOCO_AUG_PRESETS["mocov2"] == dict(cj=None, jitter=(0.4, 0.4, 0.4, 0.1), grey_p=0.2, blur_p=0.5)
    assert MOCO_AUG_PRESETS["improved"] == dict(cj=1.0, jitter=None, grey_p=0.5, blur_p=0.5)
    assert jitter_strengths(MOCO_AUG_PRESETS["improved"]["cj"]) == pytest.approx((0.8, 0.8, 0.8, 0.4))


@pytest.mark.parametrize("variant", ["improved", "baseline"])
def test_cpu_twins_keep_the_recipe_difference(variant, digits_root):
    cfg = load_config(f"configs/moco/digits_{variant}_cpu.yaml", [f"data.root={digits_root}"])
    m = cfg.method_args()
    assert cfg.train.device == "cpu" and cfg.train.epochs <= 20
    assert m.queue_size % cfg.data.batch_size == 0
    if variant == "improved":
        assert (m.temperature, m.head, m.aug, m.cj, m.grey_p, m.blur_p) == (0.1, "wide", "improved", 1.0, 0.5, 0.5)
    else:
        assert (m.temperature, m.head, m.aug, m.cj) == (0.2, "simple", "mocov2", None)
    # same per-image learning rate in both twins, as at ImageNet scale (0.06/512 == 0.03/256)
    assert cfg.optim.lr / cfg.optim.ref_batch == pytest.approx(0.06 / 64)


def test_seed_preset_distils_into_a_small_student():
    cfg = _load("configs/seed/in1k_mobilenetv3_large_from_resnet50.yaml", "teacher.checkpoint=null")
    m = cfg.method_args()
    assert cfg.method_name == "seed" and cfg.model.name == "mobilenetv3_large_100" and cfg.teacher.name == "resnet50"
    assert m.queue_size == 65536 and m.queue_size % (cfg.data.batch_size * GPUS) == 0
