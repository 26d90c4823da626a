"""KDEP method: shape contract (k follows the student width), target conformance, ablation options,
reference augmentation, data subset."""
import json

import pytest
import torch

from kdforge.align.svd import SVDAligner
from kdforge.config import ConfigError, load_config
from kdforge.losses.kdep import pts
from kdforge.models.preact import preact_pooled_features

X = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def svd_2048(tmp_path_factory):
    """Statistics of a 2048-d teacher with 2048 orthonormal directions: a random signed permutation
    (cheap to build, and any column mix-up shows in the target check)."""
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(2048, generator=g)
    v = torch.zeros(2048, 2048)
    v[perm, torch.arange(2048)] = torch.where(torch.rand(2048, generator=g) < 0.5, -1.0, 1.0)
    al = SVDAligner(torch.randn(2048, generator=g) * 0.1, v, torch.linspace(10, 1, 2048), n_samples=100,
                    meta={"teacher": "torchvision/resnet50:random-init"}, channel_var=torch.rand(2048, generator=g))
    path = tmp_path_factory.mktemp("svd") / "r50.safetensors"
    al.save(path)
    return path


def _method(student, teacher, svd, **method):
    from kdforge.engine.trainer import build_method
    cfg = load_config(None, data={
        "method": {"name": "kdep", "svd": str(svd), **method},
        "data": {"require_root": False, "img_size": 64},
        "model": {"name": student},
        "teacher": {"name": teacher, "num_classes": 1000},
        "optim": {"weight_decay": 5e-4},
    })
    torch.manual_seed(0)
    return build_method(cfg, num_classes=1000)


@pytest.mark.parametrize("student,k", [("torchvision/resnet18", 512), ("torchvision/mobilenet_v2", 1280)])
def test_k_follows_student_width_and_target_conformance(svd_2048, student, k):
    m = _method(student, "torchvision/resnet50", svd_2048)
    assert m.k == k and m.aligner.V.shape == (2048, k) and m.aligner.k == k
    assert not hasattr(m.student, "fc") or isinstance(m.student.fc, torch.nn.Identity)
    out = m.training_step((X, torch.tensor([-1, -1])), 0)
    assert set(out) == {"loss", "feat_mse", "cos"} and torch.isfinite(out["loss"])
    out["loss"].backward()
    assert all(p.grad is not None for p in m.student.parameters() if p.requires_grad)
    assert m.teacher.training is False and all(not p.requires_grad for p in m.teacher.parameters())
    # the target is PTS((f_T - mu) @ V[:, :k]) of the teacher's pooled pre-ReLU feature (spec C2)
    full = SVDAligner.load(svd_2048)
    with torch.no_grad():
        f_t = preact_pooled_features(m.teacher, X)
        expected = pts((f_t - full.mean) @ full.V[:, :k], 0.1, 3.0)
        torch.testing.assert_close(m.target(m.teacher_features(X)), expected, rtol=1e-4, atol=1e-4)
        f_s = preact_pooled_features(m.student, X)
    # the loss is w · mean MSE against that target, w = 3 by default
    assert out["loss"].item() == pytest.approx(3.0 * torch.mean((f_s - expected) ** 2).item(), rel=1e-4)
    # statistics are buffers: checkpointed with the method
    assert {"aligner.mean", "aligner.V"} <= set(m.state_dict())
    # KDEP decays every parameter (BN and bias too), as the reference
    (group,) = m.param_groups()
    assert group["weight_decay"] == 5e-4 and len(group["params"]) == len(list(m.student.parameters()))


def test_options_svd_only_channels_regressor_and_errors(svd_2048, tmp_path):
    m = _method("torchvision/resnet18", "torchvision/resnet50", svd_2048, pts=False, loss_weight=20.0)
    full = SVDAligner.load(svd_2048)
    with torch.no_grad():
        f_t = m.teacher_features(X)
        torch.testing.assert_close(m.target(f_t), (f_t - full.mean) @ full.V[:, :512], rtol=1e-4, atol=1e-4)
    # "channels": the 512 highest-variance teacher channels, centred, then PTS
    mc = _method("torchvision/resnet18", "torchvision/resnet50", svd_2048, alignment="channels")
    idx = full.top_variance_channels(512)
    with torch.no_grad():
        f_t = mc.teacher_features(X)
        torch.testing.assert_close(mc.target(f_t), pts((f_t - full.mean)[:, idx]), rtol=1e-4, atol=1e-4)
    # parametric baseline: Linear(512 -> 2048) on the student feature, trained with the student
    mr = _method("torchvision/resnet18", "torchvision/resnet50", svd_2048, alignment="regressor", pts=False)
    assert mr.aligner is None and tuple(mr.regressor.weight.shape) == (2048, 512)
    out = mr.training_step((X, None), 0)
    out["loss"].backward()
    assert mr.regressor.weight.grad is not None
    assert any(p is mr.regressor.weight for g in mr.param_groups() for p in g["params"])
    with pytest.raises(ConfigError, match="equal widths"):
        _method("torchvision/resnet18", "torchvision/resnet50", svd_2048, alignment="none")
    with pytest.raises(ConfigError, match="kdep-svd"):
        _method("torchvision/resnet18", "torchvision/resnet50", tmp_path / "missing.safetensors")
    with pytest.raises(ConfigError, match="method.k"):
        _method("torchvision/resnet18", "torchvision/resnet50", svd_2048, k=256)
    with pytest.raises(ConfigError, match="teacher has"):
        _method("torchvision/resnet18", "torchvision/resnet18", svd_2048)    # 512-d teacher, 2048-d stats
    with pytest.raises(ConfigError, match="method.svd"):
        load_config(None, data={"method": {"name": "kdep"}, "data": {"require_root": False}})


def test_rebuild_without_teacher_takes_buffers_from_checkpoint(svd_2048):
    m = _method("kdf_resnet_narrow", "torchvision/resnet50", svd_2048)
    assert m.k == 128
    from kdforge.engine.trainer import build_method
    cfg = load_config(None, data={"method": {"name": "kdep", "svd": "/nonexistent/svd.safetensors"},
                                  "data": {"require_root": False}, "model": {"name": "kdf_resnet_narrow"},
                                  "teacher": {"name": "torchvision/resnet50"}})
    back = build_method(cfg, num_classes=0, with_teacher=False)
    back.load_state_dict(m.state_dict())
    torch.testing.assert_close(back.aligner.V, m.aligner.V)
    assert back.evaluate([], torch.device("cpu")) == {}


def test_reference_augmentation_is_seeded_and_lights():
    from PIL import Image

    from kdforge.methods.kdep import IMAGENET_PCA_EIGVAL, IMAGENET_PCA_EIGVEC, Lighting, kdep_reference_transform
    img = Image.fromarray((torch.rand(40, 40, 3, generator=torch.Generator().manual_seed(1)) * 255)
                          .to(torch.uint8).numpy())
    tf = kdep_reference_transform(32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    torch.manual_seed(3)
    a = tf(img)
    torch.manual_seed(3)
    b = tf(img)
    assert a.shape == (3, 32, 32) and torch.equal(a, b)
    assert a.min() >= -1.0 - 1e-6 and a.max() <= 1.0 + 1e-6     # clamped to [0,1] before normalising
    # lighting adds eigvec @ (alpha * eigval) to every pixel
    torch.manual_seed(7)
    alpha = torch.randn(3) * 0.05
    shift = torch.tensor(IMAGENET_PCA_EIGVEC) @ (alpha * torch.tensor(IMAGENET_PCA_EIGVAL))
    torch.manual_seed(7)
    out = Lighting(0.05)(torch.zeros(3, 2, 2))
    torch.testing.assert_close(out, shift[:, None, None].expand(3, 2, 2))


def test_subset_is_deterministic_per_class(tmp_path):
    from PIL import Image

    from kdforge.data.converters.subset import choose_subset, make_subset
    src = tmp_path / "src"
    for c in ("a", "b"):
        for i in range(10 if c == "a" else 3):
            (src / "train" / c).mkdir(parents=True, exist_ok=True)
            Image.new("L", (4, 4), i).save(src / "train" / c / f"{i:02d}.png")
    (src / "val" / "a").mkdir(parents=True)
    Image.new("L", (4, 4)).save(src / "val" / "a" / "x.png")
    m1 = make_subset(src, tmp_path / "o1", per_class=4, seed=0)
    m2 = make_subset(src, tmp_path / "o2", per_class=4, seed=0)
    assert m1["files"] == m2["files"] and m1["images"] == 4 + 3 and m1["classes_with_fewer"] == ["b"]
    assert len({tuple(make_subset(src, tmp_path / f"s{s}", per_class=4, seed=s)["files"]["a"])
                for s in range(4)}) > 1                       # the seed matters
    assert sorted(p.name for p in (tmp_path / "o1" / "train" / "a").iterdir()) == \
        [f.split("/")[-1] for f in m1["files"]["a"]]
    assert (tmp_path / "o1" / "val" / "a" / "x.png").is_file()   # other splits linked whole
    assert json.loads((tmp_path / "o1" / "subset.json").read_text())["seed"] == 0
    # a class's choice does not depend on the other classes
    files = [f"a/{i:02d}.png" for i in range(10)]
    assert choose_subset(files, 4, 0, "a") == m1["files"]["a"]
    assert choose_subset(files, None, 0, "a", fraction=0.25) == choose_subset(files, 2, 0, "a")   # round(2.5)=2
    with pytest.raises(FileExistsError):
        make_subset(src, tmp_path / "o1", per_class=4, seed=0)


def test_presets_carry_the_reference_recipe(tmp_path):
    svd = tmp_path / "s.safetensors"
    svd.write_bytes(b"")
    common = ["data.require_root=false", "teacher.weights=null", f"method.svd={svd}"]
    r18 = load_config("configs/kdep/in1k10pct_resnet18_from_resnet50.yaml", common)
    mnv2 = load_config("configs/kdep/in1k10pct_mobilenetv2_from_resnet50.yaml", common)
    for cfg, lr, model in ((r18, 0.3, "torchvision/resnet18"), (mnv2, 0.1, "torchvision/mobilenet_v2")):
        assert cfg.method_name == "kdep" and cfg.model.name == model and cfg.teacher.name == "torchvision/resnet50"
        assert (cfg.optim.name, cfg.optim.lr, cfg.optim.ref_batch, cfg.optim.momentum, cfg.optim.weight_decay,
                cfg.optim.nesterov) == ("sgd", lr, 512, 0.9, 5e-4, False)
        assert (cfg.sched.name, cfg.sched.milestones, cfg.sched.gamma, cfg.train.epochs) == ("step", [30, 60], 0.1, 90)
        a = cfg.method_args()
        assert (a.alignment, a.pts, a.pts_temperature, a.pts_power, a.loss_weight, a.k) == \
            ("svd", True, 0.1, 3.0, 3.0, None)
    tr = load_config("configs/kdep/transfer_cifar100_resnet18.yaml", ["data.require_root=false", "init_from=null"])
    assert (tr.optim.lr, tr.data.batch_size, tr.train.epochs, tr.sched.milestones) == (1e-3, 64, 150, [50, 100])
    cpu = load_config("configs/kdep/digits_cpu.yaml", ["data.require_root=false", "teacher.checkpoint=null",
                                                       f"method.svd={svd}"])
    assert cpu.model.name == "kdf_resnet_narrow" and cpu.train.device == "cpu"
