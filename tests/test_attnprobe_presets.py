"""Attention Probe presets carry the reference recipe (CIFAR-10/100: DeiT-B/4 teacher -> DeiT-xtiny/4
student on 650k selected ImageNet images) and the digits twin; KD golden value (spec C1); the step
schedule (C13) and epoch count (C14) of the reference."""
import math

import pytest
import torch

from kdforge.commands.select import selection_name
from kdforge.config import load_config
from kdforge.engine.schedules import lr_factor
from kdforge.losses.kd import kd_kl

CIFAR = [("configs/attnprobe/cifar10_deit_xtiny_from_deit_base4.yaml", 10, 7.5e-4, 0.9665),
         ("configs/attnprobe/cifar100_deit_xtiny_from_deit_base4.yaml", 100, 8.5e-4, 0.7630)]
N_SELECT = 650_000


def _reference_e(num_select: int, base: int = 320000) -> int:
    """The reference's E = int(base / num_select * 512) (base 320000: CIFAR script, 640000: ImageNet
    script); its loop runs epochs 1 .. E-1."""
    return int(base / num_select * 512)


@pytest.mark.parametrize("path,classes,lr,teacher_acc", CIFAR)
def test_cifar_presets_carry_the_reference_recipe(path, classes, lr, teacher_acc):
    cfg = load_config(path, ["data.require_root=false", "teacher.weights=null"])
    a = cfg.method_args()
    assert cfg.method_name == "attnprobe"
    assert (a.temperature, a.teacher_acc, a.noise_weight, a.noise_lr, a.probe_weight) == (4.0, teacher_acc, 1.0,
                                                                                          1e-3, 0.8)
    assert (a.probe_blocks, a.normalize, a.robust, a.weight_decay_all) == ([3, 7, 11], "channel", False, True)
    o, s, d = cfg.optim, cfg.sched, cfg.data
    assert (o.name, o.lr, o.weight_decay, d.batch_size, d.img_size) == ("adamw", lr, 0.025, 256, 32)
    assert (cfg.model.num_classes, cfg.teacher.num_classes) == (classes, classes)
    # the selection the student trains on is the folder 'kdforge select --n 650000 --mode combined' writes
    assert d.train_split.endswith("/" + selection_name("combined", N_SELECT, False)[:-len(".txt")])
    # C14: 650k -> E = 252 -> 251 epochs; C13: lr x0.1 from the reference's epoch 200 (1-based) on
    assert _reference_e(N_SELECT) - 1 == 251 == cfg.train.epochs
    assert (_reference_e(N_SELECT), _reference_e(1_000_000, 640000), _reference_e(800_000, 640000)) == (252, 327, 409)
    assert (s.name, s.milestones, s.gamma, s.warmup_epochs) == ("step", [199], 0.1, 0)
    spe = math.ceil(N_SELECT / d.batch_size)   # drop_last: false
    assert not d.drop_last and spe == 2540
    total = spe * cfg.train.epochs
    milestones = [m * spe for m in s.milestones]   # the trainer converts epochs to steps like this

    def lr_at(ref_epoch, within=0):  # reference epoch e (1-based) = 0-based epoch e - 1
        return o.lr * lr_factor((ref_epoch - 1) * spe + within, total, "step", milestones=milestones, gamma=s.gamma)
    assert lr_at(1) == lr_at(199, spe - 1) == pytest.approx(lr)
    assert lr_at(200) == lr_at(251, spe - 1) == pytest.approx(0.1 * lr)


def test_cifar_preset_models_shapes_and_one_step():
    """Random-init teacher and student of the CIFAR-10 preset: sizes of the paper's Table 1, 65 tokens,
    and one training step with all three loss terms."""
    from kdforge.engine.trainer import build_method
    cfg = load_config(CIFAR[0][0], ["data.require_root=false", "teacher.weights=null"])
    torch.manual_seed(0)
    m = build_method(cfg, 10)
    n_student = sum(p.numel() for p in m.student.parameters())
    n_teacher = sum(p.numel() for p in m.teacher.parameters())
    assert 2.35e6 < n_student < 2.45e6     # "about 2.38M" (DeiT-xtiny/4: width 128, 12 blocks, 2 heads)
    assert 21.2e6 < n_teacher < 21.5e6     # "about 21.3M" (DeiT-B/4: width 384, 12 blocks, 3 heads)
    assert (m.student.embed_dim, len(m.student.blocks), m.student.blocks[0].attn.num_heads) == (128, 12, 2)
    assert (m.teacher.embed_dim, len(m.teacher.blocks), m.teacher.blocks[0].attn.num_heads) == (384, 12, 3)
    x = torch.randn(2, 3, 32, 32)
    assert m.student.patch_embed(x).shape[1] + 1 == 65 == m.teacher.patch_embed(x).shape[1] + 1
    out = m.training_step((x, torch.full((2,), -1)), 0)
    assert set(out) == {"loss", "kd", "noise", "probe"} and all(torch.isfinite(v) for v in out.values())


def test_digits_twin_presets():
    t = load_config("configs/attnprobe/digits_teacher_cpu.yaml", ["data.require_root=false"])
    assert (t.method_name, t.model.name, t.data.img_size, t.train.device) == ("supervised", "kdf_vit_micro", 32, "cpu")
    s = load_config("configs/attnprobe/digits_cpu.yaml", ["data.require_root=false", "teacher.checkpoint=null"])
    a = s.method_args()
    assert s.method_name == "attnprobe" and s.data.val_split is None and s.model.kwargs == {"embed_dim": 48}
    assert (a.probe_blocks, a.normalize, a.temperature, a.probe_weight) == ([1, 2, 3], "channel", 4.0, 0.8)
    assert (s.optim.name, s.optim.weight_decay) == ("adamw", 0.025)
    assert s.data.train_split.endswith("/" + selection_name("combined", 270, False)[:-len(".txt")])


def test_kd_golden_value_of_the_reference():
    # C1: t = [[4 ln 3, 0]], y = [[0, 0]], T = 4 -> p_t = [3/4, 1/4], p_s = [1/2, 1/2];
    # T² · KL = 16 · (3/4 ln(3/2) + 1/4 ln(1/2)) = 2.0929926
    t = torch.tensor([[4 * math.log(3.0), 0.0]])
    assert kd_kl(torch.zeros(1, 2), t, temperature=4.0).item() == pytest.approx(2.0929926, rel=1e-6)
    assert kd_kl(t, t.clone(), temperature=4.0).item() == pytest.approx(0.0, abs=1e-7)
