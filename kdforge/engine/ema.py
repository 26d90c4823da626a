"""Exponential moving averages of parameters (momentum encoders, EMA teachers, model EMA)."""
from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def ema_update_(target: nn.Module, source: nn.Module, momentum: float, buffers: bool = True) -> None:
    """In place: ``θ_t ← m · θ_t + (1 − m) · θ_s`` for every parameter; buffers (BN statistics) are
    copied when ``buffers`` is true. Both modules must have the same structure."""
    tp = [p for p in target.parameters()]
    sp = [p.detach() for p in source.parameters()]
    if len(tp) != len(sp):
        raise ValueError(f"ema_update_: {len(tp)} target vs {len(sp)} source parameters")
    if tp:
        torch._foreach_mul_(tp, momentum)
        torch._foreach_add_(tp, sp, alpha=1.0 - momentum)
    if buffers:
        for tb, sb in zip(target.buffers(), source.buffers()):
            tb.copy_(sb)


class ModelEMA(nn.Module):
    """A frozen EMA copy of a module: ``ema.update(model)`` after each optimizer step."""

    def __init__(self, model: nn.Module, momentum: float = 0.9999):
        super().__init__()
        import copy
        self.module = copy.deepcopy(model)
        self.module.requires_grad_(False)
        self.momentum = momentum

    def update(self, model: nn.Module, momentum: float | None = None) -> None:
        ema_update_(self.module, model, self.momentum if momentum is None else momentum)

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)
