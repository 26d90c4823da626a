"""`kdforge kdep-svd` against the in-memory API: the streaming pass over real images equals
SVDAligner.fit of the same teacher features; reference .npy statistics through the CLI and the method."""
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from kdforge.align.svd import SVDAligner
from kdforge.cli import main


def test_cli_streaming_pass_equals_in_memory_fit(digits_root, tmp_path):
    from safetensors.torch import save_file

    from kdforge.commands.kdep_svd import build_dataset
    from kdforge.data.transforms import build_eval_transform
    from kdforge.models import create_model
    from kdforge.models.preact import preact_pooled_features
    torch.manual_seed(0)
    teacher = create_model("kdf_resnet_narrow", num_classes=10, img_size=16)   # 128-d pre-activation feature
    weights = tmp_path / "t.safetensors"
    save_file({k: v.contiguous() for k, v in teacher.state_dict().items()}, str(weights))
    out = tmp_path / "svd"
    # val split (~360 images > 128 dims), deterministic eval transform, batches of 50 (uneven last batch)
    assert main(["kdep-svd", "kdf_resnet_narrow", str(digits_root), str(out), "--weights", str(weights),
                 "--num-classes", "10", "--split", "val", "--img-size", "16", "--batch-size", "50",
                 "--num-workers", "0", "--device", "cpu"]) == 0
    got = SVDAligner.load(out)
    meta = json.loads((out / "svd.json").read_text())
    assert meta["transform"] == "eval" and meta["split"] == "val" and meta["dim"] == 128
    assert meta["sign_convention"] == "largest_abs_positive" and str(weights.resolve()) in meta["teacher"]

    # in memory: the same teacher, the same transform, all features at once, then SVDAligner.fit
    teacher.eval()
    tf = build_eval_transform(SimpleNamespace(img_size=16, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
                                              eval_crop_pct=0.875))
    ds = build_dataset(digits_root, "val", tf)
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    with torch.no_grad():
        feats = preact_pooled_features(teacher, x)
    ref = SVDAligner.fit(feats, k=20)
    assert got.n_samples == len(ds) == meta["samples"] and got.num_components >= 20
    torch.testing.assert_close(got.mean, ref.mean.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.singular_values[:20], ref.singular_values[:20].float(), rtol=1e-4, atol=1e-4)
    # leading directions with a clear eigengap agree column by column (same canonical signs)
    s = ref.singular_values.double()
    gap = torch.minimum((s[:10] - s[1:11]), torch.cat([s[:1] * 0 + float("inf"), s[:9] - s[1:10]])) / s[0]
    sharp = [j for j in range(10) if gap[j] > 1e-3]
    assert len(sharp) >= 3
    torch.testing.assert_close(got.V[:, sharp], ref.V[:, sharp].float(), rtol=0, atol=2e-3)
    # and the transforms agree on the data
    torch.testing.assert_close(got.transform(feats, k=sharp[-1] + 1)[:, sharp],
                               ref.transform(feats, k=sharp[-1] + 1)[:, sharp].float(), rtol=1e-3, atol=1e-3)


def _reference_files(folder, d=16, stem="model", seed=0):
    rng = np.random.default_rng(seed)
    v = np.linalg.qr(rng.standard_normal((d, d)))[0].astype(np.float32)
    mu = rng.standard_normal(d).astype(np.float32)
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / f"{stem}_v.npy", v)
    np.save(folder / f"{stem}_feat_mean.npy", mu)
    np.save(folder / f"{stem}_eigen_values.npy", np.linspace(5, 1, d).astype(np.float32))
    return v, mu


def test_load_accepts_reference_npy_file_or_folder(tmp_path):
    v, mu = _reference_files(tmp_path / "pm", stem="Microsoft-ResNet50")
    f = np.random.default_rng(1).standard_normal((3, 16)).astype(np.float32)
    expected = (f - mu) @ v[:, :4]
    for src in (tmp_path / "pm", tmp_path / "pm" / "Microsoft-ResNet50_v.npy"):
        al = SVDAligner.load(src, k=4)
        assert al.k == 4 and al.meta["sign_convention"] == "as_saved"
        np.testing.assert_allclose(al.transform(torch.from_numpy(f)).numpy(), expected, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(al.singular_values.numpy(), np.linspace(5, 1, 16), rtol=1e-6)
    with pytest.raises(ValueError, match="_v.npy"):
        SVDAligner.load(tmp_path / "pm" / "Microsoft-ResNet50_feat_mean.npy")
    (tmp_path / "lonely").mkdir()
    np.save(tmp_path / "lonely" / "model_v.npy", v)
    with pytest.raises(FileNotFoundError, match="feat_mean"):
        SVDAligner.load(tmp_path / "lonely" / "model_v.npy")


def test_cli_converts_reference_npy_and_the_method_reads_it(tmp_path, capsys):
    v, mu = _reference_files(tmp_path / "ref", d=128)
    out = tmp_path / "conv.safetensors"
    assert main(["kdep-svd", "torchvision/resnet50", "data/imagenet_10pct", str(out),
                 "--reference-npy", str(tmp_path / "ref")]) == 0
    al = SVDAligner.load(out)
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["teacher"] == "torchvision/resnet50" and meta["data"] == "data/imagenet_10pct"
    assert meta["method"] == "reference_npy" and meta["n_samples"] is None
    np.testing.assert_array_equal(al.V.numpy(), v)
    np.testing.assert_array_equal(al.mean.numpy(), mu)
    # a wrong source: a one-line error, non-zero exit, nothing written
    assert main(["kdep-svd", "t", "d", str(tmp_path / "x"), "--reference-npy", str(tmp_path / "nothing")]) != 0
    assert "model_v.npy" in capsys.readouterr().err and not (tmp_path / "x").exists()

    # method.svd may name the .npy statistics directly: same target as the converted file
    from kdforge.config import load_config
    from kdforge.engine.trainer import build_method

    def method(svd):
        cfg = load_config(None, data={"method": {"name": "kdep", "svd": str(svd)},
                                      "data": {"require_root": False, "img_size": 16},
                                      "model": {"name": "kdf_resnet_narrow"},
                                      "teacher": {"name": "kdf_resnet_narrow", "num_classes": 10}})
        torch.manual_seed(0)
        return build_method(cfg, num_classes=10)
    # a 128-d teacher with 128-d statistics; k = the student's 128
    a, b = method(tmp_path / "ref" / "model_v.npy"), method(out)
    torch.testing.assert_close(a.aligner.V, b.aligner.V)
    f = torch.randn(2, 128)
    torch.testing.assert_close(a.target(f), b.target(f))
    z = (f - torch.from_numpy(mu)) @ torch.from_numpy(v)          # PTS((f - mu) V), T = 0.1, n = 3
    torch.testing.assert_close(a.target(f), torch.sign(z) * (z.abs() / 0.1) ** (1 / 3))
