"""Linear probe on fixed features: a fixed, reported protocol.

Protocol (``LINEAR_PROTOCOL``): features are L2-normalised (``normalize=True``), then a linear layer
``W x + b`` (C classes) is fitted by full-batch L-BFGS (strong-Wolfe line search) on

    mean_i CE(W x_i + b, y_i) + (λ/2) ‖W‖²_F

from zero. λ is chosen from ``wd_grid`` by accuracy on a validation split when one is given (warm
started from the previous λ; ties → larger λ), else ``wd`` is used as given. The test split never
selects anything. For the MoCo image protocol (frozen backbone in eval mode, SGD lr 30,
milestones 60/80) train the ``supervised`` method with a frozen backbone through the trainer.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from kdforge.eval._common import as_float, l2_normalize

LINEAR_PROTOCOL = {
    "model": "linear layer (W, b), multinomial cross-entropy",
    "features": "L2-normalised rows",
    "objective": "mean CE + (wd/2)·||W||²",
    "optimiser": "full-batch L-BFGS, strong-Wolfe line search, from zero",
    "selection": "wd chosen on the validation split when given (ties -> larger wd); test never selects",
}


@dataclass
class LinearProbeResult:
    """Result of :func:`linear_probe`: test ``acc`` (top-1 %), optional ``acc5``, ``val_acc``,
    the chosen ``wd``, the protocol, per-wd validation accuracies, and the fitted ``weight`` (C, D)
    and ``bias`` (C,) (for the normalised features when ``normalize``)."""

    acc: float
    acc5: Optional[float]
    val_acc: Optional[float]
    wd: float
    protocol: dict
    val_by_wd: dict = field(default_factory=dict)
    weight: Optional[Tensor] = None
    bias: Optional[Tensor] = None

    def to_dict(self) -> dict:
        """JSON-ready dict (without the weights)."""
        return {"acc": self.acc, "acc5": self.acc5, "val_acc": self.val_acc, "wd": self.wd,
                "protocol": dict(self.protocol), "val_by_wd": {str(k): v for k, v in self.val_by_wd.items()}}

    def __str__(self) -> str:
        v = f", val {self.val_acc:.2f}%" if self.val_acc is not None else ""
        return f"linear probe {self.acc:.2f}% top-1 (wd={self.wd:g}{v})"


def _fit(x: Tensor, y: Tensor, n_classes: int, wd: float, max_iter: int, init=None) -> tuple[Tensor, Tensor]:
    D = x.shape[1]
    W = torch.zeros(n_classes, D, dtype=x.dtype, device=x.device) if init is None else init[0].clone()
    b = torch.zeros(n_classes, dtype=x.dtype, device=x.device) if init is None else init[1].clone()
    W.requires_grad_(True)
    b.requires_grad_(True)
    opt = torch.optim.LBFGS([W, b], lr=1.0, max_iter=max_iter, history_size=20, tolerance_grad=1e-9,
                            tolerance_change=1e-12, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(torch.addmm(b, x, W.T), y) + 0.5 * wd * W.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return W.detach(), b.detach()


def _topk_acc(x: Tensor, y: Tensor, W: Tensor, b: Tensor, k: int) -> float:
    correct = 0
    for s in range(0, x.shape[0], 65536):
        logits = torch.addmm(b, x[s:s + 65536], W.T)
        kk = min(k, logits.shape[1])
        top = logits.topk(kk, dim=1).indices
        correct += int((top == y[s:s + 65536, None]).any(1).sum())
    return 100.0 * correct / max(1, x.shape[0])


def linear_probe(train_x: Tensor, train_y, test_x: Tensor, test_y, val: Optional[tuple] = None, *,
                 normalize: bool = True, wd: float = 1e-4,
                 wd_grid: Sequence[float] = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2), max_iter: int = 500) -> LinearProbeResult:
    """Multinomial logistic-regression probe with the fixed protocol of the module doc.

    Args:
        train_x: (N, D) features; train_y: (N,) labels (any integers; classes = those of train).
        test_x, test_y: evaluation split. ``val``: optional ``(val_x, val_y)`` to choose wd.
        normalize: L2-normalise features (part of the protocol; reported).
        wd: λ used when no validation split is given.
        wd_grid: candidate λ when ``val`` is given.
        max_iter: L-BFGS iterations per fit.

    Returns:
        :class:`LinearProbeResult` (accuracies in percent; test labels unseen in train count wrong).
    """
    prep = (lambda z: l2_normalize(as_float(z))) if normalize else as_float
    xtr = prep(train_x)
    dev = xtr.device
    classes, ytr = torch.unique(torch.as_tensor(train_y).long().flatten().to(dev), sorted=True, return_inverse=True)

    def map_y(y):
        y = torch.as_tensor(y).long().flatten().to(dev)
        pos = torch.searchsorted(classes, y).clamp(max=classes.numel() - 1)
        return torch.where(classes[pos] == y, pos, torch.full_like(pos, -1))

    C = classes.numel()
    val_by_wd = {}
    if val is not None:
        xv, yv = prep(val[0]).to(dev), map_y(val[1])
        best = None
        init = None
        for lam in sorted(wd_grid, reverse=True):
            Wb = _fit(xtr, ytr, C, lam, max_iter, init)
            init = Wb
            acc = _topk_acc(xv, yv, *Wb, 1)
            val_by_wd[lam] = acc
            if best is None or acc > best[0]:
                best = (acc, lam, Wb)
        val_acc, wd, (W, b) = best
    else:
        val_acc = None
        W, b = _fit(xtr, ytr, C, wd, max_iter)
    xte, yte = prep(test_x).to(dev), map_y(test_y)
    acc = _topk_acc(xte, yte, W, b, 1)
    acc5 = _topk_acc(xte, yte, W, b, 5) if C > 5 else None
    protocol = dict(LINEAR_PROTOCOL, normalize=normalize, max_iter=max_iter,
                    wd_grid=list(wd_grid) if val is not None else None)
    return LinearProbeResult(acc, acc5, val_acc, wd, protocol, val_by_wd, W, b)
