"""The streaming scoring pass: one forward per image, exact attention, provenance, resume, selection files."""
import json

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from kdforge.data import UnlabeledFolder
from kdforge.models import create_model
from kdforge.selection import (SelectionDataset, attention_probe_scores, confidence_scores, load_scores, read_meta,
                               score_pool, select, write_selection)

BLOCKS = (1, 3)


@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(0)
    # 4-block ViT, patch 4 at 32 px -> 64 patches + CLS = 65 tokens, 3 heads
    m = create_model("kdf_vit_micro", num_classes=5).eval()
    return m


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    root = tmp_path_factory.mktemp("pool")
    rng = np.random.default_rng(0)
    for i in range(22):
        sub = root / "a" if i % 2 else root / "b" / "deep"
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(sub / f"{i:03d}.png")
    return root


def _dataset(root):
    return UnlabeledFolder(root, transform=T.Compose([T.Resize((32, 32)), T.ToTensor()]))


def _reference_scores(teacher, ds, blocks):
    """Slow reference: un-fused timm attention, softmax captured at attn_drop, one image at a time."""
    store = {}
    handles = []
    for b in blocks:
        attn = teacher.blocks[b].attn
        attn.fused_attn = False
        handles.append(attn.attn_drop.register_forward_hook(lambda m, i, o, b=b: store.__setitem__(b, o)))
    conf, att, preds = [], [], []
    try:
        with torch.no_grad():
            for i in range(len(ds)):
                z = teacher(ds[i][0][None])
                conf.append(confidence_scores(z))
                preds.append(z.argmax(-1))
                # CLS query row over the 64 patch keys, averaged over heads
                att.append(torch.stack([attention_probe_scores(store[b][:, :, 0, 1:]) for b in blocks]))
    finally:
        for h in handles:
            h.remove()
        for b in blocks:
            teacher.blocks[b].attn.fused_attn = True
    return torch.cat(conf), torch.cat(att, dim=1), torch.cat(preds)


def test_single_pass_matches_reference(teacher, pool, tmp_path):
    ds = _dataset(pool)
    table = score_pool(teacher, ds, BLOCKS, out=tmp_path / "s", batch_size=5)
    conf, att, preds = _reference_scores(teacher, ds, BLOCKS)
    assert table.complete and table.count == len(ds) == 22
    assert torch.allclose(table["confidence"], conf, atol=1e-5)
    assert torch.equal(table["predictions"], preds)
    assert torch.allclose(table["attention"], att, atol=1e-5)
    assert table["attention_heads"].shape == (2, 3, 22)
    assert table["valid"].all()
    # head 0 of the stored per-head scores = the reference code's probe
    assert torch.allclose(table.with_head(0)["attention"], table["attention_heads"][:, 0])
    # provenance
    meta = json.loads((tmp_path / "s" / "scores.json").read_text())
    assert meta["blocks"] == [1, 3] and meta["num_items"] == 22 and len(meta["teacher_hash"]) == 64
    assert "Resize" in meta["transform"] and meta["complete"] is True
    assert meta["files"][0].startswith("a/") and table.paths()[0] == str(pool / meta["files"][0])


def test_resume_after_interruption_equals_one_pass(teacher, pool, tmp_path):
    ds = _dataset(pool)
    full = score_pool(teacher, ds, BLOCKS, out=tmp_path / "full", batch_size=4)

    class Crash(Exception):
        pass

    class Flaky:  # dies while loading image 13 (after 3 full batches of 4)
        def __init__(self, base):
            self.base, self.samples, self.root = base, base.samples, base.root
            self.transform = base.transform

        def __len__(self):
            return len(self.base)

        def __getitem__(self, i):
            if i == 13:
                raise Crash()
            return self.base[i]

    with pytest.raises(Crash):
        score_pool(teacher, Flaky(ds), BLOCKS, out=tmp_path / "part", batch_size=4, save_every=1)
    meta = read_meta(tmp_path / "part")
    assert meta["count"] == 12 and meta["complete"] is False
    partial = load_scores(tmp_path / "part")
    assert torch.allclose(partial["confidence"], full["confidence"][:12], atol=1e-6)
    # stop voluntarily once more, then finish
    score_pool(teacher, ds, BLOCKS, out=tmp_path / "part", batch_size=4, max_batches=1)
    assert read_meta(tmp_path / "part")["count"] == 16
    done = score_pool(teacher, ds, BLOCKS, out=tmp_path / "part", batch_size=4)
    assert done.complete and done.count == 22
    for k in ("confidence", "attention", "attention_heads", "predictions", "valid"):
        assert torch.allclose(done[k].float(), full[k].float(), atol=1e-5), k


def test_complete_file_is_reused_and_foreign_file_refused(teacher, pool, tmp_path):
    ds = _dataset(pool)
    out = tmp_path / "s"
    score_pool(teacher, ds, BLOCKS, out=out, batch_size=8)
    mtime = (out / "scores.safetensors").stat().st_mtime_ns
    again = score_pool(teacher, ds, BLOCKS, out=out, batch_size=8)
    assert again.complete and (out / "scores.safetensors").stat().st_mtime_ns == mtime
    other = create_model("kdf_vit_micro", num_classes=5).eval()  # different weights
    with pytest.raises(ValueError, match="teacher_hash"):
        score_pool(other, ds, BLOCKS, out=out, batch_size=8)
    with pytest.raises(ValueError, match="blocks"):
        score_pool(teacher, ds, (0,), out=out, batch_size=8)
    redo = score_pool(teacher, ds, (0,), out=out, batch_size=8, overwrite=True)
    assert redo["attention"].shape == (1, 22)


def test_corrupt_image_scores_inf_and_is_not_selected(teacher, pool, tmp_path):
    bad_pool = tmp_path / "pool"
    import shutil
    shutil.copytree(pool, bad_pool)
    victim = sorted(bad_pool.rglob("*.png"))[2]
    victim.write_bytes(b"not a png")
    with pytest.warns(UserWarning, match="unreadable"):
        table = score_pool(teacher, _dataset(bad_pool), BLOCKS, out=tmp_path / "s", batch_size=8)
    assert table.meta["corrupt"] == 1 and not table["valid"][2]
    assert table["confidence"][2] == float("inf") and table["predictions"][2] == -1
    assert 2 not in select(table, 21, "combined").tolist()


def test_cnn_teacher_confidence_only(pool, tmp_path):
    cnn = create_model("kdf_resnet_narrow", num_classes=5).eval()
    table = score_pool(cnn, _dataset(pool), (), out=tmp_path / "s", batch_size=8)
    assert "attention" not in table and table["confidence"].shape == (22,)
    with pytest.raises(ValueError, match="needs 'attention'"):
        select(table, 3, "attention")


def test_selection_file_roundtrip(teacher, pool, tmp_path):
    ds = _dataset(pool)
    table = score_pool(teacher, ds, BLOCKS, out=tmp_path / "s", batch_size=8)
    idx = select(table, 7, "combined", class_balanced=True)
    path = write_selection(tmp_path / "s" / "combined_7.txt", table, idx, mode="combined", n=7)
    lines = path.read_text().splitlines()
    assert len(lines) == 7 and lines[0] == str(pool / table.files[int(idx[0])])
    meta = json.loads(path.with_suffix(".json").read_text())
    assert meta["indices"] == idx.tolist() and meta["mode"] == "combined"
    assert sum(meta["per_predicted_class"].values()) == 7
    sel = SelectionDataset(path, transform=T.ToTensor(), labels="teacher")
    assert len(sel) == 7 and sel.targets == table["predictions"][idx].tolist()
    img, lab = sel[0]
    assert img.shape == (3, 12, 12) and lab == int(table["predictions"][idx[0]])
    assert SelectionDataset(path)[0][1] == -1
