"""Small helpers shared by the evaluation modules (not public API)."""
from __future__ import annotations

import contextlib
import math

import torch
from torch import Tensor


def mean_ci95(acc: Tensor) -> tuple[float, float]:
    """Mean and 95% half-interval of per-run accuracies.

    ``acc`` (E,) in percent. Returns (mean, 1.96 · std / √E) with the population std (ddof 0), the
    convention of SMKD's ``fseval`` and of kdforge's reports.
    """
    a = acc.double().flatten()
    if a.numel() == 0:
        raise ValueError("no accuracies to summarise")
    mean = a.mean().item()
    std = a.std(correction=0).item() if a.numel() > 1 else 0.0
    return mean, 1.96 * std / math.sqrt(a.numel())


def l2_normalize(x: Tensor, eps: float = 1e-12) -> Tensor:
    """Rows divided by their L2 norm (``x / max(‖x‖, eps)``); shape unchanged."""
    return x / x.norm(dim=-1, keepdim=True).clamp_min(eps)


def as_float(x: Tensor) -> Tensor:
    """Half/bfloat16 features are upcast to float32; float64 stays float64."""
    x = torch.as_tensor(x)
    if not x.is_floating_point() or x.dtype in (torch.float16, torch.bfloat16):
        return x.float()
    return x


def block_generator(seed: int, block: int) -> torch.Generator:
    """A CPU generator for block ``block`` of a seeded stream.

    Random draws are made per fixed-size block of episodes, so episode ``i`` depends only on
    ``(seed, i)`` and never on chunk sizes or on how many episodes were asked for.
    """
    mixed = (int(seed) * 0x9E3779B97F4A7C15 + int(block) * 0xBF58476D1CE4E5B9 + 0x94D049BB133111EB) % (2**63 - 1)
    return torch.Generator().manual_seed(mixed)


def labels_to_index(labels: Tensor) -> tuple[Tensor, Tensor]:
    """(classes, index): sorted distinct labels and each row's position among them."""
    labels = torch.as_tensor(labels).long().flatten()
    classes, index = torch.unique(labels, sorted=True, return_inverse=True)
    return classes, index


@contextlib.contextmanager
def single_thread(t: Tensor):
    """Run many small CPU tensor ops on one intra-op thread, then restore the thread count.

    Loops of tiny ops (batched Newton/CG steps, SGD steps on (B, W, m) tensors, vote updates) gain
    nothing from intra-op threads and lose up to 10x when a core is shared (OpenMP barriers spin).
    No effect for tensors on an accelerator. The thread count is process-global: do not run other
    heavy torch work from another Python thread meanwhile.
    """
    n = torch.get_num_threads()
    if t.device.type != "cpu" or n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)
