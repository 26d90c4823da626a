"""MoCo / SEED methods: shape contract, momentum + queue bookkeeping, backbones, online kNN."""
import math

import pytest
import torch
import torch.nn.functional as F

from kdforge.config import ConfigError, load_config
from kdforge.engine.trainer import build_method
from kdforge.methods.moco import MoCo, backbone_out_dim
from kdforge.methods.moco_knn import gather_rows, weighted_knn_predict
from kdforge.models import create_model


def _cfg(digits_root, tmp_path, *extra):
    return load_config("configs/moco/digits_improved_cpu.yaml",
                       [f"data.root={digits_root}", f"out={tmp_path / 'r'}", "data.img_size=16",
                        "data.batch_size=8", "method.queue_size=32", "method.bn_splits=2", *extra])


def _batch(n=8, size=16):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(n, 3, size, size, generator=g), torch.randn(n, 3, size, size, generator=g)], \
        torch.full((n,), -1)


def test_training_step_contract_momentum_and_queue(digits_root, tmp_path):
    torch.manual_seed(0)
    cfg = _cfg(digits_root, tmp_path, "method.momentum=0.9")
    m = build_method(cfg, 10)
    assert isinstance(m, MoCo) and m.feat_dim == 128 and m.head.out_dim == 128
    assert [l.out_features for l in m.head if isinstance(l, torch.nn.Linear)] == [256, 128]  # wide: d -> 2d -> D
    assert all(not p.requires_grad for p in m.key_backbone.parameters())
    trainable = {id(p) for g in m.param_groups() for p in g["params"]}
    assert not any(id(p) in trainable for p in m.key_backbone.parameters())
    m.on_train_start(steps_per_epoch=1, epochs=1)
    m.train()
    out = m.training_step(_batch(), 0)
    assert set(out) == {"loss", "inst_acc1", "inst_acc5"} and out["loss"].ndim == 0
    # before any update the key encoder equals the query encoder: InfoNCE ~ log(1+K) only if keys random
    assert math.isfinite(out["loss"].item())
    opt = torch.optim.SGD([p for g in m.param_groups() for p in g["params"]], lr=0.5)
    out["loss"].backward()
    k_before = [p.clone() for p in m.key_backbone.parameters()]
    opt.step()
    queue_before = m.queue.keys.clone()
    m.on_after_optimizer_step(0)
    # EMA over parameters: θ_k = 0.9 θ_k + 0.1 θ_q
    for kb, pk, pq in zip(k_before, m.key_backbone.parameters(), m.student.parameters()):
        assert torch.allclose(pk, 0.9 * kb + 0.1 * pq, atol=1e-6)
    # the 8 keys of this batch went to rows 0..7, normalised; ptr moved by the global batch
    assert int(m.queue.ptr) == 8
    assert torch.allclose(m.queue.keys[:8].norm(dim=1), torch.ones(8), atol=1e-5)
    assert not torch.equal(m.queue.keys[:8], queue_before[:8]) and torch.equal(m.queue.keys[8:], queue_before[8:])
    assert m.embed(torch.randn(2, 3, 16, 16)).shape == (2, 128)  # representation = pre-projection feature


def test_queue_must_be_multiple_of_global_batch(digits_root, tmp_path):
    cfg = _cfg(digits_root, tmp_path, "method.queue_size=36")
    m = build_method(cfg, 10)
    with pytest.raises(ValueError, match="K=36 must be a multiple of the global batch B=8"):
        m.on_train_start(1, 1)
    with pytest.raises(ConfigError, match="drop_last"):
        build_method(_cfg(digits_root, tmp_path, "data.drop_last=false"), 10)


@pytest.mark.parametrize("bn", ["none", "sync"])
def test_bn_modes_single_process(digits_root, tmp_path, bn):
    torch.manual_seed(0)
    m = build_method(_cfg(digits_root, tmp_path, f"method.bn={bn}"), 10)
    m.train()
    out = m.training_step(_batch(), 0)
    assert torch.isfinite(out["loss"])


def test_bad_method_keys_fail_clearly(digits_root, tmp_path):
    with pytest.raises(ConfigError, match="method.head"):
        _cfg(digits_root, tmp_path, "method.head=huge")
    with pytest.raises(ConfigError, match="method.crop_scale"):
        _cfg(digits_root, tmp_path, "method.crop_scale=[0.0,1.0]")


@pytest.mark.parametrize("name,d", [("resnet18", 512), ("mobilenetv3_small_100", 1024),
                                    ("mobilenetv3_large_100", 1280), ("efficientnet_b0", 1280),
                                    ("deit_tiny_patch16_224", 192)])
def test_paper_backbones_representation_width_and_wide_head(name, d):
    # the representation is the pooled pre-projection feature; the paper's d per architecture (§1.4)
    torch.manual_seed(0)
    backbone = create_model(name, num_classes=0)
    assert backbone_out_dim(backbone, 3, 224) == d
    m = MoCo(None, backbone)
    lin = [l for l in m.head if isinstance(l, torch.nn.Linear)]
    assert (lin[0].in_features, lin[0].out_features, lin[1].out_features) == (d, 2 * d, 128)
    assert m.queue.keys.shape == (65536, 128)


def test_freeze_patch_embed_for_vit():
    from kdforge.methods.moco import freeze_patch_embed_
    vit = create_model("kdf_vit_micro", num_classes=0)
    assert freeze_patch_embed_(vit) == 2  # proj.weight, proj.bias
    assert not vit.patch_embed.proj.weight.requires_grad and vit.blocks[0].attn.qkv.weight.requires_grad


def test_weighted_knn_matches_reference_loop():
    torch.manual_seed(0)
    g = F.normalize(torch.randn(30, 5), dim=1)
    gy = torch.randint(0, 3, (30,))
    q = F.normalize(torch.randn(7, 5), dim=1)
    k, t = 4, 0.1
    pred = weighted_knn_predict(q, g, gy, k=k, temperature=t, chunk=3)
    for i in range(7):
        sims = [(float(q[i] @ g[j]), j) for j in range(30)]
        top = sorted(sims, reverse=True)[:k]
        votes = [0.0, 0.0, 0.0]
        for s, j in top:
            votes[int(gy[j])] += math.exp(s / t)
        assert int(pred[i]) == max(range(3), key=lambda c: (votes[c], -c))


def test_weighted_knn_leave_one_out_and_golden():
    # three points on a line of the circle: a=(1,0) label 0, b=(0.8,0.6) label 1, c=(0,1) label 1
    x = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]])
    y = torch.tensor([0, 1, 1])
    # leave-one-out, k=1: a's nearest other is b (cos 0.8) -> 1; b's is a (0.8) vs c (0.6) -> 0; c's is b -> 1
    assert weighted_knn_predict(x, x, y, k=1, leave_one_out=True).tolist() == [1, 0, 1]
    # without leave-one-out every point finds itself
    assert weighted_knn_predict(x, x, y, k=1).tolist() == [0, 1, 1]
    assert torch.equal(gather_rows(x), x)  # single process: identity
