"""ibot / smkd methods: shape contract, EMA teacher, frozen last layer, parameter groups, few-shot eval."""
import math

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from kdforge.config import load_config
from kdforge.engine.trainer import build_method

TINY = {"out_dim": 32, "head_hidden_dim": 24, "head_bottleneck_dim": 8, "local_size": 8, "n_local": 2,
        "warmup_teacher_temp_epochs": 2, "momentum_teacher": 0.9, "fewshot_episodes": 20, "fewshot_queries": 3}


def _cfg(name="ibot", **method):
    data = {"method": {"name": name, **TINY, **method},
            "data": {"root": "", "require_root": False, "img_size": 16, "batch_size": 8, "mean": [0.5] * 3,
                     "std": [0.5] * 3},
            "model": {"name": "kdf_vit_micro", "kwargs": {"drop_path_rate": 0.1}},
            "optim": {"name": "adamw", "lr": 1e-3, "weight_decay": 0.04}, "train": {"epochs": 2, "device": "cpu"}}
    return load_config(None, data=data)


def _batch(B=4, labels=None, masked=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    crops = [torch.randn(B, 3, 16, 16, generator=g) for _ in range(2)] + \
            [torch.randn(B, 3, 8, 8, generator=g) for _ in range(2)]
    masks = [torch.rand(B, 4, 4, generator=g) > (0.5 if masked else 2.0) for _ in range(2)]
    y = torch.tensor(labels if labels is not None else [0, 0, 1, 1][:B])
    return [[crops, masks], y]


@pytest.fixture(scope="module")
def ibot():
    torch.manual_seed(0)
    m = build_method(_cfg(), num_classes=2)
    m.on_train_start(steps_per_epoch=5, epochs=2)
    return m


def test_ibot_step_terms_shapes_and_grads(ibot):
    ibot.zero_grad(set_to_none=True)
    ibot.on_epoch_start(1)
    out = ibot.training_step(_batch(), 0)
    assert {"loss", "cls", "mim", "mask_ratio"} <= set(out)
    assert out["loss"].ndim == 0 and math.isfinite(out["loss"].item())
    assert out["loss"].item() == pytest.approx((out["cls"] + out["mim"]).item(), rel=1e-6)
    out["loss"].backward()
    assert ibot.mask_token.grad is not None and ibot.mask_token.grad.abs().sum() > 0
    assert all(p.grad is None for p in ibot.teacher_backbone.parameters())
    assert all(not p.requires_grad for p in list(ibot.teacher_backbone.parameters()) +
               list(ibot.teacher_head.parameters()))
    v = ibot.head.last_layer.parametrizations.weight.original1
    assert v.grad.abs().sum() > 0                              # epoch 1: prototype layer trains


def test_last_layer_frozen_in_first_epoch(ibot):
    ibot.zero_grad(set_to_none=True)
    ibot.on_epoch_start(0)
    ibot.training_step(_batch(), 0)["loss"].backward()
    for name, p in ibot.head.named_parameters():
        if p.grad is None:
            continue
        if name.startswith("last_layer"):
            assert p.grad.abs().sum() == 0, name
        else:
            assert p.grad.abs().sum() > 0, name
    ibot.on_epoch_start(1)


def test_ema_teacher_cosine_momentum_and_update(ibot):
    # momentum: cosine from 0.9 (step 0) to 1.0 (total_steps = 10); halfway = 0.95
    assert ibot.teacher_momentum(0) == pytest.approx(0.9)
    assert ibot.teacher_momentum(5) == pytest.approx(0.95)
    assert ibot.teacher_momentum(10) == pytest.approx(1.0)
    s = ibot.student.blocks[0].attn.qkv.weight
    t = ibot.teacher_backbone.blocks[0].attn.qkv.weight
    g_s = ibot.head.last_layer.parametrizations.weight.original0
    g_t = ibot.teacher_head.last_layer.parametrizations.weight.original0
    with torch.no_grad():
        s.add_(1.0)
        g_s.fill_(3.0)
    before_t, before_gt = t.clone(), g_t.clone()
    ibot.on_after_optimizer_step(0)                            # θ_t ← 0.9 θ_t + 0.1 θ_s
    assert torch.allclose(t, 0.9 * before_t + 0.1 * s, atol=1e-6)
    assert torch.allclose(g_t, 0.9 * before_gt + 0.1 * 3.0, atol=1e-6)
    # the mask token is the student's alone
    assert "mask_token" not in dict(ibot.teacher_backbone.named_parameters())


def test_teacher_is_deterministic_and_stays_in_eval(ibot):
    ibot.train()
    assert not ibot.teacher_backbone.training and ibot.student.training
    assert not any(type(m).__name__ == "DropPath" for m in ibot.teacher_backbone.modules())
    assert any(type(m).__name__ == "DropPath" for m in ibot.student.modules())
    x = torch.randn(2, 3, 16, 16)
    a, b = ibot.teacher_tokens(x)[0], ibot.teacher_tokens(x)[0]
    assert torch.equal(a, b)


def test_param_groups_exclude_teacher_and_decay_rules(ibot):
    groups = ibot.param_groups()
    ids = {id(p): g for g in groups for p in g["params"]}
    assert not any(id(p) in ids for p in ibot.teacher_backbone.parameters())
    no_decay = lambda p: ids[id(p)]["weight_decay"] == 0.0    # noqa: E731
    assert no_decay(ibot.mask_token) and no_decay(ibot.student.pos_embed) and no_decay(ibot.student.cls_token)
    assert no_decay(ibot.head.last_layer.parametrizations.weight.original0)
    assert not no_decay(ibot.student.blocks[0].attn.qkv.weight)
    assert not no_decay(ibot.head.last_layer.parametrizations.weight.original1)


def test_mask_start_epoch_disables_masks():
    torch.manual_seed(1)
    m = build_method(_cfg(mask_start_epoch=1), num_classes=2)
    m.on_train_start(5, 2)
    m.on_epoch_start(0)
    out = m.training_step(_batch(), 0)
    assert out["mask_ratio"].item() == 0.0 and out["mim"].item() == 0.0


def test_train_transform_and_batch_layout(tmp_path):
    from PIL import Image
    from torch.utils.data import default_collate
    cfg = _cfg()
    tf = type(build_method(cfg, 2)).train_transform(cfg)
    img = Image.new("RGB", (8, 8), (120, 30, 200))
    batch = default_collate([(tf(img), 0), (tf(img), 1)])
    (crops, masks), y = batch
    assert [tuple(c.shape) for c in crops] == [(2, 3, 16, 16)] * 2 + [(2, 3, 8, 8)] * 2
    assert [tuple(m.shape) for m in masks] == [(2, 4, 4)] * 2 and y.tolist() == [0, 1]


def test_smkd_step_patch_term_counter_and_compat():
    torch.manual_seed(2)
    m = build_method(_cfg("smkd"), num_classes=2)
    m.on_train_start(5, 2)
    m.on_epoch_start(1)
    out = m.training_step(_batch(labels=[0, 0, 1, 1]), 0)
    assert {"loss", "cls", "patch", "mim", "patch_pairs", "cls_pairs", "patch_empty_batches"} <= set(out)
    assert out["patch_pairs"].item() == 4 and out["patch"].item() > 0 and out["mim"].item() == 0.0  # λ3 = 0
    out["loss"].backward()
    out = m.training_step(_batch(labels=[0, 1, 2, 3]), 1)       # no same-class pair
    assert out["patch"].item() == 0.0 and out["patch_empty_batches"].item() == 1 and torch.isfinite(out["loss"])
    ref = build_method(_cfg("smkd", compat="reference"), num_classes=2)
    ref.load_state_dict(m.state_dict())
    ref.on_train_start(5, 2)
    ref.on_epoch_start(1)
    assert ref.loss.compat == "reference"
    assert torch.isfinite(ref.training_step(_batch(labels=[0, 0, 1, 1]), 0)["patch"])


def test_smkd_uses_pk_sampler():
    from kdforge.config import ConfigError
    from kdforge.data.pk_sampler import PKBatchSampler
    from kdforge.methods.smkd import SMKD

    class DS:
        targets = [c for c in range(4) for _ in range(6)]
    s = SMKD.build_batch_sampler(_cfg("smkd", pk_per_class=4), DS(), seed=0, rank=0, world=1)
    assert isinstance(s, PKBatchSampler) and s.batch_size == 8 and s.K == 4
    assert SMKD.build_batch_sampler(_cfg("smkd", pk_per_class=0), DS(), 0, 0, 1) is None
    with pytest.raises(ConfigError):
        SMKD.build_batch_sampler(_cfg("smkd", pk_per_class=3), DS(), 0, 0, 1)


def test_fewshot_evaluate_on_a_loader(ibot):
    # 3 well-separated novel classes of flat-colour images: the episodes are easy, keys follow the config
    g = torch.Generator().manual_seed(3)
    x = torch.cat([torch.full((8, 3, 16, 16), v) + 0.05 * torch.randn(8, 3, 16, 16, generator=g)
                   for v in (-1.0, 0.0, 1.0)])
    y = torch.arange(3).repeat_interleave(8)
    loader = DataLoader(TensorDataset(x, y), batch_size=5)
    out = ibot.evaluate(loader, torch.device("cpu"))
    assert set(out) == {"val/3way_1shot", "val/3way_1shot_ci95", "val/3way_5shot", "val/3way_5shot_ci95",
                        "val/fewshot"}
    assert all(0 <= out[k] <= 100 for k in out)
    assert out["val/fewshot"] == pytest.approx((out["val/3way_1shot"] + out["val/3way_5shot"]) / 2)
    assert ibot.training  # evaluate restores the mode
    f = ibot.features(x[:2])
    assert f.shape == (2, 2 * 96)
    assert torch.allclose(f[:, :96].norm(dim=1), torch.ones(2), atol=1e-5)


def test_non_vit_student_is_refused():
    from kdforge.config import ConfigError
    cfg = _cfg()
    cfg.model.name = "kdf_resnet_narrow"
    with pytest.raises(ConfigError, match="VisionTransformer"):
        build_method(cfg, 2)
