"""KDEP pre-activation taps (timm / torchvision, hooks) and weight exports (torchvision keys,
Detectron2 .pkl)."""
import pickle

import pytest
import timm
import torch
import torchvision
from torch import nn

from kdforge.export import (detectron2_resnet_key, save_detectron2_pkl, to_detectron2, to_torchvision_state_dict,
                            torchvision_backbone)
from kdforge.models.preact import PreActTap, preact_block, preact_dim, preact_pooled_features


def _randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BN affine params and running stats (timm zero-inits the last BN of each block)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.weight.data = torch.rand(c, generator=g) + 0.5
            m.bias.data = torch.randn(c, generator=g) * 0.5
            m.running_mean = torch.randn(c, generator=g) * 0.1
            m.running_var = torch.rand(c, generator=g) + 0.5
    return model.eval()


def _block_input(model, block, x):
    box = {}
    h = block.register_forward_pre_hook(lambda m, a: box.__setitem__("x", a[0].clone()))
    with torch.no_grad():
        model(x)
    h.remove()
    return box["x"]


X = torch.randn(2, 3, 40, 40, generator=torch.Generator().manual_seed(1))   # 2x2 map at the last block


@pytest.mark.parametrize("lib", ["timm", "torchvision"])
def test_resnet18_preact_equals_manual_basic_block(lib):
    model = timm.create_model("resnet18", num_classes=0) if lib == "timm" else torchvision.models.resnet18()
    model = _randomize_bn(model)
    blk = model.layer4[-1]
    xin = _block_input(model, blk, X)
    relu = nn.ReLU()
    with torch.no_grad():   # BasicBlock without its last ReLU: bn2(conv2(relu(bn1(conv1(x))))) + x
        pre = blk.bn2(blk.conv2(relu(blk.bn1(blk.conv1(xin))))) + xin
        f = preact_pooled_features(model, X)
    assert f.shape == (2, 512) and preact_dim(model) == 512
    torch.testing.assert_close(f, pre.mean((2, 3)), rtol=1e-5, atol=1e-5)
    assert (f < 0).any()    # pre-ReLU: negative entries exist
    # the model's own (post-ReLU) pooled feature is GAP(ReLU(map)), not ReLU(f)
    with torch.no_grad():
        post = model.forward_head(model.forward_features(X), pre_logits=True) if lib == "timm" else \
            torch.flatten(model.avgpool(relu(pre)), 1)
    torch.testing.assert_close(post, relu(pre).mean((2, 3)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("lib", ["timm", "torchvision"])
def test_resnet50_preact_equals_manual_bottleneck(lib):
    model = timm.create_model("resnet50", num_classes=0) if lib == "timm" else torchvision.models.resnet50()
    model = _randomize_bn(model, seed=2)
    blk = model.layer4[-1]
    xin = _block_input(model, blk, X)
    relu = nn.ReLU()
    with torch.no_grad():
        h = relu(blk.bn1(blk.conv1(xin)))
        h = relu(blk.bn2(blk.conv2(h)))
        pre = blk.bn3(blk.conv3(h)) + xin
        f = preact_pooled_features(model, X)
    assert f.shape == (2, 2048)
    torch.testing.assert_close(f, pre.mean((2, 3)), rtol=1e-4, atol=1e-5)


def test_mobilenet_v2_preact_is_bn_of_last_conv_without_relu6():
    model = _randomize_bn(torchvision.models.mobilenet_v2(), seed=3)
    last = model.features[-1]
    with torch.no_grad():
        xin = model.features[:-1](X)
        pre = last[1](last[0](xin))
        f = preact_pooled_features(model, X)
    assert f.shape == (2, 1280) and preact_dim(model) == 1280
    torch.testing.assert_close(f, pre.mean((2, 3)), rtol=1e-5, atol=1e-5)
    assert (f < 0).any()


def test_tap_keeps_gradient_and_persistent_hooks():
    from kdforge.models import create_model
    model = create_model("kdf_resnet_narrow", num_classes=0).train()   # timm resnet18, narrow
    tap = PreActTap(model)
    f = tap(X)
    f.pow(2).mean().backward()
    # timm zero-inits the last BN's gamma, so its gradient (not conv2's) shows the graph is intact
    assert model.layer4[-1].bn2.weight.grad.abs().sum() > 0
    assert model.layer4[-1].conv1.weight.grad is not None
    f2 = tap(X[:1])                     # hooks persist across calls
    assert f2.shape == (1, 128)
    tap.remove()
    model(X[:1])
    assert tap.pooled is None
    assert preact_block(model)[1] == "layer4.1"
    with pytest.raises(ValueError, match="unsupported"):
        PreActTap(nn.Linear(3, 3))


# ---------------------------------------------------------------------------------------------
# exports
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,arch", [("resnet18", "resnet18"), ("torchvision/resnet18", "resnet18"),
                                       ("torchvision/mobilenet_v2", "mobilenet_v2")])
def test_torchvision_export_round_trip_strict(name, arch):
    from kdforge.models import create_model
    src = _randomize_bn(create_model(name, num_classes=10), seed=4)
    state = to_torchvision_state_dict(src)
    assert not any(k.startswith(("fc.", "classifier.")) for k in state)
    dst = torchvision_backbone(arch)
    dst.load_state_dict(state, strict=True)
    dst.eval()
    # the exported weights give the standard (post-activation) pooled features of the source
    from kdforge.models import pooled_features
    with torch.no_grad():
        torch.testing.assert_close(dst(X), pooled_features(src, X), rtol=1e-5, atol=1e-5)


def test_timm_mobilenetv2_to_torchvision_keys():
    src = _randomize_bn(timm.create_model("mobilenetv2_100", num_classes=0), seed=5)
    state = to_torchvision_state_dict(src)
    dst = torchvision_backbone("mobilenet_v2")
    dst.load_state_dict(state, strict=True)
    dst.eval()
    with torch.no_grad():
        torch.testing.assert_close(dst(X), src(X), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(preact_pooled_features(dst, X), preact_pooled_features(src, X),
                                   rtol=1e-4, atol=1e-5)


def test_detectron2_key_map_resnet18():
    # spec §5.3, rule by rule
    cases = {
        "conv1.weight": "stem.conv1.weight",
        "bn1.running_var": "stem.conv1.norm.running_var",
        "layer1.0.conv1.weight": "res2.0.conv1.weight",
        "layer1.1.bn2.bias": "res2.1.conv2.norm.bias",
        "layer2.0.downsample.0.weight": "res3.0.shortcut.weight",
        "layer2.0.downsample.1.running_mean": "res3.0.shortcut.norm.running_mean",
        "layer4.1.bn1.num_batches_tracked": "res5.1.conv1.norm.num_batches_tracked",
        "layer3.0.bn3.weight": "res4.0.conv3.norm.weight",
        "fc.weight": "stem.fc.weight",
    }
    for src, dst in cases.items():
        assert detectron2_resnet_key(src) == dst
    state = to_torchvision_state_dict(torchvision.models.resnet18())
    d2 = to_detectron2(state)
    assert len(d2) == len(state) == 122 - 2     # resnet18: 122 keys, minus fc.weight and fc.bias
    assert all(k.startswith(("stem.", "res2.", "res3.", "res4.", "res5.")) for k in d2)
    assert {k.split(".")[0] for k in d2} == {"stem", "res2", "res3", "res4", "res5"}
    assert "res5.0.shortcut.norm.weight" in d2 and "stem.conv1.norm.weight" in d2
    assert not any("bn" in k or "layer" in k or "downsample" in k for k in d2)


def test_detectron2_pkl_file(tmp_path):
    model = torchvision.models.resnet18()
    state = to_torchvision_state_dict(model)
    path = save_detectron2_pkl(state, tmp_path / "r18.pkl")
    with open(path, "rb") as fh:
        obj = pickle.load(fh)
    assert set(obj) == {"model", "__author__", "matching_heuristics"} and obj["matching_heuristics"] is True
    w = obj["model"]["res3.0.shortcut.weight"]
    assert w.shape == (128, 64, 1, 1)
    assert (w == model.layer2[0].downsample[0].weight.detach().numpy()).all()
    mnv2 = to_detectron2(to_torchvision_state_dict(torchvision.models.mobilenet_v2()), arch="mobilenet_v2")
    assert "features.0.0.weight" in mnv2 and not any(k.startswith("classifier") for k in mnv2)


@pytest.mark.parametrize("name,arch,suffix", [("torchvision/resnet18", "resnet18", ".safetensors"),
                                              ("mobilenetv2_100", "mobilenet_v2", ".pth")])
def test_export_downstream_files_load_strict_into_torchvision(tmp_path, name, arch, suffix):
    from safetensors.torch import load_file

    from kdforge.export import export_downstream
    from kdforge.models import create_model, pooled_features
    src = _randomize_bn(create_model(name, num_classes=0), seed=6)
    path = export_downstream(src, "torchvision", tmp_path / f"bb{suffix}")
    state = load_file(str(path)) if suffix == ".safetensors" else torch.load(path, weights_only=True)
    dst = torchvision_backbone(arch)
    dst.load_state_dict(state, strict=True)
    dst.eval()
    with torch.no_grad():   # the standard architecture: final ReLU / ReLU6 back, same pooled features
        torch.testing.assert_close(dst(X), pooled_features(src, X), rtol=1e-4, atol=1e-5)
    d2 = export_downstream(src, "detectron2", tmp_path / "bb.pkl")
    with open(d2, "rb") as fh:
        keys = set(pickle.load(fh)["model"])
    if arch == "resnet18":
        assert "res5.1.conv2.norm.weight" in keys and "stem.conv1.norm.running_mean" in keys
    else:
        assert keys == set(state)   # MobileNetV2: torchvision keys unchanged
    with pytest.raises(ValueError, match="format"):
        export_downstream(src, "onnx", tmp_path / "x")
