"""Per-iteration schedules (pure functions of the step).

``lr_factor(step, ...)`` multiplies the base learning rate: linear warmup from
``warmup_start_factor`` to 1 over ``warmup_steps``, then

* cosine: ``min_ratio + (1 - min_ratio) * 0.5 * (1 + cos(pi * t))``, t = progress after warmup in [0, 1]
* step:   ``gamma ** (number of milestones passed)`` (milestones in steps)
* constant: 1
* poly:   ``min_ratio + (1 - min_ratio) * (1 - t) ** power`` (DeepLab / PSPNet, power 0.9)
"""
from __future__ import annotations

import math
from typing import Sequence


def cosine_value(start: float, end: float, step: int, total: int) -> float:
    """Cosine interpolation from ``start`` (step 0) to ``end`` (step ``total``), clamped."""
    if total <= 0:
        return end
    t = min(max(step / total, 0.0), 1.0)
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * t))


def linear_value(start: float, end: float, step: int, total: int) -> float:
    if total <= 0:
        return end
    t = min(max(step / total, 0.0), 1.0)
    return start + (end - start) * t


def lr_factor(step: int, total_steps: int, name: str = "cosine", warmup_steps: int = 0,
              warmup_start_factor: float = 0.0, min_ratio: float = 0.0,
              milestones: Sequence[int] = (), gamma: float = 0.1, power: float = 0.9) -> float:
    if warmup_steps > 0 and step < warmup_steps:
        return linear_value(warmup_start_factor, 1.0, step, warmup_steps)
    if name == "cosine":
        return cosine_value(1.0, min_ratio, step - warmup_steps, max(total_steps - warmup_steps, 1))
    if name == "step":
        return gamma ** sum(step >= m for m in milestones)
    if name == "constant":
        return 1.0
    if name == "poly":
        t = min(max((step - warmup_steps) / max(total_steps - warmup_steps, 1), 0.0), 1.0)
        return min_ratio + (1.0 - min_ratio) * (1.0 - t) ** power
    raise ValueError(f"unknown schedule {name!r}")
