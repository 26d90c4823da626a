"""Golden values and semantics of the wild-pool scores and the selection (Attention Probe / DFND)."""
import math

import pytest
import torch

from kdforge.selection import (attention_probe_scores, balanced_quotas, combined_scores, confidence_scores,
                               select, selection_value)


# -- confidence ------------------------------------------------------------------------------------

def test_confidence_golden():
    # z = [2, 0, 0]: logsumexp = ln(e² + 2) = ln(9.389056) = 2.2395448; minus max 2 -> 0.2395448 (spec C8)
    # z = [0, 0, 0, 0]: ln 4 - 0 = 1.3862944 ; z = [5, 5]: ln(2e⁵) - 5 = ln 2 = 0.6931472
    z = torch.tensor([[2.0, 0.0, 0.0, -1e9], [0.0, 0.0, 0.0, 0.0]])
    got = confidence_scores(z)
    assert torch.allclose(got, torch.tensor([0.2395448, 1.3862944]), atol=1e-6)
    assert torch.allclose(confidence_scores(torch.tensor([[5.0, 5.0]])), torch.tensor([0.6931472]), atol=1e-6)


def test_confidence_equals_ce_against_own_argmax():
    z = torch.randn(50, 7, generator=torch.Generator().manual_seed(0)) * 3
    ref = torch.nn.functional.cross_entropy(z, z.argmax(-1), reduction="none")
    assert torch.allclose(confidence_scores(z), ref, atol=1e-5)
    assert (confidence_scores(z) >= 0).all()


def test_confidence_rejects_bad_shape():
    with pytest.raises(ValueError, match=r"\(B, K\)"):
        confidence_scores(torch.zeros(3))


# -- attention probe -------------------------------------------------------------------------------

def test_probe_uniform_is_one_and_one_hot_is_inv_sqrt_patches():
    # N = 65 tokens (CLS + 64 patches, the CIFAR ViT): the row over P = N - 1 = 64 patches.
    P = 64
    uniform = torch.full((2, 3, P), 1.0 / 65)           # scale does not matter for a cosine
    one_hot = torch.zeros(2, 3, P)
    one_hot[:, :, 5] = 0.7                              # CLS->CLS weight dropped, not renormalised
    assert torch.allclose(attention_probe_scores(uniform), torch.ones(2))
    # cos(e_j, 1) = 1 / sqrt(P) = 1 / sqrt(N - 1) = 1/8 = 0.125
    assert torch.allclose(attention_probe_scores(one_hot), torch.full((2,), 0.125))
    # ViT-B/16 at 224 px: N = 197, P = 196 -> 1/14
    oh = torch.zeros(1, 1, 196)
    oh[0, 0, 0] = 1.0
    assert attention_probe_scores(oh).item() == pytest.approx(1 / 14, abs=1e-7)


def test_probe_two_equal_peaks_golden():
    # p = [1/2, 1/2, 0, 0]: Σp = 1, ‖p‖ = 1/√2, √P = 2 -> 1 / (2 · 0.70711) = 0.70711 (spec C3: [1,0,0,0] -> 0.5)
    p = torch.tensor([[[0.5, 0.5, 0.0, 0.0]], [[1.0, 0.0, 0.0, 0.0]]])
    assert torch.allclose(attention_probe_scores(p), torch.tensor([1 / math.sqrt(2), 0.5]), atol=1e-6)


def test_probe_head_modes():
    # head 0 one-hot (0.5 for P = 4), head 1 uniform (1.0)
    a = torch.tensor([[[1.0, 0, 0, 0], [0.25, 0.25, 0.25, 0.25]]])
    assert attention_probe_scores(a, head=0).item() == pytest.approx(0.5)
    assert attention_probe_scores(a, head=1).item() == pytest.approx(1.0)
    assert attention_probe_scores(a, head="mean_score").item() == pytest.approx(0.75)
    assert attention_probe_scores(a, head="max_score").item() == pytest.approx(1.0)
    # "mean" averages the rows first: [0.625, 0.125, 0.125, 0.125]; Σ = 1, ‖·‖² = 0.390625 + 3·0.015625
    # = 0.4375 -> 1 / (2 · 0.661438) = 0.755929
    assert attention_probe_scores(a).item() == pytest.approx(1 / (2 * math.sqrt(0.4375)), abs=1e-6)
    with pytest.raises(ValueError, match="out of range"):
        attention_probe_scores(a, head=2)
    with pytest.raises(ValueError, match="head"):
        attention_probe_scores(a, head="median")


def test_probe_list_of_blocks_and_range():
    g = torch.Generator().manual_seed(1)
    rows = [torch.softmax(torch.randn(8, 3, 16, generator=g) * 3, -1) for _ in range(2)]
    s = attention_probe_scores(rows)
    assert s.shape == (2, 8)
    assert (s >= 1 / 4 - 1e-6).all() and (s <= 1 + 1e-6).all()   # [1/√P, 1] with P = 16
    # reference loop: cos(mean over heads, ones)
    for b in range(2):
        for i in range(8):
            p = rows[b][i].mean(0)
            ref = torch.nn.functional.cosine_similarity(p, torch.ones(16), dim=0)
            assert s[b, i].item() == pytest.approx(ref.item(), abs=1e-6)


def test_combined_golden():
    # 0.05 · (0.2 + 0.4) + 0.9 · 1.0 = 0.93 ; 0.05 · (1 + 1) + 0.9 · 0 = 0.1
    att = torch.tensor([[0.2, 1.0], [0.4, 1.0]])
    conf = torch.tensor([1.0, 0.0])
    assert torch.allclose(combined_scores(att, conf), torch.tensor([0.93, 0.1]))
    assert torch.allclose(combined_scores(att, conf, alpha=1.0, beta=0.0), torch.tensor([0.6, 2.0]))
    with pytest.raises(ValueError, match="does not match"):
        combined_scores(att, torch.zeros(3))


# -- selection -------------------------------------------------------------------------------------

def _scores():
    # 6 images; confidence favours 0,1,2; attention favours 3,4,5; combined mixes.
    conf = torch.tensor([0.0, 0.1, 0.2, 3.0, 2.0, 1.0])
    att = torch.tensor([[0.9, 0.8, 0.7, 0.1, 0.2, 0.3],
                        [0.9, 0.8, 0.7, 0.1, 0.2, 0.3]])
    pred = torch.tensor([0, 0, 0, 1, 1, 2])
    return {"confidence": conf, "attention": att, "predictions": pred}


def test_select_modes_pick_smallest():
    s = _scores()
    assert select(s, 3, "confidence").tolist() == [0, 1, 2]
    assert select(s, 3, "attention").tolist() == [3, 4, 5]
    # combined = 0.05·2·att + 0.9·conf = [0.09, 0.17, 0.25, 2.71, 1.82, 0.93]
    assert select(s, 4, "combined").tolist() == [0, 1, 2, 5]
    assert torch.allclose(selection_value(s, "combined"), torch.tensor([0.09, 0.17, 0.25, 2.71, 1.82, 0.93]))
    # a large α lets attention win: 1·2·att + 0.9·conf = [1.8, 1.69, 1.58, 2.9, 2.2, 1.5]
    assert select(s, 2, "combined", alpha=1.0).tolist() == [5, 2]
    # plain tensor = the value itself
    assert select(torch.tensor([3.0, 1.0, 2.0]), 2).tolist() == [1, 2]


def test_select_ties_go_to_smaller_index_and_n_bounds():
    v = torch.tensor([1.0, 0.5, 0.5, 0.5, 2.0])
    assert select(v, 2).tolist() == [1, 2]
    assert select(v, 0).tolist() == []
    assert select(v, 5).tolist() == [1, 2, 3, 0, 4]
    with pytest.raises(ValueError, match="n must be"):
        select(v, 6)
    with pytest.raises(ValueError, match="mode"):
        select(_scores(), 2, "entropy")


def test_select_attention_modes_need_attention():
    with pytest.raises(ValueError, match="needs 'attention'"):
        select({"confidence": torch.zeros(4)}, 2, "combined")


def test_random_is_seeded_and_without_replacement():
    s = _scores()
    a = select(s, 4, "random", seed=3)
    assert a.tolist() == select(s, 4, "random", seed=3).tolist()
    assert len(set(a.tolist())) == 4
    draws = {tuple(sorted(select(s, 3, "random", seed=k).tolist())) for k in range(20)}
    assert len(draws) > 3


def test_invalid_images_are_never_selected():
    s = _scores()
    s["valid"] = torch.tensor([False, True, True, True, True, True])
    assert 0 not in select(s, 5, "confidence").tolist()
    with pytest.raises(ValueError, match="readable"):
        select(s, 6, "confidence")


def test_balanced_quotas_water_filling():
    # sizes [1, 10, 10], n = 9: class 0 can give 1 only; the rest split 8 -> 4 + 4
    assert balanced_quotas(torch.tensor([1, 10, 10]), 9).tolist() == [1, 4, 4]
    # n = 10, three big classes: 3, 3, 4 (sums to n exactly)
    q = balanced_quotas(torch.tensor([5, 5, 5]), 10)
    assert q.sum() == 10 and sorted(q.tolist()) == [3, 3, 4]
    with pytest.raises(ValueError):
        balanced_quotas(torch.tensor([1, 1]), 3)


def test_class_balanced_selection():
    s = _scores()
    # confidence alone takes class 0 only; balanced takes n/K = 1 per class (smallest in each class)
    assert select(s, 3, "confidence").tolist() == [0, 1, 2]
    got = select(s, 3, "confidence", class_balanced=True)
    assert sorted(got.tolist()) == [0, 4, 5]   # class 0 -> 0 (0.0), class 1 -> 4 (2.0), class 2 -> 5 (1.0)
    assert got.tolist() == [0, 5, 4]           # still in rank order
    # class 2 has one image: its surplus goes to the others (quotas 1, 2, 2 for n = 5)
    got5 = select(s, 5, "confidence", class_balanced=True)
    assert sorted(got5.tolist()) == [0, 1, 3, 4, 5]
    # predictions passed explicitly win over scores["predictions"]
    got_expl = select(s, 2, "confidence", predictions=torch.tensor([0, 1, 0, 1, 0, 1]), class_balanced=True)
    assert sorted(got_expl.tolist()) == [0, 1]
    with pytest.raises(ValueError, match="predictions"):
        select(torch.tensor([1.0, 2.0]), 1, class_balanced=True)


def test_class_balanced_matches_reference_loop():
    g = torch.Generator().manual_seed(5)
    conf = torch.rand(200, generator=g)
    pred = torch.randint(0, 4, (200,), generator=g)
    got = select({"confidence": conf, "predictions": pred}, 40, "confidence", class_balanced=True)
    counts = torch.bincount(pred[got], minlength=4)
    assert counts.tolist() == [10, 10, 10, 10]
    for c in range(4):  # within each class: the 10 smallest
        idx = torch.nonzero(pred == c).squeeze(1)
        ref = set(idx[conf[idx].argsort()[:10]].tolist())
        assert set(got[pred[got] == c].tolist()) == ref
