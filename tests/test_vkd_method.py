"""VkD method: shape contract, term switches, head routing, projector in the optimizer, mixup/cutmix,
3-Augment, conv stem, checkpoint round trip without a teacher."""
import math

import pytest
import torch
from PIL import Image

from kdforge.align.orthogonal import OrthogonalProjector
from kdforge.config import ConfigError, load_config
from kdforge.engine.trainer import build_optimizer
from kdforge.methods import get_method
from kdforge.methods.vkd import ConvStem, ThreeAugment, VkD, cutmix_box, mix_batch, smooth_one_hot
from kdforge.models import create_model

IMG = 16


def make(method=None, teacher=True, seed=0, student="kdf_deit_micro_distilled"):
    torch.manual_seed(seed)
    cfg = load_config(data={"method": {"name": "vkd", **(method or {})},
                            "data": {"require_root": False, "img_size": IMG},
                            "optim": {"name": "adamw", "lr": 1e-3, "weight_decay": 0.05}})
    s = create_model(student, num_classes=10, img_size=IMG)
    t = create_model("kdf_resnet_narrow", num_classes=10, img_size=IMG) if teacher else None
    return VkD(cfg, s, t), cfg


def batch(n=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, IMG, IMG, generator=g), torch.randint(0, 10, (n,), generator=g)


def test_registered_and_shapes():
    assert get_method("vkd") is VkD
    m, _ = make()
    x, _ = batch()
    z_cls, z_dist, f = m.student_outputs(x)
    assert z_cls.shape == (4, 10) and z_dist.shape == (4, 10) and f.shape == (4, 96)
    z_t, f_t = m.teacher_outputs(x, logits=True, feature=True)
    assert z_t.shape == (4, 10) and f_t.shape == (4, 128) and not f_t.requires_grad
    assert isinstance(m.projector, OrthogonalProjector)
    assert (m.projector.d_in, m.projector.d_out) == (96, 128)
    # the pooled student feature is the mean of the post-norm patch tokens (prefix tokens excluded)
    tokens = m.student.forward_features(x)
    assert tokens.shape[1] == 2 + (IMG // 4) ** 2
    assert torch.allclose(f, tokens[:, 2:].mean(1), atol=1e-6)
    # the teacher feature is the global average pool of its last map
    fmap = m.teacher.forward_features(x)
    assert torch.allclose(f_t, fmap.mean(dim=(2, 3)), atol=1e-6)


@pytest.mark.parametrize("switches,terms", [
    ({}, {"ce", "kd", "feat", "proj_fro"}),
    ({"alpha": 0.0}, {"ce", "kd"}),
    ({"gamma": 0.0}, {"ce", "feat", "proj_fro"}),
    ({"alpha": 0.0, "gamma": 0.0}, {"ce"}),
    ({"ce_weight": 0.0}, {"kd", "feat", "proj_fro"}),
    ({"ce_weight": 0.0, "gamma": 0.0}, {"feat", "proj_fro"}),
    ({"projector": "linear"}, {"ce", "kd", "feat", "proj_fro"}),
])
def test_every_term_switches_off_and_the_step_runs(switches, terms):
    m, _ = make(switches)
    m.train()
    out = m.training_step(batch(), 0)
    assert set(out) == {"loss"} | terms
    assert out["loss"].ndim == 0 and torch.isfinite(out["loss"])
    # the total is the weighted sum of the logged terms
    a = m.args
    expect = sum(w * out[k] for k, w in (("ce", a.ce_weight), ("kd", a.gamma), ("feat", a.alpha)) if k in out)
    assert out["loss"].item() == pytest.approx(float(expect), rel=1e-5, abs=1e-6)
    out["loss"].backward()
    s = m.student
    if a.ce_weight > 0 or a.gamma > 0:  # both heads always train when any logit term is on
        assert s.head.weight.grad is not None and s.head.weight.grad.abs().sum() > 0
        assert s.head_dist.weight.grad is not None and s.head_dist.weight.grad.abs().sum() > 0
    assert s.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    if a.alpha > 0:
        p = m.projector.raw if a.projector == "orthogonal" else m.projector.weight
        assert p.grad is not None and p.grad.abs().sum() > 0
    else:
        assert m.projector is None
    assert all(p.grad is None for p in m.teacher.parameters())


def test_head_routing_matches_hand_composition():
    # paper setting: CE on the class head only, KL on the distillation head only
    m, _ = make({"temperature": 2.0})
    m.train()
    x, y = batch()
    torch.manual_seed(5)
    out = m.training_step((x, y), 0)
    from kdforge.losses.kd import kd_kl
    from kdforge.losses.vkd import vkd_feature_loss
    with torch.no_grad():
        z_cls, z_dist, f = m.student_outputs(x)
        z_t, f_t = m.teacher_outputs(x, True, True)
        ce = torch.nn.functional.cross_entropy(z_cls, y)
        kd = kd_kl(z_dist, z_t, 2.0)
        feat = vkd_feature_loss(f, f_t, m.projector)
    assert out["ce"].item() == pytest.approx(ce.item(), rel=1e-5)
    assert out["kd"].item() == pytest.approx(kd.item(), rel=1e-5)
    assert out["feat"].item() == pytest.approx(feat.item(), rel=1e-5)
    # γ = 0: the distillation head learns the labels too (CE averaged over both heads)
    m0, _ = make({"gamma": 0.0})
    m0.train()
    out0 = m0.training_step((x, y), 0)
    with torch.no_grad():
        z_cls, z_dist, _ = m0.student_outputs(x)
        ce2 = 0.5 * (torch.nn.functional.cross_entropy(z_cls, y) + torch.nn.functional.cross_entropy(z_dist, y))
    assert out0["ce"].item() == pytest.approx(ce2.item(), rel=1e-5)


def test_eval_averages_both_heads():
    m, _ = make()
    x, _ = batch()
    m.eval()
    with torch.no_grad():
        tok = m.student.forward_features(x)
        avg = (m.student.head(tok[:, 0]) + m.student.head_dist(tok[:, 1])) / 2
        assert torch.allclose(m.predict(x), avg, atol=1e-6)


def test_non_distilled_student_gets_ce_and_kd_on_one_head():
    m, _ = make(student="kdf_vit_micro")
    m.train()
    out = m.training_step(batch(), 0)
    assert {"ce", "kd", "feat"} <= set(out)


def test_all_terms_off_is_a_config_error():
    with pytest.raises(ConfigError, match="at least one"):
        make({"ce_weight": 0.0, "gamma": 0.0, "alpha": 0.0})
    with pytest.raises(ConfigError, match="method.projector"):
        make({"projector": "householder"})


def test_projector_stays_orthogonal_in_the_trainers_optimizer():
    # Householder-collapse regression at the method level: the trainer's AdamW (wd 0.05) param groups
    m, cfg = make()
    opt = build_optimizer(cfg, m, 4)
    raw_groups = [g for g in opt.param_groups if any(p is m.projector.raw for p in g["params"])]
    assert len(raw_groups) == 1 and raw_groups[0]["weight_decay"] == 0.0
    m.train()
    fro = []
    for step in range(5):
        out = m.training_step(batch(seed=step), step)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt.step()
        fro.append(out["proj_fro"].item())
    assert m.projector.orthogonality_error() < 1e-5
    assert fro == pytest.approx([math.sqrt(96)] * 5, rel=1e-5)  # ‖W‖_F = sqrt(d_in), never 0


def test_state_dict_round_trip_without_teacher():
    for kind in ("orthogonal", "linear"):
        m, cfg = make({"projector": kind})
        sd = m.state_dict()
        assert not any(k.startswith("teacher") for k in sd)
        torch.manual_seed(9)
        s2 = create_model("kdf_deit_micro_distilled", num_classes=10, img_size=IMG)
        m2 = VkD(cfg, s2, None)  # evaluation rebuild: no teacher, projector deferred
        assert m2.projector is None
        m2.load_state_dict(sd)
        assert type(m2.projector) is type(m.projector)
        for k, v in m2.state_dict().items():
            assert torch.equal(v, sd[k]), k
    exported = m.export_backbone()
    assert not any(k.startswith(("head.", "head_dist.", "projector")) for k in exported)


def test_smooth_one_hot_golden():
    # K = 4, ε = 0.1: off = 0.1/4 = 0.025, on = 1 - 0.1 + 0.025 = 0.925
    y = smooth_one_hot(torch.tensor([2, 0]), 4, 0.1)
    assert torch.allclose(y, torch.tensor([[0.025, 0.025, 0.925, 0.025], [0.925, 0.025, 0.025, 0.025]]))


def test_mixup_and_cutmix():
    x = torch.arange(2 * 1 * 4 * 4, dtype=torch.float32).reshape(2, 1, 4, 4)
    y = torch.tensor([0, 1])
    torch.manual_seed(0)
    xm, t, info = mix_batch(x, y, 2, mixup_alpha=0.8, smoothing=0.0)
    lam = info["lam"]
    assert info["kind"] == "mixup" and 0 <= lam <= 1
    assert torch.allclose(xm, lam * x + (1 - lam) * x.flip(0))
    assert torch.allclose(t, torch.tensor([[lam, 1 - lam], [1 - lam, lam]]))
    torch.manual_seed(1)
    xc, tc, info = mix_batch(x, y, 2, cutmix_alpha=1.0, smoothing=0.0)
    assert info["kind"] == "cutmix"
    pasted = (xc != x).float().mean().item()   # the fraction of pixels taken from the partner
    assert 1 - info["lam"] == pytest.approx(pasted)
    assert torch.allclose(tc.sum(1), torch.ones(2))
    # no mixing configured or prob 0: images untouched, smoothed one-hot targets
    xs, ts, info = mix_batch(x, y, 2, mixup_alpha=0.8, prob=0.0, smoothing=0.2)
    assert xs is x and info["kind"] == "none"
    assert torch.allclose(ts, torch.tensor([[0.9, 0.1], [0.1, 0.9]]))
    # the box: lam = 1 - clipped area / (H W)
    torch.manual_seed(3)
    y0, y1, x0, x1, lam = cutmix_box(0.5, 8, 8)
    assert lam == pytest.approx(1 - (y1 - y0) * (x1 - x0) / 64)


def test_conv_stem_option_and_three_augment():
    m, cfg = make({"stem": "conv", "stem_width": 16})
    assert isinstance(m.student.patch_embed, ConvStem)
    x, y = batch()
    tokens = m.student.patch_embed(x)
    assert tokens.shape == (4, (IMG // 4) ** 2, 96)
    out = m.training_step((x, y), 0)
    out["loss"].backward()
    assert m.student.patch_embed.stem[0].weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="even"):
        ConvStem(15, 5, 3, 8)
    tf = ThreeAugment(cfg.data)
    img = Image.fromarray((torch.rand(20, 20, 3) * 255).to(torch.uint8).numpy())
    out = tf(img)
    assert out.shape == (3, IMG, IMG) and out.dtype == torch.float32
    cfg3 = load_config(data={"method": {"name": "vkd", "three_augment": True},
                             "data": {"require_root": False, "img_size": IMG}})
    assert isinstance(VkD.train_transform(cfg3), ThreeAugment)
