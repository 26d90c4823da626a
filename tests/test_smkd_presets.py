"""SMKD presets for the four few-shot datasets (phase 1 = ibot, phase 2 = smkd) and the digits twins,
checked against the values of shared/methods/smkd.md §1.3, §1.6-1.8, §2.1-2.5 and §3.1."""
import pytest

from kdforge.config import load_config

DATASETS = ("mini_imagenet", "tiered_imagenet", "cifar_fs", "fc100")
CIFAR_MEAN = tuple(v / 255 for v in (129.37731888, 124.10583864, 112.47758569))
CIFAR_STD = tuple(v / 255 for v in (68.20947949, 65.43124043, 70.45866994))
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _load(path, *extra):
    return load_config(path, ["data.require_root=false", "init_from=null", *extra])


@pytest.mark.parametrize("ds", DATASETS)
def test_phase1_preset(ds):
    cfg = _load(f"configs/ibot/{ds}_vit_small.yaml")
    m = cfg.method_args()
    assert cfg.method_name == "ibot" and cfg.model.name == "vit_small_patch16_224"
    assert cfg.model.kwargs["drop_path_rate"] == 0.1
    # head: K 8192 shared [CLS]/patch prototypes, 3-layer MLP 2048 -> bottleneck 256, g trainable
    assert (m.out_dim, m.shared_head, m.head_hidden_dim, m.head_bottleneck_dim, m.head_nlayers) == (8192, True, 2048, 256, 3)
    assert m.norm_last_layer is False
    # multi-crop 2 x 224 (0.25-1) + 10 x 96 (0.05-0.25); iBOT masks: half unmasked, else U(0.1, 0.5), blocks
    assert (cfg.data.img_size, m.local_size, m.n_local) == (224, 96, 10)
    assert tuple(m.global_scale) == (0.25, 1.0) and tuple(m.local_scale) == (0.05, 0.25)
    assert tuple(m.mask_ratio) == (0.0, 0.3) and tuple(m.mask_ratio_var) == (0.0, 0.2) and m.mask_shape == "block"
    # temperatures 0.04 -> 0.07 over 30 epochs (CLS and patch), student 0.1, centring momenta 0.9
    assert (m.warmup_teacher_temp, m.teacher_temp, m.warmup_teacher_temp_epochs) == (0.04, 0.07, 30)
    assert (m.warmup_teacher_patch_temp, m.teacher_patch_temp) == (0.04, 0.07)
    assert (m.student_temp, m.center_momentum, m.center_momentum2) == (0.1, 0.9, 0.9)
    # phase 1 = DINO [CLS] + MIM (lambda2 has no meaning without labels)
    assert (m.lambda1, m.lambda3) == (1.0, 1.0)
    assert (m.momentum_teacher, m.momentum_teacher_end, m.freeze_last_layer) == (0.996, 1.0, 1)
    # AdamW 5e-4 unscaled, 10 warm-up epochs, min 1e-5; wd cosine 0.04 -> 0.4; per-tensor clip 3.0; fp16
    o, s, t = cfg.optim, cfg.sched, cfg.train
    assert (o.name, o.lr, o.weight_decay, o.weight_decay_end) == ("adamw", 5e-4, 0.04, 0.4)
    assert (s.name, s.warmup_epochs, s.min_lr) == ("cosine", 10, 1e-5)
    assert (t.clip_grad, t.clip_mode, t.amp) == (3.0, "per_tensor", "fp16")
    # evaluation: the EMA teacher's CLS + attention-weighted patch mean, 5-way 1/5-shot val episodes
    assert (m.eval_model, m.eval_feature, m.fewshot_ways, list(m.fewshot_shots)) == ("teacher", "cls_wpatch", 5, [1, 5])
    if ds in ("cifar_fs", "fc100"):
        assert tuple(cfg.data.mean) == pytest.approx(CIFAR_MEAN, abs=1e-7)
        assert tuple(cfg.data.std) == pytest.approx(CIFAR_STD, abs=1e-7)
    else:
        assert tuple(cfg.data.mean) == IMAGENET_MEAN and tuple(cfg.data.std) == IMAGENET_STD
    assert ds.split("_")[0] in str(cfg.data.root)


@pytest.mark.parametrize("ds", DATASETS)
def test_phase2_preset_starts_from_phase1(ds):
    from kdforge.config import load_yaml
    y = load_yaml(f"configs/smkd/{ds}_vit_small.yaml")
    p1 = load_yaml(f"configs/ibot/{ds}_vit_small.yaml")
    assert y["init_from"] == p1["out"]                                       # phase 2 continues phase 1
    cfg = _load(f"configs/smkd/{ds}_vit_small.yaml")
    m = cfg.method_args()
    assert cfg.method_name == "smkd" and cfg.model.name == "vit_small_patch16_224"
    assert (m.lambda1, m.lambda2, m.lambda3) == (1.0, 1.0, 0.0)              # [CLS] + patch, no MIM
    assert m.compat == "none" and m.gather_labels is True and m.pk_per_class >= 2
    assert cfg.train.epochs == 150 and cfg.train.val_every == 5              # README: <= 150 epochs, val every 5
    assert (m.out_dim, m.local_size, m.n_local, m.eval_model) == (8192, 96, 10, "teacher")
    assert cfg.data.batch_size % m.pk_per_class == 0


@pytest.mark.parametrize("phase", ["ibot", "smkd"])
def test_digits_twins_are_cpu_sized_few_shot_runs(phase):
    cfg = _load(f"configs/{phase}/digits_cpu.yaml")
    m = cfg.method_args()
    assert cfg.train.device == "cpu" and cfg.train.epochs <= 20 and cfg.method_name == phase
    assert "digits_fewshot" in str(cfg.data.root)                           # base classes train, novel test
    assert m.fewshot_ways == 5 and list(m.fewshot_shots) == [1, 5]
    if phase == "smkd":
        assert m.lambda2 > 0 and m.lambda3 == 0 and cfg.data.batch_size % m.pk_per_class == 0
