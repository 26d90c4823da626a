"""VkD presets (paper recipe + digits twin), real timm DeiT students with a timm RegNetY teacher, and a
teacher loaded from a local weights file."""
import math

import pytest
import torch

from kdforge.config import load_config
from kdforge.engine.schedules import lr_factor
from kdforge.engine.trainer import build_method, build_optimizer
from kdforge.methods.vkd import VkD

PRESETS = [("configs/vkd/in1k_deit_tiny_from_regnety160.yaml", "deit_tiny_distilled_patch16_224", 192),
           ("configs/vkd/in1k_deit_small_from_regnety160.yaml", "deit_small_distilled_patch16_224", 384)]


@pytest.mark.parametrize("path,student,width", PRESETS)
def test_imagenet_presets_carry_the_paper_recipe(path, student, width):
    cfg = load_config(path, ["data.require_root=false", "teacher.weights=null"])
    assert cfg.method_name == "vkd" and cfg.model.name == student and cfg.model.num_classes == 1000
    assert cfg.teacher.name == "regnety_160"
    a = cfg.method_args()
    # loss: CE 1 + γ 1 · KL(τ 1) + α 1 · SmoothL1(β 1) with an orthogonal projector and a LayerNorm target
    assert (a.ce_weight, a.gamma, a.temperature, a.alpha, a.smooth_l1_beta) == (1.0, 1.0, 1.0, 1.0, 1.0)
    assert (a.projector, a.norm, a.scale_shift, a.stem) == ("orthogonal", "layernorm", False, "patch")
    # data: 3-Augment, mixup 0.8 / cutmix 1.0 (switch 0.5, always on), label smoothing 0.1
    assert (a.three_augment, a.color_jitter) == (True, 0.3)
    assert (a.mixup_alpha, a.cutmix_alpha, a.mix_prob, a.mix_switch_prob, a.label_smoothing) == (0.8, 1.0, 1.0, 0.5, 0.1)
    assert cfg.data.img_size == 224
    # optimiser: AdamW 5e-4 at a global batch of 512 (linear scaling), wd 0.05, betas/eps as timm
    o = cfg.optim
    assert (o.name, o.lr, o.ref_batch, o.weight_decay, tuple(o.betas), o.eps) == \
        ("adamw", 5e-4, 512, 0.05, (0.9, 0.999), 1e-8)
    # schedule: per-step cosine from 5e-4 to 5e-6, no warm-up, 300 epochs, mixed precision
    s = cfg.sched
    assert (s.name, s.warmup_epochs, s.min_lr, cfg.train.epochs) == ("cosine", 0, 5e-6, 300)
    assert cfg.train.amp in ("bf16", "fp16")
    ratio = s.min_lr / o.lr
    assert lr_factor(0, 1000, "cosine", min_ratio=ratio) == pytest.approx(1.0)
    assert lr_factor(1000, 1000, "cosine", min_ratio=ratio) * o.lr == pytest.approx(5e-6)
    # halfway: 5e-6 + ½(5e-4 − 5e-6)(1 + cos(π/2)) = 2.525e-4
    assert lr_factor(500, 1000, "cosine", min_ratio=ratio) * o.lr == pytest.approx(2.525e-4)


def test_preset_lr_scales_with_the_global_batch_and_projector_skips_decay():
    # the preset's optimiser section, on CPU-sized models (the real teacher would need its weights file)
    cfg = load_config("configs/vkd/in1k_deit_tiny_from_regnety160.yaml",
                      ["data.require_root=false", "data.img_size=16", "teacher.weights=null",
                       "model.name=kdf_deit_micro_distilled", "model.num_classes=10",
                       "teacher.name=kdf_resnet_narrow", "teacher.num_classes=10"])
    torch.manual_seed(0)
    m = build_method(cfg, num_classes=10)
    assert isinstance(m, VkD) and m.distilled
    assert (m.projector.d_in, m.projector.d_out) == (96, 128)
    for global_batch, lr in ((512, 5e-4), (1024, 1e-3), (128, 1.25e-4)):
        opt = build_optimizer(cfg, m, global_batch)
        assert [g["lr"] for g in opt.param_groups] == pytest.approx([lr] * len(opt.param_groups))
    proj = [g for g in opt.param_groups if any(p is m.projector.raw for p in g["params"])]
    assert len(proj) == 1 and proj[0]["weight_decay"] == 0.0
    assert any(g["weight_decay"] == 0.05 for g in opt.param_groups)   # the student's matrices decay


def test_real_timm_deit_students_with_a_timm_regnety_teacher():
    # stock timm DeiT (class + distillation tokens) at 32 px; teacher: timm RegNetY (regnety_002, same
    # family as regnety_160, which takes ~30 s to initialise on a loaded CPU)
    from kdforge.models import create_model
    torch.manual_seed(0)
    cfg = load_config(data={"method": {"name": "vkd", "mixup_alpha": 0.8, "cutmix_alpha": 1.0,
                                       "label_smoothing": 0.1},
                            "data": {"require_root": False, "img_size": 32}})
    teacher = create_model("regnety_002", num_classes=10, img_size=32)
    for name, width in ((p[1], p[2]) for p in PRESETS):
        student = create_model(name, num_classes=10, img_size=32)
        m = VkD(cfg, student, teacher)
        assert (m.projector.d_in, m.projector.d_out) == (width, 368)
        x, y = torch.randn(2, 3, 32, 32), torch.tensor([1, 7])
        m.train()
        out = m.training_step((x, y), 0)
        assert {"ce", "kd", "feat", "proj_fro"} <= set(out) and torch.isfinite(out["loss"])
        assert out["proj_fro"].item() == pytest.approx(math.sqrt(min(width, 368)), rel=1e-5)   # sqrt(rank)
        out["loss"].backward()
        assert m.projector.raw.grad.abs().sum() > 0 and student.cls_token.grad.abs().sum() > 0
        assert student.dist_token.grad.abs().sum() > 0
        m.eval()
        with torch.no_grad():   # evaluation: the mean of the two heads (DeiT)
            tok = student.forward_features(x)
            avg = (student.head(tok[:, 0]) + student.head_dist(tok[:, 1])) / 2
            torch.testing.assert_close(m.predict(x), avg)
        if name.startswith("deit_small"):
            break


def test_teacher_from_a_local_weights_file(tmp_path):
    from safetensors.torch import save_file

    from kdforge.models import create_model
    torch.manual_seed(3)
    src = create_model("kdf_resnet_narrow", num_classes=10, img_size=16)
    path = tmp_path / "teacher.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    def cfg_for(weights):
        return load_config(data={"method": {"name": "vkd"},
                                 "data": {"require_root": False, "img_size": 16},
                                 "model": {"name": "kdf_deit_micro_distilled"},
                                 "teacher": {"name": "kdf_resnet_narrow", "num_classes": 10, "weights": str(weights)}})
    torch.manual_seed(4)   # a different init: only the file can make the weights equal
    m = build_method(cfg_for(path), num_classes=10)
    for k, v in src.state_dict().items():
        assert torch.equal(m.teacher.state_dict()[k], v), k
    assert m.teacher.training is False and not any(p.requires_grad for p in m.teacher.parameters())
    assert m.projector.d_out == 128   # kdf_resnet_narrow's pooled width
    # a file of another architecture is refused, naming the problem
    bad = tmp_path / "bad.safetensors"
    save_file({"fc.weight": torch.zeros(3, 3)}, str(bad))
    with pytest.raises(Exception, match="(?i)missing|unexpected|size"):
        build_method(cfg_for(bad), num_classes=10)


def test_digits_twin_is_the_same_method_at_cpu_size():
    cfg = load_config("configs/vkd/digits_cpu.yaml", ["data.require_root=false", "teacher.checkpoint=null"])
    a = cfg.method_args()
    assert cfg.method_name == "vkd" and cfg.model.name == "kdf_deit_micro_distilled"
    assert (a.ce_weight, a.gamma, a.temperature, a.alpha, a.projector, a.norm) == \
        (1.0, 1.0, 1.0, 1.0, "orthogonal", "layernorm")
    assert cfg.optim.name == "adamw" and cfg.optim.weight_decay == 0.05 and cfg.train.device == "cpu"
