"""The attnprobe method's contract: loss terms, θ's own Adam (and its checkpointed state), parameter
groups, robust KD, config validation."""
import copy

import pytest
import torch

from kdforge.config import ConfigError, load_config
from kdforge.losses.kd import kd_kl
from kdforge.losses.probe import class_weights_from_mass, robust_kd_kl
from kdforge.methods import method_config
from kdforge.methods.attnprobe import AttnProbe
from kdforge.models import create_model


def _cfg(**method):
    m = {"name": "attnprobe", "teacher_acc": 0.9, "probe_blocks": [1, 3], **method}
    return load_config(data={"method": m, "data": {"require_root": False, "img_size": 32},
                             "optim": {"name": "adamw", "lr": 1e-3, "weight_decay": 0.025}})


def _method(**method):
    torch.manual_seed(0)
    teacher = create_model("kdf_vit_micro", num_classes=5)
    student = create_model("kdf_vit_micro", num_classes=5, embed_dim=48)
    return AttnProbe(_cfg(**method), student, teacher)


def _batch(b=6):
    g = torch.Generator().manual_seed(1)
    return torch.randn(b, 3, 32, 32, generator=g), torch.full((b,), -1)


def test_training_step_terms_and_gradients():
    m = _method()
    out = m.training_step(_batch(), 0)
    assert set(out) == {"loss", "kd", "noise", "probe"}
    assert out["loss"].ndim == 0 and torch.isfinite(out["loss"])
    # loss = kd + 1.0 · noise + 0.8 · probe
    assert out["loss"].item() == pytest.approx((out["kd"] + out["noise"] + 0.8 * out["probe"]).item(), rel=1e-5)
    out["loss"].backward()
    assert m.student.blocks[0].attn.qkv.weight.grad is not None
    assert m.noise.theta.grad is not None and m.noise.theta.grad.abs().sum() > 0
    assert all(p.grad is None for p in m.teacher.parameters())
    # kd term = kd_kl of the plain forwards
    x, _ = _batch()
    with torch.no_grad():
        ref = kd_kl(m.student(x), m.teacher(x), 4.0)
    assert out["kd"].item() == pytest.approx(ref.item(), rel=1e-5)


def test_terms_can_be_switched_off():
    m = _method(noise_weight=0.0, probe_weight=0.0, teacher_acc=None)
    out = m.training_step(_batch(), 0)
    assert set(out) == {"loss", "kd"} and m.noise is None and m.noise_opt is None
    m.on_after_optimizer_step(0)  # no θ: nothing to do


def test_theta_has_its_own_adam_and_is_not_in_param_groups():
    m = _method()
    group_params = {id(p) for g in m.param_groups() for p in g["params"]}
    assert id(m.noise.theta) not in group_params
    assert id(m.student.blocks[0].attn.qkv.weight) in group_params
    assert all(id(p) not in group_params for p in m.teacher.parameters())
    before = m.noise.theta.detach().clone()
    m.training_step(_batch(), 0)["loss"].backward()
    g = m.noise.theta.grad.clone()
    m.on_after_optimizer_step(0)
    # first Adam step: θ -= lr · sign(g) (m̂/√v̂ = g/|g|), lr = 1e-3
    expected = before - 1e-3 * torch.sign(g)
    assert torch.allclose(m.noise.theta.detach(), expected, atol=1e-6)
    assert m.noise.theta.grad is None  # cleared for the next step


def test_noise_adam_state_travels_in_state_dict():
    m = _method()
    for step in range(2):
        m.training_step(_batch(), step)["loss"].backward()
        m.on_after_optimizer_step(step)
    sd = m.state_dict()
    assert "_extra_state" in sd and sd["_extra_state"]["noise_opt"]["state"][0]["step"] == 2
    fresh = _method()
    fresh.load_state_dict(copy.deepcopy(sd))
    st = fresh.noise_opt.state_dict()["state"][0]
    assert st["step"] == 2 and torch.allclose(st["exp_avg"], m.noise_opt.state_dict()["state"][0]["exp_avg"])
    # one more identical step from both gives identical θ
    for mm in (m, fresh):
        mm.zero_grad(set_to_none=True)
        mm.training_step(_batch(), 2)["loss"].backward()
        mm.on_after_optimizer_step(2)
    assert torch.allclose(m.noise.theta, fresh.noise.theta)


def test_weight_decay_all_is_one_group():
    m = _method(weight_decay_all=True)
    groups = m.param_groups()
    assert len(groups) == 1 and groups[0]["weight_decay"] == 0.025
    default = _method().param_groups()
    assert {g["weight_decay"] for g in default} == {0.025, 0.0}


def test_robust_kd_golden_and_mass_buffer():
    # S = [2, 1, 1] -> 1/S = [0.5, 1, 1], Σ = 2.5 -> [0.2, 0.4, 0.4] · 3 = [0.6, 1.2, 1.2] (spec C11)
    assert torch.allclose(class_weights_from_mass(torch.tensor([2.0, 1.0, 1.0])), torch.tensor([0.6, 1.2, 1.2]))
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(8, 3, generator=g), torch.randn(8, 3, generator=g) * 2
    assert robust_kd_kl(s, t, torch.ones(3)).item() == pytest.approx(kd_kl(s, t).item(), rel=1e-5)  # spec C2
    w = torch.tensor([0.6, 1.2, 1.2])
    per = torch.nn.functional.kl_div(torch.log_softmax(s / 4, -1), torch.log_softmax(t / 4, -1),
                                     reduction="none", log_target=True).sum(-1)
    assert robust_kd_kl(s, t, w).item() == pytest.approx((16 * w[t.argmax(-1)] * per).mean().item(), rel=1e-5)
    m = _method(robust=True)
    x, _ = _batch()
    m.training_step((x, None), 0)
    with torch.no_grad():
        mass = torch.softmax(m.teacher(x), -1).sum(0)
    assert torch.allclose(m.class_mass, mass, atol=1e-5)


def test_config_validation():
    with pytest.raises(ConfigError, match="teacher_acc"):
        method_config({"name": "attnprobe"})  # noise adaptation needs the teacher's accuracy
    method_config({"name": "attnprobe", "noise_weight": 0})
    with pytest.raises(ConfigError, match="normalize"):
        method_config({"name": "attnprobe", "teacher_acc": 0.9, "normalize": "batch"})
    with pytest.raises(ConfigError, match="student_probe_blocks"):
        method_config({"name": "attnprobe", "teacher_acc": 0.9, "student_probe_blocks": [1]})


def test_token_mismatch_is_a_clear_error():
    torch.manual_seed(0)
    teacher = create_model("kdf_vit_micro", num_classes=5)
    student = create_model("kdf_vit_micro", num_classes=5, patch_size=8)  # 16 patches vs 64
    m = AttnProbe(_cfg(), student, teacher)
    with pytest.raises(ValueError, match="same number of tokens"):
        m.training_step(_batch(), 0)
