"""iBOT block-mask generator for masked image modelling.

Zhou et al., "iBOT: Image BERT Pre-Training with Online Tokenizer" (ICLR 2022), after BEiT's blockwise
masking; spec ``shared/methods/smkd.md`` §1.4. For a patch grid of h × w cells:

1. **Ratio** r per image: for each (mean, var) pair of ``ratio`` / ``ratio_var`` draw U(mean − var,
   mean + var) (or take the mean when var = 0), then pick one of the pair results uniformly. The
   default ``ratio=(0.0, 0.3)``, ``ratio_var=(0.0, 0.2)`` gives r = 0 (no mask) with probability ½ and
   r ~ U(0.1, 0.5) otherwise — iBOT's "mask half of the images" recipe.
2. **Block shape** (``shape="block"``): target ``high = r·h·w``; while fewer cells are masked, try up
   to 10 times to place a rectangle of area ~ U(low, high − count) with ``low = (min(h, w) // 3)²`` and
   aspect ratio exp(U(ln a, ln 1/a)) (a = ``min_aspect`` = 0.3), sides rounded, strictly smaller than
   the grid, at a uniform position; keep it if it adds between 1 and ``high − count`` new cells. Stop
   when 10 attempts add nothing. A kept block never takes the count above ``high``; the result can
   fall short of it when placement fails.
3. **Random shape** (``shape="rand"``): exactly ⌊high⌋ cells chosen uniformly.

Randomness comes from a ``random.Random``-like object (default: the module ``random``, which
kdforge's datasets seed per sample), so masks are reproducible per (seed, epoch, index).
"""
from __future__ import annotations

import math
import random
from typing import Optional, Sequence

import torch
from torch import Tensor


class BlockMaskGenerator:
    """Callable ``gen(h, w, rng=None) -> BoolTensor (h, w)``; True = masked patch. See the module doc."""

    def __init__(self, ratio: Sequence[float] = (0.0, 0.3), ratio_var: Sequence[float] = (0.0, 0.2),
                 shape: str = "block", min_aspect: float = 0.3, max_attempts: int = 10,
                 min_block: Optional[int] = None):
        ratio = [float(r) for r in (ratio if isinstance(ratio, (list, tuple)) else [ratio])]
        ratio_var = [float(v) for v in (ratio_var if isinstance(ratio_var, (list, tuple)) else [ratio_var])]
        if len(ratio) != len(ratio_var):
            raise ValueError(f"mask ratio {ratio} and ratio_var {ratio_var} must have the same length")
        for m, v in zip(ratio, ratio_var):
            if v < 0 or m - v < 0 or m + v > 1:
                raise ValueError(f"mask ratio {m} ± {v} must stay within [0, 1]")
        if shape not in ("block", "rand"):
            raise ValueError(f"mask shape must be 'block' or 'rand', got {shape!r}")
        if not 0 < min_aspect <= 1:
            raise ValueError(f"min_aspect must be in (0, 1], got {min_aspect}")
        self.ratio, self.ratio_var, self.shape = ratio, ratio_var, shape
        self.log_aspect = (math.log(min_aspect), math.log(1.0 / min_aspect))
        self.max_attempts = int(max_attempts)
        self.min_block = min_block

    def draw_ratio(self, rng=None) -> float:
        """One mask ratio r (step 1 of the module doc)."""
        rng = rng or random
        picks = [rng.uniform(m - v, m + v) if v > 0 else m for m, v in zip(self.ratio, self.ratio_var)]
        return picks[0] if len(picks) == 1 else rng.choice(picks)

    def _add_block(self, mask: list[list[bool]], h: int, w: int, max_new: float, rng) -> int:
        low = self.min_block if self.min_block is not None else (min(h, w) // 3) ** 2
        for _ in range(self.max_attempts):
            area = rng.uniform(low, max_new)
            aspect = math.exp(rng.uniform(*self.log_aspect))
            bh = int(round(math.sqrt(area * aspect)))
            bw = int(round(math.sqrt(area / aspect)))
            if bw < w and bh < h:
                top, left = rng.randint(0, h - bh), rng.randint(0, w - bw)
                cells = [(i, j) for i in range(top, top + bh) for j in range(left, left + bw) if not mask[i][j]]
                if 0 < len(cells) <= max_new:
                    for i, j in cells:
                        mask[i][j] = True
                    return len(cells)
        return 0

    def mask_with_ratio(self, h: int, w: int, r: float, rng=None) -> Tensor:
        """A (h, w) bool mask for a given ratio ``r`` (steps 2–3 of the module doc)."""
        rng = rng or random
        high = r * h * w
        if self.shape == "rand":
            k = int(high)
            cells = list(range(h * w))
            rng.shuffle(cells)
            flat = torch.zeros(h * w, dtype=torch.bool)
            flat[cells[:k]] = True
            return flat.view(h, w)
        mask = [[False] * w for _ in range(h)]
        count = 0
        while count < high:
            delta = self._add_block(mask, h, w, high - count, rng)
            if delta == 0:
                break
            count += delta
        return torch.tensor(mask, dtype=torch.bool).view(h, w)

    def __call__(self, h: int, w: Optional[int] = None, rng=None) -> Tensor:
        w = h if w is None else w
        rng = rng or random
        return self.mask_with_ratio(h, w, self.draw_ratio(rng), rng)

    def __repr__(self) -> str:
        return (f"BlockMaskGenerator(ratio={self.ratio}, ratio_var={self.ratio_var}, shape={self.shape!r}, "
                f"min_aspect={math.exp(self.log_aspect[0]):.3g})")
