import pytest
import torch

from kdforge.models import (backbone_state_dict, block_outputs, cls_attention, create_model, feature_dim,
                            load_state_dict_checked, load_weights_file, pooled_features, token_features)
from kdforge.models.checkpoint import CheckpointMismatchError


def test_vit_taps_shapes():
    m = create_model("kdf_vit_micro", num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    assert pooled_features(m, x).shape == (2, 96) == (2, feature_dim(m))
    assert token_features(m, x).shape == (2, 65, 96)
    outs = block_outputs(m, x, [1, -1])
    assert [o.shape for o in outs] == [(2, 65, 96)] * 2
    # the last block's output passed through the final norm is forward_features
    torch.testing.assert_close(m.norm(outs[1]), m.forward_features(x))


def test_cls_attention_matches_the_models_own_attention_matrix():
    m = create_model("kdf_vit_micro", num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    attn = m.blocks[2].attn
    attn.fused_attn = False  # the explicit path materialises softmax(qk^T) before attn_drop
    seen = {}
    h = attn.attn_drop.register_forward_hook(lambda mod, i, o: seen.__setitem__("a", o))
    ours = cls_attention(m, x, [2])[0]
    h.remove()
    ref = seen["a"][:, :, 0, 1:]  # CLS query row, patch keys
    assert ours.shape == (2, 3, 64)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name, dim", [("kdf_resnet_narrow", 128), ("torchvision/resnet18", 512),
                                       ("torchvision/mobilenet_v2", 1280)])
def test_cnn_pooled_features(name, dim):
    m = create_model(name, num_classes=7).eval()
    x = torch.randn(2, 3, 32, 32)
    assert pooled_features(m, x).shape == (2, dim)
    assert m(x).shape == (2, 7)


def test_unknown_model_name_is_explained():
    with pytest.raises(ValueError, match="unknown model 'resnet_nope'"):
        create_model("resnet_nope")


@pytest.mark.parametrize("name", ["kdf_resnet_narrow", "torchvision/resnet18", "kdf_deit_micro_distilled"])
def test_backbone_export_loads_strict_into_headless_model(name, tmp_path):
    m = create_model(name, num_classes=10)
    sd = backbone_state_dict(m)
    headless = create_model(name, num_classes=0)
    headless.load_state_dict(sd, strict=True)
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "w.safetensors"))
    # a backbone file loads into a model with a classifier: head reported, left at init
    again = create_model(name, num_classes=10, weights=str(tmp_path / "w.safetensors"))
    k = next(iter(sd))
    torch.testing.assert_close(again.state_dict()[k], sd[k])


def test_mismatched_checkpoint_is_refused_with_keys(tmp_path):
    m = create_model("kdf_resnet_narrow", num_classes=10)
    other = create_model("kdf_resnet_wide", num_classes=10).state_dict()
    with pytest.raises(CheckpointMismatchError, match="shape mismatch.*strict=false"):
        load_state_dict_checked(m, other)
    partial = {k: v for k, v in m.state_dict().items() if not k.startswith("layer4")}
    partial["extra.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointMismatchError, match="missing.*layer4.*unexpected: extra.weight"):
        load_state_dict_checked(m, partial)
    rep = load_state_dict_checked(m, partial, strict=False)
    assert rep.unexpected == ["extra.weight"] and all(k.startswith("layer4") for k in rep.missing)
    torch.save({"state_dict": {"module." + k: v for k, v in m.state_dict().items()}}, tmp_path / "w.pth")
    fresh = create_model("kdf_resnet_narrow", num_classes=10)
    assert load_weights_file(fresh, tmp_path / "w.pth").ok
