"""Feature taps, extraction order and the checked feature cache (on the bundled digits)."""
import os
import time

import pytest
import torch
import torch.nn.functional as F

from kdforge.eval.features import cached_features, extract_features, tap_features
from kdforge.models import create_model


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    return create_model("kdf_vit_micro", num_classes=0, img_size=16).eval()


def test_tap_shapes_and_cls_wpatch_by_hand(vit):
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        pooled = tap_features(vit, x, "pooled")
        cls = tap_features(vit, x, "cls")
        smkd = tap_features(vit, x, "cls+wpatch")
        multi = tap_features(vit, x, "multiblock", n_blocks=2)
        # by hand: tokens after the final norm; attention of the last block recomputed from its input
        tokens = vit.forward_features(x)
        inp = {}
        h = vit.blocks[-1].register_forward_pre_hook(lambda m, a: inp.__setitem__("x", a[0]))
        vit.forward_features(x)
        h.remove()
        blk = vit.blocks[-1]
        z = blk.norm1(inp["x"])
        B, N, C = z.shape
        H = blk.attn.num_heads
        q, k, _ = blk.attn.qkv(z).reshape(B, N, 3, H, C // H).permute(2, 0, 3, 1, 4)
        att = ((q @ k.transpose(-2, -1)) * (C // H) ** -0.5).softmax(-1)[:, :, 0, 1:].mean(1)   # (B, N-1)
        att = att / att.sum(-1, keepdim=True)
        f_wp = (att[..., None] * tokens[:, 1:]).sum(1)
        ref = torch.cat([F.normalize(tokens[:, 0], dim=-1), F.normalize(f_wp, dim=-1)], -1)
        # DINO multiblock: final-normed CLS of the last 2 blocks
        outs = {}
        hs = [vit.blocks[i].register_forward_hook(lambda m, a, o, i=i: outs.__setitem__(i, o)) for i in (2, 3)]
        vit.forward_features(x)
        for hh in hs:
            hh.remove()
        ref_multi = torch.cat([vit.norm(outs[2])[:, 0], vit.norm(outs[3])[:, 0]], -1)
    assert pooled.shape == (3, 96) and cls.shape == (3, 96) and multi.shape == (3, 192)
    torch.testing.assert_close(cls, tokens[:, 0])
    torch.testing.assert_close(smkd, ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(smkd[:, :96].norm(dim=1), torch.ones(3))
    torch.testing.assert_close(multi, ref_multi)


def test_cnn_taps():
    torch.manual_seed(0)
    cnn = create_model("kdf_resnet_narrow", num_classes=0).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert tap_features(cnn, x, "pooled").shape == (2, 128)
        assert tap_features(cnn, x, "multiblock", n_blocks=2).shape == (2, 64 + 128)
    with pytest.raises(ValueError, match="CLS"):
        tap_features(cnn, x, "cls")
    with pytest.raises(ValueError, match="unknown tap"):
        tap_features(cnn, x, "mean")


def test_extract_features_keeps_order(vit, digits_root):
    from kdforge.data.datasets import ImageFolderDataset
    from kdforge.eval.features import eval_transform
    ds = ImageFolderDataset(digits_root / "val", eval_transform({"img_size": 16, "eval_crop_pct": 1.0}))
    f, y = extract_features(vit, ds, "pooled", batch_size=50, device="cpu", progress=False)
    assert f.shape == (len(ds), 96) and f.dtype == torch.float32
    assert y.tolist() == ds.targets
    with torch.no_grad():
        one = tap_features(vit, ds[7][0][None], "pooled")
    torch.testing.assert_close(f[7:8], one, atol=1e-5, rtol=1e-4)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, digits_root):
    from kdforge.cli import main
    out = tmp_path_factory.mktemp("runs") / "cnn"
    args = ["train", "configs/supervised/digits_cpu.yaml", f"data.root={digits_root}", f"out={out}",
            "data.img_size=16", "data.batch_size=64", "train.epochs=1", "train.max_steps=4", "train.progress=false",
            "train.device=cpu", "model.name=kdf_resnet_narrow"]
    assert main(args) == 0
    return out


def test_cache_hit_and_staleness(tiny_run, digits_root, tmp_path):
    import shutil
    data = tmp_path / "digits"
    shutil.copytree(digits_root, data)
    cache = tmp_path / "cache"
    kw = dict(device="cpu", progress=False, cache_dir=cache)
    a = cached_features(tiny_run, data, "val", "pooled", **kw)
    b = cached_features(tiny_run, data, "val", "pooled", **kw)
    assert not a["cached"] and b["cached"] and a["key"] == b["key"]
    assert torch.equal(a["features"], b["features"]) and torch.equal(a["labels"], b["labels"])
    # another tap or another transform -> another key
    c = cached_features(tiny_run, data, "val", "multiblock", **kw)
    d = cached_features(tiny_run, data, "val", "pooled", img_size=24, **kw)
    assert len({a["key"], c["key"], d["key"]}) == 3 and not c["cached"] and not d["cached"]
    # the split's files change -> recomputed
    img = sorted((data / "val" / "3").iterdir())[0]
    os.utime(img, ns=(time.time_ns(), time.time_ns() + 10**9))
    e = cached_features(tiny_run, data, "val", "pooled", **kw)
    assert not e["cached"] and e["key"] != a["key"]
    # the checkpoint changes -> recomputed
    ck = torch.load(tiny_run / "last.pt", weights_only=False)
    k0 = next(k for k in ck["model"] if k.endswith("conv1.weight"))
    ck["model"][k0] = ck["model"][k0] + 1.0
    torch.save(ck, tiny_run / "last.pt")
    f = cached_features(tiny_run, data, "val", "pooled", **kw)
    assert not f["cached"] and f["key"] != e["key"] and not torch.equal(f["features"], e["features"])
    assert len(list(cache.glob("*.safetensors"))) == 5


def test_amp_is_part_of_the_cache_key(tiny_run, digits_root, tmp_path):
    from kdforge.eval.features import resolve_amp
    assert resolve_amp("auto", "cpu") is None and resolve_amp("none", "cpu") is None
    assert resolve_amp("bf16", "cpu") == "bf16" and resolve_amp("auto", "cuda") == "bf16"
    with pytest.raises(ValueError, match="amp must be"):
        resolve_amp("fp8", "cpu")
    kw = dict(device="cpu", progress=False, cache_dir=tmp_path / "cache")
    fp32 = cached_features(tiny_run, digits_root, "val", "pooled", **kw)
    auto = cached_features(tiny_run, digits_root, "val", "pooled", amp="auto", **kw)   # CPU: auto = fp32
    assert auto["cached"] and auto["key"] == fp32["key"] and "amp" not in auto["meta"]["parts"]
    bf16 = cached_features(tiny_run, digits_root, "val", "pooled", amp="bf16", **kw)
    assert not bf16["cached"] and bf16["key"] != fp32["key"] and bf16["meta"]["parts"]["amp"] == "bf16"
    assert bf16["features"].dtype == torch.float32
    err = (bf16["features"] - fp32["features"]).abs().max() / fp32["features"].abs().max()
    assert 0 < err < 0.05                               # bf16 autocast really ran, and stays close
