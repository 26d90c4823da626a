"""The stable public API of DESIGN.md: names import from their packages, with the documented defaults."""
import inspect

import torch


def _default(fn, name):
    return inspect.signature(fn).parameters[name].default


def test_losses_names_and_defaults():
    from kdforge.losses import kd_kl, moco_infonce, probe_loss, pts, vkd_feature_loss
    assert _default(kd_kl, "temperature") == 4.0
    assert (_default(pts, "temperature"), _default(pts, "power")) == (0.1, 3.0)
    assert _default(moco_infonce, "temperature") == 0.1
    assert _default(probe_loss, "normalize") == "channel"
    assert list(inspect.signature(vkd_feature_loss).parameters)[:3] == ["student_feat", "teacher_feat", "projector"]
    z = torch.tensor([-0.8, 0.0, 0.1, 2.7])
    assert torch.allclose(pts(z), torch.sign(z) * (z.abs() / 0.1) ** (1 / 3))


def test_align_eval_selection_names():
    from kdforge.align import OrthogonalProjector, SVDAligner
    from kdforge.eval import (alignment, best_nn, class_alignment, evaluate_episodes, instdisc_topk,
                              sample_episodes, uniformity)
    from kdforge.selection import attention_probe_scores, confidence_scores, select
    assert callable(SVDAligner.fit) and callable(SVDAligner.transform)
    w = OrthogonalProjector(8, 12).weight
    assert w.shape == (12, 8) and torch.allclose(w.T @ w, torch.eye(8), atol=1e-5)
    assert _default(best_nn, "k_max") == 101 and _default(best_nn, "rep_space") == "original"
    assert _default(uniformity, "t") == 2.0 and _default(instdisc_topk, "topk") == 5
    assert _default(evaluate_episodes, "classifier") == "prototype"
    for f in (sample_episodes, alignment, class_alignment, confidence_scores, attention_probe_scores, select):
        assert callable(f)
